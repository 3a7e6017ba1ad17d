"""Depth from astigmatism (paper 000 Sec. II-H, Eq. 14) and the tilted-surface simulation."""
import json
import re

import numpy as np
import pytest
import xarray as xr
from scipy.ndimage import gaussian_filter

from lsfov import LsfovWarning, simulate
from lsfov.estimate.depth import (DepthCalibration, _beyond, _node_values, _products, _readings, calibrate_depth, estimate_depth,
                                  local_plane, signed_defocus)


def _truth_map(surface):
    """The PSF map a perfect regressor would return: the true node parameters."""
    p = surface.params
    ds = xr.Dataset({n: (("gy", "gx"), p[..., i].astype(np.float32))
                     for i, n in enumerate(("focus", "astigmatism", "axis"))})
    ds["validity"] = (("gy", "gx"), np.ones(p.shape[:2], np.float32))
    cy, cx = surface.operator.centers
    stride = cy[1] - cy[0]
    ds.attrs.update(params=["focus", "astigmatism", "axis"], psf_model="Z3", patch=int(2 * (cy[0] + 0.5)),
                    stride=float(stride), image_shape=list(surface.image.shape))
    return ds


def test_tilted_surface_geometry():
    s = simulate.tilted_surface((256, 320), depth_range_um=(-4, 6), direction=0.0, grid=4, seed=0)
    assert s.depth_um.min() == pytest.approx(-4) and s.depth_um.max() == pytest.approx(6)
    assert np.all(np.diff(s.depth_um[0]) > 0)  # tilted along x
    # Above focus the axis is the instrument's, below it is turned by pi/2: both occur here.
    assert s.params.shape == (4, 4, 3) and np.all(s.params[..., 0] >= 0)
    axes = set(np.round(np.unique(s.params[..., 2]), 6))
    assert axes == {round(s.axis, 6), round((s.axis + np.pi / 2) % np.pi, 6)}
    with pytest.raises(ValueError, match="beyond the Z3"):
        simulate.tilted_surface((64, 64), depth_range_um=(-50, 50), grid=2)
    # Curved: u + c·u² along the direction (u from -1 to 1 across the field), scaled to the range.
    c = simulate.tilted_surface((256, 320), depth_range_um=(-4, 6), direction=0.0, curvature=0.5, grid=4, seed=0)
    u = (np.arange(320) - 159.5) / 160
    want = u + 0.5 * u**2
    np.testing.assert_allclose(c.depth_um[0], -4 + 10 * (want - want.min()) / np.ptp(want), atol=1e-9)
    np.testing.assert_array_equal(c.depth_um[0], c.depth_um[-1])  # constant across the direction
    assert np.all(np.diff(c.depth_um[0], 2) > 0)  # bent: convex along x


def test_depth_sign_above_and_below_focus():
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.0, axis=np.pi / 4, grid=8, seed=1)
    ds = _truth_map(s)
    cx = s.operator.centers[1]
    # Eq. 14 without calibration: one sign below focus (left half), the other above (right half).
    z = estimate_depth(ds)
    assert z.attrs["units"] == "wave RMS" and "uncalibrated" in z.attrs["long_name"]  # (a unit, as readers parse it)
    left, right = z.values[:, cx < 120], z.values[:, cx > 136]
    assert np.all(np.sign(left) == np.sign(left[0, 0])) and np.all(np.sign(right) == -np.sign(left[0, 0]))
    # Which sign: with this microscope's astigmatism at π/4, Eq. 14 as written (its lenses at 3π/4,
    # lsfov.estimate.depth) is positive below focus (depth < 0) and negative above, until calibrated.
    assert np.all(np.sign(s.depth_um[:, : int(cx[0])]) == -1) and np.sign(left[0, 0]) == 1
    # ... and its value: focus (2 axis / pi - 1), here and on a map of any axes (not only pi/4 and 3pi/4).
    rng = np.random.default_rng(0)
    anyaxis = ds.assign(axis=ds["axis"].copy(data=rng.uniform(0, np.pi, ds["axis"].shape).astype(np.float32)))
    for m in (ds, anyaxis):
        f, a = (m[v].values.astype(np.float64) for v in ("focus", "axis"))
        np.testing.assert_allclose(estimate_depth(m).values, f * (2 * a / np.pi - 1), rtol=1e-6, atol=1e-7 * f.max())
    # Calibrated: µm, with the sign and the scale of the truth, by either method.
    cy = s.operator.centers[0]
    truth = s.depth_um[np.rint(cy).astype(int)][:, np.rint(cx).astype(int)]
    for method in ("linear", "curve"):
        cal = calibrate_depth(ds, s.depth_um, method=method)
        assert cal.method == method and cal.axis0 == pytest.approx(np.pi / 4, abs=0.02)
        assert cal.slope == pytest.approx(1 / s.focus_per_um, rel=0.01) and cal.r2 > 0.999
        zc = estimate_depth(ds, cal)
        assert zc.attrs["units"] == "micrometer"
        assert np.abs(cal.offset) < 0.02 * 16  # in focus at depth 0
        np.testing.assert_allclose(zc.values, truth, atol=0.02 * 16)


def test_calibration_transfers_to_another_tilt_and_axis_orientation():
    kw = dict(axis=1.2, grid=8)
    a = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.2, seed=2, **kw)
    b = simulate.tilted_surface((256, 256), depth_range_um=(-3, 10), direction=1.9, curvature=0.5, seed=3, **kw)
    cy, cx = b.operator.centers
    truth = b.depth_um[np.rint(cy).astype(int)][:, np.rint(cx).astype(int)]
    for method in ("linear", "curve"):
        cal = calibrate_depth(_truth_map(a), a.depth_um, method=method)
        assert cal.axis0 == pytest.approx(1.2, abs=0.02)
        z = estimate_depth(_truth_map(b), cal.to_dict())  # a dict (e.g. read from JSON) works too
        assert np.abs(z.values - truth).mean() < 0.02 * np.ptp(b.depth_um)
    # Eq. 14 as written assumes the axis at 3pi/4 (depth.py): here (1.2) it gets the sign wrong somewhere.
    assert np.any(np.sign(estimate_depth(_truth_map(b)).values) != np.sign(truth))
    assert signed_defocus(_truth_map(b), 1.2).shape == truth.shape


