"""Where Dask work runs: the threaded scheduler, a LocalCluster, a GPU cluster, an HPC batch system
(SLURM, PBS through dask-jobqueue), or an existing scheduler."""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import dask
import dask.callbacks
import dask.threaded
import numpy as np

from ._validate import positive_int

__all__ = ["use_scheduler", "parse_scheduler", "compute", "jobqueue_cluster", "worker_budgets", "shared", "SCHEDULERS"]

log = logging.getLogger("lsfov")

SCHEDULERS = ("threads | synchronous | local[:WORKERS] | cuda | slurm[:JOBS] | pbs[:JOBS] | tcp://HOST:PORT | "
              "SCHEDULER.json")

_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}
_SUBMIT = {"slurm": "sbatch", "pbs": "qsub"}
_CONNECT_TIMEOUT = "10s"  # to an existing scheduler (tests shorten it)


def jobqueue_cluster(kind: str, **settings):
    """A dask-jobqueue cluster for ``kind`` ("slurm" or "pbs"), no jobs submitted yet.

    Settings not given here come from the Dask configuration, the usual place for a site's HPC
    settings: ``~/.config/dask/jobqueue.yaml`` (keys ``jobqueue.slurm.cores``, ``memory``,
    ``walltime``, ``queue``, ``account``, ...) or environment variables such as
    ``DASK_JOBQUEUE__SLURM__CORES=8``. ``cluster.job_script()`` shows what would be submitted;
    ``cluster.scale(jobs=N)`` submits.

    Parameters
    ----------
    kind : {"slurm", "pbs"}
        The batch system.
    **settings
        dask-jobqueue settings (``cores``, ``memory``, ``walltime``, ``queue``, ``account``, ...), over
        the Dask configuration's.

    Returns
    -------
    dask_jobqueue.JobQueueCluster
        The cluster, with no job submitted.

    Raises
    ------
    ValueError
        For an unknown ``kind``, a missing dask-jobqueue, a job size (``cores``, ``memory``) that is
        not set or not valid, or a setting dask-jobqueue does not know.
    """
    if kind not in _JOBQUEUE:
        raise ValueError(f"unknown batch system {kind!r}; use one of {sorted(_JOBQUEUE)}")
    # Importing it sets Ctrl-C to exit quietly, status 0 (its runner's handler): put back what was there,
    # so that a cancelled run says so and stops a script's `lsfov ... && next step`.
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue
    except ImportError:
        raise ValueError(f"--scheduler {kind} needs dask-jobqueue: pip install dask-jobqueue") from None
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)
    _check_job_size(kind, settings)
    try:
        return getattr(dask_jobqueue, _JOBQUEUE[kind])(**settings)
    except ValueError as e:
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        if unknown is None:
            raise
        raise ValueError(f"{kind} jobs have no setting {unknown.group(1)!r}; see dask-jobqueue's {_JOBQUEUE[kind]} "
                         "for the settings (account, queue, walltime, ...)") from None


