"""Depth from astigmatism (paper 000 Sec. II-H, Eq. 14).

Defocus alone cannot tell above from below the focal plane; an astigmatic system can: in the Z3
model ``(−f, c, θ)`` and ``(f, c, θ + π/2)`` are the same PSF, so the side of focus shows in the
axis. With θ0 the instrument's astigmatism axis, the signed defocus is ``focus · cos 2(axis − θ0)``.
Paper 000 writes ``a1 (2 a3/π − 1)``, which is the same sign rule for θ0 = 3π/4 (negative for an axis
in (0, π/2), like ``cos 2(a − 3π/4) = −sin 2a``): its cylindrical lenses. :func:`calibrate_depth` finds
θ0 with the linear map to µm, so any orientation works.

Each node's estimate is noisy; a sample's surface is smooth over a few patches. ``smooth=σ`` (in
nodes) replaces the signed defocus by a local plane fitted around each node (Gaussian weights of
width σ times the validity; first-order normalised convolution): noise averages out while tilts,
the signal itself, pass unbiased, also at the borders, where a plain Gaussian would flatten them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["DepthCalibration", "calibrate_depth", "estimate_depth", "local_plane", "signed_defocus"]


@dataclass(frozen=True)
class DepthCalibration:
    """``depth_um = slope · focus · cos 2(axis − axis0) + offset``, fitted by :func:`calibrate_depth`."""

    axis0: float  # the instrument's astigmatism axis (radians)
    slope: float  # µm per wave of signed defocus
    offset: float  # µm
    r2: float  # of the fit on the calibration nodes
    mae_um: float  # mean absolute error on the calibration nodes
    n_nodes: int
    smooth: float = 0.0  # σ in nodes of the local-plane smoothing fitted with (and applied by estimate_depth)
    min_validity: float = 0.5  # nodes below it weigh nothing in the smoothing, as in the fit

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the calibration as JSON (atomically; an existing file only with ``overwrite``)."""
        from ..io import atomic_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"type": _TYPE, **self.to_dict()}, indent=2))
        return path

    @classmethod
    def load(cls, path) -> DepthCalibration:
        """Read a calibration written by :meth:`save` (or ``lsfov depth --known``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such depth calibration: {path}")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, OSError):
            raw = None
        if not isinstance(raw, dict) or raw.pop("type", None) != _TYPE:
            raise ValueError(f"{path} is not a depth calibration; make one with lsfov.calibrate_depth "
                             "(CLI: `lsfov depth MAP CAL.json --known DEPTH`)")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ValueError(f"{path}: not a depth calibration of this lsfov version ({e})") from None


_TYPE = "lsfov.DepthCalibration"


def _check_map(psf_map):
    for v in ("focus", "axis"):
        if v not in psf_map:
            raise ValueError(f"depth needs a map of an astigmatic model (Z3: focus, astigmatism, axis); "
                             f"this one has no {v!r}")


def signed_defocus(psf_map, axis0: float = 3 * np.pi / 4):
    """``focus · cos 2(axis − axis0)`` on the node grid (waves RMS): + on one side of focus, − on the other."""
    _check_map(psf_map)
    return psf_map["focus"] * np.cos(2 * (psf_map["axis"] - axis0))


def local_plane(values, weights, sigma: float):
    """Value at each node of the plane fitted to its neighbours by weighted least squares.

    Parameters
    ----------
    values, weights : (..., gy, gx) array_like
        Node values and their weights (>= 0; e.g. the validity, 0 for filled nodes).
    sigma : float
        Width of the Gaussian neighbourhood in nodes (0: ``values`` unchanged).

    Returns
    -------
    ndarray (float64)
        First-order normalised convolution: ``a`` of ``argmin Σ_d g(d) w(n+d) (v(n+d) − a − b·d)²``. A
        plane is returned exactly, whatever the weights; a node whose neighbourhood has no weight
        keeps its value.
    """
    from scipy.ndimage import correlate

    v = np.asarray(values, dtype=np.float64)
    w = np.ascontiguousarray(np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape))  # no 0 strides for ndimage
    try:
        ok = float(sigma) >= 0  # inf: one plane over the whole grid
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"smooth must be a width in nodes >= 0, got {sigma!r}")
    sigma = float(sigma)
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights must be finite and >= 0 (e.g. the map's validity)")
    if sigma == 0:
        return v.copy()
    r = int(min(np.ceil(3 * sigma), max(v.shape[-2:])))  # beyond the grid every node is a neighbour
    d = np.arange(-r, r + 1, dtype=np.float64)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    g = np.exp(-0.5 * (dy**2 + dx**2) / sigma**2)
    lead = (1,) * (v.ndim - 2)  # the same 2-D neighbourhood for each leading index

    def moment(a, k):
        return correlate(a, k.reshape(lead + k.shape), mode="constant", cval=0.0)

    s0, sy, sx, syy, syx, sxx = (moment(w, g * k) for k in (1, dy, dx, dy * dy, dy * dx, dx * dx))
    b0, by, bx = (moment(w * v, g * k) for k in (1, dy, dx))
    a = np.stack([np.stack(r_, -1) for r_ in ((s0, sy, sx), (sy, syy, syx), (sx, syx, sxx))], -2)
    # A neighbourhood whose nodes lie on a line cannot fix a plane: a tiny ridge on the slopes turns
    # it into the weighted mean there, and leaves well-posed fits as they are.
    a[..., 1, 1] += 1e-9 * r * r * s0
    a[..., 2, 2] += 1e-9 * r * r * s0
    ok = s0 > 1e-12 * g.sum()
    out = v.copy()
    if ok.any():
        rhs = np.stack([b0, by, bx], -1)[ok]
        out[ok] = np.linalg.solve(a[ok], rhs[..., None])[..., 0, 0]
    return out


def _weights(psf_map, min_validity):
    w = np.asarray(psf_map["validity"].values, dtype=np.float64)
    w = np.where(w >= min_validity, w, 0.0)
    if "filled" in psf_map:
        w = np.where(np.asarray(psf_map["filled"].values, bool), 0.0, w)
    return w


def _smoothed_components(psf_map, sigma, min_validity):
    """The signed defocus for any θ0 is ``cos 2θ0 · c + sin 2θ0 · s`` with ``c, s = focus · (cos, sin) 2 axis``:
    smoothing is linear, so these two are smoothed once."""
    f = np.asarray(psf_map["focus"].values, dtype=np.float64)
    a = np.asarray(psf_map["axis"].values, dtype=np.float64)
    c, s = local_plane(np.stack([f * np.cos(2 * a), f * np.sin(2 * a)]), _weights(psf_map, min_validity), sigma)
    return c, s


def _node_values(psf_map, known):
    """``known`` depth on the node grid: given there, or sampled at the node centres (bilinear)."""
    from scipy.ndimage import map_coordinates

    from .mapping import node_centres

    k = np.asarray(getattr(known, "values", known), dtype=np.float64)
    shape = (psf_map.sizes["gy"], psf_map.sizes["gx"])
    if k.shape == shape:
        return k
    if k.ndim != 2:
        raise ValueError(f"known_depth_um must be 2-D: on the node grid {shape} or the full image")
    patch, stride = psf_map.attrs.get("patch", 128), psf_map.attrs.get("stride", 64)
    image_shape = tuple(psf_map.attrs.get("image_shape") or k.shape)
    if k.shape != image_shape:
        raise ValueError(f"known_depth_um has shape {k.shape}; give it on the node grid {shape} or at the "
                         f"image's full resolution {image_shape}")
    yy, xx = np.meshgrid(*node_centres(patch, stride, shape), indexing="ij")
    return map_coordinates(k, [yy, xx], order=1, mode="nearest")


def calibrate_depth(psf_map, known_depth_um, *, min_validity: float = 0.5, smooth: float = 0.0) -> DepthCalibration:
    """Fit the map from the CNN's focus and axis to depth in µm, on an acquisition of known depth.

    Parameters
    ----------
    psf_map : xarray.Dataset
        Z3 PSF map (:func:`lsfov.estimate_psf_map`) of a calibration sample, e.g. a tilted textured
        plane.
    known_depth_um : array_like
        Its true depth, on the node grid ``(gy, gx)`` or at full resolution ``(H, W)`` (then sampled at
        the node centres).
    min_validity : float
        Nodes below this validity (and filled ones) are left out, of the fit and of the smoothing.
    smooth : float
        σ in nodes of the local-plane smoothing of the signed defocus (module docstring), for the
        fit and, stored in the calibration, for :func:`estimate_depth`. 0: each node on its own.

    Returns
    -------
    DepthCalibration
        The instrument's astigmatism axis θ0 (searched over [0, π)), slope and offset by least squares.
    """
    _check_map(psf_map)
    z = _node_values(psf_map, known_depth_um)
    use = np.asarray(psf_map["validity"].values >= min_validity) & np.isfinite(z)
    if "filled" in psf_map:
        use &= ~np.asarray(psf_map["filled"].values, bool)
    if use.sum() < 3:
        raise ValueError(f"only {int(use.sum())} valid nodes to calibrate on; image a textured sample")
    if np.ptp(z[use]) <= 0:
        raise ValueError("the known depth is constant: calibrate on a tilted or curved sample")
    c, s2 = (v[use] for v in _smoothed_components(psf_map, smooth, min_validity))
    zt = z[use]
    best = None
    for th in np.linspace(0, np.pi, 360, endpoint=False):
        s = np.cos(2 * th) * c + np.sin(2 * th) * s2
        design = np.stack([s, np.ones_like(s)], 1)
        coef, *_ = np.linalg.lstsq(design, zt, rcond=None)
        res = float(np.sum((design @ coef - zt) ** 2))
        if best is None or res < best[0]:
            best = (res, th, coef)
    res, th, (slope, offset) = best
    if slope < 0:  # the same line with the axis turned by π/2
        th, slope = (th + np.pi / 2) % np.pi, -slope
    pred = slope * (np.cos(2 * th) * c + np.sin(2 * th) * s2) + offset
    r2 = 1 - res / float(np.sum((zt - zt.mean()) ** 2))
    return DepthCalibration(axis0=float(th), slope=float(slope), offset=float(offset), r2=float(r2),
                            mae_um=float(np.mean(np.abs(pred - zt))), n_nodes=int(use.sum()), smooth=float(smooth),
                            min_validity=float(min_validity))


def estimate_depth(psf_map, calibration: DepthCalibration | dict | None = None, *, smooth: float | None = None):
    """Signed depth on the node grid, as an ``xarray.DataArray`` (dims gy, gx).

    With a calibration: µm from the focal plane. Without: paper 000 Eq. 14, ``focus (2 axis/π − 1)``
    in waves RMS, whose sign follows the depth's for an instrument axis near 3π/4 (for one near π/4
    it is reversed; calibrate to be sure).

    ``smooth``: σ in nodes of the local-plane smoothing (module docstring); by default the
    calibration's, with which its slope was fitted (0 without a calibration).
    """
    _check_map(psf_map)
    if not isinstance(calibration, (DepthCalibration, dict, type(None))):
        raise TypeError(f"calibration must come from lsfov.calibrate_depth (or its to_dict()), "
                        f"got {type(calibration).__name__}")
    c = DepthCalibration(**calibration) if isinstance(calibration, dict) else calibration
    sigma = float(smooth if smooth is not None else (c.smooth if c is not None else 0.0))
    if c is None:
        z = psf_map["focus"] * (2 * psf_map["axis"] / np.pi - 1)
        units, note = "wave RMS (uncalibrated, paper 000 Eq. 14)", None
    else:
        z = c.slope * signed_defocus(psf_map, c.axis0) + c.offset
        units, note = "micrometer", c.to_dict()
    floor = c.min_validity if c is not None else 0.5
    z = z.copy(data=local_plane(z.values, _weights(psf_map, floor), sigma))  # σ = 0: unchanged; < 0: refused
    z = z.astype(np.float32).rename("depth")
    z.attrs = {"units": units, "long_name": "distance from the focal plane"}
    if note:
        z.attrs["calibration"] = note
    return z
