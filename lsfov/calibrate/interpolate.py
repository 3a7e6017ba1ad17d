"""Coefficient maps from scattered bead coefficients (paper 003 App. C).

Thin-plate-spline smoothing with Voronoi-cell weights (Eq. 9, scipy's RBFInterpolator), evaluated on
a node grid, projected node by node onto the conical hull of the observed coefficients, then spread
to every pixel by bilinear interpolation. A bilinear mix of cone points stays in the cone (it is
convex), so every pixel's PSF is admissible, and the maps are exact for the node values; a
thin-plate spline varies over hundreds of pixels, so a node every few pixels loses nothing.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.interpolate import RBFInterpolator
from scipy.spatial import Voronoi

from .._validate import LsfovWarning, positions_yx, positive_int, real_number, shape2d, user_stacklevel
from ..operators import _hat_matrix
from .cone import project_cone

__all__ = ["NodeGrid", "coefficient_nodes", "node_grid", "voronoi_weights"]

DEFAULT_SMOOTHING = 1e-2  # tuned on simulated 512² and 2304² fields (benchmarks: calibrate)
NARROW = 0.02  # beads within this share of the field's size of a line: warned about


class NodeGrid:
    """Nodes evenly spaced from the first to the last pixel of each axis, at most ``step`` pixels
    apart, with the bilinear (hat) interpolation matrices that spread node values to pixels.

    Each axis of n pixels gets ``max(2, ceil((n - 1) / step) + 1)`` nodes (``numpy.linspace``), so
    the spacing is ``(n - 1) / (nodes - 1)``: ``step`` when it divides n - 1, else a little less.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape (H, W) in pixels.
    step : int
        Largest node spacing in pixels (>= 1).

    Attributes
    ----------
    shape : (int, int)
        Image shape (H, W).
    step : int
        Largest node spacing in pixels.
    nodes : tuple of two ndarrays
        Node positions (float64, in pixels) along y and along x.
    """

    def __init__(self, shape, step: int):
        self.shape = shape2d(shape)
        self.step = positive_int(step, "node step")
        self.nodes = tuple(np.linspace(0.0, n - 1.0, max(2, math.ceil((n - 1) / self.step) + 1)) for n in self.shape)

    @property
    def size(self):
        """Number of nodes (gy, gx)."""
        return tuple(len(c) for c in self.nodes)

    def points(self) -> np.ndarray:
        """Node positions (y, x), row by row.

        Returns
        -------
        ndarray (gy·gx, 2) float64
            The positions in pixels.
        """
        yy, xx = np.meshgrid(*self.nodes, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)

    def hat(self, axis: int) -> np.ndarray:
        """(n, g) matrix: pixel values along ``axis`` from node values.

        Parameters
        ----------
        axis : int
            0 (y) or 1 (x).

        Returns
        -------
        ndarray (n, g) float64
            The bilinear (hat) weights: n pixels of the axis, g nodes.
        """
        return _hat_matrix(self.nodes[axis], np.arange(self.shape[axis], dtype=np.float64))

    def upsample(self, values) -> np.ndarray:
        """(..., gy, gx) node values -> (..., H, W) float32 pixel values.

        Parameters
        ----------
        values : array_like (..., gy, gx)
            Values at the nodes.

        Returns
        -------
        ndarray (..., H, W) float32
            Their bilinear interpolation at every pixel.
        """
        v = np.asarray(values, dtype=np.float32)
        uy, ux = self.hat(0).astype(np.float32), self.hat(1).astype(np.float32)
        return np.matmul(np.matmul(uy, v), ux.T)

    def gram_sqrt(self, inverse: bool = False):
        """Per-axis square roots of ``UᵀU`` (or their inverses): the pixel-grid inner product of
        two bilinear maps is ``⟨R_y a R_x, R_y b R_x⟩`` of their node values.

        Parameters
        ----------
        inverse : bool
            Give the inverses of the square roots.

        Returns
        -------
        list of two ndarrays
            ``[R_y, R_x]``, float64 (gy, gy) and (gx, gx), symmetric (or their inverses).
        """
        out = []
        for ax in range(2):
            u = self.hat(ax)
            w, v = np.linalg.eigh(u.T @ u)
            w = np.maximum(w, 1e-300)
            out.append((v * (w ** (-0.5 if inverse else 0.5))) @ v.T)
        return out


def node_grid(shape, step: int | None = None) -> NodeGrid:
    """A :class:`NodeGrid` of ``shape`` with nodes at most ``step`` pixels apart (evenly spaced).

    The default step is ``max(4, ceil(min(shape) / 96))``: about 96 nodes along the shorter side,
    and a step of 4 pixels on images of up to 384 pixels. Spacings are the step or a little under it.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape (H, W) in pixels.
    step : int, optional
        Largest node spacing in pixels (>= 1).

    Returns
    -------
    NodeGrid
        The grid and its interpolation matrices.
    """
    shape = shape2d(shape)  # (0 and "64" once met a NumPy error)
    if step is None:
        step = max(4, math.ceil(min(shape) / 96))
    else:
        step = positive_int(step, "step")  # node spacing in pixels
    return NodeGrid(shape, step)


def voronoi_weights(positions, shape) -> np.ndarray:
    """Area of each position's Voronoi cell inside the image, as a fraction of the mean cell.

    Exact: the cells of ``scipy.spatial.Voronoi`` over the positions and their mirror images in the
    field's four edges are the cells of the positions clipped to the field (a rectangle), all of
    them closed. Positions at one place (to Qhull's precision) share their cell; positions outside
    the field are taken at its edge.

    Parameters
    ----------
    positions : array_like (M, 2)
        (y, x) positions in pixels.
    shape : int or (int, int)
        The field's shape (H, W); it spans [-0.5, n - 0.5] along each axis.

    Returns
    -------
    ndarray (M,) float64
        The weights, of mean one.
    """
    pos = positions_yx(positions)
    size = np.array(shape2d(shape), dtype=np.float64)
    # The field spans [-0.5, n - 0.5] on each axis; a point on an edge would be its own mirror image.
    lo, hi = -0.5 + 1e-6 * size, size - 0.5 - 1e-6 * size
    sites, site_of = np.unique(np.clip(pos, lo, hi), axis=0, return_inverse=True)
    mirrors = [sites]
    for ax in range(2):
        for edge in (-0.5, size[ax] - 0.5):
            m = sites.copy()
            m[:, ax] = 2 * edge - m[:, ax]
            mirrors.append(m)
    vor = Voronoi(np.concatenate(mirrors))
    # Sites closer than Qhull's precision share one region (it keeps one of them): one cell each.
    cells, cell_of = np.unique(vor.point_region[: len(sites)], return_inverse=True)
    regions = [vor.regions[r] for r in cells]
    centre = sites[np.unique(cell_of, return_index=True)[1]]  # a site inside each cell (convex)
    sizes = np.array([len(r) for r in regions])
    owner = np.repeat(np.arange(len(cells)), sizes)
    # Each cell's vertices in angular order around its site, then the shoelace formula over pairs.
    rel = vor.vertices[np.concatenate(regions)] - centre[owner]
    order = np.lexsort((np.arctan2(rel[:, 0], rel[:, 1]), owner))
    rel = rel[order]
    ends = np.cumsum(sizes)
    nxt = np.arange(len(rel)) + 1
    nxt[ends - 1] = ends - sizes
    cross = rel[:, 0] * rel[nxt, 1] - rel[:, 1] * rel[nxt, 0]
    area = 0.5 * np.abs(np.bincount(owner[order], weights=cross, minlength=len(cells)))
    bead_cell = cell_of.ravel()[site_of.ravel()]
    w = area[bead_cell] / np.bincount(bead_cell, minlength=len(cells))[bead_cell]
    return w * len(pos) / w.sum()


def coefficient_nodes(positions, coefficients, grid: NodeGrid, *, smoothing: float = DEFAULT_SMOOTHING,
                      cone=None, kernel_sums=None) -> np.ndarray:
    """Coefficient values on ``grid``'s nodes from the bead coefficients (App. C, Eq. 9).

    Parameters
    ----------
    positions : array_like (M, 2)
        Bead centres (y, x) in pixels.
    coefficients : array_like (M, I)
        Coefficients β of each bead's PSF on the basis.
    grid : NodeGrid
        The nodes where the coefficients are evaluated (:func:`node_grid`).
    smoothing : float
        8π·η, η of Eq. 9, for coordinates scaled to the unit square and weights of mean one; each
        bead's data term is weighted by its Voronoi cell's area. 0 interpolates exactly; at most 1e6.
    cone : array_like (I, J), optional
        Generators of the admissible cone (:func:`cone_columns`); node values are projected onto it.
    kernel_sums : array_like (I,), optional
        Sums of the basis kernels: node values are then scaled so that every PSF sums to one, as
        the beads did (a cone is scale-invariant, so they stay admissible). A node whose PSF sums
        to nothing takes the cone's first column (:func:`cone_columns`: the mean direction), or
        without ``cone`` the beads' mean coefficients.

    Returns
    -------
    ndarray (I, gy, gx) float64
        The coefficient of each basis kernel at each node (:meth:`NodeGrid.upsample` spreads them to pixels).

    Raises
    ------
    ValueError
        If ``positions`` and ``coefficients`` are not (M, 2) and (M, I), ``smoothing`` is outside
        [0, 1e6], fewer than 3 beads are given or they lie on a line (within half a pixel; within
        2 % of the field's size an :class:`~lsfov.LsfovWarning` says so), or two share a position
        with ``smoothing=0``.
    """
    pos = np.asarray(positions, dtype=np.float64)
    beta = np.asarray(coefficients, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or beta.ndim != 2 or len(beta) != len(pos):
        raise ValueError(f"positions (M, 2) and coefficients (M, I) must agree; got {pos.shape} and {beta.shape}")
    smoothing = real_number(smoothing, "smoothing", minimum=0, maximum=1e6)  # (a str or NaN: said, not compared)
    if len(pos) < 3:
        raise ValueError(f"{len(pos)} beads cannot fix a thin-plate spline (it needs 3 not on a line); "
                         "image more beads")
    # Its affine part across a line of beads is unknown (scipy: a singular matrix); within half a
    # pixel of one it is read from the beads' sub-pixel jitter.
    across = np.linalg.svd(pos - pos.mean(axis=0), compute_uv=False)[-1] / np.sqrt(len(pos))
    if across < 0.5:
        raise ValueError(f"the {len(pos)} beads lie on a line (within {across:.2g} px): a thin-plate spline needs "
                         "3 not on a line; image beads across the field")
    scale = float(max(grid.shape))
    if across < NARROW * scale:  # (9 beads 0.6-1.4 px off a line: operator errors 19-36 %, 7-8 % at 12-14 px)
        warnings.warn(f"the {len(pos)} beads lie within {across:.2g} px of a line across a field of {scale:g} px: "
                      "how the PSF changes across that line is a guess; image beads across the field", LsfovWarning,
                      stacklevel=user_stacklevel())
    if smoothing == 0 and len(np.unique(pos, axis=0)) < len(pos):
        raise ValueError("two beads at one position cannot both be interpolated exactly (smoothing=0); give a "
                         "smoothing > 0 (default 1e-2), or one coefficient per position")
    w = voronoi_weights(pos, grid.shape)
    # smoothing is 8π·η of Eq. 9 (for the kernel r² log r, ∫(Δα)² = 8π cᵀKc), in the unit square's
    # coordinates with weights of mean 1.
    tps = RBFInterpolator(pos / scale, beta, kernel="thin_plate_spline", degree=1, smoothing=smoothing / w)
    vals = tps(grid.points() / scale)  # (gy*gx, I)
    if cone is not None:
        vals = project_cone(cone, vals.T)[0].T
    if kernel_sums is not None:
        sums = np.asarray(kernel_sums, dtype=np.float64)
        fallback = np.asarray(cone)[:, 0] if cone is not None else beta.mean(axis=0)
        flux = vals @ sums
        dead = flux <= 1e-6 * np.abs(vals).sum(axis=1).max(initial=1e-30)
        vals[dead] = fallback
        vals /= (vals @ sums)[:, None]
    return vals.T.reshape((beta.shape[1],) + grid.size)
