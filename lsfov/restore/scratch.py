"""Iterations on Dask through a zarr scratch store: memory bounded by a few blocks, runs resumable.

Both iterative stages (TV-RL, sparse+smooth) run blocks that exchange a halo every few
iterations. Here every exchange reads the previous state from zarr and writes the next one, each
block task on its own: it reads its window (halo included) straight from the store, iterates,
writes its core and leaves a marker. No task depends on another, so the scheduler never holds
neighbouring blocks for later (with ``da.overlap`` it kept about a row of them and memory grew with
the image). Exchange ``e`` reads only buffer ``(e-1) % 2`` and writes only ``e % 2``: a run that
died anywhere continues from the blocks without a marker and gives the same bytes.
"""
from __future__ import annotations

import functools
import logging
import shutil
import warnings
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from .._backend import array_module, to_numpy
from .._validate import LsfovWarning, user_stacklevel
from ..cluster import shared
from .halo import block_window

log = logging.getLogger("lsfov")


def warn_other_runs(root: Path):
    """Say so when ``root`` (``<scratch>/<stage>-<key>``, the key naming the data and parameters) is
    not there but another run of the same stage left its work beside it: resuming starts afresh."""
    stage = root.name.rsplit("-", 1)[0]
    others = [d for d in root.parent.glob(f"{stage}-*") if d != root] if not root.exists() else []
    if others:
        log.warning("the work kept in %s is of another run (other data, operator or parameters); this one starts "
                    "from the beginning", others[0])


#: Grid operators whose kernels take more than this are saved in the run's state, and each block task
#: reads the nodes its window needs: in the graph, a 32768² PSF map's operator (1 GiB) went to the
#: scheduler with every exchange and whole to every worker (Dask warns of graphs over 10 MB).
STORE_OPERATOR_BYTES = 4 << 20


def stored_bytes(op) -> int:
    """The bytes of ``op`` that :func:`store_operator` keeps out of a task graph; 0 where it travels as
    it is (small, or a basis whose maps are on disk already and travel as their files' names)."""
    part = op.maps if op.kind == "basis" else op.kernels
    n = part.nbytes if isinstance(part, np.ndarray) else 0  # (on disk: its files' names travel)
    return n if n > STORE_OPERATOR_BYTES else 0


def say_operator_in_graph(op):
    """Without a scratch store, a large operator travels whole in the task graph: to the scheduler and
    to every worker. On a distributed cluster, say how to keep it out (Dask's own "large graph"
    warning, past 10 MB, advises what does not apply here)."""
    from ..cluster import _active_client

    n = stored_bytes(op)
    if n and _active_client() is not None:
        warnings.warn(f"the operator ({n / 1e6:.1f} MB) travels whole in the task graph, to every worker; give "
                      "scratch= a folder every worker can read to keep it out (each task then reads its "
                      "window's part)", LsfovWarning, stacklevel=user_stacklevel())


def store_operator(op, root: Path):
    """``op`` as block tasks of the run in ``root`` take it, saved there once (a resumed run finds it)
    where it is larger than :data:`STORE_OPERATOR_BYTES`: a grid whose kernels are in memory as the
    same grid with its kernels there (each window reads its nodes), a basis whose maps are in memory
    as the operator loaded back (its maps read window by window); any other as it is."""
    if op is None or not stored_bytes(op):
        return op
    if op.kind == "basis":
        from ..operators import ProductConvolution

        path, mark = root / "operator.zarr", root / "done" / "operator"
        if not mark.exists():
            op.save(path, overwrite=True)
            mark.touch()
        return ProductConvolution.load(path)
    import zarr

    from ..operators import copy_kernels

    path, mark = root / "operator", root / "done" / "operator"
    if not mark.exists():
        copy_kernels(op.kernels, path)
        mark.touch()  # only once written whole: a run killed while writing writes it again
    return op._kernels_from(zarr.open_array(str(path.resolve()), mode="r"))


def run_exchanges(y: da.Array, counts, spread: int, block, *, root: Path, channels: int = 0, resume: bool = False,
                  progress: bool = False, desc: str = "iterations", initial: da.Array | None = None, operator=None):
    """Run ``sum(counts)`` iterations of ``block`` over ``y``'s blocks, one exchange per count.

    Parameters
    ----------
    y : dask array (H, W)
        The data, chunked as the blocks: one size per axis, the last block possibly another.
    counts : list of int
        Iterations per exchange; exchange ``e`` exchanges a halo of ``spread * counts[e]`` pixels.
    block : callable
        ``block(yb, xb, *, n, start, halo, location) -> core`` (:mod:`lsfov.restore.halo`): ``n``
        iterations from iteration ``start`` on a window (``xb`` None on the first exchange, or the
        window of ``initial``); returns the block's core, (H_b, W_b) or (channels, H_b, W_b). CuPy
        windows when ``y`` has CuPy chunks.
    root : Path
        The run's state directory (a name unique to the run: resuming finds it there).
    channels : int
        0 for a (H, W) state, else the length of its leading axis.
    resume : bool
        Continue the state in ``root``; else it is discarded first.
    initial : dask array (H, W), optional
        What the first exchange starts from (stored beside ``y``), chunked as ``y``.
    operator : ProductConvolution, optional
        What ``block`` takes as its ``op`` keyword, given here rather than bound in ``block``: a large
        operator is then saved in ``root`` and each task reads the part it needs (a grid's nodes, a
        basis's maps; :func:`store_operator`), instead of the graph carrying it whole.

    Returns
    -------
    The zarr array of the final state.
    """
    from ..io import output_lock

    root = Path(root).resolve()  # workers may run in another directory (a PBS job starts in $HOME)
    # One run of a state at a time: a second one (the same job submitted twice, from Python: the CLI
    # locks its OUT) would remove this one's state under it, or write the same chunks.
    with output_lock(root):
        return _run_exchanges(y, counts, spread, block, root, channels, resume, progress, desc, initial, operator)


