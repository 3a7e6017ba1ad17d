"""PNG figures: people would rather look than read."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import _version, atomic_file

SOFTWARE = f"lsfov {_version()}"  # in every figure's metadata: what a preview may replace (made_by_lsfov)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _stretch(img):
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.nanpercentile(img, [0.5, 99.8])
    return np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)


def _save(fig, path) -> Path:
    """Write a figure atomically (a partial PNG is never left under the final name)."""
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.suffix[1:].lower()  # the temporary name's suffix is not the format's: say it
    kind = kind if kind in fig.canvas.get_supported_filetypes() else "png"
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format=kind, metadata={"png": {"Software": SOFTWARE}, "pdf": {"Creator": SOFTWARE},
                                                         "svg": {"Creator": SOFTWARE}}.get(kind))
    plt.close(fig)
    return path


def made_by_lsfov(path) -> bool:
    """Whether ``path`` is a figure that lsfov wrote (the ``SOFTWARE`` of its metadata): what a
    preview, or a figure with ``--overwrite``, may replace."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".pdf", ".svg"):
            if path.stat().st_size > 64 << 20:  # (lsfov's are a few hundred kB)
                return False
            data = path.read_bytes()  # PDF: /Creator (lsfov ...); SVG: <dc:title>lsfov ...</dc:title>
            return b"/Creator (lsfov" in data or b"<dc:title>lsfov" in data
        from PIL import Image

        with Image.open(path) as im:
            return str(getattr(im, "text", {}).get("Software", "")).startswith("lsfov")
    except Exception:  # not an image, unreadable
        return False


