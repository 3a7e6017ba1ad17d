"""The PSF basis: principal components of bead patches, with z-score rejection of outliers
(paper 003 Sec. II-D steps 2-4, App. A-e/f, and the rank rule of Sec. II-E-c)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PSFBasis", "psf_basis", "rank_threshold"]

# Above this many patches the components come from a randomized SVD (Dask's svd_compressed).
EXACT_SVD_MAX = 20_000


@dataclass
class PSFBasis:
    kernels: np.ndarray  # (I, K, K) float32, orthonormal
    singular_values: np.ndarray  # of the unit-l2 patch matrix after rejection (all of them when exact)
    keep: np.ndarray  # (M,) bool: patches that passed the z-score test
    coefficients: np.ndarray  # (M_kept, I) <p_m, h_i> of the unit-sum patches that were kept


def rank_threshold(shape) -> float:
    """Gavish-Donoho factor ω(β) for an unknown noise level: keep singular values above ω·median.

    β is the aspect ratio of the matrix; ω(1) = 2.858 is the value paper 003 quotes (square
    matrices). Patch matrices are far from square (thousands of patches of a few hundred pixels),
    where the optimal factor is smaller (ω(0.05) ≈ 1.5), so the general approximation is used.
    """
    m, n = shape
    b = min(m, n) / max(m, n)
    return 0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43


def _components(x: np.ndarray, k: int | None, seed):
    """Right singular vectors and singular values of x (M, D)."""
    if x.shape[0] <= EXACT_SVD_MAX:
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        return vt, s
    import dask.array as da

    rng = np.random.default_rng(seed)
    sub = x[rng.choice(len(x), EXACT_SVD_MAX, replace=False)]
    s_all = np.linalg.svd(sub, compute_uv=False) * np.sqrt(len(x) / EXACT_SVD_MAX)
    if k is None:  # the rank rule on a random subset's spectrum, scaled to the full count
        k = max(1, int((s_all > rank_threshold(sub.shape) * np.median(s_all)).sum()))
    xd = da.from_array(x, chunks=(EXACT_SVD_MAX, x.shape[1]))
    _, s, vt = da.linalg.svd_compressed(xd, k, n_power_iter=2, seed=int(rng.integers(2**31)), compute=False)
    s, vt = (np.asarray(a) for a in _compute(s, vt))
    return vt, np.concatenate([s, s_all[k:]])


def _compute(*arrays):
    from ..cluster import compute

    return compute(list(arrays))


def _fix_signs(vt):
    """Deterministic signs: the first component sums to > 0, the others have a positive largest entry."""
    vt = vt.copy()
    if vt[0].sum() < 0:
        vt[0] = -vt[0]
    idx = np.abs(vt[1:]).argmax(axis=1)
    sgn = np.sign(vt[1:][np.arange(len(idx)), idx])
    vt[1:] *= np.where(sgn == 0, 1, sgn)[:, None]
    return vt


def psf_basis(patches, n_basis: int | None = 5, *, zscore: float = 3.0, seed=0) -> PSFBasis:
    """Orthonormal PSF basis from bead patches.

    PCA of the patches normalised to unit ℓ2 norm (each PSF weighs the same), projection of every
    patch on the first ``n_basis`` components, rejection of patches with a coefficient more than
    ``zscore`` standard deviations from its mean (multiple or degraded beads), and PCA again.
    Components are uncentred (a PSF is a combination of them, as product-convolution needs).

    Parameters
    ----------
    patches : array_like (M, K, K)
        Background-free bead patches summing to one (see :func:`lsfov.calibrate.bead_psfs`).
    n_basis : int or None
        Number I of basis kernels. None: the singular values above ``ω·median`` (see
        :func:`rank_threshold`; paper 003 Sec. II-E-c).
    zscore : float
        Rejection level; ``inf`` keeps every patch.

    Returns
    -------
    PSFBasis
    """
    p = np.asarray(patches, dtype=np.float32)
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"patches must have shape (M, K, K), got {p.shape}")
    m, k = p.shape[0], p.shape[1]
    if n_basis is not None:
        if isinstance(n_basis, bool) or not isinstance(n_basis, (int, np.integer)) or n_basis < 1:
            raise ValueError(f"n_basis must be a positive integer or None, got {n_basis!r}")
        if n_basis > min(m, k * k):
            raise ValueError(f"n_basis={n_basis} needs at least {n_basis} bead patches, got {m}; "
                             "use fewer basis kernels or more beads")
    flat = p.reshape(m, -1)
    norms = np.maximum(np.sqrt(np.einsum("md,md->m", flat, flat, dtype=np.float64)), 1e-30)[:, None]
    unit = (flat / norms).astype(np.float32, copy=False)  # one copy: a 90-image family has ~10⁵ patches

    def pca(x):
        vt, s = _components(x, n_basis, seed)
        n = n_basis or max(1, int((s > rank_threshold(x.shape) * np.median(s)).sum()))
        return _fix_signs(vt[:n]), s

    vt, s = pca(unit)
    keep = np.ones(m, bool)
    if np.isfinite(zscore) and m > 2:
        c = unit @ vt.T
        sd = c.std(axis=0)
        keep = np.all(np.abs(c - c.mean(axis=0)) <= zscore * np.where(sd > 0, sd, np.inf), axis=1)
        if keep.sum() >= vt.shape[0] and not keep.all():
            vt, s = pca(unit[keep])
        else:
            keep[:] = True
    coefficients = (unit[keep] @ vt.T.astype(np.float32)).astype(np.float64) * norms[keep]
    return PSFBasis(kernels=vt.reshape(-1, k, k).astype(np.float32), singular_values=s, keep=keep,
                    coefficients=coefficients)
