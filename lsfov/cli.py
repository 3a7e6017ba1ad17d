"""The ``lsfov`` command line: thin commands over the Python API."""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click
import numpy as np

from .cluster import SCHEDULERS, lost_scheduler
from .restore.tv_rl import DEFAULT_EPS, DEFAULT_TV

log = logging.getLogger("lsfov")

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
                MemoryError, ConnectionError)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # no room, over quota, a read-only file system


def _damaged_zarr(e: BaseException) -> str | None:
    """One line for a zarr chunk that cannot be decoded (a store damaged or cut short, which zarr
    reports as a codec's error, or a reshape's, deep in a Dask task), naming the array where the
    traceback shows it; None for any other error (a write's, or the file system's: OSError)."""
    import traceback

    if isinstance(e, (OSError, MemoryError)):
        return None
    decoding, where = False, None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        decoding = decoding or (module.startswith(("zarr.", "numcodecs")) and "decode" in frame.f_code.co_name)
        if where is None and module == "zarr.core.array":
            path = getattr(frame.f_locals.get("self"), "store_path", None)
            where = str(path).removeprefix("file://") if path is not None else None
    if not decoding:
        return None
    return (f"{where + ': a chunk' if where else 'a chunk of a zarr store'} cannot be decoded ({type(e).__name__}: "
            f"{e}); the store is damaged or was cut short: copy or write it again")


# Errors that say the input, the options or the output are wrong (rather than that the run was stopped).
_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


class _Terminated(BaseException):
    """SIGTERM: what SLURM and PBS send a cancelled or timed-out job; stops the run as Ctrl-C does."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _stopped_by(e: BaseException | None):
    """The Ctrl-C or SIGTERM that ``e`` was raised while unwinding, if any: a signal's exception raised
    inside a lock's release leaves the lock half released, and "cannot release un-acquired lock"
    took its place (a traceback and status 1 for a cancelled job)."""
    for _ in range(20):  # (a chain of contexts, never a cycle in practice)
        if e is None or isinstance(e, (KeyboardInterrupt, _Terminated)):
            return e
        e = e.__context__
    return None


def _as_signal(call):
    """``call()``, an error that a signal's unwinding left (:func:`_stopped_by`) raised as that signal."""
    try:
        return call()
    except Exception as e:
        signal_ = _stopped_by(e)
        if signal_ is None:
            raise
        raise signal_ from None


def _signal_again(unraisable, previous, command):
    """A Ctrl-C or SIGTERM raised in code whose exceptions Python ignores (a garbage collector's
    callback, as distributed registers: "Exception ignored in ...") was lost, and the run went on: the
    signal is sent again to the main thread, from another thread (here, the main thread would raise
    it at once, inside this hook, and lose it again), until it lands where it stops the run; only
    while the command runs (``command["running"]``), and at most 20 times."""
    kind = unraisable.exc_type
    if not (kind is not None and issubclass(kind, (KeyboardInterrupt, _Terminated)) and command["running"]
            and command["resent"] < 20):
        return previous(unraisable)
    command["resent"] += 1
    signum = signal.SIGTERM if issubclass(kind, _Terminated) else signal.SIGINT

    def resend():
        if command["running"]:
            signal.pthread_kill(threading.main_thread().ident, signum)

    timer = threading.Timer(0.01, resend)
    timer.daemon = True  # (never holds up the interpreter's exit)
    timer.start()


# Set when a command ends by Ctrl-C or SIGTERM: the process is stopping, and objects of distributed
# that the signal cut short in their making fail in their destructors at exit.
_INTERRUPTED = threading.Event()


def _quiet_distributed(unraisable, previous):
    """After an interrupt: a destructor of distributed that fails ("Exception ignored in
    Future.__del__": a Future the signal caught half made) is closing chatter, logged at debug
    level; anything else as Python says it."""
    obj = unraisable.object
    if (getattr(obj, "__module__", None) or type(obj).__module__ or "").startswith("distributed"):
        log.debug("after the interrupt, %s: %s: %r", obj, getattr(unraisable.exc_type, "__name__", ""),
                  unraisable.exc_value)
        return
    previous(unraisable)


