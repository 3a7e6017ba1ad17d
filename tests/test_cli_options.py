"""CLI behaviours that no other test pinned down (found by mutating lsfov/cli.py one change at a
time): each test fails when the check or option it names is removed or changed."""
import contextlib
import os
import warnings

import numpy as np
import pytest
import tifffile

import lsfov
from lsfov import simulate as sim


@pytest.fixture
def small(tmp_path):
    """A 128² blurred image (y.npy), its one-node operator (op.zarr) and PSF (psf.npy)."""
    sharp = sim.sample_image("cell", (128, 128))
    op, _ = sim.psf_field(sharp.shape, "Z3", (1, 1), seed=3, size=15)
    np.save(tmp_path / "y.npy", np.maximum(sim.degrade(sharp, op, photons=300, seed=1), 0).astype(np.float32))
    op.save(tmp_path / "op.zarr")
    np.save(tmp_path / "psf.npy", op.kernels[0, 0])
    return op


@pytest.fixture
def no_work(monkeypatch):
    """Any PSF-map regression or deconvolution block is recorded (a refusal must come before them)."""
    from lsfov.estimate import mapping
    from lsfov.restore import chunked

    called = []
    monkeypatch.setattr(mapping, "_regress", lambda *a, **k: called.append("map") or 1 / 0)
    real = chunked._block
    monkeypatch.setattr(chunked, "_block", lambda *a, **k: called.append("block") or real(*a, **k))
    return called


def _refused(res, msg):
    assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, res.output


# ------------------------------------------------------------------------------- outputs never overwritten


def test_deconvolve_never_replaces_someones_file_where_its_preview_goes(run, tmp_path, small, no_work):
    (tmp_path / "d.png").write_bytes(b"someone's picture")
    # --overwrite replaces the result OUT: a file beside it that lsfov did not make is not its preview,
    # and is said so at once (once "pass --overwrite", which then said this)
    for more in ((), ("--overwrite",)):
        _refused(run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1, *more, ok=False),
                 "d.png, where the preview of OUT goes, is a file lsfov did not make; move it, or name OUT otherwise")
    assert (tmp_path / "d.png").read_bytes() == b"someone's picture" and not (tmp_path / "d.zarr").exists()
    assert not no_work
    (tmp_path / "d.png").unlink()
    run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1)
    made = (tmp_path / "d.png").read_bytes()
    (tmp_path / "d.zarr").rename(tmp_path / "e.zarr")  # the preview alone: lsfov's, so replaced
    run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 2, "--overwrite")
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "d.png").read_bytes() != made


def test_outputs_where_one_cannot_write_are_refused_before_any_work(run, tmp_path, small, no_work, monkeypatch):
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro") else real(p, mode))
    _refused(run("deconvolve", "y.npy", "ro/d.zarr", "--psf", "psf.npy", ok=False),
             "ro/d.zarr: cannot write in ")
    (tmp_path / "link.zarr").symlink_to(tmp_path / "ro" / "t.zarr")  # written beside what it names
    _refused(run("deconvolve", "y.npy", "link.zarr", "--psf", "psf.npy", ok=False),
             "link.zarr: cannot write in ")
    _refused(run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--scratch", "ro/s", ok=False),
             "--scratch ro/s: cannot write in ")
    assert not no_work and not (tmp_path / "d.zarr").exists()


def test_a_full_disk_is_one_line_and_leaves_the_earlier_result(run, tmp_path, small, monkeypatch):
    """No room or quota left (a cluster's shared file system) is said in one line, not a traceback,
    and what was being written goes: an earlier result is as it was."""
    import errno

    import lsfov.io

    run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1)
    before = lsfov.open_result(tmp_path / "d.zarr").deblurred.values

    def full(tmp, path):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp / "deblurred" / "c" / "0" / "0"))

    monkeypatch.setattr(lsfov.io, "_move_into_place", full)
    res = run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 2, "--overwrite", ok=False)
    _refused(res, f"{os.strerror(errno.EDQUOT)}: ")
    assert "free space there or write elsewhere (OUT, --scratch) and run again (a result is written whole or not " \
        "at all)" in res.output
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "d.zarr").deblurred.values, before)
    assert not list(tmp_path.glob(".d.zarr.partial-*"))


def test_a_run_stopped_or_a_figure_lost_once_the_result_is_written_says_so(run, tmp_path, small, monkeypatch,
                                                                          lsfov_log):
    """A full disk at the preview, after OUT was written whole, said "a result is written whole or
    not at all" and exit 1; a stop (SIGTERM, a batch job's time limit) while the cluster closed,
    after OUT was written, advised --resume, which OUT's existence then refused, and left the state."""
    import errno

    import lsfov.cli
    import lsfov.cluster
    import lsfov.figures

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    drawn = lsfov.figures.summary_figure
    monkeypatch.setattr(lsfov.figures, "summary_figure", full)
    with lsfov_log() as said:
        res = run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1)
    assert any(f"d.zarr is written, but its figure could not be: {os.strerror(errno.ENOSPC)}" in m for m in said), said
    assert "no preview" in res.output and lsfov.open_result(tmp_path / "d.zarr").deblurred.shape
    monkeypatch.setattr(lsfov.figures, "summary_figure", drawn)
    real = lsfov.cluster.use_scheduler

    @contextlib.contextmanager
    def stopped_on_close(*a, **k):
        with real(*a, **k) as client:
            yield client
        raise lsfov.cli._Terminated()

    monkeypatch.setattr(lsfov.cluster, "use_scheduler", stopped_on_close)
    res = run("deconvolve", "y.npy", "e.zarr", "--psf", "psf.npy", "--iterations", 1, "--scratch", "s", ok=False)
    assert "e.zarr was written whole before the run stopped" in res.output and "--resume" not in res.output
    assert lsfov.open_result(tmp_path / "e.zarr").deblurred.shape and not any((tmp_path / "s").glob("*"))


