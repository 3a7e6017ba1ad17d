"""Total-variation regularised Richardson-Lucy deconvolution with any product-convolution operator.

One iteration (paper 000 Eq. 13, written with the exact operator and its adjoint)::

    x <- x * H^T(y / H x) / (H^T 1 * (1 - tv * div(grad x / |grad x|_eps)))

**Field extension** (paper 000 Sec. III-D). Light from just outside the field reaches the image, so
the unknown ``x`` lives on the image grown by the kernel radius ``r`` on every side and the model is
``y = crop(H x)``. ``H^T 1`` (the adjoint of the image indicator) is below one near the border and
normalises the update there; no circular wrap-around and no darkened or ringing borders. Pixels that
send (almost) no light into the image (``H^T 1`` below 1e-3 of the largest kernel sum) are set to zero.

**Intensity normalisation.** The gradient norm is smoothed relative to the local brightness,
``|grad x|_eps = sqrt(|grad x|^2 + (eps * (x + m))^2)`` with ``m`` the mean of ``y`` in ``x``'s units
(divided by the operator's gain on a flat image, :func:`flat_gain`): the penalty then treats dim and
bright structures alike and ``tv``, ``eps`` mean the same on 8-bit, 16-bit or photon-count images,
and with PSFs normalised or not. It also keeps the multiplicative iteration stable: with a fixed small
``eps`` the TV factor amplifies changes of ``x`` on bright, flat regions by ``~4 tv x / eps`` per
iteration, so that a 1e-6 change of the data changes the result by 1e-1 (tv=0.05) to 3e-1 (tv=0.1)
after 20 iterations (measured, see benchmarks/RESULTS.md) and no two runs (or chunkings) agree. The TV factor is multiplied by the
normaliser, which keeps the denominator positive for ``0 <= tv < 0.25`` (|div| <= 4 for unit
vectors with these finite differences).

**Flux.** With ``tv=0`` and no censored pixel every iteration keeps ``sum(H x) = sum(y)`` exactly (a
property of RL with this normaliser); the TV term changes it only slightly, censoring raises it by
what the prediction exceeds the censored pixels.

**Saturated pixels** (at or above the camera's level ``s``) are censored data: the true count is at
least ``s``, not ``s``. Their ratio is ``max(y / H x, 1)``, i.e. ``y`` is replaced by ``max(y, H x)``,
the EM step for a count known only to be ``>= s`` (in the large-count limit): the estimate is pushed
up where it predicts less than the clip, and left free above it, instead of being held at the clip
(which flattens the peak and rings around it). Without saturated pixels the iteration is unchanged.

**The camera's offset** (``background``: sCMOS and EMCCD cameras add ~100 counts to every pixel) is
subtracted and what falls below it (the dark pixels' noise) taken as 0, after the saturated pixels
are found in the camera's counts. Kept in the image, it holds the ratios of dark regions near 1; as
a known term of the model (``y ~ Poisson(H x + b)``) it slows the iteration where the sample is dim.
On stars and fluorescent cells both were further from the sharp image after 20 iterations than the
offset subtracted (benchmarks/RESULTS.md, section ``offset``; docs/notes.md).
"""
from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np

from .._backend import array_module, graph_runs, next_fast_len, parallel_map, row_bands, threads_for, to_numpy
from .._validate import (LsfovWarning, as_image, boolean, censor_level, check_pixel_size, fmt_level, known_shape,
                         level_origin, non_finite, positive_int, real_2d, real_number, scratch_dir, squeeze_plane,
                         user_stacklevel, yx_order)
from ..cluster import stop_point
from ..operators import ProductConvolution

__all__ = ["deconvolve", "tv_curvature", "DEFAULT_TV", "DEFAULT_EPS"]

log = logging.getLogger("lsfov")

