"""The operator, PSF, simulation and restoration functions on input that no other test gives them:
each refusal in one line that says what to do, and the fallbacks (a list for an array, a pixel-wise
operator in blocks, an operator saved from lazy maps) doing what the whole-array path does."""
import dataclasses
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import lsfov
from lsfov import psf, simulate
from lsfov.operators import ProductConvolution as PC
from lsfov.restore.sparse_smooth import estimate_noise
from refusals import refuses

K = psf.gaussian(1.0, size=5)
OPTICS = psf.Optics(0.8, 0.5, 0.1)


@pytest.fixture(scope="module")
def small():
    u = np.random.default_rng(0).random((32, 32)).astype(np.float32) + 0.1
    return u, PC.from_grid(K[None, None], (32, 32))


def test_operator_constructors_refuse_bad_kernels_centres_and_maps():
    k4 = K[None, None]
    nan_maps = np.ones((1, 32, 32))
    nan_maps[0, 3, 4] = np.nan
    for call, err, what in (
        (lambda: PC.from_grid(np.zeros((0, 1, 5, 5)), 32), ValueError, r"psfs is empty \(shape \(0, 1, 5, 5\)\)"),
        (lambda: PC.from_grid([[K, K[:3]]], 32), TypeError, "psfs must be an array of real numbers, of one length"),
        (lambda: PC.from_grid([[[["a"]]]], 32), TypeError, "psfs must be an array of real numbers"),
        (lambda: PC.from_grid(k4, 32, centers=5), ValueError, "centers must be a pair .* got 5$"),
        (lambda: PC.from_grid(k4, 32, centers="ab"), ValueError, "centers must be a pair"),
        (lambda: PC.from_grid(k4, 32, centers=([1], [2], [3])), ValueError, "centers must be a pair"),
        (lambda: PC.from_grid(k4, 32, centers=(["a"], [2])), ValueError, "of pixel positions"),
        (lambda: PC.from_grid(k4, 32, centers=([1, 2], [2])), ValueError, "2 node y-centres given for a grid of 1"),
        (lambda: PC.from_basis(K, np.ones((1, 32, 32))), ValueError, r"shape \(I, K, K\), got \(5, 5\)"),
        (lambda: PC.from_basis(K[None], np.ones((32, 32)).tolist()), ValueError, r"maps must have shape \(I=1, H, W\)"),
        (lambda: PC.from_basis(K[None], []), ValueError, "coefficient maps is empty"),
        (lambda: PC.from_basis(K[None], np.ones((1, 32, 32), complex)), TypeError, "maps must be a real numeric"),
        (lambda: PC.from_basis(K[None], nan_maps), ValueError, "coefficient maps contain NaN or Inf; fix the maps"),
    ):
        refuses(err, what, call)


def test_operator_application_refuses_what_it_cannot_apply(small):
    u, op = small
    window = op.restrict((0, 0), (16, 16))
    refuses(ValueError, r"restrict\(\) applies to a full-image operator", lambda: window.restrict((0, 0), (8, 8)))
    refuses(ValueError, r"dask image shape \(16, 16\) does not match .*; build the operator for this image",
            lambda: op.apply(da.ones((16, 16), chunks=8)))
    # A window's Dask input was once refused as of the wrong shape: the window's own (16, 16).
    refuses(ValueError, "a restricted window applies to NumPy or CuPy blocks, not Dask arrays",
            lambda: window.apply(da.ones((16, 16), chunks=8)))
    refuses(ValueError, r"must be 2-D \(y, x\), got dims \('y', 'x', 'c'\); select a plane first",
            lambda: op.apply(xr.DataArray(u[..., None], dims=("y", "x", "c"))))
    np.testing.assert_array_equal(op.apply(u.tolist()), op.apply(u))  # a list is read as an array
    # Equal cells asked of a grid with one node along y: there are none, the plan by cells is used.
    row = PC.from_grid(np.stack([K, psf.gaussian(1.5, size=5)])[None], (32, 32))
    by_cells = row.apply(u)
    row.uniform_cells = True
    np.testing.assert_array_equal(row.apply(u), by_cells)


