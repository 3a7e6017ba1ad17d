"""Simulated data with ground truth: bead fields (paper 003 Sec. III-A-1) and degraded images.

Everything is seeded: the same ``seed`` gives the same arrays on every machine.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from . import psf as _psf
from ._validate import LsfovWarning, as_image, check_pixel_size, fits_in_memory, positive_int, real_number, shape2d, squeeze_plane, \
    yx_order
from ._validate import rng as _rng
from .operators import ProductConvolution, _cell_centers

__all__ = ["BeadField", "TiltedSurface", "bead_field", "bead_stack", "degrade", "psf_field", "sample_image",
           "tilted_surface"]


@dataclass
class BeadField:
    """A simulated micro-bead image and its ground truth (what :func:`bead_field` returns).

    Attributes
    ----------
    image : ndarray, float32, (H, W)
        The noisy image, in photons.
    clean : ndarray, float32, (H, W)
        The noiseless image: blurred beads plus background.
    positions : ndarray, int, (P, 2)
        The beads' (y, x) pixel positions.
    amplitudes : ndarray, (P,)
        Photons per bead.
    operator : ProductConvolution
        The true blur (a grid operator).
    depth_um : ndarray, (gy, gx)
        The defocus at each node of the operator, in µm.
    optics : lsfov.psf.Optics
        The microscope.
    background : ndarray, float32, (H, W)
        The smooth background, in photons.
    params : dict
        The drawn and given settings: ``astigmatism``, ``axis``, ``seed`` and ``grid``.
    """

    image: np.ndarray
    clean: np.ndarray
    positions: np.ndarray
    amplitudes: np.ndarray
    operator: ProductConvolution
    depth_um: np.ndarray
    optics: _psf.Optics
    background: np.ndarray
    params: dict = field(default_factory=dict)


def _smooth_random(shape, rng, scale):
    """Smooth Gaussian random field with correlation length ``scale`` pixels, in [0, 1]."""
    small = tuple(max(2, int(np.ceil(s / scale)) + 3) for s in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(small), 1.0)
    # ndimage.zoom(coarse, s / (c - 3)) cropped to ``shape``, without computing the rest: zoom makes
    # (c / (c - 3))² the pixels (up to 16x), in float64 (28672² for a 16384² field: 6.6 GB).
    out = [int(round(c * (s / (c - 3)))) for s, c in zip(shape, small)]  # zoom's output shape
    f = ndimage.affine_transform(coarse, [(c - 1) / (o - 1) for c, o in zip(small, out)], output_shape=tuple(shape),
                                 order=3)  # zoom's coordinates: i (c - 1) / (o - 1)
    f -= f.min()
    return (f / max(f.max(), 1e-12)).astype(np.float32)


def _random_polynomial(shape, rng, degree, low, high):
    """A random polynomial surface of total degree <= ``degree``, spanning [low, high] exactly."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    z = np.zeros(shape)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            z += rng.standard_normal() * yy**i * xx**j
    span = np.ptp(z)
    z = (z - z.min()) / span if span > 0 else np.full(shape, 0.5)
    return low + (high - low) * z


def _range(v, name: str, *, strict: bool = False) -> tuple[float, float]:
    """A (low, high) pair of finite numbers, low <= high (low < high if ``strict``)."""
    try:
        lo, hi = (real_number(x, name) for x in v)
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or lo > hi or (strict and lo == hi):
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers, low {'<' if strict else '<='} high, "
                         f"got {v!r}")
    return lo, hi


