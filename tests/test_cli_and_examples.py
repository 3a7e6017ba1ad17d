import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import pytest
import tifffile

import lsfov

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_carries_what_runs_the_tests(tmp_path):
    """A source distribution runs its own tests: conftest.py's fixtures, the examples they run and the
    constraints that keep pip off the CUDA torch are in it (setuptools alone leaves them out)."""
    import tarfile

    build = pytest.importorskip("setuptools.build_meta")
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # setuptools builds the project of the working directory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = build.build_sdist(str(tmp_path))
    finally:
        os.chdir(cwd)
    with tarfile.open(tmp_path / name) as tar:
        files = {Path(*Path(m).parts[1:]).as_posix() for m in tar.getnames()}
    assert {"tests/conftest.py", "examples/quickstart.py", "constraints.txt", "Makefile", ".ci/run",
            "lsfov/models/Z3.pt", "lsfov/models/Z3.json"} <= files
    assert not any(f.startswith((".venv/", "build/")) or "__pycache__" in f for f in files)


def test_help(run):
    for cmd in ([], ["demo"], ["info"], ["simulate"], ["simulate", "beads"], ["simulate", "blur"], ["deconvolve"],
                ["train"], ["evaluate"], ["calibrate"], ["bss"], ["estimate"], ["depth"], ["run"]):
        assert "Usage" in run(*cmd, "--help").output
    assert "depth       Depth from astigmatism of a Z3 PSF map (paper 000 Sec. II-H)." in run("--help").output
    res = run("deconvolve", "-q", "a.tif", "o.zarr", ok=False)  # a global option after the command: say where it goes
    assert res.exit_code == 2 and "-q goes before the command, lsfov -q deconvolve ..." in res.output
    res = run("simulate", "blur", "-v", "a.tif", "o.zarr", ok=False)  # once, with the whole command
    said = res.output.strip().splitlines()[-1]  # (click 8.4 quotes the option; earlier ones add a colon)
    assert re.search(r"No such option(: -v| '-v'): -v goes before the command, lsfov -v simulate blur \.\.\.$", said)
    res = run("calibrate", "beads.tif", ok=False)  # one path: OUT is what is missing, not the bead images
    assert res.exit_code == 2 and "give the bead image(s) and then OUT: lsfov calibrate beads.tif OUT" in res.output
    assert "calibrate [OPTIONS] BEADS... OUT" in res.output


def test_demo_writes_result_and_figure(run, tmp_path):
    # 512² (7 x 7 nodes, 2 x 2 chunks of 256): a depth map fine enough to judge, ~3 s more than 256² in 128² chunks.
    # On its default scheduler, a local cluster of 2 workers (the threaded and synchronous ones below).
    res = run("-q", "demo", "--size", 512, "--chunks", 256, "--out", "d.zarr")
    snr_raw, snr_blind, snr_true = (float(v) for v in re.findall(r"(-?[\d.]+) dB", res.output))
    assert snr_true > snr_blind > snr_raw  # 19.3 > 18.9 > 17.7 dB here: the blind map deblurs
    for stage in ("simulate sample", "depth calibration", "PSF map", "operator", "deconvolution + writing"):
        assert re.search(rf"{re.escape(stage)}.* [\d.]+ s", res.output), stage  # each stage's time
    assert "result: d.zarr" in res.output and "figure: d.png" in res.output and "napari: d.zarr/deblurred" in res.output
    mae, span = (float(v) for v in re.search(r"depth: mean absolute error ([\d.]+) µm over a ([\d.]+) µm", res.output).groups())
    # 0.86 µm over 11.8 here; the best constant depth (a broken depth stage) is off by 2.6 µm
    assert mae < 0.15 * span
    ds = lsfov.open_result(tmp_path / "d.zarr")
    assert 0.5 * span < float(np.ptp(ds.depth.values)) < 2 * span  # 15.8 µm here: the map follows the tilt
    assert {"raw", "sharp", "deblurred", "focus", "astigmatism", "axis", "validity", "depth"} <= set(ds.data_vars)
    assert ds.raw.shape == (512, 512) and ds.focus.shape == (7, 7)
    assert ds.depth.attrs["calibration"]["pixel_um"] == ds.raw.attrs["pixel_um"]  # a map of other pixels is told
    assert (tmp_path / "d.png").stat().st_size > 10_000
    again = run("demo", "--size", 256, "--out", "d.zarr", ok=False)
    assert again.exit_code == 1 and "--overwrite" in again.output
    for scheduler in ("threads", "synchronous"):
        run("-q", "demo", "--size", 512, "--chunks", 512, "--out", "d.zarr", "--overwrite", "--scheduler", scheduler)


def test_simulate_beads_blur_and_info(run, tmp_path, lsfov_log):
    res = run("simulate", "beads", "b.zarr", "--size", 128, "--grid", 3, "--seed", 1)
    assert "beads" in res.output
    ds = lsfov.open_result(tmp_path / "b.zarr")
    assert ds.image.shape == (128, 128) and ds.depth.shape == (3, 3)
    assert ds.image.x.attrs["units"] == "micrometer"
    info = run("info", "b.zarr").output
    assert "lsfov result (complete)" in info and "image: shape (128, 128)" in info
    np.save(tmp_path / "sharp.npy", np.random.default_rng(0).random((96, 120)).astype(np.float32))
    run("simulate", "blur", "sharp.npy", "blurred.zarr", "--model", "G2", "--grid", 2)
    out = lsfov.open_result(tmp_path / "blurred.zarr")
    assert out.blurred.shape == (96, 120) and set(out.data_vars) >= {"sigma_y", "sigma_x"}
    # what made them is recorded, and they are read as images by the next command
    assert out.attrs["command"] == "lsfov simulate blur" and (out.attrs["model"], out.attrs["seed"]) == ("G2", 0)
    assert lsfov.open_result(tmp_path / "b.zarr").attrs["command"] == "lsfov simulate beads"
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "blurred.zarr").values, out.blurred.values)
    assert "image: shape (96, 120)" in run("info", "sharp.npy").output
    # The true blur is a PSF map: the operator it gives is the one that blurred, and it deblurs as one;
    # on a crop's coordinates too (its nodes lie where the crop is)
    um = {"units": "micrometer"}
    crop = xr.DataArray(np.load(tmp_path / "sharp.npy"), dims=("y", "x"), name="image",
                        coords={"y": ("y", 2012.7 + 0.5 * np.arange(96), um), "x": ("x", 0.5 * np.arange(120), um)})
    lsfov.save(crop, tmp_path / "crop.zarr")
    run("simulate", "blur", "crop.zarr", "cb.zarr", "--model", "G2", "--grid", 2)
    true_op, _ = lsfov.simulate.psf_field((96, 120), "G2", (2, 2), seed=0)
    truth = lsfov.open_result(tmp_path / "cb.zarr")
    np.testing.assert_allclose(truth.gy.values, 2012.7 + 0.5 * true_op.centers[0])
    op = lsfov.operator_from_psf_map(truth)
    np.testing.assert_allclose(op.kernels, true_op.kernels, atol=1e-6)
    for a, b in zip(op.centers, true_op.centers):
        np.testing.assert_allclose(a, b, atol=1e-9)
    with lsfov_log() as said:  # (its source is the sharp image: not another image's map)
        for src in ("cb.zarr", "cb.zarr/blurred"):
            run("deconvolve", src, "d.zarr", "--psf-map", "cb.zarr", "--iterations", 2, "--overwrite")
        assert not any("PSF map" in m for m in said), said
        run("deconvolve", "crop.zarr", "d.zarr", "--psf-map", "cb.zarr", "--iterations", 1, "--overwrite")
    assert any("was read from cb.zarr/blurred, not from crop.zarr" in m for m in said), said
    # a pupil model's PSFs are its microscope's: the result is at its pixel size (another one said so)
    run("simulate", "blur", "sharp.npy", "z.zarr", "--model", "Z1", "--grid", 2)
    assert lsfov.open_image(tmp_path / "z.zarr").attrs["pixel_um"] == pytest.approx(lsfov.psf.MODELS["Z1"].optics.pixel_um)
    tifffile.imwrite(tmp_path / "half.ome.tif", np.random.default_rng(1).random((96, 120)).astype(np.float32),
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with pytest.warns(lsfov.LsfovWarning, match="has 0.5 µm pixels but Z1's PSFs are those of 0.2 µm pixels"):
        run("simulate", "blur", "half.ome.tif", "z5.zarr", "--model", "Z1", "--grid", 2)
    assert lsfov.open_image(tmp_path / "z5.zarr").attrs["pixel_um"] == pytest.approx(0.2)
    # A 1x1 grid: its node covers the image in napari (NGFF scale: the cell, 96 x 0.2 µm and
    # 120 x 0.2 µm; once 1 µm, a dot at the centre)
    run("simulate", "blur", "sharp.npy", "one.zarr", "--model", "Z1", "--grid", 1)
    run("simulate", "beads", "b1.zarr", "--size", 128, "--grid", 1, "--pixel-um", 0.1)
    for path, var, cell in (("one.zarr", "focus", [19.2, 24.0]), ("b1.zarr", "depth", [12.8, 12.8])):
        ome = json.loads((tmp_path / path / var / "zarr.json").read_text())["attributes"]["ome"]
        scale, shift = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        half_px = 0.1 if path == "one.zarr" else 0.05  # (the node at the image's centre, pixel centres from 0)
        assert scale["scale"] == cell and shift["translation"] == pytest.approx([c / 2 - half_px for c in cell])


def test_cli_bad_input_gives_one_line_and_exit_1(run, tmp_path):
    cases = [
        (["info", "nope.zarr"], "no such file"),
        (["simulate", "blur", "nope.tif", "o.zarr"], "no such file"),
        (["demo", "--scheduler", "carrier-pigeon", "--size", 512], "unknown scheduler"),
        (["simulate", "beads", "x.zarr", "--size", 20], "too small"),
    ]
    np.save(tmp_path / "nan.npy", np.full((40, 40), np.nan, np.float32))
    cases.append((["simulate", "blur", "nan.npy", "o.zarr"], "NaN"))
    np.save(tmp_path / "stack.npy", np.zeros((3, 40, 40), np.float32))
    cases.append((["simulate", "blur", "stack.npy", "o.zarr"], "--z"))
    for args, msg in cases:
        res = run(*args, ok=False)
        assert res.exit_code == 1, (args, res.output)
        assert msg in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "o.zarr").exists()


