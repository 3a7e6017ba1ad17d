"""Training on patches made as they are needed, all on one torch device: no set on disk, every batch fresh.

:func:`~lsfov.estimate.synthesize` makes its crops and PSFs on the host; with ``device="cuda"``
one host process fed an H200 about 2 300 Z3 patches/s, a third of what the GPU trained on. Here
every step of paper 000 Sec. II-E-1 runs on the device: the library of sharp images lives there,
a batch's crops (with their rotations and flips) are one gather, its PSFs one batched matrix
Fourier transform of the pupil (:func:`lsfov.psf.zernike`'s), its blur one FFT and its noise is
drawn there. The distribution is :func:`synthesize`'s (tested piece by piece against it); the
bytes are not. On an H200 a ``polar`` tail over a fixed trunk trained at 87 000 patches/s.

:class:`PatchStream` makes the batches; :func:`train_stream` trains a network on them for a
number of patches or minutes, keeping the weights of the best validation R².
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import time

import numpy as np
import torch

from .. import psf as _psf
from .._validate import positive_int, real_number
from .synth import (N_SEEDED, PATCH, PHOTONS, SOURCES, _GENERATORS, _cached_library, _check_sources,
                    _range, _readable, _texture, blur_torch, bundled_images, library, procedural_seed, reaching)

log = logging.getLogger("lsfov")

__all__ = ["PatchStream", "train_stream"]

_BASE_PROCEDURAL = N_SEEDED  # images per procedural source in synth.library: the mix of sources is kept at any count


def _d4_grids(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column maps (8, S, S) of the 8 symmetries of the square: crop[i, j] = image[y0 + R, x0 + C]."""
    i = torch.arange(size, device=device)
    ii, jj = torch.meshgrid(i, i, indexing="ij")
    rows, cols = [], []
    for t in (False, True):
        for fy in (False, True):
            for fx in (False, True):
                r = size - 1 - ii if fy else ii
                c = size - 1 - jj if fx else jj
                rows.append(c if t else r)
                cols.append(r if t else c)
    return torch.stack(rows), torch.stack(cols)


