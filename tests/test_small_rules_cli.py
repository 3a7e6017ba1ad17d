"""Small rules of the CLI, calibration and prediction that other tests left open (found by mutating
lsfov one change at a time): option handling, checked by spying on the API call a command makes or
on the check before it, and the attributes a calibrated operator records; tiny inputs."""
import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import simulate as sim


class _Stop(Exception):
    """Raised by a spy once it has seen its call: the command ends there, no work is done."""


def _spy(monkeypatch, module, name, seen):
    def spy(*args, **kwargs):
        seen.append(kwargs)
        raise _Stop()

    monkeypatch.setattr(module, name, spy)


def test_bss_takes_weights_of_zero(run, tmp_path):
    """--gamma1 0 / --gamma2 0 are weights >= 0 (no sparsity or no smoothness): accepted, the run goes on
    to read the subspace (here missing), where a negative one is refused before."""
    np.save(tmp_path / "b.npy", np.ones((64, 64), np.float32))
    for opt in ("--gamma1", "--gamma2"):
        res = run("bss", "b.npy", "o.zarr", "--subspace", "nothing.zarr", opt, 0, ok=False)
        assert res.exit_code == 1 and "must be a weight" not in res.output, res.output
        assert "nothing.zarr" in res.output, res.output


def test_train_passes_the_seed_given_and_none_otherwise(run, tmp_path, monkeypatch):
    """`train DATA OUT --seed N` seeds the run with N; without --seed the API picks (None), the default
    0 being the synthesis's seed, not a training's."""
    pytest.importorskip("torch")
    import lsfov.estimate

    seen = []
    _spy(monkeypatch, lsfov.estimate, "train", seen)
    run("train", "tr.zarr", "a.pt", "--seed", 4, ok=False)
    run("train", "tr.zarr", "b.pt", ok=False)
    assert [k["seed"] for k in seen] == [4, None]


def test_run_passes_its_calibration_and_records_it(run, tmp_path, monkeypatch):
    """`run --calibration CAL` hands the calibration to the blind pipeline and names it in the result's
    attributes (a depth in µm says which calibration made it); without it, none is recorded."""
    pytest.importorskip("torch")
    import lsfov.cli
    import lsfov.estimate.depth

    cal = object()
    monkeypatch.setattr(lsfov.estimate.depth.DepthCalibration, "load", classmethod(lambda cls, path: cal))
    given = []

    def blind(img, work, model, **kw):  # no map, no deconvolution: the raw image only
        given.append(kw["calibration"])
        return xr.Dataset({"raw": img}), {"deconvolution": 0.0}

    monkeypatch.setattr(lsfov.cli, "_blind", blind)
    np.save(tmp_path / "y.npy", np.ones((64, 64), np.float32))
    (tmp_path / "cal.json").write_text("{}")
    run("-q", "run", "y.npy", "r.zarr", "--calibration", "cal.json")
    run("-q", "run", "y.npy", "s.zarr")
    assert given == [cal, None]
    assert lsfov.open_result(tmp_path / "r.zarr").attrs["calibration"] == str(tmp_path / "cal.json")  # (absolute)
    assert "calibration" not in lsfov.open_result(tmp_path / "s.zarr").attrs


def test_run_and_estimate_with_max_saturated_1_censor_no_pixel_of_a_gpu_copy(run, tmp_path, monkeypatch):
    """`run` and `estimate --max-saturated 1` (an image stretched to its type's range) pass no camera
    level to the pipeline even where they work on a copy of the image (--gpu: the API cannot read the
    type's range from a float32 GPU copy, so the CLI says "none" itself); without it, the camera's
    level. (A map's level is what `deconvolve --psf-map` then clips at.)"""
    pytest.importorskip("torch")
    import lsfov.cli

    monkeypatch.setattr(lsfov.cli, "_on_gpu", lambda img, gpu, scheduler: img.copy())  # a copy, as --gpu makes
    given = []

    def blind(img, work, model, **kw):
        given.append(kw["saturation"])
        return xr.Dataset({"raw": img}), {"deconvolution": 0.0}

    monkeypatch.setattr(lsfov.cli, "_blind", blind)
    np.save(tmp_path / "y.npy", np.full((64, 64), 100, np.uint16))
    run("-q", "run", "y.npy", "r.zarr", "--max-saturated", 1)
    run("-q", "run", "y.npy", "s.zarr")
    assert given == [False, 65535]

    def psf_map(work, model, **kw):
        given.append(kw["saturation"])
        raise SystemExit(0)  # what the map is does not matter here

    monkeypatch.setattr(lsfov.estimate.mapping, "estimate_psf_map", psf_map)
    given.clear()
    run("-q", "estimate", "y.npy", "m.zarr", "--max-saturated", 1)
    run("-q", "estimate", "y.npy", "n.zarr")
    assert given == [False, 65535]


def test_a_calibrated_operator_counts_the_beads_it_rejected():
    """calibrate_operator's attrs: n_rejected is the detected beads that were not used (n_detected - n_beads)."""
    image = sim.bead_stack(1, (192, 192), seed=3)[0].image
    op, pos = lsfov.calibrate_operator(image, 3, return_positions=True)
    a = op.attrs
    assert a["n_beads"] == len(pos) > 0
    assert a["n_rejected"] == a["n_detected"] - a["n_beads"] >= 0


def test_a_symmetrized_prediction_is_the_mean_over_the_eight_symmetries():
    """predict(symmetrize=True) of a G1 model averages the network's readings of the 8 rotations and
    flips of each patch: for an isotropic width (linear in the outputs, left unchanged by a symmetry)
    that is the mean of the 8 plain predictions."""
    torch = pytest.importorskip("torch")
    from lsfov.estimate import model as M
    from lsfov.estimate import synthesize

    reg = lsfov.load_model("G1", device="cpu")
    x = torch.from_numpy(np.ascontiguousarray(synthesize(4, "G1", split="test", seed=0, progress=False)["patches"][:4]))
    each = np.mean([reg.predict(M.transform_patches(x, *g))["sigma"] for g in M.D4], axis=0)
    lo, hi = reg.ranges["sigma"]
    assert ((each > lo + 0.1) & (each < hi - 0.1)).all()  # inside the range: no clipping in the mean
    np.testing.assert_allclose(reg.predict(x, symmetrize=True)["sigma"], each, rtol=1e-4, atol=1e-4)


def test_a_reproducible_prediction_runs_every_pass_on_a_full_batch():
    """predict(reproducible=True) pads the last pass to batch_size (its rounding then does not depend
    on how many patches share it); the padding's outputs are dropped."""
    pytest.importorskip("torch")
    from lsfov.estimate.model import PSFRegressor, model_path

    reg = PSFRegressor.from_file(model_path("G1"), device="cpu")  # an instance of its own, not the cache's
    sizes, real = [], reg._pass
    reg._pass = lambda x: sizes.append(len(x)) or real(x)
    x = np.random.default_rng(0).random((5, reg.patch, reg.patch)).astype(np.float32)
    out = reg.predict(x, batch_size=4, reproducible=True)
    assert sizes == [4, 4] and out["sigma"].shape == (5,)
    sizes.clear()
    reg.predict(x, batch_size=4)
    assert sizes == [4, 1]