def bead_field(
    shape=(512, 512),
    n_beads: int | None = None,
    *,
    seed=None,
    grid: int = 8,
    psf_size: int = 31,
    pixel_um: float = 0.1,
    z_range_um=(-0.4, 0.4),
    astigmatism: float = 0.15,
    axis: float | None = None,
    photons: float = 2000.0,
    background: float = 20.0,
    optics: _psf.Optics | None = None,
) -> BeadField:
    """Simulate a micro-bead image through a space-varying astigmatic microscope (paper 003 III-A-1).

    The optics draw NA in [1.1, 1.4], λ in [0.55, 0.65] µm and n in [1.41, 1.61] (unless ``optics`` is
    given); the defocus z varies across the field as a random polynomial of degree <= 2 spanning
    ``z_range_um``; the PSFs are astigmatic pupil PSFs (Noll 5/6, ``astigmatism`` waves RMS at a random
    axis) rendered on a ``grid x grid`` node grid, which defines the true grid operator. Beads are
    Dirac masses at random integer positions (at least ``psf_size // 2 + 1`` pixels from the border),
    with ±20% brightness around ``photons``; a smooth random background of mean level about
    ``background`` photons is added and the result is Poisson distributed.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape (H, W) in pixels; at least ``psf_size + 2`` along each axis.
    n_beads : int, optional
        Number of beads; default one per 48² pixels (at least 1). Beads may coincide.
    seed : int, numpy.random.Generator or None
        Seed of every draw (optics, depth profile, axis, positions, background, noise).
    grid : int
        Nodes of the operator grid along each axis (clipped to the image size).
    psf_size : int
        Kernel size of the PSFs in pixels (odd, at most 1025).
    pixel_um : float
        Pixel size in µm of the drawn optics (ignored when ``optics`` is given).
    z_range_um : (float, float)
        Lowest and highest defocus over the nodes, in µm.
    astigmatism : float
        Astigmatism in waves RMS.
    axis : float, optional
        Astigmatism axis in radians; default drawn uniformly in [0, π).
    photons : float
        Mean photon count of a bead (> 0).
    background : float
        Mean background level in photons (>= 0); the background spans [0, 2 ``background``].
    optics : lsfov.psf.Optics, optional
        The microscope; default drawn as above.

    Returns
    -------
    BeadField
        The noisy and noiseless images (float32, (H, W)), bead positions (P, 2) and amplitudes (P,),
        the true operator, the defocus at its nodes ``depth_um`` (gy, gx), the optics, the background
        and the drawn parameters.

    Raises
    ------
    TypeError
        If ``astigmatism``, ``axis``, ``photons`` or ``background`` is not a number.
    ValueError
        If ``shape`` is too small for ``psf_size``; ``grid``, ``n_beads`` or ``psf_size`` is not a
        positive integer (``psf_size`` odd, up to 1025); ``photons`` is not > 0 or ``background`` is
        negative; ``z_range_um`` is not a pair (low <= high); ``seed`` is not a valid seed; or the
        drawn optics are impossible (``pixel_um`` not a positive size in µm).

    Notes
    -----
    An :class:`~lsfov.LsfovWarning` is issued when some PSFs reach the edge of their
    kernel and are cut off.

    Examples
    --------
    >>> from lsfov import simulate
    >>> field = simulate.bead_field((256, 256), n_beads=20, seed=0)
    >>> field.image.shape, field.image.dtype, field.positions.shape
    ((256, 256), dtype('float32'), (20, 2))
    >>> field.operator  # the true blur, to check a calibration against
    ProductConvolution(grid, shape=(256, 256), grid=(8, 8), K=31)
    >>> field.depth_um.shape  # the defocus at its nodes
    (8, 8)
    """
    h, w = shape2d(shape)
    fits_in_memory((h, w), 8, "a bead field")  # (the sharp, blurred and noisy images, some in float64)
    grid = positive_int(grid, "grid")
    psf_size = positive_int(psf_size, "psf_size")
    photons = real_number(photons, "photons", minimum=0, maximum=1e15, exclusive=True)
    background = real_number(background, "background", minimum=0, maximum=1e15)
    astigmatism = real_number(astigmatism, "astigmatism")
    axis = None if axis is None else real_number(axis, "axis")
    z_range_um = _range(z_range_um, "z_range_um")
    rng = _rng(seed)
    if optics is None:
        optics = _psf.Optics(
            na=rng.uniform(1.1, 1.4),
            wavelength_um=rng.uniform(0.55, 0.65),
            pixel_um=pixel_um,
            immersion_index=rng.uniform(1.41, 1.61),
        )
    margin = psf_size // 2 + 1
    if h <= 2 * margin or w <= 2 * margin:
        raise ValueError(f"shape {shape} is too small for {psf_size}-pixel PSFs; use at least {2 * margin + 1}")
    if n_beads is None:
        n_beads = max(1, int(h * w / 48**2))
    n_beads = positive_int(n_beads, "n_beads")

    gy, gx = min(grid, h), min(grid, w)
    cy, cx = _cell_centers(gy, h), _cell_centers(gx, w)
    z = _random_polynomial((gy, gx), rng, 2, *z_range_um)
    drawn_axis = rng.uniform(0, np.pi)  # drawn even when given, so a seed's other draws do not move
    axis = drawn_axis if axis is None else axis
    coeffs = {5: astigmatism * np.sin(2 * axis) * np.ones(z.size), 6: astigmatism * np.cos(2 * axis) * np.ones(z.size)}
    kernels = _psf.zernike(coeffs, optics, size=psf_size, z_um=z.ravel()).reshape(gy, gx, psf_size, psf_size)
    cut = _psf.cut_off(kernels)
    if cut.any():
        warnings.warn(f"{int(cut.sum())} of the {cut.size} PSFs (defocus up to {np.abs(z).max():.2g} µm) reach the edge "
                      f"of the {psf_size}-pixel kernel and are cut off; pass a larger psf_size or a narrower z_range_um",
                      LsfovWarning, stacklevel=2)
    op = ProductConvolution.from_grid(kernels, (h, w), centers=(cy, cx))

    pos = np.stack([rng.integers(margin, h - margin, n_beads), rng.integers(margin, w - margin, n_beads)], 1)
    amp = photons * rng.uniform(0.8, 1.2, n_beads)
    dirac = np.zeros((h, w), np.float32)
    np.add.at(dirac, (pos[:, 0], pos[:, 1]), amp.astype(np.float32))
    bg = (background * 2 * _smooth_random((h, w), rng, max(h, w) / 4)).astype(np.float32)
    clean = np.maximum(op.apply(dirac), 0) + bg
    image = rng.poisson(clean).astype(np.float32)
    return BeadField(
        image=image, clean=clean, positions=pos, amplitudes=amp, operator=op, depth_um=z,
        optics=optics, background=bg,
        params={"astigmatism": astigmatism, "axis": axis, "seed": seed, "grid": (gy, gx)},
    )


