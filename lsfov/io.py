"""Images in and results out: OME-Zarr (NGFF 0.4/0.5), TIFF and .npy <-> xarray.

* :func:`open_image` reads an image lazily (Dask) into an ``xarray.DataArray`` with dims ``(y, x)`` and
  coordinates at pixel centres, in µm when the file says so (``translation + scale * index``).
* :func:`save` writes a Dataset (or DataArray) as an lsfov *result*: a zarr v3 group holding one NGFF
  0.5 multiscale image per variable (``deblurred/``, ``depth/``, ...), each with its own scale and
  translation so that napari overlays them on the raw image. Writing streams chunk by chunk, goes to
  a temporary sibling path first and is moved into place only when complete; the root's
  ``lsfov.complete`` attribute is the completion marker.
* :func:`open_result` reads a result back as one ``xarray.Dataset`` with the same variable names.
"""
from __future__ import annotations

import contextlib
import glob
import html
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ._validate import LsfovWarning, as_bits, boolean, known_shape, positive_int, readable_array, real_number, user_stacklevel, yx_order
from .cluster import compute

log = logging.getLogger("lsfov")


_READING = threading.local()  # set while lsfov's own reads run (the filters below hush only those)


class _QuietOmeZarr(logging.Filter):
    """While lsfov reads an OME-Zarr, ome-zarr's reader says "version mismatch" for every store not of
    the newest NGFF version (lsfov reads 0.4 and 0.5 alike) and "no parent found for <Label ...>" for
    an image's labels (which lsfov does not read): noise, even with -q. Other users of ome-zarr in
    the process (napari, scripts) still see them."""

    def filter(self, record):
        if not getattr(_READING, "on", False):
            return True
        msg = record.getMessage()
        return not (msg.startswith("version mismatch") or msg.startswith("no parent found"))


for _name in ("ome_zarr.io", "ome_zarr.reader"):
    logging.getLogger(_name).addFilter(_QuietOmeZarr())


@contextlib.contextmanager
def _reading_ngff():
    """lsfov's own read of an OME-Zarr: ome-zarr's noise hushed (:class:`_QuietOmeZarr`)."""
    before = getattr(_READING, "on", False)
    _READING.on = True
    try:
        yield
    finally:
        _READING.on = before

__all__ = ["open_image", "open_planes", "save", "open_result", "describe", "atomic_directory", "atomic_file", "pixel_size",
           "with_pixel_size", "image_origin"]

SPATIAL_UNIT = "micrometer"
_NGFF_NONSPATIAL = {"t": "time", "c": "channel"}
_PYRAMID_MIN = 512  # no pyramid level smaller than this along y or x
_CHUNK = 1024


# ---------------------------------------------------------------------------------------------- reading


# Names of other formats: a result (a directory) under one would pass for a file of that format.
#: What lsfov reads as TIFF: BigTIFF's own suffixes too (tifffile reads and writes them all).
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
NOT_ZARR = (*TIFF_SUFFIXES, ".npy", ".png", ".jpg", ".jpeg", ".h5", ".czi", ".nd2", ".json", ".pt", ".csv")


def check_result_name(path) -> None:
    """Refuse a result (a directory) named like a file of another format: it would pass for one; or
    inside a zarr store (a variable of another result, its array): replacing it would leave a store in
    a store, which neither that result nor a viewer reads any more."""
    path = _as_path(path)
    if path.suffix.lower() in NOT_ZARR:
        raise ValueError(f"{path}: results are OME-Zarr directories; name it {path.with_suffix('.zarr').name}")
    where = Path(os.path.realpath(path.parent))
    for parent in reversed((where, *where.parents)):  # (the outermost: the result, not its variable)
        if any((parent / marker).exists() for marker in ("zarr.json", ".zgroup", ".zarray")):
            raise ValueError(f"{path} is inside the zarr store {parent}; a result is a store of its own: write it "
                             "outside that one")


def open_image(path, *, channel=None, z=None, t=None, level: int = 0, chunks=None, series=None) -> xr.DataArray:
    """Open a 2-D image lazily as an ``xarray.DataArray`` with dims ``(y, x)``.

    Parameters
    ----------
    path : str or Path
        OME-Zarr image (NGFF 0.4 or 0.5; a multiscale group), TIFF/OME-TIFF, or ``.npy``.
    channel, z, t : int, optional
        Index along that axis of a multi-dimensional image (negative counts from the end; 0 or -1 is
        accepted for an axis the image lacks). Singleton axes are dropped; a remaining axis with more
        than one element must be chosen.
    level : int
        Pyramid level of an OME-Zarr image or a pyramidal (OME-)TIFF (0 = full resolution).
    chunks : int or tuple, optional
        Dask chunking of the result (default: the file's chunks, at most 2048²).
    series : int, optional
        Which image of an OME-TIFF of several (its ``Image`` elements: stage positions, fields of
        view), or of a TIFF of images appended one by one (read as a z-stack when not given).

    Returns
    -------
    xarray.DataArray
        Dask-backed, dims ``("y", "x")``; coordinates are pixel centres in µm when the pixel size is
        known (``attrs["pixel_um"]``), otherwise pixel indices (coordinate ``units`` attr says which).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    TypeError
        If ``path`` is not a str or Path, ``level``, ``channel``, ``z``, ``t`` or ``series`` is not an
        integer, or the image's values are not real numbers (e.g. complex).
    ValueError
        If ``path`` is empty or not an image lsfov reads (not OME-Zarr, TIFF or ``.npy``; damaged,
        cut short, an incomplete result, an HCS plate or well); ``level``, ``series`` or an index is
        out of range, or an index other than 0 or -1 is given for an axis the image lacks (``series`` for a file that
        is not a TIFF); ``chunks`` is not a positive size or pair of them; or the image is empty.
        Two subclasses say what to choose: :class:`PlaneNotChosen` for an axis of several planes
        left unchosen, :class:`SeveralImages` for an OME-TIFF of several images without ``series``.

    Examples
    --------
    A z-stack of 3 planes, 0.1 µm pixels 0.5 µm apart, written as ImageJ writes one:

    >>> import tifffile
    >>> import lsfov
    >>> from lsfov import simulate
    >>> stack = np.stack([simulate.bead_field((256, 256), seed=s).image for s in range(3)])
    >>> tifffile.imwrite("stack.tif", stack, imagej=True, resolution=(10, 10),
    ...                  metadata={"axes": "ZYX", "unit": "um", "spacing": 0.5})
    >>> image = lsfov.open_image("stack.tif", z=1)  # lazy: read chunk by chunk when used
    >>> image.dims, image.shape, str(image.dtype)
    (('y', 'x'), (256, 256), 'float32')
    >>> image.attrs["pixel_um"], float(image["x"][1]), image["x"].attrs["units"], float(image["z"])
    (0.1, 0.1, 'micrometer', 0.5)
    """
    path = _as_path(path)
    for name, idx in (("level", level), ("channel", channel), ("z", z), ("t", t), ("series", series)):
        _check_index(name, idx)
    if chunks is not None:
        chunks = _chunk_pair(chunks)
    arr = _open_any(path.resolve(), level, series)  # absolute: workers may read it from another directory
    arr = _select(arr, path, channel=channel, z=z, t=t)
    if arr.dtype.kind not in "biuf":  # known from the header: refused here, not deep in the first use
        raise TypeError(f"{path} holds {arr.dtype} values; lsfov reads real intensity images (take the "
                        "magnitude or the real part and save that)")
    if series is not None:  # which image of the file this is (a TIFF's, counted from 0), for what is made of it
        arr.attrs["plane"] = {"series": int(arr.attrs.pop("series", series)), **arr.attrs.get("plane", {})}
    if chunks is not None:
        arr = arr.chunk(dict(zip(("y", "x"), chunks)))
    elif max(arr.data.chunksize) > 2048:
        arr = arr.chunk({"y": min(2048, arr.sizes["y"]), "x": min(2048, arr.sizes["x"])})
    arr.name = None  # not the Dask key xarray takes by default: saved, an image is named "image"
    return arr


def _as_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or directory name (str or Path), got {type(path).__name__}")
    if not os.fspath(path):
        raise ValueError("path is empty; give a file or directory name")
    return Path(path)


def _check_index(name, idx):
    """An index along an image axis (or a pyramid level): an integer, not a bool, float or string."""
    if idx is not None and (isinstance(idx, bool) or not isinstance(idx, (int, np.integer))):
        raise TypeError(f"{name} must be an integer index, got {idx!r}")


def _chunk_pair(chunks) -> tuple[int, int]:
    """``chunks`` as (y, x) edges in pixels: an int or a pair of positive integers."""
    pair = (chunks, chunks) if np.isscalar(chunks) else tuple(chunks)
    try:
        ok = len(pair) == 2 and all(not isinstance(c, (bool, str)) and float(c) == int(c) > 0 for c in pair)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"chunks must be a positive number of pixels or a pair (y, x) of them, got {chunks!r}")
    return int(pair[0]), int(pair[1])


def open_planes(path, *, channel=None) -> list[xr.DataArray]:
    """Every 2-D plane of an image (all z and t; of an OME-TIFF of several images, all of theirs),
    lazily, as (y, x) DataArrays: a bead stack.

    Parameters
    ----------
    path : str or Path
        An image :func:`open_image` reads (OME-Zarr, TIFF/OME-TIFF or ``.npy``), at full resolution.
    channel : int, optional
        The channel of a multi-channel image; needed when it has more than one.

    Returns
    -------
    list of xarray.DataArray
        Dask-backed ``(y, x)`` planes, z and t flattened in file order (image by image for an
        OME-TIFF of several), each with the image's ``attrs`` (and the chosen channel's name, where
        the file names it, as ``attrs["channel"]``); a 2-D image gives a list of one.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    TypeError
        If ``path`` is not a str or Path, or ``channel`` not an integer.
    ValueError
        If the file is not an image lsfov reads, ``channel`` is out of range, or the image has
        several channels and none is chosen (:class:`PlaneNotChosen`).
    """
    path = _as_path(path)
    _check_index("channel", channel)
    try:
        arr = _open_any(path.resolve(), 0)
    except SeveralImages:  # stage positions of beads: each image's planes
        return [p for im in _open_tiff(path.resolve(), every=True) for p in _planes(im, path, channel)]
    return _planes(arr, path, channel)


def _planes(arr, path, channel):
    arr.name = None
    if channel is not None or ("c" in arr.dims and arr.sizes["c"] == 1):
        i = 0 if channel is None else channel
        name = _channel_name(arr, i)
        arr = _select_axis(arr, path, "c", i, "channel")
        if name is not None:  # as open_image keeps it
            arr.attrs["channel"] = name
    if "c" in arr.dims:
        raise PlaneNotChosen(f"{path}: the image has {arr.sizes['c']} channels; choose one with channel= (--channel)",
                             "c", arr.sizes["c"])
    lead = [d for d in arr.dims if d not in ("y", "x")]
    stacked = arr.stack(plane=lead) if lead else arr.expand_dims("plane")
    stacked = stacked.transpose("plane", "y", "x")
    return [stacked.isel(plane=i, drop=True).assign_attrs(arr.attrs) for i in range(stacked.sizes["plane"])]


def _open_any(path: Path, level: int, series: int | None = None) -> xr.DataArray:
    """The whole array of an OME-Zarr, TIFF or .npy image, lazily, with its own dims."""
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    tiff = path.suffix.lower() in TIFF_SUFFIXES and not path.is_dir()
    if series not in (None, 0) and not tiff:
        raise ValueError(f"{path}: series={series} (--series) picks an image of a TIFF of several; this is one image")
    if path.is_dir():
        grid = _node_grid(path)
        if grid:  # a map's variable: its nodes are not pixels (its NGFF scale is their spacing)
            raise ValueError(f"{path} is a variable on the node grid {grid} of the result {path.parent}, not an image; "
                             f"open it with lsfov.open_result({str(path.parent)!r})")
        try:
            return _open_ngff(path, level)
        except Exception as e:
            damaged = _damaged_metadata(path)
            if damaged is None:
                raise
            raise ValueError(damaged) from e
    if tiff:
        return _open_tiff(path, level, series)
    if level:
        raise ValueError(f"{path}: pyramid level {level} does not exist (a .npy file has level 0 only)")
    if path.suffix.lower() == ".npy":
        return _open_npy(path)
    raise ValueError(f"{path}: not an image lsfov can read (OME-Zarr directory, TIFF (.tif, .tiff, .btf, .tf8, .tf2) "
                     "or .npy)")


def _node_grid(path: Path) -> tuple | None:
    """The node dims (gy, gx) of a result's variable stored at ``path`` on a map's node grid; None for
    anything else."""
    dims = (_group_attrs(path).get("lsfov") or {}).get("dims") if (path / "zarr.json").exists() else None
    return tuple(dims) if isinstance(dims, list) and {"gy", "gx"} & set(dims) else None


def _damaged_metadata(path: Path) -> str | None:
    """What is wrong with a zarr store's metadata, in one line, if that is why it cannot be read: a
    metadata file of its group or of one of its arrays or groups one level down that is not JSON,
    or a multiscale's dataset whose array metadata is missing; None if none of these."""
    names = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
    for f in [path / n for n in names] + sorted(f for n in names for f in path.glob(f"*/{n}")):
        if not f.is_file():
            continue
        try:
            json.loads(f.read_bytes())
        except ValueError as e:
            return f"{f} is damaged (not JSON: {type(e).__name__}); copy the store again or write it again"
        except OSError:  # unreadable (permissions): not damage; the error reading it says so
            continue
    attrs = _group_attrs(path)
    for ms in (attrs.get("ome") or attrs).get("multiscales") or []:
        for ds in ms.get("datasets", []) if isinstance(ms, dict) else []:
            where = path / str(ds.get("path", "")) if isinstance(ds, dict) else None
            if where is not None and not any((where / n).is_file() for n in ("zarr.json", ".zarray")):
                return (f"{where}: the array of pyramid level {ds.get('path')} has no metadata (zarr.json); "
                        "the store is damaged: copy it again or write it again")
    return None


class SeveralImages(ValueError):
    """An OME-TIFF of ``n`` images (stage positions, fields of view) where none was chosen."""

    def __init__(self, message, n):
        super().__init__(message)
        self.n = n


class PlaneNotChosen(ValueError):
    """An image with more planes than one along ``dim`` where one 2-D plane is needed (a CLI option
    that takes no --z, --t or --channel of its own says so in its own words)."""

    def __init__(self, message, dim, n):
        super().__init__(message)
        self.dim, self.n = dim, n


def _channel_name(arr, i) -> str | None:
    """The name of channel ``i`` of ``arr``, where its file names its channels (else None)."""
    c = arr.coords["c"] if "c" in arr.coords else None  # not .get: xarray makes up an index
    if c is None or c.dtype.kind not in "OUS" or not -c.size <= int(i) < c.size:  # (out of range: said later)
        return None
    return str(c.values[int(i)])