def psf_mosaic(kernels: np.ndarray, max_nodes: int = 16) -> np.ndarray:
    """Tile a (gy, gx, K, K) stack of PSFs into one image, each PSF scaled to its own peak; at most
    ``max_nodes`` per axis, evenly spread (a large map's every node would not be seen anyway)."""
    kernels = np.asarray(kernels)
    for ax in (0, 1):
        if kernels.shape[ax] > max_nodes:
            keep = np.unique(np.linspace(0, kernels.shape[ax] - 1, max_nodes).round().astype(int))
            kernels = np.take(kernels, keep, axis=ax)
    gy, gx, k, _ = kernels.shape
    norm = kernels / np.maximum(kernels.max(axis=(-2, -1), keepdims=True), 1e-12)
    pad = np.pad(norm, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    return pad.transpose(0, 2, 1, 3).reshape(gy * (k + 2), gx * (k + 2))


def map_mosaic(psf_map, max_nodes: int = 16) -> np.ndarray:
    """:func:`psf_mosaic` of a PSF map: only the nodes it shows are rendered (a slide's map has
    hundreds of thousands)."""
    from .estimate.mapping import operator_from_psf_map

    keep = {d: np.unique(np.linspace(0, psf_map.sizes[d] - 1, min(max_nodes, psf_map.sizes[d])).round().astype(int))
            for d in ("gy", "gx")}
    return psf_mosaic(operator_from_psf_map(psf_map.isel(keep)).kernels, max_nodes)


def _aspect(img) -> float:
    """A panel's pixel aspect (height / width) from its y and x coordinates, where it has them in the
    same unit: an image of non-square pixels is shown at its true shape; 1 otherwise."""
    coords = getattr(img, "coords", {})
    if not all(d in coords and coords[d].size > 1 for d in ("y", "x")):
        return 1.0
    if coords["y"].attrs.get("units") != coords["x"].attrs.get("units"):
        return 1.0
    dy, dx = (abs(float(coords[d][1] - coords[d][0])) for d in ("y", "x"))
    return dy / dx if np.isfinite(dy / dx) and dy > 0 and dx > 0 else 1.0


def summary_figure(path, panels: dict, title: str | None = None, quantities: dict | None = None) -> Path:
    """Save a row of image panels ({"title": 2-D array}) as a PNG: images contrast-stretched in grey,
    PSF mosaics on their own scale, and the panels named in ``quantities`` ({title: (vmin, vmax) or
    None for their own range}) as values with a colour bar (a map's parameters, validity, depth)."""
    plt = _plt()
    quantities = quantities or {}
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.3), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels.items()):
        aspect = _aspect(img)
        img = np.asarray(img, dtype=np.float32)
        if name in quantities:
            lo, hi = quantities[name] or (np.nanmin(img), np.nanmax(img))
            from mpl_toolkits.axes_grid1 import make_axes_locatable

            shown = ax.imshow(img, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
            # The bar as tall as the panel, whatever its aspect (a depth panel is wider than high).
            fig.colorbar(shown, cax=make_axes_locatable(ax).append_axes("right", size="4%", pad=0.05))
        else:
            ax.imshow(img if "PSF" in name else _stretch(img), cmap="magma" if "PSF" in name else "gray",
                      interpolation="nearest", aspect=aspect)
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


#: The lowest R² the robustness figure shows; lower points are drawn on it as ▼.
ROBUSTNESS_FLOOR = -0.5


def robustness_figure(path, curves: dict, title: str | None = None) -> Path:
    """R² against degradation strength (paper 000 Fig. 7): one panel per degradation, one line per
    model (``curves``: {model name: lsfov.estimate.robustness(...) result}). R² below
    :data:`ROBUSTNESS_FLOOR` is drawn on the floor as a downward triangle."""
    plt = _plt()
    kinds = ("gaussian", "poisson", "mixed", "illumination")
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.4), squeeze=False, sharey=True)
    # R² below 0 is worse than guessing the mean: show a little of it; a point below the floor is
    # drawn on it as a downward triangle (it still says where the curve went).
    values = np.concatenate([np.asarray(c[k], float).ravel() for c in curves.values() for k in kinds])
    low = float(values[np.isfinite(values)].min()) if np.isfinite(values).any() else 0.0
    floor = max(ROBUSTNESS_FLOOR, min(0.0, low))
    for ax, kind in zip(axes[0], kinds):
        for name, c in curves.items():
            s, r = np.asarray(c["strengths"], float), np.asarray(c[kind], float)
            line, = ax.plot(s, np.maximum(r, floor), marker="o", ms=3, label=name)
            below = r < floor
            if below.any():
                ax.plot(s[below], np.full(below.sum(), floor), "v", ms=7, color=line.get_color(), clip_on=False)
        ax.set_title(f"{kind} {'noise' if kind != 'illumination' else 'gradient'}")
        ax.set_xlabel("strength")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylim(floor, 1.02)
    axes[0][0].set_ylabel("mean R² (valid patches" + ("; ▼ below the axis)" if low < floor else ")"))
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def calibration_figure(path, kernels, maps, comb, *, beads=None, positions=None, map_label="α",
                       title: str | None = None) -> Path:
    """A calibrated operator at a glance (paper 003 Fig. 2-5): the PSF basis (top row), the spatial
    maps (middle row), and the operator applied to a Dirac comb, next to the beads it was learned
    from with the beads that were used circled (bottom row)."""
    plt = _plt()
    kernels = np.asarray(kernels)
    n = max(len(kernels), len(maps), 2)
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 8.4), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, k in enumerate(kernels):
        lim = float(np.abs(k).max()) or 1.0
        axes[0][i].imshow(k, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        axes[0][i].set_title(f"h{i + 1}")
    for j, m in enumerate(maps):
        axes[1][j].imshow(np.asarray(m), cmap="viridis")
        axes[1][j].set_title(f"{map_label}{j + 1}")
    axes[2][0].imshow(_stretch(np.sqrt(np.maximum(np.asarray(comb), 0))), cmap="magma")
    axes[2][0].set_title("operator on a Dirac comb (√)")
    if beads is not None:
        axes[2][1].imshow(_stretch(np.asarray(beads)), cmap="gray")
        if positions is not None and len(positions):
            axes[2][1].scatter(positions[:, 1], positions[:, 0], s=14, facecolors="none", edgecolors="c", lw=0.6)
        axes[2][1].set_title("beads (used: circled)" if positions is not None else "beads")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
