import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import lsfov
from lsfov.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def _run(*args, ok=True):
        res = runner.invoke(main, [str(a) for a in args])
        if ok:
            assert res.exit_code == 0, res.output + repr(res.exception)
        return res

    return _run


def test_help(run):
    for cmd in ([], ["demo"], ["info"], ["simulate"], ["simulate", "beads"], ["simulate", "blur"]):
        assert "Usage" in run(*cmd, "--help").output


def test_demo_writes_result_and_figure(run, tmp_path):
    res = run("-q", "demo", "--size", 256, "--chunks", 96, "--out", "d.zarr")
    assert "chunked vs whole-image blur" in res.output
    ds = lsfov.open_result(tmp_path / "d.zarr")
    assert {"raw", "sharp", "focus", "astigmatism", "axis"} <= set(ds.data_vars)
    assert ds.raw.shape == (256, 256) and ds.focus.shape == (4, 4)
    assert (tmp_path / "d.png").stat().st_size > 10_000
    again = run("demo", "--size", 256, "--out", "d.zarr", ok=False)
    assert again.exit_code == 1 and "--overwrite" in again.output
    run("-q", "demo", "--size", 256, "--out", "d.zarr", "--overwrite", "--scheduler", "synchronous")


def test_simulate_beads_blur_and_info(run, tmp_path):
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
    assert "image: shape (96, 120)" in run("info", "sharp.npy").output


def test_cli_bad_input_gives_one_line_and_exit_1(run, tmp_path):
    cases = [
        (["info", "nope.zarr"], "no such file"),
        (["simulate", "blur", "nope.tif", "o.zarr"], "no such file"),
        (["demo", "--scheduler", "carrier-pigeon", "--size", 64], "unknown scheduler"),
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


def test_quickstart_example_runs(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--size", "256", "--out", str(tmp_path / "q.zarr")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "chunked vs whole" in res.stdout
    assert lsfov.open_result(tmp_path / "q.zarr").blurred.shape == (256, 256)
