"""Sparse + smooth deblurring of point sources on a smooth background (paper 003 App. D-b).

    min_{u1, u2 >= 0}  ½‖M(H(u1 + u2) − y)‖² + γ1‖u1‖₁ + γ2‖Δu2‖²

solved by FISTA (accelerated proximal gradient) on the pair (u1, u2). u1 and u2 live on the
extended field (the image grown by the PSF radius r on every side) and M keeps the residual on the
image: light that comes in from beyond the edge is explained there, by the background that goes
on (u2) or a source just outside (u1), instead of by a frame of false sources on the edge, as a
zero world outside the image would force. One iteration moves information by at most
``max(2r, 2)`` pixels (H then Hᵀ; Δ twice), so, as for TV-RL, blocks that exchange a halo of
``k·max(2r, 2)`` every k iterations reproduce the whole-array iterates exactly.

A pixel at the camera's clip (``saturation``) is censored: its count is at least the clip, so only a
prediction below it is penalised (its residual is ``min(H(u1 + u2) − y, 0)``, a one-sided quadratic:
still convex, its gradient as Lipschitz, the same steps). A clipped source is then fitted by its
unclipped flanks, not flattened into a ring of sources around its plateau.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
from typing import NamedTuple

import numpy as np

from .._backend import block_digests, task_threads, to_numpy
from .._validate import (LsfovWarning, as_image, beyond_float32, boolean, censor_level, check_pixel_size, float32_blocks,
                         known_shape, level_origin, non_finite, positive_int, real_2d, real_number, scratch_dir,
                         squeeze_plane, yx_order)
from ..cluster import stop_point
from ..operators import ProductConvolution
from .halo import axis_chunks, block_window, exchange_counts, lazy_exchanges, say_overhead
from .tv_rl import censored_pixels, say_censored, say_whole

__all__ = ["estimate_noise", "locate_sources", "sparse_smooth_deblur"]

log = logging.getLogger("lsfov")

DEFAULT_GAMMA2 = 10.0
# u2 starts as the image's background, continued past the edge by its edge values, over the PSF's
# sum: then nearly in place everywhere, the extended field's rim included, which the data reach only
# through the PSF's tails (from a flat start the rim of a rising background was still behind after
# 500 iterations, and u1 took up the difference). The background: the image opened by a disk of the
# PSF's radius (which no blurred source fills), its bias on noise put back, then smoothed by a
# Gaussian of this σ (px). A start below a bright, curved background is filled by u1 first, ~600x
# faster than by u2: smoothed by σ = 8 instead, blobs of σ 20 px and 400 counts started 14 % low
# and left 174 false sources beside 50 true ones after 500 iterations (none now; none either way
# after 2000: benchmarks/RESULTS.md, BSS).
_START_SIGMA, _START_TRUNCATE = 2.0, 3.0


# (percentile, Φ⁻¹((1 + p) / 2)) that estimate_noise tries in turn where the median's is 0
_NOISE_QUANTILES = ((0.75, 1.1503), (0.9, 1.6449), (0.95, 1.9600), (0.99, 2.5758))


def estimate_noise(image) -> float:
    """Standard deviation of white noise in ``image``, from the median absolute value of its
    discrete Laplacian (robust to sparse sources and smooth backgrounds; gain √20 for white noise).

    Parameters
    ----------
    image : array_like (H, W)
        The image, at least 3 x 3 pixels, without NaN or Inf; read whole into memory (pass a crop of a large one).

    Returns
    -------
    float
        The noise standard deviation in the image's units: 1.4826 times the median absolute
        deviation of the 5-point Laplacian over the interior pixels, divided by √20. Where that
        median is 0 (counts so low, or so coarsely quantised, that most pixels equal their
        neighbours), the first non-zero of its 75th, 90th, 95th and 99th percentiles, read as a
        Gaussian's; 0 where those are 0 too (an image constant almost everywhere).

    Raises
    ------
    TypeError
        If ``image`` is not an array of real numbers.
    ValueError
        If ``image`` is not 2-D, is smaller than 3 x 3, or holds NaN or Inf.
    """
    x = to_numpy(real_2d(image, "image"))  # (read whole: NumPy from any array)
    if min(x.shape) < 3:
        raise ValueError(f"estimating the noise needs a 2-D image of at least 3x3 pixels, got shape {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():  # one NaN makes the median NaN
        raise non_finite("image")
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    dev = np.abs(lap - np.median(lap))
    # A Gaussian's |deviation| has its p-quantile at σ Φ⁻¹((1 + p) / 2): 0.6745 σ at the median. Where
    # that is 0, a higher one: Poisson noise of 0.03 counts a pixel (σ 0.17) read 0.14 at the 90th (0
    # before), 8-bit noise of σ 0.11 read 0.11 at the 75th.
    med = float(np.median(dev))
    if med > 0:
        return float(1.4826 * med / math.sqrt(20.0))
    for p, z in _NOISE_QUANTILES:
        q = float(np.quantile(dev, p))
        if q > 0:
            return q / z / math.sqrt(20.0)
    return 0.0


def _laplacian(u, xp):
    """5-point Laplacian with mirrored (Neumann) edges: the grid graph's Laplacian, symmetric."""
    p = xp.pad(u, 1, mode="edge")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u


