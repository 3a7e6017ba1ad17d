"""Fixtures shared by several test modules."""
import contextlib
import logging
import os
import warnings

import numpy as np
import pytest

from lsfov import simulate as sim


def pytest_configure(config):
    """Under pytest-xdist (one test process per core), torch's own threads per process oversubscribe
    the cores: two processes of two threads each trained the CNN 2.5x slower than of one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture
def run(tmp_path, monkeypatch):
    """``run(*args, ok=True)``: the CLI in ``tmp_path`` (click's runner); asserts exit 0 unless ``ok=False``."""
    from click.testing import CliRunner

    from lsfov.cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def _run(*args, ok=True):
        res = runner.invoke(main, [str(a) for a in args])
        if ok:
            assert res.exit_code == 0, res.output + repr(res.exception)
        return res

    return _run


@contextlib.contextmanager
def _lsfov_messages(level=logging.WARNING):
    said = []
    seen = logging.Handler()
    seen.emit = lambda record: said.append(record.getMessage())
    log = logging.getLogger("lsfov")
    before = log.level
    log.addHandler(seen)
    log.setLevel(min(level, log.getEffectiveLevel()))
    try:
        yield said
    finally:
        log.removeHandler(seen)
        log.setLevel(before)


@pytest.fixture
def lsfov_log():
    """``with lsfov_log() as said:``: the lsfov logger's messages while in the block (the logger does
    not propagate to pytest's capture); ``lsfov_log(logging.INFO)`` also its info messages."""
    return _lsfov_messages


@pytest.fixture(scope="session")
def blurred_cell():
    """A cell image blurred by a 3x3 Z3 grid with Poisson-Gaussian noise: (operator, image, truth)."""
    sharp = sim.sample_image("cell", (200, 230))
    op, _ = sim.psf_field(sharp.shape, "Z3", (3, 3), seed=1, size=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = np.maximum(sim.degrade(sharp, op, photons=300, seed=0), 0)
    return op, y, sharp / sharp.max() * 300


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name, fail_at=None, error=...)`` replaces ``module.name`` by a wrapper of
    the original that records each call in the returned list and raises ``error`` at call number
    ``fail_at`` (a crash in the middle of a run). Call it again for a fresh count."""
    originals = {}

    def wrap(module, name, fail_at=None, error=RuntimeError("power cut")):
        real = originals.setdefault((module, name), getattr(module, name))
        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
        return calls

    return wrap


@pytest.fixture
def device_synthesis_matches_numpy():
    """``check(n, device)``: ``n`` Z3 training patches synthesized with their blur and noise on a torch
    ``device`` have the NumPy path's parameters and (up to FFT rounding at the threshold) validity,
    and Eq. 10 noise around the NumPy path's noise-free patches."""
    from lsfov import psf
    from lsfov.estimate import synth

    def check(n, device):
        m = psf.MODELS["Z3"]
        images = synth.library(synth.SOURCES, "test")
        kw = dict(invalid_fraction=0.08, photons=synth.PHOTONS, read_noise=(0.0, 3.0), illumination=0.5)
        y, params, valid = synth._batch(m, images, n, np.random.default_rng(4), device=device, **kw)
        _, params2, valid2, hid = synth._batch(m, images, n, np.random.default_rng(4), hidden=True, **kw)
        np.testing.assert_array_equal(params, params2)
        assert (valid == valid2).mean() >= 0.98  # the FFTs' rounding may flip a patch at the threshold
        blur = synth._blur(hid["sharp"], m.render(params, size=m.size))
        mean = (hid["beta"] * hid["photons"])[:, None, None] * hid["light"] * blur
        z = (y - mean) / np.sqrt(hid["beta"][:, None, None] * mean + hid["read_noise"][:, None, None] ** 2 + 1e-9)
        assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02

    return check


@pytest.fixture
def symmetries_seen():
    """``symmetries_seen(crops, image, size)``: asserts that each crop of the position image ``image``
    (a pixel's value its index) is a window under exactly one of the 8 rotations and flips, and
    returns the set of those seen."""

    def seen(crops, image, size):
        w = image.shape[1]
        found = set()
        for c in crops:
            y0, x0 = c.min() // w, c.min() % w
            window = image[y0 : y0 + size, x0 : x0 + size]
            match = [k for k, (t, fy, fx) in enumerate((t, fy, fx) for t in (0, 1) for fy in (0, 1) for fx in (0, 1))
                     if np.array_equal(c, (lambda a: a.T if t else a)(window[:: -1 if fy else 1, :: -1 if fx else 1]))]
            assert len(match) == 1
            found.add(match[0])
        return found

    return seen
