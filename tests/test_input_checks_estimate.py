"""Bad input to the calibration (bead PSFs, bases, subspaces, operators), the CNN's PSF maps, depth,
models and training, found by a coverage run of the refusals no test reached: each refused with a
one-line message that says what is wrong and what to do, before it turns into a traceback from a
library deep inside."""
import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import calibrate as cal
from lsfov import psf
from refusals import refuses


def test_bead_patches_and_bases_refuse_bad_shapes_and_counts():
    k = psf.gaussian(1.5, size=9)
    patches = np.stack([k, k, k]).astype(np.float32)
    for n in (0, -1, 2.5, True, "3"):
        refuses(ValueError, "n_basis must be a positive integer or None", cal.psf_basis, patches, n)
    refuses(ValueError, r"with K odd and M >= 1, got \(3, 8, 8\)", cal.remove_background, patches[:, :8, :8], 2)
    refuses(ValueError, "with K odd", cal.remove_background, np.ones((2, 3, 5)), 1)
    refuses(TypeError, "radius must be a number", cal.remove_background, patches, "wide")
    refuses(ValueError, "too few background pixels in a 9x9 patch; use a larger patch", cal.remove_background,
            patches, 5.5)
    img = np.zeros((64, 64), np.float32)
    img[30:33, 30:33] = 1
    refuses(ValueError, "radius must be a number of pixels, got 'wide'", cal.bead_psfs, img, "wide")
    refuses(ValueError, "radius must be a number of pixels", cal.bead_psfs, img, [1, 2])
    refuses(ValueError, r"smaller than one bead patch \(41x41\); use a smaller radius", cal.bead_psfs,
            img[:40], 16)


def test_a_bead_whose_patch_has_no_light_above_the_background_is_refused():
    # A bright peak inside a dark ring on a brighter background: detected, isolated, not saturated,
    # yet its patch (the background fitted outside the radius, removed) sums below zero.
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 40, xx - 40)
    img = np.ones((80, 80), np.float32)
    img[r < 4] = 0
    img[r < 1.5] = 1.5
    img[40, 40] = 2
    refuses(ValueError, r"no bead stands above the background; check the image or lower threshold=", cal.bead_psfs,
            img, 4, threshold=0.5)


def _spots(shape, centres, sigma=1.2):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape, 0.01, np.float32)
    for cy, cx in centres:
        img += 100 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
    return img