def render_psfs(m, params: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """PSFs (B, K, K) of model ``m`` for parameters (B, N) on their device: pupil models through
    the same matrix Fourier transform as :func:`lsfov.psf.zernike`, Gaussian ones on the host."""
    size = m.size if size is None else size
    dev = params.device
    if m._kind != "zernike":
        return torch.from_numpy(m.render(params.double().cpu().numpy(), size=size)).to(dev)
    p = dict(zip(m.params, params.T.double()))
    coeffs = {}
    if "focus" in p:
        coeffs[4] = p["focus"]
    if "astigmatism" in p:
        coeffs[5] = p["astigmatism"] * torch.sin(2 * p["axis"])
        coeffs[6] = p["astigmatism"] * torch.cos(2 * p["axis"])
    nolls = tuple(sorted(coeffs))
    n, inside, basis, _, dft = _psf._pupil_plan(m.optics, size, nolls)
    cmat = torch.stack([coeffs[j] for j in nolls], dim=1).float()
    phase = (cmat @ torch.from_numpy(basis).to(dev)) * (2 * math.pi)
    field = torch.zeros((len(params), n * n), dtype=torch.complex64, device=dev)
    field[:, torch.from_numpy(np.flatnonzero(inside)).to(dev)] = torch.polar(torch.ones_like(phase), phase)
    a = torch.from_numpy(dft).to(dev)  # (K, n): amp = A E Aᵀ
    amp = a @ field.reshape(-1, n, n) @ a.T
    psf = amp.real**2 + amp.imag**2
    return psf / psf.sum(dim=(-2, -1), keepdim=True)


@functools.lru_cache(maxsize=64)  # streams of one seed share their images (1 MB each); read-only below
def _procedural(job):
    name, seed = job
    return _GENERATORS[name]((512, 512), list(seed))


class PatchStream:
    """Batches of degraded 128² patches, their PSF parameters and validity, made on a torch device.

    Calling the stream with ``n`` returns ``(patches (n, 128, 128) float32 counts, params (n, N)
    float64, valid (n,) bool)``, all on the device; each call draws fresh patches from the
    stream's generator.

    Parameters
    ----------
    model : str or PSFModel
        PSF model (``lsfov.psf.MODELS``); parameters are drawn uniformly over its ranges.
    device : str or torch.device, optional
        Where the library lives and the patches are made; default CUDA when there is one.
    sources : str or sequence of str
        Image sources among ``SOURCES``, as in :func:`lsfov.estimate.synthesize`.
    split : {"train", "test"}
        Which disjoint set of source images to use, as in :func:`lsfov.estimate.synthesize`.
    seed : int
        Seeds the library and the stream.
    n_procedural : int
        Images per procedural source in the library (``synthesize`` uses 6). More of them give more
        distinct cells, points and textures; each source keeps its share of the patches whatever
        the count.
    invalid_fraction : float
        Fraction of deliberately black or flat (invalid) patches, as in :func:`lsfov.estimate.synthesize`.
    photons : (low, high)
        As in :func:`lsfov.estimate.synthesize`, but a range is required: no noiseless stream.
    read_noise : (low, high)
        Range of the Gaussian read noise std in counts, as in :func:`lsfov.estimate.synthesize`.
    illumination : float
        Largest depth of the random illumination gradient across a patch (0: none), as in
        :func:`lsfov.estimate.synthesize`.
    workers : int
        Processes that make the procedural images beyond the first 6 per source.
    """

    def __init__(self, model="Z3", *, device=None, sources=SOURCES, split: str = "train", seed: int = 0,
                 n_procedural: int = _BASE_PROCEDURAL, invalid_fraction: float = 0.08, photons=PHOTONS,
                 read_noise=(0.0, 3.0), illumination: float = 0.5, workers: int = 1):
        from .model import torch_device

        self.model = _psf.get_model(model)
        self.device = torch_device(device)
        if isinstance(sources, str):
            sources = (sources,)
        self.sources = tuple(sources)
        _check_sources(self.sources, split)
        self.split, self.seed = split, positive_int(seed, "seed", minimum=0)
        self.n_procedural = positive_int(n_procedural, "n_procedural")
        self.invalid_fraction = real_number(invalid_fraction, "invalid_fraction", minimum=0, maximum=0.99)
        self.photons = _range(photons, "photons", 1e-3, 1e12)
        self.read_noise = _range(read_noise, "read_noise", 0, 1e6)
        self.illumination = real_number(illumination, "illumination", minimum=0, maximum=1)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        images, weights = self._library(positive_int(workers, "workers"))  # (weights by the images' own sizes)
        self.size = PATCH + self.model.size - 1
        images = [reaching(im, self.size) for im in images]
        dev = self.device
        self.flat = torch.from_numpy(np.concatenate([im.ravel() for im in images])).to(dev)
        self.offsets = torch.as_tensor(np.cumsum([0] + [im.size for im in images[:-1]]), device=dev)
        self.heights = torch.as_tensor([im.shape[0] for im in images], device=dev)
        self.widths = torch.as_tensor([im.shape[1] for im in images], device=dev)
        self.weights = torch.as_tensor(weights / weights.sum(), dtype=torch.float64, device=dev)
        self.rows, self.cols = _d4_grids(self.size, dev)
        lo, hi = self.model.bounds
        self.lo, self.hi = (torch.as_tensor(v, dtype=torch.float64, device=dev) for v in (lo, hi))
        t = torch.linspace(-1, 1, PATCH, device=dev)
        self.yy, self.xx = torch.meshgrid(t, t, indexing="ij")

    def _library(self, workers):
        """The split's images (:func:`~lsfov.estimate.library`'s, then ``n_procedural - 6`` more per source)
        and each one's draw weight: √size as in ``synthesize``, procedural ones scaled to keep their source's share."""
        n = self.n_procedural
        base = (_cached_library(self.sources, self.split, self.seed) if n >= _BASE_PROCEDURAL
                else library(self.sources, self.split, n_procedural=n, seed=self.seed))
        n_skimage = len(bundled_images(self.sources, self.split))
        # library()'s own images past its first ones (entropy tuples): made here on several workers
        jobs = [(name, tuple(procedural_seed(self.split, self.seed, j, i)))
                for j, name in enumerate(g for g in ("syn", "poi", "tex") if g in self.sources)
                for i in range(_BASE_PROCEDURAL, n)]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                extra = list(ex.map(_procedural, jobs))
        else:
            extra = [_procedural(job) for job in jobs]
        images = list(base) + extra
        weights = [im.size ** 0.5 * (1.0 if i < n_skimage else _BASE_PROCEDURAL / n) for i, im in enumerate(images)]
        return images, np.asarray(weights, dtype=np.float64)

    def _uniform(self, *shape):
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=torch.float64)

    def crops(self, n: int) -> torch.Tensor:
        """Random crops of the library, each under one of the 8 symmetries of the square.

        Parameters
        ----------
        n : int
            How many crops.

        Returns
        -------
        torch.Tensor
            ``(n, P+K-1, P+K-1)`` float32 on the stream's device: P the patch size (128), K the PSF
            model's kernel size (what the blur's valid part needs).
        """
        n = positive_int(n, "n")
        k = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        y0 = (self._uniform(n) * (self.heights[k] - self.size + 1)).long()
        x0 = (self._uniform(n) * (self.widths[k] - self.size + 1)).long()
        sym = torch.randint(8, (n,), generator=self.generator, device=self.device)
        idx = (self.offsets[k, None, None] + (y0[:, None, None] + self.rows[sym]) * self.widths[k, None, None]
               + x0[:, None, None] + self.cols[sym])
        return self.flat[idx]

    def __call__(self, n: int):
        n = positive_int(n, "n")
        dev, u = self.device, self._uniform
        params = self.lo + (self.hi - self.lo) * u(n, self.model.n_params)
        kernels = render_psfs(self.model, params)
        sharp = self.crops(n)
        forced = u(n) < self.invalid_fraction
        flat = forced & (u(n) < 0.5)
        sharp[forced] = 0.0
        sharp[flat] = (0.1 + 0.9 * u(int(flat.sum()))).float()[:, None, None]
        angle = 2 * math.pi * u(n)[:, None, None]
        ramp = (self.yy * torch.sin(angle) + self.xx * torch.cos(angle)) / 2 + 0.5
        # Floored at zero as synth's: a deep diagonal gradient would make light negative in a corner.
        light = ((0.3 + 0.7 * u(n))[:, None, None]
                 * (1 - self.illumination * u(n)[:, None, None] * ramp).clamp(min=0)).float()
        blurred = blur_torch(sharp, kernels)
        psi = blurred * light
        lo, hi = self.photons
        ph = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u(n)).float()[:, None, None]
        rn = (self.read_noise[0] + (self.read_noise[1] - self.read_noise[0]) * u(n)).float()[:, None, None]
        beta = (0.5 + 0.5 * u(n)).float()[:, None, None]
        counts = torch.poisson(psi.clamp_min(0) * ph, generator=self.generator)
        noisy = beta * counts + rn * torch.randn(psi.shape, generator=self.generator, device=dev)
        spread, mean = _texture(blurred, light, psi)
        valid = _readable(spread, mean, *(v[:, 0, 0] for v in (ph, rn, beta))) & ~forced
        return noisy, params, valid

    def attrs(self) -> dict:
        """What the stream draws from, as a training set's attributes record it.

        Returns
        -------
        dict
            The PSF model's metadata (name, parameters, ranges, optics), the patch size, sources,
            bundled images, split, seed and the draw's settings.
        """
        return {**self.model.to_meta(), "patch": PATCH, "sources": list(self.sources),
                "images": bundled_images(self.sources, self.split), "split": self.split,
                "seed": self.seed, "n_procedural": self.n_procedural, "invalid_fraction": self.invalid_fraction,
                "photons": list(self.photons), "read_noise": list(self.read_noise), "illumination": self.illumination}


