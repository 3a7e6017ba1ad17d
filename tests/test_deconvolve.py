import logging
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import ProductConvolution, psf
from lsfov import simulate as sim
from lsfov.restore import chunked
from lsfov.restore.tv_rl import DEFAULT_TV, _div, _grad, tv_curvature


def _snr(x, truth):
    return 10 * np.log10((truth**2).sum() / ((x - truth) ** 2).sum())


@pytest.fixture(scope="module")
def scene(blurred_cell):
    return blurred_cell


def _basis_op(shape, seed=3):
    """A basis operator whose local PSFs stay positive (mean kernel + small signed components)."""
    rng = np.random.default_rng(seed)
    g = psf.gaussian(np.array([1.5, 2.5, 2.0]), size=11)
    kernels = np.stack([g.mean(0), g[0] - g[1], g[2] - g[0]])
    yy, xx = np.mgrid[: shape[0], : shape[1]] / max(shape)
    maps = np.stack([np.ones(shape), 0.4 * yy, 0.3 * xx * rng.random()]).astype(np.float32)
    return ProductConvolution.from_basis(kernels, maps)


# ---------------------------------------------------------------------------------------------- maths


def test_divergence_is_minus_the_adjoint_of_the_gradient():
    rng = np.random.default_rng(0)
    x, py, px = (rng.standard_normal((30, 41)).astype(np.float32) for _ in range(3))
    gy, gx = _grad(x)
    assert np.vdot(gy, py) + np.vdot(gx, px) == pytest.approx(-np.vdot(x, _div(py, px)), rel=1e-5)


def test_tv_curvature_of_a_cone_is_one_over_the_radius():
    yy, xx = np.mgrid[:121, :121]
    rho = np.hypot(yy - 60.3, xx - 60.6).astype(np.float32)
    c = tv_curvature(rho, 1e-6)  # level sets are circles: div(grad/|grad|) = 1 / radius
    for r in (10, 25, 50):
        ring = np.abs(rho - r) < 0.5
        assert c[ring].mean() * r == pytest.approx(1.0, abs=0.01)
    ramp = (3 * yy + 2 * xx).astype(np.float32)  # straight level lines: zero curvature inside
    assert np.abs(tv_curvature(ramp, 1e-3)[1:-1, 1:-1]).max() < 1e-5
    # eps enters squared, a number as an array of it: at a unit step, 1/sqrt(1 + eps²)
    step = np.tile(np.array([0, 0, 1, 1], np.float32), (4, 1))
    assert tv_curvature(step, 2.0)[1, 1] == pytest.approx(1 / np.sqrt(5), rel=1e-6)
    np.testing.assert_array_equal(tv_curvature(step, 2.0), tv_curvature(step, np.full(step.shape, 2.0)))


# ---------------------------------------------------------------------------------------------- references


def test_one_psf_matches_skimage_richardson_lucy_away_from_the_borders():
    from skimage.restoration import richardson_lucy

    rng = np.random.default_rng(1)
    sharp = sim.sample_image("camera", (192, 200)) + 0.05
    k = psf.gaussian(1.8, 2.6, size=15)
    op = ProductConvolution.from_grid(k[None, None], sharp.shape)
    y = rng.poisson(op.apply(sharp) * 200).astype(np.float32)
    n, r = 5, op.halo
    ours = lsfov.deconvolve(y, op, n, tv=0)
    ref = richardson_lucy(y, k, num_iter=n, clip=False)
    m = 2 * r * n  # the borders are handled differently (field extension vs zero padding)
    inner = (slice(m, -m), slice(m, -m))
    np.testing.assert_allclose(ours[inner], ref[inner], rtol=2e-4, atol=2e-4 * ref.max())
    assert np.abs(ours - ref).max() > 1e-3 * ref.max()  # ... and near the borders they do differ


def test_tv_rl_is_eq13_written_out():
    """Paper 000 Eq. 13 in float64 NumPy, one PSF, as the README states it:
    ``x ← x / (1 − λ div(∇x / |∇x|ε)) · Hᵀ(y / Hx) / Hᵀ1`` with ``|∇x|ε = sqrt(|∇x|² + (ε (x + mean y))²)``
    (mean y in x's units: the PSF's sum is 1), forward differences for ∇ and backward ones for div. Equal away from the borders (handled as in
    the skimage test above), so the TV weight, the local ε and the order of the steps are pinned."""
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(4)
    sharp = sim.sample_image("camera", (160, 176)) + 0.05
    k = psf.gaussian(1.6, 2.2, size=13)
    op = ProductConvolution.from_grid(k[None, None], sharp.shape)
    y = rng.poisson(op.apply(sharp) * 300).astype(np.float64)
    n, tv, eps = 4, 0.05, 0.3
    scale = y.mean()
    x = np.full(y.shape, scale)
    for _ in range(n):
        c = fftconvolve(y / np.maximum(fftconvolve(x, k, mode="same"), 1e-6 * scale), k[::-1, ::-1], mode="same")
        gy, gx = np.zeros_like(x), np.zeros_like(x)
        gy[:-1], gx[:, :-1] = x[1:] - x[:-1], x[:, 1:] - x[:, :-1]
        norm = np.sqrt(gy**2 + gx**2 + (eps * (x + scale)) ** 2)
        py, px = gy / norm, gx / norm
        div = py - np.pad(py, ((1, 0), (0, 0)))[:-1] + px - np.pad(px, ((0, 0), (1, 0)))[:, :-1]
        x = np.maximum(x * c / (1 - tv * div), 0)
    ours = lsfov.deconvolve(y.astype(np.float32), op, n, tv=tv, eps=eps)
    m = (2 * op.halo + 1) * n
    inner = (slice(m, -m), slice(m, -m))
    np.testing.assert_allclose(ours[inner], x[inner], rtol=2e-4, atol=2e-4 * x.max())
    assert np.abs(x - lsfov.deconvolve(y.astype(np.float32), op, n, tv=0)).max() > 0.01 * x.max()  # TV matters here