def bead_stack(n_images: int, shape=(512, 512), *, seed=None, **kwargs) -> list[BeadField]:
    """Bead fields of one instrument in different states, as for learning a subspace of operators.

    Paper 003 Sec. II-D: optics and depth profile differ per image, the astigmatism axis (a property
    of the instrument) is shared unless ``axis`` is given. Image k uses a seed derived from ``seed``
    and k; the shared axis one derived from ``seed`` and ``n_images`` (give ``axis`` to keep it
    across stacks of different lengths).

    Parameters
    ----------
    n_images : int
        Number of bead fields.
    shape : int or (int, int)
        Image shape (H, W) in pixels.
    seed : int, numpy.random.Generator or None
        Root seed of the stack.
    **kwargs
        Further arguments of :func:`bead_field` (e.g. ``n_beads``, ``grid``, ``axis``).

    Returns
    -------
    list of BeadField
        ``n_images`` bead fields of one shape.
    """
    n_images = positive_int(n_images, "n_images")
    if isinstance(seed, np.random.Generator):  # as bead_field takes it
        seed = int(seed.integers(2**63))
    _rng(seed)  # a bad seed refused with our message, not NumPy's
    # (a SeedSequence given is copied, children already spawned counted: spawning advances it, and the
    # caller's would draw another stack next)
    root = copy.deepcopy(seed) if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    seeds = root.spawn(n_images)
    kwargs.setdefault("axis", float(np.random.default_rng(root.spawn(1)[0]).uniform(0, np.pi)))
    return [bead_field(shape, seed=s, **kwargs) for s in seeds]


