"""Depth from astigmatism (paper 000 Sec. II-H, Eq. 14).

Defocus alone cannot tell above from below the focal plane; an astigmatic system can: in the Z3
model ``(−f, c, θ)`` and ``(f, c, θ + π/2)`` are the same PSF, so the side of focus shows in the
axis. With θ0 the instrument's astigmatism axis, the signed defocus is ``focus · cos 2(axis − θ0)``.
Paper 000 writes ``a1 (2 a3/π − 1)``, which is the same sign rule for θ0 = 3π/4 (negative for an axis
in (0, π/2), like ``cos 2(a − 3π/4) = −sin 2a``): its cylindrical lenses. :func:`calibrate_depth` finds
θ0 with the linear map to µm, so any orientation works.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["DepthCalibration", "calibrate_depth", "estimate_depth", "signed_defocus"]


@dataclass(frozen=True)
class DepthCalibration:
    """``depth_um = slope · focus · cos 2(axis − axis0) + offset``, fitted by :func:`calibrate_depth`."""

    axis0: float  # the instrument's astigmatism axis (radians)
    slope: float  # µm per wave of signed defocus
    offset: float  # µm
    r2: float  # of the fit on the calibration nodes
    mae_um: float  # mean absolute error on the calibration nodes
    n_nodes: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_map(psf_map):
    for v in ("focus", "axis"):
        if v not in psf_map:
            raise ValueError(f"depth needs a map of an astigmatic model (Z3: focus, astigmatism, axis); "
                             f"this one has no {v!r}")


def signed_defocus(psf_map, axis0: float = 3 * np.pi / 4):
    """``focus · cos 2(axis − axis0)`` on the node grid (waves RMS): + on one side of focus, − on the other."""
    _check_map(psf_map)
    return psf_map["focus"] * np.cos(2 * (psf_map["axis"] - axis0))


def _node_values(psf_map, known):
    """``known`` depth on the node grid: given there, or sampled at the node centres (bilinear)."""
    from scipy.ndimage import map_coordinates

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
    cy, cx = (patch / 2 - 0.5 + stride * np.arange(g) for g in shape)
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    return map_coordinates(k, [yy, xx], order=1, mode="nearest")


def calibrate_depth(psf_map, known_depth_um, *, min_validity: float = 0.5) -> DepthCalibration:
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
        Nodes below this validity (and filled ones) are left out.

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
    f = psf_map["focus"].values[use].astype(np.float64)
    a = psf_map["axis"].values[use].astype(np.float64)
    zt = z[use]
    best = None
    for th in np.linspace(0, np.pi, 360, endpoint=False):
        s = f * np.cos(2 * (a - th))
        design = np.stack([s, np.ones_like(s)], 1)
        coef, *_ = np.linalg.lstsq(design, zt, rcond=None)
        res = float(np.sum((design @ coef - zt) ** 2))
        if best is None or res < best[0]:
            best = (res, th, coef)
    res, th, (slope, offset) = best
    if slope < 0:  # the same line with the axis turned by π/2
        th, slope = (th + np.pi / 2) % np.pi, -slope
    pred = slope * f * np.cos(2 * (a - th)) + offset
    r2 = 1 - res / float(np.sum((zt - zt.mean()) ** 2))
    return DepthCalibration(axis0=float(th), slope=float(slope), offset=float(offset), r2=float(r2),
                            mae_um=float(np.mean(np.abs(pred - zt))), n_nodes=int(use.sum()))


def estimate_depth(psf_map, calibration: DepthCalibration | dict | None = None):
    """Signed depth on the node grid, as an ``xarray.DataArray`` (dims gy, gx).

    With a calibration: µm from the focal plane. Without: paper 000 Eq. 14, ``focus (2 axis/π − 1)``
    in waves RMS, whose sign follows the depth's for an instrument axis near 3π/4 (for one near π/4
    it is reversed; calibrate to be sure).
    """
    _check_map(psf_map)
    if calibration is None:
        z = psf_map["focus"] * (2 * psf_map["axis"] / np.pi - 1)
        units, note = "waves RMS (uncalibrated, paper 000 Eq. 14)", None
    else:
        c = DepthCalibration(**calibration) if isinstance(calibration, dict) else calibration
        z = c.slope * signed_defocus(psf_map, c.axis0) + c.offset
        units, note = "micrometer", c.to_dict()
    z = z.astype(np.float32).rename("depth")
    z.attrs = {"units": units, "long_name": "distance from the focal plane"}
    if note:
        z.attrs["calibration"] = note
    return z