def test_cli_scratch_puts_the_state_of_a_run_where_asked(run, tmp_path, monkeypatch):
    """On a cluster the state of a run (what --resume continues) goes where every worker reaches it."""
    from lsfov.estimate import mapping

    seen = []

    def dies(*a, **k):  # the first task of the map: where is the run's state?
        seen.append(({p.name for p in (tmp_path / "fast").glob(".o.zarr.*.scratch")}, (tmp_path / ".o.zarr.scratch").exists()))
        raise RuntimeError("node lost")

    monkeypatch.setattr(mapping, "_regress", dies)
    np.save(tmp_path / "img.npy", (lsfov.simulate.sample_image("coins", (256, 256)) * 500 + 20).astype(np.float32))
    Path("job2").mkdir()
    for cmd, out, scratch in (("estimate", "o.zarr", ["--scratch", "fast"]), ("run", "o.zarr", ["--scratch", "fast"]),
                              ("estimate", "job2/o.zarr", ["--scratch", "fast"]), ("estimate", "o.zarr", [])):
        res = run(cmd, "img.npy", out, *scratch, ok=False)
        assert res.exit_code == 1 and "node lost" in str(res.exception or res.output)
    # a shared scratch holds each output's state apart (job2/o.zarr is another o.zarr); the default: beside OUT
    (first, _), (again, _), (job2, _), (none, beside) = seen
    assert len(first) == 1 and again == first and len(job2) == 1 and job2 != first and not none and beside