def test_depth_bad_input():
    s = simulate.tilted_surface((192, 192), depth_range_um=(-5, 5), grid=4, seed=4)
    ds = _truth_map(s)
    with pytest.raises(ValueError, match="constant"):
        calibrate_depth(ds, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="node grid"):
        calibrate_depth(ds, np.zeros((5, 7)))
    with pytest.raises(ValueError, match="astigmatic"):
        estimate_depth(ds.drop_vars("axis"))
    assert isinstance(calibrate_depth(ds, s.depth_um), DepthCalibration)


def test_arguments_of_the_wrong_kind_say_what_to_pass():
    """A calibration where known depths go, a result that is no PSF map, a map where an operator goes:
    each named, with the function that takes it."""
    import xarray as xr

    import lsfov

    s = simulate.tilted_surface((192, 192), depth_range_um=(-5, 5), grid=4, seed=4)
    ds = _truth_map(s)
    cal = calibrate_depth(ds, s.depth_um)
    with pytest.raises(TypeError, match="not a calibration; to apply a calibration to a map use lsfov.estimate_depth"):
        calibrate_depth(ds, cal)
    with pytest.raises(TypeError, match="known_depth_um must be an array of depths in µm, got dict"):
        calibrate_depth(ds, {"a": 1})
    with pytest.raises(ValueError, match="smooth must be a finite number"):
        calibrate_depth(ds, s.depth_um, smooth=np.nan)
    other = xr.Dataset({"deblurred": (("y", "x"), np.ones((4, 4)))})
    with pytest.raises(ValueError, match=r"depth reads a PSF map .*this is none \(it holds deblurred\)"):
        estimate_depth(other)
    with pytest.raises(TypeError, match="psf_map must be a PSF map, the xarray.Dataset .* got DataArray"):
        estimate_depth(ds["focus"])
    with pytest.raises(TypeError, match=r"got Dataset; for a PSF map use lsfov.operator_from_psf_map\(psf_map\)"):
        lsfov.deconvolve(np.ones((192, 192), np.float32), ds)


def test_local_plane_keeps_planes_and_averages_noise():
    rng = np.random.default_rng(0)
    gy, gx = np.mgrid[:15, :17].astype(float)
    plane = 3 + 0.5 * gy - 0.2 * gx
    w = rng.uniform(0.2, 1, plane.shape) * (rng.uniform(size=plane.shape) > 0.3)
    # A tilt passes unbiased, borders included, whatever the weights (a Gaussian would flatten it).
    np.testing.assert_allclose(local_plane(plane, w, 2.0), plane, atol=1e-6)
    assert np.abs(gaussian_filter(plane, 2.0, mode="nearest") - plane).max() > 0.5
    noisy = plane + rng.normal(0, 1, plane.shape)
    assert np.abs(local_plane(noisy, 1.0, 2.0) - plane).mean() < 0.4 * np.abs(noisy - plane).mean()
    np.testing.assert_array_equal(local_plane(noisy, w, 0), noisy)
    # Where no neighbour has weight, a node keeps its value; leading dimensions are independent maps.
    lone = np.zeros_like(w)
    lone[0, 0] = 1
    np.testing.assert_allclose(local_plane(noisy, lone, 1.0)[-1, -1], noisy[-1, -1])
    both = local_plane(np.stack([noisy, plane]), w, 1.5)
    np.testing.assert_allclose(both[0], local_plane(noisy, w, 1.5))
    np.testing.assert_allclose(both[1], plane, atol=1e-6)
    with pytest.raises(ValueError, match="smooth"):
        local_plane(noisy, w, -1)
    with pytest.raises(ValueError, match="weights"):
        local_plane(noisy, -w, 1)


def test_smoothed_calibration_on_noisy_maps():
    """Noisy node estimates (like a CNN's): the smoothed calibration and depth are closer to the truth,
    and the calibration carries its smoothing to estimate_depth."""
    kw = dict(axis=0.4, grid=16)
    a = simulate.tilted_surface((512, 512), depth_range_um=(-8, 8), direction=0.3, seed=5, **kw)
    b = simulate.tilted_surface((512, 512), depth_range_um=(-6, 9), direction=1.2, curvature=0.3, seed=6, **kw)
    rng = np.random.default_rng(1)

    def noisy(s):
        ds = _truth_map(s)
        ds["focus"] = np.abs(ds["focus"] + rng.normal(0, 0.06, ds["focus"].shape)).astype(np.float32)
        ds["axis"] = ((ds["axis"] + rng.normal(0, 0.3, ds["axis"].shape)) % np.pi).astype(np.float32)
        return ds

    cy, cx = b.operator.centers
    truth = b.depth_um[np.rint(cy).astype(int)][:, np.rint(cx).astype(int)]
    mb = noisy(b)
    raw_cal = calibrate_depth(noisy(a), a.depth_um, method="linear")
    cal = calibrate_depth(noisy(a), a.depth_um, smooth=2, method="linear")
    assert cal.smooth == 2 and raw_cal.smooth == 0 and cal.r2 > raw_cal.r2
    err_raw = np.abs(estimate_depth(mb, raw_cal).values - truth).mean()
    err = np.abs(estimate_depth(mb, cal).values - truth).mean()
    assert err < 0.6 * err_raw
    np.testing.assert_allclose(estimate_depth(mb, cal, smooth=0).values,
                               cal.slope * signed_defocus(mb, cal.axis0).values + cal.offset, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="smooth"):
        calibrate_depth(mb, b.depth_um, smooth=-1)