#: Default TV weight: gains on every low-photon case of the sweep in benchmarks/RESULTS.md ("TV weight"),
#: loses at most 0.24 dB on bright point sources at 1000 photons.
DEFAULT_TV = 0.02
#: Default gradient-norm smoothing, relative to the local brightness x + mean(y).
DEFAULT_EPS = 0.3
_NORM_FLOOR = 1e-3  # H^T 1 below this fraction of the largest kernel sum: unobserved pixel
_RATIO_FLOOR = 1e-6  # H x is floored at this fraction of the mean intensity before dividing


def tv_curvature(x, eps):
    """``div(grad x / sqrt(|grad x|^2 + eps^2))``, the TV term of paper 000 Eq. 13.

    Forward differences for the gradient (zero across the last row/column, Neumann boundary) and
    the matching backward differences for the divergence, so that ``div = -grad^T``. The value at a
    pixel depends on ``x`` within one pixel of it.

    Parameters
    ----------
    x : ndarray (H, W)
        Image of real numbers (NumPy, CuPy, or Dask: computed block by block with a one-pixel halo,
        the same values as the whole array), computed in float32.
    eps : float or ndarray (H, W)
        Smoothing of the gradient norm, in the units of ``x`` (finite, > 0); an array gives it per pixel.

    Returns
    -------
    ndarray (H, W) float32
        The curvature, in [-4, 4]; of the array type of ``x`` (lazy for Dask input).

    Raises
    ------
    TypeError
        If ``x`` or ``eps`` is not of real numbers (or ``x`` is a file name or an ``xarray.Dataset``).
    ValueError
        If ``x`` is not a non-empty 2-D array, or a NumPy/CuPy ``x`` holds NaN or Inf; if ``eps`` is
        not finite and > 0 (everywhere, for an array) or an array not of ``x``'s shape.
    """
    x = real_2d(x, "x").astype(np.float32, copy=False)
    scalar = np.ndim(eps) == 0
    if scalar:
        eps = real_number(eps, "eps", minimum=0, exclusive=True)
    else:
        eps = real_2d(eps, "eps").astype(np.float32, copy=False)
        if eps.shape != x.shape:
            raise ValueError(f"eps must be a number or an array of the image's shape {x.shape}, got shape {eps.shape}")
        if not bool((eps > 0).all() & array_module(eps).isfinite(eps).all()):  # bool(): a Dask eps is read here
            raise ValueError("eps must be finite and > 0 at every pixel")
    if not type(x).__module__.startswith("dask"):
        xp = array_module(x)
        if not bool(xp.isfinite(x).all()):  # (its NaN would spread to the neighbours' curvature)
            raise non_finite("x")
        return _tv_curvature(x, eps if scalar else to_numpy(eps) if xp is np else xp.asarray(eps))
    import dask.array as da
    from dask.array.utils import meta_from_array

    # A value reads one pixel of the neighbours; beyond the image none is made up ("none"): the blocks
    # at its edges keep the whole array's Neumann boundary, so every value is the whole array's.
    args = (x,) if scalar else (x, da.asarray(eps).rechunk(x.chunks))
    fn = functools.partial(_tv_curvature, eps=eps) if scalar else _tv_curvature
    return da.map_overlap(fn, *args, depth=1, boundary="none", dtype=np.float32,
                          meta=meta_from_array(x, ndim=2, dtype=np.float32))


def _tv_curvature(x, eps):
    """:func:`tv_curvature` unchecked (TV-RL's hot loop): ``x`` float32, ``eps`` a number or an array."""
    gy, gx = _grad(x)
    norm = gy * gy
    norm += gx * gx
    if np.isscalar(eps):
        norm += np.float32(eps) ** 2
    else:
        norm += eps * eps
    array_module(x).sqrt(norm, out=norm)
    gy /= norm
    gx /= norm
    return _div(gy, gx, out=norm)


def _grad(x):
    """Forward differences, zero across the last row (y) and column (x)."""
    xp = array_module(x)
    gy = xp.empty_like(x)
    gx = xp.empty_like(x)
    xp.subtract(x[1:], x[:-1], out=gy[:-1])
    gy[-1] = 0
    xp.subtract(x[:, 1:], x[:, :-1], out=gx[:, :-1])
    gx[:, -1] = 0
    return gy, gx


