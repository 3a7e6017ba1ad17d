"""Train, evaluate and ship the default CNN models (lsfov/models/<NAME>.pt + .json).

    python benchmarks/train_models.py G1 G2 Z1 Z3 [--n N] [--epochs E] [--minutes M]   # first stage
    python benchmarks/train_models.py G1 --init G1 --seed 1 --n 48000 --epochs 4 --lr 5e-4   # more training
    python benchmarks/train_models.py G1 G2 Z1 Z3 --evaluate   # re-measure the shipped models, no training

The shipped models: G1, G2 and Z1 a first stage and one more (``--seed 1 ... --lr 5e-4``, as above),
G1 and Z1 a third on dimmer patches (``--seed 5 --n 48000 --epochs 4 --lr 3e-4 --photons 150 5000``);
Z3 a first stage and then ``--init Z3 --n 64000 --epochs 4`` with ``--seed 1 --lr 5e-4``,
``--seed 2 --lr 3e-4`` and ``--seed 3 --lr 2e-4``. More stages gained nothing (Z3 ``--seed 4
--lr 2e-4``: test R² 0.710 against 0.713; G2 ``--seed 2 --lr 3e-4``: 0.914 against 0.919), so they
were not kept. Then Z3 became a ``polar`` network: its ``spectral`` weights the fixed trunk, a new
head trained over them (``Z3 --init Z3 --arch polar --freeze --seed 31 --n 320000 --epochs 15
--batch-size 128 --workers 2 --store DIR``: test R² 0.713 -> 0.776), trained again fresh on that set and
a new one (``Z3 --init Z3-spectral.pt --arch polar --freeze --seed 37 --n 320000 --epochs 15 --patience 15
--batch-size 128 --workers 2 --store DIR --more-data DIR/Z3-seed31-320000-500-5000.zarr``, the trunk from
``git show bbc39dd:lsfov/models/Z3.pt``: 0.776 -> 0.788). The same for G2 (``--n
192000``) was not kept: 0.919 -> 0.925 on the mixed test set, but natural images 0.882 -> 0.858
and, beyond the training noise, R² at Fig. 7's s = 0.2 Gaussian noise 0.16 -> -0.15. G2 and G1 then
continued on streams of fresh patches on the CPU (``G2 --init G2 --stream 100000000 --minutes 35
--batch-size 128 --lr 1e-4 --seed 73 --procedural 48 --photons 500 5000``: 0.919 -> 0.928, every
image type and the robustness gaining; G1 the same with ``--minutes 25 --seed 75 --photons 150
5000``: 0.949 -> 0.953); Z1 given it (``--minutes 18 --seed 77 --photons 150 5000``) read 0.952 but
lost on noiseless patches (0.78 -> 0.64), not kept. G2 then one more hour (``--minutes 60 --seed 81``,
750 720 patches: 0.928 -> 0.932); G1 half an hour more (``--minutes 30 --seed 83 --photons 150 5000``,
399 104 patches) read 0.953 -> 0.954 but lost a little at every noise strength (noiseless 0.970 ->
0.967, s = 0.2 Gaussian 0.323 -> 0.313): not kept. Each model's metadata records all its stages.

The network is ``spectral`` unless ``--arch`` says otherwise (``--init``: that model's network).

Each model: a seeded training set from the "train" image split, a held-out test set from the
"test" split (images never seen in training), training with the learning rate chosen on a
validation split, R² per parameter and validity accuracy on the test set, the robustness curves
of paper 000 Fig. 7, all stored in the model's metadata. Then ``python benchmarks/run.py cnn``
writes the table and figure into RESULTS.md from the shipped metadata.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from lsfov.estimate import model as _model
from lsfov.estimate import stream
from lsfov.estimate import synth
from lsfov.estimate import training as train

DEFAULTS = {"G1": (48000, 4), "G2": (48000, 4), "Z1": (48000, 4), "Z3": (64000, 6)}  # the shipped models
# The shipped models are tested on synth.PHOTONS (500-5000 peak photons) and trained there, except
# the last stage of G1 and Z1 (150-5000: test R² 0.947 → 0.949 and 0.938 → 0.946; at Fig. 7's
# s = 0.1, 0.59 → 0.66 and 0.56 → 0.73; Z1 on noiseless patches 0.78 → 0.57). Trained from 50,
# Z3's astigmatism outputs stayed at their mean (axis R² -0.01); from 500 it reads the axis (0.62)
# and G1, G2 and Z1 gain 0.05-0.11 in R², even on a 50-5000 test set. Fig. 7's robustness curves
# still measure every noise level.
NETWORKS = {"compact": "compact residual network", "resnet34": "ResNet-34",
            "spectral": "compact residual network with a log-power-spectrum branch",
            "polar": "compact residual network with log-power-spectrum and angular-harmonic branches"}
LR = {"Z3": 1e-3}  # the rate the shipped Z3 was trained at (the probe sees only its first 100 steps)


def _resumable(ck) -> bool:
    """Continue a stage whose checkpoint directory holds an interrupted run."""
    return ck is not None and (Path(ck) / "last.pt").exists()


def _test_set(name, n):
    """The held-out test set: every model on the same one (synth.PHOTONS), whatever it was trained on."""
    return synth.synthesize(n, name, split="test", seed=0, photons=synth.PHOTONS, progress=True)


def _measure(reg, test):
    """Test-set R² and validity accuracy, Fig. 7 robustness curves and CPU throughput, into the metadata."""
    reg.meta["test"] = train.evaluate(reg, test) | {"photons": list(test["attrs"]["photons"])}
    reg.meta["robustness"] = train.robustness(reg, n=600)
    patches = torch.randn(512, 128, 128).numpy()
    reg.predict(patches[:64])
    t = time.perf_counter()
    reg.predict(patches)
    reg.meta["throughput_cpu_patches_s"] = round(512 / (time.perf_counter() - t), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=_model.SHIPPED)
    ap.add_argument("--n", type=int, help="training patches (default per model)")
    ap.add_argument("--epochs", type=int, help="epochs (default per model)")
    ap.add_argument("--minutes", type=float, default=None, help="time budget per model")
    ap.add_argument("--test", type=int, default=3000, help="test patches")
    ap.add_argument("--arch", default=None, choices=sorted(NETWORKS), help="network [--init's; otherwise spectral]")
    ap.add_argument("--init", default=None, help="continue from this model (a shipped name or a .pt)")
    ap.add_argument("--freeze", action="store_true", help="keep --init's trunk fixed, train a polar network's tail")
    ap.add_argument("--patience", type=int, default=4, help="epochs without a better validation R² before stopping")
    ap.add_argument("--more-data", nargs="+", default=(), metavar="SET",
                    help="training sets (e.g. an earlier --store's) to train on before the fresh one")
    ap.add_argument("--store", default=None,
                    help="stream the training set to this zarr directory (sets larger than memory) and train from it; "
                         "a set already there with the same model, seed, size and photons is reused")
    ap.add_argument("--seed", type=int, default=0, help="training-set seed (a fresh set when continuing)")
    ap.add_argument("--photons", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="peak photon range of the training set [%g %g]; the test set always has the default" % synth.PHOTONS)
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate [Z3: 1e-3; others: probed on the validation split]")
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint directory root: a stage with a checkpoint there resumes")
    ap.add_argument("--evaluate", action="store_true",
                    help="only re-measure the shipped models (test set, robustness, throughput) and update their metadata")
    ap.add_argument("--no-measure", action="store_true",
                    help="train and save only; measure later with --evaluate (on a GPU machine: the CPU figures "
                         "should come from the machine RESULTS.md describes)")
    ap.add_argument("--workers", type=int, default=1, help="processes that synthesize the training set")
    ap.add_argument("--synth-device", default=None,
                    help="torch device for the training set's blur and noise (cuda: one process outruns 15 CPU ones)")
    ap.add_argument("--batch-size", type=int, default=64, help="patches per step (the shipped models: 64)")
    ap.add_argument("--stream", type=int, default=None, metavar="N",
                    help="train on N patches made on the fly on --synth-device (lsfov.estimate.stream), no set")
    ap.add_argument("--procedural", type=int, default=6,
                    help="with --stream: images per procedural source in the library [6, as synthesize]")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True  # fixed patch and batch shapes: let cuDNN pick its fastest kernels
    for name in a.models:
        if a.evaluate:
            reg = _model.load_model(name)
            _measure(reg, _test_set(name, a.test))
            reg.save(_model.MODELS_DIR / f"{name}.pt", overwrite=True)
            print(name, reg.meta["test"])
            continue
        n, epochs = DEFAULTS[name]
        n, epochs = a.n or n, a.epochs or epochs
        t = time.perf_counter()
        photons = tuple(a.photons or synth.PHOTONS)
        store = None if a.store is None else Path(a.store) / f"{name}-seed{a.seed}-{n}-{photons[0]:g}-{photons[1]:g}.zarr"
        reused = store is not None and store.exists()
        init = _model.load_model(a.init, psf_model=name) if a.init else None
        if a.stream:  # no set: every batch made on the device as it is needed
            test = None if a.no_measure else _test_set(name, a.test)
            st = stream.PatchStream(name, device=a.synth_device, seed=a.seed, n_procedural=a.procedural, photons=photons,
                                    workers=a.workers)
            t_synth = time.perf_counter() - t
            reg = stream.train_stream(st, arch=a.arch, init=init, freeze=a.freeze, patches=a.stream,
                                      batch_size=a.batch_size, lr=a.lr, max_minutes=a.minutes)
        else:
            if reused:  # written atomically: complete, and seeded
                data = store
            else:
                data = synth.synthesize(n, name, split="train", seed=a.seed, photons=photons, workers=a.workers,
                                        device=a.synth_device, progress=True, out=store)
            test = None if a.no_measure else _test_set(name, a.test)
            t_synth = time.perf_counter() - t
            ck = f"{a.checkpoint}/{name}" if a.checkpoint else None
            sets = [*a.more_data, data] if a.more_data else data
            resume = _resumable(ck)  # a resumed run continues its own weights (it records its init)
            reg = train.train(sets, arch=a.arch, epochs=epochs, batch_size=a.batch_size, lr=a.lr or LR.get(name),
                              checkpoint=ck, max_minutes=a.minutes, seed=0, init=None if resume else init,
                              freeze=a.freeze, patience=a.patience, resume=resume)
        if test is not None:
            _measure(reg, test)
        # A set reused from --store was synthesized by an earlier run: its time is not this run's.
        reg.meta["training"]["synthesis_seconds"] = None if reused else round(t_synth, 1)
        if reused:
            reg.meta["training"]["training_set"] = f"reused from --store: {store.name}"
        if a.more_data:
            reg.meta["training"]["more_data"] = [Path(p).name for p in a.more_data]
        reg.meta["training"]["synthesis_workers"] = a.workers
        reg.meta["training"]["synthesis_device"] = a.synth_device
        reg.meta["training"]["machine"] = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
                                           f"threads, torch {torch.__version__}")
        reg.meta["description"] = (
            f"{name} ({reg.psf_model.description}); {NETWORKS[reg.arch]} trained on "
            f"{reg.meta['training']['data']['n']} synthetic 128² "
            f"patches (scikit-image images and procedural cells, points and textures; Poisson-Gaussian noise "
            f"at {photons[0]:g}-{photons[1]:g} peak photons, illumination gradients; 8% black or flat invalid "
            "patches), tested on images never seen in training.")
        if init is not None:  # train() recorded the starting model's training; add what it was
            reg.meta["training"]["init"]["description"] = init.meta.get("description")
            fresh = (f"{reg.meta['training']['n_train']} patches made as they were needed (seed {a.seed}, "
                     f"{a.procedural} images per procedural source)") if a.stream else f"a fresh set (seed {a.seed})" + (f" and {', '.join(reg.meta['training']['more_data'])}"
                                                      if a.more_data else "")
            how = f"Its tail trained on {fresh} over the fixed trunk of" if a.freeze else f"Continued on {fresh} from"
            reg.meta["description"] += f" {how}: {init.meta.get('description')}"
        reg.save(_model.MODELS_DIR / f"{name}.pt", overwrite=True)
        tr = reg.meta["training"]
        print(name, reg.meta.get("test"), f"synthesis {'(reused set) ' if reused else ''}{t_synth:.0f} s, training {tr['seconds']} s, "
              f"{tr['patches_per_second']} patches/s on {tr.get('gpu', tr['device'])}", flush=True)


if __name__ == "__main__":
    main()
