"""Formulas pinned to their definitions. A mutation review (one plausible bug at a time: a sign, a
dropped term, a factor, a swapped weight) found each of these changeable without any other test
failing: the other tests check behaviour that such a bug keeps (equivariance, a fit that passes
planes exactly, beads on whole pixels, thresholds far from every test value)."""
import numpy as np
import pytest
import torch
import xarray as xr
from scipy import ndimage

import lsfov
from lsfov import psf
from lsfov.calibrate import basis, bead_psfs, bss, cone, extract_psfs
from lsfov.estimate import depth, synth
from lsfov.estimate import model as M
from lsfov.restore import sparse_smooth


def test_symmetrized_prediction_is_the_mean_over_the_eight_symmetries():
    # A patch that the 8 rotations and flips leave unchanged: its symmetrized estimate is the plain one.
    x = torch.from_numpy(np.asarray(synth.synthesize(4, "G1", split="test", seed=5)["patches"]))
    xs = torch.stack([M.transform_patches(x, *g) for g in M.D4]).mean(0)
    m = lsfov.load_model("G1")
    sym, plain = m.predict(xs, symmetrize=True), m.predict(xs)
    for k in plain:
        np.testing.assert_allclose(sym[k], plain[k], atol=1e-4, err_msg=k)
    # Ordinary patches of G2 (a transpose swaps its widths): the mean of the 8 estimates, each read back
    # by hand, and not the plain estimate (a symmetrize= ignored passed the check above).
    x = torch.from_numpy(np.asarray(synth.synthesize(16, "G2", split="test", seed=5)["patches"]))
    m = lsfov.load_model("G2")
    sym, plain = m.predict(x, symmetrize=True), m.predict(x)
    ways = [m.predict(M.transform_patches(x, *g)) for g in M.D4]
    mean = {k: np.mean([w[{"sigma_y": "sigma_x", "sigma_x": "sigma_y"}[k] if g[0] else k] for w, g in zip(ways, M.D4)],
                       axis=0) for k in ("sigma_y", "sigma_x")}
    for k in mean:
        np.testing.assert_allclose(sym[k], mean[k], atol=1e-4, err_msg=k)
        assert np.abs(sym[k] - plain[k]).max() > 1e-2, k


@pytest.mark.parametrize("z", [1.0, -1.0])
def test_pupil_defocus_by_distance_is_paraxial_defocus(z):
    """Paper 003 Eq. 7's angular-spectrum term ``z sqrt(n²/λ² − |ξ|²)`` at a low NA is Noll 4's defocus
    of ``−z NA² / (4√3 n λ)`` waves RMS (sign, immersion index and wavelength all enter)."""
    o = lsfov.Optics(na=0.5, wavelength_um=0.5, pixel_um=0.2, immersion_index=1.33)
    c4 = -z * o.na**2 / (4 * np.sqrt(3) * o.immersion_index * o.wavelength_um)
    by_distance = psf.zernike({6: 0.1}, o, z_um=z)
    assert np.abs(by_distance - psf.zernike({4: c4, 6: 0.1}, o)).max() < 0.03 * by_distance.max()
    assert np.abs(by_distance - psf.zernike({4: -c4, 6: 0.1}, o)).max() > 0.1 * by_distance.max()


def test_bead_centres_are_found_to_a_fraction_of_a_pixel():
    yy, xx = np.mgrid[:200, :200].astype(float)
    true = np.array([[60.3, 70.7], [120.6, 130.2], [60.0, 140.45]])
    img = 10 + sum(1000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5**2)) for y, x in true)
    _, centres = extract_psfs(img.astype(np.float32), np.rint(true), 8.0)
    np.testing.assert_allclose(centres, true, atol=0.05)
    # an xarray image is read by its dims' names (an (x, y) one was once read transposed)
    xy = xr.DataArray(img.T.astype(np.float32), dims=("x", "y"))
    np.testing.assert_array_equal(extract_psfs(xy, np.rint(true), 8.0)[1], centres)
    img[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        extract_psfs(img, np.rint(true), 8.0)
    with pytest.raises(ValueError, match="background order must be an integer >= 0"):
        extract_psfs(np.nan_to_num(img), np.rint(true), 8.0, background_order=-1)


def test_beads_closer_than_2r_are_crowded_and_farther_ones_kept():
    """App. A-b: a bead is isolated when no other maximum lies within 2r. (The pair 2.5 r apart lies
    midway between pixels, so each of its beads ties two maxima of the response: one bead, not a crowd.)"""
    yy, xx = np.mgrid[:220, :220].astype(float)

    def bead(y, x):
        return 1000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.3**2))

    lone = sum(bead(y, x) for y in (40, 180) for x in (40, 180))
    for sep, kept, crowded in ((15, 4, 2), (25, 6, 0)):  # 1.5 r and 2.5 r apart, r = 10
        img = (10 + lone + bead(110, 110 - sep / 2) + bead(110, 110 + sep / 2)).astype(np.float32)
        b = bead_psfs(img, radius=10)
        assert (len(b.positions), b.n_crowded) == (kept, crowded), sep