def _div(py, px, out=None):
    """Backward differences, the negative adjoint of :func:`_grad` (``<grad x, p> = -<x, div p>``)."""
    div = array_module(py).zeros_like(py) if out is None else out
    div[...] = 0
    if py.shape[0] > 1:
        div[:-1] += py[:-1]
        div[1:] -= py[:-1]
    if px.shape[1] > 1:
        div[:, :-1] += px[:, :-1]
        div[:, 1:] -= px[:, :-1]
    return div


def _iterate(op: ProductConvolution, y, x, n: int, tv: float, eps: float, scale: float, norm, thr: float,
             progress=None, field=(slice(None), slice(None)), graph: bool = False, censored=None, gain: float = 1.0):
    """``n`` TV-RL iterations of ``x`` on ``op``'s window (``y``, ``x``, ``norm``: window arrays).

    ``x`` is updated in place and returned. Outside the image ``y`` is zero, so the ratio there is
    zero and the crop of the model needs no mask. ``field``: the part of the window that belongs to
    the extended field, where the TV term acts (with its Neumann boundary at the field's edge).
    The pixel-wise steps run on bands of rows, on several threads from the main thread
    (:func:`lsfov._backend.parallel_map`); every pixel's arithmetic is the same, so are the bits.
    ``graph``: on CuPy arrays, replay the iterations as a CUDA graph (:func:`lsfov._backend.graph_runs`).
    ``censored``: uint8 window array, 1 at saturated pixels (their ratio is at least 1), else 0.
    ``scale``: the image's mean; ``gain``: the operator's (:func:`flat_gain`), so that ``scale / gain``
    is that mean in ``x``'s units, which the TV term's local ``eps`` is relative to.
    """
    xp = array_module(y)
    floor = np.float32(_RATIO_FLOOR * scale)
    xscale = np.float32(scale / gain)
    inv = xp.where(norm > thr, 1.0 / xp.maximum(norm, thr), 0.0).astype(xp.float32)
    parts = threads_for(y)
    rows = row_bands(y.shape[0], parts)
    xf = x[field]
    frows = row_bands(xf.shape[0], parts)

    def run(fn, bands):
        for _ in parallel_map(fn, bands, like=y):
            pass

    def step():
        hx = op.apply(x, check=False)  # float32 arrays of the window: no scan per iteration

        def ratio(b):
            xp.maximum(hx[b], floor, out=hx[b])
            xp.divide(y[b], hx[b], out=hx[b])
            if censored is not None:  # max(y / Hx, 1): ratios are >= 0, so 0 elsewhere changes nothing
                xp.maximum(hx[b], censored[b], out=hx[b])

        run(ratio, rows)
        c = op.adjoint(hx, check=False)
        if tv:
            cf = c[field]

            def regularise(b):  # reads x only, writes c: no band waits for another
                lo, hi = max(b.start - 1, 0), min(b.stop + 1, xf.shape[0])  # the curvature reaches 1 px
                xb = xf[lo:hi]
                local_eps = xb + xscale
                local_eps *= np.float32(eps)
                den = _tv_curvature(xb, local_eps)[b.start - lo : b.stop - lo]
                den *= np.float32(-tv)
                den += np.float32(1.0)
                cf[b] /= den

            run(regularise, frows)

        def update(b):
            c[b] *= inv[b]
            x[b] *= c[b]
            # Kept >= 0 every iteration: signed (basis) kernels push x below zero, and so does FFT rounding
            # where the ratio is ~0 (a noise-free zero background), which H then amplifies ~20x per
            # iteration into overflow (NaN after 30 iterations when it was left to the end).
            xp.maximum(x[b], np.float32(0.0), out=x[b])

        run(update, rows)

    # On a GPU (graph=True) the iterations after the first replay one CUDA graph (launch-bound otherwise).
    for _ in graph_runs(step, n, like=y if graph else None):
        stop_point()
        if progress is not None:
            progress.update(1)
    return x


