"""Bead calibration (paper 003 App. A-C) and subspaces of operators (Sec. II-D)."""
import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.optimize import nnls
from scipy.spatial import cKDTree

import lsfov
from lsfov import simulate
from lsfov.calibrate import (
    OperatorSubspace, bead_psfs, calibrate_operator, coefficient_nodes, cone_columns, detect_beads, dirac_comb,
    estimate_radius, learn_subspace, node_grid, operator_distance, project_cone, psf_basis, radial_bump,
    remove_background, rescaled_distance, voronoi_weights,
)
from lsfov.calibrate.interpolate import NodeGrid
from lsfov.calibrate.subspace import _spatial_basis


@pytest.fixture(scope="module")
def field():
    return simulate.bead_field((384, 384), seed=11)


@pytest.fixture(scope="module")
def stack():
    return simulate.bead_stack(6, (320, 320), seed=21)


# ---------------------------------------------------------------------------------------------- beads


def test_detection_recall_and_precision(field):
    r = estimate_radius(field.image)
    assert 5 <= r <= 15  # the simulated PSFs are 31 px wide with most energy within ~10 px
    corner = np.zeros((100, 100), np.float32)
    corner[2, 2] = 100  # a bead at the border only: said with the option that goes around it
    with pytest.raises(ValueError, match=r"none at least 40 px from the border\): check the image, or give the PSF "
                                         r"radius in pixels \(--radius; radius=\)$"):
        estimate_radius(corner)
    found = detect_beads(field.image, r)
    d_found, _ = cKDTree(field.positions).query(found)
    d_true, _ = cKDTree(found).query(field.positions)
    # Beads closer than r/2 merge into one maximum: count those as one true bead.
    merged = cKDTree(field.positions).query(field.positions, k=2)[0][:, 1] < r / 2
    precision = np.mean(d_found <= 2)
    recall = np.mean((d_true <= 2) | merged)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_two_beads_closer_than_one_detection_are_not_one_isolated_bead():
    """Beads 6 px apart, one dimmer (r = 10), make one detection (candidates are r/2 apart) but two
    maxima of the response: the pair is crowded, not a misshapen PSF (App. A-b: 2r from every other
    maximum)."""
    yy, xx = np.mgrid[:200, :200].astype(np.float64)

    def bead(y, x, a):
        return a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.3**2))

    img = 10 + sum(bead(y, x, 1000) for y, x in ((40, 40), (40, 160), (160, 40), (160, 160)))
    img = (img + bead(100, 98, 1000) + bead(100, 104, 700)).astype(np.float32)  # the pair
    assert len(detect_beads(img, 10)) == 5  # the pair is one candidate
    b = bead_psfs(img, radius=10)
    d, _ = cKDTree(b.positions).query([(100, 100)])
    assert len(b.positions) == 4 and d[0] > 40 and b.n_crowded == 1


def test_an_elongated_bead_is_not_its_own_crowd_and_an_offset_image_keeps_its_light():
    """The response of an astigmatic, defocused bead is a ridge with several maxima a few pixels
    apart: without a dip between them they are one object (18 of 30 such beads are 40 px from any
    other; none was kept). A camera offset subtracted beforehand leaves negative pixels: they are
    the PSF's wings' noise, fitted with the background, not clipped (clipped, the beads lost light)."""
    from lsfov.simulate import bead_field

    bf = bead_field((512, 512), seed=11, n_beads=30, photons=40000, z_range_um=(0.6, 1.0), astigmatism=0.3,
                    psf_size=41)
    lone = cKDTree(bf.positions).query(bf.positions, k=2)[0][:, 1] > 40
    b = bead_psfs(bf.image)
    assert lone.sum() >= 18 and len(b.positions) >= 18  # measured 21 (some nearer others but still apart)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = bead_psfs(bf.image.astype(np.float32) - 50, radius=b.radius)
    np.testing.assert_allclose(low.fluxes, b.fluxes, rtol=1e-4)
    np.testing.assert_allclose(low.patches, b.patches, atol=1e-6)


def test_a_psf_of_two_lobes_is_measured_whole_and_calibrates():
    """Strong astigmatism (0.3 waves RMS) near focus splits each bead into two lobes about 8 px
    apart. At the finest detection scale each lobe was a bead whose profile the other cut short: r
    came out at 8 px for PSFs 17 px wide, every lobe crowded the other, and no bead was kept. The
    radius is now read again at a scale where a bead is one maximum."""
    bf = simulate.bead_field((384, 384), n_beads=24, seed=0, photons=20000, z_range_um=(-0.4, 0.4),
                             astigmatism=0.3, psf_size=61)
    k = bf.operator.local_psfs().reshape(-1, 61, 61)
    o = np.hypot(*np.mgrid[-30:31, -30:31])
    extent = max(o[p > 0.01 * p.max()].max() for p in k)  # the widest PSF's 1 % radius: 17.3 px
    assert detect_beads(bf.image, 4).shape[0] > 2 * 24  # (the lobes, at the finest scale)
    r = estimate_radius(bf.image)
    assert 0.7 * extent <= r <= 1.1 * extent, (r, extent)  # measured 13; 8 before
    b = bead_psfs(bf.image)
    lone = cKDTree(bf.positions).query(bf.positions, k=2)[0][:, 1] > 2 * r
    d, _ = cKDTree(bf.positions).query(b.positions)
    assert len(b.positions) == lone.sum() >= 12 and d.max() < 0.5  # one centre per bead, not per lobe
    assert operator_distance(calibrate_operator(bf.image), bf.operator) < 0.12  # measured 0.089


def test_hot_pixels_are_not_beads_and_are_repaired():
    """A camera's hot pixels (one pixel far above its neighbours) were taken for beads: 40 of them in
    a 512² field of 113 beads put delta patches into the PCA (operator error 0.84 where the clean
    field gives 0.13). They are found, set to their neighbours' median in a copy, and said; beads
    as sharp as a bead can be (0.25 µm pixels, about 2x coarser than Nyquist) are not taken for them."""
    f = simulate.bead_field((512, 512), seed=1000)
    rng = np.random.default_rng(0)
    at = rng.integers(0, 512, (40, 2))
    img = f.image.copy()
    img[at[:, 0], at[:, 1]] += rng.uniform(150, 450, len(at))
    before = img.copy()
    with pytest.warns(lsfov.LsfovWarning, match=r"\d+ of \d+ bright spots are single pixels .a camera's hot"):
        b = bead_psfs(img)
    assert 34 <= b.n_hot <= 40  # measured 36 (the others are no candidate: in a bead's light, or at the edge)
    np.testing.assert_array_equal(img, before)  # the caller's image is left as it was
    assert cKDTree(at).query(b.positions)[0].min() > 2  # no bead at a hot pixel
    assert len(b.patches) + b.n_crowded + b.n_saturated == b.n_detected  # (hot pixels are not beads)
    clean = operator_distance(calibrate_operator(f.image, 5), f.operator)
    with pytest.warns(lsfov.LsfovWarning, match="hot pixels"):
        op = calibrate_operator(img, 5)
    hot = operator_distance(op, f.operator)
    assert hot < 1.1 * clean, (hot, clean)  # measured 0.127 and 0.128 (0.84 before)
    assert op.attrs["n_hot_pixels"] == b.n_hot  # (recorded with the operator)
    # the radius reads past them too (its profiles ended at once: r = 3 px with 200 of them)
    img[rng.integers(0, 512, 160), rng.integers(0, 512, 160)] += 300
    assert estimate_radius(img) == estimate_radius(f.image)
    for px in (0.1, 0.25):
        assert bead_psfs(simulate.bead_field((512, 512), seed=1001, pixel_um=px).image).n_hot == 0


