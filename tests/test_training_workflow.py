"""Training one's own model from the command line and the API: what a stopped, damaged or mistaken
run keeps, refuses and says."""
import json

import numpy as np
import pytest
import torch

import lsfov
from lsfov.estimate import stream as S
from lsfov.estimate import synth
from lsfov.estimate import training as train


@pytest.fixture(scope="module")
def g1_set(tmp_path_factory):
    return synth.synthesize(192, "G1", seed=5, batch=64, out=tmp_path_factory.mktemp("sets") / "g1.zarr")


def test_a_set_missing_chunks_is_refused_not_read_as_zeros(tmp_path, g1_set, run):
    """zarr reads a chunk that is not stored as zeros: a set copied in part trained on blank patches
    and scored R² -2 without a word. Every chunk is stored, even one all of the fill value (a set of
    invalid patches only), so a missing one always means damage."""
    import shutil

    import zarr

    broken = tmp_path / "broken.zarr"
    shutil.copytree(g1_set, broken)
    (broken / "patches" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(ValueError, match=r"1 of 3 chunks of patches missing: the set was copied or written only in part"):
        synth.open_training_set(broken)
    with pytest.raises(ValueError, match="missing"):
        train.train(broken, epochs=1, lr=1e-3, batch_size=16, arch="compact", progress=False)
    res = run("evaluate", "G1", broken, ok=False)
    assert res.exit_code == 1 and "1 of 3 chunks of patches missing" in res.output, res.output
    assert "damaged: 1 of 3 chunks of patches missing" in run("info", broken).output
    (broken / "valid" / "c" / "0").unlink()
    with pytest.raises(ValueError, match="1 of 3 chunks of patches, 1 of 1 chunks of valid missing"):
        synth.open_training_set(broken)

    blank = synth.synthesize(8, "G1", seed=2, invalid_fraction=0.99, out=tmp_path / "blank.zarr")
    ds = synth.open_training_set(blank)  # all flags False, the chunk stored all the same
    assert not ds["valid"].any() and zarr.open_array(str(blank / "valid")).nchunks_initialized == 1
    with pytest.raises(ValueError, match="holds 0 valid patch"):  # (R² needs two)
        train.evaluate("G1", blank)


def test_sets_that_repeat_each_other_are_not_trained_on_together(tmp_path, g1_set):
    """Sets of one split and seed hold the same patches in order: --more-data of such a set (or the
    same set twice) trained on repeats, and validated on patches it had trained on."""
    kw = dict(epochs=1, lr=1e-3, batch_size=16, arch="compact", progress=False)
    with pytest.raises(ValueError, match="is given twice"):
        train.train([g1_set, g1_set], **kw)
    alike = synth.synthesize(64, "G1", seed=5, batch=64, out=tmp_path / "alike.zarr")
    np.testing.assert_array_equal(synth.open_training_set(alike)["patches"][:32], synth.open_training_set(g1_set)["patches"][:32])
    with pytest.raises(ValueError, match=r"drawn alike \(split train, seed 5\).*another seed \(--seed\)"):
        train.train([alike, g1_set], **kw)
    # Another noise, photon range or source of one split and seed: the same PSFs, crops and light, in order
    noisier = synth.synthesize(64, "G1", seed=5, batch=64, photons=(150, 5000), sources=("poi",))
    with pytest.raises(ValueError, match=r"drawn alike \(split train, seed 5\)"):
        train.train([noisier, g1_set], **kw)
    other = synth.synthesize(64, "G1", seed=6, batch=64, out=tmp_path / "other.zarr")
    assert train.train([other, g1_set], **kw).meta["training"]["data"]["seed"] == [6, 5]
    # A test-split set among others is warned of, as one alone is (its split was a list then)
    held = synth.synthesize(64, "G1", seed=7, batch=64, split="test")
    with pytest.warns(lsfov.LsfovWarning, match="training on a set of the test split"):
        train.train([other, held], **kw)


class _Interrupted(S.PatchStream):
    """A stream whose ``calls``-th batch is interrupted (Ctrl-C while it is made)."""

    calls = 0
    stop_at = 4

    def __call__(self, n):
        if n == 32:  # a training batch (validation draws the others)
            type(self).calls += 1
            if type(self).calls == self.stop_at:
                raise KeyboardInterrupt
        return super().__call__(n)


def test_a_stream_stopped_keeps_the_best_weights_validated(monkeypatch):
    """A stream has no checkpoint: where Ctrl-C (or SIGTERM) is one of ``stop_on``, training ends
    there, validated once more, with the best weights; before any step, nothing is kept."""
    kw = dict(arch="compact", patches=32 * 10, batch_size=32, n_val=64, eval_every=2, progress=False)
    _Interrupted.calls, _Interrupted.stop_at = 0, 5
    model = S.train_stream(_Interrupted("G1", seed=3, n_procedural=2), stop_on=(KeyboardInterrupt,), **kw)
    t = model.meta["training"]
    assert t["stopped"] == "KeyboardInterrupt" and t["steps"] == 4 and t["n_train"] == 128
    assert [h["step"] for h in t["history"]] == [0, 2, 4]  # (none more at the stop: step 4 was validated)
    _Interrupted.calls = 0
    with pytest.raises(KeyboardInterrupt):  # not asked to stop on it
        S.train_stream(_Interrupted("G1", seed=3, n_procedural=2), **kw)
    _Interrupted.calls, _Interrupted.stop_at = 0, 2
    one = S.train_stream(_Interrupted("G1", seed=3, n_procedural=2), stop_on=(KeyboardInterrupt,), **kw)
    assert [h["step"] for h in one.meta["training"]["history"]] == [0, 1]  # validated at the stop only
    _Interrupted.calls, _Interrupted.stop_at = 0, 1
    with pytest.raises(KeyboardInterrupt):  # stopped before any step: no weights to keep
        S.train_stream(_Interrupted("G1", seed=3, n_procedural=2), stop_on=(KeyboardInterrupt,), **kw)


def test_the_cli_writes_a_stopped_streams_model_and_exits_as_interrupted(monkeypatch, run):
    class Stream(_Interrupted):  # (the CLI's own stream, made small)
        def __init__(self, model, **kw):
            super().__init__(model, seed=3, n_procedural=2)

    monkeypatch.setattr(S, "PatchStream", Stream)
    _Interrupted.calls, _Interrupted.stop_at = 0, 4
    real = S.train_stream
    monkeypatch.setattr(S, "train_stream", lambda stream, **kw: real(stream, **{**kw, "n_val": 64, "eval_every": 2}))
    res = run("train", "--stream", 320, "s.pt", "--psf-model", "G1", "--arch", "compact", "--batch-size", 32, ok=False)
    assert res.exit_code == 130 and "wrote s.pt (96 patches), the best weights validated before the run was stopped" \
        in res.output, res.output
    assert lsfov.load_model("s.pt").meta["training"]["stopped"] == "KeyboardInterrupt"


def test_a_stopped_runs_hint_is_a_command_that_works(monkeypatch, run, g1_set, tmp_path):
    """A run from --init stopped: --resume continues the run's own weights and refuses --init, so the
    hint says to give it in place of --init; a --resume without the run's checkpoints says that,
    not --overwrite."""
    import lsfov.estimate

    def stopped(data, checkpoint, **kw):
        from pathlib import Path

        Path(checkpoint).mkdir()
        (Path(checkpoint) / "last.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(lsfov.estimate, "train", stopped)
    res = run("train", g1_set, "m.pt", "--init", "G1", ok=False)
    assert res.exit_code == 130 and "run the same command with --resume in place of --init to continue" in res.output
    res = run("train", g1_set, "n.pt", ok=False)
    assert "run the same command with --resume to continue" in res.output, res.output
    (tmp_path / "done.pt").write_bytes(b"")  # a run made with --checkpoint ck: OUT written, its state elsewhere
    res = run("train", g1_set, "done.pt", "--resume", ok=False)
    assert res.exit_code == 1 and "nothing to resume: no checkpoint done.ckpt/last.pt; give the run's --checkpoint" \
        in res.output, res.output


def test_bad_training_options_are_refused_before_any_work(run, g1_set, tmp_path):
    (tmp_path / "taken.pt").write_bytes(b"not a folder")
    with pytest.raises(FileExistsError, match="checkpoint .*taken.pt is a file; give a directory"):
        train.train(g1_set, epochs=1, lr=1e-3, batch_size=16, arch="compact", checkpoint=tmp_path / "taken.pt",
                    progress=False)
    res = run("evaluate", "G1", g1_set, "--robustness", 1, ok=False)
    assert res.exit_code == 1 and "R²" not in res.output and "--robustness 1: give a number of patches >= 2" in res.output
    for option, bad in (("--lr", "nan"), ("--minutes", "nan"), ("--minutes", "inf")):  # (no bound refuses them)
        res = run("train", g1_set, "x.pt", option, bad, ok=False)
        assert res.exit_code == 2 and f"'{bad}' is not a finite number" in res.output, res.output


def test_a_model_file_cut_short_is_said_to_be(tmp_path):
    from pathlib import Path

    shipped = Path(lsfov.__file__).parent / "models" / "G1.pt"
    (tmp_path / "cut.pt").write_bytes(shipped.read_bytes()[:3_000_000])
    with pytest.raises(ValueError, match="cut.pt is a PyTorch file cut short or damaged"):
        lsfov.load_model(tmp_path / "cut.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # whole, but objects, not weights
    with pytest.raises(ValueError, match="module.pt is not an lsfov model file"):
        lsfov.load_model(tmp_path / "module.pt")


def test_overwrite_replaces_only_files_lsfov_made(run, tmp_path, g1_set):
    """--overwrite of a file output (a model, a depth calibration, a figure) replaces what lsfov made
    there, never a file of the user's that happens to have the name."""
    from PIL import Image

    (tmp_path / "notes.pt").write_text("my notes")
    res = run("train", g1_set, "notes.pt", "--overwrite", "--epochs", 1, ok=False)
    assert res.exit_code == 1 and "notes.pt is not an lsfov model, and --overwrite replaces only such a file" in res.output
    (tmp_path / "mine.json").write_text(json.dumps({"my": "config"}))
    res = run("depth", "map.zarr", "mine.json", "--known", "k.npy", "--overwrite", ok=False)
    assert "mine.json is not a depth calibration" in res.output and json.loads((tmp_path / "mine.json").read_text())
    Image.new("L", (4, 4)).save(tmp_path / "photo.png")
    res = run("evaluate", "G1", "--robustness", 8, "--figure", "photo.png", "--overwrite", ok=False)
    assert "photo.png is not a figure lsfov made" in res.output, res.output
    run("evaluate", "G1", "--robustness", 8, "--figure", "curves.svg")
    run("evaluate", "G1", "--robustness", 8, "--figure", "curves.svg", "--overwrite")  # its own: replaced