def _initial(norm, thr: float, scale: float, gain: float = 1.0):
    """A flat start at the image's mean in ``x``'s units (RL from any positive constant gives the same
    iterates, they cancel in y / Hx; the TV term's first step reads it)."""
    xp = array_module(norm)
    return xp.where(norm > thr, np.float32(scale / gain), np.float32(0.0)).astype(xp.float32)


def flat_gain(op: ProductConvolution) -> float:
    """The operator's gain on a flat image: the median sum of its local PSFs (1 when they are
    normalised). An image's mean divided by it is the mean of the sharp image that blurred to it."""
    # A grid's sums kept by the operator, not local_psfs()'s float64 copy (the PSF map of a 32768²
    # slide at stride 64 holds 1 GiB of kernels, which may stay on disk)
    sums = op.kernel_sums() if op.kind == "grid" else op.local_psfs().sum(axis=(-2, -1))
    gain = float(np.median(sums))
    return gain if gain > 0 and np.isfinite(gain) else 1.0


def _norm_threshold(op: ProductConvolution) -> float:
    sums = np.abs(op.kernel_sums())
    return float(_NORM_FLOOR * max(float(sums.max()), 1e-30))


def _check_range(scale: float, peak: float, eps: float, gain: float = 1.0):
    """The TV term squares gradients (up to the peak) and ``eps`` times the intensity in float32, in
    ``x``'s units (the image's over the operator's ``gain``): beyond these bounds that over- or
    underflows (NaN, or a TV term silently gone)."""
    if eps * scale / gain < 1e-15 or peak / gain > 1e15:
        raise ValueError(f"image intensities (mean {scale:.3g}, max {peak:.3g}) with eps={eps:g} are beyond what "
                         "float32 TV arithmetic can hold; rescale the image (e.g. to photons or to [0, 1])")


def _check_params(operator, iterations, tv, eps, exchange_every):
    if not isinstance(operator, ProductConvolution):
        hint = ("for a PSF map use lsfov.operator_from_psf_map(psf_map)" if hasattr(operator, "data_vars")
                else "for a single PSF use ProductConvolution.from_psf(psf, image.shape)")
        raise TypeError(f"operator must be an lsfov.ProductConvolution, got {type(operator).__name__}; {hint}")
    if operator.window != (0, 0) + operator.shape:
        raise ValueError("deconvolve() needs a full-image operator, not a restricted window")
    return check_settings(iterations, tv, eps, exchange_every)


def check_settings(iterations, tv, eps=DEFAULT_EPS, exchange_every=None):
    """``deconvolve``'s settings checked (and made numbers), e.g. before the work that makes its operator."""
    iterations = positive_int(iterations, "iterations")
    tv, eps = real_number(tv, "tv"), real_number(eps, "eps")  # (a string such as "0.01" refused, not read)
    if not 0.0 <= tv < 0.25:
        raise ValueError(f"tv must be in [0, 0.25), got {tv:g}: larger weights would make the update's denominator "
                         "negative (0 gives plain Richardson-Lucy)")
    if not 1e-4 <= eps <= 100:  # relative to the brightness: beyond these the TV term is off or a step
        raise ValueError(f"eps must be in [1e-4, 100] (relative to the local brightness; default {DEFAULT_EPS}), "
                         f"got {eps:g}")
    if exchange_every is not None:
        exchange_every = positive_int(exchange_every, "exchange_every")
    return iterations, tv, eps, exchange_every


