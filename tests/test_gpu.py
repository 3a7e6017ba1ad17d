"""CuPy path of the operator: same results as NumPy. Skipped where no GPU and CuPy are present."""
import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

try:
    _HAS_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # pragma: no cover - no driver
    _HAS_GPU = False


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("form", ["grid", "basis"])
def test_cupy_matches_numpy(form):
    from lsfov import ProductConvolution, psf

    rng = np.random.default_rng(0)
    if form == "grid":
        m = psf.MODELS["Z3"]
        op = ProductConvolution.from_grid(_skewed(m.render(m.sample(12, 0), size=15).reshape(3, 4, 15, 15)),
                                          (150, 170))
    else:
        op = ProductConvolution.from_basis(rng.standard_normal((3, 9, 9)), rng.random((3, 150, 170)))
    u = rng.random(op.shape).astype(np.float32)
    out = op.apply(cupy.asarray(u))
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(out.get(), op.apply(u), atol=1e-5 * np.abs(op.apply(u)).max())
    np.testing.assert_allclose(op.adjoint(cupy.asarray(u)).get(), op.adjoint(u), atol=1e-5 * np.abs(op.adjoint(u)).max())


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_a_grid_on_disk_on_cupy_matches_numpy(tmp_path):
    """A grid whose kernels are on disk (a slide's PSF map, as scratch runs keep one) reads each
    window's nodes to the GPU: the NumPy result, whole and by a window."""
    import zarr

    from lsfov import ProductConvolution, operators, psf

    rng = np.random.default_rng(0)
    m = psf.MODELS["Z3"]
    k = _skewed(m.render(m.sample(12, 0), size=15).reshape(3, 4, 15, 15))
    operators.copy_kernels(k, tmp_path / "k")
    op = ProductConvolution.from_grid(zarr.open_array(str(tmp_path / "k"), mode="r"), (150, 170))
    u = rng.random(op.shape).astype(np.float32)
    for o, x in ((op, u), (op.restrict((40, -7), (60, 90)), u[:60, :90])):
        for f in ("apply", "adjoint"):
            ref = getattr(o, f)(x)
            np.testing.assert_allclose(getattr(o, f)(cupy.asarray(x)).get(), ref, atol=1e-5 * np.abs(ref).max())


