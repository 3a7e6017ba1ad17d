"""Array-type dispatch: the same maths on NumPy (scipy.fft) and CuPy (cupyx.scipy.fft).

Functions look at the array they are given, like dask-image does, instead of a global switch, so a
Dask graph whose chunks are CuPy arrays runs on the GPU without any flag.

Threads: scipy.fft's transforms are multi-threaded, NumPy's element-wise passes are not. Work
called from the main thread (a notebook, the whole-array path) is therefore cut into bands or
batches that a small pool runs (:func:`parallel_map`); inside Dask tasks, whose threads already
keep the cores busy, everything runs on the task's thread (:func:`task_threads`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import numpy as np
import scipy.fft

__all__ = ["array_module", "fft_module", "graph_runs", "multiply", "next_fast_len", "parallel_map", "row_bands",
           "task_threads", "threads_for", "to_numpy"]

# scipy.fft runs batched transforms on several threads (LSFOV_FFT_WORKERS, default all cores);
# lsfov's Dask tasks use one (task_threads), as the other tasks keep the other cores busy.
_FFT_WORKERS = int(os.environ.get("LSFOV_FFT_WORKERS", "-1"))
# cuFFT plans CuPy keeps per thread. A grid operator's cell groups use about 50 FFT shapes per TV-RL
# iteration (54 for 2304² with an 8x8 grid, counted in tests/test_operators.py); with CuPy's default
# of 16, cycled through in the same order every iteration, every call would rebuild its plan.
# 0: leave CuPy's setting as it is.
_CUFFT_PLANS = int(os.environ.get("LSFOV_CUFFT_PLANS", "128"))
# CUDA graphs for repeated GPU work (TV-RL iterations, the CNN's passes); LSFOV_CUDA_GRAPHS=0: off.
CUDA_GRAPHS = os.environ.get("LSFOV_CUDA_GRAPHS", "1") != "0"
log = logging.getLogger("lsfov")
_LOCAL = threading.local()  # .workers: the FFT thread count of a thread of lsfov's own pool (1)
_POOL = None
_POOL_LOCK = threading.Lock()


def _workers():
    return getattr(_LOCAL, "workers", _FFT_WORKERS)


def _forget_pool():
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()  # a forked child has none of the parent's threads


@contextlib.contextmanager
def task_threads():
    """For the body of a Dask task: in a pool thread (other tasks share the cores) FFTs use one
    thread, no nested oversubscription (measured about 7 % faster than two, 4096² TV-RL on 2
    cores); on the main thread (synchronous scheduler) nothing changes."""
    if threading.current_thread() is threading.main_thread() or hasattr(_LOCAL, "workers"):
        yield
        return
    _LOCAL.workers = 1
    try:
        yield
    finally:
        del _LOCAL.workers


# glibc's mallopt parameters (malloc.h) and the mmap threshold a set trim threshold pins.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _PINNED_MMAP = -1, -3, 128 * 1024
_HEAP = {"users": 0, "lock": threading.Lock()}


def _libc():
    """glibc through ctypes, or None (another C library or OS: nothing to tune)."""
    if "libc" not in _HEAP:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _HEAP["libc"] = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
        except OSError:
            _HEAP["libc"] = None
    return _HEAP["libc"]


def _pinned_trim():
    """The trim threshold glibc was started with when it pins the mmap threshold, or None: from
    the environment this process started with (``/proc/self/environ``). A LocalCluster's nanny puts
    distributed's ``MALLOC_TRIM_THRESHOLD_`` into ``os.environ`` of the process that starts it,
    whose own glibc never saw it."""
    if "trim" not in _HEAP:
        try:
            with open("/proc/self/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            env = {}
        _HEAP["trim"] = _trim_from({k.decode(errors="replace"): v.decode(errors="replace") for k, v in env.items()})
    return _HEAP["trim"]


def _trim_from(env) -> int | None:
    """:func:`_pinned_trim` of an environment (a dict). A threshold of the user's own (an mmap
    threshold, by variable or tunable) or a value glibc would not take as we read it: None."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in env or "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables:
        return None
    try:
        value = int(env["MALLOC_TRIM_THRESHOLD_"], 0)
    except (KeyError, ValueError):
        return None
    return value if 0 <= value < 2**31 else None  # mallopt takes an int


def _forget_heap():
    """In a forked child, which holds none of the parent's tasks: no users, and the thresholds of
    its start back if the fork came inside :func:`heap_kept`."""
    if _HEAP["users"] and _HEAP.get("libc") is not None and _HEAP.get("trim") is not None:
        _HEAP["libc"].mallopt(_M_TRIM_THRESHOLD, _HEAP["trim"])
        _HEAP["libc"].mallopt(_M_MMAP_THRESHOLD, _PINNED_MMAP)
    _HEAP.update(users=0, lock=threading.Lock())