def test_a_refused_run_leaves_no_folders_made_for_its_output(run, tmp_path, small):
    """OUT under folders that did not exist: a run refused on its input (NaN pixels, a flat image)
    left them behind, empty (its lock made them)."""
    y = np.load(tmp_path / "y.npy")
    y[5, 5] = np.nan
    np.save(tmp_path / "nan.npy", y)
    np.save(tmp_path / "flat.npy", np.full((256, 256), 7.0, np.float32))
    # Each refused where the test means it to be, once its lock has made the folders (not earlier)
    nan, flat = "contains NaN or Inf", "every node of the PSF map is invalid"
    _refused(run("-q", "deconvolve", "nan.npy", "a/x.zarr", "--psf", "psf.npy", ok=False), nan)
    _refused(run("-q", "estimate", "flat.npy", "b/sub/x.zarr", ok=False), flat)
    _refused(run("-q", "run", "flat.npy", "c/sub/x.zarr", ok=False), flat)
    assert not any((tmp_path / d).exists() for d in "abc")
    (tmp_path / "d").mkdir()  # a folder that was there stays
    _refused(run("-q", "deconvolve", "nan.npy", "d/x.zarr", "--psf", "psf.npy", ok=False), nan)
    assert (tmp_path / "d").is_dir()


def test_a_result_moved_aside_by_a_killed_write_is_back_before_any_work(run, tmp_path, small, no_work):
    """A write killed between moving the old OUT aside and moving the new one in: the next run finds
    OUT there again (put back), and refuses it without --overwrite before doing anything."""
    run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1)
    (tmp_path / "d.zarr").rename(tmp_path / ".d.zarr.old-0dead0")
    (tmp_path / "d.png").unlink()
    no_work.clear()
    _refused(run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1, ok=False),
             "d.zarr already exists; pass --overwrite")
    assert not no_work and lsfov.open_result(tmp_path / "d.zarr").deblurred.shape == (128, 128)
    assert not list(tmp_path.glob(".d.zarr*"))


def test_demo_never_replaces_someones_file_where_its_figure_goes(run, tmp_path, monkeypatch):
    def work(*a, **k):
        raise RuntimeError("the demo started its work")

    monkeypatch.setattr(sim, "tilted_surface", work)
    (tmp_path / "d.png").write_bytes(b"someone's picture")
    _refused(run("demo", "--out", "d.zarr", "--size", 512, ok=False), "d.png, where the preview of OUT goes, is a "
             "file lsfov did not make; move it, or name OUT otherwise")  # (not "pass --overwrite", which would not do)
    assert (tmp_path / "d.png").read_bytes() == b"someone's picture"


def test_a_figure_path_that_is_an_empty_directory_is_refused_before_any_work(run, tmp_path, no_work):
    np.save(tmp_path / "img.npy", (sim.sample_image("coins", (256, 256)) * 500 + 20).astype(np.float32))
    (tmp_path / "f.png").mkdir()  # empty: --overwrite could replace it, but a figure is a file
    res = run("estimate", "img.npy", "o.zarr", "--figure", "f.png", "--overwrite", ok=False)
    _refused(res, "--figure f.png is a directory; name a PNG file")
    assert not no_work and (tmp_path / "f.png").is_dir() and not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("blur", ["--operator", "--psf-map"])
def test_deconvolve_never_overwrites_its_blur_input(run, tmp_path, small, blur, no_work):
    if blur == "--psf-map":  # any lsfov result is replaceable by --overwrite: a PSF map too
        import xarray as xr

        lsfov.save(xr.Dataset({"focus": (("gy", "gx"), np.zeros((2, 2), np.float32))}, attrs={"psf_model": "Z3"}),
                   tmp_path / "m.zarr")
        name = "m.zarr"
    else:
        name = "op.zarr"
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / name).rglob("*"))
    _refused(run("deconvolve", "y.npy", name, blur, name, "--iterations", 1, "--overwrite", ok=False), "is the input")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / name).rglob("*")) == before and not no_work


# ------------------------------------------------------------------------------- option checks


@pytest.mark.parametrize("tv", ["0.25", "-0.1"])
@pytest.mark.parametrize("cmd", ["deconvolve", "run"])
def test_tv_outside_its_range_is_refused_before_any_work(run, small, tv, cmd, no_work):
    args = ["--psf", "psf.npy"] if cmd == "deconvolve" else []
    _refused(run(cmd, "y.npy", "o.zarr", *args, "--tv", tv, "--iterations", 1, ok=False), f"--tv {float(tv)} must be in [0, 0.25)")
    assert not no_work


@pytest.mark.parametrize("px", ["nan", "inf"])
@pytest.mark.parametrize("cmd", ["deconvolve", "estimate"])
def test_pixel_size_that_is_no_number_is_refused(run, small, px, cmd, no_work):
    args = ["--psf", "psf.npy"] if cmd == "deconvolve" else []
    _refused(run(cmd, "y.npy", "o.zarr", *args, "--pixel-um", px, ok=False), f"--pixel-um {float(px)} must be a pixel size")
    assert not no_work


# ------------------------------------------------------------------------------- defaults reach the work


@pytest.mark.parametrize("cmd, default", [("deconvolve", "threads"), ("estimate", "threads"), ("run", "threads"),
                                          ("demo", "local")])
def test_scheduler_defaults(run, small, monkeypatch, cmd, default):
    import lsfov.cluster

    def use_scheduler(spec, **kw):
        raise ValueError(f"scheduler {spec!r} asked")

    monkeypatch.setattr(lsfov.cluster, "use_scheduler", use_scheduler)
    if cmd == "demo":
        args = ["demo", "--size", 512]
    else:
        args = [cmd, "y.npy", "o.zarr", *(["--psf", "psf.npy"] if cmd == "deconvolve" else [])]
    _refused(run(*args, ok=False), f"scheduler {default!r} asked")


