"""The product-convolution operator, lsfov's one central idea.

A space-varying blur is modelled as (paper 003 Prop. 1, paper 000 Eq. 12)::

    H u = sum_p  k_p * (w_p . u)        k_p: kernels, w_p: weight maps, *: convolution

in two forms:

* **grid** — one PSF per node of a rectilinear grid, ``w_p`` the bilinear hat functions of the nodes,
  constant beyond the outermost nodes, so that the weights sum to one everywhere;
* **basis** — ``I`` basis kernels and ``I`` full-size coefficient maps.

Boundary convention: the operator maps an ``H x W`` image to an ``H x W`` image and treats the scene
as zero outside the field (linear, not circular, convolution). A Dirac at pixel ``p`` becomes the
local kernel centred at ``p`` (convolution, not correlation). Deconvolution that must avoid edge
artefacts extends the field before applying the operator.

How the grid form stays cheap: the image is cut into *cells* between neighbouring nodes. Inside a
cell only the four corner weights are non-zero, so ``H u`` on a cell is four weighted FFTs summed in
the Fourier domain and one inverse FFT. Each weight is a function of y times a function of x, so
the 2-D FFTs are split into their x- and y-passes and the x-pass is shared by the terms with the
same x-factor (2 + 4 passes instead of 4 x 2). Cells are batched into a few FFT calls (grouped by
padded shape), on a few threads from the main thread; no full-size weight map is ever formed and
the FFT area is about the image area whatever the number of PSFs. On a GPU, where each kernel
launch costs more than the arithmetic of a small cell, equally spaced nodes get equal cells instead
(:attr:`ProductConvolution.uniform_cells`): one batch, its four terms in one batched 2-D FFT.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._backend import (array_module, block_digests, fft_module, multiply, next_fast_len, parallel_map, row_bands,
                       task_threads, threads_for, to_numpy)
from ._validate import LsfovWarning, boolean, known_shape, non_finite, readable_array, real_number, shape2d, shown, yx_order

__all__ = ["ProductConvolution"]


def _cell_centers(g: int, n: int) -> np.ndarray:
    """Centres (pixels) of ``g`` equal cells along ``n`` pixels: where a grid's nodes sit by default."""
    return (np.arange(g) + 0.5) * n / g - 0.5


def _hat_weights(centers: np.ndarray, r: np.ndarray):
    """Bilinear hat weights on one axis: for positions r, the lower node, the upper node and t.

    The weight of the lower node is ``1 - t`` and of the upper node ``t``; beyond the outermost nodes
    t is clipped, which makes the outer hats constant and the weights sum to one.
    """
    g = len(centers)
    if g == 1:
        z = np.zeros(np.shape(r), dtype=np.intp)
        return z, z, np.zeros(np.shape(r))
    lo = np.clip(np.searchsorted(centers, r, side="right") - 1, 0, g - 2)
    t = np.clip((r - centers[lo]) / (centers[lo + 1] - centers[lo]), 0.0, 1.0)
    return lo, lo + 1, t


