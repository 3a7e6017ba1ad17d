"""A trained PSF-parameter regressor: weights, metadata, target encoding and batched prediction.

A model file is one ``.pt`` holding plain tensors and JSON-like metadata, read with
``torch.load(weights_only=True)``: loading a model never runs pickled code. A ``.json`` copy of the
metadata sits beside the shipped weights for people to read.

Targets. Gaussian and defocus parameters are regressed normalised to [0, 1] by the model's
ranges. Astigmatism is not: the axis wraps at pi, and a pupil PSF is unchanged when the whole
aberration vector ``v = (focus, c sin 2theta, c cos 2theta)`` changes sign (lsfov.psf), so near
focus the axis jumps by pi/2. The network regresses the entries of ``v vᵀ`` instead, a smooth
function of the PSF with no wrap and no sign. Decoding reads the magnitudes from the diagonal, the
axis from the astigmatism block, and the side of focus from the focus x astigmatism terms.

Those two terms, ``focus · astigmatism · (sin, cos) 2 axis``, are also returned as they are
(:data:`PRODUCTS`): regressed directly, they pass smoothly through zero at focus, where the
decoded focus (a square root) is biased up and the decoded side of focus is a coin toss. Depth
from astigmatism reads them (:mod:`lsfov.estimate.depth`).
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import stat
import threading
from pathlib import Path

import numpy as np
import torch

from .. import _backend, psf as _psf
from .._validate import boolean, positive_int, readable_array
from ..cluster import stop_point
from ..io import atomic_file
from .network import build, standardize

__all__ = ["PSFRegressor", "load_model", "SHIPPED"]

log = logging.getLogger("lsfov")

FORMAT = "lsfov.PSFRegressor/1"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED = ("G1", "G2", "Z1", "Z3")


def _astigmatic(m) -> bool:
    return "astigmatism" in m.params and "axis" in m.params


#: ``focus · astigmatism · sin 2 axis`` and ``· cos 2 axis`` (Noll 4 x Noll 5 and 4 x 6), in wave RMS²:
#: returned by :meth:`PSFRegressor.predict` and carried by PSF maps of models with both parameters.
PRODUCTS = ("focus_astig_sin", "focus_astig_cos")


def products(m) -> tuple:
    """The names of :data:`PRODUCTS` that model ``m`` regresses (none without focus and astigmatism)."""
    return PRODUCTS if _astigmatic(m) and "focus" in m.params else ()


def _products(m, targets) -> dict:
    """:data:`PRODUCTS` in wave RMS² from regression targets (B, n_targets(m)): entries (0, 1), (0, 2) of v vᵀ."""
    if not products(m):
        return {}
    s, t = _scales(m), np.asarray(targets, dtype=np.float64)
    return {"focus_astig_sin": t[:, 1] * s[0] * s[1], "focus_astig_cos": t[:, 2] * s[0] * s[2]}


def _scales(m):
    """Per-component scale of the aberration vector v: the upper end of each range."""
    return np.array(([m.ranges["focus"][1]] if "focus" in m.params else []) + [m.ranges["astigmatism"][1]] * 2)


# The 8 symmetries of the square as (transpose, flip_y, flip_x): flips first, then the transpose.
D4 = tuple((t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True))


def transform_patches(t: torch.Tensor, transpose: bool, flip_y: bool, flip_x: bool) -> torch.Tensor:
    """Apply one symmetry of the square (:data:`D4`) to a batch of patches (..., P, P)."""
    dims = [d for d, f in ((-2, flip_y), (-1, flip_x)) if f]
    if dims:
        t = t.flip(dims)
    return t.transpose(-2, -1) if transpose else t


def _swapped(name: str) -> str:
    return name[:-2] + {"_y": "_x", "_x": "_y"}[name[-2:]] if name[-2:] in ("_y", "_x") else name


def targets_to_original(m, targets, transpose: bool, flip_y: bool, flip_x: bool) -> np.ndarray:
    """Targets (B, n_targets) regressed from patches transformed by a symmetry of the square -> the
    targets of the untransformed patches.

    A flip changes the sign of Noll 5 (``xy``), a transpose that of Noll 6 (``x² - y²``); defocus and
    isotropic widths are unchanged, and a transpose swaps a ``*_y`` parameter with its ``*_x``.
    """
    t = np.asarray(targets, dtype=np.float64)
    if _astigmatic(m):
        s = np.array(([1.0] if "focus" in m.params else []) + [(-1.0) ** (flip_y + flip_x), -1.0 if transpose else 1.0])
        iu = np.triu_indices(len(s))
        return t * (s[:, None] * s[None, :])[iu]
    names = list(m.params)
    order = [names.index(_swapped(p)) if _swapped(p) in names else i for i, p in enumerate(names)]
    if not transpose or order == list(range(len(names))):
        return t
    return m.normalize(m.denormalize(t)[:, order])  # through the units: the two ranges may differ


def n_targets(m) -> int:
    if _astigmatic(m):
        d = len(_scales(m))
        return d * (d + 1) // 2
    return m.n_params


def encode(m, params) -> np.ndarray:
    """Model parameters (B, N) -> regression targets (B, n_targets(m))."""
    params = np.atleast_2d(np.asarray(params, dtype=np.float64))
    if not _astigmatic(m):
        return m.normalize(params)
    return outer_targets(aberrations(m, params))


def aberrations(m, params) -> np.ndarray:
    """An astigmatic model's parameters (B, N) -> ``v`` (B, d): focus (if the model has it) and
    astigmatism · (sin, cos) 2 axis, each over the upper end of its range. ``v`` and ``−v`` are one PSF."""
    p = dict(zip(m.params, np.atleast_2d(np.asarray(params, dtype=np.float64)).T))
    c, th = p["astigmatism"], p["axis"]
    comps = ([p["focus"]] if "focus" in p else []) + [c * np.sin(2 * th), c * np.cos(2 * th)]
    return np.stack(comps, axis=1) / _scales(m)


def outer_targets(v) -> np.ndarray:
    """The upper triangle of ``v vᵀ`` (B, d(d+1)/2): what the network regresses, the same for ``±v``."""
    iu = _triu(v.shape[1])
    return (v[:, :, None] * v[:, None, :])[:, iu[0], iu[1]]


@functools.lru_cache(maxsize=8)
def _triu(d: int):
    return np.triu_indices(d)


def decode(m, targets) -> np.ndarray:
    """Regression outputs (B, n_targets(m)) -> model parameters (B, N), clipped to the ranges."""
    t = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    lo, hi = m.bounds
    if not _astigmatic(m):
        return np.clip(m.denormalize(t), lo, hi)
    d = len(_scales(m))
    iu = _triu(d)
    mat = np.zeros((len(t), d, d))
    mat[:, iu[0], iu[1]] = t
    mat[:, iu[1], iu[0]] = t
    # Magnitudes from the diagonal (each regressed directly, robust when a direction is uncertain),
    # the astigmatism orientation from its 2x2 block (known modulo pi), and which of the two
    # orientations from the cross terms focus * astigmatism (the sign that focus >= 0 fixes).
    a = -2  # index of Noll 5 (c sin 2theta); Noll 6 is the last
    c = np.sqrt(np.maximum(mat[:, a, a] + mat[:, -1, -1], 0))
    beta = 0.5 * np.arctan2(2 * mat[:, a, -1], mat[:, -1, -1] - mat[:, a, a])  # angle of (a6, a5), mod pi
    out = {}
    if "focus" in m.params:
        out["focus"] = np.sqrt(np.maximum(mat[:, 0, 0], 0)) * _scales(m)[0]
        cross = mat[:, 0, a] * np.sin(beta) + mat[:, 0, -1] * np.cos(beta)
        beta = np.where(cross < 0, beta + np.pi, beta)
    out["astigmatism"] = c * _scales(m)[-1]
    out["axis"] = np.mod(beta / 2, np.pi)
    return np.clip(np.stack([out[p] for p in m.params], axis=1), lo, hi)


def torch_device(device=None) -> torch.device:
    """``device`` as a torch device (default: CUDA when there is one), refused in one line if this
    torch cannot use it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch sees no CUDA GPU (a CPU build, or no driver); use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPUs here")
    return dev


