"""Training and evaluation of the PSF-parameter regressor (paper 000 Sec. II-E-2, III-A..C).

Training: Adam, the learning rate picked on a validation split (each candidate trains a short
probe from the same start, the best one goes on), cosine decay, early stopping on the validation
R², a checkpoint every epoch that ``resume=True`` continues from. Evaluation: R² per parameter
(paper 000 Eq. 15, valid samples only), validity accuracy, and the robustness curves of Fig. 7.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import psf as _psf
from .._validate import LsfovWarning, boolean, positive_int, real_number
from ..io import atomic_file
from .model import PSFRegressor, decode, encode, load_model
from .network import loss as _loss
from .network import standardize
from .synth import PATCH, check_set, degrade_patches, open_training_set, synthesize

__all__ = ["train", "evaluate", "r2_scores", "robustness"]

log = logging.getLogger("lsfov")

STATE_FORMAT = "lsfov.TrainState/2"  # /2: the best epoch is that of the highest validation R²


class _Stacked:
    """Training sets' patches one after the other, read by contiguous row ranges (each part stays
    lazy: a zarr array on disk is read a block at a time)."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [p.shape[0] for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tuple(self.parts[0].shape[1:])
        self.dtype = np.dtype(self.parts[0].dtype)
        self.chunks = (min(int(getattr(p, "chunks", (512,))[0]) for p in self.parts),)

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("stacked training sets are read by contiguous row ranges (a slice)")
        start, stop, _ = rows.indices(self.shape[0])
        out = [np.asarray(p[max(start, a) - a : min(stop, b) - a])
               for p, a, b in zip(self.parts, self.starts[:-1], self.starts[1:]) if max(start, a) < min(stop, b)]
        return np.concatenate(out) if out else np.zeros((0,) + self.shape[1:], self.dtype)


# What sets trained on together must share: patches blurred by one PSF model over the same ranges and optics.
_SAME = ("psf_model", "ranges", "optics", "patch", "size")  # size: where not the named model's


def differences(a: dict, b: dict) -> str:
    """How two PSF-model records (``PSFModel.to_meta()``: ranges, optics) differ, as "focus [0, 0.3]
    (against [0, 0.5]); na 1.4 (against 0.75)"; '' if they do not."""
    out = []
    ra, rb = a.get("ranges") or {}, b.get("ranges") or {}
    for k in ra:
        if k in rb and not np.allclose(ra[k], rb[k]):
            out.append(f"{k} {list(ra[k])} (against {list(rb[k])})")
    if a.get("size") != b.get("size"):  # (None: the named model's)
        out.append(f"kernel size {a.get('size')} (against {b.get('size')})")
    oa, ob = a.get("optics") or {}, b.get("optics") or {}
    for k in sorted(set(oa) | set(ob)):
        if oa.get(k) != ob.get(k):
            out.append(f"{k} {oa.get(k)} (against {ob.get(k)})")
    return "; ".join(out)


# What a set was drawn from besides its seed: a run resumes only on a set that agrees in all of them.
_DRAWN = ("split", "sources", "images", "photons", "read_noise", "illumination", "invalid_fraction")


def _drawn(attrs) -> dict:
    """A set's :data:`_DRAWN` attributes, as JSON has them (a checkpoint's record; tuples as lists)."""
    return {k: json.loads(json.dumps(attrs[k], default=str)) for k in _DRAWN if k in attrs}


def _check_resume(st, path, m, n, attrs, arch, lr, epochs):
    """The network and epochs of the run in checkpoint ``st`` (at ``path``), after checking that it is
    one of this set (``m``: its ranges and optics; ``n`` patches drawn as its ``attrs`` say), and
    that ``arch``, ``lr`` and ``epochs`` (where given) are its."""
    meta = st.get("meta") or {}
    if st.get("format") != STATE_FORMAT or meta.get("psf_model") != m.name:
        raise ValueError(f"{path} is not a checkpoint of a {m.name} training run of this lsfov version; start it "
                         "again without --resume")
    if arch is not None and arch != meta["arch"]:
        raise ValueError(f"{path} is a run of a {meta['arch']} network; resume it with arch={meta['arch']!r} "
                         f"(--arch {meta['arch']}) or with none")
    was = meta.get("set")
    if was is not None:
        pairs = (("n", "patches", n), ("seed", "its seed", attrs.get("seed")))
        drawn = _drawn(attrs)  # (a checkpoint of before records none of them)
        differ = differences(m.to_meta(), was) + "".join(
            f"; {label} {here} (against {was.get(k)})" for k, label, here in pairs if here != was.get(k)) + "".join(
            f"; {k} {drawn.get(k)} (against {v})" for k, v in (was.get("drawn") or {}).items() if drawn.get(k) != v)
        if differ:
            raise ValueError(f"{path} is a run on another training set ({differ.lstrip('; ')}); resume it with its own "
                             "set, or start again without --resume")
    if lr is not None and not np.isclose(lr, st["lr"]):
        raise ValueError(f"{path}: the run's learning rate is {st['lr']:g} (its schedule continues); resume it without "
                         "lr (--lr), or start again without --resume")
    t_max = int(st["scheduler"]["T_max"])
    if epochs is not None and epochs != t_max:
        raise ValueError(f"{path} is a run of {t_max} epochs (its learning rate decays over them); resume it with "
                         f"epochs={t_max} (--epochs {t_max}) or none; to train longer, start from its model (init=, --init)")
    return meta["arch"], t_max