# ------------------------------------------------------------------------------- messages


def test_quiet_silences_the_warnings_of_its_command(run, tmp_path):
    tifffile.imwrite(tmp_path / "half.ome.tif", np.random.default_rng(1).random((96, 120)).astype(np.float32),
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    for quiet, out in ((False, "a.zarr"), (True, "b.zarr")):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            run(*(["-q"] if quiet else []), "simulate", "blur", "half.ome.tif", out, "--model", "Z1", "--grid", 2)
        heard = [w for w in said if "µm pixels but Z1's PSFs" in str(w.message)]
        assert bool(heard) != quiet, (quiet, [str(w.message) for w in said])


def test_info_takes_a_shipped_model_name_in_any_case(run):
    assert "PSFRegressor(G2" in run("info", "g2").output


def _kept_message_case(run, tmp_path, monkeypatch, error):
    from lsfov.restore import chunked

    calls = []
    real = chunked._block

    def block(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # in the second exchange: the first one's marks are kept
            raise error
        return real(*a, **k)

    monkeypatch.setattr(chunked, "_block", block)
    res = run("deconvolve", "y.npy", "d.zarr", "--operator", "op.zarr", "--iterations", 3, "--chunks", 64,
              "--exchange-every", 1, "--scheduler", "synchronous", ok=False)
    assert list((tmp_path / ".d.zarr.scratch").glob("*/done/*")), res.output
    return res


def test_work_is_said_kept_only_where_some_is(tmp_path):
    """The input's copy and the first state are no work done: --resume would start over."""
    from lsfov.cli import _work_kept

    done = tmp_path / "lsfov-tvrl-0" / "done"
    (done / "x0.blocks").mkdir(parents=True)
    (done / "y").touch()
    assert not _work_kept(tmp_path)
    (done / "x0.blocks" / "1.2").touch()  # a block's iterations
    assert _work_kept(tmp_path)
    (done / "x0.blocks" / "1.2").unlink()
    (done / "x1").touch()  # an exchange's, every block
    assert _work_kept(tmp_path)


def test_work_kept_after_a_failure_is_said_once(run, tmp_path, small, monkeypatch):
    """A crash (an error, a worker lost) says the run stopped; a bad input found late has its own line
    (the error) and says no more."""
    res = _kept_message_case(run, tmp_path, monkeypatch, RuntimeError("power cut"))
    assert "stopped; the work done so far is kept in" in res.output and "--resume" in res.output, res.output
    res = _kept_message_case(run, tmp_path, monkeypatch, ValueError("found late"))
    assert res.exit_code == 1 and "found late" in res.output
    assert "the work done so far is kept in" in res.output and "stopped; " not in res.output, res.output
    # workers refused for memory (on --resume, before any work of this run): no "stopped" either
    res = _kept_message_case(run, tmp_path, monkeypatch, MemoryError("no room on the workers"))
    assert res.exit_code == 1 and "no room on the workers" in res.output
    assert "the work done so far is kept in" in res.output and "stopped; " not in res.output, res.output


# ------------------------------------------------------------------------------- simulate


def test_simulate_beads_passes_every_option_to_the_simulation(run, tmp_path):
    run("simulate", "beads", "b.zarr", "--size", 96, "--n-beads", 5, "--grid", 3, "--pixel-um", 0.2, "--seed", 4)
    ds = lsfov.open_result(tmp_path / "b.zarr")
    b = sim.bead_field((96, 96), 5, seed=4, grid=3, pixel_um=0.2)
    np.testing.assert_array_equal(ds.image.values, b.image.astype(np.float32))
    assert ds.attrs["n_beads"] == 5 and ds.attrs["seed"] == 4 and ds.depth.shape == (3, 3)
    assert float(ds.image.x[1] - ds.image.x[0]) == pytest.approx(0.2)
    run("simulate", "beads", "c.zarr", "--size", 96, "--n-beads", 5, "--grid", 3, "--pixel-um", 0.2, "--seed", 5)
    assert not np.array_equal(lsfov.open_result(tmp_path / "c.zarr").image.values, ds.image.values)
    run("simulate", "beads", "d.zarr", "--size", 64, "--n-beads", 2, "--grid", 100)  # a grid finer than the pixels
    d = lsfov.open_result(tmp_path / "d.zarr")
    assert d.depth.shape == (64, 64) and d.attrs["grid"] == 64  # recorded as made


def test_simulate_blur_passes_every_option_to_the_simulation(run, tmp_path):
    sharp = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    np.save(tmp_path / "sharp.npy", sharp)
    run("simulate", "blur", "sharp.npy", "o.zarr", "--model", "G2", "--grid", 3, "--photons", 50, "--read-noise", 5,
        "--seed", 2)
    out = lsfov.open_result(tmp_path / "o.zarr")
    op, params = sim.psf_field(sharp.shape, "G2", (3, 3), seed=2)
    np.testing.assert_allclose(out.blurred.values, sim.degrade(sharp, op, photons=50, read_noise=5, seed=2), rtol=1e-6)
    assert out.sigma_x.shape == (3, 3)


def test_simulate_blur_of_non_square_pixels_places_its_true_map_on_the_image(run, tmp_path):
    """Pixels of 0.2 x 0.1 µm: the true map's nodes were in pixels beside an image in µm (a viewer
    drew the map 5x too large), and a pupil model relabelled x from 0.1 to 0.2 µm without a word."""
    import xarray as xr

    um = {"units": "micrometer"}
    img = xr.DataArray(sim.sample_image("cell", (200, 300)), dims=("y", "x"),
                       coords={"y": ("y", 0.2 * np.arange(200), um), "x": ("x", 0.1 * np.arange(300), um)})
    lsfov.save(img, tmp_path / "a.zarr")
    run("simulate", "blur", "a.zarr/image", "g.zarr", "--model", "G2", "--grid", 2)
    r = lsfov.open_result(tmp_path / "g.zarr")
    assert r.gy.attrs["units"] == r.gx.attrs["units"] == "micrometer"
    assert float(r.gy[-1]) < float(r.y[-1]) and float(r.gx[-1]) < float(r.x[-1])  # on the image
    np.testing.assert_allclose([float(r.gy[1] - r.gy[0]), float(r.gx[1] - r.gx[0])], [20.0, 15.0])
    with pytest.warns(lsfov.LsfovWarning, match=r"has 0.2 x 0.1 µm \(y x\) pixels but Z3's PSFs are those of 0.2 µm"):
        run("simulate", "blur", "a.zarr/image", "z.zarr", "--model", "Z3", "--grid", 2)


def test_simulate_blur_takes_a_plane_of_a_stack(run, tmp_path):
    stack = np.random.default_rng(0).random((3, 48, 48)).astype(np.float32)
    np.save(tmp_path / "stack.npy", stack)
    run("simulate", "blur", "stack.npy", "o.zarr", "--model", "G2", "--grid", 2, "--z", 1)
    out = lsfov.open_result(tmp_path / "o.zarr")
    assert out.attrs["plane"] == {"z": 1}
    op, _ = sim.psf_field((48, 48), "G2", (2, 2), seed=0)
    np.testing.assert_allclose(out.blurred.values, sim.degrade(stack[1], op, seed=0), rtol=1e-6)


@pytest.mark.filterwarnings("ignore:.*PSF-map nodes are marked invalid:lsfov.LsfovWarning")
def test_every_command_reads_the_image_of_an_ome_tiff_that_series_picks(run, tmp_path):
    """--series picks one image (a stage position) of an OME-TIFF of several; the result says which."""
    import tifffile

    pytest.importorskip("torch")
    a, b = (sim.sample_image(name, (160, 160)) * 3000 + 100 for name in ("coins", "cell"))
    with tifffile.TiffWriter(tmp_path / "pos.ome.tif", ome=True) as tw:
        for img in (a, b):
            tw.write(img.astype(np.uint16), metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2})
    np.save(tmp_path / "psf.npy", lsfov.psf.gaussian(1.5, size=15))
    assert "choose one with series= (--series)" in run("deconvolve", "pos.ome.tif", "x.zarr", "--psf", "psf.npy",
                                                       ok=False).output
    tifffile.imwrite(tmp_path / "b.ome.tif", b.astype(np.uint16), metadata={"axes": "YX", "PhysicalSizeX": 0.2,
                                                                             "PhysicalSizeY": 0.2})
    for args, var in ((["deconvolve", "IN", "d.zarr", "--psf", "psf.npy", "--iterations", 1], "deblurred"),
                      (["estimate", "IN", "e.zarr"], "focus"), (["run", "IN", "r.zarr", "--iterations", 1], "deblurred"),
                      (["simulate", "blur", "IN", "s.zarr", "--grid", 1], "blurred")):
        at = args.index("IN")
        run("-q", *(a if a != "IN" else "pos.ome.tif" for a in args), "--series", 1)
        run("-q", *(a if a != "IN" else "b.ome.tif" for a in args[:at + 1]), "b_" + args[at + 1], *args[at + 2:])
        out, alone = (lsfov.open_result(tmp_path / f) for f in (args[at + 1], "b_" + args[at + 1]))
        assert out.attrs["plane"] == {"series": 1}, args
        np.testing.assert_array_equal(out[var].values, alone[var].values)  # image 1's pixels, none other's


def test_simulate_blur_never_overwrites_the_store_it_reads(run, tmp_path):
    run("simulate", "beads", "b.zarr", "--size", 64, "--grid", 2)
    before = lsfov.open_result(tmp_path / "b.zarr").image.values.copy()
    _refused(run("simulate", "blur", "b.zarr/image", "b.zarr", "--model", "G2", "--overwrite", ok=False), "is the input")
    ds = lsfov.open_result(tmp_path / "b.zarr")
    assert ds.attrs["command"] == "lsfov simulate beads"
    np.testing.assert_array_equal(ds.image.values, before)


# ------------------------------------------------------------------------------- deconvolve, estimate, run


def test_deconvolve_labels_the_result_with_the_pixel_size_given(run, tmp_path, small):
    run("-q", "deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1, "--pixel-um", 0.3)
    d = lsfov.open_result(tmp_path / "d.zarr").deblurred
    assert d.x.attrs["units"] == "micrometer" and float(d.x[1] - d.x[0]) == pytest.approx(0.3)


def test_deconvolve_and_run_subtract_the_cameras_offset(run, tmp_path, small):
    """``--background`` is the API's ``background=``: the offset subtracted (recorded in the result's
    attributes); the CNN map of ``run`` does not see it (each patch is read less its mean)."""
    pytest.importorskip("torch")
    counts = (np.load(tmp_path / "y.npy") + 100).astype(np.uint16)
    np.save(tmp_path / "c.npy", counts)
    run("-q", "deconvolve", "c.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 3, "--background", 100)
    d = lsfov.open_result(tmp_path / "d.zarr")
    assert d.attrs["background"] == 100
    np.testing.assert_allclose(d.deblurred.values, lsfov.deconvolve(counts, small, 3, background=100),
                               atol=1e-5 * float(d.deblurred.max()))
    sample = sim.tilted_surface((192, 192), depth_range_um=(-8, 8), grid=3, seed=5).image
    np.save(tmp_path / "s.npy", (np.rint(sample) + 100).astype(np.uint16))
    run("-q", "run", "s.npy", "r.zarr", "--iterations", 2, "--background", 100)
    run("-q", "run", "s.npy", "k.zarr", "--iterations", 2)
    r, k = (lsfov.open_result(tmp_path / n) for n in ("r.zarr", "k.zarr"))
    assert (r.attrs["background"], k.attrs["background"]) == (100, 0)
    np.testing.assert_array_equal(r.focus.values, k.focus.values)
    assert not np.allclose(r.deblurred.values, k.deblurred.values)
    assert "camera offset 100 subtracted" in run("info", "d.zarr").output
    assert "camera offset" not in run("info", "k.zarr").output
    for command in (("deconvolve", "c.npy", "e.zarr", "--psf", "psf.npy"), ("run", "c.npy", "e.zarr")):
        refused = run("-q", *command, "--background", -5, ok=False)
        assert refused.exit_code == 1 and refused.output.strip() == (
            "Error: --background -5: give the camera's offset, 0 or more counts (the mean of a frame taken with the "
            "shutter closed; 0: none)")
    assert not (tmp_path / "e.zarr").exists()


def test_deconvolve_censors_the_cameras_saturated_pixels(run, tmp_path, small):
    """An integer image's largest count is its camera's clip (``lsfov.deconvolve``'s default);
    ``--saturation`` gives another level, and one above every pixel turns the rule off."""
    op = lsfov.ProductConvolution.from_psf(np.load(tmp_path / "psf.npy"), (128, 128))
    y = op.apply(sim.sample_image("hubble", (128, 128)))
    counts = np.minimum(y / (0.4 * y.max()) * 65535, 65535).astype(np.uint16)  # point sources, clipped
    np.save(tmp_path / "c.npy", counts)
    run("-q", "deconvolve", "c.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 20, "--tv", 0)
    run("-q", "deconvolve", "c.npy", "off.zarr", "--psf", "psf.npy", "--iterations", 20, "--tv", 0,
        "--saturation", 65536)
    d, off = (lsfov.open_result(tmp_path / n) for n in ("d.zarr", "off.zarr"))
    assert d.attrs["saturation"] == 65535 and off.attrs["saturation"] == 65536
    censored, plain = lsfov.deconvolve(counts, op, 20, tv=0), lsfov.deconvolve(counts, op, 20, tv=0, saturation=False)
    tol = 1e-5 * plain.max()  # the CLI's chunked path against the whole array's
    np.testing.assert_allclose(d.deblurred.values, censored, atol=tol)
    np.testing.assert_allclose(off.deblurred.values, plain, atol=tol)
    assert np.abs(censored - plain).max() > 100 * tol


@pytest.mark.filterwarnings("ignore:.*PSF-map nodes are marked invalid:lsfov.LsfovWarning")
def test_deconvolve_with_a_psf_map_and_run_censor_at_the_maps_level(run, tmp_path):
    """`lsfov deconvolve --psf-map` takes the map's camera level, as `lsfov run` does: none for a map
    made with --max-saturated 1 (an image stretched to its type's range) unless --saturation gave one;
    --saturation overrides."""
    pytest.importorskip("torch")
    img = sim.tilted_surface((256, 256), depth_range_um=(-6, 6), texture="immunohistochemistry", grid=3, seed=5).image
    np.save(tmp_path / "s.npy", np.minimum(img / np.percentile(img, 98) * 65535, 65535).astype(np.uint16))
    run("-q", "estimate", "s.npy", "m.zarr", "--max-saturated", 1)
    run("-q", "deconvolve", "s.npy", "d.zarr", "--psf-map", "m.zarr", "--iterations", 2)
    assert lsfov.open_result(tmp_path / "d.zarr").attrs["saturation"] is None
    run("-q", "deconvolve", "s.npy", "e.zarr", "--psf-map", "m.zarr", "--iterations", 2, "--saturation", 60000)
    assert lsfov.open_result(tmp_path / "e.zarr").attrs["saturation"] == 60000
    run("-q", "estimate", "s.npy", "n.zarr")
    run("-q", "deconvolve", "s.npy", "f.zarr", "--psf-map", "n.zarr", "--iterations", 2)
    assert lsfov.open_result(tmp_path / "f.zarr").attrs["saturation"] == 65535
    assert "saturation level 65535" in run("info", "f.zarr").output
    # lsfov run: the same rule
    run("-q", "run", "s.npy", "r.zarr", "--iterations", 1, "--max-saturated", 1)
    assert lsfov.open_result(tmp_path / "r.zarr").attrs["censored_at"] is None
    run("-q", "run", "s.npy", "t.zarr", "--iterations", 1, "--max-saturated", 1, "--saturation", 60000)
    assert lsfov.open_result(tmp_path / "t.zarr").attrs["censored_at"] == 60000
    # The level given with --max-saturated 1 is the map's too: its --psf-map deconvolution is run's.
    assert lsfov.open_result(tmp_path / "t.zarr").attrs["saturation"] == 60000
    run("-q", "estimate", "s.npy", "g.zarr", "--max-saturated", 1, "--saturation", 60000)
    assert lsfov.open_result(tmp_path / "g.zarr").attrs["saturation"] == 60000
    run("-q", "deconvolve", "s.npy", "h.zarr", "--psf-map", "g.zarr", "--iterations", 1)
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "h.zarr").deblurred.values,
                                  lsfov.open_result(tmp_path / "t.zarr").deblurred.values)


def test_estimate_and_run_pass_their_options_to_the_map_and_the_deconvolution(run, tmp_path):
    pytest.importorskip("torch")
    np.save(tmp_path / "img.npy", sim.tilted_surface((192, 192), depth_range_um=(-8, 8), grid=3, seed=5).image)
    run("-q", "estimate", "img.npy", "m.zarr", "--pixel-um", 0.15)
    m = lsfov.open_result(tmp_path / "m.zarr")
    assert m.attrs["pixel_um"] == pytest.approx(0.15) and m.gy.attrs["units"] == "micrometer"
    run("-q", "run", "img.npy", "r.zarr", "--iterations", 1, "--tv", 0.01, "--symmetrize", "--pixel-um", 0.15)
    r = lsfov.open_result(tmp_path / "r.zarr")
    assert (r.attrs["iterations"], r.attrs["tv"], r.attrs["symmetrize"]) == (1, 0.01, 1)
    assert float(r.raw.x[1] - r.raw.x[0]) == pytest.approx(0.15)


# ------------------------------------------------------------------------------- bss


@pytest.fixture
def subspace(tmp_path):
    """A learned subspace (sub.zarr) and a bead image (b.npy) of it."""
    from lsfov.calibrate import learn_subspace

    fields = sim.bead_stack(3, (192, 192), seed=8)
    learn_subspace([f.image for f in fields], 3, 3).save(tmp_path / "sub.zarr")
    np.save(tmp_path / "b.npy", fields[1].image)


@pytest.mark.parametrize("args, msg", [
    (["--chunks", 4], "--chunks 4 is too small"),
    (["--iterations", 0], "--iterations 0: give a positive number"),
    (["--gamma1", -1], "--gamma1 -1.0 must be a weight >= 0"),
    (["--gamma2", "nan"], "--gamma2 nan must be a weight >= 0"),
    (["--pixel-um", 0], "--pixel-um 0.0 must be a pixel size"),
])
def test_bss_options_are_checked_before_the_subspace_is_read(run, tmp_path, args, msg):
    np.save(tmp_path / "b.npy", np.ones((64, 64), np.float32))
    _refused(run("bss", "b.npy", "o.zarr", "--subspace", "nothing.zarr", *args, ok=False), msg)
    assert not (tmp_path / "o.zarr").exists()


def test_bss_never_overwrites_its_subspace(run, tmp_path):
    np.save(tmp_path / "b.npy", np.ones((64, 64), np.float32))
    (tmp_path / "sub.zarr").mkdir()
    (tmp_path / "sub.zarr" / "zarr.json").write_text("{}")  # a zarr store: what --overwrite may replace
    _refused(run("bss", "b.npy", "sub.zarr", "--subspace", "sub.zarr", "--overwrite", ok=False), "is the input")
    assert (tmp_path / "sub.zarr" / "zarr.json").read_text() == "{}"


def test_bss_passes_iterations_and_pixel_size(run, tmp_path, subspace, monkeypatch):
    import lsfov.restore

    seen = []
    real = lsfov.restore.sparse_smooth_deblur

    def solver(*a, **k):
        seen.append((k["iterations"], k["saturation"]))
        return real(*a, **k)

    monkeypatch.setattr(lsfov.restore, "sparse_smooth_deblur", solver)
    run("-q", "bss", "b.npy", "o.zarr", "--subspace", "sub.zarr", "--iterations", 7, "--pixel-um", 0.3)
    assert seen == [(7, None)]  # the camera's clip, found by the API from the image (a float one has none)
    r = lsfov.open_result(tmp_path / "o.zarr")
    assert r.attrs["iterations"] == 7 and float(r.raw.x[1] - r.raw.x[0]) == pytest.approx(0.3)
    assert float(r.sparse.x[1] - r.sparse.x[0]) == pytest.approx(0.3)
    run("-q", "bss", "b.npy", "s.zarr", "--subspace", "sub.zarr", "--iterations", 7, "--saturation", 5000)
    assert seen[-1] == (7, 5000) and lsfov.open_result(tmp_path / "s.zarr").attrs["saturation"] == 5000


# ------------------------------------------------------------------------------- calibrate


@pytest.fixture
def beads(tmp_path):
    fields = sim.bead_stack(2, (256, 256), seed=3)
    np.save(tmp_path / "b0.npy", fields[0].image)
    return fields


def test_calibrate_passes_smoothing_zero_and_the_radius(run, tmp_path, beads):
    run("-q", "calibrate", "b0.npy", "op.zarr", "--n-basis", 3, "--smoothing", 0, "--radius", 9)
    a = lsfov.ProductConvolution.load(tmp_path / "op.zarr").attrs
    assert a["smoothing"] == 0 and a["radius_px"] == pytest.approx(9)


def test_calibrate_refuses_bead_images_of_different_shapes(run, tmp_path, beads):
    np.save(tmp_path / "b1.npy", beads[1].image[:200])
    _refused(run("calibrate", "b0.npy", "b1.npy", "sub.zarr", ok=False), "bead images differ in shape")


def test_calibrate_reads_the_channel_asked_and_never_overwrites_its_input(run, tmp_path, beads):
    import xarray as xr

    img = beads[0].image.astype(np.float32)
    tifffile.imwrite(tmp_path / "c.ome.tif", np.stack([np.zeros_like(img), img]), metadata={"axes": "CYX"})
    run("-q", "calibrate", "c.ome.tif", "c.zarr", "--n-basis", 3, "--channel", 1)
    run("-q", "calibrate", "b0.npy", "one.zarr", "--n-basis", 3)
    np.testing.assert_allclose(lsfov.ProductConvolution.load(tmp_path / "c.zarr").kernels,
                               lsfov.ProductConvolution.load(tmp_path / "one.zarr").kernels, rtol=1e-5, atol=1e-7)
    lsfov.save(xr.Dataset({"image": (("y", "x"), img)}), tmp_path / "beads.zarr")
    _refused(run("calibrate", "beads.zarr/image", "beads.zarr", "--overwrite", ok=False), "is the input")
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "beads.zarr/image").values, img)


