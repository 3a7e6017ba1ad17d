"""xarray inputs are read by their labels: dims by name (y, x in any order), coordinates with their
units and offset, lazy data kept lazy; PSF maps by their node dims."""
import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import lsfov
from lsfov import simulate

UM = {"units": "micrometer"}


@pytest.fixture(scope="module")
def scene():
    """An anisotropic blur that varies along x: a transposed image deblurred as it is would differ."""
    kernels = np.stack([lsfov.psf.gaussian(0.8, 3.0, size=15), lsfov.psf.gaussian(3.0, 0.8, size=15)])[None]
    op = lsfov.ProductConvolution.from_grid(kernels, (96, 80))
    y = simulate.degrade(simulate.sample_image("cell", (96, 80)), op, photons=500, seed=3)
    return y, op


def _labelled(y, y0=1000.0, x0=2000.0, step=0.2, attrs=UM):
    h, w = y.shape
    return xr.DataArray(y, dims=("y", "x"), coords={"y": ("y", y0 + step * np.arange(h), attrs),
                                                    "x": ("x", x0 + step * np.arange(w), attrs)})


def test_transposed_image_is_deblurred_by_name(scene):
    y, op = scene
    xa = _labelled(y)
    ref = lsfov.deconvolve(xa, op, iterations=3)
    out = lsfov.deconvolve(xa.transpose("x", "y"), op, iterations=3)
    assert out.dims == ("x", "y")
    np.testing.assert_array_equal(out.transpose("y", "x").values, ref.values)
    np.testing.assert_array_equal(out.x.values, xa.x.values)
    with pytest.raises(ValueError, match="name them 'y' and 'x'"):
        lsfov.deconvolve(xa.rename(x="col"), op, iterations=1)
    # other names: rows and columns by position, as a plain array
    np.testing.assert_array_equal(lsfov.deconvolve(xa.rename(y="row", x="col"), op, iterations=3).values, ref.values)


def test_operator_on_xarray_keeps_labels_and_laziness(scene):
    y, op = scene
    xa = _labelled(da.from_array(y, chunks=(40, 30)))
    out = op.apply(xa.transpose("x", "y"))
    assert isinstance(out, xr.DataArray) and isinstance(out.data, da.Array)  # nothing computed yet
    assert out.dims == ("x", "y") and out.data.chunks == xa.data.T.chunks
    np.testing.assert_allclose(out.transpose("y", "x").values, op.apply(y), rtol=1e-5, atol=1e-4)
    back = op.adjoint(out)
    np.testing.assert_allclose(back.transpose("y", "x").values, op.adjoint(op.apply(y)), rtol=1e-5, atol=1e-4)
    # Dask chunks thinner than the halo are merged for the work, and the result has the caller's again
    thin = da.from_array(y, chunks=((3, 93), (79, 1)))
    assert op.apply(thin).chunks == thin.chunks