def test_bead_psfs_are_isolated_centred_and_normalised(field):
    b = bead_psfs(field.image)
    assert b.patches.shape[1:] == (b.size, b.size) and b.size % 2 == 1
    np.testing.assert_allclose(b.patches.sum(axis=(1, 2)), 1.0, rtol=1e-4)
    # Every kept bead is 2r from every other detection, and the sub-pixel centres are on the beads.
    assert len(b.patches) + b.n_crowded + b.n_saturated == b.n_detected and b.n_hot == 0
    if len(b.positions) > 1:
        assert cKDTree(b.positions).query(b.positions, k=2)[0][:, 1].min() >= 2 * b.radius - 1
    d, _ = cKDTree(field.positions).query(b.positions)
    assert np.median(d) < 0.3
    # The bump leaves nothing beyond 1.2 r.
    c = b.size // 2
    yy, xx = np.mgrid[: b.size, : b.size] - c
    assert np.abs(b.patches[:, np.hypot(yy, xx) > 1.2 * b.radius]).max() == 0


def test_radial_bump_shape():
    m = radial_bump(31, 10.0)
    c = 15
    assert m[c, c] == 1 and m[c, c + 10] == 1 and m[c, c + 13] == 0 and m[0, 0] == 0
    ring = m[c, c + 10 : c + 13]
    assert np.all(np.diff(ring) <= 0) and 0 < m[c, c + 11] < 1
    # App. A-d's bump: exp(1 − 1/(1 − s²)), s the position across the rim; halfway (t = 11 of 10..12)
    assert m[c, c + 11] == pytest.approx(np.exp(1 - 1 / 0.75), rel=1e-6)


def test_calibration_helpers_refuse_bad_input_by_name():
    """Once numpy's "negative dimensions", a ZeroDivisionError, an eigenvalue or a k-d tree error."""
    for call, said in ((lambda: radial_bump(-1, 4.0), "size must be a positive integer"),
                       (lambda: radial_bump(9, -4), "radius must be a finite number > 0"),
                       (lambda: NodeGrid((64, 64), 0), "node step must be a positive integer"),
                       (lambda: cone_columns(np.array([[np.nan, 1.0], [1.0, 2.0]])), "contain NaN or Inf"),
                       (lambda: voronoi_weights(np.array([[np.nan, 1.0], [1.0, 2.0]]), (10, 10)),
                        r"positions must be a \(P, 2\) array of finite")):
        with pytest.raises(ValueError, match=said):
            call()


def test_background_removal_recovers_a_known_polynomial():
    k, r = 25, 8.0
    yy, xx = (np.mgrid[:k, :k] - k // 2).astype(np.float64)
    psf = np.exp(-(yy**2 + xx**2) / 8.0) * (np.hypot(yy, xx) <= r)  # nothing outside the disk
    rng = np.random.default_rng(0)
    patches, truth = [], []
    for _ in range(4):
        c = rng.normal(size=6)
        bg = c[0] + c[1] * yy + c[2] * xx + c[3] * yy * xx + c[4] * yy**2 / 10 + c[5] * xx**2 / 10
        patches.append(psf + bg)
        truth.append(psf)
    out = remove_background(np.array(patches), r)
    np.testing.assert_allclose(out, np.array(truth), atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*beads are saturated:lsfov.LsfovWarning")
def test_saturated_crowded_and_empty_bead_images_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no beads found"):
        bead_psfs(np.full((128, 128), 10.0) + 0 * rng.random((128, 128)), radius=6)
    f = simulate.bead_field((192, 192), 40, seed=1, photons=5e5)
    clipped = np.minimum(f.image, 200).astype(np.uint16)  # a camera that saturates at 200
    with pytest.raises(ValueError, match="saturated"):
        bead_psfs(clipped, radius=8, saturation=200)
    # A 12-bit camera in 16-bit pixels (an OME-TIFF's SignificantBits, read by open_image): its
    # brightest beads clip at 4095 in a pixel or two, too few for a plateau; the bits give them away.
    import xarray as xr

    counts = np.minimum(np.rint(f.image / np.sort(f.image.ravel())[-3] * 4095), 4095).astype(np.uint16)
    plain = bead_psfs(counts, radius=8)
    assert plain.n_saturated == 0
    twelve = xr.DataArray(counts, dims=("y", "x"), attrs={"significant_bits": 12})
    assert 0 < bead_psfs(twelve, radius=8).n_saturated < plain.n_detected
    # ... and so do the calibrations that read them
    with pytest.warns(lsfov.LsfovWarning, match="beads are saturated and were left out"):
        op = lsfov.calibrate_operator(twelve, 3, radius=8)
    assert op.attrs["n_beads"] < lsfov.calibrate_operator(counts, 3, radius=8).attrs["n_beads"]
    dense = np.zeros((160, 160), np.float32)
    dense[6::12, 6::12] = 1000.0  # beads every 12 px, closer than 2r = 18
    dense = gaussian_filter(dense, 1.5) + rng.poisson(5.0, dense.shape)
    with pytest.raises(ValueError, match="none is isolated"):
        bead_psfs(dense, radius=9)
    with pytest.raises(ValueError, match="radius"):
        bead_psfs(dense, radius=-1)
    # a photograph is not a bead image: a few of its bright spots pass for isolated beads, said so;
    # or, its "beads" as wide as its objects (r = 27 px on camera), none passes
    from skimage import data

    with pytest.warns(lsfov.LsfovWarning, match="bright spots are isolated beads"):
        bead_psfs(data.coins())
    with pytest.raises(ValueError, match="none is isolated"):
        bead_psfs(data.camera())


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_the_radius_is_where_the_bead_profile_falls_below_its_level_plus_one_pixel(sigma):
    """Noise-free Gaussian beads: the radius is the first ring of the profile below 1 % of its peak,
    plus one pixel (as documented), computed here from the Gaussian itself."""
    from scipy import ndimage

    from lsfov.calibrate.beads import estimate_radius

    yy, xx = np.mgrid[:360, :360]
    img = np.full((360, 360), 10.0)
    for cy in range(60, 360, 80):
        for cx in range(60, 360, 80):
            img += 1000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    y, x = np.mgrid[-20:21, -20:21]
    ring = np.rint(np.hypot(y, x)).astype(int)
    prof = ndimage.mean(np.exp(-(y**2 + x**2) / (2 * sigma**2)), labels=ring, index=np.arange(21))
    assert estimate_radius(img.astype(np.float32), max_radius=20) == np.nonzero(prof < 0.01)[0][0] + 1


def test_wide_dim_beads_are_found_for_the_radius():
    """Defocused beads a few noise levels above the background per pixel: nothing stands out at the
    finest detection scale, the coarser ones find them."""
    from lsfov.calibrate.beads import detect_beads, estimate_radius

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :600]
    img = np.full((600, 600), 20.0)
    for cy in range(75, 600, 150):
        for cx in range(75, 600, 150):
            img += 25 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 7.0**2))
    img = rng.poisson(img).astype(np.float32)
    assert len(detect_beads(img, 4.0)) == 0  # missed at the finest scale
    assert 3 * 7 - 3 <= estimate_radius(img) <= 3 * 7 + 6  # about 3 σ (21 px here)
    with pytest.raises(ValueError, match="radius="):
        estimate_radius(rng.poisson(np.full((300, 300), 20.0)).astype(np.float32))