def test_calibrate_checks_its_figure_before_any_work(run, tmp_path, beads):
    _refused(run("calibrate", "b0.npy", "op.zarr", "--figure", "fig.tif", ok=False),
             "figures are PNG, PDF or SVG files; name it fig.png")
    (tmp_path / "fig.png").write_bytes(b"someone's picture")
    _refused(run("calibrate", "b0.npy", "op.zarr", "--figure", "fig.png", ok=False), "fig.png already exists")
    assert not (tmp_path / "op.zarr").exists() and (tmp_path / "fig.png").read_bytes() == b"someone's picture"


# ------------------------------------------------------------------------------- train, evaluate


@pytest.mark.parametrize("args, msg", [
    (["train", "--synthesize", 8, "s.zarr", "m.pt"], "with --synthesize give only the output training set"),
    (["train", "--stream", 8, "m.pt", "--resume"], "a stream has no set"),
    (["train", "--stream", 8, "m.pt", "--checkpoint", "ck"], "a stream has no set"),
    (["train", "--stream", 8, "m.pt", "--epochs", 3], "--epochs count passes over a training set; a stream shows"),
    (["train", "--stream", 8, "m.pt", "--patience", 2, "--epochs", 20], "--epochs and --patience count passes"),
    (["evaluate", "Z3"], "give a test set DATA"),
])
def test_train_and_evaluate_refuse_options_that_do_not_go_together(run, tmp_path, args, msg):
    _refused(run(*args, ok=False), msg)
    assert not [p for p in tmp_path.iterdir()]