def degrade(image, operator: ProductConvolution, *, photons: float = 1000.0, read_noise: float = 2.0,
            beta: float = 1.0, seed=None) -> np.ndarray:
    """Blur a sharp image with ``operator`` and add Poisson-Gaussian noise (paper 000 Eq. 10).

    The image is divided by its maximum, blurred, multiplied by ``photons`` (negative values of the
    blur clipped to zero: ``psi``) and becomes ``beta * Poisson(psi) + N(0, read_noise²)``.

    Parameters
    ----------
    image : array_like (H, W)
        Sharp image with a positive maximum; of the operator's shape.
    operator : ProductConvolution
        The blur (e.g. from :func:`psf_field`).
    photons : float
        Expected count of the image's brightest level before the blur (> 0); the blurred peak is
        lower where the blur spreads it.
    read_noise : float
        Standard deviation of the Gaussian read noise in counts (>= 0).
    beta : float
        Quantum efficiency, in (0, 1].
    seed : int, numpy.random.Generator or None
        Seed of the noise.

    Returns
    -------
    ndarray, float32, shape (H, W)
        The degraded image in counts; values can be slightly negative, as a camera's are. An
        xarray ``image`` gives an xarray, its dims (in their order), coordinates and attributes kept;
        a Dask image is computed and gives NumPy.

    Raises
    ------
    TypeError
        If ``operator`` is not a :class:`~lsfov.ProductConvolution`, ``image`` is not numeric, or a
        setting is not a number.
    ValueError
        If ``image`` is not 2-D, not of ``operator.shape``, holds NaN or Inf, or has no positive
        pixel; ``photons`` is not > 0, ``read_noise`` negative, ``beta`` outside (0, 1]; or ``seed``
        is not a valid seed.

    Examples
    --------
    A cell image blurred by a 2 x 2 grid of Gaussian PSFs, at 500 photons and 2 counts of read noise:

    >>> from lsfov import ProductConvolution, psf, simulate
    >>> sharp = simulate.sample_image("cell", 256)
    >>> op = ProductConvolution.from_grid(psf.gaussian([1.0, 2.0, 2.0, 3.0], size=15).reshape(2, 2, 15, 15),
    ...                                   sharp.shape)
    >>> blurred = simulate.degrade(sharp, op, photons=500, read_noise=2, seed=0)
    >>> blurred.shape, blurred.dtype
    ((256, 256), dtype('float32'))
    """
    if hasattr(image, "dims"):  # xarray: read by dim name (an (x, y) image is not blurred transposed)
        image = squeeze_plane(image)
        check_pixel_size(operator, image)
        yx = yx_order(image)
        out = degrade(yx.data, operator, photons=photons, read_noise=read_noise, beta=beta, seed=seed)
        out = yx.copy(data=out).transpose(*image.dims)
        out.attrs.pop("significant_bits", None)  # the source's, not this simulated camera's
        return out
    x = as_image(image)
    if not isinstance(operator, ProductConvolution):
        raise TypeError(f"operator must be an lsfov.ProductConvolution (e.g. from psf_field), got {type(operator).__name__}")
    if x.shape != operator.shape:
        raise ValueError(f"image shape {x.shape} does not match the operator's shape {operator.shape}")
    photons = real_number(photons, "photons", minimum=0, maximum=1e15, exclusive=True)  # beyond: Poisson overflows
    read_noise = real_number(read_noise, "read_noise", minimum=0)
    beta = real_number(beta, "beta", minimum=0, maximum=1, exclusive=True)
    hi = float(x.max())
    if hi <= 0:
        raise ValueError("image is all zero; nothing to degrade")
    psi = np.maximum(operator.apply(x / hi), 0) * photons
    return _poisson_gaussian(psi, _rng(seed), read_noise=read_noise, beta=beta)