def test_subspaces_and_operator_identification_refuse_bad_parts_and_inputs(tmp_path):
    import xarray as xr

    k = psf.gaussian(1.2, size=9)[None].astype(np.float32)
    refuses(ValueError, r"need psf_basis \(I, K, K\)", cal.OperatorSubspace, k[0], np.ones((1, 64, 64)), np.ones((2, 1, 1)))
    refuses(ValueError, r"need psf_basis", cal.OperatorSubspace, k, np.ones((64, 64)), np.ones((2, 1, 1)))
    refuses(ValueError, r"gammas \(2, 1, 2\) do not match I=1, J=1", cal.OperatorSubspace, k, np.ones((1, 64, 64)),
            np.ones((2, 1, 2)))
    sub = cal.OperatorSubspace(k, np.ones((1, 64, 64)) / 64, np.ones((2, 1, 1)))
    refuses(ValueError, "gamma contains NaN or Inf; pass finite coordinates", sub.operator, np.full((1, 1), np.nan))
    img = _spots((64, 64), [(20, 20), (20, 44), (44, 20), (44, 44)])
    refuses(ValueError, r"positions must be a \(P, 2\) array of finite .* got NaN or Inf", cal.identify_operator, img,
            sub, positions=[[20, np.nan]])
    refuses(ValueError, r"positions must be a \(P, 2\) array .* got shape \(0, 2\)", cal.identify_operator, img, sub,
            positions=np.zeros((0, 2)))
    refuses(TypeError, r"positions must be a \(P, 2\) array of \(y, x\) pixel positions, got 'a'",
            cal.identify_operator, img, sub, positions="a")
    # A (2, 3) array is no three pairs (once reshaped into (y, x) = (20, 20), (30, 44), (44, 1)).
    refuses(ValueError, r"got shape \(2, 3\)", cal.extract_psfs, img, [[20, 20, 30], [44, 44, 1]], 3.0)
    refuses(ValueError, r"got shape \(3,\)", cal.identify_operator, img, sub, positions=[20, 20, 1])
    bad = img.copy()
    bad[3, 3] = np.inf
    refuses(ValueError, "NaN or Inf", cal.identify_operator, bad, sub)
    refuses(ValueError, r"psf_basis kernels must be square of an odd size K .*, got \(8, 8\)",
            cal.OperatorSubspace, np.ones((1, 8, 8), np.float32) / 64, np.ones((1, 64, 64)) / 64, np.ones((2, 1, 1)))
    small = cal.OperatorSubspace(np.ones((1, 5, 5), np.float32) / 25, np.ones((1, 64, 64)) / 64, np.ones((2, 1, 1)))
    refuses(ValueError, r"cannot match the subspace's 5x5 kernels with bead patches \(odd, 7x7 or more\); learn it "
            "with lsfov", cal.identify_operator, img, small)
    # A store whose write was interrupted: refused, not read half-written.
    xr.Dataset(attrs={"lsfov": {"type": "OperatorSubspace", "complete": False}}).to_zarr(tmp_path / "s.zarr")
    refuses(ValueError, "is an incomplete subspace \\(the write was interrupted\\); learn it again",
            cal.OperatorSubspace.load, tmp_path / "s.zarr")


def test_learn_subspace_refuses_what_is_no_stack_and_names_the_image_it_cannot_map():
    refuses(TypeError, r"bead_images must be a \(K, H, W\) stack or a list of 2-D images", cal.learn_subspace, 5)
    refuses(TypeError, "bead_images must be", cal.learn_subspace, np.ones((2, 2, 32, 32)))
    one = _spots((64, 64), [(20, 20), (44, 44)])
    refuses(ValueError, "a subspace needs at least 2 bead images, got 1", cal.learn_subspace, one)  # a 2-D image: one
    many = _spots((64, 64), [(16, 16), (16, 48), (48, 16), (48, 48), (32, 32)])
    refuses(ValueError, "^bead image 0: 2 beads cannot fix a thin-plate spline", cal.learn_subspace, [one, many],
            n_psf=1, n_space=1, radius=3, progress=False)
    row = _spots((64, 64), [(32, 12), (32, 24), (32, 36), (32, 48)])  # beads on one line: scipy's singular matrix
    refuses(ValueError, r"^bead image 0: the 4 beads lie on a line \(within .* px\): a thin-plate spline needs 3 not "
            "on a line; image beads across the field", cal.learn_subspace, [row, many], n_psf=1, n_space=1, radius=3,
            progress=False)


def test_cone_distances_and_node_smoothing_refuse_mismatched_input():
    refuses(ValueError, r"observed coefficients must have shape \(I, M\) with M >= 1, got \(3, 0\)", cal.cone_columns,
            np.zeros((3, 0)))
    refuses(ValueError, r"got \(3,\)", cal.cone_columns, np.ones(3))
    grid = cal.node_grid((32, 32))
    pos, beta = np.array([[4.0, 4], [20, 8], [10, 25]]), np.ones((3, 2))
    refuses(ValueError, r"positions \(M, 2\) and coefficients \(M, I\) must agree; got \(3, 2\) and \(2, 2\)",
            cal.coefficient_nodes, pos, beta[:2], grid)
    for s, err in ((-1, ValueError), (np.nan, ValueError), (np.inf, ValueError), ("0.1", TypeError)):
        refuses(err, "smoothing must be a", cal.coefficient_nodes, pos, beta, grid, smoothing=s)
    refuses(ValueError, "images differ in size: 4 and 6 pixels; compare images of one shape", cal.rescaled_distance,
            np.ones(4), np.ones((2, 3)))
    from lsfov.operators import ProductConvolution as PC

    a, b = (PC.from_grid(psf.gaussian(1.0, size=5)[None, None], s) for s in ((32, 32), (32, 48)))
    refuses(ValueError, r"operators act on different shapes: \(32, 32\) and \(32, 48\); compare operators of one",
            cal.operator_distance, a, b)


