"""Bad input found by a review of every public function: each refused with a message that says
what to do, before it turns into NaN, a crop or a traceback from a library."""
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import psf, simulate
from lsfov.operators import ProductConvolution as PC


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    u = rng.random((64, 64)).astype(np.float32) + 0.1
    op = PC.from_grid(psf.gaussian(1.5, size=9)[None, None], (64, 64))
    return u, op


def test_operator_refuses_nan_and_complex_images_and_psfs_without_light(small):
    u, op = small
    bad = u.copy()
    bad[5, 5] = np.nan  # through the FFTs it would fill its whole tile
    for apply in (op.apply, op.adjoint):
        with pytest.raises(ValueError, match="NaN or Inf"):
            apply(bad)
        with pytest.raises(TypeError, match="real numeric"):
            apply(u * (1 + 1j))
    k = psf.gaussian(1.5, size=9)[None, None]
    for kernels, what in ((np.zeros_like(k), "sums to 0"), (-k, "sums to -1")):
        with pytest.raises(ValueError, match=what):
            PC.from_grid(kernels, (64, 64))
    with pytest.raises(TypeError, match="real numeric"):
        PC.from_grid(k * (1 + 1j), (64, 64))
    # Lazy coefficient maps are read when the operator is applied: checked there.
    lazy = PC.from_basis(k[0], da.full((1, 64, 64), np.nan, chunks=32, dtype=np.float32))
    with pytest.raises(ValueError, match="coefficient maps contain NaN"):
        lsfov.deconvolve(u, lazy, 2)


def test_restorations_refuse_what_float32_cannot_hold(small):
    u, op = small
    with pytest.raises(ValueError, match=r"eps must be in \[1e-4, 100\]"):
        lsfov.deconvolve(u, op, 2, eps=1e-25)
    for scale in (1e-30, 1e20):  # the TV term squares gradients and eps·x in float32: NaN or silently off
        with pytest.raises(ValueError, match="rescale the image"):
            lsfov.deconvolve(u * scale, op, 2)
        with pytest.raises(ValueError, match="rescale the image"):
            lsfov.deconvolve(da.from_array(u * scale, chunks=32), op, 2)
    for scale in (1e-6, 1e9):  # dim or bright, the same result
        np.testing.assert_allclose(lsfov.deconvolve(u * scale, op, 3) / scale, lsfov.deconvolve(u, op, 3), rtol=2e-4)


