"""Input checks shared by the public functions: one-line messages that say what to do."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ._backend import array_module


class LsfovWarning(UserWarning):
    """Something in the input was fixed up (e.g. negative pixels clipped)."""


#: What to do about NaN or Inf pixels (lsfov reads no masks: every pixel is data).
REPLACE_NON_FINITE = "replace them first (inpaint them, e.g. skimage.restoration.inpaint_biharmonic, or fill them with the background)"


def readable_array(x, name: str = "image"):
    """Refuse a NumPy masked array with masked pixels (or a Dask array of them): its data under the
    mask would be read as pixels, a hot pixel masked out used all the same; and a torch tensor,
    whose dtype NumPy does not read (one on a GPU, or needing its gradient, cannot become NumPy)."""
    if type(x).__module__.partition(".")[0] == "torch":
        raise TypeError(f"{name} is a torch tensor; give a NumPy, CuPy, Dask or xarray array (tensor.cpu().numpy(), "
                        "or cupy.from_dlpack(tensor) to stay on the GPU)")
    masked = np.ma.isMaskedArray(x) and np.ma.is_masked(x)
    if masked or np.ma.isMaskedArray(getattr(x, "_meta", None)):
        n = int(np.ma.count_masked(x)) if masked else 0
        what = f"a masked array ({n} pixel{'s' * (n != 1)} masked)" if masked else "a Dask array of masked chunks"
        raise ValueError(f"{name} is {what}, and lsfov reads no masks; fill them (np.ma.filled with the background) "
                         "or inpaint them (skimage.restoration.inpaint_biharmonic) first")


def non_finite(name: str, original=None) -> ValueError:
    """The error for NaN or Inf pixels; values finite in ``original`` but beyond float32's range say so."""
    if original is not None and getattr(original, "dtype", None) is not None and original.dtype.kind == "f" \
            and original.dtype.itemsize > 4 and bool(np.isfinite(np.asarray(original)).all()):
        return beyond_float32(name, float(np.abs(original).max()))
    return ValueError(f"{name} contains NaN or Inf pixels; {REPLACE_NON_FINITE}")


def beyond_float32(name: str, peak: float) -> ValueError:
    """The error for finite values that float32, lsfov's working type, cannot hold (|x| up to ``peak``)."""
    return ValueError(f"{name} has values beyond float32's range (|x| up to {peak:.3g}); rescale it first")


def float32_blocks(data):
    """A Dask image as float32, lazily; values beyond float32's range become Inf without NumPy's
    overflow warning (the caller reads the input's own extremes and says so in one line)."""
    return data if data.dtype == np.float32 else data.map_blocks(_float32, dtype=np.float32)


def _float32(block):
    with np.errstate(over="ignore"):
        return block.astype(np.float32)


def as_image(x, name: str = "image", *, check_values: bool = True):
    """Validate a 2-D image and return it as float32 (NumPy or CuPy; other arrays go to NumPy).

    Integer and boolean images are converted; NaN/Inf are refused; small negative values (a camera
    offset) are clipped to zero with a warning.
    """
    if isinstance(x, (str, os.PathLike)):
        raise TypeError(f"{name} must be an array, got the file name {str(x)!r}; open it with lsfov.open_image")
    x = yx_last(x, name)  # an xarray (x, y) image is read as (y, x), not transposed; a masked array refused
    xp = array_module(x)
    if xp is np:
        x = np.asarray(x)
    original = x if xp is np else None
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if x.ndim != 2:
        squeezed = x.squeeze() if x.ndim > 2 else x
        if squeezed.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (y, x), got shape {x.shape}; pick a plane, channel or time point first"
            )
        x = squeezed
    with np.errstate(over="ignore"):  # (values beyond float32's range: said below)
        x = x.astype(xp.float32, copy=False)
    if check_values:
        if not bool(xp.isfinite(x).all()):
            raise non_finite(name, original)
        lo = float(x.min())
        if lo < 0:
            hi = float(x.max())
            if hi <= 0:
                raise ValueError(f"{name} has no positive pixel (max {hi:g}); is it background-subtracted twice?")
            warnings.warn(f"{name} has negative pixels (min {lo:g}); clipped to 0", LsfovWarning, stacklevel=3)
            x = xp.maximum(x, 0)
    return x