def _select_axis(arr, path, dim, idx, flag, keep: bool = False):
    """Plane ``idx`` along ``dim``; ``keep``: with its coordinate as a 0-D one, as ``.isel`` keeps it
    (where it lies, or the channel's name: a stack rebuilt from such planes with ``xr.concat`` knows
    its axis)."""
    if dim not in arr.dims:
        if idx in (0, -1):
            return arr
        raise ValueError(f"{path}: {flag}={idx} (--{flag}) given but the image has no {dim} axis (dims {arr.dims})")
    n = arr.sizes[dim]
    if not -n <= int(idx) < n:
        raise ValueError(f"{path}: {flag}={idx} (--{flag}) out of range; the image has {n} along {dim}")
    return arr.isel({dim: int(idx)}, drop=not (keep and dim in arr.coords))


def _open_ngff(path: Path, level: int) -> xr.DataArray:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    root_attrs = _group_attrs(path)
    if "lsfov" in root_attrs and "multiscales" not in root_attrs and "multiscales" not in root_attrs.get("ome", {}):
        other = _other_store(root_attrs["lsfov"])
        if other:
            raise ValueError(f"{path} is {other}, not an image")
        names = root_attrs["lsfov"].get("variables", [])
        # what `lsfov simulate` makes to be read (its image or blurred image), or a result's only
        # image (`lsfov deconvolve`'s deblurred): the image it holds
        images = [n for n in names if (path / n / "zarr.json").exists() and not _node_grid(path / n)
                  and "multiscales" in (_group_attrs(path / n).get("ome") or {})]
        one = next((n for n in ("image", "blurred") if n in names), images[0] if len(images) == 1 else None)
        if one is not None and root_attrs["lsfov"].get("complete"):
            log.info("%s is an lsfov result; reading its variable %r", path, one)
            return _open_ngff(path / one, level)
        if not root_attrs["lsfov"].get("complete"):  # (its variables are refused too: say so here)
            raise ValueError(f"{path} is an incomplete result (the run that wrote it was interrupted); rerun it with "
                             "--overwrite")
        if not images and all(_node_grid(path / n) for n in names):  # a PSF map, a depth map
            raise ValueError(f"{path} is an lsfov result on a node grid (a PSF map or depth: {', '.join(names)}), "
                             "not an image; open it with lsfov.open_result")
        raise ValueError(
            f"{path} is an lsfov result with variables {names}; open it with lsfov.open_result "
            f"or open one variable as {path}/<variable>"
            + (f" (its images: {', '.join(images)})" if images and names != images else "")
        )
    parent = _group_attrs(path.parent).get("lsfov") if path.parent != path else None
    if isinstance(parent, dict) and "variables" in parent and not parent.get("complete"):
        raise ValueError(f"{path} belongs to an incomplete result (the run that wrote {path.parent} was "
                         "interrupted); rerun it with --overwrite")
    if path.parent != path and "image-label" in (_group_attrs(path.parent).get("ome") or _group_attrs(path.parent)):
        raise ValueError(f"{path} is a level of the label image (a segmentation) {path.parent}, not an intensity "
                         "image; give the image itself")
    ms = (_group_attrs(path.parent).get("ome") or _group_attrs(path.parent)).get("multiscales") \
        if path.parent != path else None
    levels = [str(d.get("path")) for d in (ms[0].get("datasets") or []) if isinstance(d, dict)] \
        if isinstance(ms, list) and ms and isinstance(ms[0], dict) else []
    if path.name in levels:  # a level of a multiscale image: read through the image, at its scale
        if _node_grid(path.parent):
            raise ValueError(f"{path} is a level of {path.parent}, a variable on a PSF map's node grid, not an image; "
                             f"open the result with lsfov.open_result({str(path.parent.parent)!r})")
        if level:
            raise ValueError(f"{path} is pyramid level {levels.index(path.name)} of the image {path.parent}; open that "
                             f"image with level={levels.index(path.name)}")
        return _open_ngff(path.parent, levels.index(path.name))
    plain = _plain_zarr_array(path)
    if plain is not None:
        if level:
            raise ValueError(f"{path}: pyramid level {level} does not exist (a plain zarr array has level 0 only)")
        return plain
    with _reading_ngff():
        loc = parse_url(str(path), mode="r")
    if loc is None:
        raise ValueError(f"{path}: not a zarr store")
    attrs = _group_attrs(path)
    attrs = attrs.get("ome") or attrs
    if "image-label" in attrs or isinstance(attrs.get("labels"), list):  # a segmentation, not light
        image = path.parent.parent if "image-label" in attrs else path.parent
        what = "a label image (a segmentation)" if "image-label" in attrs else "the labels group"
        raise ValueError(f"{path} is {what} of the OME-Zarr image {image}, not an intensity image; give the image "
                         "itself")
    if isinstance(attrs.get("plate"), dict) or isinstance(attrs.get("well"), dict):  # HCS: images inside
        wells = (attrs.get("plate") or {}).get("wells") or [{}]
        field = f"{wells[0].get('path', 'A/1')}/0" if "plate" in attrs else "0"
        raise ValueError(f"{path} is an OME-Zarr {'plate' if 'plate' in attrs else 'well'} (HCS), not one "
                         f"image; give one field of view's image, e.g. {path / field}")
    with _reading_ngff():
        node = next((n for n in Reader(loc)() if n.load(Multiscales)), None)
    if node is None:
        raise ValueError(f"{path}: a zarr store with no OME-Zarr multiscale image in it; give an OME-Zarr image "
                         "(NGFF 0.4 or 0.5), a TIFF or a .npy file")
    if not 0 <= level < len(node.data):
        raise ValueError(f"{path}: pyramid level {level} does not exist (levels 0..{len(node.data) - 1})")
    data = node.data[level]
    axes = node.metadata.get("axes") or [{"name": n} for n in "tczyx"[-data.ndim :]]
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    data = _in_large_blocks(path, level, data, names)
    transforms = node.metadata.get("coordinateTransformations", [[]] * len(node.data))[level]
    scale = np.ones(data.ndim)
    trans = np.zeros(data.ndim)
    for tr in transforms or []:
        if tr.get("type") == "scale":
            scale = np.asarray(tr["scale"], dtype=float)
        elif tr.get("type") == "translation":
            trans = np.asarray(tr["translation"], dtype=float)
    # NGFF: the multiscale's own transforms apply after the dataset's (the reader leaves them out).
    for tr in _multiscale_transforms(path):
        if tr.get("type") == "scale":
            top = np.asarray(tr["scale"], dtype=float)
            scale, trans = scale * top, trans * top
        elif tr.get("type") == "translation":
            trans = trans + np.asarray(tr["translation"], dtype=float)
    coords, sizes = {}, {}
    for i, (ax, name) in enumerate(zip(axes, names)):
        if name in ("y", "x"):
            unit = ax.get("unit") if isinstance(ax, dict) else None
            factor = _to_um(unit)
            if factor is not None:
                coords[name] = _coord(name, grid_values(trans[i] * factor, scale[i] * factor, data.shape[i]), SPATIAL_UNIT)
                sizes[name] = float(scale[i] * factor)
            else:
                coords[name] = _coord(name, grid_values(trans[i], scale[i], data.shape[i]), "pixel")
            if data.shape[i] == 1:  # one pixel or node: its spacing kept, for the next save (_axis_geometry)
                coords[name].attrs["step"] = _tidy(scale[i] * (factor or 1))
        elif name in ("z", "t") and isinstance(ax, dict) and ax.get("unit"):  # where a chosen plane lies
            factor = _to_um(ax["unit"]) if name == "z" else None
            values = grid_values(trans[i] * (factor or 1), scale[i] * (factor or 1), data.shape[i])
            coords[name] = _coord(name, values, SPATIAL_UNIT if factor else ax["unit"])
        elif name == "c":  # channel names (NGFF's omero labels), so that a chosen channel says which it is
            labels = [str(v) for v in node.metadata.get("channel_names") or []]
            if labels != [f"channel_{k}" for k in range(len(labels))]:  # (not the reader's made-up names)
                named = _channel_names(labels, data.shape[i])
                if named is not None:
                    coords[name] = named
    # Non-square pixels keep each axis's scale and no single size (pixel_size then says what to do).
    pixel_um = sizes.get("x", sizes.get("y"))
    if len(sizes) == 2 and not _square(sizes["y"], sizes["x"]):
        pixel_um = None
    attrs = {"pixel_um": pixel_um, "source": str(path)}
    bits = as_bits((root_attrs.get("lsfov") or {}).get("attrs", {}).get("significant_bits"))  # an lsfov variable's camera
    if bits and np.dtype(data.dtype).kind in "iu":
        attrs["significant_bits"] = bits
    return xr.DataArray(data, dims=names, coords=coords, attrs=attrs)


# Axis names of other tools (xarray, rioxarray) for lsfov's t, c, z
_DIM_ALIASES = {"time": "t", "channel": "c", "channels": "c", "band": "c", "wavelength": "c", "depth": "z"}


def _plain_zarr_array(path: Path) -> xr.DataArray | None:
    """A bare zarr array (no NGFF metadata, e.g. written by ``dask.array.to_zarr``), lazily, with the
    NGFF axis order (``...zyx``) and pixel coordinates; None if ``path`` is not one."""
    try:
        z = zarr.open_array(str(path), mode="r")
    except Exception:  # a group, or not zarr at all: the NGFF reader says which
        return None
    if z.ndim < 2 or z.ndim > 5:
        raise ValueError(f"{path}: a zarr array of {z.ndim} dimension(s); an image needs 2 to 5 (t, c, z, y, x)")
    names = list("tczyx"[-z.ndim :])
    # Its own axis names where it has them (zarr v3 dimension_names, xarray's _ARRAY_DIMENSIONS in v2)
    # and they are image axes: xarray's (c, y, x) is not read as (z, y, x)
    named = getattr(z.metadata, "dimension_names", None) or z.attrs.get("_ARRAY_DIMENSIONS")
    if named and len(named) == z.ndim:
        named = [_DIM_ALIASES.get(str(n).lower(), str(n).lower()) if n is not None else "" for n in named]
        if set(named) <= set("tczyx") and len(set(named)) == z.ndim and {"y", "x"} <= set(named):
            names = named
    data = da.from_zarr(z)
    coords = {d: _coord(d, np.arange(z.shape[i], dtype=float), "pixel") for i, d in enumerate(names) if d in "yx"}
    return xr.DataArray(data, dims=names, coords=coords, attrs={"pixel_um": None, "source": str(path)})


def _open_tiff(path: Path, level: int = 0, pick: int | None = None, every: bool = False):
    """A TIFF's image (``pick``: which of several; an appended plain TIFF's pages as a z-stack), or
    with ``every`` the list of all of them (the file parsed once, not once per image)."""
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for non-TIFF content
        raise ValueError(f"{path}: not a readable TIFF ({e})") from None
    with tf:
        if not tf.series:
            raise ValueError(f"{path}: no image in this TIFF (empty, or its writing did not finish)")
        _refuse_cut_short(tf, path)
        n = len(tf.series)
        if every:
            return [_tiff_image(path, tf, 0, k) for k in range(n)]
        if pick is not None and not -n <= pick < n:
            raise ValueError(f"{path}: series={pick} (--series) out of range; the file has {n} image(s) (0..{n - 1})")
        if pick is None and n > 1 and tf.is_ome:  # OME Images: positions or fields, not planes of one stack
            names = [s.name for s in tf.series if s.name]
            raise SeveralImages(f"{path}: {n} images in this OME-TIFF" + (f" ({', '.join(names[:6])})" if names else "")
                                + "; choose one with series= (--series) (planes of one stack written one by one: "
                                "save them as one stack, tifffile.imwrite of a 3-D array)", n)
        if n > 1 and pick is None:  # e.g. tifffile.imwrite(..., append=True): each call a series of its own
            if level:
                raise ValueError(f"{path}: pyramid level {level} does not exist (levels 0..0)")
            return _open_tiff_series(path, tf)
        img = _tiff_image(path, tf, level, 0 if pick is None else pick % n)
        if pick is not None:  # counted from 0 (as --z -1 is recorded): open_image records which
            img.attrs["series"] = pick % n
        return img


def _tiff_image(path: Path, tf, level: int, k: int) -> xr.DataArray:
    """Series ``k`` of the open TIFF ``tf`` (its pyramid level ``level``) with its own metadata."""
    import tifffile

    series = tf.series[k]
    levels = series.levels if series.is_pyramidal else [series]
    if not 0 <= level < len(levels):
        raise ValueError(f"{path}: pyramid level {level} does not exist (levels 0..{len(levels) - 1})")
    if "C" in series.axes and "S" in series.axes and series.shape[series.axes.index("S")] > 1:
        raise ValueError(f"{path}: channels of colour samples (axes {series.axes}): lsfov reads channels of one "
                         "value each; save each colour as a channel of its own (axes CYX)")
    axes = series.axes.lower().replace("s", "c").replace("i", "q")  # I: pages of no stated kind, as Q
    if "q" in axes and "z" not in axes:  # pages of a plain multi-page TIFF: most often a z-stack
        axes = axes.replace("q", "z", 1)
    axes = axes.replace("q", "c")
    shape = levels[level].shape
    # A level's pixels are larger than the full-resolution ones the metadata states, by the size ratio.
    ratio = {d: series.shape[i] / shape[i] for i, d in enumerate(axes) if d in "yx"}
    pixel_um = _times(_tiff_pixel_um(tf, "X", k), ratio.get("x", 1))
    pixel_um_y = _times(_tiff_pixel_um(tf, "Y", k), ratio.get("y", 1))
    z_um, t_step = _tiff_z_um(tf, k), _tiff_t_step(tf, k)
    bits = _ome_significant_bits(tf, series.dtype, k)
    try:
        # One level of a pyramid (SubIFDs, or an OME-TIFF's reduced images) as an array: the series
        # itself opens as a zarr group, which only a whole read could take.
        yx = [axes.index(d) for d in "yx"] if set("yx") <= set(axes) and len(axes) == len(shape) else (-2, -1)
        data = _tiff_dask(path, k, level if len(levels) > 1 else None, yx)
    except Exception:  # fall back to a memory map, or a plain read, for layouts zarr cannot wrap
        try:
            if level:  # a memory map is of the full-resolution pages
                raise ValueError
            data = da.from_array(tifffile.memmap(path, mode="r", series=k))
        except Exception:
            data = da.from_array(tifffile.imread(path, series=k, level=level))
    if data.shape != tuple(shape) or len(set(axes)) != len(axes):
        axes = "tczyx"[-data.ndim :]
    arr = _with_coords(data, list(axes), pixel_um, path, pixel_um_y)
    names = _channel_names(_ome_channel_names(tf, k), arr.sizes["c"]) if tf.ome_metadata and "c" in arr.dims else None
    if names is not None:  # a chosen channel says which
        arr = arr.assign_coords(c=names)
    if z_um and "z" in arr.dims:  # where each plane lies: a result of one plane says so
        arr = arr.assign_coords(z=_coord("z", grid_values(0, z_um, arr.sizes["z"]), SPATIAL_UNIT))
    if t_step and "t" in arr.dims:  # when each time point was taken: a result of one says so
        arr = arr.assign_coords(t=_coord("t", grid_values(0, t_step[0], arr.sizes["t"]), t_step[1]))
    if bits:  # a 12-bit camera in 16-bit pixels: where it saturates (lsfov.estimate_psf_map reads it)
        arr.attrs["significant_bits"] = bits
    return arr