# A run's settings that a resume takes from its checkpoint (their defaults for a new run).
_DEFAULTS = {"batch_size": 64, "patience": 4, "val_fraction": 0.1, "gamma": 1.0, "seed": 0, "freeze": False}
_FLAGS = {"batch_size": "--batch-size", "patience": "--patience", "seed": "--seed", "freeze": "--freeze"}


def _settings(st, ckpt, given: dict) -> dict:
    """The run's settings: the resumed run's where it recorded them (checkpoint state ``st``), else
    those ``given``, else the defaults; one given otherwise than the resumed run had is refused (the
    run could not continue)."""
    run = {} if st is None else dict((st.get("meta") or {}).get("settings") or {})
    if st is not None:
        run.setdefault("freeze", bool(st.get("meta", {}).get("freeze", False)))  # (checkpoints from before)
    for k, v in given.items():
        if v is not None and k in run and v != run[k]:  # exactly: a seed of 20240102 is not 20240101
            flag = _FLAGS.get(k)
            if k == "freeze" and not run[k]:
                how = "without freeze=True (--freeze)"
            else:
                how = f"with {k}={run[k]!r}" + (f" ({flag} {run[k]})" if flag and k != "freeze" else "") + " or none"
            raise ValueError(f"{ckpt / 'last.pt'}: the run's {k} is {run[k]!r}; resume it {how}, or start again "
                             "without --resume")
    return {k: run[k] if k in run else v if v is not None else _DEFAULTS[k] for k, v in given.items()}


def finished(checkpoint) -> bool:
    """Whether the run of ``checkpoint`` (a directory) has ended: all its epochs, or stopped early;
    False if there is no such run."""
    try:
        st = torch.load(Path(checkpoint) / "last.pt", map_location="cpu", weights_only=True)
        patience = ((st["meta"].get("settings") or {}).get("patience") or _DEFAULTS["patience"])
        return st["epoch"] + 1 >= int(st["scheduler"]["T_max"]) or st["bad"] >= patience
    except Exception:  # none, or not a checkpoint: the caller says what it finds
        return False


def warn_other_task(start, record: dict, what: str):
    """Warn when ``start`` (an init model) was trained over other ranges or optics than ``what`` draws."""
    differ = differences(record, start.psf_model.to_meta())
    if differ:
        warnings.warn(f"{what} is drawn over other ranges or optics than the init model was trained on ({differ}): "
                      "the model is retargeted, its starting weights read other PSFs", LsfovWarning, stacklevel=3)


