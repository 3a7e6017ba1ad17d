"""Behaviours of the chunked, scheduled and streamed paths pinned down: a mutation review found each
changeable without any other test failing."""
import threading

import dask
import dask.array as da
import numpy as np
import pytest

import lsfov
from lsfov import _backend, cluster
from lsfov.restore import chunked


@pytest.fixture(scope="module")
def scene(blurred_cell):
    op, y, _ = blurred_cell
    return op, y


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(b))


# ------------------------------------------------------------------------------------ chunked TV-RL


def test_an_image_chunked_along_one_axis_runs_as_its_blocks(scene, monkeypatch):
    """Strips (one chunk across x, several down y) are blocks too: no task holds the whole image."""
    op, y = scene
    real, windows = chunked._block, []
    monkeypatch.setattr(chunked, "_block", lambda yb, xb, **kw: (windows.append(yb.shape), real(yb, xb, **kw))[1])
    with dask.config.set(scheduler="synchronous"):
        out = lsfov.deconvolve(da.from_array(y, chunks=(57, 300)), op, 3, exchange_every=1).compute()
    _close(out, lsfov.deconvolve(y, op, 3))
    assert len(windows) > 3 and max(w[0] for w in windows) < y.shape[0]


def test_a_one_block_image_needs_the_memory_of_one_task(scene, monkeypatch):
    """One block: one task busy whatever the threads, and no halo to hold: it fits in what one such
    task needs (with room to spare), where counting every thread or a halo would refuse it."""
    op, y = scene
    ext = (y.shape[0] + 2 * op.halo, y.shape[1] + 2 * op.halo)
    monkeypatch.setattr(chunked, "_available_memory", lambda: int(1.5 * chunked.task_bytes(ext, 0, op)))
    monkeypatch.setattr(chunked, "spectra_room", lambda: 0)
    with dask.config.set(scheduler="threads", num_workers=4):
        out = lsfov.deconvolve(da.from_array(y), op, 3).compute()
    _close(out, lsfov.deconvolve(y, op, 3))


def test_the_memory_check_counts_the_jobs_cpus_and_memory_limit(scene, monkeypatch):
    """A batch job's share of a node: the CPUs it may use (Dask's CPU_COUNT, affinity-aware), and its
    memory limit (cgroup or rlimit, distributed's MEMORY_LIMIT) where that leaves less than the node."""
    import distributed.system
    import psutil

    op, y = scene
    dy = da.from_array(y, chunks=100)
    need = chunked.task_bytes((100, 100), chunked.spread_per_iteration(op, 0.02), op)
    monkeypatch.setattr(chunked, "_available_memory", lambda: int(1.5 * need))
    monkeypatch.setattr(chunked, "spectra_room", lambda: 0)
    for cpus, fits in ((1, True), (3, False)):
        monkeypatch.setattr(dask.system, "CPU_COUNT", cpus)
        with dask.config.set(scheduler="threads"):
            if fits:
                lsfov.deconvolve(dy, op, 1, exchange_every=1)
            else:
                with pytest.raises(MemoryError, match="for 3 thread"):
                    lsfov.deconvolve(dy, op, 1, exchange_every=1)
    monkeypatch.undo()
    rss = psutil.Process().memory_info().rss
    monkeypatch.setattr(distributed.system, "MEMORY_LIMIT", rss + 2**20)
    assert chunked._available_memory() <= 2**20


def test_the_synchronous_scheduler_is_checked_for_one_task_at_a_time(scene, monkeypatch):
    """Blocks whose task fits once, not four times: the synchronous scheduler runs one at a time."""
    op, y = scene
    dy = da.from_array(y, chunks=100)  # blocks of up to 100 px on the extended field, halo 2r
    need = chunked.task_bytes((100, 100), chunked.spread_per_iteration(op, 0.02), op)
    monkeypatch.setattr(chunked, "_available_memory", lambda: int(1.5 * need))
    monkeypatch.setattr(chunked, "spectra_room", lambda: 0)
    with dask.config.set(scheduler="synchronous", num_workers=4):
        out = lsfov.deconvolve(dy, op, 2, exchange_every=1).compute()
    _close(out, lsfov.deconvolve(y, op, 2))
    with dask.config.set(scheduler="threads", num_workers=4), pytest.raises(MemoryError, match=r"for 4 thread"):
        lsfov.deconvolve(dy, op, 2, exchange_every=1)


