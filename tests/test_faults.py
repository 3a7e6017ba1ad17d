"""Faults and determinism: interrupted and resumed runs, workers killed mid-run, out-of-memory
messages, and the same bytes whatever the chunking, the scheduler and the number of workers."""
import logging
import os
import re
import signal
import sys
import threading
import time
from types import SimpleNamespace
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest

import lsfov
from lsfov import operators
from lsfov import simulate as sim
from lsfov.restore import chunked


@pytest.fixture(scope="module")
def scene(blurred_cell):
    op, y, _ = blurred_cell
    return op, y


# ----------------------------------------------------------------------------------------- resume


def test_resume_computes_only_the_missing_blocks_and_gives_the_same_bytes(scene, tmp_path, count_calls, lsfov_log):
    op, y = scene
    dy = da.from_array(y, chunks=60)
    kw = dict(exchange_every=2, scratch=tmp_path / "s")
    with dask.config.set(scheduler="synchronous"):
        calls = count_calls(chunked, "_block")
        ref = lsfov.deconvolve(dy, op, 6, **kw).compute()
        total = len(calls)  # 3 exchanges x 16 blocks
        assert total == 3 * 16
        calls = count_calls(chunked, "_block", fail_at=16 + 9)  # dies in the second exchange, 8 blocks of it done
        with pytest.raises(RuntimeError, match="power cut"):
            lsfov.deconvolve(dy, op, 6, **kw)
        calls = count_calls(chunked, "_block")
        out = lsfov.deconvolve(dy, op, 6, resume=True, **kw).compute()
        assert len(calls) == total - 16 - 8
        np.testing.assert_array_equal(out, ref)
        # Without resume the state is discarded and everything runs again.
        calls = count_calls(chunked, "_block")
        np.testing.assert_array_equal(lsfov.deconvolve(dy, op, 6, **kw).compute(), ref)
        assert len(calls) == total
        # Another parameter is another run: resume must not pick up this one's state, and says so.
        for other in (dict(tv=0.0), dict(eps=2.0)):
            lsfov.deconvolve(dy, op, 6, **kw).compute()  # this run's state, complete
            calls = count_calls(chunked, "_block")
            with lsfov_log() as said:
                out = lsfov.deconvolve(dy, op, 6, resume=True, **other, **kw).compute()
            assert len(calls) == total, other
            assert any("is of another run" in m for m in said), said
            fresh = lsfov.deconvolve(y, op, 6, **other)
            np.testing.assert_allclose(out, fresh, rtol=1e-5, atol=1e-5 * fresh.max())
            assert np.abs(ref - fresh).max() > 1e-3 * fresh.max()  # (this run's result would not pass)


@pytest.fixture
def bars(monkeypatch):
    """The tqdm bars made, each drawn (to nowhere) even where progress is hidden."""
    import tqdm.auto

    made = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": open(os.devnull, "w")})
            made.append(self)
            self.peak = self.n

        def update(self, n=1):  # the highest count shown: a bar must not pass its total on the way
            out = super().update(n)
            self.peak = max(self.peak, self.n)
            return out

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    return made


@pytest.mark.parametrize("fail_at", [16 + 9, 32 + 9])  # dies in the second or the last exchange, 8 blocks of it done
def test_a_resumed_run_on_a_cluster_counts_its_progress_to_the_total(scene, tmp_path, count_calls, bars, capsys,
                                                                     fail_at):
    """On a cluster as here the bar moves block by block and is the only one (no Dask bar printed
    across it); it starts at the work already done, so an exchange half done before adds only its
    other half, and never counts a block done before again (the bar would pass its total)."""
    from distributed import Client, LocalCluster

    op, y = scene
    dy = da.from_array(y, chunks=60)
    kw = dict(exchange_every=2, scratch=tmp_path / "s")
    with dask.config.set(scheduler="synchronous"):
        count_calls(chunked, "_block", fail_at=fail_at)
        with pytest.raises(RuntimeError, match="power cut"):
            lsfov.deconvolve(dy, op, 6, **kw)
    count_calls(chunked, "_block")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        lsfov.deconvolve(dy, op, 6, resume=True, progress=True, **kw).compute()
    bar = [b for b in bars if b.unit == "block-it"][-1]  # the resumed run's
    assert bar.n == bar.total == 6 * 16 and bar.peak <= bar.total
    out, err = capsys.readouterr()
    assert "Completed" not in out + err  # distributed's text bar


@pytest.mark.parametrize("chunk", [60, 240])
def test_the_bar_reaches_the_total_on_threads_with_one_block_or_many(scene, tmp_path, bars, chunk):
    """With one block Dask fuses its task with the result's own, under another name: the bar still ends
    at the total, not at 0 % (what a batch job's log keeps)."""
    op, y = scene
    lsfov.deconvolve(da.from_array(y, chunks=chunk), op, 4, exchange_every=2, scratch=tmp_path / "s",
                     progress=True).compute()
    bar = [b for b in bars if b.unit == "block-it"][-1]
    assert bar.n == bar.total == 4 * (1 if chunk == 240 else 16)


def test_resume_never_picks_up_the_state_of_another_image(scene, tmp_path):
    """A mirror image has the shape, sum, minimum and maximum of the original: only its bytes tell
    the runs apart, and they do."""
    op, y = scene
    kw = dict(exchange_every=2, scratch=tmp_path / "s")
    flipped = np.ascontiguousarray(y[:, ::-1])
    with dask.config.set(scheduler="synchronous"):
        lsfov.deconvolve(da.from_array(y, chunks=60), op, 4, **kw).compute()
        out = lsfov.deconvolve(da.from_array(flipped, chunks=60), op, 4, resume=True, **kw).compute()
        fresh = lsfov.deconvolve(da.from_array(flipped, chunks=60), op, 4, exchange_every=2).compute()
    np.testing.assert_array_equal(out, fresh)