def _poisson_gaussian(expected, rng, *, read_noise, beta):
    """Paper 000 Eq. 10: ``beta * Poisson(expected) + N(0, read_noise²)``, float32 (``read_noise`` and
    ``beta`` scalars or arrays that broadcast against ``expected``)."""
    return (beta * rng.poisson(expected) + read_noise * rng.standard_normal(np.shape(expected))).astype(np.float32)


def psf_field(shape, model="Z3", grid=(4, 4), *, seed=None, size: int | None = None, roughness: float = 1.0):
    """A random smooth field of PSF-model parameters on a node grid and its grid operator.

    Parameters vary smoothly (a bilinear ramp plus a little noise, scaled by ``roughness``) inside
    the model's ranges, as across a real field of view.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape (H, W) of the operator.
    model : str or PSFModel
        PSF model (``lsfov.psf.MODELS``).
    grid : int or (int, int)
        Node grid (gy, gx); the nodes sit at the default cell centres.
    seed : int, numpy.random.Generator or None
        Seed of the parameter field.
    size : int, optional
        Odd kernel size in pixels; default the model's.
    roughness : float
        Scale of the node-to-node noise added to the bilinear ramp (>= 0; 0: a pure ramp; 1: noise
        of 5 % of each parameter's range).

    Returns
    -------
    operator : ProductConvolution
        The grid operator of the rendered PSFs.
    params : ndarray, float64, shape (gy, gx, N)
        The model's N parameters at each node, in its units.

    Raises
    ------
    ValueError
        If ``model`` is unknown; ``shape`` or ``grid`` is not positive integers, or the grid has more
        nodes than the image has pixels along an axis; ``roughness`` is negative; ``size`` is not a
        positive odd integer up to 1025 or larger than the image; or ``seed`` is not a valid seed.
    """
    m = _psf.get_model(model)
    h, w = shape2d(shape)
    gy, gx = shape2d(grid, "grid")
    if gy > h or gx > w:
        raise ValueError(f"a grid of {gy}x{gx} nodes is finer than the {h}x{w} px image; give at most one node "
                         "per pixel (a few, e.g. 4x4, for a smooth field)")
    roughness = real_number(roughness, "roughness", minimum=0)
    rng = _rng(seed)
    lo, hi = m.bounds
    corners = rng.random((2, 2, m.n_params))
    ty = np.linspace(0, 1, gy)[:, None, None]
    tx = np.linspace(0, 1, gx)[None, :, None]
    unit = (corners[0, 0] * (1 - ty) * (1 - tx) + corners[0, 1] * (1 - ty) * tx
            + corners[1, 0] * ty * (1 - tx) + corners[1, 1] * ty * tx)
    unit = np.clip(unit + 0.05 * roughness * rng.standard_normal(unit.shape), 0, 1)
    if "axis" in m.params:  # keep the axis well inside its range: it wraps at pi
        i = m.params.index("axis")
        unit[..., i] = 0.1 + 0.8 * unit[..., i]
    params = lo + unit * (hi - lo)
    size = m.size if size is None else size  # (0 or False is no size: refused by render, not the default)
    kernels = m.render(params.reshape(-1, m.n_params), size=size).reshape(gy, gx, size, size)
    return ProductConvolution.from_grid(kernels, (h, w)), params