def test_a_flat_topped_bead_of_four_pixels_is_saturated():
    yy, xx = np.mgrid[:160, :160].astype(float)
    img = 10 + sum(800 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.4**2)) for y, x in ((40, 40), (40, 120), (120, 40)))
    img += 2000 * np.exp(-((yy - 120.5) ** 2 + (xx - 120.5) ** 2) / (2 * 1.4**2))
    img = np.minimum(img, np.sort(img.ravel())[-4])  # the bright bead clipped: a 2x2 plateau at the maximum
    with pytest.warns(lsfov.LsfovWarning, match="saturated"):
        b = bead_psfs(img.astype(np.float32), radius=10)
    assert len(b.positions) == 3 and not (np.abs(b.positions - 120.5) < 2).all(axis=1).any()


def test_gavish_donoho_factor():
    assert basis.rank_threshold((400, 400)) == pytest.approx(2.858, abs=0.01)  # paper 003's value, square
    b = 0.05
    assert basis.rank_threshold((1000, 50)) == pytest.approx(0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43)
    assert basis.rank_threshold((50, 1000)) == basis.rank_threshold((1000, 50))


def test_basis_coefficients_are_the_unit_sum_patches_projections():
    m = psf.MODELS["Z3"]
    patches = m.render(m.sample(60, 3), size=15)  # bead patches sum to one (bead_psfs)
    b = basis.psf_basis(patches, 4)
    kept = patches[b.keep].astype(np.float64)
    np.testing.assert_allclose(b.coefficients, kept.reshape(len(kept), -1) @ b.kernels.reshape(4, -1).T,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.coefficients @ b.kernels.sum(axis=(1, 2)), 1.0, atol=0.1)  # nearly in the span


def test_cone_starts_from_the_mean_direction():
    rng = np.random.default_rng(1)
    obs = np.abs(rng.normal(size=(4, 50))) + 0.2
    cols = cone.cone_columns(obs, max_columns=3)
    unit = obs / np.linalg.norm(obs, axis=0)
    mean = unit.mean(axis=1)
    np.testing.assert_allclose(cols[:, 0], mean / np.linalg.norm(mean), atol=1e-12)


def test_identification_samples_the_maps_bilinearly():
    rng = np.random.default_rng(2)
    maps = rng.random((3, 40, 50))
    pos = np.column_stack([rng.uniform(0, 39, 25), rng.uniform(0, 49, 25)])
    ref = np.stack([ndimage.map_coordinates(m, pos.T, order=1) for m in maps], axis=1)
    np.testing.assert_allclose(bss._sample_maps(maps, pos), ref, atol=1e-12)
    # a loaded subspace's maps are Dask arrays: read at once, the same values
    import dask.array as da

    np.testing.assert_array_equal(bss._sample_maps(da.from_array(maps, chunks=(3, 16, 16)), pos),
                                  bss._sample_maps(maps, pos))


def test_sources_are_kept_at_k_sigma_over_the_psf_norm():
    """The detection rule of :func:`locate_sources`: a 3x3 sum of at least ``k σ / ‖h‖₂``."""
    op = lsfov.ProductConvolution.from_grid(psf.gaussian(1.5, size=11)[None, None], (64, 64))
    level = 3.0 * 2.0 / np.sqrt((psf.gaussian(1.5, size=11).astype(np.float64) ** 2).sum())
    sparse = np.zeros((64, 64), np.float32)
    sparse[20, 20], sparse[40, 44] = 1.05 * level, 0.95 * level
    found = sparse_smooth.locate_sources(sparse, op, noise=2.0, k=3.0)
    assert found[:, :2].tolist() == [[20, 20]]