class _TiffEntry:
    """One open TiffFile of this process and the zarr arrays of its series, kept while an image of it lives."""

    def __init__(self, path):
        import tifffile

        self.file, self.series, self.pid, self.lock = tifffile.TiffFile(path), {}, os.getpid(), threading.Lock()

    def array(self, series: int, level: int | None = None):
        """Series ``series`` (of a pyramid, its level ``level``) as a zarr array."""
        with self.lock:
            arr = self.series.get((series, level))
            if arr is None:
                store = self.file.series[series].aszarr(**({} if level is None else {"level": level}))
                arr = self.series[(series, level)] = zarr.open_array(store, mode="r")
        return arr


# Per process: (path, size, mtime) -> its _TiffEntry, parsed once for all its series (reopening per series
# would parse every page again: O(n²) for images appended one by one). Weak: the images that read a file
# hold its entry, and the file closes when the last of them goes.
_TIFFS = weakref.WeakValueDictionary()
_TIFFS_LOCK = threading.Lock()


def _forget_tiffs():
    """In a forked child: the parent's open files share their offsets with it, and its lock may be held."""
    global _TIFFS, _TIFFS_LOCK
    _TIFFS, _TIFFS_LOCK = weakref.WeakValueDictionary(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_tiffs)


def _tiff_entry(key) -> _TiffEntry:
    with _TIFFS_LOCK:
        entry = _TIFFS.get(key)
        if entry is None or entry.pid != os.getpid():
            # Another size: a worker would read another layout than the graph's. (Not the mtime: a network
            # file system's clients may see it a little late, and a touch changes no layout.)
            if os.stat(key[0]).st_size != key[1]:
                raise ValueError(f"{key[0]} changed after it was opened (rewritten during the run?); open it again")
            entry = _TIFFS[key] = _TiffEntry(key[0])
    return entry


class _TiffSeries:
    """One series of a TIFF as an array that Dask can send to other processes (a distributed worker,
    a SLURM job): it pickles as the absolute path, not as the zarr store tifffile makes, whose open file
    and lock do not pickle; each process opens the file once, at its first read."""

    def __init__(self, path, series: int, level: int | None = None):
        self.path, self.series, self.level = os.path.abspath(path), int(series), level  # workers may start elsewhere
        st = os.stat(self.path)
        self.key = (self.path, st.st_size, st.st_mtime_ns)  # a rewritten file is another file
        self._entry = _tiff_entry(self.key)
        z = self._entry.array(self.series, self.level)
        self.shape, self.dtype, self.chunks, self.ndim = z.shape, z.dtype, z.chunks, z.ndim

    def __getstate__(self):
        return {**self.__dict__, "_entry": None}

    def __dask_tokenize__(self):  # the same name for the same file: a resumed run finds its chunks
        return ("lsfov-tiff", *self.key, self.series, self.level)

    def __getitem__(self, item):
        entry = self._entry
        if entry is None or entry.pid != os.getpid():  # unpickled, or inherited by a forked child
            entry = self._entry = _tiff_entry(self.key)
        try:
            return entry.array(self.series, self.level)[item]
        except (MemoryError, OSError):  # not the file's fault: out of memory, a network file system's error
            raise
        except Exception as e:  # a damaged block: zlib.error, tifffile's errors... named with the file
            kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
            raise ValueError(f"{self.path}: its pixels cannot be read ({kind}: {e}); the file is damaged or cut "
                             "short: copy it again") from e


def _refuse_cut_short(tf, path):
    """Refuse a TIFF whose first or last image's pixel data end past the end of the file (a partial
    copy or an interrupted write), which tifffile opens and describes as if whole."""
    for series in {0: tf.series[0], 1: tf.series[-1]}.values():
        # A stack tifffile reads as one contiguous block from its first page (its own files' z-stacks:
        # the other pages are not even listed) ends where that block does.
        offset, nbytes = getattr(series, "dataoffset", None), getattr(series, "nbytes", None)
        fh = getattr(getattr(series, "parent", None), "filehandle", None)
        if offset is not None and nbytes and fh is not None and offset + nbytes > fh.size:
            raise ValueError(f"{fh.path}: cut short ({fh.size} bytes; its pixel data run to {offset + nbytes}): "
                             "an interrupted write or copy; copy it again")
        try:
            pages = [series.pages[0], series.pages[len(series.pages) - 1]]
        except Exception:  # pages tifffile cannot list: left to the read, which names the file
            continue
        for page in pages:
            if page is None:
                continue
            fh = page.parent.filehandle  # a multi-file OME-TIFF's pages lie in their own files
            ends = [o + n for o, n in zip(getattr(page, "dataoffsets", None) or (),
                                          getattr(page, "databytecounts", None) or ())]
            if ends and max(ends) > fh.size:
                raise ValueError(f"{fh.path}: cut short ({fh.size} bytes; its pixel data run to {max(ends)}): "
                                 "an interrupted write or copy; copy it again")


_BLOCK = 2048  # a read task takes up to this many pixels along y and x: whole strips, tiles or chunks of the file


