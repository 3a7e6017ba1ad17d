"""Depth from astigmatism (paper 000 Sec. II-H, Eq. 14).

Defocus alone cannot tell above from below the focal plane; an astigmatic system can: in the Z3
model ``(−f, c, θ)`` and ``(f, c, θ + π/2)`` are the same PSF, so the side of focus shows in the
axis. With θ0 the instrument's astigmatism axis, the signed defocus is ``focus · cos 2(axis − θ0)``.
Paper 000 writes ``a1 (2 a3/π − 1)``, which is the same sign rule for θ0 = 3π/4 (negative for an axis
in (0, π/2), like ``cos 2(a − 3π/4) = −sin 2a``): its cylindrical lenses. :func:`calibrate_depth` finds
θ0 with the map to µm, so any orientation works.

Two calibrations. ``method="linear"`` is the paper's: depth = slope · signed defocus + offset. It
is weakest near focus, where the CNN's focus (decoded as a square root) is biased up and the
side of focus, read from the axis, is a coin toss: the signed defocus jumps across the focal
plane. ``method="curve"`` (the default) is what astigmatic 3-D localisation microscopy does with
its two widths: calibration curves of what the CNN reads against the known depth, and at each node
the depth whose readings on the curves are nearest (least squares weighted by each curve's
scatter). The readings are ``focus²``, which sets the distance from focus wherever the defocus
dominates, and ``focus · astigmatism · cos 2(axis − θ0)``, regressed directly by the network
(``focus_astig_sin/cos`` of the map), which passes smoothly through zero at focus and carries the
side of focus there. The curves are polynomials in depth; depth is read within the calibrated
range (and 10 % beyond it), so calibrate over the depths you image.

Each node's estimate is noisy; a sample's surface is smooth over a few patches. ``smooth=σ`` (in
nodes) replaces the depth by a local plane fitted around each node (Gaussian weights of width σ
times the validity; first-order normalised convolution): noise averages out while tilts, the
signal itself, pass unbiased, also at the borders, where a plain Gaussian would flatten them. The
fit is robust (``robust=True``, the default of new calibrations): a few reweighted passes with
Tukey's biweight stop nodes far off their neighbours' plane, near focus mostly a side of focus read
wrong, from pulling it (on the narrowest benchmark surface the error fell from 2.2 % to 1.8 % of
the range).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .._validate import LsfovWarning, boolean

__all__ = ["DepthCalibration", "calibrate_depth", "estimate_depth", "local_plane", "signed_defocus"]


@dataclass(frozen=True)
class DepthCalibration:
    """From the CNN's readings to depth in µm, fitted by :func:`calibrate_depth`.

    ``method="linear"``: ``depth_um = slope · focus · cos 2(axis − axis0) + offset``. ``"curve"``:
    the depth whose expected readings ``curves`` (polynomial coefficients in depth, highest first,
    of ``focus²`` and ``focus · astigmatism · cos 2(axis − axis0)``) are nearest to a node's, each
    weighted by its residual variance ``noise``, within ``range_um`` (padded by 10 %); ``slope`` and
    ``offset`` then hold the linear fit of the same nodes, for reference.

    Attributes
    ----------
    axis0 : float
        The instrument's astigmatism axis in radians, in [0, π).
    slope : float
        µm of depth per wave RMS of signed defocus (>= 0).
    offset : float
        Depth in µm at zero signed defocus.
    r2 : float
        R² of the calibration on its own nodes.
    mae_um : float
        Mean absolute error (µm) of the calibration on its own nodes.
    n_nodes : int
        Nodes the calibration was fitted on.
    smooth : float
        σ in nodes of the local-plane smoothing fitted with (and applied by :func:`estimate_depth`).
    robust : bool
        Whether that smoothing is robust to outlying nodes (calibrations from before it: plain).
    min_validity : float
        Nodes of lower validity weigh nothing in the fit and the smoothing.
    method : {"curve", "linear"}
        How readings become depth (above); files from before the curves are linear.
    curves : tuple of two tuples of float, or None
        ``"curve"``: polynomial coefficients in depth (µm), highest first, of ``focus²`` and of the
        product reading (waves RMS²).
    noise : (float, float) or None
        ``"curve"``: residual variance of each reading about its curve.
    range_um : (float, float) or None
        ``"curve"``: the calibrated depths (min, max) in µm.
    symmetrize : bool or None
        Whether the calibration map was symmetrized (None: files from before).
    model : str or None
        What made the calibration map, with the three below: the model (a shipped name or a file's
        name). None: not known, or files from before. A map made otherwise reads other parameters;
        :func:`estimate_depth` warns of it.
    stride : int or None
        The calibration map's pixels between nodes.
    pixel_um : float or None
        The calibration map's pixel size in µm.
    model_digest : str or None
        The digest of the weights of the model that made the calibration map
        (:meth:`~lsfov.estimate.model.PSFRegressor.weights_digest`).

    Raises
    ------
    ValueError
        On construction, for an unknown ``method``, ``"curve"`` without ``curves``, ``noise`` and
        ``range_um``, a non-finite ``axis0``, ``slope``, ``offset``, ``smooth`` or ``min_validity``,
        a negative ``slope`` or ``smooth``, or ``curves``, ``noise`` or ``range_um`` not finite numbers.
    """

    axis0: float  # the instrument's astigmatism axis (radians)
    slope: float  # µm per wave of signed defocus
    offset: float  # µm
    r2: float  # of the fit on the calibration nodes
    mae_um: float  # mean absolute error on the calibration nodes
    n_nodes: int
    smooth: float = 0.0  # σ in nodes of the local-plane smoothing fitted with (and applied by estimate_depth)
    robust: bool = False  # that smoothing robust to outlying nodes (calibrations before it: plain)
    min_validity: float = 0.5  # nodes below it weigh nothing in the smoothing, as in the fit
    method: str = "linear"  # files from before the curves are linear
    curves: tuple | None = None  # "curve": ((focus² coefficients), (product coefficients)), wave RMS² per µm^k
    noise: tuple | None = None  # "curve": residual variance of each reading on its curve
    range_um: tuple | None = None  # "curve": the calibrated depths (min, max)
    symmetrize: bool | None = None  # whether the calibration map was symmetrized (None: files from before)
    # What made the calibration map (None: files from before, or not known): a map made otherwise reads
    # other parameters (another network), smooths over other distances (σ in nodes) or PSFs of another size.
    model: str | None = None  # the map's model: a shipped name or a file's name
    stride: int | None = None  # pixels between nodes
    pixel_um: float | None = None
    model_digest: str | None = None  # its weights' (a retrained file of the same name is another model)

    def __post_init__(self):  # JSON gives lists: tuples keep calibrations comparable and hashable
        for name in ("curves", "noise", "range_um"):
            v = getattr(self, name)
            if v is not None:
                try:
                    v = tuple(tuple(map(float, c)) if np.ndim(c) else float(c) for c in v)
                except (TypeError, ValueError):
                    raise ValueError(f"depth calibration {name} must hold numbers, got {v!r}") from None
                if not all(np.isfinite(c).all() for c in v):
                    raise ValueError(f"depth calibration {name} holds NaN or Inf; calibrate again")
                object.__setattr__(self, name, v)
        for name in ("axis0", "slope", "offset", "smooth", "min_validity"):  # what readings go through
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                raise ValueError(f"depth calibration {name} must be a finite number, got {v!r}; calibrate again")
        if self.slope < 0 or self.smooth < 0:
            raise ValueError(f"depth calibration slope and smooth must be >= 0, got {self.slope} and {self.smooth}")
        if self.method not in METHODS:
            raise ValueError(f"unknown depth calibration method {self.method!r}; use one of {METHODS}")
        if self.method == "curve" and (self.curves is None or self.noise is None or self.range_um is None):
            raise ValueError("a 'curve' depth calibration needs curves, noise and range_um; fit one with "
                             "lsfov.calibrate_depth")

    def to_dict(self) -> dict:
        """The fields as a dict (what :meth:`save` writes, less its type tag).

        Returns
        -------
        dict
            ``{field name: value}``; ``DepthCalibration(**d)`` reads it back.
        """
        return asdict(self)

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the calibration as JSON (atomically; an existing file only with ``overwrite``).

        Parameters
        ----------
        path : str or Path
            The JSON file to write (e.g. ``cal.json``); :meth:`load` reads it back.
        overwrite : bool
            Replace an existing file; without it an existing ``path`` is refused (FileExistsError).

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is not given.
        """
        from ..io import atomic_file

        path = Path(path)
        if path.exists() and not boolean(overwrite, "overwrite"):
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"type": _TYPE, **self.to_dict()}, indent=2))
        return path

    @classmethod
    def load(cls, path) -> DepthCalibration:
        """Read a calibration written by :meth:`save` (or ``lsfov depth --known``).

        Parameters
        ----------
        path : str or Path
            The calibration's JSON file.

        Returns
        -------
        DepthCalibration
            The calibration as it was saved.

        Raises
        ------
        FileNotFoundError
            If no file exists at ``path``.
        ValueError
            If ``path`` is a directory or not a depth calibration of this lsfov version.
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a depth calibration (the JSON file `lsfov depth --known` "
                             "writes)")
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
        except TypeError:  # (keys of another version)
            raise ValueError(f"{path}: not a depth calibration of this lsfov version (its keys: "
                             f"{', '.join(sorted(map(str, raw)))}); make it again with lsfov.calibrate_depth") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


_TYPE = "lsfov.DepthCalibration"
METHODS = ("curve", "linear")
_PAD = 0.1  # how far beyond the calibrated depths the curves are read (share of the range)


def _check_map(psf_map):
    """The map, its nodes in (gy, gx) order, if it is one of an astigmatic model."""
    from .mapping import node_order

    if not hasattr(psf_map, "data_vars"):
        raise TypeError(f"psf_map must be a PSF map, the xarray.Dataset of lsfov.estimate_psf_map or "
                        f"lsfov.open_result(MAP); got {type(psf_map).__name__}")
    if "psf_model" not in psf_map.attrs and not {"focus", "axis", "validity"} & set(psf_map.data_vars):
        held = ", ".join(map(str, psf_map.data_vars)) or "nothing"
        raise ValueError(f"depth reads a PSF map (`lsfov estimate IMAGE MAP`, lsfov.estimate_psf_map); this is none "
                         f"(it holds {held})")
    for v in ("focus", "axis"):
        if v not in psf_map:
            raise ValueError(f"depth needs a map of an astigmatic model (Z3: focus, astigmatism, axis); "
                             f"this one has no {v!r}")
    if "validity" not in psf_map:  # e.g. the true parameters `lsfov simulate blur` writes beside its image
        raise ValueError("depth reads a PSF map of the CNN (`lsfov estimate`, lsfov.estimate_psf_map); this one "
                         "has no 'validity'")
    return node_order(psf_map)


def signed_defocus(psf_map, axis0: float = 3 * np.pi / 4):
    """``focus · cos 2(axis − axis0)`` on the node grid (waves RMS): + on one side of focus, − on the other."""
    psf_map = _check_map(psf_map)
    return psf_map["focus"] * np.cos(2 * (psf_map["axis"] - axis0))


def local_plane(values, weights, sigma: float, *, robust: bool = False):
    """Value at each node of the plane fitted to its neighbours by weighted least squares.

    Parameters
    ----------
    values, weights : (..., gy, gx) array_like
        Node values and their weights (>= 0; e.g. the validity, 0 for filled nodes).
    sigma : float
        Width of the Gaussian neighbourhood in nodes (0: ``values`` unchanged).
    robust : bool
        Refit three times with each node's weight times Tukey's biweight of its residual (cut-off
        4.685 times the residuals' scale, their median absolute deviation over the weighted nodes
        of each grid): a node far off its neighbours' plane stops pulling it.

    Returns
    -------
    ndarray (float64)
        First-order normalised convolution: ``a`` of ``argmin Σ_d g(d) w(n+d) (v(n+d) − a − b·d)²``. A
        plane is returned exactly, whatever the weights; a node whose neighbourhood has no weight
        keeps its value.
    """
    return _local_plane(values, weights, sigma, robust)[0]


def _local_plane(values, weights, sigma, robust):
    """:func:`local_plane`, and where its last fit (the robust one's weights: they may drop every
    neighbour) had no weight, so that the node kept its value."""
    fit, alone = _plane_fit(values, weights, sigma)
    if not robust or float(sigma) == 0:
        return fit, alone
    v = np.asarray(values, dtype=np.float64)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape)
    for _ in range(3):
        r = np.where(w > 0, np.abs(v - fit), np.nan)
        with warnings.catch_warnings():  # a grid without weighted nodes: no scale, its weights stay
            warnings.simplefilter("ignore", RuntimeWarning)
            scale = 1.4826 * np.nanmedian(r, axis=(-2, -1), keepdims=True)
        u = np.abs(v - fit) / np.where(scale > 0, _TUKEY * scale, np.inf)
        fit, alone = _plane_fit(v, w * np.where(u < 1, (1 - u * u) ** 2, 0.0), sigma)
    return fit, alone


_TUKEY = 4.685  # Tukey's biweight cut-off in scales: 95 % efficiency on Gaussian residuals


_EMPTY = 1e-12  # a neighbourhood of less weight (relative to the kernel's) has none: the node keeps its value


def _width(sigma) -> float:
    """``smooth`` as a width in nodes (>= 0; inf: one plane over the whole grid), or one line saying
    it is none."""
    try:
        w = np.nan if isinstance(sigma, (bool, np.bool_, str, bytes)) else float(sigma)  # (float() reads "1")
    except (TypeError, ValueError):
        w = np.nan
    if not w >= 0:
        raise ValueError(f"smooth must be a width in nodes >= 0, got {sigma!r}")
    return w


def _plane_fit(values, weights, sigma):
    """:func:`local_plane` without the reweighting, and the nodes it left as they were (no weight in
    their neighbourhood; all of them for σ = 0)."""
    from scipy.ndimage import correlate1d

    v = np.asarray(values, dtype=np.float64)
    w = np.ascontiguousarray(np.broadcast_to(np.asarray(weights, dtype=np.float64), v.shape))  # no 0 strides for ndimage
    sigma = _width(sigma)
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights must be finite and >= 0 (e.g. the map's validity)")
    if sigma == 0:
        return v.copy(), np.ones(v.shape, bool)
    r = int(min(np.ceil(3 * sigma), max(v.shape[-2:])))  # beyond the grid every node is a neighbour
    d = np.arange(-r, r + 1, dtype=np.float64)
    g1 = np.exp(-0.5 * d**2 / sigma**2)

    def moment(a, py, px):
        # g(dy, dx) dy^py dx^px is separable: a pass along y, then one along x (O(r) a node, not O(r²),
        # in the same 2-D neighbourhood for each leading index)
        a = correlate1d(a, g1 * d**py, axis=-2, mode="constant", cval=0.0)
        return correlate1d(a, g1 * d**px, axis=-1, mode="constant", cval=0.0)

    s0, sy, sx, syy, syx, sxx = (moment(w, py, px) for py, px in ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)))
    b0, by, bx = (moment(w * v, py, px) for py, px in ((0, 0), (1, 0), (0, 1)))
    a = np.stack([np.stack(r_, -1) for r_ in ((s0, sy, sx), (sy, syy, syx), (sx, syx, sxx))], -2)
    # A neighbourhood whose nodes lie on a line cannot fix a plane: a tiny ridge on the slopes turns
    # it into the weighted mean there, and leaves well-posed fits as they are.
    a[..., 1, 1] += 1e-9 * r * r * s0
    a[..., 2, 2] += 1e-9 * r * r * s0
    ok = s0 > _EMPTY * g1.sum() ** 2  # (the 2-D kernel's sum)
    out = v.copy()
    if ok.any():
        rhs = np.stack([b0, by, bx], -1)[ok]
        out[ok] = np.linalg.solve(a[ok], rhs[..., None])[..., 0, 0]
    return out, ~ok


def _finite(psf_map) -> np.ndarray:
    """Nodes whose depth parameters are all finite (the products too, which the curves read)."""
    from .model import PRODUCTS

    return np.logical_and.reduce([np.isfinite(np.asarray(psf_map[v].values))
                                  for v in ("focus", "astigmatism", "axis", *PRODUCTS) if v in psf_map])


def _weights(psf_map, min_validity):
    """The smoothing's weight of each node: its validity, 0 below ``min_validity``, if filled or not finite."""
    w = np.asarray(psf_map["validity"].values, dtype=np.float64)
    w = np.where((w >= min_validity) & _finite(psf_map), w, 0.0)
    if "filled" in psf_map:
        w = np.where(np.asarray(psf_map["filled"].values, bool), 0.0, w)
    return w