def test_smoothing_leaves_out_the_nodes_the_calibration_left_out():
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.4, grid=8, seed=7)
    ds = _truth_map(s)
    bad = np.zeros(ds["focus"].shape, bool)
    bad[2, 3] = bad[5, 5] = True
    ds["focus"] = ds["focus"].where(~bad, 0.4)  # wrong readings, flagged by a middling validity
    ds["validity"] = ds["validity"].where(~bad, 0.7)
    cal = calibrate_depth(ds, s.depth_um, min_validity=0.8, smooth=2)
    assert cal.min_validity == 0.8 and cal.n_nodes == 62
    truth = estimate_depth(_truth_map(s), calibrate_depth(_truth_map(s), s.depth_um)).values
    # The depth is a plane in the signed defocus: without the two bad nodes the local plane is exact.
    np.testing.assert_allclose(estimate_depth(ds, cal).values, truth, atol=1e-3)
    restored = DepthCalibration(**cal.to_dict())
    np.testing.assert_array_equal(estimate_depth(ds, restored).values, estimate_depth(ds, cal).values)
    counted = DepthCalibration(**{**cal.to_dict(), "min_validity": 0.5})  # the bad nodes weigh in the smoothing
    assert np.abs(estimate_depth(ds, counted, robust=False).values - truth).max() > 0.1
    # Robust smoothing (the default) stops two wrong nodes among good ones from pulling the plane.
    assert cal.robust and np.abs(estimate_depth(ds, counted).values - truth).max() < 1e-3


def test_robust_local_plane_ignores_outlying_nodes():
    rng = np.random.default_rng(3)
    gy, gx = np.mgrid[:15, :17].astype(float)
    plane = 3 + 0.5 * gy - 0.2 * gx
    bad = rng.uniform(size=plane.shape) < 0.08
    v = plane + np.where(bad, rng.choice([-4.0, 4.0], plane.shape), 0.0)
    plain, robust = local_plane(v, 1.0, 2.0), local_plane(v, 1.0, 2.0, robust=True)
    assert np.abs(plain - plane).max() > 0.3
    np.testing.assert_allclose(robust, plane, atol=1e-6)  # every node, the outliers' own included
    noisy = plane + rng.normal(0, 1, plane.shape)  # Gaussian noise: about the plain fit (95 % efficiency)
    err = [np.abs(local_plane(noisy, 1.0, 2.0, robust=r) - plane).mean() for r in (False, True)]
    assert err[1] < 1.15 * err[0]
    np.testing.assert_array_equal(local_plane(v, 1.0, 0, robust=True), v)
    both = local_plane(np.stack([v, 10 * v]), 1.0, 2.0, robust=True)  # each grid its own scale
    np.testing.assert_allclose(both[1], 10 * plane, atol=1e-5)
    assert DepthCalibration(axis0=1.0, slope=1.0, offset=0.0, r2=1.0, mae_um=0.0, n_nodes=3).robust is False  # old files


def test_depth_calibration_saves_and_loads(tmp_path):
    """A calibration is one JSON file: written atomically, never over an existing one without
    overwrite, read back equal; anything else is refused by name."""
    cal = DepthCalibration(axis0=2.3, slope=21.5, offset=-0.4, r2=0.97, mae_um=0.3, n_nodes=49, smooth=2.0)
    path = cal.save(tmp_path / "cal.json")
    assert DepthCalibration.load(path) == cal
    with pytest.raises(FileExistsError, match="overwrite"):
        cal.save(path)
    other = DepthCalibration(**{**cal.to_dict(), "slope": 30.0})
    other.save(path, overwrite=True)
    assert DepthCalibration.load(path).slope == 30.0
    assert [p.name for p in tmp_path.iterdir()] == ["cal.json"]  # no temporary left
    # A curve calibration (tuples of coefficients) comes back equal; a file from before the curves
    # (no method) is the line it was.
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.4, grid=8, seed=7)
    curve = calibrate_depth(_truth_map(s), s.depth_um)
    assert curve.method == "curve" and DepthCalibration.load(curve.save(tmp_path / "c.json")) == curve
    (tmp_path / "c.json").unlink()
    old = {k: v for k, v in cal.to_dict().items() if k not in ("method", "curves", "noise", "range_um")}
    (tmp_path / "old.json").write_text(json.dumps({"type": "lsfov.DepthCalibration", **old}))
    assert DepthCalibration.load(tmp_path / "old.json") == cal and cal.method == "linear"
    (tmp_path / "old.json").unlink()
    (tmp_path / "x.json").write_text('{"a": 1}')
    (tmp_path / "y.json").write_text('{"type": "lsfov.DepthCalibration", "nope": 1}')
    for name, err, match in (("x.json", ValueError, "is not a depth calibration"), ("y.json", ValueError, "nope"),
                             ("z.json", FileNotFoundError, "no such depth calibration")):
        with pytest.raises(err, match=match):
            DepthCalibration.load(tmp_path / name)


def _cnn_like(surface, rng):
    """What a CNN reads (benchmarks/RESULTS.md): near focus the decoded focus is biased up (a square
    root of a noisy square) and the side of focus (the axis) is a coin toss, while the regressed
    focus x astigmatism products pass smoothly through zero; everywhere some noise."""
    ds = _truth_map(surface)
    f, c, a = (ds[v].values.astype(np.float64) for v in ("focus", "astigmatism", "axis"))
    signed = np.where(np.isclose(a, surface.axis), f, -f)
    near = f < 0.06
    ds["focus"] = (ds["focus"].dims, np.sqrt(f**2 + 0.05**2 + rng.normal(0, 0.01, f.shape) ** 2).astype(np.float32))
    flip = np.where(near & (rng.uniform(size=f.shape) < 0.5), np.pi / 2, 0.0)
    ds["axis"] = (ds["axis"].dims, ((a + flip + rng.normal(0, 0.05, f.shape)) % np.pi).astype(np.float32))
    for name, trig in (("focus_astig_sin", np.sin), ("focus_astig_cos", np.cos)):
        ds[name] = (ds["focus"].dims, (signed * c * trig(2 * surface.axis) + rng.normal(0, 0.002, f.shape))
                    .astype(np.float32))
    return ds


