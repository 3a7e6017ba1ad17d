import time

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.signal
import xarray as xr

import lsfov
from lsfov import ProductConvolution, psf
from lsfov._backend import next_fast_len


@pytest.fixture
def rng():
    """A fresh seeded generator per test: a test's data do not depend on which tests ran before it."""
    return np.random.default_rng(0)


def _grid_op(gy=3, gx=4, k=15, shape=(150, 170), seed=1, centers=None):
    m = psf.MODELS["Z3"]
    kernels = m.render(m.sample(gy * gx, seed), size=k).reshape(gy, gx, k, k)
    # Z3's PSFs are point-symmetric (even aberrations): a ramp makes them not, so that a convolution
    # taken for a correlation (a flipped kernel) fails the tests against the definition.
    ramp = 1 + 0.8 * np.linspace(0, 1, k)[:, None] + 0.4 * np.linspace(0, 1, k)[None, :]
    kernels = kernels * ramp
    # Sums of their own (a PSF is not normalised by from_grid): formulas that interpolate the nodes'
    # sums (the FFT-free H^T 1) would pass any weights if every sum were 1.
    gain = 1 + 0.1 * (np.arange(gy)[:, None] + 2 * np.arange(gx)[None, :])
    kernels = kernels / kernels.sum(axis=(-2, -1), keepdims=True) * gain[..., None, None]
    return ProductConvolution.from_grid(kernels, shape, centers=centers)


def _basis_op(n=3, k=9, shape=(120, 140), seed=2):
    r = np.random.default_rng(seed)
    return ProductConvolution.from_basis(r.standard_normal((n, k, k)), r.random((n,) + shape))


def _hats(c, n):
    r = np.arange(n)
    return np.stack([np.interp(r, c, np.eye(len(c))[i]) for i in range(len(c))])


def _reference(op, u):
    """H u from the definition: sum_p k_p * (w_p . u), with full-size weight maps."""
    if op.kind == "grid":
        wy, wx = (_hats(c, n) for c, n in zip(op.centers, op.shape))
        gy, gx = op.grid_shape
        return sum(
            scipy.signal.fftconvolve(wy[i][:, None] * wx[j][None, :] * u, op.kernels[i, j], mode="same")
            for i in range(gy) for j in range(gx)
        )
    return sum(scipy.signal.fftconvolve(m * u, k, mode="same") for m, k in zip(op.maps, op.kernels))


OPS = {
    "grid": _grid_op,
    "grid-1x1": lambda: _grid_op(1, 1),
    "grid-1x5": lambda: _grid_op(1, 5, shape=(90, 200)),
    "grid-uneven": lambda: _grid_op(3, 3, shape=(100, 110), centers=([5.0, 40.0, 99.0], [-3.0, 50.5, 80.0])),
    "basis": _basis_op,
}


def _window(op, kind):
    """The windows the solvers iterate on (ProductConvolution.restrict)."""
    H, W = op.shape
    r = op.halo
    if kind == "whole":
        return op
    if kind == "extended-periodic":  # TV-RL's whole-array window: the field grown by r, at fast FFT lengths
        return op.restrict((-r, -r), (next_fast_len(H + 2 * r), next_fast_len(W + 2 * r)), periodic=True)
    if kind == "interior":  # a block of a chunked run
        return op.restrict((r + 3, r + 5), (40, 50))
    if kind == "periodic-y":  # wrapping along y only, crossing the image's left border along x
        return op.restrict((-r, -4), (next_fast_len(H + 2 * r), 60), periodic=(True, False))
    raise ValueError(kind)


def _uniform(op):
    """The same operator cut into equal cells (as on a GPU), on NumPy arrays."""
    u = op._view(op.window, op.periodic)
    u.uniform_cells = True
    return u