_pool = None
_pool_lock = threading.Lock()


def _one_thread_pool():
    """The process's pool for fixed CPU passes: each of its threads runs torch on one intra-op
    thread (set once in the thread: with OpenMP torch's thread count is the calling thread's own),
    and there are as many as torch had threads where the pool was made (1 in a distributed worker,
    which runs with OMP_NUM_THREADS=1)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="lsfov-cnn",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _pool


def _forget_pool():  # a forked child has the pool object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


# Larger batches are compute-bound (launches matter little) and a graph keeps its activations.
_GRAPH_MAX_BATCH = 128
#: Patches per forward pass that :meth:`PSFRegressor.predict` takes by default on the CPU, and on a GPU.
CPU_BATCH, GPU_BATCH = 64, 256


class _GraphedPass:
    """A pass captured once as a CUDA graph for one batch shape and replayed: the eager network
    launches a kernel per layer, which dominates small batches on a GPU. The graph's input and
    output live in fixed device buffers, so calls (Dask threads share a model) take turns."""

    def __init__(self, fn, like: torch.Tensor):
        dev = like.device
        self.x = torch.zeros_like(like)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture: cuDNN's choices, allocations
            for _ in range(3):
                fn(self.x)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # other threads may run CUDA work
            self.y = fn(self.x)
        self.lock = threading.Lock()
        probe = torch.rand_like(like) * 100
        eager, replay = fn(probe), self(probe)
        if not torch.allclose(eager, replay, rtol=1e-4, atol=1e-4):  # never trust a replay that differs
            raise RuntimeError(f"replay differs from the eager pass by {float((eager - replay).abs().max()):.2e}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.x.copy_(x)
            self.graph.replay()
            return self.y.clone()


class PSFRegressor:
    """A network with what it was trained on: PSF model, ranges, optics, patch size.

    Made by :func:`load_model` (shipped or saved models), :meth:`from_file` and the training
    functions; constructed directly, its network is untrained.

    Attributes
    ----------
    psf_model : lsfov.psf.PSFModel
        The model whose parameters are regressed (with the ranges and optics used in training); given
        to the constructor as a PSF-model name (``"Z3"``) or a ``PSFModel``.
    arch : str
        The network (:data:`lsfov.estimate.network.ARCHITECTURES`: ``"compact"``, ``"spectral"``,
        ``"polar"``, ``"resnet34"``).
    meta : dict
        Everything stored with the weights (architecture, training data, test-set R², ...).
    device : torch.device
        Where the network runs; given to the constructor as a device or its name, default CUDA when
        there is one.
    patch : int
        Patch edge in pixels the network reads (128 for the shipped models).
    ranges : dict
        The training ranges ``{param: (low, high)}``.
    optics : lsfov.Optics or None
        The training optics (None for Gaussian models).
    cuda_graphs : bool
        Replay fixed-size passes on CUDA from CUDA graphs (PSF maps use fixed sizes).
    """

    def __init__(self, psf_model, arch: str = "compact", *, meta: dict | None = None, device=None):
        self.meta = dict(meta or {})
        self.psf_model = _psf.PSFModel.from_meta({**self.meta, "psf_model": psf_model})
        self.arch = arch
        self.patch = int(self.meta.get("patch", 128))
        self.net = build(arch, 1 + n_targets(self.psf_model))
        self.device = torch_device(device)
        self.net.to(self.device)
        #: Replay fixed-size passes on CUDA from CUDA graphs (PSF maps use fixed sizes).
        self.cuda_graphs = _backend.CUDA_GRAPHS
        self._graphs: dict = {}
        self._graph_lock = threading.Lock()
        record = self.psf_model.to_meta()  # its name first: the keys stay in the shipped files' order
        self.meta.update(psf_model=record.pop("psf_model"), arch=arch, patch=self.patch, **record)

    def __getstate__(self):  # a model travels to Dask workers: without its CUDA graphs and their lock
        state = dict(self.__dict__)
        state["_graphs"], state["_graph_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._graph_lock = threading.Lock()

    def weights_digest(self) -> str:
        """A digest of the network's weights: which model made a map, whatever its file is called.

        Returns
        -------
        str
            16 hex digits, of the architecture and the weights (a retrained ``z3.pt`` is another model).
        """
        import hashlib

        h = hashlib.blake2b(self.arch.encode(), digest_size=8)
        for name, t in self.net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def ranges(self) -> dict:
        """The PSF model's parameter ranges {param: (low, high)} (a copy): those of its training set."""
        return dict(self.psf_model.ranges)

    @property
    def optics(self):
        """The PSF model's :class:`~lsfov.Optics` (its training optics); None for Gaussian models."""
        return self.psf_model.optics

    @property
    def params(self) -> tuple:
        """The regressed parameters' names, in the PSF model's order."""
        return self.psf_model.params

    def __repr__(self):
        r2 = self.meta.get("test", {}).get("r2_mean")
        extra = f", test R² {r2:.3f}" if r2 is not None else ""
        return f"PSFRegressor({self.psf_model.name}, {self.arch}, params={list(self.params)}{extra})"

    # -- prediction -----------------------------------------------------------------------------
    def _as_batch(self, patches) -> torch.Tensor:
        if isinstance(patches, torch.Tensor):
            t = patches.detach()
            if t.is_complex():  # (a bool tensor is read as 0/1, as a bool NumPy array)
                raise TypeError(f"patches must be real numbers, got a {t.dtype} tensor")
        elif hasattr(patches, "__cuda_array_interface__"):  # CuPy: zero-copy through DLPack, stays on the GPU
            if patches.dtype.kind not in "biuf":
                raise TypeError(f"patches must be numeric, got dtype {patches.dtype}")
            t = torch.from_dlpack(patches.astype("float32", copy=False))
        else:
            readable_array(patches, "patches")  # (a mask's hidden values would be read as pixels)
            a = np.asarray(patches)
            if a.dtype.kind not in "biuf":
                raise TypeError(f"patches must be numeric, got dtype {a.dtype}")
            a = np.ascontiguousarray(a, dtype=np.float32)
            # torch shares the memory and warns of a read-only array (a memory map): a copy of those
            t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if t.ndim == 2:
            t = t[None]
        p = self.patch
        if t.ndim != 3 or tuple(t.shape[-2:]) != (p, p):
            raise ValueError(f"patches must have shape (B, {p}, {p}) (or ({p}, {p})), got {tuple(t.shape)}; "
                             f"cut {p}x{p} patches from the image first")
        return t.to(torch.float32)

    def default_batch(self) -> int:
        """Patches per forward pass :meth:`predict` takes by default on this model's device.

        Returns
        -------
        int
            :data:`CPU_BATCH` on the CPU, :data:`GPU_BATCH` on a GPU.
        """
        return CPU_BATCH if self.device.type == "cpu" else GPU_BATCH

    def _pass(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass of a batch on the device: the network's outputs, then per patch whether it
        is flat (constant) and whether all its pixels are finite, as (B, 3 + n_targets) float32."""
        z, std = standardize(x, with_std=True)  # (each patch scaled to a peak of 1: any intensity scale)
        out = self.net(z[:, None]).float()
        finite = torch.isfinite(x).flatten(1).all(1, keepdim=True)
        flat = std.flatten(1) <= 1e-6  # (of a peak of 1; an all-zero patch too)
        return torch.cat([out, flat.float(), finite.float()], 1)

    def _run(self, t: torch.Tensor, batch_size: int, fixed: bool = False):
        """Outputs (B, 1 + n_targets) and flat flags (B,) of a (B, P, P) float32 batch, on the host in
        one transfer. ``fixed``: every pass on exactly ``batch_size`` patches, the last padded with
        zeros. On CUDA, passes of ``batch_size`` patches replay a CUDA graph (one launch instead of
        one per layer)."""
        if self.net.training:  # eval() walks every module: ~0.1 ms, on a GPU a good part of a small map
            self.net.eval()

        def one(s):
            with torch.inference_mode():  # thread-local: entered in each thread
                # Asynchronous only from host memory: a GPU tensor copied to a CPU model without a
                # sync could be read before the copy lands.
                x = t[s : s + batch_size].to(self.device, non_blocking=t.device.type == "cpu")
                # Contiguous: a convolution's rounding follows its input's layout, and a symmetry's view
                # (transposed) or the zero-padded last pass (copied) would otherwise give other bits.
                x = x.contiguous()
                n = len(x)
                if fixed and n < batch_size:
                    x = torch.cat([x, x.new_zeros((batch_size - n,) + tuple(x.shape[1:]))])
                run = self._graphed(x) if len(x) == batch_size else None
                return (run or self._pass)(x)[:n]

        starts = range(0, len(t), batch_size)
        if fixed and self.device.type == "cpu":
            # The CPU's matrix products split their sums by torch's thread count, and with it their
            # rounding: fixed passes run on the one-thread pool, never on the caller's thread, so that
            # the bits depend neither on the thread count nor on which thread (scheduler) calls.
            passes = [_one_thread_pool().submit(one, s) for s in starts]  # all at once: the pool's threads busy
        else:
            passes = None
        outs = []
        try:
            for i, s in enumerate(starts):  # a stopped compute ends between passes
                stop_point()
                outs.append(passes[i].result() if passes else one(s))
        except BaseException:
            for p in passes or ():
                p.cancel()  # (those not started yet)
            raise
        with torch.inference_mode():
            res = torch.cat(outs).cpu().numpy() if outs else np.zeros((0, 3 + n_targets(self.psf_model)), np.float32)
        if not res[:, -1].all():
            raise ValueError("patches contain NaN or Inf pixels (or values beyond float32's range); replace or "
                             "rescale them")
        return res[:, :-2], res[:, -2] > 0

    def _graphed(self, x: torch.Tensor):
        """The CUDA graph of :meth:`_pass` for batches like ``x`` (None off CUDA, for batches over
        ``_GRAPH_MAX_BATCH``, when switched off by ``cuda_graphs = False`` or LSFOV_CUDA_GRAPHS=0, or
        when capturing failed)."""
        if x.device.type != "cuda" or not self.cuda_graphs or len(x) > _GRAPH_MAX_BATCH:
            return None
        key = (tuple(x.shape), str(x.device))
        with self._graph_lock:
            if key not in self._graphs:
                try:
                    self._graphs[key] = _GraphedPass(self._pass, x)
                except Exception as e:  # a driver or an op that cannot be captured: the eager pass
                    log.warning("lsfov: CUDA graph of the %s network not used (%s: %s)", self.arch, type(e).__name__, e)
                    self._graphs[key] = None
        return self._graphs[key]

    def predict(self, patches, batch_size: int | None = None, *, reproducible: bool = False,
                symmetrize: bool = False) -> dict:
        """Regress the PSF parameters of each patch.

        Parameters
        ----------
        patches : (B, P, P) or (P, P) array, any intensity scale
            NumPy, CuPy (taken through DLPack: it stays on the GPU) or a torch tensor; P the model's
            patch size (``model.patch``, 128 for the shipped models). The results are NumPy whatever
            the input.
        batch_size : int, optional
            Patches per forward pass; default :data:`CPU_BATCH` (64) on the CPU, where larger passes
            outgrow its caches (256 ran at 0.53-0.61x the rate of 64 with the shipped networks,
            benchmarks/RESULTS.md, section ``batch``), and 256 on a GPU.
        reproducible : bool
            Run every pass on exactly ``batch_size`` patches (the last padded), so that a patch's
            result does not depend on which patches share its batch: the math libraries pick their
            kernels, and with them the float rounding, by batch size; on the CPU each pass also runs
            on one torch thread (passes side by side), as the rounding follows the thread count too.
            PSF maps use it, so that their bytes depend neither on the chunking nor on the threads.
        symmetrize : bool
            Average the network's outputs over the 8 symmetries of the square (rotations by 90° and
            flips of each patch, the parameters transformed to match): 8x the inference time for a
            more accurate estimate (benchmarks/RESULTS.md).

        Returns
        -------
        dict
            ``{parameter name: (B,) float32 in the model's units, "validity": (B,) probability that
            the patch can be read (1 = valid)}``; for a model with focus and astigmatism (Z3) also
            :data:`PRODUCTS`, ``focus · astigmatism · (sin, cos) 2 axis`` as regressed (wave RMS²).

        Raises
        ------
        TypeError
            If ``patches`` are not real numbers.
        ValueError
            If ``patches`` are not (B, P, P) or (P, P) for the model's P, hold NaN or Inf (or a
            masked array's masked pixels), or ``batch_size`` is not a positive integer.
        """
        t = self._as_batch(patches)
        batch_size = self.default_batch() if batch_size is None else positive_int(batch_size, "batch_size")
        reproducible, symmetrize = boolean(reproducible, "reproducible"), boolean(symmetrize, "symmetrize")
        if symmetrize:
            out = np.zeros((len(t), 1 + n_targets(self.psf_model)))
            for g in D4:
                o, flat = self._run(transform_patches(t, *g), batch_size, fixed=reproducible)
                out[:, :1] += o[:, :1]  # the validity logit does not change
                out[:, 1:] += targets_to_original(self.psf_model, o[:, 1:], *g)
            out /= len(D4)
        else:
            out, flat = self._run(t, batch_size, fixed=reproducible)
        params = decode(self.psf_model, out[:, 1:]).astype(np.float32)
        res = {p: params[:, i] for i, p in enumerate(self.params)}
        res.update({k: v.astype(np.float32) for k, v in _products(self.psf_model, out[:, 1:]).items()})
        validity = 1 / (1 + np.exp(-out[:, 0].astype(np.float64)))
        # A constant patch (all black, saturated, padded) carries nothing to read, whatever the
        # network says: standardised it is all zeros, an input it never saw in training.
        res["validity"] = np.where(flat, 0.0, validity).astype(np.float32)
        return res

    # -- files ----------------------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write the weights and metadata (``path`` ``.pt``, plus a readable ``.json`` beside it).

        Parameters
        ----------
        path : str or Path
            The model file, ending in ``.pt``; :func:`load_model` and :meth:`from_file` read it.
        overwrite : bool
            Replace an existing file (``.pt`` or ``.json``); without it one is refused (FileExistsError).

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        ValueError
            If ``path`` does not end in ``.pt``, or it or its ``.json`` is a directory.
        FileExistsError
            If the ``.pt`` or ``.json`` file exists and ``overwrite`` is not given.
        """
        path = Path(path)
        if path.suffix != ".pt":
            raise ValueError(f"model files end in .pt, got {path.name}; give a file name ending in .pt")
        for f in (path, path.with_suffix(".json")):
            if f.is_dir():
                raise ValueError(f"{f} is a directory; give the model a file name ending in .pt")
            if f.exists() and not boolean(overwrite, "overwrite"):
                raise FileExistsError(f"{f} already exists; pass overwrite=True (--overwrite) to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.loads(json.dumps(self.meta))  # plain types only: weights_only can read them
        meta.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        with atomic_file(path) as tmp:  # with its weights' digest: damage inside the file is found on loading
            torch.save({"format": FORMAT, "meta": meta, "state_dict": state, "weights_digest": self.weights_digest()},
                       tmp)
        with atomic_file(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta, indent=1) + "\n")
        return path

    @classmethod
    def from_file(cls, path, device=None) -> PSFRegressor:
        """Read a model written by :meth:`save` (``lsfov train``): a new instance each call, where
        :func:`load_model` caches one per file and device.

        Parameters
        ----------
        path : str or Path
            The ``.pt`` model file.
        device : str or torch.device, optional
            Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``); default CUDA when there is one.

        Returns
        -------
        PSFRegressor
            In evaluation mode, with the PSF model, ranges and optics it was trained with.

        Raises
        ------
        FileNotFoundError
            If no file exists at ``path``.
        ValueError
            If it is not an lsfov model file (its ``.json`` metadata, a training checkpoint, another
            file), its weights do not fit its recorded network or their saved digest (a damaged
            file), or ``device`` cannot be used.
        """
        path = Path(path)
        if path.is_dir():  # a training set, a result, a checkpoint directory...
            raise ValueError(f"{path} is a directory, not a model file; give a shipped name ({', '.join(SHIPPED)}) or "
                             "a .pt file (lsfov train writes one)")
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}; give a shipped name ({', '.join(SHIPPED)}) or a .pt path")
        if path.suffix == ".json" and path.with_suffix(".pt").is_file():
            raise ValueError(f"{path} is a model's metadata; give the model file {path.with_suffix('.pt')}")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            import zipfile

            with open(path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"  # how every torch.save file begins
            if zipped and not zipfile.is_zipfile(path):  # (a copy cut short loses the zip's directory, at its end;
                # a whole one that torch refuses holds objects other than weights: not a model)
                raise ValueError(f"{path} is a PyTorch file cut short or damaged (its archive cannot be read); "
                                 "copy it again") from None
            raise ValueError(f"{path} is not an lsfov model file ({type(e).__name__}); "
                             "train one with `lsfov train`") from None
        if isinstance(blob, dict) and str(blob.get("format", "")).startswith("lsfov.TrainState"):
            raise ValueError(f"{path} is a checkpoint of a training run, not a model: continue the run (--resume), "
                             "or use the best.pt written beside it when the run ends")
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path} is not an lsfov model file; train one with `lsfov train`")
        meta, device = blob.get("meta"), torch_device(device)  # (a device refused as such, not as metadata)
        try:
            model = cls(meta["psf_model"], meta.get("arch", "compact"), meta=meta, device=device)
        except (KeyError, TypeError, ValueError) as e:  # metadata at odds with itself (e.g. another model's ranges)
            raise ValueError(f"{path}: its metadata does not describe a model ({type(e).__name__}: {e}); the file is "
                             "damaged or edited: copy it again or train it again") from None
        try:
            model.net.load_state_dict(blob["state_dict"])
        except RuntimeError as e:  # torch's first line only names the network; the next says what differs
            lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__]
            detail = lines[1] if len(lines) > 1 else lines[0]
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
            raise ValueError(f"{path}: weights do not fit a {meta.get('arch')} network for {meta['psf_model']} "
                             f"({detail}); the file is damaged or edited: copy it again or train it again") from None
        if blob.get("weights_digest") not in (None, model.weights_digest()):  # (files from before: none stored)
            raise ValueError(f"{path}: its weights differ from the digest saved with them: the file is damaged; "
                             "copy it again")
        model.net.eval()
        return model


