"""Bead PSFs from a micro-bead image (paper 003 App. A and B).

Detection as maxima of the Laplacian of a smoothed image, rejection of beads near the border or near
another bead, sub-pixel centring by correlation with a Gaussian, bicubic re-sampling, background
removal by a polynomial fitted outside the PSF disk, a radial bump between r and 1.2r, and
normalisation to unit sum.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .._validate import (LsfovWarning, as_image, non_finite, positions_yx, positive_int, real_number, real_numbers,
                         saturation_level, yx_last)

__all__ = ["BeadPSFs", "bead_psfs", "detect_beads", "estimate_radius", "extract_psfs", "patch_size", "radial_bump",
           "remove_background"]

EXT = 1.2  # r_ext = 1.2 r (App. A-d)


@dataclass
class BeadPSFs:
    """Isolated, centred, background-free bead PSFs of one image (:func:`bead_psfs`).

    Attributes
    ----------
    patches : ndarray (M, K, K) float32
        The bead PSFs, each summing to one, the PSF centre at K//2.
    positions : ndarray (M, 2) float64
        Sub-pixel (y, x) centres of the beads in the image.
    radius : float
        The PSF radius bound r used, in pixels.
    shape : tuple of int
        The image shape (H, W).
    n_detected : int
        Bead candidates detected (maxima above the threshold), hot pixels aside.
    n_saturated : int
        Candidates left out as saturated.
    n_crowded : int
        Candidates left out (saturated ones aside) as closer than 2r to another object or than
        K//2 + 2 pixels to the border.
    fluxes : ndarray (M,) float32 or None
        Each patch's sum before normalisation: the bead's brightness in the image's units.
    n_hot : int
        Bright spots that were a camera's hot pixels (one pixel far brighter than its neighbours,
        unlike a bead, see :data:`HOT`), set to the median of their neighbours before the beads
        were found again.
    """

    patches: np.ndarray
    positions: np.ndarray
    radius: float
    shape: tuple
    n_detected: int
    n_saturated: int
    n_crowded: int
    fluxes: np.ndarray | None = None
    n_hot: int = 0

    @property
    def size(self) -> int:
        """Patch size K in pixels (odd)."""
        return int(self.patches.shape[-1])


def patch_size(radius: float) -> int:
    """Odd patch size holding the disk of radius ``r_ext = 1.2 r`` (the bump's support)."""
    return 2 * int(math.ceil(EXT * radius)) + 1


def radial_bump(size: int, radius: float) -> np.ndarray:
    """The multiplier of App. A-d: 1 inside ``r``, 0 beyond ``1.2 r``, a smooth bump between.

    Parameters
    ----------
    size : int
        Patch size K in pixels (>= 1); the centre is at K//2.
    radius : float
        The radius r in pixels (> 0).

    Returns
    -------
    ndarray (K, K) float32
        The bump, in [0, 1], a function of the distance to the centre.
    """
    size, radius = positive_int(size, "size"), real_number(radius, "radius", minimum=0, exclusive=True)
    c = size // 2
    yy, xx = np.mgrid[:size, :size] - c
    t = np.hypot(yy, xx)
    s = np.clip((t - radius) / ((EXT - 1) * radius), 0.0, 1.0)
    with np.errstate(divide="ignore", over="ignore"):
        m = np.exp(1.0 - 1.0 / np.maximum(1.0 - s**2, 1e-300))
    m[t <= radius] = 1.0
    m[t >= EXT * radius] = 0.0
    return m.astype(np.float32)


def _monomials(size: int, order: int) -> np.ndarray:
    c = size // 2
    yy, xx = (np.mgrid[:size, :size] - c) / max(c, 1)
    cols = [yy**i * xx**j for i in range(order + 1) for j in range(order + 1 - i)]
    return np.stack([m.ravel() for m in cols], axis=1)  # (K*K, P)


def remove_background(patches, radius: float, order: int = 2) -> np.ndarray:
    """Subtract from each patch the polynomial of degree ``order`` fitted outside the disk of ``radius``.

    App. B, Eq. 8: least squares on the pixels farther than ``radius`` from the patch centre, where
    the PSF is dominated by noise. All patches share the design matrix, so one pseudo-inverse
    serves the whole stack.

    Parameters
    ----------
    patches : array_like (M, K, K) or (K, K)
        K odd, the PSF centred at K//2.
    radius : float
        PSF radius r: at least ``(order+1)(order+2)`` pixels of the patch (twice the number of
        monomials) must lie farther than r from its centre, so that the fit is overdetermined.
    order : int
        Polynomial degree, >= 0 (2: the monomials 1, x, y, xy, x², y²).

    Returns
    -------
    ndarray, same shape as ``patches``, float32
        The patches minus their fitted backgrounds.

    Raises
    ------
    ValueError
        If ``order`` is not an integer >= 0, ``patches`` is not (M, K, K) or (K, K) with K odd or
        holds NaN or Inf, ``radius`` is negative, or too few pixels lie outside ``radius``.
    TypeError
        If ``patches`` are not real numbers or ``radius`` is not a number.
    """
    p = real_numbers(patches, "patches", np.float32)  # (complex once lost its imaginary part)
    order = positive_int(order, "background order", minimum=0)
    single = p.ndim == 2
    p = p[None] if single else p
    if p.ndim != 3 or p.shape[1] != p.shape[2] or p.shape[1] % 2 == 0 or not p.size:
        raise ValueError(f"patches must have shape (M, K, K) with K odd and M >= 1, got {np.shape(patches)}")
    if not np.isfinite(p).all():  # (one NaN would spread through its patch's fit)
        raise non_finite("patches")
    radius = real_number(radius, "radius", minimum=0)
    k = p.shape[-1]
    c = k // 2
    yy, xx = np.mgrid[:k, :k] - c
    out = (np.hypot(yy, xx) > radius).ravel()
    mono = _monomials(k, order)
    if out.sum() < 2 * mono.shape[1]:
        raise ValueError(f"radius {radius} leaves too few background pixels in a {k}x{k} patch; use a larger patch")
    flat = p.reshape(len(p), -1).astype(np.float64)
    coef = np.linalg.pinv(mono[out]) @ flat[:, out].T  # (P, M)
    res = (flat - (mono @ coef).T).astype(np.float32).reshape(p.shape)
    return res[0] if single else res


def _log_response(image, radius):
    """Blob response: minus the Laplacian of the image smoothed at the PSF core's scale."""
    sigma = max(1.0, radius / 4.0)
    return -ndimage.gaussian_laplace(image, sigma) * sigma**2, sigma


def _robust_threshold(resp, k=8.0):
    sample = resp[:: max(1, resp.shape[0] // 512), :: max(1, resp.shape[1] // 512)]
    med = float(np.median(sample))
    mad = 1.4826 * float(np.median(np.abs(sample - med)))
    return med + k * max(mad, 1e-12 * max(abs(med), 1.0))


def detect_beads(image, radius: float, threshold: float | None = None) -> np.ndarray:
    """Bead candidates: maxima of the smoothed negative Laplacian above ``threshold`` (App. A-a).

    Parameters
    ----------
    image : array_like (H, W)
        The bead image: NumPy, or any array read into memory as one (xarray by its dims' names);
        non-negative intensities (negative pixels are clipped to 0 with a warning), no NaN or Inf.
    radius : float
        PSF radius bound r in pixels, at least 2: the smoothing scale is σ = ``max(1, r/4)`` and
        two candidates are at least ``max(1, int(r // 2))`` pixels apart.
    threshold : float, optional
        On the response ``-σ² ∇²(G_σ * image)``, > 0. Default: median + 8 robust standard deviations
        of the response (the background's noise level, measured by the MAD).

    Returns
    -------
    ndarray (P, 2) of int
        (y, x) pixel positions, brightest first.

    Raises
    ------
    ValueError
        If ``radius`` is not a number of at least 2 pixels, ``threshold`` is not > 0, or ``image``
        is not 2-D, is empty, holds NaN or Inf, or has no positive pixel.
    TypeError
        If ``image`` is a file name or not numeric, or ``threshold`` is not a number.
    """
    return _maxima(as_image(image, "bead image"), radius, threshold)[0]


def _maxima(img, radius, threshold):
    """Bead candidates (maxima at least r/2 apart) of a float32 image, every maximum of the response
    (two beads closer than r/2 make one candidate but two maxima, which the isolation test must
    see), and the response."""
    from skimage.feature import peak_local_max

    radius = _check_radius(radius)
    resp, _ = _log_response(img, radius)
    thr = _robust_threshold(resp) if threshold is None else real_number(threshold, "threshold", minimum=0,
                                                                           exclusive=True)
    every = peak_local_max(resp, min_distance=1, threshold_abs=thr, exclude_border=False)
    pos = peak_local_max(resp, min_distance=max(1, int(radius // 2)), threshold_abs=thr, exclude_border=False)
    return pos, every, resp


#: A maximum is another object than a candidate only where the response between them dips below
#: this share of the lower of their peaks: the maxima along the ridge of one elongated (astigmatic,
#: defocused) bead do not, and made it its own crowd; two beads 5 px apart at r = 8 px do.
SADDLE = 0.9


def _crowded(pos, every, resp, radius):
    """Whether each candidate has another object's maximum within 2r (App. A-b): a maximum farther
    than 1.5 px (a bead midway between pixels ties two) with a dip in the response on the way."""
    crowded = np.zeros(len(pos), bool)
    if not len(pos) or not len(every):
        return crowded
    # every (candidate, maximum) pair within 2r, at once (a textured image has thousands)
    near = cKDTree(pos).sparse_distance_matrix(cKDTree(every), 2 * radius, output_type="ndarray")
    near = near[near["v"] > 1.5]
    if not len(near):
        return crowded
    i, j = near["i"], near["j"]
    a, b = pos[i].astype(np.float64), every[j].astype(np.float64)
    n = np.ceil(2 * np.hypot(*(b - a).T)).astype(int) + 1  # samples every half pixel along each segment
    k = np.repeat(np.arange(len(i)), n)
    first = np.r_[0, np.cumsum(n)[:-1]]
    t = (np.arange(n.sum()) - first[k]) * (1.0 / (n - 1))[k]  # each segment's np.linspace(0, 1, n)
    t[first + n - 1] = 1.0
    line = ndimage.map_coordinates(resp, (a[k] + t[:, None] * (b[k] - a[k])).T, order=1)
    low = np.minimum.reduceat(line, first)
    peaks = np.minimum(resp[tuple(pos[i].T)], resp[tuple(every[j].T)])
    crowded[i[low < SADDLE * peaks]] = True
    return crowded


#: Beads are split at a detection scale where they number more than this times those at the scale
#: of the radius they give (see :func:`estimate_radius`).
SPLIT = 1.4


def estimate_radius(image, *, level: float = 0.01, max_radius: int = 40) -> float:
    """An upper bound r on the PSF radius, from the profiles of the brightest beads.

    Each bead's azimuthal profile (aligned at its maximum, background removed, peak-normalised) is
    read on the pixels nearer to it than to any other bead found, so that a neighbour (a bead array)
    is not taken for a tail. The median profile of the beads of each ninth of the field (3 x 3
    regions, those with 3 beads or more) falls below ``level`` of its peak at a radius; r is the
    largest of these, plus one pixel, at least 3 pixels: the PSF of the field's widest region, as
    App. A-b asks of r (a median over the whole field is the typical PSF's, and cut the tails of
    the widest).

    Beads are detected at the finest scale that finds them (4, 8, 16 or 32 px, as
    :func:`detect_beads`' ``radius``), then, as long as the scale of the radius they give finds
    fewer than 1/1.4 as many, at that scale: an astigmatic or defocused PSF wider than the scale
    shows several maxima there (its lobes, its rings), each read as a bead whose profile the others
    cut short.

    Parameters
    ----------
    image : array_like (H, W)
        The bead image.
    level : float
        In (0, 1]: the fraction of a profile's peak below which its tail is taken as ended.
    max_radius : int
        The largest radius it gives, >= 3 px; beads nearer than that to the border are not read.

    Returns
    -------
    float
        The radius r in pixels, in [3, ``max_radius``].

    Raises
    ------
    ValueError
        If ``level`` or ``max_radius`` is out of range, or no beads are found (or all are crowded).
    """
    level = real_number(level, "level", minimum=0, maximum=1, exclusive=True)  # a fraction of the peak
    h = positive_int(max_radius, "max_radius", minimum=3)  # (the smallest radius it gives)
    img = as_image(image, "bead image")
    # Detect at the finest scale that finds beads: wide, dim (defocused) beads are lost in the noise
    # at 4 px but stand out at a coarser one.
    scales = [r for r in (4.0, 8.0, 16.0, 32.0) if r <= max(h, 4)]
    for s in scales:
        every = _no_hot_pixels(img, detect_beads(img, s))
        if np.all((every >= h) & (every < np.array(img.shape) - h), axis=1).any():
            break
    else:
        raise ValueError(f"no beads found to measure the PSF radius (at detection scales of "
                         f"{', '.join(f'{r:g}' for r in scales)} px, none at least {h} px from the border): check the "
                         "image, or give the PSF radius in pixels (--radius; radius=)")
    radius = _profile_radius(img, every, h, level)
    # A PSF wider than the detection scale (astigmatic, defocused) has several maxima at that
    # scale, its lobes or rings: each was read as a bead whose profile the others cut short
    # (r = 8 px for beads 17 px wide). Then the scale of r, at which such a bead is one maximum,
    # finds far fewer beads (2-5x; beads 2r apart stay apart, and it finds 1.1-1.25x fewer in
    # fields of round PSFs 50 px apart): read the profiles there.
    while (coarser := [c for c in scales if c >= radius and c > s]):
        wide = _no_hot_pixels(img, detect_beads(img, coarser[0]))
        if len(every) <= SPLIT * len(wide):
            break
        s, every = coarser[0], wide
        radius = max(radius, _profile_radius(img, every, h, level, quiet=True))
    return max(3.0, min(radius, float(max_radius)))


def _profile_radius(img, every, h, level, quiet=False):
    """The largest of the 3 x 3 regions' radii at which their median bead profile falls below
    ``level`` of its peak, plus one pixel (see :func:`estimate_radius`), for the beads ``every``
    found at one scale; 0 where ``quiet`` and none is read."""
    pos = every[np.all((every >= h) & (every < np.array(img.shape) - h), axis=1)]
    pos = pos[:200]  # the brightest; the medians below ignore the neighbours some of them have
    win = _windows(img, pos, h).astype(np.float64)
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    own = np.hypot(yy, xx)
    # Each window's pixels nearer to its bead than to another (its Voronoi cell: its own distance
    # is the nearest detection's, ties kept), and the nearest other bead's distance, which bounds
    # where the background is read. One tree query for all windows: a textured image has thousands
    # of detections near each window, too many to compare pixel by pixel.
    tree = cKDTree(every)
    nearest = tree.query((pos[:, None, None] + np.stack([yy, xx], -1)).reshape(-1, 2))[0]
    mine = own <= nearest.reshape(win.shape) + 1e-6  # (distinct distances differ by > 1/(3h) here)
    near = tree.query(pos, k=2)[0][:, 1]  # (inf when alone)
    # Background: the plane through each window's own pixels beyond 3/4 of h (or of half the way to
    # its nearest neighbour), fitted on those only.
    edge = 0.75 * np.minimum(h, near / 2)
    a = np.stack([np.ones_like(own), yy / h, xx / h]).reshape(3, -1).T
    t = np.rint(own).astype(int).ravel()
    profiles = np.full((len(pos), h + 1), np.nan)
    for i in range(len(pos)):
        fit = (mine[i] & (own > edge[i])).ravel()
        if fit.sum() < 12:  # too crowded to read a background: not this bead
            continue
        w = win[i].ravel()
        w = w - a @ np.linalg.lstsq(a[fit], w[fit], rcond=None)[0]
        keep = mine[i].ravel()
        n = np.bincount(t[keep], minlength=h + 1)[: h + 1]
        ring = np.bincount(t[keep], w[keep], minlength=h + 1)[: h + 1] / np.maximum(n, 1)
        profiles[i] = np.where(n > 0, ring / max(w[t == 0][0], 1e-12), np.nan)
    read = ~np.isnan(profiles[:, 0])
    if not read.any():
        if quiet:
            return 0.0
        raise ValueError("the beads found are too crowded to measure the PSF radius; give it in pixels (--radius; "
                         "radius=)")
    # Regions of the field (3 x 3), each its median profile where it has 3 beads or more; else the whole field's.
    cell = (np.minimum(pos * 3 // np.array(img.shape), 2) * [3, 1]).sum(axis=1)
    groups = [read & (cell == c) for c in range(9)]
    groups = [g for g in groups if g.sum() >= 3] or [read]
    radii = []
    for g in groups:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (a ring no bead of the group owns)
            prof = np.nanmedian(profiles[g], axis=0)
        below = np.nonzero(prof < level * prof[0])[0]
        radii.append(float(below[0]) + 1.0 if len(below) else float(h))
    return max(radii)


#: A candidate is a hot pixel where its peak stands above its brightest neighbour (local background
#: removed) more than this times the candidates' lower quartile of that ratio, more than 5 times,
#: and by more than 5 times the noise: a PSF sampled by its pixels spreads onto them (1.1-1.9 for beads at 0.1 µm,
#: NA 1.1-1.4; 1.9-3.4 at 0.2 µm) where a hot pixel stands alone (13-36 above a background of 20).
HOT = 4.0


def _hot_pixels(img, pos):
    """Which candidates are single bright pixels, and each one's pixel: the brightest of the 3 x 3
    around it, over the brightest of its own 8 neighbours, each less the median of the 5 x 5
    window's border, against the candidates' lower quartile."""
    lim = np.array(img.shape) - 3
    p = np.clip(pos, 2, lim)
    best = _windows(img, p, 1).reshape(len(p), 9).argmax(axis=1)
    q = np.clip(p + np.stack(divmod(best, 3), axis=1) - 1, 2, lim)
    w = _windows(img, q, 2).astype(np.float64)
    border = np.concatenate([w[:, 0], w[:, -1], w[:, 1:-1, 0], w[:, 1:-1, -1]], axis=1)
    level = np.median(border, axis=1)
    noise = 1.4826 * np.median(np.abs(border - level[:, None]), axis=1)
    core = w[:, 1:4, 1:4].reshape(len(w), 9) - level[:, None]
    peak, side = core[:, 4], np.delete(core, 4, axis=1).max(axis=1)
    # (no neighbour above the background under a peak above it: a pixel alone)
    ratio = np.where(side > 0, peak / np.where(side > 0, side, 1.0), np.where(peak > 0, np.inf, 0.0))
    # the pixel stands out of the noise, not only by a ratio of two noisy numbers (a dim bead's or a
    # defocused ring's dark centre); the quartile, as hot pixels may outnumber the beads
    hot = (ratio > 5.0) & (ratio > HOT * np.percentile(ratio, 25)) & (peak - side > 5 * noise)
    return hot, q


def _no_hot_pixels(img, pos):
    """The candidates that are not hot pixels (a hot pixel's profile ends at once)."""
    return pos[~_hot_pixels(img, pos)[0]] if len(pos) else pos


def _check_radius(radius) -> float:
    if isinstance(radius, (bool, np.bool_, str, bytes)):  # (float() reads "3" and True)
        raise ValueError(f"radius must be a number of pixels, got {radius!r}")
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise ValueError(f"radius must be a number of pixels, got {radius!r}") from None
    if not (np.isfinite(r) and r >= 2):
        raise ValueError(f"radius must be at least 2 pixels, got {radius!r}")
    return r


def _windows(img, pos, h):
    """(P, 2h+1, 2h+1) windows of ``img`` around integer positions (all inside the image)."""
    off = np.arange(-h, h + 1)
    return img[pos[:, 0, None, None] + off[None, :, None], pos[:, 1, None, None] + off[None, None, :]]


def _subpixel_centres(img, pos, h, sigma):
    """Centres of maximal correlation with a Gaussian of width ``sigma`` (App. A-c), near ``pos``.

    The correlation is computed on integer windows; its maximum is refined by the vertex of the
    quadratic through the maximum and its 3x3 neighbours, cross term included: parabolas along each
    axis alone miss the maximum of a tilted, elongated (astigmatic) bead by 0.1-0.3 px.
    """
    win = _windows(img, pos, h).astype(np.float64)
    corr = ndimage.gaussian_filter(win, (0, sigma, sigma), mode="nearest")
    m = max(1, int(h // 2))
    core = corr[:, h - m : h + m + 1, h - m : h + m + 1]
    flat = core.reshape(len(core), -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, core.shape[1:])
    iy, ix = np.clip(iy + h - m, 1, 2 * h - 1), np.clip(ix + h - m, 1, 2 * h - 1)
    n = np.arange(len(win))

    def f(a, b):
        return corr[n, iy + a, ix + b]

    g = np.stack([f(1, 0) - f(-1, 0), f(0, 1) - f(0, -1)], axis=1) / 2  # gradient and Hessian, central
    hyy, hxx = f(1, 0) - 2 * f(0, 0) + f(-1, 0), f(0, 1) - 2 * f(0, 0) + f(0, -1)
    hxy = (f(1, 1) - f(1, -1) - f(-1, 1) + f(-1, -1)) / 4
    det = hyy * hxx - hxy**2
    peak = (hyy < 0) & (det > 0)  # a maximum: the vertex -H⁻¹g; else none (the integer position)
    det = np.where(peak, det, 1.0)
    d = -np.stack([hxx * g[:, 0] - hxy * g[:, 1], hyy * g[:, 1] - hxy * g[:, 0]], axis=1) / det[:, None]
    d = np.where(peak[:, None], d, 0.0).clip(-1, 1)
    return np.stack([pos[:, 0] + iy - h + d[:, 0], pos[:, 1] + ix - h + d[:, 1]], axis=1)


def bead_psfs(image, radius: float | None = None, *, threshold: float | None = None,
              saturation: float | None = None, background_order: int = 2) -> BeadPSFs:
    """Isolated bead PSFs of a micro-bead image, ready for PCA (paper 003 App. A and B).

    Parameters
    ----------
    image : array_like (H, W)
        Micro-bead image (any numeric type; a camera offset is removed by the background fit).
    radius : float, optional
        Upper bound r on the PSF radius in pixels, at least 2. Default: :func:`estimate_radius`.
    threshold : float, optional
        Detection threshold on the blob response (see :func:`detect_beads`).
    saturation : float, optional
        Pixel value at which the camera saturates. Default: the largest count of an integer image's
        dtype, or of its ``significant_bits`` attribute (an OME-TIFF's, :func:`lsfov.open_image`); for
        all images, a plateau of four or more pixels at the image maximum (in the 3x3 core) also counts.
    background_order : int
        Degree of the background polynomial (App. B uses 2).

    Returns
    -------
    BeadPSFs
        Patches of size ``2·ceil(1.2 r) + 1``, centred at the sub-pixel bead centre, background
        removed, bump-limited and summing to one.

    Raises
    ------
    ValueError
        If the image holds NaN or Inf or is smaller than one patch, ``radius`` is under 2 pixels, no
        bead is found, every bead is saturated, or none is isolated (also from
        :func:`estimate_radius` when ``radius`` is not given).

    Examples
    --------
    The PSFs of a simulated bead image, ready for :func:`lsfov.calibrate.psf_basis`:

    >>> from lsfov import simulate
    >>> from lsfov.calibrate import bead_psfs
    >>> field = simulate.bead_field((256, 256), seed=0)
    >>> beads = bead_psfs(field.image)  # radius measured on the brightest beads
    >>> beads.patches.shape[1:] == (beads.size, beads.size)
    True
    >>> bool(np.allclose(beads.patches.sum(axis=(1, 2)), 1))  # each PSF sums to one
    True
    >>> beads.n_detected, len(beads.patches)  # candidates, and the isolated beads kept
    (27, 21)
    """
    image = yx_last(image, "bead image")
    sat_level = saturation_level(image, saturation)  # of the camera's counts, before the float copy
    # Not clipped at 0: a camera offset subtracted beforehand leaves negative noise in the PSF's
    # wings, whose light the background fit removes; clipped, the wings kept only its positive half.
    img = as_image(np.asarray(image), "bead image", check_values=False)
    if not np.isfinite(img).all():
        raise non_finite("bead image", np.asarray(image))
    if img.min() < 0 and not img.max() > 0:
        raise ValueError(f"bead image has no positive pixel (max {float(img.max()):g}); is it background-subtracted "
                         "twice?")
    background_order = positive_int(background_order, "background_order", minimum=0)
    if radius is None:
        radius = estimate_radius(np.maximum(img, 0))
    radius = _check_radius(radius)
    k = patch_size(radius)
    h = k // 2
    if min(img.shape) < k + 2:
        raise ValueError(f"bead image {img.shape} is smaller than one bead patch ({k}x{k}); use a smaller radius")
    pos, every, resp = _maxima(img, radius, threshold)
    if len(pos) == 0:
        raise ValueError("no beads found: the image has no bright spots above the threshold; "
                         "check the image, or lower the detection threshold (threshold=; --threshold of lsfov calibrate "
                         "or bss)")
    n_detected = len(pos)

    # A camera's hot pixels: taken for beads, their delta patches entered the PCA as PSFs (40 in a
    # 512² field of 113 beads: the operator 84 % off, not 12 %), and left in, they crowd the beads
    # near them. Each is set to the median of its 8 neighbours (a camera's defect correction), and
    # the beads are found again (until no hot pixel is left: one hides another within r/2).
    n_hot = 0
    for _ in range(8):
        hot, at = _hot_pixels(img, pos)
        if not hot.any():
            break
        at = at[hot]
        img = img.copy() if not n_hot else img  # (as_image may hand back the caller's array)
        n_hot += len(at)
        ring = _windows(img, at, 1).reshape(len(at), 9)
        img[at[:, 0], at[:, 1]] = np.median(np.delete(ring, 4, axis=1), axis=1)
        pos, every, resp = _maxima(img, radius, threshold)  # (never none: the lower quartile is no hot pixel)
        n_detected = len(pos)

    # Saturated beads: their core is clipped, so the PSF shape is wrong.
    peak = float(img.max())
    core = _windows(img, np.clip(pos, 1, np.array(img.shape) - 2), 1)
    saturated = (core >= peak).sum(axis=(1, 2)) >= 4
    if sat_level is not None:
        saturated |= core.max(axis=(1, 2)) >= sat_level
    n_saturated = int(saturated.sum())

    # Isolation (App. A-b): 2r from every other object's maximum (also one merged into this
    # detection), patch (and cubic margin) inside the image.
    inside = np.all((pos >= h + 2) & (pos < np.array(img.shape) - h - 2), axis=1)
    crowded = _crowded(pos, every, resp, radius)
    keep = inside & ~crowded & ~saturated
    n_crowded = int((~(inside & ~crowded) & ~saturated).sum())
    if not keep.any():
        if n_saturated == n_detected:
            limit = f"at or above {sat_level:g}, or a plateau at the image's maximum" if sat_level is not None else \
                "a plateau at the image's maximum"
            raise ValueError(f"all {n_detected} beads are saturated ({limit}); acquire with a shorter exposure or "
                             "lower gain, or give the camera's own level (saturation=, --saturation)")
        raise ValueError(
            f"found {n_detected} beads but none is isolated (2r = {2 * radius:g} px from the others and "
            f"{h + 2} px from the border); use a sparser bead sample or a smaller radius"
        )
    if n_saturated:
        warnings.warn(f"{n_saturated} of {n_detected} beads are saturated and were left out", LsfovWarning,
                      stacklevel=2)
    if n_hot:
        warnings.warn(f"{n_hot} of {n_detected + n_hot} bright spots are single pixels (a camera's hot pixels): "
                      "each was set to the median of its neighbours; a dark frame subtracted beforehand removes them",
                      LsfovWarning, stacklevel=2)
    isolated = int((inside & ~crowded).sum())  # saturation aside: that has its own warning
    if isolated < 0.05 * n_detected:  # a textured image, or a bead sample too dense to calibrate from
        warnings.warn(f"only {isolated} of {n_detected} bright spots are isolated beads: is this an image of "
                      "sparse sub-resolution beads? A denser sample calibrates poorly; use a sparser one",
                      LsfovWarning, stacklevel=2)
    pos = pos[keep]

    patches, centres = extract_psfs(img, pos, radius, background_order=background_order)
    sums = patches.sum(axis=(1, 2))
    ok = sums > 0
    if not ok.any():
        raise ValueError("no bead stands above the background; check the image or lower threshold= (--threshold)")
    # Unit sum: the operators preserve flux. (Sec. II-E-b's option, PSFs times the local background as
    # an illumination loss, is not taken.)
    patches = patches[ok] / sums[ok, None, None]
    return BeadPSFs(patches=patches, positions=centres[ok], radius=radius, shape=img.shape,
                    n_detected=n_detected, n_saturated=n_saturated, n_crowded=n_crowded, fluxes=sums[ok],
                    n_hot=n_hot)


def extract_psfs(image, positions, radius: float, *, background_order: int = 2):
    """Centred, background-free, bump-limited patches of the beads near ``positions`` (App. A-c/d, B).

    Each position (rounded to a pixel) is refined to the maximum of the correlation with a Gaussian
    of width ``max(1, r/4)``, and the patch is re-sampled bicubically around it. Patches are not normalised.

    Parameters
    ----------
    image : array_like (H, W)
        The bead image (NumPy, or xarray read by its dims' names).
    positions : array_like (P, 2)
        Approximate (y, x) bead centres, at least ``patch_size(radius) // 2 + 2`` px from the border.
    radius : float
        The PSF radius r in pixels: patches are ``patch_size(radius)`` wide, limited by a bump of it.
    background_order : int
        Degree of the polynomial background fitted outside the radius (:func:`remove_background`).

    Returns
    -------
    patches : ndarray (P, K, K) float32
        The patches, ``K = patch_size(radius)``, background removed and limited by the bump, not normalised.
    centres : ndarray (P, 2) float64
        The refined sub-pixel (y, x) centres.

    Raises
    ------
    ValueError
        If the image holds NaN or Inf, ``radius`` is under 2 pixels, or a position lies nearer than
        ``patch_size(radius) // 2 + 2`` px to the border.
    """
    img = np.asarray(as_image(image, "image", check_values=False))  # (a background-subtracted image may dip below 0)
    if not np.isfinite(img).all():
        raise non_finite("image")
    radius = _check_radius(radius)
    k = patch_size(radius)
    h = k // 2
    pos = np.rint(positions_yx(positions)).astype(int)
    if np.any(pos < h + 2) or np.any(pos >= np.array(img.shape) - h - 2):
        raise ValueError(f"bead positions must lie at least {h + 2} px inside the image {img.shape}")
    centres = _subpixel_centres(img, pos, h + 1, sigma=max(1.0, radius / 4.0))
    off = np.arange(-h, h + 1, dtype=np.float64)
    yy = centres[:, 0, None, None] + off[None, :, None]
    xx = centres[:, 1, None, None] + off[None, None, :]
    yy, xx = np.broadcast_arrays(yy, xx)
    # order=3: cubic B-spline (prefiltered), the "bicubic" resampling of App. A-c.
    patches = ndimage.map_coordinates(img, [yy, xx], order=3, mode="nearest").astype(np.float32)
    return remove_background(patches, radius, background_order) * radial_bump(k, radius), centres