def shown(v) -> str:
    """``v`` as a message shows it, on one short line: an array by its shape, an object by its type,
    a long value cut (never a multi-line array dump or a memory address)."""
    if getattr(v, "ndim", 0) and hasattr(v, "shape"):
        return f"an array of shape {tuple(v.shape)}"
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item") and not isinstance(v, np.generic):
        return f"a 0-d array ({shown(v.item())})"
    if v is None or isinstance(v, (bool, int, float, str, bytes, np.generic, tuple, list, dict, os.PathLike)):
        text = repr(v).replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."
    kind = type(v).__name__
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def positive_int(v, name: str, *, minimum: int = 1) -> int:
    """An integer (not a bool, not a float) >= ``minimum``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {rule}, got {shown(v)}")
    return int(v)


def real_numbers(v, name: str, dtype=np.float64) -> np.ndarray:
    """``v`` (a number or an array of them) as ``dtype``, or a TypeError: strings, bools, complex and
    objects are refused, where ``np.asarray(v, float)`` would read "1.5" and True as numbers and drop
    an imaginary part."""
    try:
        a = np.asarray(v)  # (no dtype: a string stays a string)
    except (TypeError, ValueError):  # (ragged sequences)
        a = None
    if a is None or a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got {shown(v)}" + (f" of {a.dtype}" if a is not None and a.ndim
                                                                           else ""))
    return a.astype(dtype, copy=False)


def fits_in_memory(shape, copies: float, what: str):
    """Refuse, in one line, to make ``copies`` float32 arrays of ``shape`` where this machine has not
    the memory for them (NumPy's MemoryError names a number of GiB, not what to do)."""
    import psutil

    need = copies * 4 * float(np.prod(shape, dtype=np.float64))
    have = psutil.virtual_memory().available
    if need > have:
        raise ValueError(f"{what} of {shape[0]}x{shape[1]} px needs about {need / 2**30:.3g} GiB; this machine has "
                         f"{have / 2**30:.3g} GiB available: make a smaller one")


def positions_yx(positions, name: str = "positions") -> np.ndarray:
    """``positions`` as a float64 (P, 2) array of finite (y, x) pixels, P >= 1, or one line saying
    what they are instead (a (2, 3) array is not reshaped into three made-up pairs)."""
    try:
        pos = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (P, 2) array of (y, x) pixel positions, got {shown(positions)}") from None
    if pos.ndim != 2 or pos.shape[1] != 2 or not len(pos) or not np.isfinite(pos).all():
        raise ValueError(f"{name} must be a (P, 2) array of finite (y, x) pixel positions, P >= 1; got "
                         + (f"shape {pos.shape}" if np.isfinite(pos).all() else "NaN or Inf"))
    return pos


def real_2d(x, name: str):
    """``x`` checked to be a non-empty 2-D array of real numbers (bools and integers included), as it
    is: NumPy, CuPy or Dask (not computed); other arrays and lists become NumPy. Values are not read."""
    if isinstance(x, (str, bytes, os.PathLike)) or x is None:
        raise TypeError(f"{name} must be a 2-D array of real numbers, got {type(x).__name__}")
    not_a_dataset(x, name)
    readable_array(x, name)
    if not type(x).__module__.startswith(("dask", "cupy")):
        x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a 2-D array of real numbers, got dtype {x.dtype}")
    known_shape(x.shape, name)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (y, x), got shape {x.shape}")
    return x


def boolean(v, name: str) -> bool:
    """True or False (also NumPy's, and the integers 0 and 1): a string such as "no" is refused,
    where ``bool()`` would read it as True."""
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
        return bool(v)
    raise ValueError(f"{name} must be True or False, got {shown(v)}")


def rng(seed, name: str = "seed") -> np.random.Generator:
    """NumPy's generator of ``seed`` (an integer >= 0, a sequence of them, a SeedSequence or
    Generator, or None), with a message of ours, not NumPy's, for anything else."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= 0 (or None, or a numpy Generator), got {shown(seed)}") from None


def shape2d(shape, name: str = "shape") -> tuple[int, int]:
    """``(H, W)`` from an int or a pair of positive integers."""
    given = shape
    if np.isscalar(shape):
        shape = (shape, shape)
    try:
        h, w = (int(s) for s in shape)
        whole = all(float(s) == int(s) and not isinstance(s, (bool, np.bool_, str, bytes)) for s in shape)
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"{name} must be an int or a pair (H, W) of positive integers, got {shown(given)}")
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {shown(given)}")
    return h, w


def real_number(v, name: str, *, minimum: float | None = None, maximum: float | None = None,
                exclusive: bool = False) -> float:
    """A finite float within ``[minimum, maximum]`` (``(minimum, maximum]`` with ``exclusive``)."""
    if isinstance(v, (bool, np.bool_, str, bytes)) or not np.isscalar(v) and np.ndim(v) != 0:
        raise TypeError(f"{name} must be a number, got {shown(v)}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {shown(v)}") from None
    low_bad = minimum is not None and (f <= minimum if exclusive else f < minimum)
    if not np.isfinite(f) or low_bad or (maximum is not None and f > maximum):
        rules = ([] if minimum is None else [f"{'>' if exclusive else '>='} {minimum:g}"]) + \
                ([] if maximum is None else [f"<= {maximum:g}"])
        raise ValueError(f"{name} must be a finite number {' and '.join(rules)}".rstrip() + f", got {shown(v)}")
    return f


def saturation_level(image, saturation=None) -> float | None:
    """The pixel value at or above which a camera pixel of ``image`` is saturated: ``saturation``
    when given, else the largest count of its integer type, or of its ``significant_bits`` (an
    OME-TIFF's: a 12-bit camera in 16-bit pixels saturates at 4095); None (no rule) for a float
    image without one."""
    if saturation is not None:
        return real_number(saturation, "saturation", minimum=0, exclusive=True)
    dtype = np.dtype(image.dtype if hasattr(image, "dtype") else np.asarray(image).dtype)
    if dtype.kind not in "iu":
        return None
    bits = significant_bits(image)
    if bits is not None and 0 < bits < np.iinfo(dtype).bits:  # else: no statement of fewer bits
        return float(2**bits - 1)
    return float(np.iinfo(dtype).max)


def significant_bits(image) -> int | None:
    """An image's ``significant_bits`` attribute as an int, or None. Written by hand or read back from
    a netCDF or JSON file it may come as ``12.0``, ``np.int16(12)`` or ``"12"``: all the same 12 bits."""
    return as_bits(getattr(image, "attrs", {}).get("significant_bits"))


def as_bits(bits) -> int | None:
    """A ``significant_bits`` value as an int (see :func:`significant_bits`); None if it is no whole number."""
    if isinstance(bits, bytes):
        bits = bits.decode(errors="replace")
    if isinstance(bits, str):
        try:
            bits = float(bits)
        except ValueError:
            return None
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, float, np.integer, np.floating)):
        return None
    return int(bits) if float(bits).is_integer() and 0 < bits <= 64 else None  # pixels of at most 64 bits


def censor_level(image, saturation=None) -> float | None:
    """The level at or above which a restoration censors ``image``'s pixels: :func:`saturation_level`,
    or None for ``saturation=False`` (or input that is no array, which the caller then refuses)."""
    if isinstance(saturation, (bool, np.bool_)):
        if saturation:
            raise TypeError("saturation takes a level (a number), None (the camera's, from the image's type) or "
                            "False (no pixel clipped), got True")
        return None
    if isinstance(image, (str, bytes)) or not hasattr(image, "dtype"):
        return None
    try:
        return saturation_level(image, saturation)
    except TypeError:
        raise TypeError(f"saturation takes a level (a number), None (the camera's, from the image's type) or "
                        f"False (no pixel clipped), got {saturation!r}") from None


def level_origin(image, saturation, level) -> str:
    """Where a saturation level came from, for messages: the image's significant bits, or ''."""
    bits = significant_bits(image) if saturation is None else None
    return f"the image's {bits} significant bits" if bits and level == 2.0**bits - 1 else ""


def fmt_level(v) -> str:
    """A pixel level as typed back (65535, 4095.5; not 2.14748e+09)."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 2**63 else f"{v:g}"


def user_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn`` (called by the caller of this function) that names the
    first frame outside lsfov: the user's line, however deep lsfov's own calls go."""
    import sys

    frame, level = sys._getframe(1), 1  # stacklevel 1: the frame that calls warnings.warn
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "lsfov":
        frame, level = frame.f_back, level + 1
    return level


def not_a_bead_field(x, name: str):
    """Refuse a ``lsfov.simulate.BeadField`` (or a list of them), or a file name, where an image is meant."""
    if isinstance(x, (str, os.PathLike)):
        how = ("lsfov.io.open_planes (a stack's planes)" if name == "bead_images" else "lsfov.open_image")
        raise TypeError(f"{name} takes images, got the file name {str(x)!r}; open it with {how}")
    items = x if isinstance(x, (list, tuple)) else [x]
    if any(type(v).__name__ == "BeadField" and hasattr(v, "image") for v in items):
        fix = "[b.image for b in beads]" if items is x else "beads.image"
        raise TypeError(f"{name} takes images, got lsfov.simulate.BeadField; pass {fix}")


def scratch_dir(scratch, resume: bool = False):
    """Check ``scratch=`` (where a chunked run keeps its state): None, or a directory or a path to make
    one at; ``resume`` needs one."""
    resume = boolean(resume, "resume")
    if scratch is None:
        if resume:
            raise ValueError("resume=True needs scratch=, the directory of the interrupted run")
        return None
    if not isinstance(scratch, (str, os.PathLike)):
        raise TypeError(f"scratch must be a directory name (str or Path), got {type(scratch).__name__}")
    if not str(scratch).strip():  # ("" is the current folder to Path: the state left among the user's files)
        raise ValueError("scratch is empty; give a directory (made if missing) for the run's state")
    if os.path.exists(scratch) and not os.path.isdir(scratch):
        raise ValueError(f"scratch={str(scratch)!r} is a file; give a directory (made if missing) for the run's state")
    above = os.path.dirname(os.path.abspath(scratch))
    while not os.path.exists(above):  # the nearest folder that exists: a file there, and mkdir fails
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"scratch={str(scratch)!r} lies under the file {above}; give a directory (made if missing) "
                         "for the run's state")
    return scratch


def known_shape(shape, name: str = "image"):
    """Refuse the shape of a Dask array whose chunk sizes are unknown (NaN: after boolean indexing)."""
    if any(isinstance(n, float) and n != n for n in shape):
        raise ValueError(f"{name} is a Dask array of unknown chunk sizes (shape {tuple(shape)}); call its "
                         ".compute_chunk_sizes() first")


def not_a_dataset(image, name: str = "image"):
    """Refuse an xarray.Dataset (a result opened whole) where one image is meant, naming its variables."""
    if hasattr(image, "data_vars"):
        names = list(image.data_vars)
        raise TypeError(f"{name} is an xarray.Dataset of {len(names)} variable(s) ({', '.join(map(str, names))}); "
                        f"pass one of them, e.g. ds[{str(names[0]) if names else 'name'!r}]")


def squeeze_plane(image, name: str = "image"):
    """One plane with axes of length 1 beside it (a (1, H, W) stack, an xarray with c of size 1) as
    that plane, whatever the array: NumPy, Dask or xarray (which keeps them as scalar coordinates).
    Anything else as it is (a stack of several planes is refused later, by what needs one); a
    Dataset is refused (:func:`not_a_dataset`), as is a masked array with masked pixels."""
    not_a_dataset(image, name)
    readable_array(image, name)
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) <= 2:
        return image
    if hasattr(image, "dims"):
        ones = [d for d in image.dims if d not in ("y", "x") and image.sizes[d] == 1]
        return image.squeeze(ones) if image.ndim - len(ones) == 2 else image
    return image.reshape(shape[-2:]) if all(n == 1 for n in shape[:-2]) else image


