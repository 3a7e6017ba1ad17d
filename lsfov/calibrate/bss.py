"""Blind identification of an operator from the point sources of one image (paper 003 App. D-a).

With a subspace of operators learned beforehand, an image's blur has I·J unknowns, and a handful of
isolated point sources fixes them: each source at z_p gives coefficients ``c_p = ⟨p_p, h_i⟩`` that
the model predicts as ``g_p Σ_j Γ[i, j] a_j(z_p)`` with an unknown brightness g_p ≥ 0 (Eq. 10).
"""
from __future__ import annotations

import warnings

import numpy as np

from .._validate import LsfovWarning, as_image, boolean, check_pixel_size, non_finite, positive_int, saturation_level
from .beads import bead_psfs, extract_psfs, patch_size
from .subspace import OperatorSubspace

__all__ = ["identify_operator"]


def _project_weighted_simplex(v, w):
    """Projection of v onto {λ ≥ 0, wᵀλ = 1} (w > 0): λ = max(v − τw, 0) with τ found by bisection."""
    lo = float(np.min((v - 1.0 / w.sum()) / w)) - 1.0  # here Σ w·max(v − τw, 0) > 1
    hi = float(np.max(v / w))  # here it is 0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.dot(w, np.maximum(v - mid * w, 0.0)) > 1.0:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - hi * w, 0.0)