def test_subspace_generators_are_operators_of_unit_flux():
    """Paper 003 Sec. II-E-a's generators Γ_k, scaled so that their operators keep the light: mean
    over the field of Σ_ij Γ[i,j] (Σ h_i) a_j = 1 (the paper divides by Σ_ij Γ_k[i,j], which
    depends on the bases' signs and scales). An operator with no positive flux is refused."""
    rng = np.random.default_rng(3)
    h, a, g = rng.random((3, 5, 5)), rng.random((4, 8, 8)), rng.random((5, 3, 4)) + 0.1
    sub = lsfov.OperatorSubspace(h, a, g)
    flux = np.einsum("kij,i,j->k", sub.normalized_gammas, h.sum(axis=(1, 2)), a.mean(axis=(1, 2)))
    np.testing.assert_allclose(flux, 1.0)
    np.testing.assert_allclose(sub.normalized_gammas * (g / sub.normalized_gammas)[:, :1, :1], g)  # only scaled
    g[2] *= -1
    with pytest.raises(ValueError, match="operator of calibration image 2 has no positive flux"):
        lsfov.OperatorSubspace(h, a, g).normalized_gammas


def test_local_plane_weights_are_gaussian_of_width_sigma_over_3_sigma():
    delta = np.zeros((31, 31))
    delta[15, 15] = 1.0
    d = np.arange(-6, 7)  # ceil(3 σ) = 6 nodes each side for σ = 2
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * 2.0**2))
    assert depth.local_plane(delta, 1.0, 2.0)[15, 15] == pytest.approx(1 / g.sum(), rel=1e-9)


def test_robust_local_plane_is_three_tukey_reweightings():
    rng = np.random.default_rng(4)
    v = rng.normal(size=(12, 14))
    v[3, 4] += 3.0
    v[8, 10] -= 2.5
    w = np.ones_like(v)
    yy, xx = np.mgrid[:12, :14]
    design = np.column_stack([np.ones(v.size), yy.ravel(), xx.ravel()])

    def plane(weights):  # one plane over the grid: weighted least squares
        sw = np.sqrt(weights.ravel())
        coef = np.linalg.lstsq(design * sw[:, None], v.ravel() * sw, rcond=None)[0]
        return (design @ coef).reshape(v.shape)

    fit = plane(w)
    for _ in range(3):
        scale = 1.4826 * np.median(np.abs(v - fit))
        u = np.abs(v - fit) / (4.685 * scale)
        fit = plane(np.where(u < 1, (1 - u**2) ** 2, 0.0))
    np.testing.assert_allclose(depth.local_plane(v, w, np.inf, robust=True), fit, atol=1e-9)


def test_curve_depth_weighs_each_reading_by_its_noise():
    cal = depth.DepthCalibration(axis0=0.0, slope=1.0, offset=0.0, r2=1.0, mae_um=0.0, n_nodes=9, method="curve",
                                 curves=((1.0, 0.0), (1.0, 0.0)), noise=(1.0, 100.0), range_um=(-5.0, 5.0))

    def one(v):
        return ("gy", "gx"), np.full((1, 1), v, np.float32)

    ds = xr.Dataset({"focus": one(1.0), "astigmatism": one(0.1), "axis": one(0.0), "validity": one(1.0),
                     "focus_astig_sin": one(0.0), "focus_astig_cos": one(3.0)},
                    attrs={"params": ["focus", "astigmatism", "axis"]})
    # focus² reads 1 (noise variance 1), the product 3 (variance 100): the weighted least squares depth
    assert float(depth.estimate_depth(ds, cal)[0, 0]) == pytest.approx((1 + 3 / 100) / (1 + 1 / 100), rel=1e-3)