def sample_image(name: str = "cell", shape=None) -> np.ndarray:
    """A test image from scikit-image's bundled data (no download), float32 in [0, 1].

    Where an image stands for a sharp sample under a known blur (the CNN's depth and PSF readings),
    use a sharp one: an image's own blur adds to the PSF's.

    Parameters
    ----------
    name : {"cell", "hubble", "immunohistochemistry", "camera", "coins", "moon"}
        ``"cell"``: a cell in light microscopy (blurred itself, by about 3 px); ``"hubble"``: point
        sources on black; ``"immunohistochemistry"``: stained tissue, sharp. Colour images are
        averaged over their channels.
    shape : int or (int, int), optional
        Tile (by mirroring) or crop the image to this size; default its own.

    Returns
    -------
    ndarray, float32, shape (H, W)
        The image, scaled to span [0, 1].

    Raises
    ------
    ValueError
        If ``name`` is not one of the above, or ``shape`` is not positive integers.
    """
    from skimage import data

    loaders = {
        "cell": data.cell, "camera": data.camera, "coins": data.coins, "moon": data.moon,
        "hubble": lambda: data.hubble_deep_field().mean(axis=-1),
        "immunohistochemistry": lambda: data.immunohistochemistry().mean(axis=-1),
    }
    if name not in loaders:
        raise ValueError(f"unknown sample {name!r}; choose one of {sorted(loaders)}")
    img = loaders[name]().astype(np.float32)
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
    if shape is not None:
        h, w = shape2d(shape)
        fits_in_memory((h, w), 3, "a sample image")  # (the tiles, their crop and its copy)
        reps = (int(np.ceil(h / img.shape[0])), int(np.ceil(w / img.shape[1])))
        tile = np.block([[img[:, :: (1 if j % 2 == 0 else -1)][:: (1 if i % 2 == 0 else -1)]
                          for j in range(reps[1])] for i in range(reps[0])])
        img = np.ascontiguousarray(tile[:h, :w])
    return img



@dataclass
class TiltedSurface:
    """A textured surface imaged through an astigmatic microscope, with its true depth (what
    :func:`tilted_surface` returns).

    Attributes
    ----------
    image : ndarray, float32, (H, W)
        The noisy image, in counts.
    depth_um : ndarray, float32, (H, W)
        The surface's distance from the focal plane at each pixel, in µm.
    operator : ProductConvolution
        The true blur (a grid of Z3 PSFs).
    params : ndarray, (gy, gx, 3)
        The true Z3 parameters (focus, astigmatism, axis) at the operator's nodes.
    focus_per_um : float
        Waves RMS of defocus per µm of depth.
    axis : float
        The instrument's astigmatism axis in radians, modulo π.
    """

    image: np.ndarray
    depth_um: np.ndarray
    operator: ProductConvolution
    params: np.ndarray
    focus_per_um: float
    axis: float