def _as_set(data):
    """A training set as a dict (``patches`` may stay a lazy zarr array); a list of sets as one."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("data is an empty list: give one or more training sets")
        sets = [_as_set(d) for d in data]
        first = sets[0]["attrs"]

        def name(d):
            return str(d) if isinstance(d, (str, Path)) else "(dict)"

        for i, (d, st) in enumerate(zip(data[1:], sets[1:]), 1):
            for e, other in zip(data[:i], sets[:i]):
                if isinstance(d, (str, Path)) and isinstance(e, (str, Path)) and Path(d).resolve() == Path(e).resolve():
                    raise ValueError(f"training set {d} is given twice; give each set once")
                m = min(len(st["params"]), len(other["params"]))
                if m and np.array_equal(np.asarray(st["params"][:m]), np.asarray(other["params"][:m])):
                    # one seed and split draw the same PSFs in order (of one library, the same crops and
                    # light too), whatever the noise or photons: the validation split (the last set's
                    # last rows) would repeat what it trains on
                    raise ValueError(f"training sets {name(e)} and {name(d)} were drawn alike (split "
                                     f"{st['attrs'].get('split')}, seed {st['attrs'].get('seed')}): their PSFs repeat "
                                     "each other's, patch by patch; synthesize one with another seed (--seed)")
            for key in _SAME:
                if st["attrs"].get(key) != first.get(key):
                    raise ValueError(f"training sets {name(data[0])} and {name(d)} differ in {key} "
                                     f"({first.get(key)!r} and {st['attrs'].get(key)!r}); train on sets "
                                     "synthesized for one PSF model, ranges and optics")
        attrs = dict(first)
        for key in {k for st in sets for k in st["attrs"]} - set(_SAME):  # e.g. each set's seed, photons
            vals = [st["attrs"].get(key) for st in sets]
            attrs[key] = vals[0] if all(v == vals[0] for v in vals) else vals
        attrs["n"] = sum(len(st["params"]) for st in sets)
        return {"patches": _Stacked([st["patches"] for st in sets]),
                "params": np.concatenate([np.asarray(st["params"]) for st in sets]),
                "valid": np.concatenate([np.asarray(st["valid"]) for st in sets]), "attrs": attrs}
    if isinstance(data, (str, Path)):
        return open_training_set(data)
    if not (isinstance(data, dict) and {"patches", "params", "valid", "attrs"} <= set(data)):
        raise TypeError("data must be a training-set path or the dict returned by lsfov.estimate.synthesize")
    data = {**data, "params": np.asarray(data["params"]), "valid": np.asarray(data["valid"])}
    check_set(data, "the training set")
    return data


def _rows(patches, rows) -> np.ndarray:
    """Rows of a training set's patches as float32, refused if not finite (a set on disk is read
    batch by batch, so this is where a damaged patch is met; it would otherwise read as divergence)."""
    x = np.ascontiguousarray(np.asarray(patches[rows]), np.float32)
    if not np.isfinite(x).all():
        start = rows.start if isinstance(rows, slice) else 0
        bad = start + int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))[0])
        raise ValueError(f"patch {bad} of the training set contains NaN or Inf; synthesize the set again")
    return x


def _blocks(n, block, rng):
    """Shuffled contiguous blocks (one zarr chunk each: sequential reads), shuffled inside too."""
    starts = rng.permutation(np.arange(0, n, block))
    for s in starts:
        yield s, rng.permutation(min(block, n - s))


def _batches(patches, targets, valid, rows, batch_size, rng, block):
    """Yield (x, t, v) torch batches over the contiguous ``rows`` (a range), shuffled."""
    for s, perm in _blocks(len(rows), block, rng):
        sel = slice(rows.start + s, rows.start + s + len(perm))
        x = _rows(patches, sel)[perm]
        t, v = targets[sel][perm], valid[sel][perm]
        for b in range(0, len(perm), batch_size):
            yield (torch.from_numpy(np.ascontiguousarray(x[b : b + batch_size], np.float32)),
                   torch.from_numpy(t[b : b + batch_size].astype(np.float32)),
                   torch.from_numpy(v[b : b + batch_size]))


class _Fit:
    """What a run trains: the whole network on patches, or (``frozen``) its tail on the trunk's
    features, computed once per patch because the trunk never changes."""

    def __init__(self, model, frozen: bool):
        self.model, self.frozen = model, frozen
        net = model.net
        self.trunk = [getattr(net, name) for name in getattr(net, "trunk", ())] if frozen else []
        for mod in self.trunk:
            mod.requires_grad_(False)
        self.params = [p for p in net.parameters() if p.requires_grad]

    def train_mode(self, on: bool = True):
        self.model.net.train(on)
        for mod in self.trunk:  # batch norms of a frozen trunk keep their statistics
            mod.eval()

    def __call__(self, x):
        if self.frozen:
            return self.model.net.tail(x)
        return self.model.net(standardize(x)[:, None])

    def inputs(self, patches, block, progress):
        """What a batch is made of: the patches, or their features (n, F) float32 in memory."""
        if not self.frozen:
            return patches
        from ..cluster import progress_bar

        net, dev = self.model.net, self.model.device
        net.eval()
        out = []
        with torch.inference_mode(), progress_bar(total=patches.shape[0], desc="trunk features", unit="patch",
                                          disable=not progress) as bar:
            for s in range(0, patches.shape[0], block):
                x = torch.from_numpy(_rows(patches, slice(s, s + block))).to(dev)
                for b in range(0, len(x), 256):
                    out.append(net.features(standardize(x[b : b + 256])[:, None]).float().cpu().numpy())
                bar.update(len(x))
        self.train_mode()
        return np.concatenate(out)


def _batch_loss(fit, x, t, v, gamma):
    dev = fit.model.device
    return _loss(fit(x.to(dev)), t.to(dev), v.to(dev), gamma)


def _step(fit, opt, x, t, v, gamma):
    if len(x) < 2:  # a batch norm cannot train on one sample (a block's last batch may hold one)
        return None
    loss = _batch_loss(fit, x, t, v, gamma)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _val_loss(fit, patches, targets, valid, index, gamma, block, *, params=None):
    """The loss over the rows ``index``; with ``params`` (the set's parameters), also the mean R²
    (Eq. 15) of the decoded estimates of the valid rows, NaN when fewer than two are valid."""
    fit.train_mode(False)
    total, count, outs = 0.0, 0, []
    dev = fit.model.device
    with torch.inference_mode():
        # Rows in order (an unshuffled pass): the outputs line up with ``params``.
        for b in range(index.start, index.stop, 256):
            rows = slice(b, min(b + 256, index.stop))
            x = torch.from_numpy(_rows(patches, rows))
            out = fit(x.to(dev))
            t = torch.from_numpy(targets[rows].astype(np.float32)).to(dev)
            total += float(_loss(out, t, torch.from_numpy(valid[rows]).to(dev), gamma)) * len(x)
            count += len(x)
            if params is not None:
                outs.append(out[:, 1:].float().cpu().numpy())
    fit.train_mode()
    loss = total / max(count, 1)
    if params is None:
        return loss
    m, v = fit.model.psf_model, valid[index.start : index.stop]
    if v.sum() < 2 or not np.isfinite(loss):
        return loss, float("nan")
    est = decode(m, np.concatenate(outs))
    with np.errstate(all="ignore"):
        return loss, float(np.mean(list(r2_scores(m, params[index.start : index.stop][v], est[v]).values())))


def _start_from(net, start, arch):
    """Copy ``start``'s weights into ``net``: all of them (same network), or the trunk of a network
    built on ``start``'s (a ``polar`` network from a ``spectral`` model)."""
    src = start.net.state_dict()
    if start.arch == arch:
        net.load_state_dict(src)
        return
    dst = net.state_dict()
    keys = [k for k in dst if k.split(".")[0] in getattr(net, "trunk", ())]
    if not keys or any(k not in src or src[k].shape != dst[k].shape for k in keys):
        raise ValueError(f"init is a {start.arch} network, not {arch}; pass arch={start.arch!r}"
                         + (" (a polar network starts from a spectral model)" if arch == "polar" else ""))
    net.load_state_dict({k: src[k] for k in keys}, strict=False)


def train(data, *, arch: str | None = None, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, lr_candidates=(1e-3, 3e-3), probe_steps: int = 100, patience: int | None = None,
          val_fraction: float | None = None, gamma: float | None = None, checkpoint=None, resume: bool = False,
          device=None, seed: int | None = None, max_minutes: float | None = None, init=None,
          freeze: bool | None = None, overwrite: bool = False, progress: bool = True) -> PSFRegressor:
    """Train a PSF-parameter regressor on a synthesized training set.

    Parameters
    ----------
    data : path or dict, or a list of them
        A training set from :func:`lsfov.estimate.synthesize` (its PSF model is the model's); a list
        is trained on as one set, in its order (sets of one PSF model, ranges and optics: e.g. one
        synthesized earlier and a fresh one; the validation split is the last rows).
    arch : {"spectral", "polar", "compact", "resnet34"}, optional
        The network (:mod:`lsfov.estimate.network`); by default ``init``'s, or ``spectral``; on
        ``resume`` the run's.
    epochs : int, optional
        Upper bound on the passes over the training split (cosine learning-rate decay over them);
        by default 20, on ``resume`` the run's (to train longer, start from its model: ``init=``).
    batch_size : int, optional
        Patches per step (default 64; on ``resume`` the run's); the training split must hold at
        least one batch.
    lr : float, optional
        Adam learning rate; by default the best of ``lr_candidates`` on the validation split after
        ``probe_steps`` steps from the same initial weights.
    lr_candidates : float or sequence of float
        Learning rates to choose from when ``lr`` is not given; the probes are recorded in
        ``meta["training"]["history"]``.
    probe_steps : int
        Steps each candidate trains before its validation loss is compared.
    patience : int, optional
        Stop (default 4; on ``resume`` the run's) after this many epochs without a better
        validation R² (paper 000 Eq. 15, the mean over the parameters of the decoded estimates:
        what the model is judged by; the loss on the ``v vᵀ`` targets can rise while it still
        improves); the best epoch's weights are kept.
    val_fraction : float, optional
        Share of the set (its last rows) held out for learning-rate choice and early stopping
        (default 0.1; on ``resume`` the run's).
    gamma : float, optional
        Weight of the validity term of the loss (paper 000 Eq. 11; default 1; on ``resume`` the run's).
    checkpoint : path, optional
        Directory for ``last.pt`` (everything needed to resume) and ``best.pt`` (the best model).
    resume : bool
        Continue from ``checkpoint/last.pt``: the same set, and the run's network, learning rate,
        epochs, batch size, seed, patience, validation share, loss weight and frozen trunk (each
        taken from the run where not given; another is refused, as the run could not continue with
        it); ``init`` is refused, the run records what it started from.
    device : str, optional
        ``"cuda"`` or ``"cpu"``; CUDA when available by default.
    seed : int, optional
        Seeds (default 0; on ``resume`` the run's) the initial weights (torch's global generator),
        the probes' batches and each epoch's shuffle (so a resumed run draws the batches it would
        have).
    max_minutes : float, optional
        Stop after the epoch during which this much time has passed since the features and the
        learning-rate probe began (an epoch is never cut: it is what a resumed run continues from).
    init : str, path or PSFRegressor, optional
        Start from this model's weights (fine-tuning, or more training on a fresh set); it must
        be a model of the same PSF model and network, or, for ``arch="polar"``, a ``spectral`` model
        (its branches become the trunk). ``meta["training"]["init"]`` records it.
    freeze : bool, optional
        Keep (default no; on ``resume`` as the run did) the trunk (``init``'s spatial and spectral
        branches) fixed and train only the tail of a ``polar`` network: the trunk's features are
        computed once per patch (in memory, 2.3 kB each), so an epoch costs a small fraction of a
        full one.
    overwrite : bool
        Replace an earlier run's checkpoints in ``checkpoint`` (without it, and without ``resume``,
        they are refused).
    progress : bool
        Show progress bars (the frozen trunk's features, the training steps).

    Returns
    -------
    PSFRegressor
        The model with the best epoch's weights, ``meta["training"]`` describing the run. With
        ``checkpoint``, also saved as ``checkpoint/best.pt``.

    Raises
    ------
    FileExistsError
        If ``checkpoint`` is a file, or holds an earlier run's checkpoints and neither ``resume``
        nor ``overwrite`` is given.
    FileNotFoundError
        With ``resume``, if ``checkpoint/last.pt`` does not exist.
    ValueError
        For a setting out of range, ``resume`` without ``checkpoint`` or with ``init``, a set too
        small for one training batch, ``freeze`` without a ``polar`` network and ``init``, or a
        run whose every learning rate (or validation loss) diverged.
    """
    given = {"batch_size": None if batch_size is None else positive_int(batch_size, "batch_size"),
             "patience": None if patience is None else positive_int(patience, "patience"),
             "val_fraction": None if val_fraction is None else real_number(val_fraction, "val_fraction", minimum=0,
                                                                            maximum=0.99, exclusive=True),
             "gamma": None if gamma is None else real_number(gamma, "gamma", minimum=0),
             "seed": None if seed is None else positive_int(seed, "seed", minimum=0),
             "freeze": None if freeze is None else boolean(freeze, "freeze")}
    if epochs is not None:
        epochs = positive_int(epochs, "epochs")
    probe_steps = positive_int(probe_steps, "probe_steps")
    progress = boolean(progress, "progress")
    if lr is not None:
        lr = real_number(lr, "lr", minimum=0, maximum=1, exclusive=True)
    candidates = (lr_candidates,) if np.isscalar(lr_candidates) else tuple(lr_candidates)
    if lr is None and not candidates:
        raise ValueError("lr_candidates is empty: give learning rates to choose from, or lr=")
    candidates = tuple(real_number(c, "lr_candidates", minimum=0, maximum=1, exclusive=True) for c in candidates)
    if max_minutes is not None:
        max_minutes = real_number(max_minutes, "max_minutes", minimum=0)  # 0: one epoch
    if checkpoint is not None and Path(checkpoint).exists() and not Path(checkpoint).is_dir():
        raise FileExistsError(f"checkpoint {checkpoint} is a file; give a directory for the run's checkpoints "
                              "(--checkpoint DIR)")
    if checkpoint is not None and not resume and not overwrite and (Path(checkpoint) / "last.pt").exists():
        raise FileExistsError(f"{checkpoint} holds an earlier run's checkpoints; resume it (resume=True, --resume), "
                              "replace them (overwrite=True, --overwrite) or give another checkpoint directory")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint directory of the interrupted run")
    if resume and not (Path(checkpoint) / "last.pt").exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint {Path(checkpoint) / 'last.pt'} (start without --resume, "
                                "or give the run's --checkpoint)")
    st = None
    if resume:
        if init is not None:
            raise ValueError("resume continues the run's own weights (it records what they started from): "
                             "drop init (--init)")
        st = torch.load(Path(checkpoint) / "last.pt", map_location="cpu", weights_only=True)
    settings = _settings(st, Path(checkpoint or "."), given)
    batch_size, patience, val_fraction, gamma, seed, freeze = (settings[k] for k in _DEFAULTS)
    ds = _as_set(data)
    attrs = ds["attrs"]
    if "test" in np.atleast_1d(attrs.get("split")):  # (of several sets: a list of their splits)
        warnings.warn("training on a set of the test split (the held-out images): every test set of it scores what the "
                      "model has seen; synthesize a training set (--split train)", LsfovWarning, stacklevel=2)
    m = _psf.PSFModel.from_meta(attrs)  # the set's ranges: targets are scaled by them, as the model decodes
    n = len(ds["params"])
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < batch_size:
        raise ValueError(f"{n} patches leave fewer than one batch ({batch_size}) for training; synthesize more")
    targets = encode(m, ds["params"])
    valid = np.asarray(ds["valid"], bool)
    patches = ds["patches"]
    train_idx, val_idx = range(n - n_val), range(n - n_val, n)
    block = int(getattr(patches, "chunks", (512,))[0])
    meta = {"ranges": attrs["ranges"], "optics": attrs["optics"], "patch": attrs.get("patch", PATCH),
            **({"size": attrs["size"]} if attrs.get("size") else {})}  # a model of larger kernels keeps them
    torch.manual_seed(seed)
    start = None if init is None else load_model(init, psf_model=m.name)
    if start is not None:
        warn_other_task(start, m.to_meta(), "the training set")
    if resume:  # the run's network, set, rate and epochs: checked before any work
        arch, epochs = _check_resume(st, Path(checkpoint) / "last.pt", m, n, attrs, arch, lr, epochs)
    if epochs is None:
        epochs = 20
    if arch is None:
        arch = start.arch if start is not None else "spectral"
    model = PSFRegressor(m.name, arch, meta=meta, device=device)
    if freeze and not hasattr(model.net, "features"):
        raise ValueError(f"freeze=True trains the tail of a polar network over a fixed trunk; a {arch} network "
                         "has none: pass arch='polar' (--arch polar)")
    if freeze and start is None and not resume:
        raise ValueError("freeze=True keeps the trunk of init= fixed: give init= (--init; a spectral or polar model)")
    if start is not None:
        _start_from(model.net, start, arch)
    fit = _Fit(model, freeze)
    fit.train_mode()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    history, start_epoch, best, bad = [], 0, -math.inf, 0  # best: the highest validation R²
    params = np.asarray(ds["params"], np.float64)
    best_state, best_val = None, None

    def make_opt(rate):
        opt = torch.optim.Adam(fit.params, lr=rate)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=rate * 0.02)
        return opt, sched

    # What the weights started from (its own training, without the per-epoch history).
    started = (st["meta"].get("init") if resume else
               None if start is None else {k: v for k, v in start.meta.get("training", {}).items() if k != "history"})
    if resume:
        model.net.load_state_dict(st["state_dict"])  # before the features: a frozen trunk's are the run's

    t_feat = t_begin = time.perf_counter()  # t_begin: what max_minutes counts from
    inputs = fit.inputs(patches, block, progress)  # the patches, or the frozen trunk's features
    t_feat = time.perf_counter() - t_feat

    if resume:
        lr = st["lr"]
        opt, sched = make_opt(lr)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, best, bad, history = st["epoch"] + 1, st["best"], st["bad"], list(st["history"])
        best_val = st["best_val"]
        best_state = st["best_state"]
        before = float(st.get("seconds", 0.0))  # the run's training time so far
        if start_epoch >= epochs or bad >= patience:
            log.info("%s: the run had finished after %d epoch(s) (%s): nothing left to train, its best weights kept",
                     ckpt / "last.pt", start_epoch, "all of them" if start_epoch >= epochs else "stopped early")
    elif lr is None:
        from ..cluster import progress_bar

        first = copy.deepcopy(model.net.state_dict())
        scores = {}
        per = min(probe_steps, math.ceil(len(train_idx) / batch_size))
        with progress_bar(total=len(candidates) * per, desc=f"choose lr of {', '.join(f'{c:g}' for c in candidates)}",
                          unit="batch", disable=not progress) as bar:
            for cand in candidates:  # same start, same batches: only the rate differs
                model.net.load_state_dict(first)
                opt, _ = make_opt(cand)
                rng = np.random.default_rng(seed)
                for i, (x, t, v) in enumerate(_batches(inputs, targets, valid, train_idx, batch_size, rng, block)):
                    if i >= probe_steps:
                        break
                    _step(fit, opt, x, t, v, gamma)
                    bar.update(1)
                scores[cand] = _val_loss(fit, inputs, targets, valid, val_idx, gamma, block)
        finite = {k: v for k, v in scores.items() if np.isfinite(v)}
        if not finite:
            raise ValueError(f"every learning rate in {candidates} diverged in {probe_steps} steps; give smaller ones")
        lr = min(finite, key=finite.get)
        history.append({"lr_probe": {str(k): v for k, v in scores.items()}})
        model.net.load_state_dict(first)
        opt, sched = make_opt(lr)
    else:
        opt, sched = make_opt(lr)

    from ..cluster import progress_bar

    steps = math.ceil(len(train_idx) / batch_size)
    if not resume:
        before = 0.0
    end = start_epoch if bad >= patience else epochs  # a run resumed after its early stop trains no more
    t0 = time.perf_counter()
    with progress_bar(total=max(end - start_epoch, 0) * steps, desc=f"train {m.name} ({arch}, lr {lr:g})", unit="batch",
              disable=not progress) as bar:
        for epoch in range(start_epoch, end):
            rng = np.random.default_rng([seed, epoch])  # same batches after a resume
            running = []
            for x, t, v in _batches(inputs, targets, valid, train_idx, batch_size, rng, block):
                if (step_loss := _step(fit, opt, x, t, v, gamma)) is not None:
                    running.append(step_loss)
                bar.update(1)
            sched.step()
            val, r2 = _val_loss(fit, inputs, targets, valid, val_idx, gamma, block, params=params)
            history.append({"epoch": epoch, "train_loss": float(np.mean(running)), "val_loss": val, "val_r2": r2,
                            "seconds": time.perf_counter() - t0})
            # Ranked by R²; by the loss where no R² can be had (fewer than two valid rows).
            score = (r2 if np.isfinite(r2) else -val) if np.isfinite(val) else -math.inf
            if score > best:
                best, bad = score, 0
                best_val = {"val_loss": val, "val_r2": r2}
                best_state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
            else:
                bad += 1
            bar.set_postfix(val_loss=f"{val:.4g}", val_r2=f"{r2:.4f}")
            if ckpt is not None:
                ckpt.mkdir(parents=True, exist_ok=True)
                state = {"format": STATE_FORMAT, "meta": {"psf_model": m.name, "arch": arch,
                                                          "set": {**m.to_meta(), "n": n, "seed": attrs.get("seed"),
                                                                  "drawn": _drawn(attrs)},
                                                          "settings": settings, "init": started},
                         "epoch": epoch, "seconds": before + time.perf_counter() - t0,
                         "lr": lr, "best": best, "best_val": best_val, "bad": bad, "history": history,
                         "state_dict": model.net.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "best_state": best_state}
                with atomic_file(ckpt / "last.pt") as tmp:
                    torch.save(state, tmp)
            if bad >= patience:
                break
            if max_minutes is not None and time.perf_counter() - t_begin > 60 * max_minutes:
                break
    if not math.isfinite(best):  # every epoch's validation loss NaN or Inf: weights not to be shipped
        raise ValueError(f"training diverged (no finite validation loss; lr {lr:g}); train with a smaller lr")
    if best_state is not None:
        model.net.load_state_dict(best_state)
    model.net.eval()
    model.meta["training"] = {
        "data": {k: attrs.get(k) for k in ("n", "sources", "images", "split", "seed", "photons", "read_noise",
                                             "illumination", "invalid_fraction")},
        "n_train": int(len(train_idx)), "n_val": int(n_val), "lr": lr, "batch_size": batch_size, "seed": seed,
        "epochs_run": sum(1 for h in history if "epoch" in h), "best_val_loss": best_val["val_loss"],
        "best_val_r2": best_val["val_r2"], "history": history,
        "device": str(model.device), "seconds": round(before + time.perf_counter() - t0, 1),
    }
    if freeze:
        model.meta["training"].update(freeze=True, features_seconds=round(t_feat, 1))
    if model.device.type == "cuda":
        model.meta["training"]["gpu"] = torch.cuda.get_device_name(model.device)
    passes = sum(1 for h in history if "epoch" in h) * len(train_idx)
    model.meta["training"]["patches_per_second"] = round(passes / max(model.meta["training"]["seconds"], 1e-9), 1)
    if started is not None:
        model.meta["training"]["init"] = started
    if ckpt is not None:
        model.save(ckpt / "best.pt", overwrite=True)
    return model