@contextlib.contextmanager
def heap_kept():
    """For CNN inference in a Dask worker: freed memory stays in the heap for the next batch.

    distributed starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory back to
    the OS), which also pins glibc's mmap threshold at 128 KiB: every activation tensor is then a
    fresh mmap, zeroed page by page, and the CNN ran 2.3x slower (benchmarks/RESULTS.md, section
    psfmap). In the block the thresholds are those of ``MALLOC_MMAP_THRESHOLD_=32 MiB``,
    ``MALLOC_TRIM_THRESHOLD_=256 MiB``; after it, the worker's own again and the heap trimmed.
    Elsewhere (glibc's adaptive thresholds, the user's own, no glibc) nothing changes.
    """
    trim = _pinned_trim()
    libc = _libc() if trim is not None else None
    if libc is None:
        yield
        return
    with _HEAP["lock"]:  # the first of concurrent tasks relaxes, the last restores
        if _HEAP["users"] == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        _HEAP["users"] += 1
    try:
        yield
    finally:
        with _HEAP["lock"]:
            _HEAP["users"] -= 1
            if _HEAP["users"] == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, trim)
                libc.mallopt(_M_MMAP_THRESHOLD, _PINNED_MMAP)
                libc.malloc_trim(0)


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_forget_pool)
    os.register_at_fork(after_in_child=_forget_heap)


def threads_for(like) -> int:
    """Threads :func:`parallel_map` would use for work on arrays like ``like``: several only for
    NumPy work started from the main thread (a Dask task thread already has the cores busy) with
    LSFOV_FFT_WORKERS not 1."""
    if array_module(like) is not np or threading.current_thread() is not threading.main_thread():
        return 1
    return max(1, min(8, (os.cpu_count() or 1) if _FFT_WORKERS < 0 else _FFT_WORKERS))


def parallel_map(fn, items, like):
    """``fn(item)`` for each item, on :func:`threads_for` threads, yielded in order (so callers that
    sum the results do so in the same order, and get the same bits, as a serial loop). Inside, FFTs
    use one thread each. NumPy's element-wise passes are single-threaded: splitting the items is
    what puts the other cores to work on them."""
    global _POOL
    n = threads_for(like)
    if n < 2 or len(items) < 2:
        yield from map(fn, items)
        return
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            def init():
                _LOCAL.workers = 1

            _POOL = ThreadPoolExecutor(n, thread_name_prefix="lsfov", initializer=init)
    futures = [_POOL.submit(fn, item) for item in items]
    for f in futures:
        yield f.result()