def test_bead_psfs_checks_its_settings(field):
    img = field.image
    for kw, msg in ((dict(background_order=-1), "background_order"), (dict(background_order=1.5), "background_order"),
                    (dict(saturation="abc"), "saturation")):
        with pytest.raises((ValueError, TypeError), match=msg):
            bead_psfs(img, 8, **kw)


def test_some_saturated_beads_are_left_out_with_a_warning(field):
    img = field.image.copy()
    y, x = field.positions[0]
    img[y - 1 : y + 2, x - 1 : x + 2] = img.max() * 3  # one clipped plateau
    with pytest.warns(UserWarning, match="saturated"):
        b = bead_psfs(img, radius=9)
    assert b.n_saturated == 1
    assert cKDTree(b.positions).query([y, x])[0] > 3


# ---------------------------------------------------------------------------------------------- basis


def _family(n, k=21, seed=0, noise=0.0):
    """Non-negative PSFs that are conic mixes of three kernels (a rank-3 family)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:k, :k] - k // 2
    g = np.stack([np.exp(-(yy**2 / (2 * sy**2) + xx**2 / (2 * sx**2))) for sy, sx in ((1.5, 1.5), (3, 1.2), (1.2, 3))])
    g /= g.sum(axis=(1, 2), keepdims=True)
    w = rng.dirichlet(np.ones(3), n)
    p = np.einsum("mi,ikl->mkl", w, g) + noise * rng.standard_normal((n, k, k))
    return p.astype(np.float32), g


@pytest.mark.parametrize("n", [300, 600])  # fewer patches than their 441 pixels (an SVD of them), more (the Gram)
def test_basis_recovers_a_known_low_rank_family(n):
    p, g = _family(n, noise=2e-5)
    b = psf_basis(p, 3)
    h = b.kernels.reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(3), atol=1e-5)  # orthonormal
    q, _ = np.linalg.qr(g.reshape(3, -1).T)
    cosines = np.linalg.svd(q.T @ h.T, compute_uv=False)  # principal angles with the true span
    assert cosines.min() > 0.999
    assert b.kernels[0].sum() > 0
    # The rank rule finds the three components above the noise.
    assert psf_basis(p, None).kernels.shape[0] == 3
    # Against a reference SVD of the stacked unit-norm patches: brightness differences over four
    # decades must not weigh (every PSF counts the same).
    scaled = (p * 10.0 ** np.random.default_rng(1).uniform(-2, 2, (len(p), 1, 1))).astype(np.float32)
    b = psf_basis(scaled, 3)
    m = scaled[b.keep].reshape(int(b.keep.sum()), -1).astype(np.float64)
    _, sv, vt = np.linalg.svd(m / np.linalg.norm(m, axis=1, keepdims=True), full_matrices=False)
    np.testing.assert_allclose(b.singular_values[:10], sv[:10], rtol=1e-6)  # 3 signal, 7 noise
    dots = np.abs(np.sum(b.kernels.reshape(3, -1).astype(np.float64) * vt[:3], axis=1))
    assert np.all(dots > 1 - 1e-6), dots


@pytest.mark.parametrize("n", [100, 1000])  # fewer than the 29² pixels (an SVD of them), more (the Gram)
def test_patches_of_narrower_images_are_the_centre_of_the_widest(n):
    """Images calibrated at their own radii give patches of several sizes: the basis reads each as
    the centre of the widest, zero around, as if padded (and is padded in memory by none)."""
    p, _ = _family(n, noise=2e-5)  # 21 x 21
    wide = np.pad(p[: n // 2], ((0, 0), (4, 4), (4, 4)))  # another image's: 29 x 29
    narrow = p[n // 2 :, 3:-3, 3:-3].copy()  # and a third's, cut to 15 x 15
    groups = [wide, p[n // 2 :], narrow]
    b = psf_basis(groups, 3)
    padded = psf_basis([g if g.shape[1] == 29 else np.pad(g, ((0, 0),) + (((29 - g.shape[1]) // 2,) * 2,) * 2)
                        for g in groups], 3)
    assert b.kernels.shape == (3, 29, 29)
    np.testing.assert_allclose(b.kernels, padded.kernels, atol=1e-6)
    np.testing.assert_allclose(b.coefficients, padded.coefficients, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(b.keep, padded.keep)
    with pytest.raises(ValueError, match="K of one parity"):
        psf_basis([p, p[:, 1:, 1:]], 3)


def test_zscore_rejects_outlier_patches():
    p, _ = _family(200, noise=1e-5, seed=1)
    bad = np.zeros((3,) + p.shape[1:], np.float32)
    bad[:, 2:5, 2:5] = 1.0 / 9  # a second bead in the corner, nothing in the centre
    b = psf_basis(np.concatenate([p, bad]), 3)
    assert not b.keep[-3:].any()
    assert b.keep[:200].mean() > 0.9
    assert b.coefficients.shape == (b.keep.sum(), 3)


def test_psf_basis_bad_input():
    p, _ = _family(4)
    with pytest.raises(ValueError, match="needs at least"):
        psf_basis(p, 6)
    many = np.random.default_rng(0).random((60, 5, 5)).astype(np.float32)  # 60 beads, 25 pixels each
    with pytest.raises(ValueError, match=r"n_basis=30 is more than the 25 pixels of a 5x5 bead patch; .*--radius"):
        psf_basis(many, 30)
    with pytest.raises(ValueError, match="shape"):
        psf_basis(p[0], 2)


# ---------------------------------------------------------------------------------------------- cone


def test_cone_projection_matches_nnls():
    rng = np.random.default_rng(3)
    b = np.abs(rng.normal(size=(5, 8))) + 0.1 * rng.normal(size=(5, 8))
    a = rng.normal(size=(5, 40))
    proj, lam = project_cone(b, a)
    assert lam.min() >= 0
    # The projection's optimality conditions (KKT): Bᵀ(a − Bλ) ≤ 0, = 0 where λ > 0.
    grad = b.T @ (a - proj)
    assert grad.max() <= 1e-10 and np.abs(grad[lam > 0]).max() <= 1e-10
    for n in range(a.shape[1]):
        ref, _ = nnls(b, a[:, n])
        np.testing.assert_allclose(proj[:, n], b @ ref, atol=1e-12)
    inside = b @ np.abs(rng.normal(size=(8, 5)))
    np.testing.assert_allclose(project_cone(b, inside)[0], inside, atol=1e-12)
    assert not project_cone(np.zeros((5, 3)), a)[1].any()
    with pytest.raises(ValueError, match="must share I"):
        project_cone(b, a[:4])
    with pytest.raises(ValueError, match="NaN or Inf"):
        project_cone(b, np.full((5, 2), np.nan))


def test_cone_columns_is_the_greedy_choice_of_app_c():
    """Only the columns still outside the angle are projected again (a cone that grows only comes
    nearer): the same choice as projecting every column each round."""
    rng = np.random.default_rng(8)
    obs = np.abs(rng.normal(size=(4, 300))) + 0.3 * rng.normal(size=(4, 300))
    unit = obs / np.linalg.norm(obs, axis=0)
    sel = unit.mean(axis=1, keepdims=True) / np.linalg.norm(unit.mean(axis=1))
    for _ in range(11):
        proj, _ = project_cone(sel, unit)
        cos = np.sum(proj * unit, axis=0) / np.maximum(np.linalg.norm(proj, axis=0), 1e-30)
        worst = int(np.argmin(cos))
        if np.degrees(np.arccos(np.clip(cos[worst], -1, 1))) <= 2.0:
            break
        sel = np.concatenate([sel, unit[:, worst : worst + 1]], axis=1)
    cols = cone_columns(obs, max_columns=12, angle_deg=2.0)
    assert 3 < cols.shape[1] <= 12
    np.testing.assert_array_equal(cols, sel)


def test_cone_projection_keeps_psfs_non_negative():
    p, _ = _family(400, seed=4)
    basis = psf_basis(p, 3, zscore=np.inf)
    h = basis.kernels.reshape(3, -1)
    cols = cone_columns(basis.coefficients.T, max_columns=10, angle_deg=0.5)
    assert cols.shape[1] < 400
    # Every observed column is within the angle of the selected cone.
    unit = basis.coefficients.T / np.linalg.norm(basis.coefficients.T, axis=0)
    proj, _ = project_cone(cols, unit)
    cos = np.sum(proj * unit, axis=0) / np.maximum(np.linalg.norm(proj, axis=0), 1e-30)
    assert np.degrees(np.arccos(np.clip(cos.min(), -1, 1))) <= 0.6
    # Arbitrary coefficients render PSFs with negative lobes; projected ones do not.
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 300))
    assert (h.T @ a).min() < -1e-3
    psfs = h.T @ project_cone(cols, a)[0]
    assert psfs.min() >= -1e-4 * np.abs(psfs).max()


# ---------------------------------------------------------------------------------------------- maps


def test_voronoi_weights():
    yy, xx = np.mgrid[16:256:32, 16:256:32] - 0.5  # cells of 32x32 pixels tiling the image exactly
    regular = np.stack([yy.ravel(), xx.ravel()], axis=1)
    w = voronoi_weights(regular, (256, 256))
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)
    lonely = np.concatenate([regular[:32], [[230.0, 230.0]]])  # one bead alone in the lower half
    w = voronoi_weights(lonely, (256, 256))
    assert w[-1] > 5 * np.median(w[:-1]) and w.sum() == pytest.approx(len(lonely))
    # Random beads against counting which bead each of 1024² points of the field is nearest to.
    rng = np.random.default_rng(4)
    pos = rng.uniform(0, [99, 139], (25, 2))
    yy, xx = np.meshgrid((np.arange(1024) + 0.5) * 100 / 1024 - 0.5, (np.arange(1024) + 0.5) * 140 / 1024 - 0.5,
                         indexing="ij")
    owner = np.argmin((yy[..., None] - pos[:, 0]) ** 2 + (xx[..., None] - pos[:, 1]) ** 2, axis=-1)
    count = np.bincount(owner.ravel(), minlength=len(pos))
    np.testing.assert_allclose(voronoi_weights(pos, (100, 140)), count * len(pos) / count.sum(), rtol=2e-2)


def test_node_grid_upsampling_and_metric():
    g = NodeGrid((50, 37), 8)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2,) + g.size)
    ua, ub = g.upsample(a).astype(np.float64), g.upsample(b).astype(np.float64)
    # Node values are reproduced at the nodes (first and last pixels are nodes).
    assert ua[0, 0] == pytest.approx(a[0, 0], rel=1e-5) and ua[-1, -1] == pytest.approx(a[-1, -1], rel=1e-5)
    ry, rx = g.gram_sqrt()
    assert np.sum(ua * ub) == pytest.approx(np.sum((ry @ a @ rx) * (ry @ b @ rx)), rel=1e-5)
    iy, ix = g.gram_sqrt(inverse=True)
    np.testing.assert_allclose(iy @ ry, np.eye(len(ry)), atol=1e-8)
    np.testing.assert_allclose(ix @ rx, np.eye(len(rx)), atol=1e-8)


def test_thin_plate_maps_reproduce_affine_coefficients_and_interpolate():
    rng = np.random.default_rng(1)
    pos = rng.uniform(0, 199, (60, 2))
    beta = np.stack([1 + 0.01 * pos[:, 0] - 0.02 * pos[:, 1], 0.5 + 0.003 * pos[:, 1]], axis=1)
    grid = node_grid((200, 200), 10)
    yy, xx = np.meshgrid(*grid.nodes, indexing="ij")
    for smoothing in (0.1, 1.0, 10.0):  # any smoothing keeps affine data
        nodes = coefficient_nodes(pos, beta, grid, smoothing=smoothing)
        np.testing.assert_allclose(nodes[0], 1 + 0.01 * yy - 0.02 * xx, atol=1e-6)
        np.testing.assert_allclose(nodes[1], 0.5 + 0.003 * xx, atol=1e-6)
    # Without smoothing, the maps pass through the data (nodes placed on the beads).
    pos = grid.points()[rng.choice(grid.points().shape[0], 30, replace=False)]
    beta = rng.normal(size=(30, 1))
    nodes = coefficient_nodes(pos, beta, grid, smoothing=0.0)
    ij = np.round(pos / 10).astype(int)
    np.testing.assert_allclose(nodes[0][ij[:, 0], ij[:, 1]], beta[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="needs 3 not on a line"):
        coefficient_nodes(pos[:2], beta[:2], grid)
    with pytest.raises(ValueError, match=r"two beads at one position .* give a smoothing > 0"):
        coefficient_nodes(np.concatenate([pos, pos[:1]]), np.concatenate([beta, beta[:1]]), grid, smoothing=0.0)
    coefficient_nodes(np.concatenate([pos, pos[:1]]), np.concatenate([beta, beta[:1]]), grid)  # smoothed: fine


def test_beads_close_to_a_line_are_warned_about():
    """Within 2 % of the field of a line, the thin-plate spline's slope across it comes from the
    beads' jitter (9 beads 0.6-1.4 px off a line of a 256² field: operator errors of 19-36 %)."""
    grid = node_grid((256, 256), 16)
    rng = np.random.default_rng(0)
    beta = rng.normal(size=(9, 2))
    x = 20 + 27 * np.arange(9.0)
    for spread, warned in ((1.0, True), (12.0, False)):
        pos = np.stack([128 + spread * (-1.0) ** np.arange(9), x], axis=1)  # zig-zag along y = 128
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            coefficient_nodes(pos, beta, grid)
        said = [str(w.message) for w in seen if issubclass(w.category, lsfov.LsfovWarning)]
        assert bool(said) == warned, said
        if warned:
            assert said[0].startswith("the 9 beads lie within 0.99 px of a line across a field of 256 px"), said