def r2_scores(m, true, pred) -> dict:
    """Paper 000 Eq. 15 per parameter: 1 - SSE / SST. The axis is an angle modulo its period
    (:meth:`lsfov.psf.PSFModel.period`: π, or π/2 for Z2), so its residuals and spread are taken on
    the circle (0 and π are the same axis).

    Parameters
    ----------
    m : str or PSFModel
        The PSF model whose parameters these are.
    true, pred : array_like (n, N) or (N,)
        True and estimated parameters in the model's units, columns in the order of ``m.params``.

    Returns
    -------
    dict {param: float}
        R² per parameter (1 is perfect, negative worse than the mean); NaN where ``true`` does not
        vary.

    Raises
    ------
    ValueError
        For an unknown model, or ``true`` and ``pred`` not both (n, N).
    """
    m = _psf.get_model(m)
    true, pred = np.atleast_2d(np.asarray(true, float)), np.atleast_2d(np.asarray(pred, float))
    if true.shape != pred.shape or true.shape[1] != m.n_params:
        raise ValueError(f"true and pred must both be (n, {m.n_params}) {m.name} parameters, got {true.shape} and "
                         f"{pred.shape}")
    out = {}
    for i, p in enumerate(m.params):
        t, e = true[:, i], pred[:, i]
        if m.period(p):
            k = 2 * np.pi / m.period(p)
            res = np.angle(np.exp(1j * k * (e - t))) / k
            mean = np.angle(np.exp(1j * k * t).mean()) / k
            dev = np.angle(np.exp(1j * k * (t - mean))) / k
        else:
            res, dev = e - t, t - t.mean()
        sst = float((dev**2).sum())
        out[p] = 1 - float((res**2).sum()) / sst if sst > 0 else float("nan")
    return out