def deconvolve(image, operator: ProductConvolution, iterations: int = 20, tv: float = DEFAULT_TV, *,
               eps: float = DEFAULT_EPS, saturation: float | bool | None = None, background: float = 0.0,
               exchange_every: int | None = None, scratch=None, resume: bool = False, progress: bool = False):
    """Deblur an image with TV-regularised Richardson-Lucy and a product-convolution operator.

    Parameters
    ----------
    image : ndarray, cupy array, dask array or xarray.DataArray (H, W)
        Blurred, non-negative image (photon counts or any linear intensity). Negative pixels (an
        offset subtracted twice) are clipped to zero with a warning.
    operator : ProductConvolution
        The blur, grid or basis form, built for images of shape (H, W). A single measured PSF is the
        one-node grid ``ProductConvolution.from_psf(psf, (H, W))``.
    iterations : int
        Richardson-Lucy iterations (default 20).
    tv : float
        Total-variation weight in [0, 0.25); 0 gives plain Richardson-Lucy. The default,
        :data:`DEFAULT_TV` = 0.02, helps on noisy extended structures and costs little on bright
        point sources (benchmarks/RESULTS.md).
    eps : float
        Smoothing of ``|grad x|`` in the TV term, relative to the local brightness (module notes),
        in [1e-4, 100]; default :data:`DEFAULT_EPS` = 0.3.
    saturation : float, None or False
        Pixel value at or above which the camera saturated; such pixels are censored: their true count
        is taken to be at least this, not this (module notes). Default: the largest count of an integer
        image's type, or of its ``significant_bits`` attribute (an OME-TIFF's); none for a float image.
        ``False``: no pixel is saturated (an image stretched to its type's range).
    background : float
        The camera's offset (its dark level: the mean of a frame taken with the shutter closed), in
        the image's units, >= 0: subtracted, and what falls below it taken as 0 (module notes). The
        saturation level stays in the camera's counts. Default 0: an image whose dark is 0 (photon
        counts, or an offset already subtracted).
    exchange_every : int, optional
        Dask input only: iterations between two halo exchanges (default: chosen by a cost model,
        :func:`lsfov.restore.chunked.choose_exchange_every`). The halo is ``exchange_every * 2r``
        pixels, ``r`` the kernel radius, which makes the chunked result equal the whole-array one up
        to float rounding. The iteration carries that rounding on; an operator of strongly signed
        kernels whose blur goes negative (not a microscope's) amplifies it, as it would a 1e-7
        change of the data.
    scratch : str or Path, optional
        Dask input only: a directory (on storage every worker sees) where each exchange's estimate is
        written and read back, which bounds memory by a few chunks for images larger than memory.
        The iterations then run in this call; the returned lazy array reads the final estimate from
        ``scratch``, which must stay until it has been stored. An operator of more than 4 MiB is
        saved there too, and each block task reads its window's part, rather than the task graph
        carrying it whole (:func:`lsfov.restore.scratch.store_operator`).
        Without it, on a distributed cluster, such an operator travels whole in the
        graph and an :class:`~lsfov.LsfovWarning` says so.
    resume : bool
        With ``scratch``: continue the run with the same data, operator and parameters that was
        interrupted there (a crash, a killed job): blocks and exchanges already done are skipped, and
        the result is the same, bit for bit. Without it, an earlier state in ``scratch`` is discarded.
    progress : bool
        Show progress bars.

    Returns
    -------
    ndarray, cupy array, dask array or xarray.DataArray (H, W), float32
        The deblurred image, of the type of ``image``: NumPy/CuPy in -> same out; Dask in -> lazy Dask
        out with the input's chunks; xarray in -> xarray out with the same dims, coords and attrs
        (but ``significant_bits``; named ``deblurred``; its dims read by name, ``y`` and ``x`` in any order).

    Raises
    ------
    TypeError
        If ``operator`` is not a :class:`ProductConvolution`; ``image`` is a file name, an
        ``xarray.Dataset`` or not numeric; ``tv``, ``eps`` or ``background`` is not a number;
        ``saturation`` is True or not a number; or ``scratch`` is not a path.
    ValueError
        If ``operator`` is a restricted window; ``iterations`` or ``exchange_every`` is not a
        positive integer, ``tv`` is outside [0, 0.25) or ``eps`` outside [1e-4, 100]; ``background``
        is negative, not finite, at or above every pixel or the saturation level; ``image`` is a
        masked array with masked pixels, not 2-D (a single (1, H, W) plane is taken as (H, W); as
        xarray, names only one of ``y`` and ``x``), not of ``operator.shape``, holds NaN or Inf, is
        all zero or has no positive pixel, or has intensities float32 TV arithmetic cannot hold; if
        ``progress`` is not a bool, ``scratch`` is a file, or ``resume`` is given without it.
    MemoryError
        Dask input: if one block's task cannot fit in a worker's (or this machine's) memory.

    Notes
    -----
    A Dask input is read once in this call, to refuse NaN/Inf and an all-zero image and to set the
    intensity scale; the iterations read it again (in this call with ``scratch``, else when the
    result is computed). Persist or store an input that is costly to compute.

    Examples
    --------
    A sharp image seen through a field of Z3 PSFs (defocus and astigmatism varying across it), with
    photon and read noise, then deblurred:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> from lsfov.calibrate import rescaled_distance
    >>> sharp = simulate.sample_image("hubble", (256, 256))
    >>> H, _ = simulate.psf_field(sharp.shape, "Z3", grid=2, seed=0)
    >>> blurred = simulate.degrade(sharp, H, photons=1000, seed=0)
    >>> x = lsfov.deconvolve(blurred, H, iterations=10)
    >>> x.shape, x.dtype
    ((256, 256), dtype('float32'))
    >>> rescaled_distance(x, sharp) < rescaled_distance(blurred, sharp)  # closer to the sharp image
    True
    """
    iterations, tv, eps, exchange_every = _check_params(operator, iterations, tv, eps, exchange_every)
    background = check_background(background)
    scratch_dir(scratch, resume)
    progress = boolean(progress, "progress")  # ("no" is no refusal of a bar)
    import xarray as xr

    image = squeeze_plane(image)  # a (1, H, W) plane, as NumPy, Dask or xarray

    level = censor_level(image, saturation)  # of the camera's counts, before any float copy
    check_clip_above(level, background)
    clip = (level, level_origin(image, saturation, level))
    if isinstance(image, xr.DataArray):
        check_pixel_size(operator, image)
        yx = yx_order(image)  # dims by name: an (x, y) image is not deblurred transposed
        out = _deconvolve(yx.data, operator, iterations, tv, eps, exchange_every, scratch, resume, progress, clip,
                          background)
        out = yx.copy(data=out).transpose(*image.dims).rename("deblurred")
        out.attrs.pop("significant_bits", None)  # the camera's, not the estimate's: it is no count
        return out
    return _deconvolve(image, operator, iterations, tv, eps, exchange_every, scratch, resume, progress, clip,
                       background)