class _Norms(NamedTuple):
    l1: float  # largest ℓ1 norm of a local PSF
    l2: float  # largest ℓ2 norm
    total: float  # median sum (the gain on a flat background)
    gain: float  # largest |Fourier transform| (the gain of a convolution's most amplified frequency)


def _psf_norms(op: ProductConvolution) -> _Norms:
    """Norms of the local PSFs (sampled where they vary: nodes, or a coarse grid)."""
    psfs = op.local_psfs()
    pad = tuple(2 * n for n in psfs.shape[-2:])  # 2x: the transform between the kernel's bins too
    gain = max(np.abs(np.fft.rfft2(psfs[i : i + 256], s=pad)).max() for i in range(0, len(psfs), 256))
    return _Norms(float(np.abs(psfs).sum(axis=(-2, -1)).max()), float(np.sqrt((psfs**2).sum(axis=(-2, -1))).max()),
                  float(np.median(psfs.sum(axis=(-2, -1)))), float(gain))


def _steps(op: ProductConvolution, gamma2: float, norms: _Norms | None = None) -> tuple[float, float]:
    """Step sizes (τ1, τ2) for u1 and u2: FISTA in the metric diag(1/τ1, 1/τ2).

    The Hessian of the smooth part is ``[H H]ᵀ[H H] + diag(0, 2γ2ΔᵀΔ) ≼ diag(2‖H‖², 2‖H‖² + 128γ2)``
    (‖Δ‖ ≤ 8), so these steps are safe, and u1 does not crawl at the pace the smoothness term sets
    for u2. ``‖H‖₂ ≤ sqrt(‖H‖₁‖H‖∞)``, for slowly varying PSFs both the largest ℓ1 norm of a local PSF
    (5% margin for the variation between samples): for non-negative PSFs their sum, the tight bound.
    Signed PSFs (a calibrated PCA basis) have a larger ℓ1 norm than gain (1.1-1.4 for sum 1): there
    ‖H‖ is the largest gain of a local PSF, with 10% margin for the variation (checked against a
    power iteration in the tests); steps from ℓ1 would be up to 2x too short.
    """
    norms = norms or _psf_norms(op)
    lh = 2.0 * min(1.05 * norms.l1, 1.1 * norms.gain) ** 2
    return 1.0 / lh, 1.0 / (lh + 128.0 * gamma2)


def _momenta(start: int):
    """FISTA's extrapolation weights after iterations ``start``, ``start + 1``, ... (0-based): each a
    function of its index only, so a block resumed at ``start`` continues the same sequence."""
    t = 1.0
    for k in itertools.count():
        t_next = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        beta, t = (t - 1) / t_next, t_next
        if k >= start:
            yield beta