def _run_exchanges(y, counts, spread, block, root, channels, resume, progress, desc, initial, operator):
    """:func:`run_exchanges` holding its state's lock."""
    import zarr

    from ..cluster import compute, progress_bar

    if root.exists() and not resume:
        shutil.rmtree(root)  # a fresh run
    elif resume:
        warn_other_runs(root)
    (root / "done").mkdir(parents=True, exist_ok=True)
    if operator is not None:
        block = functools.partial(block, op=store_operator(operator, root))
    chunks = y.chunks
    # The zarr chunks are the blocks' regular size (their first): each block is then a union of
    # whole zarr chunks (the last one takes the remainder), so no two tasks write the same chunk.
    zchunks = tuple(c[0] for c in chunks)
    if any(len(set(c[:-1])) > 1 for c in chunks):
        raise ValueError(f"blocks {chunks} are not regular; rechunk to one size per axis (the last may differ)")
    lead = (channels,) if channels else ()
    n_blocks = y.npartitions
    done = sum(counts[e] * (n_blocks if (root / "done" / f"x{e}").exists() else
                            len(list((root / "done" / f"x{e}.blocks").glob("*"))))
               for e in range(len(counts)))
    if resume and done:
        log.info("resuming from %s: %d of %d block-iterations already done", root, done, sum(counts) * n_blocks)
    # CuPy chunks in: every task moves its window to the GPU and its core back, once per exchange.
    gpu = array_module(y._meta) is not np

    def array(name, shape, chunks_):
        if (root / name / "zarr.json").exists():
            return zarr.open_array(str(root / name), mode="r+")
        return zarr.create_array(str(root / name), shape=shape, chunks=chunks_, dtype=np.float32, compressors=None,
                                 fill_value=0, zarr_format=3)

    def run(graph, n, pending):
        seen = [0]

        def on_task(key, result):  # one block finished now (not one done before)
            if str(key[0] if isinstance(key, tuple) else key).startswith("lsfov-exchange-") and bool(result.all()):
                bar.update(n)
                seen[0] += 1

        compute(graph, on_task=on_task if progress else None)
        # Blocks whose tasks were out of sight: one block fuses with the result's own task, which has another name.
        bar.update(n * (pending - seen[0]))

    with progress_bar(total=sum(counts) * n_blocks, initial=done, unit="block-it", desc=desc, unit_scale=True,
              disable=not progress) as bar:
        zy = array("y", y.shape, zchunks)
        if not (root / "done" / "y").exists():
            host = y.map_blocks(to_numpy, meta=np.empty((0, 0), np.float32)) if gpu else y
            compute(da.store(host.astype(np.float32), zy, lock=False, compute=False))
            (root / "done" / "y").touch()
        zx, it = None, 0
        if initial is not None:
            zx = array("initial", y.shape, zchunks)
            if not (root / "done" / "initial").exists():
                compute(da.store(initial.astype(np.float32), zx, lock=False, compute=False))
                (root / "done" / "initial").touch()
        for e, n in enumerate(counts):
            zout = array(f"x{e % 2}", lead + y.shape, lead + zchunks)
            if not (root / "done" / f"x{e}").exists():
                marks = root / "done" / f"x{e}.blocks"
                marks.mkdir(exist_ok=True)
                fn = functools.partial(_task, zy=zy, zx=zx, zout=zout, marks=marks, n=n, start=it,
                                       halo=spread * n, chunks=chunks, gpu=gpu)
                token = dask.base.tokenize(str(zout.store_path), str(marks), n, it)
                flags = tuple((1,) * len(c) for c in chunks)
                run(da.map_blocks(fn, chunks=flags, dtype=bool, meta=np.empty((0, 0), bool),
                                  block=shared(block, f"lsfov-block-{token}"),  # (it holds the operator)
                                  name=f"lsfov-exchange-{token}"), n, n_blocks - len(list(marks.glob("*"))))
                (root / "done" / f"x{e}").touch()
                shutil.rmtree(marks, ignore_errors=True)
            zx, it = zout, it + n
    return zx


def _task(*, zy, zx, zout, marks: Path, block, n, start, halo, chunks, gpu, block_info=None):
    iy, ix = block_info[None]["chunk-location"]
    mark = marks / f"{iy}.{ix}"
    if mark.exists():
        return np.zeros((1, 1), bool)
    window, core = block_window(chunks, (iy, ix), halo)
    yb = zy[window]
    xb = None if zx is None else zx[(Ellipsis,) + window]
    if gpu:
        import cupy

        yb, xb = cupy.asarray(yb), None if xb is None else cupy.asarray(xb)
    out = block(yb, xb, n=n, start=start, halo=halo, location=(iy, ix))
    # Blocks are unions of whole zarr chunks: no two tasks write the same chunk.
    place = tuple(slice(w.start + c.start, w.start + c.stop) for w, c in zip(window, core))  # the core in the field
    zout[(Ellipsis,) + place] = to_numpy(out)
    mark.touch()  # only after the write: a task killed mid-write leaves no mark and is redone
    return np.ones((1, 1), bool)