def test_train_passes_seed_checkpoint_and_epochs(run, tmp_path):
    pytest.importorskip("torch")
    from lsfov.estimate.synth import open_training_set

    run("-q", "train", "--synthesize", 48, "--psf-model", "G1", "--seed", 3, "tr.zarr")
    assert open_training_set(tmp_path / "tr.zarr")["attrs"]["seed"] == 3
    run("-q", "train", "tr.zarr", "m.pt", "--arch", "compact", "--epochs", 2, "--lr", "1e-3", "--batch-size", 16,
        "--checkpoint", "ck")
    assert (tmp_path / "ck" / "last.pt").exists() and not (tmp_path / "m.ckpt").exists()
    assert lsfov.load_model(tmp_path / "m.pt").meta["training"]["epochs_run"] == 2
    # nothing goes into an input, nor is a training set its own test
    for args, msg in ((["--checkpoint", "tr.zarr/ck"], "--checkpoint tr.zarr/ck is (or is inside) an input"),
                      (["--checkpoint", "tr.zarr/sub/ck"], "--checkpoint tr.zarr/sub/ck is (or is inside) an input"),
                      (["--test", "tr.zarr"], "--test tr.zarr is a training set of this run")):
        _refused(run("train", "tr.zarr", "n.pt", "--arch", "compact", *args, ok=False), msg)
    _refused(run("train", "tr.zarr", "tr.zarr/n.pt", ok=False), "tr.zarr/n.pt is inside the input")
    # (refused before the checkpoints' lock is taken, which would make their folder's parent)
    assert not (tmp_path / "tr.zarr" / "ck").exists() and not (tmp_path / "tr.zarr" / "sub").exists()
    assert not (tmp_path / "n.pt").exists()
    run("-q", "train", "--synthesize", 48, "--psf-model", "G1", "--split", "test", "te.zarr")
    with pytest.warns(lsfov.LsfovWarning, match="training on a set of the test split"):
        run("train", "te.zarr", "t.pt", "--arch", "compact", "--epochs", 1, "--lr", "1e-3", "--batch-size", 16)