def test_this_machines_memory_check_counts_what_the_spectra_cache_may_still_take(scene, monkeypatch):
    """On the local schedulers the cache of kernel spectra grows in this process as the run goes:
    RAM it may still take is not the tasks'. A full cache takes no more."""
    from lsfov import operators

    op, _ = scene
    need = chunked.task_bytes((512, 512), 8, op)
    monkeypatch.setattr(chunked, "_available_memory", lambda: need + operators.spectra_budget() // 2)
    monkeypatch.setattr(operators, "_SPECTRA", None)  # empty: the whole budget still to come
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(MemoryError, match=r"available for 1 thread\(s\) \(less the cache of kernel spectra\)"):
            chunked.check_task_memory((512, 512), 8, op)
        cache = operators._process_spectra()
        monkeypatch.setattr(cache, "_nbytes", cache.budget)  # full: what it holds is out of "available" already
        chunked.check_task_memory((512, 512), 8, op)


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_lazy_runs_with_other_settings_computed_together_keep_their_own(scene):
    """Two lazy deconvolutions of one image in one graph: their keys must not collide."""
    op, y = scene
    dy = da.from_array(y, chunks=100)
    settings = [dict(tv=0.0), dict(tv=0.05), dict(tv=0.05, eps=0.05), dict(tv=0.05, saturation=float(np.median(y)))]
    outs = dask.compute(*(lsfov.deconvolve(dy, op, 3, exchange_every=1, **s) for s in settings))
    for s, out in zip(settings, outs):
        _close(out, lsfov.deconvolve(y, op, 3, **s))
    # The same settings on other chunks: other blocks, their own block function
    outs = dask.compute(*(lsfov.deconvolve(da.from_array(y, chunks=c), op, 3, exchange_every=1) for c in (100, (60, 120))))
    for out in outs:
        _close(out, lsfov.deconvolve(y, op, 3))


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_resume_with_another_eps_exchange_every_or_saturation_is_another_run(scene, tmp_path):
    op, y = scene
    dy = da.from_array(y, chunks=60)
    level = float(np.median(y))  # half the pixels censored: where noise puts Hx above y, the ratio becomes 1
    with dask.config.set(scheduler="synchronous"):
        lsfov.deconvolve(dy, op, 6, exchange_every=2, scratch=tmp_path).compute()
        for kw in (dict(exchange_every=1), dict(exchange_every=2, eps=0.05), dict(exchange_every=2, saturation=level)):
            out = lsfov.deconvolve(dy, op, 6, scratch=tmp_path, resume=True, **kw).compute()
            _close(out, lsfov.deconvolve(y, op, 6, **{k: v for k, v in kw.items() if k != "exchange_every"}))
    whole = lsfov.deconvolve(y, op, 6)
    for other in (dict(eps=0.05), dict(saturation=level)):  # each matters here
        assert np.abs(lsfov.deconvolve(y, op, 6, **other) - whole).max() > 1e-3 * whole.max(), other


# ------------------------------------------------------------------------------------ schedulers


@pytest.mark.parametrize("spec", ["synchronous", "sync"])
def test_the_synchronous_scheduler_runs_tasks_on_the_calling_thread(spec):
    on_main = da.zeros(4, chunks=1).map_blocks(lambda b: b + (threading.current_thread() is threading.main_thread()))
    with cluster.use_scheduler(spec) as client:
        assert client is None and on_main.compute().tolist() == [1, 1, 1, 1]


class _Stub:
    """A cluster or client that records how it was made and what it was asked."""

    made = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.jobs = args, kwargs, None
        self.workers, self.dashboard_link = {"w": None}, "http://stub"
        _Stub.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def scale(self, jobs):
        self.jobs = jobs

    def job_script(self):
        return "#!/bin/sh"


def test_local_and_batch_clusters_get_the_workers_asked_for(monkeypatch):
    import distributed

    monkeypatch.setattr(distributed, "LocalCluster", _Stub)
    monkeypatch.setattr(distributed, "Client", _Stub)
    _Stub.made.clear()
    with cluster.use_scheduler("local", n_workers=3):
        pass
    assert _Stub.made[0].kwargs["n_workers"] == 3 and _Stub.made[0].kwargs["threads_per_worker"] == 1
    _Stub.made.clear()
    with cluster.use_scheduler("local:2"):  # as --scheduler local:2 says it
        pass
    assert _Stub.made[0].kwargs["n_workers"] == 2
    monkeypatch.setattr(cluster.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cluster, "jobqueue_cluster", lambda kind, **kw: _Stub(kind, **kw))
    size = {f"jobqueue.{kind}.{k}": v for kind in ("slurm", "pbs") for k, v in (("cores", 4), ("memory", "8GB"))}
    for spec, n, jobs in (("slurm", 3, 3), ("pbs", None, 1), ("slurm:2", 5, 2)):
        _Stub.made.clear()
        with dask.config.set(size), cluster.use_scheduler(spec, n_workers=n):  # (a site's job size: checked first)
            pass
        assert _Stub.made[0].jobs == jobs, spec
    with dask.config.set({**size, "jobqueue.slurm.cores": None}):  # said as the option is read, before the image
        with pytest.raises(ValueError, match="no slurm job size set: put cores and memory in"):
            cluster.parse_scheduler("slurm:1")


class _Workers:
    def __init__(self, *workers):
        self.info = {"workers": {f"tcp://{i}": w for i, w in enumerate(workers)}}

    def scheduler_info(self, n_workers=-1):
        return self.info


def test_workers_without_a_memory_limit_are_not_refused(scene, monkeypatch):
    """``--memory-limit 0`` (or none reported): nothing to fit the blocks in, nothing to refuse."""
    op, _ = scene
    stub = _Workers({"memory_limit": 0, "nthreads": 4, "metrics": {"memory": 10 * 2**30}},
                    {"memory_limit": None, "nthreads": 4, "metrics": {"memory": 10 * 2**30}})
    assert cluster.worker_budgets(stub, chunked._WORKER_OWN)[0] == []
    monkeypatch.setattr(cluster, "_active_client", lambda: stub)
    chunked.check_task_memory((4096, 4096), 200, op, n_blocks=64)


def test_dead_workers_are_counted_in_the_message(monkeypatch):
    KilledWorker = type("KilledWorker", (Exception,), {})

    def die(*args):
        raise KilledWorker("('lsfov-exchange-1', 0, 0)")

    monkeypatch.setattr(cluster, "_compute", die)
    with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
        with pytest.raises(MemoryError, match="died 3 times running the same task"):
            cluster.compute(da.zeros(2))


# ------------------------------------------------------------------------------------ threads


def test_work_off_the_main_thread_uses_one_thread():
    """A Dask task's thread, or one of lsfov's pool: the cores are busy already (and a pool thread
    that waited on its own pool would wait for ever)."""
    seen = {}
    t = threading.Thread(target=lambda: seen.update(n=_backend.threads_for(np.zeros(1))))
    t.start()
    t.join()
    assert seen["n"] == 1


def test_task_threads_nest_and_leave_a_threads_setting_as_found():
    seen = []

    def task():
        with _backend.task_threads():
            with _backend.task_threads():
                seen.append(_backend._workers())
            seen.append(_backend._workers())
        seen.append(_backend._workers())

    t = threading.Thread(target=task)
    t.start()
    t.join()
    assert seen == [1, 1, _backend._FFT_WORKERS]


def test_a_forked_child_starts_with_a_free_heap_lock_and_no_users(monkeypatch):
    """A fork while a task is inside ``heap_kept`` (its lock held, one user): the child holds none
    of the parent's tasks, so its own CNN work must not wait on that lock or count that user."""
    calls = []
    libc = type("Libc", (), {"mallopt": lambda self, p, v: calls.append((p, v)), "malloc_trim": lambda self, p: 0})()
    monkeypatch.setattr(_backend, "_HEAP", {"users": 1, "lock": threading.Lock(), "libc": libc, "trim": 65536})
    _backend._HEAP["lock"].acquire()
    _backend._forget_heap()
    assert _backend._HEAP["users"] == 0 and _backend._HEAP["lock"].acquire(timeout=1)
    assert calls == [(-1, 65536), (-3, 128 << 10)]  # the thresholds of the child's start


def test_banded_multiply_is_numpy_multiply_for_mixed_types_and_broadcasting():
    if _backend.threads_for(np.zeros(1)) < 2:
        pytest.skip("one core (or LSFOV_FFT_WORKERS=1): no bands")
    rng = np.random.default_rng(0)
    a = rng.random((1100, 1000), dtype=np.float32)
    b = (rng.random((1100, 1000)) + 1j * rng.random((1100, 1000))).astype(np.complex64)
    np.testing.assert_array_equal(_backend.multiply(a, b), a * b)
    np.testing.assert_array_equal(_backend.multiply(a, a[:1]), a * a[:1])


def test_irfft2_without_a_shape_inverts_rfft2_of_an_even_width():
    fft = _backend.fft_module(np.zeros(1))
    u = np.random.default_rng(1).random((48, 64))
    np.testing.assert_allclose(fft.irfft2(fft.rfft2(u)), u, atol=1e-12)


# ------------------------------------------------------------------------------------ streamed patches


def test_a_stream_draws_read_noise_over_its_whole_range():
    """Read noise of 10 counts, no light to speak of: every patch's spread is that noise alone."""
    from lsfov.estimate import stream

    st = stream.PatchStream("G1", sources=("poi",), seed=0, invalid_fraction=0.0, illumination=0.0,
                            photons=(1e-3, 1e-3), read_noise=(10.0, 10.0))
    sd = st(64)[0].std(dim=(1, 2)).numpy()
    assert np.all(np.abs(sd - 10) < 0.5), sd


def test_extra_procedural_images_differ_between_splits_and_seeds():
    """Images beyond synthesize's 6 per source: a test split's are not the training split's (no
    leak between them), and another seed draws others."""
    import torch

    from lsfov.estimate import stream

    extra = {}
    for split, seed in (("train", 0), ("test", 0), ("train", 1)):
        st = stream.PatchStream("G1", sources=("poi",), split=split, seed=seed, n_procedural=7)
        extra[split, seed] = st.flat[-512 * 512:]
    assert not torch.equal(extra["train", 0], extra["test", 0])
    assert not torch.equal(extra["train", 0], extra["train", 1])


def test_validation_patches_are_not_the_first_training_batch(monkeypatch):
    """Validation draws from another seed: with as many patches as a batch, the same seed would make
    the validation set the first training batch."""
    import torch

    from lsfov.estimate import stream

    st = stream.PatchStream("G1", sources=("poi",), seed=5)
    drawn, real = [], stream.PatchStream.__call__
    monkeypatch.setattr(stream.PatchStream, "__call__",
                        lambda self, n: (drawn.append((self is st, out := real(self, n))), out)[1])
    stream.train_stream(st, arch="compact", patches=16, batch_size=16, n_val=16, eval_every=1, progress=False)
    val = [p for train, (_, p, _) in drawn if not train]
    train = [p for is_train, (_, p, _) in drawn if is_train]
    assert val and train and not any(torch.equal(v, t) for v in val for t in train)


# ------------------------------------------------------------------------------------ PSF maps


def test_psf_map_resume_with_other_settings_regresses_again(tmp_path):
    """Kept chunks of a map with other settings (symmetrized or not, another saturation level) are
    another run's: a resume with these settings gives what a fresh run gives. (Z3: symmetrizing
    changes its axis; G1's isotropic readings it leaves as they are.)"""
    import warnings

    from lsfov import simulate as sim

    img = sim.sample_image("cell", (256, 256)).astype(np.float32)
    lazy = da.from_array(img, chunks=128)
    level = float(np.percentile(img, 50))  # half of every patch saturated: every node marked
    lsfov.estimate_psf_map(lazy, "Z3", scratch=tmp_path)
    for kw in (dict(symmetrize=True), dict(saturation=level, fill=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lsfov.LsfovWarning)
            out = lsfov.estimate_psf_map(lazy, "Z3", scratch=tmp_path, resume=True, **kw)
            ref = lsfov.estimate_psf_map(img, "Z3", **kw)
        for name in ref.data_vars:
            np.testing.assert_allclose(out[name].values, ref[name].values, rtol=0, atol=1e-4, err_msg=f"{kw} {name}")
    # Another model of the same metadata (fine-tuned, saved: its creation time kept) is another run too
    import copy

    import torch

    tuned = copy.deepcopy(lsfov.load_model("Z3"))
    with torch.no_grad():
        for p in tuned.net.parameters():
            p.mul_(0.9)
    assert tuned.meta == lsfov.load_model("Z3").meta
    out = lsfov.estimate_psf_map(lazy, tuned, scratch=tmp_path, resume=True)
    np.testing.assert_allclose(out["focus"].values, lsfov.estimate_psf_map(img, tuned)["focus"].values, rtol=0, atol=1e-4)


def test_fill_invalid_uses_the_power_and_neighbours_asked_for():
    """Paper 000's rule (1/d over the four nearest valid nodes) and others, when asked for."""
    import xarray as xr

    from lsfov.estimate.mapping import fill_invalid

    f = (np.arange(30, dtype=np.float64).reshape(5, 6) ** 1.5).astype(np.float32)
    v = np.ones((5, 6), np.float32)
    v[2, 2] = 0  # its neighbours: four at 1, four at sqrt(2), the next at 2
    ds = xr.Dataset({"focus": (("gy", "gx"), f), "validity": (("gy", "gx"), v)}, attrs={"params": ["focus"]})
    f = f.astype(np.float64)
    near = f[1, 2] + f[3, 2] + f[2, 1] + f[2, 3]
    diag = f[1, 1] + f[1, 3] + f[3, 1] + f[3, 3]
    for power, k, want in ((1.0, 4, near / 4), (1.0, 8, (near + diag / 2**0.5) / (4 + 4 / 2**0.5)),
                           (3.0, 8, (near + diag / 2**1.5) / (4 + 4 / 2**1.5))):
        got = fill_invalid(ds, power=power, neighbours=k).focus.values[2, 2]
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"power {power}, {k} neighbours")
    # a NaN power once filled nodes with NaN; a map without validity raised a KeyError
    for bad, said in ((dict(power=np.nan), "power must be a finite number >= 0"),
                      (dict(power=-1), "power must be a finite number >= 0"),
                      (dict(neighbours=0), "neighbours must be a positive integer"),
                      (dict(threshold=2), "threshold must be a finite number >= 0 and <= 1")):
        with pytest.raises(ValueError, match=said):
            fill_invalid(ds, **bad)
    with pytest.raises(ValueError, match="with a 'validity' variable"):
        fill_invalid(ds.drop_vars("validity"))


def test_psf_map_without_fill_keeps_the_regressed_values():
    from lsfov import simulate as sim

    img = sim.sample_image("cell", (256, 384)).astype(np.float32)
    img[:, :192] = img.mean()  # no texture: invalid nodes
    kept = lsfov.estimate_psf_map(img, "G1", fill=False)
    filled = lsfov.estimate_psf_map(img, "G1")
    bad = filled.filled.values
    assert "filled" not in kept and bad.any() and not bad.all()
    assert np.all(kept.sigma.values[bad] != filled.sigma.values[bad])  # G1: one parameter, sigma
    np.testing.assert_array_equal(kept.validity.values, filled.validity.values)


def test_a_stream_run_keeps_its_best_validated_weights(monkeypatch):
    """The weights of the best validation, not the last step's (scripted scores: the first of three
    evaluations is best), checked on the validation patches themselves."""
    import copy

    import torch

    from lsfov.estimate import stream, training

    st = stream.PatchStream("G1", sources=("poi",), seed=5)
    preds, scores = [], iter([0.2, 0.9, 0.1, 0.05])  # the untrained start (no candidate), steps 1-3

    def scripted(m, truth, pred):
        preds.append(pred[:, 0].copy())
        return {"sigma": next(scores)}

    monkeypatch.setattr(training, "r2_scores", scripted)
    model = stream.train_stream(st, arch="compact", patches=48, batch_size=16, n_val=16, eval_every=1, lr=1e-2,
                                progress=False)
    val = copy.copy(st)  # the validation patches again: the stream on its validation seed
    val.generator = torch.Generator().manual_seed(st.seed + 1_000_003)
    x, _, v = val(16)
    got = model.predict(x.numpy())["sigma"][v.numpy()]
    np.testing.assert_allclose(got, preds[1], rtol=1e-4, atol=1e-4)
    assert np.abs(got - preds[-1]).max() > 1e-3  # the last step's weights are others
    assert model.meta["training"]["best_val_r2"] == 0.9


def test_compute_on_a_client_with_a_task_callback_keeps_the_blocks_in_place():
    """On a cluster with ``on_task``, the chunks come back one by one and are laid out again: the
    result is the array, not its blocks transposed or shuffled."""
    distributed = pytest.importorskip("distributed")

    x = np.arange(7 * 9, dtype=np.float32).reshape(7, 9)
    seen = []
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        out = cluster.compute(da.from_array(x, chunks=(3, 4)), on_task=lambda key, part: seen.append(key))
    np.testing.assert_array_equal(out, x)
    assert len(seen) == 3 * 3


def test_an_error_in_a_task_callback_cancels_the_clusters_other_tasks():
    """A failing ``on_task`` (a write that fails, Ctrl-C) stops the job: the tasks still queued or
    running on the cluster are cancelled, not left writing to a scratch store."""
    distributed = pytest.importorskip("distributed")

    cancelled = []
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        real = client.cancel
        client.cancel = lambda futures, *a, **k: (cancelled.extend(futures), real(futures, *a, **k))[1]

        def fail(key, part):
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            cluster.compute(da.ones((8, 8), chunks=2), on_task=fail)
    assert len(cancelled) == 16  # every chunk's future


def test_memory_checks_read_every_worker_whatever_the_distributed_version():
    """distributed 2025.6 to 2026.6 gave the first five workers from scheduler_info() unless asked
    for all (n_workers=-1); earlier releases took no such argument and gave all."""
    seven = {f"tcp://{i}": {"memory_limit": 2**30 * (1 + i), "nthreads": 1, "metrics": {"memory": 0}}
             for i in range(7)}

    class FiveByDefault:
        def scheduler_info(self, n_workers=5):
            return {"workers": dict(list(seven.items())[: None if n_workers == -1 else n_workers])}

    class NoArgument:
        def scheduler_info(self, **kwargs):
            if kwargs:
                raise TypeError("identity() got an unexpected keyword argument 'n_workers'")
            return {"workers": seven}

    for client in (FiveByDefault(), NoArgument()):
        budgets, _ = cluster.worker_budgets(client, chunked._WORKER_OWN)
        assert len(budgets) == 7