def test_thin_plate_smoothing_weighs_each_bead_by_its_voronoi_cell():
    """Eq. 9 by hand: min Σ w_m (α(x_m) − β_m)² + η ∫(Δ²α)², with w_m the Voronoi cell areas, is the
    thin-plate system (K + 8πη·diag(1/w)) c + P d = β, Pᵀc = 0 (Δ²(r² log r) = 8πδ), in the unit
    square's coordinates. Any smoothing keeps affine data, so only noisy data on clustered beads
    (cells of very different sizes) tell the weights apart."""
    from lsfov.calibrate.interpolate import voronoi_weights

    rng = np.random.default_rng(2)
    pos = np.concatenate([rng.uniform(0, 119, (8, 2)), rng.uniform(40, 55, (10, 2))])  # a cluster
    beta = rng.normal(size=(len(pos), 2))
    grid = node_grid((120, 150), 10)
    smoothing = 0.05  # 8π·η
    got = coefficient_nodes(pos, beta, grid, smoothing=smoothing)
    scale = 150.0
    p, q = pos / scale, grid.points() / scale

    def phi(a, b):
        r = np.hypot(*(a[:, None] - b[None]).transpose(2, 0, 1))
        return np.where(r > 0, r**2 * np.log(np.maximum(r, 1e-300)), 0.0)

    w = voronoi_weights(pos, grid.shape)
    assert w.max() > 10 * w.min()
    P = np.column_stack([np.ones(len(p)), p])
    A = np.block([[phi(p, p) + np.diag(smoothing / w), P], [P.T, np.zeros((3, 3))]])
    sol = np.linalg.solve(A, np.vstack([beta, np.zeros((3, 2))]))
    want = phi(q, p) @ sol[: len(p)] + np.column_stack([np.ones(len(q)), q]) @ sol[len(p):]
    np.testing.assert_allclose(got.reshape(2, -1).T, want, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------- operator


def test_calibrated_operator_matches_the_true_one(field):
    op, pos = calibrate_operator(field.image, 5, return_positions=True)
    assert op.kind == "basis" and op.kernels.shape[0] == 5 and op.shape == field.image.shape
    assert op.attrs["n_beads"] == len(pos) > 20
    err = operator_distance(op, field.operator)
    # paper 003: 50 % from one image; goal 30 %. Measured 0.128; the mean PSF everywhere scores 0.258.
    assert err < 0.18, err
    # A model that ignores the space variation (the mean PSF everywhere) is clearly worse.
    mean_psf = np.mean([op.psf_at(y, x) for y, x in pos], axis=0)
    flat = lsfov.ProductConvolution.from_grid(mean_psf[None, None], op.shape)
    assert operator_distance(flat, field.operator) > err + 0.05
    # Local PSFs are admissible everywhere, also in the corners where no bead is: unit sum, and no
    # deeper negative lobes than the observed beads have on a 5-term basis (noise: 5-15 % of the peak).
    b = bead_psfs(field.image)
    h = op.kernels.reshape(5, -1)
    seen = (b.patches.reshape(len(b.patches), -1) @ h.T) @ h
    worst = (seen.min(axis=1) / seen.max(axis=1)).min()
    for y, x in [(0, 0), (383, 0), (191, 191), (383, 383)]:
        k = op.psf_at(y, x)
        assert k.sum() == pytest.approx(1.0, abs=1e-3)
        assert k.min() / k.max() >= worst - 0.01


def test_xarray_bead_images_are_read_by_dim_name(field, stack):
    """An (x, y) image, or a stack with its planes last, is read by its dims' names, as deconvolve
    reads it: the same operator, subspace and beads, never a transposed one."""
    import xarray as xr

    img = xr.DataArray(field.image, dims=("y", "x"))
    op = calibrate_operator(field.image, 3)
    turned = calibrate_operator(img.T, 3)
    np.testing.assert_array_equal(turned.kernels, op.kernels)
    np.testing.assert_array_equal(turned.maps, op.maps)
    np.testing.assert_array_equal(bead_psfs(img.T).positions, bead_psfs(field.image).positions)
    planes = np.stack([f.image for f in stack[:3]])
    sub = learn_subspace(planes, 2, 2)
    for other in (xr.DataArray(planes, dims=("z", "y", "x")).transpose("y", "x", "z"),
                  xr.DataArray(planes, dims=("z", "y", "x")).transpose("z", "x", "y"),
                  [xr.DataArray(p, dims=("y", "x")).T for p in planes]):
        back = learn_subspace(other, 2, 2)
        np.testing.assert_allclose(back.psf_basis, sub.psf_basis, atol=1e-6)
        np.testing.assert_allclose(back.spatial_basis, sub.spatial_basis, atol=1e-6)
    with pytest.raises(ValueError, match=r"dims \('y', 'c'\): name them 'y' and 'x', or neither"):
        calibrate_operator(xr.DataArray(field.image, dims=("y", "c")), 3)


def test_rescaled_distance():
    rng = np.random.default_rng(0)
    u0 = rng.random((20, 20))
    assert rescaled_distance(3 * u0 + 2, u0) == pytest.approx(0, abs=1e-10)
    assert rescaled_distance(rng.random((20, 20)), u0) > 0.3
    assert dirac_comb((64, 64), 16).sum() == 16
    # a comb with no Dirac made any two operators 0 apart
    with pytest.raises(ValueError, match="spacing 1000 puts no Dirac in a 64x64 image"):
        dirac_comb((64, 64), 1000)
    op = lsfov.ProductConvolution.from_psf(lsfov.psf.gaussian(1.5, size=9), (64, 64))
    with pytest.raises(ValueError, match="spacing 1000 puts no Dirac"):
        operator_distance(op, op, 1000)
    with pytest.raises(TypeError, match="truth must be a ProductConvolution"):
        operator_distance(op, np.ones((9, 9)))


# ---------------------------------------------------------------------------------------------- subspace


def test_spatial_basis_equals_full_resolution_svd():
    grid = NodeGrid((60, 44), 6)
    rng = np.random.default_rng(2)
    true_a = rng.normal(size=(3,) + grid.size)
    c = np.einsum("kij,jab->kiab", rng.normal(size=(7, 4, 3)), true_a)  # rank 3 exactly
    a_nodes, gammas, s = _spatial_basis(c, grid, 3, seed=0)
    a = grid.upsample(a_nodes).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-4)  # orthonormal on the pixel grid
    maps = grid.upsample(c).reshape(28, -1).astype(np.float64)
    np.testing.assert_allclose(s, np.linalg.svd(maps, compute_uv=False)[:3], rtol=1e-4)
    # The family is recovered: every map is sum_j Gamma[i, j] a_j.
    np.testing.assert_allclose(gammas.reshape(28, 3) @ a, maps, atol=1e-3 * np.abs(maps).max())