def _grown(shape, chunks, yx) -> tuple:
    """Blocks of whole file chunks, up to 2048 along y and x: a file of one-row strips or small tiles
    or chunks would otherwise make a task per chunk, hundreds of thousands for a large image, each
    read costing more to schedule than to do."""
    chunks = list(chunks)
    for i in yx:
        chunks[i] = min(shape[i], chunks[i] * max(1, _BLOCK // chunks[i]))
    return tuple(chunks)


def _in_large_blocks(path: Path, level: int, data: da.Array, names) -> da.Array:
    """An OME-Zarr level read in blocks of whole chunks (:func:`_grown`) where its chunks are small."""
    if not set("yx") <= set(names):
        return data
    native = tuple(c[0] for c in data.chunks)
    grown = _grown(data.shape, native, [names.index("y"), names.index("x")])
    if grown == native:
        return data
    try:
        sub = _multiscale(path)["datasets"][level]["path"]
        return da.from_zarr(zarr.open_array(str(path / sub), mode="r"), chunks=grown)
    except Exception:  # a layout the NGFF reader understood and this does not: its own chunks
        return data


def _tiff_dask(path, series: int, level: int | None = None, yx=(-2, -1)) -> da.Array:
    """A TIFF series as a Dask array of blocks of whole strips or tiles (:func:`_grown`)."""
    arr = _TiffSeries(path, series, level)
    chunks = _grown(arr.shape, arr.chunks, yx)
    return da.from_array(arr, chunks=chunks, meta=np.empty((0,) * arr.ndim, arr.dtype))


def _times(size, factor):
    return size * factor if size else size


def _ome_pixels(tf, k: int = 0) -> str:
    """The ``<Pixels ...>`` element of series ``k``'s Image in a TIFF's OME-XML (its size, pixel size,
    time step, bits): the k-th where each Image is a series, else the one of the series' name (tifffile
    leaves out Images whose data are in no file it has); '' where none is known, or without OME-XML;
    the whole XML where it has no Image elements."""
    return _ome_image(tf, k)[0]


def _ome_image(tf, k: int = 0) -> tuple[str, str]:
    """(its ``<Pixels ...>`` start tag, its whole body) of series ``k``'s Image in a TIFF's OME-XML,
    found as :func:`_ome_pixels` says; ('', '') where none is known, (the XML, '') without Images."""
    xml = tf.ome_metadata or ""
    found = getattr(tf, "_lsfov_ome_images", None)  # parsed once per open file: a plate has thousands
    if found is None:
        found = []
        for head, body in re.findall(r"<(?:\w+:)?Image\b([^>]*)>(.*?)</(?:\w+:)?Image\s*>", xml, re.S):
            name, pixels = re.search(r'\bName="([^"]*)"', head), re.search(r"<(?:\w+:)?Pixels\b[^>]*>", body)
            found.append((name.group(1) if name else None, pixels.group(0) if pixels else "", body))
        tf._lsfov_ome_images = found
    if not found:
        return xml, ""
    if len(found) == len(tf.series):
        return found[k][1:]
    same = [(p, b) for n, p, b in found if n is not None and n == tf.series[k].name]
    return same[0] if len(same) == 1 else ("", "")


def _channel_names(names: list[str], n: int):
    """A ``c`` coordinate of channel ``names`` where the file names each of its ``n`` channels apart;
    None otherwise."""
    return np.asarray(names) if len(names) == n and len(set(names)) == n else None


def _ome_channel_names(tf, k: int = 0) -> list[str]:
    """The ``Name`` of each ``<Channel>`` of series ``k``'s Image in a TIFF's OME-XML, in order; [] where
    one has none."""
    try:
        channels = re.findall(r"<(?:\w+:)?Channel\b([^>]*)>", _ome_image(tf, k)[1])
    except Exception:
        return []
    names = [re.search(r'\bName="([^"]*)"', c) for c in channels]
    return [html.unescape(m.group(1)) for m in names] if names and all(names) else []


def _ome_significant_bits(tf, dtype, k: int = 0) -> int | None:
    """``SignificantBits`` of a TIFF's OME-XML when fewer than its integer type holds; else None."""
    import re

    m = re.search(r'SignificantBits="(\d+)"', _ome_pixels(tf, k))
    dtype = np.dtype(dtype)
    if not m or dtype.kind not in "iu":
        return None
    bits = int(m.group(1))
    return bits if 0 < bits < np.iinfo(dtype).bits else None


def _open_tiff_series(path: Path, tf) -> xr.DataArray:
    """A TIFF of several series (images appended one by one): 2-D ones of one shape are its pages, a
    z-stack as a plain multi-page TIFF is; other mixes are refused, not read as their first image."""
    kinds = {(s.shape, s.dtype.str) for s in tf.series}
    if len(kinds) > 1 or len(tf.series[0].shape) != 2:
        what = (f"shapes {sorted({s.shape for s in tf.series})}" if len({s.shape for s in tf.series}) > 1 else
                f"shape {tf.series[0].shape}" + (f" and types {sorted({s.dtype.name for s in tf.series})}"
                                                 if len(kinds) > 1 else ""))
        raise ValueError(f"{path}: {len(tf.series)} images of {what} in one TIFF; "
                         "save them as one stack (tifffile.imwrite of a 3-D array) or as separate files")
    planes = [_tiff_dask(path, i) for i in range(len(tf.series))]
    arr = _with_coords(da.stack(planes), ["z", "y", "x"], _tiff_pixel_um(tf), path, _tiff_pixel_um(tf, "Y"))
    bits = _ome_significant_bits(tf, tf.series[0].dtype)
    if bits:
        arr.attrs["significant_bits"] = bits
    return arr


def _ome_size_um(tf, axis: str, k: int = 0) -> float | None:
    """``PhysicalSize{axis}`` of image ``k`` of a TIFF's OME-XML in µm (its unit converted); None if not there."""
    import re

    pixels = _ome_pixels(tf, k)
    m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', pixels)
    u = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', pixels)
    factor = _to_um(u.group(1)) if u else 1.0  # OME's default unit is the micrometre
    return float(m.group(1)) * factor if m and factor else None


def _tiff_z_um(tf, k: int = 0) -> float | None:
    """The z step from OME-XML (PhysicalSizeZ) or ImageJ metadata (spacing), in µm; None if not recorded."""
    try:
        if tf.ome_metadata:
            return _ome_size_um(tf, "Z", k)
        ij = tf.imagej_metadata or {}
        if "spacing" in ij:
            factor = _to_um(ij.get("unit")) if ij.get("unit") else 1.0
            if factor == _INCH_UM:  # ImageJ's "inch": a display setting (as the pixel size, _tiff_pixel_um)
                return None
            return float(ij["spacing"]) * factor if factor else None
    except Exception:
        return None
    return None


def _tiff_t_step(tf, k: int = 0) -> tuple[float, str] | None:
    """The time step and its unit from OME-XML (TimeIncrement, in seconds unless its unit says) or
    ImageJ metadata (finterval, in tunit or seconds); None if not recorded."""
    import re

    try:
        if tf.ome_metadata:
            pixels = _ome_pixels(tf, k)
            m = re.search(r'TimeIncrement="([0-9.eE+-]+)"', pixels)
            u = re.search(r'TimeIncrementUnit="([^"]+)"', pixels)
            step, unit = (float(m.group(1)), u.group(1) if u else "s") if m else (None, None)
        else:
            ij = tf.imagej_metadata or {}
            step, unit = (float(ij["finterval"]), ij.get("tunit") or "s") if "finterval" in ij else (None, None)
    except Exception:
        return None
    if not step or not math.isfinite(step) or step <= 0:
        return None
    return step, _time_unit(unit) or str(unit)


_INCH_PIXEL_MAX_UM = 25.0  # inch-based resolutions below ~1000 dpi are display or print settings
_INCH_UM = 25400.0


def _tiff_pixel_um(tf, axis: str = "X", k: int = 0) -> float | None:
    """Pixel size along ``axis`` ("X" or "Y") from OME-XML or ImageJ/TIFF resolution tags, in µm;
    None if not recorded, or recorded in inches as a display setting: 72 or 300 dots per inch is what
    office and imaging software write by default, not a microscope's pixel (72 dpi would read as
    353 µm; no microscope's object-plane pixel is over 25 µm)."""
    try:
        if tf.ome_metadata:
            px = _ome_size_um(tf, axis, k)
            if px:
                return px
        page = tf.series[k].keyframe if k < len(tf.series) else tf.pages[0]  # (each image its own tags)
        res = page.tags.get(f"{axis}Resolution")
        if res is None:
            return None
        num, den = res.value
        if num == 0:
            return None
        per_unit = den / num
        unit = (tf.imagej_metadata or {}).get("unit") if tf.imagej_metadata else None
        unit_um = _to_um(unit) if unit else None
        if unit and unit_um != _INCH_UM:  # ImageJ's own unit (its "inch": dots per inch, as below)
            return per_unit * unit_um if unit_um else None
        runit = page.tags.get("ResolutionUnit")
        code = 2 if unit else (int(runit.value) if runit is not None else 2)
        size = {2: per_unit * _INCH_UM, 3: per_unit * 1e4}.get(code)
        if code == 2 and size and size > _INCH_PIXEL_MAX_UM:
            if axis == "X":
                log.info("%s: its resolution tag says %g dots per inch, a display setting rather than a "
                         "microscope's pixel: the pixel size is taken as unknown (give it with pixel_um= / "
                         "--pixel-um)", tf.filehandle.path, num / den)
            return None
        return size
    except Exception:
        return None


def _open_npy(path: Path) -> xr.DataArray:
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":  # (else NumPy's error would suggest loading it as a pickle)
            raise ValueError(f"{path} is not a NumPy .npy file (numpy.save writes one); give an image file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        why = " ".join(str(e).split())  # (one line)
        raise ValueError(f"{path}: not a readable .npy array ({why}); write it again with numpy.save") from None
    if arr.ndim < 2:
        raise ValueError(f"{path}: a .npy array of {arr.ndim} dimension(s); an image needs 2 to 5 (t, c, z, y, x)")
    dims = list("tczyx"[-arr.ndim :]) if arr.ndim <= 5 else None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) > 4:
        dims = ["y", "x", "c"]  # an RGB(A) array as image libraries hold it: its colours are channels
    return _with_coords(da.from_array(_NpyFile(path, arr), chunks="auto", meta=np.empty((0,) * arr.ndim, arr.dtype)),
                        dims, None, path)


class _NpyFile:
    """A ``.npy`` file as an array Dask can send to other processes: it pickles as its path, where a
    memory map pickles as all its pixels (a graph of the whole image, sent to every worker); each
    process maps the file once, at its first read."""

    def __init__(self, path, mapped: np.ndarray):
        self.path = os.path.abspath(path)  # workers may start elsewhere
        st = os.stat(self.path)
        self.key = (self.path, st.st_size, st.st_mtime_ns)  # a rewritten file is another file
        self.shape, self.dtype, self.ndim, self._map = mapped.shape, mapped.dtype, mapped.ndim, mapped

    def __getstate__(self):
        return {**self.__dict__, "_map": None}

    def __dask_tokenize__(self):  # the same name for the same file: a resumed run finds its chunks
        return ("lsfov-npy", *self.key)

    def __getitem__(self, item):
        if self._map is None:
            if os.stat(self.path).st_size != self.key[1]:
                raise ValueError(f"{self.path} changed after it was opened (rewritten during the run?); open it again")
            self._map = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.asarray(self._map[item])


def _with_coords(data, dims, pixel_um, path, pixel_um_y=None) -> xr.DataArray:
    if dims is None:
        raise ValueError(f"{path}: {data.ndim}-D array; lsfov reads images of at most 5 dimensions (t, c, z, y, x)")
    coords = {}
    if pixel_um and pixel_um_y and not _square(pixel_um_y, pixel_um):
        # Each axis at its own scale (what the file says); pixel_size then refuses such an image with a message.
        steps = {"y": pixel_um_y, "x": pixel_um}
        pixel_um = None
    else:
        steps = {"y": pixel_um, "x": pixel_um}
    for d in ("y", "x"):
        if d in dims:
            n = data.shape[dims.index(d)]
            coords[d] = (
                _coord(d, grid_values(0, steps[d], n), SPATIAL_UNIT) if steps[d] else _coord(d, np.arange(n, dtype=float), "pixel")
            )
    return xr.DataArray(data, dims=dims, coords=coords, attrs={"pixel_um": pixel_um, "source": str(path)})


def _square(a: float, b: float) -> bool:
    """Whether two pixel sizes are one (within 1 %: metadata rounded to a few digits)."""
    return abs(a - b) <= 0.01 * max(a, b)


def _select(arr: xr.DataArray, path, *, channel, z, t) -> xr.DataArray:
    # Which plane of a larger image this is (attrs "plane", and "z_um" or "t" where the file says), so
    # that the result of one time point or z plane says where it came from.
    plane, where = {}, {}

    def note(dim, i):
        plane[dim] = i
        c = arr.coords[dim] if dim in arr.coords else None  # not .get: xarray makes up an index
        name = _channel_name(arr, i) if dim == "c" else None
        if name is not None:
            where["channel"] = name
        elif c is not None and c.dtype.kind in "iuf":  # a position
            if c.attrs.get("units") == SPATIAL_UNIT:
                where[f"{dim}_um"] = _tidy(c.values[i])
            else:  # (a time, which may be seconds since 1970: every digit kept)
                where.update({dim: float(c.values[i]), f"{dim}_units": c.attrs.get("units")})

    for dim, idx, flag in (("c", channel, "channel"), ("z", z, "z"), ("t", t, "t")):
        if idx is not None:
            # (z and t kept as 0-D coordinates: planes put back with xr.concat know their axis; a
            # channel's name stays in the attributes only, so that planes of several channels merge
            # into one Dataset)
            picked = _select_axis(arr, path, dim, idx, flag, keep=dim in ("z", "t"))
            if dim in arr.dims:
                note(dim, int(idx) % arr.sizes[dim])
            arr = picked
    extra = [d for d in arr.dims if d not in ("y", "x") and arr.sizes[d] > 1]
    if extra:
        d = extra[0]
        flag = {"c": "channel"}.get(d, d)
        if d not in ("c", "z", "t"):  # (e.g. a TIFF's angle, phase or lambda axis: no option picks along it)
            raise PlaneNotChosen(f"{path}: the image has {arr.sizes[d]} elements along '{d}' (dims {arr.dims}); lsfov "
                                 "picks planes along c, z and t only: save the plane you mean as a file of its own",
                                 d, arr.sizes[d])
        raise PlaneNotChosen(
            f"{path}: the image has {arr.sizes[d]} elements along '{d}'; choose one with {flag}= (--{flag})"
            + (_rgb_hint(path) if d == "c" and arr.sizes[d] in (3, 4) else ""), d, arr.sizes[d])
    arr = arr.isel({d: 0 for d in arr.dims if d not in ("y", "x")}, drop=True)
    if plane:
        arr.attrs.update(plane=plane, **where)
    if arr.dims != ("y", "x"):
        if set(arr.dims) != {"y", "x"}:
            raise ValueError(f"{path}: need a 2-D (y, x) image, got dims {arr.dims} with shape {arr.shape}; save "
                             "it with a y and an x axis")
        arr = arr.transpose("y", "x")
    if 0 in arr.shape:
        raise ValueError(f"{path}: the image is empty (shape {arr.shape}); give an image with pixels")
    return arr


def _rgb_hint(path) -> str:
    """For a TIFF stored as one RGB(A) image: that a z-stack of 3 or 4 planes written without options
    is stored so (tifffile's default), and how to write one ('' for any other file)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return ""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            rgb = tf.series[0].keyframe.photometric in (tifffile.PHOTOMETRIC.RGB,)
    except Exception:
        return ""
    return (" (a colour image; if these are planes of a z-stack, tifffile stored them as RGB: write it with "
            "photometric='minisblack')") if rgb else ""


def plane_of(image) -> dict:
    """Which plane of a larger image ``image`` is (the attributes :func:`open_image` sets: ``plane``,
    ``channel`` (its name, where the file names channels), ``z_um`` or ``z``/``z_units``,
    ``t``/``t_units``), to carry into what is made of it; empty for a 2-D image or one whose other axes
    are all of length one."""
    attrs = getattr(image, "attrs", {})
    keys = ("plane", "channel", "z_um", "z", "z_units", "t", "t_units")
    return {k: attrs[k] for k in keys if attrs.get(k) is not None}


def _pixel_attr(image, name: str = "the image") -> float | None:
    """An image's ``pixel_um`` attribute as a float (None where absent), refused if not a size."""
    attr = getattr(image, "attrs", {}).get("pixel_um")
    if attr is None:
        return None
    try:
        value = float(attr)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{getattr(image, 'attrs', {}).get('source') or name}: its pixel_um attribute is "
                         f"{attr!r}, not a pixel size in µm; set it to one (> 0) or delete it")
    return value


def pixel_size(image) -> float | None:
    """The pixel size of an image in µm: its ``pixel_um`` attribute, else the spacing of its x (last)
    coordinate when that has a length unit and is even; None when unknown. Where both are known and
    differ, the coordinates' (they follow ``isel`` steps and ``coarsen``, an attribute does not), with
    a warning.

    Parameters
    ----------
    image : xarray.DataArray or array_like
        An image; only an xarray one's ``attrs`` and coordinates (``x``, ``y`` by name, else the last
        two dims) say anything. Other arrays give None.

    Returns
    -------
    float or None
        Pixel size in µm (coordinates in nm, mm, ... converted), or None when unknown.

    Raises
    ------
    ValueError
        If the y and x coordinates give different spacings (non-square pixels: lsfov's PSFs are
        square), whatever the ``pixel_um`` attribute says, or that attribute is not a positive number.
    """
    attr = _pixel_attr(image)
    coords = getattr(image, "coords", None)
    if coords is None or image.ndim < 1:
        return float(attr) if attr else None

    def spacing(dim):
        """(step, unit): in µm where the coordinates have a length unit ("µm"), else in their own."""
        if dim not in coords or image.sizes[dim] < 2:
            return None
        c = coords[dim]
        step = np.diff(np.asarray(c.values, dtype=np.float64))
        if not (step[0] > 0 and np.allclose(step, step[0], rtol=1e-5)):
            return None
        scale = _to_um(c.attrs.get("units"))
        mean = float(np.mean(step))  # (to 12 digits: not the rounding noise of coordinates far from 0)
        return (_tidy(mean * scale), "µm") if scale is not None else (_tidy(mean), c.attrs.get("units"))

    xdim = "x" if "x" in image.dims else image.dims[-1]
    ydim = "y" if "y" in image.dims else (image.dims[-2] if image.ndim >= 2 else None)
    sx = spacing(xdim)
    sy = spacing(ydim) if ydim is not None else None
    # Coordinates of unequal spacings in one unit (any, or none: the ratio needs none) outweigh an
    # attribute, which holds for one axis at most (e.g. after isel(x=slice(None, None, 2))).
    if sx and sy and sx[1] == sy[1] and not _square(sy[0], sx[0]):
        both = f"y {sy[0]:g} {sx[1]}, x {sx[0]:g} {sx[1]}" if sx[1] else f"y {sy[0]:g}, x {sx[0]:g}, no unit"
        raise ValueError(f"{getattr(image, 'attrs', {}).get('source') or 'the image'}: its pixels are not square "
                         f"({both}) and lsfov's PSFs are; resample it to square pixels (e.g. "
                         "skimage.transform.rescale), or give the pixel size (pixel_um= / --pixel-um) if the "
                         "metadata is wrong")
    px, py = (s[0] if s and s[1] == "µm" else None for s in (sx, sy))
    if attr:
        step = px or py
        if step and not _square(step, float(attr)):
            warnings.warn(f"the image's pixel_um attribute ({float(attr):g} µm) is not its coordinates' spacing "
                          f"({step:g} µm: a subsampled or binned image?); the coordinates' is used", LsfovWarning,
                          stacklevel=user_stacklevel())
            return step
        return float(attr)
    return px


def with_pixel_size(image, pixel_um=None) -> xr.DataArray:
    """A 2-D image as a (y, x) DataArray whose coordinates are in µm when the pixel size is known.

    What lsfov writes then opens at its scale in napari, and PSF maps of it are in µm.

    Parameters
    ----------
    image : array_like or xarray.DataArray (H, W)
        NumPy, CuPy, Dask or xarray. An xarray image's dims are read by name (``y``, ``x`` in any
        order), other names by position (rows, columns).
    pixel_um : float, optional
        Pixel size in µm (> 0). Given, it sets the spacing of any input's coordinates, keeping where
        its first pixel lies (:func:`image_origin`). Without it an xarray input keeps its
        coordinates (its pixel size, from :func:`pixel_size`, in ``attrs["pixel_um"]`` when known),
        except pixel indices (or none) beside a known pixel size, which become µm; an array gets
        pixel coordinates.

    Returns
    -------
    xarray.DataArray
        Dims ``("y", "x")``, the input's values and dtype. With ``pixel_um``, or from a plain
        array: pixel-centre coordinates with ``units`` ``"micrometer"`` or ``"pixel"`` and
        ``attrs["pixel_um"]`` (None when unknown); an xarray input without ``pixel_um`` keeps its own.

    Raises
    ------
    TypeError
        If ``image`` is a file name, or ``pixel_um`` not a number.
    ValueError
        If ``image`` is not 2-D, names only one of ``y`` and ``x``, ``pixel_um`` is not positive and
        finite, or (without ``pixel_um``) its coordinates give non-square pixels.
    """
    if isinstance(image, (str, os.PathLike)):
        raise TypeError(f"image must be an array, got the file name {str(image)!r}; open it with lsfov.open_image")
    if pixel_um is not None:
        pixel_um = real_number(pixel_um, "pixel_um", minimum=0, exclusive=True)
    origin = (0.0, 0.0)
    if isinstance(image, xr.DataArray):
        image = yx_order(image)
        image = image.rename(dict(zip(image.dims, ("y", "x"))))
        if pixel_um is None:
            px = pixel_size(image)
            if not px or not all(d not in image.coords or _in_pixels(image, d, px) for d in ("y", "x")):
                return image.assign_attrs(pixel_um=px) if px else image
            pixel_um = px  # pixel indices (or none) of an image whose pixel size it says: in µm, as its map's
        origin = image_origin(image, pixel_um)
    else:
        if getattr(image, "ndim", np.ndim(image)) != 2:
            raise ValueError(f"image must be 2-D (y, x), got shape {np.shape(image)}; select a plane first")
        image = xr.DataArray(image if hasattr(image, "dtype") else np.asarray(image), dims=("y", "x"))
    coords = {d: _coord(d, grid_values(o, pixel_um or 1.0, n), SPATIAL_UNIT if pixel_um else "pixel")
              for (d, n), o in zip(image.sizes.items(), origin)}
    return image.assign_coords(coords).assign_attrs(pixel_um=pixel_um)


def image_origin(image, pixel_um=None) -> tuple[float, float]:
    """Where a (y, x) xarray image's first pixel lies: in µm when ``pixel_um`` is known, else in
    pixels (a crop's offset).

    Per axis: coordinates in a length unit are converted to µm (0 without ``pixel_um``); in pixels
    (``units`` "pixel", or none with a step of one) counted in this image's pixels and scaled by
    ``pixel_um``; others (no unit and another step, or decreasing) say nothing usable: 0, with an
    :class:`~lsfov.LsfovWarning`. An axis without coordinates starts at 0, as does an array that is
    not xarray's.

    Parameters
    ----------
    image : xarray.DataArray or array_like
        The image; its last two dims are read as (y, x).
    pixel_um : float, optional
        Pixel size in µm; None: the origin in pixels.

    Returns
    -------
    (float, float)
        The first pixel's (y, x) position, in µm with ``pixel_um``, else in pixels.

    Raises
    ------
    TypeError
        If ``pixel_um`` is not a number.
    ValueError
        If ``pixel_um`` is not finite and > 0.
    """
    if pixel_um is not None:  # ("0.1" and -1 once placed everything at 0 in silence)
        pixel_um = real_number(pixel_um, "pixel_um", minimum=0, exclusive=True)
    if not hasattr(image, "dims"):
        return 0.0, 0.0
    origin = []
    for d in image.dims[-2:]:
        c = image.coords[d] if d in image.coords else None  # not .get: xarray makes up an index
        if c is None or c.size == 0:
            origin.append(0.0)
            continue
        units = c.attrs.get("units")
        factor = 1.0 if _unitless_um(image, d, pixel_um) else _to_um(units)  # spaced at the pixel size: µm
        c0 = float(c.values[0])
        step = float(c.values[1] - c.values[0]) if c.size > 1 else 1.0
        if not step > 0:
            why = "decrease"
        elif factor is not None:
            origin.append(c0 * factor if pixel_um else 0.0)  # µm coordinates, unevenly spaced: the map in pixels
            continue
        elif str(units).strip().lower() in _PIXEL_NAMES or (units is None and abs(step - 1) < 1e-6):
            origin.append(c0 / step * (pixel_um or 1.0))  # in this image's pixels (a pyramid level's are larger)
            continue
        else:
            why = f"are in {units or 'no stated unit'} with a step of {step:g}"
        warnings.warn(f"the image's {d} coordinates {why}: results are placed from its first pixel, in pixels "
                      "or µm; give it increasing coordinates with units (e.g. 'micrometer')", LsfovWarning,
                      stacklevel=3)
        origin.append(0.0)
    return tuple(origin)


def _coord(dim, values, units):
    return xr.Variable(dim, np.asarray(values, dtype=np.float64), attrs={"units": units})


def _unescaped(unit: str) -> str:
    """A unit as ImageJ writes it in a TIFF's description (``\\u00B5m``: its micro sign escaped), read."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), unit)


def _to_um(unit) -> float | None:
    """µm per ``unit`` (a length unit's name, symbol or plural, US or British spelling); None if it is
    no length unit. NFKC folds the micro sign µ (U+00B5) into the Greek mu μ (U+03BC): both are read."""
    import unicodedata

    if not unit:
        return None
    u = unicodedata.normalize("NFKC", _unescaped(str(unit))).strip()
    if u == "\u00c5":  # Å (NFKC folds the angstrom sign into this letter; lower() would lose it)
        return 1e-4
    u = {"feet": "foot", "inches": "inch"}.get(u := u.lower().replace("metre", "meter"), u)
    if u not in _LENGTH_UM and len(u) > 3 and u.endswith("s"):  # a plural (not "ms": a time)
        u = u[:-1]
    return _LENGTH_UM.get(u)


# SI prefixes: the NGFF 0.5 space and time units (UCUM names) are built from them
_SI = {"yocto": 1e-24, "zepto": 1e-21, "atto": 1e-18, "femto": 1e-15, "pico": 1e-12, "nano": 1e-9, "micro": 1e-6,
       "milli": 1e-3, "centi": 1e-2, "deci": 1e-1, "": 1.0, "hecto": 1e2, "kilo": 1e3, "mega": 1e6, "giga": 1e9,
       "tera": 1e12, "peta": 1e15, "exa": 1e18, "zetta": 1e21, "yotta": 1e24}
_SYMBOL = {"p": "pico", "n": "nano", "u": "micro", "\u03bc": "micro", "m": "milli", "c": "centi", "": "", "k": "kilo"}
# µm per length unit: NGFF's names, their symbols, and the micron
_LENGTH_UM = {**{f"{p}meter": f * 1e6 for p, f in _SI.items()},
              **{f"{s}m": _SI[p] * 1e6 for s, p in _SYMBOL.items()},
              "micron": 1.0, "angstrom": 1e-4, "inch": 25400.0, "foot": 304800.0, "yard": 914400.0,
              "mile": 1609344e3, "parsec": 3.0856775814913673e22}


_PIXEL_NAMES = ("pixel", "pixels", "px", "pix")


def _in_pixels(image, dim, pixel_um) -> bool:
    """Whether ``image``'s ``dim`` coordinates count pixels: ``units`` "pixel", or none with a step
    of one that is not the pixel size in µm (:func:`image_origin` reads the same)."""
    c = image.coords[dim]
    units = c.attrs.get("units")
    if units is not None:
        return str(units).strip().lower() in _PIXEL_NAMES
    if _unitless_um(image, dim, pixel_um):
        return False
    v = np.asarray(c.values, dtype=np.float64)
    return v.size == 1 or _even_step(v) == 1.0


def _unitless_um(image, dim, pixel_um) -> bool:
    """Whether ``image``'s ``dim`` coordinates, which have no unit, are in µm: they, or the other
    spatial axis's unitless ones, are evenly spaced at the image's known pixel size (the two axes share
    a unit: an image subsampled along one axis keeps µm on both)."""
    if image.coords[dim].attrs.get("units") is not None or not pixel_um:
        return False
    for d in image.dims[-2:]:
        c = image.coords[d] if d in image.coords else None  # not .get: xarray makes up an index
        if c is None or c.attrs.get("units") is not None or c.size < 2:
            continue
        step = _even_step(np.asarray(c.values, dtype=np.float64))
        if step is not None and abs(step / float(pixel_um) - 1) < 1e-5:
            return True
    return False


def _array_attrs(path: Path) -> dict:
    try:
        node = zarr.open(str(path), mode="r")
    except Exception:
        return {}
    return dict(node.attrs) if isinstance(node, zarr.Array) else {}


def _multiscale(path: Path) -> dict:
    """The first multiscale of an NGFF image group (0.4 or 0.5); {} if none."""
    attrs = _group_attrs(path)
    ms = (attrs.get("ome") or attrs).get("multiscales") or [{}]
    return ms[0] if isinstance(ms[0], dict) else {}


def _multiscale_transforms(path: Path) -> list:
    """The ``coordinateTransformations`` of a multiscale itself (NGFF 0.4 or 0.5), usually none."""
    return _multiscale(path).get("coordinateTransformations") or []


def _group_attrs(path: Path) -> dict:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return {}


# ---------------------------------------------------------------------------------------------- writing


def save(obj, path, *, overwrite: bool = False, chunks: int | None = None, progress: bool = False,
         operator=None) -> Path:
    """Write an lsfov result: each variable of ``obj`` as a sibling NGFF 0.5 multiscale image.

    Parameters
    ----------
    obj : xarray.Dataset, xarray.DataArray, array or ProductConvolution
        2-D variables (any two dim names; coordinates, when evenly spaced, give scale and translation)
        or 3-D ones with a leading non-spatial dim. Pixel indices (or no coordinates) of a y, x
        image are scaled by its ``pixel_um`` attribute (the Dataset's, where no variable on that
        grid has one) to µm. A bare array (NumPy or Dask) becomes variable
        ``image`` with dims ``(y, x)`` or ``(c, y, x)``; an unnamed DataArray is named ``image`` too.
        A 2-D variable whose second dim has string labels is a table (e.g. detected sources), stored
        as a plain zarr array. Floating-point images are stored as float32 (float64 halves to it: more
        than a microscope's precision); other dtypes as they are. A
        :class:`~lsfov.ProductConvolution` is written with its own
        :meth:`~lsfov.ProductConvolution.save` (``chunks`` and ``progress`` do not apply).
    path : str or Path
        Destination directory (conventionally ``*.zarr``).
    overwrite : bool
        Replace an existing result. Without it an existing path is never touched.
    chunks : int, optional
        Chunk edge on disk (default: the Dask chunks, at most 1024).
    progress : bool
        Show a progress bar while computing and writing.
    operator : ProductConvolution, optional
        The blur the result was made with (``lsfov bss`` stores the one it identified), written in
        the same atomic write as the result's ``operator`` group: ``ProductConvolution.load(path)``
        reads it back, and ``lsfov deconvolve ... --operator path`` deblurs other images with it.

    Returns
    -------
    Path
        ``path``. The write is atomic: a crash leaves the old result (if any) untouched and at most a
        hidden ``.NAME.partial-*`` directory, never a half-written result under ``path``.

    Raises
    ------
    TypeError
        If ``obj`` is none of the types above, a variable is not of real numbers (bool, int or
        float), ``operator`` is not a :class:`~lsfov.ProductConvolution`, or ``path`` is not a str or
        Path.
    ValueError
        If ``path`` is empty, named like a file of another format (``.tif``, ``.npy``...) or is the
        current folder; ``obj`` is a masked array with masked pixels (its mask would be lost), an
        array neither 2-D nor 3-D, or a Dataset without variables; a variable is empty or neither
        2-D nor 3-D, its name is not a string of letters and digits (with ``_`` or ``-``), its
        ``pixel_um`` attribute is not a positive number, or a spatial coordinate is not evenly
        spaced and increasing; variables on one ``y, x`` grid without coordinates give different
        ``pixel_um`` (one that gives none takes the others', or the Dataset's); ``chunks`` is not a positive integer;
        ``operator`` is given with an operator as ``obj``, beside a variable named ``operator``, or
        is a restricted window.
    FileExistsError
        If ``path`` exists and ``overwrite`` is not given, exists but is neither a zarr store nor an
        empty directory, appears while the result is written, or is being written by another run.

    Examples
    --------
    >>> import os
    >>> import xarray as xr
    >>> import lsfov
    >>> from lsfov import simulate
    >>> beads = simulate.bead_field((256, 256), seed=0)  # 0.1 µm pixels, and the true blur
    >>> deblurred = lsfov.deconvolve(beads.image, beads.operator, iterations=10)
    >>> result = xr.Dataset({"raw": (("y", "x"), beads.image), "deblurred": (("y", "x"), deblurred)},
    ...                     attrs={"pixel_um": 0.1})
    >>> print(lsfov.save(result, "beads.zarr"))
    beads.zarr
    >>> sorted(os.listdir("beads.zarr"))  # an OME-Zarr image per variable: napari opens beads.zarr/deblurred
    ['deblurred', 'raw', 'zarr.json']
    >>> print(lsfov.save(result, "beads.zarr", overwrite=True))  # an existing result: only with overwrite
    beads.zarr
    """
    from .operators import ProductConvolution

    check_result_name(path)
    check_result_name(_link_target(path))  # a link named r.zarr to x.tif would make a directory x.tif
    progress = boolean(progress, "progress")
    if isinstance(obj, ProductConvolution):
        if operator is not None:
            raise ValueError("operator= goes with a result; save an operator on its own as obj")
        return obj.save(path, overwrite=overwrite)
    if operator is not None:
        if not isinstance(operator, ProductConvolution):
            raise TypeError(f"operator must be an lsfov.ProductConvolution, got {type(operator).__name__}")
        operator._check_full("saving an operator")
    ds = _one_grid(_as_dataset(obj))
    if "operator" in ds.data_vars and operator is not None:
        raise ValueError("the result has a variable named 'operator' and operator= is given: rename the variable")
    if chunks is not None:
        chunks = positive_int(chunks, "chunks")  # the chunk edge in pixels
    with atomic_directory(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        if operator is not None:
            operator._write(root.create_group("operator"))
        root.attrs["lsfov"] = {"version": _version(), "variables": list(ds.data_vars), "complete": False}
        started = []
        for name, var in ds.data_vars.items():
            if _is_table(var):
                _write_table(root, str(name), var)
            else:
                started.append(_write_variable(root, str(name), var, chunks, period=_period(str(name), var, ds.attrs)))
        if started:  # every variable's pixels in one computation: work they share runs once
            images = [str(n) for n, v in ds.data_vars.items() if not _is_table(v)]
            named = ", ".join(images[:6]) + (f" and {len(images) - 6} more" if len(images) > 6 else "")
            compute([store for store, _ in started], progress=progress, label=f"writing {named}")
        for _, finish in started:
            finish()
        root.attrs["lsfov"] = {**root.attrs["lsfov"], "complete": True, "attrs": _jsonable(ds.attrs)}
    return Path(path)


def _one_grid(ds: xr.Dataset) -> xr.Dataset:
    """Images of a Dataset on its y, x without coordinates are on one pixel grid: the pixel size one
    of them says (``pixel_um``) is all of theirs (a mask beside its image), and two that differ are
    refused; stored each with its own, viewers and :func:`open_result` would lay them apart."""
    if {"y", "x"} & set(ds.coords):
        return ds
    on = [n for n, v in ds.data_vars.items() if {"y", "x"} <= set(v.dims) and not _is_table(v)]
    said = {n: px for n in on if (px := _pixel_size_said(ds[n]))}
    if len(set(said.values())) > 1:
        listed = ", ".join(f"{n!r} {v:g} µm" for n, v in said.items())
        raise ValueError(f"the variables share the y, x grid but not their pixel_um ({listed}): give them one, "
                         "or y, x coordinates in µm")
    unsaid = [n for n in on if ds[n].attrs.get("pixel_um") is None]  # (one that is no size is refused later)
    # None saying: the Dataset's own (a map's attributes given to the result, as the README does)
    px = ds[next(iter(said))].attrs["pixel_um"] if said else _pixel_size_said(ds)
    if not px or not unsaid:
        return ds
    return ds.assign({n: ds[n].assign_attrs(pixel_um=px) for n in unsaid})


_LOCK_RENEW_S, _LOCK_STALE_S = 30.0, 120.0  # a holder renews its lock; one not renewed for long is dead
_HELD: dict = {}  # output path -> (thread holding its lock, how many of its blocks hold it)
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def output_lock(path):
    """Hold the right to write ``path`` while the block runs: a second writer (another run, another
    job of an array, another thread's ``save``) is refused instead of destroying this one's work or
    silently replacing its result. The lock is a file ``.NAME.lock`` beside ``path`` naming the
    holder's host, process and a token, renewed every 30 s; one whose process is gone (this host)
    or that was not renewed for 2 minutes (a job killed on another node) is taken over. Re-entrant
    within a thread (the CLI holds it over a run that then saves)."""
    path = Path(path).resolve()
    me = threading.get_ident()
    with _HELD_LOCK:
        owner, depth = _HELD.get(path, (None, 0))
        if owner in (None, me):  # claimed before the file lock: this process's own pid in it is no leftover
            _HELD[path] = (me, depth + 1)
    if owner == me:
        try:
            yield
        finally:
            with _HELD_LOCK:
                _HELD[path] = (me, _HELD[path][1] - 1)
        return
    if owner is not None:
        raise FileExistsError(f"{path} is being written by another thread of this process; wait for it to end")
    lock = path.parent / f".{path.name}.lock"
    token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}\n"
    stop = threading.Event()
    renew = None
    try:
        _take_lock(lock, path, token)
        renew = threading.Thread(target=_renew_lock, args=(lock, token, stop), daemon=True, name="lsfov-lock")
        renew.start()
        yield
    finally:
        stop.set()
        if renew is not None:
            renew.join()
        with _HELD_LOCK:
            if _HELD.get(path, (None,))[0] == me:
                del _HELD[path]
        if _read(lock) == token:  # still ours (a holder paused past the stale time may have lost it)
            lock.unlink(missing_ok=True)


def _read(lock: Path) -> str | None:
    try:
        return lock.read_text()
    except OSError:
        return None


def _take_lock(lock: Path, path: Path, token: str):
    """Create ``lock`` holding ``token`` (whole: written aside, then linked in, which fails if the lock
    exists), taking over a dead holder's."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = lock.with_name(f"{lock.name}.{uuid.uuid4().hex[:8]}")
    mine.write_text(token)
    try:
        for _ in range(5):
            try:
                os.link(mine, lock)
                return
            except FileExistsError:
                pass
            seen = _read(lock)
            try:
                age = time.time() - lock.stat().st_mtime
            except OSError:  # just released: try again
                continue
            host, pid = (seen.split() + ["", ""])[:2] if seen else ("", "")
            here = host == socket.gethostname()
            # This process's own pid (only the thread that claimed the path gets here): an earlier write's leftover
            dead = (here and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid)))) or \
                age > _LOCK_STALE_S or (not seen and age > 5)  # unreadable: a write that never finished
            if not dead:
                raise FileExistsError(f"{path} is being written by another run (process {pid} on {host}); wait for "
                                      f"it to end, or write elsewhere (its lock {lock.name} is taken over once not "
                                      f"renewed for {_LOCK_STALE_S / 60:.0f} minutes)")
            # Taken over only if it is still the lock judged dead: moved aside, checked, then removed.
            aside = lock.with_name(f"{lock.name}.dead-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(lock, aside)
            except OSError:  # another run took it over first
                continue
            if _read(aside) != seen:  # a new holder's, moved by mistake: given back
                with contextlib.suppress(OSError):
                    os.link(aside, lock)
                aside.unlink(missing_ok=True)
                continue
            log.info("taking over %s, left by a run that ended without removing it", lock)
            aside.unlink(missing_ok=True)
        raise FileExistsError(f"{path}: its lock {lock} keeps changing hands; is another run writing it?")
    finally:
        mine.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _renew_lock(lock: Path, token: str, stop: threading.Event):
    while not stop.wait(_LOCK_RENEW_S):
        if _read(lock) != token:  # removed by hand, or taken over: nothing of ours to renew
            return
        with contextlib.suppress(OSError):
            os.utime(lock)


@contextlib.contextmanager
def atomic_directory(path, *, overwrite: bool = False):
    """Yield a temporary sibling directory that becomes ``path`` only if the block completes.

    An existing ``path`` is refused without ``overwrite``, and never replaced unless it is a zarr
    store or an empty directory; it is moved aside and removed only once the new one is in place.
    On any error (or Ctrl-C) the temporary directory is removed and ``path`` is left as it was. A
    process killed outright (SIGKILL, a node lost) cannot clean up: the temporary directories it
    left for ``path`` are removed by the next write of ``path``. The write holds
    :func:`output_lock`: a second writer of ``path`` is refused, and a ``path`` that something else
    creates meanwhile is not replaced without ``overwrite`` (FileExistsError).

    Parameters
    ----------
    path : str or Path
        The directory to write (a symbolic link: its target).
    overwrite : bool
        Replace an existing ``path`` (a zarr store or an empty directory).

    Yields
    ------
    Path
        The temporary directory (absolute, hidden, beside ``path``) to write into.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is not given, exists but is neither a zarr store nor an
        empty directory, appears while the block runs, or is being written by another writer.
    ValueError
        If ``path`` is the current folder or holds it.
    """
    overwrite = boolean(overwrite, "overwrite")  # ("no" is no consent to replace a result)
    path = _link_target(path)
    if is_working_folder(path):
        raise ValueError(f"{path} is the current folder (or holds it); name a new folder for the result")
    with output_lock(path):  # another writer's partial directory is not stale: it is refused first
        restore_moved_aside(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        if path.exists() and not _is_replaceable(path):
            raise FileExistsError(f"{path} exists and is not an lsfov result or zarr store; refusing to replace it")
        for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
            log.info("removing %s, left by a write of %s that was killed", stale, path)
            shutil.rmtree(stale, ignore_errors=True)
        # Absolute: the workers that write into it may run in another directory (a PBS job in $HOME).
        tmp = path.resolve().parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            yield tmp
            if path.exists() and not overwrite:  # written meanwhile by something that takes no lock
                raise FileExistsError(f"{path} appeared while this result was being written; nothing replaced: "
                                      "write again under another name, or pass overwrite=True (--overwrite)")
            _move_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(path, *, unique: bool = False):
    """Yield a temporary sibling path that replaces the file ``path`` only if the block completes.

    The temporary name is hidden and ends in ``path``'s suffix (NumPy picks the format from it). It
    is fixed, so a write killed midway leaves one leftover that the next write replaces; ``unique``:
    a name of its own for writers that may meet (Dask tasks). On any error it is removed and
    ``path`` is left as it was.

    Parameters
    ----------
    path : str or Path
        The file to write (a symbolic link: its target); its folder is made if missing.
    unique : bool
        Give the temporary file a name of its own.

    Yields
    ------
    Path
        The temporary file to write.

    Raises
    ------
    IsADirectoryError
        If ``path`` is a directory.
    """
    path = _link_target(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the name of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"-{uuid.uuid4().hex[:8]}" if unique else ""
    tmp = path.with_name(f".{path.name}.partial{tag}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _as_dataset(obj) -> xr.Dataset:
    if isinstance(obj, xr.Dataset):
        ds = obj
    elif isinstance(obj, xr.DataArray):
        # (xarray names a DataArray made of a Dask array after the array's key, which is no name, and
        # keeps it through arithmetic on the array)
        named = obj.name is not None and not _DASK_KEY.fullmatch(str(obj.name))
        ds = obj.to_dataset(name=obj.name if named else "image")
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        readable_array(obj, "the array to save")  # (its mask would be lost)
        arr = obj if isinstance(obj, da.Array) else np.asarray(obj)
        known_shape(arr.shape, "the array to save")
        dims = ("y", "x") if arr.ndim == 2 else ("c", "y", "x") if arr.ndim == 3 else None
        if dims is None:
            raise ValueError(f"cannot save a {arr.ndim}-D array; give a 2-D (y, x) or 3-D (c, y, x) array")
        ds = xr.DataArray(arr, dims=dims).to_dataset(name="image")
    else:
        raise TypeError(f"save() takes an xarray Dataset/DataArray or an array, got {type(obj).__name__}")
    if not ds.data_vars:
        raise ValueError("nothing to save: the Dataset has no variables")
    for name, var in ds.data_vars.items():
        if _is_table(var):  # a table may have no rows (nothing detected)
            continue
        if var.ndim not in (2, 3) or 0 in var.shape:
            raise ValueError(f"variable {name!r} has shape {var.shape}; each variable must be a non-empty 2-D or 3-D array")
        if var.dtype.kind not in "biuf":
            raise TypeError(f"variable {name!r} has dtype {var.dtype}; images must be real numbers (bool, int or float)")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"variable name {name!r} must be a string of letters and digits (with _ or -): it "
                             "becomes a directory")
    return ds


_DASK_KEY = re.compile(r"[\w.-]+-[0-9a-f]{32}")  # e.g. array-37ee2cd8...: a Dask array's name


def _is_table(var: xr.DataArray) -> bool:
    """A table: 2-D, its columns named by string labels (e.g. detected sources: y, x, amplitude)."""
    col = var.dims[-1] if var.ndim == 2 else None
    return col is not None and col in var.coords and var.coords[col].dtype.kind in "OUS"


def _write_table(root, name: str, var: xr.DataArray):
    """A plain zarr array with its row and column labels (no NGFF image metadata: viewers skip it)."""
    rows, cols = var.dims
    arr = root.create_array(name, data=np.asarray(var.values), dimension_names=[rows, cols],
                            config={"write_empty_chunks": True})  # (every chunk stored: see _write_variable)
    labels = var.coords[rows] if rows in var.coords else None  # (e.g. a source's id or time)
    arr.attrs["lsfov"] = {"table": True, "dims": [rows, cols], "columns": [str(c) for c in var.coords[cols].values],
                          "attrs": _jsonable(var.attrs),
                          **({"rows": _json_values(labels.values), "row_dtype": str(labels.dtype),
                              "row_attrs": _jsonable(labels.attrs)} if labels is not None else {})}


def _narrowed(block, name):
    """``block`` as float32, refusing finite values float32 cannot hold (they would be stored as Inf);
    values below its smallest are stored as 0, as a cast does."""
    with np.errstate(over="ignore"):
        out = block.astype(np.float32)
    lost = ~np.isfinite(out) & np.isfinite(block)
    if lost.any():
        from ._validate import beyond_float32

        raise beyond_float32(f"variable {name!r}", float(np.abs(block[lost]).max()))
    return out


def _period(name: str, var: xr.DataArray, attrs: dict) -> tuple[float, float, float] | None:
    """(period, low, high) of an angle of a PSF model (a map's astigmatism axis: its period,
    :meth:`lsfov.psf.PSFModel.period`, and the model's range of it), named by the variable's or the
    result's ``psf_model``; None for anything else."""
    from .psf import MODELS

    model = MODELS.get(str(var.attrs.get("psf_model", attrs.get("psf_model"))).upper())
    period = model.period(name) if model is not None and var.dtype.kind == "f" else None
    return (period, *map(float, model.ranges[name])) if period else None


def _write_variable(root, name: str, var: xr.DataArray, chunks, period: tuple | None = None):
    """Start writing ``var`` as the NGFF image ``name`` of ``root``: its group and full-resolution
    array made, its metadata checked. Returns (the delayed store of its pixels, a function that
    writes its pyramid and metadata once they are stored): :func:`save` stores every variable's
    pixels in one computation, so that work they share (a deblurred image and what is derived from
    it) runs once. ``period``: (period, low, high), the variable is an angle of that period in
    [low, high), its pyramid levels means on the circle."""
    for pair in (("y", "x"), ("gy", "gx")):  # the axes NGFF names y and x last, by name: never a transposed image
        if set(pair) <= set(var.dims):
            var = var.transpose(..., *pair)
    ydim, xdim = var.dims[-2:]
    lead = var.dims[:-2]
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data))
    if data.dtype.kind == "f" and data.dtype.itemsize > 4:  # float64 halved (what viewers read), never to Inf
        data = data.map_blocks(_narrowed, name, dtype=np.float32)
    elif data.dtype.kind == "f" and data.dtype != np.float32:  # float16 widened
        data = data.astype(np.float32)
    edge = int(chunks) if chunks else min(_CHUNK, max(data.chunksize[-2:]))
    spatial_chunks = (min(edge, data.shape[-2]), min(edge, data.shape[-1]))
    chunk_shape = (1,) * len(lead) + spatial_chunks  # a plane per chunk: a viewer reads the plane it shows
    scale, trans, units = [], [], []
    for d in (ydim, xdim):
        s, t0, unit = _axis_geometry(var, d)
        scale.append(s)
        trans.append(t0)
        units.append(unit)
    scale = [s if s is not None else next((o for o in scale if o is not None), 1.0) for s in scale]  # a 1-node row
    group = root.create_group(name)
    # A leading z or t (or xarray's usual "time") stays what it is (viewers then offer a slider of the
    # right kind); any other is a channel.
    lead_name = _LEAD_AXES.get(lead[0], "c") if lead else None
    lead_scale, lead_trans, lead_unit = _lead_geometry(var, lead[0], lead_name) if lead else (1.0, 0.0, None)
    lead_axes = [{"name": lead_name, "type": _NGFF_NONSPATIAL.get(lead_name, "space"),
                  **({"unit": lead_unit} if lead_unit else {})}] if lead else []
    axes = lead_axes + [
        {"name": "y", "type": "space", **({"unit": SPATIAL_UNIT} if units[0] == SPATIAL_UNIT else {})},
        {"name": "x", "type": "space", **({"unit": SPATIAL_UNIT} if units[1] == SPATIAL_UNIT else {})},
    ]
    dim_names = [a["name"] for a in axes]
    mask = data.dtype == bool  # stored as 0/1 uint8, which every viewer reads; read back by lsfov as bool
    meta = _variable_meta(var, lead, mask)  # before the pixels: what it cannot store is said before any work
    datasets = []

    def level_array(level):
        arr = group.create_array(
            str(len(datasets)), shape=level.shape, chunks=level.chunksize, dtype=np.uint8 if mask else level.dtype,
            dimension_names=dim_names, fill_value=0,
            config={"write_empty_chunks": True},  # every chunk stored: one missing is damage (lsfov info says)
        )
        factor = 2 ** len(datasets)
        datasets.append({
            "path": str(len(datasets)),
            "coordinateTransformations": [
                {"type": "scale", "scale": [lead_scale] * len(lead) + [scale[0] * factor, scale[1] * factor]},
                # A pixel of level l averages 2**l x 2**l base pixels: its centre is shifted.
                {"type": "translation", "translation": [lead_trans] * len(lead)
                 + [trans[0] + scale[0] * (factor - 1) / 2, trans[1] + scale[1] * (factor - 1) / 2]},
            ],
        })
        return arr

    full = data.rechunk(chunk_shape)
    arr = level_array(full)
    store = da.store(full.astype(np.uint8) if mask else full, arr, lock=False, compute=False)

    def finish():
        level = full
        while min(level.shape[-2:]) >= 2 * _PYRAMID_MIN and len(datasets) < 8:
            # Next level from what was just written (not from the source graph, which may be costly).
            stored = da.from_zarr(group[datasets[-1]["path"]])
            level = _halved(stored.astype(bool) if mask else stored, period)
            level = level.rechunk(tuple(min(c, s) for c, s in zip(chunk_shape, level.shape)))
            compute(da.store(level.astype(np.uint8) if mask else level, level_array(level), lock=False,
                             compute=False))
        _write_ngff_metadata(group, name, var, lead, lead_name, axes, datasets, meta)

    return store, finish


def _write_ngff_metadata(group, name, var, lead, lead_name, axes, datasets, meta):
    """A variable's NGFF multiscale metadata (its levels ``datasets``) and lsfov's ``meta``."""
    from ome_zarr.format import FormatV05

    with warnings.catch_warnings():  # its module's own default argument draws a DeprecationWarning
        warnings.filterwarnings("ignore", "Call to deprecated class Scaler", DeprecationWarning)
        from ome_zarr.writer import write_multiscales_metadata

    extra = {}
    if lead_name == "c" and lead[0] in var.coords:  # channel names, where NGFF readers (napari) look for them
        extra["omero"] = {"channels": _omero_channels(var.coords[lead[0]].values, group[datasets[-1]["path"]])}
    write_multiscales_metadata(group, datasets=datasets, fmt=FormatV05(), axes=axes, name=name,
                               metadata={"description": "each level the mean of 2x2 pixels of the one before "
                                                        "(integers rounded, masks set where at least half are, "
                                                        "angles averaged on their circle)",
                                         "method": "lsfov.io._halved", "version": _version(), **extra})
    ome = group.attrs["ome"]  # NGFF's "type" of downscaling, which ome-zarr-py's writer does not take
    ome["multiscales"][0]["type"] = "local_mean"
    group.attrs.update({"ome": ome, "lsfov": meta})


# Channel colours: one channel grey; several, the colours viewers tell apart best.
_CHANNEL_COLORS = ("00FFFF", "FF00FF", "FFFF00", "00FF00", "FF0000", "0000FF")


def _omero_channels(labels, smallest) -> list[dict]:
    """NGFF's (transitional) omero channels: a label, a colour and a display window each. A label alone
    is not enough: ome-zarr-py's reader then gives napari no colours, and napari refuses to open the
    image. The window is read from the smallest pyramid level (``smallest``, a few hundred pixels per
    channel, already written): a display range, which a full pass over a large result would cost."""
    values = np.asarray(smallest[...], dtype=np.float64)
    colors = ("FFFFFF",) if len(labels) == 1 else _CHANNEL_COLORS
    out = []
    for i, label in enumerate(labels):
        plane = values[i][np.isfinite(values[i])]
        lo, hi = (float(plane.min()), float(plane.max())) if plane.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        out.append({"label": str(label), "color": colors[i % len(colors)], "active": True,
                    "window": {"min": lo, "max": hi, "start": lo, "end": hi}})
    return out


def _variable_meta(var, lead, mask: bool) -> dict:
    """What lsfov reads back beyond NGFF: dims, attributes, the leading axis's values and units, and
    0-D coordinates."""
    attrs = dict(var.attrs)
    if not {"y", "x"} <= set(var.dims):  # on another grid (a PSF map's nodes): no pixel size of its own
        attrs.pop("pixel_um", None)
    # A stack rebuilt from planes (xr.concat) is no longer the first plane its attributes name: what
    # they say of its own axes goes, and all of it along an axis of another name (which planes?).
    axes = {_LEAD_AXES.get(d, d) for d in lead}
    said = {"z": ("z_um", "z", "z_units"), "t": ("t", "t_units"), "c": ("channel",)}
    for d in ("z", "t", "c") if axes - set(said) else axes & set(said):
        for key in said[d]:
            attrs.pop(key, None)
        if isinstance(attrs.get("plane"), dict):
            attrs["plane"] = {k: v for k, v in attrs["plane"].items() if k != d}
    if axes - set(said) or attrs.get("plane") == {}:
        attrs.pop("plane", None)
    if "pixel_um" in attrs and _pixel_attr(var):  # a stale one (a subsampled image) stored as the coordinates say, as the scale is
        try:
            attrs["pixel_um"] = pixel_size(var)
        except ValueError:  # one axis subsampled: pixels no longer square, kept as each axis's scale
            attrs["pixel_um"] = None
    lead_coords = {d: var.coords[d] for d in lead[:1] if d in var.coords}
    scalars = {str(k): c for k, c in var.coords.items() if c.ndim == 0}
    lost = [str(k) for k, c in var.coords.items() if c.ndim and k not in var.dims]
    if lost:  # (an axis's own coordinate is its scale and offset, or the leading axis's values)
        warnings.warn(f"coordinate(s) {', '.join(lost)} of {var.name!r} are not saved (OME-Zarr keeps each axis's "
                      "scale and offset); to keep them, put their values in the attributes", LsfovWarning,
                      stacklevel=user_stacklevel())
    dtypes = {k: str(c.dtype) for k, c in {**lead_coords, **scalars}.items() if c.dtype.kind in "Mm"}
    return {"dims": list(var.dims), "attrs": _jsonable(attrs),
            "coords": {d: _json_values(c.values) for d, c in lead_coords.items()},
            "coord_units": {d: str(c.attrs["units"]) for d, c in lead_coords.items() if c.attrs.get("units")},
            **({"coord_dtypes": dtypes} if dtypes else {}),  # dates and durations: read back as such
            **({"dtype": "bool"} if mask else {}),
            # ``.sel(c=2)`` keeps ``c``: the plane it came from
            **({"scalar_coords": {k: {"value": _json_values(c.values), "attrs": _jsonable(c.attrs)}
                                  for k, c in scalars.items()}} if scalars else {})}


def _json_values(values):
    """Coordinate values as JSON: dates as ISO text, durations as counts of their unit (exact both;
    ``coord_dtypes`` names the type), NaN as null."""
    values = np.asarray(values)
    if values.dtype.kind == "M":
        values = np.datetime_as_string(values)
    elif values.dtype.kind == "m":
        values = values.astype(np.int64)
    return _jsonable({"v": values.tolist()})["v"]


def _coord_values(values, dtype=None):
    """Read back what :func:`_json_values` wrote."""
    return np.array(values, dtype=dtype) if dtype else values


def _halved(stored, period: tuple | None = None):
    """The next pyramid level: the mean of 2x2 pixels, rounded to the nearest for integers (a cast
    alone rounds down) and a majority for booleans (a cast alone makes any True win); for an angle,
    ``period`` = (period, low, high), the mean on its circle (two axes on either side of 0 do not
    average to the perpendicular), in [low, high)."""
    axes = {stored.ndim - 2: 2, stored.ndim - 1: 2}
    if period:
        period, lo, hi = period
        k = 2 * np.pi / period
        c, s = (da.coarsen(np.mean, f(k * stored.astype(np.float64)), axes, trim_excess=True) for f in (da.cos, da.sin))
        mean = da.arctan2(s, c) / k
        # Written as the first of its 2x2 pixels is where the model's range holds several turns (Z2's
        # axis over (0, π) with a period of π/2): an area of one orientation keeps its value at every
        # level; then brought into the range.
        ref = stored[(..., slice(0, 2 * mean.shape[-2], 2), slice(0, 2 * mean.shape[-1], 2))]
        mean = mean + period * da.round((ref - mean) / period)
        mean = da.where(mean < lo, mean + period, da.where(mean >= hi, mean - period, mean))
        return mean.astype(stored.dtype)
    # float32 sums overflow above 8.5e37 (four such values): sums in float64, as integers' already are
    wide = {"dtype": np.float64} if stored.dtype.kind == "f" and stored.dtype.itemsize < 8 else {}
    mean = da.coarsen(np.mean, stored, axes, trim_excess=True, **wide)
    if stored.dtype == bool:
        return mean >= 0.5
    if stored.dtype.kind in "iu":
        info = np.iinfo(stored.dtype)
        # (a 64-bit type's largest value is no float64: it rounds up to 2⁶⁴ or 2⁶³, which the cast wraps)
        top = np.nextafter(float(info.max), 0) if info.bits == 64 else info.max
        return da.clip(da.rint(mean), info.min, top).astype(stored.dtype)
    return mean.astype(stored.dtype)


# NGFF names time units as UCUM does; their plurals and common symbols, written out.
_TIME_NAMES = (*(f"{p}second" for p in _SI), "minute", "hour", "day")
_TIME_UNITS = {**{name: name for name in _TIME_NAMES}, **{f"{name}s": name for name in _TIME_NAMES},
               **{f"{s}s": f"{_SYMBOL[s]}second" for s in ("p", "n", "u", "\u03bc", "m", "")},
               "sec": "second", "secs": "second", "msec": "millisecond", "min": "minute", "mins": "minute",
               "h": "hour", "hr": "hour", "hrs": "hour", "d": "day"}


def _time_unit(unit) -> str | None:
    """NGFF's name of a time unit (``"ms"``, ``"µs"``, ``"minutes"``: millisecond, microsecond, minute);
    None if it is none. NFKC folds the micro sign µ into the Greek mu μ."""
    import unicodedata

    return _TIME_UNITS.get(unicodedata.normalize("NFKC", _unescaped(str(unit))).strip().lower()) if unit else None


_LEAD_AXES = {"z": "z", "t": "t", "time": "t"}  # leading dims NGFF names as they are: dim -> axis


def _lead_geometry(var: xr.DataArray, dim, axis):
    """(scale, translation, unit or None) of a leading z or t ``axis`` (``dim`` in ``var``) from its
    coordinate, when evenly spaced (NGFF gives every axis a scale: a z step, not 1); (1, 0, None)
    otherwise (channels)."""
    kinds = "iufMm" if axis == "t" else "iuf"
    if axis not in ("z", "t") or dim not in var.coords or var.sizes[dim] < 2 or var.coords[dim].dtype.kind not in kinds:
        return 1.0, 0.0, None
    c, units = var.coords[dim].values, var.coords[dim].attrs.get("units")
    if c.dtype.kind in "Mm":  # dates (from the first) or durations: in seconds
        c, units = (c - (c[0] if c.dtype.kind == "M" else np.timedelta64(0))) / np.timedelta64(1, "s"), "s"
    c = np.asarray(c, dtype=np.float64)
    step = _even_step(c)
    if step is None:  # kept for lsfov (its own copy of the coordinates), not for viewers: said
        how = (f"flip it (.isel({dim}=slice(None, None, -1))), as NGFF has no negative scale" if c[-1] < c[0]
               else "resample it to keep its spacing there")
        warnings.warn(f"the {dim} coordinate of {var.name!r} is not evenly spaced and increasing: NGFF's scale cannot "
                      f"hold it, so viewers (napari, ome-zarr) show its planes one unit apart, in stored order "
                      f"(lsfov.open_result reads it back); {how}", LsfovWarning, stacklevel=user_stacklevel())
        return 1.0, 0.0, None
    if axis == "z":
        factor = _to_um(units)
        return (float(step * factor), float(c[0] * factor), SPATIAL_UNIT) if factor else (float(step), float(c[0]), None)
    return float(step), float(c[0]), _time_unit(units)


def _axis_geometry(var: xr.DataArray, dim):
    """(scale, translation, unit) of a spatial dim from its coordinate, if evenly spaced; of an image
    axis (y, x) without one, from the image's ``pixel_um`` attribute where it has one."""
    px = _pixel_size_said(var)
    if dim not in var.coords:
        if dim in ("y", "x") and px:  # (not a map's gy, gx: its nodes are not pixels apart)
            return px, 0.0, SPATIAL_UNIT
        return 1.0, 0.0, "pixel"
    c = np.asarray(var.coords[dim].values, dtype=np.float64)
    units = var.coords[dim].attrs.get("units")
    factor = _to_um(units)  # nm, mm ... written as µm, converted
    if _unitless_um(var, dim, var.attrs.get("pixel_um")):  # no unit, spaced at the pixel size: µm
        factor = 1.0
    elif dim in ("y", "x") and px and all(_in_pixels(var, d, px) for d in ("y", "x") if d in var.coords):
        # pixel indices (a crop's) of an image whose pixel size is known: in µm, as image_origin reads
        # them (steps of several: another level's pixels, the pixel size this image's)
        factor = px / ((_even_step(c) or 1.0) if c.size > 1 else 1.0)
    elif factor is None and units and str(units).strip().lower() not in _PIXEL_NAMES:
        warnings.warn(f"the {dim} coordinates of {var.name!r} are in {units!r}, which lsfov does not know as a length: "
                      "they are saved in pixels, without a unit; give them in micrometer (or nm, mm, angstrom, ...)",
                      LsfovWarning, stacklevel=user_stacklevel())
    unit, factor = (SPATIAL_UNIT, factor) if factor is not None else ("pixel", 1.0)
    if c.size == 1:  # no spacing to read: the coordinate's own "step", an image's pixel size, else the other axis's
        step = var.coords[dim].attrs.get("step")
        if step:
            return _tidy(float(step) * factor), _tidy(float(c[0]) * factor), unit
        if dim in ("y", "x") and unit == SPATIAL_UNIT and px:
            return px, float(c[0]) * factor, unit
        return None, float(c[0]) * factor, unit
    step = _even_step(c)
    if step is None:
        hint = (f"; flip it (.isel({dim}=slice(None, None, -1))), as NGFF has no negative scale" if c[-1] < c[0]
                else "; resample it, or drop the coordinate (pixel indices)")
        raise ValueError(f"coordinate {dim!r} is not evenly spaced and increasing, and NGFF needs a scale{hint}")
    return _tidy(step * factor), _tidy(c[0] * factor), unit


def _even_step(c) -> float | None:
    """The step of evenly spaced, increasing coordinates ``c`` (at least two); None if they are not."""
    step = (c[-1] - c[0]) / (c.size - 1)
    return _tidy(step) if step > 0 and np.allclose(np.diff(c), step, rtol=1e-5, atol=1e-9) else None


def _pixel_size_said(var) -> float | None:
    """``var``'s ``pixel_um`` attribute where it is a pixel size (a positive finite number), tidied;
    else None (one that is no size is refused where the variable is checked)."""
    px = var.attrs.get("pixel_um")
    if isinstance(px, (int, float, np.number)) and not isinstance(px, bool) and np.isfinite(px) and px > 0:
        return _tidy(float(px))
    return None


def grid_values(start, step, n: int) -> np.ndarray:
    """``start + step·i`` for i < n, each to 12 significant digits as stored metadata is (:func:`_tidy`):
    an axis made in memory and the same axis read back from its store are equal to the bit, so that
    xarray aligns them and ``.sel(gx=12.7)`` finds the node at 12.7 µm."""
    v = float(start) + float(step) * np.arange(n, dtype=np.float64)
    ok = np.isfinite(v) & (np.abs(v) > 1e-200)  # (0 as it is; 10**d would overflow near float's smallest)
    d = np.zeros_like(v)
    d[ok] = 11 - np.floor(np.log10(np.abs(v[ok])))  # decimals kept
    up, down = ok & (d >= 0), ok & (d < 0)
    p = 10.0 ** np.abs(d)  # exact up to 1e22: a division or product by it rounds once
    v[up] = np.round(v[up] * p[up]) / p[up]
    v[down] = np.round(v[down] / p[down]) * p[down]
    return v


def _tidy(v) -> float:
    """``v`` to 12 significant digits: 0.2, not the 0.20000000000000004 that sums of steps leave in
    metadata people read (and far below any pixel size's precision); rounded as :func:`grid_values`
    rounds the coordinates read back from that metadata."""
    return float(grid_values(v, 0.0, 1)[0])


def _is_replaceable(path: Path) -> bool:
    """What ``overwrite`` may replace: a zarr store, or an empty directory (nothing of anyone's in it)."""
    return path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()
                              or not any(path.iterdir()))


def _link_target(path) -> Path:
    """Where a write of ``path`` goes: the file or folder a symbolic link names (the link stays a link,
    and the new result is made beside its target, on the target's file system), else ``path``."""
    path = _as_path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def restore_moved_aside(path: Path):
    """Mend what a write killed inside :func:`_move_into_place` left (call it holding
    :func:`output_lock`): with ``path`` gone, its old result moved aside whole is put back (the
    newest, were there several); with ``path`` in place, such old results are leftovers of a
    replacement that had ended, and are removed, as are old results whose removal was cut short."""
    name = glob.escape(path.name)
    olds = sorted(path.parent.glob(f".{name}.old-*"), key=lambda p: p.lstat().st_mtime)
    if olds and not os.path.lexists(path):
        log.warning("restoring %s from %s: a write that was replacing it was killed", path, olds[-1].name)
        os.replace(olds.pop(), path)
    for old in olds + sorted(path.parent.glob(f".{name}.removing-*")):
        log.info("removing %s, the result %s had before a replacement", old, path)
        shutil.rmtree(old, ignore_errors=True)


def is_working_folder(path: Path) -> bool:
    """Whether ``path`` is the current folder or holds it (never an output: replacing it would pull
    the folder from under the run); False where the current folder is gone."""
    try:
        here = Path.cwd().resolve()
    except OSError:
        return False
    return path.resolve() == here or path.resolve() in here.parents


def _move_into_place(tmp: Path, path: Path):
    """Rename ``tmp`` to ``path``; an old ``path`` is moved aside first and removed only at the end."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:  # renamed first: a removal cut short is never taken for a result to restore
        gone = old.with_name(old.name.replace(".old-", ".removing-", 1))
        with contextlib.suppress(OSError):
            os.replace(old, gone)
            old = gone
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(attrs) -> dict:
    """Attributes as strict JSON: NumPy values as Python ones, NaN and ±Inf as null (RFC 8259 has no
    such numbers: a strict parser, a web viewer's JSON.parse, rejects the file), others as text."""
    out = {}
    for k, v in dict(attrs).items():
        v = _finite(v)
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            v = str(v)
        out[str(k)] = v
    return out


def _finite(v):
    if isinstance(v, (np.generic, np.ndarray)):
        v = v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {key: _finite(x) for key, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _version():
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------- results


def open_result(path) -> xr.Dataset:
    """Read an lsfov result (written by :func:`save` or the CLI) as one lazy ``xarray.Dataset``.

    Parameters
    ----------
    path : str or Path
        The result's directory.

    Returns
    -------
    xarray.Dataset
        One variable per stored image (full resolution, Dask-backed) or table, with the dims,
        coordinates and attributes they were saved with; the result's attributes as ``attrs``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not an lsfov result (an image, an operator, a subspace or a training set), or
        its write was interrupted.

    Examples
    --------
    >>> import tifffile
    >>> import xarray as xr
    >>> import lsfov
    >>> from lsfov import simulate
    >>> beads = simulate.bead_field((256, 256), seed=0)  # 0.1 µm pixels, and the true blur
    >>> tifffile.imwrite("beads.tif", beads.image, imagej=True, resolution=(10, 10), metadata={"unit": "um"})
    >>> raw = lsfov.open_image("beads.tif")
    >>> deblurred = lsfov.deconvolve(raw, beads.operator, iterations=10)  # xarray in, xarray out
    >>> print(lsfov.save(xr.Dataset({"raw": raw, "deblurred": deblurred}), "result.zarr"))
    result.zarr
    >>> ds = lsfov.open_result("result.zarr")
    >>> list(ds.data_vars), ds["deblurred"].dims, str(ds["deblurred"].dtype)
    (['raw', 'deblurred'], ('y', 'x'), 'float32')
    >>> float(ds["x"][1]), ds["x"].attrs["units"]  # µm coordinates, as saved
    (0.1, 'micrometer')
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such result: {path}")
    meta = _group_attrs(path).get("lsfov")
    if meta is None:
        raise ValueError(f"{path} is not an lsfov result (no 'lsfov' attributes); open images with lsfov.open_image")
    if _other_store(meta):
        raise ValueError(f"{path} is {_other_store(meta)}, not a result")
    if not meta.get("complete"):
        parent = path.resolve().parent
        if _name_in_result(parent, path.name):  # a variable's group: its own attrs, no 'complete'
            alone = "" if _node_grid(path) else ", or open this image alone with lsfov.open_image"  # (a map's: none)
            raise ValueError(f"{path} is one variable ({path.name}) of the result {path.parent}: pass "
                             f"{path.parent}{alone}")
        raise ValueError(f"{path} is incomplete (the run that wrote it was interrupted); run the command that wrote "
                         "it again, with --overwrite")
    variables = {}
    for name in meta.get("variables", []):  # absolute: lazy reads run on workers started elsewhere
        variables[name] = _open_variable(path.resolve() / name)
    return xr.Dataset(variables, attrs=meta.get("attrs", {}))


def _name_in_result(path: Path, name: str) -> bool:
    """Whether ``path`` is an lsfov result with a variable ``name``."""
    return name in ((_group_attrs(path).get("lsfov") or {}).get("variables") or [])


def _other_store(meta) -> str | None:
    """What an lsfov store that is neither an image nor a result is, and how to open it."""
    return {"ProductConvolution": "an operator (lsfov.ProductConvolution.load; CLI: --operator)",
            "OperatorSubspace": "a subspace of operators (lsfov.OperatorSubspace.load; CLI: --subspace)",
            "TrainingSet": "a CNN training set (lsfov train DATA OUT)"}.get(meta.get("type"))


def _open_variable(path: Path) -> xr.DataArray:
    table = _array_attrs(path).get("lsfov", {})
    if table.get("table"):
        rows, cols = table["dims"]
        values = zarr.open_array(str(path), mode="r")[...]
        coords = {cols: table["columns"]}
        if "rows" in table:
            dtype = table["row_dtype"]
            coords[rows] = (rows, _coord_values(table["rows"], None if np.dtype(dtype).kind == "O" else dtype),
                            table.get("row_attrs", {}))
        return xr.DataArray(values, dims=(rows, cols), coords=coords, attrs=table.get("attrs", {}))
    if not path.exists():  # (a variable's folder lost from a copy)
        raise ValueError(f"{path.parent}: its variable {path.name} is missing (a copy cut short); copy the result "
                         "again")
    try:
        arr = _open_ngff(path, 0)
    except Exception as e:  # a level's metadata lost or cut: said as for an image
        damaged = _damaged_metadata(path)
        if damaged is None:
            raise
        raise ValueError(damaged) from e
    meta = _group_attrs(path).get("lsfov", {})
    dims = meta.get("dims")
    if dims and len(dims) == arr.ndim:
        arr = arr.rename({old: new for old, new in zip(arr.dims, dims) if old != new})
    units, dtypes = meta.get("coord_units") or {}, meta.get("coord_dtypes") or {}
    for d, values in (meta.get("coords") or {}).items():
        arr = arr.assign_coords({d: (d, _coord_values(values, dtypes.get(d)), {"units": units[d]} if d in units else {})})
    if meta.get("dtype") == "bool":  # a mask, stored as 0/1
        arr = arr.astype(bool)
    for name, c in (meta.get("scalar_coords") or {}).items():
        arr = arr.assign_coords({name: xr.Variable((), _coord_values(c.get("value"), dtypes.get(name)),
                                                   c.get("attrs") or {})})
    arr.attrs.update(meta.get("attrs", {}))
    if not {"y", "x"} <= set(arr.dims):  # on another grid (a PSF map's nodes) the NGFF scale is their
        arr.attrs.pop("pixel_um", None)  # spacing, which a pixel_um would pass off as the image's pixel size
        for d in ("gy", "gx"):  # and their coordinates' step, as a map's own: kept by a crop to one node
            if d in arr.coords and arr.sizes[d] > 1:
                arr.coords[d].attrs["step"] = _tidy(arr.coords[d].values[1] - arr.coords[d].values[0])
    arr.attrs["source"] = str(path)
    return arr


def describe(path) -> str:
    """A short human-readable summary of an image or result (what ``lsfov info`` prints).

    Parameters
    ----------
    path : str or Path
        An image :func:`open_image` reads, an lsfov result, or a saved operator, operator subspace
        or training set.

    Returns
    -------
    str
        Several lines: the kind of store and, per image or variable, its shape, dtype, dims and
        coordinate spacing (pixel size, saturation level and pyramid levels where known). An
        interrupted result is reported as ``INCOMPLETE``, not refused.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is none of these.
    """
    path = Path(path)
    meta = _group_attrs(path).get("lsfov") if path.is_dir() else None
    lines = []
    if meta is not None and "variables" in meta:
        state = "complete" if meta.get("complete") else "INCOMPLETE"
        lines.append(f"{path}: lsfov result ({state}), variables: {', '.join(meta['variables'])}")
        if meta.get("complete"):
            from ._validate import fmt_level

            res = open_result(path)
            for name, var in res.data_vars.items():
                lines.append("  " + _describe_array(name, var) + _missing_chunks(path / name).replace("\n", "\n  "))
            said = {"saturation": "saturation level", "censored_at": "censored at"}
            known = [f"{v} {fmt_level(res.attrs[k])}" for k, v in said.items()
                     if isinstance(res.attrs.get(k), (int, float))]
            if isinstance(res.attrs.get("background"), (int, float)) and res.attrs["background"] > 0:
                known.append(f"camera offset {fmt_level(res.attrs['background'])} subtracted")
            if known:
                lines.append("  " + ", ".join(known))
            from .operators import ProductConvolution, _operator_meta

            if _operator_meta(path / "operator"):  # its blur (lsfov bss), not a variable so named
                lines.append(f"  operator {ProductConvolution.load(path)!r} (--operator {path})")
        return "\n".join(lines)
    if isinstance(meta, dict) and meta.get("type") == "ProductConvolution":
        from .operators import ProductConvolution

        from .operators import on_disk

        op = ProductConvolution.load(path)
        extra = ", ".join(f"{k} {v}" for k, v in op.attrs.items() if isinstance(v, (int, float, str)))
        def size(a):
            return f"{a.nbytes / 2**20:.3g} MiB" if a.nbytes >= 2**20 else f"{a.nbytes / 2**10:.3g} KiB"

        held = ("on disk, read window by window" if on_disk(op.kernels) else "read into memory")
        parts = f"kernels {size(op.kernels)} ({held})" + (
            f", maps {size(op.maps)} (on disk, read window by window)" if op.kind == "basis" else "")
        return f"{path}: lsfov operator\n  {op!r}\n  {parts}" + (f"\n  {extra}" if extra else "")
    if isinstance(meta, dict) and meta.get("type") == "OperatorSubspace":
        from .calibrate import OperatorSubspace

        sub = OperatorSubspace.load(path)
        beads = sub.attrs.get("n_beads")
        return f"{path}: lsfov operator subspace\n  {sub!r}" + (f"\n  beads {beads}" if beads is not None else "")
    if isinstance(meta, dict) and meta.get("type") == "TrainingSet":
        from .estimate.synth import missing_chunks

        g = zarr.open_group(str(path), mode="r")
        n = g["patches"].shape[0]
        try:
            damaged = missing_chunks(g)
        except Exception:  # an array missing: open_training_set says which
            damaged = ""
        extra = ", ".join(f"{k} {meta[k]}" for k in ("psf_model", "split", "seed") if k in meta)
        drawn = {k: tuple(v) for k, v in (meta.get("ranges") or {}).items()}
        optics = meta.get("optics")
        return (f"{path}: lsfov CNN training set\n  {n} patches; {extra}\n  ranges: {drawn}"
                + (f"; optics: {', '.join(f'{k} {v}' for k, v in optics.items())}" if optics else "")
                + (f"\n  peak photons {meta['photons'][0]:g}-{meta['photons'][1]:g}" if meta.get("photons") else "")
                + (f"\n  damaged: {damaged} (they read as zeros); synthesize it again" if damaged else ""))
    if path.is_dir() and (_array_attrs(path).get("lsfov") or {}).get("table"):  # a result's table, not an image
        table = _open_variable(path)
        return (f"{path}: a table of the result {path.parent}\n  {table.shape[0]} {table.dims[0]}(s); columns "
                f"{', '.join(map(str, table[table.dims[1]].values))}"
                + (f" [{table.attrs['units']}]" if table.attrs.get("units") else ""))
    if path.is_dir() and _node_grid(path):  # a map's variable
        var = _open_variable(path)
        return f"{path}: a variable of the result {path.parent}, on its node grid\n  " + _describe_array(path.name, var)
    try:
        arr = _open_any(path, 0)  # every axis, none chosen: info is how one learns which there are
    except SeveralImages as e:  # an OME-TIFF of positions: each image
        parts = _open_tiff(path, every=True)
        return (f"{path}: {e.n} images (choose one with series= / --series)" + "".join(
            f"\n  {_describe_array(f'series {k}', a)}" + (f"; pixel size {a.attrs['pixel_um']:g} µm"
                                                          if a.attrs.get("pixel_um") else "") + _clip_said(a, "; ")
            for k, a in enumerate(parts)))
    if path.is_dir() and (_group_attrs(path).get("lsfov") or {}).get("dtype") == "bool":
        arr = arr.astype(bool)  # a result's mask, stored as 0/1 (as open_result reads it; no camera's clip)
    px = arr.attrs.get("pixel_um")
    levels = _pyramid_shapes(path)
    return (f"{path}: image\n  " + _describe_array("image", arr) + (f"\n  pixel size {px:g} µm" if px else "")
            + _clip_said(arr, "\n  ") + _missing_chunks(path)
            + (f"\n  pyramid: {len(levels)} levels, {' '.join('x'.join(map(str, s)) for s in levels)} "
               "(level=k of lsfov.open_image)" if len(levels) > 1 else ""))


def _clip_said(arr, sep: str) -> str:
    """Where an image saturates, as PSF maps, deconvolution and BSS take the camera's clip ("" if nowhere)."""
    from ._validate import saturation_level, significant_bits

    clip, bits = saturation_level(arr), significant_bits(arr)
    if clip is None:
        return ""
    return (f"{sep}saturates at {clip:g}" + (f" ({bits} significant bits)" if bits and clip == 2.0**bits - 1 else
                                             " (its type's largest count)") + "; --saturation gives another level")


def _missing_chunks(path: Path) -> str:
    """A zarr image's chunks that are not stored, which read as its fill value ("" if none): a copy cut
    short looks whole to a reader, and so do tiles left empty on purpose (zarr stores no all-fill chunk)."""
    if not path.is_dir():
        return ""
    try:
        datasets = _multiscale(path).get("datasets") if (path / "zarr.json").exists() or (path / ".zattrs").exists() \
            else None
        arrays = [zarr.open_array(str(path / d["path"]), mode="r") for d in datasets] if datasets else \
            [zarr.open_array(str(path), mode="r")]
        counts = [(a.nchunks_initialized, a.nchunks) for a in arrays]
    except Exception:  # a summary: nothing said rather than a failure
        return ""
    (stored, total), arr = counts[0], arrays[0]
    said = "" if stored >= total else (
        f"\n  {total - stored} of {total} chunks not stored: they read as {arr.fill_value} (empty tiles, which "
        "zarr does not store, or a copy cut short: compare with the source)")
    # A level's missing chunk where the full resolution has all of its own is damage: the level is
    # computed whole from it (a viewer zoomed out would show the hole).
    lost = [f"level {k}: {t - n} of {t}" for k, (n, t) in enumerate(counts) if k and n < t and stored >= total]
    if lost:
        said += f"\n  chunks not stored in pyramid levels ({'; '.join(lost)}): a copy cut short; copy it again"
    return said


def _pyramid_shapes(path: Path) -> list:
    """The shapes of an image's pyramid levels (a TIFF's or an OME-Zarr's), full resolution first."""
    try:
        if path.is_dir():
            return [zarr.open_array(str(path / d["path"]), mode="r").shape for d in _multiscale(path).get("datasets", [])]
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return [lv.shape for lv in tf.series[0].levels] if len(tf.series) == 1 else []
    except Exception:  # a summary: no pyramid said rather than a failure
        return []


def _describe_array(name, arr: xr.DataArray) -> str:
    geo = []
    for d in arr.dims:  # every axis with a scale: z steps and time intervals too
        if d in arr.coords and arr.sizes[d] > 1 and arr.coords[d].dtype.kind in "iuf":
            c = arr.coords[d].values
            # (ends to 1e-4 of their unit: a stage offset of 2012.7 µm is not shown as 2013)
            geo.append(f"{d}: {round(float(c[0]), 4):.10g}..{round(float(c[-1]), 4):.10g} step {c[1] - c[0]:.4g} "
                       f"{arr.coords[d].attrs.get('units', '')}")
    units = arr.attrs.get("units")
    return (
        f"{name}: shape {tuple(arr.shape)} {arr.dtype} dims {tuple(arr.dims)}"
        + (f" [{units}]" if units else "")
        + (f"; {'; '.join(geo)}" if geo else "")
    )