def test_curve_calibration_reads_near_focus():
    """Paper 000's line of the signed defocus jumps across focus where the decoded focus is biased
    and its side unsure; the calibration curves read the regressed products there and pass through
    focus smoothly, also on a tilt they were not fitted on."""
    rng = np.random.default_rng(3)
    kw = dict(axis=0.7, grid=16)
    a = simulate.tilted_surface((512, 512), depth_range_um=(-9, 9), direction=0.0, seed=8, **kw)
    b = simulate.tilted_surface((512, 512), depth_range_um=(-3, 3), direction=0.8, seed=9, **kw)
    cy, cx = b.operator.centers
    truth = b.depth_um[np.rint(cy).astype(int)][:, np.rint(cx).astype(int)]
    mb = _cnn_like(b, rng)
    err = {}
    for method in ("linear", "curve"):
        cal = calibrate_depth(_cnn_like(a, rng), a.depth_um, method=method)
        assert cal.axis0 == pytest.approx(0.7, abs=0.05)
        err[method] = np.abs(estimate_depth(mb, cal).values - truth).mean()
    assert err["curve"] < 0.25 * err["linear"] and err["curve"] < 0.03 * 6
    # The curves: focus² is even in depth, the product odd (through zero at focus), as fitted.
    cal = calibrate_depth(_cnn_like(a, rng), a.depth_um)
    z = np.linspace(-8, 8, 5)
    f2, prod = (np.polyval(c, z) for c in cal.curves)
    np.testing.assert_allclose(f2, f2[::-1], rtol=0.05, atol=1e-3)
    assert np.all(np.diff(prod) > 0) and abs(np.polyval(cal.curves[1], 0.0)) < 0.1 * prod[-1]
    assert cal.range_um == pytest.approx((a.depth_um.min(), a.depth_um.max()), abs=1.2)
    # Beyond the calibrated range the depth stops 10 % past its ends.
    far = simulate.tilted_surface((512, 512), depth_range_um=(-11, 11), direction=0.0, seed=10, **kw)
    zf = estimate_depth(_truth_map(far), calibrate_depth(_truth_map(a), a.depth_um)).values
    lo, hi = calibrate_depth(_truth_map(a), a.depth_um).range_um
    assert zf.max() <= hi + 0.1 * (hi - lo) + 1e-6 and zf.min() >= lo - 0.1 * (hi - lo) - 1e-6
    assert zf.max() > hi  # read beyond the calibrated nodes, up to the margin


def test_curve_calibration_needs_depth_levels():
    s = simulate.tilted_surface((192, 192), depth_range_um=(-5, 5), grid=4, direction=0.0, seed=4)
    ds = _truth_map(s)
    steps = np.broadcast_to(np.array([-1.0, 1.0, 1.0, -1.0]), (4, 4))
    with pytest.raises(ValueError, match="2 distinct values"):
        calibrate_depth(ds, steps)
    cal = calibrate_depth(ds, s.depth_um)  # 4 columns of depth: the degree comes down to 2
    assert len(cal.curves[0]) == 3
    for bad, match in ((dict(method="spline"), "method"), (dict(degree=0), "degree")):
        with pytest.raises(ValueError, match=match):
            calibrate_depth(ds, s.depth_um, **bad)
    with pytest.raises(ValueError, match="curves"):
        DepthCalibration(**{**cal.to_dict(), "curves": None})
    with pytest.raises(ValueError, match="method"):
        DepthCalibration(**{**cal.to_dict(), "method": "cubic"})
    # Numbers that would give NaN depths, or fail where the map is read, are refused where they come in.
    for bad, match in ((dict(axis0=float("nan")), "axis0 must be a finite number"),
                       (dict(slope="abc"), "slope must be a finite number"), (dict(slope=-1.0), "must be >= 0"),
                       (dict(noise=[1.0, float("inf")]), "noise holds NaN or Inf"),
                       (dict(curves=[["a"], [1.0]]), "curves must hold numbers")):
        with pytest.raises(ValueError, match=match):
            DepthCalibration(**{**cal.to_dict(), **bad})