def test_an_operator_saved_from_lazy_maps_loads_equal_and_an_interrupted_save_is_refused(tmp_path):
    maps = da.random.default_rng(0).random((1, 32, 32), chunks=16).astype(np.float32) + 0.5
    op = PC.from_basis(K[None], maps)
    op.save(tmp_path / "op.zarr")
    back = PC.load(tmp_path / "op.zarr")
    np.testing.assert_array_equal(np.asarray(back.maps), maps.compute())
    root = zarr.open_group(str(tmp_path / "op.zarr"), mode="r+")
    root.attrs["lsfov"] = {**root.attrs["lsfov"], "complete": False}
    refuses(ValueError, "is an incomplete operator .*; save it again", lambda: PC.load(tmp_path / "op.zarr"))


def test_operator_parts_of_unknown_memory_are_copied_and_zarr_maps_in_memory_are_fingerprinted():
    class Foreign:  # memory NumPy reads through __array_interface__, of no buffer Python can inspect
        def __init__(self, a):
            self.a = a
            self.__array_interface__ = {**a.__array_interface__, "data": (a.ctypes.data, True)}

    mine = K[None, None].copy()
    view = np.asarray(Foreign(mine))
    assert not view.flags.writeable and np.shares_memory(view, mine)
    op = PC.from_grid(view, 32)
    mine *= 2  # written through another way in
    np.testing.assert_array_equal(op.kernels, K[None, None])
    maps = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(1, 32, 32), dtype="f4", fill_value=1.0)
    a, b = PC.from_basis(K[None], maps), PC.from_basis(K[None], maps)
    assert a.fingerprint == b.fingerprint  # (a store with no directory: named by its address)


def test_an_xarray_psf_of_non_square_pixels_records_no_pixel_size_and_a_measured_psf_takes_any_pixels(small):
    u, _ = small
    coords = {d: (d, np.arange(9) * s, {"units": "µm"}) for d, s in (("y", 0.1), ("x", 0.2))}
    assert "pixel_um" not in PC.from_psf(xr.DataArray(psf.gaussian(1.0, size=9), dims=("y", "x"), coords=coords),
                                         32).attrs
    img = xr.DataArray(u, dims=("y", "x"),
                       coords={d: (d, np.arange(32) * s, {"units": "µm"}) for d, s in (("y", 0.1), ("x", 0.2))})
    measured = PC.from_grid(K[None, None], 32, attrs={"pixel_um": 0.1, "psf_file": "bead.tif"})
    assert lsfov.deconvolve(img, measured, 2).shape == (32, 32)  # the PSF is in the image's own pixels
    refuses(ValueError, "pixels are not square .*; resample it to square pixels",
            lambda: lsfov.deconvolve(img, PC.from_grid(K[None, None], 32, attrs={"pixel_um": 0.1}), 2))


