import numpy as np
import pytest

from lsfov import psf, simulate


def test_bead_field_is_reproducible_and_consistent():
    a = simulate.bead_field((128, 160), 12, seed=3, grid=4)
    b = simulate.bead_field((128, 160), 12, seed=3, grid=4)
    np.testing.assert_array_equal(a.image, b.image)
    c = simulate.bead_field((128, 160), 12, seed=4, grid=4)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (128, 160) and a.image.dtype == np.float32
    assert a.positions.shape == (12, 2) and a.depth_um.shape == (4, 4)
    assert 1.1 <= a.optics.na <= 1.4 and 0.55 <= a.optics.wavelength_um <= 0.65
    assert a.optics.immersion_index > a.optics.na
    assert a.depth_um.min() == pytest.approx(-0.4) and a.depth_um.max() == pytest.approx(0.4)
    # The clean image is the background plus each bead's brightness times the local PSF centred on it
    # (built here from psf_at, bead by bead, not by the operator's FFT product-convolution).
    r = a.operator.halo
    want = np.pad(a.background.astype(np.float64), r)
    for (y, x), amp in zip(a.positions, a.amplitudes):
        want[y : y + 2 * r + 1, x : x + 2 * r + 1] += amp * a.operator.psf_at(y, x)
    np.testing.assert_allclose(a.clean, want[r:-r, r:-r], rtol=1e-4, atol=1e-5 * a.amplitudes.max())
    # Bright spots sit on the beads.
    y, x = a.positions[np.argmax(a.amplitudes)]
    assert a.clean[y, x] > a.background.max()


def test_bead_field_warns_when_its_psfs_do_not_fit_their_kernel():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simulate.bead_field((128, 128), 4, seed=1, grid=4)  # the defaults fit
    with pytest.warns(UserWarning, match=r"of the 16 PSFs \(defocus up to 3 µm\) reach the edge of the 15-pixel"):
        simulate.bead_field((128, 128), 4, seed=1, grid=4, z_range_um=(-3, 3), psf_size=15)


def test_bead_stack_differs_per_image():
    s = simulate.bead_stack(3, (96, 96), seed=1, grid=3)
    assert len(s) == 3
    assert len({f.optics.na for f in s}) == 3
    np.testing.assert_array_equal(simulate.bead_stack(3, (96, 96), seed=1, grid=3)[2].image, s[2].image)
    # A Generator seeds it too (as bead_field), reproducibly from its state.
    a, b = (simulate.bead_stack(2, (96, 96), seed=np.random.default_rng(4), grid=3) for _ in range(2))
    np.testing.assert_array_equal(a[1].image, b[1].image)
    # So does a SeedSequence (it was passed to NumPy's, which refuses one), the caller's left as it was
    seq = np.random.SeedSequence(5)
    a, b = (simulate.bead_stack(2, (96, 96), seed=seq, grid=3) for _ in range(2))
    np.testing.assert_array_equal(a[1].image, b[1].image)
    assert seq.n_children_spawned == 0
    used = np.random.SeedSequence(5)  # its first children drawn elsewhere: not drawn again here
    used.spawn(3)
    c = simulate.bead_stack(2, (96, 96), seed=used, grid=3)
    assert used.n_children_spawned == 3 and not np.array_equal(c[0].image, a[0].image)


def test_degrade_noise_model():
    img = np.full((64, 64), 1.0, np.float32)
    op, _ = simulate.psf_field(img.shape, "G1", (2, 2), seed=0, size=9)
    y = simulate.degrade(img, op, photons=400.0, read_noise=0.0, seed=1)
    centre = y[16:48, 16:48]
    # Poisson: mean = variance = photons.
    assert centre.mean() == pytest.approx(400, rel=0.02)
    assert centre.var() == pytest.approx(400, rel=0.15)
    y2 = simulate.degrade(img, op, photons=400.0, read_noise=20.0, seed=1)
    assert y2[16:48, 16:48].var() == pytest.approx(800, rel=0.15)  # Poisson + read noise variances add
    np.testing.assert_array_equal(simulate.degrade(img, op, seed=2), simulate.degrade(img, op, seed=2))
    assert not np.array_equal(simulate.degrade(img, op, seed=2), simulate.degrade(img, op, seed=3))