def test_map_of_transposed_or_offset_image(scene):
    sharp = simulate.sample_image("cell", (256, 192))
    op, _ = simulate.psf_field(sharp.shape, "Z3", (2, 2), seed=4)
    xa = _labelled(simulate.degrade(sharp, op, seed=5))
    ref = lsfov.estimate_psf_map(xa, "Z3", stride=64)
    assert ref.gy.values[0] == pytest.approx(1000 + 0.2 * 63.5)
    flipped = lsfov.estimate_psf_map(xa.transpose("x", "y"), "Z3", stride=64)
    for v in ("focus", "astigmatism", "axis"):
        np.testing.assert_array_equal(flipped[v].values, ref[v].values)
    # an explicit pixel size sets the spacing and keeps the offset of µm coordinates
    explicit = lsfov.estimate_psf_map(xa, "Z3", stride=64, pixel_um=0.21)
    assert explicit.gy.values[0] == pytest.approx(1000 + 0.21 * 63.5) and explicit.attrs["origin"][1] == 2000
    img = lsfov.io.with_pixel_size(xa, 0.1)
    assert img.y.values[0] == 1000 and img.x.values[1] == pytest.approx(2000.1)
    # pixel coordinates without units (a crop by index): nodes in the image's pixels, offset kept
    crop = xr.DataArray(xa.values, dims=("y", "x"), coords={"y": 300 + np.arange(256), "x": 40 + np.arange(192)})
    m = lsfov.estimate_psf_map(crop, "Z3", stride=64)
    assert m.gy.values[0] == 363.5 and m.gy.attrs["units"] == "pixel"
    # coordinates of no stated unit and another step: not mixed with pixel steps, and said so
    with pytest.warns(lsfov.LsfovWarning, match="increasing coordinates with units"):
        m = lsfov.estimate_psf_map(_labelled(xa.values, attrs={}), "Z3", stride=64)
    assert m.gy.values[0] == 63.5
    # ... unless they are spaced at the pixel size the image states: µm written without their unit
    unitless = _labelled(xa.values, attrs={}).assign_attrs(pixel_um=0.2)
    m = lsfov.estimate_psf_map(unitless, "Z3", stride=64)
    assert m.gy.values[0] == pytest.approx(1000 + 0.2 * 63.5) and m.gy.attrs["units"] == "micrometer"
    # the micrometre however spelled: µ (micro sign) or μ (Greek mu, what NFKC makes of it), plurals
    for unit in ("\u00b5m", "\u03bcm", "microns", "micrometres"):
        m = lsfov.estimate_psf_map(_labelled(xa.values, attrs={"units": unit}), "Z3", stride=64)
        assert m.attrs["pixel_um"] == pytest.approx(0.2) and m.gy.values[0] == pytest.approx(1000 + 0.2 * 63.5), unit
    # decreasing coordinates are not taken for a mirrored image's place; a pyramid level's pixel
    # coordinates (in full-resolution pixels, step 2) are counted in its own pixels
    down = xa.assign_coords(y=("y", 1000 - 0.2 * np.arange(256), UM))
    with pytest.warns(lsfov.LsfovWarning, match="coordinates decrease"):
        assert lsfov.io.with_pixel_size(down, 0.2).y.values[0] == 0
    level = xa.assign_coords(y=("y", 0.5 + 2.0 * np.arange(256), {"units": "pixel"}))
    assert lsfov.io.image_origin(level) == (0.25, 0.0)
    # the map's operator is the same whatever order the map's nodes are in
    a = lsfov.operator_from_psf_map(ref)
    b = lsfov.operator_from_psf_map(ref.transpose("gx", "gy"))
    np.testing.assert_array_equal(a.kernels, b.kernels)
    np.testing.assert_array_equal(lsfov.estimate_depth(ref.transpose("gx", "gy")).transpose("gy", "gx").values,
                                  lsfov.estimate_depth(ref).values)


def test_depth_warnings_are_lsfov_warnings(scene):
    sharp = simulate.sample_image("cell", (256, 256))
    op, _ = simulate.psf_field(sharp.shape, "Z3", (2, 2), seed=6)
    m = lsfov.estimate_psf_map(simulate.degrade(sharp, op, seed=7), "Z3", stride=64)
    cal = lsfov.calibrate_depth(m, np.linspace(-2, 2, m.sizes["gx"])[None].repeat(m.sizes["gy"], 0), method="linear")
    m.attrs["symmetrize"] = 1
    with pytest.warns(lsfov.LsfovWarning, match="symmetrize=True"):
        lsfov.estimate_depth(m, cal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=lsfov.LsfovWarning)  # as the README says it silences them
        lsfov.estimate_depth(m, cal)


def test_operator_made_for_other_pixels_is_warned(scene):
    y, op = scene
    made = lsfov.ProductConvolution.from_grid(op.kernels, op.shape, attrs={"pixel_um": 0.1})
    with pytest.warns(lsfov.LsfovWarning, match="made for 0.1 µm pixels"):
        lsfov.deconvolve(_labelled(y, step=0.13), made, iterations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsfov.deconvolve(_labelled(y, step=0.1), made, iterations=1)
        lsfov.deconvolve(_labelled(y, step=0.13), op, iterations=1)  # an operator that does not say
    # BSS and identification (lsfov bss) as the deconvolution
    with pytest.warns(lsfov.LsfovWarning, match="made for 0.1 µm pixels"):
        lsfov.sparse_smooth_deblur(_labelled(y, step=0.13), made, iterations=2)
    from lsfov.calibrate import OperatorSubspace

    sub = OperatorSubspace(op.kernels.reshape(2, 15, 15), np.full((1,) + op.shape, 0.5, np.float32),
                           np.ones((1, 2, 1)), attrs={"pixel_um": 0.1})
    with pytest.warns(lsfov.LsfovWarning, match="the subspace was learned on 0.1 µm pixels"), \
            pytest.raises(ValueError, match="inside the image"):  # warned before anything else
        lsfov.identify_operator(_labelled(y, step=0.13), sub, positions=np.zeros((1, 2)))
    m = lsfov.estimate_psf_map(_labelled(np.tile(y, (3, 3))[:256, :192], step=0.2), "Z3", stride=64)
    assert lsfov.operator_from_psf_map(m).attrs["pixel_um"] == pytest.approx(0.2)