def _deconvolve(image, operator, iterations, tv, eps, exchange_every, scratch, resume, progress, clip, background=0.0):
    """:func:`deconvolve` of an array (NumPy, CuPy or Dask); ``clip``: (level or None, its origin)."""
    if type(image).__module__.startswith("dask"):
        from .chunked import deconvolve_dask

        return deconvolve_dask(image, operator, iterations, tv, eps=eps, exchange_every=exchange_every,
                               scratch=scratch, resume=resume, progress=progress, saturation=clip[0], origin=clip[1],
                               background=background)
    say_whole(scratch, exchange_every)
    y = as_image(image)
    _check_shape(y.shape, operator)
    peak = float(y.max())
    say_offset(getattr(image, "dtype", y.dtype), float(y.min()), background)  # (a list has none)
    # The mean in float64, as the chunked path: a float32 mean's rounding follows the array's memory
    # layout (a cropped view and its copy differed in the last bits of the result) and its summation order.
    if background:
        xp = array_module(y)
        say_background(background, peak, int((y < xp.float32(background)).sum()), y.size)
        above = xp.maximum(y - xp.float32(background), xp.float32(0.0))  # the sample's light
        scale = float(above.sum(dtype=np.float64)) / y.size
        del above
    else:
        scale = float(y.sum(dtype=np.float64)) / y.size
    if not scale > 0:
        raise ValueError("image is all zero; there is nothing to deconvolve: is it the plane (--channel, --z, --t) "
                         "you meant?")
    _check_range(scale, peak, eps, flat_gain(operator))
    return _whole(y, operator, iterations, tv, eps, scale, progress, clip, peak, background)


