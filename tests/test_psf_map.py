"""Spatially varying PSF maps (paper 000 Sec. II-F): sliding-window CNN on chunks, filling, operator."""
import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import simulate
from lsfov.estimate.mapping import fill_invalid

pytest.importorskip("torch")


# A Z3 map: the parameters, the validity, and the network's focus x astigmatism products (for depth).
MAP_VARIABLES = ("focus", "astigmatism", "axis", "validity", "focus_astig_sin", "focus_astig_cos")


@pytest.fixture(scope="module")
def blurred():
    op, params = simulate.psf_field((448, 384), "Z3", (3, 3), seed=2)
    return simulate.degrade(simulate.sample_image("cell", (448, 384)), op, seed=1), params


def test_node_grid_is_independent_of_chunking(blurred):
    img, _ = blurred
    whole = lsfov.estimate_psf_map(img, "Z3", stride=64)
    assert whole.sizes == {"gy": 6, "gx": 5}  # (448-128)//64+1, (384-128)//64+1
    np.testing.assert_allclose(whole.gy.values, 63.5 + 64 * np.arange(6))
    assert whole.gy.attrs["units"] == "pixel" and whole.focus.attrs["units"]
    for chunks in ((200, 150), 128, (448, 100)):
        lazy = lsfov.estimate_psf_map(da.from_array(img, chunks=chunks), "Z3", stride=64)
        for v in MAP_VARIABLES:
            np.testing.assert_allclose(lazy[v].values, whole[v].values, atol=1e-4)
    assert whole.focus_astig_sin.attrs["units"] == "wave RMS^2"


def test_node_reads_the_patch_at_its_stride_position(blurred):
    """Node (i, j) is the network's reading of the patch whose top-left pixel is (i·t, j·t), for a
    stride that is not a divisor of the patch and an image of a ragged size; the map's variables in
    the model's order."""
    img = blurred[0][:400, 3:380].astype(np.float32)
    model = lsfov.load_model("Z3")
    ds = lsfov.estimate_psf_map(img, model, stride=48, fill=False)
    gy, gx = (400 - 128) // 48 + 1, (377 - 128) // 48 + 1
    assert ds.sizes == {"gy": gy, "gx": gx} and "filled" not in ds
    cut = np.stack([img[i * 48:i * 48 + 128, j * 48:j * 48 + 128] for i in range(gy) for j in range(gx)])
    want = model.predict(cut, batch_size=32, reproducible=True)
    for v in MAP_VARIABLES:
        np.testing.assert_array_equal(ds[v].values.ravel(), want[v].astype(np.float32))
    # The patches are cut from a strided view of the image: any memory layout gives the same map.
    flipped = lsfov.estimate_psf_map(np.ascontiguousarray(img[::-1]), model, stride=48, fill=False)
    for layout in (img[::-1], np.asfortranarray(img[::-1])):
        other = lsfov.estimate_psf_map(layout, model, stride=48, fill=False)
        for v in MAP_VARIABLES:
            np.testing.assert_array_equal(other[v].values, flipped[v].values)


def test_symmetrized_map_is_independent_of_chunking(blurred):
    img, _ = blurred
    whole = lsfov.estimate_psf_map(img, "Z3", stride=64, symmetrize=True)
    lazy = lsfov.estimate_psf_map(da.from_array(img, chunks=(200, 150)), "Z3", stride=64, symmetrize=True)
    plain = lsfov.estimate_psf_map(img, "Z3", stride=64)
    assert whole.attrs["symmetrize"] == 1 and plain.attrs["symmetrize"] == 0
    for v in MAP_VARIABLES:  # bit for bit, as without symmetrize (a transposed view once rounded otherwise)
        np.testing.assert_array_equal(lazy[v].values, whole[v].values)
    assert not np.allclose(whole.focus.values, plain.focus.values, atol=1e-3)


def test_symmetrized_reading_of_a_patch_is_independent_of_its_batch(blurred):
    # A patch read in a full pass and in the zero-padded last one (a chunk's few nodes) gets the same
    # bits, under every symmetry: what makes a symmetrized map independent of its chunking.
    img, _ = blurred
    patches = np.stack([img[y : y + 128, x : x + 128] for y in (0, 64, 128) for x in range(0, 176, 16)])  # 36
    model = lsfov.load_model("Z3")
    alone = model.predict(patches[:10], batch_size=32, reproducible=True, symmetrize=True)
    among = model.predict(patches, batch_size=32, reproducible=True, symmetrize=True)
    for name, value in alone.items():
        np.testing.assert_array_equal(value, among[name][:10], err_msg=name)