def _skewed(kernels):
    """Z3's PSFs are point-symmetric: skewed (each summing to one still), a kernel flipped in a GPU
    path (a correlation for a convolution) shows."""
    k = kernels.shape[-1]
    ramp = 1 + 0.8 * np.linspace(0, 1, k)[:, None] + 0.4 * np.linspace(0, 1, k)[None, :]
    out = kernels * ramp
    return (out / out.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def _scene():
    from lsfov import ProductConvolution
    from lsfov import simulate as sim

    sharp = sim.sample_image("cell", (200, 230))
    op, _ = sim.psf_field(sharp.shape, "Z3", (3, 3), seed=1, size=15)
    op = ProductConvolution.from_grid(_skewed(op.kernels), sharp.shape, centers=op.centers)
    return op, np.maximum(sim.degrade(sharp, op, photons=300, seed=0), 0)


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_deconvolution_on_cupy_whole_and_chunked_matches_numpy(tmp_path):
    import dask.array as da

    import lsfov

    op, y = _scene()
    ref = lsfov.deconvolve(y, op, 6)
    tol = dict(rtol=0, atol=2e-5 * ref.max())
    whole = lsfov.deconvolve(cupy.asarray(y), op, 6)
    assert isinstance(whole, cupy.ndarray)
    np.testing.assert_allclose(whole.get(), ref, **tol)
    chunks = da.from_array(y, chunks=(70, 90)).map_blocks(cupy.asarray)
    lazy = lsfov.deconvolve(chunks, op, 6)
    assert isinstance(lazy._meta, cupy.ndarray)
    np.testing.assert_allclose(lazy.compute().get(), ref, **tol)
    scratch = lsfov.deconvolve(chunks, op, 6, scratch=tmp_path).compute()
    np.testing.assert_allclose(np.asarray(scratch), ref, **tol)  # read back from the (host) store
    level = float(np.quantile(y, 0.98))  # clipped pixels censored, on the GPU as on the CPU
    clipped = np.minimum(y, level)
    ref = lsfov.deconvolve(clipped, op, 6, saturation=level)
    np.testing.assert_allclose(lsfov.deconvolve(cupy.asarray(clipped), op, 6, saturation=level).get(), ref, **tol)
    lazy = da.from_array(clipped, chunks=(70, 90)).map_blocks(cupy.asarray)
    np.testing.assert_allclose(lsfov.deconvolve(lazy, op, 6, saturation=level).compute().get(), ref, **tol)


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
@pytest.mark.filterwarnings("ignore::lsfov._validate.LsfovWarning")
def test_cnn_takes_cupy_patches_through_dlpack_and_maps_cupy_chunks():
    import dask.array as da

    import lsfov
    from lsfov import simulate as sim

    model = lsfov.load_model("G1", device="cuda")
    img = sim.sample_image("cell", (384, 384)).astype(np.float32)
    patches = np.stack([img[:128, :128], img[100:228, 50:178]])
    host = model.predict(patches)
    dev = model.predict(cupy.asarray(patches))
    for k in host:
        np.testing.assert_allclose(dev[k], host[k], rtol=1e-4, atol=1e-5)
    white = float(np.percentile(img, 96))  # the saturation rule's integral image, on the GPU too
    ref = lsfov.estimate_psf_map(da.from_array(img, chunks=192), model, saturation=white)
    gpu = lsfov.estimate_psf_map(da.from_array(img, chunks=192).map_blocks(cupy.asarray), model, saturation=white)
    whole = lsfov.estimate_psf_map(cupy.asarray(img), model, saturation=white)
    for k in ref.data_vars:
        np.testing.assert_allclose(gpu[k].values, ref[k].values, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(whole[k].values, ref[k].values, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_cnn_fixed_size_passes_replay_a_cuda_graph_with_the_eager_results():
    from concurrent.futures import ThreadPoolExecutor

    import lsfov
    from lsfov import simulate as sim

    model = lsfov.load_model("Z3", device="cuda")
    img = sim.sample_image("cell", (512, 512)).astype(np.float32)
    patches = cupy.asarray(img.reshape(4, 128, 4, 128).transpose(0, 2, 1, 3).reshape(16, 128, 128))
    try:
        model.cuda_graphs = False
        eager = model.predict(patches, batch_size=8, reproducible=True)
        model.cuda_graphs = True
        graphed = model.predict(patches, batch_size=8, reproducible=True)
        assert [k for k, g in model._graphs.items() if g is not None and k[0] == (8, 128, 128)]
        with ThreadPoolExecutor(4) as ex:  # Dask threads share the model, and with it the graph's buffers
            runs = list(ex.map(lambda _: model.predict(patches, batch_size=8, reproducible=True), range(8)))
    finally:
        model.cuda_graphs = True
    for res in [graphed] + runs:
        for k in eager:
            np.testing.assert_allclose(res[k], eager[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_cli_gpu_flag_matches_the_cpu_run(tmp_path, monkeypatch):
    """`lsfov run --gpu` (CuPy chunks: the map through DLPack, the deconvolution on the GPU) writes
    what the CPU run writes, to float32 rounding and the CNN's TF32."""
    from click.testing import CliRunner

    import lsfov
    from lsfov import simulate as sim
    from lsfov.cli import main

    monkeypatch.chdir(tmp_path)
    op, _ = sim.psf_field((400, 400), "Z3", (2, 2), seed=1)
    np.save("img.npy", sim.degrade(sim.sample_image("immunohistochemistry", (400, 400)), op, seed=0).astype(np.float32))
    from lsfov.estimate import mapping
    from lsfov.restore import chunked

    seen = []  # the array library of every chunk the map and the deconvolution work on

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(block, *args, **kwargs):
            seen.append(type(block).__module__.split(".")[0])
            return real(block, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(mapping, "_regress")
    spy(chunked, "_block")
    runner = CliRunner()
    for flag, out, library in (("--no-gpu", "cpu.zarr", "numpy"), ("--gpu", "gpu.zarr", "cupy")):
        seen.clear()
        res = runner.invoke(main, ["-q", "run", "img.npy", out, "--chunks", "256", "--iterations", "5", flag])
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert seen and set(seen) == {library}, (flag, seen)  # a silent fall-back to the CPU fails here
    cpu, gpu = lsfov.open_result("cpu.zarr"), lsfov.open_result("gpu.zarr")
    for p in ("focus", "astigmatism", "validity"):
        np.testing.assert_allclose(gpu[p].values, cpu[p].values, atol=5e-3)
    d = np.asarray(gpu["deblurred"].values, np.float64) - np.asarray(cpu["deblurred"].values, np.float64)
    assert np.abs(d).max() < 1e-2 * float(cpu["deblurred"].max())  # the maps differ by TF32 rounding only


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_cuda_scheduler_deconvolves_on_its_gpu_workers(tmp_path, monkeypatch):
    """`--scheduler cuda` (dask-cuda, one worker per GPU; --gpu by default) writes what the threaded
    CPU run writes."""
    pytest.importorskip("dask_cuda")
    from click.testing import CliRunner

    import lsfov
    from lsfov import simulate as sim
    from lsfov.cli import main

    monkeypatch.chdir(tmp_path)
    op, _ = sim.psf_field((300, 300), "Z3", (2, 2), seed=2, size=15)
    np.save("img.npy", sim.degrade(sim.sample_image("coins", (300, 300)), op, seed=0).astype(np.float32))
    op.save("op.zarr")
    from lsfov import cli

    seen, real = [], cli._on_gpu  # the library of the chunks the graph is built on (here, in the client)

    def spy(img, gpu, scheduler):
        out = real(img, gpu, scheduler)
        seen.append((scheduler, type(out.data._meta).__module__.split(".")[0]))
        return out

    monkeypatch.setattr(cli, "_on_gpu", spy)
    runner = CliRunner()
    for sched, out in (("threads", "cpu.zarr"), ("cuda", "gpu.zarr")):
        res = runner.invoke(main, ["-q", "deconvolve", "img.npy", out, "--operator", "op.zarr", "--chunks", "160",
                                   "--iterations", "6", "--scheduler", sched])
        assert res.exit_code == 0, res.output + repr(res.exception)
    assert seen == [("threads", "numpy"), ("cuda", "cupy")]  # equal bytes alone would pass a CPU run
    cpu, gpu = (np.asarray(lsfov.open_result(p)["deblurred"].values) for p in ("cpu.zarr", "gpu.zarr"))
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=2e-5 * cpu.max())


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_synthesis_on_cuda_has_the_numpy_paths_distribution(device_synthesis_matches_numpy):
    """synthesize(device='cuda'), the blur and Eq. 10 noise of training sets on the GPU: the same
    parameters, crops and light as the NumPy path, noise of Eq. 10 around its noise-free patches,
    seeded."""
    import torch

    from lsfov.estimate import synth

    device_synthesis_matches_numpy(256, "cuda")
    a = synth.synthesize(300, "Z3", seed=6, device="cuda")
    b = synth.synthesize(300, "Z3", seed=6, device=torch.device("cuda", 0))
    np.testing.assert_array_equal(a["patches"], b["patches"])
    assert a["patches"].dtype == np.float32 and np.isfinite(a["patches"]).all()


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
def test_patch_stream_on_cuda_draws_like_the_cpu_and_trains():
    """lsfov.estimate.stream on the GPU: its PSFs are the model's, its batches have the CPU stream's
    statistics, and a few training steps run there."""
    import torch

    from lsfov import psf
    from lsfov.estimate import stream

    m = psf.get_model("Z3")
    p = m.sample(64, 0)
    np.testing.assert_allclose(stream.render_psfs(m, torch.from_numpy(p).cuda()).cpu().numpy(), m.render(p), atol=1e-6)
    gpu = stream.PatchStream("Z3", device="cuda", seed=3, n_procedural=12, workers=2)
    x, p, v = gpu(2048)
    assert x.is_cuda and torch.isfinite(x).all() and p.is_cuda and v.dtype == torch.bool
    cx, _, cv = stream.PatchStream("Z3", seed=3, n_procedural=12)(2048)
    assert abs(v.float().mean().item() - cv.float().mean().item()) < 0.04
    assert x.mean().item() == pytest.approx(cx.mean().item(), rel=0.1)
    reg = stream.train_stream(gpu, init="Z3", freeze=True, patches=8 * 256, batch_size=256, n_val=512, eval_every=4,
                              progress=False)
    assert reg.device.type == "cuda" and len(reg.meta["training"]["history"]) == 3


@pytest.mark.skipif(not _HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("form", ["grid", "basis"])
def test_tv_rl_iterations_replay_a_cuda_graph_with_the_eager_bits(form, monkeypatch, caplog):
    """Whole-array TV-RL on the GPU: after the first iteration the others replay one captured CUDA
    graph (said at debug level; a failed capture is a warning), with the bits of eager launches."""
    import logging

    import lsfov
    from lsfov import ProductConvolution, _backend

    rng = np.random.default_rng(3)
    if form == "grid":
        op, y = _scene()
    else:  # signed kernels: the clamp inside the iteration
        op = ProductConvolution.from_basis(rng.standard_normal((3, 9, 9)) + 1, rng.random((3, 150, 170)))
        y = rng.poisson(50, op.shape).astype(np.float32) + 1
    yg = cupy.asarray(y)
    with caplog.at_level(logging.DEBUG, logger="lsfov"):
        graphed = lsfov.deconvolve(yg, op, 7)
    assert "replay one CUDA graph" in caplog.text and "CUDA graph not used" not in caplog.text
    monkeypatch.setattr(_backend, "CUDA_GRAPHS", False)
    eager = lsfov.deconvolve(yg, op, 7)
    np.testing.assert_array_equal(graphed.get(), eager.get())
    np.testing.assert_allclose(graphed.get(), lsfov.deconvolve(y, op, 7), rtol=0, atol=2e-5 * float(eager.max()))