def test_spatial_basis_keeps_small_singular_values():
    """A rank J of 12 over a decaying spectrum (s_12 / s_1 = 0.004): the randomized SVD's power
    iterations, orthonormalised, give what an exact SVD does (plain ones were 9 % off at the last)."""
    grid = NodeGrid((60, 44), 6)
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(int(np.prod(grid.size)), 20)))
    g, _ = np.linalg.qr(rng.normal(size=(40, 20)))
    c = ((g * 0.6 ** np.arange(20)) @ q.T).reshape((8, 5) + grid.size)
    _, _, s = _spatial_basis(c, grid, 12, seed=0)
    maps = grid.upsample(c).reshape(40, -1).astype(np.float64)
    np.testing.assert_allclose(s, np.linalg.svd(maps, compute_uv=False)[:12], rtol=1e-6)


def test_learn_subspace_recovers_the_family(stack, tmp_path):
    images = np.stack([f.image for f in stack])
    sub = learn_subspace(images, 5, 6)
    assert (sub.n_psf, sub.n_space, sub.n_images, sub.shape) == (5, 6, 6, (320, 320))
    errs = [operator_distance(sub.operator(k), f.operator) for k, f in enumerate(stack)]
    assert max(errs) < 0.18, errs  # measured 0.097-0.127; each image's mean PSF everywhere: 0.27-0.33
    # An operator says what it is: image k's has that image's beads, not the subspace's training set
    assert sub.operator(2).attrs["n_beads"] == sub.attrs["beads_per_image"][2] < sub.attrs["n_beads"]
    assert not {"n_beads", "beads_per_image", "singular_values"} & set(sub.operator(sub.gammas[0]).attrs)
    # Dask, list and NumPy inputs agree.
    import dask.array as da

    again = learn_subspace(da.from_array(images, chunks=(1, 320, 320)), 5, 6)
    np.testing.assert_allclose(again.gammas, sub.gammas, rtol=1e-5, atol=1e-8)
    # ... and on a distributed cluster, whose client computes lists of tasks into lists of futures.
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster):
        on_cluster = learn_subspace(images, 5, 6, progress=True)
    np.testing.assert_allclose(on_cluster.gammas, sub.gammas, rtol=1e-5, atol=1e-8)
    # Training operators are admissible; the projection keeps them and maps others into the cone.
    g = sub.normalized_gammas
    np.testing.assert_allclose(sub.project(g[2]), g[2], atol=1e-8)
    mix = 2 * g[0] + 3 * g[4]
    np.testing.assert_allclose(sub.project(mix), mix, atol=1e-8)
    # A point partly outside: its projection p is the cone's nearest point, which the optimality
    # conditions of min_{λ>=0} |Gλ - a|² characterise: <p - a, g_k> >= 0 for every generator and
    # <p - a, p> = 0 (checked here independently of the NNLS that computed p).
    outside = g[0] - 0.7 * g[1] + 0.3 * g[3]
    p = sub.project(outside)
    scale = float(np.linalg.norm(outside)) ** 2
    res = (p - outside).ravel()
    assert np.linalg.norm(res) > 1e-3 * np.sqrt(scale)  # it was moved
    assert (g.reshape(6, -1) @ res).min() >= -1e-8 * scale
    assert abs(float(res @ p.ravel())) <= 1e-8 * scale
    lam, rnorm = nnls(g.reshape(6, -1).T, p.ravel())
    assert rnorm <= 1e-8 * np.sqrt(scale)  # p is in the cone
    # A point whose projection is 0 (no operator): said by project, not as "project it first" by operator
    with pytest.raises(ValueError, match="points away from every training image's"):
        sub.project(-np.abs(g).sum(0))
    # Save and load keep everything, with xarray labels.
    path = sub.save(tmp_path / "sub.zarr")
    back = OperatorSubspace.load(path)
    np.testing.assert_allclose(back.gammas, sub.gammas)
    np.testing.assert_array_equal(np.asarray(back.spatial_basis), sub.spatial_basis)
    op1, op2 = sub.operator(3), back.operator(3)
    with pytest.raises(ValueError, match="project it first"):  # PSFs of negative light, not rescaled ones
        sub.operator(-sub.gammas[3])
    comb = dirac_comb(sub.shape, 40)
    np.testing.assert_allclose(op2.apply(comb), op1.apply(comb), atol=1e-6)
    import xarray as xr

    ds = xr.open_zarr(path)
    assert ds["spatial_basis"].dims == ("space", "y", "x") and ds["gamma"].dims == ("image", "psf", "space")
    with pytest.raises(FileExistsError):
        sub.save(path)