def _radius_for(subspace: OperatorSubspace) -> float:
    k = subspace.psf_basis.shape[-1]
    r = float(subspace.attrs.get("radius_px") or (k // 2) / 1.2)
    if patch_size(r) != k:  # a subspace from elsewhere: a radius whose patches are K wide
        r = (k // 2) / 1.2 * (1 - 1e-9)  # just below: ceil(1.2 r) must not round up past K // 2
    if patch_size(r) != k or r < 2:  # (bead patches start at 7x7: a radius of 2 pixels)
        raise ValueError(f"cannot match the subspace's {k}x{k} kernels with bead patches (odd, {patch_size(2)}x"
                         f"{patch_size(2)} or more); learn it with lsfov")
    return r


def identify_operator(image, subspace: OperatorSubspace, positions=None, *, threshold: float | None = None,
                      saturation: float | None = None, iterations: int = 200, return_details: bool = False):
    """The operator of the subspace that explains the point sources of ``image`` (paper 003 Eq. 10).

    Minimises ``½ Σ_p ‖g_p Γ a(z_p) − c_p‖²`` over the source brightnesses g ≥ 0 and over Γ in the
    conical hull of the training Γ_k with ``⟨Γ, Γ0⟩ = 1`` (Γ0: the mean direction of the cone; the
    constraint removes the scale shared by g and Γ), alternating the exact g step (one non-negative
    scalar per source) with an accelerated projected gradient over the cone's weights. The result
    is rescaled so that its PSFs sum to one on average over the sources.

    Parameters
    ----------
    image : array_like (H, W)
        Blurred image with isolated point sources (beads), of the subspace's shape.
    subspace : OperatorSubspace
        The microscope's subspace of operators (:func:`lsfov.learn_subspace`), learned on bead
        images of this shape.
    positions : array_like (P, 2), optional
        (y, x) pixel positions of isolated sources; default: detected as in :func:`bead_psfs`.
    threshold : float, optional
        Detection threshold (see :func:`lsfov.calibrate.detect_beads`).
    saturation : float, optional
        Pixel value at which the camera saturates: detected sources that reach it are left out, as
        in :func:`bead_psfs` (default: the largest count of an integer image's type, or of its
        ``significant_bits``). Not applied to given ``positions``.
    iterations : int
        Alternations of the g and Γ steps (each Γ step: up to 200 accelerated gradient steps).
    return_details : bool
        Also return a dict of the fit (see Returns).

    Returns
    -------
    ProductConvolution
        Basis operator ``subspace.operator(Γ)``; its ``attrs`` add ``n_sources`` and ``gamma``.
        With ``return_details=True``, the tuple ``(op, details)``, ``details`` a dict of:

        - ``gamma``: float64 (I, J), the Γ of ``op`` (scaled to unit mean PSF sum over the sources);
        - ``amplitudes``: float64 (P,), each source's brightness (its light in the image's units);
        - ``positions``: float64 (P, 2), the sub-pixel (y, x) centres of the sources used (those
          of the beads detected and kept, or the given ``positions`` refined);
        - ``residual``: float, relative misfit ``‖g Γ a − c‖ / ‖c‖`` of the sources' coefficients
          (above 0.3 a warning says the subspace explains them poorly).

    Raises
    ------
    TypeError
        If ``subspace`` is not an :class:`OperatorSubspace`.
    ValueError
        If ``image`` is not of the subspace's shape or holds NaN or Inf, fewer than ``n_space``
        isolated sources are found (or given), or a given position lies too near the border.

    Examples
    --------
    A subspace learned from five bead images of one microscope identifies the blur of a sixth image
    from its point sources:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> from lsfov.calibrate import operator_distance
    >>> fields = simulate.bead_stack(6, (256, 256), seed=0)
    >>> sub = lsfov.learn_subspace([f.image for f in fields[:5]], n_psf=5, n_space=4)
    >>> op, details = lsfov.identify_operator(fields[5].image, sub, return_details=True)
    >>> op.shape, len(details["positions"]) >= sub.n_space
    ((256, 256), True)
    >>> operator_distance(op, fields[5].operator) < 0.3  # error on a Dirac comb
    True
    """
    if not isinstance(subspace, OperatorSubspace):
        raise TypeError("subspace must be an lsfov.OperatorSubspace (learn one with lsfov.learn_subspace, "
                        "or load one with OperatorSubspace.load)")
    iterations = positive_int(iterations, "iterations")
    return_details = boolean(return_details, "return_details")
    check_pixel_size(subspace, image, "the subspace was learned on")
    level = saturation_level(image, saturation)  # of the camera's counts, before the float copy below
    img = as_image(image, "image", check_values=False)  # negative pixels are fine: patches are fitted, not divided
    if not np.all(np.isfinite(img)):
        raise non_finite("image")
    if img.shape != subspace.shape:  # its maps are positions in the field it was learned on
        fix = ("crop it to the field the subspace was learned on" if all(a >= b for a, b in zip(img.shape, subspace.shape))
               else "give an image of the whole field the subspace was learned on (a crop has no known place in it)")
        raise ValueError(f"image shape {img.shape} differs from the subspace's {subspace.shape}; {fix}, or learn "
                         "the subspace at this size")
    radius = _radius_for(subspace)
    if positions is None:
        beads = bead_psfs(img, radius, threshold=threshold, saturation=level)
        patches, pos = beads.patches * beads.fluxes[:, None, None], beads.positions  # brightness back
    else:
        patches, pos = extract_psfs(img, positions, radius)  # (which checks them: (P, 2), finite)
    n_i, n_j = subspace.n_psf, subspace.n_space
    if len(pos) < n_j:
        raise ValueError(f"{len(pos)} isolated point sources cannot fix a subspace with n_space={n_j}; "
                         f"need at least {n_j} (more makes it robust to noise)")
    h = subspace.psf_basis.reshape(n_i, -1).astype(np.float64)
    c = patches.reshape(len(patches), -1).astype(np.float64) @ h.T  # (P, I)
    scale = float(np.abs(c).max()) or 1.0
    c = c / scale
    # Spatial basis at the sources (bilinear), read window by window if it is on disk.
    a = _sample_maps(subspace.spatial_basis, pos)  # (P, J)

    gens = subspace.normalized_gammas  # (K, I, J)
    g0 = gens.mean(axis=0)
    g0 /= np.linalg.norm(g0)
    w = np.einsum("kij,ij->k", gens, g0)
    # Generators must face the reference direction: one with ⟨Γ_k, Γ0⟩ <= 0 gets a tiny weight, which
    # relaxes ⟨Γ, Γ0⟩ = 1 for it (the slice of the cone would be unbounded).
    w = np.maximum(w, 1e-6 * np.abs(w).max())
    d = np.einsum("kij,pj->pik", gens, a)  # (P, I, K): prediction of source p for generator k
    lam = np.full(len(gens), 1.0 / w.sum())

    def amplitudes(lam):  # each source's best amplitude for the weights lam (exact: one unknown each)
        m = d @ lam  # (P, I)
        return np.maximum(np.einsum("pi,pi->p", m, c), 0.0) / np.maximum(np.einsum("pi,pi->p", m, m), 1e-30)

    for _ in range(int(iterations)):
        amp = amplitudes(lam)
        big = (amp[:, None, None] * d).reshape(-1, len(gens))
        lip = float(np.linalg.eigvalsh(big.T @ big)[-1]) or 1.0
        btb, btc = big.T @ big, big.T @ c.ravel()
        z, prev, t = lam.copy(), lam.copy(), 1.0
        for _ in range(200):
            new = _project_weighted_simplex(z - (btb @ z - btc) / lip, w)
            t_next = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
            z = new + ((t - 1) / t_next) * (new - prev)
            if np.max(np.abs(new - prev)) <= 1e-9 * max(np.max(new), 1e-30):
                prev = new
                break
            prev, t = new, t_next
        step = np.max(np.abs(prev - lam))
        lam = prev
        if step <= 1e-7 * max(np.max(lam), 1e-30):
            break
    amp = amplitudes(lam)  # for the final weights: the misfit and amplitudes said are the operator's
    gamma = np.einsum("k,kij->ij", lam, gens)
    # The operator's PSFs are scaled to sum 1 at every pixel (OperatorSubspace.operator); Γ to unit
    # mean flux over the sources, and each source's amplitude by its PSF's own sum.
    sums = subspace.psf_basis.sum(axis=(1, 2)).astype(np.float64)
    fp = np.einsum("i,ij,pj->p", sums, gamma, a)
    flux = float(np.mean(fp))
    gamma = gamma / (flux if flux > 0 else 1.0)
    op = subspace.operator(gamma)
    op.attrs.update({"source": "lsfov.identify_operator", "n_sources": int(len(pos)),
                     "gamma": gamma.round(8).tolist()})
    resid = float(np.linalg.norm(amp[:, None] * (d @ lam) - c) / max(np.linalg.norm(c), 1e-30))
    if resid > _MISFIT_WARN:
        warnings.warn(f"the subspace explains these sources poorly (misfit {resid:.0%}): it was learned on another "
                      "microscope setting (NA, wavelength, pixel size, sample), or the sources are too faint or not "
                      "points; the operator may be far off, and deblurring with it leaves false sources beside bright "
                      "ones", LsfovWarning, stacklevel=2)
    if not return_details:
        return op
    return op, {"gamma": gamma, "amplitudes": amp * scale * np.where(fp > 0, fp, flux), "positions": pos,
                "residual": resid}


# Misfit of the sources' coefficients above which the subspace is said not to hold. Within it, 25
# beads read 1.5 % at 20000 photons, 13.5 % at 1500 (crops at -3 dB; the operator within 4 %); fields
# of other optics and depths than a 5-image subspace's read 13-39 %, their operators 26-58 % off (the
# misfit does not rank those: a warning only where it is clear).
_MISFIT_WARN = 0.3


def _sample_maps(maps, pos):
    """Bilinear samples (P, J) of (J, H, W) maps at (y, x) positions, reading a 2x2 box per source
    (the maps may be on disk)."""
    hgt, wid = maps.shape[1:]
    y0 = np.clip(np.floor(pos[:, 0]).astype(int), 0, hgt - 2)
    x0 = np.clip(np.floor(pos[:, 1]).astype(int), 0, wid - 2)
    ty = np.clip(pos[:, 0] - y0, 0, 1)[:, None]
    tx = np.clip(pos[:, 1] - x0, 0, 1)[:, None]
    iy = (y0[:, None] + np.array([0, 1]))[:, :, None]  # (P, 2, 1) and (P, 1, 2): each source's 2x2 box
    ix = (x0[:, None] + np.array([0, 1]))[:, None, :]
    if type(maps).__module__.startswith("dask"):  # a loaded subspace: each chunk read once, not once per source
        box = np.moveaxis(np.asarray(maps.vindex[:, iy, ix], dtype=np.float64), -1, 1)
    elif isinstance(maps, np.ndarray):
        box = np.moveaxis(maps[:, iy, ix].astype(np.float64), 0, 1)
    else:
        box = np.stack([np.asarray(maps[:, a : a + 2, b : b + 2], dtype=np.float64) for a, b in zip(y0, x0)])
    return ((1 - ty) * (1 - tx) * box[:, :, 0, 0] + (1 - ty) * tx * box[:, :, 0, 1]
            + ty * (1 - tx) * box[:, :, 1, 0] + ty * tx * box[:, :, 1, 1])
