"""BSS: blind identification of an operator in a subspace, and sparse+smooth deblurring (paper 003 App. D)."""
import dask.array as da
import numpy as np
import pytest
from scipy.spatial import cKDTree

import lsfov
from lsfov import simulate
from lsfov.calibrate import learn_subspace, operator_distance
from lsfov.calibrate.bss import _project_weighted_simplex
from lsfov.restore.sparse_smooth import _iterate, estimate_noise


@pytest.fixture(scope="module")
def subspace():
    fields = simulate.bead_stack(5, (256, 256), seed=31)
    return learn_subspace(np.stack([f.image for f in fields]), 4, 4)


def _beads_through(op, n=25, amp=3000.0, seed=0, jitter=0.0):
    """A grid of n beads blurred by ``op`` (noiseless unless the caller adds noise)."""
    h, w = op.shape
    g = int(np.sqrt(n))
    ys = np.linspace(40, h - 41, g)
    xs = np.linspace(40, w - 41, g)
    pos = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    pos = np.rint(pos + np.random.default_rng(seed).normal(0, jitter, pos.shape)).astype(int)
    u = np.zeros(op.shape, np.float32)
    u[pos[:, 0], pos[:, 1]] = amp
    return op.apply(u), pos


def test_weighted_simplex_projection():
    """The KKT conditions of min ‖p − v‖² s.t. p ≥ 0, wᵀp = 1 certify the projection: p = v − τw on the
    support (one τ for all), v/w ≤ τ off it (their multiplier τw − v ≥ 0), and feasibility."""
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2, 7)
    sizes = set()
    for scale in (0.3, 1.0, 5.0):
        for _ in range(20):
            v = rng.normal(size=7) * scale
            p = _project_weighted_simplex(v, w)
            assert p.min() >= 0 and np.dot(w, p) == pytest.approx(1.0, abs=1e-9)
            on = p > 0
            tau = (v[on] - p[on]) / w[on]
            np.testing.assert_allclose(tau, tau[0], rtol=0, atol=1e-9)
            assert np.all(v[~on] / w[~on] <= tau[0] + 1e-9)
            sizes.add(int(on.sum()))
    assert len(sizes) >= 3 and min(sizes) < 7  # supports of several sizes, some coordinates clipped


