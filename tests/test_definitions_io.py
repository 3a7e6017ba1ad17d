"""Geometry, units and bookkeeping pinned to their definitions (a second mutation review: each of these
could change without another test failing): NGFF translations in other units and per level, ImageJ and
TIFF resolutions, node positions, the chunked cost model, simulation parameters."""
import json
import math

import dask.array as da
import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

import lsfov
from lsfov import ProductConvolution, psf, simulate
from lsfov.restore import chunked

UM = {"units": "micrometer"}


def _ome(path):
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]


def test_io_pyramid_translation_per_axis_non_square(tmp_path):
    # 0.4 x 0.2 µm pixels, offset (3, 5) µm: level l's pixel centre is shifted by scale * (2**l - 1) / 2 on EACH axis
    img = xr.DataArray(np.zeros((2048, 2048), np.float32), dims=("y", "x"),
                       coords={"y": ("y", 3 + 0.4 * np.arange(2048), UM), "x": ("x", 5 + 0.2 * np.arange(2048), UM)})
    lsfov.save(img.rename("im"), tmp_path / "r.zarr")
    ds = _ome(tmp_path / "r.zarr" / "im")["datasets"]
    assert len(ds) == 3
    for lvl, d in enumerate(ds):
        f = 2 ** lvl
        scale, trans = d["coordinateTransformations"][0]["scale"], d["coordinateTransformations"][1]["translation"]
        assert scale == pytest.approx([0.4 * f, 0.2 * f])
        assert trans == pytest.approx([3 + 0.4 * (f - 1) / 2, 5 + 0.2 * (f - 1) / 2])
    # the reader agrees: a level-2 pixel (4x4 base pixels) is centred on their mean position
    l2 = lsfov.open_image(tmp_path / "r.zarr" / "im", level=2)
    assert float(l2.y[0]) == pytest.approx(3 + 0.4 * 1.5) and float(l2.x[0]) == pytest.approx(5 + 0.2 * 1.5)


def test_io_ngff_translation_in_nanometres_and_multiscale_transform_with_dataset_translation(tmp_path):
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    root = zarr.open_group(str(tmp_path / "nm.zarr"), mode="w", zarr_format=3)
    root.create_array("0", data=np.zeros((4, 6), np.uint16), dimension_names=["y", "x"])
    write_multiscales_metadata(root, datasets=[{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [100.0, 100.0]}, {"type": "translation", "translation": [500.0, 1000.0]}]}],
        fmt=FormatV05(), axes=[{"name": "y", "type": "space", "unit": "nanometer"},
                               {"name": "x", "type": "space", "unit": "nanometer"}])
    arr = lsfov.open_image(tmp_path / "nm.zarr")
    np.testing.assert_allclose(arr.x.values, 1.0 + 0.1 * np.arange(6))  # µm
    np.testing.assert_allclose(arr.y.values, 0.5 + 0.1 * np.arange(4))
    # NGFF: the multiscale's own scale applies after the dataset's translation too
    ome = dict(root.attrs["ome"])
    ms = [dict(ome["multiscales"][0])]
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [2.0, 2.0]}]
    root.attrs["ome"] = {**ome, "multiscales": ms}
    arr = lsfov.open_image(tmp_path / "nm.zarr")
    np.testing.assert_allclose(arr.x.values, 2 * (1.0 + 0.1 * np.arange(6)))
    np.testing.assert_allclose(arr.y.values, 2 * (0.5 + 0.1 * np.arange(4)))


def test_io_imagej_resolution_in_nanometres(tmp_path):
    tifffile.imwrite(tmp_path / "nm.tif", np.zeros((1, 8, 8), np.uint8), imagej=True, resolution=(1 / 250, 1 / 250),
                     metadata={"unit": "nm"})
    assert lsfov.open_image(tmp_path / "nm.tif").attrs["pixel_um"] == pytest.approx(0.25)


def test_io_300_dpi_is_a_display_setting(tmp_path):
    img = np.zeros((16, 16), np.float32)
    tifffile.imwrite(tmp_path / "dpi300.tif", img, resolution=(300, 300), resolutionunit="INCH")
    assert lsfov.open_image(tmp_path / "dpi300.tif").attrs["pixel_um"] is None


def test_map_without_coordinates_uses_its_patch_and_stride():
    from lsfov.estimate.mapping import map_node_pixels

    ds = xr.Dataset({"focus": (("gy", "gx"), np.zeros((3, 4)))}, attrs={"patch": 128, "stride": 96})
    gy, gx = map_node_pixels(ds)
    np.testing.assert_array_equal(gy, 63.5 + 96 * np.arange(3))
    np.testing.assert_array_equal(gx, 63.5 + 96 * np.arange(4))