def test_cli_removes_the_scratch_folder_it_made(run, tmp_path, monkeypatch):
    """A --scratch folder made for a run goes with its state when the run ends; one that was there,
    or holds another job's state, stays."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "img.npy", (rng.random((64, 64)) * 100 + 10).astype(np.float32))
    psf = np.zeros((5, 5), np.float32)
    psf[1:4, 1:4] = 1 / 9
    np.save(tmp_path / "psf.npy", psf)
    (tmp_path / "kept").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / ".other.zarr.1234abcd.scratch").mkdir()  # another job's, still running
    for i, scratch in enumerate(("new/deep", "kept", "shared")):
        run("-q", "deconvolve", "img.npy", f"o{i}.zarr", "--psf", "psf.npy", "--iterations", 2, "--scratch", scratch)
    assert not (tmp_path / "new").exists()
    assert list((tmp_path / "kept").iterdir()) == []
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [".other.zarr.1234abcd.scratch"]
    from lsfov import cluster

    monkeypatch.setattr(cluster, "_CONNECT_TIMEOUT", "0.5s")  # refused after the state is made, before any work
    res = run("deconvolve", "img.npy", "o9.zarr", "--psf", "psf.npy", "--scratch", "new/x", "--scheduler",
              "tcp://127.0.0.1:1", ok=False)
    assert res.exit_code == 1 and "cannot reach" in res.output and not (tmp_path / "new").exists()


def test_cli_checks_options_and_outputs_before_any_work(run, tmp_path, monkeypatch):
    """Options, outputs and the model are checked first: a refusal costs no PSF map, leaves no
    state, and says nothing about resuming (there is nothing to resume)."""
    from lsfov.estimate import mapping

    called = []
    monkeypatch.setattr(mapping, "_regress", lambda *a, **k: called.append(1))
    img = lsfov.simulate.sample_image("coins", (256, 256)) * 500 + 20
    np.save(tmp_path / "img.npy", img.astype(np.float32))
    (tmp_path / "afile.zarr").write_text("not a result")
    cases = [
        (["estimate", "img.npy", "o.zarr", "--chunks", 0], "--chunks 0 is too small"),
        (["run", "img.npy", "o.zarr", "--chunks", -5], "--chunks -5 is too small"),
        (["demo", "--size", 512, "--chunks", 0], "--chunks 0 is too small"),
        (["demo", "--size", 256], "at least 512"),
        (["estimate", "img.npy", "o.zarr", "--figure", "o.zarr"], "is the result OUT"),
        (["estimate", "img.npy", "o.zarr", "--figure", "o.zarr/map.png"], "is inside the result OUT; write it beside "
                                                                         "OUT, e.g. o.png"),
        (["run", "img.npy", "o.zarr", "--iterations", -1], "--iterations -1"),
        (["run", "img.npy", "o.zarr", "--tv", 0.5], "--tv 0.5"),
        (["run", "img.npy", "o.zarr", "--model", "nope.pt"], "no model file"),
        (["estimate", "img.npy", "o.zarr", "--pixel-um", 0], "--pixel-um 0"),
        (["estimate", "img.npy", "o.zarr", "--pixel-um", -1], "--pixel-um -1"),
        (["simulate", "beads", "o.zarr", "--pixel-um", 1e-300], "--pixel-um 1e-300 is no microscope's pixel size"),
        (["estimate", "img.npy", "o.tif"], "name it o.zarr"),
        (["simulate", "blur", "img.npy", "o.npy"], "name it o.zarr"),
        (["estimate", "img.npy", "afile.zarr", "--overwrite"], "is a file, not a result"),
        (["depth", "m.zarr", "o.zarr", "--calibration", "nope.json"], "no such depth calibration"),
        (["depth", "m.zarr", "o.zarr", "--method", "linear"], "--method linear chooses how --known fits"),
        (["depth", "m.zarr", "o.zarr", "--calibration", "adir"], "adir is a directory, not a depth calibration"),
        (["depth", "m.zarr", "c.json", "--known", "img.npy", "--calibration", "c0.json"], "give one of them"),
        (["deconvolve", "img.npy", "o.zarr", "--psf", "img.npy", "--iterations", 0], "--iterations 0"),
        (["deconvolve", "img.npy", "o.zarr", "--psf", "img.npy", "--pixel-um", -2], "--pixel-um -2"),
        (["evaluate", "nope.pt", "--robustness", 5], "no model file"),
        (["train", "--synthesize", 8, "set.pt"], "a training set is a zarr store; name it set.zarr"),
        (["evaluate", "Z3", "--robustness", -3], "--robustness -3"),
        (["train", "data.zarr", "m.pt", "--resume"], "nothing to resume"),
        (["train", "--synthesize", 8, "--epochs", 2, "--init", "Z3", "s.zarr"],
         "--epochs, --init set up a training; --synthesize only writes a set"),
        (["train", "nothere.zarr", "m.pt"], "no training set at nothere.zarr"),
        (["train", "--stream", 32, "side.pt", "--batch-size", 16, "--arch", "compact"], "side.json already exists"),
    ]
    (tmp_path / "side.json").write_text("{}")  # someone's file where the model's metadata would go
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("someone's data")
    cases += [  # an input, or a folder that is no result, is never what --overwrite replaces
        (["estimate", "img.npy", "img.npy", "--overwrite"], "is the input"),
        (["estimate", "img.npy", "o.zarr", "--figure", "img.npy", "--overwrite"], "is the input"),
        (["run", "img.npy", "o.zarr", "--figure", "adir"], "already exists"),
        (["run", "img.npy", "o.zarr", "--figure", "adir", "--overwrite"], "not an lsfov result"),
        (["deconvolve", "img.npy", ".", "--psf", "img.npy", "--overwrite"], "is the input"),
        (["estimate", "img.npy", "adir", "--overwrite"], "not an lsfov result or zarr store"),
        (["depth", "m.zarr", "adir", "--known", "img.npy", "--overwrite"], "a depth calibration is a JSON file"),
        (["depth", "m.zarr", "adir.json", "--known", "img.npy", "--overwrite"], "not an lsfov result or zarr store"),
        (["estimate", "img.npy", "o.zarr", "--figure", "map.tif"], "figures are PNG, PDF or SVG files; name it map.png"),
        (["estimate", "img.npy", "o.zarr", "--model", "adir"], "adir is a directory, not a model file"),  # a folder
    ]
    (tmp_path / "adir.json").mkdir()
    (tmp_path / "adir.json" / "keep.txt").write_text("someone's data")
    (tmp_path / "cal.json").write_text(json.dumps({"type": "lsfov.DepthCalibration", "axis0": 2.3, "slope": 20.0,
                                                   "offset": 0.0, "r2": 1.0, "mae_um": 0.0, "n_nodes": 9}))
    (tmp_path / "nan.json").write_text((tmp_path / "cal.json").read_text().replace("2.3", "NaN"))
    cases.append((["depth", "m1.zarr", "d.zarr", "--calibration", "nan.json"],
                  "nan.json: depth calibration axis0 must be a finite number"))
    cases.append((["run", "img.npy", "o.zarr", "--model", "G1", "--calibration", "cal.json"], "needs an astigmatic"))
    (tmp_path / "rob.png").write_bytes(b"a figure")
    cases.append((["evaluate", "Z3", "--robustness", 5, "--figure", "rob.png"], "--overwrite"))
    truth = {v: (("y", "x"), np.full((8, 8), 0.1, np.float32)) for v in ("focus", "astigmatism", "axis")}
    lsfov.save(xr.Dataset(truth), tmp_path / "truth.zarr")  # the true parameters, as `simulate blur` writes: no map
    cases.append((["depth", "truth.zarr", "d.zarr"], "depth reads a PSF map of the CNN"))
    cases += [  # a scratch inside OUT would be in the way of OUT, written whole at the end
        (["estimate", "img.npy", "o.zarr", "--scratch", "o.zarr"], "--scratch o.zarr is OUT or inside it"),
        (["run", "img.npy", "o.zarr", "--scratch", "o.zarr/tmp"], "--scratch o.zarr/tmp is OUT or inside it"),
        (["calibrate", "img.npy", "./img.npy", "o.zarr"], "./img.npy is given twice (as img.npy)"),
        (["calibrate", "b.zarr", "b.zarr/image", "o.zarr"], "b.zarr/image is the image b.zarr names (")]
    lsfov.save(np.load(tmp_path / "img.npy"), tmp_path / "b.zarr")  # a result and its variable: one image
    # What an input is instead, in the command's words (not the Python API's)
    lsfov.save(xr.Dataset({"sigma": (("gy", "gx"), np.ones((2, 2)))}, attrs={"psf_model": "G1"}), tmp_path / "m1.zarr")
    (tmp_path / "a.txt").write_text("notes")
    cases += [
        (["depth", "img.npy", "d.zarr"], "PSF_MAP img.npy is not a PSF map; make one with `lsfov estimate IMAGE MAP`"),
        (["deconvolve", "img.npy", "o.zarr", "--psf-map", "img.npy"], "--psf-map img.npy is not a PSF map"),
        (["deconvolve", "img.npy", "o.zarr", "--operator", "m1.zarr"], "m1.zarr is a PSF map, not an operator: give "
                                                                       "it as --psf-map"),
        (["estimate", "img.npy", "a.txt/sub/o.zarr"], "a.txt/sub/o.zarr: a.txt is a file, not a folder"),
        (["simulate", "blur", "img.npy", "o.zarr", "--grid", 300], "a grid of 300x300 nodes is finer than the 256x256 px"),
        # a plain file is never a result: --overwrite would not help, so it is not what the message offers
        (["estimate", "img.npy", "afile.zarr"], "afile.zarr is a file, not a result; remove it or choose another"),
        (["simulate", "beads", ".", "--overwrite"], ". is the current folder (or holds it)"),
        (["estimate", "", "o.zarr"], "an input path is empty"),
        (["deconvolve", "img.npy", "", "--psf", "img.npy"], "the output path is empty; name a new file or folder"),
        (["estimate", "img.npy", "o.zarr", "--scratch", "m1.zarr/tmp"], "--scratch m1.zarr/tmp is inside the zarr store"),
        # a bad --scheduler is said before the image is opened (here, before it is found missing)
        (["run", "nope.tif", "o.zarr", "--scheduler", "carrier-pigeon"], "unknown scheduler 'carrier-pigeon'"),
        (["deconvolve", "nope.tif", "o.zarr", "--psf", "p.npy", "--scheduler", "local:0"], "--scheduler local:0"),
        (["bss", "nope.tif", "o.zarr", "--subspace", "s.zarr", "--scheduler", "s.json"], "no such scheduler file"),
        (["calibrate", "nope.zarr", "o.zarr", "--scheduler", "tcp://node12"], "is malformed"),
    ]
    import torch

    if not torch.cuda.is_available():
        np.save(tmp_path / "tiny.npy", np.zeros(1))
        cases.append((["train", "--synthesize", 8, "--device", "cuda", "s.zarr"], "no CUDA GPU"))
    for args, msg in cases:
        res = run(*args, ok=False)
        assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, (args, res.output)
        assert "interrupted" not in res.output, (args, res.output)
    assert not called
    assert (tmp_path / "rob.png").read_bytes() == b"a figure"
    assert (tmp_path / "adir" / "keep.txt").read_text() == "someone's data" and (tmp_path / "img.npy").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("o.")]


def test_quiet_silences_warnings_for_its_command_only(run, tmp_path):
    import warnings

    before = list(warnings.filters)
    np.save(tmp_path / "img.npy", np.ones((40, 40), np.float32))
    run("-q", "info", "img.npy")
    assert warnings.filters == before
    with pytest.warns(UserWarning, match="still heard"):
        warnings.warn("still heard", UserWarning)


def test_a_second_run_of_an_output_is_refused_and_leaves_the_first_alone(run, tmp_path):
    """Two runs of one OUT (a job submitted twice): the second would discard the first's state as an
    earlier run's, or replace its result; it is refused, and the first's state is left as it was."""
    import socket

    np.save(tmp_path / "img.npy", np.ones((64, 64), np.float32))
    np.save(tmp_path / "psf.npy", np.ones((3, 3), np.float32))
    state = tmp_path / ".o.zarr.scratch" / "x1" / "done"
    state.mkdir(parents=True)
    (state / "0.0").write_text("the first run's work")
    (tmp_path / ".o.zarr.lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")  # that run, alive
    res = run("deconvolve", "img.npy", "o.zarr", "--psf", "psf.npy", ok=False)
    assert res.exit_code == 1 and "o.zarr is being written by another run" in res.output, res.output
    assert (state / "0.0").read_text() == "the first run's work" and not (tmp_path / "o.zarr").exists()
    (tmp_path / ".o.zarr.lock").unlink()  # it ended: the next run goes ahead (and starts afresh)
    run("-q", "deconvolve", "img.npy", "o.zarr", "--psf", "psf.npy", "--iterations", 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_damaged_tiff_is_one_line(run, tmp_path, caplog):
    # tifffile's own note on the file ("invalid offset to first page") would come before lsfov's error,
    # which says what it means: the command prints that one line; -vv lets tifffile's notes through.
    import tifffile

    tifffile.imwrite(tmp_path / "z.tif", np.zeros((64, 64), np.uint16))
    (tmp_path / "header.tif").write_bytes((tmp_path / "z.tif").read_bytes()[:8])
    for quiet in ([], ["-q"]):
        res = run(*quiet, "info", "header.tif", ok=False)
        assert res.output.strip() == "Error: header.tif: no image in this TIFF (empty, or its writing did not finish)"
    assert "invalid offset to first page" not in caplog.text
    run("-vv", "info", "header.tif", ok=False)
    assert "invalid offset to first page" in caplog.text


def test_damaged_zarr_stores_are_one_line_naming_the_array(run, tmp_path):
    """A chunk that no longer decodes (zarr reports a codec's error deep in a Dask task) and an array
    gone from an operator or subspace store: one line each, never a traceback."""
    import shutil

    img = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    lsfov.save(img, "im.zarr")
    op = lsfov.ProductConvolution.from_grid(lsfov.psf.gaussian(1.5, 1.5, size=9)[None, None], img.shape)
    op.save("op.zarr")
    op.save("bad-op.zarr")
    Path("bad-op.zarr/kernels/c/0/0/0/0").write_bytes(b"x")
    for args, where in ((["info", "bad-op.zarr"], "bad-op.zarr/kernels"),
                        (["deconvolve", "im.zarr/image", "d.zarr", "--operator", "bad-op.zarr"], "bad-op.zarr/kernels")):
        res = run(*args, ok=False)
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert where in res.output and "cannot be decoded" in res.output and "damaged" in res.output
    next(Path("im.zarr/image/0").rglob("c/*/*")).write_bytes(b"x")  # the image's one chunk
    res = run("-q", "deconvolve", "im.zarr/image", "d.zarr", "--operator", "op.zarr", "--iterations", 1, ok=False)
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "im.zarr/image/0: a chunk cannot" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not Path("d.zarr").exists()
    assert "file://" not in res.output
    # An uncompressed chunk cut short fails to reshape (a ValueError): the same line.
    import zarr

    raw = zarr.create_array("raw.zarr", shape=(96, 96), chunks=(96, 96), dtype="f4", compressors=None)
    raw[:] = 1.0
    Path("raw.zarr/c/0/0").write_bytes(Path("raw.zarr/c/0/0").read_bytes()[:1000])
    res = run("-q", "deconvolve", "raw.zarr", "d.zarr", "--operator", "op.zarr", "--iterations", 1, ok=False)
    assert res.output.startswith(f"Error: {Path('raw.zarr').resolve()}: a chunk cannot be decoded (ValueError: ")
    # Any other error is left as it is (a write's, the file system's, a bug's).
    from lsfov.cli import _damaged_zarr

    for e in (RuntimeError("a bug"), OSError(28, "No space left on device")):
        try:
            raise e
        except Exception as caught:
            assert _damaged_zarr(caught) is None
    basis = lsfov.ProductConvolution.from_basis(lsfov.psf.gaussian(1.5, 1.5, size=9)[None], np.ones((1, 96, 96)))
    basis.save("basis.zarr")
    shutil.rmtree("basis.zarr/maps")
    with pytest.raises(ValueError, match="basis.zarr is damaged: its maps array is missing; save it again"):
        lsfov.ProductConvolution.load("basis.zarr")
    shutil.rmtree("op.zarr/centers_y")
    with pytest.raises(ValueError, match="op.zarr is damaged: its centers_y array is missing"):
        lsfov.ProductConvolution.load("op.zarr")


def test_cli_dark_image_is_refused_without_a_state_to_resume(run, tmp_path):
    """Every node invalid is found only after the map: said in one line, and no scratch state is
    kept (a --resume would meet the same image)."""
    np.save(tmp_path / "dark.npy", np.zeros((256, 256), np.float32))
    for cmd in ("estimate", "run"):
        res = run(cmd, "dark.npy", "o.zarr", "--model", "G1", ok=False)
        assert res.exit_code == 1 and "every node of the PSF map is invalid" in res.output, res.output
        assert "--resume" not in res.output and "Traceback" not in res.output, res.output
        assert not [p.name for p in tmp_path.iterdir() if p.name != "dark.npy"]


def test_info_describes_models_and_calibrations(run, tmp_path):
    lsfov.estimate.DepthCalibration(axis0=2.3, slope=21.5, offset=-0.4, r2=0.97, mae_um=0.3, n_nodes=49).save("c.json")
    assert "depth = 21.5 µm/wave" in run("info", "c.json").output
    out = run("info", "G2").output
    assert "PSFRegressor(G2" in out and "sigma_y 0.9" in out and "3000 patches" in out
    assert re.search(r"training: 750720 patches x 1 epoch\(s\), validation R² 0\.\d+, [\d.]+ min on cpu \(the last of "
                     r"\d stages\)", out)
    assert "no shipped model for Z2" in run("info", "Z2", ok=False).output
    (tmp_path / "x.json").write_text("{}")
    assert "is not a depth calibration" in run("info", "x.json", ok=False).output
    # A model's metadata file describes its model; an untested model says so.
    from lsfov.estimate.model import PSFRegressor

    PSFRegressor(lsfov.psf.MODELS["G1"], "compact").save(tmp_path / "z1.pt")
    out = run("info", "z1.json").output
    assert out.startswith(f"{Path('z1.pt')}: PSFRegressor(G1") and "test set: not measured (lsfov evaluate)" in out
    # A result's table is a table, not an image; an HCS plate points at one field's image.
    lsfov.save(xr.Dataset({"sources": xr.DataArray(np.ones((3, 3)), dims=("source", "column"),
                                                   coords={"column": ["y", "x", "amplitude"]}, attrs={"units": "pixel"})}),
               tmp_path / "t.zarr")
    assert run("info", "t.zarr/sources").output.strip().splitlines() == [
        f"{Path('t.zarr/sources')}: a table of the result t.zarr", "  3 source(s); columns y, x, amplitude [pixel]"]
    import zarr

    zarr.open_group(str(tmp_path / "plate.zarr"), mode="w", zarr_format=3).attrs["ome"] = {
        "version": "0.5", "plate": {"wells": [{"path": "B/3", "rowIndex": 1, "columnIndex": 2}]}}
    assert (f"plate.zarr is an OME-Zarr plate (HCS), not one image; give one field of view's image, e.g. "
            f"{Path('plate.zarr/B/3/0')}") in run("info", "plate.zarr", ok=False).output
    zarr.open_group(str(tmp_path / "well.zarr"), mode="w", zarr_format=3).attrs["ome"] = {
        "version": "0.5", "well": {"images": [{"path": "0"}]}}
    assert f"e.g. {Path('well.zarr/0')}" in run("info", "well.zarr", ok=False).output


def test_cli_reads_what_microscopes_write(run, tmp_path, blurred):
    """A 3-D PSF (its in-focus plane), an off-centre PSF (warned), `info` on a multi-channel stack,
    stores that are not PSF maps or images named for what they are."""
    import tifffile

    y, op = blurred
    k = op.kernels[0, 0] / op.kernels[0, 0].sum()
    stack = np.stack([0.3 * k, k, 0.5 * k])  # the brightest plane is the middle one
    tifffile.imwrite(tmp_path / "psf3d.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    run("-q", "deconvolve", "y.npy", "s.zarr", "--psf", "psf3d.tif", "--iterations", 2)
    one = lsfov.ProductConvolution.from_grid(k[None, None], y.shape)
    np.testing.assert_allclose(lsfov.open_result(tmp_path / "s.zarr").deblurred.values,
                               lsfov.deconvolve(y, one, 2), atol=1e-5 * y.max())
    np.save(tmp_path / "off.npy", np.roll(k, 4, axis=1))
    with pytest.warns(lsfov.LsfovWarning, match=r"centre of mass is \(\+0.0, \+3.\d\) px"):
        run("deconvolve", "y.npy", "off.zarr", "--psf", "off.npy", "--iterations", 1)
    # a camera's PSF with its offset left in: the floor would be taken for blur
    tifffile.imwrite(tmp_path / "cam.tif", (k / k.max() * 5000 + 500).astype(np.uint16))
    with pytest.warns(lsfov.LsfovWarning, match="background .camera offset. left in it"):
        run("deconvolve", "y.npy", "cam.zarr", "--psf", "cam.tif", "--iterations", 1)
    # (3, K, K) as tifffile writes it without axes: RGB. Not the image's --channel, which IN has none of.
    tifffile.imwrite(tmp_path / "psf_rgb.tif", stack.astype(np.float32), photometric="rgb", planarconfig="separate")
    res = run("deconvolve", "y.npy", "rgb.zarr", "--psf", "psf_rgb.tif", ok=False)
    assert "psf_rgb.tif: a PSF of 3 channels (or a z-stack that tifffile stored as an RGB image: write it with " \
           "photometric='minisblack')" in res.output and "Traceback" not in res.output, res.output
    tifffile.imwrite(tmp_path / "psf_zyx.tif", stack.astype(np.float32), photometric="minisblack")  # as it says
    run("-q", "deconvolve", "y.npy", "zyx.zarr", "--psf", "psf_zyx.tif", "--iterations", 2)
    np.testing.assert_allclose(lsfov.open_result(tmp_path / "zyx.zarr").deblurred.values,
                               lsfov.open_result(tmp_path / "s.zarr").deblurred.values, atol=1e-5 * y.max())
    tifffile.imwrite(tmp_path / "zcyx.tif", np.zeros((3, 2, 32, 32), np.uint16), imagej=True,
                     metadata={"axes": "ZCYX"})
    info = run("info", "zcyx.tif").output
    assert "shape (3, 2, 32, 32)" in info and "'z', 'c', 'y', 'x'" in info
    assert "operator" in run("info", "op.zarr").output
    # A PSF measured at other pixels than the image's is the wrong size: said, as for an operator
    tifffile.imwrite(tmp_path / "psf005.ome.tif", k, metadata={"axes": "YX", "PhysicalSizeX": 0.05,
                                                               "PhysicalSizeY": 0.05})
    with pytest.warns(lsfov.LsfovWarning, match="the PSF psf005.ome.tif has 0.05 µm pixels.*resample the image or "
                                                "the PSF"):
        run("deconvolve", "y.npy", "px.zarr", "--psf", "psf005.ome.tif", "--iterations", 1, "--pixel-um", 0.1)
    for args, msg in ((["--psf-map", "op.zarr"], "is an operator"), (["--psf", "op.zarr"], "is an operator"),
                      (["--psf-map", "s.zarr"], "--psf-map s.zarr is not a PSF map; make one with `lsfov estimate IMAGE MAP`")):
        res = run("deconvolve", "y.npy", "o.zarr", *args, ok=False)
        assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, res.output


@pytest.fixture
def blurred(tmp_path):
    """A blurred image on disk (.npy), the operator that blurred it (zarr) and its centre PSF (.npy)."""
    from lsfov import simulate as sim

    sharp = sim.sample_image("cell", (150, 170))
    op, _ = sim.psf_field(sharp.shape, "Z3", (2, 2), seed=3, size=15)
    y = np.maximum(sim.degrade(sharp, op, photons=300, seed=1), 0)
    np.save(tmp_path / "y.npy", y)
    op.save(tmp_path / "op.zarr")
    np.save(tmp_path / "psf.npy", op.kernels[0, 0])
    return y, op


def test_deconvolve_round_trip(run, tmp_path, blurred):
    y, op = blurred
    res = run("deconvolve", "y.npy", "d.zarr", "--operator", "op.zarr", "--iterations", 6, "--chunks", 64)
    assert "Mpixel·iterations/s" in res.output and "waiting for Dask workers" not in res.output
    ds = lsfov.open_result(tmp_path / "d.zarr")
    assert ds.attrs["iterations"] == 6 and ds.attrs["tv"] == lsfov.restore.DEFAULT_TV
    np.testing.assert_allclose(ds.deblurred.values, lsfov.deconvolve(y, op, 6), atol=1e-5 * y.max())
    assert (tmp_path / "d.png").stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or partial left
    # One measured PSF: the shift-invariant case.
    run("-q", "deconvolve", "y.npy", "p.zarr", "--psf", "psf.npy", "--iterations", 3, "--tv", 0)
    one = lsfov.ProductConvolution.from_grid(op.kernels[0, 0][None, None] / op.kernels[0, 0].sum(), y.shape)
    np.testing.assert_allclose(lsfov.open_result(tmp_path / "p.zarr").deblurred.values,
                               lsfov.deconvolve(y, one, 3, tv=0), atol=1e-5 * y.max())
    again = run("deconvolve", "y.npy", "p.zarr", "--psf", "psf.npy", ok=False)
    assert again.exit_code == 1 and "--overwrite" in again.output
    run("-q", "deconvolve", "y.npy", "p.zarr", "--psf", "psf.npy", "--iterations", 2, "--overwrite",
        "--scheduler", "synchronous")
    assert lsfov.open_result(tmp_path / "p.zarr").attrs["iterations"] == 2


def test_deconvolve_bad_input(run, tmp_path, blurred):
    y, op = blurred
    np.save(tmp_path / "even.npy", np.ones((4, 4), np.float32))
    np.save(tmp_path / "small.npy", y[:100])
    np.save(tmp_path / "zero.npy", np.zeros_like(y))
    np.save(tmp_path / "nan.npy", np.where(np.arange(y.size).reshape(y.shape) == 7, np.nan, y))
    cases = [
        (["y.npy", "o.zarr"], "exactly one of --operator"),
        (["y.npy", "o.zarr", "--psf", "psf.npy", "--operator", "op.zarr"], "exactly one of --operator"),
        (["small.npy", "o.zarr", "--operator", "op.zarr"], "build the operator for this image"),
        (["y.npy", "o.zarr", "--psf", "even.npy"], "odd sizes"),
        (["y.npy", "o.zarr", "--operator", "y.npy"], "not an lsfov operator"),
        (["y.npy", "o.zarr", "--operator", "missing.zarr"], "no such operator"),
        (["zero.npy", "o.zarr", "--psf", "psf.npy"], "all zero"),
        (["nan.npy", "o.zarr", "--psf", "psf.npy"], "NaN"),
        (["y.npy", "o.zarr", "--psf", "psf.npy", "--iterations", 0], "--iterations 0: give a positive number"),
        (["y.npy", "o.zarr", "--psf", "psf.npy", "--tv", 1], "--tv 1.0 must be in"),
        (["y.npy", "o.zarr", "--psf", "psf.npy", "--chunks", 4], "too small"),
        (["y.npy", "o.zarr", "--psf", "scalar.npy"], "an image needs 2 to 5"),
        (["y.npy", "o.zarr", "--psf", "psf.npy", "--scratch", "even.npy"], "is a file; give a directory"),
    ]
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    for args, msg in cases:
        res = run("deconvolve", *args, ok=False)
        assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, (args, res.output)
    assert not (tmp_path / "o.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_deconvolve_psf_stacks_and_channels(run, tmp_path, blurred):
    """A z-stack PSF: its highest-peak plane, even beside a plane of NaN; a multi-channel PSF: the
    image's --channel."""
    import tifffile

    y, op = blurred
    psf = np.load(tmp_path / "psf.npy")
    np.save(tmp_path / "stack.npy", np.stack([0.5 * psf, psf, np.full_like(psf, np.nan)]))
    run("-q", "deconvolve", "y.npy", "s.zarr", "--psf", "stack.npy", "--iterations", 3)
    run("-q", "deconvolve", "y.npy", "p.zarr", "--psf", "psf.npy", "--iterations", 3)
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "s.zarr").deblurred.values,
                                  lsfov.open_result(tmp_path / "p.zarr").deblurred.values)
    tifffile.imwrite(tmp_path / "img_c.ome.tif", np.stack([y, y]).astype(np.float32), metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "psf_c.ome.tif", np.stack([np.roll(psf, 1, 0), psf]), metadata={"axes": "CYX"})
    run("-q", "deconvolve", "img_c.ome.tif", "c.zarr", "--psf", "psf_c.ome.tif", "--channel", 1, "--iterations", 3)
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "c.zarr").deblurred.values,
                                  lsfov.open_result(tmp_path / "p.zarr").deblurred.values)
    # the result says which plane of its input it is
    assert lsfov.open_result(tmp_path / "c.zarr").attrs["plane"] == {"c": 1}
    assert "plane" not in lsfov.open_result(tmp_path / "p.zarr").attrs