@functools.lru_cache(maxsize=8)
def _cached(path: str, device: str | None, stamp=None) -> PSFRegressor:
    """One model per file version (``stamp``: its mtime and size), so a file replaced by a new
    training run is read again."""
    return PSFRegressor.from_file(path, device)


def file_stamp(path):
    """A model file's ``(mtime_ns, size)``, or None if it cannot be read."""
    try:
        st = Path(path).stat()
    except OSError:
        return None  # from_file says what is missing
    if not stat.S_ISREG(st.st_mode):
        return None  # a folder: from_file says so too
    return st.st_mtime_ns, st.st_size


def file_digest(path) -> str | None:
    """A digest of a model file's bytes (read once per mtime and size), or None if it cannot be read:
    the same weights whatever the copy, its machine or its timestamps."""
    stamp = file_stamp(path)
    return None if stamp is None else _digest(str(Path(path).resolve()), stamp)


@functools.lru_cache(maxsize=32)
def _digest(path: str, stamp) -> str:
    import hashlib

    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def model_path(name_or_path) -> Path:
    """The file of a shipped model name or a path."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a shipped model's name ({', '.join(SHIPPED)}), a model file or a loaded "
                        f"model, got {type(name_or_path).__name__}")
    key = str(name_or_path)
    if not Path(key).suffix and key.upper() in _psf.MODELS:
        if key.upper() not in SHIPPED:
            raise ValueError(f"no shipped model for {key.upper()}; shipped: {', '.join(SHIPPED)}; "
                             "train one with `lsfov train`")
        return MODELS_DIR / f"{key.upper()}.pt"
    return Path(key)


def load_model(name_or_path, *, device=None, psf_model: str | None = None) -> PSFRegressor:
    """Load a shipped model by PSF-model name (``"G1"``, ``"G2"``, ``"Z1"``, ``"Z3"``) or a ``.pt`` file.

    Models are cached per process and device (a Dask worker loads each once); a file replaced since
    (another modification time or size) is read again.

    Parameters
    ----------
    name_or_path : str, Path or PSFRegressor
        A shipped model's name (any case, no suffix), a model file written by ``lsfov train``, or a
        loaded model (returned as it is, only checked against ``psf_model``).
    device : str or torch.device, optional
        Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:N"``); default CUDA when there is one.
        Not applied to a loaded model.
    psf_model : str, optional
        Refuse a model trained for another PSF model.

    Returns
    -------
    PSFRegressor
        The cached instance: shared by every caller of this process, not a copy.

    Raises
    ------
    TypeError
        If ``name_or_path`` is not a str, a path or a :class:`PSFRegressor`.
    FileNotFoundError
        If no model file exists at the path.
    ValueError
        For a PSF model with no shipped model, a file that is not an lsfov model, a ``device`` that
        cannot be used, or a model of another PSF model than ``psf_model``.

    Examples
    --------
    The shipped Z1 model reads the defocus of two patches blurred by 0.2 waves RMS of it:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> model = lsfov.load_model("Z1")
    >>> model.params, model.patch, model.ranges
    (('focus',), 128, {'focus': (0.0, 0.5)})
    >>> sharp = simulate.sample_image("immunohistochemistry", (256, 256))
    >>> blur = lsfov.ProductConvolution.from_psf(model.psf_model.render([0.2]), sharp.shape)
    >>> image = simulate.degrade(sharp, blur, photons=2000, seed=0)
    >>> out = model.predict(np.stack([image[:128, :128], image[128:, 128:]]))  # two 128² patches
    >>> out["focus"].shape, bool(np.all(abs(out["focus"] - 0.2) < 0.05)), bool(np.all(out["validity"] > 0.5))
    ((2,), True, True)
    """
    if isinstance(name_or_path, PSFRegressor):
        model = name_or_path
    else:
        path = model_path(name_or_path)
        model = _cached(str(path.resolve()), None if device is None else str(device), file_stamp(path))
    if psf_model is not None and model.psf_model.name != _psf.get_model(psf_model).name:
        which = "model" if isinstance(name_or_path, PSFRegressor) else f"model {name_or_path}"
        raise ValueError(f"{which} regresses {model.psf_model.name} parameters, not {psf_model}: give a "
                         f"{_psf.get_model(psf_model).name} model")
    return model


def _register_sizeof():
    """Tell Dask what a model weighs where it is a value of the graph (:func:`lsfov.cluster.shared`):
    its weights and buffers, which a worker's memory accounting would otherwise not count."""
    from dask.sizeof import sizeof

    @sizeof.register(PSFRegressor)
    def _(model):
        tensors = [*model.net.parameters(), *model.net.buffers()]
        return 1000 + sum(t.numel() * t.element_size() for t in tensors)


_register_sizeof()
