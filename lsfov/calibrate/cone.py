"""Conical hulls of observed coefficients: admissible PSFs (paper 003 App. C-b/c).

Projection onto ``cone(B) = {B λ, λ ≥ 0}`` of many points at once by an accelerated projected
gradient (FISTA on the non-negative orthant), and the greedy choice of a few columns that span
nearly the same cone as thousands (App. C-c).
"""
from __future__ import annotations

import numpy as np

__all__ = ["cone_columns", "project_cone"]


def project_cone(columns, points, *, iterations: int = 300, tol: float = 1e-7, weights0=None):
    """Nearest points of ``cone(columns)`` to each of ``points``: ``min_{λ≥0} ½‖Bλ − a‖²`` for every a.

    Parameters
    ----------
    columns : array_like (I, J)
        Generators of the cone, one per column.
    points : array_like (I, N)
        Points to project, one per column (all solved together: one matrix product per step).
    iterations : int
        At most this many accelerated projected-gradient steps (step 1/L, L = ‖BᵀB‖₂). The default
        is approximate (about 1e-2 relative against NNLS on calibrated cones, where the result stays
        in the cone); raise it for exact projections.
    tol : float
        Stop when no weight moved by more than ``tol`` times the largest weight.
    weights0 : array_like (J, N), optional
        Warm start.

    Returns
    -------
    projected : ndarray (I, N)
    weights : ndarray (J, N), non-negative
    """
    b = np.asarray(columns, dtype=np.float64)
    a = np.asarray(points, dtype=np.float64)
    if b.ndim != 2 or a.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"columns (I, J) and points (I, N) must share I; got {b.shape} and {a.shape}")
    g = b.T @ b
    lip = float(np.linalg.eigvalsh(g)[-1]) if b.size else 0.0
    if lip <= 0:
        return np.zeros_like(a), np.zeros((b.shape[1], a.shape[1]))
    bta = b.T @ a
    lam = np.zeros((b.shape[1], a.shape[1])) if weights0 is None else np.maximum(np.asarray(weights0, float), 0)
    z, t = lam.copy(), 1.0
    for _ in range(int(iterations)):
        new = np.maximum(z - (g @ z - bta) / lip, 0.0)
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        z = new + ((t - 1.0) / t_next) * (new - lam)
        done = np.max(np.abs(new - lam)) <= tol * max(float(new.max(initial=0.0)), 1e-30)
        lam, t = new, t_next
        if done:
            break
    return b @ lam, lam


def cone_columns(observed, *, max_columns: int = 20, angle_deg: float = 1.0, iterations: int = 200):
    """A few columns of ``observed`` whose cone nearly contains all of them (App. C-c).

    Start from the mean direction, then repeatedly add the observed column farthest in angle from
    the current cone, until every column is within ``angle_deg`` of it or ``max_columns`` are taken.

    Parameters
    ----------
    observed : array_like (I, M)
        Coefficient vectors of the observed PSFs, one per column.
    max_columns : int
        At most this many columns are taken.
    angle_deg : float
        Every column within this angle (degrees) of the cone stops the selection.
    iterations : int
        Iterations of each projection onto the cone (:func:`project_cone`).

    Returns
    -------
    ndarray (I, J)
        The selected columns (unit norm), the mean direction first.
    """
    obs = np.asarray(observed, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[1] == 0:
        raise ValueError(f"observed coefficients must have shape (I, M) with M >= 1, got {obs.shape}")
    if not np.isfinite(obs).all():
        raise ValueError("observed coefficients contain NaN or Inf; compute them from finite bead patches")
    unit = obs / np.maximum(np.linalg.norm(obs, axis=0, keepdims=True), 1e-30)
    mean = unit.mean(axis=1, keepdims=True)
    sel = mean / max(np.linalg.norm(mean), 1e-30)
    lam = None
    for _ in range(int(max_columns) - 1):
        proj, lam = project_cone(sel, unit, iterations=iterations, weights0=lam)
        # ‖Π(b)‖ = cos(angle to the cone) for a unit b (Π(b) is orthogonal to b - Π(b)).
        cosang = np.clip(np.einsum("im,im->m", proj, unit) / np.maximum(np.linalg.norm(proj, axis=0), 1e-30), -1, 1)
        worst = int(np.argmin(cosang))
        if np.degrees(np.arccos(cosang[worst])) <= angle_deg:
            break
        sel = np.concatenate([sel, unit[:, worst : worst + 1]], axis=1)
        lam = np.concatenate([lam, np.zeros((1, lam.shape[1]))], axis=0)
    return sel