def train_stream(stream: PatchStream, *, arch: str | None = None, init=None, freeze: bool = False,
                 patches: int = 1_000_000, batch_size: int = 256, lr: float | None = None, n_val: int | None = None,
                 eval_every: int = 500, max_minutes: float | None = None, seed: int = 0, progress: bool = True,
                 stop_on: tuple = ()):
    """Train a PSF-parameter regressor on fresh batches of ``stream`` (its device is the model's).

    Parameters
    ----------
    stream : PatchStream
        Where the batches come from; its PSF model, ranges and optics are the model's.
    arch : {"spectral", "polar", "compact", "resnet34"}, optional
        The network (:mod:`lsfov.estimate.network`); by default ``init``'s, or ``spectral``.
    init : str, path or PSFRegressor, optional
        The model to start from, as in :func:`lsfov.estimate.train` (one of the stream's PSF model).
    freeze : bool
        Train only the tail of a ``polar`` network over ``init``'s fixed trunk (``arch="polar"`` and
        ``init`` needed), as in :func:`lsfov.estimate.train`.
    patches : int
        Training patches to draw (``patches // batch_size`` steps, at least one), each seen once.
    batch_size : int
        Patches per step (>= 2).
    lr : float, optional
        Adam's learning rate [3e-4], decayed on a cosine to 2 % of it over the steps, or over
        ``max_minutes`` where that ends first.
    n_val : int, optional
        Validation patches, drawn once from a stream of the same library and another seed
        [a tenth of ``patches``, 256 to 8192].
    eval_every : int
        Steps between validations; the weights of the highest validation R² are kept.
    max_minutes : float, optional
        Stop after this much time (with a last validation).
    seed : int
        Seeds the network's initial weights (the batches follow the stream's own seed).
    progress : bool
        Show progress bars (the validation patches, the training steps).
    stop_on : tuple of exception types
        Exceptions (e.g. ``KeyboardInterrupt``) that, raised during the steps, end the training
        there, with one more validation (unless one of them interrupts it too) and the best
        weights validated (``meta["training"]["stopped"]`` names the exception); where no weights
        beat the start (or none trained), they propagate. The CLI passes Ctrl-C and SIGTERM: a
        stream has no checkpoint to resume from.

    Returns
    -------
    PSFRegressor
        The model with the best weights, ``meta["training"]`` describing the run (``"stream"``).

    Raises
    ------
    TypeError
        If ``stream`` is not a :class:`PatchStream`.
    ValueError
        For a setting out of range, ``patches`` fewer than ``batch_size``, ``freeze`` without a
        ``polar`` network and ``init``, or an ``init`` of another PSF model.
    """
    from .model import PSFRegressor, decode, encode, load_model
    from .network import loss as _loss
    from .network import standardize
    from .training import _Fit, _start_from, r2_scores

    if not isinstance(stream, PatchStream):
        raise TypeError(f"stream must be an lsfov.estimate.stream.PatchStream, got {type(stream).__name__}")
    if stream.split == "test":  # as train() says of a set of the test split
        import warnings

        from .._validate import LsfovWarning

        warnings.warn("training on a stream of the test split (the held-out images): every test set of it scores what "
                      "the model has seen; make the stream of split='train'", LsfovWarning, stacklevel=2)
    patches, batch_size = positive_int(patches, "patches"), positive_int(batch_size, "batch_size", minimum=2)
    if patches < batch_size:  # one step would still draw a whole batch: more than asked for
        raise ValueError(f"patches={patches} is less than one batch ({batch_size}); train on at least one batch "
                         "(--stream N, --batch-size)")
    n_val = min(8192, max(256, patches // 10)) if n_val is None else positive_int(n_val, "n_val", minimum=2)
    eval_every = positive_int(eval_every, "eval_every")
    lr = 3e-4 if lr is None else real_number(lr, "lr", minimum=0, maximum=1, exclusive=True)
    if max_minutes is not None:
        max_minutes = real_number(max_minutes, "max_minutes", minimum=0)
    m, dev = stream.model, stream.device
    torch.manual_seed(seed)
    start = None if init is None else load_model(init, psf_model=m.name)
    if start is not None:
        from .training import warn_other_task

        warn_other_task(start, m.to_meta(), "the stream")
    arch = arch or (start.arch if start is not None else "spectral")
    meta = {**{k: v for k, v in m.to_meta().items() if k in ("ranges", "optics", "size")}, "patch": PATCH}
    model = PSFRegressor(m.name, arch, meta=meta, device=dev)
    if freeze and not (hasattr(model.net, "features") and start is not None):
        raise ValueError("freeze=True trains the tail of a polar network over init's fixed trunk: pass arch='polar' and init= (--arch polar --init)")
    if start is not None:
        _start_from(model.net, start, arch)
    fit = _Fit(model, bool(freeze))
    net = model.net

    def inputs(x):
        if not freeze:
            return x
        with torch.no_grad():
            return net.features(standardize(x)[:, None])

    # Validation: fixed patches of another seed (the frozen trunk's features once).
    val_stream = copy.copy(stream)
    val_stream.generator = torch.Generator(device=dev).manual_seed(stream.seed + 1_000_003)
    fit.train_mode(False)
    from ..cluster import progress_bar

    vx, vp, vv = [], [], []
    with progress_bar(total=n_val, desc="validation patches", unit="patch", disable=not progress) as bar:
        for b in range(0, n_val, 1024):  # (8192 took a minute on 2 CPU cores: not in silence)
            x, p, v = val_stream(min(1024, n_val - b))
            vx.append(inputs(x))
            vp.append(p.cpu().numpy())
            vv.append(v.cpu().numpy())
            bar.update(len(p))
    vx, vp, vv = torch.cat(vx), np.concatenate(vp), np.concatenate(vv)

    def validate():
        fit.train_mode(False)
        with torch.inference_mode():
            out = torch.cat([fit(vx[b : b + 1024]) for b in range(0, len(vx), 1024)]).float().cpu().numpy()
        fit.train_mode()
        if vv.sum() < 2:
            return float("nan")
        with np.errstate(all="ignore"):
            return float(np.mean(list(r2_scores(m, vp[vv], decode(m, out[:, 1:])[vv]).values())))

    steps = max(1, patches // batch_size)
    if steps * batch_size != patches:
        log.info("training on %d patches: %d whole batches of %d", steps * batch_size, steps, batch_size)
    opt = torch.optim.Adam(fit.params, lr=lr)

    def progress_made(step):  # 0 -> 1: the share of the steps, or of the time, spent
        f = step / steps
        if max_minutes is not None:
            f = max(f, (time.perf_counter() - t0) / max(60 * max_minutes, 1e-9))
        return min(f, 1.0)
    def kept(r2, best, best_state):
        """The best validation R² and its weights, with a validation of ``r2`` just made."""
        if np.isfinite(r2) and r2 > best:
            return r2, {k: w.detach().cpu().clone() for k, w in net.state_dict().items()}
        return best, best_state

    best, best_state = validate(), None  # the starting weights compete too (continuing can lose)
    history = [{"step": 0, "val_r2": best}]
    if start is None or start.arch != arch:
        best = -math.inf  # a new network's untrained start is no candidate
    fit.train_mode()
    t0, running, step, trained, stopped = time.perf_counter(), [], 0, 0, None
    with progress_bar(total=steps, desc=f"train {m.name} ({arch}) on a stream", unit="batch", disable=not progress) as bar:
        try:
            for step in range(1, steps + 1):
                done = progress_made(step - 1)
                for group in opt.param_groups:  # cosine decay to 2 %
                    group["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * done)))
                x, p, v = stream(batch_size)
                t = torch.from_numpy(encode(m, p.cpu().numpy()).astype(np.float32)).to(dev)
                loss = _loss(fit(inputs(x)), t, v)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                trained = step
                running.append(loss.detach())
                bar.update(1)
                late = max_minutes is not None and progress_made(step) >= 1
                if step % eval_every == 0 or step == steps or late:
                    r2 = validate()
                    history.append({"step": step, "train_loss": float(torch.stack(running).mean()), "val_r2": r2,
                                    "seconds": round(time.perf_counter() - t0, 1)})
                    running = []
                    bar.set_postfix(val_r2=f"{r2:.4f}")
                    best, best_state = kept(r2, best, best_state)
                    if late:
                        break
        except stop_on as e:  # (a Ctrl-C: the best weights so far, where they beat the start)
            stopped = e
            if trained and history[-1]["step"] != trained:  # the steps since the last validation count too
                try:
                    r2 = validate()
                    history.append({"step": trained, "val_r2": r2, "seconds": round(time.perf_counter() - t0, 1)})
                    best, best_state = kept(r2, best, best_state)
                except stop_on:  # a second signal: no waiting for it
                    pass
    if stopped is not None and best_state is None:
        raise stopped  # nothing validated beat the start: no model to keep
    seconds = time.perf_counter() - t0
    if best_state is not None:
        net.load_state_dict(best_state)
    elif start is not None and start.arch == arch:
        _start_from(net, start, arch)  # nothing beat the start
    net.eval()
    model.meta["training"] = {
        "data": {**{k: v for k, v in stream.attrs().items() if k in ("sources", "images", "split", "seed", "photons", "read_noise",
                                                                     "illumination", "invalid_fraction", "n_procedural")},
                 "n": trained * batch_size, "stream": True},
        "n_train": trained * batch_size, "n_val": n_val, "lr": lr, "batch_size": batch_size, "steps": trained,
        "epochs_run": 1,  # each patch seen once
        "best_val_r2": best, "history": history, "device": str(dev), "seconds": round(seconds, 1),
        "patches_per_second": round(trained * batch_size / max(seconds, 1e-9), 1),
    }
    if stopped is not None:
        model.meta["training"]["stopped"] = type(stopped).__name__
    if freeze:
        model.meta["training"]["freeze"] = True
    if dev.type == "cuda":
        model.meta["training"]["gpu"] = torch.cuda.get_device_name(dev)
    if start is not None:
        model.meta["training"]["init"] = {k: v for k, v in start.meta.get("training", {}).items() if k != "history"}
    return model