def test_interrupted_deconvolve_leaves_nothing_that_looks_complete(run, tmp_path, blurred, monkeypatch, lsfov_log):
    import lsfov.io

    run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 2)
    before = lsfov.open_result(tmp_path / "d.zarr").deblurred.values

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    real_write = lsfov.io._write_variable
    monkeypatch.setattr(lsfov.io, "_write_variable", crash)
    res = run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--overwrite", ok=False)
    assert res.exit_code != 0
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "d.zarr").deblurred.values, before)  # old kept
    res = run("-q", "deconvolve", "y.npy", "new.zarr", "--psf", "psf.npy", ok=False)
    assert not (tmp_path / "new.zarr").exists()
    # What is left is the iterations' state, for --resume; no partial result.
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [".d.zarr.scratch", ".new.zarr.scratch"]
    assert "--resume" in res.output
    monkeypatch.setattr(lsfov.io, "_write_variable", real_write)
    run("-q", "deconvolve", "y.npy", "new.zarr", "--psf", "psf.npy", "--resume")
    assert lsfov.open_result(tmp_path / "new.zarr").deblurred.shape == before.shape
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".d.zarr.scratch"]
    # A rerun without --resume starts again, and says what it throws away.
    with lsfov_log() as said:
        run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1, "--overwrite")
    assert any("discarding the work of an earlier interrupted run" in m for m in said), said