def array_module(x):
    """Return ``numpy`` or ``cupy`` according to the type of ``x``."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


def row_bands(n: int, parts: int) -> list:
    """``parts`` slices of ``range(n)`` of (nearly) equal length (fewer if ``n`` is smaller)."""
    parts = max(1, min(parts, n))
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def multiply(a, b, out=None):
    """``a * b`` (same shapes), on bands of rows on the pool for large NumPy arrays from the main
    thread: one pass either way, the bits of ``numpy.multiply``."""
    xp = array_module(a)
    parts = threads_for(a) if a.size >= 1 << 20 and a.shape == b.shape and a.ndim >= 2 else 1
    if parts < 2:
        return xp.multiply(a, b, out=out)
    if out is None:
        out = np.empty(a.shape, np.result_type(a, b))

    def band(sl):
        np.multiply(a[..., sl, :], b[..., sl, :], out=out[..., sl, :])

    for _ in parallel_map(band, row_bands(a.shape[-2], parts), like=a):
        pass
    return out


class _ScipyFFT:
    """scipy.fft with a worker count, under the names cupyx.scipy.fft uses."""

    @staticmethod
    def rfft2(x, s=None, axes=(-2, -1)):
        return scipy.fft.rfft2(x, s=s, axes=axes, workers=_workers())

    @staticmethod
    def irfft2(x, s=None, axes=(-2, -1), overwrite_x=False):
        # Two 1-D passes, complex ifft over y (in place when allowed), then c2r over x: the grid cells
        # work between these passes; alone they cost the same as pocketfft's 2-D c2r (RESULTS.md).
        if tuple(axes) not in ((-2, -1), (x.ndim - 2, x.ndim - 1)):
            return scipy.fft.irfft2(x, s=s, axes=axes, workers=_workers(), overwrite_x=overwrite_x)
        ny, nx = (x.shape[-2], 2 * (x.shape[-1] - 1)) if s is None else s
        y = scipy.fft.ifft(x, n=ny, axis=-2, workers=_workers(), overwrite_x=overwrite_x)
        return scipy.fft.irfft(y, n=nx, axis=-1, workers=_workers(), overwrite_x=True)

    @staticmethod
    def rfft(x, n=None, axis=-1):
        return scipy.fft.rfft(x, n=n, axis=axis, workers=_workers())

    @staticmethod
    def irfft(x, n=None, axis=-1, overwrite_x=False):
        return scipy.fft.irfft(x, n=n, axis=axis, workers=_workers(), overwrite_x=overwrite_x)

    @staticmethod
    def fft(x, n=None, axis=-1, overwrite_x=False):
        return scipy.fft.fft(x, n=n, axis=axis, workers=_workers(), overwrite_x=overwrite_x)

    @staticmethod
    def ifft(x, n=None, axis=-1, overwrite_x=False):
        return scipy.fft.ifft(x, n=n, axis=axis, workers=_workers(), overwrite_x=overwrite_x)


def fft_module(x):
    """Return an object with ``rfft2``, ``irfft2``, ``rfft``, ``irfft``, ``fft`` and ``ifft`` for the array
    type of ``x``."""
    if array_module(x) is np:
        return _ScipyFFT
    import cupy
    import cupyx.scipy.fft as cufft

    cache = cupy.fft.config.get_plan_cache()  # this thread's, on the current device
    if 0 < cache.get_size() < _CUFFT_PLANS:  # a cache switched off (size 0) stays off
        cache.set_size(_CUFFT_PLANS)
    return cufft


def graph_runs(step, n: int, like):
    """Run ``step()`` ``n`` times, yielding after each run (for a progress bar).

    On CuPy arrays (``like``; None or NumPy: every run eager) the first run is eager (it compiles
    the kernels, makes the cuFFT plans and fills the operators' caches) and the others replay one
    CUDA graph captured from a second call: one launch per run instead of one per kernel (a TV-RL
    iteration launches a hundred or more). ``step`` must work in place on arrays made
    before it, synchronise nothing with the host and do the same work every run. Its temporaries
    come from a memory pool of its own that only the graph uses, kept until the replays are done.
    Where capture fails, or with ``CUDA_GRAPHS`` off, every run is eager (the failure is logged).
    """
    if n < 3 or like is None or array_module(like) is np or not CUDA_GRAPHS:
        for _ in range(n):
            step()
            yield
        return
    import cupy

    step()
    yield
    # The eager run's temporaries, cached by CuPy's pool, are not used again (the graph has its own
    # pool): released, so that the two sets do not add up in device memory.
    cupy.get_default_memory_pool().free_all_blocks()
    origin = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)  # no implicit sync with other threads' legacy-stream work
    pool = cupy.cuda.MemoryPool()
    graph = None
    try:
        with stream, cupy.cuda.using_allocator(pool.malloc):
            stream.begin_capture()  # relaxed mode: the pool may still call cudaMalloc
            try:
                step()  # recorded, not run
            finally:
                graph = stream.end_capture()
    except Exception as e:  # an operation that cannot be captured: the eager runs
        log.warning("lsfov: CUDA graph not used (%s: %s)", type(e).__name__, e)
        graph = None
    if graph is None:
        pool.free_all_blocks()
        for _ in range(n - 1):
            step()
            yield
        return
    log.debug("lsfov: %d runs replay one CUDA graph", n - 1)
    try:
        stream.wait_event(origin.record())  # after the eager run and whatever preceded it
        for _ in range(n - 1):
            graph.launch(stream)
            yield
    finally:
        stream.synchronize()  # the pool's blocks are the graph's buffers: freed only once it is done
        del graph
        pool.free_all_blocks()


def next_fast_len(n: int) -> int:
    """Smallest 11-smooth length >= n: pocketfft (and cuFFT) have native radices up to 11.

    Measured on 2-D float32 rfft2 + irfft2 between 500 and 2400 pixels, these lengths cost 20 %
    less time in total than the 5-smooth ones (``real=True``), e.g. 2079 vs 2160 for 2078.
    """
    return scipy.fft.next_fast_len(int(n), real=False)


def to_numpy(x):
    """Bring an array (NumPy, CuPy) to host memory as NumPy."""
    if array_module(x) is np:
        return np.asarray(x)
    return x.get()


def block_digests(a):
    """A 64-bit digest of each block's bytes of a Dask array, lazily, one per block (shape: blocks
    per axis): what names a resumable run's state, or a lazy operator's content, with a block in
    memory at a time."""
    import hashlib

    def digest(b):
        h = hashlib.blake2b(np.ascontiguousarray(to_numpy(b)).data, digest_size=8).digest()
        return np.full((1,) * b.ndim, int.from_bytes(h, "little"), np.uint64)

    return a.map_blocks(digest, dtype=np.uint64, chunks=tuple((1,) * len(c) for c in a.chunks),
                        meta=np.empty((0,) * a.ndim, np.uint64))