def check_background(background) -> float:
    """``background`` (the camera's offset, in the image's units) as a float >= 0."""
    return real_number(background, "background (the camera's offset, in the image's units)", minimum=0)


def check_clip_above(level, background: float):
    """Refuse a saturation ``level`` at or below the camera's offset ``background`` (a slip: a camera
    clips above its dark level)."""
    if background and level is not None and level <= background:
        raise ValueError(f"the saturation level {fmt_level(level)} is at or below background={background:g}: a camera "
                         "clips above its offset; give the level in the camera's counts (saturation=, "
                         "--saturation), or the offset you meant")


def check_offset_below(image, background: float):
    """Refuse, before any work, a ``background`` at or above every pixel of ``image`` (NumPy, CuPy,
    Dask or xarray: one read of a lazy image, for its largest pixel)."""
    if background:
        data = getattr(image, "data", image)
        peak = float(data.max().compute() if hasattr(data, "dask") else data.max())
        if np.isfinite(peak):  # (NaN and Inf: refused by the work's own checks, in their words)
            refuse_offset_above(background, peak)


#: Share of the pixels below ``background`` above which it is warned about: at the camera's offset
#: the dark pixels' noise puts about half of them below it, and a sample covers some of the rest.
WARN_BELOW = 0.8


def refuse_offset_above(background: float, peak: float):
    """Refuse a ``background`` at or above every pixel (``peak`` the largest)."""
    if not peak > background:
        raise ValueError(f"background {background:g} is at or above every pixel (the largest is {peak:g}): nothing "
                         "would be left to deblur; give the camera's offset (the mean of a frame taken with the "
                         "shutter closed)")


def say_background(background: float, peak: float, below: int, size: int):
    """Refuse a ``background`` at or above every pixel; warn where most pixels are below it."""
    refuse_offset_above(background, peak)
    if below > WARN_BELOW * size:
        warnings.warn(f"{math.floor(100 * below / size)} % of the pixels are below background={background:g}, and are "
                      "taken as 0: is it above the camera's offset (the mean of a frame taken with the shutter closed)? The "
                      "sample's light below it is lost", LsfovWarning, stacklevel=user_stacklevel())


def say_offset(dtype, lo: float, background: float):
    """Say, where a camera's counts (an integer image) are all above 0 and no ``background`` is given,
    that the darkest may be the camera's offset."""
    if not background and np.dtype(dtype).kind in "iu" and lo > 0:
        log.info("the darkest pixel is at %g counts: if the camera adds an offset, give it as background= "
                 "(--background; the mean of a frame taken with the shutter closed) to have it subtracted", lo)


def subtract_background(y, background: float):
    """``y`` less the camera's ``background``, what falls below it 0, in place (float32; 0 stays 0)."""
    if background:
        xp = array_module(y)
        y -= xp.float32(background)
        xp.maximum(y, xp.float32(0.0), out=y)
    return y


def _check_shape(shape, op):
    known_shape(shape)
    if tuple(shape) != op.shape:
        raise ValueError(f"image shape {tuple(shape)} does not match the operator's shape {op.shape}; "
                         "build the operator for this image (or crop the image to it)")


def censored_pixels(y, level):
    """Indicator (uint8, 1 byte a pixel: a block's memory budget holds) of the pixels at or above the
    saturation ``level``, and their count; None where there are none (or ``level`` is None): the
    plain iteration, bit for bit."""
    if level is None:
        return None, 0
    xp = array_module(y)
    sat = y >= xp.float32(level)
    n = int(sat.sum())
    return (sat.view(xp.uint8) if n else None), n