@pytest.fixture(scope="module")
def depth_map():
    """A PSF map of true Z3 parameters on a tilted surface (what a perfect CNN reads), and its depths."""
    import xarray as xr

    s = lsfov.simulate.tilted_surface((192, 192), depth_range_um=(-5, 5), grid=4, seed=4)
    p = s.params
    ds = xr.Dataset({n: (("gy", "gx"), p[..., i].astype(np.float32)) for i, n in enumerate(("focus", "astigmatism", "axis"))})
    ds["validity"] = (("gy", "gx"), np.ones(p.shape[:2], np.float32))
    cy, _ = s.operator.centers
    ds.attrs.update(params=["focus", "astigmatism", "axis"], psf_model="Z3", patch=int(2 * (cy[0] + 0.5)),
                    stride=float(cy[1] - cy[0]), image_shape=list(s.image.shape))
    return ds, np.asarray(s.depth_um, np.float64)


def test_depth_refuses_maps_and_depths_it_cannot_calibrate_on(depth_map):
    import xarray as xr

    from lsfov.estimate.depth import local_plane

    ds, z = depth_map
    refuses(ValueError, "depth needs a map of an astigmatic model .*this one has no 'astigmatism'", lsfov.calibrate_depth,
            ds.drop_vars("astigmatism"), z, method="curve")
    refuses(ValueError, r"known_depth_um must be 2-D: on the node grid \(4, 4\) or the full image", lsfov.calibrate_depth,
            ds, np.zeros(7))
    refuses(ValueError, r"only 0 valid nodes to calibrate on; image a textured sample", lsfov.calibrate_depth,
            ds.assign(validity=ds.validity * 0), z)
    for bad in ("wide", [1, 2], None):
        refuses(ValueError, "smooth must be a width in nodes >= 0", local_plane, np.ones((4, 4)), 1.0, bad)
    refuses(ValueError, "smooth must be a width in nodes >= 0, got 'wide'", lsfov.estimate_depth, ds, smooth="wide")
    refuses(ValueError, "smooth must be a width in nodes >= 0, got -1", lsfov.estimate_depth, ds, smooth=-1)
    # Known depths labelled by dim name are read by name, whatever their order.
    node_z = lsfov.calibrate_depth(ds, z)
    grid_z = np.asarray(lsfov.estimate_depth(ds, node_z).values)
    flipped = xr.DataArray(np.ascontiguousarray(z.T), dims=("x", "y"))
    np.testing.assert_allclose(lsfov.estimate_depth(ds, lsfov.calibrate_depth(ds, flipped)).values, grid_z, rtol=1e-6)


def test_psf_maps_refused_by_the_operator_and_the_cnn(depth_map):
    model = lsfov.load_model("Z3")
    refuses(ValueError, r"image must be 2-D \(y, x\), got shape \(2, 128, 128\); select a plane first",
            lsfov.estimate_psf_map, np.ones((2, 128, 128), np.float32), model)
    ds, _ = depth_map
    no_shape = ds.copy()
    no_shape.attrs = {k: v for k, v in ds.attrs.items() if k != "image_shape"}
    refuses(ValueError, r"give the image shape: shape=\(H, W\)", lsfov.operator_from_psf_map, no_shape)
    refuses(ValueError, "the PSF map has no nodes", lsfov.operator_from_psf_map, ds.isel(gx=slice(0, 0)))
    refuses(ValueError, r"the PSF map has NaN parameters; fill invalid nodes first \(fill_invalid\)",
            lsfov.operator_from_psf_map, ds.assign(focus=ds.focus.where(ds.focus < ds.focus.max())))
    um = ds.assign_coords(gy=("gy", np.arange(4) * 3.0, {"units": "µm"}), gx=("gx", np.arange(4) * 3.0, {"units": "µm"}))
    refuses(ValueError, "the PSF map's gy is in µm but its pixel_um attribute is missing; make the map with",
            lsfov.operator_from_psf_map, um)