def test_cost_model_is_the_documented_one():
    def documented(chunk, op, n, tv):
        s = chunked.spread_per_iteration(op, tv)
        n_fft = 4 if op.n_psfs == 1 else 8
        best, best_cost = 1, math.inf
        for k in range(1, n + 1):
            if k > 1 and s * k > min(chunk):
                break
            a = float(np.prod([c + 2 * 2 * op.halo * k for c in chunk]))  # chunk + 2 k 2r
            cost = math.ceil(n / k) * (chunked._COPY_S * a + chunked._TASK_S) + n * n_fft * chunked._FFT_S * a * math.log2(a)
            if cost < best_cost:
                best, best_cost = k, cost
        return best

    for K in (5, 15, 31):
        for grid in (1, 3):
            op = ProductConvolution.from_grid(np.broadcast_to(psf.gaussian(2.0, size=K), (grid, grid, K, K)), (4096, 4096))
            for c in (256, 512, 1024, 2048):
                assert chunked.choose_exchange_every((c, c), op, 20, 0.02) == documented((c, c), op, 20, 0.02), (K, grid, c)


def test_tv_spreads_one_pixel_with_a_one_pixel_psf(blurred_cell):
    _, y, _ = blurred_cell
    op = ProductConvolution.from_grid(np.ones((1, 1, 1, 1), np.float32), y.shape)
    assert chunked.spread_per_iteration(op, 0.05) == 1 and chunked.spread_per_iteration(op, 0) == 0
    whole = lsfov.deconvolve(y, op, 4, tv=0.05)
    lazy = lsfov.deconvolve(da.from_array(y, chunks=64), op, 4, tv=0.05).compute()
    np.testing.assert_allclose(lazy, whole, rtol=0, atol=1e-5 * whole.max())


def test_degrade_scales_the_counts_by_beta():
    img = np.full((64, 64), 1.0, np.float32)
    op, _ = simulate.psf_field(img.shape, "G1", (2, 2), seed=0, size=25)
    c = simulate.degrade(img, op, photons=400.0, read_noise=0.0, beta=0.5, seed=1)[16:48, 16:48]
    assert c.mean() == pytest.approx(200, rel=0.02) and c.var() == pytest.approx(100, rel=0.15)  # beta λ, beta² λ


def test_psf_field_roughness_zero_is_a_bilinear_ramp():
    for r, flat in ((0.0, True), (1.0, False)):
        _, p = simulate.psf_field((200, 300), "G1", (5, 6), seed=5, roughness=r)
        d2 = max(np.abs(np.diff(p, 2, axis=0)).max(), np.abs(np.diff(p, 2, axis=1)).max())
        assert (d2 < 1e-9) == flat, (r, d2)


def test_bead_field_nodes_and_background():
    a = simulate.bead_field((128, 160), 12, seed=3, grid=4)
    np.testing.assert_allclose(a.operator.centers[0], (np.arange(4) + 0.5) * 128 / 4 - 0.5)
    np.testing.assert_allclose(a.operator.centers[1], (np.arange(4) + 0.5) * 160 / 4 - 0.5)
    assert a.background.min() == 0 and a.background.max() == pytest.approx(2 * 20.0)  # spans [0, 2 background]


def test_tilted_surface_node_params_are_the_depth_at_the_nodes():
    s = simulate.tilted_surface((256, 320), depth_range_um=(-4, 6), direction=0.0, grid=4, seed=0)
    cy, cx = s.operator.centers
    depth = np.interp(cx, np.arange(320), s.depth_um[0])  # direction 0: depth along x only, linear
    np.testing.assert_allclose(s.params[..., 0], np.abs(s.focus_per_um * depth)[None].repeat(4, 0), rtol=1e-5, atol=1e-6)


def test_default_grid_nodes_are_cell_centres_symmetric_about_the_image_centre():
    k = psf.gaussian(1.0, size=5)
    op = ProductConvolution.from_grid(np.broadcast_to(k, (3, 4, 5, 5)), (101, 120))
    np.testing.assert_allclose(op.centers[0], [16.33333333, 50.0, 83.66666667])
    np.testing.assert_allclose(op.centers[1] + op.centers[1][::-1], 119)


def test_from_psf_warns_over_one_pixel_off_centre():
    g = psf.gaussian(1.0, 1.0, size=15)
    with pytest.warns(lsfov.LsfovWarning, match=r"centre of mass is \(\+0.0, \+2.0\) px"):
        ProductConvolution.from_psf(np.roll(g, 2, axis=1), (60, 70))


def test_other_stage_state_is_not_another_run(tmp_path, lsfov_log):
    from lsfov.restore.scratch import warn_other_runs

    with lsfov_log() as said:
        (tmp_path / "lsfov-psfmap-0123456789abcdef").mkdir()
        warn_other_runs(tmp_path / "lsfov-tvrl-fedcba9876543210")
        assert not any("is of another run" in m for m in said), said
        (tmp_path / "lsfov-tvrl-0000000000000000").mkdir()
        warn_other_runs(tmp_path / "lsfov-tvrl-fedcba9876543210")
        assert any("lsfov-tvrl-0000000000000000" in m for m in said), said