@pytest.mark.parametrize("window", ["whole", "extended-periodic", "interior", "periodic-y"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_adjointness(name, window, rng):
    op = _window(OPS[name](), window)
    u = rng.standard_normal(op.domain_shape).astype(np.float32)
    v = rng.standard_normal(op.domain_shape).astype(np.float32)
    lhs = np.vdot(op.apply(u).astype(np.float64), v)
    rhs = np.vdot(u.astype(np.float64), op.adjoint(v))
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("name", sorted(OPS))
def test_matches_the_definition(name, rng):
    op = OPS[name]()
    u = rng.random(op.shape).astype(np.float32)
    ref = _reference(op, u)
    out = op.apply(u)
    assert out.dtype == np.float32 and out.shape == op.shape
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()


def test_grid_weights_sum_to_one_and_one_psf_is_a_plain_convolution(rng):
    k = psf.gaussian(2.0, 3.0, size=21)
    op = ProductConvolution.from_grid(np.broadcast_to(k, (4, 5, 21, 21)), (100, 120))
    u = rng.random((100, 120)).astype(np.float32)
    ref = scipy.signal.fftconvolve(u, k, mode="same")  # zero boundary, no wrap-around
    np.testing.assert_allclose(op.apply(u), ref, atol=1e-5)
    np.testing.assert_allclose(ProductConvolution.from_grid(k[None, None], (100, 120)).apply(u), ref, atol=1e-5)


def test_dirac_maps_to_the_local_kernel_centred_on_it():
    op = _grid_op()
    d = np.zeros(op.shape, np.float32)
    y, x = 70, 101
    d[y, x] = 1
    out = op.apply(d)
    r = op.halo
    np.testing.assert_allclose(out[y - r : y + r + 1, x - r : x + r + 1], op.psf_at(y, x), atol=1e-6)
    # At a node centre the local PSF is that node's PSF.
    cy, cx = op.centers
    np.testing.assert_allclose(op.psf_at(cy[1], cx[2]), op.kernels[1, 2], atol=1e-7)
    # No circular wrap-around: a Dirac on the border spills nothing onto the opposite border.
    d[:] = 0
    d[0, 0] = 1
    out = op.apply(d)
    assert np.abs(out[-r:, :]).max() < 1e-7 and np.abs(out[:, -r:]).max() < 1e-7


@pytest.mark.parametrize("name", ["grid", "basis"])
@pytest.mark.parametrize("periodic", [False, True])
def test_a_window_thinner_than_the_halo(name, periodic, rng):
    op = OPS[name]()
    win = op.restrict((10, 10), (3, 9), periodic=periodic)
    u, v = rng.random((3, 9)).astype(np.float32), rng.random((3, 9)).astype(np.float32)
    np.testing.assert_allclose(float((win.apply(u) * v).sum()), float((u * win.adjoint(v)).sum()), rtol=1e-5)
    if not periodic:  # the whole operator on the image that is u there and zero elsewhere, seen there
        pad = np.zeros(op.shape, np.float32)
        pad[10:13, 10:19] = u
        ref = op.apply(pad)[10:13, 10:19]
        np.testing.assert_allclose(win.apply(u), ref, atol=1e-5 * np.abs(ref).max())


def test_psf_at_basis_and_bounds():
    op = _basis_op()
    y, x = 33.25, 71.5
    alpha = [
        np.interp(x, [71, 72], [np.interp(y, [33, 34], m[33:35, 71]), np.interp(y, [33, 34], m[33:35, 72])])
        for m in op.maps
    ]
    np.testing.assert_allclose(op.psf_at(y, x), np.tensordot(alpha, op.kernels, 1), atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        op.psf_at(-5, 3)


@pytest.mark.parametrize("name", ["grid", "grid-uneven", "basis"])
# (84, 72, 30, 25): inside one cell of "grid", halo included (the one-cell path, four weighted terms).
@pytest.mark.parametrize("window", [(0, 0, 40, 50), (37, 61, 55, 33), (-7, -7, 30, 30), (80, 90, 60, 70),
                                    (84, 72, 30, 25)])
def test_block_with_halo_equals_whole(name, window, rng):
    op = OPS[name]()
    u = rng.random(op.shape).astype(np.float32)
    r = op.halo
    y0, x0, h, w = window
    if name == "grid" and window == (84, 72, 30, 25):
        plan = op.restrict((y0 - r, x0 - r), (h + 2 * r, w + 2 * r))._plan()
        assert plan[0].single and plan[0].sep == (2, 2)
    big = np.pad(u, 200)
    block = big[200 + y0 - r : 200 + y0 + h + r, 200 + x0 - r : 200 + x0 + w + r]
    got, got_t = op.apply_block(block, (y0 - r, x0 - r)), op.adjoint_block(block, (y0 - r, x0 - r))
    # Compare where the window overlaps the image (outside it H u is not defined).
    iy0, ix0 = max(y0, 0), max(x0, 0)
    iy1, ix1 = min(y0 + h, op.shape[0]), min(x0 + w, op.shape[1])
    inner = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    for out, ref in ((got, op.apply(u)), (got_t, op.adjoint(u))):
        assert out.shape == (h, w)
        ref = ref[iy0:iy1, ix0:ix1]
        np.testing.assert_allclose(out[inner], ref, atol=1e-6 * np.abs(ref).max())
    # a block that is all halo holds no pixel: refused, once an empty (0, 0) array
    with pytest.raises(ValueError, match=f"holds nothing inside its halo of {r} px"):
        op.apply_block(block[: 2 * r, : 2 * r], (0, 0))


@pytest.mark.parametrize("name", ["grid", "basis"])
# (39, 82): a last chunk thinner than the halo on one axis (grid: 170 = 82 + 82 + 6, halo 7; basis:
# 120 = 3 x 39 + 3, halo 4), which map_overlap would rechunk behind the blocks' backs.
@pytest.mark.parametrize("chunks", [(40, 50), (64, 200), (150, 33), 8, (39, 82)])
def test_dask_chunked_equals_whole(name, chunks, rng):
    op = OPS[name]()
    u = rng.random(op.shape).astype(np.float32)
    lazy = op.apply(da.from_array(u, chunks=chunks))
    assert isinstance(lazy, da.Array)
    ref, ref_t = op.apply(u), op.adjoint(u)
    np.testing.assert_allclose(lazy.compute(), ref, atol=1e-6 * np.abs(ref).max())
    lazy_t = op.adjoint(da.from_array(u, chunks=chunks)).compute()
    np.testing.assert_allclose(lazy_t, ref_t, atol=1e-6 * np.abs(ref_t).max())


def test_operator_pickles_without_its_caches_and_finds_them_again(rng):
    import pickle

    op = _grid_op()
    u = rng.random(op.shape).astype(np.float32)
    out = op.apply(u)
    blob = pickle.dumps(op)
    assert len(blob) < op.kernels.nbytes + 20_000  # kernels and nodes only: no spectra, no plan
    clone = pickle.loads(blob)
    assert clone._plan_cache is None and not clone._group_spectra
    assert clone._cache.token == op._cache.token  # same process: the spectra computed above are reused
    assert op.restrict((10, 10), (50, 50))._cache.token == op._cache.token
    np.testing.assert_array_equal(clone.apply(u), out)


def test_kernel_spectra_of_all_operators_share_one_budget(rng, monkeypatch):
    """Spectra cached by a process are bounded for all operators together (a long-lived Dask worker
    meets many; each load of a file is another operator), by an eighth of a worker's memory limit."""
    from distributed import Client, LocalCluster

    from lsfov import operators

    assert operators.spectra_budget() == 512 << 20 and operators.spectra_budget(1 << 30) == 128 << 20
    monkeypatch.setattr(operators, "_SPECTRA", operators._SpectraCache(1 << 20))
    u = rng.random((150, 170)).astype(np.float32)
    for _ in range(6):  # each makes ~0.5 MiB of spectra: the last two are kept
        _grid_op().apply(u)
    cache = operators._process_spectra()
    assert 0 < cache._nbytes <= 1 << 20 and len({key[0] for key in cache._items}) == 2
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="400MiB", dashboard_address=":0") as c, \
            Client(c) as client:
        assert client.submit(lambda: operators._process_spectra().budget).result() == (400 << 20) // 8
        # What a worker's cache holds comes with its memory, for the memory check of later runs
        op = _grid_op()
        client.submit(op.apply, u).result()
        nbytes, held = client.submit(lambda: (operators._SPECTRA.host_nbytes,
                                              sum(v.nbytes for v in operators._SPECTRA._items.values()))).result()
        assert nbytes == held  # (NumPy spectra: all in the worker's memory)
        # By a heartbeat after the apply (seconds apart on a loaded machine); one sent while the apply
        # was still filling the cache reports part of it.
        deadline = time.monotonic() + 60
        while True:
            (w,) = client.scheduler_info()["workers"].values()
            if w["metrics"].get(operators.SPECTRA_METRIC) == nbytes or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert w["metrics"][operators.SPECTRA_METRIC] == nbytes > 0


def test_fingerprint_follows_content_not_identity(tmp_path):
    op = _grid_op()
    again = ProductConvolution.load(op.save(tmp_path / "op.zarr"))  # a new object, as in another process
    assert again._token != op._token and again.fingerprint == op.fingerprint
    assert _grid_op(seed=2).fingerprint != op.fingerprint
    assert _basis_op().fingerprint == _basis_op().fingerprint != _basis_op(seed=3).fingerprint


def test_adjoint_ones_is_the_adjoint_of_the_image_indicator():
    for op in (_grid_op(), _basis_op()):
        ones = np.ones(op.shape, np.float32)
        np.testing.assert_allclose(op.adjoint_ones(), op.adjoint(ones), atol=1e-5)
        # An interior window takes the FFT-free formula; it must agree with the exact adjoint.
        r = op.halo
        win = op.restrict((r + 3, r + 5), (40, 50))
        np.testing.assert_allclose(win.adjoint_ones(), op.adjoint(ones)[r + 3 : r + 43, r + 5 : r + 55], atol=1e-5)
        # A window reaching beyond the image: exact on all but its outer halo.
        win = op.restrict((-r, -r), (op.shape[0] + 2 * r, op.shape[1] + 2 * r))
        ext = np.zeros(win.domain_shape, np.float32)
        ext[r:-r, r:-r] = 1
        big = op.restrict((-3 * r, -3 * r), (op.shape[0] + 6 * r, op.shape[1] + 6 * r))
        ref = big.adjoint(np.pad(ext, 2 * r))[2 * r : -2 * r, 2 * r : -2 * r]
        np.testing.assert_allclose(win.adjoint_ones()[r:-r, r:-r], ref[r:-r, r:-r], atol=1e-5)


@pytest.mark.parametrize("name", ["grid", "grid-uneven", "basis"])
def test_adjoint_ones_on_windows_across_the_border(name):
    # Bands near the image's edges take an exact adjoint, the rest the FFT-free formula (or zero):
    # every window must agree with the exact adjoint of the indicator on all but its outer halo.
    op = OPS[name]()
    H, W = op.shape
    r = op.halo
    m = 100  # margin of the reference window: more than any test window reaches beyond the image
    big = op.restrict((-m, -m), (H + 2 * m, W + 2 * m))
    mask = np.zeros(big.domain_shape, np.float32)
    mask[m : m + H, m : m + W] = 1
    exact = big.adjoint(mask)
    for oy, ox, h, w in [(-r - 5, 20, 60, 70), (H - 30, W - 40, 50, 60), (-3 * r, -3 * r, H + 6 * r, W + 6 * r),
                         (10, -2 * r, 40, 3 * r + 1), (-r, -r, H + 2 * r, W + 2 * r)]:
        got = op.restrict((oy, ox), (h, w)).adjoint_ones()
        ref = exact[oy + m : oy + m + h, ox + m : ox + m + w]
        np.testing.assert_allclose(got[r:-r, r:-r], ref[r:-r, r:-r], atol=1e-5, err_msg=str((oy, ox, h, w)))


def test_grid_nodes_sit_at_the_centres_of_equal_cells_by_default():
    op = ProductConvolution.from_grid(np.ones((3, 4, 5, 5), np.float32), (90, 100))
    for c, g, n in zip(op.centers, (3, 4), (90, 100)):
        np.testing.assert_allclose(c, (np.arange(g) + 0.5) * n / g - 0.5)  # 14.5, 44.5, 74.5 of 0..89


def test_basis_maps_extend_by_their_edge_values_beyond_the_image():
    """As documented (the extended field that deconvolution works on): a window reaching beyond every
    side is the operator of the maps padded with their edge values, exactly."""
    op = _basis_op()
    m = 11
    win = op.restrict((-m, -m), (op.shape[0] + 2 * m, op.shape[1] + 2 * m))
    ref = ProductConvolution.from_basis(op.kernels, np.pad(op.maps, ((0, 0), (m, m), (m, m)), mode="edge"))
    u = np.random.default_rng(4).random(win.domain_shape).astype(np.float32)
    for got, want in ((win.apply(u), ref.apply(u)), (win.adjoint(u), ref.adjoint(u))):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_bad_input():
    k = psf.gaussian(1.0, size=9)
    with pytest.raises(ValueError, match=r"\(gy, gx, K, K\)"):
        ProductConvolution.from_grid(k, (50, 50))
    with pytest.raises(ValueError, match="odd"):
        ProductConvolution.from_grid(np.ones((2, 2, 8, 8)), (50, 50))
    with pytest.raises(ValueError, match="larger than the image"):
        ProductConvolution.from_grid(np.ones((1, 1, 61, 61)), (50, 50))
    with pytest.raises(ValueError, match="NaN"):
        ProductConvolution.from_grid(np.full((1, 1, 3, 3), np.nan), (50, 50))
    with pytest.raises(ValueError, match="strictly increasing"):
        ProductConvolution.from_grid(np.ones((2, 1, 3, 3)), (50, 50), centers=([10, 5], [3]))
    with pytest.raises(ValueError, match="shape"):
        ProductConvolution.from_basis(np.ones((2, 3, 3)), np.ones((3, 50, 50)))
    op = ProductConvolution.from_grid(k[None, None], (50, 50))
    with pytest.raises(ValueError, match="does not match"):
        op.apply(np.ones((40, 50)))


@pytest.mark.parametrize("equal_cells", [False, True])
def test_cells_on_threads_give_the_bits_of_the_serial_loop(equal_cells, rng):
    # From the main thread the cell groups run on lsfov's pool (FFTs one thread each); from any
    # other thread (a Dask task) serially with multi-threaded FFTs. Same bits either way. Equal
    # cells overlap-add pass by pass over all bands: the order of the sums does not follow the bands.
    import threading

    from lsfov import _backend

    op = _grid_op(4, 4, shape=(300, 260))
    if equal_cells:
        op = _uniform(op.restrict((-7, -7), (314, 274)))
    u = rng.random(op.domain_shape).astype(np.float32)
    if _backend.threads_for(u) < 2:
        pytest.skip("one core (or LSFOV_FFT_WORKERS=1): no pool to compare with")
    main = op.apply(u), op.adjoint(u)
    other = {}
    t = threading.Thread(target=lambda: other.update(res=(op.apply(u), op.adjoint(u))))
    t.start()
    t.join()
    for a, b in zip(main, other["res"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", [
    (8, 8, 31, (512, 512), None),  # TV-RL's field extension: windows start before the image
    (8, 8, 31, (512, 512), (-15, -15, 542, 542)),
    (4, 3, 15, (400, 300), (37, 51, 123, 170)),  # a block inside: cells cut by the window
    (4, 4, 9, (256, 256), (-100, 50, 300, 120)),  # far beyond the image, fewer cells than nodes
    (3, 5, 21, (300, 500), None),
    (4, 4, 15, (300, 260), (-7, -7, 314, 274)),  # unequal spacings along y and x
    (3, 3, 1, (90, 90), None),  # no margins
])
def test_uniform_cells_give_the_operator_of_the_cells_by_fft_length(case, rng):
    gy, gx, k, shape, window = case
    op = _grid_op(gy, gx, k, shape)
    op = op.restrict(window[:2], window[2:]) if window else op
    uni = _uniform(op)
    assert uni._plan()[0].uniform and not op._plan()[0].uniform  # NumPy's default: by FFT length
    u = rng.random(op.domain_shape).astype(np.float32)
    v = rng.random(op.domain_shape).astype(np.float32)
    a, b = uni.apply(u), uni.adjoint(v)
    assert np.abs(a - op.apply(u)).max() < 3e-6 * np.abs(a).max()
    assert np.abs(b - op.adjoint(v)).max() < 3e-6 * np.abs(b).max()
    assert np.vdot(a.astype(np.float64), v) == pytest.approx(np.vdot(u.astype(np.float64), b), rel=1e-6)


def test_uniform_cells_only_for_equally_spaced_whole_pixel_nodes_and_within_the_area_limit():
    op = _grid_op(8, 8, 31, (2304, 2304))
    assert op._uniform_cells(op._cells(), limit=1.5) is not None  # 9x9 tiles of 320²: 1.27x the area
    assert op._uniform_cells(op._cells(), limit=1.2) is None
    assert _uniform(OPS["grid-uneven"]())._plan()[0].uniform is None  # unequal spacings
    assert _uniform(_grid_op(3, 3, 15, (100, 100)))._plan()[0].uniform is None  # spacing 33.3 px
    assert _uniform(_grid_op(4, 4, 31, (100, 100)))._plan()[0].uniform is None  # spacing 25 < 30 (2 r)


def test_graph_runs_replays_after_one_eager_run_and_falls_back_when_capture_fails(monkeypatch, caplog):
    """The CUDA-graph loop's order of events, on a stand-in for CuPy (CI has no GPU; tests/test_gpu.py
    runs the real one): one eager run, one captured (not run), n - 1 replays ordered after the eager
    run, the graph's pool freed only after a final synchronisation; a capture that fails leaves
    n - 1 eager runs and a warning. NumPy arrays, or CUDA_GRAPHS off: n eager runs."""
    import contextlib
    import logging
    import sys
    import types

    from lsfov import _backend

    events = []

    class Stream:
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def begin_capture(self):
            events.append("capture")

        def end_capture(self):
            events.append("end")
            if "fail" in events:
                raise RuntimeError("capture invalidated")
            return types.SimpleNamespace(launch=lambda stream: events.append("launch"))

        def record(self):
            return "event"

        def wait_event(self, event):
            events.append("wait")

        def synchronize(self):
            events.append("sync")

    class Pool:
        def malloc(self, n):
            pass

        def free_all_blocks(self):
            events.append("free")

    cuda = types.SimpleNamespace(Stream=Stream, MemoryPool=Pool, get_current_stream=Stream,
                                 using_allocator=lambda malloc: contextlib.nullcontext())
    cupy = types.SimpleNamespace(cuda=cuda, get_default_memory_pool=lambda: types.SimpleNamespace(
        free_all_blocks=lambda: events.append("release")))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    gpu_array = type("ndarray", (), {"__module__": "cupy"})()

    def runs(step, n, like):  # events seen at each yield (a progress bar's tick)
        return [len(events) for _ in _backend.graph_runs(step, n, like)]

    assert runs(lambda: events.append("step"), 4, gpu_array) == [1, 7, 8, 9]  # ticks after the run and each launch
    assert events == ["step", "release", "capture", "step", "end", "wait", "launch", "launch", "launch", "sync", "free"]
    events.clear()

    def step():
        events.append("step")
        if "capture" in events and "end" not in events:
            events.append("fail")  # e.g. a host synchronisation while capturing
            raise RuntimeError("not capturable")

    with caplog.at_level(logging.WARNING, logger="lsfov"):
        runs(step, 4, gpu_array)
    assert "CUDA graph not used" in caplog.text
    assert events.count("step") == 5 and "launch" not in events  # 1 + the failed capture + 3 eager
    for like, flag in ((np.zeros(1), True), (gpu_array, False)):
        events.clear()
        monkeypatch.setattr(_backend, "CUDA_GRAPHS", flag)
        runs(lambda: events.append("step"), 4, like)
        assert events == ["step"] * 4


def test_parallel_map_keeps_order_and_survives_fork(rng):
    import multiprocessing as mp

    from lsfov._backend import parallel_map

    items = list(range(12))
    assert list(parallel_map(lambda i: i * i, items, like=np.zeros(1))) == [i * i for i in items]
    op = _grid_op(4, 4, shape=(200, 200))
    u = rng.random(op.shape).astype(np.float32)
    ref = op.apply(u)  # the pool exists now; a forked child must not wait on its threads
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(op.apply, (u,)).get(timeout=60)
    np.testing.assert_array_equal(got, ref)


def test_banded_multiply_is_numpy_multiply(rng):
    from lsfov._backend import multiply

    a = (rng.standard_normal((1100, 1000)) + 1j * rng.standard_normal((1100, 1000))).astype(np.complex64)
    b = (rng.standard_normal((1100, 1000)) + 1j * rng.standard_normal((1100, 1000))).astype(np.complex64)
    ref = a * b
    np.testing.assert_array_equal(multiply(a, b), ref)
    out = multiply(a, b, out=a)  # in place, as the operator uses it
    assert out is a
    np.testing.assert_array_equal(a, ref)


def test_dask_tasks_run_their_ffts_on_one_thread():
    # A Dask pool thread shares the cores with the other tasks: one FFT thread inside a task body,
    # restored after it; the main thread (synchronous scheduler) keeps its setting.
    import threading

    from lsfov import _backend

    seen = {}

    def task():
        before = _backend._workers()
        with _backend.task_threads():
            seen["inside"] = _backend._workers()
        seen["after"] = _backend._workers()
        seen["before"] = before

    t = threading.Thread(target=task)
    t.start()
    t.join()
    assert seen == {"before": _backend._FFT_WORKERS, "inside": 1, "after": _backend._FFT_WORKERS}
    with _backend.task_threads():
        assert _backend._workers() == _backend._FFT_WORKERS
    # ... and so do the tasks of a lazy apply and adjoint (each its FFTs on its own thread).
    op = OPS["grid"]()
    seen, real = [], ProductConvolution._dispatch

    def spy(self, *a, **k):
        if threading.current_thread() is not threading.main_thread():  # (Dask's meta call runs on the main one)
            seen.append(_backend._workers())
        return real(self, *a, **k)

    ProductConvolution._dispatch = spy
    try:
        with dask.config.set(scheduler="threads"):
            op.apply(da.from_array(np.ones(op.shape, np.float32), chunks=60)).compute()
            op.adjoint(da.from_array(np.ones(op.shape, np.float32), chunks=60)).compute()
    finally:
        ProductConvolution._dispatch = real
    assert seen and set(seen) == {1}


def test_fft_shapes_of_a_tv_rl_iteration_fit_the_cufft_plan_cache(monkeypatch):
    """CuPy caches 16 cuFFT plans per thread; a grid operator's iteration needs more, cycled in the
    same order, so lsfov raises the cache to _CUFFT_PLANS (else every call would rebuild its plan)."""
    from collections import Counter

    import lsfov
    from lsfov import _backend

    monkeypatch.setattr(_backend, "_FFT_WORKERS", 1)  # one part per group, as on a GPU
    seen = []
    for name in ("rfft2", "irfft2", "rfft", "irfft", "fft", "ifft"):
        orig = getattr(_backend._ScipyFFT, name)

        def f(x, *a, _orig=orig, _name=name, **k):
            seen.append((_name, x.shape, x.dtype.str, a, tuple(sorted((n, v) for n, v in k.items() if n != "overwrite_x"))))
            return _orig(x, *a, **k)

        monkeypatch.setattr(_backend._ScipyFFT, name, staticmethod(f))
    op = _grid_op(8, 8, 31, (512, 512))
    y = np.random.default_rng(0).poisson(200, op.shape).astype(np.float32) + 1
    lsfov.deconvolve(y, op, 1)  # spectra, plans
    seen.clear()
    lsfov.deconvolve(y, op, 3)
    three = Counter(seen)
    seen.clear()
    lsfov.deconvolve(y, op, 2)
    per_iteration = three - Counter(seen)
    assert sum(per_iteration.values()) > 2 * len(per_iteration)  # shapes repeat: a cache pays
    assert 16 < len(per_iteration) <= _backend._CUFFT_PLANS


def test_cupy_fft_module_enlarges_a_small_plan_cache(monkeypatch):
    """fft_module on a CuPy array raises the thread's cuFFT plan cache to _CUFFT_PLANS, leaves a larger
    one and a switched-off one (size 0) alone. (Fake modules: runs without a GPU.)"""
    import sys
    import types

    from lsfov import _backend

    class Cache:
        size = 16

        def get_size(self):
            return self.size

        def set_size(self, n):
            self.size = n

    cache = Cache()
    cupy = types.ModuleType("cupy")
    cupy.fft = types.SimpleNamespace(config=types.SimpleNamespace(get_plan_cache=lambda: cache))
    cufft = types.ModuleType("cupyx.scipy.fft")
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.fft = cufft
    for name, mod in (("cupy", cupy), ("cupyx", cupyx), ("cupyx.scipy", cupyx.scipy), ("cupyx.scipy.fft", cufft)):
        monkeypatch.setitem(sys.modules, name, mod)
    fake = type("ndarray", (), {"__module__": "cupy"})()
    for before, after in ((16, _backend._CUFFT_PLANS), (4096, 4096), (0, 0)):
        cache.size = before
        assert _backend.fft_module(fake) is cufft
        assert cache.size == after


def test_from_psf_cleans_a_measured_psf(rng):
    """One measured PSF: negatives zeroed, normalised, padded to a square about its centre; even
    sizes, stacks and dark PSFs refused; an off-centre one warned about (it shifts the result)."""
    import lsfov

    k = psf.gaussian(1.5, 2.5, size=15)[2:13]  # 11 x 15, centred
    noisy = 300 * k + rng.normal(0, 0.5, k.shape)
    op = ProductConvolution.from_psf(noisy, (60, 70))
    assert op.kernels.shape == (1, 1, 15, 15)
    clean = np.maximum(noisy, 0) / np.maximum(noisy, 0).sum()
    np.testing.assert_allclose(op.kernels[0, 0, 2:13], clean, rtol=1e-5, atol=1e-9)
    assert op.kernels[0, 0, :2].sum() == 0 and op.kernels[0, 0, 13:].sum() == 0
    u = rng.random((60, 70)).astype(np.float32)
    np.testing.assert_allclose(op.apply(u), scipy.signal.fftconvolve(u, op.kernels[0, 0], mode="same"), atol=1e-5)
    for bad, match in ((np.ones((4, 5)), "odd sizes"), (np.ones((3, 5, 5)), "one 2-D PSF"),
                       (-np.ones((5, 5)), "no positive value")):
        with pytest.raises(ValueError, match=match):
            ProductConvolution.from_psf(bad, (60, 70))
    with pytest.warns(lsfov.LsfovWarning, match=r"centre of mass is \(\+0.0, \+3.0\) px"):
        ProductConvolution.from_psf(np.roll(psf.gaussian(1.0, 1.0, size=15), 3, axis=1), (60, 70))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a 1x1 PSF printed NumPy's "Mean of empty slice")
        for size in (1, 3):
            assert ProductConvolution.from_psf(np.ones((size, size)), (60, 70)).kernel_size == size


def test_new_kernels_make_a_new_operator_and_lazy_maps_are_hashed_by_content(rng):
    """Kernels assigned to an operator were once applied with the old ones' cached spectra; the
    fingerprint (what a resumed run is matched by) of lazy coefficient maps computed them whole (a
    basis operator's gigabytes), and, read by name, told an xarray's maps from its mirror image not."""
    import dask.array as da

    from lsfov import psf

    H = ProductConvolution.from_grid(np.stack([psf.gaussian(1.0, size=9)] * 4).reshape(2, 2, 9, 9), (64, 64))
    other = ProductConvolution.from_grid(np.stack([psf.gaussian(2.5, size=9)] * 4).reshape(2, 2, 9, 9), (64, 64))
    u = rng.random((64, 64)).astype(np.float32)
    before, key = H.apply(u), H.apply(da.from_array(u, chunks=32)).name
    with pytest.raises(ValueError, match="read-only"):  # in place the spectra and keys would stay the old ones'
        H.kernels[0, 0] *= 2
    H.kernels = other.kernels
    np.testing.assert_array_equal(H.apply(u), other.apply(u))
    import pickle

    mine = np.ones((2, 2, 9, 9), np.float32) / 81
    G = pickle.loads(pickle.dumps(ProductConvolution.from_grid(mine, (64, 64))))
    mine[0, 0] = 0  # the caller's own array stays writeable; the operator's parts do not, unpickled too
    assert not (G.kernels.flags.writeable or G.centers[0].flags.writeable)
    assert np.abs(H.apply(u) - before).max() > 0.1 and H.apply(da.from_array(u, chunks=32)).name != key
    # ... and the caller's arrays changed after: the operator is its own (it once read the new kernels
    # through a view, and applied the spectra of the old ones)
    mine = np.stack([psf.gaussian(1.0, size=9)] * 4).reshape(2, 2, 9, 9).astype(np.float32)
    mk = np.stack([psf.gaussian(s, size=9) for s in (1.0, 2.0)]).astype(np.float32)
    mm = rng.random((2, 64, 64)).astype(np.float32)
    G, B = ProductConvolution.from_grid(mine, (64, 64)), ProductConvolution.from_basis(mk, mm)
    ref = G.apply(u), B.apply(u), G.fingerprint, B.fingerprint
    mine[:], mk[:], mm[:] = 0, 0, 0
    np.testing.assert_array_equal(G.apply(u), ref[0])
    np.testing.assert_array_equal(B.apply(u), ref[1])
    assert (G.fingerprint, B.fingerprint) == ref[2:] and G.kernels.sum() > 0 and B.maps.sum() > 0
    assert np.shares_memory(B.restrict((8, 8), 32).maps, B.maps)  # its own parts: shared by its windows, not copied
    import xarray as xr

    maps = da.random.default_rng(0).random((2, 64, 64), chunks=32).astype(np.float32)
    k = np.stack([psf.gaussian(s, size=9) for s in (1.0, 2.0)])
    B = ProductConvolution.from_basis(k, maps)
    assert B.fingerprint == ProductConvolution.from_basis(k, maps + 0).fingerprint  # another graph, same values
    assert B.fingerprint != ProductConvolution.from_basis(k, maps * 2).fingerprint
    deep = maps.compute()
    deep[1, 40, 40] += 0.5  # one value deep inside a block: every byte of each block counts
    assert B.fingerprint != ProductConvolution.from_basis(k, da.from_array(deep, chunks=32)).fingerprint
    arr = xr.DataArray(maps.compute(), dims=("psf", "y", "x"), name="maps")
    mirror = arr.copy(data=arr.values[:, ::-1])
    assert ProductConvolution.from_basis(k, arr).fingerprint != ProductConvolution.from_basis(k, mirror).fingerprint


def test_assigned_parts_are_checked_as_the_constructors_check_them(rng):
    """``op.kernels = new`` (or centres, maps) makes another operator, checked as from_grid and
    from_basis check theirs: kernels that the grid does not index, an even K, a PSF without light,
    unsorted nodes or maps of another field were once taken and applied wrong, or saved and then
    refused on loading."""
    from lsfov import psf

    H = ProductConvolution.from_grid(np.stack([psf.gaussian(1.0, size=9)] * 4).reshape(2, 2, 9, 9), (64, 64))
    u = rng.random((64, 64)).astype(np.float32)
    before = H.apply(u)
    cases = [("kernels", np.ones((3, 3, 9, 9)), "2 node y-centres given for a grid of 3 PSFs along y; for another grid"),
             ("kernels", np.ones((2, 2, 8, 8)), r"kernels must have an odd size \(centre at K//2\), got K=8"),
             ("kernels", np.zeros((2, 2, 9, 9)), r"the PSF at node \(0, 0\) sums to 0"),
             ("centers", ([40.0, 10.0], H.centers[1]), "node y-centres must be finite and strictly increasing$"),
             ("maps", np.ones((4, 64, 64)), "a grid operator has no coefficient maps")]
    for name, value, what in cases:
        with pytest.raises(ValueError, match=f"cannot set {name}: {what}"):
            setattr(H, name, value)
    np.testing.assert_array_equal(H.apply(u), before)  # refused: the operator as it was
    H.centers = ([10, 40], [12, 44])  # lists, checked into read-only arrays
    assert H.centers[0].dtype == np.float64 and not H.centers[0].flags.writeable
    np.testing.assert_allclose(H.apply(u), ProductConvolution.from_grid(H.kernels, (64, 64), centers=H.centers).apply(u))
    B = ProductConvolution.from_basis(np.ones((2, 5, 5)) / 25, np.ones((2, 64, 64)))
    for maps, what in ((np.ones((2, 32, 64)), "maps of 32x64 px for an operator of 64x64"),
                       (np.full((2, 64, 64), np.nan), "coefficient maps contain NaN or Inf")):
        with pytest.raises(ValueError, match=f"cannot set maps: {what}"):
            B.maps = maps
    # xarray maps in memory are the operator's own copy, checked, as NumPy maps are
    mine = xr.DataArray(np.ones((2, 64, 64), np.float32), dims=("i", "y", "x"))
    B = ProductConvolution.from_basis(np.ones((2, 5, 5)) / 25, mine)
    out = B.apply(u)
    mine.values[:] = 5
    np.testing.assert_array_equal(B.apply(u), out)
    mine.values[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="coefficient maps contain NaN or Inf"):
        ProductConvolution.from_basis(np.ones((2, 5, 5)) / 25, mine)
    # a window's origin is whole pixels: 2.7 was cut to 2
    assert H.restrict((2.0, np.int64(3)), 16).window == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"origin must be a pair \(y, x\) of integer pixel positions, got \(2.7, 0\)"):
        H.restrict((2.7, 0), 16)


def test_an_operator_pickled_before_its_parts_were_properties_loads(rng):
    """Pickles of old (a Dask graph kept on disk, a cache) hold ``kernels``, ``centers`` and ``maps``
    by those names: they load, and apply as before."""
    from lsfov import psf

    H = ProductConvolution.from_grid(np.stack([psf.gaussian(s, size=9) for s in (1, 2, 1.5, 3)]).reshape(2, 2, 9, 9),
                                     (64, 64))
    state = H.__getstate__()
    for name in ("kernels", "centers", "maps"):
        state[name] = state.pop("_" + name)
    old = ProductConvolution.__new__(ProductConvolution)
    old.__setstate__(state)
    u = rng.random((64, 64)).astype(np.float32)
    np.testing.assert_array_equal(old.apply(u), H.apply(u))


def test_an_operator_is_one_key_of_a_dask_graph_not_a_copy_in_every_task(rng):
    """distributed sends each task on its own: an operator inside every task crossed the network
    (and was unpickled) once per task, hundreds of megabytes for a calibrated one."""
    import cloudpickle
    import dask.array as da

    from lsfov import psf

    maps = rng.random((2, 256, 256)).astype(np.float32)  # 0.5 MB: what a task must not carry
    B = ProductConvolution.from_basis(np.stack([psf.gaussian(s, size=9) for s in (1.0, 2.0)]), maps)
    u = da.from_array(rng.random((256, 256)).astype(np.float32), chunks=64)
    for lazy in (B.apply(u), B.adjoint(u), lsfov.deconvolve(u, B, iterations=2),
                 lsfov.sparse_smooth_deblur(u, B, iterations=2)[0]):
        sizes = [len(cloudpickle.dumps(task)) for task in dict(lazy.__dask_graph__()).values()]
        assert sum(s > 200_000 for s in sizes) == 1, sorted(sizes)[-3:]
    # what a worker holding it counts in its memory (Dask's own estimate of an object: some bytes)
    from dask.sizeof import sizeof

    assert sizeof(B) >= maps.nbytes + B.kernels.nbytes and sizeof(lsfov.load_model("G1")) > 5e6
    # lazy maps are not in the worker's memory: a 3.2 GB graph of them weighs the kernels alone
    huge = ProductConvolution.from_basis(B.kernels, da.zeros((2, 20000, 20000), chunks=2000, dtype=np.float32))
    assert sizeof(huge) < 1e6


def test_a_psf_with_a_background_floor_is_warned_about_and_a_cut_one_is_not():
    """A camera offset left in a measured PSF is as bright in the corners as mid-edge (above 2 % of
    the peak); a PSF cut by its box is brighter mid-edge; a floor under 2 % is let pass."""
    import warnings

    g = psf.gaussian(1.5, size=15)
    with pytest.warns(lsfov.LsfovWarning, match="the PSF's border is at 3% of its peak all round"):
        ProductConvolution.from_psf(g + 0.03 * g.max(), (64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProductConvolution.from_psf(g + 0.015 * g.max(), (64, 64))
        ProductConvolution.from_psf(psf.gaussian(4.0, size=11), (64, 64))  # cut: corners 0.3 of mid-edge


def test_the_spectra_cache_evicts_the_least_recently_used():
    from lsfov import operators

    cache = operators._SpectraCache(3 * 800)
    made = []

    def make(key):
        made.append(key)
        return np.zeros(100)  # 800 bytes

    for key in "abc":
        cache.get(key, lambda key=key: make(key))
    cache.get("a", lambda: make("a"))  # a hit: "a" is now the most recent, nothing made
    cache.get("d", lambda: make("d"))  # over budget: "b", the least recent, goes
    assert made == list("abcd") and list(cache._items) == list("cad")
    assert cache._nbytes == cache.host_nbytes == 3 * 800
    big = cache.get("e", lambda: np.zeros(1000))  # over the budget alone: kept (the last one always is)
    assert list(cache._items) == ["e"] and cache._nbytes == cache.host_nbytes == big.nbytes


@pytest.mark.parametrize("centers", [None, ([3.0, 20.5, 41, 70, 90.2, 117], [5.0, 33, 34.5, 60, 99, 120, 140]),
                                     ([0.0, 20, 40, 60, 95, 120], [9.0, 29, 49, 69, 89, 109, 129])])
def test_the_windows_of_a_stored_grid_compute_what_the_whole_grid_does_there(centers, tmp_path, monkeypatch):
    """A run's state keeps a large grid's kernels on disk and its block tasks read the nodes that act
    on their windows: the same cells, weights and FFTs as the grid in memory, bit for bit, for
    windows inside, across and beyond the grid, periodic or not, planned by cells or by equal
    cells (a grid equally spaced in part only), each reading only its window's nodes."""
    from lsfov import operators
    from lsfov.restore import scratch

    rng = np.random.default_rng(0)
    gy, gx = (5, 6) if centers is None else (6, 7)
    k = 9 if centers is None else 7
    op = ProductConvolution.from_grid(np.abs(rng.normal(size=(gy, gx, k, k))).astype(np.float32) + 0.1, (121, 150),
                                      centers=centers)
    monkeypatch.setattr(scratch, "STORE_OPERATOR_BYTES", 0)
    (tmp_path / "done").mkdir()
    read = []
    real = operators.ProductConvolution._node_kernels
    monkeypatch.setattr(operators.ProductConvolution, "_node_kernels",
                        lambda self, ids: (read.append(real(self, ids).shape[0]), real(self, ids))[1])
    for uniform in (None, True):
        op.uniform_cells = uniform
        stored = scratch.store_operator(op, tmp_path)
        assert operators.on_disk(stored.kernels) and not operators.on_disk(op.kernels)
        for origin in [(-4, -4), (0, 0), (10, 37), (50, 60), (100, 120), (117, 140), (-10, 130), (30, -9), (21, 30)]:
            for shape in [(20, 25), (40, 40), (8, 64), (80, 90), (19, 19)]:
                for periodic in (False, True):
                    whole, part = (o.restrict(origin, shape, periodic=periodic) for o in (op, stored))
                    u = rng.random(shape).astype(np.float32)
                    for f in ("apply", "adjoint"):
                        np.testing.assert_array_equal(getattr(part, f)(u), getattr(whole, f)(u))
                    np.testing.assert_array_equal(part.adjoint_ones(), whole.adjoint_ones())
    assert np.mean(np.array(read) < op.n_psfs) > 0.5  # (those of the grid in memory too: a window's nodes)


def test_a_saved_operator_opens_in_xarray_with_its_node_coordinates(tmp_path):
    import warnings

    import xarray as xr

    op = _grid_op()
    op.save(tmp_path / "op.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated: no warning of xarray's about reading it slowly
        ds = xr.open_zarr(tmp_path / "op.zarr")
    assert set(ds.coords) == {"centers_y", "centers_x"} and list(ds.data_vars) == ["kernels"]
    np.testing.assert_array_equal(ds.kernels.centers_x.values, op.centers[1])
    assert ds.centers_y.attrs["units"] == ds.centers_x.attrs["units"] == "pixel"  # (not µm: pixel indices)


def test_a_stored_grid_keeps_the_whole_grids_equal_cells_to_the_bit(tmp_path, monkeypatch):
    """Equal cells (the GPU's plan) weigh each pixel by its place in a cell, counted from the grid's
    first node: a window of the grid stored in a run's state, hundreds of fractional spacings on,
    weighs them as the grid in memory does (a part counted from its own first node rounded a
    float32 weight otherwise in one window in three), and keeps the plan chosen for the grid."""
    from lsfov.restore import scratch

    rng = np.random.default_rng(0)
    cy, cx = 0.970137274503966 + 33 * np.arange(400.0), np.array([16.0, 49.0])
    op = ProductConvolution.from_grid(np.abs(rng.normal(size=(400, 2, 7, 7))).astype(np.float32) + 0.1, (13200, 66),
                                      centers=(cy, cx))
    op.uniform_cells = True
    monkeypatch.setattr(scratch, "STORE_OPERATOR_BYTES", 0)
    (tmp_path / "done").mkdir()
    stored = scratch.store_operator(op, tmp_path)
    for o in range(3268, 3302):
        whole, part = op.restrict((o, 0), (40, 66)), stored.restrict((o, 0), (40, 66))
        assert part._plan()[0].uniform and whole._plan()[0].uniform
        u = rng.random((40, 66)).astype(np.float32)
        np.testing.assert_array_equal(part.apply(u), whole.apply(u))
        np.testing.assert_array_equal(part.adjoint(u), whole.adjoint(u))
    op.uniform_cells = False  # another plan for the same operator
    assert not scratch.store_operator(op, tmp_path).restrict((3270, 0), (40, 66))._plan()[0].uniform


def test_a_grid_whose_kernels_stay_on_disk_is_the_grid_in_memory(rng, tmp_path, monkeypatch):
    """A slide's PSF map holds gigabytes of kernels: a grid may keep them in a zarr array, read by
    the windows that use them. It is the same operator, bit for bit (apply, adjoint, by Dask chunks,
    windows, local PSFs, sums), it travels in a graph as its store's name, and a saved one loads
    back on disk over the size limit."""
    import pickle

    import zarr

    from lsfov import operators

    mem = _grid_op(gy=5, gx=6, k=15, shape=(150, 170))
    operators.copy_kernels(mem.kernels, tmp_path / "k")
    disk = ProductConvolution.from_grid(zarr.open_array(str(tmp_path / "k"), mode="r"), mem.shape,
                                        centers=mem.centers)
    assert operators.on_disk(disk.kernels) and not operators.on_disk(mem.kernels)
    u = rng.random(mem.shape, dtype=np.float32)
    v = rng.random(mem.shape, dtype=np.float32)
    for f in ("apply", "adjoint"):
        np.testing.assert_array_equal(getattr(disk, f)(u), getattr(mem, f)(u))
        np.testing.assert_array_equal(getattr(disk, f)(da.from_array(u, chunks=64)).compute(),
                                      getattr(mem, f)(da.from_array(u, chunks=64)).compute())
    win = ((40, -7), (60, 90))
    np.testing.assert_array_equal(disk.restrict(*win).apply(u[40:100, :90]), mem.restrict(*win).apply(u[40:100, :90]))
    assert np.vdot(disk.apply(u), v) == pytest.approx(np.vdot(u, disk.adjoint(v)), rel=1e-5)
    np.testing.assert_array_equal(disk.kernel_sums(), mem.kernel_sums())
    np.testing.assert_array_equal(disk.kernel_sums(), mem.kernels.sum(axis=(-2, -1), dtype=np.float64))
    np.testing.assert_array_equal(disk.local_psfs(), mem.local_psfs())
    np.testing.assert_array_equal(disk.adjoint_ones(), mem.adjoint_ones())
    for y, x in ((-0.5, -0.5), (75.3, 100.7), (149.5, 169.5), (0, 169.5)):
        np.testing.assert_array_equal(disk.psf_at(y, x), mem.psf_at(y, x))
    assert len(pickle.dumps(disk)) < mem.kernels.nbytes / 5  # its store's name, not its kernels
    assert pickle.loads(pickle.dumps(disk)).fingerprint == disk.fingerprint
    # Saved and loaded: kept on disk over KERNELS_ON_DISK_BYTES, read into memory under it.
    disk.save(tmp_path / "op.zarr")
    monkeypatch.setattr(operators, "KERNELS_ON_DISK_BYTES", mem.kernels.nbytes - 1)
    back = ProductConvolution.load(tmp_path / "op.zarr")
    assert operators.on_disk(back.kernels)
    np.testing.assert_array_equal(back.apply(u), mem.apply(u))
    said = lsfov.io.describe(tmp_path / "op.zarr").splitlines()  # (lsfov info)
    assert said[2] == f"  kernels {mem.kernels.nbytes / 2**10:.3g} KiB (on disk, read window by window)", said
    monkeypatch.setattr(operators, "KERNELS_ON_DISK_BYTES", mem.kernels.nbytes)
    small = ProductConvolution.load(tmp_path / "op.zarr")
    assert isinstance(small.kernels, np.ndarray)
    np.testing.assert_array_equal(small.kernels, mem.kernels)
    assert lsfov.io.describe(tmp_path / "op.zarr").splitlines()[2].endswith("KiB (read into memory)")


def test_kernels_on_disk_are_checked_as_those_in_memory(tmp_path):
    """NaN, a kernel without light or an empty store are refused as they are in memory, found as
    the kernels are read slab by slab."""
    import zarr

    from lsfov import operators

    k = psf.gaussian(np.full(12, 2.0), size=9).reshape(3, 4, 9, 9)
    for name, change, err, msg in (("nan", (1, 2, 4, 4, np.nan), ValueError, "NaN or Inf"),
                                   ("dark", (2, 3, slice(None), slice(None), 0.0), ValueError,
                                    r"the PSF at node \(2, 3\) sums to 0")):
        bad = k.copy()
        bad[change[:-1]] = change[-1]
        z = operators.copy_kernels(bad, tmp_path / name)
        with pytest.raises(err, match=msg):
            ProductConvolution.from_grid(z, (64, 64))
    empty = zarr.create_array(str(tmp_path / "empty"), shape=(0, 4, 9, 9), chunks=(1, 4, 9, 9), dtype=np.float32)
    with pytest.raises(ValueError, match="psfs is empty"):
        ProductConvolution.from_grid(empty, (64, 64))
    text = zarr.create_array(str(tmp_path / "text"), shape=(1, 1, 9, 9), dtype="complex64")
    with pytest.raises(TypeError, match="real numeric array"):
        ProductConvolution.from_grid(text, (64, 64))