def tilted_surface(shape=(1024, 1024), *, depth_range_um=(-10.0, 10.0), direction: float = 0.0,
                   curvature: float = 0.0, texture: str = "immunohistochemistry", astigmatism: float = 0.15,
                   axis: float = np.pi / 4, focus_per_um: float = 0.045, grid: int = 8, photons: float = 1000.0,
                   read_noise: float = 2.0, seed=None) -> TiltedSurface:
    """A tilted (or curved) textured plane seen through an astigmatic system (paper 000 Sec. III-E).

    The depth varies linearly along ``direction``, plus ``curvature`` times a centred quadratic,
    scaled to span ``depth_range_um`` exactly. Defocus is ``focus_per_um`` waves RMS per µm of depth
    (a property of the instrument, like its astigmatism ``axis``); above focus the PSF has the
    instrument's axis, below it the axis turned by π/2 (that is how the Z3 model writes a negative
    defocus). Z3 PSFs are rendered on a ``grid x grid`` node grid; the texture is blurred by their
    grid operator and degraded as by :func:`degrade`.

    Parameters
    ----------
    shape : int or (int, int)
        Image shape (H, W) in pixels.
    depth_range_um : (float, float)
        Lowest and highest depth in µm (low < high); the defocus they give must stay within the
        Z3 model's focus range.
    direction : float
        Direction of the tilt in radians from the x axis.
    curvature : float
        Weight of the quadratic term relative to the linear one (0: a plane).
    texture : str
        The sample, a name of :func:`sample_image`.
    astigmatism : float
        Astigmatism in waves RMS.
    axis : float
        Astigmatism axis in radians.
    focus_per_um : float
        Defocus in waves RMS per µm of depth (> 0): Noll 4 = ``focus_per_um · depth``, the opposite
        sign of a pupil's ``z_um`` (:func:`lsfov.psf.zernike`, :func:`bead_field`).
    grid : int
        Nodes of the operator grid along each axis (clipped to the image size).
    photons, read_noise : float
        Peak photon count and read-noise std in counts, as in :func:`degrade`.
    seed : int, numpy.random.Generator or None
        Seed of the noise.

    Returns
    -------
    TiltedSurface
        The noisy image (float32, (H, W)), the true depth per pixel in µm, the true operator, the
        Z3 parameters at its nodes (gy, gx, 3), ``focus_per_um`` and the axis modulo π.

    Raises
    ------
    ValueError
        If the depth range is empty or its defocus exceeds the Z3 model's range.

    Examples
    --------
    A sample tilted from 10 µm below focus to 10 µm above it, left to right:

    >>> from lsfov import simulate
    >>> surface = simulate.tilted_surface((256, 256), grid=4, seed=0)
    >>> surface.image.shape, float(surface.depth_um.min()), float(surface.depth_um.max())
    ((256, 256), -10.0, 10.0)
    >>> bool(surface.depth_um[128, 255] > surface.depth_um[128, 0])
    True
    >>> surface.params.shape  # Z3's (focus, astigmatism, axis) at the operator's 4 x 4 nodes
    (4, 4, 3)
    """
    h, w = shape2d(shape)
    fits_in_memory((h, w), 8, "a tilted surface")  # (its sample, depth, blurred and noisy images)
    grid = positive_int(grid, "grid")
    focus_per_um = real_number(focus_per_um, "focus_per_um", minimum=0, exclusive=True)
    direction, curvature = real_number(direction, "direction"), real_number(curvature, "curvature")
    astigmatism, axis = real_number(astigmatism, "astigmatism"), real_number(axis, "axis")
    lo, hi = _range(depth_range_um, "depth_range_um", strict=True)
    m = _psf.get_model("Z3")

    def depth_at(y, x):
        u = ((x - (w - 1) / 2) * np.cos(direction) + (y - (h - 1) / 2) * np.sin(direction)) / (max(h, w) / 2)
        return u + curvature * u**2

    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    raw = depth_at(yy, xx)
    rmin, rmax = raw.min(), raw.max()
    depth = lo + (hi - lo) * (raw - rmin) / (rmax - rmin)
    gy, gx = min(grid, h), min(grid, w)
    cy, cx = _cell_centers(gy, h), _cell_centers(gx, w)
    nodes = lo + (hi - lo) * (depth_at(*np.meshgrid(cy, cx, indexing="ij")) - rmin) / (rmax - rmin)
    kappa = float(focus_per_um)
    fmax = m.ranges["focus"][1]
    if not kappa > 0 or kappa * max(abs(lo), abs(hi)) > fmax:
        raise ValueError(f"focus_per_um={focus_per_um} and depths {depth_range_um} µm give defocus beyond the Z3 "
                         f"model's {fmax} waves; use depths within ±{fmax / max(kappa, 1e-12):.3g} µm")
    f = kappa * nodes
    params = np.stack([np.abs(f), np.full_like(f, astigmatism),
                       np.where(f >= 0, axis, axis + np.pi / 2) % np.pi], axis=-1)
    kernels = m.render(params.reshape(-1, 3)).reshape(gy, gx, m.size, m.size)
    op = ProductConvolution.from_grid(kernels, (h, w), centers=(cy, cx), attrs={"psf_model": "Z3"})
    image = degrade(sample_image(texture, (h, w)), op, photons=photons, read_noise=read_noise, seed=seed)
    return TiltedSurface(image=image, depth_um=depth.astype(np.float32), operator=op, params=params,
                         focus_per_um=float(kappa), axis=float(axis) % np.pi)