def test_degrade_keeps_an_xarray_images_labels_and_reads_it_by_dim_name():
    import xarray as xr

    img = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    op, _ = simulate.psf_field(img.shape, "G1", (2, 2), seed=0, size=9)
    plain = simulate.degrade(img, op, seed=3)
    xa = xr.DataArray(img, dims=("y", "x"), coords={"x": np.arange(56) * 0.5}, attrs={"pixel_um": 0.5})
    for given in (xa, xa.T, xa.expand_dims(c=["GFP"])):  # (an (x, y) image is not blurred transposed)
        out = simulate.degrade(given, op, seed=3)
        assert isinstance(out, xr.DataArray) and out.dims == tuple(d for d in given.dims if d != "c")
        np.testing.assert_array_equal(out.transpose("y", "x").values, plain)
        assert out.attrs["pixel_um"] == 0.5 and list(out.x.values) == list(xa.x.values)


def test_degrade_bad_input():
    op, _ = simulate.psf_field((32, 32), "G1", (2, 2), seed=0, size=9)
    with pytest.raises(ValueError, match="does not match"):
        simulate.degrade(np.ones((30, 32)), op)
    with pytest.raises(ValueError, match="NaN"):
        simulate.degrade(np.full((32, 32), np.nan), op)
    with pytest.raises(ValueError, match="2-D"):
        simulate.degrade(np.ones((2, 3, 32, 32)), op)
    with pytest.raises(ValueError, match="all zero"):
        simulate.degrade(np.zeros((32, 32)), op)
    offset = np.ones((32, 32))
    offset[3, 3] = -0.01  # a camera offset: clipped with a warning, not refused
    with pytest.warns(UserWarning, match="negative"):
        simulate.degrade(offset, op)
    # integer images are converted, not refused
    assert simulate.degrade(np.ones((32, 32), np.uint16), op).dtype == np.float32


def test_psf_field_and_sample_images():
    op, p = simulate.psf_field((200, 300), "Z3", (3, 4), seed=5)
    assert p.shape == (3, 4, 3) and op.grid_shape == (3, 4)
    m = psf.MODELS["Z3"]
    lo, hi = m.bounds
    assert np.all((p >= lo) & (p <= hi))
    for i, j in ((0, 0), (2, 3), (1, 2)):  # each node's kernel is its parameters' PSF
        np.testing.assert_allclose(op.kernels[i, j], m.render(p[i, j][None], size=op.kernel_size)[0], atol=1e-7)
    img = simulate.sample_image("hubble", (300, 700))
    assert img.shape == (300, 700) and 0 <= img.min() and img.max() <= 1
    with pytest.raises(ValueError, match="unknown sample"):
        simulate.sample_image("lena")


def test_a_psf_grid_finer_than_the_image_is_refused():
    with pytest.raises(ValueError, match="a grid of 2x300 nodes is finer than the 256x256 px image"):
        simulate.psf_field((256, 256), "G1", (2, 300))
    op, _ = simulate.psf_field((30, 28), "G1", (30, 28), size=27)  # one node per pixel: the finest
    assert op.kernels.shape[:2] == (30, 28)


def test_a_bad_seed_is_refused_in_our_words():
    """NumPy's own errors for a seed of "a" or -1 say nothing of the argument that was wrong."""
    op = simulate.psf_field((32, 32), "G1", grid=(1, 1), seed=0)[0]
    for call in (lambda: simulate.bead_field((64, 64), seed="a"), lambda: simulate.bead_stack(2, (64, 64), seed=-1),
                 lambda: simulate.degrade(np.ones((32, 32)), op, seed=-2),
                 lambda: simulate.psf_field((32, 32), seed=1.5)):
        with pytest.raises(ValueError, match=r"seed must be an integer >= 0 \(or None, or a numpy Generator\)"):
            call()
    with pytest.raises(ValueError, match="rng must be an integer >= 0"):
        psf.MODELS["Z3"].sample(3, rng="x")
    assert psf.MODELS["G1"].sample(2, rng=np.random.default_rng(1)).shape == (2, 1)


def test_simulation_parameters_are_checked_by_name():
    """Once "Zernike coefficients must be finite" or a NumPy ufunc error, naming no argument."""
    for call, said in ((lambda: simulate.bead_field((64, 64), astigmatism=np.nan), "astigmatism must be a finite"),
                       (lambda: simulate.bead_field((64, 64), z_range_um=0.4), "z_range_um must be a pair"),
                       (lambda: simulate.tilted_surface((128, 128), direction=np.nan), "direction must be a finite"),
                       (lambda: simulate.tilted_surface((128, 128), axis=np.inf), "axis must be a finite"),
                       (lambda: simulate.tilted_surface((128, 128), depth_range_um=(1, 1)), "low < high, got")):
        with pytest.raises(ValueError, match=said):
            call()
    with pytest.raises(TypeError, match="direction must be a number, got 'a'"):
        simulate.tilted_surface((128, 128), direction="a")