def _smoothed_components(psf_map, sigma, min_validity, robust=False):
    """The signed defocus for any θ0 is ``cos 2θ0 · c + sin 2θ0 · s`` with ``c, s = focus · (cos, sin) 2 axis``:
    the plain smoothing is linear, so these two are smoothed once (the robust one reweights each on its own,
    for the fit only: estimate_depth smooths the depth itself)."""
    f = np.asarray(psf_map["focus"].values, dtype=np.float64)
    a = np.asarray(psf_map["axis"].values, dtype=np.float64)
    c, s = local_plane(np.nan_to_num(np.stack([f * np.cos(2 * a), f * np.sin(2 * a)])), _weights(psf_map, min_validity),
                       sigma, robust=robust)  # (a NaN node weighs 0: its value only must not be NaN)
    return c, s


def _products(psf_map):
    """``focus · astigmatism · (sin, cos) 2 axis`` per node: the network's own (a map's ``focus_astig_*``),
    or, for a map without them, from the decoded parameters (less sure near focus)."""
    from .model import PRODUCTS

    if all(p in psf_map for p in PRODUCTS):
        return tuple(np.asarray(psf_map[p].values, dtype=np.float64) for p in PRODUCTS)
    if "astigmatism" not in psf_map:
        raise ValueError("depth needs a map of an astigmatic model (Z3: focus, astigmatism, axis); this one has "
                         "no 'astigmatism'")
    f, c, a = (np.asarray(psf_map[v].values, dtype=np.float64) for v in ("focus", "astigmatism", "axis"))
    return f * c * np.sin(2 * a), f * c * np.cos(2 * a)