def test_maps_of_a_model_lsfov_does_not_know_are_filled_as_z3s():
    import xarray as xr

    rng = np.random.default_rng(1)
    v = np.ones((4, 5), np.float32)
    v[1, 2] = v[3, 0] = 0
    ds = xr.Dataset({"focus": (("gy", "gx"), rng.uniform(0, 1, (4, 5))), "astigmatism": (("gy", "gx"), rng.uniform(0, 1, (4, 5))),
                     "axis": (("gy", "gx"), rng.uniform(0, np.pi, (4, 5))), "validity": (("gy", "gx"), v)},
                    attrs={"params": ["focus", "astigmatism", "axis"], "psf_model": "Z3"})
    z3 = lsfov.estimate.fill_invalid(ds)
    other = lsfov.estimate.fill_invalid(ds.assign_attrs(psf_model="my-own"))
    for p in ("focus", "astigmatism", "axis"):
        np.testing.assert_array_equal(other[p].values, z3[p].values)
    assert other.filled.values.sum() == 2


def test_model_files_refused_by_name_place_and_weights(tmp_path):
    import torch

    model = lsfov.load_model("Z3")
    refuses(ValueError, "model files end in .pt, got m.npz; give a file name ending in .pt", model.save, tmp_path / "m.npz")
    (tmp_path / "d.pt").mkdir()
    refuses(ValueError, "d.pt is a directory; give the model a file name ending in .pt", model.save, tmp_path / "d.pt")
    path = model.save(tmp_path / "m.pt")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    name = next(iter(blob["state_dict"]))
    blob["state_dict"][name] = blob["state_dict"][name][:1]  # a layer cut: another network's shape
    torch.save(blob, path)
    refuses(ValueError, rf"weights do not fit a {model.arch} network for Z3 \(size mismatch for {name}.*\); the file is "
            "damaged or edited: copy it again or train it again", lsfov.load_model, path)
    # Metadata at odds with itself (another model's name over G1's ranges) was a bare KeyError.
    blob = torch.load(lsfov.load_model("G1").save(tmp_path / "g.pt"), map_location="cpu", weights_only=True)
    blob["meta"]["psf_model"] = "Z3"
    torch.save(blob, tmp_path / "g.pt")
    refuses(ValueError, r"g.pt: its metadata does not describe a model \(KeyError: 'focus'\); the file is damaged or "
            "edited: copy it again or train it again", lsfov.load_model, tmp_path / "g.pt")
    refuses(ValueError, "device 'tpu' is not a torch device", lsfov.load_model, tmp_path / "g.pt", device="tpu")


def test_torch_tensors_and_masked_patches_are_refused_in_a_line():
    """A torch tensor where an image goes failed deep inside ('torch.dtype' object has no attribute
    'kind'), or was read as an image with no texture; a masked batch of patches was read with its
    hidden values."""
    import torch

    t = torch.rand(128, 128)
    op = lsfov.ProductConvolution.from_grid(psf.gaussian(2.0, 2.0, size=9)[None, None], (128, 128))
    fix = r"is a torch tensor; give a NumPy, CuPy, Dask or xarray array \(tensor.cpu\(\).numpy\(\)"
    for call in (lambda: op.apply(t), lambda: lsfov.deconvolve(t, op, 2), lambda: lsfov.estimate_psf_map(t, "G1"),
                 lambda: lsfov.blind_deconvolve(t, "G1", iterations=1), lambda: cal.detect_beads(t, 4)):
        refuses(TypeError, fix, call)
    model = lsfov.load_model("G1")
    assert model.predict(t)["sigma"].shape == (1,)  # (the CNN reads tensors)
    masked = np.ma.masked_array(t.numpy(), mask=t.numpy() > 0.5)
    refuses(ValueError, r"patches is a masked array \(\d+ pixels masked\), and lsfov reads no masks", model.predict, masked)


