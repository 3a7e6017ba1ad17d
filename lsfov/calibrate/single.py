"""One product-convolution operator from one micro-bead image (paper 003 Sec. II-C, Fig. 1)."""
from __future__ import annotations

import numpy as np

from .._validate import (boolean, not_a_bead_field, positive_int, real_number, real_numbers, saturation_level, shape2d,
                         yx_last)
from ..operators import ProductConvolution
from ..io import pixel_size
from .basis import psf_basis
from .beads import bead_psfs
from .cone import cone_columns
from .interpolate import DEFAULT_SMOOTHING, coefficient_nodes, node_grid

__all__ = ["calibrate_operator", "dirac_comb", "operator_distance", "rescaled_distance"]


def calibrate_operator(bead_image, n_basis: int | None = 5, *, radius: float | None = None,
                       threshold: float | None = None, smoothing: float = DEFAULT_SMOOTHING,
                       step: int | None = None, max_columns: int = 20, saturation: float | None = None,
                       return_positions: bool = False) -> ProductConvolution:
    """A basis product-convolution operator of the microscope from one image of micro-beads.

    Beads are detected, isolated, centred and cleaned (:func:`bead_psfs`), their PCA gives ``n_basis``
    PSF kernels (:func:`psf_basis`), each bead's coefficients are smoothed into maps by a
    Voronoi-weighted thin-plate spline and kept inside the conical hull of the observed coefficients
    (:func:`coefficient_nodes`). Every local PSF sums to about one (beads are normalised to unit sum).

    Parameters
    ----------
    bead_image : array_like (H, W)
        NumPy, Dask or xarray image of sparse sub-resolution beads.
    n_basis : int or None
        Number I of PSF basis kernels (default 5, as in paper 003); None picks it from the singular
        values (Gavish-Donoho rule).
    radius : float, optional
        Upper bound on the PSF radius in pixels (default: measured from the brightest beads). The
        kernels are ``2·ceil(1.2·radius) + 1`` pixels wide.
    threshold : float, optional
        Detection threshold on the blob response (see :func:`lsfov.calibrate.detect_beads`).
    smoothing : float
        Thin-plate smoothing: 8π·η, η of paper 003 Eq. 9, for coordinates scaled to the unit square
        and beads weighted by their Voronoi cells (weights of mean one); 0 interpolates the beads
        exactly; at most 1e6. Default 1e-2 (``DEFAULT_SMOOTHING``, tuned on simulated fields).
    step : int, optional
        Largest node spacing of the coefficient maps in pixels: nodes are evenly spaced from the
        first to the last pixel of each axis, at most ``step`` apart, so the spacing is ``step`` or
        a little less (default: ``max(4, ceil(min(H, W) / 96))``, about 96 nodes on the shorter side).
    max_columns : int
        Generators kept for the conical hull (App. C-c); default 20.
    saturation : float, optional
        Pixel value at which the camera saturates; saturated beads are left out (default: see
        :func:`bead_psfs`).
    return_positions : bool
        Also return the (M, 2) sub-pixel (y, x) centres of the beads that were used.

    Returns
    -------
    ProductConvolution
        Basis form, kernels (I, K, K), maps (I, H, W); ``attrs`` record the beads used. With
        ``return_positions=True``, the tuple ``(op, positions)`` instead, ``positions`` the
        float64 (M, 2) (y, x) centres of the M beads the operator was made from (those that passed
        the basis's z-score test; ``attrs["n_beads"]`` is M).

    Raises
    ------
    TypeError
        If ``bead_image`` is a file name or a ``lsfov.simulate.BeadField`` (pass its ``image``).
    ValueError
        If ``max_columns`` is not a positive integer or ``smoothing`` is outside [0, 1e6]; or the
        beads cannot give an operator (:func:`bead_psfs`, :func:`psf_basis`, :func:`coefficient_nodes`
        say why: none isolated, too few for ``n_basis``, all on a line).

    Examples
    --------
    The operator of a simulated microscope from one 512² bead image, compared with the true one,
    then used to deblur:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> from lsfov.calibrate import operator_distance
    >>> beads = simulate.bead_field((512, 512), seed=0)
    >>> op = lsfov.calibrate_operator(beads.image, n_basis=5)
    >>> op.kind, op.shape, op.n_psfs
    ('basis', (512, 512), 5)
    >>> operator_distance(op, beads.operator) < 0.3  # rescaled error on a Dirac comb
    True
    >>> lsfov.deconvolve(beads.image, op, iterations=5).shape
    (512, 512)
    """
    not_a_bead_field(bead_image, "calibrate_operator")
    bead_image = yx_last(bead_image, "bead_image")  # dims by name: an (x, y) image gives no transposed operator
    max_columns = positive_int(max_columns, "max_columns")
    return_positions = boolean(return_positions, "return_positions")
    smoothing = real_number(smoothing, "smoothing", minimum=0, maximum=1e6)
    saturation = saturation_level(bead_image, saturation)  # an xarray image's significant_bits too
    beads = bead_psfs(np.asarray(bead_image), radius, threshold=threshold, saturation=saturation)
    basis = psf_basis(beads.patches, n_basis)
    pos = beads.positions[basis.keep]
    grid = node_grid(beads.shape, step)
    cone = cone_columns(basis.coefficients.T, max_columns=max_columns)
    nodes = coefficient_nodes(pos, basis.coefficients, grid, smoothing=smoothing, cone=cone,
                                 kernel_sums=basis.kernels.sum(axis=(1, 2)))
    attrs = {
        "source": "lsfov.calibrate_operator", "n_beads": int(len(pos)), "n_detected": beads.n_detected,
        "n_rejected": int(beads.n_detected - len(pos)), "n_hot_pixels": beads.n_hot, "radius_px": beads.radius,
        "n_basis": int(basis.kernels.shape[0]), "smoothing": float(smoothing), "node_step_px": grid.step,
    }
    try:  # its attribute, or its µm coordinates (those of a binned image)
        px = pixel_size(bead_image)
    except ValueError:  # non-square pixels: the PSFs in its own pixels, no size
        px = None
    if px:
        attrs["pixel_um"] = px
    maps = grid.upsample(nodes)
    maps.flags.writeable = False  # made here, handed over: the operator need not copy it
    op = ProductConvolution.from_basis(basis.kernels, maps, attrs=attrs)
    return (op, pos) if return_positions else op