def test_a_focus_series_is_calibrated_at_each_image_s_own_radius():
    """A focus series widens along the stack (radius 8, 10 and 15 px at 0, 0.3 and 0.9 µm). The
    first image's radius, which served them all until 2026-12-07, leaves the last no bead apart
    (refused); the widest crowds out and cuts the first's (error 0.24 against 0.09). Each image is
    read at its own radius, its patches zero-padded to the widest's size."""
    from lsfov import psf
    from lsfov.calibrate.beads import patch_size

    optics = psf.Optics(na=1.3, wavelength_um=0.6, pixel_um=0.1, immersion_index=1.52)
    fam = [simulate.bead_field((384, 384), n_beads=40, seed=k, optics=optics, z_range_um=(z - 0.1, z + 0.1),
                               axis=0.5, psf_size=61) for k, z in enumerate((0.0, 0.3, 0.9))]
    imgs = [f.image for f in fam]
    radii = [estimate_radius(i) for i in imgs]
    assert radii[0] < radii[1] < radii[2]  # measured 8, 10, 15
    sub = learn_subspace(imgs, 3, 2)
    assert sub.attrs["radii_px"] == radii and sub.attrs["radius_px"] == radii[2]
    assert sub.psf_basis.shape[-1] == patch_size(radii[2])
    errs = [operator_distance(sub.operator(k), f.operator) for k, f in enumerate(fam)]
    assert max(errs[:2]) < 0.12 and errs[2] < 0.4, errs  # measured 0.086, 0.088, 0.295
    with pytest.raises(ValueError, match="bead image 2: 0 beads"):
        learn_subspace(imgs, 3, 2, radius=radii[0])
    wide = learn_subspace(imgs, 3, 2, radius=radii[2])
    assert wide.attrs["radii_px"] == [radii[2]] * 3
    assert operator_distance(wide.operator(0), fam[0].operator) > 2 * errs[0]  # measured 0.244