@pytest.mark.parametrize("form", ["grid", "basis"])
def test_tv_acts_alike_whether_the_psfs_are_normalised_or_not(scene, form):
    """The TV term's local ε is relative to the image's mean in x's units: PSFs of sum 100 deblur to
    the same image divided by 100, TV included (it was relative to the mean of y: 3.5 % apart)."""
    op, y, _ = scene
    y = y[:96, :112]
    if form == "grid":
        k = np.stack([psf.gaussian(s, size=11) for s in (1.2, 1.6, 2.0, 2.4)]).reshape(2, 2, 11, 11)
        one, hundred = ProductConvolution.from_grid(k, y.shape), ProductConvolution.from_grid(100 * k, y.shape)
    else:
        one = _basis_op(y.shape)
        hundred = ProductConvolution.from_basis(100 * np.asarray(one.kernels), np.asarray(one.maps))
    ref = lsfov.deconvolve(y, one, 12)
    np.testing.assert_allclose(100 * lsfov.deconvolve(y, hundred, 12), ref, rtol=1e-4, atol=1e-4 * ref.max())
    chunked_ = lsfov.deconvolve(da.from_array(y, chunks=48), hundred, 12, exchange_every=4).compute()
    np.testing.assert_allclose(100 * chunked_, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_deconvolution_raises_the_snr(scene):
    op, y, truth = scene
    plain = lsfov.deconvolve(y, op, 20, tv=0)
    regular = lsfov.deconvolve(y, op, 20)
    assert _snr(plain, truth) > _snr(y, truth) + 1.0
    assert _snr(regular, truth) > _snr(plain, truth)  # the default TV weight helps on this noise


def test_tv_reduces_noise_on_a_noisy_flat_image():
    rng = np.random.default_rng(2)
    k = psf.gaussian(2.0, size=13)
    op = ProductConvolution.from_grid(k[None, None], (128, 128))
    y = rng.poisson(50.0, (128, 128)).astype(np.float32)
    inner = (slice(20, -20), slice(20, -20))
    plain = lsfov.deconvolve(y, op, 20, tv=0)[inner]
    smooth = lsfov.deconvolve(y, op, 20, tv=0.05)[inner]
    assert smooth.std() < 0.7 * plain.std()
    assert smooth.mean() == pytest.approx(50.0, rel=0.02)


def test_flux_is_preserved(monkeypatch):
    from lsfov.restore import tv_rl

    rng = np.random.default_rng(3)
    img = np.zeros((160, 160), np.float32)
    pos = rng.integers(40, 120, (30, 2))
    img[pos[:, 0], pos[:, 1]] = rng.uniform(500, 2000, 30)
    op, _ = sim.psf_field(img.shape, "Z3", (2, 2), seed=4, size=21)
    y = rng.poisson(op.apply(img) + 1.0).astype(np.float32)
    # RL with the H^T 1 normaliser keeps sum over the image of H x equal to sum(y) after every step
    # (sum_j (H^T 1)_j x'_j = sum_j x_j H^T(y / Hx)_j = sum(y)): each step of the real run, on its
    # periodic window of the extended field, is checked. Measured 1.5e-7; a 1/max normaliser: 1e-2 to 2e-2.
    real, r, errors = tv_rl._iterate, op.halo, []

    def stepwise(win, y_ext, x, n, *args, **kw):
        for _ in range(n):
            x = real(win, y_ext, x, 1, *args, **kw)
            hx = win.apply(x, check=False).astype(np.float64)
            errors.append(abs(hx[r : r + 160, r : r + 160].sum() / y.sum(dtype=np.float64) - 1))
        return x

    monkeypatch.setattr(tv_rl, "_iterate", stepwise)
    lsfov.deconvolve(y, op, 15, tv=0.0)
    assert len(errors) == 15 and max(errors) < 1e-5, errors
    monkeypatch.undo()
    for tv, tol in ((0.0, 1e-4), (lsfov.restore.DEFAULT_TV, 3e-2)):  # TV trims bright peaks a little
        x = lsfov.deconvolve(y, op, 15, tv=tv)
        # Sources well inside the field: the flux of the estimate is the flux of the data.
        assert x.sum() == pytest.approx(y.sum(), rel=tol + 2e-3)
        assert x.min() >= 0


def test_the_result_is_in_the_images_units(scene):
    """Counts or any unit: an image 1e-8 times as bright deblurs to 1e-8 times the result (the ratio's
    floor and TV's ε are relative to the image's mean, not absolute)."""
    op, y, _ = scene
    ref = lsfov.deconvolve(y, op, 8)
    np.testing.assert_allclose(lsfov.deconvolve(y * np.float32(1e-8), op, 8) / np.float32(1e-8), ref,
                               rtol=1e-4, atol=1e-4 * ref.max())


def test_signed_basis_operator_gives_a_non_negative_estimate():
    op = _basis_op((90, 100))
    y = np.random.default_rng(5).poisson(op.apply(np.full(op.shape, 20, np.float32))).astype(np.float32)
    x = lsfov.deconvolve(y, op, 10)
    assert x.min() >= 0 and np.isfinite(x).all()
    # a basis whose largest kernel sum is negative (-g with maps -1: the blur g): as g itself
    g = psf.gaussian(1.8, size=11)
    flipped = ProductConvolution.from_basis(-g[None], -np.ones((1,) + op.shape, np.float32))
    ref = lsfov.deconvolve(y, ProductConvolution.from_psf(g, op.shape), 10)
    np.testing.assert_allclose(lsfov.deconvolve(y, flipped, 10), ref, rtol=1e-5, atol=1e-5 * ref.max())


def test_rl_is_stable_to_tiny_perturbations(scene):
    """The local-brightness TV smoothing keeps the iteration well conditioned (see tv_rl docs)."""
    op, y, _ = scene
    y2 = (y * (1 + 1e-6 * np.random.default_rng(6).standard_normal(y.shape))).astype(np.float32)
    a = lsfov.deconvolve(y, op, 20, tv=0.1)
    b = lsfov.deconvolve(y2, op, 20, tv=0.1)
    assert np.abs(a - b).max() < 1e-4 * a.max()


# ---------------------------------------------------------------------------------------------- chunked


OPERATORS = {
    "grid-3x3": lambda s: sim.psf_field(s, "Z3", (3, 3), seed=1, size=15)[0],
    "one-psf": lambda s: ProductConvolution.from_grid(psf.gaussian(2.0, 3.0, size=13)[None, None], s),
    "basis": _basis_op,
    # no blur: only TV moves information (one pixel an iteration), which the halo must still carry
    "one-pixel": lambda s: ProductConvolution.from_psf(np.ones((1, 1), np.float32), s),
}


def test_chunking_settings_on_an_in_memory_image_are_warned(scene, tmp_path):
    _, y, _ = scene
    op = OPERATORS[sorted(OPERATORS)[0]](y.shape)
    for kw in ({"scratch": tmp_path}, {"exchange_every": 2}):
        with pytest.warns(lsfov.LsfovWarning, match="act on Dask input"):
            out = lsfov.deconvolve(y, op, 2, **kw)
        np.testing.assert_array_equal(out, lsfov.deconvolve(y, op, 2))
        with pytest.warns(lsfov.LsfovWarning, match="act on Dask input"):  # sparse+smooth alike
            sparse, _ = lsfov.sparse_smooth_deblur(y, op, iterations=2, warn_dense=1.0, **kw)
        np.testing.assert_array_equal(sparse, lsfov.sparse_smooth_deblur(y, op, iterations=2, warn_dense=1.0)[0])
    assert not any(tmp_path.iterdir())  # and nothing written there


@pytest.mark.parametrize("name", sorted(OPERATORS))
@pytest.mark.parametrize("chunks, every", [((64, 80), None), (100, 1), (100, 3), ((57, 300), 2)])
def test_chunked_equals_whole(scene, name, chunks, every):
    _, y, _ = scene
    op = OPERATORS[name](y.shape)
    whole = lsfov.deconvolve(y, op, 7)
    lazy = lsfov.deconvolve(da.from_array(y, chunks=chunks), op, 7, exchange_every=every)
    assert isinstance(lazy, da.Array) and lazy.chunks == da.from_array(y, chunks=chunks).chunks
    np.testing.assert_allclose(lazy.compute(), whole, rtol=0, atol=1e-5 * whole.max())


def test_the_halo_is_exact_and_no_larger_than_needed(scene, monkeypatch):
    """With one pixel less of halo per iteration the chunked result is wrong: the test can fail."""
    op, y, _ = scene
    whole = lsfov.deconvolve(y, op, 4)
    monkeypatch.setattr(chunked, "spread_per_iteration", lambda op, tv: 2 * op.halo - 1)
    short = lsfov.deconvolve(da.from_array(y, chunks=64), op, 4, exchange_every=2).compute()
    assert np.abs(short - whole).max() > 1e-4 * whole.max()


def test_chunks_smaller_than_the_halo_are_grown(scene, tmp_path):
    op, y, _ = scene
    whole = lsfov.deconvolve(y, op, 3)
    tiny = lsfov.deconvolve(da.from_array(y, chunks=10), op, 3, exchange_every=3)  # halo 42 > 10
    np.testing.assert_allclose(tiny.compute(), whole, atol=1e-5 * whole.max())
    # Through zarr too: the grown blocks must not share a zarr chunk (concurrent writes would race).
    with dask.config.set(scheduler="threads", num_workers=4):
        grown = lsfov.deconvolve(da.from_array(y, chunks=10), op, 3, exchange_every=3, scratch=tmp_path)
    np.testing.assert_allclose(grown.compute(), whole, atol=1e-5 * whole.max())


def test_blocks_that_mostly_compute_their_halo_are_said(scene):
    """Tiny chunks are correct but slow: the run says how many times the image's pixels it computes."""
    from lsfov.restore.halo import overhead

    # Blocks (10, 20, 10) with a 5 px halo: windows 15 + 30 + 15 = 60 of 40 pixels per axis.
    assert overhead(((10, 20, 10), (40,)), 5) == pytest.approx(1.5)
    assert overhead(((10, 20, 10), (10, 20, 10)), 5) == pytest.approx(2.25)
    assert overhead(((40,), (40,)), 0) == 1.0
    op, y, _ = scene
    with pytest.warns(lsfov.LsfovWarning, match=r"on chunks of 10x10 px .* the image's pixels every iteration; "
                      r"larger chunks are faster") as rec:
        lsfov.deconvolve(da.from_array(y, chunks=10), op, 3, exchange_every=3)
    assert next(w for w in rec if "every iteration" in str(w.message)).filename == __file__  # the user's line
    with pytest.warns(lsfov.LsfovWarning, match="sparse[+]smooth on chunks of 10x10"):
        lsfov.sparse_smooth_deblur(da.from_array(y, chunks=10), op, iterations=3, exchange_every=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "(?s).*halo", lsfov.LsfovWarning)
        lsfov.deconvolve(da.from_array(y, chunks=y.shape), op, 3)  # one block: no halo
        lsfov.deconvolve(da.from_array(y, chunks=(y.shape[0], y.shape[1] // 2)), op, 3, exchange_every=1)


def test_scratch_mode_equals_whole_and_cleans_nothing_it_should_not(scene, tmp_path):
    op, y, _ = scene
    whole = lsfov.deconvolve(y, op, 6)
    out = lsfov.deconvolve(da.from_array(y, chunks=(70, 90)), op, 6, scratch=tmp_path / "s", progress=True)
    np.testing.assert_allclose(out.compute(), whole, atol=1e-5 * whole.max())
    assert list((tmp_path / "s").iterdir())  # the returned array reads from here


def test_distributed_local_cluster_equals_whole(scene, tmp_path):
    from lsfov.cluster import use_scheduler

    op, y, _ = scene
    whole = lsfov.deconvolve(y, op, 4)
    with use_scheduler("local", n_workers=2):
        lazy = lsfov.deconvolve(da.from_array(y, chunks=100), op, 4).compute()
        scratch = lsfov.deconvolve(da.from_array(y, chunks=100), op, 4, scratch=tmp_path).compute()
    np.testing.assert_allclose(lazy, whole, atol=1e-5 * whole.max())
    np.testing.assert_allclose(scratch, whole, atol=1e-5 * whole.max())


@pytest.mark.parametrize("kind", ["grid", "basis"])
def test_bands_on_threads_give_the_bits_of_one_thread(scene, kind):
    # From the main thread the pixel-wise steps (the TV term too) run on bands of rows on lsfov's
    # pool; from another thread (a Dask task) on one band. Same bits either way.
    import threading

    from lsfov import _backend

    op, y = scene[0] if kind == "grid" else _basis_op(scene[1].shape), scene[1]
    if _backend.threads_for(y) < 2:
        pytest.skip("one core (or LSFOV_FFT_WORKERS=1): no bands to compare")
    main = lsfov.deconvolve(y, op, 6, tv=0.05)
    other = {}
    t = threading.Thread(target=lambda: other.update(x=lsfov.deconvolve(y, op, 6, tv=0.05)))
    t.start()
    t.join()
    np.testing.assert_array_equal(main, other["x"])


def test_the_result_does_not_depend_on_the_images_memory_layout():
    # A crop (a strided view), its copy and a Fortran-ordered copy hold the same values: the same
    # bits. A float32 mean's rounding followed the layout, and a worker process, which receives a
    # copy, read a view's result differently in the last bits (7e-4 at a peak of 900).
    u = np.random.default_rng(0).random((600, 520)).astype(np.float32) * 1000 + 10
    op = ProductConvolution.from_grid(psf.gaussian(np.array([[1.0, 1.5, 2.0]] * 3), size=15), u.shape)
    y = np.ascontiguousarray(op.apply(u))
    view = np.pad(y, ((3, 5), (7, 2)))[3:-5, 7:-2]
    assert not view.flags.c_contiguous and np.array_equal(view, y)
    if np.lib.NumpyVersion(np.__version__) >= "2.3.0":  # (its summation order follows the layout)
        assert view.mean() != y.mean()  # (float32: what made the difference)
    ref = lsfov.deconvolve(np.ascontiguousarray(view), op, 3)
    np.testing.assert_array_equal(lsfov.deconvolve(view, op, 3), ref)
    np.testing.assert_array_equal(lsfov.deconvolve(np.asfortranarray(view), op, 3), ref)


def test_cost_model_prefers_fewer_exchanges_for_small_chunks():
    op = OPERATORS["one-psf"]((4096, 4096))
    small = chunked.choose_exchange_every((256, 256), op, 20, 0.02)
    large = chunked.choose_exchange_every((4096, 4096), op, 20, 0.02)
    assert small > large >= 1
    assert chunked.spread_per_iteration(op, 0.02) * small <= 256  # the halo fits in a neighbour


# ---------------------------------------------------------------------------------------------- types


def test_xarray_in_xarray_out_with_coords_and_attrs(scene):
    op, y, _ = scene
    coords = {"y": np.arange(y.shape[0]) * 0.1, "x": np.arange(y.shape[1]) * 0.1}
    img = xr.DataArray(y, dims=("y", "x"), coords=coords, attrs={"pixel_um": 0.1})
    out = lsfov.deconvolve(img, op, 3)
    assert isinstance(out, xr.DataArray) and out.name == "deblurred" and out.attrs == img.attrs
    np.testing.assert_array_equal(out.x, img.x)
    lazy = lsfov.deconvolve(img.chunk(64), op, 3)
    assert isinstance(lazy.data, da.Array)
    np.testing.assert_allclose(lazy.values, out.values, atol=1e-5 * float(out.max()))


def test_integer_images_are_accepted(scene):
    op, y, _ = scene
    counts = np.rint(y).astype(np.uint16)
    out = lsfov.deconvolve(counts, op, 2)
    assert out.dtype == np.float32 and out.shape == y.shape
    np.testing.assert_array_equal(out, lsfov.deconvolve(counts.astype(np.float32), op, 2))  # no rescaling


# ---------------------------------------------------------------------------------------------- saturation


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_saturated_pixels_are_censored_written_out():
    """At a pixel at or above the saturation level the ratio is ``max(y / Hx, 1)`` (the count is at
    least the level): RL in float64 NumPy with that rule, equal away from the borders."""
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(5)
    sharp = sim.sample_image("hubble", (320, 320)) + 0.01
    k = psf.gaussian(1.2, 1.6, size=7)
    op = ProductConvolution.from_grid(k[None, None], sharp.shape)
    y = rng.poisson(op.apply(sharp) * 3000).astype(np.float64)
    level = np.float32(0.3 * y.max())
    y = np.minimum(y, level)
    sat = y >= level
    scale, n = y.mean(), 15
    x = np.full(y.shape, scale)
    for _ in range(n):
        ratio = y / np.maximum(fftconvolve(x, k, mode="same"), 1e-6 * scale)
        x = np.maximum(x * fftconvolve(np.where(sat, np.maximum(ratio, 1), ratio), k[::-1, ::-1], mode="same"), 0)
    ours = lsfov.deconvolve(y.astype(np.float32), op, n, tv=0, saturation=float(level))
    inner = (slice(7 * n, -7 * n), slice(7 * n, -7 * n))
    assert sat[inner].sum() > 20
    np.testing.assert_allclose(ours[inner], x[inner], rtol=2e-4, atol=2e-4 * x.max())
    plain = lsfov.deconvolve(y.astype(np.float32), op, n, tv=0, saturation=False)
    assert np.abs(plain - ours)[inner].max() > 0.01 * x.max()  # the rule acts here


@pytest.fixture(scope="module")
def clipped():
    """Point sources under a 2x2 grid of Z1 PSFs, clipped at 40 % of the brightest count (1.4 % of
    the pixels), and the sharp image."""
    sharp = sim.sample_image("hubble", (256, 256))
    op, _ = sim.psf_field(sharp.shape, "Z1", (2, 2), seed=3, size=21)
    y = np.maximum(sim.degrade(sharp, op, photons=2000, seed=1), 0)
    level = np.float32(0.4 * y.max())
    return op, np.minimum(y, level), level, sharp


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_censoring_restores_clipped_points_better_and_chunked_equals_whole(clipped):
    op, y, level, sharp = clipped
    truth = sharp / sharp.max()

    def snr(x):  # after the best gain and offset
        e = truth - np.polyval(np.polyfit(x.ravel(), truth.ravel(), 1), x)
        return 10 * np.log10((truth**2).sum() / (e**2).sum())

    censored = lsfov.deconvolve(y, op, 30, saturation=level)
    plain = lsfov.deconvolve(y, op, 30, saturation=False)
    assert snr(censored) > snr(plain) + 0.8  # measured 8.6 against 7.3 dB
    predicted = op.apply(censored)
    sat = y >= level
    # Its prediction rises above the clip where the clipped sources were brighter; plain RL's stays at it.
    assert np.median(predicted[sat]) > 1.05 * level and np.median(op.apply(plain)[sat]) < 1.005 * level
    assert predicted[sat].max() > 1.4 * level > 1.2 * op.apply(plain)[sat].max()  # measured 1.46 and 1.15
    lazy = lsfov.deconvolve(da.from_array(y, chunks=96), op, 30, saturation=level)
    np.testing.assert_allclose(lazy.compute(), censored, atol=1e-5 * censored.max())
    # A float64 image and a level just above its clip that float32 rounds onto it: both paths censor
    # what float32 compares (the whole path, every block); the chunked count once compared in float64.
    wide, above = y.astype(np.float64), float(level) * (1 + 1e-8)
    assert np.float32(above) == level and not (wide >= above).any()
    whole = lsfov.deconvolve(wide, op, 5, saturation=above)
    lazy = lsfov.deconvolve(da.from_array(wide, chunks=96), op, 5, saturation=above).compute()
    np.testing.assert_allclose(lazy, whole, atol=1e-5 * whole.max())
    assert not np.allclose(whole, lsfov.deconvolve(wide, op, 5, saturation=False), atol=1e-3 * whole.max())


def test_more_than_one_percent_of_the_pixels_clipped_is_warned(clipped):
    """1.4 % of the pixels at the clip: said, with what to do for a stretched image; 0.5 %: not."""
    op, y, level, _ = clipped
    with pytest.warns(lsfov.LsfovWarning, match=r"1.4 % of the pixels are at or above the saturation level 564.*"
                                                "pass saturation=False"):
        lsfov.deconvolve(y, op, 2, saturation=level)
    fewer = y.copy()
    at = np.flatnonzero(fewer >= level)
    fewer.flat[at[: 2 * len(at) // 3]] = 0.99 * level  # a third of them left at the clip: 0.5 %
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsfov.deconvolve(fewer, op, 2, saturation=level)
    with pytest.warns(lsfov.LsfovWarning, match="1.4 % of the pixels"):
        lsfov.sparse_smooth_deblur(y, op, iterations=2, saturation=level, warn_dense=1.0)


def test_pixels_beyond_the_cameras_bits_and_bad_levels_are_said(clipped):
    """An image whose pixels exceed what its SignificantBits allow (wrong metadata, summed frames):
    said, naming where the level came from, at the user's line (xarray input too). A level must be
    a number, None or False."""
    op, y, level, _ = clipped
    counts = np.minimum(y / level * 8000, 65535).astype(np.uint16)
    tagged = xr.DataArray(counts, dims=("y", "x"), attrs={"significant_bits": 12})
    with pytest.warns(lsfov.LsfovWarning, match=r"pixels up to 8000 exceed 4095 \(the image's 12 significant bits\): "
                                                "is that metadata right") as seen:
        lsfov.deconvolve(tagged, op, 2)
    assert seen[0].filename == __file__
    for bad in (True, "65535", [65535]):
        with pytest.raises(TypeError, match="saturation takes a level .a number., None .* or False"):
            lsfov.deconvolve(y, op, 2, saturation=bad)
    np.testing.assert_array_equal(lsfov.deconvolve(counts, op, 2, saturation=np.False_),
                                  lsfov.deconvolve(counts, op, 2, saturation=False))


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_saturation_level_defaults_to_the_cameras_and_none_saturated_changes_nothing(clipped, lsfov_log):
    op, y, level, _ = clipped
    counts = np.minimum(y / level * 65535, 65535).astype(np.uint16)
    with lsfov_log(logging.INFO) as said:
        out = lsfov.deconvolve(counts, op, 5)  # an integer type's largest count
    assert any("pixels at or above the saturation level 65535: censored" in m for m in said), said
    np.testing.assert_array_equal(out, lsfov.deconvolve(counts.astype(np.float32), op, 5, saturation=65535))
    assert not np.array_equal(out, lsfov.deconvolve(counts, op, 5, saturation=False))
    # A 12-bit camera in 16-bit pixels (an OME-TIFF's SignificantBits): 4095
    twelve = xr.DataArray(counts // 16, dims=("y", "x"), attrs={"significant_bits": 12})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(lsfov.deconvolve(twelve, op, 5).values,
                                      lsfov.deconvolve((counts // 16).astype(np.float32), op, 5, saturation=4095))
    # Pixels at 4095 are what a 12-bit camera gives: clipped, not beyond its bits (no "is that metadata right")
    assert int(twelve.max()) == 4095 and not any("exceed" in str(w.message) for w in seen), seen
    # A float image has no level of its own; a level no pixel reaches is the plain iteration, bit for bit.
    plain = lsfov.deconvolve(y, op, 5, saturation=False)
    np.testing.assert_array_equal(lsfov.deconvolve(y, op, 5), plain)
    np.testing.assert_array_equal(lsfov.deconvolve(y, op, 5, saturation=2 * level), plain)
    lazy = da.from_array(y, chunks=128)
    np.testing.assert_array_equal(lsfov.deconvolve(lazy, op, 5, saturation=2 * level).compute(),
                                  lsfov.deconvolve(lazy, op, 5).compute())
    with pytest.raises(ValueError, match="saturation"):
        lsfov.deconvolve(y, op, 5, saturation=-1)


@pytest.mark.parametrize("bits", [12, np.int16(12), 12.0, np.float64(12), "12", " 12 ", "12.0", b"12"])
def test_significant_bits_written_by_hand_or_read_back_as_float_or_text_are_the_same_bits(bits):
    """attrs from netCDF or a JSON edited by hand carry 12.0 or "12": still a 12-bit camera."""
    from lsfov._validate import level_origin, saturation_level

    img = xr.DataArray(np.zeros((4, 4), np.uint16), dims=("y", "x"), attrs={"significant_bits": bits})
    assert saturation_level(img) == 4095
    assert level_origin(img, None, 4095.0) == "the image's 12 significant bits"


@pytest.mark.parametrize("bits", [12.5, "twelve", "", "nan", True, None, [12], 16, 0, -3, 4096, 1e300])
def test_significant_bits_that_say_no_fewer_bits_leave_the_types_level(bits):
    from lsfov._validate import saturation_level

    img = xr.DataArray(np.zeros((4, 4), np.uint16), dims=("y", "x"), attrs={"significant_bits": bits})
    assert saturation_level(img) == 65535


# ---------------------------------------------------------------------------------------------- camera offset


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_a_cameras_offset_is_subtracted_after_its_saturated_pixels_are_found(clipped, tmp_path):
    """``background=b`` deblurs ``max(y - b, 0)``, censoring the pixels at the camera's level in its
    own counts (``y >= level``, i.e. ``y - b >= level - b``); the chunked paths equal the whole one."""
    op, y, level, _ = clipped
    raw = (np.rint(y) + 100).astype(np.uint16)
    top = float(raw.max())  # the clip, in the camera's counts
    ours = lsfov.deconvolve(raw, op, 8, background=100, saturation=top)
    by_hand = lsfov.deconvolve(np.maximum(raw.astype(np.float32) - 100, 0), op, 8, saturation=top - 100)
    np.testing.assert_array_equal(ours, by_hand)
    assert not np.array_equal(ours, lsfov.deconvolve(raw, op, 8, saturation=top))  # the offset kept: another result
    np.testing.assert_array_equal(lsfov.deconvolve(raw, op, 2, background=0.0), lsfov.deconvolve(raw, op, 2))
    lazy = da.from_array(raw, chunks=96)
    np.testing.assert_allclose(lsfov.deconvolve(lazy, op, 8, background=100, saturation=top).compute(), ours,
                               atol=1e-5 * ours.max())
    stored = lsfov.deconvolve(lazy, op, 8, background=100, saturation=top, scratch=tmp_path / "s").compute()
    np.testing.assert_allclose(stored, ours, atol=1e-5 * ours.max())
    # Another offset is another run: its state is not resumed as this one's.
    again = lsfov.deconvolve(lazy, op, 8, background=90, saturation=top, scratch=tmp_path / "s", resume=True)
    assert not np.allclose(again.compute(), stored, atol=1e-3 * ours.max())


def test_a_cameras_counts_all_above_zero_are_said_to_hold_an_offset_perhaps(clipped, lsfov_log):
    op, y, _, _ = clipped
    raw = (np.rint(y) + 100).astype(np.uint16)
    hint = "the darkest pixel is at {:g} counts: if the camera adds an offset, give it as background="
    for image in (raw, da.from_array(raw, chunks=128)):
        with lsfov_log(logging.INFO) as said:
            lsfov.deconvolve(image, op, 1, saturation=False)
        assert any(m.startswith(hint.format(raw.min())) for m in said), said
    dark = raw - 100
    dark[5, 5] = 0  # a pixel at 0: no offset
    for image, b in ((raw, 100), (raw.astype(np.float32), 0), (dark, 0)):
        with lsfov_log(logging.INFO) as said:
            lsfov.deconvolve(image, op, 1, saturation=False, background=b)
        assert not any("darkest pixel" in m for m in said), said


def test_the_offset_subtracted_is_closer_to_the_sample_than_kept():
    """Point sources on black at ~100 photons, seen by a camera that adds 100 counts: kept, the
    offset holds every ratio near 1 and dim regions deblur slowly."""
    sharp = sim.sample_image("hubble", (192, 192))
    op, _ = sim.psf_field(sharp.shape, "Z3", (2, 2), seed=0, size=31)
    y = sim.degrade(sharp, op, photons=100, seed=0) + 100
    truth = sharp / sharp.max()

    def snr(x):  # after the best gain and offset
        e = truth - np.polyval(np.polyfit(x.ravel(), truth.ravel(), 1), x)
        return 10 * np.log10((truth**2).sum() / (e**2).sum())

    kept, subtracted = (snr(lsfov.deconvolve(y, op, 20, background=b)) for b in (0, 100))
    assert subtracted > kept + 0.3, (subtracted, kept)  # measured 6.35 against 5.80 dB (blurred: 4.05)


def test_bad_offsets_are_refused_and_one_above_most_pixels_is_warned(scene):
    op, y, _ = scene
    for bad in (-1, np.nan, np.inf):
        with pytest.raises(ValueError, match="background .the camera's offset.* must be a finite number >= 0"):
            lsfov.deconvolve(y, op, 2, background=bad)
    for bad in ("100", True, [100]):
        with pytest.raises(TypeError, match="background .the camera's offset.* must be a number"):
            lsfov.deconvolve(y, op, 2, background=bad)
    for image in (y, da.from_array(y, chunks=100)):
        with pytest.raises(ValueError, match=r"background 1e\+06 is at or above every pixel .the largest is"):
            lsfov.deconvolve(image, op, 2, background=1e6)
        with pytest.warns(lsfov.LsfovWarning, match=r"9\d % of the pixels are below background=.*taken as 0: is it "
                                                    "above the camera's offset"):
            lsfov.deconvolve(image, op, 2, background=float(np.percentile(y, 95)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsfov.deconvolve(y, op, 2, background=float(np.percentile(y, 50)))  # half below: no word
    with pytest.raises(ValueError, match=r"the saturation level 50 is at or below background=100: a camera clips "
                                         "above its offset"):
        lsfov.deconvolve(y, op, 2, background=100, saturation=50)
    with pytest.warns(lsfov.LsfovWarning, match="99 % of the pixels are below"):  # not rounded up to all of them
        top = np.sort(y.ravel())[-2]
        lsfov.deconvolve(y, op, 2, background=float(top), saturation=False)


# ---------------------------------------------------------------------------------------------- bad input


def test_a_scratch_that_is_a_file_is_refused_before_any_work(scene, tmp_path):
    op, y, _ = scene
    (tmp_path / "notes.txt").write_text("someone's notes")
    lazy = da.from_array(y, chunks=64)
    for call in (lambda **k: lsfov.deconvolve(lazy, op, 2, **k), lambda **k: lsfov.sparse_smooth_deblur(lazy, op, **k),
                 lambda **k: lsfov.estimate_psf_map(lazy, "G1", **k)):
        with pytest.raises(ValueError, match=r"scratch='.*notes.txt' is a file; give a directory"):
            call(scratch=tmp_path / "notes.txt")
        with pytest.raises(TypeError, match="scratch must be a directory name"):
            call(scratch=5)
        with pytest.raises(ValueError, match="resume=True needs scratch="):
            call(resume=True)
    assert (tmp_path / "notes.txt").read_text() == "someone's notes"


def test_dask_images_of_unknown_chunk_sizes_are_refused_in_one_line(scene):
    op, y, _ = scene
    lazy = da.from_array(y, chunks=64)
    unknown = lazy[lazy[:, 0] > -1]  # boolean indexing: chunk sizes unknown, shape (nan, W)
    for call in (lambda: lsfov.deconvolve(unknown, op), lambda: op.apply(unknown),
                 lambda: lsfov.sparse_smooth_deblur(unknown, op), lambda: lsfov.estimate_psf_map(unknown, "G1")):
        with pytest.raises(ValueError, match=r"unknown chunk sizes \(shape \(nan, \d+\)\); call its "
                                             r"\.compute_chunk_sizes\(\) first"):
            call()


def test_bad_input(scene, tmp_path):
    op, y, _ = scene
    with pytest.raises(ValueError, match="does not match the operator's shape"):
        lsfov.deconvolve(y[:-1], op)
    # A one-plane stack was told to build the operator for its image; an empty scratch was the current
    # folder (the run's state left among the user's files), one under a file a NotADirectoryError.
    for stack in (y[None], da.from_array(y[None])):
        with pytest.raises(ValueError, match=r"the image must be 2-D \(y, x\), got shape \(1, \d+, \d+\); select a plane"):
            op.apply(stack)
    (tmp_path / "f").write_text("")
    for scratch, said in (("", "scratch is empty"), (tmp_path / "f" / "s", "lies under the file")):
        with pytest.raises(ValueError, match=said):
            lsfov.deconvolve(da.from_array(y), op, 2, scratch=scratch)
    with pytest.warns(lsfov.LsfovWarning, match="scratch= and resume= act on Dask input; this in-memory image is "
                                                "mapped whole"):
        lsfov.estimate_psf_map(y, "G1", scratch=tmp_path / "s")
    with pytest.raises(ValueError, match="does not match the operator's shape"):
        lsfov.deconvolve(da.from_array(y[:, :-3]), op)
    with pytest.raises(ValueError, match="all zero"):
        lsfov.deconvolve(np.zeros_like(y), op)
    with pytest.raises(ValueError, match="all zero"):
        lsfov.deconvolve(da.zeros(y.shape, chunks=64), op)
    with pytest.raises(ValueError, match="no positive pixel"):
        lsfov.deconvolve(-y - 1, op)
    with pytest.raises(ValueError, match="no positive pixel"):
        lsfov.deconvolve(da.from_array(-y - 1, chunks=64), op)
    bad = y.copy()
    bad[5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lsfov.deconvolve(bad, op)
    with pytest.raises(ValueError, match="NaN"):
        lsfov.deconvolve(da.from_array(bad, chunks=64), op)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        lsfov.deconvolve(y, op, 0)
    with pytest.raises(ValueError, match=r"tv must be in \[0, 0.25\)"):
        lsfov.deconvolve(y, op, 5, tv=0.3)
    with pytest.raises(ValueError, match="eps"):
        lsfov.deconvolve(y, op, 5, eps=0)
    with pytest.raises(ValueError, match="exchange_every"):
        lsfov.deconvolve(da.from_array(y), op, 5, exchange_every=0)
    with pytest.raises(TypeError, match="ProductConvolution"):
        lsfov.deconvolve(y, np.ones((5, 5)))
    with pytest.raises(ValueError, match="2-D"):
        lsfov.deconvolve(np.stack([y, y]), op)
    with pytest.raises(ValueError, match="full-image operator"):
        lsfov.deconvolve(y[:100, :100], op.restrict((0, 0), (100, 100)))


def test_noise_free_beads_on_a_zero_background_stay_finite():
    """Blurred by the operator itself (FFT rounding leaves ~1e-9 on the background): the estimate is
    kept non-negative every iteration, else rounding grows ~20x per iteration into NaN."""
    y = np.zeros((256, 256), np.float32)
    y[[40, 90, 128, 200, 230], [50, 200, 128, 60, 220]] = 1000
    op = ProductConvolution.from_psf(psf.gaussian(2.0, 2.0, size=15), y.shape)
    blurred = np.maximum(op.apply(y), 0)
    for tv in (0.0, DEFAULT_TV):
        x = lsfov.deconvolve(blurred, op, 30, tv)
        assert np.isfinite(x).all() and 100 < x.max() < 1000 and x.min() >= 0


def test_negative_pixels_are_clipped_with_a_warning(scene):
    op, y, _ = scene
    shifted = y - np.percentile(y, 5)  # a camera offset subtracted once too often
    with pytest.warns(lsfov._validate.LsfovWarning, match="negative"):
        a = lsfov.deconvolve(shifted, op, 3)
    with pytest.warns(lsfov._validate.LsfovWarning, match="negative"):
        b = lsfov.deconvolve(da.from_array(shifted, chunks=64), op, 3).compute()
    np.testing.assert_allclose(a, b, atol=1e-5 * a.max())
    np.testing.assert_array_equal(a, lsfov.deconvolve(np.maximum(shifted, 0), op, 3))  # clipped, not shifted


def test_operator_save_load_round_trip(tmp_path, scene):
    op, y, _ = scene
    moved = ProductConvolution.from_grid(op.kernels, op.shape, centers=[c + 3.25 for c in op.centers])  # not the default
    for o in (op, moved, _basis_op(y.shape)):
        o.attrs["model"] = "Z3"
        path = lsfov.save(o, tmp_path / f"{o.kind}-{id(o)}.zarr")
        back = ProductConvolution.load(path)
        assert back.kind == o.kind and back.shape == o.shape and back.attrs["model"] == "Z3"
        for got, want in zip(back.centers or (), o.centers or ()):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(back.apply(y), o.apply(y))
        with pytest.raises(FileExistsError, match="overwrite"):
            o.save(path)
        # xarray reads the store by its dimension names
        ds = xr.open_zarr(path, consolidated=False)
        np.testing.assert_array_equal(ds.kernels.values, o.kernels)
        if o.kind == "grid":
            assert ds.kernels.dims == ("gy", "gx", "ky", "kx") and ds.centers_x.dims == ("gx",)
        else:
            assert ds.kernels.dims == ("basis", "ky", "kx") and ds.maps.dims == ("basis", "y", "x")
            np.testing.assert_array_equal(ds.maps.values, np.asarray(o.maps))
    with pytest.raises(ValueError, match="not an lsfov operator"):
        ProductConvolution.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ProductConvolution.load(tmp_path / "missing.zarr")


def test_a_result_stores_the_operator_it_was_made_with(tmp_path, scene):
    op, y, _ = scene
    for o in (op, _basis_op(y.shape)):
        path = lsfov.save(xr.DataArray(y, dims=("y", "x"), name="raw"), tmp_path / f"r-{o.kind}.zarr", operator=o)
        back = ProductConvolution.load(path)  # the result's operator group
        assert back.kind == o.kind and back.shape == o.shape
        np.testing.assert_array_equal(back.kernels, o.kernels)
        np.testing.assert_array_equal(back.apply(y), o.apply(y))
        assert set(lsfov.open_result(path).data_vars) == {"raw"}  # the operator is no variable
        assert f"operator {back!r}" in lsfov.io.describe(path)
    plain = lsfov.save(y, tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match="result that stores no operator"):
        ProductConvolution.load(plain)
    assert "operator" not in lsfov.io.describe(plain)
    named = lsfov.save(xr.Dataset({"operator": (("y", "x"), y)}), tmp_path / "named.zarr")  # a variable so named
    with pytest.raises(ValueError, match="result that stores no operator"):
        ProductConvolution.load(named)
    assert "--operator" not in lsfov.io.describe(named)
    with pytest.raises(TypeError, match="ProductConvolution"):
        lsfov.save(y, tmp_path / "t.zarr", operator=op.kernels)
    with pytest.raises(ValueError, match="full-image operator"):
        lsfov.save(y, tmp_path / "t.zarr", operator=op.restrict((0, 0), (32, 32)))
    with pytest.raises(ValueError, match="named 'operator'"):
        lsfov.save(xr.Dataset({"operator": (("y", "x"), y)}), tmp_path / "t.zarr", operator=op)
    with pytest.raises(ValueError, match="goes with a result"):
        lsfov.save(op, tmp_path / "t.zarr", operator=op)
    assert not (tmp_path / "t.zarr").exists()


def test_task_memory_is_checked_before_the_first_read(scene, monkeypatch):
    """A worker without room was paused in the first pass (the image's statistics), before the check
    that would have refused it: the run waited without a word."""
    op, y, _ = scene
    order, real = [], dask.compute
    monkeypatch.setattr(dask, "compute", lambda *a, **k: (order.append("read"), real(*a, **k))[1])

    def check(*a, **k):
        order.append("check")
        raise MemoryError("no room")

    monkeypatch.setattr(chunked, "check_task_memory", check)
    with pytest.raises(MemoryError, match="no room"):
        lsfov.deconvolve(da.from_array(y, chunks=64), op, 2)
    assert order == ["check"]


@pytest.mark.parametrize("kind", ["one-psf", "grid", "basis"])
def test_task_bytes_bounds_what_a_block_task_allocates(kind):
    """The memory check before a chunked run trusts task_bytes: each block task's peak allocation
    (tracemalloc, as the figures were measured) stays below it, and not far below (measured here
    0.6-0.7 of it at the first exchange: a doubled estimate would refuse chunks that fit)."""
    import tracemalloc

    n = 768
    r = np.random.default_rng(0)
    y = (r.random((n, n)) + 1).astype(np.float32)
    op = {"one-psf": lambda: ProductConvolution.from_grid(psf.gaussian(2.0, size=31)[None, None], (n, n)),
          "grid": lambda: sim.psf_field((n, n), "Z3", (3, 3), seed=1, size=31)[0],
          "basis": lambda: ProductConvolution.from_basis(r.random((5, 31, 31)), r.random((5, n, n)))}[kind]()
    real, ratios = chunked._block, []

    def measured(yb, xb, **kw):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = real(yb, xb, **kw)
        block = tuple(c[i] for c, i in zip(kw["chunks"], kw["location"]))
        ratios.append((tracemalloc.get_traced_memory()[1] - base) / chunked.task_bytes(block, kw["halo"], kw["op"]))
        return out

    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp, dask.config.set(scheduler="synchronous"):
            mp.setattr(chunked, "_block", measured)
            lsfov.deconvolve(da.from_array(y, chunks=256), op, 4, exchange_every=2).compute()
    finally:
        tracemalloc.stop()
    assert len(ratios) == 18  # 9 blocks x 2 exchanges
    assert max(ratios) <= 1.0 and max(ratios) >= 0.45, np.round(ratios, 2)


def test_flat_gain_is_the_median_psf_sum_and_eps_reaches_100():
    """The flat start and the TV term's brightness read the operator's gain: the median sum of its
    local PSFs, which one odd node (a hot bead's PSF) does not move; eps is accepted up to 100."""
    from lsfov.restore.tv_rl import flat_gain

    k = psf.gaussian(1.0, size=5)
    grid = np.stack([[k, k], [k, 10 * k]])  # node sums 1, 1, 1, 10
    op = ProductConvolution.from_grid(grid, (40, 40))
    assert flat_gain(op) == pytest.approx(1.0, abs=1e-6)  # the mean would be 3.25
    x = np.random.default_rng(2).uniform(1, 2, (40, 40)).astype(np.float32)
    one = ProductConvolution.from_grid(k[None, None], x.shape)
    assert np.isfinite(lsfov.deconvolve(x, one, 2, eps=100.0)).all()
    with pytest.raises(ValueError, match=r"eps must be in \[1e-4, 100\]"):
        lsfov.deconvolve(x, one, 2, eps=100.5)
    with pytest.raises(ValueError, match=r"eps must be in \[1e-4, 100\]"):
        lsfov.deconvolve(x, one, 2, eps=0.9e-4)
    # float32's range is checked in x's units (the image's over the gain): PSFs of sum 1e6 take an
    # image 1e6 times brighter than PSFs of sum 1 do, to the same result over 1e6
    big = ProductConvolution.from_grid(1e6 * k[None, None], x.shape)
    with pytest.raises(ValueError, match="beyond what float32 TV arithmetic can hold"):
        lsfov.deconvolve(x * np.float32(1e16), one, 2)
    ref = lsfov.deconvolve(x * np.float32(1e10), one, 2)
    np.testing.assert_allclose(lsfov.deconvolve(x * np.float32(1e16), big, 2), ref, rtol=1e-4)


def test_a_large_operator_in_the_graph_on_a_cluster_is_told_how_to_keep_out(tmp_path, monkeypatch):
    """Without scratch=, an operator over the size limit travels whole in the task graph: on a
    distributed cluster (only there) each iterative stage says so and how to keep it out; through a
    scratch store, or under the limit, nothing is said."""
    from distributed import Client, LocalCluster

    from lsfov.restore import scratch as scratch_mod

    shape = (96, 100)
    kernels = psf.MODELS["Z3"].render(psf.MODELS["Z3"].sample(4, 4), size=15).reshape(2, 2, 15, 15)
    grid = ProductConvolution.from_grid(kernels, shape)  # 3.6 kB of kernels
    basis = ProductConvolution.from_basis(kernels[0], np.full((2,) + shape, 0.5, np.float32))  # 77 kB of maps
    y = da.from_array(grid.apply(np.full(shape, 50.0, np.float32)) + 1, chunks=48)
    runs = {"TV-RL": lambda **kw: lsfov.deconvolve(y, grid, 2, exchange_every=1, **kw),
            "sparse+smooth": lambda **kw: lsfov.sparse_smooth_deblur(y, basis, iterations=2, exchange_every=1,
                                                                     warn_dense=1.0, **kw)}

    def said(run, **kw):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            run(**kw)
        return [str(x.message) for x in w if "travels whole in the task graph" in str(x.message)]

    monkeypatch.setattr(scratch_mod, "STORE_OPERATOR_BYTES", 3000)
    for stage, run in runs.items():
        assert not said(run), stage  # the threaded scheduler: one process, nothing travels
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        for stage, run in runs.items():
            (msg,) = said(run)
            size = "0.0 MB" if stage == "TV-RL" else "0.1 MB"  # a grid's kernels; a basis's maps
            assert f"the operator ({size})" in msg and "scratch=" in msg, (stage, msg)
            assert not said(run, scratch=tmp_path / stage), stage
        monkeypatch.setattr(scratch_mod, "STORE_OPERATOR_BYTES", 100_000)  # both under it
        for stage, run in runs.items():
            assert not said(run), stage


@pytest.mark.parametrize("stage, form", [("TV-RL", "grid"), ("sparse+smooth", "grid"), ("TV-RL", "basis"),
                                         ("sparse+smooth", "basis")])
def test_a_large_operator_is_read_by_the_tasks_from_the_run_state(stage, form, tmp_path, monkeypatch, count_calls):
    """Through a scratch store, an operator over the size limit is saved in the run's state and each
    block task reads its window's part (a grid's nodes, a basis's maps): the graph carries a few
    kilobytes, not the operator, and the result is the lazy path's bit for bit, also when resumed,
    also when the operator's save was cut short."""
    import cloudpickle

    from lsfov.cluster import use_scheduler
    from lsfov.restore import scratch as scratch_mod
    from lsfov.restore import sparse_smooth

    rng = np.random.default_rng(3)
    shape = (240, 250)
    if form == "grid":
        kernels = psf.MODELS["Z3"].render(psf.MODELS["Z3"].sample(12 * 12, 4), size=41).reshape(12, 12, 41, 41)
        op = ProductConvolution.from_grid(kernels, shape)  # 968 kB of kernels
        big = op.kernels.nbytes
    else:
        kernels = psf.MODELS["Z3"].render(psf.MODELS["Z3"].sample(3, 4), size=41)
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / 250.0
        maps = np.stack([1 - yy / 2 - xx / 2, yy / 2, xx / 2])  # 720 kB of maps, PSF sums 1 everywhere
        op = ProductConvolution.from_basis(kernels, maps)
        big = op.maps.nbytes
    u = np.zeros(shape, np.float32)
    u[rng.integers(0, shape[0], 60), rng.integers(0, shape[1], 60)] = 400
    y = (op.apply(u + 20) + rng.normal(0, 1, shape)).astype(np.float32)
    dy = da.from_array(y, chunks=80)
    if stage == "TV-RL":
        run, module, name = (lambda **kw: lsfov.deconvolve(dy, op, 6, exchange_every=2, **kw)), chunked, "_block"
    else:
        run, module, name = (lambda **kw: lsfov.sparse_smooth_deblur(dy, op, iterations=6, exchange_every=2,
                                                                     warn_dense=1.0, **kw)), sparse_smooth, "_block"

    def values(out):
        return [np.asarray(a) for a in (out if isinstance(out, tuple) else (out,))]

    lazy = values(dask.compute(run())[0])
    monkeypatch.setattr(scratch_mod, "STORE_OPERATOR_BYTES", 100_000)
    sent = []
    real_shared = scratch_mod.shared
    monkeypatch.setattr(scratch_mod, "shared", lambda obj, key: (sent.append(len(cloudpickle.dumps(obj))),
                                                                 real_shared(obj, key))[1])
    with use_scheduler("synchronous"):
        through = values(dask.compute(run(scratch=tmp_path))[0])
        assert sent and max(sent) < 40_000 < big, sent  # the graph: no kernels or maps (a basis's own kernels)
        (state,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        stored = state / ("operator" if form == "grid" else "operator.zarr")
        assert stored.is_dir() and (state / "done" / "operator").exists()
        # Killed in its second exchange, and again while saving the operator (its mark not yet made)
        per_exchange = (len(dy.chunks[0]) + 1) * (len(dy.chunks[1]) + 1)  # (the extended field's blocks)
        count_calls(module, name, fail_at=per_exchange + 2, error=RuntimeError("job killed"))
        with pytest.raises(RuntimeError, match="job killed"):
            run(scratch=tmp_path)
        (state / "done" / "operator").unlink()
        import zarr

        zarr.open_array(str(stored / ("" if form == "grid" else "maps")), mode="r+")[:2] = 0  # half written
        count_calls(module, name)
        resumed = values(dask.compute(run(scratch=tmp_path, resume=True))[0])
    for a, b, c in zip(through, resumed, lazy):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_the_flat_gain_of_a_grid_copies_none_of_its_kernels():
    """A PSF map's grid holds a kernel per node (1 GiB for a 32768² slide at stride 64): its gain is
    read from them in place, not from a float64 copy (twice their bytes, once kept on the operator)."""
    import tracemalloc

    from lsfov.restore.tv_rl import flat_gain

    k = psf.gaussian(np.linspace(1, 3, 256), size=31).reshape(16, 16, 31, 31) * np.float32(0.9)
    op = ProductConvolution.from_grid(k, (1024, 1024))
    tracemalloc.start()
    try:
        gain = flat_gain(op)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < op.kernels.nbytes / 4
    assert gain == pytest.approx(0.9, rel=1e-6)
    assert gain == float(np.median(op.local_psfs().sum(axis=(-2, -1))))  # what it was read from before
    assert op.local_psfs() is not op.local_psfs()  # a grid's are not kept


def test_a_grid_on_disk_deconvolves_as_in_memory_and_is_never_read_whole(tmp_path, monkeypatch):
    """A slide's grid operator may keep its kernels on disk (a PSF map's, rendered into the run's
    scratch): the deconvolution is the in-memory operator's bit for bit, on NumPy, on lazy Dask
    chunks and through a scratch store, which then reads the nodes from where they are (no copy in
    the run's state), each task the few its window needs."""
    import zarr

    from lsfov import operators
    from lsfov.cluster import use_scheduler

    class Counted:  # the store, counting what is read from it
        def __init__(self, z):
            self.z, self.reads = z, []

        def __getattr__(self, name):
            return getattr(self.z, name)

        def __getitem__(self, key):
            out = self.z[key]
            self.reads.append(out.nbytes)
            return out

    rng = np.random.default_rng(5)
    shape = (512, 512)
    k = psf.gaussian(rng.uniform(1, 2.5, 24 * 24), rng.uniform(1, 2.5, 24 * 24), size=21).reshape(24, 24, 21, 21)
    mem = ProductConvolution.from_grid(k, shape)
    operators.copy_kernels(k, tmp_path / "kernels")
    stored = Counted(zarr.open_array(str(tmp_path / "kernels"), mode="r"))
    monkeypatch.setattr(operators, "_SLAB_BYTES", k.nbytes // 5)
    disk = ProductConvolution.from_grid(stored, shape)
    assert sum(stored.reads) == k.nbytes and max(stored.reads) < k.nbytes  # checked slab by slab, once
    y = (mem.apply(rng.random(shape, dtype=np.float32) * 100 + 10) + 1).astype(np.float32)
    dy = da.from_array(y, chunks=128)
    np.testing.assert_array_equal(lsfov.deconvolve(y, disk, 3), lsfov.deconvolve(y, mem, 3))
    want = lsfov.deconvolve(dy, mem, 3, exchange_every=1).compute()
    np.testing.assert_array_equal(lsfov.deconvolve(dy, disk, 3, exchange_every=1).compute(), want)
    fresh = ProductConvolution.from_grid(stored, shape)  # (none of its kernel spectra made yet)
    stored.reads.clear()
    with use_scheduler("synchronous"):
        got = lsfov.deconvolve(dy, fresh, 3, exchange_every=1, scratch=tmp_path / "s").compute()
    np.testing.assert_array_equal(got, want)
    assert not list((tmp_path / "s").glob("*/operator"))  # read where it is, not copied
    assert stored.reads and max(stored.reads) < k.nbytes / 5  # a window's nodes at a time