def dirac_comb(shape, spacing: int = 32) -> np.ndarray:
    """Unit Diracs every ``spacing`` pixels, starting half a spacing from the top-left corner.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape (H, W) in pixels.
    spacing : int
        Distance between two Diracs in pixels (>= 1, below twice the shorter side).

    Returns
    -------
    ndarray (H, W) float32
        Ones at ``(spacing//2 + i·spacing, spacing//2 + j·spacing)``, zeros elsewhere.
    """
    h, w = shape2d(shape)
    spacing = positive_int(spacing, "spacing")
    if spacing // 2 >= min(h, w):  # no Dirac would fall inside: every operator would be 0 away
        raise ValueError(f"spacing {spacing} puts no Dirac in a {h}x{w} image; give a spacing below {2 * min(h, w)}")
    d = np.zeros((h, w), np.float32)
    d[spacing // 2 :: spacing, spacing // 2 :: spacing] = 1.0
    return d


def rescaled_distance(u, u0) -> float:
    """``min_{a,b} ‖a·u + b − u0‖₂ / ‖u0‖₂`` (paper 003 Sec. III-B): the error up to gain and offset.

    Parameters
    ----------
    u : array_like
        The estimate (any shape; finite).
    u0 : array_like
        The reference, of as many pixels as ``u``.

    Returns
    -------
    float
        The relative error, >= 0 (0: ``u`` is ``u0`` up to gain and offset).
    """
    u, u0 = real_numbers(u, "u").ravel(), real_numbers(u0, "u0").ravel()
    if u.shape != u0.shape:
        raise ValueError(f"images differ in size: {u.size} and {u0.size} pixels; compare images of one shape")
    if not (u.size and np.isfinite(u).all() and np.isfinite(u0).all()):
        raise ValueError("u and u0 must be non-empty images of finite values")
    a = np.stack([u, np.ones_like(u)], axis=1)
    coef, *_ = np.linalg.lstsq(a, u0, rcond=None)
    return float(np.linalg.norm(a @ coef - u0) / max(np.linalg.norm(u0), 1e-30))


def operator_distance(estimate: ProductConvolution, truth: ProductConvolution, spacing: int = 32) -> float:
    """Rescaled ℓ2 distance between two operators applied to a Dirac comb (paper 003 Fig. 2-4).

    Parameters
    ----------
    estimate : ProductConvolution
        The operator to assess.
    truth : ProductConvolution
        The reference operator, for images of the same shape.
    spacing : int
        Spacing of the Diracs in pixels (:func:`dirac_comb`).

    Returns
    -------
    float
        :func:`rescaled_distance` of ``estimate`` and ``truth`` applied to the comb.
    """
    for name, op in (("estimate", estimate), ("truth", truth)):
        if not isinstance(op, ProductConvolution):
            raise TypeError(f"{name} must be a ProductConvolution (an operator), got {type(op).__name__}")
    if estimate.shape != truth.shape:
        raise ValueError(f"operators act on different shapes: {estimate.shape} and {truth.shape}; compare "
                         "operators of one image size")
    comb = dirac_comb(truth.shape, spacing)
    return rescaled_distance(estimate.apply(comb), truth.apply(comb))
