"""`lsfov.blind_deconvolve`: the whole blind job of paper 000 in one call (what `lsfov run` does)."""
import dask.array as da
import numpy as np
import pytest

import lsfov
from lsfov import simulate

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tilted():
    return simulate.tilted_surface((384, 384), depth_range_um=(-6, 6), texture="immunohistochemistry", grid=4,
                                   photons=2000.0, seed=3)


def test_blind_deconvolve_is_its_stages_composed(tilted, tmp_path):
    img = tilted.image
    cal = lsfov.calibrate_depth(lsfov.estimate_psf_map(img, "Z3"), tilted.depth_um)
    ds = lsfov.blind_deconvolve(img, "Z3", iterations=4, calibration=cal, pixel_um=0.2)
    psf_map = lsfov.estimate_psf_map(img, "Z3", pixel_um=0.2)
    op = lsfov.operator_from_psf_map(psf_map)
    np.testing.assert_array_equal(ds.deblurred.values, lsfov.deconvolve(img, op, 4))
    for v in ("focus", "astigmatism", "axis", "validity", "filled"):
        np.testing.assert_array_equal(ds[v].values, psf_map[v].values)
    assert ds.filled.dtype == psf_map.filled.dtype == bool  # as the map's (0/1 in a file, bool read back)
    np.testing.assert_array_equal(ds.depth.values, lsfov.estimate_depth(psf_map, cal).values)
    # The calibration's JSON file serves as well as the object, here and for estimate_depth.
    cal.save(tmp_path / "cal.json")
    np.testing.assert_array_equal(lsfov.estimate_depth(psf_map, str(tmp_path / "cal.json")).values, ds.depth.values)
    again = lsfov.blind_deconvolve(img, "Z3", iterations=1, calibration=tmp_path / "cal.json", pixel_um=0.2)
    assert ds.depth.attrs["smooth"] == cal.smooth  # the smoothing applied
    np.testing.assert_array_equal(again.depth.values, ds.depth.values)
    assert ds.depth.attrs["units"] == "micrometer" and ds.x.attrs["units"] == "micrometer"
    assert ds.x.values[1] == pytest.approx(0.2) and ds.gx.values[0] == pytest.approx(63.5 * 0.2)
    assert set(ds.attrs["seconds"]) == {"PSF map", "operator", "deconvolution"}
    # Saved, it is one result; its operator comes back from it.
    ds.attrs.pop("seconds")
    lsfov.save(ds, tmp_path / "r.zarr")
    res = lsfov.open_result(tmp_path / "r.zarr")
    np.testing.assert_array_equal(lsfov.operator_from_psf_map(res).kernels, op.kernels)


@pytest.mark.parametrize("model", ["G1", "Z1"])
def test_a_model_without_astigmatism_deblurs_and_gives_no_depth(tilted, model):
    img = tilted.image[:256, :256]
    ds = lsfov.blind_deconvolve(img, model, iterations=3)
    psf_map = lsfov.estimate_psf_map(img, model)
    np.testing.assert_array_equal(ds.deblurred.values, lsfov.deconvolve(img, lsfov.operator_from_psf_map(psf_map), 3))
    params = lsfov.load_model(model).params
    assert set(ds.data_vars) == {"deblurred", *params, "validity", "filled"}  # no depth, no products
    for p in params:
        np.testing.assert_array_equal(ds[p].values, psf_map[p].values)