def test_threaded_scheduler_gives_the_bits_of_the_synchronous_one(blurred):
    # On the CPU every pass runs on lsfov's one-thread pool, whichever thread calls: the threaded
    # scheduler's workers and the synchronous scheduler's main thread give the same bits, and the
    # callers' torch settings are left alone.
    import dask
    import torch

    img = da.from_array(blurred[0], chunks=160)
    n = torch.get_num_threads()
    threaded = lsfov.estimate_psf_map(img, "Z3")
    assert torch.get_num_threads() == n
    with dask.config.set(scheduler="synchronous"):
        sync = lsfov.estimate_psf_map(img, "Z3")
    for name in sync.data_vars:
        np.testing.assert_array_equal(threaded[name].values, sync[name].values)


def test_micrometre_coordinates_and_pixel_size_warning(blurred):
    img, _ = blurred
    px = lsfov.load_model("Z3").optics.pixel_um
    plane = {"source": "movie.ome.tif", "plane": {"t": 1}, "t": 2.5, "t_units": "second"}  # as open_image says
    arr = xr.DataArray(img, dims=("y", "x"), attrs={"pixel_um": px, **plane})
    ds = lsfov.estimate_psf_map(arr, "Z3", stride=96)
    assert ds.gx.attrs["units"] == "micrometer"
    assert {k: ds.attrs.get(k) for k in plane} == plane  # a time point's map says which
    np.testing.assert_allclose(ds.gx.values, (63.5 + 96 * np.arange(ds.sizes["gx"])) * px)
    with pytest.warns(UserWarning, match="trained at"):
        lsfov.estimate_psf_map(img, "Z3", stride=128, pixel_um=2 * px)


def test_invalid_nodes_are_filled_by_inverse_distance():
    rng = np.random.default_rng(0)
    v = np.ones((5, 6), np.float32)
    bad = [(1, 2), (4, 5)]  # an interior node and a corner one
    for b in bad:
        v[b] = 0.1
    focus = rng.uniform(0, 1, (5, 6)).astype(np.float32)  # no symmetry: only the right weights give the value
    axis = np.mod(rng.normal(0, 0.3, (5, 6)), np.pi).astype(np.float32)  # both sides of the wrap at pi
    prod = rng.normal(0, 0.01, (5, 6)).astype(np.float32)  # a product of the network: filled like the focus
    ds = xr.Dataset({"focus": (("gy", "gx"), focus), "axis": (("gy", "gx"), axis), "focus_astig_cos": (("gy", "gx"), prod),
                     "validity": (("gy", "gx"), v)}, attrs={"params": ["focus", "axis"]})
    out = fill_invalid(ds)
    assert out.filled.values.sum() == 2 and all(out.filled.values[b] for b in bad)
    np.testing.assert_array_equal(out.focus.values[v >= 0.5], focus[v >= 0.5])  # valid nodes untouched
    np.testing.assert_array_equal(out.axis.values[v >= 0.5], axis[v >= 0.5])
    # The documented rule by hand: the 8 nearest valid nodes, weights 1/d², the axis averaged as
    # exp(2i axis). (These nodes have no tie between the 8th and 9th distances.)
    good = np.argwhere(v >= 0.5)
    f64, a64 = focus.astype(np.float64), axis.astype(np.float64)
    for b in bad:
        d = np.hypot(*(good - b).T)
        order = np.argsort(d, kind="stable")
        assert d[order[7]] < d[order[8]]
        near = tuple(good[order[:8]].T)
        w = 1 / d[order[:8]] ** 2
        w /= w.sum()
        want_axis = np.mod(np.angle(np.sum(w * np.exp(2j * a64[near]))) / 2, np.pi)
        np.testing.assert_allclose(out.focus.values[b], np.sum(w * f64[near]), rtol=1e-6)
        np.testing.assert_allclose(out.focus_astig_cos.values[b], np.sum(w * prod.astype(np.float64)[near]), rtol=1e-5)
        turn = np.angle(np.exp(2j * (out.axis.values[b] - want_axis))) / 2  # on the circle of period pi
        assert abs(turn) < 1e-6 and 0 <= out.axis.values[b] < np.pi
    assert np.sum(np.exp(2j * a64[v >= 0.5]).real < 0) == 0  # all axes within pi/4 of 0 (mod pi) ...
    assert (a64 > np.pi / 2).any() and (a64 < np.pi / 2).any()  # ... on both sides of the wrap
    ds["validity"][:] = 0
    with pytest.raises(ValueError, match="every node"):
        fill_invalid(ds)