#: Share of an image's pixels at its clip above which that is warned about (a well exposed
#: fluorescence image has far fewer; an image stretched to its type's range may have that many).
WARN_CENSORED = 0.01


def say_whole(scratch, exchange_every):
    """Say that the options of block-wise runs, given for an in-memory image, have nothing to act on."""
    if scratch is not None or exchange_every is not None:
        warnings.warn("scratch= and exchange_every= act on Dask input; this in-memory image is deblurred whole "
                      "(chunk it with dask.array.from_array(image, chunks=...) to use them)", LsfovWarning,
                      stacklevel=user_stacklevel())


def say_censored(n: int, level, origin: str, size: int, peak: float) -> float | None:
    """Say how many of ``size`` pixels are censored at ``level`` (from ``origin``: e.g. the image's
    significant bits, or ''), and whether pixels up to ``peak`` exceed what that origin allows; the
    level to censor at (None where no pixel reaches it)."""
    if not n:
        return None
    at = f"{fmt_level(level)}" + (f" ({origin})" if origin else "")
    log.info("%d pixels at or above the saturation level %s: censored (their counts are at least that)", n, at)
    if origin and peak > level:  # a 12-bit camera's pixels above 4095: the metadata is wrong, or frames were summed
        warnings.warn(f"pixels up to {fmt_level(peak)} exceed {at}: is that metadata right (summed or binned frames "
                      "hold more)? They are taken as clipped (censored); give the camera's level with saturation= "
                      "(--saturation)", LsfovWarning, stacklevel=user_stacklevel())
    elif n > WARN_CENSORED * size:
        warnings.warn(f"{100 * n / size:.1f} % of the pixels are at or above the saturation level {at}, taken as at "
                      "least that (censored); a shorter exposure or lower gain clips fewer. An image stretched to its "
                      "type's range is not clipped: pass saturation=False (on the command line: --saturation above its "
                      "largest pixel; for lsfov run, --max-saturated 1)", LsfovWarning, stacklevel=user_stacklevel())
    return float(level)


def _whole(y, op: ProductConvolution, iterations, tv, eps, scale, progress, clip=(None, ""), peak=0.0,
           background=0.0):
    """The whole-array path: one window covering the extended field; ``clip``: (level at or above
    which pixels are censored, or None; its origin), ``peak`` the image's largest pixel, ``scale`` its
    mean above the camera's ``background`` (subtracted after the saturated pixels are found)."""
    xp = array_module(y)
    r = op.halo
    h, w = y.shape
    # The rim is at least r wide and the window a fast FFT length: FFTs need no padding copy, and
    # as y (hence the ratio) is zero on the rim, wrap-around never reaches the image.
    ext = (next_fast_len(h + 2 * r), next_fast_len(w + 2 * r))
    win = op.restrict((-r, -r), ext, periodic=True)
    y_ext = xp.zeros(ext, dtype=xp.float32)
    y_ext[r : r + h, r : r + w] = y
    norm = win.adjoint_ones(like=y)
    thr = _norm_threshold(op)
    gain = flat_gain(op)
    x = _initial(norm, thr, scale, gain)
    censored, n_sat = censored_pixels(y_ext, clip[0])  # the rim is 0: below any level
    say_censored(n_sat, *clip, y.size, peak)
    subtract_background(y_ext, background)  # after the camera's counts are compared with its clip
    from ..cluster import progress_bar

    with progress_bar(total=iterations, desc="TV-RL", unit="it", disable=not progress) as bar:
        x = _iterate(win, y_ext, x, iterations, tv, eps, scale, norm, thr, bar,
                     field=(slice(0, h + 2 * r), slice(0, w + 2 * r)), graph=True, censored=censored, gain=gain)
    return xp.maximum(x[r : r + h, r : r + w], np.float32(0.0))