def test_a_relative_scratch_path_is_the_callers_wherever_the_workers_run(scene, tmp_path, monkeypatch):
    """Workers may run in another directory (a PBS job starts in $HOME): the state goes where the
    caller's relative path points."""
    from lsfov import cluster

    op, y = scene
    (tmp_path / "client").mkdir()
    (tmp_path / "worker").mkdir()
    real = cluster._compute

    def elsewhere(*a, run=real, **k):
        here = os.getcwd()
        os.chdir(tmp_path / "worker")
        try:
            return run(*a, **k)
        finally:
            os.chdir(here)

    monkeypatch.setattr(cluster, "_compute", elsewhere)
    monkeypatch.chdir(tmp_path / "client")
    with dask.config.set(scheduler="synchronous"):
        out = lsfov.deconvolve(da.from_array(y, chunks=60), op, 4, exchange_every=2, scratch="s").compute()
        lsfov.save(lsfov.io.with_pixel_size(da.from_array(y, chunks=60)).rename("image"), "in.zarr")  # written by "workers"
        back = lsfov.open_image("in.zarr/image")
        with dask.config.set(scheduler=lambda dsk, keys, **k: elsewhere(dsk, keys, run=dask.get, **k)):  # ... read
            np.testing.assert_array_equal(back.values, y)
    np.testing.assert_array_equal(out, lsfov.deconvolve(da.from_array(y, chunks=60), op, 4, exchange_every=2).compute())
    assert list((tmp_path / "client" / "s").glob("lsfov-tvrl-*")) and not any((tmp_path / "worker").iterdir())


def test_an_operator_rewritten_in_place_is_another_run(tmp_path):
    from lsfov import psf

    g = psf.gaussian(np.array([1.5, 2.5]), size=11)
    kernels = np.stack([g.mean(0), g[0] - g[1]])
    maps = np.stack([np.ones((64, 64)), np.zeros((64, 64))]).astype(np.float32)
    lsfov.ProductConvolution.from_basis(kernels, maps).save(tmp_path / "op.zarr")
    before = lsfov.ProductConvolution.load(tmp_path / "op.zarr").fingerprint
    assert lsfov.ProductConvolution.load(tmp_path / "op.zarr").fingerprint == before  # the same files
    maps[1] = 0.3
    lsfov.ProductConvolution.from_basis(kernels, maps).save(tmp_path / "op.zarr", overwrite=True)
    assert lsfov.ProductConvolution.load(tmp_path / "op.zarr").fingerprint != before


def test_psf_map_resume_regresses_only_the_missing_chunks(tmp_path, count_calls):
    from lsfov.estimate import mapping

    img = da.from_array(sim.sample_image("cell", (384, 384)), chunks=128)  # 9 chunks
    ref = lsfov.estimate_psf_map(img, "G1", stride=64)
    with dask.config.set(scheduler="synchronous"):
        count_calls(mapping, "_regress", fail_at=5, error=RuntimeError("node lost"))
        with pytest.raises(RuntimeError, match="node lost"):
            lsfov.estimate_psf_map(img, "G1", stride=64, scratch=tmp_path)
        calls = count_calls(mapping, "_regress")
        # Resumed in another process, where Dask names the image otherwise (a TIFF's zarr view has no
        # stable name): all 9 chunks were regressed again
        again = da.from_array(img.compute(), chunks=128, name="named-in-another-process")
        out = lsfov.estimate_psf_map(again, "G1", stride=64, scratch=tmp_path, resume=True)
        assert len(calls) == 9 - 4
        for name in ref.data_vars:
            np.testing.assert_array_equal(out[name].values, ref[name].values)
        calls = count_calls(mapping, "_regress")
        lsfov.estimate_psf_map(img, "G1", stride=96, scratch=tmp_path, resume=True)  # another run: all chunks
        assert len(calls) == 9
    with pytest.raises(ValueError, match="scratch"):
        lsfov.estimate_psf_map(img, "G1", resume=True)


def test_psf_map_resume_regresses_chunks_whose_pixels_changed(tmp_path, count_calls):
    # A zarr input edited in place keeps its Dask name: the run's key alone would hand back stale
    # nodes. Each chunk's file carries a digest of its pixels, so the edited chunks run again.
    import zarr

    from lsfov.estimate import mapping

    z = zarr.create_array(str(tmp_path / "img.zarr"), shape=(384, 384), chunks=(128, 128), dtype="f4")
    z[:] = sim.sample_image("cell", (384, 384))
    with dask.config.set(scheduler="synchronous"):
        count_calls(mapping, "_regress", fail_at=5, error=RuntimeError("node lost"))
        with pytest.raises(RuntimeError, match="node lost"):
            lsfov.estimate_psf_map(da.from_zarr(str(tmp_path / "img.zarr")), "G1", scratch=tmp_path / "s")
        z[:] = sim.sample_image("coins", (384, 384))  # every chunk edited, whichever 4 were done
        calls = count_calls(mapping, "_regress")
        out = lsfov.estimate_psf_map(da.from_zarr(str(tmp_path / "img.zarr")), "G1", scratch=tmp_path / "s",
                                     resume=True)
        assert len(calls) == 9  # the 4 chunks done before are regressed again too (stale: 5 calls)
        ref = lsfov.estimate_psf_map(da.from_zarr(str(tmp_path / "img.zarr")), "G1")
    for name in ref.data_vars:
        np.testing.assert_array_equal(out[name].values, ref[name].values)


def test_resume_needs_a_scratch_directory(scene):
    op, y = scene
    with pytest.raises(ValueError, match="scratch"):
        lsfov.deconvolve(da.from_array(y, chunks=100), op, 2, resume=True)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A folder with an image and operator, the `lsfov deconvolve` command line for them (OUT to
    name) and its uninterrupted result, made once for the signals below."""
    import subprocess
    import sys

    where = tmp_path_factory.mktemp("killed")
    sharp = sim.sample_image("cell", (256, 256))
    op, _ = sim.psf_field(sharp.shape, "Z3", (2, 2), seed=3, size=15)
    np.save(where / "y.npy", np.maximum(sim.degrade(sharp, op, photons=300, seed=1), 0))
    op.save(where / "op.zarr")
    cmd = [sys.executable, "-m", "lsfov", "deconvolve", "y.npy", "OUT", "--operator", "op.zarr",
           "--iterations", "12", "--chunks", "64", "--exchange-every", "1", "--scheduler", "synchronous"]
    ref = subprocess.run([c.replace("OUT", "ref.zarr") for c in cmd], cwd=where, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr
    return where, cmd, lsfov.open_result(where / "ref.zarr").deblurred.values


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_cli_run_killed_then_resumed_equals_an_uninterrupted_run(killed_run, sig):
    """SIGKILL (no cleanup at all), SIGTERM (a batch system cancelling the job) or SIGINT (Ctrl-C)
    in the middle of `lsfov deconvolve`; `--resume` finishes it."""
    import subprocess

    tmp_path, cmd, reference = killed_run
    out = f"d-{sig}.zarr"
    run = lambda out, *extra: subprocess.run([c.replace("OUT", out) for c in cmd] + list(extra), cwd=tmp_path,  # noqa: E731
                                             capture_output=True, text=True, timeout=300)
    # SIGINT at its default in the child, as at a terminal (a background parent may have it ignored)
    proc = subprocess.Popen([c.replace("OUT", out) for c in cmd], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    scratch = tmp_path / f".{out}.scratch"
    deadline = time.monotonic() + 240
    while not list(scratch.glob("*/done/x2")):  # two exchanges of twelve done
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert not (tmp_path / out).exists()  # nothing that looks like a result
    if sig != "SIGKILL":  # said, with the shell's status for the signal
        status = {"SIGTERM": 143, "SIGINT": 130}[sig]
        assert proc.returncode == status and "run the same command with --resume" in err, err[-500:]
        assert "Traceback" not in err and "Aborted" not in err, err[-500:]
        assert "stopped; " not in err  # the signal's own line says it, once
    res = run(out, "--resume")
    assert res.returncode == 0, res.stderr
    done, total = map(int, re.search(r"resuming from .*: (\d+) of (\d+) block-iterations", res.stderr).groups())
    assert 2 * total // 12 <= done < total  # at least the two finished exchanges were not redone
    assert "s to finish an interrupted run" in res.stdout and "Mpixel" not in res.stdout  # no rate of work not done here
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / out).deblurred.values, reference)
    assert not scratch.exists()  # cleaned once the result is complete


_SWALLOWED = """
import atexit, gc, os, signal, sys, time
from lsfov import cli