def test_the_cone_does_not_depend_on_the_signs_of_the_bases(subspace):
    """A basis element and its Γ entries flipped together give the same operators, so they must give
    the same cone and the same identification. Paper 003's Γ_k / Σ_ij Γ_k[i,j], taken literally,
    flips such generators: the cone became its opposite and identification failed. Each generator
    is its operator at unit mean flux, which no sign of the bases changes."""
    from lsfov.calibrate import OperatorSubspace

    h_sums = subspace.psf_basis.sum(axis=(1, 2), dtype=np.float64)
    a_means = np.asarray(subspace.spatial_basis, dtype=np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(np.einsum("kij,i,j->k", subspace.normalized_gammas, h_sums, a_means), 1.0, rtol=1e-9)
    truth = subspace.operator(0.6 * subspace.gammas[1] + 0.4 * subspace.gammas[3])
    image, pos = _beads_through(truth)
    want = lsfov.identify_operator(image + 1.0, subspace, positions=pos)
    for hs, as_ in (([1], [0]), ([0, 1], [2])):  # each flips the dominant Γ[0, 0]: first element by sum
        h, a, g = subspace.psf_basis.copy(), np.asarray(subspace.spatial_basis).copy(), subspace.gammas.copy()
        h[hs] *= -1
        g[:, hs, :] *= -1
        a[as_] *= -1
        g[:, :, as_] *= -1
        flipped = OperatorSubspace(h, da.from_array(a, chunks=(1, 128, 128)), g, attrs=subspace.attrs)
        assert operator_distance(flipped.operator(2), subspace.operator(2)) < 1e-5  # the same operators
        assert (g.sum(axis=(1, 2)) < 0).all()  # the literal sums all flipped
        back = flipped.normalized_gammas
        back[:, hs, :] *= -1
        back[:, :, as_] *= -1
        np.testing.assert_allclose(back, subspace.normalized_gammas, rtol=1e-12, atol=1e-15)
        got = lsfov.identify_operator(image + 1.0, flipped, positions=pos)
        assert operator_distance(got, want) < 1e-4


def test_identification_recovers_a_known_gamma_from_noiseless_beads(subspace):
    gamma_true = 0.6 * subspace.gammas[1] + 0.4 * subspace.gammas[3]  # inside the cone, PSFs sum to ~1
    truth = subspace.operator(gamma_true)
    image, pos = _beads_through(truth)
    op, info = lsfov.identify_operator(image + 1.0, subspace, positions=pos, return_details=True)
    # Same operator up to the flux normalisation: directions of Γ agree, and on a Dirac comb too.
    cos = np.sum(info["gamma"] * gamma_true) / np.linalg.norm(info["gamma"]) / np.linalg.norm(gamma_true)
    assert cos > 0.999
    assert operator_distance(op, truth) < 0.02
    assert info["residual"] < 0.05
    np.testing.assert_allclose(info["amplitudes"], 3000.0, rtol=0.01)  # the beads' brightness (0.2 % here)
    # Γ has unit mean flux over the sources: Σ_ij (Σ h_i) Γ_ij a_j(z_p), averaged over p, is 1.
    from lsfov.calibrate.bss import _sample_maps

    a = _sample_maps(subspace.spatial_basis, info["positions"])
    flux = np.einsum("i,ij,pj->p", subspace.psf_basis.sum(axis=(1, 2)).astype(np.float64), info["gamma"], a)
    assert flux.mean() == pytest.approx(1.0, rel=1e-6)
    # With camera noise, detection finds the sources by itself.
    noisy = np.random.default_rng(1).poisson(image + 20.0).astype(np.float32)
    auto, info = lsfov.identify_operator(noisy, subspace, return_details=True)
    assert operator_distance(auto, truth) < 0.1
    assert np.median(info["amplitudes"]) == pytest.approx(3000.0, rel=0.03)  # 0.3 % here
    # Sources that reach the camera's limit are left out (their cores are clipped), said as for beads.
    peaks = np.array([noisy[y - 1:y + 2, x - 1:x + 2].max() for y, x in np.rint(info["positions"]).astype(int)])
    with pytest.warns(lsfov.LsfovWarning, match="beads are saturated and were left out"):
        _, clipped = lsfov.identify_operator(noisy, subspace, saturation=float(np.median(peaks)), return_details=True)
    assert 0 < len(clipped["positions"]) < len(info["positions"])
    # By default, the limit of an integer image's type: the brightest sources clipped at 65535 in a
    # pixel or two (too few for a plateau) are left out too.
    counts = np.minimum(np.rint(noisy / np.sort(noisy.ravel())[-3] * 65535), 65535).astype(np.uint16)
    with pytest.warns(lsfov.LsfovWarning, match="beads are saturated and were left out"):
        _, own = lsfov.identify_operator(counts, subspace, return_details=True)
    assert 0 < len(own["positions"]) < len(info["positions"])
    # An (x, y) xarray image is read by its dims' names: the same sources, the same operator.
    import xarray as xr

    turned, details = lsfov.identify_operator(xr.DataArray(noisy, dims=("y", "x")).T, subspace, return_details=True)
    np.testing.assert_array_equal(details["positions"], info["positions"])
    np.testing.assert_allclose(turned.maps, auto.maps, atol=1e-6)


def test_the_misfit_and_amplitudes_said_are_those_of_the_operator_returned(subspace):
    """Stopped early (one iteration), the amplitudes and misfit are the best ones for the Γ returned,
    not for the weights of the step before."""
    from lsfov.calibrate.beads import extract_psfs
    from lsfov.calibrate.bss import _radius_for, _sample_maps

    truth = subspace.operator(0.6 * subspace.gammas[1] + 0.4 * subspace.gammas[3])
    image, pos = _beads_through(truth)
    noisy = np.random.default_rng(1).poisson(image + 20.0).astype(np.float32)
    _, info = lsfov.identify_operator(noisy, subspace, positions=pos, iterations=1, return_details=True)
    patches, _ = extract_psfs(noisy, pos, _radius_for(subspace))
    c = patches.reshape(len(pos), -1).astype(np.float64) @ subspace.psf_basis.reshape(subspace.n_psf, -1).T
    m = _sample_maps(subspace.spatial_basis, info["positions"]) @ info["gamma"].T  # (P, I): each PSF on the basis
    best = np.maximum((m * c).sum(1), 0) / (m * m).sum(1)
    assert info["residual"] == pytest.approx(np.linalg.norm(best[:, None] * m - c) / np.linalg.norm(c), rel=1e-6)
    np.testing.assert_allclose(info["amplitudes"], best * (m @ subspace.psf_basis.sum(axis=(1, 2))), rtol=1e-6)


def test_sources_the_subspace_does_not_explain_are_warned(subspace):
    """A field of other optics and depths than the subspace's five: misfit 39 % (within a subspace,
    at most 14 % even at -3 dB), the operator 51 % off; said, with what to do."""
    import warnings

    other = simulate.bead_field((256, 256), 25, seed=2, grid=4)
    with pytest.warns(lsfov.LsfovWarning, match=r"explains these sources poorly \(misfit 3\d%\)"):
        lsfov.identify_operator(other.image, subspace, positions=other.positions)
    image, pos = _beads_through(subspace.operator(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsfov.identify_operator(image + 1.0, subspace, positions=pos)


def test_subspace_operators_preserve_flux_everywhere(subspace):
    """Every operator of the subspace (a training image's, or a mix identified from sources) has PSFs
    of sum 1 at every pixel: J spatial components alone left them 0.93-1.05 across the field."""
    points = [(0, 0), (17, 230), (128, 128), (255, 255), (200, 40)]
    for op in (subspace.operator(0), subspace.operator(3), subspace.operator(0.5 * subspace.gammas[1] + subspace.gammas[2])):
        sums = [float(op.psf_at(y, x).sum()) for y, x in points]
        np.testing.assert_allclose(sums, 1.0, atol=1e-4)


def test_identification_bad_input(subspace):
    image, pos = _beads_through(subspace.operator(0), n=4)
    with pytest.raises(ValueError, match="need at least 4"):
        lsfov.identify_operator(image + 1, subspace, positions=pos[:3])
    with pytest.raises(TypeError, match="OperatorSubspace"):
        lsfov.identify_operator(image, None)
    with pytest.raises(ValueError, match=r"image shape \(200, 256\) differs from the subspace's \(256, 256\); give an "
                                         r"image of the whole field .* \(a crop has no known place in it\)"):
        lsfov.identify_operator(image[:200], subspace)
    with pytest.raises(ValueError, match=r"\(300, 256\) .*; crop it to the field the subspace was learned on, or"):
        lsfov.identify_operator(np.pad(image, ((0, 44), (0, 0))), subspace)


def _scene(kernel):
    """Sparse sources on a polynomial background through ``kernel``, with noise (paper 003 Fig. 10):
    a field of view cut out of a larger world, whose light comes in from beyond its edges."""
    rng = np.random.default_rng(4)
    n, p = 128, 16
    op = lsfov.ProductConvolution.from_grid(kernel[None, None], (n, n))
    world = lsfov.ProductConvolution.from_grid(kernel[None, None], (n + 2 * p, n + 2 * p))
    u1 = np.zeros((n + 2 * p,) * 2, np.float32)
    pos = rng.integers(8, n - 8, (30, 2))
    u1[pos[:, 0] + p, pos[:, 1] + p] = rng.uniform(300, 600, 30)
    yy, xx = (np.mgrid[: n + 2 * p, : n + 2 * p] - p) / n
    u2 = (20 + 30 * yy + 20 * xx**2).astype(np.float32)
    clean = world.apply(u1 + u2)[p:-p, p:-p]
    y = (clean + rng.normal(0, 2.0, clean.shape)).astype(np.float32)
    return op, y, u1[p:-p, p:-p], u2[p:-p, p:-p], pos


@pytest.fixture(scope="module")
def scene():
    return _scene(lsfov.psf.gaussian(1.5, size=11))


def test_sparse_smooth_separates_and_decreases_the_objective(scene):
    op, y, u1, u2, pos = scene
    g1, g2 = 1.0, 10.0

    def objective(a, b):
        lap = lsfov.restore.sparse_smooth._laplacian(b, np)
        return 0.5 * np.sum((op.apply(a + b) - y) ** 2) + g1 * np.abs(a).sum() + g2 * np.sum(lap**2)

    from lsfov.restore.sparse_smooth import _steps

    steps = _steps(op, g2)
    zero = np.zeros_like(y)
    state = (zero, zero, zero, zero)
    values = []
    for k in range(0, 200, 20):
        state = _iterate(op, y, state, k, 20, g1, g2, steps, np)
        values.append(objective(state[0], state[1]))
    assert values[-1] < values[0] < objective(zero, zero)
    assert values[-1] <= min(values) * (1 + 1e-3)  # FISTA is not monotone, but it settles
    sparse, smooth = lsfov.sparse_smooth_deblur(y, op, g1, g2, iterations=200)
    assert sparse.min() >= 0 and smooth.min() >= 0
    # Sources land in the sparse part near their true places; the background in the smooth part.
    from skimage.feature import peak_local_max

    found = peak_local_max(sparse, min_distance=2, threshold_abs=0.2 * sparse.max())
    d, _ = cKDTree(pos).query(found)
    assert np.mean(d <= 1.5) > 0.9 and len(found) >= 0.9 * len(pos)
    inner = (slice(10, -10), slice(10, -10))
    assert np.abs(smooth[inner] - u2[inner]).mean() < 0.1 * u2.mean()


def test_laplacian_is_symmetric_and_kills_constants():
    # FISTA's gradient of γ2‖Δu2‖² is 2γ2 ΔᵀΔ u2, computed as Δ(Δ u2): right only if Δ = Δᵀ.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 13, 17))  # odd, unequal sides: edges and corners of both parities
    lap = lsfov.restore.sparse_smooth._laplacian
    left, right = np.vdot(lap(a, np), b), np.vdot(a, lap(b, np))
    assert abs(left - right) <= 1e-10 * abs(left) and abs(left) > 1
    np.testing.assert_array_equal(lap(np.full((13, 17), 3.0), np), 0.0)  # Neumann: a constant costs nothing


def test_estimate_noise_reads_white_noise_and_the_scene(scene):
    # 20 seeds of 256² white noise read 2.00 ± 0.01; the scene (sources, background, blur) reads 2.045.
    white = np.random.default_rng(5).normal(0, 2.0, (256, 256))
    assert estimate_noise(white) == pytest.approx(2.0, rel=0.03)
    assert estimate_noise(scene[1]) == pytest.approx(2.0, rel=0.05)


def test_estimate_noise_of_counts_mostly_equal_is_not_zero(scene):
    """Photon counts of 0.03 a pixel (91 % zeros) or 8-bit noise of σ 0.11 leave the Laplacian's
    median deviation at 0: a higher percentile reads it (the weight of ‖u1‖₁ was 0, sparsity gone)."""
    rng = np.random.default_rng(0)
    assert estimate_noise(rng.poisson(0.03, (512, 512))) == pytest.approx(0.173, rel=0.3)  # measured 0.136
    assert estimate_noise(np.rint(50 + rng.normal(0, 0.2, (512, 512))).astype(np.uint8)) == pytest.approx(
        0.113, rel=0.1)  # the rounded image's σ; measured 0.114
    flat = np.full((64, 64), 7.0)
    flat[30, 30] = 9.0
    assert estimate_noise(flat) == 0.0
    op = scene[0]
    with pytest.raises(ValueError, match="noise measures 0 .* give gamma1"):
        lsfov.sparse_smooth_deblur(np.full(op.shape, 7.0, np.float32), op, iterations=2)
    lsfov.sparse_smooth_deblur(np.full(op.shape, 7.0, np.float32), op, gamma1=1.0, iterations=2)  # given: runs


def _chunked_error(op, y, chunks, iterations=6, **kw):
    """Largest difference between the chunked and whole-array results, relative to each one's peak.
    Early iterates: what a short halo gets wrong is largest while the iterates move most."""
    whole = lsfov.sparse_smooth_deblur(y, op, iterations=iterations, **kw)
    lazy = lsfov.sparse_smooth_deblur(da.from_array(y, chunks=chunks), op, iterations=iterations, exchange_every=3, **kw)
    return max(float(np.abs(a.compute() - b).max() / b.max()) for a, b in zip(lazy, whole))


def test_sparse_smooth_default_weights_and_chunked_equals_whole(scene):
    op, y, *_ = scene
    for chunks in (64, (50, 78)):
        # float32 rounding gives <= 1.5e-6 of the peak. This scene's Gaussian is ~0 at its rim, so a
        # halo one pixel short would pass here too: test_a_short_halo_is_caught checks that on a box.
        assert _chunked_error(op, y, chunks) < 3.5e-6
        assert _chunked_error(op, y, chunks, iterations=30) < 1e-5


@pytest.mark.parametrize("n, ksize, chunks, every, iterations", [
    (96, 5, 16, 1, 4), (96, 5, 20, 1, 4), (100, 3, 30, 2, 4),  # chunks thinner than the start's filter radius
    (128, 17, 128, 1, 1), (16, 5, 16, 1, 3),  # one chunk (its rim thinner than the radius); an image smaller than it
    (64, 9, 5, 1, 3),  # chunks smaller than one iteration's halo: grown (they were refused), as TV-RL grows them
])
def test_small_chunks_and_small_images_equal_the_whole_array(n, ksize, chunks, every, iterations):
    rng = np.random.default_rng(n + ksize)
    op = lsfov.ProductConvolution.from_grid(lsfov.psf.gaussian(1.0, size=ksize)[None, None], (n, n))
    y = (op.apply(rng.uniform(0, 50, (n, n)).astype(np.float32) * (rng.random((n, n)) < 0.02)) + 20
         + rng.normal(0, 1, (n, n))).astype(np.float32)
    whole = lsfov.sparse_smooth_deblur(y, op, iterations=iterations, warn_dense=1.0)
    lazy = lsfov.sparse_smooth_deblur(da.from_array(y, chunks=chunks), op, iterations=iterations,
                                      exchange_every=every, warn_dense=1.0)
    for a, b in zip(lazy, whole):
        np.testing.assert_allclose(a.compute(), b, atol=3.5e-6 * float(b.max()))


def test_one_chunk_images_run_as_one_block(scene, lsfov_log):
    """A Dask or xarray image of one chunk (what da.from_array gives up to 128 MiB): no halo to
    exchange, the whole-array result; the same for TV-RL, in one exchange."""
    import logging

    import xarray as xr

    op, y, *_ = scene
    whole = lsfov.sparse_smooth_deblur(y, op, iterations=20)
    for img in (da.from_array(y), xr.DataArray(da.from_array(y), dims=("y", "x"))):
        with lsfov_log(logging.INFO) as said:
            got = lsfov.sparse_smooth_deblur(img, op, iterations=20)
        assert "sparse+smooth: 20 iterations in 1 exchange, halo 0 px" in said
        for a, b in zip(got, whole):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-5 * float(b.max()))
    lazy = lsfov.deconvolve(da.from_array(y), op, 20)
    assert len(lazy.dask) < 40  # one block, one exchange (a split image: hundreds of tasks)
    np.testing.assert_allclose(lazy.compute(), lsfov.deconvolve(y, op, 20), rtol=1e-4, atol=1e-5 * float(y.max()))


def test_a_short_halo_is_caught(monkeypatch):
    """Control of the tolerance above: a halo of 2r − 1 pixels per iteration instead of 2r is outside
    it. An 11x11 box (sharp edges) shows it; the scene's Gaussian, ~0 at its rim, barely would."""
    from lsfov.restore import sparse_smooth

    op, y, *_ = _scene(np.full((11, 11), 1 / 121, np.float32))
    kw = dict(warn_dense=1.0)  # a box-blurred scene looks dense; no warning wanted here
    for chunks in (64, (50, 78)):
        assert _chunked_error(op, y, chunks, **kw) < 3.5e-6  # measured <= 1.5e-6
    real = sparse_smooth.lazy_exchanges  # takes the per-iteration spread, max(2 r, 2) = 10 px here
    monkeypatch.setattr(sparse_smooth, "lazy_exchanges",
                        lambda y_, counts, spread, *a, **k: real(y_, counts, spread - 1, *a, **k))
    for chunks in (64, (50, 78)):
        assert _chunked_error(op, y, chunks, **kw) > 3.5e-6  # measured 8.7e-6 and 9.2e-6


def test_sparse_smooth_through_scratch_equals_lazy_and_resumes(scene, tmp_path, count_calls):
    import dask

    from lsfov.restore import sparse_smooth

    op, y, *_ = scene
    dy = da.from_array(y, chunks=(50, 78))
    kw = dict(iterations=12, exchange_every=4, scratch=tmp_path)  # three exchanges
    lazy = [a.compute() for a in lsfov.sparse_smooth_deblur(dy, op, iterations=12, exchange_every=4)]
    with dask.config.set(scheduler="synchronous"):
        calls = count_calls(sparse_smooth, "_block")
        through = [a.compute() for a in lsfov.sparse_smooth_deblur(dy, op, **kw)]
        total = len(calls)
        per_exchange = total // 3
        # Dies in the second exchange, two of its blocks done.
        count_calls(sparse_smooth, "_block", fail_at=per_exchange + 3, error=RuntimeError("job killed"))
        with pytest.raises(RuntimeError, match="job killed"):
            lsfov.sparse_smooth_deblur(dy, op, **kw)
        calls = count_calls(sparse_smooth, "_block")
        resumed = [a.compute() for a in lsfov.sparse_smooth_deblur(dy, op, resume=True, **kw)]
        assert len(calls) == total - per_exchange - 2
    for a, b, c in zip(through, resumed, lazy):  # through zarr or not, resumed or not: the same bytes
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)
    with pytest.raises(ValueError, match="scratch"):
        lsfov.sparse_smooth_deblur(dy, op, resume=True)


def test_sparse_smooth_bad_input_and_dense_warning(scene, tmp_path):
    op, y, *_ = scene
    with pytest.raises(ValueError, match="shape"):
        lsfov.sparse_smooth_deblur(y[:100], op)
    with pytest.raises(ValueError, match=">= 0"):
        lsfov.sparse_smooth_deblur(y, op, -1.0)
    bad = y.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lsfov.sparse_smooth_deblur(bad, op)
    for zeros in (np.zeros(y.shape), da.zeros(y.shape, chunks=64)):  # (as deconvolve says it)
        with pytest.raises(ValueError, match="image is all zero"):
            lsfov.sparse_smooth_deblur(zeros, op, iterations=5)
    for inverted in (-y, da.from_array(-y, chunks=64)):  # once two zero components, in silence
        with pytest.raises(ValueError, match=r"image has no positive pixel \(max -[0-9.]+\); .* inverted\?"):
            lsfov.sparse_smooth_deblur(inverted, op, iterations=5)
    texture = op.apply(lsfov.simulate.sample_image("camera", y.shape) * 500)
    with pytest.warns(UserWarning, match="does not look like"):
        lsfov.sparse_smooth_deblur(texture, op, 0.01, iterations=20)
    # Through scratch (what `lsfov bss` does) the result is computed: it is checked too.
    with pytest.warns(UserWarning, match="does not look like"):
        lsfov.sparse_smooth_deblur(da.from_array(texture, chunks=64), op, 0.01, iterations=20, scratch=tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", "(?s).*does not look like")
        lsfov.sparse_smooth_deblur(da.from_array(y, chunks=64), op, iterations=20, scratch=tmp_path)  # sources: no warning


def test_locate_sources_whole_and_chunked(scene):
    op, y, u1, u2, pos = scene
    sparse, _ = lsfov.sparse_smooth_deblur(y, op)
    from lsfov.restore import locate_sources

    found = locate_sources(sparse, op, estimate_noise(y))
    assert found.shape[1] == 3 and np.all(np.diff(found[:, 2]) <= 0)  # brightest first
    d, _ = cKDTree(pos).query(found[:, :2])
    dt, _ = cKDTree(found[:, :2]).query(pos)
    assert np.mean(d <= 1.5) > 0.95 and np.mean(dt <= 1.5) > 0.9
    lazy = locate_sources(da.from_array(sparse, chunks=50), op, estimate_noise(y))
    np.testing.assert_array_equal(lazy, found)
    with pytest.raises(ValueError, match="noise"):
        locate_sources(sparse, op, 0.0)



def test_a_source_on_equal_pixels_is_one_source_whatever_the_chunks():
    """500 + 500 on two pixels was two sources of 1000 each; a plateau of three pixels of 300, three
    sources of 2100 in all; a tie across a chunk's edge, one per chunk."""
    from lsfov.restore import locate_sources

    op = lsfov.ProductConvolution.from_grid(lsfov.psf.gaussian(1.5, 1.5, size=9)[None, None], (128, 128))
    s = np.zeros((128, 128), np.float32)
    s[20, 20] = s[20, 21] = 500  # a source between two pixels
    s[40, 40] = s[41, 41] = 500  # ... diagonally
    s[60, 30:33] = 300
    s[63, 80] = s[64, 80] = 400  # across the edge of 64-pixel chunks
    s[100, 100] = 1000
    want = [[20, 20, 1000], [40, 40, 1000], [100, 100, 1000], [60, 31, 900], [63, 80, 800]]
    for arr in (s, da.from_array(s, chunks=64)):
        found = locate_sources(arr, op, 1.0)
        np.testing.assert_allclose(found[:, 2], [1000, 1000, 1000, 900, 800])  # brightest first
        np.testing.assert_allclose(sorted(found.tolist()), sorted(want))

def test_no_sources_on_the_edge_of_a_bright_background():
    """A field cut out of a larger one: its background goes on beyond the edge. The extended field
    explains the light that comes in from there; a zero world outside would put it into the sparse
    component on the outermost pixels (a frame of false sources)."""
    from lsfov.restore import locate_sources

    rng = np.random.default_rng(5)
    k = lsfov.psf.gaussian(1.5, size=11)
    n, p = 128, 10
    big = lsfov.ProductConvolution.from_grid(k[None, None], (n + 2 * p, n + 2 * p))
    u = np.zeros((n + 2 * p,) * 2, np.float32)
    pos = rng.integers(p + 8, n + p - 8, (20, 2))
    u[pos[:, 0], pos[:, 1]] = 500
    yy = np.mgrid[: n + 2 * p, : n + 2 * p][0] / n
    y = big.apply(u + (100 + 50 * yy).astype(np.float32))[p:-p, p:-p]
    y = (y + rng.normal(0, 2.0, y.shape)).astype(np.float32)
    op = lsfov.ProductConvolution.from_grid(k[None, None], (n, n))
    sparse, _ = lsfov.sparse_smooth_deblur(y, op)
    found = locate_sources(sparse, op, estimate_noise(y))
    edge = np.ones(sparse.shape, bool)
    edge[5:-5, 5:-5] = False
    assert sparse[edge].sum() < 0.01 * sparse[~edge].sum()  # measured 0 (a zero world outside: 7.5x the sources')
    d, _ = cKDTree(pos - p).query(found[:, :2])
    dt, _ = cKDTree(found[:, :2]).query(pos - p)
    assert np.all(d <= 1.5) and np.all(dt <= 1.5)  # every source found, nothing else (20 of 20)


def _signed_kernel():
    """A PSF with a negative ring, as a calibrated PCA basis gives: sum 1, ℓ1 norm 1.4."""
    k = 1.8 * lsfov.psf.gaussian(1.5, size=15) - 0.8 * lsfov.psf.gaussian(2.5, size=15)
    return (k / k.sum()).astype(np.float32)


def _power_norm(op, n=60):
    """‖H‖₂ by power iteration on HᵀH."""
    u = np.random.default_rng(0).normal(size=op.shape).astype(np.float32)
    for _ in range(n):
        u = op.adjoint(op.apply(u))
        norm = float(np.linalg.norm(u))
        u /= norm
    return np.sqrt(norm)


def test_steps_are_safe_and_tight_for_signed_and_varying_psfs(subspace):
    """FISTA needs τ1 ≤ 1/(2‖H‖²). From the largest ℓ1 norm of a local PSF that is tight only for
    non-negative PSFs: signed ones (ℓ1 1.4 for sum 1) got steps 2x too short."""
    from lsfov.restore.sparse_smooth import _steps

    sharp, wide, signed = lsfov.psf.gaussian(1.0, size=15), lsfov.psf.gaussian(3.0, size=15), _signed_kernel()
    ops = {
        "signed": lsfov.ProductConvolution.from_grid(signed[None, None], (96, 96)),
        "signed, varying": lsfov.ProductConvolution.from_grid(np.stack([[signed, wide], [sharp, signed]]), (96, 96)),
        "non-negative, varying": lsfov.ProductConvolution.from_grid(np.stack([[sharp, wide], [wide, sharp]]), (96, 96)),
        "subspace (PCA basis)": subspace.operator(1),
    }
    for name, op in ops.items():
        bound = 1 / (2 * _steps(op, 10.0)[0])  # the ‖H‖² the steps assume
        true = _power_norm(op) ** 2
        assert true <= bound <= 1.3 * true, (name, true, bound)


def test_signed_psfs_start_the_background_at_its_level():
    """u2 starts at the smoothed image over the PSF's sum, not its ℓ1 norm: over ℓ1 = 1.4, a signed
    PSF's background started at 70 % of its level and the two parts never sorted it out (6000 false
    sources on a calibrated operator after 500 iterations; here 71 sources found for 30, and the
    background 3 % off, now 0.6 %)."""
    from lsfov.restore import locate_sources

    op, y, u1, u2, pos = _scene(_signed_kernel())
    sparse, smooth = lsfov.sparse_smooth_deblur(y, op, iterations=300)
    inner = (slice(10, -10), slice(10, -10))
    assert np.abs(smooth[inner] - u2[inner]).mean() < 0.02 * u2.mean()
    found = locate_sources(sparse, op, estimate_noise(y))
    d, _ = cKDTree(pos).query(found[:, :2])
    dt, _ = cKDTree(found[:, :2]).query(pos)
    assert np.all(d <= 1.5) and np.all(dt <= 1.5)  # every source found, nothing else


G1, G2 = 1.0, 10.0  # the weights of the optimality tests


def _kkt_case(seed, background, clip=None, skewed=False):
    """8 sources of 100-300 on ``background`` (48², Gaussian PSF σ 1.5, noise 1), optionally clipped at
    ``clip`` of the way from 20 to the peak; the iterates after 6000 FISTA steps (censored where clipped).
    ``skewed``: a 2x2 grid of Gaussians skewed each its own way, so that Hᵀ differs from H (a
    gradient taken with H would pass with the symmetric PSF). Returns (op, y, censored mask or None,
    u1, u2)."""
    from lsfov.restore.sparse_smooth import _steps

    rng = np.random.default_rng(seed)
    n = 48
    k = lsfov.psf.gaussian(1.5, size=9)[None, None]
    if skewed:
        ramp = np.linspace(0.2, 1.8, 9)
        k = np.stack([np.stack([k[0, 0] * ramp[:, None], k[0, 0] * ramp[None, ::-1]]),
                      np.stack([k[0, 0] * ramp[::-1, None], k[0, 0] * np.outer(ramp, ramp)])])
        k /= k.sum(axis=(-2, -1), keepdims=True)
    op = lsfov.ProductConvolution.from_grid(k.astype(np.float32), (n, n))
    u = np.zeros((n, n), np.float32)
    pos = rng.integers(5, n - 5, (8, 2))
    u[pos[:, 0], pos[:, 1]] = rng.uniform(100, 300, 8)
    y = (op.apply(u + background(n)) + rng.normal(0, 1, (n, n))).astype(np.float32)
    sat = None
    if clip is not None:
        level = np.float32(20 + clip * (y.max() - 20))
        y = np.minimum(y, level)
        sat = (y >= level).astype(np.float32)
    zero = np.zeros((n, n), np.float32)
    a, b, *_ = _iterate(op, y, (zero,) * 4, 0, 6000, G1, G2, _steps(op, G2), np, censored=sat)
    return op, y, sat, a, b


def _violation(grad, x):
    """Largest violation of the KKT condition of a non-negative variable, relative to γ1."""
    on = x > 1e-3 * x.max()
    return max(np.abs(grad[on]).max(), np.maximum(-grad[~on], 0).max(initial=0)) / G1


def test_fista_momentum_is_becks_sequence_from_any_start():
    """β_k = (t_k − 1)/t_{k+1}, t_0 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k²))/2 (Beck & Teboulle); a block
    resumed at iteration s continues the sequence where it stopped (chunked equals whole whatever the
    start, but a shifted sequence would change every run)."""
    import itertools

    from lsfov.restore.sparse_smooth import _momenta

    t1 = (1 + np.sqrt(5)) / 2
    t2 = (1 + np.sqrt(1 + 4 * t1 * t1)) / 2
    first = list(itertools.islice(_momenta(0), 40))
    assert first[0] == 0.0 and first[1] == pytest.approx((t1 - 1) / t2, rel=1e-15)
    assert all(a < b < 1 for a, b in zip(first[1:], first[2:]))
    for start in (1, 7, 33):
        assert list(itertools.islice(_momenta(start), 40 - start)) == first[start:]


def test_sparse_smooth_reaches_the_optimality_conditions():
    """After many iterations the iterates satisfy the KKT conditions of the objective, term by term:
    with g = Hᵀ(H(u1 + u2) − y), g + γ1 = 0 where u1 > 0 and g + γ1 ≥ 0 where u1 = 0; and
    g + 2γ2ΔᵀΔu2 the same with 0 for u2. An objective that only decreases would not catch a
    threshold of γ1/2 (u1's violation 0.50 of γ1) or a gradient of γ2ΔᵀΔ (u2's 1.0); skewed,
    spatially varying PSFs catch a gradient taken with H for Hᵀ (symmetric ones would not)."""
    from lsfov.restore.sparse_smooth import _laplacian

    op, y, _, a, b = _kkt_case(0, lambda n: (20 + 10 * np.mgrid[:n, :n][0] / n).astype(np.float32), skewed=True)
    g = op.adjoint(op.apply(a + b) - y)
    assert (a > 0).sum() >= 8 and (b > 0).all()  # both parts in play
    assert _violation(g + G1, a) < 0.02  # measured 0.001
    assert _violation(g + 2 * G2 * _laplacian(_laplacian(b, np), np), b) < 0.2  # measured 0.04


def test_censored_sparse_smooth_reaches_its_optimality_conditions():
    """Clipped pixels are censored: their residual counts only below zero, ``min(H(u1 + u2) − y, 0)``.
    The KKT conditions of that objective hold after many iterations, those of the plain one do not."""
    from lsfov.restore.sparse_smooth import _laplacian

    op, y, sat, a, b = _kkt_case(1, lambda n: 20, clip=0.4)  # the brighter sources clip
    res = op.apply(a + b) - y
    assert sat.sum() >= 8 and (res[sat > 0] > 0).sum() >= 5  # the prediction rises above the clip: rule active
    g = op.adjoint(np.where(sat > 0, np.minimum(res, 0), res))
    assert _violation(g + G1, a) < 0.02
    assert _violation(g + 2 * G2 * _laplacian(_laplacian(b, np), np), b) < 0.2
    assert _violation(op.adjoint(res) + G1, a) > 0.1  # the plain residual's conditions fail here (measured 0.26)


@pytest.mark.filterwarnings("ignore:.*of the pixels are at or above the saturation level:lsfov.LsfovWarning")
def test_clipped_sources_are_censored_whole_and_chunked(scene):
    """Sources clipped at a camera's limit: censored, each stays one source (at its value, a clipped
    plateau breaks into several); chunked equals whole; an integer image's clip is its type's
    largest count; with no pixel at the level the result is the plain one, bit for bit."""
    from lsfov.restore import estimate_noise, locate_sources

    op, y, u1, u2, pos = scene
    level = np.float32(np.quantile(y, 0.99))
    yc = np.minimum(y, level)
    found = {}
    for censor in (False, True):
        sparse, _ = lsfov.sparse_smooth_deblur(yc, op, saturation=float(level) if censor else False)
        found[censor] = locate_sources(sparse, op, estimate_noise(yc))
    assert len(found[False]) > len(found[True]) + 3 and len(found[True]) <= len(pos) + 2, \
        {k: len(v) for k, v in found.items()}
    assert _chunked_error(op, yc, 64, iterations=20, saturation=float(level)) < 1e-5
    counts = np.rint(yc / level * 65535).astype(np.uint16)
    for got, want in zip(lsfov.sparse_smooth_deblur(counts, op, iterations=20),
                         lsfov.sparse_smooth_deblur(counts.astype(np.float32), op, iterations=20, saturation=65535)):
        np.testing.assert_array_equal(got, want)
    plain = lsfov.sparse_smooth_deblur(y, op, iterations=20, saturation=False)
    for got, want in zip(lsfov.sparse_smooth_deblur(y, op, iterations=20, saturation=2 * float(y.max())), plain):
        np.testing.assert_array_equal(got, want)


def test_a_one_pixel_psf_runs_chunked_as_whole():
    """A 1-px PSF has no halo, but the smoothness term (a Laplacian of a Laplacian) reaches 2 px an
    iteration: the blocks' halo is at least that."""
    rng = np.random.default_rng(4)
    op = lsfov.ProductConvolution.from_grid(np.ones((1, 1, 1, 1), np.float32), (48, 48))
    assert op.halo == 0
    y = (20 + 80 * (rng.random((48, 48)) < 0.02) + rng.normal(0, 1, (48, 48))).astype(np.float32)
    whole = lsfov.sparse_smooth_deblur(y, op, iterations=6, warn_dense=1.0)
    lazy = lsfov.sparse_smooth_deblur(da.from_array(y, chunks=16), op, iterations=6, exchange_every=3, warn_dense=1.0)
    for a, b in zip(lazy, whole):
        np.testing.assert_allclose(a.compute(), b, atol=3.5e-6 * float(b.max()))


def test_the_default_noise_is_read_on_the_central_1024_pixels():
    """γ1's default reads the noise on the central 1024 x 1024 pixels (a large image's edges, often
    vignetted or flat-field corrected worse, do not set it); a shorter axis is read whole."""
    import xarray as xr

    rng = np.random.default_rng(8)
    y = rng.normal(100, 2.0, (1100, 24)).astype(np.float32)
    y[:38] += rng.normal(0, 40, (38, 24)).astype(np.float32)  # rows 0-37 and 1062-: outside the crop
    y[1062:] += rng.normal(0, 40, (38, 24)).astype(np.float32)
    op = lsfov.ProductConvolution.from_grid(np.ones((1, 1, 1, 1), np.float32), y.shape)
    sparse, _ = lsfov.sparse_smooth_deblur(xr.DataArray(y, dims=("y", "x")), op, iterations=1, warn_dense=1.0)
    assert sparse.attrs["noise"] == pytest.approx(2.0, rel=0.05)
    assert sparse.attrs["noise"] == pytest.approx(estimate_noise(y[38:1062]))
    y[37] += 1e4  # the crop's first row is 38
    assert lsfov.sparse_smooth_deblur(xr.DataArray(y, dims=("y", "x")), op, iterations=1,
                                      warn_dense=1.0)[0].attrs["noise"] == pytest.approx(estimate_noise(y[38:1062]))


def test_the_dense_warning_counts_pixels_above_a_tenth_of_the_peak():
    from lsfov.restore.sparse_smooth import _warn_dense

    sparse = np.zeros((100, 100), np.float32)
    sparse[0, 0] = 1.0
    sparse.flat[1:600] = 0.11  # 6 % of the pixels just above a tenth of the peak
    with pytest.warns(lsfov.LsfovWarning, match="6% of the pixels carry point sources"):
        _warn_dense(sparse, 0.05)
    sparse.flat[1:600] = 0.09  # just below: sources' skirts, not sources
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_dense(sparse, 0.05)
        _warn_dense(np.zeros((4, 4), np.float32), 0.05)  # nothing found: nothing said