def _iterate(op, y, state, start, n, gamma1, gamma2, steps, xp, mask=None, censored=None):
    """``n`` FISTA iterations from iteration ``start``; state = (x1, x2, z1, z2) float32 arrays.
    ``mask``: 1 where the window holds the image, 0 on the extended field's rim (None: all image).
    ``censored``: 1 at saturated pixels, where only a residual below zero counts (None: none)."""
    x1, x2, z1, z2 = state
    t1, t2 = (np.float32(t) for t in steps)
    thr = np.float32(gamma1 * steps[0])
    for beta in itertools.islice(_momenta(start), n):
        stop_point()
        res = op.apply(z1 + z2, check=False) - y
        if mask is not None:
            res *= mask
        if censored is not None:
            over = xp.maximum(res, 0)
            over *= censored
            res -= over
        g = op.adjoint(res, check=False)
        n1 = xp.maximum(z1 - t1 * g - thr, 0)
        n2 = xp.maximum(z2 - t2 * (g + np.float32(2 * gamma2) * _laplacian(_laplacian(z2, xp), xp)), 0)
        beta = np.float32(beta)
        z1 = n1 + beta * (n1 - x1)
        z2 = n2 + beta * (n2 - x2)
        x1, x2 = n1, n2
    return x1, x2, z1, z2