def _readings(psf_map, axis0):
    """What the curves map to depth, per node: ``focus²`` and ``focus · astigmatism · cos 2(axis − axis0)``."""
    s, c = _products(psf_map)
    f = np.asarray(psf_map["focus"].values, dtype=np.float64)
    return f * f, np.cos(2 * axis0) * c + np.sin(2 * axis0) * s


def _read_grid(cal: DepthCalibration) -> np.ndarray:
    """The depths the curves are read at: the calibrated range, padded by ``_PAD`` each side, in 600 steps."""
    lo, hi = cal.range_um
    pad = _PAD * (hi - lo)
    return np.linspace(lo - pad, hi + pad, 601)


def _curve_depth(readings, cal: DepthCalibration):
    """Per node, the depth whose expected readings (the calibration's curves) are nearest in weighted
    least squares: a fine grid over the calibrated range, then a parabola through the best point."""
    grid = _read_grid(cal)
    step = grid[1] - grid[0]
    expected = [np.polyval(c, grid) for c in cal.curves]
    y = [np.ravel(r) for r in readings]
    out = np.empty(y[0].shape)
    for b in range(0, len(out), 4096):  # (nodes x grid) blocks: a large map never holds them all
        rows = slice(b, b + 4096)
        cost = sum((yk[rows, None] - ek) ** 2 / vk for yk, ek, vk in zip(y, expected, cal.noise))
        k = np.clip(np.argmin(cost, axis=1), 1, len(grid) - 2)
        i = np.arange(len(k))
        left, mid, right = cost[i, k - 1], cost[i, k], cost[i, k + 1]
        curv = left - 2 * mid + right
        shift = np.where(curv > 0, 0.5 * (left - right) / np.where(curv > 0, curv, 1), 0.0)
        out[rows] = np.clip(grid[k] + np.clip(shift, -1, 1) * step, grid[0], grid[-1])
    return out.reshape(np.shape(readings[0]))


