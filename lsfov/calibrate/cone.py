"""Conical hulls of observed coefficients: admissible PSFs (paper 003 App. C-b/c).

Exact projection onto ``cone(B) = {B λ, λ ≥ 0}`` (non-negative least squares, scipy's active-set
``nnls``, point by point), and the greedy choice of a few columns that span nearly the same cone as
thousands (App. C-c).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from .._validate import positive_int

__all__ = ["cone_columns", "project_cone"]


def project_cone(columns, points):
    """Nearest points of ``cone(columns)`` to each of ``points``: ``min_{λ≥0} ½‖Bλ − a‖²`` for every a.

    Parameters
    ----------
    columns : array_like (I, J)
        Generators of the cone, one per column.
    points : array_like (I, N)
        Points to project, one per column.

    Returns
    -------
    projected : ndarray (I, N) float64
        The projections ``B λ``, one per column.
    weights : ndarray (J, N) float64
        The non-negative weights λ of the generators for each point.

    Raises
    ------
    ValueError
        If ``columns`` and ``points`` are not 2-D with the same I, or hold NaN or Inf.

    Notes
    -----
    Exact: ``scipy.optimize.nnls`` for each point. With the few generators of a calibrated cone
    (J ≤ 20) that is some 50 µs a point, faster than an accelerated projected gradient over all
    points at once, which needs hundreds of steps and stays approximate.
    """
    b = np.asarray(columns, dtype=np.float64)
    a = np.asarray(points, dtype=np.float64)
    if b.ndim != 2 or a.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"columns (I, J) and points (I, N) must share I; got {b.shape} and {a.shape}")
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise ValueError("columns and points contain NaN or Inf; pass finite values (coefficients of finite bead "
                         "patches)")
    lam = np.zeros((b.shape[1], a.shape[1]))
    if b.any():
        for n in range(a.shape[1]):
            lam[:, n] = nnls(b, a[:, n])[0]
    return b @ lam, lam


def cone_columns(observed, *, max_columns: int = 20, angle_deg: float = 1.0):
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

    Returns
    -------
    ndarray (I, J)
        The selected columns (unit norm), the mean direction first.

    Raises
    ------
    ValueError
        If ``observed`` is not (I, M) with M >= 1, or holds NaN or Inf; or ``max_columns`` is not a
        positive integer.
    """
    max_columns = positive_int(max_columns, "max_columns")
    obs = np.asarray(observed, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[1] == 0:
        raise ValueError(f"observed coefficients must have shape (I, M) with M >= 1, got {obs.shape}")
    if not np.isfinite(obs).all():
        raise ValueError("observed coefficients contain NaN or Inf; compute them from finite bead patches")
    unit = obs / np.maximum(np.linalg.norm(obs, axis=0, keepdims=True), 1e-30)
    mean = unit.mean(axis=1, keepdims=True)
    sel = mean / max(np.linalg.norm(mean), 1e-30)
    far = np.arange(unit.shape[1])  # columns not yet within the angle: a growing cone only comes nearer
    for _ in range(max_columns - 1):
        proj, _ = project_cone(sel, unit[:, far])
        # ‖Π(b)‖ = cos(angle to the cone) for a unit b (Π(b) is orthogonal to b - Π(b)).
        cosang = np.einsum("im,im->m", proj, unit[:, far]) / np.maximum(np.linalg.norm(proj, axis=0), 1e-30)
        angle = np.degrees(np.arccos(np.clip(cosang, -1, 1)))
        if angle.max() <= angle_deg:
            break
        worst = far[np.argmax(angle)]
        far = far[angle > angle_deg]
        sel = np.concatenate([sel, unit[:, worst : worst + 1]], axis=1)
    return sel