def test_quickstart_example_runs(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--size", "256", "--out", str(tmp_path / "q.zarr")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "chunked vs whole" in res.stdout
    assert lsfov.open_result(tmp_path / "q.zarr").blurred.shape == (256, 256)
    assert "error on a Dirac comb" in res.stdout


def test_cli_train_synthesize_train_evaluate(run, tmp_path):
    run("-q", "train", "--synthesize", 192, "--psf-model", "G1", "--seed", 1, "tr.zarr")
    run("-q", "train", "--synthesize", 64, "--psf-model", "G1", "--split", "test", "--workers", 2, "te.zarr")
    res = run("-q", "train", "--synthesize", 8, "tr.zarr", ok=False)
    assert res.exit_code == 1 and "already exists" in res.output
    info = run("info", "te.zarr").output  # what a set was drawn over, before an hour of training on it
    assert "64 patches; psf_model G1, split test" in info and "ranges: {'sigma': (0.5, 4.0)}" in info
    res = run("train", "tr.zarr", "g1.pt", "--epochs", 1, "--lr", "1e-3", "--batch-size", 32, "--test", "te.zarr")
    assert "R² (" in res.output and "validity accuracy" in res.output
    assert (tmp_path / "g1.pt").exists() and (tmp_path / "g1.json").exists()
    assert (tmp_path / "g1.ckpt" / "last.pt").exists()
    info = run("info", "g1.ckpt").output
    assert "g1.ckpt: checkpoints of a G1 (spectral) training run: epoch 1 of 1, best validation R² " in info
    # Ended: not offered to --resume, which would refuse it (as it once was)
    assert "the run has ended" in info and "--init OUT.pt" in info and "--resume" not in info
    model = lsfov.load_model(tmp_path / "g1.pt")
    assert model.meta["test"]["n"] == 64 and model.meta["training"]["n_train"] < 192
    res = run("evaluate", "g1.pt", "te.zarr")
    assert re.search(r"sigma -?[\d.]+", res.output)
    with pytest.warns(lsfov.LsfovWarning, match="tr.zarr is made from the training images"):
        run("evaluate", "g1.pt", "tr.zarr")  # a score on seen images is said to be one
    # paper 000 Fig. 7: R² of the shipped G1 falls as each degradation grows, and is drawn
    res = run("-q", "evaluate", "G1", "--robustness", 40, "--figure", "rob.png")
    head, strengths, *rows = res.output.splitlines()[:6]  # a table: a row per degradation, a column per strength
    assert int(re.search(r"\((\d+) valid patches", head)[1]) > 30 and strengths.split()[:2] == ["strength", "0.00"]
    curves = {row.split()[0]: [float(v) for v in row.split()[1:]] for row in rows}
    assert list(curves) == ["gaussian", "poisson", "mixed", "illumination"]
    for kind in ("gaussian", "poisson", "mixed"):
        assert curves[kind][0] > 0.8 and curves[kind][-1] < curves[kind][0] - 0.3, (kind, curves[kind])
    assert Path("rob.png").stat().st_size > 10_000
    run("-q", "train", "tr.zarr", "tuned.pt", "--init", "G1", "--epochs", 1, "--lr", "1e-3", "--batch-size", 32)
    assert lsfov.load_model(tmp_path / "tuned.pt").meta["training"]["init"]["n_train"] == \
        lsfov.load_model("G1").meta["training"]["n_train"]
    run("-q", "train", "tr.zarr", "tuned.pt", "--epochs", 1, "--lr", "1e-3", "--batch-size", 32, "--overwrite",
        "--more-data", "te.zarr")  # two sets as one (a test set here only because it is at hand)
    more = lsfov.load_model(tmp_path / "tuned.pt").meta["training"]
    assert "init" not in more and more["data"]["n"] == 256 and more["data"]["split"] == ["test", "train"]
    assert "not G1" in run("train", "tr.zarr", "z.pt", "--init", "Z3", ok=False).output
    # bad input: one line, exit 1
    assert "OUT (.pt)" in run("train", "tr.zarr", ok=False).output
    assert "end in .pt" in run("train", "tr.zarr", "model.bin", ok=False).output
    assert "already exists" in run("train", "tr.zarr", "g1.pt", ok=False).output
    assert "the run in g1.ckpt finished: nothing to resume" in run("train", "tr.zarr", "g1.pt", "--resume", ok=False).output
    assert "not a training set" in run("train", "g1.ckpt", "other.pt", ok=False).output
    # a second run of one OUT (or a --resume of a run still going) is refused at once, not after its training
    import socket

    (tmp_path / ".busy.pt.lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")  # that run, alive
    res = run("train", "tr.zarr", "busy.pt", "--epochs", 1, ok=False)
    assert res.exit_code == 1 and "busy.pt is being written by another run" in res.output, res.output
    assert not (tmp_path / "busy.ckpt").exists() and not (tmp_path / "busy.pt").exists()
    # --test is read before the training, not after it: nothing is trained, nothing is left behind
    run("-q", "train", "--synthesize", 16, "--psf-model", "Z1", "--split", "test", "z1.zarr")
    for test, why in (("nope.zarr", "no training set at nope.zarr"), ("z1.zarr", "is a Z1 set, the model will regress G1")):
        assert why in run("train", "tr.zarr", "late.pt", "--epochs", 1, "--test", test, ok=False).output
        assert not (tmp_path / "late.ckpt").exists() and not (tmp_path / "late.pt").exists()
    run("-q", "train", "--synthesize", 16, "--psf-model", "G1", "--seed", 9, "tr2.zarr")  # of the training images
    with pytest.warns(lsfov.LsfovWarning, match="not a held-out score"):
        run("train", "tr.zarr", "late.pt", "--epochs", 1, "--lr", "1e-3", "--batch-size", 32, "--test", "tr2.zarr")
    assert "is a training set of this run" in run("train", "tr.zarr", "x.pt", "--test", "tr.zarr", ok=False).output
    assert "test set is for G1" in run("evaluate", "Z1", "te.zarr", ok=False).output
    assert "add --robustness" in run("evaluate", "G1", "te.zarr", "--figure", "f.png", ok=False).output


def test_cli_train_on_a_stream(run, tmp_path):
    run("-q", "train", "--synthesize", 32, "--psf-model", "G1", "--split", "test", "te.zarr")
    res = run("train", "--stream", 64, "--psf-model", "G1", "--arch", "compact", "--batch-size", 16, "--test", "te.zarr",
              "s.pt")
    assert "R² (" in res.output
    tr = lsfov.load_model(tmp_path / "s.pt").meta["training"]
    assert tr["data"]["stream"] and tr["n_train"] == 64 and tr["steps"] == 4
    assert "already exists" in run("train", "--stream", 64, "s.pt", ok=False).output
    assert "give one of them" in run("train", "--stream", 64, "--synthesize", 8, "x.zarr", ok=False).output
    assert "only the model file" in run("train", "--stream", 64, "a.pt", "b.pt", ok=False).output


def test_cli_calibrate_operator_and_subspace(run, tmp_path):
    from lsfov import simulate
    from lsfov.calibrate import OperatorSubspace, operator_distance

    fields = simulate.bead_stack(2, (256, 256), seed=3)
    np.save("b0.npy", fields[0].image)
    np.save("stack.npy", np.stack([f.image for f in fields]))  # one file, two planes
    res = run("calibrate", "b0.npy", "op.zarr", "--n-basis", 4, "--figure", "op.png")
    assert "operator from" in res.output and Path("op.png").stat().st_size > 10_000
    op = lsfov.ProductConvolution.load("op.zarr")
    assert op.kind == "basis" and op.kernels.shape[0] == 4
    assert operator_distance(op, fields[0].operator) < 0.35
    said = run("info", "op.zarr").output
    assert "lsfov operator" in said and "kernels 6.89 KiB (read into memory), maps 1 MiB (on disk, read window by window)" in said, said
    assert "pixel_um" not in op.attrs  # a .npy says no pixel size
    res = run("calibrate", "stack.npy", "sub.zarr", "--n-space", 3, "--figure", "sub.png", "--pixel-um", 0.1)
    sub = OperatorSubspace.load("sub.zarr")
    assert (sub.n_images, sub.n_space) == (2, 3) and Path("sub.png").exists()
    assert sub.attrs["pixel_um"] == 0.1  # (the option once missing here, which messages advised)
    assert "--pixel-um 0.0 must be a pixel size" in run("calibrate", "b0.npy", "p.zarr", "--pixel-um", 0, ok=False).output
    # The deconvolution CLI takes the calibrated operator.
    run("deconvolve", "b0.npy", "d.zarr", "--operator", "op.zarr", "--iterations", 2)
    # Existing outputs are kept; bad input is one line.
    res = run("calibrate", "b0.npy", "op.zarr", ok=False)
    assert res.exit_code == 1 and "--overwrite" in res.output
    # OUT forgotten at the end of a list of bead images: the last image is not what --overwrite replaces
    lsfov.save(fields[1].image, "b1.zarr")
    res = run("calibrate", "b0.npy", "b1.zarr", "--overwrite", ok=False)
    assert res.exit_code == 1 and "b1.zarr exists and is not what lsfov calibrate writes (an image?): did you " \
        "forget OUT?" in res.output
    np.testing.assert_array_equal(lsfov.open_image("b1.zarr").values, fields[1].image)
    res = run("calibrate", "b0.npy", "one.zarr", "--n-space", 3, ok=False)  # it would be ignored
    assert res.exit_code == 1 and "--n-space sizes the spatial basis of a subspace" in res.output
    np.save("flat.npy", np.full((128, 128), 3.0, np.float32))
    res = run("calibrate", "flat.npy", "none.zarr", ok=False)
    assert res.exit_code == 1 and "no beads found" in res.output and not Path("none.zarr").exists()
    # A camera's own limit: beads at or above it are left out.
    peaks = fields[0].image[tuple(fields[0].positions.T)]
    with pytest.warns(lsfov.LsfovWarning, match="beads are saturated and were left out"):
        run("calibrate", "b0.npy", "sat.zarr", "--n-basis", 4, "--saturation", float(np.percentile(peaks, 90)))


def test_cli_bss_round_trip(run, tmp_path):
    from lsfov import simulate

    fields = simulate.bead_stack(3, (192, 192), seed=8)
    np.save("stack.npy", np.stack([f.image for f in fields]))
    run("-q", "calibrate", "stack.npy", "sub.zarr", "--n-basis", 3, "--n-space", 3)
    np.save("b.npy", fields[1].image)
    res = run("bss", "b.npy", "out.zarr", "--subspace", "sub.zarr", "--iterations", 50, "--chunks", 96)
    assert "blur from" in res.output and Path("out.png").exists()
    r = lsfov.open_result("out.zarr")
    assert set(r.data_vars) == {"raw", "sparse", "smooth", "sources", "detections"}
    assert r.sparse.shape == (192, 192) and float(r.sparse.min()) >= 0
    assert list(r.sources.column.values) == ["y", "x", "amplitude"] and r.sources.shape[0] >= 3
    assert "sources: shape" in run("info", "out.zarr").output
    # The identified blur is kept with the result, and deblurs another image of the acquisition.
    op = lsfov.ProductConvolution.load("out.zarr")
    want = lsfov.identify_operator(np.load("b.npy"), lsfov.OperatorSubspace.load("sub.zarr"))
    np.testing.assert_allclose(np.asarray(op.maps), want.maps, rtol=1e-5, atol=1e-6)
    assert op.attrs["n_sources"] == len(r.sources) and "--operator out.zarr" in run("info", "out.zarr").output
    np.save("b2.npy", fields[2].image)
    run("-q", "deconvolve", "b2.npy", "d2.zarr", "--operator", "out.zarr", "--iterations", 2)
    assert lsfov.open_result("d2.zarr").attrs["operator"] == str(Path("out.zarr").resolve())  # (as typed: wrong elsewhere)
    # An image with µm coordinates (a crop 100 µm down, 0.1 µm pixels): the tables say where too, in them
    um = {"units": "micrometer"}
    lsfov.save(xr.DataArray(fields[1].image.astype(np.float32), dims=("y", "x"), name="image",
                            coords={"y": ("y", 100 + 0.1 * np.arange(192), um), "x": ("x", 0.1 * np.arange(192), um)}),
               "crop.zarr")
    run("-q", "bss", "crop.zarr", "um.zarr", "--subspace", "sub.zarr", "--iterations", 50, "--chunks", 96)
    u = lsfov.open_result("um.zarr")
    assert list(u.detections.column.values) == ["y", "x", "amplitude", "y_um", "x_um"] and len(u.detections) > 0
    for table in (u.sources, u.detections):
        np.testing.assert_allclose(table.sel(column="y_um"), 100 + 0.1 * table.sel(column="y"))
        np.testing.assert_allclose(table.sel(column="x_um"), 0.1 * table.sel(column="x"))
    np.testing.assert_allclose(u.detections.sel(column=["y", "x", "amplitude"]), r.detections, rtol=1e-5)
    # The camera's limit: sources that reach it do not identify the blur.
    peaks = fields[1].image[tuple(fields[1].positions.T)]
    with pytest.warns(lsfov.LsfovWarning, match="beads are saturated and were left out"):
        run("bss", "b.npy", "sat.zarr", "--subspace", "sub.zarr", "--iterations", 5,
            "--saturation", float(np.percentile(peaks, 90)))
    # Nothing above 3 sigma (a huge sparsity weight): an empty table, still a valid result.
    run("-q", "bss", "b.npy", "none.zarr", "--subspace", "sub.zarr", "--iterations", 5, "--gamma1", 1e9)
    assert lsfov.open_result("none.zarr").detections.shape == (0, 3)
    res = run("bss", "b.npy", "out.zarr", "--subspace", "sub.zarr", ok=False)
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = run("bss", "b.npy", "x.zarr", "--subspace", "nothing.zarr", ok=False)
    assert res.exit_code == 1 and "no such subspace" in res.output
    lsfov.ProductConvolution.from_grid(lsfov.psf.gaussian(1.5, 1.5, size=9)[None, None], (64, 64)).save("op.zarr")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = run("bss", "b.npy", "x.zarr", "--subspace", "op.zarr", ok=False)  # an operator is no subspace: one line
    assert not [w for w in said if "onsolidated" in str(w.message)]
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: op.zarr is not an lsfov operator subspace; learn one from bead images (lsfov calibrate, "
        "lsfov.learn_subspace)"]
    res = run("bss", "b.npy", "x.zarr", "--subspace", "sub.zarr", "--threshold", 1e9, ok=False)
    assert res.exit_code == 1 and "no beads found" in res.output and "bss" in res.output
    Path("y.png").mkdir()  # where the preview would go: refused before any work, not after it
    res = run("bss", "b.npy", "y.zarr", "--subspace", "sub.zarr", "--overwrite", ok=False)
    assert res.exit_code == 1 and "is a directory" in res.output and not Path("y.zarr").exists()


def test_cli_estimate_and_run_mark_saturated_patches(run, tmp_path):
    """A 16-bit image clipped at its type's maximum: the nodes whose patches are more than 5 %
    clipped are said, marked invalid and filled; --saturation gives a camera's own limit (a
    12-bit camera in 16-bit files) and reaches the map of `lsfov run` too."""
    pytest.importorskip("torch")
    img = lsfov.simulate.sample_image("coins", (256, 320))
    np.save("clip.npy", np.minimum(img / np.percentile(img, 95) * 65535, 65535).astype(np.uint16))
    with pytest.warns(lsfov.LsfovWarning, match="9 of 12 PSF-map nodes are marked invalid, each with more than 5 %.*"
                                                "max_saturated=1 .--max-saturated 1. turns this off"):
        res = run("estimate", "clip.npy", "map.zarr", "--stride", 64)
    assert "(9 filled from neighbours)" in res.output
    m = lsfov.open_result("map.zarr")
    assert m.attrs["saturation"] == 65535 and m.filled.values.any() and (m.validity.values == 0).any()
    np.save("cam12.npy", np.minimum(img / np.percentile(img, 95) * 4095, 4095).astype(np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lsfov.LsfovWarning)  # 4095 is no limit of the type
        run("estimate", "cam12.npy", "m12.zarr", "--stride", 64)
    clipped = r"5.2 % of the pixels are at or above the saturation level 4095, taken as at least that \(censored\)"
    with pytest.warns(lsfov.LsfovWarning, match=clipped):  # the deconvolution's own (lsfov run)
        with pytest.warns(lsfov.LsfovWarning, match=r"9 of 12 .* saturated \(at or above 4095\)"):
            run("run", "cam12.npy", "r12.zarr", "--stride", 64, "--iterations", 1, "--saturation", 4095)
    r = lsfov.open_result("r12.zarr")
    assert r.attrs["saturation"] == 4095
    # An OME-TIFF says how many of its 16 bits the camera fills: its limit is then known.
    import tifffile

    tifffile.imwrite("cam12.ome.tif", np.load("cam12.npy"), ome=True, metadata={"SignificantBits": 12})
    bits = r"9 of 12 .* saturated \(at or above 4095, the image's 12 significant bits\)"  # where 4095 comes from
    with pytest.warns(lsfov.LsfovWarning, match=bits):
        run("estimate", "cam12.ome.tif", "t12.zarr", "--stride", 64)
    with pytest.warns(lsfov.LsfovWarning, match=r"5.2 % of the pixels .* level 4095 \(the image's 12 significant bits\)"):
        with pytest.warns(lsfov.LsfovWarning, match=bits):
            run("run", "cam12.ome.tif", "rt12.zarr", "--stride", 64, "--iterations", 1)
    # the result's raw image keeps its camera's bits (read again from it); the estimates are no counts
    assert lsfov.open_image("rt12.zarr/raw").attrs["significant_bits"] == 12
    assert "significant_bits" not in lsfov.open_result("rt12.zarr").deblurred.attrs
    np.testing.assert_array_equal(r.validity.values == 0, m.validity.values == 0)
    assert run("estimate", "cam12.npy", "x.zarr", "--saturation", 0, ok=False).exit_code == 2
    # An image stretched to its type's range: the rule off, from the CLI too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", lsfov.LsfovWarning)
        run("estimate", "clip.npy", "off.zarr", "--stride", 64, "--max-saturated", 1)
    assert lsfov.open_result("off.zarr").attrs["max_saturated"] == 1 and not lsfov.open_result("off.zarr").filled.any()
    assert lsfov.open_result("off.zarr").filled.dtype == bool  # as estimate_psf_map's, and blind_deconvolve's saved
    from lsfov.estimate.mapping import MAX_SATURATED

    assert f"[default: {MAX_SATURATED:g}]" in run("estimate", "--help").output.replace("\n", " ").replace("  ", " ")


def test_cli_estimate_deconvolve_with_map_and_depth(run, tmp_path, lsfov_log):
    pytest.importorskip("torch")
    from lsfov import simulate

    s = simulate.tilted_surface((320, 320), depth_range_um=(-8, 8), grid=4, seed=5)
    np.save("tilt.npy", s.image)
    np.save("truth.npy", s.depth_um)
    res = run("estimate", "tilt.npy", "map.zarr", "--stride", 64, "--chunks", 160, "--figure", "map.png")
    assert "4x4 nodes of Z3" in res.output and Path("map.png").exists()
    m = lsfov.open_result("map.zarr")
    assert {"focus", "astigmatism", "axis", "validity", "filled", "focus_astig_sin", "focus_astig_cos"} <= set(m.data_vars)
    assert m.attrs["psf_model"] == "Z3" and m.attrs["stride"] == 64 and m.attrs["symmetrize"] == 0
    run("-q", "estimate", "tilt.npy", "map8.zarr", "--stride", 64, "--symmetrize")
    assert lsfov.open_result("map8.zarr").attrs["symmetrize"] == 1
    with lsfov_log() as said:
        run("deconvolve", "tilt.npy", "d.zarr", "--psf-map", "map.zarr", "--iterations", 2)
        assert not any("PSF map" in m for m in said), said
        np.save("other.npy", s.image[::-1])  # another image of the shape: said, not refused
        run("deconvolve", "other.npy", "o.zarr", "--psf-map", "map.zarr", "--iterations", 1)
    assert any(f"was read from {Path.cwd() / 'tilt.npy'}, not from other.npy" in m for m in said), said
    # A result's image named two ways (r.zarr reads r.zarr/image) is one image: it was said to be another.
    lsfov.save(s.image, "r.zarr")
    run("-q", "estimate", "r.zarr", "rmap.zarr", "--stride", 64)
    with lsfov_log() as said:
        run("deconvolve", "r.zarr/image", "rd.zarr", "--psf-map", "rmap.zarr", "--iterations", 1)
        run("deconvolve", "r.zarr", "rd2.zarr", "--psf-map", "rmap.zarr", "--iterations", 1)
    assert not any("PSF map" in m for m in said), said
    assert lsfov.open_result("d.zarr").deblurred.shape == (320, 320)
    res = run("depth", "map.zarr", "cal.json", "--known", "truth.npy")
    assert "calibration curves of degree 2" in res.output  # 4 depths along the tilt: the degree comes down
    res = run("depth", "map.zarr", "lin.json", "--known", "truth.npy", "--method", "linear")
    assert "µm/wave" in res.output and json.loads(Path("lin.json").read_text())["method"] == "linear"
    said = run("depth", "map.zarr", "z.zarr", "--calibration", "cal.json").output
    z = lsfov.open_result("z.zarr").depth
    assert z.shape == (4, 4) and z.attrs["units"] == "micrometer"
    lo, hi = re.search(r"depth (\S+) \.\. (\S+) micrometer", said).groups()  # the same decimals, 3 digits
    assert len(lo.split(".")[-1]) == len(hi.split(".")[-1]) and float(lo) == pytest.approx(float(z.min()), abs=10.0 ** -len(lo.split(".")[-1]))
    run("depth", "map.zarr", "z0.zarr")
    assert lsfov.open_result("z0.zarr").depth.attrs["units"].startswith("wave RMS")
    # A smoothed calibration: stored in the JSON, applied by default, overridable.
    run("depth", "map.zarr", "cal2.json", "--known", "truth.npy", "--smooth", 1)
    run("depth", "map.zarr", "cal2.json", "--known", "truth.npy", "--smooth", 1.5, "--overwrite")  # a file, replaced
    assert json.loads(Path("cal2.json").read_text())["smooth"] == 1.5
    Path("cal3.json").mkdir()  # a directory in the way: replaced only with --overwrite, by a whole file
    assert "--overwrite" in run("depth", "map.zarr", "cal3.json", "--known", "truth.npy", ok=False).output
    run("depth", "map.zarr", "cal3.json", "--known", "truth.npy", "--overwrite")
    assert json.loads(Path("cal3.json").read_text())["type"] == "lsfov.DepthCalibration"
    np.save("truths.npy", np.stack([np.load("truth.npy")] * 3))  # depth has no --z: said in its own words
    assert ("--known truths.npy: 3 planes along 'z'; --known takes one 2-D map of the depth in µm"
            in run("depth", "map.zarr", "cal4.json", "--known", "truths.npy", ok=False).output)
    assert not list(Path().glob(".cal3*"))
    run("depth", "map.zarr", "z2.zarr", "--calibration", "cal2.json")
    run("depth", "map.zarr", "z3.zarr", "--calibration", "cal2.json", "--smooth", 0)
    z2, z3 = lsfov.open_result("z2.zarr").depth, lsfov.open_result("z3.zarr").depth
    assert z2.attrs["calibration"]["smooth"] == 1.5 and not np.allclose(z2, z3)
    assert (z2.attrs["smooth"], z3.attrs["smooth"]) == (1.5, 0)  # what was applied, --smooth 0 included
    assert lsfov.open_result("z3.zarr").attrs["image"] == str(Path.cwd() / "tilt.npy")  # (absolute: read from elsewhere)
    assert run("depth", "map.zarr", "z4.zarr", "--smooth", -1, ok=False).exit_code == 2
    res = run("depth", "map.zarr", "z1.zarr", "--calibration", "map.png", ok=False)
    assert res.exit_code == 1
    res = run("deconvolve", "tilt.npy", "e.zarr", "--psf", "map.zarr", ok=False)
    assert res.exit_code == 1 and "--psf map.zarr is a PSF map (of lsfov estimate or run): give it with --psf-map" \
        in res.output
    res = run("deconvolve", "tilt.npy", "e.zarr", "--psf-map", "map.zarr", "--psf", "x.npy", ok=False)
    assert res.exit_code == 1 and "exactly one" in res.output


def test_cli_run_writes_one_result_napari_reads(run, tmp_path):
    pytest.importorskip("torch")
    import xarray as xr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    from lsfov import simulate

    s = simulate.tilted_surface((320, 320), depth_range_um=(-8, 8), grid=4, seed=6)
    px = lsfov.load_model("Z3").optics.pixel_um
    coords = {d: xr.Variable(d, px * np.arange(320), attrs={"units": "micrometer"}) for d in "yx"}
    lsfov.save(xr.Dataset({"image": xr.DataArray(s.image, dims=("y", "x"), coords=coords)}), "in.zarr")
    res = run("run", "in.zarr/image", "out.zarr", "--iterations", 2, "--chunks", 160, "--figure", "out.png")
    assert "PSF map" in res.output and "deconvolution" in res.output and Path("out.png").exists()
    r = lsfov.open_result("out.zarr")
    assert {"raw", "deblurred", "focus", "astigmatism", "axis", "validity", "filled", "depth", "focus_astig_sin",
            "focus_astig_cos"} <= set(r.data_vars)
    assert r.deblurred.shape == (320, 320) and r.depth.dims == ("gy", "gx")
    assert r.gy.attrs["units"] == "micrometer"
    # napari's reader (ome-zarr-py) sees each variable as a multiscale image at its own scale.
    node = next(n for n in Reader(parse_url("out.zarr/focus"))() if n.load(Multiscales))
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale[-1] == pytest.approx(64 * px)
    # The operator comes back from the result.
    assert lsfov.operator_from_psf_map(r).grid_shape == r.focus.shape
    assert run("run", "in.zarr/image", "out.zarr", ok=False).exit_code == 1


def test_cli_run_resumes_without_redoing_the_psf_map(run, tmp_path, monkeypatch, count_calls):
    pytest.importorskip("torch")
    import lsfov.estimate.mapping
    from lsfov import simulate
    from lsfov.restore import chunked

    np.save("in.npy", simulate.tilted_surface((320, 320), depth_range_um=(-8, 8), grid=4, seed=6).image)
    args = ("run", "in.npy", "OUT", "--iterations", 2, "--chunks", 160)
    run(*[a if a != "OUT" else "ref.zarr" for a in args])
    count_calls(chunked, "_block", fail_at=3, error=KeyboardInterrupt())  # dies on the third block
    res = run(*[a if a != "OUT" else "out.zarr" for a in args], ok=False)
    assert res.exit_code != 0 and not Path("out.zarr").exists()
    count_calls(chunked, "_block")  # no more crashes
    monkeypatch.setattr(lsfov.estimate.mapping, "_regress", lambda *a, **k: 1 / 0)  # the CNN must not run again
    other = run(*[a if a != "OUT" else "out.zarr" for a in args], "--stride", 96, "--resume", ok=False)
    assert isinstance(other.exception, ZeroDivisionError)  # another stride: the kept nodes are not used
    run(*[a if a != "OUT" else "out.zarr" for a in args], "--resume")
    out, ref = lsfov.open_result("out.zarr"), lsfov.open_result("ref.zarr")
    for name in ("deblurred", "focus", "depth"):
        np.testing.assert_array_equal(out[name].values, ref[name].values)


def test_a_closing_rate_leaves_out_the_wait_for_workers(run, tmp_path, blurred, monkeypatch):
    """Batch jobs queued for ten minutes are no slow deconvolution: the rate counts the work, and the
    wait is said beside it."""
    import lsfov.cluster as cluster

    spent = iter([0.0, 600.0])
    monkeypatch.setattr(cluster, "waited_for_workers", lambda: next(spent))  # (read at the start, at the end)
    res = run("deconvolve", "y.npy", "d.zarr", "--operator", "op.zarr", "--iterations", 2)
    assert re.search(r"2 iterations in 0\.0 s \([0-9.]+ Mpixel·iterations/s\), after 600 s waiting for Dask workers;",
                     res.output), res.output


def test_cli_estimate_resumed_reports_no_rate_for_work_it_did_not_do(run, count_calls, lsfov_log):
    """A resumed map's patches/s would count the nodes an earlier run regressed."""
    pytest.importorskip("torch")
    import lsfov.estimate.mapping as mapping
    from lsfov import simulate

    np.save("in.npy", simulate.tilted_surface((320, 320), depth_range_um=(-8, 8), grid=4, seed=6).image)
    args = ("estimate", "in.npy", "map.zarr", "--chunks", 160, "--scheduler", "synchronous")
    count_calls(mapping, "_regress", fail_at=3, error=KeyboardInterrupt())  # Ctrl-C in the third chunk
    res = run(*args, ok=False)
    assert res.exit_code == 130 and "--resume" in res.output, res.output
    count_calls(mapping, "_regress")
    res = run(*args, "--resume")
    assert "to finish an interrupted run" in res.output and "patches/s" not in res.output, res.output
    assert "patches/s" in run(*args, "--overwrite").output
    # Work kept from a run with other options is not this run's: it computes all, at its rate.
    other = ("estimate", "in.npy", "other.zarr", "--chunks", 160, "--scheduler", "synchronous")
    count_calls(mapping, "_regress", fail_at=3, error=KeyboardInterrupt())
    assert run(*other, "--stride", 96, ok=False).exit_code == 130
    count_calls(mapping, "_regress")
    with lsfov_log() as said:
        res = run(*other, "--resume")
    assert "patches/s" in res.output, res.output
    assert any("is of another run" in m and "starts from the beginning" in m for m in said), said


def test_cli_deconvolve_resumed_says_so_only_for_its_own_work(run, count_calls, lsfov_log):
    """A resumed deconvolution reports the time to finish; one that found only another run's state
    (other options) starts over, and reports its rate."""
    import lsfov.restore.chunked as chunked
    from lsfov import simulate

    sharp = simulate.sample_image("cell", (192, 192))
    op, _ = simulate.psf_field(sharp.shape, "Z3", (1, 1), seed=3, size=15)
    np.save("y.npy", np.maximum(simulate.degrade(sharp, op, photons=300, seed=1), 0))
    op.save("op.zarr")
    args = ("deconvolve", "y.npy", "d.zarr", "--operator", "op.zarr", "--iterations", 6, "--chunks", 96,
            "--exchange-every", 2, "--scheduler", "synchronous")
    count_calls(chunked, "_block", fail_at=6, error=KeyboardInterrupt())  # in the second exchange
    assert run(*args, ok=False).exit_code == 130
    count_calls(chunked, "_block")
    res = run(*args, "--resume")
    assert "s to finish an interrupted run" in res.output and "Mpixel" not in res.output, res.output
    count_calls(chunked, "_block", fail_at=6, error=KeyboardInterrupt())
    assert run(*args, "--overwrite", ok=False).exit_code == 130
    count_calls(chunked, "_block")
    with lsfov_log() as said:
        res = run(*args, "--tv", 0.01, "--resume", "--overwrite")  # other options: another run's state
    assert "Mpixel" in res.output and "to finish" not in res.output, res.output
    assert any("is of another run" in m for m in said), said


def test_the_slurm_example_refuses_an_existing_output_before_any_job(tmp_path):
    """Submitted again with the same OUT, it ran every iteration on the cluster before saving failed."""
    pytest.importorskip("dask_jobqueue")
    (tmp_path / "done.zarr").mkdir()
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "slurm_deconvolve.py"), "in.tif",
                          str(tmp_path / "done.zarr"), "--operator", "op.zarr", "--cores", "8", "--memory", "32GB"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "done.zarr already exists; remove it or give another OUT" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_slurm_and_pbs_clusters_without_a_batch_system():
    pytest.importorskip("dask_jobqueue")
    import dask

    from lsfov.cluster import jobqueue_cluster, use_scheduler

    # Site settings come from the Dask configuration (here through its environment variables).
    env = {**os.environ, "DASK_JOBQUEUE__SLURM__ACCOUNT": "mylab"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "slurm_deconvolve.py"), "--dry-run", "--cores", "8",
                          "--memory", "32GB", "--walltime", "01:00:00", "--queue", "gpu"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    script = res.stdout
    assert "#SBATCH -p gpu" in script and "#SBATCH -A mylab" in script and "--cpus-per-task=8" in script
    with jobqueue_cluster("pbs", cores=4, memory="8GB") as cluster:
        assert "#PBS" in cluster.job_script()
    # dask-jobqueue's import makes Ctrl-C exit with status 0; a cancelled run must not look successful
    probe = ("import signal; from lsfov.cluster import jobqueue_cluster; jobqueue_cluster('pbs', cores=1, memory='1GB'); "
             "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "True", res.stderr
    with dask.config.set({"jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "4GB"}):
        with jobqueue_cluster("slurm") as cluster:
            assert "--cpus-per-task=2" in cluster.job_script()
        if shutil.which("sbatch") is None:  # a job is submitted: here, where SLURM is not, a one-line refusal
            with pytest.raises(ValueError, match="sbatch is not on PATH"):
                with use_scheduler("slurm:1"):
                    pass
    for spec in ("slurm:many", "slurm:0"):  # 0 jobs would wait for workers forever
        with pytest.raises(ValueError, match="slurm:N"):
            with use_scheduler(spec):
                pass
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ValueError, match="jobqueue.yaml"):  # no site settings: where to put them
            jobqueue_cluster("slurm")
    # A setting misspelt was "no job size set"; a size of 0 or "8x" a ZeroDivisionError or TypeError.
    for kw, said in ((dict(acount="mylab"), "slurm jobs have no setting 'acount'; see dask-jobqueue's SLURMCluster"),
                     (dict(cores=0), "the slurm jobs' cores must be a positive integer, got 0; put cores"),
                     (dict(processes=0), "the slurm jobs' processes must be a positive integer, got 0"),
                     (dict(cores="8x"), "the slurm jobs' cores must be a positive integer, got '8x'"),
                     (dict(memory="lots"), "the slurm jobs' memory must be an amount such as '32GB', got 'lots'")):
        with pytest.raises(ValueError, match=re.escape(said)):
            jobqueue_cluster("slurm", **{"cores": 8, "memory": "32GB", **kw})
    with pytest.raises(ValueError, match="dask-cuda"):
        with use_scheduler("cuda"):
            pass


def test_gpu_without_cupy_is_refused_before_any_work(run, tmp_path, monkeypatch):
    """--gpu (and --scheduler cuda, which implies it) where CuPy is missing: one line saying what to
    do, exit status 1, nothing written. (The GPU runs themselves are in tests/test_gpu.py.)"""
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError, as without CuPy
    np.save("img.npy", np.random.default_rng(0).random((160, 160)).astype(np.float32))
    g = np.exp(-0.5 * (np.arange(-7, 8) / 2.0) ** 2)
    np.save("psf.npy", np.outer(g, g) / np.outer(g, g).sum())
    for args in (("deconvolve", "img.npy", "o.zarr", "--psf", "psf.npy", "--gpu"),
                 ("estimate", "img.npy", "o.zarr", "--gpu"),
                 ("run", "img.npy", "o.zarr", "--scheduler", "cuda")):
        res = run(*args, ok=False)  # (no dask-cuda here either: the scheduler says both)
        assert res.exit_code == 1 and "needs " in res.output and "CuPy" in res.output, res.output
        assert "--no-gpu" in res.output, res.output
        assert "without constraints.txt" in res.output  # as the README says: it pins the CPU build of torch
        assert not (tmp_path / "o.zarr").exists() and not list(tmp_path.glob(".o.zarr*"))
        assert "deconvolving" not in res.output  # said before the input is read
    # before the input is opened: a missing input is not what it says first
    res = run("estimate", "missing.npy", "o.zarr", "--gpu", ok=False)
    assert "CuPy" in res.output and "missing.npy" not in res.output, res.output


def test_cli_starts_without_torch_and_writes_figures_of_any_name(run, tmp_path):
    """`lsfov --help` and the deconvolution commands do not pay torch's import; a figure named
    without a known suffix is a PNG (its temporary file's suffix must not choose the format)."""
    out = subprocess.run([sys.executable, "-c", "import sys, lsfov.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from lsfov.figures import summary_figure

    for name in ("fig", "fig.v2", "fig.pdf"):
        summary_figure(tmp_path / name, {"a": np.eye(8)}, title="t")
        head = (tmp_path / name).read_bytes()[:8]
        assert head.startswith(b"%PDF" if name.endswith(".pdf") else b"\x89PNG"), (name, head)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig", "fig.pdf", "fig.v2"]


def test_robustness_figure_draws_points_below_its_floor_on_it(monkeypatch, tmp_path):
    """R² far below 0 is clipped to the floor, and each clipped point is marked there (▼)."""
    import lsfov.figures as figures

    kept = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.setdefault("fig", fig))
    s = [0.0, 0.1, 0.2]
    curve = {"strengths": s, "gaussian": [0.9, 0.2, -3.0], "poisson": [0.9, 0.8, 0.7],
             "mixed": [0.9, -0.1, -0.7], "illumination": [0.9, 0.9, 0.9]}
    figures.robustness_figure(tmp_path / "r.png", {"Z3": curve})
    axes = kept["fig"].axes
    assert axes[0].get_ylim()[0] == figures.ROBUSTNESS_FLOOR
    for ax, clipped in zip(axes, ([0.2], [], [0.2], [])):
        line, *marks = ax.get_lines()
        assert line.get_ydata().min() >= figures.ROBUSTNESS_FLOOR
        assert [list(m.get_xdata()) for m in marks] == ([clipped] if clipped else [])
        assert all(m.get_marker() == "v" and set(m.get_ydata()) == {figures.ROBUSTNESS_FLOOR} for m in marks)
    kept.clear()
    figures.robustness_figure(tmp_path / "r.png", {"Z3": {**curve, "gaussian": [0.9, 0.2, -0.2],
                                                          "mixed": [0.9, 0.5, 0.1]}})
    assert kept["fig"].axes[0].get_ylim()[0] == -0.2 and all(len(a.get_lines()) == 1 for a in kept["fig"].axes)


def test_a_preview_shows_non_square_pixels_at_their_shape(monkeypatch, tmp_path):
    import lsfov.figures as figures

    kept = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.setdefault("fig", fig))
    um = {"units": "micrometer"}
    img = xr.DataArray(np.random.default_rng(0).random((40, 60)), dims=("y", "x"),
                       coords={"y": ("y", 0.3 * np.arange(40), um), "x": ("x", 0.2 * np.arange(60), um)})
    figures.summary_figure(tmp_path / "p.png", {"raw": img, "plain": img.values, "depth": img},
                           quantities={"depth": None})
    assert [ax.get_aspect() for ax in kept["fig"].axes[:3]] == pytest.approx([1.5, 1.0, 1.5])


def test_psf_mosaic_shows_at_most_16_nodes_per_axis_ends_included():
    from lsfov.figures import psf_mosaic

    k = np.random.default_rng(0).random((40, 3, 5, 5)).astype(np.float32)
    m = psf_mosaic(k)
    assert m.shape == (16 * 7, 3 * 7)
    np.testing.assert_allclose(m[1:6, 1:6], k[0, 0] / k[0, 0].max())
    np.testing.assert_allclose(m[-6:-1, -6:-1], k[-1, -1] / k[-1, -1].max())


def test_the_mosaic_of_a_map_renders_only_the_nodes_it_shows(monkeypatch):
    """The figures of ``lsfov estimate``, ``run`` and ``demo`` show at most 16 x 16 of a map's
    nodes: only those are rendered (a 32768² slide's map has 261 121, 0.93 GiB of kernels)."""
    from lsfov.figures import map_mosaic, psf_mosaic
    from lsfov.psf import PSFModel

    ds = lsfov.estimate_psf_map(lsfov.simulate.tilted_surface((384, 320), seed=0).image, "Z3", stride=16)
    assert (ds.sizes["gy"], ds.sizes["gx"]) == (17, 13)
    whole = psf_mosaic(lsfov.operator_from_psf_map(ds).kernels)
    rendered = []
    real = PSFModel.render
    monkeypatch.setattr(PSFModel, "render", lambda self, p, **kw: rendered.append(len(p)) or real(self, p, **kw))
    np.testing.assert_allclose(map_mosaic(ds), whole, rtol=1e-5, atol=1e-7)
    assert rendered == [16 * 13]


def test_a_stopped_training_says_where_its_epochs_are_kept(run, monkeypatch):
    import lsfov.estimate

    run("-q", "train", "--synthesize", 64, "--psf-model", "G1", "tr.zarr")

    def stopped(*a, checkpoint, **k):  # an epoch saved, then Ctrl-C
        Path(checkpoint).mkdir()
        (Path(checkpoint) / "last.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(lsfov.estimate, "train", stopped)
    res = run("train", "tr.zarr", "m.pt", ok=False)
    assert res.exit_code == 130
    assert res.output.splitlines()[-2:] == ["the epochs done so far are kept in m.ckpt: run the same command with "
                                            "--resume to continue", "interrupted (Ctrl-C)"]