def test_psf_functions_refuse_empty_mismatched_and_non_numeric_batches():
    g2 = psf.get_model("G2")
    for call, err, what in (
        (lambda: psf.gaussian([1, 2], [1, 2, 3]), ValueError, r"batches of one length, got shapes \(2,\) and \(3,\)"),
        (lambda: psf.gaussian([]), ValueError, "no Gaussian widths given .*; pass at least one sigma"),
        (lambda: psf.zernike({4: []}, OPTICS), ValueError, "no Zernike coefficients given .*; pass at least one"),
        (lambda: psf.zernike({4: [1, 2], 5: [1, 2, 3]}, OPTICS), ValueError, "must be batches of one length"),
        (lambda: psf.zernike({4: "a"}, OPTICS), TypeError, "must be numbers or 1-D arrays of numbers, got {4: 'a'}"),
        (lambda: psf.zernike({4: 0.1}, OPTICS, z_um="a"), TypeError, "must be numbers or 1-D arrays of numbers"),
        (lambda: psf.zernike({4: np.nan}, OPTICS), ValueError, "coefficients and z_um must be finite"),
        (lambda: psf.airy("x"), TypeError, "optics must be an lsfov.Optics, got str"),
        (lambda: psf.get_model("G1").render(np.zeros((0, 1))), ValueError, "no G1 parameters given .*; pass at least"),
        (lambda: psf.get_model("G1").render({"sigma": []}), ValueError, "no G1 parameters given"),
        (lambda: g2.render({"sigma_y": [1, 2], "sigma_x": [1, 2, 3]}), ValueError,
         r"G2's parameters must be batches of one length, got shapes {'sigma_y': \(2,\), 'sigma_x': \(3,\)}"),
        (lambda: g2.render({"sigma_y": "a", "sigma_x": 1}), TypeError, "G2's parameters must be numbers"),
        (lambda: g2.render("ab"), TypeError, r"G2 takes 2 real numbers \['sigma_y', 'sigma_x'\] per PSF, got 'ab'"),

        # Read as numbers once: "1.5", True, "0.1" rendered; complex lost its imaginary part with a ComplexWarning.
        (lambda: psf.gaussian("1.5"), TypeError, "sigma_y and sigma_x must be numbers .*, got '1.5'"),
        (lambda: psf.gaussian(True), TypeError, "sigma_y and sigma_x must be numbers .*, got True"),
        (lambda: psf.zernike({4: "0.1"}, OPTICS), TypeError, "must be numbers or 1-D arrays of numbers, got {4: '0.1'}"),
        (lambda: psf.zernike({4: 0.1}, OPTICS, z_um="1"), TypeError, "and '1'"),
        (lambda: g2.render(np.array([1.0, 2.0], complex)), TypeError, "G2 takes 2 real numbers .* of complex128"),
        (lambda: g2.render({"sigma_y": "1", "sigma_x": 1}), TypeError, "G2's parameters must be numbers"),
        # The width said, not a kernel size of 301 digits.
        (lambda: psf.gaussian(1e300), ValueError, "a Gaussian of sigma 1e[+]300 px needs a kernel over 1025 pixels"),
        # Once NumPy's "operands could not be broadcast together".
        (lambda: g2.normalize([1.0, 2.0, 3.0]), ValueError,
         r"params must have 2 columns \['sigma_y', 'sigma_x'\] \(model G2\), got shape \(3,\)"),
        (lambda: g2.denormalize(np.zeros((4, 3))), ValueError, r"unit must have 2 columns .* got shape \(4, 3\)"),
        (lambda: g2.normalize("ab"), TypeError, "params must be real numbers, got 'ab'"),
        (lambda: psf.zernike_polynomial(4, "x", 0.0), TypeError, "rho must be real numbers, got 'x'"),
        (lambda: psf.zernike_polynomial(5, np.ones(3, complex), np.zeros(3)), TypeError, "rho must be real numbers"),
    ):
        refuses(err, what, call)


def test_a_pupil_model_without_zernike_terms_renders_one_psf_per_parameter_set():
    # (it once rendered one PSF for a whole batch)
    m = dataclasses.replace(psf.get_model("Z1"), name="Z0", params=("gain",), units={"gain": "1"},
                            ranges={"gain": (0, 1)}, size=15)
    batch = m.render([[0.1], [0.2], [0.3]])
    assert batch.shape == (3, 15, 15)
    np.testing.assert_array_equal(batch[2], m.render([0.3]))


def test_images_are_checked_before_they_are_degraded_or_deblurred(small, tmp_path):
    u, op = small
    for call, err, what in (
        (lambda: simulate.degrade("x.tif", op), TypeError, "got the file name 'x.tif'; open it with lsfov.open_image"),
        (lambda: lsfov.deconvolve(str(tmp_path / "x.tif"), op, 2), TypeError, "open it with lsfov.open_image"),
        (lambda: simulate.degrade(np.array([["a"]]), op), TypeError, "image must be a real numeric array, got dtype <U1"),
        (lambda: simulate.degrade(u * 1j, op), TypeError, "image must be a real numeric array, got dtype complex"),
        (lambda: lsfov.deconvolve(u * 1j, op, 2), TypeError, "image must be a real numeric array"),
        (lambda: lsfov.deconvolve(da.from_array(u * 1j, chunks=16), op, 2), TypeError, "must be a real numeric array"),
        (lambda: simulate.degrade(np.zeros((0, 3)), op), ValueError, r"image is empty \(shape \(0, 3\)\)"),
        (lambda: simulate.degrade(u, op, photons=None), TypeError, "photons must be a number, got None"),
        (lambda: simulate.degrade(u, op, photons=1j), TypeError, "photons must be a number"),
        (lambda: lsfov.calibrate.detect_beads(xr.DataArray(u[None, :, :5], dims=("z", "y", "c")), 2), ValueError,
         r"bead image has dims \('z', 'y', 'c'\): name them 'y' and 'x', or neither"),
    ):
        refuses(err, what, call)
    # A (1, H, W) plane is that plane; a list, an array.
    np.testing.assert_array_equal(simulate.degrade(u[None], op, seed=1), simulate.degrade(u, op, seed=1))
    np.testing.assert_array_equal(lsfov.deconvolve(u.tolist(), op, 2), lsfov.deconvolve(u, op, 2))


