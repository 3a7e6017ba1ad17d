"""Fixtures shared by several test modules."""
import warnings

import numpy as np
import pytest

from lsfov import simulate as sim


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
