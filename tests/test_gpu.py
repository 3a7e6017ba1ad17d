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
        op = ProductConvolution.from_grid(m.render(m.sample(12, 0), size=15).reshape(3, 4, 15, 15), (150, 170))
    else:
        op = ProductConvolution.from_basis(rng.standard_normal((3, 9, 9)), rng.random((3, 150, 170)))
    u = rng.random(op.shape).astype(np.float32)
    out = op.apply(cupy.asarray(u))
    assert isinstance(out, cupy.ndarray)
    np.testing.assert_allclose(out.get(), op.apply(u), atol=1e-5 * np.abs(op.apply(u)).max())
    np.testing.assert_allclose(op.adjoint(cupy.asarray(u)).get(), op.adjoint(u), atol=1e-5 * np.abs(op.adjoint(u)).max())
