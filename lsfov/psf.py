"""PSF models: optics, anisotropic Gaussians and scalar pupil-function (Zernike) PSFs.

Conventions (every function in lsfov follows them):

* Arrays are indexed ``[y, x]``; ``y`` is the row index and grows downwards.
* Kernels are odd-sized (``K x K``), point-sampled at pixel centres, centred at ``K // 2``,
  non-negative and sum to 1.
* Pupil coordinates ``xi = (xi_y, xi_x)`` are spatial frequencies in cycles/µm; the pupil angle is
  ``theta = atan2(xi_y, xi_x)`` and the normalised radius ``rho = |xi| / (NA / lambda)``.
* Pupil field (paper 003 Eq. 7, paper 000 Eq. 6-7)::

      E(xi) = 1{|xi| <= NA/lambda} * exp(2i*pi*(W(xi) + z*sqrt(n**2/lambda**2 - |xi|**2)))

  with ``W = sum_j c_j Z_j(rho, theta)`` in waves, ``Z_j`` the Noll-indexed Zernike polynomials
  normalised to unit RMS over the pupil (so ``c_j`` are waves RMS), ``z`` the defocus distance in µm
  and ``n`` the immersion index. The PSF is ``|F E|**2`` with ``F`` the forward Fourier transform
  (``exp(-2i*pi*<xi, x>)``), so a positive x-tilt (Noll 2) moves the PSF towards +x.
* Named models (``MODELS``): ``focus`` is Noll 4 in waves RMS (>= 0: the sign of a pure defocus is
  not observable in intensity); an astigmatism of magnitude ``c >= 0`` and axis ``theta`` in
  ``[0, pi)`` gives Noll 6 = ``c cos 2theta`` and Noll 5 = ``c sin 2theta``. Since all these terms are
  even, ``(focus, c, theta)`` and ``(-focus, c, theta + pi/2)`` give the same PSF: the axis carries the
  side of focus, which is what depth-from-astigmatism reads (paper 000 Eq. 14).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

import numpy as np

from ._validate import LsfovWarning, real_numbers, shown

__all__ = [
    "Optics",
    "PSFModel",
    "MODELS",
    "MAX_NOLL",
    "gaussian",
    "zernike",
    "noll_to_nm",
    "zernike_polynomial",
    "airy",
    "get_model",
]

# Upper bound of a batch rendered in one FFT call, and the bytes its temporaries may take (fewer
# PSFs a batch where the pupil or the kernel is large: 1024 PSFs of 255² took 2.9 GB). Batches are
# powers of two: the products' rounding depends on a batch's size, and a grid rendered in parts
# that start at multiples of _BATCH is then the grid rendered at once, bit for bit.
_BATCH = 1024
_BATCH_BYTES = 2**28


_MAX_UNDERSAMPLING = 100  # pixel / Nyquist pixel: what Optics accepts


@dataclass(frozen=True)
class Optics:
    """Imaging conditions of a microscope.

    Parameters
    ----------
    na : float
        Numerical aperture of the objective.
    wavelength_um : float
        Emission wavelength in µm.
    pixel_um : float
        Pixel size in the object plane (camera pixel / magnification) in µm.
    immersion_index : float, optional
        Refractive index of the immersion medium (1.0 air, 1.33 water, 1.518 oil). Default 1.0 (air):
        give it for an immersion objective, as an NA above it is refused.

    Raises
    ------
    ValueError
        If a field is not a finite positive number; ``wavelength_um`` exceeds 5 (most often nm given
        for µm) or ``immersion_index`` 2.5; ``pixel_um`` is more than 100 times the Nyquist pixel
        λ/(4 NA) (e.g. nm given for µm); or ``na`` exceeds ``immersion_index``.
    """

    na: float
    wavelength_um: float
    pixel_um: float
    immersion_index: float = 1.0

    def __post_init__(self):
        for name in ("na", "wavelength_um", "pixel_um", "immersion_index"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not (isinstance(v, (int, float, np.floating, np.integer))
                                                       and math.isfinite(v) and v > 0):
                raise ValueError(f"Optics.{name} must be a positive number, got {v!r}")
        # Values no microscope has, most often nm given for µm: refused before a PSF of 1/225 per
        # pixel, or a pupil of gigabytes, is made of them.
        for name, top, hint in (("wavelength_um", 5.0, "give it in µm, e.g. 0.6 for 600 nm"),
                                ("immersion_index", 2.5, "e.g. 1.518 for oil")):
            if getattr(self, name) > top:
                raise ValueError(f"Optics.{name}={getattr(self, name)!r} is beyond any microscope's (> {top:g}); "
                                 f"{hint}")
        # A pixel is judged against the optics' Nyquist pixel: a macro-zoom's 30 µm at NA 0.1 is
        # some 20 of them, a 65 nm pixel given as 65 at NA 1.4 some 600.
        if self.nyquist_ratio > _MAX_UNDERSAMPLING:
            raise ValueError(f"Optics.pixel_um={self.pixel_um!r} is {self.nyquist_ratio:.0f} times the Nyquist pixel "
                             f"λ/(4 NA) = {self.wavelength_um / (4 * self.na):.3g} µm, beyond any microscope's; give "
                             "the pixel in the object plane in µm, e.g. 0.1 for 100 nm")
        if self.na > self.immersion_index:
            raise ValueError(
                f"Optics.na={self.na} exceeds immersion_index={self.immersion_index}; "
                "use the refractive index of the immersion medium (e.g. 1.518 for oil)"
            )

    @property
    def cutoff(self) -> float:
        """Pupil radius NA/lambda in cycles/µm."""
        return self.na / self.wavelength_um

    @property
    def nyquist_ratio(self) -> float:
        """Pixel size over the Nyquist pixel λ/(4 NA); above 1 the PSF is undersampled."""
        return self.pixel_um * 4 * self.na / self.wavelength_um

    def to_dict(self) -> dict:
        """The four fields as plain floats (JSON), for ``Optics(**d)``.

        Returns
        -------
        dict
            ``na``, ``wavelength_um``, ``pixel_um`` and ``immersion_index``.
        """
        return {k: float(getattr(self, k)) for k in ("na", "wavelength_um", "pixel_um", "immersion_index")}


# ----------------------------------------------------------------------------------------------
# Zernike polynomials (Noll indexing, unit RMS over the unit disk)


#: The largest Noll index: its radial order 40 is the last whose polynomial float64 sums exactly
#: (order 40: 1 at the rim to 1e-15, orthonormal to 5e-4; order 50: 11x off at the rim).
MAX_NOLL = 41 * 42 // 2


def noll_to_nm(j: int) -> tuple[int, int]:
    """Radial order ``n`` and signed azimuthal frequency ``m`` of Noll index ``j`` (1-based).

    ``m > 0`` is a cosine term (even ``j``), ``m < 0`` a sine term (odd ``j``).

    Parameters
    ----------
    j : int
        Noll index, >= 1 (4: defocus; 5, 6: astigmatism).

    Returns
    -------
    (int, int)
        ``(n, m)``, with ``|m| <= n`` and ``n - |m|`` even.

    Raises
    ------
    ValueError
        If ``j`` is not an integer from 1 to :data:`MAX_NOLL` (a bool or float is refused).
    """
    if isinstance(j, (bool, np.bool_)) or not isinstance(j, (int, np.integer)) or j < 1:
        raise ValueError(f"Noll indices are integers from 1, got {j!r}")
    j = int(j)
    if j > MAX_NOLL:  # (a radial order past 40 cancels its polynomial's terms into noise, in float64)
        raise ValueError(f"Noll indices up to {MAX_NOLL} (radial order 40) are supported, got {j}")
    n = 0
    while j > (n + 1) * (n + 2) // 2:
        n += 1
    k = j - n * (n + 1) // 2 - 1  # position within the radial order
    m = 2 * ((k + 1) // 2) if n % 2 == 0 else 2 * (k // 2) + 1
    if m != 0 and j % 2 == 1:
        m = -m
    return n, m


def cut_off(kernels) -> np.ndarray:
    """Which of ``kernels`` (..., K, K) reach their box's edge: a bright rim, or much light in it (a
    defocused PSF's rim can fall on a dark ring while half its light lies beyond). Within the models'
    ranges at 31 px: rim/peak at most 0.31, rim light at most 2.6 % (Z3's widest; at 3 % about 7 %
    of the light is lost)."""
    k = np.asarray(kernels)
    rim = np.concatenate([k[..., 0, :], k[..., -1, :], k[..., 1:-1, 0], k[..., 1:-1, -1]], axis=-1)
    return (rim.max(axis=-1) > 0.5 * k.max(axis=(-2, -1))) | (rim.sum(axis=-1) > 0.03 * k.sum(axis=(-2, -1)))


def zernike_polynomial(j: int, rho, theta):
    """Noll-normalised Zernike polynomial ``Z_j(rho, theta)`` (unit RMS over ``rho <= 1``).

    Values outside the unit disk are returned as computed (not masked).

    Parameters
    ----------
    j : int
        Noll index, >= 1.
    rho : array_like
        Normalised pupil radius (1 at the pupil's edge, ``NA / lambda``).
    theta : array_like
        Pupil angle in radians (``atan2(xi_y, xi_x)``), broadcastable with ``rho``; unused for
        ``m = 0``.

    Returns
    -------
    ndarray, float64
        ``Z_j`` at each point, of the broadcast shape of ``rho`` and ``theta`` (``rho``'s for ``m = 0``).

    Raises
    ------
    ValueError
        If ``j`` is not an integer from 1 to :data:`MAX_NOLL`.
    TypeError
        If ``rho`` or ``theta`` is not real numbers.
    """
    n, m = noll_to_nm(j)
    am = abs(m)
    rho, theta = real_numbers(rho, "rho"), real_numbers(theta, "theta")  # (complex rho once lost its imaginary part)
    radial = np.zeros_like(rho)
    for s in range((n - am) // 2 + 1):
        c = (-1) ** s * math.factorial(n - s) / (
            math.factorial(s) * math.factorial((n + am) // 2 - s) * math.factorial((n - am) // 2 - s)
        )
        radial += c * rho ** (n - 2 * s)
    if m == 0:
        return math.sqrt(n + 1) * radial
    ang = np.cos(am * theta) if m > 0 else np.sin(am * theta)
    return math.sqrt(2 * (n + 1)) * radial * ang


# ----------------------------------------------------------------------------------------------
# Gaussian PSFs


MAX_SIZE = 1025  # a PSF kernel that large is a bigger blur than any microscope image can undo


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd integer, got {size!r}")
    if size > MAX_SIZE:
        raise ValueError(f"kernel size {size} exceeds {MAX_SIZE} pixels; is the PSF width in pixels, not nm?")
    return int(size)


def gaussian(sigma_y, sigma_x=None, size: int | None = None) -> np.ndarray:
    """Anisotropic Gaussian PSF (paper 000 Eq. 8), point-sampled and normalised to sum 1.

    Parametrised by standard deviations (the widths of paper 000 Table II); Eq. 8 writes the variances
    ``a = sigma**2``. Point-sampled at pixel centres, as Eq. 8 is (not integrated over each pixel):
    the kernel's own standard deviation is ``sigma`` from about 0.7 px up, and below it narrower
    (0.464 px at ``sigma = 0.5``, the ranges' low end).

    Parameters
    ----------
    sigma_y, sigma_x : float or array_like of shape (B,)
        Standard deviations in pixels along y (rows) and x (columns); ``sigma_x`` defaults to
        ``sigma_y`` (isotropic, model G1). Arrays give a batch of kernels.
    size : int, optional
        Odd kernel size; default ``2 * ceil(4 * max sigma) + 1``.

    Returns
    -------
    ndarray, float32, shape (size, size) or (B, size, size)
        The kernels, centred at ``size // 2``, each summing to 1.

    Raises
    ------
    TypeError
        If a width is not a real number.
    ValueError
        If the widths are empty, not finite or <= 0, or ``sigma_y`` and ``sigma_x`` do not broadcast;
        if ``size`` is not a positive odd integer up to 1025 (or the default size would exceed it).

    Examples
    --------
    >>> from lsfov import psf
    >>> k = psf.gaussian(1.5)
    >>> k.shape, k.dtype, round(float(k.sum()), 6)
    ((13, 13), dtype('float32'), 1.0)
    >>> psf.gaussian([1.0, 2.0], [2.0, 1.0], size=21).shape  # a batch of two anisotropic PSFs
    (2, 21, 21)
    """
    try:
        sy = real_numbers(sigma_y, "sigma_y")
        sx = sy if sigma_x is None else real_numbers(sigma_x, "sigma_x")
    except TypeError:
        raise TypeError(f"sigma_y and sigma_x must be numbers (standard deviations in pixels), got {shown(sigma_y)} "
                        f"and {shown(sigma_x)}") from None
    try:
        sy, sx = np.broadcast_arrays(sy, sx)
    except ValueError:
        raise ValueError(f"sigma_y and sigma_x must be batches of one length, got shapes {sy.shape} and {sx.shape}") from None
    if sy.size == 0:
        raise ValueError("no Gaussian widths given (an empty batch); pass at least one sigma")
    if not np.all(np.isfinite(sy) & np.isfinite(sx)) or np.any(sy <= 0) or np.any(sx <= 0):
        raise ValueError("Gaussian widths must be finite and > 0 (standard deviations in pixels)")
    if size is None:
        widest = float(max(sy.max(), sx.max()))
        if 8 * widest + 1 > MAX_SIZE:  # (said before the size, which for 1e300 is a number of 300 digits)
            raise ValueError(f"a Gaussian of sigma {widest:g} px needs a kernel over {MAX_SIZE} pixels; is the PSF "
                             "width in pixels, not nm?")
        size = 2 * int(math.ceil(4 * widest)) + 1
    size = _check_size(size)
    r = np.arange(size) - size // 2
    gy = np.exp(-0.5 * (r / sy[..., None]) ** 2)
    gx = np.exp(-0.5 * (r / sx[..., None]) ** 2)
    gy /= gy.sum(-1, keepdims=True)  # normalising each axis makes the product sum to exactly 1
    gx /= gx.sum(-1, keepdims=True)
    return (gy[..., :, None] * gx[..., None, :]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Pupil-function PSFs


@lru_cache(maxsize=32)
def _pupil_plan(optics: Optics, size: int, nolls: tuple[int, ...]):
    """Pupil samples, Zernike basis and partial-DFT matrix for one (optics, kernel size).

    The PSF is evaluated with a matrix Fourier transform, ``A @ E @ A.T``, straight at the K pixel
    centres: no oversampling, no fftshift, and only the pupil's (2R+1)² samples enter the product.
    """
    cutoff = optics.cutoff
    # Pupil spacing: >= 32 samples across the radius and a spatial period of >= 2 kernels so that PSF
    # tails do not alias into the kernel. Against 1024 samples (DEFAULT_OPTICS, 31 px): in focus within
    # 0.2 % of the peak; a steep phase samples coarser, 1.3 % at 0.25 waves RMS of defocus, 2.7 % at 0.5
    # (1.7 % of the light), 3.6 % at Z3's widest corner (0.5 of defocus with 0.3 of astigmatism). The
    # models are trained and used with these PSFs.
    df = min(cutoff / 32.0, 1.0 / (2.0 * size * optics.pixel_um))
    r = int(math.ceil(cutoff / df))
    f = df * np.arange(-r, r + 1)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    rho = np.hypot(fy, fx) / cutoff
    inside = (rho <= 1.0).ravel()
    rho_in, theta_in = rho.ravel()[inside], np.arctan2(fy, fx).ravel()[inside]
    basis = (
        np.stack([zernike_polynomial(j, rho_in, theta_in) for j in nolls]).astype(np.float32) if nolls else None
    )
    n_over_lambda = optics.immersion_index / optics.wavelength_um
    # Angular-spectrum defocus term minus its constant part (a global phase).
    defocus = (np.sqrt(np.maximum(n_over_lambda**2 - (rho_in * cutoff) ** 2, 0.0)) - n_over_lambda).astype(
        np.float32
    )
    x = optics.pixel_um * (np.arange(size) - size // 2)
    dft = np.exp(-2j * np.pi * np.outer(x, f)).astype(np.complex64)  # (K, 2R+1)
    return 2 * r + 1, inside, basis, defocus, dft


def zernike(coeffs: Mapping[int, float], optics: Optics, size: int = 31, z_um=0.0) -> np.ndarray:
    """Scalar pupil-function PSF with Zernike aberrations (paper 003 Eq. 6-7).

    Parameters
    ----------
    coeffs : dict {int: float or array_like (B,)} or None
        Noll index -> coefficient in waves RMS. Arrays (all of one length B) render a batch. Empty or
        None: no aberration.
    optics : Optics
        NA, wavelength, pixel size and immersion index.
    size : int, optional
        Odd kernel size in pixels, at most 1025; default 31.
    z_um : float or array_like (B,), optional
        Defocus distance in µm through the angular-spectrum term ``z sqrt(n²/λ² - |ξ|²)``; default 0.

    Returns
    -------
    ndarray, float32, shape (size, size) or (B, size, size)
        Point-sampled intensity PSF, centred at ``size // 2``, summing to 1.

    Raises
    ------
    TypeError
        If ``optics`` is not an :class:`Optics`, ``coeffs`` is not a mapping, or a coefficient or
        ``z_um`` is not a real number.
    ValueError
        If a Noll index is not an integer from 1 to :data:`MAX_NOLL`; ``size`` is not a positive odd
        integer up to 1025; or the coefficients and ``z_um`` are empty, not finite, or batches of
        different lengths.

    Examples
    --------
    A water objective (NA 1.2, 600 nm, 100 nm pixels) with 0.1 waves of astigmatism (Noll 5): the
    PSF stretches along one diagonal on one side of focus, along the other on the other side.

    >>> from lsfov import psf
    >>> optics = psf.Optics(na=1.2, wavelength_um=0.6, pixel_um=0.1, immersion_index=1.33)
    >>> k = psf.zernike({5: 0.1}, optics, size=31, z_um=[-0.5, 0.5])
    >>> k.shape, round(float(k[0].sum()), 5)
    ((2, 31, 31), 1.0)
    >>> bool((k[0][10, 10] > k[0][10, 20]) != (k[1][10, 10] > k[1][10, 20]))
    True
    """
    if not isinstance(optics, Optics):
        raise TypeError(f"optics must be an lsfov.Optics, got {type(optics).__name__}")
    size = _check_size(size)
    if coeffs is not None and not isinstance(coeffs, Mapping):
        raise TypeError(f"coeffs must be a dict {{Noll index: waves RMS}}, e.g. {{4: 0.2}}; got {type(coeffs).__name__}")
    coeffs = dict(coeffs or {})
    for j in coeffs:
        noll_to_nm(j)
    nolls = tuple(sorted(int(j) for j in coeffs))
    try:
        values = [real_numbers(coeffs[j], "coefficient") for j in nolls]
        z = real_numbers(z_um, "z_um")
    except TypeError:
        raise TypeError("Zernike coefficients and z_um must be numbers or 1-D arrays of numbers, got "
                        f"{shown(coeffs)} and {shown(z_um)}") from None
    batched = any(v.ndim > 0 for v in values) or z.ndim > 0
    try:
        arrays = np.broadcast_arrays(*values, z)
    except ValueError:
        raise ValueError("Zernike coefficients and z_um must be batches of one length, got shapes "
                         f"{[v.shape for v in values + [z]]}") from None
    if arrays[-1].size == 0:
        raise ValueError("no Zernike coefficients given (an empty batch); pass at least one value per coefficient")
    b = arrays[-1].size
    cmat = np.stack([a.reshape(-1) for a in arrays[:-1]], axis=1) if nolls else np.zeros((b, 0))
    zvec = arrays[-1].reshape(-1)
    if not (np.all(np.isfinite(cmat)) and np.all(np.isfinite(zvec))):
        raise ValueError("Zernike coefficients and z_um must be finite")
    p, inside, basis, defocus, dft = _pupil_plan(optics, size, nolls)
    out = np.empty((b, size, size), dtype=np.float32)
    # Per PSF: phase and pupil field (4 + 8 bytes a pupil sample), the half-transformed field, the
    # amplitude and its transposed copies (complex64), the intensity.
    step = max(1, min(_BATCH, _BATCH_BYTES // (12 * p * p + 16 * p * size + 20 * size * size)))
    step = 1 << (step.bit_length() - 1)  # (a power of two: see _BATCH)
    for s in range(0, b, step):  # batches of matrix products, not a loop over PSFs
        e = slice(s, min(b, s + step))
        n = e.stop - e.start
        phase = np.outer(zvec[e].astype(np.float32), defocus)
        if basis is not None:
            phase += cmat[e].astype(np.float32) @ basis
        phase *= np.float32(2 * np.pi)
        field = np.zeros((n, p * p), dtype=np.complex64)
        field.real[:, inside] = np.cos(phase)  # float32 cos/sin: ~2x faster than complex exp
        field.imag[:, inside] = np.sin(phase)
        # amp = A @ E @ A.T as two large GEMMs over the whole batch.
        tmp = (field.reshape(n * p, p) @ dft.T).reshape(n, p, size)
        amp = (dft @ tmp.transpose(1, 0, 2).reshape(p, n * size)).reshape(size, n, size).transpose(1, 0, 2)
        psf = amp.real**2 + amp.imag**2
        out[e] = psf / psf.sum(axis=(-2, -1), keepdims=True)
    return out if batched else out[0]


def airy(optics: Optics, size: int = 31) -> np.ndarray:
    """Analytic in-focus Airy pattern ``[2 J1(v)/v]²``, ``v = 2π NA r / λ``, point-sampled, sum 1.

    The aberration-free, in-focus case of :func:`zernike` in closed form (no pupil sampling).

    Parameters
    ----------
    optics : Optics
        Its NA, wavelength and pixel size set the pattern's scale (the immersion index plays no part).
    size : int
        Odd kernel size in pixels (at most 1025).

    Returns
    -------
    ndarray, float32, shape (size, size)
        Centred at ``size // 2``, normalised to sum 1 over the kernel.

    Raises
    ------
    TypeError
        If ``optics`` is not an :class:`Optics`.
    ValueError
        If ``size`` is not a positive odd integer up to 1025.
    """
    from scipy.special import j1

    if not isinstance(optics, Optics):
        raise TypeError(f"optics must be an lsfov.Optics, got {type(optics).__name__}")
    size = _check_size(size)
    r = np.arange(size) - size // 2
    rr = np.hypot(r[:, None], r[None, :]) * optics.pixel_um
    v = 2 * np.pi * optics.na * rr / optics.wavelength_um
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(v == 0, 1.0, (2 * j1(v) / np.where(v == 0, 1, v)) ** 2)
    return (a / a.sum()).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Named models


@dataclass(frozen=True)
class PSFModel:
    """A named parametric PSF model (paper 000 Table II).

    Attributes
    ----------
    name : str
    description : str
        One line on the model (and its paper reference).
    params : tuple of str
        Parameter names, in the order of the columns of a parameter batch.
    units : dict {param: unit}
    ranges : dict {param: (low, high)}
        Default sampling ranges (training-set synthesis draws uniformly in them).
    optics : Optics or None
        Optics of Zernike models (part of the model); ``None`` for Gaussian models.
    size : int
        Default kernel size.
    """

    name: str
    params: tuple
    units: Mapping[str, str]
    ranges: Mapping[str, tuple]
    description: str
    optics: Optics | None = None
    size: int = 31
    _kind: str = field(default="gaussian", repr=False)

    @property
    def n_params(self) -> int:
        """Number of parameters N (columns of a parameter batch)."""
        return len(self.params)

    def period(self, param: str) -> float | None:
        """The period of an angular parameter (None for the others): the astigmatism axis repeats
        every π, and every π/2 without defocus (Z2: turning the axis by π/2 flips the astigmatism's
        sign, which alone gives the same PSF).

        Parameters
        ----------
        param : str
            A parameter name (any string; only ``"axis"`` has a period).

        Returns
        -------
        float or None
            The period in radians, or None for a non-angular parameter.
        """
        if param != "axis":
            return None
        return np.pi if "focus" in self.params else np.pi / 2

    def to_meta(self) -> dict:
        """The model as stored results record it (JSON types): name, parameters, units, ranges, optics,
        and its kernel size where it is not the named model's.

        Returns
        -------
        dict
            Keys ``psf_model``, ``params``, ``units``, ``ranges`` ({param: [low, high]}), ``optics``
            (:meth:`Optics.to_dict` or None) and, only where it differs from the named model's, ``size``;
            :meth:`from_meta` reads it back.
        """
        return {"psf_model": self.name, "params": list(self.params), "units": dict(self.units),
                "ranges": {p: list(v) for p, v in self.ranges.items()},
                "optics": self.optics.to_dict() if self.optics else None,
                **({"size": int(self.size)} if self.name in MODELS and self.size != MODELS[self.name].size else {})}

    @classmethod
    def from_meta(cls, meta: Mapping) -> PSFModel:
        """The model a record of :meth:`to_meta` describes: the named model (a name or a model) with the
        recorded ranges, optics and kernel size, its own where the record has none.

        Parameters
        ----------
        meta : Mapping
            A :meth:`to_meta` record (e.g. a model file's or a training set's metadata): ``psf_model``
            required; ``ranges``, ``optics`` and ``size`` optional. Other keys are ignored.

        Returns
        -------
        PSFModel

        Raises
        ------
        ValueError
            If ``meta`` is not a mapping with ``psf_model``, names no known model, or records
            impossible optics.
        ValueError
            If the recorded optics lack one of :class:`Optics`' fields or have one it does not know.
        """
        if not isinstance(meta, Mapping) or "psf_model" not in meta:
            raise ValueError("not a PSF-model record (to_meta(): psf_model, ranges, optics); give one of a model "
                             "file's or a training set's metadata")
        base = get_model(meta["psf_model"])
        ranges = {p: tuple(v) for p, v in (meta.get("ranges") or base.ranges).items()}
        optics = meta.get("optics")
        if optics:
            fields = {f.name: f.default is dataclasses.MISSING for f in dataclasses.fields(Optics)}
            required = {name for name, needed in fields.items() if needed}
            if not isinstance(optics, Mapping) or not required <= set(optics) or not set(optics) <= set(fields):
                raise ValueError(f"the record's optics must hold {sorted(required)} (and optionally "
                                 f"{', '.join(sorted(set(fields) - required))}), got {shown(optics)}; is this a model "
                                 "file's or a training set's metadata?")
        return dataclasses.replace(base, ranges=ranges, optics=Optics(**optics) if optics else base.optics,
                                   size=int(meta.get("size") or base.size))

    def as_array(self, params) -> tuple[np.ndarray, bool]:
        """Parameter set(s) as a (B, N) float64 array, and whether a batch was given.

        Parameters
        ----------
        params : dict {param: float or array_like (B,)} or array_like (N,) or (B, N)
            Values in the model's units (:attr:`units`), columns in the order of :attr:`params`. A
            dict must hold every parameter (extra keys are ignored); its values broadcast together.

        Returns
        -------
        ndarray, float64, (B, N)
            One row per PSF (B = 1 for a single set).
        bool
            Whether ``params`` was a batch (a (B, N) array, or a dict of arrays).

        Raises
        ------
        ValueError
            If a parameter is missing, the array is not (N,) or (B, N), or it is empty or not finite;
            or a dict's arrays are not 1-D batches of one length.
        TypeError
            If a value is not a number.
        """
        if isinstance(params, Mapping):
            missing = [p for p in self.params if p not in params]
            if missing:
                raise ValueError(f"model {self.name} needs parameters {list(self.params)}; missing {missing}")
            try:
                cols = [real_numbers(params[p], p) for p in self.params]
            except TypeError:
                raise TypeError(f"model {self.name}'s parameters must be numbers or 1-D arrays of numbers, got "
                                f"{shown(params)}") from None
            try:
                cols = np.broadcast_arrays(*cols)
            except ValueError:
                raise ValueError(f"model {self.name}'s parameters must be batches of one length, got shapes "
                                 f"{ {p: c.shape for p, c in zip(self.params, cols)} }") from None
            if cols[0].ndim > 1:  # (a grid of values read as one flat batch would lose its layout unsaid)
                raise ValueError(f"model {self.name}'s parameters must be numbers or 1-D batches, got shapes "
                                 f"{ {p: np.shape(params[p]) for p in self.params} }; pass them raveled "
                                 "(.ravel()) and reshape the PSFs")
            batched = cols[0].ndim > 0
            arr = np.stack([c.reshape(-1) for c in cols], axis=1)
        else:
            try:
                arr = real_numbers(params, "params")
            except TypeError:
                raise TypeError(f"model {self.name} takes {self.n_params} real numbers {list(self.params)} per PSF, "
                                f"got {shown(params)}" + (f" of {np.asarray(params).dtype}" if hasattr(params, "dtype")
                                                         else "")) from None
            batched = arr.ndim == 2
            arr = np.atleast_2d(arr)
            if arr.ndim != 2 or arr.shape[1] != self.n_params:
                raise ValueError(
                    f"model {self.name} takes {self.n_params} parameters {list(self.params)} per PSF; "
                    f"got an array of shape {np.shape(params)}"
                )
        if arr.size == 0:
            raise ValueError(f"no {self.name} parameters given (an empty batch); pass at least one PSF's")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{self.name} parameters must be finite")
        return arr, batched

    def render(self, params, size: int | None = None, optics: Optics | None = None) -> np.ndarray:
        """Render one PSF (``params``: sequence of N values or a dict) or a batch ((B, N) array).

        PSFs that reach the kernel's edge (cut off) are warned about (:class:`~lsfov.LsfovWarning`).

        Parameters
        ----------
        params : dict, array_like (N,) or (B, N)
            Parameter values in the model's units, as for :meth:`as_array`.
        size : int, optional
            Odd kernel size in pixels (at most 1025); default the model's :attr:`size`.
        optics : Optics, optional
            Overrides the model's optics (Zernike models only; Gaussian models ignore it).

        Returns
        -------
        ndarray, float32, (size, size) or (B, size, size)
            Kernels centred at ``size // 2``, each summing to 1; a batch for batched ``params``.

        Raises
        ------
        ValueError
            For parameters :meth:`as_array` refuses, a bad ``size``, or Gaussian widths <= 0.
        TypeError
            For parameters that are not numbers; for a Zernike model, if ``optics`` is given and is
            not an :class:`Optics` (or none is given and the model has none); a Gaussian model
            ignores ``optics``.

        Examples
        --------
        >>> from lsfov import psf
        >>> z3 = psf.MODELS["Z3"]
        >>> z3.params
        ('focus', 'astigmatism', 'axis')
        >>> z3.render({"focus": 0.2, "astigmatism": 0.1, "axis": 0.5}).shape
        (31, 31)
        >>> psf.MODELS["G2"].render([[1.0, 2.0], [2.0, 1.0]], size=21).shape  # a batch, one row per PSF
        (2, 21, 21)
        """
        arr, batched = self.as_array(params)
        size = self.size if size is None else size
        if self._kind == "gaussian":
            if self.n_params == 1:
                out = gaussian(arr[:, 0], size=size)
            else:
                out = gaussian(arr[:, 0], arr[:, 1], size=size)
        else:
            optics = self.optics if optics is None else optics
            p = dict(zip(self.params, arr.T))
            coeffs = {}
            if "focus" in p:
                coeffs[4] = p["focus"]
            if "astigmatism" in p:
                c, th = p["astigmatism"], p["axis"]
                coeffs[5] = c * np.sin(2 * th)
                coeffs[6] = c * np.cos(2 * th)
            out = zernike(coeffs, optics, size=size)
            if out.ndim == 2:  # no Zernike term among the parameters: one PSF, the same for each set
                out = np.repeat(out[None], len(arr), axis=0)
        cut = cut_off(out)
        if cut.any():
            warnings.warn(f"{int(cut.sum())} {self.name} PSF(s) (e.g. {', '.join(f'{q}={v:.3g}' for q, v in zip(self.params, arr[cut][0]))}) "
                          f"reach the edge of the {size}-pixel kernel and are cut off; pass a larger size "
                          f"(render's size=, or a model of larger kernels: dataclasses.replace(model, size={2 * size + 1}))",
                          LsfovWarning, stacklevel=2)
        return out if batched else out[0]

    def sample(self, n: int, rng=None) -> np.ndarray:
        """Draw ``n`` parameter sets uniformly over the model's ranges, shape (n, N).

        Parameters
        ----------
        n : int
            Number of sets, >= 1.
        rng : int, numpy.random.Generator or None
            Seed or generator (``numpy.random.default_rng``); None: fresh entropy.

        Returns
        -------
        ndarray, float64, (n, N)
            Columns in the order of :attr:`params`, within :attr:`bounds`.

        Raises
        ------
        ValueError
            If ``n`` is not a positive integer or ``rng`` not a valid seed.
        """
        from ._validate import positive_int
        from ._validate import rng as _rng

        n = positive_int(n, "n")
        rng = _rng(rng, "rng")
        lo, hi = self.bounds
        return lo + (hi - lo) * rng.random((n, self.n_params))

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)``: the :attr:`ranges` as two float64 arrays (N,), in the order of :attr:`params`."""
        lo = np.array([self.ranges[p][0] for p in self.params], dtype=np.float64)
        hi = np.array([self.ranges[p][1] for p in self.params], dtype=np.float64)
        return lo, hi

    def normalize(self, params) -> np.ndarray:
        """Map parameters to [0, 1] by the model's ranges (the CNN's regression targets).

        Parameters
        ----------
        params : array_like (..., N)
            Values in the model's units, columns in the order of :attr:`params`.

        Returns
        -------
        ndarray, float64, of ``params``' shape
            ``(params - low) / (high - low)``: values outside the ranges map outside [0, 1].

        Raises
        ------
        TypeError
            If ``params`` is not real numbers.
        ValueError
            If its last axis is not of N columns.
        """
        lo, hi = self.bounds
        return (self._columns(params, "params") - lo) / (hi - lo)

    def denormalize(self, unit) -> np.ndarray:
        """Inverse of :meth:`normalize`.

        Parameters
        ----------
        unit : array_like (..., N)
            Normalised values (0 and 1 at each range's ends).

        Returns
        -------
        ndarray, float64, of ``unit``'s shape
            Values in the model's units.

        Raises
        ------
        TypeError, ValueError
            As :meth:`normalize`.
        """
        lo, hi = self.bounds
        return lo + self._columns(unit, "unit") * (hi - lo)

    def _columns(self, values, name: str) -> np.ndarray:
        """``values`` (..., N) as float64, or one line saying they are no N columns of numbers."""
        a = real_numbers(values, name)
        if a.ndim == 0 or a.shape[-1] != self.n_params:
            raise ValueError(f"{name} must have {self.n_params} columns {list(self.params)} (model {self.name}), got "
                             f"shape {a.shape}")
        return a


# A widefield 20x/0.75 air objective in green light, 0.2 µm pixels: Airy radius ~2.2 px, and the
# default ranges keep every PSF inside a 31-pixel kernel.
DEFAULT_OPTICS = Optics(na=0.75, wavelength_um=0.55, pixel_um=0.2, immersion_index=1.0)

_FOCUS = (0.0, 0.5)
_ASTIG = (0.0, 0.3)
_AXIS = (0.0, math.pi)

# G1 and G2 regress widths (standard deviations), drawn uniformly: R² on σ, not on Eq. 8's variances.
MODELS: dict[str, PSFModel] = {
    "G1": PSFModel(
        "G1", ("sigma",), {"sigma": "pixel"}, {"sigma": (0.5, 4.0)},
        "isotropic Gaussian (paper 000 Eq. 8, one width)",
    ),
    "G2": PSFModel(
        "G2", ("sigma_y", "sigma_x"), {"sigma_y": "pixel", "sigma_x": "pixel"},
        {"sigma_y": (0.5, 4.0), "sigma_x": (0.5, 4.0)},
        "anisotropic Gaussian with widths along y and x (paper 000 Eq. 8)",
    ),
    "Z1": PSFModel(
        "Z1", ("focus",), {"focus": "wave RMS"}, {"focus": _FOCUS},
        "pupil PSF with defocus (Noll 4)", DEFAULT_OPTICS, _kind="zernike",
    ),
    "Z2": PSFModel(
        "Z2", ("astigmatism", "axis"), {"astigmatism": "wave RMS", "axis": "radian"},
        {"astigmatism": _ASTIG, "axis": _AXIS},
        "pupil PSF with astigmatism magnitude and axis (Noll 5, 6)", DEFAULT_OPTICS, _kind="zernike",
    ),
    "Z3": PSFModel(
        "Z3", ("focus", "astigmatism", "axis"),
        {"focus": "wave RMS", "astigmatism": "wave RMS", "axis": "radian"},
        {"focus": _FOCUS, "astigmatism": _ASTIG, "axis": _AXIS},
        "pupil PSF with defocus and astigmatism magnitude and axis (Noll 4, 5, 6)",
        DEFAULT_OPTICS, _kind="zernike",
    ),
}


def get_model(name: str | PSFModel) -> PSFModel:
    """Look up a model by name (``"G1"``, ``"G2"``, ``"Z1"``, ``"Z2"``, ``"Z3"``).

    Parameters
    ----------
    name : str or PSFModel
        A name in ``MODELS`` (any case), or a model, returned as it is.

    Returns
    -------
    PSFModel
        The shared instance of ``MODELS`` (frozen; ``dataclasses.replace`` makes a variant).

    Raises
    ------
    ValueError
        If no model has that name.
    """
    if isinstance(name, PSFModel):
        return name
    try:
        return MODELS[str(name).upper()]
    except KeyError:
        raise ValueError(f"unknown PSF model {name!r}; choose one of {sorted(MODELS)}") from None