def test_calibration_records_its_map_and_warns_on_another():
    """Curves fitted on one kind of reading do not fit another: a calibration keeps whether its map
    was symmetrized, and a map made otherwise gets its depth with a warning."""
    import warnings

    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.4, grid=8, seed=7)
    ds = _truth_map(s)
    ds.attrs["symmetrize"] = 1
    cal = calibrate_depth(ds, s.depth_um)
    assert cal.symmetrize is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = estimate_depth(ds, cal)
        estimate_depth(_truth_map(s), cal)  # a map that does not say how it was made: nothing to compare
    other = ds.copy()
    other.attrs["symmetrize"] = 0
    with pytest.warns(UserWarning, match="symmetrize=False, its depth calibration with symmetrize=True"):
        z = estimate_depth(other, cal)
    np.testing.assert_array_equal(z.values, same.values)  # told, not refused
    # Calibrations from before recorded nothing: no warning either.
    old = DepthCalibration(**{**cal.to_dict(), "symmetrize": None})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_depth(other, old)
    # The model, stride and pixel size of the map too (a calibration holds for the network that read it)
    ds.attrs.update(model="Z3", pixel_um=0.2)
    cal = calibrate_depth(ds, s.depth_um)
    assert (cal.model, cal.stride, cal.pixel_um) == ("Z3", 32, 0.2)
    assert DepthCalibration(**json.loads(json.dumps(cal.to_dict()))) == cal
    import lsfov

    assert lsfov.DepthCalibration is DepthCalibration  # as the README loads one
    moved = ds.copy()
    moved.attrs["model"] = "/elsewhere/Z3"  # the same name elsewhere: the same model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_depth(moved, cal)
    for attrs, said in (({"model": "/x/mine.pt"}, "model mine.pt (calibration: Z3)"),
                        ({"stride": 64}, "stride 64 (calibration: 32)"), ({"pixel_um": 0.1}, "pixel_um 0.1 (calibration: 0.2)")):
        with pytest.warns(LsfovWarning, match=re.escape(said)):
            estimate_depth(ds.assign_attrs(attrs), cal)
    # A file of the same name with other weights (z3.pt retrained): another model, said so
    ds.attrs.update(model="/lab/z3.pt", model_digest="0123456789abcdef")
    cal = calibrate_depth(ds, s.depth_um)
    assert cal.model_digest == "0123456789abcdef"
    with pytest.warns(LsfovWarning, match=re.escape("the model's weights fedcba98 (calibration: 01234567; a model "
                                                    "retrained or replaced)")):
        estimate_depth(ds.assign_attrs(model_digest="fedcba9876543210"), cal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_depth(ds.assign_attrs(model="/elsewhere/z3.pt"), cal)  # the same weights moved: no news


def test_psf_maps_record_their_models_weights():
    import lsfov

    img = simulate.sample_image("coins", (192, 192)) * 1000 + 10
    z3 = lsfov.load_model("Z3")
    m = lsfov.estimate_psf_map(img, z3, stride=64)
    assert m.attrs["model_digest"] == z3.weights_digest() == lsfov.estimate_psf_map(img, "Z3", stride=64).attrs[
        "model_digest"]
    import copy

    import torch

    other = copy.deepcopy(z3)  # (load_model shares one object per file: not to be changed in place)
    with torch.no_grad():
        next(other.net.parameters())[0].flatten()[0] += 1e-3  # one weight changed: another model
    assert other.weights_digest() != z3.weights_digest()


def test_a_calibration_that_does_not_fit_its_own_nodes_is_warned():
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.4, grid=8, seed=7)
    wrong = np.random.default_rng(0).uniform(-8, 8, (8, 8))  # another sample's depth, say
    with pytest.warns(LsfovWarning, match="fits its own nodes poorly"):
        calibrate_depth(_truth_map(s), wrong, method="linear")


def test_linear_calibration_of_an_ideal_two_axis_map():
    """Noise-free readings take two axes only (θ0 above focus, θ0 + π/2 below): the line's fit is
    exact (one least-squares solve), not a search that any axis would satisfy equally well."""
    rng = np.random.default_rng(1)
    z = np.tile(np.linspace(-20, 20, 15), (12, 1))
    th0, k = np.pi / 3, 0.02
    focus = np.abs(k * z)
    for noise in (0.0, 0.01):
        axis = (np.where(z > 0, th0, th0 + np.pi / 2) + noise * rng.standard_normal(z.shape)) % np.pi
        ds = xr.Dataset({"focus": (("gy", "gx"), focus), "astigmatism": (("gy", "gx"), np.full_like(z, 0.15)),
                         "axis": (("gy", "gx"), axis), "validity": (("gy", "gx"), np.ones_like(z))},
                        attrs={"params": ["focus", "astigmatism", "axis"], "patch": 128, "stride": 64})
        cal = calibrate_depth(ds, z, method="linear")
        assert cal.axis0 == pytest.approx(th0, abs=0.02) and cal.slope == pytest.approx(1 / k, rel=0.02)
        np.testing.assert_allclose(estimate_depth(ds, cal).values, z, atol=0.02 * 40)


def test_estimate_depth_takes_a_saved_calibration_as_read(tmp_path):
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), grid=8, seed=1)
    ds = _truth_map(s)
    cal = calibrate_depth(ds, s.depth_um)
    raw = json.loads(cal.save(tmp_path / "cal.json").read_text())  # with its "type"
    np.testing.assert_array_equal(estimate_depth(ds, raw).values, estimate_depth(ds, cal).values)


def test_curves_on_few_nodes_keep_a_low_degree():
    """Four nodes per coefficient at least: on a 3x3 map quartic curves would pass through every
    node (R² 1 on the calibration, anything elsewhere)."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.3, grid=3, seed=4)
    cal = calibrate_depth(_truth_map(s), s.depth_um)
    assert all(len(c) == 2 for c in cal.curves)  # 9 nodes: degree 1
    big = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.3, grid=8, seed=4)
    assert all(len(c) == 5 for c in calibrate_depth(_truth_map(big), big.depth_um).curves)  # 64 nodes: 4


def test_depth_beyond_the_curves_of_a_cnn_map_is_warned():
    """On a CNN map the quartic focus² curve may turn over before the end of its range: a node
    defocused further than the calibration saw would read inside the range. Its focus² above the
    curve's highest gives it away: it reads at the end on its side, and the map is warned about;
    the calibration's own map and one within its depths are not."""
    import warnings

    import lsfov

    cal_s = simulate.tilted_surface((512, 512), depth_range_um=(-3, 3), seed=1)
    cal = calibrate_depth(lsfov.estimate_psf_map(cal_s.image, "Z3"), cal_s.depth_um, smooth=2)
    far = simulate.tilted_surface((512, 512), depth_range_um=(-10, 10), seed=2)
    far_map = lsfov.estimate_psf_map(far.image, "Z3")
    with pytest.warns(LsfovWarning, match="of the nodes read at the end of the calibrated depths"):
        z = estimate_depth(far_map, cal, smooth=0).values
    hi = cal.range_um[1]
    truth = _node_values(far_map, far.depth_um)
    beyond = np.abs(truth) > 4  # well past the calibrated ±2.3 µm: read past its end on their side
    right = (np.abs(z[beyond]) >= hi) & (np.sign(z[beyond]) == np.sign(truth[beyond]))
    # Measured 0.96 on an Intel Xeon, at least that on an AMD EPYC, whose CNN readings differ in their
    # last bits (without the rule: 0.75); on the Xeon a node at 7.5 µm, far beyond anything seen, reads
    # on the wrong side.
    assert np.mean(right) > 0.9, z[beyond]
    within = [simulate.tilted_surface((512, 512), depth_range_um=r, seed=k) for k, r in ((3, (-2.5, 2.5)),
                                                                                        (5, (-2, 2)))]
    flagged = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", LsfovWarning)
        for s in (cal_s, *within):
            m = lsfov.estimate_psf_map(s.image, "Z3")
            estimate_depth(m, cal)
            flagged += int(np.sum(_beyond(_readings(m, cal.axis0), cal) != 0))
    # A spike of focus² alone (an in-focus node read wrong) sends no node to an end: 0 of 147 here,
    # 3 by focus² alone.
    assert flagged <= 1