resent, hook = [], cli._signal_again
cli._signal_again = lambda *args, **kwargs: (resent.append(1), hook(*args, **kwargs))
atexit.register(lambda: print("resent", len(resent)))
fired = []

def callback(phase, info):  # a garbage collector's callback, as distributed registers one
    if not fired and time.monotonic() - t0 > 0.2:
        fired.append(1)
        os.kill(os.getpid(), signal.SIG{sig})
        time.sleep(0.01)  # the handler runs here, in the callback, whose exceptions Python ignores

@cli.main.command("spin")
def spin():
    global t0
    t0 = time.monotonic()
    gc.callbacks.append(callback)
    while time.monotonic() - t0 < 15:  # (the signal stops it in a fraction of a second; a loaded machine is slow)
        gc.collect(0)
        time.sleep(0.001)
    print("went on")

sys.argv = ["lsfov", "spin"]
cli.main()
"""


_HALF_MADE = """
import atexit, sys
from lsfov import cli

class Future:  # as distributed's, cut short in its making by the signal: its destructor fails at exit
    def __del__(self):
        self._cleared

Future.__del__.__module__ = "distributed.client"  # (what Python names in "Exception ignored in")

class Mine:
    def __del__(self):
        raise RuntimeError("not distributed's: still said")

kept = []
atexit.register(kept.clear)

@cli.main.command("stop")
def stop():
    kept.extend([Future(), Mine()])
    raise KeyboardInterrupt