def test_blind_deconvolve_chunked_equals_whole(tilted, tmp_path, monkeypatch):
    """Chunked, the job is the whole array's; through a scratch store the operator's kernels are
    rendered there and read by the block tasks (a slide's map holds gigabytes of them), with the
    same result, bit for bit, and a resumed run finds them again."""
    from lsfov import operators

    img = tilted.image
    whole = lsfov.blind_deconvolve(img, "Z3", iterations=3)
    lazy = lsfov.blind_deconvolve(da.from_array(img, chunks=(200, 150)), "Z3", iterations=3)
    assert isinstance(lazy.deblurred.data, da.Array)
    np.testing.assert_allclose(lazy.deblurred.values, whole.deblurred.values, atol=1e-5 * float(whole.deblurred.max()))
    np.testing.assert_allclose(lazy.focus.values, whole.focus.values, atol=1e-4)
    assert whole.depth.attrs["units"].startswith("wave")  # uncalibrated: the signed defocus
    made = []
    real = operators.ProductConvolution.from_grid.__func__
    monkeypatch.setattr(operators.ProductConvolution, "from_grid",
                        classmethod(lambda cls, k, *a, **kw: made.append(operators.on_disk(k)) or real(cls, k, *a, **kw)))
    written = []
    for resume in (False, True):
        kept = lsfov.blind_deconvolve(da.from_array(img, chunks=(200, 150)), "Z3", iterations=3, scratch=tmp_path,
                                      resume=resume)
        np.testing.assert_array_equal(kept.deblurred.values, lazy.deblurred.values)
        (store,) = tmp_path.glob("lsfov-kernels-*")
        written.append(sorted((p.name, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()))
    assert made == [True, True]
    assert written[0] == written[1] and written[0]  # found again, not rendered again


@pytest.mark.filterwarnings("ignore:.*PSF-map nodes are marked invalid:lsfov.LsfovWarning")
@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_blind_deconvolve_censors_at_the_maps_saturation_level(tilted):
    """The deconvolution takes the map's saturation rule: the camera's clip (here uint16's) by default,
    none when ``max_saturated=1`` says the image is stretched to its type's range."""
    img = tilted.image
    x = np.minimum(img / np.percentile(img, 99) * 65535, 65535).astype(np.uint16)  # the brightest 1 % clip
    for kw, level in (({}, 65535), ({"max_saturated": 1}, False)):
        ds = lsfov.blind_deconvolve(x, "Z3", iterations=20, **kw)
        op = lsfov.operator_from_psf_map(ds)
        np.testing.assert_array_equal(ds.deblurred.values, lsfov.deconvolve(x, op, 20, saturation=level), str(kw))
        other = lsfov.deconvolve(x, op, 20, saturation=65535 if level is False else False)
        assert np.abs(other - ds.deblurred.values).max() > 1e-3 * float(ds.deblurred.max())  # the rule matters


@pytest.mark.filterwarnings("ignore:.*PSF-map nodes are marked invalid:lsfov.LsfovWarning")
@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_a_level_given_is_censored_at_whatever_the_maps_rule(tilted):
    """``saturation=`` given: the deconvolution censors at it, even with the map's rule off
    (``max_saturated=1``), and the map records it; ``False``: nowhere. The level is the result's
    ``censored_at``."""
    x = np.minimum(tilted.image / np.percentile(tilted.image, 99) * 4095, 4095).astype(np.uint16)
    ds = lsfov.blind_deconvolve(x, "Z3", iterations=10, saturation=3000, max_saturated=1)
    op = lsfov.operator_from_psf_map(ds)
    # The map's rule off (no node made invalid), the level given recorded and censored at
    assert ds.attrs["max_saturated"] == 1 and ds.attrs["saturation"] == 3000 and ds.attrs["censored_at"] == 3000
    np.testing.assert_array_equal(ds.validity.values, lsfov.estimate_psf_map(x, "Z3", max_saturated=1).validity.values)
    np.testing.assert_array_equal(ds.deblurred.values, lsfov.deconvolve(x, op, 10, saturation=3000))
    off = lsfov.blind_deconvolve(x, "Z3", iterations=10, saturation=False)
    assert off.attrs["saturation"] is None and off.attrs["censored_at"] is None
    np.testing.assert_array_equal(off.deblurred.values, lsfov.deconvolve(x, lsfov.operator_from_psf_map(off), 10,
                                                                         saturation=False))
    assert lsfov.blind_deconvolve(x, "Z3", iterations=1).attrs["censored_at"] == 65535  # its type's, by default


def test_blind_deconvolve_checks_before_any_work(tilted, monkeypatch):
    from lsfov.estimate import mapping

    called = []
    monkeypatch.setattr(mapping, "_regress", lambda *a, **k: called.append(1))
    cal = lsfov.estimate.DepthCalibration(axis0=2.3, slope=20.0, offset=0.0, r2=1.0, mae_um=0.0, n_nodes=9)
    img = tilted.image
    for kwargs, match in [
        (dict(iterations=0), "iterations must be"),
        (dict(tv=0.5), r"tv must be in \[0, 0.25\)"),
        (dict(model="G1", calibration=cal), "needs an astigmatic model"),
        (dict(calibration="cal.json"), "no such depth calibration: cal.json"),  # a path: read first
        (dict(calibration=3), "calibration must come from lsfov.calibrate_depth"),
        (dict(model="nope.pt"), "no model file"),
        (dict(pixel_um=-1), "pixel_um must be"),
        (dict(background=-1), "background .the camera's offset.* must be a finite number >= 0"),
        (dict(background=1e9), "background 1e.09 is at or above every pixel"),
        (dict(background=100, saturation=80), "the saturation level 80 is at or below background=100"),
    ]:
        with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
            lsfov.blind_deconvolve(img, **kwargs)
    with pytest.raises(ValueError, match="must be 2-D"):
        lsfov.blind_deconvolve(np.stack([img, img]))
    with pytest.raises(ValueError, match="at or above every pixel"):  # a lazy image: its largest pixel read
        lsfov.blind_deconvolve(da.from_array(img, chunks=128), background=1e9)
    assert not called


def test_a_calibration_of_maps_made_otherwise_is_said_before_the_work(tilted, count_calls):
    """A map made otherwise than the calibration's is warned about before the map and the deconvolution
    (their hours on a large image), once."""
    from lsfov.estimate import mapping

    img = tilted.image
    cal = lsfov.calibrate_depth(lsfov.estimate_psf_map(img, "Z3", pixel_um=0.2), tilted.depth_um)
    count_calls(mapping, "estimate_psf_map", fail_at=1, error=KeyboardInterrupt())
    with pytest.warns(UserWarning) as said, pytest.raises(KeyboardInterrupt):
        lsfov.blind_deconvolve(img, "Z3", stride=96, symmetrize=True, calibration=cal, pixel_um=0.25)
    messages = [str(w.message) for w in said]
    assert any("symmetrize=True, its depth calibration with symmetrize=False" in m for m in messages), messages
    assert any("stride 96 (calibration: 64), pixel_um 0.25 (calibration: 0.2)" in m for m in messages), messages
    count_calls(mapping, "estimate_psf_map")  # the real one again: the warnings come once, not again with the depth
    with pytest.warns(UserWarning) as said:
        lsfov.blind_deconvolve(img, "Z3", stride=96, iterations=1, calibration=cal, pixel_um=0.2)
    assert [str(w.message).split(":")[0] for w in said].count("this PSF map was made otherwise than its depth "
                                                              "calibration's") == 1


def test_a_file_name_for_an_image_says_to_open_it():
    # it once said "image must be 2-D (y, x), got shape ()"
    with pytest.raises(TypeError, match="got the file name 'foo.tif'; open it with lsfov.open_image"):
        lsfov.blind_deconvolve("foo.tif")