def _beyond(readings, cal: DepthCalibration):
    """Per node, +1 or -1 where it lies beyond the high or low end of the depths the curves read, else 0.

    Beyond: more defocused than the calibration ever was (``focus²`` above the curve's highest over
    the read range by two of its standard deviations), and with an astigmatism reading at or past
    that end's (within two of its). A curve that turns over before the end of its range (a
    polynomial's ends) would read such a node inside the range; a spike of ``focus²`` alone (an
    in-focus node read wrong) is not enough."""
    (sd0, sd1) = np.sqrt(cal.noise)
    focus2, astig = (np.polyval(c, _read_grid(cal)) for c in cal.curves)
    far = readings[0] > focus2.max() + 2 * sd0
    s = 1.0 if astig[-1] >= astig[0] else -1.0  # the product grows towards the high end, or falls
    u = s * readings[1]
    return np.where(far & (u >= s * astig[-1] - 2 * sd1), 1, np.where(far & (u <= s * astig[0] + 2 * sd1), -1, 0))


def _warn_clipped(z, valid, cal: DepthCalibration):
    """Say so when many nodes read at the end of the calibrated depths: the sample goes beyond them
    there, and the curves cannot tell how far (their depth is clipped)."""
    lo, hi = cal.range_um
    grid = _read_grid(cal)
    tol = 2 * (grid[1] - grid[0])  # two steps of the grid
    at_end = ((z <= grid[0] + tol) | (z >= grid[-1] - tol)) & valid
    share = at_end.sum() / max(int(valid.sum()), 1)
    # A sample within the range has some nodes there too (the calibration's own deepest, read with
    # noise, ~10 % of a tilt's): a quarter is a sample that goes well beyond.
    if share > 0.25:
        warnings.warn(f"{share:.0%} of the nodes read at the end of the calibrated depths "
                      f"({lo:+.3g}..{hi:+.3g} µm, read to {_PAD:.0%} beyond): the sample goes further there and its "
                      "depth is clipped; calibrate over the depths you image", LsfovWarning, stacklevel=4)