@pytest.mark.parametrize("photons, read_noise, least", [(None, (0.0, 3.0), 0.3), ((100.0, 1000.0), (10.0, 40.0), 0.1)])
def test_validity_label_is_the_signal_over_the_noise_at_the_patch_light(photons, read_noise, least):
    """(Dim light and a strong read noise too, where the read noise's variance decides: 74 of these
    256 patches would be labelled otherwise with its standard deviation in its place.)"""
    m = psf.MODELS["Z3"]
    images = synth.library(synth.SOURCES, "test")
    kw = dict(invalid_fraction=0.08, photons=photons or synth.PHOTONS, read_noise=read_noise, illumination=0.5)
    _, params, valid, hid = synth._batch(m, images, 256, np.random.default_rng(1), hidden=True, **kw)
    blur = synth._blur(hid["sharp"], m.render(params, size=m.size))
    signal = hid["beta"] * hid["photons"] * blur.std(axis=(1, 2)) * hid["light"].mean(axis=(1, 2))
    level = hid["beta"] * hid["photons"] * (blur * hid["light"]).mean(axis=(1, 2))
    want = (signal > np.sqrt(hid["beta"] * level + hid["read_noise"] ** 2)) & (hid["sharp"].std(axis=(1, 2)) > 0)
    assert least < valid.mean() < 0.98 and (want != valid).sum() == 0
    # the draws: photons log-uniform over their range, read noise uniform, the gain β uniform on [0.5, 1]
    lo, hi = kw["photons"]
    assert lo <= hid["photons"].min() and hid["photons"].max() <= hi
    assert np.median(hid["photons"]) == pytest.approx(np.sqrt(lo * hi), rel=0.25)
    assert read_noise[0] <= hid["read_noise"].min() and hid["read_noise"].max() <= read_noise[1]
    assert 0.5 <= hid["beta"].min() < 0.52 and 0.98 < hid["beta"].max() <= 1.0


def test_synthesis_crops_are_windows_under_the_eight_symmetries(symmetries_seen):
    h, w = 150, 170
    image = np.arange(h * w).reshape(h, w)  # each pixel's value is its position
    crops = synth._crops([image.astype(np.float32)], 300, 32, np.random.default_rng(5)).astype(np.int64)
    assert symmetries_seen(crops, image, 32) == set(range(8))


def test_sparse_smooth_defaults_are_the_documented_ones():
    """γ1 = 3σ‖h‖₂ (σ the image's measured noise), γ2 = 10, recorded on a labelled result."""
    k = psf.gaussian(1.5, size=11)
    op = lsfov.ProductConvolution.from_grid(k[None, None], (48, 48))
    rng = np.random.default_rng(6)
    y = rng.poisson(op.apply(np.pad(np.ones((1, 1)), ((20, 27), (30, 17))) * 400) + 5).astype(np.float32)
    res = lsfov.sparse_smooth_deblur(xr.DataArray(y, dims=("y", "x")), op, iterations=3)
    sparse = res[0] if isinstance(res, tuple) else res["sparse"]
    sigma = sparse_smooth.estimate_noise(y)
    assert sparse.attrs["gamma2"] == 10.0
    assert sparse.attrs["gamma1"] == pytest.approx(3 * sigma * np.sqrt((k.astype(np.float64) ** 2).sum()), rel=1e-5)


def test_basis_rejects_patches_beyond_zscore_deviations_of_the_first_pca():
    m = psf.MODELS["Z3"]
    patches = m.render(m.sample(80, 7), size=31)
    patches[:4] = (patches[:4] + np.roll(patches[4:8], 6, axis=2)) / 2  # double beads
    unit = patches.reshape(80, -1).astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    c = unit @ np.linalg.svd(unit, full_matrices=False)[2][:3].T  # coefficients on the first PCA's components
    dev = np.abs(c - c.mean(axis=0)) / c.std(axis=0)
    for z in (1.0, 1.5):  # levels low enough to reject a few of these, and for twice them to keep more
        want = np.all(dev <= z, axis=1)
        assert 0 < (~want).sum() and not np.array_equal(want, np.all(dev <= 2 * z, axis=1))  # the level matters
        np.testing.assert_array_equal(basis.psf_basis(patches, 3, zscore=z).keep, want)


def test_basis_signs_are_fixed_for_every_component():
    """The first component sums to > 0; every later one has its largest-magnitude entry positive
    (so two runs on the same beads give the same basis, whatever sign the SVD returns)."""
    vt = np.random.default_rng(4).normal(size=(5, 40))
    vt[1:] *= np.array([-1, 1, -1, -1])[:, None]
    fixed = basis._fix_signs(vt)
    assert fixed[0].sum() > 0
    for row, old in zip(fixed[1:], vt[1:]):
        assert row[np.abs(row).argmax()] > 0 and np.array_equal(np.abs(row), np.abs(old))
    np.testing.assert_array_equal(basis._fix_signs(-vt), fixed)