sys.argv = ["lsfov", "stop"]
cli.main()
"""


def test_distributed_objects_cut_short_by_an_interrupt_fail_at_exit_in_silence(tmp_path):
    """'Exception ignored in: Future.__del__ ... no attribute _cleared' came after 'interrupted
    (Ctrl-C)' (a flaky local-cluster test): after an interrupt it is closing chatter; other
    destructors' errors are still said."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _HALF_MADE], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 130 and "interrupted (Ctrl-C)" in res.stderr, res.stderr
    assert "_cleared" not in res.stderr and "not distributed's: still said" in res.stderr, res.stderr


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_signal_raised_where_python_ignores_exceptions_still_stops_the_run(tmp_path, sig):
    """SIGTERM or Ctrl-C raised inside a garbage collector's callback ("Exception ignored in ...")
    was lost and the run went on (seen with distributed's): it is sent again until it stops the run."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _SWALLOWED.replace("{sig}", sig)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == {"TERM": 143, "INT": 130}[sig], (res.stdout, res.stderr[-800:])
    assert "went on" not in res.stdout and "Traceback" not in res.stderr, res.stderr[-800:]
    assert int(res.stdout.split("resent ")[1]) >= 1  # lost in the callback, and sent again


def test_a_stopped_run_does_not_import_torch_on_its_way_out(tmp_path):
    """A deconvolution stopped by SIGTERM has seconds of grace: saying what is kept must not import
    PyTorch (two seconds here, far more from a cluster's shared file system)."""
    import subprocess

    code = ("import pathlib, sys\nfrom lsfov import cli\ntry:\n"
            "    with cli._state(pathlib.Path('d.zarr'), None, False) as state:\n"
            "        (state / 'a' / 'done' / 'x2').mkdir(parents=True)\n        raise KeyboardInterrupt\n"
            "except KeyboardInterrupt:\n    print('torch' in sys.modules, 'lsfov.estimate' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["False", "False"] and "--resume" in res.stderr, (res.stdout, res.stderr)


def test_progress_bars_go_to_stderr_and_stdout_keeps_the_results(capsys):
    """Dask's text bars (local schedulers, and distributed's) write to stdout: lsfov sends them to
    stderr, as tqdm's, so that a job's stdout holds what the commands print about their results."""
    from distributed import Client, LocalCluster

    from lsfov.cluster import compute

    slow = da.ones(4, chunks=2).map_blocks(lambda b: (time.sleep(1.2), b)[1])  # > the 1 s a local bar waits
    with dask.config.set(scheduler="threads"):
        assert compute(slow.sum(), progress=True) == 4
    out, err = capsys.readouterr()
    assert out == "" and "Completed" in err, (out, err)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        with mock.patch("lsfov.cluster._watched", lambda: True):  # a terminal: distributed's bar
            assert compute(slow.sum(), progress=True) == 4
        out, err = capsys.readouterr()
        assert out == "" and "Completed" in err, (out, err)
        assert compute(slow.sum(), progress=True) == 4  # a log file: its bar is ten unended redraws a second
        out, err = capsys.readouterr()
    assert out == "" and "Completed" not in err, (out, err)


def test_progress_into_a_log_file_is_a_few_whole_lines(capsys, monkeypatch):
    """Where no one watches (stderr a file, a batch job's log), bars are not redrawn ten times a
    second: tqdm's every 30 s, Dask's as a line every 30 s and one at the end."""
    import io

    from lsfov import cluster

    assert cluster.bar_interval() == 30.0  # pytest's capture: no terminal
    assert cluster.progress_bar(total=1, file=io.StringIO()).mininterval == 30.0

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", Terminal())
        assert cluster.bar_interval() == 0.1 and cluster.progress_bar(total=1, file=io.StringIO()).mininterval == 0.1
    monkeypatch.setattr(cluster, "bar_interval", lambda: 0.5)
    slow = da.ones(12, chunks=1).map_blocks(lambda b: (time.sleep(0.15), b)[1])
    with dask.config.set(scheduler="synchronous"):
        assert cluster.compute(slow.sum(), progress=True) == 12
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n") and 2 <= len(lines) <= 5, err
    assert lines[-1].startswith("[" + "#" * 40 + "] | 100% Completed")


def test_an_error_left_by_a_signal_is_the_signal(monkeypatch):
    """A SIGTERM raised while a lock was being released (Condition.__exit__, waiting on a thread's
    result) left it half released: "RuntimeError: cannot release un-acquired lock" replaced the
    signal, and a cancelled job printed a traceback and exited 1, not 143 (a flaky CI failure)."""
    import click
    from click.testing import CliRunner

    from lsfov import cli

    for raised, status, said in ((cli._Terminated, 143, "terminated (SIGTERM)"),
                                 (KeyboardInterrupt, 130, "interrupted (Ctrl-C)")):
        @click.command("fallout")
        def fallout():
            try:
                raise raised()
            except BaseException:
                raise RuntimeError("cannot release un-acquired lock")

        monkeypatch.setitem(cli.main.commands, "fallout", fallout)
        res = CliRunner().invoke(cli.main, ["fallout"])
        assert res.exit_code == status and said in res.output, (res.output, res.exception)

    @click.command("bug")
    def bug():
        raise RuntimeError("a bug")  # (not after a signal: raised as it is)

    monkeypatch.setitem(cli.main.commands, "bug", bug)
    assert isinstance(CliRunner().invoke(cli.main, ["bug"]).exception, RuntimeError)


def test_a_lost_scheduler_is_one_line_that_says_what_to_do(monkeypatch, run_cli):
    """The scheduler of a running job gone (its node lost, killed): distributed cancels every future,
    which the CLI printed as a traceback."""
    from lsfov import cluster

    class FutureCancelledError(Exception):  # distributed's, as it names its reason
        pass

    def lost(*a, **k):
        raise FutureCancelledError("('sum-aggregate', 0) cancelled for reason: scheduler-connection-lost.")

    monkeypatch.setattr(cluster, "_compute", lost)
    with pytest.raises(ConnectionError, match=r"lost the connection to the Dask scheduler .*--resume"):
        cluster.compute(da.ones(4, chunks=2).sum())
    np.save("img.npy", np.ones((64, 64), np.float32))
    np.save("psf.npy", np.ones((3, 3), np.float32))
    res = run_cli("deconvolve", "img.npy", "o.zarr", "--psf", "psf.npy")
    assert res.exit_code == 1 and "lost the connection to the Dask scheduler" in res.output, res.output
    assert "Traceback" not in res.output
    # Lost between two computations: what was submitted while the client tried to reconnect is
    # cancelled "for reason: unknown" when it gives up; lost too where the client is no longer running
    import distributed.client

    def unknown(*a, **k):
        raise FutureCancelledError("finalize-hlgfinalizecompute-0 cancelled for reason: unknown.")

    monkeypatch.setattr(cluster, "_compute", unknown)
    for status, lost in (("closing", True), ("running", False)):
        with monkeypatch.context() as mp:  # (undone before a real client: closing, it asks for the global one)
            mp.setattr(distributed.client, "_get_global_client", lambda: SimpleNamespace(status=status))
            with pytest.raises(ConnectionError if lost else FutureCancelledError):
                cluster.compute(da.ones(4, chunks=2).sum())
    # ... and where a read outside compute() met it (dask.compute of an input's statistics): said by
    # use_scheduler while its client is still this process's
    from distributed import LocalCluster

    monkeypatch.setattr(cluster, "_client_gone", lambda: True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as lc:
        with pytest.raises(ConnectionError, match="lost the connection to the Dask scheduler"):
            with cluster.use_scheduler(lc.scheduler_address):
                raise FutureCancelledError("finalize-0 cancelled for reason: unknown.")


def test_a_scheduler_lost_while_the_run_waits_for_workers_is_one_line(tmp_path, monkeypatch, run_cli):
    """The scheduler gone before the work starts (killed while batch jobs of workers were queued):
    distributed's timeout connecting again, an OSError raised in the wait for the first worker or in
    a read of the input outside :func:`lsfov.cluster.compute`, was a 60-line traceback. Only
    distributed's wording of it is taken for a lost scheduler: not a worker's own OSError."""
    import subprocess

    from distributed import Client

    from lsfov import cluster

    f = tmp_path / "scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0", "--no-dashboard",
                             "--scheduler-file", str(f)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not f.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), Client(scheduler_file=str(f)) as client:
            threading.Timer(1.0, proc.kill).start()  # while the run waits for a worker
            with pytest.raises(ConnectionError, match=r"lost the connection to the Dask scheduler \(OSError: Timed out "
                                                      r"trying to connect .*--resume"):
                cluster.worker_budgets(client, 0)
    finally:
        proc.kill()
    assert cluster.lost_scheduler(OSError(28, "No space left on device")) is None
    assert cluster.lost_scheduler(OSError("Timed out reading the file")) is None

    def timed_out(*a, **k):
        raise OSError("Timed out trying to connect to tcp://10.0.0.1:8786 after 30 s")

    monkeypatch.setattr(chunked, "check_task_memory", timed_out)
    np.save("img.npy", np.ones((64, 64), np.float32))
    np.save("psf.npy", np.ones((3, 3), np.float32))
    res = run_cli("deconvolve", "img.npy", "o.zarr", "--psf", "psf.npy")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "lost the connection to the Dask scheduler (OSError: Timed out trying to connect" in res.output


def test_a_local_cluster_leaves_logging_and_ctrl_c_as_it_found_them():
    import logging

    import importlib

    importlib.import_module("distributed")  # its import sets its loggers' levels: the baseline is after it

    from lsfov.cluster import use_scheduler

    logger, before = logging.getLogger("distributed"), logging.getLogger("distributed").level
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="late"):
        with use_scheduler("local", n_workers=1):
            raise RuntimeError("found late")
    with use_scheduler("local", n_workers=1) as client:
        assert client.submit(sum, [1, 2]).result() == 3
    assert logger.level == before and signal.getsignal(signal.SIGINT) is handler


def test_an_interrupt_hushes_distributed_before_the_futures_are_cancelled():
    """Cancelling a run's futures makes the scheduler (in this process) log "Couldn't gather keys":
    after an interrupt that is no news, so distributed is hushed before the cancel, not after it
    reaches use_scheduler (the log raced it). An error is not an interrupt: its messages stay."""
    import logging

    from lsfov.cluster import _hush_on_interrupt, _hushable

    logger = logging.getLogger("distributed")
    before = logger.level
    with _hushable("distributed"):
        _hush_on_interrupt(ValueError("a failing task"))
        assert logger.level == before
        _hush_on_interrupt(KeyboardInterrupt())
        assert logger.level == logging.CRITICAL
    assert logger.level == before
    _hush_on_interrupt(KeyboardInterrupt())  # no local cluster: nothing to hush
    assert logger.level == before


def test_distributeds_cancel_race_after_an_interrupt_is_not_logged():
    """A Ctrl-C that lands before distributed's ``sync`` made its future makes its cancel callback
    read an unset variable, which tornado logs as an error with a traceback: filtered while lsfov
    uses a cluster (and only that record; the filter goes with the cluster)."""
    import logging

    from lsfov.cluster import _filtered, _SyncCancelRace

    def record(exc):
        return logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, "Exception in callback", (),
                                 (type(exc), exc, None))

    race = _SyncCancelRace()
    assert not race.filter(record(NameError("cannot access free variable 'future' where it is not associated "
                                            "with a value in enclosing scope")))
    assert race.filter(record(NameError("name 'x' is not defined"))) and race.filter(record(ValueError("future")))
    logger = logging.getLogger("tornado.application")
    with _filtered("tornado.application", race):
        assert race in logger.filters
    assert race not in logger.filters


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_job_on_a_local_cluster_is_one_line(tmp_path, sig):
    """A terminal's Ctrl-C, or a batch system's cancel, reaches every process of the job: the
    workers of a local cluster leave the stopping to lsfov (no traceback from each of them, nor
    distributed's closing chatter), and the work is kept for --resume."""
    import subprocess
    import sys

    sharp = sim.sample_image("cell", (384, 384))
    op, _ = sim.psf_field(sharp.shape, "Z3", (2, 2), seed=3, size=15)
    np.save(tmp_path / "y.npy", np.maximum(sim.degrade(sharp, op, photons=300, seed=1), 0))
    op.save(tmp_path / "op.zarr")
    cmd = [sys.executable, "-m", "lsfov", "deconvolve", "y.npy", "d.zarr", "--operator", "op.zarr", "--iterations",
           "40", "--chunks", "96", "--exchange-every", "1", "--scheduler", "local"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list((tmp_path / ".d.zarr.scratch").glob("*/done/x1")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    os.killpg(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], err[-800:]
    assert "--resume" in err and "Traceback" not in err and "distributed." not in err, err[-800:]


# ----------------------------------------------------------------------------------------- workers lost


def test_worker_killed_mid_deconvolution_run_completes_with_the_same_bytes(scene, tmp_path):
    from lsfov.cluster import use_scheduler

    op, y = scene
    dy = da.from_array(y, chunks=60)
    with dask.config.set(scheduler="threads"):
        ref = lsfov.deconvolve(dy, op, 8, exchange_every=1, scratch=tmp_path / "a").compute()
    with use_scheduler("local", n_workers=2) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_when_started():  # once the second exchange has begun, SIGKILL one worker process
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                if any(p.iterdir() for p in (tmp_path / "b").glob("*/done/x1.blocks")):
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                time.sleep(0.01)

        thread = threading.Thread(target=kill_when_started)
        thread.start()
        out = lsfov.deconvolve(dy, op, 8, exchange_every=1, scratch=tmp_path / "b").compute()
        thread.join()
        assert killed, "no worker was killed: the test did not test anything"
        assert pids[0] not in client.run(os.getpid).values()  # the nanny started a new one
    np.testing.assert_array_equal(out, ref)


def _die_once(block, flag):
    """Kill this worker process the first time any task gets here (a crash in the middle of a run)."""
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return block
    os.close(fd)
    os._exit(1)


def test_worker_killed_mid_psf_map_run_completes_with_the_same_values(tmp_path):
    import cloudpickle

    from lsfov.cluster import use_scheduler

    cloudpickle.register_pickle_by_value(__import__(__name__))  # the workers cannot import this test module
    img = da.from_array(sim.sample_image("cell", (384, 384)), chunks=192)
    ref = lsfov.estimate_psf_map(img, "G1", stride=64)
    doomed = img.map_blocks(_die_once, str(tmp_path / "flag"), dtype=img.dtype, meta=img._meta)  # no trial call here
    with use_scheduler("local", n_workers=2):
        out = lsfov.estimate_psf_map(doomed, "G1", stride=64)
    assert (tmp_path / "flag").exists()  # a worker did die
    for name in ref.data_vars:
        np.testing.assert_array_equal(out[name].values, ref[name].values)


# ----------------------------------------------------------------------------------------- memory


def test_a_worker_over_its_memory_gives_a_message_about_chunks():
    from distributed import Client, LocalCluster

    from lsfov.cluster import compute

    def hog(block):
        import time

        big = np.ones(int(600e6) // 8)  # 600 MB, written (resident), more than the worker's 200 MB
        time.sleep(2)  # held: the nanny's periodic memory check (every 100 ms) sees it, not a race
        return block + big[:1]

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), LocalCluster(
        n_workers=1, threads_per_worker=1, memory_limit="200MB", dashboard_address=":0"
    ) as cluster, Client(cluster):
        with pytest.raises(MemoryError, match="smaller chunks"):
            compute(da.zeros(4, chunks=4).map_blocks(hog, meta=np.empty(0)))


def test_out_of_memory_in_a_thread_says_what_to_do():
    from lsfov.cluster import compute

    def fail(block):
        raise MemoryError("Unable to allocate 40 GiB")

    with pytest.raises(MemoryError, match=r"smaller chunks \(--chunks\)"):
        compute(da.zeros(4, chunks=2).map_blocks(fail, meta=np.empty(0)))


class _StubClient:
    def __init__(self, free, nthreads, own=0):
        """Two workers, the smaller with ``free`` bytes for tasks: its limit up to Dask's pause (80 %)
        less its own use (``own``, at least lsfov's allowance for a worker's code)."""
        limit = int((free + max(own, chunked._WORKER_OWN)) / 0.8)
        self.info = {"workers": {"tcp://a": {"memory_limit": limit, "nthreads": nthreads, "metrics": {"memory": own}},
                                 "tcp://b": {"memory_limit": 4 * limit, "nthreads": nthreads, "metrics": {"memory": own}}}}

    def scheduler_info(self, n_workers=-1):
        return self.info


def test_blocks_too_big_for_a_worker_are_refused_before_any_work(monkeypatch):
    pytest.importorskip("distributed")  # its configuration: where Dask pauses a worker

    from lsfov import cluster

    op = lsfov.ProductConvolution.from_grid(np.ones((4, 4, 31, 31), np.float32) / 961, (8192, 8192))
    need = chunked.task_bytes((2048, 2048), 120, op)
    assert 128 * 2048**2 < need < 128 * 2400**2
    monkeypatch.setattr(cluster, "_active_client", lambda: _StubClient(int(1.5 * need), 2))  # the smaller worker counts
    # (0.96 GiB less the kernel spectra a worker of 1.4 GiB may cache: an eighth of its limit)
    with pytest.raises(MemoryError, match=r"about 0.64 GiB per task, but each worker has 0.79 GiB for 2 thread\(s\) "
                                          r"\(its memory limit up to Dask's pause at 80%, less its own use and its "
                                          r"cache of kernel spectra\); use chunks of 1536 px or less \(--chunks 1536\)"):
        chunked.check_task_memory((2048, 2048), 120, op)
    chunked.check_task_memory((1536, 1536), 120, op)  # what the message proposes does fit
    chunked.check_task_memory((2048, 2048), 120, op, n_blocks=1)  # one block: one thread busy, it fits
    # One block too big for even one thread: the chunks proposed make several blocks, which keep both
    # threads busy, and fit so (they were once sized for the one thread, and refused in turn).
    monkeypatch.setattr(cluster, "_active_client", lambda: _StubClient(int(1.1 * need), 2))
    with pytest.raises(MemoryError, match=r"for 1 thread\(s\).*--chunks (\d+)") as refused:
        chunked.check_task_memory((2048, 2048), 120, op, n_blocks=1)
    edge = int(refused.value.args[0].rsplit("--chunks ", 1)[1].split(")")[0])
    chunked.check_task_memory((edge, edge), 120, op, n_blocks=(8192 // edge) ** 2)
    with pytest.raises(MemoryError):
        chunked.check_task_memory((edge + 256, edge + 256), 120, op, n_blocks=(8192 // edge) ** 2)
    monkeypatch.setattr(cluster, "_active_client", lambda: _StubClient(int(1.5 * need), 2))
    # What a worker already uses is not the tasks': the same limit with 1.2 GiB in use takes no such block
    stub = _StubClient(int(2.5 * need), 1)
    monkeypatch.setattr(cluster, "_active_client", lambda: stub)
    chunked.check_task_memory((2048, 2048), 120, op)
    for w in stub.info["workers"].values():
        w["metrics"]["memory"] = 1.2 * 2**30
    with pytest.raises(MemoryError, match=r"use chunks of 1024 px or less"):
        chunked.check_task_memory((2048, 2048), 120, op)
    monkeypatch.setattr(cluster, "_active_client", lambda: _StubClient(40 * 2**20, 1))  # 9 MiB past its cache
    with pytest.raises(MemoryError, match="exchange-every 1"):
        chunked.check_task_memory((2048, 2048), 120, op)


def test_a_cache_kept_from_an_earlier_run_is_counted_once(monkeypatch):
    """A long-lived cluster's worker keeps its kernel spectra between runs: they are in its measured
    use and are counted as its cache, not twice (a second run on small workers was refused)."""
    pytest.importorskip("distributed")  # its configuration: where Dask pauses a worker

    from lsfov import cluster

    op = lsfov.ProductConvolution.from_grid(np.ones((4, 4, 31, 31), np.float32) / 961, (2048, 2048))
    need = chunked.task_bytes((512, 512), 60, op)
    stub = _StubClient(2 * need, 1)  # room for a task beside the cache it may fill
    monkeypatch.setattr(cluster, "_active_client", lambda: stub)
    chunked.check_task_memory((512, 512), 60, op)  # a new worker: its code and room for the cache
    for w in stub.info["workers"].values():  # after a run: its code and a nearly full cache
        w["metrics"]["memory"] = chunked._WORKER_OWN + int(0.9 * operators.spectra_budget(w["memory_limit"]))
    with pytest.raises(MemoryError, match="less its own use and its cache"):
        chunked.check_task_memory((512, 512), 60, op)  # (as it was checked before the cache said what it holds)
    for w in stub.info["workers"].values():
        w["metrics"][operators.SPECTRA_METRIC] = w["metrics"]["memory"] - chunked._WORKER_OWN
    chunked.check_task_memory((512, 512), 60, op)


def test_a_worker_too_small_to_run_anything_is_refused_not_waited_for():
    """A worker whose own use is past the point where Dask pauses it never runs a task: a run would
    wait in silence. It is refused before any work, with what to do."""
    from distributed import Client, LocalCluster

    op = lsfov.ProductConvolution.from_grid(np.ones((2, 2, 15, 15), np.float32) / 225, (512, 512))
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="150MB", dashboard_address=":0") as cluster, \
            Client(cluster):
        with pytest.raises(MemoryError, match=r"will use at least 160 MiB \(and may cache 18 MiB\) of its 143 MiB memory limit before any work, "
                                              r"over the 80% at which Dask pauses it; give each worker more memory"):
            chunked.check_task_memory((256, 256), 8, op)


@pytest.mark.parametrize("limit, message", [
    # PyTorch and the model take ~340 MiB of a worker: Dask pauses one of 450 MB at 80 % before any task
    ("450MB", r"will use at least 400 MiB of its 429 MiB memory limit before any work, over the 80% at which Dask "
              r"pauses it; give each worker more"),
    # 600 MB: 58 MiB left below the pause, less than one CNN task holds (such workers paused in the map)
    ("600MB", r"the Dask workers leave \d+ MiB for 1 CNN task\(s\) of about 160 MiB each .* give each worker at "
              r"least 0.68 GiB, or fewer threads"),
])
def test_a_worker_too_small_for_the_cnn_is_refused_not_waited_for(limit, message):
    """A worker Dask would pause during the PSF map: the map would wait for it in silence."""
    pytest.importorskip("torch")
    from distributed import Client, LocalCluster

    img = da.from_array(np.random.default_rng(0).uniform(0, 100, (256, 256)).astype(np.float32), chunks=128)
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=limit, dashboard_address=":0") as cluster, \
            Client(cluster):
        with pytest.raises(MemoryError, match=message):
            lsfov.estimate_psf_map(img, "G1")


def test_cli_refuses_chunks_this_machine_cannot_hold(run_cli, monkeypatch):
    sharp = sim.sample_image("cell", (300, 300))
    op, _ = sim.psf_field(sharp.shape, "Z3", (2, 2), seed=3, size=15)
    np.save("y.npy", op.apply(sharp))
    op.save("op.zarr")
    monkeypatch.setattr(chunked, "_available_memory", lambda: 8 * 2**20)
    res = run_cli("deconvolve", "y.npy", "d.zarr", "--operator", "op.zarr", "--chunks", "512")
    assert res.exit_code == 1 and "GiB per task, but this machine has" in res.output, res.output
    assert "Traceback" not in res.output and not os.path.exists("d.zarr")


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lsfov.cli import main

    monkeypatch.chdir(tmp_path)
    return lambda *args: CliRunner().invoke(main, list(args))


# ----------------------------------------------------------------------------------------- determinism


def test_deconvolution_bytes_do_not_depend_on_workers_or_scheduler(scene, tmp_path):
    from lsfov.cluster import use_scheduler

    op, y = scene
    dy = da.from_array(y, chunks=(70, 90))
    beads = da.from_array(np.stack([sim.bead_field((384, 384), seed=s, z_range_um=(-0.4 + 0.1 * s, 0.4)).image
                                    for s in range(4)]), chunks=(1, 384, 384))
    outs, subspaces = [], []
    for spec, n in (("synchronous", None), ("threads", None), ("local", 1), ("local", 2)):
        with use_scheduler(spec, n_workers=n):
            outs.append(lsfov.deconvolve(dy, op, 5, scratch=tmp_path / f"{spec}{n}").compute())
            outs.append(lsfov.deconvolve(dy, op, 5).compute())
            # (its SVD ran where Dask ran: a worker's one BLAS thread rounded it 4e-15 apart)
            sub = lsfov.learn_subspace(beads, n_psf=3, n_space=2)
            subspaces.append((sub.psf_basis, np.asarray(sub.spatial_basis), sub.gammas))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    for sub in subspaces[1:]:
        for a, b in zip(sub, subspaces[0]):
            np.testing.assert_array_equal(a, b)


def test_deconvolution_across_chunkings_agrees_to_float32_rounding(scene):
    # Bit equality across chunkings is not possible with FFTs: the transform length, and with it the
    # rounding, follows the block size. What holds is agreement with the whole array to float32 rounding.
    op, y = scene
    whole = lsfov.deconvolve(y, op, 5)
    for c in ((50, 50), (100, 230), (64, 120)):
        np.testing.assert_allclose(lsfov.deconvolve(da.from_array(y, chunks=c), op, 5).compute(), whole,
                                   rtol=0, atol=2e-5 * whole.max())


def test_psf_map_bytes_do_not_depend_on_the_chunking():
    img = sim.sample_image("cell", (384, 384))
    maps = [lsfov.estimate_psf_map(da.from_array(img, chunks=c), "G1", stride=64) for c in (384, 192, (128, 384))]
    for m in maps[1:]:
        for name in m.data_vars:
            np.testing.assert_array_equal(m[name].values, maps[0][name].values)



def test_a_run_without_workers_says_it_waits_and_goes_on_when_one_joins(lsfov_log, monkeypatch):
    """distributed waits for workers in silence (every one died, or batch jobs still queued): after
    a while without any, the run says it waits, and says so again when one joins."""
    import threading

    from distributed import Client, LocalCluster

    from lsfov import cluster

    monkeypatch.setattr(cluster, "NO_WORKERS_GRACE", 0.4)
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=False, dashboard_address=":0") as lc, \
            Client(lc), lsfov_log() as said:
        joins = threading.Timer(2.5, lambda: lc.scale(1))
        joins.start()
        slow = da.ones(4, chunks=2).map_blocks(lambda b: (time.sleep(0.5), b)[1])  # still running as it joins
        w0 = cluster.waited_for_workers()
        assert cluster.compute(slow.sum()) == 4
        joins.join()
        assert 0.8 < cluster.waited_for_workers() - w0 < 4.5  # (what a closing rate leaves out)
        assert any("no Dask worker has been connected to the scheduler for" in m and "batch jobs wait in the queue"
                   in m for m in said), said
        assert said[-1] == "1 Dask worker connected: the run goes on", said
        n, w1 = len(said), cluster.waited_for_workers()
        assert cluster.compute(slow.sum()) == 4  # workers there: nothing said, no wait counted
        assert len(said) == n and cluster.waited_for_workers() == w1
    time.sleep(0.5)
    assert not any(t.name == "lsfov-worker-watch" for t in threading.enumerate())  # the watch ends with the run


def test_memory_checks_wait_for_the_first_worker(lsfov_log):
    """On a batch cluster the checks run before any job has started: they wait for the first worker
    (the run could not start before) and check its memory, rather than check nothing."""
    import threading

    from distributed import Client, LocalCluster

    from lsfov.cluster import worker_budgets

    # (an in-process worker measures this process's memory: a limit that holds it)
    with LocalCluster(n_workers=0, threads_per_worker=2, processes=False, memory_limit="64GiB",
                      dashboard_address=":0") as lc, Client(lc) as client, lsfov_log(logging.INFO) as said:
        joins = threading.Timer(1.0, lambda: lc.scale(1))
        joins.start()
        budgets, fraction = worker_budgets(client, 100 << 20)
        joins.join()
    assert said == ["waiting for the first Dask worker to join (batch jobs may wait in the queue)"], said
    ((free, threads),) = budgets
    assert threads == 2 and 0 < free <= fraction * (64 << 30) - (100 << 20)


def test_a_wait_said_to_be_long_says_when_it_ends(lsfov_log, monkeypatch):
    """Said to wait (no worker for the grace), the run says it goes on when a worker has joined, also
    when the wait (for the first worker, before the checks) ends before the watch's next reading."""
    from lsfov import cluster

    class Stub:
        joined = False

        def nthreads(self):
            return {"w": 1} if self.joined else {}

    stub = Stub()
    with lsfov_log() as said:
        with cluster._say_when_no_workers(stub, grace=0.2):
            time.sleep(0.6)  # said to wait
            stub.joined = True  # and the wait ends at once
    assert len(said) == 2 and said[0].startswith("no Dask worker has been connected"), said
    assert said[1] == "1 Dask worker connected: the run goes on", said


def test_a_second_run_of_the_same_scratch_state_is_refused_not_let_remove_it(tmp_path):
    """The same job started twice from Python (the CLI locks its OUT; the API had nothing): the second
    removed the first's state under it. Its state is now locked while it runs."""
    from lsfov.io import output_lock

    rng = np.random.default_rng(0)
    y = da.from_array(rng.uniform(1, 2, (64, 64)).astype(np.float32), chunks=32)
    op = operators.ProductConvolution.from_psf(np.ones((3, 3)) / 9, (64, 64))
    first = np.asarray(lsfov.deconvolve(y, op, 2, scratch=tmp_path))
    (state,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [p.name for p in tmp_path.iterdir()] == [state.name]  # no lock left behind
    held, release = threading.Event(), threading.Event()

    def other_run():
        with output_lock(state):
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_run)
    t.start()
    try:
        held.wait(30)
        with pytest.raises(FileExistsError, match="is being written by another"):
            lsfov.deconvolve(y, op, 2, scratch=tmp_path)
        assert state.is_dir()
    finally:
        release.set()
        t.join()
    np.testing.assert_array_equal(np.asarray(lsfov.deconvolve(y, op, 2, scratch=tmp_path)), first)


def test_a_lost_schedulers_tracebacks_from_distributed_are_left_out(lsfov_log):
    """Connected to a scheduler that is then lost, distributed's client logged the tracebacks of its
    attempts to reach it again (40 lines) before lsfov's one line; its one-line messages stay."""
    import asyncio

    from distributed import LocalCluster

    from lsfov import cluster

    def record(e):
        return logging.LogRecord("distributed.client", logging.ERROR, __file__, 1, "", (), (type(e), e, None))

    flt = cluster._LostSchedulerTraceback()
    assert not flt.filter(record(asyncio.CancelledError()))
    assert not flt.filter(record(OSError("Timed out trying to connect to tcp://h:1 after 10 s")))
    assert flt.filter(record(ValueError("something else")))
    assert flt.filter(logging.LogRecord("distributed.client", logging.ERROR, __file__, 1,
                                        "Failed to reconnect to scheduler after 10.00 seconds, closing client", (), None))
    with lsfov_log(logging.DEBUG):  # -vv: everything
        assert flt.filter(record(asyncio.CancelledError()))
    logger = logging.getLogger("distributed.client")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as lc:
        with cluster.use_scheduler(lc.scheduler_address):
            assert any(isinstance(f, cluster._LostSchedulerTraceback) for f in logger.filters)
    assert not any(isinstance(f, cluster._LostSchedulerTraceback) for f in logger.filters)


def test_a_server_that_never_answers_is_refused_not_waited_on(monkeypatch):
    """--scheduler given the dashboard's port (which lsfov prints): the server takes the connection
    and never answers, and distributed's handshake waited forever."""
    import socket

    from lsfov import cluster

    monkeypatch.setattr(cluster, "_CONNECT_TIMEOUT", "0.5s")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="accepted the connection but no Dask scheduler answered; is it the "
                                             "dashboard's port"):
            with cluster.use_scheduler(f"tcp://127.0.0.1:{port}"):
                pass
        assert time.monotonic() - t0 < 10
    finally:
        server.close()
    from distributed import default_client

    with pytest.raises(ValueError):  # nothing left as the default client of every later compute
        default_client()


def test_the_chunks_a_memory_refusal_advises_fit_with_the_halo_their_run_takes(monkeypatch):
    """The halo a run takes follows its chunks (the exchange plan): advice computed with the refused
    run's halo proposed chunks that were refused in turn. Whatever the memory, what is advised fits."""
    pytest.importorskip("distributed")  # its configuration: where Dask pauses a worker

    from lsfov import cluster

    op = lsfov.ProductConvolution.from_grid(np.ones((4, 4, 31, 31), np.float32) / 961, (2048, 2048))
    y = da.ones((2048, 2048), np.float32, chunks=2048)

    class Checked(Exception):
        pass

    def stop(*a, **k):  # past the memory check: no read needed
        raise Checked

    monkeypatch.setattr(chunked.dask, "compute", stop)
    advised = set()
    for mib in (30, 45, 60, 90, 140, 200, 300, 450):
        monkeypatch.setattr(cluster, "_active_client", lambda: _StubClient(mib << 20, 1))
        try:
            lsfov.deconvolve(y, op, 10)
            continue
        except MemoryError as e:
            msg = str(e)
        except Checked:
            continue
        if "--chunks" in msg:
            edge = int(msg.rsplit("--chunks ", 1)[1].split(")")[0])
            advised.add(edge)
            with pytest.raises(Checked):  # refused no more
                lsfov.deconvolve(y.rechunk(edge), op, 10)
        else:
            assert "exchange-every 1" in msg, msg
            if "or more memory" in msg:
                with pytest.raises(Checked):
                    lsfov.deconvolve(y.rechunk(256), op, 10, exchange_every=1)
    assert len(advised) >= 2, advised


def test_a_failed_save_on_a_cluster_waits_for_its_running_tasks_and_leaves_nothing(tmp_path):
    """Every variable is stored in one computation; when one fails on a cluster, the others' store
    tasks still running on the workers would go on writing into the temporary folder after the error
    removed it. The error waits for them (as the local pool does), and nothing is left behind."""
    import xarray as xr
    from distributed import Client, LocalCluster

    written = []

    def slow(block):
        time.sleep(0.3)
        written.append(block.shape)
        return block

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc, Client(lc):
        a = xr.DataArray(da.ones((64, 64), chunks=16, dtype="f4").map_blocks(slow, dtype="f4"), dims=("y", "x"))
        b = xr.DataArray(da.full((64, 64), 1e300, chunks=32), dims=("y", "x"))  # beyond float32: refused
        with pytest.raises(ValueError, match="variable 'b' has values beyond float32's range"):
            lsfov.save(xr.Dataset({"a": a, "b": b}), tmp_path / "r.zarr")
        n = len(written)
        time.sleep(1.0)
        assert len(written) == n  # nothing ran on after the error was raised
    assert sorted(p.name for p in tmp_path.iterdir()) == []
