"""A subspace of operators learned from many bead images (paper 003 Sec. II-D and II-E).

Every image k gives coefficient maps α_{i,k} on a shared PSF basis h_i; a randomized SVD of all the
K·I maps gives the spatial basis a_j; image k's operator is ``Σ_ij Γ_k[i,j] h_i * (a_j · u)`` with
``Γ_k[i,j] = ⟨α_{i,k}, a_j⟩``, and the admissible operators are the conical hull of the Γ_k.

The maps are bilinear interpolations of node values (see :mod:`.interpolate`), so the SVD runs on
node values in the metric that makes it exact on the pixel grid: ``⟨α, β⟩_pixels = ⟨Rα, Rβ⟩_nodes``
with R the square root of the interpolation's Gram matrix. A 2304² family of 90 images is then a
(450 × 9 000) problem instead of (450 × 5.3 M), with the same result.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

from .._validate import boolean, not_a_bead_field, positive_int, real_number, saturation_level, yx_last
from ..operators import ProductConvolution
from ..io import pixel_size
from .basis import basis_signs, psf_basis
from .beads import _check_radius, bead_psfs
from .cone import cone_columns
from .interpolate import DEFAULT_SMOOTHING, coefficient_nodes, node_grid

__all__ = ["OperatorSubspace", "learn_subspace"]

FORMAT = "lsfov.OperatorSubspace/1"


class OperatorSubspace:
    """A family of product-convolution operators ``Σ_ij Γ[i,j] h_i * (a_j · u)`` of one microscope.

    Made by :func:`learn_subspace` or read by :meth:`load`; the constructor only assembles given parts.

    Parameters
    ----------
    psf_basis : array_like (I, K, K)
        PSF kernels h_i; stored as float32.
    spatial_basis : array (J, H, W)
        Spatial maps a_j, kept as given (not copied or converted): a NumPy array, or any array that
        slices lazily (a Dask array on a store, as :meth:`load` gives).
    gammas : array_like (n_images, I, J)
        Γ_k of each training image; stored as float64.
    attrs : dict, optional
        Provenance (beads used, radius, pixel size); copied.

    Attributes
    ----------
    psf_basis : ndarray (I, K, K) float32
        Orthonormal PSF kernels h_i.
    spatial_basis : ndarray or dask.array.Array (J, H, W)
        Orthonormal spatial maps a_j: in memory from :func:`learn_subspace`, a lazy Dask array on
        the store after :meth:`load` (read where used).
    gammas : ndarray (n_images, I, J) float64
        Γ_k of each training image.
    attrs : dict
        Provenance (beads used, radius, pixel size).

    Raises
    ------
    ValueError
        If the parts are not 3-D, the PSF kernels are not square of an odd size K, or ``gammas`` is
        not (n_images, I, J) for the bases' I and J.
    """

    def __init__(self, psf_basis, spatial_basis, gammas, attrs=None):
        self.psf_basis = np.asarray(psf_basis, dtype=np.float32)
        self.spatial_basis = spatial_basis
        self.gammas = np.asarray(gammas, dtype=np.float64)
        self.attrs = dict(attrs or {})
        if self.psf_basis.ndim != 3 or getattr(spatial_basis, "ndim", 0) != 3 or self.gammas.ndim != 3:
            raise ValueError("need psf_basis (I, K, K), spatial_basis (J, H, W) and gammas (n_images, I, J)")
        if self.psf_basis.shape[1] != self.psf_basis.shape[2] or self.psf_basis.shape[1] % 2 == 0:
            raise ValueError(f"psf_basis kernels must be square of an odd size K (the PSF's centre at K//2), got "
                             f"{self.psf_basis.shape[1:]}")
        if self.gammas.shape[1:] != (self.psf_basis.shape[0], spatial_basis.shape[0]):
            raise ValueError(f"gammas {self.gammas.shape} do not match I={self.psf_basis.shape[0]}, "
                             f"J={spatial_basis.shape[0]}")

    n_psf = property(lambda self: int(self.psf_basis.shape[0]), doc="Number I of PSF basis kernels.")
    n_space = property(lambda self: int(self.spatial_basis.shape[0]), doc="Number J of spatial basis maps.")
    n_images = property(lambda self: int(self.gammas.shape[0]),
                        doc="Number of training images (one Γ_k each).")
    shape = property(lambda self: tuple(int(s) for s in self.spatial_basis.shape[1:]),
                     doc="Image shape (H, W) the subspace's operators act on.")

    def __repr__(self):
        return (f"OperatorSubspace(n_psf={self.n_psf}, n_space={self.n_space}, n_images={self.n_images}, "
                f"shape={self.shape}, K={self.psf_basis.shape[-1]})")

    @property
    def normalized_gammas(self) -> np.ndarray:
        """Γ_k over the mean flux of its operator: the generators of the admissible cone, each for
        an operator that keeps the light (Σ_ij Γ[i,j] Σh_i mean a_j = 1).

        Paper 003 Sec. II-E-a divides by the sum of Γ_k's entries, which depends on the bases' signs
        and scales (121-231 for 8 simulated operators of one flux) and could turn a generator into its
        opposite; the flux is the operator's own, whatever the bases, and positive. A ValueError
        says so where a training image's flux is not positive."""
        h_sums, a_means = self._flux_terms
        flux = np.einsum("kij,i,j->k", self.gammas, h_sums, a_means)
        if not (flux > 0).all():
            k = int(np.argmin(flux))
            raise ValueError(f"the operator of calibration image {k} has no positive flux ({flux[k]:.3g}): its beads "
                             "do not make a blur; learn the subspace again without that image")
        return self.gammas / flux[:, None, None]

    @functools.cached_property
    def _flux_terms(self):
        """Σ h_i per PSF and the mean of a_j over the field per spatial map (read once, one at a time)."""
        return (self.psf_basis.reshape(self.n_psf, -1).sum(axis=1, dtype=np.float64),
                np.array([np.asarray(m, dtype=np.float64).mean() for m in self.spatial_basis]))

    def _gamma(self, k_or_gamma, for_project=False):
        if isinstance(k_or_gamma, (int, np.integer)) and not isinstance(k_or_gamma, bool):
            k = int(k_or_gamma)
            if not -self.n_images <= k < self.n_images:
                raise IndexError(f"image {k} out of range; the subspace was learned from {self.n_images} images")
            return self.gammas[k]
        g = np.asarray(k_or_gamma, dtype=np.float64)
        if g.shape != (self.n_psf, self.n_space):
            raise ValueError(f"gamma must have shape (I, J) = ({self.n_psf}, {self.n_space}), got {g.shape}"
                             + ("" if for_project else "; or pass a training-image index"))
        if not np.all(np.isfinite(g)):
            raise ValueError("gamma contains NaN or Inf; pass finite coordinates in the subspace (its gammas hold "
                             "examples)")
        return g

    def operator(self, k_or_gamma) -> ProductConvolution:
        """The basis operator of training image ``k``, or of a coefficient matrix Γ.

        Its PSF sums to 1 at every pixel. Each training image's maps do (Σ_i sum(h_i) α_ik = 1), but
        J spatial components keep only part of that constant, which left the local PSF sums 0.93-1.05
        across the field: the maps are divided by their flux, as the paper's operators assume.

        Parameters
        ----------
        k_or_gamma : int or array_like (I, J)
            A training-image index (negative counts from the end), or coefficients Γ (e.g. from
            :meth:`project`).

        Returns
        -------
        ProductConvolution
            A basis operator with the I PSF kernels and I in-memory float32 maps (H, W); its
            ``attrs`` are the subspace's, but those of its training set, plus ``source`` (and for
            an index ``image`` and its ``n_beads``).

        Raises
        ------
        IndexError
            For an index out of range.
        ValueError
            For a Γ of another shape, with NaN or Inf, or whose PSFs carry no light somewhere (off
            the cone: :meth:`project` it first).
        """
        g = self._gamma(k_or_gamma)
        a = np.asarray(self.spatial_basis, dtype=np.float32)
        maps = np.tensordot(g.astype(np.float32), a, axes=(1, 0))
        flux = np.tensordot(self.psf_basis.sum(axis=(1, 2), dtype=np.float64).astype(np.float32), maps, axes=1)
        if not float(flux.min()) > 0:  # a Γ off the cone: PSFs of no (or negative) light somewhere
            raise ValueError(f"gamma gives PSFs of total light {float(flux.min()):.3g} (<= 0) at some pixels; "
                             "project it first: subspace.operator(subspace.project(gamma))")
        maps /= flux
        maps.flags.writeable = False  # made here, handed over: the operator need not copy it
        # The subspace's attributes but those of its training set (its images' beads, its spectrum),
        # which would describe another thing than this operator; an image's operator has its beads.
        attrs = {k: v for k, v in self.attrs.items() if k not in ("n_images", "n_beads", "beads_per_image",
                                                                  "singular_values")}
        attrs["source"] = "lsfov.OperatorSubspace.operator"
        if isinstance(k_or_gamma, (int, np.integer)):
            attrs["image"] = int(k_or_gamma)
            per_image = self.attrs.get("beads_per_image")
            if per_image:
                attrs["n_beads"] = per_image[int(k_or_gamma)]
        return ProductConvolution.from_basis(self.psf_basis, maps, attrs=attrs)

    def project(self, gamma) -> np.ndarray:
        """The nearest admissible Γ: the projection onto the cone of the Γ_k.

        Non-negative least squares (``scipy.optimize.nnls``) over the normalised Γ_k
        (:attr:`normalized_gammas`), in the Frobenius norm.

        Parameters
        ----------
        gamma : array_like (I, J)
            Coefficients to project; finite.

        Returns
        -------
        ndarray, float64, shape (I, J)
            A non-negative combination of the Γ_k, for :meth:`operator`.

        Raises
        ------
        ValueError
            If ``gamma`` is not (I, J), holds NaN or Inf, or projects to 0 (it points away from
            every Γ_k); or if a training image's operator has no positive flux.
        """
        from scipy.optimize import nnls

        g = self._gamma(np.asarray(gamma), for_project=True)
        cols = self.normalized_gammas.reshape(self.n_images, -1).T
        lam, _ = nnls(cols, g.ravel())
        if not lam.any():  # 0 is no operator: say so here, not as a Γ of no light in operator()
            raise ValueError("gamma points away from every training image's Γ (its projection on their cone is 0): "
                             "no operator of the subspace is near it")
        return (cols @ lam).reshape(g.shape)

    # ------------------------------------------------------------------ storage
    def to_dataset(self):
        """An ``xarray.Dataset`` with ``psf_basis(psf, ky, kx)``, ``spatial_basis(space, y, x)`` and
        ``gamma(image, psf, space)``; y/x in µm when the pixel size is known.

        Returns
        -------
        xarray.Dataset
            The three arrays (the spatial maps as they are held: a Dask array stays lazy), with the
            subspace's provenance in ``attrs["lsfov"]``.
        """
        import xarray as xr

        from ..io import SPATIAL_UNIT, _jsonable

        h, w = self.shape
        px = self.attrs.get("pixel_um")
        units = SPATIAL_UNIT if px else "pixel"
        scale = float(px) if px else 1.0
        coords = {
            "y": ("y", np.arange(h) * scale, {"units": units}),
            "x": ("x", np.arange(w) * scale, {"units": units}),
            "psf": np.arange(self.n_psf), "space": np.arange(self.n_space), "image": np.arange(self.n_images),
        }
        ds = xr.Dataset(
            {
                "psf_basis": (("psf", "ky", "kx"), self.psf_basis, {"long_name": "PSF basis kernels h_i"}),
                "spatial_basis": (("space", "y", "x"), self.spatial_basis,
                                  {"long_name": "spatial basis maps a_j"}),
                "gamma": (("image", "psf", "space"), self.gammas,
                          {"long_name": "operator coefficients Gamma_k[i, j] = <alpha_ik, a_j>"}),
            },
            coords=coords,
        )
        ds.attrs["lsfov"] = {"type": "OperatorSubspace", "format": FORMAT, "attrs": _jsonable(self.attrs)}
        return ds

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write to a zarr v3 store atomically; read back with :meth:`load` or ``xarray.open_zarr``.

        The store holds :meth:`to_dataset` (spatial maps chunked 1 x 1024 x 1024).

        Parameters
        ----------
        path : str or Path
            Destination directory (conventionally ``*.zarr``; not named like a file of another format).
        overwrite : bool
            Replace an existing zarr store (or empty directory) at ``path``. Without it an existing
            path is never touched.

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is not given, or exists but is neither a zarr store
            nor an empty directory.
        ValueError
            If ``path`` is named like a file of another format or lies inside a zarr store.
        """
        from ..io import atomic_directory, check_result_name

        check_result_name(path)
        ds = self.to_dataset()
        ds["spatial_basis"] = ds["spatial_basis"].chunk({"space": 1, "y": 1024, "x": 1024})
        with atomic_directory(path, overwrite=overwrite) as tmp:
            ds.attrs["lsfov"] = {**ds.attrs["lsfov"], "complete": True}  # the move below makes it true
            with warnings.catch_warnings():  # consolidated: xarray opens it without a warning of its own
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                ds.to_zarr(str(tmp), mode="w", zarr_format=3, consolidated=True)
        return Path(path)

    @classmethod
    def load(cls, path) -> "OperatorSubspace":
        """Read a subspace written by :meth:`save` (spatial maps stay on disk until used).

        Parameters
        ----------
        path : str or Path
            The subspace's store.

        Returns
        -------
        OperatorSubspace
            With ``spatial_basis`` a lazy Dask array on the store.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If it is not an lsfov operator subspace, or its write was interrupted.
        """
        import xarray as xr

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such subspace: {path}")
        try:
            # absolute: lazy reads run on workers, which may start in another directory
            ds = xr.open_zarr(str(path.resolve()), consolidated=False)  # an operator or other store: no warning first
        except Exception:
            ds = None
        meta = ds.attrs.get("lsfov") if ds is not None else None
        if not isinstance(meta, dict) or meta.get("type") != "OperatorSubspace":
            raise ValueError(f"{path} is not an lsfov operator subspace; learn one from bead images (lsfov calibrate, "
                             "lsfov.learn_subspace)")
        if not meta.get("complete"):
            raise ValueError(f"{path} is an incomplete subspace (the write was interrupted); learn it again")
        missing = [n for n in ("psf_basis", "spatial_basis", "gamma") if n not in ds]
        if missing:
            raise ValueError(f"{path} is damaged: its {', '.join(missing)} array is missing; learn it again")
        return cls(ds["psf_basis"].values, ds["spatial_basis"].data, ds["gamma"].values, attrs=meta.get("attrs"))


# ---------------------------------------------------------------------------------------------- learning


def _as_images(bead_images):
    """A list of lazily indexable 2-D images from a stack, a list, or a Dask/xarray/zarr array."""
    not_a_bead_field(bead_images, "bead_images")
    if isinstance(bead_images, (list, tuple)) and any(isinstance(im, (str, os.PathLike)) for im in bead_images):
        raise TypeError("bead_images takes images, not file names; open them with lsfov.open_image "
                        "(a stack's planes: lsfov.io.open_planes)")
    if isinstance(bead_images, (list, tuple)):  # xarray images: dims by name
        images = [yx_last(im, f"bead image {k}") if hasattr(im, "shape") else np.asarray(im)
                  for k, im in enumerate(bead_images)]
    elif getattr(bead_images, "ndim", None) == 3:
        bead_images = yx_last(bead_images, "bead_images")  # an xarray stack: its planes along the other dim
        images = [bead_images[k] for k in range(bead_images.shape[0])]
    elif getattr(bead_images, "ndim", None) == 2:
        images = [bead_images]
    else:
        raise TypeError("bead_images must be a (K, H, W) stack or a list of 2-D images")
    if len(images) < 2:
        raise ValueError(f"a subspace needs at least 2 bead images, got {len(images)}; "
                         "for one image use lsfov.calibrate_operator")
    shapes = {tuple(getattr(im, "shape", np.shape(im))) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"bead images must all be 2-D and of one shape, got shapes {sorted(shapes)}")
    from ..io import pixel_size

    sizes, odd = set(), []
    for i, im in enumerate(images):
        try:
            px = pixel_size(im)
        except ValueError:  # non-square pixels: the PSFs are in its own pixels, as one image's operator's
            odd.append(i)
            continue
        if px:
            sizes.add(round(px, 6))
    if odd and sizes:
        raise ValueError(f"bead image {odd[0]} has non-square pixels and others are of {min(sizes):g} µm; learn a "
                         "subspace from images of one microscope setting, or resample them to one pixel size")
    sizes = sorted(sizes)
    if sizes and sizes[-1] > 1.1 * sizes[0]:  # PSFs in pixels: one subspace, one pixel size
        raise ValueError(f"bead images of different pixel sizes ({', '.join(f'{v:g}' for v in sizes)} µm); learn "
                         "a subspace from images of one microscope setting, or resample them to one pixel size")
    return images


def learn_subspace(bead_images, n_psf: int = 5, n_space: int = 5, *, radius: float | None = None,
                   threshold: float | None = None, smoothing: float = DEFAULT_SMOOTHING, step: int | None = None,
                   max_columns: int = 20, saturation: float | None = None, seed=0,
                   progress: bool = False) -> OperatorSubspace:
    """A subspace of operators from K images of micro-beads (paper 003 Sec. II-D).

    1. Bead PSFs of every image (one Dask task per image: memory holds a few images, not K).
    2. One PSF basis h_i from all the patches (PCA, z-score rejection, PCA again).
    3. Coefficient maps α_{i,k} of every image (thin plate, Voronoi weights, conical hull).
    4. Randomized SVD (``dask.array.linalg.svd_compressed``) of the K·I maps: spatial basis a_j, and
       Γ_k[i, j] = ⟨α_{i,k}, a_j⟩.

    Parameters
    ----------
    bead_images : (K, H, W) array (NumPy, Dask, zarr, xarray) or list of K 2-D images
        K >= 2 acquisitions of the same instrument in different states (focus, temperature...).
    n_psf, n_space : int
        Sizes I of the PSF basis and J of the spatial basis (paper: 5 and 5). J should cover the
        degrees of freedom of the field's variation (a tilted, curved focal surface: about 6).
    radius : float, optional
        Upper bound on the PSF radius in pixels, as in :func:`lsfov.calibrate_operator`, for all
        images. Default: measured on each image (its beads found, isolated and cut out at its own
        radius), the patches of the narrower ones read as the centre of the widest's, zero around
        (one radius measured on the first image crowded or lost the beads of wider ones: a focus
        series).
    threshold : float, optional
        Detection threshold, as in :func:`lsfov.calibrate_operator`.
    smoothing : float
        Thin-plate smoothing, as in :func:`lsfov.calibrate_operator` (default 1e-2).
    step : int, optional
        The largest node spacing of the coefficient maps in pixels, nodes evenly spaced at most that
        far apart, as in :func:`lsfov.calibrate_operator`.
    max_columns : int
        Generators kept for the conical hull of the coefficients; default 20.
    saturation : float, optional
        Camera saturation level, as in :func:`lsfov.calibrate_operator` (default: each image's own,
        from its type or ``significant_bits``).
    seed : int
        Seed (>= 0) of the randomized SVD (same seed, same subspace).
    progress : bool
        Progress bars.

    Returns
    -------
    OperatorSubspace
        The PSF basis (I, K, K), the spatial basis (J, H, W) in memory, and the Γ_k (K, I, J) of the
        images; its ``attrs`` record the beads used, the radius (the widest; ``radii_px``: each
        image's), the pixel size and the singular values.

    Raises
    ------
    TypeError
        If ``bead_images`` is neither a stack nor a list of images (e.g. file names).
    ValueError
        If fewer than 2 images are given, they differ in shape or pixel size, ``n_space`` exceeds
        K·I, or an image's beads cannot be calibrated (the message names the image).

    Examples
    --------
    A subspace from four simulated bead images of one microscope in different states (focus,
    optics), and the operator of one of them:

    >>> import lsfov
    >>> from lsfov import simulate
    >>> fields = simulate.bead_stack(4, (256, 256), seed=0)
    >>> sub = lsfov.learn_subspace([f.image for f in fields], n_psf=5, n_space=4)
    >>> sub
    OperatorSubspace(n_psf=5, n_space=4, n_images=4, shape=(256, 256), K=...)
    >>> op = sub.operator(2)  # image 2's operator
    >>> op.shape, op.n_psfs
    ((256, 256), 5)
    >>> path = sub.save("sub.zarr")
    >>> lsfov.OperatorSubspace.load(path).n_images
    4
    """
    import dask

    from ..cluster import compute

    images = _as_images(bead_images)
    n_psf = positive_int(n_psf, "n_psf")
    n_space = positive_int(n_space, "n_space")
    max_columns = positive_int(max_columns, "max_columns")
    seed = positive_int(seed, "seed", minimum=0)  # (before the beads' work, not after it)
    smoothing = real_number(smoothing, "smoothing", minimum=0, maximum=1e6)
    progress = boolean(progress, "progress")
    if saturation is not None:
        saturation = real_number(saturation, "saturation", minimum=0, exclusive=True)
    if n_space > len(images) * n_psf:
        raise ValueError(f"n_space={n_space} exceeds the K·I = {len(images) * n_psf} maps; use n_space <= "
                         f"{len(images) * n_psf} (--n-space)")
    shape = tuple(int(s) for s in images[0].shape)
    if radius is not None:
        radius = _check_radius(radius)  # (before the beads' work)

    def beads_of(k, im):
        try:
            return bead_psfs(np.asarray(im), radius, threshold=threshold, saturation=saturation_level(im, saturation))
        except ValueError as e:
            raise ValueError(f"bead image {k}: {e}") from None

    tasks = [dask.delayed(beads_of, pure=True)(k, im) for k, im in enumerate(images)]
    beads = compute(tasks, progress=progress, label=f"bead PSFs of {len(images)} images")
    counts = np.array([len(b.patches) for b in beads])
    positions = np.concatenate([b.positions for b in beads])
    radii = [float(b.radius) for b in beads]
    # image by image, each at its own size (the widest's centre): the patches are not copied
    basis = psf_basis([b.patches for b in beads], n_psf)
    del beads
    owner = np.repeat(np.arange(len(counts)), counts)[basis.keep]
    positions = positions[basis.keep]
    cone = cone_columns(basis.coefficients.T, max_columns=max_columns)
    grid = node_grid(shape, step)
    sums = basis.kernels.sum(axis=(1, 2))

    def nodes_of(k, pos, beta):
        try:
            return coefficient_nodes(pos, beta, grid, smoothing=smoothing, cone=cone, kernel_sums=sums)
        except ValueError as e:
            raise ValueError(f"bead image {k}: {e}") from None

    # Each task gets its own image's beads only (small on a distributed cluster).
    tasks = [dask.delayed(nodes_of, pure=True)(k, positions[owner == k], basis.coefficients[owner == k])
             for k in range(len(images))]
    nodes = compute(tasks, progress=progress, label="coefficient maps")
    c = np.stack(nodes)  # (K, I, gy, gx)

    a_nodes, gammas, s = _spatial_basis(c, grid, n_space, seed)
    attrs = {
        "source": "lsfov.learn_subspace", "n_images": len(images), "n_beads": int(len(positions)),
        "beads_per_image": [int(v) for v in np.bincount(owner, minlength=len(images))],
        "radius_px": max(radii), "radii_px": radii, "smoothing": float(smoothing), "node_step_px": grid.step,
        "singular_values": [float(x) for x in s],
    }
    try:  # its attribute, or its µm coordinates (those of a binned image)
        px = pixel_size(images[0])
    except ValueError:  # non-square pixels: the PSFs in its own pixels, no size (_as_images)
        px = None
    if px:
        attrs["pixel_um"] = float(px)
    maps = grid.upsample(a_nodes)
    sign = basis_signs(maps)  # deterministic signs: the same subspace whatever signs the SVD returned
    return OperatorSubspace(basis.kernels, maps * sign[:, None, None].astype(np.float32), gammas * sign, attrs=attrs)


def _spatial_basis(c, grid, n_space: int, seed=0):
    """Randomized SVD of the maps ``c`` (K, I, gy, gx) (node values of bilinear maps on ``grid``).

    Returns the spatial basis on the nodes (J, gy, gx), orthonormal on the pixel grid, Γ (K, I, J)
    and the singular values (J,). The SVD runs on ``R_y c R_x`` (R: square root of the bilinear
    interpolation's Gram matrix), which has the singular values of the full-resolution maps.
    """
    import dask
    import dask.array as da

    k, i = c.shape[:2]
    ry, rx = grid.gram_sqrt()
    ry_inv, rx_inv = grid.gram_sqrt(inverse=True)
    weighted = np.einsum("ab,kibc,cd->kiad", ry, c, rx, optimize=True).reshape(k * i, -1)
    tall = da.from_array(weighted.T, chunks=(min(weighted.shape[1], 1 << 16), weighted.shape[0]))
    # QR between the power iterations: without it the small singular values drown in rounding (s^9)
    u, s, v = da.linalg.svd_compressed(tall, n_space, iterator="QR", n_power_iter=4, seed=int(seed), compute=False)
    # Here, in this process: the matrix is in memory already, and its products' rounding follows the
    # BLAS threads of the process that runs them (a cluster's workers have one: 4e-15 apart).
    u, s, v = (np.asarray(a, dtype=np.float64) for a in dask.compute(u, s, v, scheduler="synchronous"))
    a_nodes = np.einsum("ab,jbc,cd->jad", ry_inv, u.T.reshape((n_space,) + grid.size), rx_inv, optimize=True)
    gammas = (v.T * s).reshape(k, i, n_space)
    return a_nodes, gammas, s
