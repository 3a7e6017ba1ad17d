"""Blocks that exchange a halo every few iterations: their chunks, windows and the lazy driver.

Both iterative stages (TV-RL, sparse+smooth) run ``counts[e]`` iterations on every block after
exchange ``e``, whose halo is ``spread * counts[e]`` pixels. A solver supplies one function,
``block(yb, xb, *, n, start, halo, location) -> core``, which the lazy driver here and the zarr one
(:func:`lsfov.restore.scratch.run_exchanges`) call alike.
"""
from __future__ import annotations

import functools

import dask
import dask.array as da
import numpy as np


def axis_chunks(n: int, c: int, minimum: int) -> tuple[int, ...]:
    """Chunks of size ``c`` (raised to ``minimum``), the remainder merged into the last if too small.

    Boundaries stay on multiples of ``c``, so every chunk is a union of zarr chunks of edge ``c``.
    """
    c = max(c, minimum, 1)
    q, rem = divmod(n, c)
    if q == 0:
        return (n,)
    chunks = [c] * q
    if rem:
        if rem < minimum:
            chunks[-1] += rem
        else:
            chunks.append(rem)
    return tuple(chunks)


# Above this many computed pixels per image pixel, a run says that larger chunks would be faster: a
# 256² image in 64-px chunks (5.1x) ran TV-RL 18x slower than in one block, a 1024² one in 256-px
# chunks (2.8x) 2.2x slower than in 512-px ones (2 cores, 2026-12-07).
_OVERHEAD_WARN = 3.0


def overhead(chunks, halo: int) -> float:
    """Pixels an iteration computes over all blocks (each with its halo, as :func:`block_window` cuts
    it) per pixel of the field: 1 for one block, growing as chunks shrink against the halo."""
    ratio = 1.0
    for c in chunks:
        ratio *= sum(b + (halo if i > 0 else 0) + (halo if i < len(c) - 1 else 0) for i, b in enumerate(c)) / sum(c)
    return ratio


def say_overhead(given, chunks, halo: int, what: str):
    """Warn when the halo makes the blocks compute far more than the image (:func:`overhead`);
    ``given``: the input's chunk edges (y, x), ``chunks``: the blocks iterated (grown to the halo)."""
    import warnings

    from .._validate import LsfovWarning, user_stacklevel

    ratio = overhead(chunks, halo)
    if ratio > _OVERHEAD_WARN:
        warnings.warn(f"{what} on chunks of {given[0]}x{given[1]} px iterates blocks of up to "
                      f"{max(chunks[0])}x{max(chunks[1])} px with a {halo} px halo: {ratio:.1f}x the image's pixels "
                      "every iteration; larger chunks are faster (e.g. image.rechunk(1024), or --chunks 1024)",
                      LsfovWarning, stacklevel=user_stacklevel())


def exchange_counts(iterations: int, every: int) -> list[int]:
    """Iterations per exchange: ``every`` each, the remainder last."""
    return [every] * (iterations // every) + ([iterations % every] if iterations % every else [])


def block_window(chunks, location, halo: int):
    """The window of the block at ``location`` with ``halo`` pixels of its neighbours, as
    ``da.overlap(boundary="none")`` cuts it (no halo beyond the field's edge): its slices in the
    field, and the block's core as slices of the window."""
    window, core = [], []
    for c, i in zip(chunks, location):
        start = sum(c[:i])
        before, after = (halo if i > 0 else 0), (halo if i < len(c) - 1 else 0)
        window.append(slice(start - before, start + c[i] + after))
        core.append(slice(before, before + c[i]))
    return tuple(window), tuple(core)


def lazy_exchanges(y: da.Array, counts, spread: int, block, *, name: str, token, channels: int = 0,
                   initial: da.Array | None = None) -> da.Array:
    """The exchanges chained in one Dask graph (:func:`lsfov.restore.scratch.run_exchanges`
    without the store; the same ``y``, ``counts``, ``spread``, ``block``, ``channels`` and ``initial``).

    ``name`` prefixes the graph's keys and ``token`` stands for what ``block`` computes with (Dask
    cannot hash the operator itself cheaply). Returns the final state, chunked as ``y``.
    """
    from ..cluster import shared

    lead = ((channels,),) if channels else ()
    meta = da.utils.meta_from_array(y, ndim=len(lead) + 2, dtype=np.float32)  # NumPy or CuPy chunks, as given
    x, it = initial, 0
    block = shared(block, f"{name}-block-{dask.base.tokenize(y.name, token)}")  # (it holds the operator)
    for n in counts:
        halo = spread * n
        args = [_overlap(a, halo) for a in (y, x) if a is not None]
        fn = functools.partial(_lazy_task, n=n, start=it, halo=halo)
        x = da.map_blocks(fn, *args, chunks=lead + y.chunks, dtype=np.float32, meta=meta, block=block,
                          name=f"{name}-{dask.base.tokenize(args, n, it, halo, token)}")
        it += n
    return x


def _overlap(a: da.Array, halo: int) -> da.Array:
    """``a`` with ``halo`` pixels of the neighbouring blocks along its last two axes."""
    if not halo:
        return a
    # An axis of one chunk has no neighbours (block_window gives it no halo): no overlap there, which
    # Dask would refuse anyway for a halo deeper than the chunk.
    depth = {ax: halo if ax >= a.ndim - 2 and len(a.chunks[ax]) > 1 else 0 for ax in range(a.ndim)}
    return da.overlap.overlap(a, depth=depth, boundary="none", allow_rechunk=False)


def _lazy_task(yb, xb=None, *, block, block_info=None, **kw):
    return block(yb, xb, location=block_info[None]["chunk-location"][-2:], **kw)
