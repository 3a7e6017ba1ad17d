"""Spatially varying PSF maps: the CNN on a sliding window, chunk by chunk (paper 000 Sec. II-F).

Node (i, j) reads the patch whose top-left pixel is ``(i·stride, j·stride)``; its centre is
``i·stride + patch/2 − 0.5``. The grid is fixed by the image alone, so any chunking gives the same
nodes: each chunk regresses the nodes whose patch starts inside it (reading ``patch`` pixels of its
neighbours through ``map_overlap``), all of them in one batched forward pass, with the model loaded
once per process (:func:`lsfov.load_model` caches it; a Dask worker keeps it between tasks).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from .. import psf as _psf
from .._backend import array_module, block_digests, heap_kept, to_numpy
from .._validate import (LsfovWarning, boolean, censor_level, fmt_level, known_shape, level_origin, non_finite, positive_int,
                         real_number, scratch_dir, shape2d, squeeze_plane, user_stacklevel, yx_order)
from ..io import atomic_file, image_origin, pixel_size, plane_of
from ..operators import ProductConvolution

log = logging.getLogger("lsfov")
# A Dask worker's own memory once it runs the CNN (PyTorch, lsfov, the model): about 340 MiB measured.
_CNN_WORKER_OWN = 400 * 2**20
# What one CNN task holds beyond it (its chunk's windows, a batch's activations): 130 MiB at the peak
# of a 2048² chunk's map (Z3, stride 64), measured in one process.
_CNN_TASK = 160 * 2**20

__all__ = ["estimate_psf_map", "fill_invalid", "operator_from_psf_map"]

# Paper 000's white-pixel ratio: a patch with more saturated pixels than this is invalid. Clipped
# cores read as wider PSFs while the CNN still calls the patch valid: its errors grow 1.3-1.6x at
# 2-5 % of the pixels saturated and 1.5-2x at 5-10 %. A filled node costs accuracy too (its neighbours
# lie elsewhere in the field): 5 % gave the best maps of clipped images (benchmarks/RESULTS.md,
# section saturation).
MAX_SATURATED = 0.05


def _node_count(n: int, patch: int, stride: int) -> int:
    return (n - patch) // stride + 1


def node_centres(patch: int, stride: int, shape) -> tuple[np.ndarray, ...]:
    """Pixel positions (rows, columns) of the nodes of a PSF map of ``shape`` (gy, gx): its patches' centres."""
    return tuple(patch / 2 - 0.5 + stride * np.arange(g) for g in shape)


def node_order(psf_map):
    """A PSF map with its node dims in (gy, gx) order and its nodes in increasing position, whatever
    order it was given in (transposed, reversed by ``isel(gx=slice(None, None, -1))``, shuffled)."""
    if not {"gy", "gx"} <= set(psf_map.dims):
        return psf_map
    psf_map = psf_map.transpose(..., "gy", "gx")  # (a stack of maps: its planes first, as images')
    for d in ("gy", "gx"):
        if d in psf_map.coords and psf_map[d].size > 1 and not bool((np.diff(psf_map[d].values) > 0).all()):
            psf_map = psf_map.sortby(d)  # (NaN or repeated positions stay refused, by the operator)
    return psf_map


def one_plane(psf_map, what: str):
    """Refuse a stack of maps (planes joined along t, c, z) where ``what`` reads one plane's."""
    dims = [d for d in getattr(psf_map.get("validity", psf_map.get("focus")), "dims", ()) if d not in ("gy", "gx")]
    if dims:
        raise ValueError(f"{what} takes one plane's PSF map (dims gy, gx); this one also has {', '.join(dims)}: "
                         f"select a plane, e.g. psf_map.isel({dims[0]}=0)")