def test_sparse_smooth_checks_dask_input_as_numpy_input(small):
    v = np.ones((1100, 16), np.float32)
    v[5, 5] = np.nan  # outside the central 1024 rows it reads for the noise level
    op = PC.from_grid(psf.gaussian(0.8, size=5)[None, None], v.shape)
    for img in (v, da.from_array(v, chunks=(550, 16))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            lsfov.sparse_smooth_deblur(img, op, iterations=2)
    with pytest.raises(TypeError, match="real numeric"):
        lsfov.sparse_smooth_deblur(da.from_array(v.astype(np.complex64), chunks=550), op, iterations=2)
    u, op = small
    plane = xr.DataArray(u[None], dims=("z", "y", "x"))  # a (1, H, W) plane, as NumPy input allows
    sparse, smooth = lsfov.sparse_smooth_deblur(plane, op, iterations=3)
    assert sparse.dims == ("y", "x")
    np.testing.assert_array_equal(sparse.values, lsfov.sparse_smooth_deblur(u, op, iterations=3)[0])


def test_psf_rendering_warns_when_the_kernel_cuts_the_psf_and_refuses_absurd_sizes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the models' ranges nothing is cut
        for name in ("G1", "G2", "Z1", "Z3"):
            m = psf.get_model(name)
            m.render(np.vstack([m.sample(200, 0), m.bounds[1]]))
    with pytest.warns(lsfov.LsfovWarning, match="sigma_y=40.*31-pixel kernel"):
        psf.get_model("G2").render([40, 1])
    with pytest.raises(ValueError, match="needs a kernel over 1025 pixels"):
        psf.gaussian(1e4)
    for j in (4.7, 2.5, "4", True):
        with pytest.raises(ValueError, match="Noll indices are integers"):
            psf.noll_to_nm(j)
    with pytest.raises(ValueError, match="Noll indices are integers"):
        psf.zernike({4.7: 0.1}, psf.DEFAULT_OPTICS)


def test_simulation_parameters(small):
    u, op = small
    for kw, what in ((dict(read_noise=np.nan), "read_noise"), (dict(photons=np.inf), "photons"),
                     (dict(photons=0), "photons"), (dict(beta=1.5), "beta"), (dict(photons="many"), "photons")):
        with pytest.raises((ValueError, TypeError), match=what):
            simulate.degrade(u, op, **kw)
    with pytest.raises(TypeError, match="ProductConvolution"):
        simulate.degrade(u, None)
    for kw in (dict(photons=-100), dict(background=-1), dict(photons=np.nan), dict(psf_size="15")):
        with pytest.raises((ValueError, TypeError), match=f"{next(iter(kw))} must be"):
            simulate.bead_field((128, 128), seed=0, **kw)
    for grid in (0, -2, 2.5):
        with pytest.raises(ValueError, match="grid"):
            simulate.psf_field((64, 64), "G1", grid)
    with pytest.raises(ValueError, match="focus_per_um"):
        simulate.tilted_surface((256, 256), focus_per_um=np.nan)


@pytest.fixture(scope="module")
def strip_map():
    """A PSF map of a 150 x 512 strip: one row of nodes."""
    img = simulate.sample_image("cell", (150, 512)) * 500 + 20
    return img, lsfov.estimate_psf_map(img, "Z3")


def test_psf_map_options_and_its_operator(strip_map):
    img, ds = strip_map
    for kw, err, what in ((dict(pixel_um=np.nan), ValueError, "pixel_um"), (dict(pixel_um=-0.1), ValueError, "pixel_um"),
                          (dict(batch_size=0), ValueError, "batch_size"), (dict(resume=True), ValueError, "scratch")):
        with pytest.raises(err, match=what):
            lsfov.estimate_psf_map(img, "Z3", **kw)
    with pytest.raises(TypeError, match="real numeric"):
        lsfov.estimate_psf_map(img.astype(np.complex64), "Z3")
    np.testing.assert_array_equal(lsfov.estimate_psf_map(img.tolist(), "Z3").focus.values, ds.focus.values)
    with pytest.raises(ValueError, match=r"made on an image of shape \(150, 512\), not \(64, 64\)"):
        lsfov.operator_from_psf_map(ds, (64, 64))
    with pytest.raises(ValueError, match="lacks the variables"):
        lsfov.operator_from_psf_map(ds.drop_vars("axis"))
    with pytest.raises(TypeError, match="xarray.Dataset"):
        lsfov.operator_from_psf_map(ds.focus.values)
    for size in (0, 32, 1001):  # (0 once meant the model's size; 1001 was rendered at every node before refused)
        with pytest.raises(ValueError, match="size must be"):
            lsfov.operator_from_psf_map(ds, size=size)
    assert lsfov.operator_from_psf_map(ds, size=15).kernel_size == 15
    with pytest.raises(ValueError, match="min_validity must be"):
        lsfov.calibrate_depth(ds, np.zeros(img.shape), min_validity=2)
    with pytest.raises(TypeError, match="calibrate_depth"):
        lsfov.estimate_depth(ds, 3.0)
    # smooth=inf: one weighted least-squares plane over the whole grid (here one row: a line)
    z = ds.focus.values * (2 * ds.axis.values / np.pi - 1)
    np.testing.assert_allclose(lsfov.estimate_depth(ds, smooth=np.inf).values,
                               _plane_fit(z, ds.validity.values), rtol=1e-5, atol=1e-6 * np.abs(z).max())
    # A 2-D grid whose weights matter: validity as weights, nodes below 0.5 and filled nodes left out.
    rng = np.random.default_rng(0)
    grid = {k: rng.uniform(lo, hi, (5, 6)) for k, lo, hi in (("focus", 0, 1), ("axis", 0, np.pi), ("validity", 0, 1))}
    filled = np.zeros((5, 6), bool)
    filled[2, 3] = filled[0, 5] = True
    m = xr.Dataset({k: (("gy", "gx"), v.astype(np.float32)) for k, v in grid.items()})
    m["filled"] = (("gy", "gx"), filled)
    w = np.where((m.validity.values >= 0.5) & ~filled, m.validity.values, 0.0)
    assert 0 < (w == 0).sum() < 20
    z = m.focus.values * (2 * m.axis.values / np.pi - 1)
    np.testing.assert_allclose(lsfov.estimate_depth(m, smooth=np.inf).values, _plane_fit(z, w),
                               rtol=1e-5, atol=1e-6 * np.abs(z).max())


def _plane_fit(z, w):
    """The plane (a line along a grid's single row) a + b·i + c·j that minimises Σ w (z − plane)²,
    at every node (i, j in node indices)."""
    z, w = np.asarray(z, np.float64), np.asarray(w, np.float64)
    i, j = np.indices(z.shape)
    cols = [np.ones(z.size)] + [a.ravel().astype(np.float64) for a, n in ((i, z.shape[0]), (j, z.shape[1])) if n > 1]
    design = np.stack(cols, 1)
    sw = np.sqrt(w.ravel())
    coef, *_ = np.linalg.lstsq(design * sw[:, None], z.ravel() * sw, rcond=None)
    return (design @ coef).reshape(z.shape)


def test_a_one_row_psf_map_keeps_its_node_spacing_on_disk(strip_map, tmp_path):
    import zarr

    _, ds = strip_map
    assert ds.sizes["gy"] == 1
    lsfov.save(ds, tmp_path / "m.zarr")
    ms = zarr.open_group(str(tmp_path / "m.zarr" / "focus")).attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [64.0, 64.0]  # not 1 px tall


def test_io_stores_and_options(small, tmp_path):
    import tifffile

    u, op = small
    op.save(tmp_path / "op.zarr")
    for fn in (lsfov.open_result, lsfov.open_image):
        with pytest.raises(ValueError, match="is an operator"):
            fn(tmp_path / "op.zarr")
    lsfov.save(xr.Dataset({"image": xr.DataArray(u, dims=("y", "x")), "other": xr.DataArray(u, dims=("y", "x"))}),
               tmp_path / "r.zarr")
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "r.zarr").values, u)  # a result's `image`
    for chunks in (0, -5, "a", (1, 2, 3), 2.5):
        with pytest.raises(ValueError, match="chunks must be"):
            lsfov.open_image(tmp_path / "r.zarr", chunks=chunks)
    with pytest.raises(ValueError, match="chunks must be"):
        lsfov.save(u, tmp_path / "c.zarr", chunks=-5)
    for bad in (u.astype(np.complex64), np.array([["a"] * 4] * 4)):
        with pytest.raises(TypeError, match="real numbers"):
            lsfov.save(bad, tmp_path / "bad.zarr")
    # A (z, y, x) variable stays a z-stack on disk, not channels.
    stack = np.stack([u, 2 * u, 3 * u])
    lsfov.save(xr.Dataset({"zs": xr.DataArray(stack, dims=("z", "y", "x"))}), tmp_path / "z.zarr")
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "z.zarr" / "zs", z=1).values, 2 * u)
    # A plain multi-page TIFF is a z-stack too (tifffile's axis Q, or I without its own metadata).
    tifffile.imwrite(tmp_path / "pages.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "bare.tif", stack, photometric="minisblack", metadata=None)
    for name in ("pages.tif", "bare.tif"):
        np.testing.assert_array_equal(lsfov.open_image(tmp_path / name, z=2).values, 3 * u)
        assert len(lsfov.io.open_planes(tmp_path / name)) == 3
    assert lsfov.open_image(tmp_path / "r.zarr", chunks=32.0).data.chunksize == (32, 32)
    # An operator whose metadata was damaged: said so, not read as no operator.
    with pytest.raises(TypeError, match="attrs must be a dict"):
        lsfov.ProductConvolution.from_grid(op.kernels, op.shape, attrs=[1])
    (tmp_path / "op.zarr" / "zarr.json").write_text('{"zarr_format": 3,')
    with pytest.raises(ValueError, match=r"op.zarr/zarr.json is damaged \(not JSON"):
        lsfov.ProductConvolution.load(tmp_path / "op.zarr")


def test_calibration_options():
    from lsfov.calibrate import calibrate_operator, node_grid, psf_basis

    for step in (0, -5, 2.5):
        with pytest.raises(ValueError, match="step must be a positive integer"):
            node_grid((64, 64), step)
    with pytest.raises(ValueError, match="no bead patches"):
        psf_basis(np.zeros((0, 9, 9)), None)
    with pytest.raises(ValueError, match="NaN or Inf"):
        psf_basis(np.full((3, 9, 9), np.nan), None)
    img = simulate.bead_field((128, 128), seed=0).image
    for kw, err, what in ((dict(smoothing=np.inf), ValueError, "smoothing must be a finite number"),
                          (dict(smoothing="a"), TypeError, "smoothing must be a number"),
                          (dict(saturation="a"), TypeError, "saturation must be a number")):
        with pytest.raises(err, match=what):
            calibrate_operator(img, **kw)


def test_cnn_device_is_checked():
    import torch

    with pytest.raises(ValueError, match="not a torch device"):
        lsfov.estimate.model.torch_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            lsfov.estimate.model.torch_device("cuda")


def test_psf_map_bits_do_not_depend_on_torch_threads():
    """On the CPU, matrix products split their sums by torch's thread count (each calling thread's
    own, with OpenMP): fixed passes run on lsfov's one-thread pool, so callers on threads set to 1
    or 2 torch threads, one batch or several, at the same time, get the same bits."""
    import threading

    import torch

    model = lsfov.load_model("Z3", device="cpu")
    img = simulate.sample_image("coins", (320, 320)) * 500 + 20
    patches = np.stack([img[y : y + 128, x : x + 128] for y in range(0, 192, 48) for x in range(0, 192, 24)])  # 32
    reference = model.predict(patches, batch_size=16, reproducible=True)
    n = torch.get_num_threads()
    results, barrier = {}, threading.Barrier(2)

    def call(threads, batch):
        torch.set_num_threads(threads)  # this thread's own setting
        model.predict(patches, batch_size=batch, reproducible=True)  # warm
        barrier.wait()
        results[threads, batch] = model.predict(patches, batch_size=batch, reproducible=True)

    for batch in (16, 32):  # 32: one pass, which must not run on the caller's thread either
        workers = [threading.Thread(target=call, args=(t, batch)) for t in (1, 2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert torch.get_num_threads() == n
    for (threads, batch), res in results.items():
        for name in reference:
            if batch == 16:
                np.testing.assert_array_equal(res[name], reference[name], err_msg=f"{threads} threads")
            else:  # another batch size may take other kernels: only thread-independent among themselves
                np.testing.assert_array_equal(res[name], results[3 - threads, 32][name], err_msg=f"{threads} threads")
    try:
        torch.set_num_threads(1)
        one = lsfov.estimate_psf_map(img, "Z3", batch_size=8)
        torch.set_num_threads(2)
        two = lsfov.estimate_psf_map(img, "Z3", batch_size=8)
    finally:
        torch.set_num_threads(n)
    for name in one.data_vars:
        np.testing.assert_array_equal(one[name].values, two[name].values)


def test_cnn_training_and_evaluation_options(tmp_path):
    """Bad settings are refused before any training; an earlier run's checkpoints and a model's
    JSON are never replaced silently; NaN or overflowing patches are refused, not turned into NaN."""
    import torch

    from lsfov.estimate import evaluate, robustness, synthesize, train

    data = synthesize(96, "G1", sources=("tex",), seed=0)
    kw = dict(epochs=1, batch_size=16, val_fraction=0.25, lr=1e-3, progress=False)
    for bad, err, what in ((dict(lr=np.nan), ValueError, "lr must be"), (dict(lr=1e4), ValueError, "lr must be"),
                           (dict(gamma=np.inf), ValueError, "gamma must be"),
                           (dict(patience=0), ValueError, "patience must be"),
                           (dict(probe_steps=2.5), ValueError, "probe_steps must be"),
                           (dict(seed=-1), ValueError, "seed must be"), (dict(max_minutes="1"), TypeError, "max_minutes must be"),
                           (dict(lr=None, lr_candidates=()), ValueError, "lr_candidates is empty")):
        with pytest.raises(err, match=what):
            train(data, **{**kw, **bad})
    broken = {**data, "params": data["params"][:40]}
    with pytest.raises(ValueError, match="training set holds"):
        train(broken, **kw)
    nan = {**data, "params": np.where(np.arange(len(data["params"]))[:, None] == 3, np.nan, data["params"])}
    with pytest.raises(ValueError, match="NaN"):
        train(nan, **kw)
    patches = data["patches"].copy()
    patches[5, 0, 0] = np.nan
    with pytest.raises(ValueError, match="contains NaN or Inf patches"):  # in memory: before any work
        train({**data, "patches": patches}, **kw)
    for bad in (dict(photons=(500, np.inf)), dict(photons=1000), dict(read_noise=(3, 1)), dict(illumination=5),
                dict(seed=1.5), dict(invalid_fraction="0.1")):
        with pytest.raises((ValueError, TypeError), match=f"{next(iter(bad))} must be"):
            synthesize(8, "G1", **bad)
    assert synthesize(4, "G1", sources="tex", seed=0)["patches"].shape == (4, 128, 128)  # one source by name
    model = train(data, checkpoint=tmp_path / "ck", **kw)
    with pytest.raises(FileExistsError, match="earlier run's checkpoints"):
        train(data, checkpoint=tmp_path / "ck", **kw)
    train(data, checkpoint=tmp_path / "ck", overwrite=True, **kw)
    (tmp_path / "m.json").write_text("my notes")
    with pytest.raises(FileExistsError, match="m.json"):
        model.save(tmp_path / "m.pt")
    assert (tmp_path / "m.json").read_text() == "my notes"
    # evaluate and robustness take a shipped name too; test sets of other ranges are flagged
    assert evaluate("G1", data)["n"] == 96
    wide = {**data, "attrs": {**data["attrs"], "ranges": {"sigma": [3.0, 8.0]}}}
    with pytest.warns(lsfov.LsfovWarning, match=r"\(sigma \[3.0, 8.0\] \(against \[0.5, 4.0\]\)\): R² measures "
                                                 "extrapolation"):
        evaluate("G1", wide)
    other_optics = {**data, "attrs": {**data["attrs"], "optics": {**lsfov.load_model("Z3").psf_model.to_meta()["optics"],
                                                                  "na": 1.4}}}
    with pytest.warns(lsfov.LsfovWarning, match=r"na 1.4 \(against None\)"):  # G1 has no optics: said as such
        evaluate("G1", other_optics)
    for bad in (dict(strengths=(np.nan,)), dict(strengths=(-0.1,)), dict(n=1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            robustness("G1", **bad)
    from lsfov.estimate import training

    real = training.synthesize

    def textureless(*a, **kw):  # all but one of the patches flat: no spread to score
        out = real(*a, **kw)
        out["valid"][1:] = False
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "synthesize", textureless)
        with pytest.raises(ValueError, match=r"only 1 of the 3 patches synthesized are valid \(textured\); R² needs "
                                             "at least 2: give a larger n"):
            robustness("G1", n=3)
    g1 = lsfov.load_model("G1")
    patches = data["patches"][:4]
    for b in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            g1.predict(patches, batch_size=b)
    # Any intensity scale reads alike: from a variance float32 cannot hold down to where an absolute
    # floor would have made every patch look valid
    ref = g1.predict(patches.astype(np.float32))
    for scale in (1e33, 1e-10, 1e-30):
        got = g1.predict(patches.astype(np.float32) * np.float32(scale))
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=1e-3, err_msg=f"{k} at {scale}")
    with pytest.raises(ValueError, match="beyond float32's range"):
        g1.predict(patches.astype(np.float64) * 1e40)
    with pytest.raises(TypeError, match="real numbers"):
        g1.predict(torch.from_numpy(patches.astype(np.complex64)))


def test_file_names_indices_and_types_where_arrays_are_meant(tmp_path, strip_map):
    """A second review: a file name, a float index or a list where an array, an integer or a dict is
    meant gave a library's message (or, for z=1.5, silently plane 1)."""
    np.save(tmp_path / "stack.npy", np.ones((3, 32, 32), np.float32))
    for bad in (1.5, "1", True):
        with pytest.raises(TypeError, match="z must be an integer index"):
            lsfov.open_image(tmp_path / "stack.npy", z=bad)
    assert lsfov.open_image(tmp_path / "stack.npy", z=np.int64(2)).attrs["plane"] == {"z": 2}
    with pytest.raises(TypeError, match="level must be an integer"):
        lsfov.open_image(tmp_path / "stack.npy", z=0, level="0")
    with pytest.raises(TypeError, match="path must be a file or directory name"):
        lsfov.open_image(5)
    with pytest.raises(TypeError, match="not file names; open them with lsfov.open_image"):
        lsfov.learn_subspace([tmp_path / "stack.npy"] * 2, n_psf=3, n_space=1)
    with pytest.raises(TypeError, match="calibrate_operator takes images, got the file name"):
        lsfov.calibrate_operator(str(tmp_path / "stack.npy"))
    with pytest.raises(TypeError, match=r"coeffs must be a dict \{Noll index"):
        psf.zernike([0.2], psf.DEFAULT_OPTICS, size=15)
    with pytest.raises(TypeError, match="model must be a shipped model's name"):
        lsfov.load_model(5)
    with pytest.raises(TypeError, match="known_depth_um takes depths in µm"):
        lsfov.calibrate_depth(strip_map[1], "depth.npy")


def test_opened_images_are_saved_as_image_and_files_go_where_asked(tmp_path):
    """xarray names a DataArray after its Dask key: saved, an opened image became a variable named
    ``array-3f2a…``. A calibration saved to a new folder makes it, and to a folder is refused."""
    np.save(tmp_path / "a.npy", np.ones((16, 16), np.float32))
    img = lsfov.open_image(tmp_path / "a.npy")
    assert img.name is None and lsfov.io.open_planes(tmp_path / "a.npy")[0].name is None
    lsfov.save(img, tmp_path / "r.zarr")
    assert list(lsfov.open_result(tmp_path / "r.zarr").data_vars) == ["image"]
    cal = lsfov.DepthCalibration(axis0=0.0, slope=1.0, offset=0.0, r2=1.0, mae_um=0.0, n_nodes=4)
    assert cal.save(tmp_path / "new" / "sub" / "cal.json").is_file()
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="dir is a directory; give the name of a file"):
        cal.save(tmp_path / "dir", overwrite=True)
    assert (tmp_path / "dir").is_dir() and not list(tmp_path.glob(".dir*"))


def _registered_client():
    import distributed

    try:
        return distributed.default_client()
    except ValueError:
        return None


def test_use_scheduler_refuses_bad_options_and_leaves_no_client_after_a_failed_connection(monkeypatch):
    """n_workers=0 made a LocalCluster that waited forever for its first task; a malformed address
    gave distributed's "missing port number" and left a broken default Client that took every later
    compute of the process."""
    import dask

    from lsfov import cluster

    for n in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="n_workers must be a positive integer"):
            with cluster.use_scheduler("local", n_workers=n):
                pass
    with pytest.raises(TypeError, match="spec must be a scheduler name"):
        with cluster.use_scheduler(4):
            pass
    for spec in ("local:0", "local:x", "local:"):  # (local:2 was taken for a host named local, after 10 s)
        with pytest.raises(ValueError, match=f"--scheduler {spec}: give a positive number of workers, e.g. local:2"):
            with cluster.use_scheduler(spec):
                pass
    assert _registered_client() is None and dask.config.get("scheduler", None) is None
    monkeypatch.setattr(cluster, "_CONNECT_TIMEOUT", "0.5s")
    for spec, what in (("tcp://", r"give it as tcp://HOST:PORT"), ("tcp://host:port", "tcp://HOST:PORT"),
                       ("tls://:8786", "tls://HOST:PORT"), ("tcp://127.0.0.1:1", "cannot reach"),
                       ("inproc://", "names no scheduler")):  # inproc: distributed's own ValueError, after it registered
        with pytest.raises(ValueError, match=what) as err:
            with cluster.use_scheduler(spec):
                pass
        assert "\n" not in str(err.value)
        assert _registered_client() is None and dask.config.get("scheduler", None) is None, spec
    assert da.ones(4, chunks=2).sum().compute() == 4  # Dask still works


def test_parse_scheduler_says_what_would_run_without_starting_it(tmp_path, monkeypatch):
    from lsfov import cluster

    (tmp_path / "s.json").write_text('{"address": "tcp://10.0.0.5:8786"}')
    monkeypatch.setattr(cluster.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")  # as on a login node
    import dask

    size = {f"jobqueue.{k}.{v}": n for k in ("slurm", "pbs") for v, n in (("cores", 4), ("memory", "8GB"))}
    with dask.config.set(size):  # (a site's job size, which a batch cluster needs)
        assert cluster.parse_scheduler("slurm:8") == ("slurm", 8)
        assert cluster.parse_scheduler("pbs", n_workers=2) == ("pbs", 2)
    for spec, kw, expected in ((None, {}, ("threads", None)), (" sync ", {}, ("synchronous", None)),
                               ("local", {}, ("local", None)), ("local", {"n_workers": 3}, ("local", 3)),
                               ("local:4", {"n_workers": 3}, ("local", 4)),
                               ("node12:8786", {}, ("address", "tcp://node12:8786")),
                               (str(tmp_path / "s.json"), {}, ("address", "tcp://10.0.0.5:8786"))):
        assert cluster.parse_scheduler(spec, **kw) == expected, spec
    for spec, what in (("slurm:0", "give the number of jobs as slurm:N"), ("tcp://node12", "is malformed"),
                       ("carrier-pigeon", "unknown scheduler"), ("inproc://", "'inproc://' names no scheduler"),
                       ("threads:2", "threads:2 takes no count: threads uses every core .*; for N worker processes use local:N")):
        with pytest.raises(ValueError, match=what):
            cluster.parse_scheduler(spec)
    monkeypatch.setattr(cluster.shutil, "which", lambda cmd: None)
    with pytest.raises(ValueError, match="sbatch is not on PATH"):
        cluster.parse_scheduler("slurm:2")


def test_a_scheduler_is_named_as_hpc_users_name_it(tmp_path):
    """A scheduler file (``dask scheduler --scheduler-file``) or a bare HOST:PORT: its TCP address."""
    from lsfov.cluster import _address

    (tmp_path / "s.json").write_text('{"type": "Scheduler", "address": "tcp://10.0.0.5:8786", "id": "x"}')
    assert _address(str(tmp_path / "s.json")) == "tcp://10.0.0.5:8786"
    assert _address("node12.cluster:8786") == "tcp://node12.cluster:8786" and _address("local") == "local"
    with pytest.raises(FileNotFoundError, match="no such scheduler file; start the scheduler first"):
        _address(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a Dask scheduler file"):
        _address(str(tmp_path / "bad.json"))


def test_cluster_names_only_its_public_api():
    from lsfov import cluster

    assert set(cluster.__all__) == {"use_scheduler", "parse_scheduler", "compute", "jobqueue_cluster",
                                 "worker_budgets", "shared", "SCHEDULERS"}
    assert all(hasattr(cluster, name) for name in cluster.__all__)
    names = {}
    exec("from lsfov.cluster import *", names)
    assert not {"np", "dask", "shutil", "signal", "log"} & set(names)


def test_tv_curvature_checks_its_input_and_computes_dask_blocks_as_the_whole():
    from lsfov.restore import tv_curvature

    rng = np.random.default_rng(0)
    x = (rng.random((37, 50)) * 10).astype(np.float32)
    e = (rng.random((37, 50)) + 0.1).astype(np.float32)
    for eps in (0.3, e):
        whole = tv_curvature(x, eps)
        assert np.abs(whole).max() > 0.1
        for chunks in ((10, 7), (1, 50), (37, 1), (20, 30)):  # a Dask array gave all zeros
            lazy = tv_curvature(da.from_array(x, chunks=chunks), eps)
            assert lazy.dtype == np.float32
            np.testing.assert_array_equal(lazy.compute(), whole, err_msg=str(chunks))
    np.testing.assert_array_equal(tv_curvature(da.from_array(x, chunks=9), da.from_array(e, chunks=11)).compute(),
                                  tv_curvature(x, e))
    for dtype in (np.float64, np.float16, np.int32, bool):  # float32 as documented (ints gave UFuncTypeError)
        assert tv_curvature(x.astype(dtype), 1.0).dtype == np.float32
    np.testing.assert_array_equal(tv_curvature(x.astype(np.float64), 0.3), tv_curvature(x, 0.3))
    for bad_x, eps, err, what in ((x[None], 1, ValueError, "non-empty 2-D"), (x[:0], 1, ValueError, "non-empty 2-D"),
                                  (x.astype(complex), 1, TypeError, "real numbers"), (None, 1, TypeError, "real numbers"),
                                  (x, np.nan, ValueError, "eps must be a finite number > 0"),
                                  (x, -1, ValueError, "eps must be a finite number > 0"), (x, "1", TypeError, "eps"),
                                  (x, e[:3], ValueError, "image's shape"), (x, -e, ValueError, "finite and > 0")):
        with pytest.raises(err, match=what):
            tv_curvature(bad_x, eps)


def test_locate_sources_and_estimate_noise_check_their_input(small):
    from lsfov.restore import estimate_noise, locate_sources

    u, op = small
    assert locate_sources(u, op, 0.1).shape[1] == 3
    nan = u.copy()
    nan[10, 10] = np.nan
    for sparse, err, what in ((u[:32, :48], ValueError, r"shape \(32, 48\) but the operator is for images of shape "
                                                         r"\(64, 64\)"),
                              (nan, ValueError, "NaN or Inf"), (da.from_array(nan, chunks=16), ValueError, "NaN or Inf"),
                              (u[0], ValueError, "2-D"), (None, TypeError, "2-D array"), (np.zeros((0, 0)), ValueError,
                               "non-empty"), (da.zeros((0, 0)), ValueError, "non-empty"),
                              (u.astype(complex), TypeError, "real numbers")):
        with pytest.raises(err, match=what):
            locate_sources(sparse, op, 0.1)
    for kw, err, what in ((dict(noise=0.1, k=np.nan), ValueError, "k must be"), (dict(noise="1"), TypeError, "noise must"),
                          (dict(noise=np.nan), ValueError, "noise must"), (dict(noise=0.1, k=-1), ValueError, "k must")):
        with pytest.raises(err, match=what):
            locate_sources(u, op, **kw)
    with pytest.raises(TypeError, match="operator must be the lsfov.ProductConvolution"):
        locate_sources(u, None, 0.1)
    for img, err, what in ((nan, ValueError, "NaN or Inf"), (u[0], ValueError, "non-empty 2-D array"), (np.zeros((0, 5)), ValueError,
                           "non-empty 2-D array"), (None, TypeError, "real numbers"), (u.astype(complex), TypeError, "real numbers")):
        with pytest.raises(err, match=what):
            estimate_noise(img)


def test_sparse_smooth_options_are_checked_as_deconvolve_checks_them(small):
    u, op = small
    for img in (u, da.from_array(u, chunks=32)):
        for kw, err, what in ((dict(warn_dense="x"), TypeError, "warn_dense must be a number"),
                              (dict(warn_dense=-1), ValueError, "warn_dense must be a finite number >= 0 and <= 1"),
                              (dict(exchange_every=0), ValueError, "exchange_every must be a positive integer"),
                              (dict(exchange_every=2.5), ValueError, "exchange_every must be a positive integer")):
            with pytest.raises(err, match=what):
                lsfov.sparse_smooth_deblur(img, op, iterations=2, **kw)
            if "exchange_every" in kw:
                with pytest.raises(err, match=what):
                    lsfov.deconvolve(img, op, 2, **kw)


def test_a_dataset_where_an_image_is_meant_names_its_variables():
    """A result opened whole (open_result) passed where one of its images is meant: one line that
    names them, not xarray's or NumPy's error from inside."""
    y = np.random.default_rng(0).uniform(1, 2, (64, 64)).astype(np.float32)
    op = PC.from_psf(psf.MODELS["G1"].render(np.array([[1.5]]))[0], y.shape)
    ds = xr.Dataset({"deblurred": (("y", "x"), y), "blurred": (("y", "x"), y)})
    for run in (lambda: lsfov.deconvolve(ds, op), lambda: op.apply(ds), lambda: op.adjoint(ds),
                lambda: lsfov.estimate_psf_map(ds), lambda: lsfov.sparse_smooth_deblur(ds, op)):
        with pytest.raises(TypeError, match=r"is an xarray.Dataset of 2 variable\(s\) \(deblurred, blurred\); pass one "
                                            r"of them, e.g. ds\['deblurred'\]"):
            run()


def test_a_blurred_integer_image_is_no_longer_a_camera_count():
    """The camera's significant bits (of an integer image's xarray) do not follow its blurred float copy."""
    img = xr.DataArray(np.full((32, 32), 100, np.uint16), dims=("y", "x"), attrs={"significant_bits": 12, "k": 1})
    op = PC.from_psf(psf.MODELS["G1"].render(np.array([[1.5]]))[0], img.shape)
    for out in (op.apply(img), op.adjoint(img)):
        assert out.dtype == np.float32 and out.attrs == {"k": 1}


def test_a_plane_with_axes_of_length_one_is_read_as_that_plane_whatever_the_array():
    """A (1, H, W) plane (a channel picked with a slice, a one-plane file): NumPy, Dask and xarray
    alike (Dask and xarray were refused, or not, by function); xarray keeps the axis as a scalar
    coordinate. Several planes are refused with what to do."""
    y = (simulate.sample_image("cell", (128, 128))[None] * 100 + 1).astype(np.float32)
    op = PC.from_psf(psf.MODELS["G1"].render(np.array([[1.5]]))[0], (128, 128))
    ref = lsfov.deconvolve(y[0], op, 2)
    for im in (y, da.from_array(y, chunks=(1, 64, 64)), xr.DataArray(y, dims=("c", "y", "x"), coords={"c": [3]})):
        out = lsfov.deconvolve(im, op, 2)
        assert out.shape == (128, 128) and type(out) is type(im)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)
        assert lsfov.sparse_smooth_deblur(im, op, iterations=2, warn_dense=1)[0].shape == (128, 128)
        assert dict(lsfov.estimate_psf_map(im, "G1").sizes) == {"gy": 1, "gx": 1}
    assert int(lsfov.deconvolve(xr.DataArray(y, dims=("c", "y", "x"), coords={"c": [3]}), op, 2).c) == 3
    for stack in (np.ones((2, 128, 128), np.float32), da.ones((2, 128, 128), dtype=np.float32)):
        with pytest.raises(ValueError, match="2-D .*(pick|select) a plane"):
            lsfov.deconvolve(stack, op)


def test_masked_arrays_are_refused_not_read_unmasked(small, tmp_path):
    """A masked hot pixel was deblurred (and saved) as data: lsfov reads no masks, so it says so."""
    u, op = small
    hot = u.copy()
    hot[30, 30] = 1e6
    masked = np.ma.masked_greater(hot, 100)
    lazy = da.ma.masked_greater(da.from_array(hot, chunks=32), 100)
    for run in (lambda a: lsfov.deconvolve(a, op, 2), op.apply, op.adjoint,
                lambda a: lsfov.sparse_smooth_deblur(a, op, iterations=2), lambda a: lsfov.save(a, tmp_path / "m.zarr")):
        with pytest.raises(ValueError, match=r"masked array \(1 pixel masked\), and lsfov reads no masks; fill them"):
            run(masked)
    for run in (lambda a: lsfov.deconvolve(a, op, 2), op.apply):
        with pytest.raises(ValueError, match="a Dask array of masked chunks"):
            run(lazy)
    assert not (tmp_path / "m.zarr").exists()
    # nothing masked: the data as they are
    np.testing.assert_array_equal(op.apply(np.ma.masked_greater(u, 100)), op.apply(u))
    maps = np.ma.masked_greater(np.stack([np.ones((64, 64)), hot]), 100)  # nor a map's
    with pytest.raises(ValueError, match="coefficient maps is a masked array"):
        PC.from_basis(psf.gaussian(np.array([1.0, 2.0]), size=9), maps)
    k = psf.gaussian(1.5, size=9)  # nor a PSF's hidden values
    with pytest.raises(ValueError, match=r"psf is a masked array \(20 pixels masked\)"):
        PC.from_psf(np.ma.masked_less(k, 1e-3), (64, 64))
    with pytest.raises(ValueError, match="the PSF: its pixel_um attribute is -1"):  # (not taken as non-square pixels)
        PC.from_psf(xr.DataArray(k, dims=("y", "x"), attrs={"pixel_um": -1}), (64, 64))


def test_values_beyond_float32_and_bad_names_and_pixel_sizes_are_said(small, tmp_path):
    u, op = small
    huge = u.astype(np.float64) * 1e300
    for run in (lambda a: lsfov.deconvolve(a, op, 2), op.apply, lambda a: lsfov.sparse_smooth_deblur(a, op, iterations=2),
                lambda a: lsfov.deconvolve(da.from_array(a, chunks=32), op, 2),
                lambda a: lsfov.sparse_smooth_deblur(da.from_array(a, chunks=32), op, iterations=2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no "overflow encountered in cast" beside it)
            with pytest.raises(ValueError, match="values beyond float32's range"):  # (not "contains NaN or Inf")
                run(huge)
    nan = u.copy()
    nan[3, 3] = np.nan
    with pytest.raises(ValueError, match="contains NaN or Inf pixels; replace them first"):
        lsfov.deconvolve(nan, op, 2)
    with pytest.raises(ValueError, match="variable name 3 must be a string"):  # (written, then unreadable)
        lsfov.save(xr.DataArray(u, dims=("y", "x"), name=3), tmp_path / "r.zarr")
    for bad in (-1, 0, "abc", np.nan):  # (-1 was written as the pixel size)
        with pytest.raises(ValueError, match="its pixel_um attribute is .*not a pixel size in µm"):
            lsfov.save(xr.DataArray(u, dims=("y", "x"), attrs={"pixel_um": bad}), tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_an_operator_copies_its_parts_once_and_only_where_another_could_write_them(tmp_path):
    import tracemalloc

    k = psf.gaussian(np.array([1.0, 2.0]), size=9)
    maps = np.random.default_rng(0).random((2, 512, 512))  # float64: converted, which copies once
    tracemalloc.start()
    op = PC.from_basis(k, maps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.4 * maps.nbytes / 2  # one float32 copy (and a mask of it), not two
    assert not op.maps.flags.writeable
    # a read-only view over memory someone else can write (a bytearray) is copied; a read-only memory map is not
    raw = bytearray(np.ones((2, 64, 64), np.float32).tobytes())
    view = np.frombuffer(raw, np.float32).reshape(2, 64, 64)
    view.flags.writeable = False
    assert not np.shares_memory(PC.from_basis(k, view).maps, view)
    np.save(tmp_path / "m.npy", np.ones((2, 64, 64), np.float32))
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    assert np.shares_memory(PC.from_basis(k, mapped).maps, mapped)
    # the sampled local PSFs (a read of lazy maps) are read once per operator
    assert op.local_psfs() is op.local_psfs() and not op.local_psfs().flags.writeable


def test_a_training_set_is_written_through_a_link_to_a_new_place(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "store" / "set.zarr")  # its target not made yet
    from lsfov.estimate import synthesize

    synthesize(8, "G1", sources=("poi",), out=tmp_path / "link.zarr")
    assert (tmp_path / "store" / "set.zarr").is_dir() and (tmp_path / "link.zarr").is_symlink()



def test_documented_bounds_and_defaults_hold_at_their_edges():
    """Edges a mutation review found unpinned: each would change what a user gets without a test failing."""
    from lsfov import ProductConvolution, psf
    from lsfov.restore import tv_curvature

    with pytest.raises(ValueError, match="strictly increasing"):  # equal node centres gave an all-NaN image
        ProductConvolution.from_grid(np.ones((2, 1, 5, 5), np.float32) / 25, (40, 40), centers=([10, 10], [3]))
    x = (np.random.default_rng(0).random((30, 40)) * 10).astype(np.float32)
    one = ProductConvolution.from_grid(np.ones((1, 1, 3, 3), np.float32) / 9, x.shape)
    with pytest.raises(ValueError, match=r"tv must be in \[0, 0.25\)"):  # 0.25: the denominator reaches 0
        lsfov.deconvolve(x, one, 2, tv=0.25)
    # A scalar eps is the same as an array of it (eps², not eps, under the root)
    np.testing.assert_array_equal(tv_curvature(x, 0.3), tv_curvature(x, np.full_like(x, 0.3)))
    assert not np.array_equal(tv_curvature(x, 0.3), tv_curvature(x, 0.3 ** 0.5))
    assert psf.gaussian(np.array([2.0])).shape == (1, 17, 17)  # the default kernel reaches 4 sigma


def test_flags_and_wrong_types_are_said_in_one_short_line(tmp_path):
    """An audit of the messages: a string is no consent to overwrite (save(overwrite="no") replaced a
    result); an array or object argument is named by its shape or type, not dumped over lines; None, a
    file name or a word where an array, a path or a number is meant gets lsfov's message, not Python's."""
    lsfov.save(np.ones((4, 4)), tmp_path / "r.zarr")
    for bad in ("no", np.ones(3)):
        with pytest.raises(ValueError, match=r"^overwrite must be True or False, got ('no'|an array of shape \(3,\))$"):
            lsfov.save(np.zeros((4, 4)), tmp_path / "r.zarr", overwrite=bad)
    assert lsfov.open_result(tmp_path / "r.zarr").image.values.max() == 1  # kept
    H = lsfov.ProductConvolution.from_psf(np.ones((3, 3)) / 9, (32, 32))
    with pytest.raises(ValueError, match="^resume must be True or False, got 'no'$"):
        lsfov.deconvolve(np.ones((32, 32)), H, 2, resume="no")
    with pytest.raises(ValueError, match=r"^iterations must be a positive integer, got an array of shape \(3, 3\)$"):
        lsfov.deconvolve(np.ones((32, 32)), H, np.ones((3, 3)))
    for call, err, msg in [
        (lambda: H.restrict(None, 5), ValueError, "origin must be a pair"),
        (lambda: lsfov.ProductConvolution.load(None), TypeError, "path must be a file or directory name"),
        (lambda: lsfov.ProductConvolution.from_psf(None, (8, 8)), TypeError, "psf must be an array of numbers, got None"),
        (lambda: lsfov.ProductConvolution.from_psf("p.tif", (8, 8)), TypeError, "read the file first"),
        (lambda: lsfov.psf.gaussian("abc"), TypeError, "sigma_y and sigma_x must be numbers"),
        (lambda: lsfov.deconvolve(np.ones((32, 32)), H, 2, tv="0.01"), TypeError, "^tv must be a number, got '0.01'$"),
        (lambda: lsfov.simulate.bead_field(True), ValueError, "shape must be an int or a pair"),
        (lambda: lsfov.ProductConvolution.from_psf(np.ones((3, 3)), np.array(8)), ValueError, r"a 0-d array \(8\)"),
        (lambda: lsfov.ProductConvolution.from_psf(np.ones((3, 3)), object()), ValueError, "got an object$"),
    ]:
        with pytest.raises(err, match=msg) as e:
            call()
        assert "\n" not in str(e.value) and " at 0x" not in str(e.value), str(e.value)