def test_depth_beyond_the_calibrated_range_is_warned():
    import warnings

    kw = dict(axis=1.2, grid=8, direction=0.3)
    narrow = simulate.tilted_surface((256, 256), depth_range_um=(-3, 3), seed=4, **kw)
    wide = simulate.tilted_surface((256, 256), depth_range_um=(-9, 9), seed=5, **kw)
    cal = calibrate_depth(_truth_map(narrow), narrow.depth_um)
    with pytest.warns(LsfovWarning, match=r"of the nodes read at the end of the calibrated depths"):
        z = estimate_depth(_truth_map(wide), cal)
    assert np.abs(z.values).max() <= 3.7  # clipped: what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_depth(_truth_map(narrow), cal)


@pytest.mark.parametrize("method", ["curve", "linear"])
def test_nodes_without_a_reading_have_no_depth(method):
    """A NaN parameter, or an invalid node of a map made without filling, is NaN in the depth map
    without smoothing (a NaN once read as the end of the curve, an untextured patch as a confident
    depth); smoothing gives it its neighbours' plane, which it does not pull; a filled node keeps
    its depth."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), direction=0.4, grid=8, seed=3)
    cal = calibrate_depth(_truth_map(s), s.depth_um, method=method, smooth=2)
    full = estimate_depth(_truth_map(s), cal).values
    ds = _truth_map(s)
    ds["focus"][2, 3] = np.nan
    ds["validity"][5, 5] = 0.1  # unfilled: its parameters are what the CNN read on nothing
    ds["focus"][5, 5] = 3.0
    z = estimate_depth(ds, cal, smooth=0).values
    assert np.isnan(z[2, 3]) and np.isnan(z[5, 5]) and np.isfinite(np.delete(z.ravel(), [19, 45])).all()
    np.testing.assert_allclose(np.delete(z.ravel(), [19, 45]), np.delete(estimate_depth(_truth_map(s), cal, smooth=0)
                                                                         .values.ravel(), [19, 45]), atol=1e-5)
    z = estimate_depth(ds, cal).values  # the calibration's smoothing: the plane of the neighbours
    np.testing.assert_allclose(z, full, atol=0.05)
    filled = ds.assign(filled=(("gy", "gx"), np.isnan(ds["focus"].values) | (ds["validity"].values < 0.5)))
    filled["focus"][2, 3] = _truth_map(s)["focus"][2, 3]  # as fill_invalid would have it
    z = estimate_depth(filled, cal).values
    assert np.isfinite(z[2, 3]) and np.isfinite(z[5, 5])


def test_robust_must_be_a_bool():
    s = simulate.tilted_surface((128, 128), depth_range_um=(-4, 4), grid=4, seed=1)
    with pytest.raises(ValueError, match="robust must be True or False, got 'no'"):
        calibrate_depth(_truth_map(s), s.depth_um, robust="no")  # bool("no") is True
    cal = calibrate_depth(_truth_map(s), s.depth_um)
    with pytest.raises(ValueError, match="robust must be True or False"):
        estimate_depth(_truth_map(s), cal, robust="false")
    with pytest.raises(ValueError, match="robust must be True or False, got 2"):
        calibrate_depth(_truth_map(s), s.depth_um, robust=2)
    assert estimate_depth(_truth_map(s), cal, robust=np.True_).attrs["robust"] == 1
    with pytest.raises(ValueError, match=r"^calibration has keys a depth calibration has not \(a\); give the to_dict"):
        estimate_depth(_truth_map(s), {**cal.to_dict(), "a": 1})
    with pytest.raises(ValueError, match="^calibration lacks keys of a depth calibration"):
        estimate_depth(_truth_map(s), {"slope": 1.0})


def test_readings_follow_the_thresholds_the_user_chose():
    """A node a filling kept (validity 0.4 over its threshold 0.3), or one the calibration weighs
    (min_validity 0.2), is a reading, never NaN; a NaN parameter does not stop a calibration (it
    once failed in the SVD)."""
    from lsfov.estimate.mapping import fill_invalid

    s = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), direction=0.4, grid=8, seed=3)
    ds = _truth_map(s).assign_attrs(params=["focus", "astigmatism", "axis"])
    ds["validity"][2, 2], ds["validity"][3, 3] = 0.4, 0.1
    for smooth in (0, 2):
        z = estimate_depth(fill_invalid(ds, threshold=0.3), smooth=smooth).values
        assert np.isfinite(z).all()
        low = calibrate_depth(ds, s.depth_um, min_validity=0.2, smooth=smooth, method="linear")
        assert np.isnan(estimate_depth(ds, low).values).sum() == (1 if smooth == 0 else 0)  # 0.1: unread
    ds["focus"][4, 4] = np.nan
    for method in ("curve", "linear"):
        cal = calibrate_depth(ds, s.depth_um, method=method, smooth=2)
        assert cal.n_nodes == 64 - 3 and cal.r2 > 0.99


def test_a_nan_product_is_no_reading_for_the_curves():
    """The curves read ``focus_astig_*``: a NaN there once gave a confident depth at the low end of
    the range (the cost's argmin of a NaN row), and NaN calibration curves."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), direction=0.4, grid=8, seed=3)
    ds = _truth_map(s)
    sn, cs = _products(ds)
    ds["focus_astig_sin"], ds["focus_astig_cos"] = (("gy", "gx"), sn.astype("f4")), (("gy", "gx"), cs.astype("f4"))
    cal = calibrate_depth(ds, s.depth_um, method="curve")
    ds["focus_astig_cos"][2, 3] = np.nan
    assert np.isnan(estimate_depth(ds, cal, smooth=0).values[2, 3])
    again = calibrate_depth(ds, s.depth_um, method="curve")
    assert again.n_nodes == 63 and np.isfinite(np.concatenate(again.curves)).all() and again.r2 > 0.99


def test_a_node_without_a_reading_or_any_weighted_neighbour_has_no_depth():
    """Smoothing gives an unread node its neighbours' plane; with none within reach (nor after the
    robust reweighting drops the only one), it is NaN, not its placeholder value nor an untextured
    patch's reading."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), direction=0.4, grid=8, seed=3)
    ds = _truth_map(s)
    ds["validity"][:, :4] = 0.1
    z = estimate_depth(ds, smooth=0.9).values  # reach 3 nodes: column 0 sees no valid node
    assert np.isnan(z[:, 0]).all() and np.isfinite(z[:, 4:]).all()
    gy, gx = np.mgrid[:8, :8]
    focus = (0.05 * gx + 0.02 * gy + 0.3).astype("f4")
    validity = np.ones((8, 8), "f4")
    validity[:, :4] = 0
    validity[0, 3] = 1  # the only valid node within reach of (0, 0), far off the others' plane
    focus[0, 3], focus[0, 0] = 5.0, np.nan
    odd = xr.Dataset({"focus": (("gy", "gx"), focus), "astigmatism": (("gy", "gx"), np.full((8, 8), .1, "f4")),
                      "axis": (("gy", "gx"), np.full((8, 8), 3 * np.pi / 4, "f4")),
                      "validity": (("gy", "gx"), validity)})
    assert np.isnan(estimate_depth(odd, smooth=1, robust=True).values[0, 0])
    assert np.isfinite(estimate_depth(odd, smooth=1, robust=False).values[0, 0])  # that node holds it


def test_a_nan_node_weighs_nothing_in_a_plain_smoothed_calibration():
    """Without the robust reweighting, a NaN node's placeholder must weigh nothing: the same
    calibration as the node marked invalid (a NaN once spread through the fit: SVD failure)."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), direction=0.4, grid=8, seed=3)
    nan, invalid = _truth_map(s), _truth_map(s)
    nan["focus"][4, 4] = np.nan
    invalid["validity"][4, 4] = 0
    a, b = (calibrate_depth(m, s.depth_um, method="linear", smooth=2, robust=False) for m in (nan, invalid))
    np.testing.assert_allclose([a.slope, a.offset, a.axis0], [b.slope, b.offset, b.axis0], rtol=1e-6)


def test_an_infinite_smoothing_is_one_plane_over_any_grid():
    rng = np.random.default_rng(1)
    v, w = rng.normal(size=(3, 30)), rng.uniform(0.1, 1, (3, 30))
    gy, gx = np.mgrid[:3, :30].astype(float)
    design = np.stack([np.ones(90), gy.ravel(), gx.ravel()], 1)
    coef, *_ = np.linalg.lstsq(design * np.sqrt(w.ravel())[:, None], v.ravel() * np.sqrt(w.ravel()), rcond=None)
    np.testing.assert_allclose(local_plane(v, w, np.inf), (design @ coef).reshape(3, 30), atol=1e-6)


def test_filled_nodes_do_not_pull_the_smoothing_and_the_floor_is_inclusive():
    """A filled node holds its neighbours' values, not a reading: it weighs nothing in the smoothing
    (an outlier there moves no neighbour). A node at exactly ``min_validity`` is a reading."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), direction=0.4, grid=8, seed=3)
    ds = _truth_map(s).assign(filled=(("gy", "gx"), np.zeros((8, 8), bool)))
    ds["filled"][4, 4] = True
    base = estimate_depth(ds, smooth=2).values
    ds["focus"][4, 4] = 3.0
    moved = estimate_depth(ds, smooth=2).values
    np.testing.assert_allclose(np.delete(moved.ravel(), 36), np.delete(base.ravel(), 36), atol=1e-6)
    ds = _truth_map(s)
    ds["validity"][2, 2] = 0.5
    assert calibrate_depth(ds, s.depth_um, min_validity=0.5).n_nodes == 64
    base = estimate_depth(ds, smooth=1).values
    ds["focus"][2, 2] += 0.5
    assert abs(estimate_depth(ds, smooth=1).values[2, 3] - base[2, 3]) > 1e-3  # it weighs in its neighbours' plane


def test_signed_defocus_defaults_to_the_uncalibrated_sign():
    """Eq. 14 as written (the lenses' axis at 3π/4): ``signed_defocus`` of a map without an axis has
    the sign of the uncalibrated depth, + where the axis is 3π/4 and − where it is π/4."""
    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.0, axis=np.pi / 4, grid=8, seed=1)
    ds = _truth_map(s)
    f, a = (ds[v].values.astype(np.float64) for v in ("focus", "axis"))
    np.testing.assert_allclose(signed_defocus(ds).values, f * np.cos(2 * (a - 3 * np.pi / 4)), rtol=1e-6,
                               atol=1e-7 * f.max())
    on = f > 1e-3 * f.max()
    assert np.array_equal(np.sign(signed_defocus(ds).values[on]), np.sign(estimate_depth(ds).values[on]))
    assert set(np.round(a[on], 4)) == {round(np.pi / 4, 4), round(3 * np.pi / 4, 4)}  # both signs occur


def test_beyond_the_curves_allows_two_standard_deviations_of_the_astigmatism_reading():
    """A node more defocused than the calibration saw (focus² above the curve's highest by two of its
    standard deviations) goes to the end whose astigmatism reading it has, within two of that
    reading's standard deviations; a node read nearer the middle stays for the curves."""
    cal = DepthCalibration(axis0=0.0, slope=1.0, offset=0.0, r2=1.0, mae_um=0.0, n_nodes=10, method="curve",
                           curves=((1.0, 0.0, 0.0), (1.0, 0.0)), noise=(0.01, 0.04), range_um=(-2.0, 2.0))
    top, end = 2.4**2, 2.4  # the curves read 10 % past the range: focus² = z², product = z
    focus2 = np.array([top + 0.3, top + 0.3, top + 0.3, top + 0.3, top + 0.1, top + 0.3])
    product = np.array([end - 0.3, end - 0.5, -end + 0.3, -end + 0.5, end, 0.0])
    np.testing.assert_array_equal(_beyond((focus2, product), cal), [1, 0, -1, 0, 0, 0])
    flipped = DepthCalibration(**{**cal.to_dict(), "curves": ((1.0, 0.0, 0.0), (-1.0, 0.0))})  # falls with depth
    np.testing.assert_array_equal(_beyond((focus2, -product), flipped), [1, 0, -1, 0, 0, 0])


def test_known_depth_at_full_resolution_is_read_bilinearly_at_the_nodes():
    from scipy.ndimage import map_coordinates

    from lsfov.estimate.mapping import map_node_pixels

    s = simulate.tilted_surface((256, 256), depth_range_um=(-8, 8), direction=0.0, grid=8, seed=1)
    ds = _truth_map(s)
    rough = np.random.default_rng(0).normal(size=(256, 256))  # bilinear and cubic differ on it
    yy, xx = np.meshgrid(*map_node_pixels(ds), indexing="ij")
    assert not np.allclose(yy, np.rint(yy))  # between pixels: the interpolation shows
    got = _node_values(ds, rough)
    iy, ix = np.floor(yy).astype(int), np.floor(xx).astype(int)
    ty, tx = yy - iy, xx - ix
    want = ((1 - ty) * (1 - tx) * rough[iy, ix] + (1 - ty) * tx * rough[iy, ix + 1]
            + ty * (1 - tx) * rough[iy + 1, ix] + ty * tx * rough[iy + 1, ix + 1])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert not np.allclose(got, map_coordinates(rough, [yy, xx], order=3, mode="nearest"))


def test_known_depth_on_the_nodes_follows_the_map_as_given():
    """A map whose nodes are reordered (reversed, shuffled) is read in position order; depths on its
    node grid are matched to it as the caller holds it (unlabelled) or by the nodes' coordinates."""
    s = simulate.tilted_surface((384, 384), depth_range_um=(-8, 8), direction=0.3, grid=8, seed=2)
    cy, cx = s.operator.centers
    ds = _cnn_like(s, np.random.default_rng(5)).assign_coords(gy=("gy", cy, {"units": "pixel"}),
                                                              gx=("gx", cx, {"units": "pixel"}))
    known = s.depth_um[np.rint(cy).astype(int)][:, np.rint(cx).astype(int)]
    want = calibrate_depth(ds, known)
    order = np.random.default_rng(0).permutation(len(cx))
    labelled = xr.DataArray(known, dims=("gy", "gx"), coords={"gy": cy, "gx": cx})
    for m, k in ((ds.isel(gx=slice(None, None, -1)), known[:, ::-1]),
                 (ds.isel(gx=order).transpose("gx", "gy"), known[:, order]),
                 (ds.isel(gx=order), labelled),  # labelled: its own order
                 (ds.isel(gy=slice(None, None, -1)), labelled.isel(gx=order).transpose("gx", "gy"))):
        got = calibrate_depth(m, k)
        assert got.axis0 == want.axis0 and got.r2 == pytest.approx(want.r2, abs=1e-12)
        np.testing.assert_allclose(np.asarray(got.curves), np.asarray(want.curves), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="not the map's nodes"):
        calibrate_depth(ds, labelled.assign_coords(gx=cx + 1))


def test_a_stack_of_maps_is_read_plane_by_plane_and_refused_where_one_plane_is_read():
    """Maps of two planes joined along t: the smoothing fitted its planes over (gx, t) (13 % off),
    fill_invalid and operator_from_psf_map failed with a reshape error; a transposed map's fill
    failed on its sizes."""
    from lsfov import operator_from_psf_map
    from lsfov.estimate import fill_invalid

    rng = np.random.default_rng(5)
    surf = [simulate.tilted_surface((384, 512), depth_range_um=r, axis=0.7, grid=8, seed=s)
            for r, s in (((-6, 6), 1), ((-2, 4), 2))]
    maps = [_cnn_like(s, rng) for s in surf]
    stack = xr.concat(maps, dim="t")
    cal = calibrate_depth(maps[0], surf[0].depth_um, smooth=1.5)
    for c in (None, cal):
        d = estimate_depth(stack, c, smooth=1.5)
        assert d.dims == ("t", "gy", "gx")
        for t in range(2):
            np.testing.assert_array_equal(d.isel(t=t).values, estimate_depth(maps[t], c, smooth=1.5).values)
    for call, what in ((fill_invalid, "fill_invalid"), (operator_from_psf_map, "operator_from_psf_map"),
                       (lambda m: calibrate_depth(m, surf[0].depth_um), "calibrate_depth")):
        with pytest.raises(ValueError, match=rf"^{what} takes one plane's PSF map \(dims gy, gx\); this one also "
                                             r"has t: select a plane, e.g. psf_map.isel\(t=0\)$"):
            call(stack)
    m = maps[0].isel(gx=slice(0, 6))  # (8 x 6 nodes: a transposed map's sizes differ)
    m = m.assign(validity=m.validity.where(m.validity.gx != 3, 0.0))
    filled = fill_invalid(m.transpose("gx", "gy"))
    assert filled.focus.dims == ("gx", "gy") and filled.filled.sum() == 8
    xr.testing.assert_identical(filled.transpose("gy", "gx"), fill_invalid(m))
