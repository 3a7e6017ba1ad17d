"""The PSF basis: principal components of bead patches, with z-score rejection of outliers
(paper 003 Sec. II-D steps 2-4, App. A-e/f, and the rank rule of Sec. II-E-c).

A patch has D = K² pixels (a few hundred), while a family of bead images gives up to ~10⁵ patches.
The components are the eigenvectors of the D×D Gram matrix of the unit-norm patches, accumulated
group by group (one bead image at a time): exact, every singular value known (the rank rule needs
them all), and memory O(D²) beyond the patches themselves, which are never stacked or copied whole.
A randomized SVD would approximate what this computes exactly at lower cost; lsfov uses one where
the matrix is large in both directions: the coefficient maps of a subspace.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import real_number, real_numbers, shape2d

__all__ = ["PSFBasis", "psf_basis", "rank_threshold"]


@dataclass
class PSFBasis:
    """An orthonormal PSF basis learned from bead patches (:func:`psf_basis`).

    Attributes
    ----------
    kernels : ndarray (I, K, K) float32
        The basis kernels h_i, orthonormal.
    singular_values : ndarray float64
        All singular values of the unit-ℓ2 patch matrix after rejection (the rank rule reads them).
    keep : ndarray (M,) bool
        The patches that passed the z-score test (groups concatenated in order).
    coefficients : ndarray (M_kept, I) float64
        ``<p_m, h_i>`` of the patches kept, as given (unit-sum patches from :func:`lsfov.calibrate.bead_psfs`).
    """

    kernels: np.ndarray
    singular_values: np.ndarray
    keep: np.ndarray
    coefficients: np.ndarray


def rank_threshold(shape) -> float:
    """Gavish-Donoho factor ω(β) for an unknown noise level: keep singular values above ω·median.

    β is the aspect ratio of the matrix; ω(1) = 2.858 is the value paper 003 quotes (square
    matrices). Patch matrices are far from square (thousands of patches of a few hundred pixels),
    where the optimal factor is smaller (ω(0.05) ≈ 1.5), so the general approximation is used.

    Parameters
    ----------
    shape : (int, int)
        Shape (M, N) of the matrix, in either order (rows and columns, or columns and rows).

    Returns
    -------
    float
        The factor ω(β), β = min(M, N) / max(M, N): 1.43 for very flat matrices, 2.86 for square ones.
    """
    m, n = shape2d(shape, "matrix shape")
    b = min(m, n) / max(m, n)
    return 0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43


def basis_signs(basis) -> np.ndarray:
    """±1 per element of a basis (n, ...) that brings it to lsfov's convention: the first element
    sums to > 0, every other has a positive largest-magnitude entry (read one element at a time, so
    a basis on disk is never whole in memory)."""
    out = np.ones(len(basis))
    for j in range(len(basis)):
        m = np.asarray(basis[j], dtype=np.float64).ravel()
        out[j] = -1.0 if (m.sum() if j == 0 else m[np.abs(m).argmax()]) < 0 else 1.0
    return out


def _fix_signs(vt):
    """Deterministic signs (:func:`basis_signs`): the same basis whatever signs the SVD returned."""
    return vt * basis_signs(vt).astype(vt.dtype)[:, None]


def _unit(group):
    """(m, D) float64 rows of unit ℓ2 norm, and the norms (m,)."""
    g = np.asarray(group, dtype=np.float64)
    norms = np.maximum(np.sqrt(np.einsum("md,md->m", g, g)), 1e-30)
    return g / norms[:, None], norms


def psf_basis(patches, n_basis: int | None = 5, *, zscore: float = 3.0) -> PSFBasis:
    """Orthonormal PSF basis from bead patches.

    PCA of the patches normalised to unit ℓ2 norm (each PSF weighs the same), projection of every
    patch on the first ``n_basis`` components, rejection of patches with a coefficient more than
    ``zscore`` standard deviations from its mean (multiple or degraded beads), and PCA again.
    Components are uncentred (a PSF is a combination of them, as product-convolution needs).

    Parameters
    ----------
    patches : array_like (M, K, K), or a list of such arrays (one per bead image)
        Background-free bead patches summing to one (see :func:`lsfov.calibrate.bead_psfs`). The
        images' K may differ (by even numbers): each image's patches are read as the centre of
        the largest K, zero outside, without being padded in memory.
    n_basis : int or None
        Number I of basis kernels. None: the singular values above ``ω·median`` (see
        :func:`rank_threshold`; paper 003 Sec. II-E-c).
    zscore : float
        Rejection level; ``inf`` keeps every patch.

    Returns
    -------
    PSFBasis
        The kernels (I, K, K), all singular values, which patches were kept, and their coefficients.

    Raises
    ------
    ValueError
        If ``patches`` are not (M, K, K) (K of one parity), are empty, all zero or hold NaN or Inf; if
        ``n_basis`` is not a positive integer or None, or exceeds K² or the number of patches; if
        ``zscore`` is not > 0.
    TypeError
        If ``patches`` are not real numbers or ``zscore`` is not a number.

    Examples
    --------
    A basis of 5 kernels from the beads of a simulated bead image:

    >>> from lsfov import simulate
    >>> from lsfov.calibrate import bead_psfs, psf_basis
    >>> beads = bead_psfs(simulate.bead_field((256, 256), seed=0).image)
    >>> basis = psf_basis(beads.patches, n_basis=5)
    >>> basis.kernels.shape == (5, beads.size, beads.size)
    True
    >>> h = basis.kernels.reshape(5, -1)
    >>> bool(np.allclose(h @ h.T, np.eye(5), atol=1e-5))  # orthonormal
    True
    >>> bool(basis.keep.sum() <= len(beads.patches))  # outliers left out
    True
    """
    groups = list(patches) if isinstance(patches, (list, tuple)) else [patches]
    if not (isinstance(zscore, (float, np.floating)) and zscore == np.inf):  # (inf: no patch rejected)
        zscore = real_number(zscore, "zscore", minimum=0, exclusive=True)  # (before the work; "3" is no number)
    groups = [real_numbers(g, "patches", np.float32) for g in groups]
    if not groups or any(g.ndim != 3 or g.shape[1] != g.shape[2] or (g.shape[1] - groups[0].shape[1]) % 2
                         for g in groups):
        raise ValueError(f"patches must have shape (M, K, K), K of one parity for all (one centre), got "
                         f"{[g.shape for g in groups]}")
    m, k = sum(len(g) for g in groups), max(g.shape[1] for g in groups)
    if m == 0:
        raise ValueError("no bead patches given; detect beads first (lsfov.calibrate.bead_psfs)")
    if not all(np.isfinite(g).all() for g in groups):
        raise ValueError("bead patches contain NaN or Inf; extract them from a clean image")
    if not any(g.any() for g in groups):  # (their basis would be zero, and every PSF of it)
        raise ValueError("bead patches are all zero; extract them from the beads (lsfov.calibrate.bead_psfs)")
    d = k * k
    if n_basis is not None:
        if isinstance(n_basis, bool) or not isinstance(n_basis, (int, np.integer)) or n_basis < 1:
            raise ValueError(f"n_basis must be a positive integer or None, got {n_basis!r}")
        if n_basis > d:  # (a basis of K x K kernels has at most K² of them, whatever the beads)
            raise ValueError(f"n_basis={n_basis} is more than the {d} pixels of a {k}x{k} bead patch; use fewer basis "
                             "kernels (n_basis, n_psf, --n-basis) or a larger radius (--radius)")
        if n_basis > m:
            raise ValueError(f"n_basis={n_basis} needs at least {n_basis} bead patches, got {m}; "
                             "use fewer basis kernels (n_basis, n_psf, --n-basis) or more beads")
    flat = [g.reshape(len(g), -1) for g in groups]
    # Each group's window of the K x K patch: a narrower image's patches are its centre, zero around
    # (slices of K x K views, not index arrays: a Gram of 73² patches is 28 million entries).
    win = [slice((k - g.shape[1]) // 2, (k + g.shape[1]) // 2) for g in groups]

    def centre(vt, c):
        """The basis ``vt`` (n, K²) on window ``c``, (n, size²)."""
        return vt.reshape(len(vt), k, k)[:, c, c].reshape(len(vt), -1)

    def pca(keeps):
        n_rows = int(sum(kp.sum() for kp in keeps))
        if n_rows < d:  # fewer patches than pixels (wide PSFs, few beads): an SVD of the patches,
            # O(M² D), not the D x D Gram's O(D³) (150 patches of 73²: 0.03 s, not 40 s)
            rows = np.zeros((n_rows, k, k))
            at = np.cumsum([0] + [int(kp.sum()) for kp in keeps])
            for g, kp, c, a, b in zip(flat, keeps, win, at[:-1], at[1:]):
                rows[a:b, c, c] = _unit(g[kp])[0].reshape(b - a, c.stop - c.start, c.stop - c.start)
            _, s, vt = np.linalg.svd(rows.reshape(n_rows, d), full_matrices=False)
            n = n_basis or max(1, int((s > rank_threshold((n_rows, d)) * np.median(s)).sum()))
            if s[n - 1] > 1e-6 * s[0]:  # (else kernels beyond the patches' rank, which only the Gram gives)
                return _fix_signs(vt[:n]), s
        gram = np.zeros((d, d))
        blocks = gram.reshape(k, k, k, k)  # (a view: a window's block is a slice of it)
        for g, kp, c in zip(flat, keeps, win):
            u, _ = _unit(g[kp])
            n = c.stop - c.start
            blocks[c, c, c, c] += (u.T @ u).reshape(n, n, n, n)
        w, v = np.linalg.eigh(gram)
        w, v = w[::-1], v[:, ::-1]
        s = np.sqrt(np.maximum(w[: min(n_rows, d)], 0.0))
        n = n_basis or max(1, int((s > rank_threshold((n_rows, d)) * np.median(s)).sum()))
        return _fix_signs(v[:, :n].T), s

    keeps = [np.ones(len(g), bool) for g in flat]
    vt, s = pca(keeps)
    if np.isfinite(zscore) and m > 2:
        c = np.concatenate([_unit(g)[0] @ centre(vt, w).T for g, w in zip(flat, win)])
        sd = c.std(axis=0)
        ok = np.all(np.abs(c - c.mean(axis=0)) <= zscore * np.where(sd > 0, sd, np.inf), axis=1)
        if ok.sum() >= vt.shape[0] and not ok.all():
            keeps = np.split(ok, np.cumsum([len(g) for g in flat])[:-1])
            vt, s = pca(keeps)
    coefficients = np.concatenate([np.asarray(g[kp], dtype=np.float64) @ centre(vt, w).T
                                   for g, kp, w in zip(flat, keeps, win)])
    return PSFBasis(kernels=vt.reshape(-1, k, k).astype(np.float32), singular_values=s,
                    keep=np.concatenate(keeps), coefficients=coefficients)
