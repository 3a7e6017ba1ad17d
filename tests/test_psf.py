import math

import numpy as np
import pytest

import lsfov
from lsfov import Optics, psf


def test_noll_indices_follow_noll_1976():
    expected = [(0, 0), (1, 1), (1, -1), (2, 0), (2, -2), (2, 2), (3, -1), (3, 1), (3, -3), (3, 3), (4, 0)]
    assert [psf.noll_to_nm(j) for j in range(1, 12)] == expected
    with pytest.raises(ValueError, match="integers from 1"):
        psf.noll_to_nm(0)


def test_the_largest_noll_index_is_the_last_whose_polynomial_sums_exactly():
    """Past radial order 40 the polynomial's terms cancel into noise (a PSF of NaN at Noll 10⁶, and a
    search for the order of Noll 10²⁰ that never ended): refused at once."""
    n, m = psf.noll_to_nm(psf.MAX_NOLL)
    assert (n, abs(m)) == (40, 40) and psf.noll_to_nm(41 * 40 // 2 + 1) == (40, 0)
    rim = psf.zernike_polynomial(41 * 40 // 2 + 1, np.ones(1), np.zeros(1))  # R_n^0(1) = 1, times √(n + 1)
    assert rim[0] == pytest.approx(np.sqrt(41), rel=1e-9)
    for j in (psf.MAX_NOLL + 1, 10**20):
        with pytest.raises(ValueError, match=f"Noll indices up to {psf.MAX_NOLL} .radial order 40. are supported, "
                                             f"got {j}"):
            psf.noll_to_nm(j)
    with pytest.raises(ValueError, match="Noll indices up to"):
        psf.zernike({10**6: 0.1}, psf.DEFAULT_OPTICS)


@pytest.mark.parametrize("j", [2, 4, 5, 6, 7, 11])
def test_zernike_unit_rms_and_orthogonal(j):
    rng = np.random.default_rng(0)
    r = np.sqrt(rng.random(400_000))  # uniform on the unit disk
    th = rng.uniform(0, 2 * np.pi, r.size)
    zj = psf.zernike_polynomial(j, r, th)
    assert np.sqrt(np.mean(zj**2)) == pytest.approx(1.0, abs=0.01)
    assert abs(np.mean(zj * psf.zernike_polynomial(4 if j != 4 else 6, r, th))) < 0.01


def test_zernike_polynomials_are_nolls():
    """Noll (1976) Table 1, written out: the radial polynomial and the cos/sin choice, not only the norm."""
    rng = np.random.default_rng(1)
    r, t = rng.random(50), rng.uniform(0, 2 * np.pi, 50)
    table = {
        1: np.ones_like(r), 2: 2 * r * np.cos(t), 3: 2 * r * np.sin(t), 4: np.sqrt(3) * (2 * r**2 - 1),
        5: np.sqrt(6) * r**2 * np.sin(2 * t), 6: np.sqrt(6) * r**2 * np.cos(2 * t),
        7: np.sqrt(8) * (3 * r**3 - 2 * r) * np.sin(t), 8: np.sqrt(8) * (3 * r**3 - 2 * r) * np.cos(t),
        9: np.sqrt(8) * r**3 * np.sin(3 * t), 10: np.sqrt(8) * r**3 * np.cos(3 * t),
        11: np.sqrt(5) * (6 * r**4 - 6 * r**2 + 1), 12: np.sqrt(10) * (4 * r**4 - 3 * r**2) * np.cos(2 * t),
        13: np.sqrt(10) * (4 * r**4 - 3 * r**2) * np.sin(2 * t),
    }
    for j, want in table.items():
        np.testing.assert_allclose(psf.zernike_polynomial(j, r, t), want, rtol=1e-6, atol=1e-9, err_msg=f"Z{j}")


@pytest.mark.parametrize("sy,sx", [(1.0, 1.0), (2.0, 3.0), (3.5, 0.8)])
def test_gaussian_widths_match_parameters(sy, sx):
    k = psf.gaussian(sy, sx, size=41)
    assert k.dtype == np.float32 and k.shape == (41, 41)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    r = np.arange(41) - 20
    assert np.sqrt((k.sum(1) * r**2).sum()) == pytest.approx(sy, rel=1e-3)
    assert np.sqrt((k.sum(0) * r**2).sum()) == pytest.approx(sx, rel=1e-3)
    assert np.unravel_index(k.argmax(), k.shape) == (20, 20)


def test_gaussian_batch_and_bad_input():
    k = psf.gaussian([1.0, 2.0], [1.5, 0.7], size=15)
    assert k.shape == (2, 15, 15)
    np.testing.assert_allclose(k[1], psf.gaussian(2.0, 0.7, size=15))
    with pytest.raises(ValueError, match="> 0"):
        psf.gaussian(0.0)
    with pytest.raises(ValueError, match="odd"):
        psf.gaussian(1.0, size=10)


@pytest.mark.parametrize(
    "optics", [psf.DEFAULT_OPTICS, Optics(1.4, 0.6, 0.08, 1.518), Optics(0.3, 0.5, 0.65)]
)
def test_in_focus_pupil_psf_is_the_airy_pattern(optics):
    k = psf.zernike({}, optics, size=31)
    a = psf.airy(optics, size=31)
    assert k.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(k - a).max() < 0.005 * a.max()


def test_pupil_psf_conventions():
    o = psf.DEFAULT_OPTICS
    # A positive x-tilt moves the PSF towards +x (forward Fourier transform).
    k = psf.zernike({2: 0.5}, o, size=31)
    cy, cx = np.unravel_index(k.argmax(), k.shape)
    assert cy == 15 and cx > 15
    # Defocus spreads the PSF; defocus by z (µm) does too and the two signs differ with astigmatism.
    assert psf.zernike({4: 0.4}, o).max() < 0.5 * psf.zernike({}, o).max()
    oil = Optics(1.3, 0.6, 0.1, 1.518)
    above = psf.zernike({6: 0.15}, oil, z_um=0.3)
    below = psf.zernike({6: 0.15}, oil, z_um=-0.3)
    assert np.abs(above - below).max() > 0.2 * above.max()
    # ... and the elongations are rotated by 90 degrees: above ≈ below transposed.
    assert np.abs(above - below.T).max() < 0.1 * above.max()


def test_z3_focus_sign_is_encoded_in_the_axis():
    m = psf.MODELS["Z3"]
    f, c, th = 0.3, 0.2, 0.4
    a = m.render([f, c, th])
    b = psf.zernike({4: -f, 5: c * math.sin(2 * (th + math.pi / 2)), 6: c * math.cos(2 * (th + math.pi / 2))}, m.optics)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", sorted(psf.MODELS))
def test_models_render_batches_of_normalised_centred_kernels(name):
    m = psf.MODELS[name]
    assert len(m.params) == len(m.ranges) == len(m.units)
    p = m.sample(64, rng=1)
    lo, hi = m.bounds
    assert np.all((p >= lo) & (p <= hi))
    k = m.render(p)
    assert k.shape == (64, m.size, m.size) and k.dtype == np.float32
    assert np.all(k >= 0)
    np.testing.assert_allclose(k.sum(axis=(1, 2)), 1.0, atol=1e-5)
    # Centred: the centroid of a symmetric PSF sits on K//2.
    r = np.arange(m.size) - m.size // 2
    assert np.abs((k.sum(2) * r).sum(1)).max() < 0.05  # along y
    assert np.abs((k.sum(1) * r).sum(1)).max() < 0.05  # along x
    one = m.render(dict(zip(m.params, p[3])))
    np.testing.assert_allclose(one, k[3], atol=1e-7)
    np.testing.assert_allclose(m.denormalize(m.normalize(p)), p)


def test_a_cut_off_psf_is_warned_about_even_when_its_rim_is_dark():
    """Z1 at focus 1.0 on 31 px loses half its light beyond the kernel though its rim is below half
    its peak; nothing within the models' ranges is warned about."""
    import warnings

    m = psf.MODELS["Z1"]
    with pytest.warns(lsfov.LsfovWarning, match="cut off"):
        m.render([[1.0]], size=31)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("G1", "G2", "Z1", "Z3"):
            mm = psf.MODELS[name]
            lo, hi = mm.bounds
            mm.render(np.vstack([mm.sample(200, rng=3), hi, lo]))


def test_model_bad_input():
    m = psf.MODELS["Z3"]
    with pytest.raises(ValueError, match="3 parameters"):
        m.render([0.1, 0.2])
    with pytest.raises(ValueError, match="missing"):
        m.render({"focus": 0.1})
    with pytest.raises(ValueError, match="finite"):
        m.render([np.nan, 0.1, 0.1])
    with pytest.raises(ValueError, match="unknown PSF model"):
        psf.get_model("Z9")


def test_optics_validation():
    with pytest.raises(ValueError, match="positive"):
        Optics(0.0, 0.5, 0.1)
    with pytest.raises(ValueError, match="immersion"):
        Optics(1.4, 0.5, 0.1)
    # nm for µm: once a flat PSF (1/225 per pixel), or a pupil of gigabytes
    with pytest.raises(ValueError, match=r"Optics.wavelength_um=600 is beyond any microscope's .* give it in µm, e.g. 0.6"):
        Optics(1.4, 600, 0.1, 1.518)
    with pytest.raises(ValueError, match=r"Optics.pixel_um=65 is 607 times the Nyquist pixel .* 0.107 µm.* in µm"):
        Optics(1.4, 0.6, 65, 1.518)
    assert Optics(0.1, 0.5, 32.0).nyquist_ratio == pytest.approx(25.6)  # a macro-zoom's pixel is one
    with pytest.raises(ValueError, match="Optics.immersion_index=1518 .* e.g. 1.518"):
        Optics(1.4, 0.6, 0.1, 1518)
    with pytest.raises(TypeError, match="Optics"):
        psf.zernike({}, optics=None)
    with pytest.raises(ValueError, match="Optics.na must be a positive number, got True"):  # (a bool is an int)
        Optics(True, 0.5, 0.1)
    with pytest.raises(TypeError, match="optics must be an lsfov.Optics, got int"):  # (0 once meant the model's)
        psf.MODELS["Z1"].render([0.1], optics=0)


def test_nyquist_ratio():
    """Nyquist sampling of a widefield PSF is λ/(4 NA) per pixel: 0.55 µm at NA 0.75 is 0.183 µm."""
    assert psf.Optics(0.75, 0.55, 0.55 / 3.0).nyquist_ratio == pytest.approx(1.0)
    assert psf.Optics(0.75, 0.55, 0.2).nyquist_ratio == pytest.approx(0.2 / (0.55 / 3.0))  # the models': undersampled


def test_a_record_that_is_no_psf_model_is_refused():
    with pytest.raises(ValueError, match="not a PSF-model record"):  # once KeyError: 'psf_model'
        psf.PSFModel.from_meta({})
    from lsfov.estimate.training import r2_scores

    with pytest.raises(ValueError, match=r"true and pred must both be \(n, 1\) G1 parameters"):
        r2_scores("G1", np.ones((5, 1)), np.ones((4, 1)))
    from lsfov.io import image_origin

    assert image_origin(np.ones((4, 4))) == (0.0, 0.0)  # a plain array starts at 0 (once AttributeError)


def test_cut_off_is_a_bright_rim_or_three_percent_of_the_light_in_it():
    k = np.zeros((7, 7))
    k[1:-1, 1:-1] = 1.0  # 25 of light inside, peak 1
    one = k.copy()
    one[0, 3] = 0.49  # one rim pixel under half the peak: 1.9 % of the light
    assert not psf.cut_off(one)
    one[0, 3] = 0.51
    assert psf.cut_off(one)
    for v, cut in ((0.031, False), (0.034, True)):  # the whole rim dim: 2.9 % and 3.2 % of the light in it
        ring = k.copy()
        ring[[0, -1], :], ring[:, [0, -1]] = v, v
        assert bool(psf.cut_off(ring)) is cut, v
    np.testing.assert_array_equal(psf.cut_off(np.stack([one, k])), [True, False])  # per kernel, batched