def yx_last(image, name: str = "image"):
    """An xarray image or stack with ``y`` and ``x`` as its last dims, transposed by name (a plain
    array, or dims of other names, as it is): what functions that take arrays by position read.
    A masked array with masked pixels is refused."""
    not_a_dataset(image, name)
    readable_array(image, name)
    dims = getattr(image, "dims", None)
    if not isinstance(dims, tuple) or not ({"y", "x"} & set(dims)):
        return image
    if len(dims) == 2:
        return yx_order(image, name)
    if not {"y", "x"} <= set(dims):
        raise ValueError(f"{name} has dims {dims}: name them 'y' and 'x', or neither (read as rows, columns)")
    return image.transpose(..., "y", "x")


def yx_order(image, name: str = "image"):
    """A 2-D xarray image in (y, x) order: transposed by name when its dims are ``y`` and ``x`` in any
    order; other names are read by position (rows, columns); one of the two alone is refused."""
    not_a_dataset(image, name)
    dims = tuple(image.dims)
    if len(dims) != 2:
        raise ValueError(f"{name} must be 2-D (y, x), got dims {dims}; select a plane first")
    if set(dims) == {"y", "x"}:
        return image.transpose("y", "x")
    if "y" in dims or "x" in dims:
        raise ValueError(f"{name} has dims {dims}: name them 'y' and 'x', or neither (read as rows, columns)")
    return image


