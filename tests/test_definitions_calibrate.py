"""Behaviours of bead calibration, sparse+smooth deblurring, operators and the NGFF writer pinned
down: a coverage-guided mutation review found each changeable without any other test failing."""
import warnings

import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import simulate
from lsfov.calibrate import bead_psfs, calibrate_operator, coefficient_nodes, dirac_comb, learn_subspace, node_grid
from lsfov.calibrate.beads import extract_psfs, patch_size, radial_bump
from lsfov.restore import locate_sources


def _beads(centres, shape=(200, 200), sigma=1.3, peak=1000.0, background=10.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    return (background + sum(peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
                             for y, x in centres)).astype(np.float32)


# ------------------------------------------------------------------------------- bead calibration


def test_node_coefficients_lie_in_the_cone_and_nodes_without_flux_take_its_first_column():
    """App. C: node PSFs are projected onto the conical hull (no negative lobes where beads are
    missing); a node whose beads all project to zero takes the cone's first column at unit flux."""
    rng = np.random.default_rng(0)
    pos, beta = rng.uniform(0, 99, (20, 2)), rng.normal(size=(20, 3))
    grid = node_grid((100, 100), 10)
    assert coefficient_nodes(pos, beta, grid, cone=np.eye(3)).min() >= -1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nodes = coefficient_nodes(pos, -np.abs(beta), grid, cone=np.eye(3), kernel_sums=np.ones(3))
    assert np.isfinite(nodes).all() and nodes.min() >= -1e-9 and np.allclose(nodes.sum(axis=0), 1.0)


def test_bead_patches_are_resampled_bicubically_at_their_subpixel_centre():
    """App. A-c: beads between pixels are re-centred by bicubic interpolation (bilinear is ~10 % off)."""
    s, true = 1.5, np.array([(50.5, 60.5), (120.5, 140.5), (60.5, 150.5), (150.5, 50.5)])
    patches, _ = extract_psfs(_beads(true, sigma=s, background=0.0), np.floor(true), radius=8, background_order=0)
    k = patch_size(8)
    o = np.arange(k) - k // 2
    want = 1000 * np.exp(-(o[:, None] ** 2 + o[None, :] ** 2) / (2 * s**2)) * radial_bump(k, 8)
    assert np.abs(patches - want).max() / want.max() < 0.03


def test_a_bead_too_near_the_border_for_a_whole_patch_is_left_out():
    b = bead_psfs(_beads(((50, 50), (50, 150), (150, 50), (150, 150), (100, 5))), radius=8)
    assert len(b.positions) == 4 and b.n_crowded == 1


def test_calibrated_operators_and_subspaces_record_the_beads_pixel_size():
    """What check_pixel_size compares a later image with: without it, other pixels go unwarned."""
    f = simulate.bead_field((256, 256), 30, seed=11)
    img = xr.DataArray(f.image, dims=("y", "x"), attrs={"pixel_um": 0.1})
    assert calibrate_operator(img, 3).attrs["pixel_um"] == 0.1
    sub = learn_subspace([img, img.copy(data=simulate.bead_field((256, 256), 30, seed=12).image)], 2, 2)
    assert sub.operator(0).attrs["pixel_um"] == 0.1


def test_a_dirac_comb_sits_half_a_spacing_in():
    d = dirac_comb((64, 64), 16)
    assert d[8, 8] == 1 and d[0, 0] == 0 and d.sum() == 16


# ------------------------------------------------------------------------------- sparse + smooth


@pytest.mark.filterwarnings("ignore:.*carry point sources:lsfov.LsfovWarning")
def test_the_smooth_part_starts_at_the_image_over_the_psf_sum():
    """A blur of gain 2 (a PSF summing to 2): the background starts at y / 2, not at y."""
    op = lsfov.ProductConvolution.from_grid(2 * lsfov.psf.gaussian(1.5, size=11)[None, None], (64, 64))
    _, smooth = lsfov.sparse_smooth_deblur(np.full((64, 64), 100.0, np.float32), op, 0.0, iterations=1)
    assert abs(float(np.median(smooth)) - 50) < 1


def test_sources_on_the_outermost_rows_and_columns_are_not_located():
    op = lsfov.ProductConvolution.from_grid(lsfov.psf.gaussian(1.5, size=11)[None, None], (64, 64))
    s = np.zeros((64, 64), np.float32)
    s[0, 20] = s[30, 63] = s[30, 30] = 100
    found = locate_sources(s, op, 1.0)
    assert len(found) == 1 and tuple(found[0, :2]) == (30, 30)


def test_an_image_too_small_to_measure_its_noise_needs_gamma1():
    op = lsfov.ProductConvolution.from_grid(np.ones((1, 1, 1, 1), np.float32), (2, 5))
    with pytest.raises(ValueError, match=r"2x5 px is too small to measure its noise .*give gamma1"):
        lsfov.sparse_smooth_deblur(np.ones((2, 5), np.float32), op, iterations=3)
    lsfov.sparse_smooth_deblur(np.ones((2, 5), np.float32), op, 0.1, iterations=3)


# ------------------------------------------------------------------------------- operators, io


def test_psf_at_reads_columns_of_a_wide_basis_operator():
    k = np.stack([lsfov.psf.gaussian(1.0, size=5), lsfov.psf.gaussian(2.0, size=5)])
    h, w = 20, 60
    xx = np.broadcast_to(np.arange(w) / (w - 1), (h, w))
    op = lsfov.ProductConvolution.from_basis(k, np.stack([1 - xx, xx]).astype(np.float32))
    for x in (10.0, 45.5, 59.0):
        t = x / (w - 1)
        np.testing.assert_allclose(op.psf_at(5.0, x), (1 - t) * k[0] + t * k[1], atol=1e-6)


def test_a_z_in_nm_is_saved_in_micrometres(tmp_path):
    st = xr.DataArray(np.zeros((3, 16, 16), np.float32), dims=("z", "y", "x"),
                      coords={"z": ("z", [0.0, 500.0, 1000.0], {"units": "nm"})})
    lsfov.save(xr.Dataset({"im": st}), tmp_path / "r.zarr")
    assert lsfov.open_image(tmp_path / "r.zarr" / "im", z=1).attrs["z_um"] == pytest.approx(0.5)


def test_unevenly_spaced_coordinates_are_refused_by_the_writer(tmp_path):
    x = np.arange(16.0)
    x[8:] += 0.05  # one NGFF scale cannot say where these pixels are
    im = xr.DataArray(np.zeros((16, 16), np.float32), dims=("y", "x"), coords={"x": ("x", x, {"units": "micrometer"})})
    with pytest.raises(ValueError, match="not evenly spaced"):
        lsfov.save(xr.Dataset({"im": im}), tmp_path / "r.zarr")


def test_an_rgba_npy_is_read_as_channels(tmp_path):
    rgba = np.random.default_rng(3).random((40, 30, 4)).astype(np.float32)
    np.save(tmp_path / "rgba.npy", rgba)
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "rgba.npy", channel=3).values, rgba[..., 3])


def test_a_subspace_takes_a_radius_and_a_saturation_level_given():
    """Given, one radius serves every image, and beads clipped at the level given are left out
    (a level above every pixel: the same subspace as none)."""
    from lsfov.calibrate import estimate_radius

    imgs = [simulate.bead_field((256, 256), 30, seed=s).image for s in (11, 12)]
    auto = learn_subspace(imgs, 2, 2)
    given = learn_subspace(imgs, 2, 2, radius=estimate_radius(imgs[0]), saturation=10 * max(i.max() for i in imgs))
    np.testing.assert_allclose(given.psf_basis, auto.psf_basis, atol=1e-6)
    level = np.float32(np.percentile(imgs[0], 99.9))
    with pytest.warns(lsfov.LsfovWarning, match="beads are saturated and were left out"):
        low = learn_subspace([np.minimum(i, level) for i in imgs], 2, 2, saturation=float(level))
    assert low.attrs["n_beads"] < auto.attrs["n_beads"]