def test_subspace_bad_input(stack, tmp_path):
    with pytest.raises(ValueError, match="at least 2 bead images"):
        learn_subspace([stack[0].image])
    with pytest.raises(ValueError, match="one shape"):
        learn_subspace([stack[0].image, stack[1].image[:300]])
    with pytest.raises(ValueError, match=r"n_space=5 exceeds the K·I = 4 maps; use n_space <= 4 \(--n-space\)"):
        learn_subspace([stack[0].image, stack[1].image], 2, 5)
    assert learn_subspace([stack[0].image, stack[1].image], 2, 4).n_space == 4  # the bound itself: every map
    flat = np.full((320, 320), 5.0, np.float32)
    with pytest.raises(ValueError, match="bead image 1: no beads found"):
        learn_subspace([stack[0].image, flat])
    import xarray as xr

    px = [xr.DataArray(f.image, dims=("y", "x"), attrs={"pixel_um": um}) for f, um in zip(stack, (0.1, 0.1, 0.2))]
    with pytest.raises(ValueError, match=r"different pixel sizes \(0.1, 0.2 µm\)"):
        learn_subspace(px[:3])
    from lsfov.calibrate.subspace import _as_images

    um = {"units": "micrometer"}
    n = stack[0].image.shape[0]
    wide = [xr.DataArray(f.image, dims=("y", "x"), coords={"y": ("y", 0.2 * np.arange(n), um),
                                                           "x": ("x", 0.1 * np.arange(n), um)}) for f in stack[:2]]
    assert len(_as_images(wide)) == 2  # non-square pixels: PSFs in the images' own pixels, as one image's operator
    with pytest.raises(ValueError, match="bead image 1 has non-square pixels and others are of 0.1 µm"):
        _as_images([px[0], wide[1]])
    with pytest.raises(ValueError, match="not an lsfov operator subspace"):
        OperatorSubspace.load(tmp_path)
    sub = OperatorSubspace(np.zeros((2, 5, 5)), np.zeros((3, 16, 16)), np.zeros((4, 2, 3)))
    with pytest.raises(IndexError):
        sub.operator(4)
    import shutil

    shutil.rmtree(sub.save(tmp_path / "s.zarr") / "gamma")
    with pytest.raises(ValueError, match="s.zarr is damaged: its gamma array is missing; learn it again"):
        OperatorSubspace.load(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="shape"):
        sub.operator(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"got \(3, 3\)$"):  # an index is no answer to project's question
        sub.project(np.zeros((3, 3)))
    # simulate.bead_stack / bead_field give their images with the ground truth: said, not "shapes [()]"
    with pytest.raises(TypeError, match=r"pass \[b.image for b in beads\]"):
        learn_subspace(stack[:2])
    with pytest.raises(TypeError, match="pass beads.image"):
        lsfov.calibrate_operator(stack[0])


def test_bead_stack_shares_the_instrument_axis(stack):
    assert len({round(f.params["axis"], 12) for f in stack}) == 1
    assert len({f.optics.na for f in stack}) == len(stack)


def test_cone_columns_reads_angles_in_degrees_and_stops_at_max_columns():
    """In the plane, columns at 0°, 10° and 20°: the mean direction (10°) is 10° from the outer two,
    so a 10.5° tolerance keeps one column and a 9.5° one adds the farthest; ``max_columns`` is a cap
    on all columns, the mean direction included."""
    deg = np.radians([0.0, 10.0, 20.0])
    obs = np.stack([np.cos(deg), np.sin(deg)]) * [[1.0, 3.0, 0.5]]  # lengths do not matter
    assert cone_columns(obs, angle_deg=10.5).shape == (2, 1)
    two = cone_columns(obs, angle_deg=9.5)
    assert two.shape == (2, 3)  # the mean, then one outer column, then the other (still 10° away)
    np.testing.assert_allclose(np.linalg.norm(two, axis=0), 1.0)
    rng = np.random.default_rng(3)
    spread = np.abs(rng.normal(size=(5, 200)))
    for cap in (1, 2, 4):
        assert cone_columns(spread, max_columns=cap, angle_deg=0.0).shape == (5, cap)