def test_sparse_smooth_refuses_a_wrong_operator_and_dask_images_that_are_no_plane(small):
    u, op = small
    for call, err, what in (
        (lambda: lsfov.sparse_smooth_deblur(u, "op"), TypeError, "operator must be an lsfov.ProductConvolution, got str"),
        (lambda: lsfov.sparse_smooth_deblur(da.ones((2, 32, 32)), op), ValueError,
         r"must be 2-D \(y, x\), got shape \(2, 32, 32\); pick a plane"),
        (lambda: lsfov.sparse_smooth_deblur(da.ones((32,)), op), ValueError, r"got shape \(32,\); pick a plane"),
        (lambda: lsfov.sparse_smooth_deblur(u[:16, :16], op.restrict((0, 0), (16, 16))), ValueError,
         "needs a full-image operator, not a restricted window; pass the operator it was restricted from"),
        (lambda: estimate_noise(np.ones((2, 5))), ValueError, r"at least 3x3 pixels, got shape \(2, 5\)"),
    ):
        refuses(err, what, call)


def test_a_pixel_wise_operator_deblurs_dask_blocks_as_the_whole_image(small):
    u, _ = small
    op = PC.from_grid(np.ones((1, 1, 1, 1)), (32, 32))  # no blur, no TV: nothing moves between blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lsfov.LsfovWarning)
        whole = lsfov.deconvolve(u, op, 3, tv=0)
        blocks = lsfov.deconvolve(da.from_array(u, chunks=16), op, 3, tv=0).compute()
    np.testing.assert_allclose(blocks, whole, rtol=1e-5)  # (float rounding)


def test_switches_take_true_or_false_not_a_word_that_reads_as_true(small, tmp_path):
    """``bool("no")`` is True: a switch given a string would do the opposite of what was meant."""
    u, op = small
    refuses(ValueError, "check must be True or False, got 'no'", op.apply, u, check="no")
    refuses(ValueError, "check must be True or False", op.adjoint, u, check="no")
    refuses(ValueError, "periodic must be True or False, got 'no'", op.restrict, (0, 0), (16, 16), periodic="no")
    refuses(ValueError, r"periodic must be True, False or a pair \(y, x\)", op.restrict, (0, 0), (16, 16),
            periodic=(True, False, True))
    assert op.restrict((0, 0), (32, 32), periodic=(True, False)).periodic == (True, False)
    refuses(ValueError, "progress must be True or False", lsfov.deconvolve, u, op, 2, progress="no")
    refuses(ValueError, "progress must be True or False", lsfov.sparse_smooth_deblur, u, op, progress="no")
    refuses(ValueError, "progress must be True or False", lsfov.save, xr.DataArray(u, dims=("y", "x")),
            tmp_path / "r.zarr", progress="no")
    assert not (tmp_path / "r.zarr").exists()
    beads = simulate.bead_field((64, 64), n_beads=4, seed=0).image
    refuses(ValueError, "return_positions must be True or False", lsfov.calibrate_operator, beads,
            return_positions="no")
    refuses(ValueError, "progress must be True or False", lsfov.learn_subspace, [beads, beads], progress="no")
    model = lsfov.load_model("G1")
    refuses(ValueError, "symmetrize must be True or False", model.predict, np.zeros((1, 128, 128), np.float32),
            symmetrize="no")
    refuses(ValueError, "reproducible must be True or False", model.predict, np.zeros((1, 128, 128), np.float32),
            reproducible="yes")
    img = np.zeros((128, 128), np.float32)
    for key in ("symmetrize", "fill", "progress"):
        refuses(ValueError, f"{key} must be True or False", lsfov.estimate_psf_map, img, "G1", **{key: "no"})
    refuses(ValueError, "symmetrize must be True or False", lsfov.blind_deconvolve, img, "G1", symmetrize="no")


