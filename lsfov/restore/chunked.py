"""TV-RL on Dask with an exact halo exchange.

One RL iteration moves information by at most ``2r`` pixels (``H`` spreads by the kernel radius
``r``, ``H^T`` by another ``r``; the TV term by one pixel, which ``2r`` covers). A block that holds
``k * 2r`` pixels of its neighbours can therefore run ``k`` iterations alone, and its core is then
exactly what the whole-array computation gives: the halo is exchanged once every ``k`` iterations,
with one overlap step per exchange (not one per operator call).

The estimate lives on the extended field (image grown by ``r``), cut into regular chunks aligned
with the input's chunk size so that they can be written to zarr. Two ways to run:

* lazily: the exchanges are chained in one Dask graph (good up to a cluster's memory);
* with ``scratch``: every exchange is written to a zarr store and read back by the next one, so
  memory holds a few chunks whatever the image size, and an interrupted run resumes
  (:mod:`lsfov.restore.scratch`; what ``lsfov deconvolve`` does).
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from pathlib import Path

import dask
import dask.array as da
import dask.system
import numpy as np

from .._backend import array_module, block_digests, task_threads
from .._validate import LsfovWarning, beyond_float32, float32_blocks, non_finite, scratch_dir
from ..operators import SPECTRA_METRIC, ProductConvolution, spectra_budget, spectra_room
from .halo import axis_chunks, block_window, exchange_counts, lazy_exchanges, say_overhead
from .tv_rl import (_check_range, _check_shape, _initial, _iterate, _norm_threshold, censored_pixels, flat_gain,
                    say_background, say_censored, say_offset, subtract_background)

__all__ = ["deconvolve_dask", "choose_exchange_every", "spread_per_iteration"]

log = logging.getLogger("lsfov")

# Cost model constants, measured on a 2-core x86 laptop-class machine (benchmarks/run.py); only their
# ratios matter. FFT: seconds per pixel per log2(pixels) per transform. Exchange: seconds per pixel of
# a halo'd block to slice and concatenate x and y, plus a fixed per-block overhead (scheduling, transfer).
_FFT_S = 1.6e-10
_COPY_S = 3e-9
_TASK_S = 0.02


#: The iteration's version in a resumable run's name: 2 since the TV term's ε is relative to the
#: image's mean over the operator's gain (it was the mean alone: another result for unnormalised PSFs).
_STATE_VERSION = 2


def spread_per_iteration(op: ProductConvolution, tv: float) -> int:
    """How far (pixels) one TV-RL iteration moves information: ``2r``, at least 1 with TV.

    Parameters
    ----------
    op : ProductConvolution
        The operator; ``r`` is its halo (kernel radius).
    tv : float
        TV weight (the TV term reaches one pixel; 0: none).

    Returns
    -------
    int
        The spread in pixels, ``max(2r, 1)`` with TV, ``2r`` without.
    """
    return max(2 * op.halo, 1 if tv else 0)


def choose_exchange_every(chunk_shape, op: ProductConvolution, iterations: int, tv: float) -> int:
    """Iterations per halo exchange that minimise the modelled run time.

    A larger ``k`` means fewer exchanges (fixed cost per block: scheduling, slicing, transfers) but a
    larger halo ``k * 2r`` on every block, whose FFTs every iteration pays for. The model:
    ``ceil(n/k) * (copy * A_k + task) + n * fft_count * fft * A_k * log2(A_k)`` with
    ``A_k = prod(chunk + 2 k 2r)``; ``k`` is kept so that the halo fits in one neighbouring chunk.

    Parameters
    ----------
    chunk_shape : (int, int)
        The blocks' (h, w) in pixels (the largest chunk along each axis).
    op : ProductConvolution
        The operator; its halo (kernel radius ``r``), number of PSFs and kind set the costs.
    iterations : int
        Total TV-RL iterations.
    tv : float
        TV weight (0: plain RL, whose spread is ``2r`` alone).

    Returns
    -------
    int
        ``k`` in [1, ``iterations``]; ``iterations`` when an iteration moves nothing (no halo, no TV).
    """
    s = spread_per_iteration(op, tv)
    if s == 0:
        return iterations  # pixel-wise: nothing to exchange
    # Image-sized 2-D FFTs per iteration; a grid cell's 2 + 4 one-axis passes each way count as 8.
    n_fft = 4 if op.n_psfs == 1 else (2 + 2 * op.n_psfs if op.kind == "basis" else 8)
    best, best_cost = 1, math.inf
    for k in range(1, iterations + 1):
        if k > 1 and s * k > min(chunk_shape):
            break
        area = float(np.prod([c + 2 * s * k for c in chunk_shape]))
        cost = math.ceil(iterations / k) * (_COPY_S * area + _TASK_S) + iterations * n_fft * _FFT_S * area * math.log2(area)
        if cost < best_cost:
            best, best_cost = k, cost
    return best


def task_bytes(block, halo: int, op: ProductConvolution) -> int:
    """Peak memory of one TV-RL block task: its window (block + halo on each side) on the FFT grid
    (grown by the kernel radius) times the bytes per pixel measured with ``tracemalloc``: 48 for
    one PSF (y, x, its ratio, gradients, two real spectra), 90-100 for grids (terms of the
    neighbouring nodes) and up to 110 for bases, with a margin."""
    return _bytes_per_px(op) * math.prod(b + 2 * halo + 2 * op.halo for b in block)


def _bytes_per_px(op: ProductConvolution) -> int:
    return 48 if op.n_psfs == 1 else 128


# A Dask worker's own memory once it has loaded lsfov's restoration code (Python, NumPy, SciPy, Dask:
# about 155 MiB measured); its tasks get what is left of its limit below the point where Dask pauses it.
_WORKER_OWN = 160 * 2**20


def check_task_memory(block, halo: int, op: ProductConvolution, n_blocks: int | None = None, plan=None):
    """Refuse, before any work, blocks whose tasks cannot fit: the memory of a Dask worker (its
    ``memory_limit`` up to where Dask pauses it, less what the worker itself uses) or of this
    machine (available RAM) shared by the threads that run tasks at once (no more than ``n_blocks``).
    ``plan(edge, every=None)`` gives the (block shape, halo) of the run at chunks of ``edge`` px (and
    ``every`` iterations per exchange): the chunks advised are those whose run fits (the halo a run
    chooses follows its chunks); without it, the blocks keep ``halo``."""
    from ..cluster import _active_client, worker_budgets

    need = task_bytes(block, halo, op)
    client = _active_client()
    if client is not None:
        budgets, fraction = worker_budgets(client, _WORKER_OWN, kept=spectra_budget, held=SPECTRA_METRIC)
        where = (f"each worker has {{:.2g}} GiB for {{}} thread(s) (its memory limit up to Dask's pause at "
                 f"{fraction:.0%}, less its own use and its cache of kernel spectra)")
    else:  # (the CPUs this process may use: a batch job's, not the node's)
        threads = dask.config.get("num_workers", None) or dask.system.CPU_COUNT or 1
        # Available RAM less what this process's cache of kernel spectra may still grow by.
        budgets = [(max(0, _available_memory() - spectra_room()), 1 if dask.config.get("scheduler", "") == "synchronous"
                    else threads)]
        where = "this machine has {:.2g} GiB available for {} thread(s) (less the cache of kernel spectra)"
    if not budgets:
        return
    limit, threads = min(((lim, max(1, min(t, n_blocks or t))) for lim, t in budgets), key=lambda b: b[0] / b[1])
    if need * threads <= limit:
        return
    # The largest chunk edge whose tasks fit, rounded down to a multiple of 256, with every thread
    # busy: smaller chunks make more blocks than the few (or one) that left threads idle here.
    per_thread = min(lim / t for lim, t in budgets)
    plan = plan or (lambda edge, every=None: ((edge, edge), halo))

    def fits(block_, halo_):
        return task_bytes(block_, halo_, op) <= per_thread

    top = math.isqrt(int(per_thread / _bytes_per_px(op)))  # no larger window fits, whatever its halo
    edge = next((e for e in range(top // 256 * 256, 255, -256) if fits(*plan(e))), None)
    hint = (f"use chunks of {edge} px or less (--chunks {edge})" if edge else
            "use chunks of 256 px and --exchange-every 1 (a smaller halo)" + (
                ", or more memory per worker" if fits(*plan(256, 1)) else "; with this memory per worker even those "
                "do not fit: give each worker more"))
    raise MemoryError(f"blocks of {block[0]}x{block[1]} px with a {halo} px halo need about {need / 2**30:.2g} GiB "
                      f"per task, but {where.format(limit / 2**30, threads)}; {hint}")


def _available_memory() -> int:
    """The memory this process may still take: the machine's available memory, or less where a batch
    job's limit (cgroup, rlimit: distributed's ``MEMORY_LIMIT``) leaves less beside what it uses."""
    import psutil
    from distributed.system import MEMORY_LIMIT

    return int(min(psutil.virtual_memory().available, MEMORY_LIMIT - psutil.Process().memory_info().rss))


def deconvolve_dask(y: da.Array, op: ProductConvolution, iterations: int, tv: float, *, eps: float,
                    exchange_every: int | None = None, scratch=None, resume: bool = False,
                    progress: bool = False, saturation: float | None = None, origin: str = "",
                    background: float = 0.0) -> da.Array:
    """Chunked TV-RL (see :func:`lsfov.deconvolve`); ``y`` a 2-D Dask array, result lazy, input's chunks;
    ``saturation``: the level at or above which pixels are censored (None: none), from ``origin``.

    ``y`` is read once in this call (its statistics, and its blocks' digests with ``scratch``);
    ``iterations``, ``tv``, ``eps`` and ``exchange_every`` are taken as checked by :func:`lsfov.deconvolve`.

    Parameters
    ----------
    y : dask.array.Array (H, W)
        Blurred, non-negative image of ``op.shape``, any numeric dtype; negative pixels are clipped to
        0 with an :class:`~lsfov.LsfovWarning`.
    op : ProductConvolution
        The full-image blur operator.
    iterations : int
        Richardson-Lucy iterations.
    tv : float
        Total-variation weight (0: plain RL).
    eps : float
        Smoothing of ``|grad x|`` in the TV term, relative to the local brightness.
    exchange_every : int, optional
        Iterations per halo exchange; default :func:`choose_exchange_every` (all of them for a
        single-chunk image). A value above ``iterations`` is taken as ``iterations``.
    scratch : str or Path, optional
        Directory for each exchange's estimate (memory bounded by a few chunks; resumable). The
        iterations then run in this call.
    resume : bool
        With ``scratch``: continue an interrupted run of the same data, operator and parameters.
    progress : bool
        Show progress bars (with ``scratch``).
    saturation : float, optional
        Pixels at or above it are censored (their true count at least this).
    origin : str
        Where ``saturation`` came from (e.g. the image's significant bits), for messages.
    background : float
        The camera's offset in the image's units (>= 0, as checked by :func:`lsfov.deconvolve`):
        subtracted in each block after its saturated pixels are found, what falls below it 0.

    Returns
    -------
    dask.array.Array, float32, (H, W)
        The non-negative estimate with ``y``'s chunks: lazy, or read from ``scratch`` (keep it until
        the result is stored).

    Raises
    ------
    TypeError
        If ``y`` is not numeric, or ``scratch`` not a path.
    ValueError
        If ``y`` is not 2-D or not of ``op.shape``, holds NaN or Inf, has no positive pixel or
        intensities float32 TV arithmetic cannot hold; if ``op`` is a restricted window; if
        ``scratch`` is a file, or ``resume`` is given without it.
    MemoryError
        If one block's task cannot fit in a worker's (or this machine's) memory.
    """
    if y.ndim != 2:
        raise ValueError(f"image must be 2-D (y, x), got shape {y.shape}; select a plane first")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"image must be a real numeric array, got dtype {y.dtype}")
    _check_shape(y.shape, op)
    if op.window != (0, 0) + op.shape:  # (its blocks restrict it: found only in the tasks otherwise)
        raise ValueError("deconvolve_dask needs a full-image operator, not a restricted window; pass the operator "
                         "it was cut from")
    scratch_dir(scratch, resume)
    # The blocks, and whether their tasks fit, before any read: a worker without room would be
    # paused during the first pass below, and the run wait for it without a word.
    r = op.halo
    s = spread_per_iteration(op, tv)
    c = tuple(int(max(ch)) for ch in y.chunks)
    single_block = all(len(ch) == 1 for ch in y.chunks)  # the whole image one block: no exchange
    k = exchange_every or (iterations if single_block else choose_exchange_every(c, op, iterations, tv))
    k = min(k, iterations)
    halo = 0 if single_block else s * k  # one block has no neighbour to exchange with
    if halo > min(c):
        log.info("chunks %s are smaller than the halo of %d px (%d iterations x %d px); using larger chunks",
                 c, halo, k, s)
    ext_shape = (y.shape[0] + 2 * r, y.shape[1] + 2 * r)
    chunks = (tuple((n,) for n in ext_shape) if single_block else
              tuple(axis_chunks(n, ci, halo) for n, ci in zip(ext_shape, c)))

    def plan(edge, every=exchange_every):
        """(block shape, halo) of this run at chunks of ``edge`` px: what the memory check advises by."""
        ce = (min(edge, y.shape[0]), min(edge, y.shape[1]))
        one = ce == tuple(y.shape)
        k_ = min(every or (iterations if one else choose_exchange_every(ce, op, iterations, tv)), iterations)
        h = 0 if one else s * k_
        parts = tuple((n,) for n in ext_shape) if one else tuple(axis_chunks(n, ci, h) for n, ci in zip(ext_shape, ce))
        return tuple(max(ch) for ch in parts), h

    check_task_memory(tuple(max(ch) for ch in chunks), halo, op, n_blocks=len(chunks[0]) * len(chunks[1]), plan=plan)
    say_overhead(c, chunks, halo, "TV-RL")
    given, y = y, float32_blocks(y)
    # One streaming pass for what the iterations need to know globally (and for bad input); the
    # extremes in the input's own type, where values beyond float32's range are still finite.
    # (the sample's light above the camera's offset, in float32 as the blocks subtract it)
    above = da.maximum(y - np.float32(background), np.float32(0)) if background else da.maximum(given, 0)
    stats = [above.sum(dtype=np.float64), given.min(), given.max()]
    if background:
        stats.append((y < np.float32(background)).sum())
    if saturation is not None:  # compared as the blocks (and the whole-array path) censor: in float32
        stats.append((y >= np.float32(saturation)).sum())
    if scratch is not None:  # a resumable run is named by its data's bytes, not only their statistics
        stats.append(block_digests(given))
    total, lo, hi, *rest = dask.compute(*stats)  # one read
    below = int(rest.pop(0)) if background else 0
    n_sat = int(rest.pop(0)) if saturation is not None else 0
    digests = rest
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise non_finite("image")
    peak = max(abs(float(lo)), abs(float(hi)))
    if not np.isfinite(total) or peak > float(np.finfo(np.float32).max):
        raise beyond_float32("image", peak)
    if hi <= 0:
        raise ValueError("image is all zero; is it the plane (--channel, --z, --t) you meant?" if hi == 0 and lo == 0 else
                         f"image has no positive pixel (max {hi:g}); is it background-subtracted twice?")
    if lo < 0:
        warnings.warn(f"image has negative pixels (min {lo:g}); clipped to 0", LsfovWarning, stacklevel=3)
        y = da.maximum(y, 0)
    if background:
        say_background(background, float(hi), below, y.size)
    say_offset(given.dtype, float(lo), background)
    scale = float(total) / y.size
    gain = flat_gain(op)
    _check_range(scale, float(hi), eps, gain)
    level = say_censored(n_sat, saturation, origin, y.size, float(hi))  # none saturated: None, the plain iteration

    y_ext = da.pad(y, r).rechunk(chunks)
    block = functools.partial(_block, tv=tv, eps=eps, thr=_norm_threshold(op), scale=scale, chunks=chunks,
                              level=level, gain=gain, background=background)
    counts = exchange_counts(iterations, k)
    log.info("TV-RL: %d iterations in %d exchange%s, halo %d px, %d block%s of up to %s", iterations, len(counts),
             "" if len(counts) == 1 else "s", halo, y_ext.npartitions, "" if y_ext.npartitions == 1 else "s",
             tuple(max(ch) for ch in chunks))

    if scratch is None:
        from .scratch import say_operator_in_graph

        say_operator_in_graph(op)
        x = lazy_exchanges(y_ext, counts, s, functools.partial(block, op=op), name="lsfov-tvrl",
                           token=(op._token, tv, eps, scale, level, background))
    else:
        # Same data (its blocks' bytes), operator and parameters -> same state directory: what resume finds.
        # (_STATE_VERSION: a state of an older iteration is not resumed by this one)
        fingerprint = dask.base.tokenize(_STATE_VERSION, y.shape, float(total), float(lo), float(hi), digests[0],
                                         chunks, counts, s, op.fingerprint, tv, eps,
                                         *(() if level is None else (level,)), *((background,) if background else ()))
        x = _run_to_scratch(y_ext, counts, s, block, Path(scratch), progress, resume, fingerprint, op)
    return x[r : r + y.shape[0], r : r + y.shape[1]].rechunk(y.chunks)


def _block(yb, xb, *, n, start, halo, location, op, tv, eps, thr, scale, chunks, level=None, gain=1.0, background=0.0):
    """``n`` iterations on the window of the block at ``location``; its core. (``start`` unused: an
    RL iteration does not depend on its index.) ``yb`` in the camera's counts: its saturated pixels
    found, then ``background`` subtracted (in a copy)."""
    window, core = block_window(chunks, location, halo)
    # Wrap-around is harmless along an axis whose two ends are both discarded halo or both the
    # field's zero rim; where one end is each, it would carry halo data into the rim.
    periodic = tuple(len(c) == 1 or 0 < i < len(c) - 1 for i, c in zip(location, chunks))
    win = op.restrict(tuple(w.start - op.halo for w in window), yb.shape, periodic=periodic)  # image coordinates
    with task_threads():
        norm = win.adjoint_ones(like=yb)
        x = _initial(norm, thr, scale, gain) if xb is None else xb.astype(np.float32, copy=True)
        censored = censored_pixels(yb, level)[0]
        if background:
            yb = subtract_background(yb.astype(np.float32, copy=True), background)
        x = _iterate(win, yb, x, n, tv, eps, scale, norm, thr, censored=censored, gain=gain)
    xp = array_module(x)
    return xp.maximum(x[core], np.float32(0.0))


def _run_to_scratch(y_ext, counts, s, block, scratch: Path, progress, resume=False, fingerprint="", op=None):
    """Every exchange through zarr (:mod:`lsfov.restore.scratch`): memory stays at a few chunks,
    whatever the image size, and the run is resumable. Its state lives in
    ``scratch/lsfov-tvrl-<fingerprint>``: the fingerprint covers the data's statistics, the
    operator and every parameter, so another run never picks it up."""
    from .scratch import run_exchanges

    zx = run_exchanges(y_ext, counts, s, block, root=scratch / f"lsfov-tvrl-{fingerprint[:16]}", resume=resume,
                       progress=progress, desc="TV-RL", operator=op)
    return da.from_zarr(zx, chunks=y_ext.chunks)