def map_node_pixels(psf_map) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (rows, columns) in the mapped image of a PSF map's nodes, read from its
    coordinates: right also for a map cropped or thinned with ``isel``/``sel``."""
    if not {"gy", "gx"} <= set(psf_map.coords):  # a map without coordinates: its regular grid
        return node_centres(psf_map.attrs.get("patch", 128), psf_map.attrs.get("stride", 64),
                            (psf_map.sizes["gy"], psf_map.sizes["gx"]))
    origin = psf_map.attrs.get("origin") or (0.0, 0.0)
    out = []
    for i, d in enumerate(("gy", "gx")):
        c = np.asarray(psf_map[d].values, dtype=np.float64) - float(origin[i])
        if psf_map[d].attrs.get("units", "pixel") != "pixel":
            px = psf_map.attrs.get("pixel_um")
            if not px:
                raise ValueError(f"the PSF map's {d} is in {psf_map[d].attrs['units']} but its pixel_um attribute "
                                 "is missing; make the map with lsfov.estimate_psf_map")
            c = c / float(px)
        half = np.round(c * 2) / 2  # node positions are multiples of half a pixel: no rounding residue
        out.append(np.where(np.abs(c - half) < 1e-6, half, c))
    return tuple(out)


def _model_ref(model):
    """What tasks carry: the model's file and a digest of its bytes (small; loaded once per process),
    or the model itself."""
    from .model import PSFRegressor, file_digest, load_model, model_path

    if isinstance(model, PSFRegressor):
        return model, model
    if model_path(model) != Path(str(model)):
        return (str(model), None), load_model(model)  # a shipped name: each worker reads its own installation's
    digest = file_digest(model)  # before loading: the model used here is then at most newer, never older
    # absolute: workers may start in another directory
    return (str(Path(model).resolve()), digest), load_model(model)


def _load(ref, device):
    """The model of ``ref`` in this process: the weights the run started with, or an error (a file
    replaced by a training run in the middle of a map would give later chunks other weights)."""
    from .model import PSFRegressor, file_digest, load_model

    if isinstance(ref, PSFRegressor):
        return ref
    path, digest = ref
    if digest is not None:
        here = file_digest(path)
        if here is not None and here != digest:  # None: load_model says what is missing
            raise ValueError(f"the model file {path} holds other weights than when the run started (replaced "
                             "meanwhile, or another copy on this worker); run again with one version everywhere")
    return load_model(path, device=device)


def _regress(block, ref, *, patch, stride, n_out, origin, batch_size, device, symmetrize=False, saturation=None):
    """Regress the nodes whose patch starts in ``block``'s core; returns (ny, nx, n_out): the
    model's variables, its validity, then the fraction of the patch's pixels at or above
    ``saturation`` (0 without one)."""
    m = _load(ref, device)
    (oy, ny), (ox, nx) = origin
    if ny == 0 or nx == 0:
        return np.zeros((ny, nx, n_out), np.float32)
    xp = array_module(block)  # CuPy chunks stay on the GPU: predict takes them through DLPack
    block = xp.asarray(block, dtype=xp.float32)
    if oy + stride * (ny - 1) + patch > block.shape[0] or ox + stride * (nx - 1) + patch > block.shape[1]:
        raise AssertionError("a node's patch reaches beyond its block")  # the view below would read outside it
    # All patches as one strided view of the block, copied once (one kernel on a GPU, no index arrays).
    sy, sx = block.strides
    view = xp.lib.stride_tricks.as_strided(block[oy:, ox:], shape=(ny, nx, patch, patch),
                                           strides=(sy * stride, sx * stride, sy, sx))
    names = (*_variables(m), "validity")
    with heap_kept():
        out = _predict_view(m, view, names, ny, nx, patch, batch_size, symmetrize, xp)
    white = np.zeros((ny, nx, 1), np.float32) if saturation is None else \
        _saturated(block, saturation, origin, stride, patch)[..., None]
    return np.concatenate([out.reshape(ny, nx, n_out - 1).astype(np.float32), white], axis=-1)


def _predict_view(m, view, names, ny, nx, patch, batch_size, symmetrize, xp):
    """The model's readings of the (ny, nx) patches of ``view``: (ny·nx, len(names))."""
    n = ny * nx
    if n <= _GROUP:
        patches = xp.ascontiguousarray(view).reshape(n, patch, patch)
        pred = m.predict(patches, batch_size=batch_size, reproducible=True, symmetrize=symmetrize)
        return np.stack([pred[p] for p in names], axis=-1)
    # A large in-memory image: copies of a few thousand patches at a time, not of all of them.
    step = max(_GROUP // batch_size, 1) * batch_size  # whole batches: the same bytes as in one go
    parts = []
    for i in range(0, n, step):
        idx = np.arange(i, min(i + step, n))
        patches = view[xp.asarray(idx // nx), xp.asarray(idx % nx)]
        pred = m.predict(patches, batch_size=batch_size, reproducible=True, symmetrize=symmetrize)
        parts.append(np.stack([pred[p] for p in names], axis=-1))
    return np.concatenate(parts)


_GROUP = 4096  # patches copied at once (256 MiB of float32) when a block holds more


def _saturated(block, level, origin, stride, patch) -> np.ndarray:
    """Per node (ny, nx) of ``origin`` (as in :func:`_regress`): the fraction of its patch's pixels
    at or above ``level``, from one integral image of the block (no pass over the patches)."""
    xp = array_module(block)
    (oy, ny), (ox, nx) = origin
    white = block[oy:oy + stride * max(ny - 1, 0) + patch, ox:ox + stride * max(nx - 1, 0) + patch] >= xp.float32(level)
    if ny == 0 or nx == 0 or not bool(white.any()):
        return np.zeros((ny, nx), np.float32)
    # int32 counts (exact below 2^31 pixels), summed in place: 4 bytes a pixel, not 3 int64 copies
    count = xp.zeros((white.shape[0] + 1, white.shape[1] + 1), xp.int32 if white.size < 2**31 else xp.int64)
    xp.cumsum(white, axis=0, dtype=count.dtype, out=count[1:, 1:])
    xp.cumsum(count[1:, 1:], axis=1, out=count[1:, 1:])
    y0, x0 = stride * xp.arange(ny)[:, None], stride * xp.arange(nx)[None, :]
    y1, x1 = y0 + patch, x0 + patch
    n = count[y1, x1] - count[y0, x1] - count[y1, x0] + count[y0, x0]
    return to_numpy(n).astype(np.float32) / np.float32(patch * patch)


def _variables(m):
    """What a node holds besides its validity: the model's parameters, then its products (focus x
    astigmatism, :data:`lsfov.estimate.model.PRODUCTS`)."""
    from .model import products

    return tuple(m.params) + products(m.psf_model)


def _chunk_task(block, ref, *, patch, stride, n_out, offsets, starts, counts, batch_size, device, symmetrize=False,
                saturation=None, keep=None, block_info=None):
    """One chunk (with ``patch`` pixels of its neighbours, none beyond the image): its nodes.

    ``keep``: a directory where the chunk's nodes are saved once regressed, and read back instead
    of regressed again (a resumed run). The file is named by a digest of the chunk's pixels, so a
    resumed run whose input changed meanwhile regresses the changed chunks again."""
    iy, ix = block_info[0]["chunk-location"]
    if keep is not None:
        digest = hashlib.blake2b(np.ascontiguousarray(to_numpy(block)).data, digest_size=8).hexdigest()
        done = Path(keep) / f"{iy}.{ix}.{digest}.npy"
        if done.exists():
            return np.load(done)
        for stale in Path(keep).glob(f"{iy}.{ix}.*.npy"):
            stale.unlink(missing_ok=True)
        out = _chunk_task(block, ref, patch=patch, stride=stride, n_out=n_out, offsets=offsets, starts=starts,
                          counts=counts, batch_size=batch_size, device=device, symmetrize=symmetrize,
                          saturation=saturation, block_info=block_info)
        with atomic_file(done, unique=True) as tmp:  # a file present is a whole chunk
            np.save(tmp, out)
        return out
    by, bx = max(0, offsets[0][iy] - patch), max(0, offsets[1][ix] - patch)  # block start in the image
    origin = ((starts[0][iy] * stride - by, counts[0][iy]), (starts[1][ix] * stride - bx, counts[1][ix]))
    return _regress(block, ref, patch=patch, stride=stride, n_out=n_out, origin=origin, batch_size=batch_size,
                    device=device, symmetrize=symmetrize, saturation=saturation)


def _chunk_nodes(chunks, n_nodes, stride):
    """Per chunk along an axis: index of its first node and how many nodes start inside it."""
    edges = np.concatenate([[0], np.cumsum(chunks)])
    first = np.minimum(-(-edges // stride), n_nodes)  # ceil(edge / stride), at most n_nodes
    return first[:-1], np.diff(first)


def estimate_psf_map(image, model="Z3", patch: int = 128, stride: int = 64, *, pixel_um: float | None = None,
                     batch_size: int = 32, device=None, symmetrize: bool = False, saturation: float | None = None,
                     max_saturated: float | None = MAX_SATURATED, fill: bool = True, scratch=None, resume: bool = False,
                     progress: bool = False):
    """Regress the PSF-model parameters on a sliding window over the image (paper 000 Sec. II-F).

    Parameters
    ----------
    image : array_like (H, W)
        NumPy, CuPy, Dask (one task per chunk, via ``map_overlap``; NumPy or CuPy chunks) or xarray
        (µm coordinates give the pixel size). A floating-point Dask image is read once first, to refuse
        NaN or Inf pixels before any chunk's work.
    model : str, path or PSFRegressor
        A shipped model name (``"G1"``, ``"G2"``, ``"Z1"``, ``"Z3"``), a ``.pt`` file, or a loaded model.
    patch : int
        Patch edge; must be the model's (128).
    stride : int
        Node spacing t in pixels.
    pixel_um : float, optional
        Pixel size in µm (default: from xarray coordinates or attrs). Node coordinates are then in µm,
        and a pixel size far from the model's training optics is warned about.
    batch_size : int
        Patches per forward pass, always exactly this many (the last padded): the bytes of the map
        then do not depend on the chunking. 32 is the fastest on a CPU (benchmarks/RESULTS.md);
        raise it on a GPU.
    device : str, optional
        Torch device for the CNN (default: CUDA when the process has a GPU).
    symmetrize : bool
        Average each node over the 8 rotations and flips of its patch (``PSFRegressor.predict``): 8x
        the CNN time for more accurate parameters (benchmarks/RESULTS.md).
    saturation : float, None or False
        Pixel value at which the camera saturates (a 12-bit camera in 16-bit files: 4095). Default:
        the largest count of an integer image's dtype, or of its ``significant_bits`` attribute
        (:func:`lsfov.open_image` reads it from an OME-TIFF); none for a floating-point image, or
        with ``False``.
        Compared in float32: for 32- and 64-bit integers, values within a relative 2⁻²⁴ of it
        count too.
    max_saturated : float
        Paper 000's white-pixel ratio: a node whose patch has more than this fraction of its pixels
        at or above ``saturation`` is invalid (validity 0, then filled like the others), as clipped
        cores read as wider PSFs. 1 turns the rule off (an image stretched to its type's range: the
        map's ``saturation`` attribute is then None, unless ``saturation`` gives a level).
        Default 0.05 (:data:`MAX_SATURATED`, the best maps of clipped images); None gives it too.
    fill : bool
        Replace the parameters of invalid nodes (validity < 0.5) by inverse-distance weighting of the
        valid ones (:func:`fill_invalid`). Without it invalid nodes keep the CNN's readings, and
        :func:`operator_from_psf_map` needs them filled first.
    scratch : str or Path, optional
        Dask input only: a directory (on storage every worker sees) where each chunk's nodes are
        kept as soon as they are regressed.
    resume : bool
        With ``scratch``: continue an interrupted run of the same image, model and parameters; the
        chunks already done are read back, not regressed again. Without it, a kept state is discarded.
    progress : bool
        Progress bar (Dask input).

    Returns
    -------
    xarray.Dataset
        One variable per model parameter (with ``units``) and ``validity``, dims ``(gy, gx)``, node
        centres as coordinates (µm or pixels, said by their ``units``) in the image's own frame (an
        xarray image whose coordinates start at ``x0`` puts its first node at ``x0`` plus the first
        patch's centre; attribute ``origin``). With ``fill=True`` only, a boolean ``filled``
        marks the nodes that were filled. A model with focus and astigmatism (Z3) adds
        ``focus_astig_sin`` and ``focus_astig_cos`` (its regressed focus x astigmatism products,
        which depth reads). Attributes record the model, patch, stride, pixel size, image shape
        and saturation rule.

    Raises
    ------
    NothingToMap
        A ``ValueError``: with ``fill=True``, when every node is invalid (too many saturated
        pixels, or no texture the CNN can read), as there is nothing to fill from.
    TypeError
        If ``image`` is an ``xarray.Dataset`` or not of a real numeric dtype; if ``saturation`` is
        True or not a number; if ``max_saturated`` or ``pixel_um`` is not a number, or ``scratch``
        not a path; if ``model`` is not a name, a path or a loaded model.
    ValueError
        For a masked array with masked pixels, an image that is not 2-D (or, as xarray, names only
        one of ``y`` and ``x``), of unknown Dask chunk sizes, smaller than one patch, or with NaN or
        Inf pixels (or values whose readings overflow); for a ``patch`` other than the model's,
        a ``stride`` or ``batch_size`` that is not a positive integer, ``max_saturated`` outside
        [0, 1], ``saturation`` or ``pixel_um`` <= 0, ``resume`` without ``scratch`` or a ``scratch``
        that is a file, a ``device`` other than a loaded model's, or a model that :func:`lsfov.load_model`
        refuses (an unknown name, a file that is not a model, or one replaced while the map runs).
    FileNotFoundError
        If ``model`` names a file that does not exist.
    MemoryError
        For Dask input on a distributed cluster whose workers leave too little memory for the CNN's tasks.

    Examples
    --------
    >>> import lsfov
    >>> from lsfov import simulate
    >>> sample = simulate.tilted_surface((512, 512), depth_range_um=(-6, 6), seed=0)
    >>> psf_map = lsfov.estimate_psf_map(sample.image, "Z3", stride=64, pixel_um=0.2)
    >>> dict(psf_map.sizes), list(psf_map.data_vars)
    ({'gy': 7, 'gx': 7}, ['focus', 'astigmatism', 'axis', 'focus_astig_sin', 'focus_astig_cos', 'validity', 'filled'])
    >>> psf_map["gx"].values[:3], psf_map["gx"].attrs["units"]  # node centres in µm
    (array([12.7, 25.5, 38.3]), 'micrometer')
    >>> bool((psf_map["validity"] > 0.5).all()), psf_map["focus"].attrs["units"]
    (True, 'wave RMS')
    """
    import dask
    import dask.array as da
    import xarray as xr

    from ..cluster import compute

    ref, m = _model_ref(model)
    if device is not None:  # refused here, not in the first task; a loaded model runs where it is
        from .model import torch_device

        dev = torch_device(device)
        if ref is m and (dev.type != m.device.type or dev.type == "cuda" and dev.index not in (None, m.device.index)):
            raise ValueError(f"device {device!r}: the model given is loaded on {m.device}; give its name or file "
                             "to load it there, or leave device out")
    if positive_int(patch, "patch") != m.patch:
        raise ValueError(f"patch={patch} but the model reads {m.patch}x{m.patch} patches; use patch={m.patch}")
    patch = m.patch
    stride = check_stride(stride)
    batch_size = positive_int(batch_size, "batch_size")
    symmetrize, fill, progress = (boolean(v, n) for v, n in ((symmetrize, "symmetrize"), (fill, "fill"),
                                                             (progress, "progress")))
    max_saturated = MAX_SATURATED if max_saturated is None else \
        real_number(max_saturated, "max_saturated", minimum=0, maximum=1)
    image = squeeze_plane(image)  # a (1, H, W) plane, as NumPy, Dask or xarray
    xr_in = getattr(image, "dims", None) is not None
    if xr_in:
        image = yx_order(image)  # dims by name: an (x, y) image is not mapped transposed
    data = image.data if xr_in else image
    if not hasattr(data, "dtype"):
        data = np.asarray(data)  # a nested list
    if data.dtype.kind not in "biuf":
        raise TypeError(f"image must be a real numeric array, got dtype {data.dtype}")
    level = censor_level(image if xr_in else data, saturation)
    if max_saturated >= 1 and saturation is None:
        level = None  # an image stretched to its type's range: no camera level to pass on
    rule = level if max_saturated < 1 else None  # the rule off: no pass over the pixels for it
    if pixel_um is None and xr_in:
        pixel_um = pixel_size(image)  # its attribute, or µm coordinates
    if pixel_um is not None:
        pixel_um = real_number(pixel_um, "pixel_um", minimum=0, exclusive=True)
    # the image's first pixel, in the map's units: a crop's map lies on the crop
    origin = image_origin(image, pixel_um) if xr_in else (0.0, 0.0)
    if getattr(data, "ndim", np.ndim(data)) != 2:
        raise ValueError(f"image must be 2-D (y, x), got shape {np.shape(data)}; select a plane first")
    scratch_dir(scratch, resume)
    if scratch is not None and not isinstance(data, da.Array):
        warnings.warn("scratch= and resume= act on Dask input; this in-memory image is mapped whole (chunk it with "
                      "dask.array.from_array(image, chunks=...) to use them)", LsfovWarning, stacklevel=user_stacklevel())
    known_shape(data.shape)
    h, w = data.shape
    if h < patch or w < patch:
        raise ValueError(f"image {h}x{w} is smaller than one {patch}x{patch} patch; the CNN needs at least that")
    if pixel_um and m.optics is not None and abs(float(pixel_um) / m.optics.pixel_um - 1) > 0.1:
        named = m.psf_model.name if ref is m else Path(str(model)).name  # a shipped name, or the file
        warnings.warn(f"image pixels are {float(pixel_um):g} µm but model {named} was trained at "
                      f"{m.optics.pixel_um:g} µm: its parameters will be off; resample the image or train a model "
                      "for these optics (or, if the image's size is wrong, give it: pixel_um= / --pixel-um)",
                      LsfovWarning, stacklevel=2)
    gy, gx = _node_count(h, patch, stride), _node_count(w, patch, stride)
    n_out = len(_variables(m)) + 2  # the variables, validity, the saturated fraction
    if isinstance(data, da.Array):
        from ..cluster import _active_client, worker_budgets
        from ..restore.halo import axis_chunks

        client = _active_client()
        if client is not None:  # a worker too small to hold PyTorch, the model and its tasks would be paused, not used
            budgets, fraction = worker_budgets(client, _CNN_WORKER_OWN)
            short = [(free, threads) for free, threads in budgets if free < threads * _CNN_TASK]
            if short:
                free, threads = short[0]
                raise MemoryError(f"the Dask workers leave {free / 2**20:.0f} MiB for {threads} CNN task(s) of about "
                                  f"{_CNN_TASK / 2**20:.0f} MiB each (their memory limit up to Dask's pause at "
                                  f"{fraction:.0%}, less PyTorch and the model); give each worker at least "
                                  f"{(_CNN_WORKER_OWN + threads * _CNN_TASK) / fraction / 2**30:.2g} GiB, or fewer "
                                  "threads")

        # Chunks of at least one patch (the overlap reads `patch` pixels of each neighbour).
        arr = data.astype(np.float32)
        # One read first (of a float image: integers have no NaN), as the deconvolution's: a NaN in the
        # last chunk would otherwise stop the map after all the others' work, and a --resume meet it again.
        # A resumable run's state is named by the image's bytes, read in the same pass: Dask's name
        # for it is another in each process where its source has no stable one (a TIFF's zarr view).
        reads = ([da.isfinite(arr).all()] if data.dtype.kind == "f" else []) + \
            ([block_digests(data)] if scratch is not None else [])
        read = list(compute(reads)) if reads else []
        if data.dtype.kind == "f" and not bool(read.pop(0)):
            raise non_finite("image")
        digests = read.pop(0) if scratch is not None else None
        arr = arr.rechunk(tuple(axis_chunks(n, max(max(c), patch), patch) for n, c in zip(arr.shape, arr.chunks)))
        (sy, cy), (sx, cx) = (_chunk_nodes(c, g, stride) for c, g in zip(arr.chunks, (gy, gx)))
        offsets = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in arr.chunks]
        ext = da.overlap.overlap(arr, depth={0: patch, 1: patch}, boundary="none", allow_rechunk=False)
        keep = None
        if scratch is not None:
            # The image (its blocks' bytes and chunks), the model and every parameter; each chunk's file
            # also carries a digest of its pixels (see _chunk_task).
            # (The weights' digest too: a model fine-tuned and saved keeps its metadata, creation time included.)
            key = dask.base.tokenize(digests.tobytes(), data.chunks, str(data.dtype),
                                     json.dumps(m.meta, sort_keys=True, default=str), m.weights_digest(),
                                     patch, stride, batch_size, bool(symmetrize), rule)
            keep = Path(scratch).resolve() / f"lsfov-psfmap-{key[:16]}"  # workers may run elsewhere
            if keep.exists() and not resume:
                shutil.rmtree(keep)
            elif resume:
                from ..restore.scratch import warn_other_runs

                warn_other_runs(keep)
            keep.mkdir(parents=True, exist_ok=True)
            if resume:
                log.info("resuming the PSF map from %s: %d chunks already done", keep, len(list(keep.glob("*.npy"))))
        from ..cluster import shared

        fn = functools.partial(_chunk_task, patch=patch, stride=stride, n_out=n_out, offsets=offsets,
                               starts=(sy, sx), counts=(cy, cx), batch_size=batch_size, device=device,
                               symmetrize=bool(symmetrize), saturation=rule, keep=keep)
        # A loaded model is one key of the graph, sent once to each worker; a file is read there.
        ref = ref if ref is not m else shared(m, f"lsfov-model-{m.weights_digest()}-{dask.base.tokenize(m.meta)}-"
                                                 f"{m.device}")
        out = da.map_blocks(fn, ext, dtype=np.float32, new_axis=2, meta=np.empty((0, 0, 0), np.float32),
                            chunks=(tuple(int(c) for c in cy), tuple(int(c) for c in cx), (n_out,)), ref=ref)
        values = compute(out, progress=progress, label="PSF map")
    else:
        xp = array_module(data)  # a CuPy image stays on the GPU
        arr = xp.asarray(data, dtype=xp.float32)
        if not bool(xp.isfinite(arr).all()):
            raise non_finite("image")
        values = _regress(arr, ref, patch=patch, stride=stride, n_out=n_out, origin=((0, gy), (0, gx)),
                          batch_size=batch_size, device=device, symmetrize=bool(symmetrize), saturation=rule)
    if not np.all(np.isfinite(values)):  # finite pixels, yet: values beyond float32 once normalised
        raise ValueError("the CNN's readings are not finite; check the image's values (overflowing counts?)")
    coords = _coords(patch, int(stride), gy, gx, float(pixel_um) if pixel_um else None, origin)
    if xr_in:  # which plane of a larger array it maps, as xarray keeps it (``.sel(c=561)``: c); on a
        # copy: the cached grid is shared by every map of it, a plane's label is this map's alone
        coords = coords.copy()
        coords.update({k: v.variable for k, v in image.coords.items() if v.ndim == 0 and k not in coords})
    pm = m.psf_model
    record = pm.to_meta()
    del record["units"]  # a map gives them per variable
    names = _variables(m)
    arrays = {p: values[..., i] for i, p in enumerate(names)}
    validity = values[..., -2]
    white = values[..., -1] > max_saturated
    if white.any():
        validity = np.where(white, np.float32(0), validity)
        # (Not named ``origin``: that is the image's first pixel, recorded with the map below.)
        source = level_origin(image, saturation, level) if xr_in else ""
        at = fmt_level(level) + (f", {source}" if source else "")
        share = f"more than {max_saturated * 100:g} % of the pixels of its patch saturated (at or above {at})"
        advice = ("acquire with a shorter exposure or a lower gain; if the camera saturates elsewhere than "
                  f"{fmt_level(level)}, give its level (saturation=, --saturation); for an image stretched to its "
                  "type's range, max_saturated=1 (--max-saturated 1) turns this off")
        if fill and white.all():
            raise NothingToMap(f"every PSF-map node has {share}: clipped spots do not show the PSF; {advice}")
        if fill and not (validity >= 0.5).any():
            raise NothingToMap(f"every PSF-map node is invalid: {int(white.sum())} of {white.size} with {share}, the "
                               f"others without texture the CNN can read; {advice}")
        warnings.warn(f"{int(white.sum())} of {white.size} PSF-map nodes are marked invalid, each with {share}"
                      + (", filled from their neighbours" if fill else "") + f"; {advice}", LsfovWarning, stacklevel=2)
    filled = None
    if fill:  # on the NumPy arrays, then one Dataset: each xarray assignment costs a merge (~0.5 ms)
        filled = validity < 0.5
        arrays = _fill(arrays, ~filled, model=pm)
    data_vars = {}
    for p in names:
        if p in m.params:
            attrs = {"units": pm.units.get(p, "")}
        else:
            trig = p.rsplit("_", 1)[1]
            attrs = {"units": "wave RMS^2",
                     "long_name": f"focus x astigmatism x {trig} 2 axis, as regressed (sign-free; for depth)"}
        data_vars[p] = (("gy", "gx"), arrays[p], attrs)
    data_vars["validity"] = (("gy", "gx"), validity, {"units": "1", "long_name": "probability the patch is valid"})
    if filled is not None:
        data_vars["filled"] = (("gy", "gx"), filled, _FILLED_ATTRS)
    # Which image and plane it maps, as open_image recorded them (a time point's map says which).
    made = {}
    if xr_in:
        made = {**({"source": image.attrs["source"]} if image.attrs.get("source") else {}), **plane_of(image)}
    return xr.Dataset(data_vars, coords=coords, attrs={
        **made, **record, "patch": patch, **made_attrs(model, stride, pixel_um, symmetrize, m),
        "image_shape": [int(h), int(w)], "origin": list(origin),
        "saturation": level, "max_saturated": max_saturated,
    })


def check_stride(stride) -> int:
    """A map's node spacing: a positive whole number of pixels."""
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer number of pixels, got {stride!r}")
    return int(stride)


def made_attrs(model, stride, pixel_um, symmetrize, loaded=None) -> dict:
    """How a map of ``model`` (name, file or PSFRegressor; ``loaded``: the one a map ran) is made, as
    the map records it: what a depth calibration, which holds for maps made alike, compares."""
    from .model import PSFRegressor, load_model

    m = loaded or (model if isinstance(model, PSFRegressor) else load_model(model))
    return {"model": "PSFRegressor" if isinstance(model, PSFRegressor) else str(model), "model_digest": m.weights_digest(),
            "stride": check_stride(stride), "pixel_um": float(pixel_um) if pixel_um else None,
            "symmetrize": int(bool(symmetrize))}


@functools.lru_cache(maxsize=32)
def _coords(patch: int, stride: int, gy: int, gx: int, pixel_um, origin=(0.0, 0.0)):
    """A map's node coordinates with their indexes, made once per grid (a Dataset built on ready
    indexes costs a third less: on a GPU, building the Dataset is a good part of a small map).
    ``origin``: the image's first pixel in the same units, so that the map lies on the image."""
    import xarray as xr

    from ..io import grid_values

    scale, unit = (pixel_um, "micrometer") if pixel_um else (1.0, "pixel")
    variables = {}
    for d, c, o in zip(("gy", "gx"), node_centres(patch, stride, (gy, gx)), origin):
        # (made as a store's are read back: equal to the bit)
        c = grid_values((c[0] if c.size else 0.0) * scale + o, stride * scale, c.size)
        c.flags.writeable = False  # shared by the maps of this grid
        variables[d] = xr.Variable(d, c, attrs={"units": unit, "step": stride * scale})  # step: for a 1-node axis
    return xr.Coordinates(variables)


_FILLED_ATTRS = {"long_name": "parameters filled from valid neighbours"}


class NothingToMap(ValueError):
    """Every node of a PSF map is invalid: the image holds no texture the CNN can read."""


def fill_invalid(psf_map, threshold: float = 0.5, power: float = 2.0, neighbours: int = 8):
    """Fill the parameters of nodes with validity below ``threshold`` from the valid ones.

    Inverse-distance weighting over the ``neighbours`` nearest valid nodes, weights ``1/d**power``; an
    astigmatic model's focus, astigmatism and axis are averaged as one vector known up to its sign
    (the same PSF on either side of focus), each neighbour's sign the one along the principal axis of
    their weighted ``v vᵀ``. Adds a boolean ``filled``
    variable. Paper 000 Sec. II-F takes the four nearest with weights 1/d (``neighbours=4, power=1``);
    the defaults also take the diagonal ring (at half the weight of the four-connected nodes, as
    Shepard's 1/d²), so that a node on the edge of an invalid region is filled from more than one side.

    Parameters
    ----------
    psf_map : xarray.Dataset
        A PSF map with a ``validity`` variable (:func:`estimate_psf_map` with ``fill=False``).
    threshold : float
        Validity in [0, 1] below which a node is filled.
    power : float
        Exponent (>= 0) of the inverse-distance weights.
    neighbours : int
        Valid nodes each filled node is taken from.

    Returns
    -------
    xarray.Dataset
        The map with its invalid nodes' parameters filled and a boolean ``filled`` variable.

    Raises
    ------
    NothingToMap
        A ``ValueError``: when no node is valid (none at or above ``threshold``).
    ValueError
        If ``psf_map`` has no ``validity`` variable or is a stack of planes (dims besides gy, gx),
        ``threshold`` is outside [0, 1], ``power`` < 0 or ``neighbours`` is not a positive integer.
    TypeError
        If ``threshold`` or ``power`` is not a number.
    """
    from .._validate import positive_int, real_number
    from .model import PRODUCTS

    if "validity" not in getattr(psf_map, "data_vars", ()):
        raise ValueError("fill_invalid takes a PSF map with a 'validity' variable (lsfov.estimate_psf_map)")
    one_plane(psf_map, "fill_invalid")
    given, psf_map = psf_map["validity"].dims, psf_map.transpose(..., "gy", "gx")  # (filled as (gy, gx))
    threshold = real_number(threshold, "threshold", minimum=0, maximum=1)
    power = real_number(power, "power", minimum=0)
    neighbours = positive_int(neighbours, "neighbours")
    valid = psf_map["validity"].values >= threshold
    names = [*psf_map.attrs.get("params", []), *(q for q in PRODUCTS if q in psf_map)]
    try:
        model = _psf.get_model(psf_map.attrs.get("psf_model", "Z3"))
    except ValueError:  # a map of no known model: its axis (if any) as Z3's
        model = _psf.MODELS["Z3"]
    arrays = _fill({p: psf_map[p].values for p in names}, valid, power, neighbours, model=model)
    return psf_map.assign({**{p: (("gy", "gx"), arrays[p], psf_map[p].attrs) for p in names},
                           "filled": (("gy", "gx"), ~valid, _FILLED_ATTRS)}).transpose(..., *given)


def _periods(model, names) -> dict:
    """{name: period} of a map's angular variables (the model's, :meth:`PSFModel.period`)."""
    return {p: model.period(p) for p in names if p in model.params and model.period(p)}


def _fill(arrays, valid, power: float = 2.0, neighbours: int = 8, *, model):
    """:func:`fill_invalid` on NumPy arrays (gy, gx) by name, ``valid`` their mask: new float32 arrays.

    An astigmatic model's parameters are averaged as one vector ``v`` (focus, astigmatism · (sin,
    cos) 2 axis), known up to its sign ((f, c, θ) and (−f, c, θ + π/2) are one PSF): each neighbour's
    sign is the one along the principal axis of their weighted ``v vᵀ``, as orientations are
    averaged. Averaged apart, two nodes with their astigmatism at right angles (the two sides of
    focus) gave the full defocus and astigmatism along an axis at random; now the astigmatic focus
    between them, or a round defocus where the defocus dominates. Other angles are averaged on
    their circle."""
    from scipy.spatial import cKDTree

    from .model import _astigmatic, aberrations, decode, outer_targets

    if valid.all():
        return {p: np.asarray(v, np.float32) for p, v in arrays.items()}
    if not valid.any():
        raise NothingToMap("every node of the PSF map is invalid (no texture the CNN can read: a dark, flat or "
                           "empty image, or a model of your own that calls everything invalid: check it with "
                           "`lsfov evaluate`); there is no PSF to estimate here")
    good, bad = np.argwhere(valid).astype(np.float64), np.argwhere(~valid).astype(np.float64)
    k = min(neighbours, len(good))
    dist, idx = cKDTree(good).query(bad, k=k)
    dist, idx = dist.reshape(len(bad), k), idx.reshape(len(bad), k)
    wgt = 1.0 / np.maximum(dist, 1e-9) ** power
    wgt /= wgt.sum(axis=1, keepdims=True)
    est = {}
    if _astigmatic(model) and set(model.params) <= set(arrays):
        v = aberrations(model, np.stack([np.asarray(arrays[p], np.float64)[valid] for p in model.params], axis=1))[idx]
        known = np.isfinite(v).all(axis=-1)  # (a NaN neighbour, in a map made otherwise, leaves its nodes NaN)
        v = np.where(known[..., None], v, 0.0)
        axis = np.linalg.eigh(np.einsum("bk,bki,bkj->bij", wgt, v, v))[1][:, :, -1]  # (b, d): the principal one
        sign = np.where(np.einsum("bki,bi->bk", v, axis) < 0, -1.0, 1.0)
        targets = outer_targets(np.einsum("bk,bki->bi", wgt * sign, v))
        targets[~known.all(axis=1)] = np.nan
        # (the products, focus x astigmatism x (sin, cos) 2 axis, are not rebuilt from these: the network
        # regresses them itself, on another scale than the product of its decoded parameters, and a depth
        # calibration reads them; a sign flip of v leaves them as they are, so their weighted mean is theirs)
        est = dict(zip(model.params, decode(model, targets).T))
    periods = _periods(model, list(arrays))
    out = {}
    for p, v in arrays.items():
        v = np.asarray(v, np.float64).copy()
        src = v[valid]
        if p in est:
            v[~valid] = est[p]
        elif periods.get(p):  # an angle: the weighted mean on its circle
            k = 2 * np.pi / periods[p]
            z = np.exp(1j * k * src)[idx]
            v[~valid] = np.mod(np.angle((wgt * z).sum(axis=1)) / k, periods[p])
        else:
            v[~valid] = (wgt * src[idx]).sum(axis=1)
        out[p] = v.astype(np.float32)
    return out


def operator_from_psf_map(psf_map, shape=None, *, size: int | None = None, store=None) -> ProductConvolution:
    """The grid operator of a PSF map: each node's PSF rendered with the model, bilinear in between.

    Parameters
    ----------
    psf_map : xarray.Dataset
        From :func:`estimate_psf_map` (or one with the same variables and attributes), its invalid
        nodes filled. Nodes are placed at their coordinates, so a map cropped or thinned with
        ``isel``/``sel`` still lies on its image.
    shape : (int, int), optional
        Image shape (H, W), for a map without the ``image_shape`` attribute (one made otherwise);
        a map of :func:`estimate_psf_map` records its image's shape, and any other shape given for
        it is refused: its nodes belong to that image.
    size : int, optional
        Kernel size, a positive odd integer at most the image's smaller side (default: the model's).
    store : str or Path, optional
        A zarr array to render the kernels into, about 64 MiB of them at a time, and to keep them in:
        the operator reads each window's nodes from it, and memory holds no more than those (a
        32768² slide's map at a node every 64 px renders 0.93 GiB of 31² kernels). The kernels of
        this very map, rendered there to the end, are read again (a resumed run's); other kernels
        lsfov rendered there are replaced; anything else is refused. Default: in memory.

    Returns
    -------
    ProductConvolution
        Grid form, one kernel (size, size) per node, rendered from the node's parameters by the
        map's PSF model (:meth:`lsfov.psf.PSFModel.render`, with the map's recorded optics and
        ranges); ``attrs`` record the source, the PSF model and, if known, ``pixel_um``.

    Raises
    ------
    TypeError
        If ``psf_map`` is not an ``xarray.Dataset``, or ``store`` not a path.
    ValueError
        If the map lacks the ``psf_model`` or ``params`` attribute or a parameter variable, is a
        stack of planes, has no nodes or NaN parameters (unfilled nodes: :func:`fill_invalid`), or
        names no known model;
        if no shape is known, ``shape`` differs from the mapped image's, or ``size`` is not a
        positive odd integer at most the image's smaller side.
    FileExistsError
        If ``store`` holds something other than kernels lsfov rendered (a file, a folder with files).

    Examples
    --------
    The operator of a PSF map undoes the blur it measured (blind deconvolution):

    >>> import lsfov
    >>> from lsfov import simulate
    >>> sample = simulate.tilted_surface((512, 512), depth_range_um=(-6, 6), seed=0)
    >>> psf_map = lsfov.estimate_psf_map(sample.image, "Z3", stride=64)
    >>> H = lsfov.operator_from_psf_map(psf_map)
    >>> H
    ProductConvolution(grid, shape=(512, 512), grid=(7, 7), K=31)
    >>> H.psf_at(256, 256).shape, round(float(H.psf_at(256, 256).sum()), 3)
    ((31, 31), 1.0)
    >>> deblurred = lsfov.deconvolve(sample.image, H, iterations=10)
    >>> deblurred.shape, deblurred.dtype
    ((512, 512), dtype('float32'))
    """
    import xarray as xr

    if not isinstance(psf_map, xr.Dataset):
        raise TypeError(f"psf_map must be the xarray.Dataset of lsfov.estimate_psf_map, got {type(psf_map).__name__}")
    for key in ("psf_model", "params"):
        if key not in psf_map.attrs:
            raise ValueError(f"psf_map lacks the attribute {key!r}; make it with lsfov.estimate_psf_map (xr.Dataset(...) "
                             "and merge drop a map's attributes: keep them, e.g. ds.attrs.update(psf_map.attrs))")
    missing = [p for p in psf_map.attrs["params"] if p not in psf_map]
    if missing:
        raise ValueError(f"psf_map lacks the variables {missing}; make it with lsfov.estimate_psf_map")
    one_plane(psf_map, "operator_from_psf_map")
    psf_map = node_order(psf_map)
    m = _psf.PSFModel.from_meta(psf_map.attrs)
    mapped = psf_map.attrs.get("image_shape")
    shape = shape2d(shape, "shape") if shape is not None else tuple(mapped or ())
    if len(shape) != 2:
        raise ValueError("give the image shape: shape=(H, W)")
    if mapped and tuple(shape) != tuple(mapped):  # (before the size, which follows the shape)
        raise ValueError(f"the PSF map was made on an image of shape {tuple(mapped)}, not {tuple(shape)}; "
                         "map this image (lsfov.estimate_psf_map, lsfov estimate)")
    size = m.size if size is None else positive_int(size, "size")
    if size % 2 == 0 or size > min(shape):  # (said before rendering every node's PSF at that size)
        raise ValueError(f"size must be odd (centre at size // 2) and at most the image's {min(shape)} px, got {size}")
    params = np.stack([psf_map[p].values for p in psf_map.attrs["params"]], axis=-1).astype(np.float64)
    if params.size == 0:
        raise ValueError("the PSF map has no nodes")
    if not np.all(np.isfinite(params)):
        raise ValueError("the PSF map has NaN parameters; fill invalid nodes first (fill_invalid)")
    gy, gx = params.shape[:2]
    centres = map_node_pixels(psf_map)
    attrs = {"source": "lsfov.operator_from_psf_map", "psf_model": m.name}
    if psf_map.attrs.get("pixel_um"):
        attrs["pixel_um"] = float(psf_map.attrs["pixel_um"])  # the pixels its PSFs are drawn in
    if store is None:
        kernels = m.render(params.reshape(-1, m.n_params), size=size).reshape(gy, gx, size, size)
    else:
        kernels = _rendered_to(store, m, params, size)
    return ProductConvolution.from_grid(kernels, shape, centers=centres, attrs=attrs)


def _rendered_to(store, m, params, size: int):
    """The kernels of ``params`` (gy, gx, N) rendered by ``m`` into the zarr array ``store``, about
    64 MiB at a time; an array there that holds these very kernels, whole, is taken as it is."""
    import dask.base
    import zarr

    from .. import operators

    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a path (str or Path) for the kernels' zarr array, got {type(store).__name__}")
    store = Path(store).resolve()  # (absolute: workers may start in another directory)
    made = dask.base.tokenize(m, params, size)
    if store.exists():
        try:
            ours = zarr.open_array(str(store), mode="r").attrs.get("lsfov_kernels")
        except Exception:  # (a file, a folder, a group: zarr says so in errors of several kinds)
            ours = None
        if ours == made:
            return zarr.open_array(str(store), mode="r")
        if ours is None and not (store.is_dir() and not any(store.iterdir())):  # (only kernels lsfov made go)
            raise FileExistsError(f"store {store} exists and holds no kernels lsfov rendered; give a new path")
    gy, gx = params.shape[:2]
    z = operators.empty_kernels(store, (gy, gx, size, size))
    z.attrs["lsfov_kernels"] = "incomplete"  # (what another render may replace)
    # Parts of whole render batches (_psf._BATCH nodes, rows or not): the same bits as all at once.
    flat, batch = params.reshape(-1, m.n_params), _psf._BATCH
    step = max(batch, operators._SLAB_BYTES // (size * size * 4) // batch * batch)
    cut, said, row, left = 0, None, 0, np.zeros((0, size, size), np.float32)
    for i in range(0, len(flat), step):
        with warnings.catch_warnings(record=True) as seen:  # one warning for the whole grid, not one a part
            warnings.simplefilter("always", LsfovWarning)
            k = m.render(flat[i : i + step], size=size)
        cut += int(_psf.cut_off(k).sum())
        said = said or next((str(w.message) for w in seen if issubclass(w.category, LsfovWarning)), None)
        left = np.concatenate([left, k])
        n = len(left) // gx  # whole rows of nodes written, the rest kept for the next part
        z[row : row + n] = left[: n * gx].reshape(n, gx, size, size)
        row, left = row + n, left[n * gx :]
    if said:  # (render's words, with the grid's count)
        warnings.warn(f"{cut}{said[said.index(' '):]}", LsfovWarning, stacklevel=3)
    z.attrs["lsfov_kernels"] = made  # last: what marks them whole
    return zarr.open_array(str(store), mode="r")