def _predict_all(model, patches, batch_size=None, symmetrize=False, progress=False):
    from ..cluster import progress_bar

    preds = []
    with progress_bar(total=patches.shape[0], desc=f"evaluate {model.psf_model.name}", unit="patch",
                      disable=not progress) as bar:
        for s in range(0, patches.shape[0], 2048):
            preds.append(model.predict(np.asarray(patches[s : s + 2048]), batch_size, symmetrize=symmetrize))
            bar.update(len(preds[-1]["validity"]))
    return {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}


def evaluate(model, data, batch_size: int | None = None, symmetrize: bool = False, progress: bool = False) -> dict:
    """R² per parameter on the valid samples, their mean, and the validity accuracy.

    A test set drawn over other parameter ranges or optics than the model was trained on is warned
    about (:class:`~lsfov.LsfovWarning`): R² then measures extrapolation.

    Parameters
    ----------
    model : PSFRegressor, str or path
        The model, or a name or file for :func:`load_model`.
    data : path or dict, or a list of them
        A test set (from :func:`synthesize`, ideally ``split="test"``) of the model's PSF model.
    batch_size : int, optional
        Patches per forward pass (default: :meth:`PSFRegressor.predict`'s for the model's device).
    symmetrize : bool
        Predict with the 8 symmetries of the square (:meth:`PSFRegressor.predict`).
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``"r2"``: {parameter: R²} on the valid samples (paper 000 Eq. 15); ``"r2_mean"``: their
        mean; ``"validity_accuracy"``: share of all samples whose validity (> 0.5) matches the
        label; ``"n"``, ``"n_valid"``: samples in all and valid ones; ``"split"``: the set's split.

    Raises
    ------
    ValueError
        If the test set is of another PSF model than the model's, or holds fewer than two valid
        patches (R² needs their spread).
    """
    model = model if isinstance(model, PSFRegressor) else load_model(model)
    batch_size = None if batch_size is None else positive_int(batch_size, "batch_size")
    symmetrize, progress = boolean(symmetrize, "symmetrize"), boolean(progress, "progress")
    ds = _as_set(data)
    if ds["attrs"]["psf_model"] != model.psf_model.name:
        raise ValueError(f"test set is for {ds['attrs']['psf_model']}, the model regresses {model.psf_model.name}")
    record = model.psf_model.to_meta()
    differ = differences({"ranges": ds["attrs"].get("ranges", record["ranges"]),
                          "optics": ds["attrs"].get("optics", record["optics"]),
                          "size": ds["attrs"].get("size", record.get("size"))}, record)
    if differ:
        warnings.warn(f"the test set was drawn over other ranges or optics than the model was trained on ({differ}): "
                      "R² measures extrapolation", LsfovWarning, stacklevel=2)
    valid = np.asarray(ds["valid"], bool)
    if valid.sum() < 2:
        raise ValueError(f"the test set holds {int(valid.sum())} valid patch(es) of {len(valid)}: R² needs at least two; "
                         "synthesize a larger one")
    pred = _predict_all(model, ds["patches"], batch_size, symmetrize, progress)
    est = np.stack([pred[p] for p in model.params], axis=1)
    r2 = r2_scores(model.psf_model, ds["params"][valid], est[valid])
    acc = float(((pred["validity"] > 0.5) == valid).mean())
    return {"r2": r2, "r2_mean": float(np.mean(list(r2.values()))), "validity_accuracy": acc,
            "n": int(len(valid)), "n_valid": int(valid.sum()), "split": ds["attrs"].get("split")}