def test_operator_from_psf_map_reproduces_the_node_psfs(blurred):
    img, _ = blurred
    ds = lsfov.estimate_psf_map(img, "Z3", stride=96)
    op = lsfov.operator_from_psf_map(ds)
    assert op.shape == img.shape and op.grid_shape == (ds.sizes["gy"], ds.sizes["gx"])
    m = lsfov.load_model("Z3").psf_model
    for i, j in ((0, 0), (1, 2), (ds.sizes["gy"] - 1, ds.sizes["gx"] - 1)):
        p = np.array([[float(ds[name][i, j]) for name in m.params]])
        np.testing.assert_allclose(op.psf_at(63.5 + 96 * i, 63.5 + 96 * j), m.render(p)[0], atol=1e-6)
    with pytest.raises(ValueError, match="psf_model"):
        lsfov.operator_from_psf_map(ds.drop_attrs())


def test_psf_map_bad_input(blurred, count_calls):
    img, _ = blurred
    from lsfov.estimate import mapping

    bad = img.astype(np.float32)
    bad[-1, -1] = np.nan  # in the last chunk: found before any chunk is regressed, not after all the others
    calls = count_calls(mapping, "_regress")
    for arr in (bad, da.from_array(bad, chunks=160)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            lsfov.estimate_psf_map(arr, "Z3")
    assert calls == []
    with pytest.raises(ValueError, match="smaller than one 128x128 patch"):
        lsfov.estimate_psf_map(img[:100], "Z3")
    with pytest.raises(ValueError, match="patch=128"):
        lsfov.estimate_psf_map(img, "Z3", patch=64)
    with pytest.raises(ValueError, match="stride"):
        lsfov.estimate_psf_map(img, "Z3", stride=0)
    dark = np.zeros((256, 256), np.float32)
    with pytest.raises(ValueError, match="every node of the PSF map is invalid"):
        lsfov.estimate_psf_map(dark, "Z3")


def test_a_model_file_replaced_mid_map_stops_the_run(blurred, tmp_path, monkeypatch):
    """Every chunk is regressed by the weights the run started with: a model file replaced by a
    training run meanwhile is an error, not a map of two models. The same bytes under another
    timestamp (a copy on another node) are the same model; a shipped name is not pinned to a file
    (workers read their own installation's)."""
    import os
    import shutil

    from lsfov.estimate import mapping
    from lsfov.estimate.model import MODELS_DIR

    img, _ = blurred
    path = tmp_path / "mine.pt"
    shutil.copy(MODELS_DIR / "Z3.pt", path)
    shutil.copy(MODELS_DIR / "Z3.json", path.with_suffix(".json"))
    real = mapping._regress
    lazy = da.from_array(img, chunks=(224, 384))
    whole = lsfov.estimate_psf_map(img, str(path))

    def touch():
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    def other_weights():
        path.write_bytes(path.read_bytes() + b"\0")

    for change, error in ((touch, None), (other_weights, "other weights than when the run started")):
        def then_change(*args, **kwargs):
            out = real(*args, **kwargs)
            change()
            return out

        monkeypatch.setattr(mapping, "_regress", then_change)
        with dask.config.set(scheduler="synchronous"):
            if error is None:
                np.testing.assert_array_equal(lsfov.estimate_psf_map(lazy, str(path)).focus.values, whole.focus.values)
            else:
                with pytest.raises(ValueError, match=error):
                    lsfov.estimate_psf_map(lazy, str(path))
    ds = lsfov.estimate_psf_map(lazy, "Z3")  # the shipped one: not pinned
    assert ds.attrs["model"] == "Z3" and ds.sizes == {"gy": 6, "gx": 5}


def test_maps_of_one_grid_share_read_only_coordinates_that_edits_do_not_reach(blurred):
    # A map's node coordinates are made once per grid (lsfov.estimate.mapping._coords).
    img, _ = blurred
    a = lsfov.estimate_psf_map(img, "Z3", stride=128)
    with pytest.raises(ValueError):
        a["gy"].values[0] = 0.0
    a["gy"].attrs["units"] = "edited"
    a = a.assign_coords(gy=a["gy"] * 2)
    b = lsfov.estimate_psf_map(img, "Z3", stride=128)
    np.testing.assert_array_equal(b["gy"].values, 63.5 + 128 * np.arange(3))
    assert b["gy"].attrs == {"units": "pixel", "step": 128.0}
    c = lsfov.estimate_psf_map(img, "Z3", stride=128, pixel_um=0.2)
    np.testing.assert_allclose(c["gx"].values, 0.2 * (63.5 + 128 * np.arange(3)))
    assert c["gx"].attrs == {"units": "micrometer", "step": pytest.approx(25.6)}


def test_pixel_size_read_from_micrometre_coordinates(blurred):
    """An xarray image whose coordinates are in µm (no pixel_um attribute, other dim names) maps in
    µm: the pixel size is the coordinates' spacing, in any length unit."""
    img, _ = blurred
    h, w = img.shape
    for unit, step in (("micrometer", 0.2), ("nm", 200.0)):
        arr = xr.DataArray(img, dims=("row", "col"), coords={
            "row": ("row", step * np.arange(h), {"units": unit}), "col": ("col", step * np.arange(w), {"units": unit})})
        assert lsfov.io.pixel_size(arr) == pytest.approx(0.2)
        assert lsfov.io.with_pixel_size(arr).dims == ("y", "x")
        ds = lsfov.estimate_psf_map(arr, "Z3")
        assert ds.attrs["pixel_um"] == pytest.approx(0.2) and ds.gx.attrs["units"] == "micrometer"
        assert ds.gx.values[0] == pytest.approx(63.5 * 0.2)
    bare = xr.DataArray(img, dims=("y", "x"))
    assert lsfov.io.pixel_size(bare) is None and lsfov.estimate_psf_map(bare, "Z3").gx.attrs["units"] == "pixel"


def test_map_lies_on_the_image_and_its_operator_follows_a_cropped_map(blurred):
    """An image whose coordinates start away from 0 (a crop of a larger field) gets a map on the
    same coordinates; a map thinned or cropped with isel makes its operator at its own nodes."""
    img, _ = blurred
    h, w = img.shape
    arr = xr.DataArray(img, dims=("y", "x"), coords={"y": ("y", 1000 + 0.2 * np.arange(h), {"units": "µm"}),
                                                      "x": ("x", 2000 + 0.2 * np.arange(w), {"units": "µm"})})
    ds = lsfov.estimate_psf_map(arr, "Z3", stride=64)
    np.testing.assert_allclose(ds.gx.values, 2000 + 0.2 * (63.5 + 64 * np.arange(ds.sizes["gx"])))
    np.testing.assert_allclose(ds.gy.values, 1000 + 0.2 * (63.5 + 64 * np.arange(ds.sizes["gy"])))
    assert ds.attrs["origin"] == [1000.0, 2000.0]
    op = lsfov.operator_from_psf_map(ds)
    np.testing.assert_array_equal(op.centers[1], 63.5 + 64 * np.arange(ds.sizes["gx"]))
    sub = ds.isel(gx=slice(2, None), gy=slice(None, None, 2))
    op = lsfov.operator_from_psf_map(sub)
    np.testing.assert_array_equal(op.centers[1], 63.5 + 64 * np.arange(2, ds.sizes["gx"]))
    np.testing.assert_array_equal(op.centers[0], 63.5 + 128 * np.arange(sub.sizes["gy"]))
    m = lsfov.load_model("Z3").psf_model
    p = np.array([[float(sub[name][1, 0]) for name in m.params]])
    np.testing.assert_allclose(op.psf_at(63.5 + 128, 63.5 + 128), m.render(p)[0], atol=1e-6)
    # The same image with pixel coordinates from 0: the same operator, the same depth sampling.
    plain = lsfov.operator_from_psf_map(lsfov.estimate_psf_map(img, "Z3", stride=64))
    np.testing.assert_array_equal(plain.centers[0], lsfov.operator_from_psf_map(ds).centers[0])
    # Nodes in reverse order (isel with a negative step, sortby descending): the same operator
    gx = sub.sizes["gx"]
    for order in (dict(gx=slice(None, None, -1), gy=slice(None, None, -1)), dict(gx=slice(None, None, -1)),
                  dict(gx=[1, 0, *range(2, gx)])):  # (reversed, one axis, shuffled)
        flipped = lsfov.operator_from_psf_map(sub.isel(order))
        for a, b in zip((*op.centers, op.kernels), (*flipped.centers, flipped.kernels)):
            np.testing.assert_array_equal(a, b)
    # Another image's shape is said as such, not as a kernel size the caller never gave
    with pytest.raises(ValueError, match=r"made on an image of shape \(\d+, \d+\), not \(20, 300\)"):
        lsfov.operator_from_psf_map(ds, (20, 300))


def test_a_large_block_is_regressed_in_groups_with_the_same_bits(blurred, monkeypatch):
    from lsfov.estimate import mapping

    img = blurred[0]
    whole = lsfov.estimate_psf_map(img, "Z3", stride=64, batch_size=8, fill=False)
    monkeypatch.setattr(mapping, "_GROUP", 12)  # 30 nodes in groups of 8: four groups, the last short
    grouped = lsfov.estimate_psf_map(img, "Z3", stride=64, batch_size=8, fill=False)
    for v in MAP_VARIABLES:
        np.testing.assert_array_equal(grouped[v].values, whole[v].values)


def test_map_follows_a_known_blur_across_the_field():
    """Paper 000 Sec. II-F: the map reads the blur where it is. Defocus rising from 0.1 to 0.4 waves
    across a sharp test-split image (never seen in training) is read node by node with the shipped Z1
    model: mean error 0.019 waves (the range is 0.5), at most 0.057."""
    m = lsfov.psf.MODELS["Z1"]
    truth = np.array([0.1, 0.25, 0.4])
    shape = (384, 640)
    op = lsfov.ProductConvolution.from_grid(m.render(truth[:, None], size=31)[None], shape)
    y = simulate.degrade(simulate.sample_image("immunohistochemistry", shape), op, photons=2000, read_noise=2, seed=0)
    ds = lsfov.estimate_psf_map(y, "Z1", stride=64)
    want = np.interp(ds.gx.values, op.centers[1], truth)  # the operator's local focus at each node
    err = np.abs(ds.focus.values - want)
    assert err.mean() < 0.04 and err.max() < 0.12
    assert np.all(np.diff(np.median(ds.focus.values, axis=0)[::2]) > 0)  # rising left to right


def test_saturated_patches_are_invalid_and_filled(blurred):
    """Paper 000's white-pixel ratio: a node whose patch has more than 5 % of its pixels at the
    camera's limit (an integer type's maximum by default) is invalid, whatever the CNN says, and is
    filled from its neighbours; the other nodes are untouched; chunked == whole."""
    img, _ = blurred
    x = np.minimum(img / np.percentile(img, 96) * 65535, 65535).astype(np.uint16)  # the brightest 4 % clip
    white = (x == 65535).astype(np.float64)
    (gy, gx), t = (6, 5), 64
    frac = np.array([[white[i * t:i * t + 128, j * t:j * t + 128].mean() for j in range(gx)] for i in range(gy)])
    hit = frac > 0.05
    assert 0 < hit.sum() < hit.size  # the test's premise: some nodes saturated, not all
    with pytest.warns(lsfov.LsfovWarning, match=f"{hit.sum()} of {hit.size} PSF-map nodes are marked invalid, each with more than 5 %"):
        ds = lsfov.estimate_psf_map(x, "Z3", stride=t)
    off = lsfov.estimate_psf_map(x, "Z3", stride=t, max_saturated=1)  # the rule off
    assert ds.attrs["saturation"] == 65535 and off.attrs["saturation"] is None
    np.testing.assert_array_equal(ds.validity.values[hit], 0)
    np.testing.assert_array_equal(ds.validity.values[~hit], off.validity.values[~hit])
    assert ds.filled.values[hit].all()
    for v in ("focus", "astigmatism", "axis"):
        np.testing.assert_array_equal(ds[v].values[~hit & ~ds.filled.values], off[v].values[~hit & ~ds.filled.values])
    with pytest.warns(lsfov.LsfovWarning, match="saturated"):
        lazy = lsfov.estimate_psf_map(da.from_array(x, chunks=(150, 200)), "Z3", stride=t)
    xr.testing.assert_allclose(lazy, ds, atol=1e-4)
    # An image that says how many bits its camera fills (an OME-TIFF's SignificantBits, read by open_image)
    twelve = xr.DataArray(x // 16, dims=("y", "x"), attrs={"significant_bits": 12})
    with pytest.warns(lsfov.LsfovWarning, match="at or above 4095"):
        assert lsfov.estimate_psf_map(twelve, "Z3", stride=t).attrs["saturation"] == 4095
    # A float image has no limit of its own: none unless given, in its units.
    assert lsfov.estimate_psf_map(x.astype(np.float32), "Z3", stride=t).attrs["saturation"] is None
    with pytest.warns(lsfov.LsfovWarning, match="at or above 65535"):
        given = lsfov.estimate_psf_map(x.astype(np.float32), "Z3", stride=t, saturation=65535)
    np.testing.assert_array_equal(given.validity.values, ds.validity.values)
    # Every node clipped: no PSF to invent.
    with pytest.raises(ValueError, match="every PSF-map node has more than 5 % of the pixels of its patch saturated"):
        lsfov.estimate_psf_map(x, "Z3", stride=t, saturation=1)
    half = np.zeros((256, 512), np.uint16)
    half[:, 256:] = 65535  # dark on the left, clipped on the right: nothing to read, said as such
    with pytest.raises(ValueError, match=r"every PSF-map node is invalid: \d+ of 21 with more than 5 %.* the others "
                                         "without texture"):
        lsfov.estimate_psf_map(half, "Z3", stride=64)
    with pytest.raises(ValueError, match="max_saturated"):
        lsfov.estimate_psf_map(x, "Z3", max_saturated=1.5)
    with pytest.raises(ValueError, match="saturation"):
        lsfov.estimate_psf_map(x, "Z3", saturation=-1)


def test_a_crop_with_saturated_nodes_keeps_its_place(blurred):
    """A crop of an OME-TIFF-like image (µm coordinates from an origin, a 12-bit camera) with clipped
    nodes: the map records the crop's origin and its nodes lie on the crop (the warning's wording
    once overwrote the origin, and the operator then lay at the image's corner)."""
    img, _ = blurred
    x = np.minimum(img / np.percentile(img, 96) * 4095, 4095).astype(np.uint16)
    um = {"units": "micrometer"}
    full = xr.DataArray(x, dims=("y", "x"), attrs={"significant_bits": 12, "pixel_um": 0.2},
                        coords={"y": ("y", 0.2 * np.arange(x.shape[0]), um), "x": ("x", 0.2 * np.arange(x.shape[1]), um)})
    crop = full.isel(y=slice(64, None), x=slice(128, None))
    with pytest.warns(lsfov.LsfovWarning, match=r"at or above 4095, the image's 12 significant bits"):
        ds = lsfov.estimate_psf_map(crop, "Z3", stride=64)
    assert ds.attrs["origin"] == pytest.approx([64 * 0.2, 128 * 0.2])
    np.testing.assert_allclose(lsfov.estimate.mapping.map_node_pixels(ds)[1][0], 63.5)  # crop pixels, not the image's


def test_cnn_tasks_keep_the_heap_under_distributeds_allocator_settings(blurred, monkeypatch):
    """distributed's MALLOC_TRIM_THRESHOLD_ alone pins glibc's mmap threshold: every activation a
    fresh mmap, the CNN 2.3x slower on a worker. A PSF map's CNN work runs with larger thresholds,
    the worker's own again after it (and the heap trimmed), also when it fails, once however many
    tasks run at a time; where the thresholds are glibc's adaptive ones nothing is touched."""
    import platform

    from lsfov import _backend

    if platform.libc_ver()[0] == "glibc":
        assert _backend._libc() is not None  # the real one: mallopt and malloc_trim found
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setitem(_backend._HEAP, "libc", Libc())
    img, _ = blurred
    lazy = da.from_array(img, chunks=(224, 192))  # 4 chunks, on 2+ threads at once
    monkeypatch.setitem(_backend._HEAP, "trim", None)  # glibc's own thresholds: nothing to undo
    ref = lsfov.estimate_psf_map(lazy, "Z3", stride=64)
    assert calls == []
    monkeypatch.setitem(_backend._HEAP, "trim", 65536)  # as a Dask worker starts
    with dask.config.set(scheduler="threads", num_workers=2):
        kept = lsfov.estimate_psf_map(lazy, "Z3", stride=64)
    xr.testing.assert_identical(kept, ref)
    relax, restore = [(-3, 32 << 20), (-1, 256 << 20)], [(-1, 65536), (-3, 128 << 10), ("trim", 0)]
    assert calls and len(calls) % 5 == 0, calls
    for i in range(0, len(calls), 5):  # relax ... restore, never relaxed twice over
        assert calls[i:i + 2] == relax and calls[i + 2:i + 5] == restore, calls
    calls.clear()
    with pytest.raises(RuntimeError):
        with _backend.heap_kept():
            raise RuntimeError("a failing task")
    assert calls == relax + restore and _backend._HEAP["users"] == 0


def test_the_pinned_trim_threshold_is_read_as_glibc_was_started(monkeypatch):
    """Only a trim threshold alone pins glibc's mmap threshold; one glibc would parse otherwise
    than Python, or beyond mallopt's int, is left alone; and the process's own start counts, not
    os.environ (a LocalCluster's nanny writes distributed's setting there, in the parent)."""
    from lsfov import _backend

    t = _backend._trim_from
    assert t({"MALLOC_TRIM_THRESHOLD_": "65536"}) == 65536 and t({"MALLOC_TRIM_THRESHOLD_": "0x10000"}) == 65536
    for env in ({}, {"MALLOC_TRIM_THRESHOLD_": "64k"}, {"MALLOC_TRIM_THRESHOLD_": ""},
                {"MALLOC_TRIM_THRESHOLD_": str(2**32)},
                {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "33554432"},
                {"MALLOC_TRIM_THRESHOLD_": "65536", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432"}):
        assert t(env) is None, env
    monkeypatch.delitem(_backend._HEAP, "trim", raising=False)
    before = _backend._pinned_trim()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delitem(_backend._HEAP, "trim")
    assert _backend._pinned_trim() == before != 12345


def test_a_device_that_is_none_is_refused_for_a_loaded_model_too():
    # a loaded model once ignored device= whatever it was
    img = (simulate.sample_image("coins", (256, 256)) * 500 + 20).astype(np.float32)
    for model in ("G1", lsfov.load_model("G1")):
        with pytest.raises(ValueError, match="device 'gpu9' is not a torch device"):
            lsfov.estimate_psf_map(img, model, device="gpu9")
    assert lsfov.estimate_psf_map(img, lsfov.load_model("G1"), device="cpu:0").sizes  # the model's own device
    import torch

    from lsfov.estimate.model import PSFRegressor

    elsewhere = PSFRegressor("G1", "compact", device="cpu")
    elsewhere.device = torch.device("meta")  # as a model loaded on a GPU is, seen from device="cpu"
    with pytest.raises(ValueError, match="device 'cpu': the model given is loaded on meta"):
        lsfov.estimate_psf_map(img, elsewhere, device="cpu")


def test_a_loaded_model_is_one_key_of_the_map_graph(monkeypatch):
    """A model object passed in was once inside every task (249 MiB sent for a map of Z3)."""
    import cloudpickle
    import dask.array as da

    import lsfov.cluster

    graphs, real = [], lsfov.cluster.compute
    def compute(x, **k):  # (the map's graph; the first pass computes a list: its check, its digests)
        if hasattr(x, "__dask_graph__"):
            graphs.append(dict(x.__dask_graph__()))
        return real(x, **k)

    monkeypatch.setattr(lsfov.cluster, "compute", compute)
    img = da.from_array((simulate.sample_image("coins", (384, 384)) * 500 + 20).astype(np.float32), chunks=128)
    lsfov.estimate_psf_map(img, lsfov.load_model("G1"))
    sizes = [len(cloudpickle.dumps(task)) for task in graphs[-1].values()]  # the last: the map's
    assert sum(s > 1_000_000 for s in sizes) == 1, sorted(sizes)[-3:]  # the model: 6.6 MB


def test_a_map_of_one_plane_of_a_larger_array_keeps_its_coordinate(blurred, tmp_path):
    """``stack.sel(c=561)`` keeps ``c`` as xarray does (a deconvolution of it does too): the map of
    it says which channel it maps, saved and read back."""
    img = np.asarray(blurred[0])
    stack = xr.DataArray(np.stack([img, img]), dims=("c", "y", "x"), coords={"c": [488, 561]})
    m = lsfov.estimate_psf_map(stack.sel(c=561), "G1", stride=64, pixel_um=0.1)
    assert int(m.c) == 561 and int(m["sigma"].c) == 561
    lsfov.save(m, tmp_path / "m.zarr")
    assert int(lsfov.open_result(tmp_path / "m.zarr")["sigma"].c) == 561


def test_each_plane_of_a_loop_keeps_its_own_coordinate(blurred):
    """Maps of one grid share their node coordinates (made once, cached): a plane's label must not
    stick to that shared grid, where the next plane's map, or a plain array's, would take it."""
    img = np.asarray(blurred[0])
    stack = xr.DataArray(np.stack([img, img[::-1]]), dims=("c", "y", "x"), coords={"c": [488, 561]})
    maps = [lsfov.estimate_psf_map(stack.sel(c=c), "G1", stride=64, pixel_um=0.1) for c in (561, 488)]
    assert [int(m.c) for m in maps] == [561, 488]
    assert "c" not in lsfov.estimate_psf_map(img, "G1", stride=64, pixel_um=0.1).coords


def test_a_maps_kernels_rendered_into_a_store_are_those_in_memory(blurred, tmp_path, monkeypatch):
    """``operator_from_psf_map(store=)`` renders a few rows of nodes at a time into a zarr array
    that the operator then reads: the kernels in memory, bit for bit, with one warning for the
    grid's cut PSFs (its count, not a slab's); the same map finds them again, untouched (a resumed
    run's fingerprint holds), another map replaces them."""
    from lsfov import operators

    img, _ = blurred
    ds = lsfov.estimate_psf_map(img, "Z3", stride=64)  # 6 x 5 nodes
    monkeypatch.setattr(lsfov.psf, "_BATCH", 4)  # rendered 4 PSFs at a time ...
    monkeypatch.setattr(operators, "_SLAB_BYTES", 8 * 15 * 15 * 4)  # ... into parts of 8, across rows of 5
    with pytest.warns(lsfov.LsfovWarning) as said:
        mem = lsfov.operator_from_psf_map(ds, size=15)  # (a small kernel cuts some of them)
    with pytest.warns(lsfov.LsfovWarning) as slabs:
        disk = lsfov.operator_from_psf_map(ds, size=15, store=tmp_path / "k")
    assert [str(w.message) for w in slabs] == [str(w.message) for w in said]
    assert operators.on_disk(disk.kernels) and disk.centers[0].tolist() == mem.centers[0].tolist()
    np.testing.assert_array_equal(disk.kernels[...], mem.kernels)
    assert disk.attrs == mem.attrs
    made = disk.fingerprint  # (its store's files: whatever is there when asked)
    again = lsfov.operator_from_psf_map(ds, size=15, store=tmp_path / "k")
    assert again.fingerprint == made  # its files untouched
    other = ds.copy(deep=True)
    other["focus"][:] = 0.1
    changed = lsfov.operator_from_psf_map(other, size=15, store=tmp_path / "k")
    assert changed.fingerprint != made
    np.testing.assert_array_equal(changed.kernels[...], lsfov.operator_from_psf_map(other, size=15).kernels)
    with pytest.raises(TypeError, match="store must be a path"):
        lsfov.operator_from_psf_map(ds, store=42)
    # Only kernels lsfov rendered are replaced (an interrupted render's too); nothing else is lost.
    import zarr

    zarr.open_array(str(tmp_path / "k"), mode="r+").attrs["lsfov_kernels"] = "incomplete"
    np.testing.assert_array_equal(lsfov.operator_from_psf_map(ds, size=15, store=tmp_path / "k").kernels[...],
                                  mem.kernels)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cells.tif").write_bytes(b"II*\0")
    (tmp_path / "file").write_bytes(b"x")
    other_zarr = zarr.create_array(str(tmp_path / "image.zarr"), shape=(4,), dtype="f4")
    for taken in ("data", "file", "image.zarr"):
        with pytest.raises(FileExistsError, match=f"store {tmp_path / taken} exists and holds no kernels lsfov "
                                                  "rendered; give a new path"):
            lsfov.operator_from_psf_map(ds, size=15, store=tmp_path / taken)
    assert (tmp_path / "data" / "cells.tif").read_bytes() == b"II*\0" and (tmp_path / "file").read_bytes() == b"x"
    assert other_zarr.shape == (4,) and zarr.open_array(str(tmp_path / "image.zarr")).shape == (4,)
    (tmp_path / "empty").mkdir()
    assert lsfov.operator_from_psf_map(ds, size=15, store=tmp_path / "empty").grid_shape == (6, 5)
