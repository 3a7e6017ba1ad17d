"""Training patches made on a torch device (lsfov.estimate.stream): each step equal to synthesize's."""
import numpy as np
import pytest
import torch

import lsfov
from lsfov import psf, simulate
from lsfov.estimate import stream, synth


@pytest.mark.parametrize("name", ["Z3", "Z1", "G2"])
def test_psfs_rendered_on_the_device_equal_the_models(name):
    m = psf.get_model(name)
    p = m.sample(40, 1)
    out = stream.render_psfs(m, torch.from_numpy(p))
    assert out.dtype == torch.float32 and out.shape == (40, m.size, m.size)
    np.testing.assert_allclose(out.numpy(), m.render(p), rtol=0, atol=1e-6)


def test_blur_equals_the_numpy_path():
    rng = np.random.default_rng(0)
    sharp = rng.random((5, 158, 158)).astype(np.float32)
    kernels = psf.get_model("Z3").render(psf.get_model("Z3").sample(5, 0))
    got = synth.blur_torch(torch.from_numpy(sharp), torch.from_numpy(kernels)).numpy()
    np.testing.assert_allclose(got, synth._blur(sharp, kernels), rtol=0, atol=1e-5)
    # both are convolutions (not correlations, which Z3's point-symmetric PSFs would not tell apart)
    from scipy.signal import fftconvolve

    odd = rng.random((5, 31, 31)).astype(np.float32) * np.linspace(0, 1, 31, dtype=np.float32)
    want = np.stack([fftconvolve(a, k, mode="valid") for a, k in zip(sharp, odd)])
    np.testing.assert_allclose(synth._blur(sharp, odd), want, rtol=0, atol=1e-3)
    np.testing.assert_allclose(synth.blur_torch(torch.from_numpy(sharp), torch.from_numpy(odd)).numpy(), want,
                               rtol=0, atol=1e-3)


def test_crops_are_windows_under_the_eight_symmetries(symmetries_seen):
    st = stream.PatchStream("Z3", sources=("poi",), seed=0)
    h, w = 200, 230
    st.flat = torch.arange(h * w, dtype=torch.float32)  # each pixel's value is its position
    st.offsets, st.heights, st.widths = (torch.tensor([v]) for v in (0, h, w))
    st.weights = torch.ones(1, dtype=torch.float64)
    assert symmetries_seen(st.crops(300).long().numpy(), np.arange(h * w).reshape(h, w), st.size) == set(range(8))


def test_stream_draws_like_synthesize_and_is_seeded():
    st = stream.PatchStream("Z3", seed=3)
    x, p, v = (torch.cat(a) for a in zip(*(st(512) for _ in range(4))))
    ref = synth.synthesize(2048, "Z3", seed=3)
    assert x.shape == (2048, 128, 128) and x.dtype == torch.float32 and v.dtype == torch.bool
    assert torch.isfinite(x).all()
    lo, hi = psf.get_model("Z3").bounds
    assert (p.numpy() >= lo).all() and (p.numpy() <= hi).all()
    np.testing.assert_allclose(p.numpy().mean(0), (lo + hi) / 2, rtol=0.06)
    assert abs(v.float().mean().item() - ref["valid"].mean()) < 0.04
    # patch brightness and contrast drawn alike: two samples of one distribution (a mean of 2048
    # patches moves by 8 % between seeds, their light being log-uniform over a decade and their images few)
    from scipy.stats import ks_2samp

    xs = x.numpy()
    for stat in (np.mean, np.std):
        assert ks_2samp(stat(xs, axis=(1, 2)), stat(ref["patches"], axis=(1, 2))).pvalue > 1e-3, stat
    dark = (x.amax(dim=(1, 2)) < 20).float().mean().item()  # forced black patches and dark crops of points
    assert dark == pytest.approx((ref["patches"].max(axis=(1, 2)) < 20).mean(), abs=0.03)
    again = stream.PatchStream("Z3", seed=3)(64)
    first = stream.PatchStream("Z3", seed=3)(64)
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    assert not torch.equal(stream.PatchStream("Z3", seed=4)(64)[0], first[0])


def test_more_procedural_images_keep_each_sources_share():
    shares = []
    for n in (6, 15):
        st = stream.PatchStream("G1", seed=0, n_procedural=n)
        w = st.weights.numpy()
        assert len(w) == len(synth._SKIMAGE_SPLIT["train"]) + 3 * n
        shares.append(w[: len(synth._SKIMAGE_SPLIT["train"])].sum())
    assert shares[0] == pytest.approx(shares[1])
    base = synth.library(split="train")
    st = stream.PatchStream("G1", seed=0, n_procedural=6)
    assert torch.equal(st.flat, torch.from_numpy(np.concatenate([im.ravel() for im in base])))  # synthesize's library


def test_training_on_a_stream_learns_and_keeps_a_frozen_trunk():
    torch.manual_seed(0)
    g1 = stream.train_stream(stream.PatchStream("G1", seed=1), arch="compact", patches=40 * 32, batch_size=32,
                             lr=2e-3, n_val=128, eval_every=20, progress=False)
    hist = g1.meta["training"]["history"]
    assert [h["step"] for h in hist] == [0, 20, 40]
    assert max(h["val_r2"] for h in hist[1:]) > hist[0]["val_r2"] + 0.5
    assert g1.meta["training"]["data"]["stream"] and g1.meta["training"]["n_train"] == 40 * 32
    assert g1.meta["training"]["data"]["images"] == list(synth._SKIMAGE_SPLIT["train"])  # which photos it saw
    from lsfov.estimate import load_model

    start = load_model("Z3")
    z3 = stream.train_stream(stream.PatchStream("Z3", seed=2), init="Z3", freeze=True, patches=4 * 16, batch_size=16,
                             n_val=32, eval_every=2, progress=False)
    trunk = {k: v for k, v in start.net.state_dict().items() if k.split(".")[0] in start.net.trunk}
    assert trunk and all(torch.equal(v, z3.net.state_dict()[k]) for k, v in trunk.items())
    assert z3.meta["training"]["freeze"] and z3.arch == "polar"


