"""Small rules of the estimation pipeline that other tests left open (found by mutating lsfov one
change at a time)."""
import warnings

import numpy as np
import pytest

import lsfov
from lsfov import simulate

pytest.importorskip("torch")


def test_blind_deconvolve_of_an_in_memory_image_leaves_scratch_and_resume_to_the_map(tmp_path):
    """For NumPy input, ``scratch`` and ``resume`` serve only a chunked run: the deconvolution is
    given neither, so it neither warns that scratch acts on Dask input nor refuses resume without
    a scratch directory (as ``lsfov run --scratch --resume`` on an in-memory image would meet)."""
    img = simulate.tilted_surface((128, 128), depth_range_um=(-6, 6), texture="immunohistochemistry", grid=2,
                                  photons=2000.0, seed=3).image
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*act on Dask input", category=lsfov.LsfovWarning)
        ds = lsfov.blind_deconvolve(img, "Z3", iterations=1, scratch=tmp_path, resume=True)
    assert ds["deblurred"].shape == img.shape


def test_training_on_a_stream_decays_the_learning_rate_on_a_cosine_to_two_percent(monkeypatch):
    """Step s of S runs at lr·(0.02 + 0.98·½(1 + cos(π (s-1)/S))): the given rate first, then down
    a cosine towards 2 % of it."""
    import math

    import torch

    from lsfov.estimate import stream

    rates = []

    class Adam(torch.optim.Adam):
        def step(self, *args, **kwargs):
            rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(stream.torch.optim, "Adam", Adam)
    s = stream.PatchStream("G1", sources="poi", seed=2)
    stream.train_stream(s, arch="compact", patches=8, batch_size=2, n_val=2, lr=1e-3, eval_every=100, progress=False)
    want = [1e-3 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    np.testing.assert_allclose(rates, want, rtol=1e-9)


def test_training_on_a_stream_stops_at_its_time_limit_mid_run():
    """max_minutes ends the run at the first step past it (validated there), not after all the
    patches asked for: with max_minutes=0, after one step of four."""
    from lsfov.estimate import stream

    s = stream.PatchStream("G1", sources="poi", seed=2)
    reg = stream.train_stream(s, arch="compact", patches=8, batch_size=2, n_val=4, eval_every=100, max_minutes=0,
                              progress=False)
    assert [h["step"] for h in reg.meta["training"]["history"]] == [0, 1]