DEGRADATIONS = ("gaussian", "poisson", "mixed", "illumination")


def degrade_unit(clean, kind: str, strength: float, rng):
    """Fig. 7 degradations of noiseless patches scaled to a maximum of 1.

    ``gaussian``: + N(0, s²); ``poisson``: s² Poisson(x / s²) (noise std s at full brightness);
    ``mixed``: both; ``illumination``: times 1 - s * (linear ramp across the patch, random direction).
    """
    x = clean / np.maximum(clean.max(axis=(1, 2), keepdims=True), 1e-12)
    if strength == 0:
        return x.astype(np.float32)
    if kind in ("poisson", "mixed"):
        x = degrade_patches(x, rng, photons=1 / strength**2, read_noise=0.0) * strength**2
    if kind in ("gaussian", "mixed"):
        x = x + strength * rng.standard_normal(x.shape)
    if kind == "illumination":
        n, s, _ = x.shape
        yy, xx = np.mgrid[0 : 1 : s * 1j, 0 : 1 : s * 1j]
        t = rng.uniform(0, 2 * np.pi, n)[:, None, None]
        ramp = np.clip(0.5 + (yy - 0.5) * np.sin(t) + (xx - 0.5) * np.cos(t), 0, 1)
        x = x * (1 - strength * ramp)
    elif kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {DEGRADATIONS}")
    return x.astype(np.float32)