def test_what_numpy_would_misread_or_fail_on_is_refused_in_one_line(tmp_path, monkeypatch):
    """Each was once a silent default, a made-up value or a NumPy error."""
    from lsfov.io import image_origin
    from lsfov.restore.tv_rl import tv_curvature

    refuses(ValueError, "kernel size must be a positive odd integer, got 0", simulate.psf_field, (64, 64), "G2", size=0)
    img = xr.DataArray(np.zeros((4, 4)), dims=("y", "x"), coords={"y": np.arange(4.0), "x": np.arange(4.0)})
    for bad in ("0.1", True):
        refuses(TypeError, "pixel_um must be a number", image_origin, img, bad)
    for bad in (-1, np.nan):
        refuses(ValueError, "pixel_um must be a finite number > 0", image_origin, img, bad)
    assert image_origin(img, 0.5) == (0.0, 0.0)
    x = np.ones((16, 16), np.float32)
    x[3, 3] = np.nan
    refuses(ValueError, "x contains NaN or Inf", tv_curvature, x, 0.1)
    a = da.ones((16, 16), chunks=8, dtype=np.float32)
    refuses(ValueError, r"the array to save is a Dask array of unknown chunk sizes .*compute_chunk_sizes",
            lsfov.save, a[a[:, 0] > 0], tmp_path / "r.zarr")
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"available": 2**30})())
    refuses(ValueError, r"a sample image of 100000x100000 px needs about 112 GiB; this machine has 1 GiB available",
            simulate.sample_image, "cell", 100000)
    refuses(ValueError, "a bead field of 40000x40000 px needs", simulate.bead_field, (40000, 40000))
    refuses(ValueError, "a tilted surface of 40000x40000 px needs", simulate.tilted_surface, (40000, 40000))
    assert simulate.sample_image("cell", 64).shape == (64, 64)


def test_direct_calls_refuse_a_window_bad_column_counts_and_optics_records_without_their_fields():
    """Found by the docstring audit: refusals the public entry points made, direct calls did not."""
    from lsfov.calibrate import cone_columns
    from lsfov.restore.chunked import deconvolve_dask

    op = PC.from_psf(psf.gaussian(1.0, size=7), (32, 32))
    y = da.from_array(np.random.default_rng(0).random((32, 32), dtype=np.float32), chunks=16)
    refuses(ValueError, "needs a full-image operator", deconvolve_dask, y, op.restrict((1, 1), (32, 32)), 2, 0.0,
            eps=0.3)  # (before: a graph that failed only when computed)
    obs = np.random.default_rng(0).random((3, 10))
    for bad in (0, -1, 2.5, True):
        refuses(ValueError, "max_columns must be a positive integer", cone_columns, obs, max_columns=bad)
    assert cone_columns(obs, max_columns=1).shape == (3, 1)
    meta = psf.MODELS["Z3"].to_meta()
    for optics in ({"na": 1.2}, {**meta["optics"], "magnification": 60}, [1.2, 0.6, 0.1]):
        refuses(ValueError, "the record's optics must hold", psf.PSFModel.from_meta, {**meta, "optics": optics})
    without_index = {k: v for k, v in meta["optics"].items() if k != "immersion_index"}
    assert psf.PSFModel.from_meta({**meta, "optics": without_index}).optics.immersion_index == 1.0
    assert psf.PSFModel.from_meta(meta) == psf.MODELS["Z3"]


def test_a_grid_of_parameter_values_is_refused_not_read_as_a_flat_batch():
    """A (2, 2) array per parameter gave 4 PSFs, the grid's layout lost without a word."""
    g1 = psf.MODELS["G1"]
    refuses(ValueError, r"1-D batches, got shapes \{'sigma': \(2, 2\)\}", g1.render, {"sigma": np.ones((2, 2))})
    refuses(ValueError, "1-D batches", g1.as_array, {"sigma": np.ones((1, 3))})
    assert g1.render({"sigma": np.ones(4)}).shape == (4, 31, 31)
    assert psf.MODELS["G2"].as_array({"sigma_y": np.ones(3), "sigma_x": 1.5})[0].shape == (3, 2)