def test_stream_bad_input():
    with pytest.raises(ValueError, match="n_procedural"):
        stream.PatchStream("Z3", n_procedural=0)
    with pytest.raises(ValueError, match="unknown image sources"):
        stream.PatchStream("Z3", sources=("flickr",))
    with pytest.raises(ValueError, match="photons"):
        stream.PatchStream("Z3", photons=(5000, 500))
    with pytest.raises(TypeError, match="PatchStream"):
        stream.train_stream("Z3")
    with pytest.raises(ValueError, match="freeze=True"):
        stream.train_stream(stream.PatchStream("Z3", sources=("poi",)), arch="polar", freeze=True)
    with pytest.raises(ValueError, match=r"patches=10 is less than one batch \(64\)"):  # once: trained 64
        stream.train_stream(stream.PatchStream("G1", sources=("poi",)), patches=10, batch_size=64)
    with pytest.raises(ValueError, match="n must be a positive integer"):  # once torch's RuntimeError
        stream.PatchStream("G1", sources=("poi",)).crops(0)
    # a stream of the held-out images is said to be one, as a training set of them is (then refused here)
    with pytest.warns(lsfov.LsfovWarning, match="training on a stream of the test split"):
        with pytest.raises(ValueError, match="less than one batch"):
            stream.train_stream(stream.PatchStream("G1", sources=("poi",), split="test"), patches=10, batch_size=64)


def _one_image_stream(value, illumination, **kw):
    """A stream (sources: points, seed 0) whose library is replaced by one image: ``value`` (an array)."""
    st = stream.PatchStream("G1", sources=("poi",), seed=0, invalid_fraction=0.0, illumination=illumination, **kw)
    img = np.asarray(value, np.float32)
    st.flat = torch.from_numpy(img.ravel())
    st.offsets, st.heights, st.widths = (torch.tensor([v]) for v in (0, *img.shape))
    st.weights = torch.ones(1, dtype=torch.float64)
    return st


def test_a_gradient_of_light_on_a_flat_sample_is_not_texture():
    """Validity (paper 000: a0 = 1 without minimal variance) reads the sample's blurred structure, not
    the illumination's gradient, which no PSF changes: flat crops under deep gradients were labelled
    valid, with random PSF targets, about two times in three."""
    flat = np.full((300, 300), 0.6)
    textured = simulate.sample_image("coins", (300, 300))
    m = psf.get_model("G1")
    kw = dict(invalid_fraction=0.0, read_noise=(0.0, 3.0), illumination=1.0)
    for photons in (synth.PHOTONS, None):
        _, _, valid = synth._batch(m, [flat], 256, np.random.default_rng(0), photons=photons, **kw)
        assert not valid.any()
        _, _, valid = synth._batch(m, [textured], 256, np.random.default_rng(0), photons=photons, **kw)
        assert valid.mean() > 0.9
    _, _, valid = synth._batch(m, [flat], 256, np.random.default_rng(0), photons=synth.PHOTONS, device="cpu", **kw)
    assert not valid.any()
    assert not _one_image_stream(flat, 1.0)(256)[2].any()
    assert _one_image_stream(textured, 1.0)(256)[2].float().mean() > 0.9


def test_stream_noise_is_eq_10s():
    """On a flat sample in even light a patch's spread is all noise: β·Poisson(λ) + N(0, rn²) has
    variance β·mean + rn². The stream's patches have synthesize's (the same draws of β, photons
    and rn), which a stream without its Poisson or its read noise would not."""
    flat = np.full((300, 300), 0.6)
    x, _, _ = _one_image_stream(flat, 0.0, read_noise=(0.0, 20.0))(1024)
    ref, _, _ = synth._batch(psf.get_model("G1"), [flat], 1024, np.random.default_rng(0), invalid_fraction=0.0,
                             photons=synth.PHOTONS, read_noise=(0.0, 20.0), illumination=0.0)
    got = x.numpy().var(axis=(1, 2))
    want = ref.var(axis=(1, 2))
    assert got.mean() == pytest.approx(want.mean(), rel=0.05)
    # read noise's share: the variance left over the mean count (β·mean ≤ mean)
    excess = lambda p: np.mean(p.var(axis=(1, 2)) - 0.75 * p.mean(axis=(1, 2)))  # noqa: E731
    assert excess(x.numpy()) == pytest.approx(excess(ref), rel=0.1, abs=5)


def test_a_model_of_large_kernels_crops_inside_its_images():
    """Crops are 128 + K − 1 px: at K = 63 (what a PSF cut off at 31 px is told to use) taller than
    scikit-image's ``text`` (172 rows). synthesize failed (numpy's "high <= 0"), the stream read
    rows of the image beside it; images that small are mirrored on to the crop's size."""
    import dataclasses

    big = dataclasses.replace(psf.get_model("Z1"), size=63)
    s = stream.PatchStream(big, device="cpu", seed=0)
    assert s.size == 190 and int(s.heights.min()) >= 190 and int(s.widths.min()) >= 190
    x, _, _ = s(16)
    assert x.shape == (16, 128, 128) and bool(torch.isfinite(x).all())
    assert synth.synthesize(16, big, seed=0)["patches"].shape == (16, 128, 128)
    im = np.arange(12.0).reshape(3, 4)
    assert synth.reaching(im, 3) is im
    np.testing.assert_array_equal(synth.reaching(im, 5)[:, :4], np.r_[im, im[::-1][:2]])