def robustness(model, n: int = 1000, strengths=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), seed: int = 1,
               progress: bool = False) -> dict:
    """R² against degradation strength (paper 000 Fig. 7) on noiseless held-out patches.

    ``n`` noiseless patches are synthesized from the test split (no deliberately invalid ones); the
    valid ones are degraded as :func:`degrade_unit` does, by each kind of ``DEGRADATIONS`` at each
    strength, and predicted.

    Parameters
    ----------
    model : PSFRegressor, str or path
        The model, or a name or file for :func:`load_model`.
    n : int
        Patches to synthesize (>= 2).
    strengths : float or sequence of float
        Degradation strengths (>= 0; see :func:`degrade_unit`).
    seed : int
        Seeds the patches and the degradations.
    progress : bool
        Show a progress bar (one step per degradation kind and strength).

    Returns
    -------
    dict
        ``"strengths"``: the strengths (list of float); ``"n"``: the number of valid patches scored;
        and for each kind in ``DEGRADATIONS`` (``"gaussian"``, ``"poisson"``, ``"mixed"``,
        ``"illumination"``): the mean R² over the parameters at each strength (list of float).

    Raises
    ------
    ValueError
        If ``n`` is under 2, a strength is negative or not finite, ``model`` is refused
        (:func:`load_model`), or fewer than 2 of the patches synthesized are valid (no spread to score).
    """
    model = model if isinstance(model, PSFRegressor) else load_model(model)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be at least 2 patches (R² needs a spread), got {n!r}")
    strengths = [real_number(s, "strengths", minimum=0) for s in ((strengths,) if np.isscalar(strengths) else strengths)]
    clean = synthesize(n, model.psf_model, split="test", seed=seed, photons=None, invalid_fraction=0.0,
                       progress=progress)
    valid = clean["valid"]
    if valid.sum() < 2:  # (no spread to score: R² would be NaN on every curve)
        raise ValueError(f"only {int(valid.sum())} of the {n} patches synthesized are valid (textured); R² needs at "
                         "least 2: give a larger n")
    from ..cluster import progress_bar

    out = {"strengths": list(map(float, strengths)), "n": int(valid.sum())}
    with progress_bar(total=len(DEGRADATIONS) * len(strengths), desc=f"robustness {model.psf_model.name}", unit="curve point",
              disable=not progress) as bar:
        for kind in DEGRADATIONS:
            rng = np.random.default_rng([seed, DEGRADATIONS.index(kind)])
            curve = []
            for s in strengths:
                x = degrade_unit(clean["patches"][valid], kind, s, rng)
                pred = _predict_all(model, x)
                est = np.stack([pred[p] for p in model.params], axis=1)
                curve.append(float(np.mean(list(r2_scores(model.psf_model, clean["params"][valid], est).values()))))
                bar.update()
            out[kind] = curve
    return out