def test_psf_gain_is_read_between_the_kernels_frequency_bins():
    """The largest |FT| of a signed PSF (a PCA component) sets the BSS step. A Gaussian-windowed
    cosine at 1.5 cycles per kernel width peaks between the K-point transform's bins, where the 2K
    transform has one: the gain is found to 0.2 %, not 19 % below it (a step too long)."""
    k = 15
    yy, xx = np.mgrid[:k, :k] - k // 2
    kern = np.exp(-(yy**2 + xx**2) / 32.0) * np.cos(2 * np.pi * 1.5 / k * xx) + 0.02
    dense = np.abs(np.fft.rfft2(kern, s=(16 * k, 16 * k))).max()
    assert np.abs(np.fft.rfft2(kern)).max() < 0.82 * dense  # the premise: K bins miss the peak
    op = lsfov.ProductConvolution.from_grid(kern[None, None].astype(np.float32), (64, 64))
    assert sparse_smooth._psf_norms(op).gain == pytest.approx(dense, rel=2e-3)


def test_a_voronoi_cell_is_its_exact_area_however_thin():
    """Three beads 0.01 px apart in a row: the middle one's cell is a strip 0.01 px wide, from the
    field's edge (y = -0.5) to its bisector with the fourth bead (a straight edge: its height at the
    strip's middle, x = 10.01, is the mean). Beads at one place share their cell."""
    from lsfov.calibrate import voronoi_weights

    w = voronoi_weights([(10, 10), (10, 10.01), (10, 10.02), (50, 50)], (64, 64))
    top = (2400 + 39.99**2) / 80  # (y - 10)² = (y - 50)² + (50 - 10.01)²
    assert w[1] == pytest.approx(0.01 * (top + 0.5) / (64 * 64 / 4), rel=1e-9)
    twice = voronoi_weights([(10, 10), (10, 10), (50, 50)], (64, 64))
    assert twice[0] == twice[1] == pytest.approx(voronoi_weights([(10, 10), (50, 50)], (64, 64))[0] / 2 * 3 / 2)
    # Closer than Qhull's precision (it keeps one point of the two): still one cell for both, not one each.
    others = [(2867.2, 819.2), (2457.6, 3276.8)]
    near, apart = (voronoi_weights([(1228.8, 1638.4), (1228.8, 1638.4 + d), *others], (4096, 4096)) for d in (1e-11, 1e-9))
    assert near[0] + near[1] == pytest.approx(apart[0] + apart[1], rel=1e-6)


def test_a_patch_with_exactly_the_allowed_share_of_saturated_pixels_is_kept():
    """White-pixel ratio: a patch is invalid with *more than* ``max_saturated`` of its pixels at the
    camera's limit; exactly that share is allowed."""
    x = (lsfov.simulate.sample_image("coins", (128, 128)) * 3000 + 100).astype(np.uint16)
    flat = x.ravel()
    flat[:4096] = 65535  # 25 % exactly (a float32 share, exact at a quarter)
    assert lsfov.estimate_psf_map(x, "Z1", stride=64, max_saturated=0.25).attrs["saturation"] == 65535
    flat[4096] = 65535
    with pytest.raises(ValueError, match="every PSF-map node has more than 25 %"):
        lsfov.estimate_psf_map(x, "Z1", stride=64, max_saturated=0.25)


def test_train_stops_after_patience_epochs_without_a_better_validation(run, tmp_path, monkeypatch):
    """``lsfov train --patience 1``: one epoch no better than the best ends the run (the default, 4,
    would run all 5 epochs here)."""
    from lsfov.estimate import training

    run("-q", "train", "--synthesize", 48, "--psf-model", "G1", "--seed", 3, "tr.zarr")
    r2 = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    monkeypatch.setattr(training, "_val_loss", lambda *a, params=None, **k: (0.1, next(r2)))
    run("-q", "train", "tr.zarr", "m.pt", "--arch", "compact", "--epochs", 5, "--lr", "1e-3", "--batch-size", 16,
        "--patience", 1)
    assert lsfov.load_model(tmp_path / "m.pt").meta["training"]["epochs_run"] == 2