def _hat_matrix(centers: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(len(r), len(centers)) matrix of the hat weights: values at positions r from node values."""
    lo, hi, t = _hat_weights(centers, r)
    m = np.zeros((len(r), len(centers)))
    np.add.at(m, (np.arange(len(r)), lo), 1.0 - t)
    np.add.at(m, (np.arange(len(r)), hi), t)
    return m


@dataclass
class _AxisCells:
    """Cells of one axis inside a window: starts (window coords), lengths, nodes and weights."""

    start: np.ndarray  # (n,)
    length: np.ndarray  # (n,)
    w_lo: np.ndarray  # (n, L) weight of the lower node, zero past each cell's length
    w_hi: np.ndarray  # (n, L)
    node_lo: np.ndarray  # (n,)
    node_hi: np.ndarray  # (n,)


def _axis_cells(centers: np.ndarray, origin: int, n: int, fft_pad: int) -> list[_AxisCells]:
    """Split the window [origin, origin + n) into cells between nodes, grouped by FFT length."""
    g = len(centers)
    inner = np.ceil(centers[1:-1]).astype(np.int64) if g > 2 else np.zeros(0, np.int64)
    bounds = np.concatenate([[origin], np.clip(inner, origin, origin + n), [origin + n]])
    starts, stops = bounds[:-1], bounds[1:]
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    groups: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(zip(starts, stops)):
        groups.setdefault(next_fast_len(b - a + fft_pad), []).append(i)
    out = []
    for idx in groups.values():
        s, e = starts[idx], stops[idx]
        length = e - s
        L = int(length.max())
        r = s[:, None] + np.arange(L)[None, :]
        # Cell i spans nodes (i, i+1); evaluate t at every pixel of the padded cell.
        lo, hi, t = _hat_weights(centers, np.minimum(r, e[:, None] - 1).astype(np.float64))
        valid = np.arange(L)[None, :] < length[:, None]
        out.append(
            _AxisCells(
                start=s - origin,
                length=length,
                w_lo=np.where(valid, 1.0 - t, 0.0).astype(np.float32),
                w_hi=np.where(valid, t, 0.0).astype(np.float32),
                node_lo=lo[:, 0],
                node_hi=hi[:, 0],
            )
        )
    return out


@dataclass
class _Group:
    """A batch of equally padded tiles and the weighted kernels acting on them."""

    ys: np.ndarray  # tile starts (window coords)
    yl: np.ndarray  # true tile lengths
    xs: np.ndarray
    xl: np.ndarray
    fshape: tuple  # FFT shape
    terms: list  # [(weight factors broadcastable to (na, nb, Ly, Lx), or None if all ones; kernel ids (na, nb))]
    single: bool = False  # one cell covering the whole window: centred kernels, no gather, no overlap-add
    # Grid form: the terms are the product of ny row weights and nx column weights (row-major), whose
    # factors depend on y only and on x only. The FFT is then split into its passes (see _sep_forward).
    sep: tuple | None = None  # (ny, nx)
    # Equal cells (see _uniform_cells): each term's weight on a cell, the same on all (T, sy, sx); tile
    # (a, b) starts at window position (ys[0] + a sy, xs[0] + b sx), so gathers and overlap-adds are
    # a few strided views.
    weights: np.ndarray | None = None

    @property
    def tile(self):
        return int(self.yl.max()), int(self.xl.max())

    @property
    def uniform(self):
        """Equal cells: their size (sy, sx); else None."""
        return self.tile if self.weights is not None else None


class _SpectraCache:
    """Kernel spectra at the FFT shapes met, LRU within a byte budget: one per process, all
    operators together (:func:`_process_spectra`)."""

    def __init__(self, budget: int):
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._nbytes = 0
        self.host_nbytes = 0  # of them in this process's memory (not a GPU's): what a worker's memory holds
        self.budget = budget

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: other threads go on (at worst both compute it)
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._nbytes += value.nbytes
                self.host_nbytes += value.nbytes if isinstance(value, np.ndarray) else 0
                while self._nbytes > self.budget and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._nbytes -= old.nbytes
                    self.host_nbytes -= old.nbytes if isinstance(old, np.ndarray) else 0
        return value


def spectra_room() -> int:
    """Bytes this process's cache of kernel spectra may still take: its budget less what it holds."""
    cache = _SPECTRA
    return spectra_budget() if cache is None else max(0, cache.budget - cache._nbytes)


def spectra_budget(memory_limit=None) -> int:
    """Bytes of kernel spectra a process keeps: 512 MiB, or an eighth of a Dask worker's memory
    limit where that is less. Memory Dask does not see as its tasks' (it pauses a worker over its
    limit, and a run then waits in silence): :func:`lsfov.restore.chunked.check_task_memory` counts it."""
    return min(512 << 20, int(memory_limit) // 8) if memory_limit else 512 << 20


_SPECTRA: _SpectraCache | None = None
SPECTRA_METRIC = "lsfov-spectra"  # a Dask worker's metric: the bytes its cache holds
_CACHES_LOCK = threading.Lock()


def _process_spectra() -> _SpectraCache:
    global _SPECTRA
    if _SPECTRA is not None:
        return _SPECTRA
    with _CACHES_LOCK:
        if _SPECTRA is None:
            worker = None
            if "distributed" in sys.modules:  # in a Dask worker: within its memory limit
                try:
                    worker = sys.modules["distributed"].get_worker()
                except (ValueError, AttributeError):  # not in a worker
                    pass
            _SPECTRA = cache = _SpectraCache(spectra_budget(worker.memory_manager.memory_limit if worker else None))
            if worker is not None:  # reported with the worker's memory, for the memory check of later runs
                # (on the worker's event loop, which reads its metrics: not from this task's thread)
                worker.loop.add_callback(worker.metrics.__setitem__, SPECTRA_METRIC, lambda _: cache.host_nbytes)
        return _SPECTRA


class _Spectra:
    """One operator's share of the process's spectra (its keys prefixed by its token). After
    unpickling (a Dask worker), operators with the same token find the same spectra again, so they
    are computed once per worker, not once per task."""

    def __init__(self, token: str):
        self.token = token

    def get(self, key, make):
        return _process_spectra().get((self.token, key), make)


def _stored_files(a) -> tuple:
    """What identifies a zarr array's content without reading it: the absolute path of each of its
    files with size, modification time and inode (a rewrite at the same path changes them, even on a
    file system with coarse times), or, for a store that is not a local directory, its address."""
    root = getattr(a.store_path.store, "root", None)
    if root is None:
        return (str(a.store_path),)
    base = (Path(root) / a.store_path.path).resolve()
    files = sorted(p for p in base.rglob("*") if p.is_file())
    stats = ((str(p.relative_to(base)), p.stat()) for p in files)
    return (str(base), *((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))


def _read_only(value):
    """A NumPy part the operator alone holds, read-only: a copy where anyone could write into its
    memory (the caller's array, changed in place, would leave the operator with stale spectra and
    Dask keys); a view where nothing can (the operator's own parts, a read-only memory map).
    ``op.kernels = new`` makes another operator."""
    if isinstance(value, np.ndarray):
        if _writeable(value):
            value = value.copy()
            value.flags.writeable = False  # (so that views of it are not copied again)
        value = value.view()
        value.flags.writeable = False
    elif isinstance(value, tuple):  # centers
        value = tuple(_read_only(v) for v in value)
    return value


def _frozen(value):
    """``value``'s NumPy parts made read-only in place (arrays no one else holds)."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, tuple):
        for v in value:
            _frozen(v)
    return value


def _writeable(a: np.ndarray) -> bool:
    """Whether ``a``'s memory can be written through it, through any array it is a view of, or
    through the buffer at the end of that chain (a bytearray, a memory map opened ``r+``)."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return True
        a = a.base
    if a is None:  # a read-only array owning its memory
        return False
    try:
        return not memoryview(a).readonly  # (a memory map opened "r" is read-only: not copied)
    except TypeError:
        return True  # memory of unknown kind: copied, to be safe


def _owned(a, given):
    """``a`` (``given`` converted to NumPy) frozen in place where the conversion made it (a new
    dtype, a list): memory no one else holds, which :func:`_read_only` then need not copy again."""
    if (isinstance(a, np.ndarray) and a is not given and a.flags.owndata and a.flags.writeable
            and a is not getattr(given, "data", None)):  # (an xarray's values are its own memory)
        a.flags.writeable = False
    return a


def _layout(name: str, value):
    """The shape of an operator's part: of its kernels or maps; the node counts of its centres."""
    if name == "centers":
        return None if value is None else [np.size(c) for c in value]
    return np.shape(value)


def _part(name: str, doc: str) -> property:
    """An attribute of what an operator does: setting it makes another operator, with its own kernel
    spectra and Dask keys (assigned in place, new kernels were once applied with the old spectra)."""

    def set_part(self, value):
        # Checked as the constructor checks it, with the other parts: an operator is never left with
        # kernels its grid does not index, unsorted nodes or maps of another field.
        parts = {"kernels": self._kernels, "centers": self._centers, "maps": self._maps, name: value}
        try:
            if self.kind == "grid":
                if parts["maps"] is not None:
                    raise ValueError("a grid operator has no coefficient maps (the basis form has)")
                checked = ProductConvolution.from_grid(parts["kernels"], self.shape, centers=parts["centers"])
            else:
                if parts["centers"] is not None:
                    raise ValueError("a basis operator has no node centres (the grid form has)")
                checked = ProductConvolution.from_basis(parts["kernels"], parts["maps"])
                if checked.shape != self.shape:
                    raise ValueError(f"maps of {checked.shape[0]}x{checked.shape[1]} px for an operator of "
                                     f"{self.shape[0]}x{self.shape[1]}")
        except ValueError as e:
            try:  # another grid, or another field: not a fix of the part, a new operator
                other = _layout(name, value) != _layout(name, getattr(self, "_" + name))
            except (TypeError, ValueError):
                other = True
            hint = "; for another grid or field make a new operator (ProductConvolution.from_grid, from_basis)"
            raise ValueError(f"cannot set {name}: {e}" + (hint if other else "")) from None
        setattr(self, "_" + name, getattr(checked, "_" + name))
        self._renew()

    return property(lambda self: getattr(self, "_" + name), set_part, doc=doc)


class ProductConvolution:
    """Space-varying blur ``H u = sum_p k_p * (w_p . u)`` (grid or basis form).

    Build it with :meth:`from_grid` (one PSF per grid node, bilinear weights) or :meth:`from_basis`
    (basis kernels and coefficient maps). Apply it with :meth:`apply` / :meth:`adjoint` (NumPy, CuPy
    or Dask arrays), look up the local PSF with :meth:`psf_at`, and run it block by block with
    :meth:`restrict` (what the Dask paths use) or :meth:`apply_block` / :meth:`adjoint_block`.

    Attributes
    ----------
    kind : {"grid", "basis"}
    attrs : dict
        Free metadata (PSF model, optics, provenance), kept by :meth:`save` / :meth:`load`.
    shape : (int, int)
        Image shape the operator is defined on.
    kernels : ndarray or zarr.Array
        (gy, gx, K, K) for the grid form, (I, K, K) for the basis form; float32. Like ``centers``
        and NumPy ``maps``, read-only and the operator's own (copied where the caller could still
        write into them): assign a new array to change them (a new operator, with its own kernel
        spectra and Dask keys). A grid's may be a zarr array on disk, read window by window (a
        slide's PSF map; :meth:`from_grid`).
    centers : (ndarray, ndarray) or None
        Node rows and columns (pixel coordinates) of the grid form.
    maps : array_like or None
        (I, H, W) coefficient maps of the basis form.
    window : (int, int, int, int)
        ``(oy, ox, h, w)``: the part of the image this operator acts on; the whole image, ``(0, 0) +
        shape``, but for a restricted one (:meth:`restrict`).
    periodic : (bool, bool)
        Whether a restricted window wraps around along y and x (:meth:`restrict`).
    """

    #: Cut the grid form into equal cells (one batch, no loop over cells; more FFT area, see
    #: ``_uniform_cells``) where the nodes are equally spaced. None: on CuPy arrays (launches cost
    #: more there than the extra area), if it adds at most half the area; True: always; False: never.
    uniform_cells: bool | None = None

    def __init__(self, kind, shape, kernels, centers=None, maps=None, window=None, attrs=None, _token=None,
                 periodic=False):
        self.kind = kind
        self.shape = tuple(int(s) for s in shape)
        self._kernels, self._centers, self._maps = (_read_only(v) for v in (kernels, centers, maps))
        self.window = tuple(int(v) for v in window) if window is not None else (0, 0) + self.shape
        if attrs is not None and not isinstance(attrs, dict):
            raise TypeError(f"attrs must be a dict of metadata, got {type(attrs).__name__}")
        self.attrs = dict(attrs or {})
        self.periodic = (bool(periodic),) * 2 if np.isscalar(periodic) else tuple(bool(p) for p in periodic)
        self._renew(_token)

    def _renew(self, token=None):
        """A new identity for caches and Dask keys (``token``: one shared with an equal operator)."""
        self._token = token or uuid.uuid4().hex
        self._cache = _Spectra(self._token)
        self._plan_cache = None
        self._group_spectra: dict = {}
        self._local = None  # a basis form's local_psfs(), read once
        self._sums_kept = None  # kernel_sums(), read once

    kernels = _part("kernels", "The PSF kernels: (gy, gx, K, K) for the grid form, (I, K, K) for the basis form.")
    centers = _part("centers", "The grid form's node centres (cy, cx) in pixels; None for the basis form.")
    maps = _part("maps", "The basis form's coefficient maps (I, H, W); None for the grid form.")

    @property
    def fingerprint(self) -> str:
        """A hash of what the operator does (form, shape, kernels, nodes or maps, window), equal for
        equal operators in any process; ``_token`` is only an identity for caches."""
        from dask.base import tokenize

        def content(a):
            if hasattr(a, "dims") and hasattr(a, "variable"):  # xarray: its array (its name is the variable's)
                a = a.data
            if a is None or isinstance(a, np.ndarray):
                return a
            if hasattr(a, "store_path"):  # a lazy zarr array: its files, not gigabytes of reads
                return (_stored_files(a), a.shape, str(a.dtype))
            if hasattr(a, "__dask_graph__"):  # Dask: a digest per block, computed block by block (a name
                return (a.shape, str(a.dtype), block_digests(a).compute().tolist())  # can outlive the data it reads)
            return a.get() if hasattr(a, "get") else np.asarray(a)  # CuPy -> host, once

        return tokenize(self.kind, self.shape, content(self.kernels), self.centers, content(self.maps),
                        self.window, self.periodic)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_grid(cls, psfs, shape, centers=None, attrs=None) -> "ProductConvolution":
        """Grid operator: one PSF per node, bilinear interpolation of the blur between nodes.

        Parameters
        ----------
        psfs : array_like (gy, gx, K, K) or zarr.Array
            PSF of each node, K odd (at most the image's smaller side), centred at K//2; each must
            have a positive sum. Stored as float32, not normalised. A zarr array stays on disk (it is
            read once here, slab by slab, to check it), and each window reads its nodes: a slide's
            PSF map takes gigabytes of kernels (:func:`lsfov.operator_from_psf_map`'s ``store``).
            It is not copied: leave its store unchanged while the operator is in use.
        shape : int or (int, int)
            Image shape (H, W).
        centers : (array_like (gy,), array_like (gx,)), optional
            Node rows and columns in pixel coordinates, strictly increasing. Default: cell centres
            ``(i + 0.5) * N / g - 0.5``.
        attrs : dict, optional
            Free metadata (PSF model, optics, provenance), copied to :attr:`attrs`; kept by :meth:`save`
            as JSON.

        Returns
        -------
        ProductConvolution
            The grid-form operator. Its kernels and centres are read-only and its own: a NumPy
            ``psfs`` that the caller could still write into is copied, so changing it later does
            not change the operator.

        Raises
        ------
        TypeError
            If ``psfs`` is not an array of real numbers, or ``attrs`` is not a dict.
        ValueError
            If ``psfs`` is empty, holds NaN or Inf, is not (gy, gx, K, K) with square kernels, has an
            even K or one larger than the image's smaller side, or a PSF whose sum is not positive;
            if ``shape`` is not positive integers; or ``centers`` is not a pair of arrays of gy and
            gx finite, strictly increasing positions.

        Examples
        --------
        A 2 x 2 grid of Gaussian PSFs, sharp at the top and wider at the bottom of a 256² field:

        >>> import numpy as np
        >>> from lsfov import ProductConvolution, psf
        >>> sigmas = np.array([[1.0, 1.5], [2.0, 3.0]])
        >>> psfs = psf.gaussian(sigmas.ravel(), size=21).reshape(2, 2, 21, 21)
        >>> op = ProductConvolution.from_grid(psfs, (256, 256))
        >>> op
        ProductConvolution(grid, shape=(256, 256), grid=(2, 2), K=21)
        >>> u = np.random.default_rng(0).random((256, 256), dtype=np.float32)
        >>> v = np.random.default_rng(1).random((256, 256), dtype=np.float32)
        >>> blurred = op.apply(u)
        >>> blurred.shape, blurred.dtype
        ((256, 256), dtype('float32'))
        >>> bool(np.isclose(np.vdot(blurred, v), np.vdot(u, op.adjoint(v)), rtol=1e-5))  # <Hu, v> = <u, H^T v>
        True
        >>> op.psf_at(0, 0).shape  # the local PSF: the top-left node's
        (21, 21)
        """
        psfs = _stored_kernels(psfs) if on_disk(psfs) else _owned(_as_float_array(psfs, "psfs"), psfs)
        if psfs.ndim != 4 or psfs.shape[-1] != psfs.shape[-2]:
            raise ValueError(f"psfs must have shape (gy, gx, K, K), got {psfs.shape}")
        shape = shape2d(shape)
        _check_kernel_size(psfs.shape[-1], shape)
        gy, gx = psfs.shape[:2]  # (>= 1: an empty psfs is refused by _as_float_array)
        sums = _sums(psfs)  # (read slab by slab from disk, where NaN is found too)
        if not (sums > 0).all():
            iy, ix = np.argwhere(~(sums > 0))[0]
            raise ValueError(f"the PSF at node ({iy}, {ix}) sums to {sums[iy, ix]:g}; a PSF must carry light "
                             "(positive sum): check its background subtraction")
        if centers is None:
            centers = tuple(_cell_centers(g, n) for g, n in zip((gy, gx), shape))
        else:
            if isinstance(centers, (str, bytes)) or not hasattr(centers, "__len__") or len(centers) != 2:
                raise ValueError(f"centers must be a pair (rows, columns) of 1-D arrays, got {shown(centers)}")
            try:
                centers = tuple(np.asarray(c, dtype=np.float64).ravel() for c in centers)
            except (TypeError, ValueError):
                raise ValueError("centers must be a pair (rows, columns) of 1-D arrays of pixel positions") from None
            for c, g, ax in zip(centers, (gy, gx), "yx"):
                if len(c) != g:
                    raise ValueError(f"{len(c)} node {ax}-centres given for a grid of {g} PSFs along {ax}")
                if not np.all(np.isfinite(c)) or np.any(np.diff(c) <= 0):
                    raise ValueError(f"node {ax}-centres must be finite and strictly increasing")
        op = cls("grid", shape, psfs, centers=centers, attrs=attrs)
        op._sums_kept = _read_only(sums)
        return op

    @classmethod
    def from_psf(cls, psf, shape, attrs=None) -> "ProductConvolution":
        """The space-invariant operator of one measured PSF (e.g. a bead image), cleaned for use.

        Parameters
        ----------
        psf : array_like (Ky, Kx)
            Odd sizes, the peak at the centre pixel. Negative values (noise left by a background
            subtraction) are set to zero; the PSF is normalised to sum 1 and padded to a square. An
            off-centre PSF (centre of mass over 1 px from the centre pixel) is warned about: it would
            shift the result by as much; so is a PSF whose border stays high all round (a background
            left in it).
        shape : int or (int, int)
            Image shape (H, W).
        attrs : dict, optional
            Free metadata (PSF model, optics, provenance), copied to :attr:`attrs`; kept by :meth:`save`
            as JSON. The pixel size of an xarray PSF that knows it is recorded as ``pixel_um``: the
            deconvolution of an image of other pixels warns.

        Returns
        -------
        ProductConvolution
            A grid-form operator of one node, with its own copy of the cleaned PSF.

        Raises
        ------
        TypeError
            If ``psf`` is not an array of real numbers, or ``attrs`` is not a dict.
        ValueError
            If ``psf`` is not 2-D, is empty, has an even size, holds NaN or Inf or no positive
            value, or is larger (its longer side) than the image's smaller side; or if ``shape`` is
            not positive integers.
        """
        if getattr(psf, "dims", None) is not None and "pixel_um" not in (attrs or {}):
            from .io import pixel_size

            from .io import _pixel_attr

            _pixel_attr(psf, "the PSF")  # a pixel_um attribute that is no size: said, not taken for non-square pixels
            try:
                px = pixel_size(psf)
            except ValueError:  # non-square pixels: a PSF in its own pixels, with nothing to compare
                px = None
            attrs = {**(attrs or {}), **({"pixel_um": px} if px else {})}
        k = _owned(_as_float_array(psf, "psf"), psf)
        if k.ndim != 2:
            raise ValueError(f"psf must be one 2-D PSF, got shape {k.shape}; pick its in-focus plane")
        if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
            raise ValueError(f"the PSF is {k.shape[0]}x{k.shape[1]}; it needs odd sizes with the peak at the "
                             "centre pixel (crop one row/column)")
        k = np.maximum(k, 0)
        total = float(k.sum(dtype=np.float64))
        if not total > 0:
            raise ValueError("the PSF has no positive value")
        # A background is a floor as high in the corners as mid-edge; a PSF cut by its box is brighter
        # mid-edge (a Gaussian cut at 1.3 sigma: corners at 0.4 of it), and its rings dip between them.
        ty, tx = k.shape[0] // 3, k.shape[1] // 3
        if min(k.shape) >= 5:  # (a smaller PSF has no border apart from its core)
            corners = float(np.mean([k[:2, :2], k[:2, -2:], k[-2:, :2], k[-2:, -2:]]))
            mid = float(np.mean(np.concatenate([k[0, tx:-tx], k[-1, tx:-tx], k[ty:-ty, 0], k[ty:-ty, -1]])))
            floor = corners / float(k.max())
        if min(k.shape) >= 5 and floor > 0.02 and corners > 0.8 * mid:
            warnings.warn(f"the PSF's border is at {floor:.0%} of its peak all round: a background (camera offset) left "
                          "in it is taken for blur; subtract it first (e.g. the border's median)", LsfovWarning,
                          stacklevel=2)
        yy, xx = np.indices(k.shape)
        off = [float((i * k).sum(dtype=np.float64) / total - n // 2) for i, n in zip((yy, xx), k.shape)]
        if max(abs(v) for v in off) > 1:
            off = [round(v, 1) + 0.0 for v in off]  # + 0.0: no "-0.0"
            warnings.warn(f"the PSF's centre of mass is ({off[0]:+.1f}, {off[1]:+.1f}) px from its centre pixel; "
                          "the result will be shifted by as much: centre the PSF", LsfovWarning, stacklevel=2)
        size = max(k.shape)
        py, px = (size - k.shape[0]) // 2, (size - k.shape[1]) // 2
        k = np.pad(k / np.float32(total), ((py, py), (px, px)))  # square, centre kept
        return cls.from_grid(k[None, None], shape, attrs=attrs)

    @classmethod
    def from_basis(cls, kernels, maps, attrs=None) -> "ProductConvolution":
        """Basis operator: ``H u = sum_i h_i * (alpha_i . u)``.

        Parameters
        ----------
        kernels : array_like (I, K, K)
            Basis kernels (may be signed, e.g. principal components), K odd.
        maps : array_like (I, H, W)
            Coefficient maps; NumPy or any array that slices lazily (zarr, dask). Beyond the image
            they are extended by their edge values (the PSF there is that of the nearest pixel).
            NumPy maps are stored as float32; lazy ones are kept as they are and not scanned.
        attrs : dict, optional
            Free metadata (PSF model, optics, provenance), copied to :attr:`attrs`; kept by :meth:`save`
            as JSON.

        Returns
        -------
        ProductConvolution
            The basis-form operator, of shape (H, W). Its kernels and NumPy maps are read-only and
            its own (copied where the caller could still write into them); lazy maps are not copied.

        Raises
        ------
        TypeError
            If ``kernels`` or ``maps`` is not of real numbers, or ``attrs`` is not a dict.
        ValueError
            If ``kernels`` is empty, holds NaN or Inf, or is not (I, K, K) with square kernels; K is
            even or larger than the maps' smaller side; ``maps`` is not (I, H, W) with the kernels'
            I; or NumPy maps hold NaN or Inf.

        Examples
        --------
        Two kernels whose mix changes from left to right: a sharp PSF at the left edge, a wide one at
        the right:

        >>> import numpy as np
        >>> from lsfov import ProductConvolution, psf
        >>> kernels = psf.gaussian([1.0, 3.0], size=21)
        >>> t = np.linspace(0, 1, 256, dtype=np.float32)
        >>> maps = np.stack([np.tile(1 - t, (256, 1)), np.tile(t, (256, 1))])
        >>> op = ProductConvolution.from_basis(kernels, maps)
        >>> op
        ProductConvolution(basis, shape=(256, 256), basis=2, K=21)
        >>> bool(np.allclose(op.psf_at(128, 0), kernels[0], atol=1e-6))
        True
        >>> op.apply(np.ones((256, 256), np.float32))[128, 128].round(3)  # unit-sum PSFs keep the light
        np.float32(1.0)
        """
        kernels = _owned(_as_float_array(kernels, "kernels"), kernels)
        if kernels.ndim != 3 or kernels.shape[-1] != kernels.shape[-2]:
            raise ValueError(f"basis kernels must have shape (I, K, K), got {kernels.shape}")
        readable_array(maps, "coefficient maps")
        given = maps
        if hasattr(maps, "dims") and isinstance(getattr(maps, "data", None), np.ndarray):
            maps = maps.data  # an xarray of NumPy maps: in memory, so copied and checked as NumPy maps are
        if getattr(maps, "ndim", None) != 3:
            maps = _as_float_array(maps, "coefficient maps")
        elif getattr(maps.dtype, "kind", "f") not in "biuf":
            raise TypeError(f"coefficient maps must be a real numeric array, got dtype {maps.dtype}")
        if maps.ndim != 3 or maps.shape[0] != kernels.shape[0]:
            raise ValueError(
                f"coefficient maps must have shape (I={kernels.shape[0]}, H, W), got {tuple(maps.shape)}"
            )
        shape = shape2d(maps.shape[1:])
        _check_kernel_size(kernels.shape[-1], shape)
        if isinstance(maps, np.ndarray):
            maps = _owned(maps.astype(np.float32, copy=False), given)
            if not np.all(np.isfinite(maps)):
                raise ValueError("coefficient maps contain NaN or Inf; fix the maps (e.g. np.nan_to_num, or refit "
                                 "them)")
        return cls("basis", shape, kernels, maps=maps, attrs=attrs)

    # ------------------------------------------------------------------ properties
    @property
    def kernel_size(self) -> int:
        """Kernel edge K in pixels (odd)."""
        return int(self.kernels.shape[-1])

    @property
    def halo(self) -> int:
        """Kernel radius: how far one application moves information, in pixels."""
        return self.kernel_size // 2

    @property
    def n_psfs(self) -> int:
        """Number of kernels: gy·gx nodes for the grid form, I basis kernels for the basis form."""
        return int(np.prod(self.kernels.shape[:-2]))

    @property
    def grid_shape(self):
        """(gy, gx) nodes of the grid form; None for the basis form."""
        return self.kernels.shape[:2] if self.kind == "grid" else None

    @property
    def domain_shape(self) -> tuple[int, int]:
        """Shape of the arrays :meth:`apply` takes (the window for a restricted operator)."""
        return self.window[2], self.window[3]

    def kernel_sums(self) -> np.ndarray:
        """Each kernel's sum, float64, of shape ``kernels.shape[:-2]``: read once (slab by slab from
        a store on disk) and kept, shared with the operator's windows.

        Returns
        -------
        ndarray, float64, (gy, gx) or (I,)
            The sums, read-only.
        """
        if self._sums_kept is None:
            self._sums_kept = _read_only(_sums(self.kernels))
        return self._sums_kept

    def _kernels_from(self, kernels) -> "ProductConvolution":
        """This grid with its kernels read from ``kernels``, the same values held elsewhere (a copy on
        disk): the same operator, so the same identity (kernel spectra), sums and plan."""
        moved = ProductConvolution("grid", self.shape, kernels, centers=self.centers, attrs=self.attrs,
                                   _token=self._token)
        moved._sums_kept = self.kernel_sums()
        if "uniform_cells" in vars(self):
            moved.uniform_cells = self.uniform_cells
        return moved

    def _node_kernels(self, ids) -> np.ndarray:
        """The kernels of flat indices ``ids`` (K, K each): from a store on disk, only the box of
        nodes that holds them (a window's nodes are a box), not the whole grid."""
        k = self.kernel_size
        if not on_disk(self.kernels):
            return self.kernels.reshape(-1, k, k)[list(ids)]
        iy, ix = np.divmod(np.asarray(ids, dtype=np.intp), self.kernels.shape[1])
        box = np.asarray(self.kernels[iy.min() : iy.max() + 1, ix.min() : ix.max() + 1], dtype=np.float32)
        return box[iy - iy.min(), ix - ix.min()]

    def __repr__(self):
        extra = f"grid={self.grid_shape}" if self.kind == "grid" else f"basis={self.kernels.shape[0]}"
        win = "" if self.window == (0, 0) + self.shape else f", window={self.window}"
        return f"ProductConvolution({self.kind}, shape={self.shape}, {extra}, K={self.kernel_size}{win})"

    def __getstate__(self):
        # Plans and spectra stay behind; where the operator lands (a Dask worker) the token finds
        # that process's spectra cache, so every task of a worker shares one.
        state = self.__dict__.copy()
        state["_plan_cache"] = None
        state["_group_spectra"] = {}
        state["_local"] = None
        del state["_cache"]
        return state

    def __setstate__(self, state):
        for name in ("kernels", "centers", "maps"):
            if name in state:  # (pickled before these were properties)
                state["_" + name] = state.pop(name)
            state["_" + name] = _frozen(state.get("_" + name))  # (a pickle makes a writeable copy, its own)
        self.__dict__.update(state)
        self._cache = _Spectra(self._token)

    # ------------------------------------------------------------------ windows
    def restrict(self, origin, shape, *, periodic: bool = False) -> "ProductConvolution":
        """The operator seen through a window of the image (for block-wise work).

        ``origin`` is the window's top-left pixel in image coordinates (may be negative, and the
        window may extend past the image: the image is zero there). The restricted operator acts on
        arrays of ``shape``; on the window shrunk by :attr:`halo` it equals the full operator.
        With ``periodic=True`` (or a pair, per axis) the window may also wrap around onto itself
        (cheaper FFTs): for callers that discard the outer halo on both sides of that axis, or that
        know the data vanish there.

        Parameters
        ----------
        origin : (int, int)
            The window's top-left pixel (y, x) in image coordinates.
        shape : int or (int, int)
            The window's (h, w) in pixels.
        periodic : bool or (bool, bool)
            Let the window wrap around along both axes, or per axis (y, x).

        Returns
        -------
        ProductConvolution
            The windowed operator (same kernels and attrs; it shares this one's cache of kernel spectra).

        Raises
        ------
        ValueError
            If this operator is itself a window; ``origin`` is not a pair of integer pixel positions;
            ``shape`` is not positive integers; or ``periodic`` is not a bool or a pair of them.
        """
        if self.window != (0, 0) + self.shape:
            raise ValueError("restrict() applies to a full-image operator; restrict the operator it was cut from")
        try:
            oy, ox = (int(o) for o in origin)
            whole = all(float(o) == v for o, v in zip(origin, (oy, ox)))  # (2.7 is no pixel: not cut to 2)
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise ValueError(f"origin must be a pair (y, x) of integer pixel positions, got {shown(origin)}")
        h, w = shape2d(shape)
        if isinstance(periodic, (tuple, list)) and len(periodic) != 2:
            raise ValueError(f"periodic must be True, False or a pair (y, x) of them, got {shown(periodic)}")
        periodic = tuple(boolean(p, "periodic") for p in periodic) if isinstance(periodic, (tuple, list)) else \
            boolean(periodic, "periodic")
        return self._view((oy, ox, h, w), periodic)

    def _view(self, window, periodic=False) -> "ProductConvolution":
        """This operator on ``window`` (oy, ox, h, w), unchecked; it shares the kernel spectra cache."""
        view = ProductConvolution(self.kind, self.shape, self.kernels, centers=self.centers, maps=self.maps,
                                  window=window, attrs=self.attrs, _token=self._token, periodic=periodic)
        if "uniform_cells" in vars(self):  # a plan chosen for this operator holds in its windows
            view.uniform_cells = self.uniform_cells
        view._sums_kept = self._sums_kept  # (kept: a window of a slide's grid would read them all again)
        return view

    def apply_block(self, block, origin):
        """Apply to a block that carries a halo of :attr:`halo` pixels on every side.

        Parameters
        ----------
        block : array_like (h, w)
            The block, halo included: more than ``2 * halo`` pixels along each axis.
        origin : (int, int)
            The image position of the block's first pixel (halo included).

        Returns
        -------
        array, float32, (h - 2 halo, w - 2 halo)
            The block without its halo, equal to the same region of ``apply`` on the whole image.

        Raises
        ------
        ValueError
            If ``block`` is not 2-D or not larger than ``2 * halo`` along each axis, or this operator
            is itself a restricted window; otherwise as :meth:`apply`.
        """
        return self._block(block, origin, adjoint=False)

    def adjoint_block(self, block, origin):
        """Adjoint counterpart of :meth:`apply_block`.

        Parameters
        ----------
        block, origin : array_like (h, w), (int, int)
            As for :meth:`apply_block`.

        Returns
        -------
        array, float32, (h - 2 halo, w - 2 halo)
            The same region of ``adjoint`` on the whole image.
        """
        return self._block(block, origin, adjoint=True)

    def _block(self, block, origin, *, adjoint: bool):
        r = self.halo
        block = block if hasattr(block, "shape") else np.asarray(block)
        if len(block.shape) != 2 or min(block.shape) <= 2 * r:
            raise ValueError(f"block of shape {tuple(block.shape)} holds nothing inside its halo of {r} px on each "
                             f"side; give a 2-D block larger than {2 * r} px along each axis")
        op = self.restrict(origin, block.shape)
        out = op.adjoint(block) if adjoint else op.apply(block)
        return out[r : out.shape[0] - r, r : out.shape[1] - r]

    # ------------------------------------------------------------------ application
    def apply(self, u, *, check: bool = True):
        """``H u``: blur an image.

        A NumPy/CuPy image with NaN or Inf is refused (through the FFTs one NaN would fill its whole
        tile); Dask images are not scanned.

        Parameters
        ----------
        u : array_like (H, W)
            Real image of :attr:`domain_shape` (of :attr:`shape` for Dask); NumPy, CuPy, Dask or
            xarray (dims ``y`` and ``x`` in any order, or other names read as rows, columns).
        check : bool
            Scan a NumPy/CuPy image for NaN and Inf. ``False`` skips the scan (one pass over the image,
            and on a GPU a wait for it): for loops that apply the operator to arrays they made.

        Returns
        -------
        array, float32, of ``u``'s shape
            NumPy/CuPy in -> same out; Dask in -> lazy Dask out with the input's chunks; xarray in ->
            xarray out (dims by name, coords and attrs kept).

        Raises
        ------
        TypeError
            If ``u`` is not of real numbers, or is an ``xarray.Dataset``.
        ValueError
            If ``u`` is a masked array with masked pixels (its data under the mask would be read as
            pixels); is not of :attr:`domain_shape` (Dask: not of :attr:`shape`, or the operator is
            a restricted window; or chunk sizes are unknown); names only one of ``y`` and ``x`` (xarray;
            other names are read as rows, columns); or, with ``check``, holds NaN or Inf.
        """
        return self._dispatch(u, adjoint=False, check=boolean(check, "check"))

    __call__ = apply

    def adjoint(self, v, *, check: bool = True):
        """``H^T v``: the exact adjoint (``<H u, v> = <u, H^T v>``).

        Parameters
        ----------
        v : array_like (H, W)
            Real image, as for :meth:`apply`.
        check : bool
            Scan for NaN and Inf, as in :meth:`apply`.

        Returns
        -------
        array, float32
            Of ``v``'s shape and kind (NumPy, CuPy, Dask or xarray).

        Raises
        ------
        TypeError, ValueError
            As :meth:`apply`.
        """
        return self._dispatch(v, adjoint=True, check=boolean(check, "check"))

    def _dispatch(self, x, adjoint, check: bool = True):
        if hasattr(x, "dims"):  # xarray: its data (lazy stays lazy), its labels kept
            yx = yx_order(x)
            out = yx.copy(data=self._dispatch(yx.data, adjoint, check)).transpose(*x.dims)
            out.attrs.pop("significant_bits", None)  # the camera's: a blurred float image is no count
            return out
        readable_array(x, "the image")
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise TypeError(f"the image must be a real numeric array, got dtype {x.dtype}")
        if x.ndim != 2:  # (a stack's shape is no other image's: not "build the operator for this image")
            raise ValueError(f"the image must be 2-D (y, x), got shape {tuple(x.shape)}; select a plane first "
                             "(e.g. stack[0])")
        if _is_dask(x):
            known_shape(x.shape)
            return self._map_overlap(x, adjoint)
        xp = array_module(x)
        x = xp.asarray(x)
        if x.shape != self.domain_shape:
            raise ValueError(f"image shape {x.shape} does not match the operator's shape {self.domain_shape}")
        given = x
        with np.errstate(over="ignore"):  # (values beyond float32's range: said below)
            x = x.astype(xp.float32, copy=False)
        if check and not bool(xp.isfinite(x).all()):
            raise non_finite("the image", given if xp is np else None)
        return self._adjoint(x) if adjoint else self._forward(x)

    def _map_overlap(self, x, adjoint):
        if self.window != (0, 0) + self.shape:
            raise ValueError("a restricted window applies to NumPy or CuPy blocks, not Dask arrays; apply the "
                             "full-image operator to the Dask image")
        if x.shape != self.shape:
            raise ValueError(f"dask image shape {x.shape} does not match the operator's shape {self.shape}; build "
                             "the operator for this image (or crop the image to it)")
        from dask.array.overlap import ensure_minimum_chunksize

        r = self.halo
        chunks = x.chunks
        # Every chunk (the last ones too) at least the halo: map_overlap would otherwise rechunk on its
        # own, and the offsets below would place blocks at the wrong origin.
        x = x.rechunk(tuple(ensure_minimum_chunksize(max(r, 1), c) for c in chunks))
        offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in x.chunks]

        from .cluster import shared

        def block_fn(block, whole=None, block_info=None):
            # map_overlap hands over the block with its halo and trims the halo off the result.
            iy, ix = block_info[None]["chunk-location"]
            op = whole.restrict((offsets[0][iy] - r, offsets[1][ix] - r), block.shape)
            with task_threads():  # Dask runs tasks side by side: each its FFTs on its own thread
                return op._dispatch(block, adjoint, check=False)  # Dask images are not scanned (a pass of their own)

        out = x.astype(np.float32).map_overlap(block_fn, depth=r, boundary=0, dtype=np.float32,
                                               whole=shared(self, f"lsfov-operator-{self._token}"))
        return out if out.chunks == chunks else out.rechunk(chunks)  # the caller's chunks: aligned with its arrays

    # ------------------------------------------------------------------ engine
    def _plan(self, xp=np) -> list[_Group]:
        """The cell groups: for CuPy arrays the uniform cells where they apply (see :attr:`uniform_cells`)."""
        use = self.uniform_cells if self.uniform_cells is not None else xp is not np
        key = bool(use)
        if self._plan_cache is None:
            self._plan_cache = {}
        if key not in self._plan_cache:
            groups = self._cells()
            if use and not groups[0].single:
                groups = self._uniform_cells(groups, limit=None if self.uniform_cells else 1.5) or groups
            self._plan_cache[key] = groups
        return self._plan_cache[key]

    def _cells(self) -> list[_Group]:
        oy, ox, h, w = self.window
        r = self.halo
        pad = 2 * r
        groups = []
        if self.kind == "grid":
            for cy in _axis_cells(self.centers[0], oy, h, pad):
                for cx in _axis_cells(self.centers[1], ox, w, pad):
                    # The unused upper node of a one-node axis has zero weight: dropped.
                    rows = [(wy, ny) for wy, ny in ((cy.w_lo, cy.node_lo), (cy.w_hi, cy.node_hi)) if wy.any()]
                    cols = [(wx, nx) for wx, nx in ((cx.w_lo, cx.node_lo), (cx.w_hi, cx.node_hi)) if wx.any()]
                    terms = [(tuple(f if not np.all(f == 1) else None
                                    for f in (wy[:, None, :, None], wx[None, :, None, :])),
                              ny[:, None] * self.kernels.shape[1] + nx[None, :])
                             for wy, ny in rows for wx, nx in cols]
                    fshape = (next_fast_len(cy.length.max() + pad), next_fast_len(cx.length.max() + pad))
                    groups.append(_Group(cy.start, cy.length, cx.start, cx.length, fshape, terms,
                                         sep=(len(rows), len(cols))))
            if len(groups) == 1 and groups[0].ys.size == 1 and groups[0].xs.size == 1:
                # No node inside the window: one cell, centred kernels need only r of zero padding.
                g = groups[0]
                g.single = True
                g.fshape = self._single_fshape(h, w)
        else:
            maps = _window_of(self.maps, self.window, self.shape)
            terms = [((maps[i][None, None],), np.array([[i]])) for i in range(maps.shape[0])]
            groups.append(_Group(np.array([0]), np.array([h]), np.array([0]), np.array([w]), self._single_fshape(h, w),
                                 terms, True))
        return groups

    def _uniform_cells(self, groups, limit=None):
        """The grid's cells as one group of equal tiles, or None where that does not apply or costs
        over ``limit`` times the FFT area of ``groups`` (the plan by FFT length).

        With equally spaced nodes (spacing ``s`` whole pixels, at least the kernel's size less one)
        the cell between nodes k and k+1 is ``[ceil(c_k), ceil(c_k) + s)`` and the hat weights are
        the same function of the position within every cell. The constant parts beyond the outer
        nodes become cells of virtual nodes beyond them that carry the outer node's PSF (weights
        ``1 - t`` and ``t`` of one kernel: the same operator). One batch of equal tiles then needs
        no loop over cells: a GPU launches a few kernels per pass instead of a few per cell.
        """
        oy, ox, h, w = self.window
        r = self.halo
        axes = []
        for ax, (o, n) in enumerate(((oy, h), (ox, w))):
            u = self._uniform_axis(ax)
            if u is None:
                return None
            s, c0, g = u
            b0 = int(math.ceil(c0 - 1e-12))
            k0 = (o - b0) // s  # the first cell that reaches the window
            k = np.arange(k0, -((b0 - o - n) // s))  # to the last one (ceil division)
            t = ((b0 - c0) + np.arange(s)) / s  # the same within every cell
            axes.append((s, b0 + k0 * s - o, k, np.clip(k, 0, g - 1), np.clip(k + 1, 0, g - 1),
                         (1.0 - t).astype(np.float32), t.astype(np.float32)))
        (sy, ty, ky, lo_y, hi_y, wly, why), (sx, tx, kx, lo_x, hi_x, wlx, whx) = axes
        na, nb = len(ky), len(kx)
        fshape = (next_fast_len(sy + 2 * r), next_fast_len(sx + 2 * r))
        area = sum(len(g.ys) * len(g.xs) * g.fshape[0] * g.fshape[1] for g in groups)
        if limit is not None and na * nb * fshape[0] * fshape[1] > limit * area:
            return None
        gx = self.kernels.shape[1]
        pairs = [(wy[:, None] * wx[None, :], ny[:, None] * gx + nx[None, :])
                 for wy, ny in ((wly, lo_y), (why, hi_y)) for wx, nx in ((wlx, lo_x), (whx, hi_x))]
        return [_Group(ty + sy * np.arange(na), np.full(na, sy), tx + sx * np.arange(nb), np.full(nb, sx), fshape,
                       [(None, ids) for _, ids in pairs], weights=np.stack([wt for wt, _ in pairs]).astype(np.float32))]

    def _uniform_axis(self, axis: int):
        """The equal cells of one axis (see :meth:`_uniform_cells`): ``(spacing, first centre, node
        count)``, or None where its nodes are not equally spaced whole pixels at least the kernel's
        size less one apart."""
        c = np.asarray(self.centers[axis], dtype=np.float64)
        if len(c) < 2:
            return None
        s = c[1] - c[0]
        if abs(s - round(s)) > 1e-9 or np.abs(np.diff(c) - s).max() > 1e-9 or round(s) < 2 * self.halo:
            return None
        return int(round(s)), float(c[0]), len(c)

    def _single_fshape(self, h, w):
        # Centred kernels: r pixels of zero padding suffice; a periodic window needs none.
        k, r = self.kernel_size, self.halo
        # At least the kernel: a window narrower than the halo still holds whole kernels.
        return tuple(next_fast_len(max(k, n + (0 if p and n >= k else r))) for n, p in zip((h, w), self.periodic))

    def _kernel_spectra(self, fshape, centred: bool, conj: bool, xp, ids=None):
        """Spectra of the kernels ``ids`` (default: all, flat indices) at one FFT shape,
        (len(ids), fy, fx//2 + 1) complex64, cached.

        ``centred`` kernels are rolled so that their centre sits at index 0: the convolution output
        is then aligned with its input and needs only ``r`` pixels of zero padding. A window of a
        large grid uses a few of its kernels: only those are transformed and kept, which bounds the
        cache by the window, not by the number of PSFs.
        """
        ids = tuple(range(self.n_psfs)) if ids is None else tuple(ids)

        def make():
            if conj:
                return self._kernel_spectra(fshape, centred, False, xp, ids).conj()
            k = self.kernel_size
            flat = xp.asarray(self._node_kernels(ids))
            padded = xp.zeros((flat.shape[0],) + tuple(fshape), dtype=xp.float32)
            padded[:, :k, :k] = flat
            if centred:
                padded = xp.roll(padded, (-self.halo, -self.halo), axis=(1, 2))
            return fft_module(padded).rfft2(padded).astype(xp.complex64, copy=False)

        return self._cache.get((tuple(fshape), centred, conj, xp.__name__, ids), make)

    def _spectra(self, gi: int, group: _Group, xp, conj: bool = False):
        """Kernel spectra of a group's terms, each broadcastable against its tiles."""
        key = (gi, conj, xp.__name__)
        if key not in self._group_spectra:
            used = np.unique(np.concatenate([np.ravel(ids) for _, ids in group.terms]))
            allk = self._kernel_spectra(group.fshape, group.single, conj, xp, used.tolist())
            pos = {int(i): j for j, i in enumerate(used)}
            if group.single:  # one kernel per term: a view, no copy
                self._group_spectra[key] = [allk[pos[int(ids.flat[0])]] for _, ids in group.terms]
            elif all(ids.size == 1 for _, ids in group.terms):  # one cell (a block's window): views too
                self._group_spectra[key] = [allk[None, pos[int(ids.flat[0])], None] for _, ids in group.terms]
            else:
                self._group_spectra[key] = [allk[xp.asarray(np.vectorize(pos.get)(ids))] for _, ids in group.terms]
        return self._group_spectra[key]

    def _weights(self, group, xp):
        """Basis form: each term's 2-D map. Grid form: the row factors and the column factors
        (None where all ones), each broadcastable to the group's tiles (2-D for a single cell)."""
        key = ("w", id(group), xp.__name__)
        if key not in self._group_spectra:
            def put(f):
                if f is None:
                    return None
                return xp.asarray(f.reshape(f.shape[-2:]) if group.single else f)

            if group.sep is None:
                w = [tuple(put(f) for f in factors) for factors, _ in group.terms]
            else:
                ny, nx = group.sep
                w = ([put(group.terms[i * nx][0][0]) for i in range(ny)],
                     [put(group.terms[j][0][1]) for j in range(nx)])
            self._group_spectra[key] = w
        return self._group_spectra[key]

    def _forward(self, u):
        xp, fft = array_module(u), fft_module(u)
        h, w = u.shape
        r = self.halo
        groups = self._plan(xp)
        if groups[0].single:
            g = groups[0]
            if g.sep is None:  # basis: 2-D coefficient maps
                acc = None
                for (f,), spec in zip(self._weights(g, xp), self._spectra(0, g, xp)):
                    term = fft.rfft2(u * f, s=g.fshape)
                    term *= spec
                    acc = term if acc is None else _iadd(acc, term)
            else:
                acc = _sep_forward(u, *self._weights(g, xp), self._spectra(0, g, xp), g.fshape, fft)
            return fft.irfft2(acc, s=g.fshape, overwrite_x=True)[:h, :w]
        if groups[0].uniform:
            return self._forward_uniform(u, groups[0], xp, fft)
        out = xp.zeros((h + 2 * r, w + 2 * r), dtype=xp.float32)  # full linear convolution support

        def cells(item):
            g, sl, (wy, wx), spec = item
            acc = _sep_forward(_gather(u, g.ys[sl], g.xs, *g.tile), wy, wx, spec, g.fshape, fft)
            return fft.irfft2(acc, s=g.fshape, overwrite_x=True)

        items = self._items(groups, xp, conj=False, parts=threads_for(u))
        for (g, sl, _, _), res in zip(items, parallel_map(cells, items, like=u)):
            # Overlap-add, in a fixed order: a memory-bound slice add per cell (the FFTs are batched).
            for a, (y0, ny) in enumerate(zip(g.ys[sl], g.yl[sl])):
                y0, ny = int(y0), int(ny) + 2 * r
                for b in range(len(g.xs)):
                    x0, nx = int(g.xs[b]), int(g.xl[b]) + 2 * r
                    out[y0 : y0 + ny, x0 : x0 + nx] += res[a, b, :ny, :nx]
        return out[r : r + h, r : r + w]

    def _uniform_parts(self, g, like):
        """Work items of an equal-cell group: bands of cell rows, each band's terms at most 512 MB of
        spectra (a GPU's memory), or one band per thread (NumPy from the main thread)."""
        na, nb = len(g.ys), len(g.xs)
        size = len(g.terms) * na * nb * g.fshape[0] * (g.fshape[1] // 2 + 1) * 8
        return row_bands(na, max(threads_for(like), -(-size // (512 << 20))))

    def _uniform_arrays(self, g, xp, conj):
        """An equal-cell group's kernel spectra (T, na, nb, fy, fx//2 + 1) and term weights (T, 1, 1, sy, sx)."""
        key = ("uniform", id(g), conj, xp.__name__)
        if key not in self._group_spectra:
            ids = np.stack([ids for _, ids in g.terms])
            used = np.unique(ids)
            allk = self._kernel_spectra(g.fshape, False, conj, xp, used.tolist())
            self._group_spectra[key] = (allk[xp.asarray(np.searchsorted(used, ids))],
                                        xp.asarray(g.weights[:, None, None]))
        return self._group_spectra[key]

    def _forward_uniform(self, u, g, xp, fft):
        """:meth:`_forward` on equal cells: the tiles are a view of the zero-padded image, the terms
        ``F(w_t . tile)`` one batched 2-D FFT, and the overlap-add four strided passes (cores, then the
        bottom, right and corner margins of all tiles: within a pass no two tiles meet, as the
        margins, 2r, are at most a cell)."""
        (h, w), r, (sy, sx) = u.shape, self.halo, g.tile
        na, nb, ty, tx = len(g.ys), len(g.xs), -int(g.ys[0]), -int(g.xs[0])
        spec, wts = self._uniform_arrays(g, xp, conj=False)
        padded = xp.zeros((na * sy, nb * sx), dtype=xp.float32)  # tile space, the window at (ty, tx)
        padded[ty : ty + h, tx : tx + w] = u
        tiles = padded.reshape(na, sy, nb, sx).transpose(0, 2, 1, 3)

        def cells(sl):
            buf = xp.zeros((len(wts), sl.stop - sl.start, nb) + tuple(g.fshape), dtype=xp.float32)
            xp.multiply(tiles[sl], wts, out=buf[..., :sy, :sx])
            terms = fft.rfft2(buf)
            terms *= spec[:, sl]
            return sl, fft.irfft2(terms.sum(axis=0), s=g.fshape, overwrite_x=True)

        results = list(parallel_map(cells, self._uniform_parts(g, u), like=u))
        out = xp.zeros(((na + 1) * sy, (nb + 1) * sx), dtype=xp.float32)  # index i: window position i - ty - r
        rows, cols = ([(0, n)] + ([(n, 2 * r)] if r else []) for n in (sy, sx))  # (offset, length): cores, margins
        for (oy, ly), (ox, lx) in ((a, b) for a in rows for b in cols):
            for sl, res in results:  # pass by pass, whatever the bands: the same order of sums
                a0, a1 = sl.start, sl.stop
                view = out[oy + a0 * sy : oy + a1 * sy, ox : ox + nb * sx].reshape(a1 - a0, sy, nb, sx)
                view[:, :ly, :, :lx] += res[:, :, oy : oy + ly, ox : ox + lx].transpose(0, 2, 1, 3)
        return out[ty + r : ty + r + h, tx + r : tx + r + w]

    def _adjoint_uniform(self, v, g, xp, fft):
        """:meth:`_adjoint` on equal cells: the tiles (each with its margins) one strided view of the
        padded data, the terms one batched inverse 2-D FFT, the cells written back through one view."""
        (h, w), r, (sy, sx) = v.shape, self.halo, g.tile
        na, nb, ty, tx = len(g.ys), len(g.xs), -int(g.ys[0]), -int(g.xs[0])
        spec, wts = self._uniform_arrays(g, xp, conj=True)
        vpad = xp.zeros((na * sy + 2 * r, nb * sx + 2 * r), dtype=xp.float32)  # index j: position j - ty - r
        vpad[ty + r : ty + r + h, tx + r : tx + r + w] = v
        e = vpad.itemsize
        view = xp.lib.stride_tricks.as_strided(vpad, shape=(na, nb, sy + 2 * r, sx + 2 * r),
                                               strides=(sy * vpad.shape[1] * e, sx * e, vpad.shape[1] * e, e))
        out = xp.empty((na, sy, nb, sx), dtype=xp.float32)

        def cells(sl):
            tiles = xp.zeros((sl.stop - sl.start, nb) + tuple(g.fshape), dtype=xp.float32)
            tiles[..., : sy + 2 * r, : sx + 2 * r] = view[sl]
            terms = fft.irfft2(fft.rfft2(tiles) * spec[:, sl], s=g.fshape, overwrite_x=True)[..., :sy, :sx]
            terms *= wts
            out[sl] = terms.sum(axis=0).transpose(0, 2, 1, 3)

        for _ in parallel_map(cells, self._uniform_parts(g, v), like=v):
            pass
        return out.reshape(na * sy, nb * sx)[ty : ty + h, tx : tx + w]

    def _items(self, groups, xp, conj, parts):
        """Work items of the cell groups: (group, slice of its cell rows, weights, spectra). For
        ``parts`` threads, groups of several cell rows are cut in parts so that the threads share the work."""
        items = []
        for gi, g in enumerate(groups):
            (wy, wx), spec = self._weights(g, xp), self._spectra(gi, g, xp, conj=conj)
            for sl in row_bands(len(g.ys), parts):
                items.append((g, sl, ([None if f is None else f[sl] for f in wy], wx), [s[sl] for s in spec]))
        return items

    def _adjoint(self, v):
        xp, fft = array_module(v), fft_module(v)
        h, w = v.shape
        r = self.halo
        groups = self._plan(xp)
        if groups[0].uniform:
            return self._adjoint_uniform(v, groups[0], xp, fft)
        if groups[0].single:
            g = groups[0]
            V = fft.rfft2(v, s=g.fshape)
            specs = self._spectra(0, g, xp, conj=True)
            if g.sep is not None:
                return _sep_adjoint(V, *self._weights(g, xp), specs, g.fshape, (h, w), fft)
            acc = None  # basis: 2-D coefficient maps
            for i, ((f,), spec) in enumerate(zip(self._weights(g, xp), specs)):
                if i == len(specs) - 1:
                    V *= spec  # last term: reuse V's memory
                    c = fft.irfft2(V, s=g.fshape, overwrite_x=True)[:h, :w]
                else:
                    c = fft.irfft2(V * spec, s=g.fshape, overwrite_x=True)[:h, :w]
                c *= f  # c is a fresh FFT output: scale it in place
                acc = c if acc is None else _iadd(acc, c)
            return acc
        out = xp.empty((h, w), dtype=xp.float32)
        vpad = xp.pad(v, r)

        def cells(item):
            g, sl, (wy, wx), spec = item
            ly, lx = g.tile
            tiles = _gather(vpad, g.ys[sl], g.xs, ly + 2 * r, lx + 2 * r, size=g.fshape)
            acc = _sep_adjoint(fft.rfft2(tiles), wy, wx, spec, g.fshape, (ly, lx), fft)
            # Cells tile the window without overlap: a slice copy per cell (cheaper than fancy indexing).
            for a, (y0, ny) in enumerate(zip(g.ys[sl], g.yl[sl])):
                y0, ny = int(y0), int(ny)
                for b in range(len(g.xs)):
                    x0, nx = int(g.xs[b]), int(g.xl[b])
                    out[y0 : y0 + ny, x0 : x0 + nx] = acc[a, b, :ny, :nx]

        items = self._items(groups, xp, conj=True, parts=threads_for(v))
        for _ in parallel_map(cells, items, like=v):
            pass
        return out

    def adjoint_ones(self, like=None):
        """``H^T 1`` on this operator's window, ``1`` the indicator of the image.

        This is the Richardson-Lucy normaliser: how much of a unit source at each pixel lands inside
        the image. At least :attr:`halo` pixels inside the image it is ``sum_p w_p sum(k_p)``,
        computed without FFTs; more than that outside, zero; in the bands within the halo of the
        image's edges, the exact adjoint, computed on those bands only (a block of a slide pays a
        few percent of one adjoint, not a whole one). On a restricted window the outer :attr:`halo`
        pixels are not exact (they would need data beyond the window).

        Parameters
        ----------
        like : array, optional
            An array whose type (NumPy, CuPy) the result takes; NumPy by default.

        Returns
        -------
        array, float32, (h, w) of the window
            ``H^T 1``.
        """
        xp = np if like is None else array_module(like)
        oy, ox, h, w = self.window
        H, W = self.shape
        r = self.halo
        out = self._weight_sums()
        if oy >= r and ox >= r and oy + h <= H - r and ox + w <= W - r:
            return xp.asarray(out)
        for axis, (o, n, N) in enumerate(((oy, h, H), (ox, w, W))):
            idx = [slice(None), slice(None)]
            idx[axis] = slice(0, max(0, min(n, -r - o)))  # beyond the halo before the image: no light
            out[tuple(idx)] = 0
            idx[axis] = slice(max(0, N + r - o), n)  # and after it
            out[tuple(idx)] = 0
            for edge in (0, N):
                a, b = max(edge - r, o), min(edge + r, o + n)  # image coordinates of the band, in the window
                if a >= b:
                    continue
                band = [oy, ox, h, w]  # the band grown by the halo, along the other axis the whole window
                band[axis], band[axis + 2] = a - r, b - a + 2 * r
                idx[axis] = slice(a - o, b - o)
                out[tuple(idx)] = to_numpy(self._band_adjoint_ones(tuple(band), xp))[
                    (slice(r, r + b - a), slice(None)) if axis == 0 else (slice(None), slice(r, r + b - a))]
        return xp.asarray(out)

    def _band_adjoint_ones(self, window, xp):
        """The exact ``H^T 1`` on a window (its outer halo aside), by one adjoint."""
        oy, ox, h, w = window
        H, W = self.shape
        sub = self._view(window)
        mask = np.zeros((h, w), dtype=np.float32)
        mask[max(0, -oy) : max(0, min(h, H - oy)), max(0, -ox) : max(0, min(w, W - ox))] = 1.0
        return sub._adjoint(xp.asarray(mask))

    def _weight_sums(self) -> np.ndarray:
        """``sum_p w_p(j) sum(k_p)`` on the window (float32)."""
        oy, ox, h, w = self.window
        sums = self.kernel_sums()
        if self.kind == "basis":  # I maps (a handful), summed in order: no BLAS threads inside Dask's (below)
            maps = _window_of(self.maps, self.window, self.shape)
            out = np.zeros(maps.shape[1:], np.float64)
            for s, m in zip(sums, maps):
                out += s * m
            return out.astype(np.float32)
        # Two hats per pixel and axis: interpolated by indexing, not as a product of hat matrices, whose
        # BLAS threads, inside each of Dask's, made the chunked TV-RL 1.4x slower than the whole (2048²).
        (ly, hy, ty), (lx, hx, tx) = (_hat_weights(c, np.arange(o, o + n, dtype=np.float64))
                                      for c, o, n in zip(self.centers, (oy, ox), (h, w)))
        rows = sums[ly] * (1.0 - ty)[:, None] + sums[hy] * ty[:, None]  # (h, gx)
        return (rows[:, lx] * (1.0 - tx) + rows[:, hx] * tx).astype(np.float32)

    # ------------------------------------------------------------------ storage
    def save(self, path, *, overwrite: bool = False):
        """Write the operator to a zarr v3 store, atomically (see :func:`lsfov.io.atomic_directory`).

        Layout: ``kernels`` (float32; dims ``gy, gx, ky, kx`` in chunks of 8 x 8 nodes, or ``basis, ky, kx``),
        ``centers_y``/``centers_x`` (grid form) or ``maps`` (basis form, ``basis, y, x``, chunked,
        streamed from NumPy, zarr or Dask maps), and the root attribute ``lsfov`` with the kind, shape
        and :attr:`attrs`. Read it back with :meth:`load` (``xarray.open_zarr`` reads it too).

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
        ValueError
            For a restricted operator (see :meth:`restrict`), or a ``path`` named like another format.
        FileExistsError
            If ``path`` exists and ``overwrite`` is False, or it is neither a zarr store nor empty.
        """
        import zarr

        from .io import atomic_directory, check_result_name

        self._check_full("save()")
        check_result_name(path)
        with atomic_directory(path, overwrite=overwrite) as tmp:
            self._write(zarr.open_group(str(tmp), mode="w", zarr_format=3))
            with warnings.catch_warnings():  # consolidated: xarray opens it without a warning of its own
                warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
                zarr.consolidate_metadata(str(tmp))
        return Path(path)

    def _check_full(self, what: str):
        if self.window != (0, 0) + self.shape:
            raise ValueError(f"{what} applies to a full-image operator, not a restricted window")

    def _write(self, root):
        """Write the operator into the empty zarr group ``root`` (the layout :meth:`save` describes)."""
        import dask.array as da

        from .cluster import compute
        from .io import _jsonable, _version

        # Dimension names: xarray.open_zarr(path) reads the store as one Dataset.
        lead = ["gy", "gx"] if self.kind == "grid" else ["basis"]
        # (slab by slab, in chunks of a few nodes: a slide's grid is read back window by window)
        copy_kernels(self.kernels, root, "kernels", dimension_names=[*lead, "ky", "kx"])
        if self.kind == "grid":
            for name, dim, c in zip(("centers_y", "centers_x"), ("gy", "gx"), self.centers):
                arr = root.create_array(name, data=np.asarray(c, np.float64), dimension_names=[dim])
                arr.attrs.update(units="pixel", long_name="node centre (pixel index in the image)")
            root["kernels"].attrs["coordinates"] = "centers_y centers_x"  # (CF: xarray reads them as coordinates)
        else:
            shape = (self.kernels.shape[0],) + self.shape
            chunks = (1, min(1024, self.shape[0]), min(1024, self.shape[1]))
            maps = root.create_array("maps", shape=shape, chunks=chunks, dtype=np.float32, fill_value=0,
                                     dimension_names=["basis", "y", "x"])
            maps.attrs["long_name"] = "coefficient of each basis kernel at each pixel"
            if isinstance(self.maps, np.ndarray):  # in this process's memory: written from here, not through a cluster
                for i in range(shape[0]):
                    maps[i] = self.maps[i].astype(np.float32, copy=False)
            else:
                src = self.maps if isinstance(self.maps, da.Array) else da.from_array(self.maps, chunks=chunks)
                compute(da.store(src.astype(np.float32).rechunk(chunks), maps, lock=False, compute=False))
        root.attrs["lsfov"] = {
            "type": "ProductConvolution", "kind": self.kind, "shape": list(self.shape),
            "kernel_size": self.kernel_size, "version": _version(), "attrs": _jsonable(self.attrs),
            "complete": True,
        }

    @classmethod
    def load(cls, path) -> "ProductConvolution":
        """Read an operator written by :meth:`save` (or the ``operator`` group of an lsfov result).

        Basis maps stay on disk and are read window by window, and so do a grid's kernels over
        :data:`KERNELS_ON_DISK_BYTES` (a slide's PSF map): a slide-sized operator costs no memory
        until it is applied, and then only its windows'.

        Parameters
        ----------
        path : str or Path
            The operator's store, or a result directory holding one as its ``operator`` group.

        Returns
        -------
        ProductConvolution

        Raises
        ------
        TypeError
            If ``path`` is not a str or Path.
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If it is not an lsfov operator, or its write was interrupted.
        """
        import zarr

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a file or directory name (str or Path), got {shown(path)}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such operator: {path}")
        if not _operator_meta(path) and _operator_meta(path / "operator"):  # a result's (not a variable so named)
            path = path / "operator"
        meta = _operator_meta(path)
        if meta is None:
            from .io import _damaged_metadata, _group_attrs

            damaged = _damaged_metadata(path)
            if damaged:
                raise ValueError(damaged)
            result = _group_attrs(path).get("lsfov") or {}
            if "psf_model" in (result.get("attrs") or {}):
                raise ValueError(f"{path} is a PSF map, not an operator: give it as --psf-map (Python: "
                                 "lsfov.operator_from_psf_map(lsfov.open_result(path)))")
            if "variables" in result:
                raise ValueError(f"{path} is an lsfov result that stores no operator (lsfov bss results do); "
                                 "give an operator store")
            raise ValueError(f"{path} is not an lsfov operator; write one with ProductConvolution.save or lsfov.save")
        if not meta.get("complete"):
            raise ValueError(f"{path} is an incomplete operator (the write was interrupted); save it again")
        # absolute: lazy maps are read on workers, which may start in another directory
        # (not the consolidated metadata: it would list an array whose files are gone)
        root = zarr.open_group(str(path.resolve()), mode="r", use_consolidated=False)
        parts = ("kernels", "centers_y", "centers_x") if meta["kind"] == "grid" else ("kernels", "maps")
        missing = [n for n in parts if n not in root]
        if missing:
            raise ValueError(f"{path} is damaged: its {', '.join(missing)} array is missing; save it again")
        kernels = root["kernels"]
        attrs = meta.get("attrs") or {}
        if meta["kind"] != "grid" or kernels.nbytes <= KERNELS_ON_DISK_BYTES:
            kernels = np.asarray(kernels[...], dtype=np.float32)
        if meta["kind"] == "grid":
            centers = (np.asarray(root["centers_y"][...]), np.asarray(root["centers_x"][...]))
            return cls.from_grid(kernels, tuple(meta["shape"]), centers=centers, attrs=attrs)
        return cls.from_basis(kernels, root["maps"], attrs=attrs)

    # ------------------------------------------------------------------ inspection
    def local_psfs(self) -> np.ndarray:
        """Local PSFs sampled where they vary: the grid's nodes, or the basis form at every
        ``max(1, H // 32)``-th row and ``max(1, W // 32)``-th column (about 32 to 63 positions an axis;
        every pixel of an axis under 64 px; maps vary slowly). What norms and gains of the operator are estimated
        from. Lazy maps are read by strided slices: the chunks that hold a sample (every chunk of a
        store whose chunks are under about H/32), once per operator. A grid's are made anew at each
        call, not kept: the grid of a whole slide's PSF map holds gigabytes of kernels, and this copy
        is twice their bytes.

        Returns
        -------
        ndarray, float64, shape (N, K, K)
            The local PSFs, read-only.
        """
        if self.kind == "grid":
            local = np.asarray(to_numpy(self.kernels), dtype=np.float64).reshape(-1, self.kernel_size, self.kernel_size)
            local.flags.writeable = False
            return local
        if getattr(self, "_local", None) is None:
            k = np.asarray(to_numpy(self.kernels), dtype=np.float64)
            h, w = self.shape
            alpha = np.asarray(self.maps[:, :: max(1, h // 32), :: max(1, w // 32)], dtype=np.float64)
            local = (alpha.reshape(k.shape[0], -1).T @ k.reshape(k.shape[0], -1)).reshape(-1, *k.shape[-2:])
            local.flags.writeable = False
            self._local = local
        return self._local

    def psf_at(self, y: float, x: float) -> np.ndarray:
        """The local PSF at an image position.

        Grid form: the bilinear blend of the nodes' PSFs; basis form: the kernels weighted by the
        bilinearly interpolated coefficient maps.

        Parameters
        ----------
        y, x : float
            Position in pixel coordinates (fractional allowed), within the image: in
            [-0.5, H - 0.5] x [-0.5, W - 0.5] of the full :attr:`shape`.

        Returns
        -------
        ndarray, float32, shape (K, K)
            The PSF at (y, x).

        Raises
        ------
        TypeError
            If ``y`` or ``x`` is not a number.
        ValueError
            If the position is not finite or lies outside the image.
        """
        y, x = real_number(y, "y"), real_number(x, "x")
        if not (-0.5 <= y <= self.shape[0] - 0.5 and -0.5 <= x <= self.shape[1] - 0.5):
            raise ValueError(f"position ({y}, {x}) lies outside the image of shape {self.shape}")
        if self.kind == "grid":  # the (at most) 2 x 2 nodes around, read alone
            (ly, hy, ty), (lx, hx, tx) = (_hat_weights(c, np.array(p)) for c, p in zip(self.centers, (y, x)))
            wy, wx = np.zeros(int(hy - ly) + 1), np.zeros(int(hx - lx) + 1)
            for wv, t in ((wy, float(ty)), (wx, float(tx))):
                wv[0] += 1 - t
                wv[-1] += t
            k = to_numpy(self.kernels[int(ly) : int(hy) + 1, int(lx) : int(hx) + 1])
            return np.einsum("i,j,ijkl->kl", wy, wx, k).astype(np.float32)
        k = to_numpy(self.kernels)
        from scipy.ndimage import map_coordinates

        iy, ix = int(math.floor(y)), int(math.floor(x))
        y0, x0 = max(0, min(iy, self.shape[0] - 2)), max(0, min(ix, self.shape[1] - 2))
        patch = np.asarray(self.maps[:, y0 : y0 + 2, x0 : x0 + 2], dtype=np.float64)
        coords = np.array([[min(max(y - y0, 0.0), patch.shape[1] - 1)], [min(max(x - x0, 0.0), patch.shape[2] - 1)]])
        alpha = np.array([map_coordinates(m, coords, order=1, mode="nearest")[0] for m in patch])
        return np.tensordot(alpha, k, axes=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- helpers


def _operator_meta(path):
    import zarr

    try:
        meta = zarr.open_group(str(path), mode="r").attrs.get("lsfov")
    except Exception:  # not a zarr group at all
        return None
    return meta if isinstance(meta, dict) and meta.get("type") == "ProductConvolution" else None


def _is_dask(x) -> bool:
    return type(x).__module__.startswith("dask")


def _iadd(acc, term):
    acc += term
    return acc


def _scale_rows(a, f, out=None):
    """``a * f`` for complex ``a`` and a real factor ``f`` (broadcastable, constant along the last
    axis), written to ``out`` (default: in place). On NumPy the product runs on the float view of
    the complex numbers, which skips the complex-by-real loop (about 1.3x faster here)."""
    out = a if out is None else out
    if array_module(a) is np:
        np.multiply(a.view(a.real.dtype), f, out=out.view(out.real.dtype))
    else:
        array_module(a).multiply(a, f, out=out)
    return out


def _sep_forward(x, wy, wx, spec, fshape, fft):
    """``sum_ij spec[i, j] . F(wy[i] wx[j] x)`` (half spectra of size ``fshape``), ``x`` zero-padded.

    Bilinear weights are products of a row factor ``wy`` (a function of y) and a column factor ``wx``
    (None: all ones). The transform over x commutes with ``wy`` and the one over y with ``wx``, so
    the 2-D FFT is split into its two passes: one x-pass per column factor, over the tiles' rows
    only, and one y-pass per term. Four terms cost 2 + 4 passes instead of 4 x 2.
    """
    xp = array_module(x)
    fy, fx = fshape
    ly, lx = x.shape[-2:]
    rows = []
    for f in wx:
        if f is None and lx == fx:
            rows.append(fft.rfft(x, axis=-1))
            continue
        buf = xp.zeros(x.shape[:-1] + (fx,), dtype=xp.float32)  # padded here: one pass, no FFT-side copy
        if f is None:
            buf[..., :lx] = x
        else:
            xp.multiply(x, f, out=buf[..., :lx])
        rows.append(fft.rfft(buf, axis=-1))
    acc = spare = None  # spare: a term buffer already added to acc, reused (fresh pages cost time)
    for i, f in enumerate(wy):
        for j, row in enumerate(rows):
            if f is None and ly == fy and len(wy) == 1:  # each row spectrum is used once: transform in place
                term = row
            else:
                if spare is None:
                    term = xp.zeros(row.shape[:-2] + (fy, row.shape[-1]), dtype=xp.complex64)
                else:
                    term, spare = spare, None
                    term[..., ly:, :] = 0
                if f is None:
                    term[..., :ly, :] = row
                else:
                    _scale_rows(row, f, out=term[..., :ly, :])
            term = fft.fft(term, axis=-2, overwrite_x=True)
            multiply(term, spec[i * len(rows) + j], out=term)
            if acc is None:
                acc = term
            else:
                acc += term
                spare = term
    return acc


def _sep_adjoint(V, wy, wx, spec, fshape, size, fft):
    """Adjoint of :func:`_sep_forward`: the ``size`` top-left part of
    ``sum_ij wy[i] wx[j] F^-1(spec[i, j] . V)``, for ``V`` the half spectrum of the data and ``spec``
    the conjugated kernel spectra. One y-pass per term, and one x-pass per column factor over the
    ``size`` rows kept only."""
    fy, fx = fshape
    ly, lx = size
    acc = spare = None  # spare: a spectrum-sized buffer no longer needed, reused (fresh pages cost time)
    for j, fj in enumerate(wx):
        col = None
        for i, fi in enumerate(wy):
            last = j == len(wx) - 1 and i == len(wy) - 1  # V is not needed after this term
            full = multiply(V, spec[i * len(wx) + j], out=V if last else spare)
            full = fft.ifft(full, axis=-2, overwrite_x=True)
            t = full[..., :ly, :]
            if fi is not None:
                _scale_rows(t, fi)
            if col is None:
                col, col_full, spare = t, full, None
            else:
                col += t
                spare = full
        c = fft.irfft(col, n=fx, axis=-1, overwrite_x=True)[..., :lx]
        spare = col_full
        if fj is not None:
            c *= fj
        acc = c if acc is None else _iadd(acc, c)
    return acc


def _gather(img, ys, xs, ly, lx, size=None):
    """Tiles ``img[ys[a]:ys[a]+ly, xs[b]:xs[b]+lx]`` as an (na, nb, ly, lx) array (zero past the edge).

    ``size``: a larger tile shape (an FFT shape) to zero-pad the tiles into.
    """
    xp = array_module(img)
    h, w = img.shape
    out = xp.zeros((len(ys), len(xs)) + tuple(size or (ly, lx)), dtype=img.dtype)
    for a, y0 in enumerate(int(v) for v in ys):
        ny = max(0, min(ly, h - y0))
        for b, x0 in enumerate(int(v) for v in xs):
            nx = max(0, min(lx, w - x0))
            out[a, b, :ny, :nx] = img[y0 : y0 + ny, x0 : x0 + nx]
    return out


def _window_of(maps, window, shape):
    """Coefficient maps on a window of the image as float32, extended by their edge values beyond it."""
    oy, ox, h, w = window
    H, W = shape
    y0 = min(max(oy, 0), H - 1)
    y1 = max(min(oy + h, H), y0 + 1)
    x0 = min(max(ox, 0), W - 1)
    x1 = max(min(ox + w, W), x0 + 1)
    box = np.asarray(maps[:, y0:y1, x0:x1], dtype=np.float32)  # the only read of a lazy (zarr) map
    if not np.isfinite(box).all():  # NumPy maps are checked whole at construction, lazy ones here
        raise ValueError(f"coefficient maps contain NaN or Inf (rows {y0}:{y1}, columns {x0}:{x1}); fix the maps")
    if (y0, y1, x0, x1) == (oy, oy + h, ox, ox + w):
        return box
    rows = np.clip(np.arange(oy, oy + h), y0, y1 - 1) - y0
    cols = np.clip(np.arange(ox, ox + w), x0, x1 - 1) - x0
    return box[:, rows[:, None], cols[None, :]]


def _as_float_array(a, name):
    if a is None or isinstance(a, (str, bytes, os.PathLike, dict)):  # (None would read as NaN)
        raise TypeError(f"{name} must be an array of numbers, got {shown(a)}"
                        + ("; read the file first (lsfov.open_image, numpy.load)" if isinstance(a, (str, os.PathLike))
                           else ""))
    readable_array(a, name)  # (a masked PSF's hidden values would be its kernel)
    kind = getattr(getattr(a, "dtype", None), "kind", "f")
    if kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    try:
        arr = np.asarray(to_numpy(a) if hasattr(a, "get") else a, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of real numbers, of one length along each axis ({e})") from None
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass a non-empty array")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf values; replace them (they are no blur)")
    return arr


#: A grid operator's kernels stay on disk where :meth:`ProductConvolution.load` finds more than
#: this (a 16384² slide's PSF map at a node every 64 px holds 250 MB of 31² kernels).
KERNELS_ON_DISK_BYTES = 128 << 20

# Nodes read or written at once from kernels on disk (a few rows of a slide's grid).
_SLAB_BYTES = 64 << 20


def on_disk(a) -> bool:
    """Whether ``a`` is a zarr array (read where it is used), not an array in memory."""
    return hasattr(a, "store_path") and hasattr(a, "shape")


def _slabs(kernels):
    """Slices of the first axis of ``kernels``, each about :data:`_SLAB_BYTES`."""
    row = max(1, int(np.prod(kernels.shape[1:])) * 4)
    step = max(1, _SLAB_BYTES // row)
    return [slice(i, min(i + step, kernels.shape[0])) for i in range(0, kernels.shape[0], step)]


def _sums(kernels) -> np.ndarray:
    """Each kernel's sum (float64); from disk slab by slab, refusing NaN or Inf as it reads. A
    kernel's sum is the same, bit for bit, whether its slab or the whole array is summed."""
    if not on_disk(kernels):
        return to_numpy(kernels).sum(axis=(-2, -1), dtype=np.float64)
    out = np.empty(kernels.shape[:-2], np.float64)
    for sl in _slabs(kernels):
        part = np.asarray(kernels[sl], dtype=np.float32)
        if not np.all(np.isfinite(part)):
            raise ValueError("psfs contains NaN or Inf values; replace them (they are no blur)")
        out[sl] = part.sum(axis=(-2, -1), dtype=np.float64)
    return out


def _stored_kernels(a):
    """A zarr array of kernels, checked as :func:`_as_float_array` checks one in memory (its values
    are checked as :func:`_sums` reads them)."""
    if a.dtype.kind not in "biuf":
        raise TypeError(f"psfs must be a real numeric array, got dtype {a.dtype}")
    if 0 in a.shape:
        raise ValueError(f"psfs is empty (shape {a.shape}); pass a non-empty array")
    return a


def empty_kernels(where, shape, name: str | None = None, **kw):
    """A new float32 zarr array of kernels, chunks of 8 x 8 nodes (a window's nodes are read
    together), uncompressed: array ``name`` of the group ``where``, or (no ``name``) an array at the
    path ``where``, replacing what is there."""
    import zarr

    shape = tuple(int(n) for n in shape)
    chunks = tuple(min(8, n) for n in shape[:-2]) + shape[-2:]
    opts = dict(shape=shape, chunks=chunks, dtype=np.float32, compressors=None, **kw)
    return where.create_array(name, **opts) if name else zarr.create_array(str(where), zarr_format=3, overwrite=True,
                                                                          **opts)


def copy_kernels(kernels, where, name: str | None = None, **kw):
    """Write ``kernels`` (in memory or on disk) slab by slab into a new array (:func:`empty_kernels`);
    returns it."""
    z = empty_kernels(where, kernels.shape, name, **kw)
    for sl in _slabs(kernels):
        z[sl] = np.asarray(to_numpy(kernels[sl]), dtype=np.float32)
    return z


def _check_kernel_size(k, shape):
    if k % 2 == 0:
        raise ValueError(f"kernels must have an odd size (centre at K//2), got K={k}")
    if k > min(shape):
        raise ValueError(f"kernel size {k} is larger than the image {shape}; crop the PSFs or use a larger image")


def _register_sizeof():
    """Tell Dask what an operator weighs where it is a value of the graph (:func:`lsfov.cluster.shared`):
    its kernels and in-memory maps (lazy maps are read block by block), which a worker's memory
    accounting would otherwise count as a few dozen bytes."""
    from dask.sizeof import sizeof

    @sizeof.register(ProductConvolution)
    def _(op):
        held = [a for a in (op.kernels, op.maps) if a is not None and not hasattr(a, "__dask_graph__")
                and not hasattr(a, "store_path")]
        return 1000 + sum(int(getattr(a, "nbytes", 0)) for a in held)


_register_sizeof()