def test_evaluate_figure_is_a_picture_file(run, tmp_path):
    _refused(run("evaluate", "Z3", "--robustness", 5, "--figure", "rob.tif", ok=False),
             "figures are PNG, PDF or SVG files; name it rob.png")
    assert not (tmp_path / "rob.tif").exists()


def test_train_on_a_stream_uses_the_learning_rate_given(run, tmp_path):
    pytest.importorskip("torch")
    run("-q", "train", "--stream", 32, "--psf-model", "G1", "--arch", "compact", "--batch-size", 16, "--lr", "0.002",
        "s.pt")
    assert lsfov.load_model(tmp_path / "s.pt").meta["training"]["lr"] == 0.002


def test_train_on_a_stream_takes_the_apis_batch_size(run, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from lsfov.estimate import stream

    seen = {}

    def fake(st, **kw):
        seen.update(kw)
        raise ValueError("stopped here")

    monkeypatch.setattr(stream, "train_stream", fake)
    _refused(run("train", "--stream", 512, "--psf-model", "G1", "d.pt", ok=False), "stopped here")
    assert seen and "batch_size" not in seen  # reached; its default, 256, as the help says
    _refused(run("train", "--stream", 512, "--psf-model", "G1", "--batch-size", 32, "d.pt", ok=False), "stopped here")
    assert seen["batch_size"] == 32


def test_a_stream_from_an_init_model_draws_that_models_ranges_and_optics(run, tmp_path):
    """A model of one's own optics fine-tuned on a stream stays a model of those optics (the stream
    once drew the defaults, and the model came out labelled and scaled for them)."""
    pytest.importorskip("torch")
    import dataclasses

    from lsfov.estimate.model import PSFRegressor

    g1 = dataclasses.replace(lsfov.psf.MODELS["G1"], ranges={"sigma": (0.8, 2.5)})
    PSFRegressor(g1, "compact").save(tmp_path / "mine.pt")
    run("-q", "train", "--stream", 32, "s.pt", "--init", "mine.pt", "--batch-size", 16)
    assert lsfov.load_model(tmp_path / "s.pt").ranges == {"sigma": (0.8, 2.5)}
    # from a set of other ranges: said (the init's weights read other PSFs)
    from lsfov.estimate import training

    with pytest.warns(lsfov.LsfovWarning, match=r"sigma \[0.5, 4.0\] \(against \[0.8, 2.5\]\)"):
        training.warn_other_task(lsfov.load_model(tmp_path / "mine.pt"), lsfov.psf.MODELS["G1"].to_meta(), "the set")


# ------------------------------------------------------------------------------- what is said in the log


def test_resume_with_nothing_to_resume_says_it_starts_over(run, small, lsfov_log):
    with lsfov_log() as said:
        run("deconvolve", "y.npy", "d.zarr", "--psf", "psf.npy", "--iterations", 1, "--resume")
    assert any("nothing to resume in" in m and "starting from the beginning" in m for m in said), said


def test_a_psf_map_of_another_plane_of_the_same_file_is_said(run, tmp_path, lsfov_log, monkeypatch):
    """Whatever folder each command runs in: the map records its image's absolute path."""
    pytest.importorskip("torch")
    img = sim.tilted_surface((192, 192), depth_range_um=(-8, 8), grid=3, seed=5).image
    np.save(tmp_path / "stack.npy", np.stack([img, img[::-1]]))
    run("-q", "estimate", "stack.npy", "m.zarr", "--z", 0)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # (a batch job starts in $HOME)
    with lsfov_log() as said:
        run("deconvolve", "../stack.npy", "d0.zarr", "--psf-map", "../m.zarr", "--z", 0, "--iterations", 1)
    assert not any("PSF map" in m for m in said), said
    with lsfov_log() as said:
        run("deconvolve", "../stack.npy", "d1.zarr", "--psf-map", "../m.zarr", "--z", 1, "--iterations", 1)
    assert any(f"was read from {tmp_path / 'stack.npy'} (plane" in m and "right only if both share the blur" in m
               for m in said), said


@pytest.mark.parametrize("args", [["simulate", "beads", "b.zarr", "--size", 64, "--seed", -1], ["demo", "--seed", -1],
                                  ["train", "--synthesize", 0, "t.zarr"], ["estimate", "y.npy", "m.zarr", "--stride", 0],
                                  ["calibrate", "y.npy", "o.zarr", "--n-basis", 0],
                                  ["deconvolve", "y.npy", "o.zarr", "--psf", "psf.npy", "--exchange-every", 0],
                                  # before, refused by the API naming its own argument (n_beads, shape, patches, ...)
                                  ["simulate", "beads", "b.zarr", "--size", 0], ["simulate", "beads", "b.zarr", "--n-beads", -1],
                                  ["simulate", "beads", "b.zarr", "--grid", 0], ["simulate", "beads", "b.zarr", "--pixel-um", 0],
                                  ["simulate", "blur", "y.npy", "b.zarr", "--grid", 0],
                                  ["simulate", "blur", "y.npy", "b.zarr", "--photons", 0],
                                  ["simulate", "blur", "y.npy", "b.zarr", "--read-noise", -1],
                                  ["calibrate", "y.npy", "o.zarr", "--n-space", 0],
                                  ["calibrate", "y.npy", "o.zarr", "--smoothing", -1],
                                  # before, refused after the beads were sought, naming the API's argument
                                  ["calibrate", "y.npy", "o.zarr", "--radius", -1],
                                  ["calibrate", "y.npy", "o.zarr", "--threshold", 0],
                                  ["bss", "y.npy", "o.zarr", "--subspace", "s.zarr", "--threshold", -1],
                                  ["train", "--stream", 0, "m.pt"], ["train", "--synthesize", 8, "--workers", 0, "t.zarr"],
                                  ["train", "t.zarr", "m.pt", "--epochs", 0], ["train", "t.zarr", "m.pt", "--batch-size", 0],
                                  ["train", "t.zarr", "m.pt", "--lr", 0], ["train", "t.zarr", "m.pt", "--patience", 0],
                                  ["train", "t.zarr", "m.pt", "--minutes", 0]])
def test_counts_out_of_range_are_named_by_their_option(run, tmp_path, small, args):
    res = run(*args, ok=False)
    option = next(a for a in args if str(a).startswith("--") and args[args.index(a) + 1] in (-1, 0))
    assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op.zarr", "psf.npy", "y.npy"]  # nothing written


def test_the_estimate_figure_shows_the_whole_image_from_a_pyramid_level(tmp_path):
    """The figure's overview comes from the coarsest level still large enough (not a strided read of
    every full-resolution chunk), of the plane that was mapped; without levels, from level 0."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    from lsfov.cli import _overview

    data = np.stack([np.full((600, 520), c, np.float32) for c in (1, 2)])  # channels 1 and 2
    root = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=3)
    write_image(data, root, axes="cyx", fmt=FormatV05(), scale_factors=[2, 4, 8])  # 300, 150, 75 rows
    for level, mark in ((1, 30), (2, 40)):  # a level's pixels say which it is
        zarr.open_array(str(tmp_path / "p.zarr" / f"s{level}"), mode="r+")[1] = mark
    img = lsfov.open_image(tmp_path / "p.zarr", channel=1)
    view = _overview(tmp_path / "p.zarr", img, edge=128, channel=1)
    assert view.shape == (150, 130) and np.all(view == 40)  # level 2, not level 3 (75 < 128)
    assert np.all(_overview(tmp_path / "p.zarr", img, edge=200, channel=1) == 30)  # level 1, strided
    np.save(tmp_path / "a.npy", data[1])
    flat = lsfov.open_image(tmp_path / "a.npy")
    assert _overview(tmp_path / "a.npy", flat, edge=128).shape == (150, 130)  # level 0, strided by 4