def _node_values(psf_map, known, given=None):
    """``known`` depth on the node grid of ``psf_map`` (its nodes in order, :func:`_check_map`): given
    on the grid, or sampled at the node centres (bilinear). ``given``: the map as the caller holds it,
    whose node order an unlabelled grid of depths follows."""
    from scipy.ndimage import map_coordinates

    from .mapping import map_node_pixels

    for order in (("gy", "gx"), ("y", "x")):  # labelled: read by name
        if set(getattr(known, "dims", ())) == set(order):
            known = known.transpose(*order)
    if getattr(known, "dims", None) == ("gy", "gx") and {"gy", "gx"} <= set(known.coords) & set(psf_map.coords):
        try:  # labelled nodes: matched by position, whatever order each is in
            known, given = known.sel(gy=psf_map["gy"].values, gx=psf_map["gx"].values), None
        except KeyError:
            raise ValueError("known_depth_um's gy, gx coordinates are not the map's nodes; give the depths on the "
                             "map's nodes, or unlabelled (a NumPy array)") from None
    if isinstance(known, (str, os.PathLike)):
        raise TypeError("known_depth_um takes depths in µm (an array), not a file name; load it first "
                        "(e.g. numpy.load, or lsfov.open_image(...).values)")
    if isinstance(known, DepthCalibration):
        raise TypeError("known_depth_um takes the known depths in µm (an array), not a calibration; to apply "
                        "a calibration to a map use lsfov.estimate_depth(psf_map, calibration)")
    try:
        k = np.asarray(getattr(known, "values", known), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"known_depth_um must be an array of depths in µm, got {type(known).__name__}") from None
    shape = (psf_map.sizes["gy"], psf_map.sizes["gx"])
    if k.shape == shape:
        if given is not None:  # in the caller's node order: put in the order of the sorted map
            for axis, d in enumerate(("gy", "gx")):
                if d in given.coords and given[d].size > 1:
                    k = np.take(k, np.argsort(given[d].values, kind="stable"), axis=axis)
        return k
    if k.ndim != 2:
        raise ValueError(f"known_depth_um must be 2-D: on the node grid {shape} or the full image")
    image_shape = tuple(psf_map.attrs.get("image_shape") or k.shape)
    if k.shape != image_shape:
        raise ValueError(f"known_depth_um has shape {k.shape}; give it on the node grid {shape} or at the "
                         f"image's full resolution {image_shape}")
    yy, xx = np.meshgrid(*map_node_pixels(psf_map), indexing="ij")
    return map_coordinates(k, [yy, xx], order=1, mode="nearest")