def test_training_sets_and_runs_refused_before_any_work(tmp_path):
    import zarr

    from lsfov.estimate import stream, training

    refuses(ValueError, "split must be 'train' or 'test', got 'val'", stream.PatchStream, "Z3", split="val")
    refuses(ValueError, r"unknown degradation 'blur'; choose one of \(", training.degrade_unit, np.ones((1, 8, 8)),
            "blur", 0.1, np.random.default_rng(0))
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.attrs["lsfov"] = {"type": "OperatorSubspace"}
    refuses(ValueError, "is not a training set written by `lsfov train --synthesize`", lsfov.estimate.open_training_set,
            tmp_path / "other.zarr")
    g = zarr.open_group(str(tmp_path / "cut.zarr"), mode="w")
    g.attrs["lsfov"] = {"type": "TrainingSet"}
    refuses(ValueError, "lacks its patches array: the training set is damaged; synthesize it again",
            lsfov.estimate.open_training_set, tmp_path / "cut.zarr")
    refuses(TypeError, "data must be a training-set path or the dict returned by lsfov.estimate.synthesize",
            lsfov.estimate.train, 5, progress=False)
    refuses(ValueError, "resume=True needs the checkpoint directory of the interrupted run", lsfov.estimate.train,
            tmp_path / "cut.zarr", resume=True, progress=False)
    refuses(FileNotFoundError, r"nothing to resume: no checkpoint .*last.pt \(start without --resume",
            lsfov.estimate.train, tmp_path / "cut.zarr", resume=True, checkpoint=tmp_path / "none", progress=False)
    small = lsfov.estimate.synthesize(8, "Z3", sources=("poi",), seed=0)
    refuses(ValueError, r"8 patches leave fewer than one batch \(64\) for training; synthesize more", lsfov.estimate.train,
            small, progress=False)


def test_a_stream_run_stops_at_its_time_limit_and_survives_no_valid_validation(lsfov_log):
    import logging

    from lsfov.estimate import stream

    s = stream.PatchStream("Z3", sources="poi", seed=2, invalid_fraction=0.99)  # one source: a name, not letters
    assert s.sources == ("poi",)
    refuses(ValueError, "max_minutes must be a finite number >= 0", stream.train_stream, s, max_minutes=-1)
    with lsfov_log(logging.INFO) as said:
        reg = stream.train_stream(s, patches=3, batch_size=2, n_val=2, max_minutes=0, progress=False)
    assert any("training on 2 patches: 1 whole batches of 2" in m for m in said), said
    history = reg.meta["training"]["history"]
    assert [h["step"] for h in history] == [0, 1] and all(np.isnan(h["val_r2"]) for h in history)  # no valid patch: no R²


def test_a_resumed_run_refuses_a_checkpoint_of_something_else_and_a_changed_freeze(tmp_path):
    import torch

    small = lsfov.estimate.synthesize(8, "Z3", sources=("poi",), seed=0)
    (tmp_path / "ck").mkdir()
    torch.save({"format": "something else"}, tmp_path / "ck" / "last.pt")
    refuses(ValueError, "is not a checkpoint of a Z3 training run of this lsfov version; start it again without --resume",
            lsfov.estimate.train, small, batch_size=2, resume=True, checkpoint=tmp_path / "ck", progress=False)
    torch.save({"format": "something else", "meta": {"settings": {"freeze": False}}}, tmp_path / "ck" / "last.pt")
    refuses(ValueError, r"the run's freeze is False; resume it without freeze=True \(--freeze\), or start again",
            lsfov.estimate.train, small, freeze=True, resume=True, checkpoint=tmp_path / "ck", progress=False)