def check_pixel_size(made, image, what: str = "the operator was made for"):
    """Warn when ``made`` (an operator or subspace, its ``attrs["pixel_um"]``) is for other pixels than
    ``image``'s (xarray; :func:`lsfov.io.pixel_size`): PSFs are in pixels, so they would be the wrong
    size. Nothing to compare when either size is unknown."""
    if getattr(image, "dims", None) is None:
        return
    from .io import pixel_size

    ref = (getattr(made, "attrs", None) or {}).get("pixel_um")
    if not ref:  # PSFs in the image's own pixels (a measured PSF, an operator of its beads): nothing to compare
        return
    try:
        px = pixel_size(image)  # non-square pixels: refused with a message
    except ValueError:
        if "psf_file" in (getattr(made, "attrs", None) or {}):  # a measured PSF, in the image's own pixels
            return
        raise
    measured = (getattr(made, "attrs", None) or {}).get("psf_file")
    if measured:  # a PSF file with its own pixel size
        what = f"the PSF {Path(str(measured)).name} has"
    if px and abs(float(px) / float(ref) - 1) > 0.1:
        warnings.warn(f"the image's pixels are {float(px):g} µm but {what} {float(ref):g} µm pixels: unless one "
                      "of the two sizes is wrong (give the image's with pixel_um= / --pixel-um), its PSFs are the wrong "
                      "size here; resample the image or " + ("the PSF" if measured else "calibrate for these pixels"),
                      LsfovWarning, stacklevel=3)