def calibrate_depth(psf_map, known_depth_um, *, min_validity: float = 0.5, smooth: float = 0.0,
                    method: str = "curve", degree: int = 4, robust: bool = True) -> DepthCalibration:
    """Fit the map from the CNN's readings to depth in µm, on an acquisition of known depth.

    Parameters
    ----------
    psf_map : xarray.Dataset
        Z3 PSF map (:func:`lsfov.estimate_psf_map`) of a calibration sample, e.g. a tilted textured
        plane covering the depths to be measured.
    known_depth_um : array_like
        Its true depth, on the node grid: unlabelled as ``(gy, gx)`` (that axis order even for a map
        transposed to ``(gx, gy)``), its nodes along each axis in the map's order as given; or a
        DataArray with ``gy``, ``gx`` coordinates, matched to the nodes by them; or at full
        resolution ``(H, W)`` (then sampled at the node centres).
    min_validity : float
        Nodes below this validity (and filled ones) are left out, of the fit and of the smoothing.
    smooth : float
        σ in nodes of the local-plane smoothing of the depth (module docstring), stored in the
        calibration for :func:`estimate_depth`. 0: each node on its own.
    method : {"curve", "linear"}
        Calibration curves read at each node (default; module docstring), or paper 000's linear map
        of the signed defocus.
    degree : int
        Degree of the curves' polynomials in depth (``"curve"``); at most the number of distinct known
        depths minus 2, and a quarter of the calibration's nodes minus 1.
    robust : bool
        The smoothing robust to outlying nodes (:func:`local_plane`), stored with ``smooth``.

    Returns
    -------
    DepthCalibration
        The instrument's astigmatism axis θ0, and the curves or the line. Its ``r2`` and ``mae_um``
        are those of its own depth estimate (smoothed) on the calibration nodes.

    Raises
    ------
    TypeError
        If ``psf_map`` is not a PSF map (an ``xarray.Dataset``), or ``known_depth_um`` is not an
        array of depths (a file name, a calibration).
    ValueError
        If the map is not of an astigmatic model (Z3) or is a stack of planes; ``known_depth_um`` is
        on neither the node grid nor the image's pixels; ``method``, ``degree``, ``min_validity``
        (in [0, 1]) or ``smooth`` (>= 0) is out of range; fewer than 3 nodes are valid, or the known
        depth is constant on them (for ``"curve"``: takes fewer than 3 distinct values).

    Examples
    --------
    A tilted plane of known depth, imaged through the instrument, calibrates it:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> plane = simulate.tilted_surface((512, 512), depth_range_um=(-8, 8), seed=0)
    >>> psf_map = lsfov.estimate_psf_map(plane.image, "Z3", stride=64)
    >>> cal = lsfov.calibrate_depth(psf_map, plane.depth_um, smooth=1)
    >>> cal.method, cal.n_nodes, bool(cal.r2 > 0.9)
    ('curve', 49, True)
    >>> print(cal.save("cal.json"))
    cal.json
    >>> lsfov.DepthCalibration.load("cal.json") == cal
    True
    """
    from .._validate import positive_int, real_number
    from .mapping import one_plane

    given, psf_map = psf_map, _check_map(psf_map)
    one_plane(psf_map, "calibrate_depth")  # (one known depth: one plane)
    min_validity = real_number(min_validity, "min_validity", minimum=0, maximum=1)
    smooth = real_number(smooth, "smooth", minimum=0)  # (a calibration records it: finite)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    degree = positive_int(degree, "degree")
    z = _node_values(psf_map, known_depth_um, given)
    use = np.asarray(psf_map["validity"].values >= min_validity) & np.isfinite(z) & _finite(psf_map)
    if "filled" in psf_map:
        use &= ~np.asarray(psf_map["filled"].values, bool)
    if use.sum() < 3:
        raise ValueError(f"only {int(use.sum())} valid nodes to calibrate on; image a textured sample")
    if np.ptp(z[use]) <= 0:
        raise ValueError("the known depth is constant: calibrate on a tilted or curved sample")
    zt = z[use]
    # The line (paper 000), on the smoothed signed defocus: the axis θ0 that fits best.
    robust = boolean(robust, "robust")
    c, s2 = (v[use] for v in _smoothed_components(psf_map, smooth if method == "linear" else 0.0, min_validity,
                                                  robust))
    # z = slope (cos 2θ0 c + sin 2θ0 s2) + offset is linear in (slope cos 2θ0, slope sin 2θ0): one exact
    # least-squares fit gives θ0 and a slope >= 0 (a search over θ0 was both coarser and, where c and s2
    # are collinear, ill-posed; the minimum-norm solution then takes the smallest slope).
    design = np.stack([c, s2, np.ones_like(c)], 1)
    (a, b, offset), *_ = np.linalg.lstsq(design, zt, rcond=1e-6)
    th, slope = float(np.mod(0.5 * np.arctan2(b, a), np.pi)), float(np.hypot(a, b))
    fields = dict(slope=float(slope), offset=float(offset), n_nodes=int(use.sum()), smooth=float(smooth),
                  robust=robust, min_validity=float(min_validity), method=method, symmetrize=_symmetrized(psf_map.attrs),
                  **_made_by(psf_map.attrs))
    if method == "curve":
        levels = len(np.unique(np.round(zt, 6)))
        if levels < 3:
            raise ValueError(f"the known depth takes only {levels} distinct values on the valid nodes; curves need "
                             "at least 3: calibrate on a tilted or curved sample, or use method='linear'")
        # A few depth steps or nodes: a lower degree, never a curve through every point (at least four
        # nodes per coefficient: a 3x3 map fitted with quartics read any depth, R² 1 on the calibration).
        degree = max(1, min(degree, levels - 2, int(use.sum()) // 4 - 1))
        # The axis from the products alone: above focus they point along (sin, cos) 2θ0 and grow with depth.
        ps, pc = (v[use] for v in _products(psf_map))
        design = np.stack([zt - zt.mean(), np.ones_like(zt)], 1)
        (gs, _), *_ = np.linalg.lstsq(design, ps, rcond=None)
        (gc, _), *_ = np.linalg.lstsq(design, pc, rcond=None)
        th = float(np.mod(0.5 * np.arctan2(gs, gc), np.pi))
        curves, noise = [], []
        for y in _readings(psf_map, th):
            coef = np.polyfit(zt, y[use], degree)
            curves.append(coef)
            noise.append(max(float(np.mean((y[use] - np.polyval(coef, zt)) ** 2)), 1e-12))
        fields.update(curves=curves, noise=noise, range_um=(float(zt.min()), float(zt.max())))
    fit = DepthCalibration(axis0=float(th), r2=float("nan"), mae_um=float("nan"), **fields)
    with warnings.catch_warnings():  # its own extreme nodes read at the ends of its range: no news
        warnings.filterwarnings("ignore", message=".*calibrated depths", category=LsfovWarning)
        pred = estimate_depth(psf_map, fit).values[use].astype(np.float64)
    r2 = 1 - float(np.sum((pred - zt) ** 2)) / float(np.sum((zt - zt.mean()) ** 2))
    if r2 < 0.5:  # a calibration that does not even fit its own nodes: no use, most likely a wrong known depth
        warnings.warn(f"the depth calibration fits its own nodes poorly (R² {r2:.2f}): is known_depth_um this "
                      "image's depth, on its node grid or at full resolution, and is the sample textured across "
                      "the depth range?", LsfovWarning, stacklevel=2)
    return DepthCalibration(**{**fit.to_dict(), "r2": float(r2), "mae_um": float(np.mean(np.abs(pred - zt)))})


def _made_by(attrs: dict) -> dict:
    """The model (a shipped name or a file's name; None for a model object) and its weights' digest,
    stride and pixel size of a map, from its attributes."""
    model = attrs.get("model")
    model = None if model in (None, "PSFRegressor") else Path(str(model)).name
    stride, px = attrs.get("stride"), attrs.get("pixel_um")
    return {"model": model, "stride": None if stride is None else int(stride), "pixel_um": float(px) if px else None,
            "model_digest": attrs.get("model_digest") or None}


def warn_made_otherwise(attrs: dict, c: DepthCalibration, stacklevel: int = 2):
    """Warn when a PSF map, by its attributes (``estimate_psf_map``'s, or those it will have), is made
    otherwise than calibration ``c``'s map (each item where both are known)."""
    sym = _symmetrized(attrs)
    if None not in (sym, c.symmetrize) and sym != c.symmetrize:
        # A symmetrized map reads less noisy, less shrunk parameters: curves fitted on the other kind are off.
        warnings.warn(f"this PSF map was made with symmetrize={sym}, its depth calibration with "
                      f"symmetrize={c.symmetrize}: the depths may be biased; make the map as the calibration's "
                      "was, or calibrate again", LsfovWarning, stacklevel=stacklevel + 1)
    differ = []
    for k, here in _made_by(attrs).items():
        there = getattr(c, k)
        if None in (here, there):
            continue
        if (abs(here / there - 1) > 0.01) if k == "pixel_um" else here != there:
            differ.append(f"the model's weights {here[:8]} (calibration: {there[:8]}; a model retrained or replaced)"
                          if k == "model_digest" else f"{k} {here} (calibration: {there})")
    if differ:
        warnings.warn(f"this PSF map was made otherwise than its depth calibration's: {', '.join(differ)}; the depths "
                      "may be wrong: make the map as the calibration's was, or calibrate again", LsfovWarning,
                      stacklevel=stacklevel + 1)


def _symmetrized(attrs: dict) -> bool | None:
    """Whether a map (its attributes) was symmetrized (``estimate_psf_map`` records it; None where not said)."""
    sym = attrs.get("symmetrize")
    return None if sym is None else bool(sym)


def as_calibration(calibration) -> DepthCalibration | None:
    """A :class:`DepthCalibration` from one, its ``to_dict()`` or its JSON file (None stays None)."""
    if isinstance(calibration, (str, os.PathLike)):
        return DepthCalibration.load(calibration)
    if isinstance(calibration, dict):  # to_dict(), or a saved file's JSON (with its "type")
        keys = {k: v for k, v in calibration.items() if k != "type"}
        unknown = sorted(set(keys) - {f.name for f in fields(DepthCalibration)})
        if unknown:
            raise ValueError(f"calibration has keys a depth calibration has not ({', '.join(map(str, unknown))}); give "
                             "the to_dict() of lsfov.calibrate_depth, or its JSON file")
        try:
            return DepthCalibration(**keys)
        except TypeError:  # (a key it needs left out)
            raise ValueError("calibration lacks keys of a depth calibration; give the to_dict() of "
                             "lsfov.calibrate_depth, or its JSON file") from None
    if not isinstance(calibration, (DepthCalibration, type(None))):
        raise TypeError(f"calibration must come from lsfov.calibrate_depth (its to_dict(), or its JSON file), "
                        f"got {type(calibration).__name__}")
    return calibration


def estimate_depth(psf_map, calibration: DepthCalibration | dict | None = None, *, smooth: float | None = None,
                   robust: bool | None = None):
    """Signed depth on the node grid, as an ``xarray.DataArray`` (dims gy, gx; a stack of maps' planes
    first, each plane on its own).

    Parameters
    ----------
    psf_map : xarray.Dataset
        A PSF map of an astigmatic model (Z3: focus, astigmatism, axis, validity), as
        :func:`lsfov.estimate_psf_map` returns or ``lsfov.open_result`` reads.
    calibration : DepthCalibration, dict or path, optional
        A :class:`DepthCalibration`, its ``to_dict()`` or its JSON file: the depth is then in µm
        from the focal plane, by its method (module docstring). Without: paper 000 Eq. 14,
        ``focus (2 axis/π − 1)`` in waves RMS, whose sign follows the depth's for an instrument
        axis near 3π/4 (for one near π/4 it is reversed; calibrate to be sure).
    smooth : float, optional
        σ in nodes of the local-plane smoothing (module docstring); by default the calibration's
        (0 without one).
    robust : bool, optional
        Whether that smoothing is robust to outlying nodes; by default the calibration's (plain
        without one).

    Returns
    -------
    xarray.DataArray
        float32 on the map's node grid, its ``units`` and the smoothing applied in ``attrs``. Nodes
        with no reading (a NaN parameter, or an invalid node, validity < 0.5, of a map made without
        filling) get the smoothing's plane through their neighbours; NaN without smoothing.

    Raises
    ------
    TypeError
        If ``psf_map`` is not a PSF map (an ``xarray.Dataset``), or ``calibration`` is none of the
        kinds above.
    ValueError
        If the map is not of an astigmatic model with ``validity`` (Z3 of the CNN), ``smooth`` is
        negative, or ``calibration`` is not a depth calibration (a dict of other keys, a file of
        another kind).
    FileNotFoundError
        If ``calibration`` names a file that does not exist.

    Examples
    --------
    Calibrated on a tilted plane of known depth, the instrument measures a curved sample:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> plane = simulate.tilted_surface((512, 512), depth_range_um=(-8, 8), seed=0)
    >>> cal = lsfov.calibrate_depth(lsfov.estimate_psf_map(plane.image, "Z3", stride=64), plane.depth_um, smooth=1)
    >>> sample = simulate.tilted_surface((512, 512), depth_range_um=(-5, 5), curvature=0.5, seed=1)
    >>> depth = lsfov.estimate_depth(lsfov.estimate_psf_map(sample.image, "Z3", stride=64), cal)
    >>> depth.dims, depth.shape, depth.attrs["units"]
    (('gy', 'gx'), (7, 7), 'micrometer')
    >>> truth = sample.depth_um[64::64, 64::64][:7, :7]  # at the nodes (the patches' centres)
    >>> bool(abs(depth - truth).mean() < 1)
    True
    """
    psf_map = _check_map(psf_map)
    c = as_calibration(calibration)
    if robust is not None:
        robust = boolean(robust, "robust")
    if c is not None:
        warn_made_otherwise(psf_map.attrs, c, stacklevel=2)
    return depth_of(psf_map, c, smooth, robust)


def depth_of(psf_map, c: DepthCalibration | None, smooth: float | None = None, robust: bool | None = None):
    """:func:`estimate_depth` of a checked map, without its checks (a caller that made them before)."""
    sigma = _width(smooth if smooth is not None else (c.smooth if c is not None else 0.0))
    robust = bool(robust if robust is not None else (c.robust if c is not None else False))
    if c is None:
        z = psf_map["focus"] * (2 * psf_map["axis"] / np.pi - 1)
        units, note = "wave RMS", None
    elif c.method == "curve":
        readings = _readings(psf_map, c.axis0)
        # More defocused than the calibration ever was: clipped to the end on its side, as a node
        # past the end of a curve that keeps rising reads.
        grid, side = _read_grid(c), _beyond(readings, c)
        depth = np.where(side > 0, grid[-1], np.where(side < 0, grid[0], _curve_depth(readings, c)))
        z = psf_map["focus"].copy(data=depth)
        units, note = "micrometer", c.to_dict()
        _warn_clipped(z.values, _weights(psf_map, c.min_validity) > 0, c)
    else:
        z = c.slope * signed_defocus(psf_map, c.axis0) + c.offset
        units, note = "micrometer", c.to_dict()
    floor = c.min_validity if c is not None else 0.5
    raw = np.asarray(z.values, dtype=np.float64)
    # Nodes with no reading: a NaN parameter, or invalid (below the map's own 0.5) and not filled (a
    # map made without filling). The smoothing gives them its plane through their neighbours, as it
    # does nodes below the calibration's floor; where it has none (σ = 0, or no weighted neighbour)
    # they are NaN, never the reading of an untextured patch nor a curve's end.
    finite = _finite(psf_map) & np.isfinite(raw)
    w = np.where(finite, _weights(psf_map, floor), 0.0)  # (raw: NaN too where a curve cannot be read)
    # A reading: valid (by the CNN's 0.5, or weighed by the calibration), or any node of a filled map
    # (whatever threshold filled it, the nodes it kept were valid to it).
    read = finite & ("filled" in psf_map or (np.asarray(psf_map["validity"].values) >= 0.5) | (w > 0))
    fit, alone = _local_plane(np.where(finite, raw, 0.0), w, sigma, robust)  # σ = 0: unchanged, all alone
    z = z.copy(data=np.where(~read & alone, np.nan, fit)).astype(np.float32).rename("depth")
    # The smoothing applied, which smooth= / robust= may have changed from the calibration's.
    # (robust as 0/1: netCDF, where xarray users export to, has no booleans)
    z.attrs = {"units": units, "long_name": "distance from the focal plane" if c is not None else
               "signed defocus: depth uncalibrated (paper 000 Eq. 14)", "smooth": sigma, "robust": int(robust)}
    if note:
        z.attrs["calibration"] = note
    return z