def test_figures_leave_big_files_alone_and_show_mixed_units_square(tmp_path):
    import xarray as xr

    from lsfov import figures

    big = tmp_path / "big.pdf"
    with open(big, "wb") as f:  # sparse: no 65 MiB written
        f.write(b"%PDF /Creator (lsfov")
        f.truncate(65 << 20)
    assert not figures.made_by_lsfov(big)  # not read: lsfov's figures are a few hundred kB
    img = xr.DataArray(np.ones((3, 4)), dims=("y", "x"), coords={"y": ("y", [0.0, 2, 4], {"units": "µm"}),
                                                                "x": ("x", [0.0, 1, 2, 3], {"units": "pixel"})})
    assert figures._aspect(img) == 1.0
    assert figures._aspect(img.assign_coords(x=("x", [0.0, 1, 2, 3], {"units": "µm"}))) == 2.0


def test_calibration_helpers_refuse_what_numpy_would_misread():
    """Strings read as numbers, a NaN level taken as the largest radius, NumPy's reshape errors."""
    from lsfov.calibrate.basis import rank_threshold
    from lsfov.estimate.depth import estimate_depth

    beads = lsfov.simulate.bead_field((96, 96), n_beads=6, seed=0).image
    for kw, err, said in ((dict(level=np.nan), ValueError, "level must be a finite number > 0 and <= 1, got nan"),
                          (dict(max_radius="5"), ValueError, "max_radius must be an integer >= 3, got '5'"),
                          (dict(max_radius=2.5), ValueError, "max_radius must be an integer >= 3, got 2.5"),
                          (dict(max_radius=0), ValueError, "max_radius must be an integer >= 3, got 0")):
        refuses(err, said, cal.estimate_radius, beads, **kw)
    for call in (lambda: cal.detect_beads(beads, "3"), lambda: cal.extract_psfs(beads, [[40, 40]], "3"),
                 lambda: cal.calibrate_operator(beads, radius="3"), lambda: cal.detect_beads(beads, True)):
        refuses(ValueError, "radius must be a number of pixels", call)
    patches = np.random.default_rng(0).random((20, 11, 11))
    refuses(TypeError, "zscore must be a number, got '3'", cal.psf_basis, patches, zscore="3")
    refuses(ValueError, "zscore must be a finite number > 0, got -1", cal.psf_basis, patches, zscore=-1)
    refuses(ValueError, "bead patches are all zero", cal.psf_basis, np.zeros((20, 11, 11)))
    refuses(ValueError, r"with K odd and M >= 1, got \(0, 11, 11\)", cal.remove_background, np.zeros((0, 11, 11)), 3.0)
    refuses(ValueError, "patches contains NaN or Inf", cal.remove_background, np.full((2, 11, 11), np.nan), 3.0)
    refuses(TypeError, "patches must be real numbers, got an array of shape .* of complex128", cal.remove_background,
            patches.astype(complex), 3.0)
    refuses(ValueError, "shape must be positive, got 0", cal.node_grid, 0)
    refuses(ValueError, "shape must be an int or a pair", cal.node_grid, "64")
    refuses(ValueError, "matrix shape must be an int or a pair", rank_threshold, "a")
    refuses(ValueError, r"matrix shape must be positive, got \(-1, 5\)", rank_threshold, (-1, 5))
    refuses(TypeError, "u must be real numbers, got 'a'", cal.rescaled_distance, "a", "b")
    refuses(ValueError, "u and u0 must be non-empty images of finite values", cal.rescaled_distance, [np.nan], [1.0])
    m = lsfov.simulate.psf_field((256, 256), "Z3", grid=(3, 3), seed=0)
    psf_map = xr.Dataset({p: (("gy", "gx"), m[1][..., i]) for i, p in enumerate(psf.get_model("Z3").params)}
                         | {"validity": (("gy", "gx"), np.ones((3, 3)))}, attrs={"psf_model": "Z3"})
    refuses(ValueError, "smooth must be a width in nodes >= 0, got '1'", estimate_depth, psf_map, smooth="1")