def _check_job_size(kind: str, settings=None):
    """Refuse a batch job's size (``cores``, ``processes``, ``memory``: ``settings``, else the Dask
    configuration's) that dask-jobqueue would take and then fail on: missing, zero, not a number."""
    from dask.utils import parse_bytes

    def setting(name):
        return (settings or {}).get(name, dask.config.get(f"jobqueue.{kind}.{name}", None))

    where = (f"put cores and memory in ~/.config/dask/jobqueue.yaml (jobqueue.{kind}.cores, jobqueue.{kind}.memory) "
             f"or set DASK_JOBQUEUE__{kind.upper()}__CORES and DASK_JOBQUEUE__{kind.upper()}__MEMORY")
    if setting("cores") is None or setting("memory") is None:
        raise ValueError(f"no {kind} job size set: {where}")
    for name in ("cores", "processes"):
        v = setting(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"the {kind} jobs' {name} must be a positive integer, got {v!r}; {where}")
    memory = setting("memory")
    try:
        ok = parse_bytes(memory) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"the {kind} jobs' memory must be an amount such as '32GB', got {memory!r}; {where}")


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started in the block ignore Ctrl-C (SIGINT reaches the terminal's whole process group):
    this process stops the run and closes the cluster, instead of each worker printing a traceback.
    (An ignored signal stays ignored across exec, and Python then installs no KeyboardInterrupt.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _hushable(name: str):
    """Yields a function that silences logger ``name`` until the block ends (then its level returns);
    while the block runs, :func:`_hush_on_interrupt` calls it too."""
    logger = logging.getLogger(name)
    level = logger.level

    def hush():
        logger.setLevel(logging.CRITICAL)

    _HUSHES.append(hush)
    try:
        yield hush
    finally:
        _HUSHES.remove(hush)
        logger.setLevel(level)


_HUSHES = []  # the hush of each local cluster in use (see _hushable)


@contextlib.contextmanager
def _filtered(name: str, flt: logging.Filter):
    """Logger ``name`` with the filter ``flt`` while the block runs."""
    logger = logging.getLogger(name)
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


class _SyncCancelRace(logging.Filter):
    """distributed's ``sync`` logs a NameError through tornado when a Ctrl-C lands before its future
    exists (its cancel callback reads a variable not set yet): a race of the interrupt, no news."""

    def filter(self, record):
        e = record.exc_info[1] if record.exc_info else None
        return not (isinstance(e, NameError) and "'future'" in str(e))


class _LostSchedulerTraceback(logging.Filter):
    """distributed's client logs the tracebacks of its attempts to reach a scheduler that is gone (a
    closed comm, the reconnection cancelled: 40 lines); the run then ends with lsfov's one line that
    says what to do (:func:`lost_scheduler`). Its one-line messages stay; with -vv, everything."""

    def filter(self, record):
        e = record.exc_info[1] if record.exc_info else None
        lost = type(e).__name__ in ("CancelledError", "CommClosedError") or isinstance(e, OSError)
        return not lost or log.isEnabledFor(logging.DEBUG)


def _hush_on_interrupt(e: BaseException):
    """An interrupt (Ctrl-C, SIGTERM: not an Exception) stops the run: what distributed says while
    its futures are cancelled ("Couldn't gather keys", from the scheduler in this process) is no news."""
    if not isinstance(e, Exception):
        for hush in list(_HUSHES):
            hush()


@contextlib.contextmanager
def use_scheduler(spec: str | None = "threads", *, n_workers: int | None = None):
    """Run the Dask work inside the block on ``spec``; the cluster it starts is closed at the end.

    A context manager: ``spec`` and ``n_workers`` are checked on entering the block, before any
    cluster starts.

    Parameters
    ----------
    spec : str or None
        ``"threads"`` (default; None too): Dask's threaded scheduler in this process.
        ``"synchronous"`` (or ``"sync"``): one thread (debugging). ``"local"`` (or
        ``"local:N"``, N workers): a ``distributed.LocalCluster`` of one-thread workers on this
        machine (dashboard link logged).
        ``"cuda"``: dask-cuda's ``LocalCUDACluster``, one worker per GPU. ``"slurm:N"`` / ``"pbs:N"``:
        N batch jobs of workers through dask-jobqueue (see :func:`jobqueue_cluster` for the settings).
        ``"tcp://host:port"`` (or ``tls://``, ``ucx://``, ``inproc://``): an existing scheduler;
        also a bare ``"HOST:PORT"`` (taken as TCP) or the scheduler file ``*.json`` it wrote
        (``dask scheduler --scheduler-file S.json``: its ``address`` is read).
    n_workers : int, optional
        Workers of the ``"local"`` cluster (default: one per core), or the number of batch jobs for
        ``"slurm"`` / ``"pbs"`` without ``:N`` (default 1). Ignored otherwise, but checked for every
        ``spec``: it must be a positive integer.

    Yields
    ------
    distributed.Client or None
        The client of the cluster or scheduler; None for the threaded and synchronous schedulers.

    Raises
    ------
    TypeError
        If ``spec`` is neither a str nor None.
    ValueError
        If ``n_workers`` is not a positive integer (0 included, whatever ``spec``); for an unknown
        ``spec``, a missing dask-cuda or dask-jobqueue, a batch ``spec`` whose N is not a positive
        integer, whose submit command is not on PATH or whose job size is not configured
        (:func:`jobqueue_cluster`), a scheduler file without an ``address``, or a scheduler address
        that is malformed or cannot be reached.
    FileNotFoundError
        If a scheduler file ``*.json`` does not exist.
    """
    kind, value = parse_scheduler(spec, n_workers=n_workers)
    if kind in ("threads", "synchronous"):
        with dask.config.set(scheduler=kind):
            yield None
        return
    from distributed import Client, LocalCluster

    if kind == "local":
        # The logger's level before the cluster (which sets its own) comes back at the end.
        with _filtered("tornado.application", _SyncCancelRace()), _hushable("distributed") as hush:
            with _children_ignore_sigint():
                # Workers' own messages (tasks cancelled by a Ctrl-C, memory chatter, a heartbeat that
                # found the scheduler closed by a Ctrl-C: an error with a traceback) only with -vv: lsfov
                # says what matters itself (out of memory, a lost worker, interrupted).
                quiet = logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL
                cluster = LocalCluster(n_workers=value, threads_per_worker=1, dashboard_address=":0",
                                       silence_logs=quiet)
            with cluster, Client(cluster) as client:
                log.info("local cluster with %d workers; dashboard: %s", len(cluster.workers), client.dashboard_link)
                try:
                    yield client
                except BaseException:  # a Ctrl-C, a SIGTERM or an error: its closing chatter is no news
                    hush()
                    raise
        return
    if kind == "cuda":
        from dask_cuda import LocalCUDACluster

        with (_filtered("tornado.application", _SyncCancelRace()), LocalCUDACluster() as cluster,
              Client(cluster) as client):
            log.info("CUDA cluster, one worker per GPU (%d); dashboard: %s", len(cluster.workers), client.dashboard_link)
            yield client
        return
    if kind in _JOBQUEUE:
        with (_filtered("tornado.application", _SyncCancelRace()), _hushable("distributed") as hush,
              jobqueue_cluster(kind) as cluster):
            cluster.scale(jobs=value)
            with Client(cluster) as client:
                log.info("%s: %d job(s) submitted, workers join as they start; dashboard: %s", kind, value,
                         client.dashboard_link)
                log.debug("job script:\n%s", cluster.job_script())
                try:
                    yield client
                finally:  # the in-process scheduler's closing cancels the progress bar's feed: an ERROR, no news
                    hush()
        return
    client = _connect(value)
    with (_filtered("tornado.application", _SyncCancelRace()), _filtered("distributed.client", _LostSchedulerTraceback()),
          _hushable("distributed") as hush, _hushable("asyncio") as hush_loop, client):
        log.info("connected to %s; dashboard: %s", value, client.dashboard_link)
        try:
            yield client
        except BaseException as e:  # a Ctrl-C: the gathers it cancels print their AllExit; lsfov says it once
            hush()
            hush_loop()
            # The scheduler lost during a read outside compute() (dask.compute of an input's statistics):
            # said here, while the client that can tell is still this process's.
            lost = lost_scheduler(e) if isinstance(e, Exception) else None
            if lost is not None:
                raise lost from e
            raise


def parse_scheduler(spec: str | None = "threads", *, n_workers: int | None = None) -> tuple[str, object]:
    """What :func:`use_scheduler` would run on, checked without starting or reaching anything: a
    command refuses a bad ``--scheduler`` before it opens its image. It raises as :func:`use_scheduler`
    does, except that a scheduler address is not tried here.

    Parameters
    ----------
    spec : str or None
        What ``--scheduler`` takes (see ``SCHEDULERS``); None is ``"threads"``.
    n_workers : int, optional
        Workers of a ``"local"`` cluster.

    Returns
    -------
    kind : str
        ``"threads"``, ``"synchronous"``, ``"local"``, ``"cuda"``, ``"slurm"``, ``"pbs"`` or ``"address"``.
    value : int, str or None
        The local workers (or None), the batch jobs, or the address (``"proto://..."``).
    """
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"spec must be a scheduler name ({SCHEDULERS}), got {type(spec).__name__}")
    if n_workers is not None:  # 0 or fewer workers: a LocalCluster that waits forever for its first task
        n_workers = positive_int(n_workers, "n_workers")
    spec = (spec or "threads").strip()
    if spec.startswith("local:"):  # local:N, as slurm:N (N workers; it was taken for a host named local)
        workers = spec.partition(":")[2]
        if not (workers.isdigit() and int(workers) > 0):
            raise ValueError(f"--scheduler {spec}: give a positive number of workers, e.g. local:2")
        return "local", int(workers)
    if spec in ("threads", "synchronous", "sync"):
        return ("synchronous" if spec.startswith("sync") else "threads"), None
    if spec == "local":
        return "local", n_workers
    if spec == "cuda":
        if importlib.util.find_spec("dask_cuda") is None:
            raise ValueError("--scheduler cuda needs dask-cuda, CuPy and an NVIDIA GPU: pip install -e '.[gpu]' over a "
                             "CUDA build of torch (without constraints.txt, which pins the CPU build), or run "
                             "with --no-gpu and another scheduler")
        return "cuda", None
    kind, _, jobs = spec.partition(":")
    if kind in ("threads", "synchronous", "sync", "cuda"):  # (else taken for a host named so)
        what = {"threads": "threads uses every core of this machine",
                "cuda": "cuda starts one worker per visible GPU (choose them with CUDA_VISIBLE_DEVICES)"}.get(
            kind, f"{kind} runs in this thread")
        raise ValueError(f"--scheduler {spec} takes no count: {what}; for N worker processes use local:N")
    if kind in _JOBQUEUE:
        try:
            n_jobs = int(jobs or n_workers or 1)
        except ValueError:
            n_jobs = -1
        if n_jobs < 1:
            raise ValueError(f"--scheduler {spec}: give the number of jobs as {kind}:N (N >= 1)")
        if importlib.util.find_spec("dask_jobqueue") is None:
            raise ValueError(f"--scheduler {kind} needs dask-jobqueue: pip install dask-jobqueue")
        submit = _SUBMIT[kind]
        if shutil.which(submit) is None:  # the cluster would fail in its event loop, after a hang
            raise ValueError(f"--scheduler {kind}: {submit} is not on PATH; run lsfov where {kind} jobs can be "
                             "submitted (a login node)")
        _check_job_size(kind)  # (before the image is read, not once the cluster starts)
        return kind, n_jobs
    address = _address(spec)
    if address.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        _check_address(address)
        return "address", address
    raise ValueError(f"unknown scheduler {spec!r}; use {SCHEDULERS}")


def _address(spec: str) -> str:
    """A scheduler's address from what HPC users give: a scheduler file (``dask scheduler
    --scheduler-file S.json``), a bare ``HOST:PORT`` (TCP), or the address itself."""
    import json

    if spec.endswith(".json"):
        try:
            return str(json.loads(Path(spec).read_text())["address"])
        except FileNotFoundError:
            raise FileNotFoundError(f"--scheduler {spec}: no such scheduler file; start the scheduler first "
                                    f"(dask scheduler --scheduler-file {spec})") from None
        except (ValueError, KeyError, TypeError, OSError):
            raise ValueError(f"--scheduler {spec} is not a Dask scheduler file (it has no 'address')") from None
    return f"tcp://{spec}" if re.fullmatch(r"[\w.\-]+:\d+", spec) else spec


def _check_address(spec: str):
    """Refuse a malformed TCP/TLS address: distributed's own message ("missing port number") names no fix."""
    from distributed.comm import parse_address, parse_host_port

    proto, loc = parse_address(spec)
    if not loc:  # ("inproc://" was taken, then failed in a tuple unpacking)
        raise ValueError(f"scheduler address {spec!r} names no scheduler; give it as tcp://HOST:PORT (e.g. "
                         "tcp://10.0.0.5:8786) or a scheduler file")
    if proto in ("tcp", "tls"):
        try:
            host, port = parse_host_port(loc)
        except ValueError:
            host, port = "", 0
        if not host or not 0 < port < 65536:
            raise ValueError(f"scheduler address {spec!r} is malformed; give it as {proto}://HOST:PORT "
                             f"(e.g. {proto}://10.0.0.5:8786)")


def _connect(spec: str):
    """A Client of the scheduler at ``spec``. On any failure none is left registered: distributed
    registers a Client as the default before it connects, and a broken default takes every later
    Dask compute of the process (it hangs or fails)."""
    from distributed import Client, default_client

    def registered():
        try:
            return default_client()
        except ValueError:
            return None

    before = registered()
    made = {}

    def connect():
        try:
            made["client"] = Client(spec, timeout=_CONNECT_TIMEOUT)
        except BaseException as e:  # (said in the caller's thread)
            made["error"] = e

    # distributed's own timeout does not bound its handshake: a server that accepts the connection and
    # never answers (the dashboard's HTTP port, which lsfov prints beside the scheduler's) held it forever.
    thread = threading.Thread(target=connect, name="lsfov-connect", daemon=True)
    thread.start()
    thread.join(3 * dask.utils.parse_timedelta(_CONNECT_TIMEOUT))
    if thread.is_alive():
        left = registered()
        if left is not None and left is not before:
            # Closed, within bounds too: a default client left half made would take every later compute.
            closing = threading.Thread(target=left.close, kwargs={"timeout": 2}, daemon=True)
            closing.start()
            closing.join(5)
        raise ValueError(f"the server at {spec} accepted the connection but no Dask scheduler answered; is it the "
                         "dashboard's port? Give the scheduler's address (tcp://HOST:PORT, usually port 8786, as "
                         "`dask scheduler` prints it) or its --scheduler-file")
    try:
        if "error" in made:
            raise made["error"]
        return made["client"]
    except Exception as e:
        left = registered()
        if left is not None and left is not before:
            left.close()
        what = "cannot reach" if isinstance(e, OSError) else "cannot connect to"
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{what} the Dask scheduler at {spec} ({detail}); is it running, at this address?") from None


def shared(obj, key: str):
    """``obj`` as one key of a Dask graph, for tasks to take as a (keyword) argument: sent once to
    each worker that runs them, where a task's own copy sends it with every task (an operator or a
    model of megabytes, times hundreds of tasks, crossed the network and was unpickled each time).
    ``key`` names it: one per object and run.

    Parameters
    ----------
    obj : object
        What the tasks share (an operator, a model).
    key : str
        Its key in the graph: one per object and run.

    Returns
    -------
    dask.delayed.Delayed
        ``obj`` behind one key, not traversed.
    """
    from dask.delayed import delayed

    return delayed(obj, name=key, traverse=False)


def _active_client():
    """The distributed Client Dask would use now, or None (threaded/synchronous scheduler)."""
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _pause_fraction() -> float:
    """The share of its memory limit at which a Dask worker stops taking tasks (pause), or is killed."""
    cfg = dask.config.get("distributed.worker.memory", {}) or {}
    for key in ("pause", "terminate"):
        if cfg.get(key):
            return float(cfg[key])
    return 1.0


def worker_budgets(client, own_floor: int, kept=None, held=None):
    """Memory each worker of ``client`` leaves its tasks: its ``memory_limit`` up to where Dask pauses
    it, less its own use (measured, at least ``own_floor`` bytes: the code its tasks load) and what
    ``kept(memory_limit)`` says it keeps between tasks (a cache). The worker's metric ``held`` says
    what that cache holds now: it is in the measured use, and is counted once, as the cache (a worker
    of a long-lived cluster keeps it from an earlier run). Returns
    ``([(bytes, threads) per worker with a limit], pause fraction)``; a worker with nothing left is
    refused (MemoryError), since Dask would pause it and a run would wait for it without a word.
    With no worker yet (batch jobs in the queue), waits for the first: the run could not start
    before, and its memory is what the checks need.

    Parameters
    ----------
    client : distributed.Client
        The cluster's client.
    own_floor : int
        The least a worker's own use is taken to be, in bytes.
    kept : callable, optional
        ``kept(memory_limit)``: the bytes a worker of that limit keeps between tasks.
    held : str, optional
        The name of the worker metric that says what that cache holds now.

    Returns
    -------
    budgets : list of (int, int)
        (bytes, threads) of each worker that has a memory limit.
    fraction : float
        The fraction of its limit at which Dask pauses a worker.
    """
    workers = _workers_info(client)
    if not workers:
        log.info("waiting for the first Dask worker to join (batch jobs may wait in the queue)")
        with _say_when_no_workers(client):
            try:
                client.wait_for_workers(1)
            except Exception as e:  # (the scheduler gone while it waited)
                lost = lost_scheduler(e)
                if lost is None:
                    raise
                raise lost from e
        workers = _workers_info(client)
    fraction, budgets = _pause_fraction(), []
    for name, w in workers.items():
        if not w.get("memory_limit"):
            continue
        metrics = w.get("metrics", {})  # (one heartbeat's: the cache's bytes are in that memory)
        measured = metrics.get("memory", 0) - (metrics.get(held, 0) if held else 0)
        own, cache = max(measured, own_floor), kept(w["memory_limit"]) if kept else 0
        free = fraction * w["memory_limit"] - own - cache
        if free <= 0:
            uses = f"uses {own / 2**20:.0f} MiB" if measured >= own_floor else f"will use at least {own / 2**20:.0f} MiB"
            uses += f" (and may cache {cache / 2**20:.0f} MiB)" if cache else ""
            raise MemoryError(f"the Dask worker {w.get('name', name)} {uses} of its {w['memory_limit'] / 2**20:.0f} MiB "
                              f"memory limit before any work, over the {fraction:.0%} at which Dask pauses it; give "
                              "each worker more memory")
        budgets.append((free, w["nthreads"]))
    return budgets, fraction


def _workers_info(client) -> dict:
    """Every worker's details from the scheduler (distributed 2025.6 to 2026.6 gave the first five
    unless asked for all; before, the call took no such argument and gave all)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return info.get("workers", {})


def _watched() -> bool:
    """Whether progress goes where someone watches it (a terminal, a notebook), not into a file."""
    try:
        return sys.stderr.isatty() or "ipykernel" in sys.modules
    except (AttributeError, ValueError):  # replaced, or closed
        return False


def bar_interval() -> float:
    """Seconds between a progress bar's redraws: 0.1 where someone watches; 30 into a file (a batch
    job's log), which keeps every redraw."""
    return 0.1 if _watched() else 30.0


class _LogBar(dask.callbacks.Callback):
    """Dask's progress where no one watches (a batch job's log): a line every :func:`bar_interval`
    seconds as tasks finish, and one at the end, instead of a bar redrawn ten times a second."""

    def _start(self, dsk):
        self._t0 = self._last = time.perf_counter()
        self._every = bar_interval()  # once, not per task

    def _posttask(self, key, result, dsk, state, worker_id):
        if time.perf_counter() - self._last >= self._every:
            self._last = time.perf_counter()
            self._line(state)

    def _finish(self, dsk, state, errored):
        if not errored and time.perf_counter() - self._t0 >= 1.0:  # as Dask's bar: nothing under a second
            self._line(state)

    def _line(self, state):
        done = len(state["finished"])
        share = done / max(done + sum(len(state[k]) for k in ("ready", "waiting", "running")), 1)
        print(f"[{'#' * int(40 * share):<40}] | {share:4.0%} Completed | {time.perf_counter() - self._t0:6.1f}s",
              file=sys.stderr, flush=True)


def progress_bar(**kwargs):
    """A ``tqdm.auto`` bar (a widget in a notebook) on stderr, redrawn every :func:`bar_interval`."""
    from tqdm.auto import tqdm

    every = bar_interval()  # (tqdm's monitor forces a redraw after maxinterval, 10 s by default)
    return tqdm(**{"mininterval": every, "maxinterval": max(10.0, every), **kwargs})


def compute(obj, *, progress: bool = False, label: str | None = None, on_task=None):
    """Compute a Dask collection where Dask runs now, with a progress bar if asked.

    On a distributed cluster the bar follows the futures (``distributed.progress``); on the local
    schedulers it is Dask's ``ProgressBar``. With ``on_task`` the bar is the caller's own, anywhere:
    ``on_task(key, result)`` is called as each task (on a cluster: each chunk of a 2-D NumPy array) finishes,
    e.g. to advance one ``tqdm`` bar over several passes.
    ``label`` is logged first, so that a run of several passes says which one a bar belongs to.

    Parameters
    ----------
    obj : dask collection
        What to compute (an array, a delayed object, or a tuple of them).
    progress : bool
        Show a progress bar.
    label : str, optional
        Logged before the work starts (which pass of a run this is).
    on_task : callable, optional
        ``on_task(key, result)``, called as each task finishes (the caller's own progress bar).

    Returns
    -------
    object
        The computed value of ``obj`` (``dask.compute(obj)[0]``, not a 1-tuple): an array for an
        array, a list of values for a list.

    Raises
    ------
    MemoryError
        A task ran out of memory, or its workers died repeatedly running it (with the remedy).
    ConnectionError
        The Dask scheduler was lost during the computation (its node or job gone).
    """
    try:
        return _compute(obj, progress, label, on_task)
    except MemoryError as e:
        raise MemoryError(f"out of memory in a Dask task ({e or 'no detail'}); use smaller chunks (--chunks) "
                          "or fewer threads") from e
    except Exception as e:
        lost = lost_scheduler(e)
        if lost is not None:
            raise lost from e
        if type(e).__name__ != "KilledWorker":
            raise
        # A task whose workers died ``distributed.scheduler.allowed-failures`` times: almost always a
        # worker over its memory limit (the nanny kills it), sometimes a crash in native code.
        raise MemoryError(f"Dask workers died {_allowed_failures() + 1} times running the same task ({e.args[0]!r}), "
                          "most often because a chunk needs more memory than a worker has; use smaller chunks "
                          "(--chunks) or give each worker more memory") from e


def lost_scheduler(e: BaseException) -> ConnectionError | None:
    """``e`` as one line that says what to do, where it means the Dask scheduler is gone (its node
    lost, the job killed): distributed's futures cancelled for the lost connection, a closed comm, or
    its timeout connecting again; else None."""
    name, text = type(e).__name__, str(e)
    lost = (name in ("FutureCancelledError", "CommClosedError") and ("connection" in text.lower()
                                                                     or "closed" in text.lower())
            # (distributed's wording; not any OSError: a worker's, e.g. a full disk, is re-raised here too)
            or isinstance(e, OSError) and text.startswith("Timed out trying to connect to")
            # work submitted while the client tried to reconnect: cancelled when it gives up, "for reason: unknown"
            or name in ("FutureCancelledError", "CancelledError") and _client_gone())
    if not lost:
        return None
    return ConnectionError(f"lost the connection to the Dask scheduler ({name}: "
                           f"{text.splitlines()[0] if text else 'no detail'}); run the command again "
                           "with --resume once the scheduler is back")


def _client_gone() -> bool:
    """Whether this process's Dask client has lost its scheduler (reconnecting, closing, closed)."""
    dist = sys.modules.get("distributed")  # (not imported: no client)
    client = dist.client._get_global_client() if dist is not None else None
    return client is not None and client.status != "running"


def _allowed_failures() -> int:
    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


#: Seconds without a connected worker after which a run on a cluster says it is waiting for one.
NO_WORKERS_GRACE = 60.0

_WAITED = [0.0]  # seconds this process's runs have seen no worker connected (the watch's readings)
_WAITED_LOCK = threading.Lock()


def waited_for_workers() -> float:
    """Seconds that runs of this process have waited with no Dask worker connected (batch jobs still in
    the queue, every worker lost), to within a reading of the watch (5 s): a run's closing rate leaves
    them out. Read it before and after a run."""
    with _WAITED_LOCK:
        return _WAITED[0]


@contextlib.contextmanager
def _say_when_no_workers(client, grace: float | None = None):
    """Say when no worker has been connected to ``client``'s scheduler for ``grace`` seconds, and
    again when one is: distributed waits for workers in silence, without end (every worker died,
    or batch jobs still wait in the queue), and a run looks hung. Reads the workers' thread counts
    (``Client.nthreads``: not ``scheduler_info``, which would replace the worker details the client
    keeps for other callers) from a daemon thread."""
    grace = NO_WORKERS_GRACE if grace is None else grace
    stop = threading.Event()
    said = threading.Event()  # the run was said to wait, and not yet to go on

    def goes_on(n):
        said.clear()
        log.warning("%d Dask worker%s connected: the run goes on", n, "" if n == 1 else "s")

    def watch():
        since = time.monotonic()  # (since the run started, or its workers were last seen)
        last = since
        while not stop.wait(min(grace / 4, 5.0)):
            try:
                n = len(client.nthreads())
            except Exception:  # the scheduler gone, or the client closing: the computation says it
                return
            now = time.monotonic()
            if not n:
                with _WAITED_LOCK:
                    _WAITED[0] += now - last
            last = now
            if n:
                if said.is_set():
                    goes_on(n)
                since = None
            elif since is None:
                since = time.monotonic()
            elif not said.is_set() and time.monotonic() - since >= grace:
                said.set()
                log.warning("no Dask worker has been connected to the scheduler for %.0f s: the run waits for one "
                            "(every worker died, or batch jobs wait in the queue: see squeue or qstat); start "
                            "workers, or stop the run (Ctrl-C)", time.monotonic() - since)

    thread = threading.Thread(target=watch, name="lsfov-worker-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)  # (a reading under way ends first: none lands after the run)
    if said.is_set():  # a worker joined, and the wait for it ended, before the next reading said so
        try:
            n = len(client.nthreads())
        except Exception:
            n = 0
        if n:
            goes_on(n)


def _compute(obj, progress, label, on_task):
    if progress and label:
        log.info(label)
    client = _active_client()
    if client is not None:
        with _say_when_no_workers(client):
            return _compute_on(client, obj, progress, on_task)
    return _compute_locally(obj, progress, on_task)


def _compute_on(client, obj, progress, on_task):
    """:func:`compute` on a distributed cluster."""
    if on_task is not None and getattr(obj, "ndim", None) == 2:
        from distributed import as_completed

        parts = obj.to_delayed()
        futures = client.compute(list(parts.ravel()))
        try:
            for f in as_completed(futures):
                on_task(f.key, f.result())
        except BaseException as e:
            _hush_on_interrupt(e)
            client.cancel(futures)  # nothing keeps running (writing a scratch store) after the error
            raise
        results = [f.result() for f in futures]
        return np.block([results[i * parts.shape[1] : (i + 1) * parts.shape[1]] for i in range(parts.shape[0])])
    futures = client.compute(obj)  # one future, or a list of them for a list, as dask.compute's
    try:
        if progress and _watched():  # (into a log its bar would be ten redraws a second, unended)
            from distributed import progress as track

            with contextlib.redirect_stdout(sys.stderr):  # its text bar writes to stdout: keep that for results
                track(futures)
        return client.gather(futures)
    except BaseException as e:
        _hush_on_interrupt(e)
        if isinstance(e, Exception):  # (an interrupt waits for nothing: what it leaves, the next write removes)
            _settle_on(client, futures, obj)
        raise


def _executing(dask_worker) -> list[str]:
    """The names of the tasks a Dask worker is running now (cancelled ones included), run on it."""
    return [_key_name(ts.key) for ts in dask_worker.state.executing]


def _key_name(key) -> str:
    """The name of a Dask task key (its first element for a tuple key)."""
    return str(key[0] if isinstance(key, tuple) else key)


#: Seconds an error on a cluster waits for the tasks still running on workers (see _settle_on).
SETTLE_TIMEOUT = 60.0


def _settle_on(client, futures, obj):
    """After a task failed on a cluster: cancel the rest of ``obj``'s work and wait (up to
    ``SETTLE_TIMEOUT``) until none of its tasks still runs on a worker, as the local schedulers'
    pool does: a store task of another variable would otherwise go on writing into a write's
    temporary directory after the error removed it (and a run would compute for nothing)."""
    try:
        client.cancel(futures)
        names = set()  # the graph's layer names: a task's key is (name, index...) or the name
        for part in obj if isinstance(obj, (list, tuple)) else [obj]:
            graph = part.__dask_graph__() if hasattr(part, "__dask_graph__") else {}
            names |= set(getattr(graph, "layers", None) or {_key_name(k) for k in graph})
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            # (a cancelled task still running is the worker's to say: the scheduler has let it go)
            running = {k for keys in client.run(_executing).values() for k in keys}
            running |= {_key_name(k) for keys in client.processing().values() for k in keys}
            if not names & running:
                return
            time.sleep(0.1)
        log.warning("tasks of the failed computation still run on the workers after %.0f s; what they write into "
                    "a temporary folder, the next write of the same output removes", SETTLE_TIMEOUT)
    except Exception:  # the scheduler gone: nothing to wait for
        return


def _compute_locally(obj, progress, on_task):
    """:func:`compute` on Dask's threaded or synchronous scheduler."""
    if on_task is not None:
        from dask.callbacks import Callback

        class _OnTask(Callback):
            def _posttask(self, key, result, dsk, state, worker_id):
                on_task(key, result)

        with _OnTask():
            return _compute_here(obj)
    if progress:
        from dask.diagnostics import ProgressBar

        with ProgressBar(minimum=1.0, out=sys.stderr) if _watched() else _LogBar():  # stderr: stdout has results
            return _compute_here(obj)
    return _compute_here(obj)


def _compute_here(obj):
    """``dask.compute`` on the local schedulers; the threaded one on lsfov's pools, which wait for the
    tasks still running when one fails before the error is raised: Dask's own let them run on, and one
    still writing into a failed write's temporary directory made it again after it was removed. On
    Ctrl-C nothing waits (what it leaves, the next write removes)."""
    # (No scheduler set: the threaded one, arrays' and delayed's default.)
    if dask.config.get("pool", None) is not None or dask.base.get_scheduler() not in (None, dask.threaded.get):
        return dask.compute(obj)[0]
    pool = _settling_pool(dask.config.get("num_workers", None) or dask.threaded.CPU_COUNT)
    try:
        return dask.compute(obj, pool=pool)[0]
    except Exception:
        try:
            pool.settle()
        except BaseException:  # a Ctrl-C while waiting: as below
            pool.stop()
            raise
        raise
    except BaseException:  # Ctrl-C, SIGTERM: its tasks end at their next stop_point, not when done
        pool.stop()
        raise


_task = threading.local()  # in a task's thread: the stop events of the pool that runs it (and its parents')


def stop_point():
    """A place in a long task (an iteration) where it ends if its compute, or the compute that runs the
    task that started it, was interrupted (Ctrl-C, SIGTERM): no one awaits its result, and at exit
    Python waits for its thread. A batch job given SIGTERM so exits within an iteration, not a block
    task, of its grace time."""
    if any(stop.is_set() for stop in getattr(_task, "stops", ())):
        raise _Stopped()


class _Stopped(Exception):
    """Raised in a task of an interrupted compute (which no one awaits)."""


class _SettlingPool(getattr(dask.threaded, "ContextAwareThreadPoolExecutor", concurrent.futures.ThreadPoolExecutor)):
    """A thread pool for Dask's threaded scheduler that can wait for the tasks it runs (``settle``)
    or stop them (``stop``)."""

    def __init__(self, n: int):
        super().__init__(n)
        self._live, self._live_lock = set(), threading.Lock()
        self._stop = threading.Event()
        # Made in a task (a compute inside a task): stopped with the pool that runs that task too.
        self._stops = (self._stop, *getattr(_task, "stops", ()))

    def submit(self, fn, /, *args, **kwargs):
        future = super().submit(self._run, fn, *args, **kwargs)
        with self._live_lock:
            self._live.add(future)
        future.add_done_callback(self._ended)
        return future

    def _run(self, fn, /, *args, **kwargs):
        _task.stops = self._stops
        return fn(*args, **kwargs)

    @property
    def stopped(self) -> bool:
        return any(stop.is_set() for stop in self._stops)

    def stop(self):
        """Retire the pool: queued tasks are dropped, running ones end at their next stop_point."""
        with _POOLS_LOCK:  # first: a later compute gets a new pool, never this one
            for key in [k for k, p in _POOLS.items() if p is self]:
                del _POOLS[key]
        self._stop.set()
        self.shutdown(wait=False, cancel_futures=True)

    def _ended(self, future):
        with self._live_lock:
            self._live.discard(future)

    def settle(self):
        with self._live_lock:
            live = list(self._live)
        concurrent.futures.wait(live)


# (calling thread, threads) -> pool, as Dask keeps its own: kept between computes (CuPy's cuFFT plans
# and CUDA graphs are per thread), and one of its own for a compute inside a task (no deadlock).
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _settling_pool(n: int) -> _SettlingPool:
    thread = threading.current_thread()
    with _POOLS_LOCK:
        for key in [k for k, p in _POOLS.items() if not k[0].is_alive() or p.stopped]:  # of threads that have
            _POOLS.pop(key).shutdown(wait=False)  # ended, or of a stopped compute (a nested one's parent)
        if (thread, n) not in _POOLS:
            _POOLS[thread, n] = _SettlingPool(n)
        return _POOLS[thread, n]


def _forget_pools():
    global _POOLS, _POOLS_LOCK
    _POOLS, _POOLS_LOCK = {}, threading.Lock()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
