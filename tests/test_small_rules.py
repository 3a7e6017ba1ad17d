"""Small rules of the chunking, backend and calibration helpers, each pinned where no larger test
would notice it broken (found by mutating the code)."""
import numpy as np

from lsfov import _backend


def test_a_trim_threshold_of_zero_is_pinned_and_a_tunable_trim_threshold_is_the_users():
    # glibc takes MALLOC_TRIM_THRESHOLD_=0 (trim at every free) and it pins the mmap threshold as any
    # other value; a trim threshold set through GLIBC_TUNABLES is the user's own: left alone.
    t = _backend._trim_from
    assert t({"MALLOC_TRIM_THRESHOLD_": "0"}) == 0
    assert t({"MALLOC_TRIM_THRESHOLD_": "65536", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}) is None


def test_axis_chunks_keeps_a_remainder_as_large_as_the_minimum():
    # Only a remainder smaller than the minimum joins the last chunk; boundaries stay on multiples of c.
    from lsfov.restore.halo import axis_chunks

    assert axis_chunks(10, 4, 2) == (4, 4, 2)
    assert axis_chunks(9, 4, 2) == (4, 5)
    assert axis_chunks(10, 2, 4) == (4, 6)  # a chunk is never smaller than the minimum
    assert axis_chunks(3, 4, 2) == (3,)


def test_row_bands_cover_every_row_once():
    for n, parts in ((10, 3), (7, 4), (2, 8), (1, 1)):
        bands = _backend.row_bands(n, parts)
        rows = np.concatenate([np.arange(n)[b] for b in bands])
        np.testing.assert_array_equal(rows, np.arange(n))
        assert len(bands) == min(parts, n)


def test_voronoi_cells_reach_the_field_edge_half_a_pixel_out():
    # The field spans [-0.5, n - 0.5]: a bead between the last pixel centre and the edge keeps its place.
    from lsfov.calibrate.interpolate import voronoi_weights

    w = voronoi_weights([(2.0, 2.0), (2.0, 9.4)], (10, 10))
    np.testing.assert_allclose(w, [1.24, 0.76], atol=1e-4)  # cells split at x = 5.7: 62 and 38 px²


def test_the_automatic_psf_basis_rank_uses_the_patch_matrix_aspect_ratio():
    # Far more patches than pixels: the Gavish-Donoho factor is ω(81/400) = 1.76, not the square
    # matrix's 2.86, so a second component at 2.3 times the median singular value is kept.
    from lsfov.calibrate import basis

    rng = np.random.default_rng(0)
    m, k = 400, 9
    q, _ = np.linalg.qr(rng.normal(size=(k * k, 2)))
    rows = rng.normal(size=(m, k * k)) / k + rng.normal(size=(m, 1)) * q[:, 0] + 0.2 * rng.normal(size=(m, 1)) * q[:, 1]
    b = basis.psf_basis(rows.reshape(m, k, k), None, zscore=np.inf)
    s = b.singular_values / np.median(b.singular_values)
    assert 1.76 < s[1] < 2.86 and s[2] < 1.7
    assert len(b.kernels) == 2 and abs(b.kernels[1].ravel() @ q[:, 1]) > 0.9