def sparse_smooth_deblur(image, operator: ProductConvolution, gamma1: float | None = None,
                         gamma2: float | None = None, *, iterations: int = 500,
                         saturation: float | bool | None = None, exchange_every: int | None = None,
                         warn_dense: float = 0.05, scratch=None, resume: bool = False, progress: bool = False):
    """Split a blurred image into point sources and a smooth background, both deblurred (BSS step 2).

    Parameters
    ----------
    image : array_like (H, W)
        NumPy (result NumPy), CuPy (result CuPy, iterated on the GPU), Dask (result lazy, computed
        block by block with an exact halo exchange: the same iterates as the whole array), or xarray
        of these (result xarray, its coordinates kept).
    operator : ProductConvolution
        The blur, e.g. from :func:`lsfov.identify_operator` or :func:`lsfov.calibrate_operator`.
    gamma1 : float, optional
        Weight of ‖u1‖₁, >= 0. Default ``3 σ ‖h‖₂``, σ the noise level (:func:`estimate_noise`) measured
        on the image's central 1024 x 1024 pixels (all of an axis shorter than 1024; the same pixels
        for NumPy and Dask input) and ‖h‖₂ the largest ℓ2 norm of a local PSF: the level of noise seen
        through Hᵀ, so that noise alone rarely makes a source.
    gamma2 : float, optional
        Weight of ‖Δu2‖² (dimensionless: both terms are quadratic in the intensity). Default 10:
        the smooth part keeps features wider than about 15 pixels, and a source of amplitude A
        costs less in u1 than in u2 once A exceeds about γ1/(0.01·γ2).
    iterations : int
        FISTA iterations, default 500 (the ℓ1 part converges slowly: 300 leave noise spikes in u1 on
        some images, 500 did not on the benchmark's fields). A source 10⁴ times its background needs
        more: one of 10⁶ counts on a background of 20 (σ 2, a 1.5 px Gaussian PSF) left 16 false
        sources around it at 500 iterations, 7 at 1000, none at 2000.
    saturation : float, None or False
        Pixel value at or above which the camera saturated; such pixels are censored (module notes).
        Default: the largest count of an integer image's type, or of its ``significant_bits``; none
        for a float image. ``False``: none.
    exchange_every : int, optional
        Iterations between halo exchanges for Dask input (default: all in one exchange if the halo
        fits in a chunk, else as many as fit).
    warn_dense : float
        Warn when more than this fraction of pixels exceeds a tenth of the sparse component's peak
        (the image is probably not point sources on a background; use :func:`lsfov.deconvolve`).
        Not for Dask input without ``scratch``: that result is lazy, and checking it would compute it.
    scratch : str or Path, optional
        Dask input only: a directory (on storage every worker sees) through which every exchange's
        state goes (:mod:`lsfov.restore.scratch`): memory holds a few blocks whatever the image size.
        The iterations then run in this call; the returned arrays read from ``scratch``. An
        operator of more than 4 MiB is saved there too, and each block task reads its window's part
        (:func:`lsfov.restore.scratch.store_operator`).
        Without it, on a distributed cluster, such an operator travels whole in the
        graph and an :class:`~lsfov.LsfovWarning` says so.
    resume : bool
        With ``scratch``: continue an interrupted run of the same image, operator and parameters,
        computing only the blocks without a result (the same bytes as an uninterrupted run).
    progress : bool
        Progress bar (with ``scratch``).

    Returns
    -------
    sparse : array (H, W) float32
        The point sources u1, deblurred, of the type of ``image``.
    smooth : array (H, W) float32
        The smooth background u2, deblurred, of the type of ``image``. xarray components carry
        ``gamma1``, ``gamma2`` and ``noise`` (the σ measured, for :func:`locate_sources`) in their
        ``attrs``.

    Raises
    ------
    TypeError
        If ``operator`` is not a :class:`ProductConvolution`; ``image`` is a file name, an
        ``xarray.Dataset`` or not numeric; ``saturation`` is True or not a number; ``gamma1``,
        ``gamma2`` or ``warn_dense`` is not a number; or ``scratch`` is not a path.
    ValueError
        If ``iterations`` or ``exchange_every`` is not a positive integer, ``warn_dense`` is outside
        [0, 1], or ``gamma1`` or ``gamma2`` is negative; ``operator`` is a restricted window;
        ``image`` is a masked array with masked pixels, empty, not 2-D (or, as xarray, names only one of
        ``y`` and ``x``), of unknown Dask chunk sizes, not of ``operator.shape``, holds NaN or Inf,
        is all zero or has no positive pixel; the image is under 3x3 pixels and no ``gamma1`` is
        given (its noise cannot be measured); ``progress`` is not a bool; if ``scratch`` is a file,
        or ``resume`` is given without it.

    Examples
    --------
    Beads on a smooth background, split and deblurred with their operator, then located:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> from lsfov.restore import estimate_noise, locate_sources
    >>> field = simulate.bead_field((128, 128), seed=0, grid=2)
    >>> sparse, smooth = lsfov.sparse_smooth_deblur(field.image, field.operator, iterations=200)
    >>> sparse.shape, sparse.dtype
    ((128, 128), dtype('float32'))
    >>> found = locate_sources(sparse, field.operator, noise=estimate_noise(field.image))
    >>> len(found), len(field.positions)  # sources found, beads simulated
    (7, 7)
    >>> round(float(smooth.mean() / field.background.mean()), 1)  # the background recovered
    1.0
    """
    if not isinstance(operator, ProductConvolution):
        raise TypeError(f"operator must be an lsfov.ProductConvolution, got {type(operator).__name__}")
    iterations = positive_int(iterations, "iterations")
    if exchange_every is not None:  # as deconvolve: 0 is refused, not taken as the default
        exchange_every = positive_int(exchange_every, "exchange_every")
    warn_dense = real_number(warn_dense, "warn_dense", minimum=0, maximum=1)  # a fraction of the pixels
    progress = boolean(progress, "progress")
    scratch_dir(scratch, resume)  # before the read of the image below
    image = squeeze_plane(image)  # a (1, H, W) plane, as NumPy, Dask or xarray
    xr_in = getattr(image, "dims", None) is not None
    check_pixel_size(operator, image)
    dims = image.dims if xr_in else None
    if xr_in:
        image = yx_order(image)  # dims by name: an (x, y) image is not deblurred transposed
    data = image.data if xr_in else image
    level = censor_level(image, saturation)  # of the camera's counts, before the float copy
    origin = level_origin(image, saturation, level)
    lazy = type(data).__module__.startswith("dask")
    if not lazy:
        say_whole(scratch, exchange_every)
    if lazy:
        if data.dtype.kind not in "biuf":
            raise TypeError(f"image must be a real numeric array, got dtype {data.dtype}")
        y = float32_blocks(data)
    else:
        y = as_image(data, "image", check_values=False)
    if y.ndim != 2:
        raise ValueError(f"image must be 2-D (y, x), got shape {y.shape}; pick a plane, channel or time point first")
    if operator.window != (0, 0) + operator.shape:
        raise ValueError("sparse_smooth_deblur needs a full-image operator, not a restricted window; pass the operator "
                         "it was restricted from")
    known_shape(y.shape)
    if y.shape != operator.shape:
        raise ValueError(f"image shape {y.shape} does not match the operator's shape {operator.shape}")
    # The central 1024² (the same for NumPy and Dask input): the noise level.
    cy, cx = (max(0, n // 2 - 512) for n in y.shape)
    sample = to_numpy(y[cy : cy + 1024, cx : cx + 1024]).astype(np.float32, copy=False)  # NumPy, CuPy or Dask
    if lazy:
        import dask.array as da

        n_sat = 0 if level is None else (y >= np.float32(level)).sum()
        # One read (500 iterations follow); the extremes in the input's own type too, where values beyond
        # float32's range are still finite.
        finite, n_sat, peak, low, hi0, lo0 = da.compute(da.isfinite(y).all(), n_sat, y.max(), y.min(),
                                                        data.max(), data.min())
        finite, n_sat, peak, low = bool(finite), int(n_sat), float(peak), float(low)
        if not finite and np.isfinite(hi0) and np.isfinite(lo0):
            raise beyond_float32("image", max(abs(float(hi0)), abs(float(lo0))))
    else:
        finite, n_sat = bool(np.isfinite(y).all()), censored_pixels(y, level)[1]
        peak, low = float(y.max()), float(y.min())
    if not finite:
        raise non_finite("image", None if lazy else to_numpy(data) if hasattr(data, "dtype") else None)
    if peak == 0 and low == 0:
        raise ValueError("image is all zero; there is nothing to deblur: is it the plane (--channel, --z, --t) you "
                         "meant?")
    if peak <= 0:  # (u1, u2 >= 0: the result would be zero) as deconvolve says it
        raise ValueError(f"image has no positive pixel (max {peak:g}); point sources and their background are "
                         "light: is it background-subtracted twice, or inverted?")
    level = say_censored(n_sat, level, origin, y.size, peak)  # none saturated: None, the plain iterates, bit for bit
    norms = _psf_norms(operator)  # read once (basis maps may be on disk)
    noise = estimate_noise(sample) if min(sample.shape) >= 3 else None  # None: too small to measure
    if gamma1 is None:
        if noise is None:
            raise ValueError(f"image of {y.shape[0]}x{y.shape[1]} px is too small to measure its noise (at least 3x3); "
                             "give gamma1")
        if noise == 0:
            raise ValueError("the image's noise measures 0 (its pixels equal their neighbours almost everywhere: a "
                             "constant or synthetic image); give gamma1, the weight of the point sources' l1 norm")
        gamma1 = 3.0 * noise * norms.l2
    if gamma2 is None:
        gamma2 = DEFAULT_GAMMA2
    gamma1, gamma2 = real_number(gamma1, "gamma1", minimum=0), real_number(gamma2, "gamma2", minimum=0)
    steps = _steps(operator, gamma2, norms)
    bias = _opening_bias(sample, operator.halo)
    if lazy:
        sparse, smooth = _chunked(y, operator, gamma1, gamma2, steps, iterations, exchange_every, norms.total,
                                  bias, scratch=scratch, resume=resume, progress=progress, level=level)
    else:
        from .._backend import array_module

        xp = array_module(y)
        r, (h, w) = operator.halo, y.shape
        ext = (h + 2 * r, w + 2 * r)  # exactly: the Laplacian's edge is the extended field's, as in blocks
        y_ext, mask = xp.zeros(ext, xp.float32), xp.zeros(ext, xp.float32)
        y_ext[r : r + h, r : r + w], mask[r : r + h, r : r + w] = y, 1
        # u2 starts near the background: the smoothness term slows u2 down, and a background left for it
        # to grow into would meanwhile be taken up by u1.
        zero, start = xp.zeros_like(y_ext), xp.asarray(_background(np.pad(to_numpy(y), r, mode="edge"),
                                                                  norms.total, r, bias))
        win = operator.restrict((-r, -r), ext)
        x1, x2, _, _ = _iterate(win, y_ext, (zero, start, zero, start), 0, iterations, gamma1, gamma2, steps, xp,
                                mask=mask, censored=censored_pixels(y_ext, level)[0])
        sparse, smooth = x1[r : r + h, r : r + w].copy(), x2[r : r + h, r : r + w].copy()
    if not lazy or scratch is not None:  # computed (a lazy result is left lazy)
        _warn_dense(sparse, warn_dense)
    if xr_in:
        attrs = {**image.attrs, "gamma1": gamma1, "gamma2": gamma2, "noise": noise}
        sparse = image.copy(data=sparse).assign_attrs(attrs, component="sparse").transpose(*dims)
        smooth = image.copy(data=smooth).assign_attrs(attrs, component="smooth").transpose(*dims)
        for part in (sparse, smooth):
            part.attrs.pop("significant_bits", None)  # the camera's, not the estimate's: they are no counts
    return sparse, smooth


def _warn_dense(sparse, limit: float):
    """Warn when more than ``limit`` of the pixels exceed a tenth of the sparse component's peak."""
    import dask

    peak = float(dask.compute(sparse.max())[0])
    frac = float(dask.compute((sparse > 0.1 * peak).mean())[0]) if peak > 0 else 0.0
    if frac > limit:
        warnings.warn(f"{frac:.0%} of the pixels carry point sources: the image does not look like point sources "
                      "on a smooth background; lsfov.deconvolve may suit it better", LsfovWarning, stacklevel=3)


def _opened(y, radius: int):
    """``y`` opened by a disk of ``radius`` px: what remains without features it does not fill."""
    from scipy import ndimage

    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.grey_opening(y, footprint=np.hypot(yy, xx) <= radius, mode="nearest")


def _opening_bias(sample, radius: int) -> float:
    """What opening takes off the noise (a minimum, then a maximum of minima): the median of
    ``sample - opened``, the sources a few of its pixels. From the image's central sample, the same
    pixels for NumPy and Dask input."""
    return float(np.median(sample - _opened(sample, radius)))


def _background(y, total: float, radius: int, bias: float):
    """Where u2 starts: ``y`` (NumPy; the image continued past its edge by its edge values) opened by
    a disk of ``radius`` (its sources gone), ``bias`` put back, smoothed; over the PSF's sum ``total``
    (a flat background's gain; not the ℓ1 norm, larger for signed PSFs)."""
    from scipy import ndimage

    out = ndimage.gaussian_filter(_opened(y, radius) + np.float32(bias), _START_SIGMA, mode="nearest",
                                  truncate=_START_TRUNCATE)
    return np.maximum(out, np.float32(0)) / np.float32(max(total, 1e-12))


def _chunked(y, op, gamma1, gamma2, steps, iterations, exchange_every, total, bias, *, scratch=None, resume=False,
             progress=False, level=None):
    import dask
    import dask.array as da

    s, r = max(2 * op.halo, 2), op.halo
    c = tuple(int(max(ch)) for ch in y.chunks)
    single = len(y.chunks[0]) == 1 and len(y.chunks[1]) == 1
    k = exchange_every or (iterations if single else max(1, min(iterations, min(c) // s)))
    k = min(positive_int(k, "exchange_every"), iterations)
    if not single and s * k > min(c):  # (as TV-RL does: the blocks are grown, not the input's chunks)
        log.info("chunks %s are smaller than the halo of %d px (%d iterations x %d px); using larger blocks",
                 c, s * k, k, s)
    # The extended field (the image and a rim of r), in blocks of at least the halo; a last chunk
    # thinner than the halo joins its neighbour (the overlap needs the whole halo).
    chunks = tuple(axis_chunks(n + 2 * r, ci, s * k) for n, ci in zip(y.shape, c))
    in_chunks, shape = y.chunks, y.shape
    say_overhead(c, chunks, 0 if single else s * k, "sparse+smooth")
    # The start, block by block with the opening's and gaussian_filter's reach into the neighbours (an
    # axis of one chunk, or shorter than that, taken whole: no neighbours to borrow from), then as the blocks.
    depth = 2 * r + int(_START_TRUNCATE * _START_SIGMA + 0.5)
    whole = [len(ch) == 1 or sum(ch) <= depth for ch in chunks]
    padded = da.pad(y, r, mode="edge").rechunk(tuple((sum(ch),) if w else ch for ch, w in zip(chunks, whole)))
    start = padded.map_overlap(functools.partial(_background, total=total, radius=r, bias=bias),
                               depth={0: 0 if whole[0] else depth,
                               1: 0 if whole[1] else depth}, boundary="nearest", dtype=np.float32,
                               meta=np.empty((0, 0), np.float32)).rechunk(chunks)
    y = da.pad(y, r).rechunk(chunks)
    block = functools.partial(_block, chunks=chunks, gamma1=gamma1, gamma2=gamma2, steps=steps,
                              image=(r, r) + shape, level=level)
    counts = exchange_counts(iterations, k)
    log.info("sparse+smooth: %d iterations in %d exchange%s, halo %d px", iterations, len(counts),
             "" if len(counts) == 1 else "s", 0 if all(len(ch) == 1 for ch in chunks) else s * k)  # one block: none
    if scratch is None:
        from .scratch import say_operator_in_graph

        say_operator_in_graph(op)
        state = lazy_exchanges(y, counts, s, functools.partial(block, op=op), name="lsfov-bss",
                               token=(op._token, gamma1, gamma2, steps, level), channels=4, initial=start)
    else:
        from pathlib import Path

        from .scratch import run_exchanges

        # The image (its blocks' bytes), the operator's content, every parameter.
        key = dask.base.tokenize(dask.compute(block_digests(y))[0], chunks, op.fingerprint, gamma1, gamma2, steps,
                                 counts, s, _START_SIGMA, _START_TRUNCATE, bias, "opened",
                                 *(() if level is None else (level,)))
        zx = run_exchanges(y, counts, s, block, root=Path(scratch) / f"lsfov-bss-{key[:16]}", channels=4,
                           resume=resume, progress=progress, desc="sparse+smooth", initial=start, operator=op)
        state = da.from_zarr(zx, chunks=((4,),) + chunks)
    field = (slice(r, r + shape[0]), slice(r, r + shape[1]))
    return state[(0,) + field].rechunk(in_chunks), state[(1,) + field].rechunk(in_chunks)


def _block(yb, st, *, n, start, halo, location, op, chunks, gamma1, gamma2, steps, image, level=None):
    """``n`` FISTA iterations from iteration ``start`` on the window of the block at ``location`` of
    the extended field; its core. The first exchange starts u2 from ``st`` (H, W) (:func:`_background`),
    the others continue ``st`` (4, H, W). ``image``: (top, left, height, width) of the image in the
    extended field, where the residual counts."""
    if st.ndim == 2:
        zero = np.zeros_like(st)
        st = np.stack([zero, st, zero, st])
    window, core = block_window(chunks, location, halo)
    top, left, h, w = image
    mask = np.zeros(yb.shape, np.float32)
    mask[max(top - window[0].start, 0) : max(top + h - window[0].start, 0),
         max(left - window[1].start, 0) : max(left + w - window[1].start, 0)] = 1
    win = op.restrict((window[0].start - top, window[1].start - left), yb.shape)  # image coordinates
    with task_threads():
        out = _iterate(win, yb, tuple(st[i] for i in range(4)), start, n, gamma1, gamma2, steps, np, mask=mask,
                       censored=censored_pixels(yb, level)[0])
    return np.stack([o[core] for o in out])


def locate_sources(sparse, operator: ProductConvolution, noise: float, *, k: float = 3.0) -> np.ndarray:
    """Point sources of a sparse component: local maxima whose 3x3 sum exceeds ``k·σ/‖h‖₂``.

    A source of amplitude A is seen through the blur with a matched-filter signal-to-noise ratio of
    ``A‖h‖₂/σ``; the rule keeps those at ``k`` sigma or more (‖h‖₂: the largest ℓ2 norm of a local PSF).

    Parameters
    ----------
    sparse : array_like (H, W)
        Sparse component from :func:`sparse_smooth_deblur`: NumPy, CuPy (copied to the host), Dask
        (read block by block), or an xarray of these (dims ``y`` and ``x`` in any order).
    operator : ProductConvolution
        The blur it was deblurred with.
    noise : float
        Noise standard deviation σ of the blurred image (e.g. :func:`estimate_noise`).
    k : float
        Detection level in sigmas (>= 0); default 3.

    Returns
    -------
    ndarray, float64, (N, 3)
        y, x (pixels) and amplitude (the 3x3 sum) of each source, brightest first. The image's outermost
        rows and columns are left out: half of their 3x3 neighbourhood is outside the field, so neither
        a maximum nor its amplitude can be read there.

    Raises
    ------
    TypeError
        If ``operator`` is not a :class:`ProductConvolution`, ``noise`` or ``k`` is not a number, or
        ``sparse`` is not an array of real numbers.
    ValueError
        If ``noise`` is not finite and > 0 or ``k`` is negative; ``sparse`` is not 2-D or not of
        ``operator.shape``, or holds NaN or Inf.
    """
    import dask
    import dask.array as da

    if not isinstance(operator, ProductConvolution):
        raise TypeError(f"operator must be the lsfov.ProductConvolution the image was deblurred with, got "
                        f"{type(operator).__name__}")
    noise = real_number(noise, "noise", minimum=0, exclusive=True)
    k = real_number(k, "k", minimum=0)
    arr = real_2d(yx_order(sparse, "sparse").data if getattr(sparse, "dims", None) is not None else sparse, "sparse")
    if type(arr).__module__.startswith("cupy"):
        arr = to_numpy(arr)
    if arr.shape != operator.shape:  # positions and the detection level would be another image's
        raise ValueError(f"sparse has shape {arr.shape} but the operator is for images of shape {operator.shape}; "
                         "pass the operator it was deblurred with")
    level = k * noise / _psf_norms(operator).l2
    arr = arr if isinstance(arr, da.Array) else da.from_array(arr.astype(np.float32, copy=False), chunks=2048)
    ext = da.overlap.overlap(arr, depth=1, boundary=0)  # a pixel of the neighbours decides a maximum
    offsets = [np.cumsum((0,) + c[:-1]) for c in arr.chunks]

    def block(b, oy, ox):
        from scipy import ndimage
        from skimage.feature import peak_local_max

        # A fixed-order 3x3 sum: uniform_filter's running sums round differently with the position in
        # the block, so amplitudes would depend on the chunking in the last bit.
        mass = ndimage.correlate(b.astype(np.float64), np.ones((3, 3)), mode="constant")
        pk = peak_local_max(b, min_distance=1, threshold_abs=1e-12, exclude_border=1)
        pk = pk[mass[pk[:, 0], pk[:, 1]] >= level]
        # NaN is no maximum: its pixels would be skipped in silence (checked in the same read as the search)
        return np.column_stack([pk[:, 0] - 1 + oy, pk[:, 1] - 1 + ox, mass[pk[:, 0], pk[:, 1]]]), np.isfinite(b).all()

    blocks = ext.to_delayed()
    parts = [dask.delayed(block)(blocks[i, j], offsets[0][i], offsets[1][j])
             for i in range(blocks.shape[0]) for j in range(blocks.shape[1])]
    results = dask.compute(*parts)
    if not all(ok for _, ok in results):
        raise non_finite("sparse")
    found = np.concatenate([f for f, _ in results] or [np.zeros((0, 3))])
    h, w = arr.shape
    found = found[(found[:, 0] > 0) & (found[:, 0] < h - 1) & (found[:, 1] > 0) & (found[:, 1] < w - 1)]
    found = _one_per_plateau(found)
    return found[np.argsort(-found[:, 2], kind="stable")] if len(found) else np.zeros((0, 3))


def _one_per_plateau(found):
    """One maximum per plateau: maxima that touch (8-connected) are equal pixels of one source (500 and
    500 on two pixels, which each reported with the 3x3 sum of both), kept where that sum is largest
    (a tie: the first in (y, x) order). Across blocks too, so any chunking finds the same."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if len(found) < 2:
        return found
    pairs = cKDTree(found[:, :2]).query_pairs(1.5, output_type="ndarray")
    if not len(pairs):
        return found
    n = len(found)
    _, label = connected_components(coo_matrix((np.ones(len(pairs)), pairs.T), shape=(n, n)), directed=False)
    order = np.lexsort((found[:, 1], found[:, 0], -found[:, 2]))  # largest sum first, then (y, x)
    _, first = np.unique(label[order], return_index=True)
    return found[np.sort(order[first])]