def test_node_values_with_no_light_take_the_cones_mean_direction():
    """Where the interpolated coefficients render a PSF of no light (extrapolated past the beads, or
    projected onto the cone's apex), the node takes the cone's first column (the mean direction), or
    without a cone the beads' mean, scaled to sum 1."""
    pos = np.array([[10.0, 10.0], [10.0, 60.0], [60.0, 10.0], [60.0, 60.0]])
    # Both coefficients fall along x (the thin-plate spline extrapolates them linearly): their sum is
    # negative past x = 65, both are past x = 75 (a point the cone projects to its apex)
    x = pos[:, 1] / 60
    beta = np.column_stack([1 - 0.8 * x, 0.3 - 0.4 * x])
    grid = node_grid((80, 200), 20)
    sums = np.array([1.0, 1.0])
    cone = np.array([[0.6, 0.0], [0.8, 1.0]])
    vals = coefficient_nodes(pos, beta, grid, smoothing=0.0, cone=cone, kernel_sums=sums)
    dead = grid.nodes[1] > 75
    assert dead.any() and not dead.all()
    dead_vals = vals[:, :, dead]
    np.testing.assert_allclose(dead_vals, np.broadcast_to([[[0.6 / 1.4]], [[0.8 / 1.4]]], dead_vals.shape), atol=1e-9)
    np.testing.assert_allclose(vals.sum(axis=0), 1.0, atol=1e-9)  # every node's PSF sums to 1
    plain = coefficient_nodes(pos, beta, grid, smoothing=0.0, kernel_sums=sums)
    mean = beta.mean(axis=0) / beta.mean(axis=0).sum()
    far = plain[:, :, grid.nodes[1] > 65]
    assert not np.allclose(plain[:, :, grid.nodes[1] < 65], far[:, :, :1])  # the fallback is not what others have
    np.testing.assert_allclose(far, np.broadcast_to(mean[:, None, None], far.shape), atol=1e-9)


def test_node_grid_default_step_and_a_subspace_image_counted_from_the_end():
    # About 96 nodes along the shorter side, at least 4 px apart: a 2304² bead image gets a 24 px step
    assert [node_grid(s).step for s in [(2304, 2304), (100, 3000), (384, 500), (385, 385), (2305, 4000)]] == \
        [24, 4, 4, 5, 25]
    rng = np.random.default_rng(0)
    sub = OperatorSubspace(np.ones((2, 5, 5)) / 25, rng.uniform(0.5, 1, (3, 16, 16)), rng.uniform(0.1, 1, (4, 2, 3)))
    for k in (-1, -4):
        np.testing.assert_array_equal(np.asarray(sub.operator(k).maps), np.asarray(sub.operator(4 + k).maps))
    with pytest.raises(IndexError, match="image -5 out of range; the subspace was learned from 4 images"):
        sub.operator(-5)


def test_the_pixel_size_recorded_is_the_images_and_the_seed_is_checked_first(stack, field):
    """The operator and the subspace recorded only a ``pixel_um`` attribute: none for an image of µm
    coordinates (no later check of another pixel size), the stale 0.1 µm of one binned to 0.2 µm;
    a seed of None, -1 or 1.5 failed (or was rounded) after all the bead work."""
    import warnings

    import xarray as xr

    um = {"units": "micrometer"}

    def labelled(img, step, attrs=None):
        n, m = img.shape
        return xr.DataArray(img, dims=("y", "x"), attrs=attrs or {},
                            coords={"y": ("y", step * np.arange(n), um), "x": ("x", step * np.arange(m), um)})

    assert calibrate_operator(labelled(field.image, 0.1), radius=8).attrs["pixel_um"] == 0.1
    binned = labelled(field.image, 0.1, {"pixel_um": 0.1}).coarsen(y=2, x=2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the stale attribute is warned about)
        assert calibrate_operator(binned, radius=5).attrs["pixel_um"] == 0.2
    assert learn_subspace([labelled(f.image, 0.1) for f in stack[:2]], 2, 2).attrs["pixel_um"] == 0.1
    for seed in (None, -1, 1.5):
        with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed}"):
            learn_subspace([np.full((8, 8), 1.0)] * 2, seed=seed)  # (no beads in them: refused before)


@pytest.mark.parametrize("off", [(0.3, 0.0), (0.0, 0.4), (0.45, -0.3)])
def test_a_tilted_elongated_bead_is_centred_to_a_hundredth_of_a_pixel(off):
    """An astigmatic bead (σ 4 x 2 px along 45°) was centred 0.1-0.2 px off, a shift along one axis
    moving the centre along the other: parabolas along each axis miss a tilted maximum."""
    from lsfov.calibrate import extract_psfs

    cy, cx = 48 + off[0], 48 + off[1]
    yy, xx = np.mgrid[:96, :96]
    a, b = ((yy - cy) + (xx - cx)) / np.sqrt(2), (-(yy - cy) + (xx - cx)) / np.sqrt(2)
    img = (1e4 * np.exp(-0.5 * (a / 4.0) ** 2 - 0.5 * (b / 2.0) ** 2)).astype(np.float32)
    _, centres = extract_psfs(img, [[48, 48]], 12.0)
    assert np.hypot(*(centres[0] - (cy, cx))) < 0.02


def _gaussian_beads(shape, centres, sigma_of, background=10.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, background)
    for cy, cx in centres:
        s = sigma_of(cy, cx)
        img += 1000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    return img.astype(np.float32)


def _one_percent_radius(sigma, h=20):
    from scipy import ndimage

    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    ring = np.rint(np.hypot(y, x)).astype(int)
    prof = ndimage.mean(np.exp(-(y**2 + x**2) / (2 * sigma**2)), labels=ring, index=np.arange(h + 1))
    return np.nonzero(prof < 0.01)[0][0] + 1


def test_the_radius_bounds_the_widest_region_and_ignores_neighbours():
    """A third of the field twice as blurred: the median over all beads gave the sharp PSFs' radius
    (App. A-b asks for a bound on all); a bead array 24 px apart: the neighbours in each window
    made a plateau above 1 %, the radius came out at the window's edge and every bead was crowded."""
    from lsfov.calibrate.beads import estimate_radius

    centres = [(y, x) for y in range(40, 441, 48) for x in range(40, 441, 48)]
    img = _gaussian_beads((480, 480), centres, lambda y, x: 3.0 if x >= 320 else 1.5)
    assert estimate_radius(img, max_radius=20) == _one_percent_radius(3.0) > _one_percent_radius(1.5)
    grid = _gaussian_beads((384, 384), [(y, x) for y in range(12, 384, 24) for x in range(12, 384, 24)],
                           lambda y, x: 2.0)
    assert abs(estimate_radius(grid) - _one_percent_radius(2.0)) <= 1
    assert len(bead_psfs(grid).patches) > 100