class _Finite(click.FloatRange):
    """click's FloatRange, refusing NaN and Inf too, which its bounds let through (a NaN passes any)."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv is not None and not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit status 1 (no traceback)."""

    def invoke(self, ctx):
        try:
            return _as_signal(functools.partial(click.Group.invoke, self, ctx))
        except click.NoSuchOption as e:
            if ctx.parent is None and e.option_name in ("-q", "--quiet", "-v", "-vv", "--verbose"):
                command = " ".join(e.ctx.command_path.split()[1:]) if e.ctx else ctx.invoked_subcommand
                e.message = (f"{e.message.rstrip('.')}: {e.option_name} goes before the command, "
                             f"lsfov {e.option_name} {command} ...")
                e.possibilities = []
            raise
        except PermissionError as e:
            raise click.ClickException(
                f"permission denied: {e.filename}; lsfov needs to read its inputs and to write beside OUT (its "
                "temporary and lock files) and under --scratch" if e.filename else str(e)) from None
        except _USER_ERRORS as e:  # (a truncated uncompressed chunk fails to reshape: a ValueError)
            raise click.ClickException(_damaged_zarr(e) or str(e)) from None
        except _Terminated:
            _INTERRUPTED.set()
            click.echo("terminated (SIGTERM)", err=True)
            raise SystemExit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:  # the shell's convention (128 + SIGINT), not click's "Aborted!" and 1
            _INTERRUPTED.set()
            click.echo("interrupted (Ctrl-C)", err=True)
            raise SystemExit(128 + signal.SIGINT) from None
        except Exception as e:
            if isinstance(e, OSError) and e.errno in _FULL:  # a full disk or quota (a cluster's shared file
                # systems) is no bug
                fix = "write elsewhere" if e.errno == errno.EROFS else "free space there or write elsewhere"
                raise click.ClickException(
                    f"{e.strerror}" + (f": {e.filename}" if e.filename else "") + f"; {fix} (OUT, --scratch) and run "
                    "again (a result is written whole or not at all)") from None
            # (a lost scheduler met outside lsfov.cluster.compute: a read of the input's statistics)
            lost = lost_scheduler(e)
            message = _damaged_zarr(e) if lost is None else str(lost)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More messages (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors: no progress bars, messages or warnings.")
@click.version_option(package_name="lsfov")
@click.pass_context
def main(ctx, verbose, quiet):
    """lsfov: measure and undo spatially varying blur in large microscopy images."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if not log.handlers:  # lsfov's own messages only: libraries (ome-zarr) chat at INFO
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
    # tifffile's notes on a file (damaged, unusual) come before lsfov's own message of what that means,
    # which is the one line a command prints; -vv shows them (for this command only).
    tiff_log = logging.getLogger("tifffile")
    ctx.call_on_close(functools.partial(tiff_log.setLevel, tiff_log.level))
    tiff_log.setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)  # (its ERRORs too: a cut file's)
    # A warning is one line for the person at the terminal, not a source location in lsfov (for this
    # command only: a notebook or test that calls the CLI gets its own format back).
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    ctx.call_on_close(lambda: setattr(warnings, "formatwarning", previous))
    if quiet:  # for this command only, as the format above
        ctx.with_resource(warnings.catch_warnings())
        warnings.simplefilter("ignore")
    if threading.current_thread() is threading.main_thread():  # a job's SIGTERM keeps the work, as Ctrl-C
        previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous_handler))
        previous_hook, command = sys.unraisablehook, {"running": True, "resent": 0}
        _INTERRUPTED.clear()
        sys.unraisablehook = functools.partial(_signal_again, previous=previous_hook, command=command)
        ctx.call_on_close(lambda: (command.update(running=False), setattr(
            sys, "unraisablehook", functools.partial(_quiet_distributed, previous=previous_hook)
            if _INTERRUPTED.is_set() else previous_hook)))
    ctx.obj = {"quiet": quiet}


def _checked_scheduler(ctx, param, spec):
    """``--scheduler`` checked as it is read, before the command opens its image (an address is
    tried only when the work starts)."""
    from .cluster import parse_scheduler

    parse_scheduler(spec)  # (its errors are the one line of a bad input, as every other's)
    return spec


def _scheduler_option(f, default="threads"):
    return click.option("--scheduler", default=default, show_default=True, callback=_checked_scheduler,
                        help=f"Where Dask runs: {SCHEDULERS}.")(f)


def _scratch_option(f):
    return click.option("--scratch", type=click.Path(), default=None,
                        help="Directory for the run's intermediate state (what --resume continues), visible to all "
                             "workers (default: beside OUT).")(f)


def _gpu_option(f):
    return click.option("--gpu/--no-gpu", default=None,
                        help="Compute on the GPU: each chunk is moved to it (CuPy) as its task reads it (a "
                             "CNN takes it there through DLPack). [default: on with --scheduler cuda]")(f)


def _clip(img, work, saturation, off: bool = False):
    """What ``--saturation`` passes to the API for ``work`` (``img`` or its GPU copy), and the level it
    means: the user's; none when ``off``; else the camera's, which the API finds from the image itself
    (and names its origin, e.g. 12 significant bits) or, for a float32 GPU copy, found here from the file."""
    from ._validate import saturation_level

    if saturation is not None:
        return saturation, float(saturation)
    if off:
        return False, None
    level = saturation_level(img)
    return (None if work is img else (False if level is None else level)), level


def _gpu_ready(gpu, scheduler):
    """CuPy where the GPU is asked for (``gpu``; None: with the ``cuda`` scheduler), checked before
    the input is opened; None where it is not."""
    if gpu is None:
        gpu = (scheduler or "").strip() == "cuda"
    if not gpu:
        return None
    try:
        import cupy
    except ImportError:
        raise ValueError("computing on the GPU (--gpu, the default with --scheduler cuda) needs CuPy: "
                         "pip install -e '.[gpu]' over a CUDA build of torch (without constraints.txt, which pins "
                         "the CPU build), or run with --no-gpu") from None
    if (scheduler or "threads").strip() in ("threads", "synchronous", "sync", "local", "cuda"):  # GPUs here
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # no driver
            n = 0
        if n == 0:
            raise ValueError("--gpu: no CUDA device is visible here; run with --no-gpu")
    return cupy


def _on_gpu(img, gpu, scheduler):
    """``img`` with CuPy chunks if asked (:func:`_gpu_ready`), else itself.

    The chunks move as each task reads them, on the worker that runs it (one GPU per worker with
    dask-cuda); results come back to host memory when they are written."""
    cupy = _gpu_ready(gpu, scheduler)
    if cupy is None:
        return img
    data = img.data.map_blocks(functools.partial(cupy.asarray, dtype=np.float32), dtype=np.float32,
                               meta=cupy.empty((0, 0), np.float32))
    return img.copy(data=data)


def _plane_options(f):
    """--channel/--z/--t/--series: which plane of a multi-dimensional image, of which image of a file."""
    for opt in (click.option("--series", type=int, default=None,
                             help="Image of an OME-TIFF of several (stage positions, fields of view)."),
                click.option("--t", "tpoint", type=int, default=None, help="Time point of a time series."),
                click.option("--z", "zplane", type=int, default=None, help="Plane of a z-stack."),
                click.option("--channel", type=int, default=None, help="Channel of a multi-channel image.")):
        f = opt(f)
    return f


def _overwrite_option(f):
    return click.option("--overwrite", is_flag=True, help="Replace an existing output.")(f)


def _symmetrize_option(f):
    return click.option("--symmetrize", is_flag=True,
                        help="Average each PSF-map node over the 8 rotations and flips of its patch: "
                             "8x the CNN time, more accurate parameters.")(f)


def _saturation_option(f):
    return click.option("--saturation", type=_Finite(min=0, min_open=True), default=None,
                        help="Pixel value at which the camera saturates [default: the largest count of an integer "
                             "image's type, or of an OME-TIFF's SignificantBits; a level above every pixel: none].")(f)


def _background_option(f):
    return click.option("--background", type=_Finite(), default=0.0, show_default=True,
                        help="The camera's offset in its counts (the mean of a frame taken with the shutter closed; "
                             "often 100 on sCMOS and EMCCD cameras): subtracted before deblurring, what falls below "
                             "it taken as 0.")(f)


def _saturation_options(f):
    f = click.option("--max-saturated", type=_Finite(0, 1), default=None,
                     help="Share of a PSF-map node's patch at the saturation level above which the node is invalid "
                          "(1: off, and `run` censors no pixel, for an image stretched to its type's range) "
                          "[default: 0.05].")(f)
    return _saturation_option(f)


def _resume_option(f):
    return click.option("--resume", is_flag=True,
                        help="Continue an interrupted run of the same command: only the missing chunks are computed.")(f)


@contextlib.contextmanager
def _run_state(out: Path, parent, resume: bool):
    """The scratch directory of the run that writes ``out``; kept if the run fails, for ``--resume``.

    Held under :func:`lsfov.io.output_lock`: a second run of ``out`` is refused. Without ``resume`` a
    state left by an earlier run is discarded. (Hidden ``.OUT.partial-*``
    directories of a run killed while writing its result are removed by the next write of OUT,
    :func:`lsfov.io.atomic_directory`.)
    """
    if parent and Path(parent).exists() and not Path(parent).is_dir():
        raise ValueError(f"--scratch {parent} is a file; give a directory that every worker can reach")
    if parent and (Path(parent).resolve() == out.resolve() or out.resolve() in Path(parent).resolve().parents):
        # OUT is written whole at the end, atomically: a scratch inside it would be in its way
        raise ValueError(f"--scratch {parent} is OUT or inside it; give a directory outside OUT (e.g. its parent)")
    if parent:
        where = Path(parent).resolve()
        store = next((p for p in (where, *where.parents) if (p / "zarr.json").exists() or (p / ".zgroup").exists()),
                     None)
        if store is not None:  # an input being read, another result: a killed run would leave its state in it
            raise ValueError(f"--scratch {parent} is inside the zarr store {store}; give a directory outside it")
        _refuse_unwritable(_nearest(where), f"--scratch {parent}")
    from .io import output_lock

    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # (for OUT: its lock makes them)
    try:
        with output_lock(out):  # a second run of OUT is refused, not let loose on this one's state
            with _state(out, parent, resume) as state:
                yield state
    except BaseException:
        _remove(None, made)  # those left empty by a failed run (its lock gone; a kept state keeps them)
        raise


def _nearest(path: Path) -> Path | None:
    """``path`` or the nearest of its parents that exists: where writing into ``path`` begins."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def _refuse_unwritable(under: Path | None, what: str):
    """Refuse, before any work, a folder (``under``) that this process cannot write in."""
    if under is not None and not os.access(under, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write in {under} (permission denied); choose a folder you can write to")


def _work_kept(state: Path) -> bool:
    """Whether a run's state holds work that --resume skips: iterations of a block or of every block
    (not the copy of the input, nor the first state), or PSF-map chunks."""
    return (any(state.glob("*/done/x*.blocks/*")) or any(p.name[1:].isdigit() for p in state.glob("*/done/x*"))
            or any(state.glob("lsfov-psfmap-*/*.npy")))


@contextlib.contextmanager
def _state(out: Path, parent, resume: bool):
    # In a --scratch that several jobs share (a SLURM array), each output its own state, whatever its name.
    tag = "" if not parent else "." + hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:8]
    state = Path(parent or out.parent) / f".{out.name}{tag}.scratch"
    if state.exists() and not resume:
        if _work_kept(state):
            log.warning("discarding the work of an earlier interrupted run in %s (--resume continues it)", state)
        shutil.rmtree(state)
    elif resume and not state.exists():
        log.warning("nothing to resume in %s; starting from the beginning", state)
    made = [p for p in (state.parent, *state.parent.parents) if not p.exists()]  # (a new --scratch DIR)
    state.mkdir(parents=True, exist_ok=True)
    began = state.stat().st_mtime
    try:
        yield state
    except BaseException as e:
        # Work done is kept whatever stopped the run (a killed job, or an error found late, e.g. an
        # output that appeared meanwhile), except an image with nothing to map: a rerun meets it again.
        # (Not imported for it: lsfov.estimate imports torch, seconds a job stopping has not.)
        mapping = sys.modules.get("lsfov.estimate.mapping")
        if mapping is not None and isinstance(e, mapping.NothingToMap):
            _remove(state, made)
        elif out.is_dir() and out.stat().st_mtime >= began:  # stopped once OUT was in place (it is put whole,
            _remove(state, made)  # at the end): e.g. while the cluster closed; no work is left to resume
            click.echo(f"{out} was written whole before the run stopped", err=True)
        elif _work_kept(state):
            # Bad input and signals are said on the next line (the error; "interrupted (Ctrl-C)", _Group).
            told = isinstance(e, (_BAD_INPUT, MemoryError)) or _stopped_by(e) is not None  # (no "stopped" of
            # a run refused before any work of its own, e.g. workers with no room on --resume)
            click.echo(f"{'' if told else 'stopped; '}the work done so far is kept in {state}: "
                       "run the same command with --resume to finish only what is missing", err=True)
        else:  # refused before any work: leave nothing behind
            _remove(state, made)
        raise
    _remove(state, made)


def _remove(state: Path | None, made):
    """Remove a run's state and the folders made for it (``made``, innermost first) that are left
    empty: another job's state in a shared --scratch keeps it."""
    if state is not None:
        shutil.rmtree(state, ignore_errors=True)
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's), or gone
            break


def _picture(out: Path, make):
    """``make()`` (a figure or preview, drawn once OUT is written): its path, or None, said in a
    warning, where it cannot be written (a full disk): OUT is whole, and not to be taken for lost."""
    try:
        return make()
    except OSError as e:
        log.warning("%s is written, but its figure could not be: %s", out, e.strerror or e)
        return None


def _check_out(path, overwrite, *, result: bool = True, inputs=()):
    """OUT checked before any work: not there (or ``--overwrite``); a result is an OME-Zarr directory,
    so a name of another format, or an existing plain file in its place, is refused. Nothing replaces
    a directory that is not a zarr store, nor an input (``inputs``) or a folder holding one."""
    from .io import _is_replaceable, _link_target, check_result_name, is_working_folder, output_lock, restore_moved_aside

    if not str(path):  # (Path("") is ".", which would be judged as the current folder or the input)
        raise ValueError("the output path is empty; name a new file or folder for the output")
    path = Path(path)
    for src in inputs:
        if not str(src):
            raise ValueError("an input path is empty; give the file or folder to read")
        src = Path(src).resolve()
        if path.resolve() == src or path.resolve() in src.parents:
            raise ValueError(f"{path} is the input {src} (or holds it); write the output under another name")
        if src.is_dir() and src in path.resolve().parents:  # e.g. into an OME-Zarr store being read
            raise ValueError(f"{path} is inside the input {src}; write the output elsewhere")
    if is_working_folder(path):
        raise ValueError(f"{path} is the current folder (or holds it); name a new file or folder for the output")
    target = _link_target(path)  # where it is written: beside what a link names
    under = _nearest(target.parent)  # the folder it would be made in
    if under is not None and not under.is_dir():
        raise NotADirectoryError(f"{path}: {under} is a file, not a folder; choose another place for the output")
    _refuse_unwritable(under, str(path))  # the output, its lock and temporaries
    if result and target.parent.is_dir():
        with output_lock(target):  # a write killed while replacing OUT: its old result back before OUT is judged
            restore_moved_aside(target)
    if result:
        check_result_name(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a result; remove it or choose another name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.is_dir() and not _is_replaceable(path):
        raise FileExistsError(f"{path} is a directory that is not an lsfov result or zarr store; refusing to "
                              "replace it: choose another name")
    return path


def _check_file_out(path, overwrite, made, what: str, inputs=()):
    """A file output (a figure, a calibration, a model) checked as :func:`_check_out` does; with
    --overwrite an existing file is replaced only if ``made(path)`` says lsfov made it (``what``)."""
    path = _check_out(path, overwrite, result=False, inputs=inputs)
    if overwrite and path.is_file() and not made(path):
        raise FileExistsError(f"{path} is not {what}, and --overwrite replaces only such a file: choose another name")
    return path


def _is_calibration(path) -> bool:
    import json

    from .estimate.depth import _TYPE

    try:
        return json.loads(Path(path).read_text()).get("type") == _TYPE
    except Exception:
        return False


def _is_model(path) -> bool:
    """An lsfov model file (.pt; also one damaged, or a training checkpoint) or its metadata (.json:
    a model's record)."""
    import json

    path = Path(path)
    if path.suffix == ".json":
        try:
            meta = json.loads(path.read_text())
            return isinstance(meta, dict) and {"psf_model", "arch", "params"} <= set(meta)
        except Exception:
            return False
    from .estimate.model import PSFRegressor

    try:
        PSFRegressor.from_file(path, device="cpu")
    except ValueError as e:  # (one lsfov wrote, damaged or of another network, is its to replace)
        return "not an lsfov model file" not in str(e)
    return True


def _not_an_input_named_as_out(out, command: str, kinds, inputs=()):
    """Refuse, even with --overwrite, an existing OUT that holds what the command does not write (a
    bead image where a list of them ends: OUT forgotten, and --overwrite would replace an input).
    An OUT that is one of ``inputs`` is left to :func:`_check_out`, which says so."""
    from .io import _group_attrs

    path = Path(out)
    if not path.is_dir() or not any(path.iterdir()):
        return
    if any(path.resolve() == Path(p).resolve() or path.resolve() in Path(p).resolve().parents for p in inputs):
        return
    meta = _group_attrs(path).get("lsfov")
    if not (isinstance(meta, dict) and meta.get("type") in kinds):
        raise ValueError(f"{out} exists and is not what lsfov {command} writes (an image?): did you forget OUT? "
                         f"Give it last, under a new name (a wrong guess here would replace an input)")


def _check_figure(figure, overwrite, out, inputs=()):
    """A figure path checked before any work, as an output, and neither OUT nor a directory."""
    from .figures import made_by_lsfov

    fig = _check_file_out(figure, overwrite, made_by_lsfov, "a figure lsfov made", inputs=inputs)
    if fig.resolve() == Path(out).resolve():
        raise ValueError(f"--figure {fig} is the result OUT too; name the figure e.g. {fig.with_suffix('.png').name}")
    if Path(out).resolve() in fig.resolve().parents:  # (replaced with OUT by an --overwrite, unseen by viewers)
        raise ValueError(f"--figure {fig} is inside the result OUT; write it beside OUT, e.g. "
                         f"{Path(out).with_suffix('.png')}")
    if fig.is_dir():
        raise ValueError(f"--figure {fig} is a directory; name a PNG file")
    return _check_png(fig)


def _check_preview(out, overwrite):
    """The PNG preview written beside OUT (OUT.png), checked before any work as --figure is; with
    --overwrite, an existing one is replaced only with OUT (whose preview it is) or if lsfov made it."""
    from .figures import made_by_lsfov

    # What --overwrite would not replace is said first: "pass --overwrite" would only lead to this.
    fig = Path(out).with_suffix(".png")
    if fig.is_dir():
        raise ValueError(f"{fig}, where the preview of OUT goes, is a directory; move it, or name OUT otherwise")
    if fig.exists() and not Path(out).exists() and not made_by_lsfov(fig):
        raise FileExistsError(f"{fig}, where the preview of OUT goes, is a file lsfov did not make; move it, or name "
                              "OUT otherwise")
    return _check_out(fig, overwrite, result=False)


def _warn_not_held_out(what, attrs):
    """A test set synthesized from the training images scores what the model has seen."""
    from ._validate import LsfovWarning

    if attrs.get("split") != "test":
        warnings.warn(f"{what} is made from the training images (split {attrs.get('split')!r}): its R² is not a "
                      "held-out score; synthesize one with --split test", LsfovWarning, stacklevel=2)


def _check_png(fig):
    """Figures are PNG (or PDF, SVG) files: another name (``.tif``) would replace an image with a
    picture of it."""
    fig = Path(fig)
    if fig.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--figure {fig}: figures are PNG, PDF or SVG files; name it {fig.with_suffix('.png').name}")
    return fig


def _check_chunks(chunks):
    if chunks < 16:
        raise ValueError(f"--chunks {chunks} is too small; use at least 16 pixels (typically 1024-4096)")


def _check_iterations(iterations):
    if iterations < 1:
        raise ValueError(f"--iterations {iterations}: give a positive number of iterations")


def _check_background(background):
    if background < 0:
        raise ValueError(f"--background {background:g}: give the camera's offset, 0 or more counts (the mean of a "
                         "frame taken with the shutter closed; 0: none)")


def _check_tv(tv):
    if not 0 <= tv < 0.25:
        raise ValueError(f"--tv {tv} must be in [0, 0.25) (0 gives plain Richardson-Lucy)")


def _check_pixel_um(pixel_um):
    if pixel_um is not None and not (np.isfinite(pixel_um) and pixel_um > 0):
        raise ValueError(f"--pixel-um {pixel_um} must be a pixel size in µm > 0")
    if pixel_um is not None and not 1e-4 <= pixel_um <= 1e4:  # (1e-300 made coordinates of denormal steps)
        raise ValueError(f"--pixel-um {pixel_um:g} is no microscope's pixel size in µm; give one between 0.0001 and "
                         "10000")


def _say_unknown_pixel(src, img, pixel_um, model):
    """The CNN reads patches at its training's pixel size: where neither the file nor --pixel-um
    says the image's, the user is told what was assumed (a mismatch is warned about where known)."""
    from .estimate.model import load_model
    from .io import pixel_size

    optics = load_model(model).optics
    if pixel_um is None and pixel_size(img) is None and optics is not None:
        log.warning("%s records no pixel size: read as if at the model's %g µm (its training optics), the map's nodes "
                    "in pixels; give --pixel-um to have both checked and the map in µm", src, optics.pixel_um)


# ---------------------------------------------------------------------------------------------- info


@main.command()
@click.argument("path", type=click.Path())
def info(path):
    """Describe an image (OME-Zarr, TIFF, .npy), an lsfov result, an operator or subspace of
    operators, a training set, a CNN model (.pt or a shipped name), a training run's checkpoints or a depth
    calibration (.json)."""
    from .io import describe
    from .psf import MODELS

    suffix = Path(path).suffix.lower()
    if suffix == ".json" and Path(path).with_suffix(".pt").is_file():  # a model's metadata: the model it describes
        path, suffix = str(Path(path).with_suffix(".pt")), ".pt"
    if suffix == ".json":
        from .estimate.depth import DepthCalibration

        cal = DepthCalibration.load(path)
        click.echo(f"{path}: depth calibration from {cal.n_nodes} nodes: {_describe_calibration(cal)}; fit R² "
                   f"{cal.r2:.3f}, MAE {cal.mae_um:.3g} µm; smoothing σ {cal.smooth:g} nodes"
                   + (" (robust)" if cal.robust and cal.smooth else ""))
    elif suffix == ".pt" or (not suffix and path.upper() in MODELS):
        from .estimate.model import load_model

        m = load_model(path)
        test = m.meta.get("test", {})
        r2 = ", ".join(f"{p} {v:.3f}" for p, v in test.get("r2", {}).items())
        click.echo(f"{path}: {m!r}\n  ranges: {dict(m.ranges)}; optics: {m.optics}\n"
                   + (f"  test set ({test.get('n', '?')} patches): R² {r2}" if r2 else
                      "  test set: not measured (lsfov evaluate)")
                   + _training_summary(m.meta.get("training") or {}))
    elif Path(path).is_dir() and (Path(path) / "last.pt").is_file():  # a training run's checkpoints
        import torch

        st = torch.load(Path(path) / "last.pt", map_location="cpu", weights_only=True)
        meta, best = st.get("meta") or {}, st.get("best_val") or {}
        from .estimate.training import finished

        # An ended run is not offered to --resume, which refuses it: more training starts from its model.
        what = ("the run has ended (all its epochs, or stopped early); `lsfov train DATA NEW.pt --init OUT.pt` trains "
                "its model further" if finished(path) else "`lsfov train DATA OUT.pt --resume` continues it"
                + ("" if Path(path).suffix == ".ckpt" else f" (with --checkpoint {path})"))
        click.echo(f"{path}: checkpoints of a {meta.get('psf_model')} ({meta.get('arch')}) training run: epoch "
                   f"{st.get('epoch', -1) + 1} of {st.get('scheduler', {}).get('T_max', '?')}, best validation R² "
                   f"{best.get('val_r2', float('nan')):.4f}; {what}")
    else:
        click.echo(describe(path))


def _training_summary(t: dict) -> str:
    """A model's training in one line: its last stage, and how many stages it had."""
    if not t.get("n_train"):
        return ""
    stages, init = 1, t.get("init")
    while isinstance(init, dict):
        stages, init = stages + 1, init.get("init")
    val = t.get("best_val_r2")
    return (f"\n  training: {t['n_train']} patches x {t.get('epochs_run', '?')} epoch(s)"
            + (f", validation R² {val:.3f}" if isinstance(val, (int, float)) else "")
            + (f", {t['seconds'] / 60:.1f} min on {t.get('device', '?')}" if t.get("seconds") else "")
            + (f" (the last of {stages} stages)" if stages > 1 else ""))


def _check_map_source(psf_map, map_path, src, img):
    """Say when a PSF map was read from another image, or another plane of this one: right only if
    both share the microscope's blur (maps record their source, :func:`_source`)."""
    from .io import plane_of

    made, made_plane = psf_map.attrs.get("source"), psf_map.attrs.get("plane") or None
    plane = plane_of(img).get("plane") or None
    if psf_map.attrs.get("ground_truth"):  # `lsfov simulate blur`'s true blur: of the image beside it
        made, made_plane = Path(map_path) / "blurred", None  # (its source is the sharp image)
        if Path(src).resolve() == Path(map_path).resolve():  # (read as its image, blurred)
            return
    # The variable read: r.zarr names r.zarr/blurred (maps made before 2026-12-07 recorded r.zarr)
    read = Path(str(getattr(img, "attrs", {}).get("source") or src)).resolve()
    if made is None or (Path(str(made)).resolve() in (Path(str(src)).resolve(), read, read.parent)
                        and made_plane == plane):
        return

    def where(path, p):
        return f"{path}" + (f" (plane {p})" if p else "")

    log.warning("the PSF map %s was read from %s, not from %s: right only if both share the blur", map_path,
                where(made, made_plane), where(src, plane))


def _source(src, img) -> dict:
    """A result's provenance: its input (an absolute path: a later command, run from elsewhere, checks
    it) and, for a plane of a larger image, which one (index per axis, and its z in µm or its time
    where the file says)."""
    from .io import plane_of

    # (the variable read: `lsfov estimate r.zarr` reads r.zarr/blurred, as `deconvolve r.zarr/blurred` names it)
    return {"source": str(Path(getattr(img, "attrs", {}).get("source") or src).resolve()), **plane_of(img)}


# ---------------------------------------------------------------------------------------------- simulate


@main.group(cls=_Group)
def simulate():
    """Make test data with ground truth."""


@simulate.command("beads")
@click.argument("out", type=click.Path())
@click.option("--size", type=click.IntRange(min=1), default=512, show_default=True, help="Image edge in pixels.")
@click.option("--n-beads", type=click.IntRange(min=1), default=None,
              help="Number of beads (default: one per 48² pixels).")
@click.option("--grid", type=click.IntRange(min=1), default=8, show_default=True,
              help="Nodes per axis of the true grid operator.")
@click.option("--pixel-um", type=_Finite(min=0, min_open=True), default=0.1, show_default=True,
              help="Pixel size in µm.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_overwrite_option
@click.pass_obj
def simulate_beads(obj, out, size, n_beads, grid, pixel_um, seed, overwrite):
    """A micro-bead image through an astigmatic, space-varying microscope (paper 003 III-A)."""
    import xarray as xr

    from . import io, simulate as sim

    _check_pixel_um(pixel_um)
    out = _check_out(out, overwrite)
    b = sim.bead_field((size, size), n_beads, seed=seed, grid=grid, pixel_um=pixel_um)
    px = b.optics.pixel_um
    image = io.with_pixel_size(b.image.astype(np.float32), px).assign_attrs(units="photon")
    cy, cx = b.operator.centers
    depth = xr.DataArray(
        b.depth_um.astype(np.float32), dims=("gy", "gx"),
        # (a node's cell: the image over the nodes; a 1x1 grid was once saved at 1 µm, a dot in napari)
        coords={"gy": _um("gy", cy * px, size * px / len(cy)), "gx": _um("gx", cx * px, size * px / len(cx))},
        attrs={"units": "micrometer"},
    )
    ds = xr.Dataset({"image": image, "clean": image.copy(data=b.clean.astype(np.float32)), "depth": depth},
                    attrs={"command": "lsfov simulate beads", "optics": b.optics.to_dict(), "seed": seed,
                           "grid": len(cy),  # clipped to the image size, as made
                           "n_beads": len(b.positions), "positions": b.positions.tolist()})
    io.save(ds, out, overwrite=overwrite)
    click.echo(f"wrote {out}: {size}x{size} beads ({len(b.positions)}), NA {b.optics.na:.2f}, "
               f"λ {b.optics.wavelength_um * 1000:.0f} nm, depth {b.depth_um.min():+.2f}..{b.depth_um.max():+.2f} µm")


@simulate.command("blur")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", default="Z3", show_default=True, help="PSF model: G1, G2, Z1, Z2, Z3.")
@click.option("--grid", type=click.IntRange(min=1), default=4, show_default=True, help="PSF nodes per axis.")
@click.option("--photons", type=_Finite(min=0, min_open=True), default=1000.0, show_default=True,
              help="Photons at the brightest pixel.")
@click.option("--read-noise", type=_Finite(min=0), default=2.0, show_default=True,
              help="Gaussian read noise (photons).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@_plane_options
@_overwrite_option
def simulate_blur(src, out, model, grid, photons, read_noise, seed, channel, zplane, tpoint, series, overwrite):
    """Blur a sharp image with a random smooth PSF field plus Poisson-Gaussian noise.

    A pupil model's PSFs are those of its microscope (NA, wavelength, pixel size): the result is
    labelled with that pixel size, so that `lsfov estimate` reads it at the scale it was made."""
    from . import io, simulate as sim
    from ._validate import LsfovWarning
    from .psf import get_model

    out = _check_out(out, overwrite, inputs=[src])
    img = io.open_image(src, channel=channel, z=zplane, t=tpoint, series=series)
    optics = get_model(model).optics
    if optics is not None:
        sizes = [_axis_um(img, d) for d in ("y", "x")]
        if any(px and abs(px / optics.pixel_um - 1) > 0.01 for px in sizes):
            has = f"{sizes[0]:g} µm pixels" if sizes[0] == sizes[1] else \
                " x ".join(f"{px:g}" if px else "?" for px in sizes) + " µm (y x) pixels"
            warnings.warn(f"{src} has {has} but {model.upper()}'s PSFs are those of {optics.pixel_um:g} µm "
                          f"pixels: the blurred image is labelled {optics.pixel_um:g} µm, as that microscope would "
                          "see it", LsfovWarning, stacklevel=1)
        img = io.with_pixel_size(img, optics.pixel_um)
    op, params = sim.psf_field(img.shape, model, (grid, grid), seed=seed)
    blurred = sim.degrade(img.values, op, photons=photons, read_noise=read_noise, seed=seed)
    ds = _params_dataset(params, op, img, model)
    ds["blurred"] = img.copy(data=blurred)
    ds.attrs.update(command="lsfov simulate blur", **_source(src, img), model=model, grid=grid, photons=photons,
                    read_noise=read_noise, seed=seed)
    io.save(ds, out, overwrite=overwrite)
    click.echo(f"wrote {out}: {img.shape[0]}x{img.shape[1]} blurred with a {grid}x{grid} {model} PSF field")


# ---------------------------------------------------------------------------------------------- deconvolve


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--operator", "operator_path", type=click.Path(), help="Blur operator saved by lsfov (a zarr store).")
@click.option("--psf", "psf_path", type=click.Path(),
              help="One measured PSF instead (TIFF or .npy, odd size, peak at the centre).")
@click.option("--psf-map", "map_path", type=click.Path(), help="Or a PSF map written by `lsfov estimate`.")
@click.option("--iterations", default=20, show_default=True, help="Richardson-Lucy iterations.")
@click.option("--tv", default=DEFAULT_TV, show_default=True, help="TV weight in [0, 0.25); 0 gives plain RL.")
@click.option("--chunks", default=2048, show_default=True, help="Chunk edge (pixels) of the halo exchange.")
@click.option("--exchange-every", type=click.IntRange(min=1), default=None, help="Iterations between halo exchanges (default: cost model).")
@_scratch_option
@click.option("--pixel-um", type=float, default=None, help="Pixel size in µm (default: from the file).")
@click.option("--saturation", type=_Finite(min=0, min_open=True), default=None,
              help="Pixel value at which the camera saturates; such pixels count as at least that [default: the "
                   "largest count of an integer image's type, or of an OME-TIFF's SignificantBits; a value above "
                   "every pixel turns this off].")
@_background_option
@_plane_options
@_scheduler_option
@_gpu_option
@_resume_option
@_overwrite_option
@click.pass_obj
def deconvolve(obj, src, out, operator_path, psf_path, map_path, iterations, tv, chunks, exchange_every, scratch,
               pixel_um, saturation, background, channel, zplane, tpoint, series, scheduler, gpu, resume, overwrite):
    """Deblur SRC with TV-regularised Richardson-Lucy into the OME-Zarr result OUT (variable
    ``deblurred``), chunk by chunk with an exact halo exchange; memory stays at a few chunks."""
    import xarray as xr

    from . import io
    from .cluster import use_scheduler
    from .operators import ProductConvolution
    from .restore import deconvolve as run

    out = _check_out(out, overwrite, inputs=[src, *(p for p in (operator_path, psf_path, map_path) if p)])
    _check_preview(out, overwrite)
    if sum(p is not None for p in (operator_path, psf_path, map_path)) != 1:
        raise ValueError("give the blur with exactly one of --operator OP (saved by lsfov), --psf FILE or "
                         "--psf-map MAP (from lsfov estimate)")
    _check_chunks(chunks)
    _check_pixel_um(pixel_um)
    _check_iterations(iterations)
    _check_tv(tv)
    _check_background(background)
    _gpu_ready(gpu, scheduler)  # (said before the input is read)
    img = _open_input(src, channel, zplane, tpoint, series, chunks, pixel_um)
    if map_path:
        from .estimate.mapping import operator_from_psf_map

        psf_map = _open_psf_map(map_path, "--psf-map")
        # Refused before the run's state is made (another image's map, another model), on one node:
        # its whole grid is rendered into that state below.
        op = operator_from_psf_map(psf_map.isel(gy=slice(0, 1), gx=slice(0, 1)), img.shape)
        _check_map_source(psf_map, map_path, src, img)
        if saturation is None and "saturation" in psf_map.attrs:  # the map's camera level, as lsfov run takes it
            saturation = psf_map.attrs["saturation"] if psf_map.attrs["saturation"] is not None else False
    else:
        op = ProductConvolution.load(operator_path) if operator_path else _psf_operator(psf_path, img.shape, channel)
    if op.shape != img.shape:
        raise ValueError(f"the operator is for {op.shape[0]}x{op.shape[1]} images but {src} is "
                         f"{img.shape[0]}x{img.shape[1]}; build the operator for this image")
    t0, w0 = _clock()
    work = _on_gpu(img, gpu, scheduler)
    clip, saturation = _clip(img, work, None if saturation is False else saturation, off=saturation is False)
    with _run_state(out, scratch, resume) as tmp, use_scheduler(scheduler):  # refused before a cluster starts
        if map_path:  # rendered into the run's state: a slide's map holds gigabytes of kernels
            op = operator_from_psf_map(psf_map, img.shape, store=tmp / "kernels")
        log.info("deconvolving %s (%dx%d) with %r: %d iterations, tv %g", src, *img.shape, op, iterations, tv)
        before = _marks_kept(tmp)
        result = run(work, op, iterations, tv, saturation=clip, background=background, exchange_every=exchange_every,
                     scratch=tmp, resume=resume, progress=not obj["quiet"])
        resumed = _resumed(before, _marks_kept(tmp))
        ds = xr.Dataset({"deblurred": result}, attrs={
            "command": "lsfov deconvolve", **_source(src, img),
            "operator": str(Path(operator_path or psf_path or map_path).resolve()),
            "iterations": iterations, "tv": tv, "eps": DEFAULT_EPS, "saturation": saturation, "background": background,
        })
        io.save(ds, out, overwrite=overwrite, progress=not obj["quiet"])
    seconds, waited = _working(t0, w0)
    from .figures import summary_figure

    fig = _picture(out, lambda: summary_figure(out.with_suffix(".png"), _centres(
        {"raw": img, "deblurred": io.open_result(out)["deblurred"]}, ("raw", "deblurred")), title="lsfov deconvolve"))
    mpix = img.size / 1e6
    rate = (f"{seconds:.1f} s to finish an interrupted run" if resumed else
            f"{iterations} iterations in {seconds:.1f} s ({mpix * iterations / seconds:.1f} Mpixel·iterations/s)")
    rate += waited
    click.echo(f"wrote {out}: {img.shape[0]}x{img.shape[1]}, {rate}; " + (f"preview {fig}" if fig else "no preview"))


def _psf_operator(path, shape, channel=None):
    """A one-node operator from a measured PSF file (:meth:`ProductConvolution.from_psf`); of a
    multi-channel PSF, the image's ``channel``."""
    from . import io
    from .operators import ProductConvolution

    try:
        whole = io._open_any(Path(path).resolve(), 0)
    except io.SeveralImages as e:  # --series picks IN's image, not the PSF's
        raise ValueError(f"{path}: a PSF file of {e.n} images; save the PSF you mean as a file of its own") from None
    except ValueError:
        try:
            a_map = "stride" in io.open_result(path).attrs
        except Exception:
            a_map = False
        if a_map:
            raise ValueError(f"--psf {path} is a PSF map (of lsfov estimate or run): give it with --psf-map") from None
        raise
    several = "c" in whole.dims and whole.sizes["c"] > 1
    if several and channel is None:
        raise ValueError(f"{path}: a PSF of {whole.sizes['c']} channels (or a z-stack that tifffile stored as an RGB "
                         "image: write it with photometric='minisblack'); --channel picks the same channel of IN and of "
                         "the PSF; for a one-channel IN, save the PSF's channel as a file of its own")
    planes = list(io.open_planes(path, channel=channel if several else None))
    # A 3-D PSF (a z-stack of a bead): its in-focus plane, the one with the highest peak, deblurs the
    # plane of a sample that is in focus (a plane with no finite pixel is never it).
    peaks = [np.asarray(p.values, dtype=np.float32) for p in planes]
    best = int(np.argmax([np.nanmax(p) if np.isfinite(p).any() else -np.inf for p in peaks]))
    if len(planes) > 1:
        log.info("%s: a PSF of %d planes; using plane %d, the one with the highest peak", path, len(planes), best)
    try:  # its pixel size recorded: a PSF measured at other pixels than IN's is the wrong size (warned)
        return ProductConvolution.from_psf(planes[best], shape, attrs={"psf_file": str(path)})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _open_input(src, channel, zplane, tpoint, series, chunks, pixel_um):
    """The plane of SRC to work on, at ``--pixel-um`` where given (else the file's scale, which may be
    non-square: a measured PSF or an operator of its own beads needs no µm)."""
    from . import io

    img = io.open_image(src, channel=channel, z=zplane, t=tpoint, chunks=chunks, series=series)
    return img if pixel_um is None else io.with_pixel_size(img, pixel_um)


def _clock():
    """A run's start: its time, and the seconds waited for Dask workers so far (:func:`_working`)."""
    from .cluster import waited_for_workers

    return time.perf_counter(), waited_for_workers()


def _working(t0: float, w0: float) -> tuple[float, str]:
    """Seconds since a run's start (:func:`_clock`) less those it waited with no Dask worker connected
    (batch jobs in the queue), and what to say of that wait: a rate counts the work, not the queue."""
    from .cluster import waited_for_workers

    waited = waited_for_workers() - w0
    seconds = time.perf_counter() - t0
    return max(seconds - waited, 1e-3), (f", after {waited:.0f} s waiting for Dask workers" if waited >= 1 else "")


def _resumed(before: dict, after: dict) -> bool:
    """Whether a run continued work of its own, by its state's folders before and after it
    (:func:`_chunks_kept`, :func:`_marks_kept`): a rate would count that work too. Its folder changed
    and was there before, or none changed (all was done); another run's (other options: this one
    started over) does not count. Without --resume the state was emptied first."""
    changed = [k for k in after if after[k] != before.get(k)]
    return bool(before) and (not changed or any(k in before for k in changed))


def _chunks_kept(state: Path) -> dict:
    """PSF-map chunks kept in a run's state, by run (``lsfov.estimate_psf_map(scratch=)``'s folders)."""
    return {d.name: n for d in state.glob("lsfov-psfmap-*") if (n := len(list(d.glob("*.npy"))))}


def _marks_kept(state: Path) -> dict:
    """The iterations' marks kept in a run's state, by run (:mod:`lsfov.restore.scratch`'s folders)."""
    return {d.name: marks for d in state.glob("lsfov-*")
            if (marks := frozenset(str(p.relative_to(d)) for p in d.glob("done/x*"))
                | frozenset(str(p.relative_to(d)) for p in d.glob("done/x*.blocks/*")))}


def _overview(src, img, edge=1024, **plane):
    """The whole of ``img`` (SRC's plane ``plane``) at about ``edge`` pixels across, for a figure: from
    the coarsest pyramid level of the file still that large, where it has levels (a strided slice of
    the full resolution would read every one of its chunks again)."""
    from . import io

    best = img
    for level in itertools.count(1):
        if max(best.shape) < 2 * edge:
            break
        try:
            lower = io.open_image(src, level=level, **plane)
        except ValueError:  # no such level
            break
        if max(lower.shape) < edge:
            break
        best = lower
    step = max(1, max(best.shape) // edge)
    return np.asarray(best.data[::step, ::step])


def _centres(variables, names, edge=512):
    """Figure panels: the central ``edge``² of each variable (a whole large field would be too fine to see)."""
    h, w = variables[names[0]].shape
    crop = (slice(max(0, h // 2 - edge // 2), h // 2 + edge // 2), slice(max(0, w // 2 - edge // 2), w // 2 + edge // 2))
    # (DataArrays, computed: their coordinates give the figure its pixels' aspect)
    return {f"{name} (centre)": variables[name][crop].compute() for name in names}


# ---------------------------------------------------------------------------------------------- estimate


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", default="Z3", show_default=True, help="Shipped model (G1, G2, Z1, Z3) or a .pt file.")
@click.option("--stride", type=click.IntRange(min=1), default=64, show_default=True, help="Node spacing in pixels.")
@click.option("--pixel-um", type=float, default=None, help="Pixel size in µm (default: from the file).")
@click.option("--chunks", default=2048, show_default=True, help="Chunk edge (pixels): one task per chunk.")
@click.option("--figure", type=click.Path(), default=None,
              help="Write a figure of the PSF map (.png, .pdf or .svg).")
@_symmetrize_option
@_saturation_options
@_plane_options
@_scheduler_option
@_gpu_option
@_scratch_option
@_resume_option
@_overwrite_option
@click.pass_obj
def estimate(obj, src, out, model, stride, pixel_um, chunks, figure, symmetrize, saturation, max_saturated, channel,
             zplane, tpoint, series, scheduler, gpu, scratch, resume, overwrite):
    """Map the PSF across SRC with the CNN (paper 000): one node every STRIDE pixels, written as an
    OME-Zarr result (one variable per parameter, plus validity and filled); deblur with it through
    `lsfov deconvolve SRC OUT --psf-map MAP`."""
    from . import io
    from .cluster import use_scheduler
    from .estimate.mapping import estimate_psf_map

    out = _check_out(out, overwrite, inputs=[src])
    if figure:
        _check_figure(figure, overwrite, out, inputs=[src])
    _check_chunks(chunks)
    _check_pixel_um(pixel_um)
    _gpu_ready(gpu, scheduler)  # (said before the input is read)
    img = io.open_image(src, channel=channel, z=zplane, t=tpoint, chunks=chunks, series=series)
    _say_unknown_pixel(src, img, pixel_um, model)
    t0, w0 = _clock()
    work = _on_gpu(img, gpu, scheduler)
    # --max-saturated 1 (an image stretched to its type's range): no level unless --saturation gives one
    saturation, _ = _clip(img, work, saturation, off=max_saturated is not None and max_saturated >= 1)
    with _run_state(out, scratch, resume) as state, use_scheduler(scheduler):  # refused before a cluster starts
        before = _chunks_kept(state)
        ds = estimate_psf_map(work, model, stride=stride, pixel_um=pixel_um, symmetrize=symmetrize,
                              saturation=saturation, max_saturated=max_saturated, scratch=state, resume=resume,
                              progress=not obj["quiet"])
        resumed = _resumed(before, _chunks_kept(state))
        seconds, waited = _working(t0, w0)
        ds.attrs.update(command="lsfov estimate", **_source(src, img))
        io.save(ds, out, overwrite=overwrite)
    n = ds.sizes["gy"] * ds.sizes["gx"]
    click.echo(f"wrote {out}: {ds.sizes['gy']}x{ds.sizes['gx']} nodes of {ds.attrs['psf_model']} "
               f"({int(ds['filled'].sum())} filled from neighbours), "
               + (f"{seconds:.1f} s to finish an interrupted run" if resumed else f"{n / seconds:.0f} patches/s")
               + waited)
    if figure:
        from .figures import map_mosaic, summary_figure

        panels = {"image": _overview(src, img, channel=channel, z=zplane, t=tpoint, series=series),
                  "PSF grid": map_mosaic(ds),
                  "validity": ds["validity"].values}
        quantities = {"validity": (0.0, 1.0)}
        for p in ds.attrs["params"][:2]:
            name = f"{p} ({ds[p].attrs.get('units', '')})"
            panels[name], quantities[name] = ds[p].values, None
        if _picture(out, lambda: summary_figure(figure, panels, title=f"lsfov estimate: {ds.attrs['psf_model']} PSF map",
                                                quantities=quantities)):
            click.echo(f"figure: {figure}")


@main.command("run")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", default="Z3", show_default=True, help="Shipped model (G1, G2, Z1, Z3) or a .pt file.")
@click.option("--stride", type=click.IntRange(min=1), default=64, show_default=True, help="PSF-map node spacing in pixels.")
@click.option("--iterations", default=20, show_default=True, help="Richardson-Lucy iterations.")
@click.option("--tv", default=DEFAULT_TV, show_default=True, help="TV weight in [0, 0.25); 0 gives plain RL.")
@click.option("--calibration", type=click.Path(), default=None, help="Depth calibration JSON (`lsfov depth --known`).")
@click.option("--pixel-um", type=float, default=None, help="Pixel size in µm (default: from the file).")
@click.option("--chunks", default=2048, show_default=True, help="Chunk edge (pixels).")
@click.option("--figure", type=click.Path(), default=None,
              help="A summary figure (.png, .pdf or .svg): raw, deblurred, PSF grid, depth.")
@_symmetrize_option
@_saturation_options
@_background_option
@_plane_options
@_scheduler_option
@_gpu_option
@_scratch_option
@_resume_option
@_overwrite_option
@click.pass_obj
def run_pipeline(obj, src, out, model, stride, iterations, tv, calibration, pixel_um, chunks, figure, symmetrize,
                 saturation, max_saturated, background, channel, zplane, tpoint, series, scheduler, gpu, scratch, resume,
                 overwrite):
    """The whole blind job on SRC: PSF map -> operator -> deconvolution -> depth, in one OME-Zarr
    result OUT (raw, deblurred, the map's parameters, validity, filled, depth; `lsfov.open_result`
    reads it as one xarray.Dataset, napari opens each variable at its scale)."""
    from . import io
    from .cluster import use_scheduler
    from .estimate.depth import DepthCalibration
    from .estimate.model import load_model

    out = _check_out(out, overwrite, inputs=[src, *([calibration] if calibration else [])])
    if figure:
        _check_figure(figure, overwrite, out, inputs=[src, *([calibration] if calibration else [])])
    _check_chunks(chunks)
    _check_pixel_um(pixel_um)
    _check_iterations(iterations)
    _check_tv(tv)
    _check_background(background)
    cal = DepthCalibration.load(calibration) if calibration else None
    params = load_model(model).params  # a wrong name or file is refused here, before any work
    if cal is not None and not {"focus", "axis"} <= set(params):
        raise ValueError(f"--calibration needs an astigmatic model (Z3) for depth; --model {model} has {list(params)}")
    _gpu_ready(gpu, scheduler)  # (said before the input is read)
    img = io.open_image(src, channel=channel, z=zplane, t=tpoint, chunks=chunks, series=series)
    img = io.with_pixel_size(img, pixel_um)  # every variable in µm, so that viewers overlay the map on the image
    _say_unknown_pixel(src, img, pixel_um, model)
    work = _on_gpu(img, gpu, scheduler)
    # --max-saturated 1 (an image stretched to its type's range): no clip unless --saturation gives one
    saturation, _ = _clip(img, work, saturation, off=max_saturated is not None and max_saturated >= 1)
    t0, w0 = _clock()
    with _run_state(out, scratch, resume) as tmp, use_scheduler(scheduler):  # refused before a cluster starts
        ds, stages = _blind(img, work, model, stride=stride, iterations=iterations, tv=tv, calibration=cal,
                            symmetrize=symmetrize, saturation=saturation, max_saturated=max_saturated,
                            background=background, scratch=tmp, resume=resume, progress=not obj["quiet"])
        ds.attrs.update(command="lsfov run", **_source(src, img),
                        **({"calibration": str(Path(calibration).resolve())} if cal else {}))
        t = time.perf_counter()
        io.save(ds, out, overwrite=overwrite, progress=not obj["quiet"])
        stages["deconvolution + writing"] = stages.pop("deconvolution") + time.perf_counter() - t
    waited = _working(t0, w0)[1]
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
               + (f"{waited} (within those stages)" if waited else ""))
    if figure:
        from .figures import map_mosaic, summary_figure

        res = io.open_result(out)
        panels = {**_centres(res, ("raw", "deblurred")), "PSF grid": map_mosaic(res)}
        quantities = {}
        if "depth" in res:
            calibrated = res["depth"].attrs.get("units") == "micrometer"
            name = "depth (µm)" if calibrated else "signed defocus (waves; no calibration)"
            panels[name], quantities[name] = res["depth"].values, None
        if not _picture(out, lambda: summary_figure(figure, panels, title=f"lsfov run: {src}", quantities=quantities)):
            return
        click.echo(f"figure: {figure}")


def _blind(img, work, model, **kw):
    """:func:`lsfov.blind_deconvolve` of ``work`` (``img``, or it on the GPU), with ``img`` as the result's
    ``raw``; and the seconds each stage took."""
    import xarray as xr

    from .estimate.blind import blind_deconvolve

    ds = blind_deconvolve(work, model, **kw)
    stages = ds.attrs.pop("seconds")
    return xr.Dataset({"raw": img, **ds.data_vars}, attrs=ds.attrs), stages


@main.command(short_help="Depth from astigmatism of a Z3 PSF map (paper 000 Sec. II-H).")
@click.argument("psf_map", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--calibration", type=click.Path(), default=None, help="JSON written by `lsfov depth --known`.")
@click.option("--known", type=click.Path(), default=None,
              help="Fit a calibration instead: the true depth in µm (.npy/TIFF, node grid or full image); "
                   "OUT is then the calibration JSON.")
@click.option("--smooth", type=_Finite(min=0), default=None,
              help="σ in nodes of the local-plane smoothing of the depth, robust to outlying nodes [with --known: "
                   "0, stored in the calibration; otherwise the calibration's].")
@click.option("--method", type=click.Choice(["curve", "linear"]), default=None,
              help="With --known: calibration curves of the CNN's readings, or paper 000's line of the signed defocus "
                   "[default: curve].")
@_overwrite_option
def depth(psf_map, out, calibration, known, smooth, method, overwrite):
    """Depth from astigmatism (paper 000 Sec. II-H) of a Z3 PSF map: µm with a calibration, otherwise
    the uncalibrated signed defocus in waves (Eq. 14)."""
    import xarray as xr

    from . import io
    from .estimate.depth import DepthCalibration, calibrate_depth, estimate_depth

    if known and calibration:
        raise ValueError("--known fits a new calibration and --calibration uses one: give one of them")
    if method and not known:
        raise ValueError(f"--method {method} chooses how --known fits a calibration (one records its own method); "
                         "add --known DEPTH, or leave --method out")
    method = method or "curve"

    if known and Path(out).suffix.lower() != ".json":  # a calibration in place of an image or a store: refused
        raise ValueError(f"{out}: a depth calibration is a JSON file; name it {Path(out).with_suffix('.json').name}")
    inputs = [psf_map, *(p for p in (calibration, known) if p)]
    out = (_check_file_out(out, overwrite, _is_calibration, "a depth calibration", inputs=inputs) if known
           else _check_out(out, overwrite, inputs=inputs))
    cal = DepthCalibration.load(calibration) if calibration else None
    ds = _open_psf_map(psf_map, "PSF_MAP", checked=False)  # estimate_depth says what a map lacks
    if known:
        try:
            truth = io.open_image(known)
        except io.PlaneNotChosen as e:
            raise ValueError(f"--known {known}: {e.n} planes along '{e.dim}'; --known takes one 2-D map of the depth "
                             "in µm: save the plane you mean as a file of its own") from None
        cal = calibrate_depth(ds, np.asarray(truth.values, dtype=np.float64), smooth=smooth or 0.0, method=method)
        if out.is_dir():  # --overwrite of a directory by a file: the file written first, then swapped in
            new = cal.save(out.with_name(f".{out.name}.new"), overwrite=True)
            with io.output_lock(out):  # the folder moved aside, removed once the file is in its place
                io._move_into_place(new, out)
        else:
            cal.save(out, overwrite=overwrite)
        click.echo(f"wrote {out}: {_describe_calibration(cal)}; R² {cal.r2:.3f}, MAE {cal.mae_um:.3g} µm on "
                   f"{cal.n_nodes} nodes")
        return
    z = estimate_depth(ds, cal, smooth=smooth)
    made = {"command": "lsfov depth", "source": str(Path(psf_map).resolve()),
            **({"calibration": str(Path(calibration).resolve())} if cal else {}),
            **({"image": ds.attrs["source"]} if ds.attrs.get("source") else {}), **io.plane_of(ds)}
    io.save(xr.Dataset({"depth": z}, attrs=made), out, overwrite=overwrite)
    lo, hi = float(z.min()), float(z.max())
    digits = max(0, 2 - math.floor(math.log10(max(abs(lo), abs(hi), 1e-12))))  # 3 significant, alike: -0.170 .. 0.108
    click.echo(f"wrote {out}: depth {lo:.{digits}f} .. {hi:.{digits}f} {z.attrs['units']}")


def _describe_calibration(cal) -> str:
    axis = f"instrument axis {cal.axis0:.3f} rad"
    if cal.method == "curve":
        lo, hi = cal.range_um
        return (f"calibration curves of degree {len(cal.curves[0]) - 1} over {lo:+.3g}..{hi:+.3g} µm ({axis}; "
                f"the line through the same nodes: {cal.slope:.3g} µm per wave)")
    return f"depth = {cal.slope:.4g} µm/wave x signed defocus ({axis}) {cal.offset:+.3g} µm"


# ---------------------------------------------------------------------------------------------- bss


@main.command()
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--subspace", "subspace_path", required=True, type=click.Path(),
              help="Subspace of operators learned by `lsfov calibrate` from several bead images.")
@click.option("--gamma1", type=float, default=None,
              help="Sparsity weight, in image counts (default: 3 x the noise level x the PSFs' L2 norm).")
@click.option("--gamma2", type=float, default=None, help="Smoothness weight of the background (default 10).")
@click.option("--iterations", default=500, show_default=True, help="FISTA iterations.")
@click.option("--chunks", default=2048, show_default=True, help="Chunk edge (pixels) of the halo exchange.")
@click.option("--threshold", type=_Finite(min=0, min_open=True), default=None,
              help="Detection threshold of the point sources that identify the blur, on the blob response "
                   "-σ²∇²(G_σ * image), in image counts (default: median + 8 robust standard deviations).")
@click.option("--pixel-um", type=float, default=None, help="Pixel size in µm (default: from the file).")
@_saturation_option
@_plane_options
@_scheduler_option
@_scratch_option
@_resume_option
@_overwrite_option
@click.pass_obj
def bss(obj, src, out, subspace_path, gamma1, gamma2, iterations, chunks, threshold, pixel_um, saturation, channel, zplane,
        tpoint, series, scheduler, scratch, resume, overwrite):
    """Blind sparse+smooth deblurring of point sources (paper 003 App. D).

    Identifies the blur of SRC in the subspace from its isolated point sources, then splits SRC into
    deblurred point sources (``sparse``) and background (``smooth``). OUT holds both, the raw image
    and the tables ``sources`` (y, x in pixels, amplitude: the sources that fixed the blur) and
    ``detections`` (the point sources found in the sparse component, 3-sigma); with y_um, x_um too
    where the image has µm coordinates. The identified blur is kept as OUT's operator: other images
    of the same acquisition deblur with `lsfov deconvolve IMG RES --operator OUT`.
    """
    import xarray as xr

    from . import io
    from .calibrate import OperatorSubspace, identify_operator
    from .cluster import use_scheduler
    from .restore import locate_sources, sparse_smooth_deblur

    out = _check_out(out, overwrite, inputs=[src, subspace_path])
    _check_preview(out, overwrite)
    _check_chunks(chunks)
    _check_iterations(iterations)
    for name, g in (("--gamma1", gamma1), ("--gamma2", gamma2)):
        if g is not None and not (np.isfinite(g) and g >= 0):
            raise ValueError(f"{name} {g} must be a weight >= 0")
    _check_pixel_um(pixel_um)
    img = _open_input(src, channel, zplane, tpoint, series, chunks, pixel_um)
    sub = OperatorSubspace.load(subspace_path)
    if sub.attrs.get("pixel_um"):
        io.pixel_size(img)  # non-square pixels refused before the sources are sought (a mismatch is warned later)
    t0 = time.perf_counter()
    clip, level = _clip(img, img, saturation)
    with _run_state(out, scratch, resume) as state, use_scheduler(scheduler):  # refused before a cluster starts
        op, info = identify_operator(np.asarray(img), sub, threshold=threshold, saturation=level, return_details=True)
        log.info("operator identified from %d sources (misfit %.1f%%)", len(info["positions"]), 100 * info["residual"])
        # The iterations run here, through the run's state; sparse and smooth then read from it.
        sparse, smooth = sparse_smooth_deblur(img, op, gamma1, gamma2, iterations=iterations, scratch=state,
                                              saturation=clip, resume=resume, progress=not obj["quiet"])
        table = _in_image_frame(np.column_stack([info["positions"], info["amplitudes"]]).astype(np.float64), img)
        cols = {"column": ["y", "x", "amplitude", "y_um", "x_um"][: table.shape[1]]}
        units = "pixel" + (" (y, x); micrometer (y_um, x_um: the image's coordinates, as raw's)" if table.shape[1] > 3
                           else "")
        sources = xr.DataArray(table, dims=("source", "column"), coords=cols,
                               attrs={"units": units, "description": "point sources used to identify the blur"})
        ds = xr.Dataset({"raw": img, "sparse": sparse, "smooth": smooth, "sources": sources}, attrs={
            "command": "lsfov bss", **_source(src, img), "subspace": str(subspace_path),
            "gamma": info["gamma"].tolist(), "gamma1": sparse.attrs["gamma1"], "gamma2": sparse.attrs["gamma2"],
            "iterations": iterations, "saturation": level,
        })
        # The deblurred point sources as a table too (3-sigma detections in the sparse component).
        noise = sparse.attrs["noise"]
        if not noise:  # (--gamma1 given for an image whose noise measures 0, or too small to measure)
            from ._validate import LsfovWarning

            warnings.warn("the image's noise measures 0: its 3-sigma detections are left empty", LsfovWarning,
                          stacklevel=1)
        found = _in_image_frame(locate_sources(sparse, op, noise) if noise else np.zeros((0, 3)), img)
        ds["detections"] = xr.DataArray(found, dims=("detection", "column"), coords=cols, attrs={
            "units": units, "description": "point sources in the sparse component (3-sigma)"})
        io.save(ds, out, overwrite=overwrite, progress=not obj["quiet"], operator=op)  # blur reusable: --operator OUT
    from .figures import summary_figure

    fig = _picture(out, lambda: summary_figure(out.with_suffix(".png"), _centres(io.open_result(out),
                                                                                ("raw", "sparse", "smooth")),
                                                title="lsfov bss"))
    click.echo(f"wrote {out}: {img.shape[0]}x{img.shape[1]}, blur from {len(table)} sources, {len(found)} point "
               f"sources found, {iterations} iterations in {time.perf_counter() - t0:.1f} s; "
               + (f"preview {fig}" if fig else "no preview"))


def _open_psf_map(path, what: str, *, checked: bool = True):
    """The PSF map at ``path`` (``what``: the argument that named it), or one line saying it is none;
    ``checked=False``: any result, for an API that says itself what a map lacks."""
    from . import io

    try:
        ds = io.open_result(path)
    except ValueError as e:
        if "is not an lsfov result" not in str(e):  # an operator, an incomplete map...: said as it is
            raise
        ds = None
    if ds is None or (checked and "psf_model" not in ds.attrs):
        raise ValueError(f"{what} {path} is not a PSF map; make one with `lsfov estimate IMAGE MAP`"
                         + (" (an operator: --operator)" if what == "--psf-map" else ""))
    return ds


def _in_image_frame(table, img):
    """Rows (y, x, amplitude) in pixel indices, with (y_um, x_um) appended where ``img`` has µm
    coordinates: where the points lie over the raw image in napari or xarray (a crop's origin included)."""
    from .io import SPATIAL_UNIT

    if not all(img[d].attrs.get("units") == SPATIAL_UNIT for d in ("y", "x")):
        return table
    um = [np.interp(table[:, i], np.arange(img.sizes[d]), img[d].values) for i, d in enumerate(("y", "x"))]
    return np.column_stack([table, *um])


# ---------------------------------------------------------------------------------------------- calibrate


@main.command()
@click.argument("beads", nargs=-1, type=click.Path(), metavar="BEADS...")
@click.argument("out", type=click.Path())
@click.option("--n-basis", type=click.IntRange(min=1), default=5, show_default=True, help="PSF basis size I.")
@click.option("--n-space", type=click.IntRange(min=1), default=5, show_default=True,
              help="Spatial basis size J (several images).")
@click.option("--radius", type=_Finite(min=2), default=None,
              help="PSF radius bound in pixels, >= 2 (default: measured).")
@click.option("--smoothing", type=_Finite(min=0), default=None, help="Thin-plate smoothing (default 0.01).")
@click.option("--threshold", type=_Finite(min=0, min_open=True), default=None,
              help="Bead detection threshold on the blob response -σ²∇²(G_σ * image), in image counts "
                   "(default: median + 8 robust standard deviations of the response).")
@_saturation_option
@click.option("--channel", type=int, default=None, help="Channel of multi-channel bead images.")
@click.option("--pixel-um", type=float, default=None,
              help="Pixel size in µm of the bead images, recorded with the operator or subspace (default: from the "
                   "files).")
@click.option("--figure", type=click.Path(), default=None,
              help="Write a figure of the bases and the operator (.png, .pdf or .svg).")
@_scheduler_option
@_overwrite_option
@click.pass_obj
def calibrate(obj, beads, out, n_basis, n_space, radius, smoothing, threshold, saturation, channel, pixel_um, figure,
              scheduler, overwrite):
    """Learn the microscope from micro-bead images (paper 003).

    One bead image gives a product-convolution operator (use it with `lsfov deconvolve --operator`);
    several (files, or z/t planes of a stack) give a subspace of operators.
    """
    from .calibrate import calibrate_operator, learn_subspace
    from .calibrate.interpolate import DEFAULT_SMOOTHING
    from .cluster import use_scheduler
    from .io import open_planes

    if not beads:  # one path given: it is OUT that is missing (click would name BEADS, filled first from the left)
        raise click.UsageError(f"give the bead image(s) and then OUT: lsfov calibrate {out} OUT")
    _not_an_input_named_as_out(out, "calibrate", ("ProductConvolution", "OperatorSubspace"), inputs=beads)
    out = _check_out(out, overwrite, inputs=beads)
    if figure:
        _check_figure(figure, overwrite, out, inputs=beads)
    _check_pixel_um(pixel_um)
    seen = {}
    for path in beads:  # one acquisition counted twice would weigh its operator double in the subspace
        if Path(path).resolve() in seen:
            raise ValueError(f"{path} is given twice (as {seen[Path(path).resolve()]}); give each bead image once")
        seen[Path(path).resolve()] = path
    opened, read = [open_planes(path, channel=channel) for path in beads], {}
    for path, ps in zip(beads, opened):  # the same again by another name: a result and its image variable
        source = ps[0].attrs.get("source") if ps else None
        if source in read:
            raise ValueError(f"{path} is the image {read[source]} names ({source}); give each bead image once")
        read[source or path] = path
    planes = [p for ps in opened for p in ps]
    if pixel_um is not None:  # (a file's own size, or none, replaced: as IN's by the other commands)
        from .io import with_pixel_size

        planes = [with_pixel_size(p, pixel_um) for p in planes]
    if len({p.shape for p in planes}) != 1:
        raise ValueError(f"bead images differ in shape: {sorted({p.shape for p in planes})}; crop them alike")
    if len(planes) == 1 and _given("n_space"):  # silently ignored, one image gives one operator
        raise ValueError("--n-space sizes the spatial basis of a subspace, learnt from several bead images; "
                         "one image gives one operator: leave it out, or give more images")
    kw = dict(radius=radius, threshold=threshold, saturation=saturation,
              smoothing=DEFAULT_SMOOTHING if smoothing is None else smoothing)
    t0 = time.perf_counter()
    with use_scheduler(scheduler):
        if len(planes) == 1:
            op, pos = calibrate_operator(planes[0], n_basis, return_positions=True, **kw)
            op.save(out, overwrite=overwrite)
            a = op.attrs
            click.echo(f"wrote {out}: operator from {a['n_beads']} of {a['n_detected']} beads, I={a['n_basis']}, "
                       f"kernels {op.kernel_size}x{op.kernel_size}, in {time.perf_counter() - t0:.1f} s")
            kernels, maps, label, beads_img = op.kernels, op.maps, "α", np.asarray(planes[0])
        else:
            sub = learn_subspace(planes, n_basis, n_space, progress=not obj["quiet"], **kw)
            sub.save(out, overwrite=overwrite)
            op, pos = sub.operator(0), None
            click.echo(f"wrote {out}: subspace I={sub.n_psf}, J={sub.n_space} from {sub.n_images} images "
                       f"({sub.attrs['n_beads']} beads) in {time.perf_counter() - t0:.1f} s")
            kernels, maps, label, beads_img = sub.psf_basis, sub.spatial_basis, "a", np.asarray(planes[0])
    if figure:
        from .calibrate import dirac_comb
        from .figures import calibration_figure

        comb = op.apply(dirac_comb(op.shape, max(16, 2 * op.kernel_size)))
        what = "operator" if len(planes) == 1 else f"subspace of {len(planes)} images (image 0 shown)"
        if _picture(out, lambda: calibration_figure(figure, kernels, [np.asarray(m) for m in maps], comb, beads=beads_img,
                                                    positions=pos, map_label=label, title=f"lsfov calibrate: {what}")):
            click.echo(f"figure: {figure}")


# ---------------------------------------------------------------------------------------------- CNN


@main.command()
@click.argument("data", type=click.Path())
@click.argument("out", type=click.Path(), required=False)
@click.option("--synthesize", "n_synth", type=click.IntRange(min=1), default=None, metavar="N",
              help="Write a training set of N patches to DATA instead of training.")
@click.option("--stream", "n_stream", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train on N patches made as they are needed on --device, no set on disk (a GPU makes them far "
                   "faster than a set is read); DATA is then the model file to write.")
@click.option("--psf-model", default="Z3", show_default=True,
              help="PSF model of a synthesized set or a stream (G1 G2 Z1 Z2 Z3).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Source images of a synthesized set (test: images never used for training).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds a synthesized set, or a training's weights and shuffles (with --resume: the run's).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes that synthesize in parallel (the same bytes for any number).")
@click.option("--arch", type=click.Choice(["polar", "spectral", "compact", "resnet34"]), default=None,
              help="Network: polar (shipped Z3: spectral + angular harmonics of the spectrum), spectral (compact + "
                   "a power-spectrum branch), compact, or the paper's resnet34 [--init's; otherwise spectral].")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the training set [20; with --resume the run's] (a stream has none: each patch is "
                   "seen once).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None,
              help="Patches per step [64; with --stream 256; with --resume the run's].")
@click.option("--lr", type=_Finite(0, 1, min_open=True), default=None,
              help="Adam learning rate [chosen on the validation split; with --resume the run's].")
@click.option("--patience", type=click.IntRange(min=1), default=None,
              help="Early-stopping patience, epochs without a better validation R² [4; with --resume the run's].")
@click.option("--minutes", type=_Finite(min=0, min_open=True), default=None,
              help="Stop after about this many minutes: a stream at once, a set after the epoch during which "
                   "they pass (learning-rate probe included; an epoch is not cut, so a large set overruns by up "
                   "to one epoch).")
@click.option("--checkpoint", type=click.Path(), default=None, help="Checkpoint directory [OUT without .pt + '.ckpt'].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--device", default=None,
              help="cpu or cuda [training: cuda when available; with --synthesize: NumPy on the CPU unless given, "
                   "then the blur and noise run there with torch, seeded but other bytes].")
@click.option("--init", default=None, metavar="MODEL",
              help="Start from this model's weights (a .pt or a shipped name): fine-tuning, more training.")
@click.option("--freeze", is_flag=True,
              help="Keep --init's trunk fixed and train only the tail of a polar network (minutes on a CPU).")
@click.option("--test", "test_path", type=click.Path(), default=None, help="Test set to report R² on.")
@click.option("--more-data", "more", type=click.Path(), multiple=True, metavar="SET",
              help="Another training set to train on with DATA, before it (repeatable; the validation split is "
                   "DATA's last rows).")
@_overwrite_option
@click.pass_obj
def train(obj, data, out, n_synth, n_stream, psf_model, split, seed, workers, arch, epochs, batch_size, lr, patience,
          minutes, checkpoint, resume, device, init, freeze, test_path, more, overwrite):
    """Train a PSF-parameter CNN on DATA and write it to OUT (.pt), or synthesize DATA.

    \b
      lsfov train --synthesize 20000 --psf-model Z3 --workers 8 z3-train.zarr
      lsfov train --synthesize 2000 --psf-model Z3 --split test z3-test.zarr
      lsfov train z3-train.zarr z3.pt --test z3-test.zarr
      lsfov train z3-train.zarr z3.pt --init Z3     # start from the shipped weights
      lsfov train z3-train.zarr z3.pt --init my-spectral-z3.pt --arch polar --freeze
      lsfov train --synthesize 20000 --psf-model Z3 --seed 1 z3-fresh.zarr
      lsfov train z3-fresh.zarr z3.pt --more-data z3-train.zarr --init Z3 --freeze
      lsfov train --stream 20000000 z3.pt --init Z3 --freeze --batch-size 1024 --device cuda
    """
    from .estimate import evaluate as _evaluate
    from .estimate import synthesize
    from .estimate import train as _train

    progress = not obj["quiet"]
    if n_synth is not None and n_stream is not None:
        raise ValueError("--synthesize writes a training set and --stream trains without one: give one of them")
    if n_synth is not None:
        if out is not None or more:
            raise ValueError("with --synthesize give only the output training set (DATA)")
        given = [f"--{n.replace('_', '-')}" for n in ("arch", "epochs", "batch_size", "lr", "patience", "minutes",
                                                       "checkpoint", "resume", "init", "freeze") if _given(n)]
        given += ["--test"] if test_path else []
        if given:  # silently ignored, the set would be written and no model trained as they ask
            raise ValueError(f"{', '.join(given)} set up a training; --synthesize only writes a set: "
                             "train on it with a second command")
        from .io import TIFF_SUFFIXES

        if Path(data).suffix.lower() in (".pt", ".json", *TIFF_SUFFIXES, ".npy", ".png"):
            raise ValueError(f"{data}: a training set is a zarr store; name it {Path(data).with_suffix('.zarr').name}")
        _check_out(data, overwrite)  # before any patch is made
        t = time.perf_counter()
        synthesize(n_synth, psf_model, split=split, seed=seed, out=data, overwrite=overwrite, workers=workers,
                   device=device, progress=progress)
        click.echo(f"wrote {n_synth} {psf_model.upper()} patches to {data} in {time.perf_counter() - t:.0f} s")
        return
    if n_stream is not None:
        if out is not None or more or resume or checkpoint:
            raise ValueError("with --stream give only the model file to write (DATA): a stream has no set, "
                             "--more-data, checkpoints or --resume")
        given = [f"--{n}" for n in ("epochs", "patience") if _given(n)]
        if given:  # silently ignored, they would promise passes over patches that are never kept
            raise ValueError(f"{' and '.join(given)} count passes over a training set; a stream shows each patch once: "
                             "set its length with --stream N (and --minutes)")
        data, out = None, data
    elif out is None:
        raise ValueError("give the training set DATA and the model file OUT (.pt), or --synthesize N DATA")
    inputs = [p for p in (data, *more, test_path) if p]
    ckpt = checkpoint or str(Path(out).with_suffix("")) + ".ckpt"  # (a set's run: a stream has none)
    if resume and not (Path(ckpt) / "last.pt").exists():  # (before OUT's check: --overwrite would not help)
        raise FileNotFoundError(f"nothing to resume: no checkpoint {Path(ckpt) / 'last.pt'}; give the run's "
                                "--checkpoint DIR, or start again without --resume")
    if resume and not overwrite and Path(out).exists():
        from .estimate.training import finished

        if finished(ckpt):  # the run it would continue has ended, and OUT is likely its model
            raise FileExistsError(f"{out} already exists and the run in {ckpt} finished: nothing to resume; "
                                  "to train again pass --overwrite without --resume")
    out = _check_file_out(out, overwrite, _is_model, "an lsfov model", inputs=inputs)  # a .pt file
    _check_file_out(out.with_suffix(".json"), overwrite, _is_model, "an lsfov model's metadata")  # ... beside it
    if checkpoint:  # a directory of its own, never in a training set's store
        ck = Path(checkpoint).resolve()
        if any(ck == Path(p).resolve() or Path(p).resolve() in ck.parents for p in inputs):
            raise ValueError(f"--checkpoint {checkpoint} is (or is inside) an input; give a directory of its own")
    if out.suffix != ".pt":
        raise ValueError(f"model files end in .pt, got {out.name}")
    from .io import output_lock

    # One run of OUT (and of its checkpoints) at a time: a second, or a --resume of a run still going,
    # is refused here, not let loose on this one's checkpoints to fail when it saves.
    with output_lock(out), (output_lock(Path(ckpt)) if ckpt and n_stream is None else contextlib.nullcontext()):
        if n_stream is not None and init is not None:  # a stream of the init model's task: its ranges and optics
            from .estimate.model import load_model

            psf_model = load_model(init, **({"psf_model": psf_model.upper()} if _given("psf_model") else {})).psf_model
        if test_path:  # before any work: an hour of training is not lost to a test set that cannot be read
            from .estimate.synth import open_training_set

            if any(Path(test_path).resolve() == Path(p).resolve() for p in (data, *more) if p):
                raise ValueError(f"--test {test_path} is a training set of this run: its R² would be no test; give a "
                                 "held-out set (--synthesize N SET --split test)")
            tested_set = open_training_set(test_path)
            tested, patches = tested_set["attrs"], tested_set["patches"]
            step = int(getattr(patches, "chunks", patches.shape)[0])
            for s in range(0, patches.shape[0], step):  # every chunk decoded (a damaged one is named), none kept
                patches[s : s + step]
            trained = (psf_model.upper() if isinstance(psf_model, str) else psf_model.name) if n_stream is not None \
                else open_training_set(data)["attrs"]["psf_model"]
            if tested["psf_model"] != trained:
                raise ValueError(f"--test {test_path} is a {tested['psf_model']} set, the model will regress "
                                 f"{trained}; synthesize a {trained} test set (--split test)")
            _warn_not_held_out(f"--test {test_path}", tested)
        if n_stream is not None:
            from .estimate.stream import PatchStream, train_stream

            ckpt = None
            stream = PatchStream(psf_model, device=device, seed=seed, workers=workers)
            model = train_stream(stream, arch=arch, init=init, freeze=freeze, patches=n_stream,
                                 **({"batch_size": batch_size} if batch_size else {}), lr=lr, max_minutes=minutes,
                                 seed=seed, progress=progress, stop_on=(KeyboardInterrupt, _Terminated))
            stopped = model.meta["training"].get("stopped")
            if stopped:  # no checkpoint to resume: the best weights validated so far are the run's work
                model.save(out, overwrite=overwrite)
                click.echo(f"wrote {out} ({model.meta['training']['n_train']} patches), the best weights validated "
                           "before the run was stopped", err=True)
                raise _Terminated() if stopped == "_Terminated" else KeyboardInterrupt()
        else:
            try:
                model = _train([*more, data] if more else data, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                               patience=patience, checkpoint=ckpt, resume=resume, device=device,
                               seed=seed if _given("seed") else None, init=init, freeze=freeze or None,
                               max_minutes=minutes, overwrite=overwrite, progress=progress)
            except (KeyboardInterrupt, _Terminated):
                _say_kept(ckpt, init)
                raise
        try:
            if test_path:
                model.meta["test"] = _evaluate(model, test_path, progress=progress)
                _print_scores(model.meta["test"])
            model.save(out, overwrite=overwrite)
        except BaseException:  # (e.g. a full disk): the trained run is in its checkpoints
            if ckpt:
                _say_kept(ckpt, init)
            raise
        click.echo(f"wrote {out}" + (f" (checkpoints in {ckpt})" if ckpt
                                     else f" ({model.meta['training']['n_train']} patches)"))


def _say_kept(ckpt, init):
    """Where a set's training that stopped keeps its epochs, and the command that continues it (said
    before the error or "interrupted (Ctrl-C)", as a run's kept work is)."""
    if (Path(ckpt) / "last.pt").exists():
        how = " in place of --init" if init is not None else ""  # (a resume continues the run's own weights)
        click.echo(f"the epochs done so far are kept in {ckpt}: run the same command with --resume{how} to continue",
                   err=True)


def _given(name: str) -> bool:
    """Whether the current command's option ``name`` was given by the user, not left at its default."""
    src = click.get_current_context().get_parameter_source(name)
    return src not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def _print_scores(res):
    r2 = ", ".join(f"{k} {v:.3f}" for k, v in res["r2"].items())
    click.echo(f"R² ({res['n_valid']} valid of {res['n']}): {r2}; mean {res['r2_mean']:.3f}; "
               f"validity accuracy {res['validity_accuracy']:.3f}")


def _print_curves(curves):
    """The robustness curves as a table: a row per degradation, a column per strength."""
    from .estimate.training import DEGRADATIONS

    click.echo(f"mean R² vs degradation ({curves['n']} valid patches; paper 000 Fig. 7):")
    # (a column apart from the next however low R² falls: it is unbounded below)
    click.echo(f"{'strength':<13}" + "".join(f"{s:>8.2f}" for s in curves["strengths"]))
    for kind in DEGRADATIONS:
        click.echo(f"{kind:<13}" + "".join(f" {r:>7.3f}" for r in curves[kind]))


@main.command()
@click.argument("model")
@click.argument("data", type=click.Path(), required=False)
@click.option("--robustness", "n_robust", type=int, default=0, metavar="N",
              help="Also the R²-vs-degradation curves (paper 000 Fig. 7) on N fresh held-out patches "
              "(in Python: lsfov.estimate.robustness).")
@click.option("--figure", type=click.Path(), default=None,
              help="A figure of the robustness curves (.png, .pdf or .svg).")
@_overwrite_option
@click.pass_obj
def evaluate(obj, model, data, n_robust, figure, overwrite):
    """R² per parameter and validity accuracy of MODEL (a shipped name or .pt) on a test set DATA."""
    from .estimate import evaluate as _evaluate
    from .estimate import load_model, robustness

    if _given("n_robust") and n_robust < 2:  # (before any work: the test set's scores come first)
        raise ValueError(f"--robustness {n_robust}: give a number of patches >= 2 (or leave it out)")
    if data is None and not n_robust:
        raise ValueError("give a test set DATA (lsfov train --synthesize N --split test DATA) and/or --robustness N")
    if figure and not n_robust:
        raise ValueError("--figure draws the robustness curves: add --robustness N")
    if figure:
        from .figures import made_by_lsfov

        _check_png(_check_file_out(figure, overwrite, made_by_lsfov, "a figure lsfov made",
                                   inputs=[p for p in (model, data) if p and Path(p).exists()]))
    reg = load_model(model)
    if data is not None:
        from .estimate.synth import open_training_set

        _warn_not_held_out(str(data), open_training_set(data)["attrs"])
        _print_scores(_evaluate(reg, data, progress=not obj["quiet"]))
    if n_robust:
        curves = robustness(reg, n=n_robust, progress=not obj["quiet"])
        _print_curves(curves)
        if figure:
            from .figures import robustness_figure

            name = reg.psf_model.name if str(model).upper() == reg.psf_model.name else \
                f"{Path(model).name} ({reg.psf_model.name})"
            robustness_figure(figure, {name: curves}, title=f"{name}: R² vs degradation")
            click.echo(f"wrote {figure}")


# ---------------------------------------------------------------------------------------------- demo


@main.command()
@click.option("--out", default="lsfov-demo.zarr", show_default=True, type=click.Path(), help="Result to write.")
@click.option("--size", default=1024, show_default=True, help="Field edge in pixels.")
@click.option("--chunks", default=512, show_default=True, help="Dask chunk edge in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@functools.partial(_scheduler_option, default="local")
@_overwrite_option
@click.pass_obj
def demo(obj, out, size, chunks, seed, scheduler, overwrite):
    """The whole story on simulated data: a tilted, curved textured sample seen through an astigmatic
    microscope; its PSF map, blind deconvolution and depth map computed chunk by chunk on a local
    Dask cluster; one OME-Zarr result and a PNG figure; the time of each stage."""
    import tempfile

    import dask.array as da

    from . import io, simulate as sim
    from .calibrate.single import rescaled_distance
    from .cluster import use_scheduler
    from .estimate.depth import _node_values, calibrate_depth
    from .estimate.mapping import estimate_psf_map
    from .figures import map_mosaic, summary_figure
    from .psf import get_model
    from .restore import deconvolve as run_tvrl

    out = _check_out(out, overwrite)
    fig = _check_preview(out, overwrite)
    if size < 512:  # 7x7 nodes at least: a depth calibration on fewer reads nothing but its own plane
        raise ValueError(f"--size {size} is too small for the demo's PSF and depth maps of 128² patches; "
                         "use at least 512")
    _check_chunks(chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    stages = {}
    t = time.perf_counter()
    kw = dict(texture="immunohistochemistry", grid=8, photons=2000.0)  # sharp: its own blur would read as defocus
    sample = sim.tilted_surface((size, size), depth_range_um=(-8, 8), direction=0.4, curvature=0.5, seed=seed, **kw)
    calib = sim.tilted_surface((size, size), depth_range_um=(-9, 9), direction=2.0, seed=seed + 1, **kw)
    sharp = sim.sample_image(kw["texture"], (size, size))
    stages["simulate sample and calibration plane"] = time.perf_counter() - t
    px = get_model("Z3").optics.pixel_um  # the PSFs are rendered for the model's optics
    img = io.with_pixel_size(da.from_array(sample.image, chunks=chunks), px)
    with use_scheduler(scheduler, n_workers=2), tempfile.TemporaryDirectory(prefix=f".{out.name}.scratch-",
                                                                         dir=out.parent) as tmp:
        t = time.perf_counter()
        cal = calibrate_depth(estimate_psf_map(io.with_pixel_size(da.from_array(calib.image, chunks=chunks), px), "Z3"),
                              calib.depth_um, smooth=2.0)  # a local plane over ~2 nodes: the surface is smooth, a node's estimate is not
        stages["depth calibration (second plane)"] = time.perf_counter() - t
        ds, more = _blind(img, _on_gpu(img, None, scheduler), "Z3", calibration=cal, scratch=tmp,
                          progress=not obj["quiet"])  # CuPy chunks on the cuda scheduler, as lsfov run
        stages.update(more)
        t = time.perf_counter()
        reference = np.asarray(run_tvrl(da.from_array(sample.image, chunks=chunks), sample.operator, 20))
        stages["reference: TV-RL with the true blur"] = time.perf_counter() - t
        ds["sharp"] = img.copy(data=sharp)
        ds.attrs.update(command="lsfov demo", seed=seed)
        t = time.perf_counter()
        io.save(ds, out, overwrite=overwrite, progress=not obj["quiet"])
        stages["deconvolution + writing OME-Zarr"] = stages.pop("deconvolution") + time.perf_counter() - t
    res = io.open_result(out)
    deblurred = np.asarray(res["deblurred"])

    def snr(a):  # after the best gain and offset: the sample's brightness is arbitrary
        return -20 * np.log10(rescaled_distance(a, sharp))

    truth = _node_values(res, sample.depth_um)
    mae = float(np.mean(np.abs(res["depth"].values - truth)))
    est = res["depth"].values
    gap = np.full((est.shape[0], 1), np.nan)
    both = np.clip(np.hstack([est, gap, truth]), truth.min(), truth.max())  # one scale for both
    depth_panel = "depth (µm): CNN | true"
    summary_figure(fig, {"raw": sample.image, "deblurred (blind)": deblurred, "PSF map (grid)": map_mosaic(res),
                         depth_panel: both}, quantities={depth_panel: (float(truth.min()), float(truth.max()))},
                   title="lsfov demo: a tilted sample, its PSF map, blind deconvolution and depth")
    click.echo(f"\nlsfov demo: {size}x{size} tilted and curved sample, depth -8..8 µm, astigmatic optics")
    for k, v in stages.items():
        click.echo(f"  {k:<40s} {v:7.2f} s")
    click.echo(f"  SNR against the sharp image: raw {snr(sample.image):.1f} dB, blind {snr(deblurred):.1f} dB, "
               f"true blur {snr(reference):.1f} dB")
    click.echo(f"  depth: mean absolute error {mae:.2f} µm over a {np.ptp(truth):.1f} µm range "
               f"(calibration fit R² {cal.r2:.2f}; the shipped Z3 CNN limits it, see the README)")
    click.echo(f"result: {out}  (variables: {', '.join(res.data_vars)}; open it with lsfov.open_result, or a "
               f"variable with napari: {out / 'deblurred'})")
    click.echo(f"figure: {fig}")


# ---------------------------------------------------------------------------------------------- helpers


def _um(dim, values, step=None):
    """Node coordinates in µm; ``step``: the node cell's size in µm (what a one-node axis is saved at)."""
    import xarray as xr

    return xr.Variable(dim, np.asarray(values, dtype=np.float64),
                       attrs={"units": "micrometer", **({"step": float(step)} if step else {})})


def _axis_um(img, axis: str) -> float | None:
    """The pixel size along ``axis`` of an xarray image in µm: its coordinates' step where they have a
    length unit, else its ``pixel_um``; None when unknown."""
    from .io import _to_um

    c = img.coords[axis] if axis in img.coords else None
    factor = _to_um(c.attrs.get("units")) if c is not None else None
    if factor is not None and c.size > 1:
        return float(c.values[1] - c.values[0]) * factor
    return img.attrs.get("pixel_um")


def _params_dataset(params, op, img, model):
    """PSF-model parameters on the node grid of ``op`` over ``img``, as variables with node-centre
    coordinates (on the image's own, a crop's offset included) and the attributes of a PSF map:
    the true blur deblurs as a map does (``--psf-map``)."""
    import xarray as xr

    from . import io
    from .io import image_origin
    from .psf import get_model

    m = get_model(model)
    pixel_um = img.attrs.get("pixel_um")
    origin = image_origin(img, pixel_um)
    coords = {}
    for d, c, o, axis in zip(("gy", "gx"), op.centers, origin, ("y", "x")):
        s = _axis_um(img, axis)  # each axis its own (non-square pixels: as the image's coordinates)
        if s and not pixel_um:
            o = float(img[axis].values[0]) * io._to_um(img[axis].attrs["units"])
        step = img.sizes[axis] / len(c) * (s or 1.0)  # a node's cell (what a one-node axis is saved at)
        coords[d] = xr.Variable(d, o + c * (s or 1.0), attrs={"units": "micrometer" if s else "pixel", "step": step})
    return xr.Dataset({
        name: xr.DataArray(params[..., i].astype(np.float32), dims=("gy", "gx"), coords=coords,
                           attrs={"units": m.units[name], "psf_model": m.name})
        for i, name in enumerate(m.params)
    }, attrs={**m.to_meta(), "image_shape": list(img.shape), "origin": list(origin), "pixel_um": pixel_um,
              "ground_truth": 1})


if __name__ == "__main__":  # pragma: no cover
    main()
