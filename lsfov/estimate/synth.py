"""Training data for the PSF-parameter CNN (paper 000 Sec. II-E-1).

Sharp images come from a library that needs no network: scikit-image's bundled images and three
procedural generators, the paper's synthetic cells [syn] and points [poi] plus natural-like
textures [tex]. Each training sample is a random 128² crop (rotated by a multiple of 90°) with a
random illumination gain and gradient, blurred by a PSF whose parameters are drawn uniformly over
the model's ranges and degraded by Poisson-Gaussian noise (paper 000 Eq. 10). Patches without
measurable texture are flagged invalid, and black and flat patches are added on purpose, so the
network learns to say "I cannot tell".

Generation is batched (one FFT convolution for a whole batch of patches), seeded, and can stream
to a zarr group for sets larger than memory.
"""
from __future__ import annotations

import collections
import functools
from pathlib import Path

import numpy as np
import scipy.fft
from scipy import ndimage

from .. import psf as _psf
from .._backend import next_fast_len
from .._validate import boolean, positive_int, real_number
from ..simulate import _poisson_gaussian

__all__ = ["SOURCES", "library", "synthesize", "open_training_set", "degrade_patches"]

PATCH = 128
UNIT = 64  # patches per child random generator (see synthesize)
# scikit-image images (bundled, no download) split so that the test set holds images never seen in
# training; the procedural sources use disjoint seeds per split. Each image is area-reduced by the
# factor given: a source that is itself blurred makes its labels wrong (the patch's blur is then the
# PSF's *and* the image's own). The test images carry under about 0.4 px of their own; skimage's
# "cell" (about 1.7 px even halved) and "clock" are left out. moon, grass, text and hubble carry
# 0.4-0.6 px, some label noise at the smallest widths: the shipped models were trained with them.
# chelsea, coffee, rocket and matplotlib's grace_hopper (bundled too) joined on 2026-12-07, full
# size (the G1 meter reads them at 0.50-0.57 px, camera at 0.50, grass at 0.61): natural images were
# the fewest sources and the worst-read type.
_SKIMAGE_SPLIT = {
    "train": {"camera": 2, "astronaut": 2, "moon": 2, "text": 1, "hubble": 2, "brick": 2, "grass": 2,
              "chelsea": 1, "coffee": 1, "rocket": 1, "grace_hopper": 1},
    "test": {"coins": 1, "immunohistochemistry": 2, "retina": 4, "gravel": 2},
}
SOURCES = ("skimage", "syn", "poi", "tex")
PHOTONS = (500.0, 5000.0)  # default photons at full scale per patch (see synthesize)
_FFT_THREADS = -1  # scipy.fft threads of _blur: all cores, one in a worker process of synthesize()


def _skimage(name: str, factor: int) -> np.ndarray:
    from skimage import data

    loader = {"hubble": data.hubble_deep_field, "retina": lambda: data.retina()[..., 1],
              "grace_hopper": _grace_hopper}.get(name)
    img = (loader or getattr(data, name))()
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    h, w = (s // factor * factor for s in img.shape)
    img = img[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return _unit(img)


def _grace_hopper():
    """matplotlib's bundled sample photograph (a dependency's data, as scikit-image's)."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im)


def _unit(img):
    img = img - img.min()
    return (img / max(float(img.max()), 1e-12)).astype(np.float32)


def _supersampled(draw, shape, rng, factor=2):
    """Render ``draw`` at ``factor`` x resolution and area-average: anti-aliased sharp edges."""
    big = draw((shape[0] * factor, shape[1] * factor), rng, factor)
    return big.reshape(shape[0], factor, shape[1], factor).mean(axis=(1, 3))


def synthetic_cells(shape=(512, 512), rng=None) -> np.ndarray:
    """[syn]: fluorescent-like cells, textured ellipses with bright nuclei and dots on a dark background."""
    rng = np.random.default_rng(rng)

    def draw(s, rng, f):
        yy, xx = np.mgrid[: s[0], : s[1]].astype(np.float32)
        img = np.zeros(s, np.float32)
        texture = ndimage.zoom(rng.random((s[0] // (8 * f) + 2, s[1] // (8 * f) + 2)), 8 * f, order=1)[: s[0], : s[1]]
        for _ in range(rng.integers(6, 20)):
            cy, cx = rng.uniform(0, s[0]), rng.uniform(0, s[1])
            a, b = rng.uniform(15, 60, 2) * f
            t = rng.uniform(0, np.pi)
            # Only the ellipse's bounding box (outside it d > 1: nothing drawn), a twentieth of the image.
            r = max(a, b) + 1
            box = tuple(slice(max(int(c - r), 0), max(int(c + r) + 1, 0)) for c in (cy, cx))
            y, x = yy[box] - cy, xx[box] - cx
            u = (y * np.cos(t) + x * np.sin(t)) / a
            v = (-y * np.sin(t) + x * np.cos(t)) / b
            d = u * u + v * v
            cell = (d < 1) * rng.uniform(0.2, 0.6) * (0.6 + 0.4 * texture[box])
            nucleus = (d < rng.uniform(0.1, 0.3)) * rng.uniform(0.2, 0.4)
            img[box] = np.maximum(img[box], (cell + nucleus).astype(np.float32))
        n_dots = rng.integers(50, 300)
        iy, ix = rng.integers(0, s[0], n_dots), rng.integers(0, s[1], n_dots)
        img[iy, ix] += rng.uniform(0.3, 1.0, n_dots).astype(np.float32)
        return img

    return _unit(_supersampled(draw, shape, rng) + 0.02)


def synthetic_points(shape=(512, 512), rng=None) -> np.ndarray:
    """[poi]: point sources of random brightness on a black background."""
    rng = np.random.default_rng(rng)
    img = np.zeros(shape, np.float32)
    n = int(rng.uniform(0.002, 0.02) * shape[0] * shape[1])
    iy, ix = rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)
    img[iy, ix] = rng.uniform(0.1, 1.0, n)
    return _unit(img)


def synthetic_texture(shape=(512, 512), rng=None) -> np.ndarray:
    """[tex]: natural-like texture, 1/f^beta noise with random polygons and edges."""
    rng = np.random.default_rng(rng)
    fy = scipy.fft.fftfreq(shape[0])[:, None]
    fx = scipy.fft.rfftfreq(shape[1])[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** rng.uniform(0.8, 1.4)
    noise = _unit(scipy.fft.irfft2(spec, s=shape))

    def draw(s, rng, fac):
        img = np.zeros(s, np.float32)
        yy, xx = np.mgrid[: s[0], : s[1]]
        for _ in range(rng.integers(5, 15)):
            ny, nx = rng.normal(size=2)
            c = rng.uniform(-1, 1) * s[0]
            img += ((yy * ny + xx * nx) > c + rng.uniform(0, s[0]) * ny) * rng.uniform(-0.3, 0.3)
        return img

    return _unit(noise + _supersampled(draw, shape, rng))


_GENERATORS = {"syn": synthetic_cells, "poi": synthetic_points, "tex": synthetic_texture}


def _check_sources(sources, split):
    if split not in _SKIMAGE_SPLIT:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"unknown image sources {sorted(unknown)}; choose among {list(SOURCES)}")


#: Procedural images per source seeded by one integer each (the sets made so far); beyond them an
#: entropy tuple per image, which no two splits, seeds or sources share, whatever the count.
N_SEEDED = 6


def procedural_seed(split: str, seed: int, j: int, i: int):
    """The seed of image ``i`` of the ``j``-th procedural source of ``library``: ``int`` for the
    first :data:`N_SEEDED` (``1000 (1 + split) + 100000 seed + 10 j + i``: the integers of two
    splits or seeds never meet), then ``[7919, split, seed, j, i]``, as :class:`PatchStream` draws
    its extra images (integers alone would repeat another split's image past 1000 images)."""
    k = list(_SKIMAGE_SPLIT).index(split)
    return 1000 * (1 + k) + seed * 100_000 + 10 * j + i if i < N_SEEDED else [7919, k, seed, j, i]


def library(sources=SOURCES, split: str = "train", n_procedural: int = N_SEEDED, seed: int = 0) -> list[np.ndarray]:
    """The sharp images patches are cut from: a list of 2-D float32 arrays in [0, 1].

    ``split="train"`` and ``"test"`` use different scikit-image images and different procedural
    seeds, so a test set never contains an image seen in training.

    Parameters
    ----------
    sources : str or sequence of str
        Among ``SOURCES``: ``"skimage"`` (scikit-image's bundled images, area-reduced),
        ``"syn"`` cells, ``"poi"`` points, ``"tex"`` textures.
    split : {"train", "test"}
        Which disjoint set of images.
    n_procedural : int
        Images (512 x 512) per procedural source.
    seed : int
        Seeds the procedural images (the scikit-image ones are fixed).

    Returns
    -------
    list of ndarray, float32
        2-D images of various shapes, each stretched to [0, 1]: the scikit-image ones first, then
        ``n_procedural`` of each procedural source in the order syn, poi, tex.

    Raises
    ------
    ValueError
        For an unknown ``split`` or source, or no sources.
    """
    sources = (sources,) if isinstance(sources, str) else tuple(sources)  # one name, not its letters
    _check_sources(sources, split)
    images = []
    if "skimage" in sources:
        images += [_skimage(name, f) for name, f in _SKIMAGE_SPLIT[split].items()]
    for j, name in enumerate(g for g in ("syn", "poi", "tex") if g in sources):
        images += [_GENERATORS[name]((512, 512), procedural_seed(split, seed, j, i)) for i in range(n_procedural)]
    return images


def bundled_images(sources, split: str) -> list[str]:
    """Names of the dependencies' bundled images a library of ``sources`` holds in ``split`` (what a
    training set's attributes record: the list has grown since the first models)."""
    return list(_SKIMAGE_SPLIT[split]) if "skimage" in sources else []


def reaching(im, size: int):
    """``im`` mirrored on beyond its bottom and right edges to at least ``size``² where it is smaller:
    the crops of a model of large kernels (128 + K − 1 px) are taller than some bundled images
    (``text``: 172 rows). Unchanged where it is large enough."""
    short = (max(0, size - im.shape[0]), max(0, size - im.shape[1]))
    return np.pad(im, ((0, short[0]), (0, short[1])), mode="symmetric") if any(short) else im


def _crops(images, n, size, rng):
    """``n`` random crops of ``size``² with random rotations by multiples of 90° and flips."""
    weights = np.array([im.size for im in images], dtype=float) ** 0.5  # large images are not over-drawn
    images = [reaching(im, size) for im in images]  # (once, not per crop; weighed by their own sizes)
    which = rng.choice(len(images), size=n, p=weights / weights.sum())
    out = np.empty((n, size, size), np.float32)
    for i, k in enumerate(which):
        im = images[k]
        y0 = rng.integers(0, im.shape[0] - size + 1)
        x0 = rng.integers(0, im.shape[1] - size + 1)
        c = np.rot90(im[y0 : y0 + size, x0 : x0 + size], rng.integers(4))
        out[i] = c[:, ::-1] if rng.random() < 0.5 else c
    return out


def _blur(sharp, kernels):
    """Valid part of each crop convolved with its kernel: batched rfft, no wrap-around."""
    n, s, _ = sharp.shape
    k = kernels.shape[-1]
    f = next_fast_len(s)
    pk = np.zeros((n, f, f), np.float32)
    pk[:, :k, :k] = kernels
    w = _FFT_THREADS
    out = scipy.fft.irfft2(scipy.fft.rfft2(sharp, s=(f, f), workers=w) * scipy.fft.rfft2(pk, workers=w), s=(f, f), workers=w)
    return out[:, k - 1 : s, k - 1 : s].astype(np.float32)


def _illumination(n, size, rng, strength):
    """Random global gain in [0.3, 1] times a linear gradient of random direction and depth."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    t = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    depth = rng.uniform(0, strength, n)[:, None, None]
    gain = rng.uniform(0.3, 1.0, n)[:, None, None]
    # ramp = (yy sin t + xx cos t) / 2 + 0.5: -0.21..1.21 across the patch (a diagonal one); computed
    # in place, in float64 as always (a seed's patches stay those it always gave).
    light = yy * np.sin(t)
    light += xx * np.cos(t)
    light /= 2
    light += 0.5
    light *= depth
    np.subtract(1, light, out=light)
    # Floored: beyond a depth of 0.83 a diagonal gradient would make light negative in a corner.
    np.maximum(light, 0, out=light)
    light *= gain
    return light.astype(np.float32)


def degrade_patches(psi, rng, *, photons, read_noise, beta=1.0):
    """Paper 000 Eq. 10: ``beta * Poisson(psi * photons) + N(0, read_noise²)`` (psi in [0, 1])."""
    photons, read_noise, beta = (np.broadcast_to(np.asarray(v, np.float64), (len(psi),))[:, None, None]
                                 for v in (photons, read_noise, beta))
    return _poisson_gaussian(np.maximum(psi, 0) * photons, rng, read_noise=read_noise, beta=beta)


def blur_torch(sharp, kernels):
    """:func:`_blur` for torch tensors on any device: crops (B, P+K-1, P+K-1), kernels (B, K, K)."""
    import torch

    s, k = sharp.shape[-1], kernels.shape[-1]
    f = next_fast_len(s)
    pk = torch.zeros((len(kernels), f, f), dtype=torch.float32, device=sharp.device)
    pk[:, :k, :k] = kernels
    out = torch.fft.irfft2(torch.fft.rfft2(sharp, s=(f, f)) * torch.fft.rfft2(pk), s=(f, f))
    return out[:, k - 1 : s, k - 1 : s]


def _noisy_on(device, sharp, kernels, light, ph, rn, beta, seed):
    """Blur, light and Eq. 10 noise of a batch on a torch ``device`` (a GPU makes this the cheap part):
    the noisy patches (NumPy) and the noise-free ``psi``'s spread and mean per patch."""
    import torch

    dev = torch.device(device)
    kernels = torch.from_numpy(np.ascontiguousarray(kernels, np.float32)).to(dev)
    blurred, light = blur_torch(torch.from_numpy(sharp).to(dev), kernels), torch.from_numpy(light).to(dev)
    psi = blurred * light
    ph, rn, beta = (torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev)[:, None, None]
                    for v in (ph, rn, beta))
    g = torch.Generator(device=dev).manual_seed(seed)
    counts = torch.poisson(psi.clamp_min(0) * ph, generator=g)
    noisy = beta * counts + rn * torch.randn(psi.shape, generator=g, device=dev)
    spread, mean = _texture(blurred, light, psi)
    return noisy.cpu().numpy(), spread.double().cpu().numpy(), mean.double().cpu().numpy()


def _batch(model, images, n, rng, *, invalid_fraction, photons, read_noise, illumination, hidden=False,
           device=None):
    """``n`` degraded patches, their parameters and validity. ``hidden``: also what made them (the
    sharp crops with their margin, illumination, photons, read noise, beta), for the non-blind bound
    in benchmarks/run.py; the random draws are the same either way. ``device``: blur and noise on
    that torch device (same distribution, other bytes; not with ``hidden`` or noiseless patches)."""
    m = _psf.get_model(model)
    k = m.size
    params = m.sample(n, rng)
    kernels = m.render(params, size=k)
    sharp = _crops(images, n, PATCH + k - 1, rng)
    # Paper: black images with a0 = 1 are added to every set; flat grey ones too.
    forced = rng.random(n) < invalid_fraction
    flat = forced & (rng.random(n) < 0.5)
    sharp[forced] = 0.0
    sharp[flat] = rng.uniform(0.1, 1.0, (int(flat.sum()), 1, 1))
    light = _illumination(n, PATCH, rng, illumination)
    if photons is None:  # noiseless (robustness tests add their own noise)
        blurred = _blur(sharp, kernels)
        psi = blurred * light
        spread, mean = _texture(blurred, light, psi)
        valid = (spread > 1e-3 * np.maximum(mean, 1e-3)) & ~forced
        return psi.astype(np.float32), params, valid
    ph = np.exp(rng.uniform(np.log(photons[0]), np.log(photons[1]), n))
    rn = rng.uniform(read_noise[0], read_noise[1], n)
    beta = rng.uniform(0.5, 1.0, n)
    if device is not None and not hidden:
        noisy, spread, mean = _noisy_on(device, sharp, kernels, light, ph, rn, beta, int(rng.integers(2**63)))
    else:
        blurred = _blur(sharp, kernels)
        psi = blurred * light
        noisy = degrade_patches(psi, rng, photons=ph, read_noise=rn, beta=beta)
        spread, mean = _texture(blurred, light, psi)
    valid = _readable(spread, mean, ph, rn, beta) & ~forced
    if hidden:
        return noisy, params, valid, dict(sharp=sharp, light=light, photons=ph, read_noise=rn, beta=beta)
    return noisy, params, valid


def _texture(blurred, light, psi):
    """Per patch, the blurred sample's spread at the patch's mean light, and the mean of ``psi`` (the
    light on it): the structure that carries the blur, not the illumination's gradient, which no PSF
    changes (a flat patch under a gradient is textureless, paper 000's a0 = 1). NumPy or torch."""
    if isinstance(blurred, np.ndarray):
        return blurred.std(axis=(1, 2)) * light.mean(axis=(1, 2)), psi.mean(axis=(1, 2))
    return blurred.std(dim=(1, 2), correction=0) * light.mean(dim=(1, 2)), psi.mean(dim=(1, 2))


def _readable(spread, mean, ph, rn, beta):
    """Valid = the blurred structure stands out of the noise: its spread in counts exceeds the noise
    at the patch's mean level (a patch the network cannot read is flagged, not guessed)."""
    return spread * ph * beta > (beta**2 * mean * ph + rn**2) ** 0.5  # NumPy or torch


@functools.lru_cache(maxsize=2)
def _cached_library(sources, split, seed):
    return library(sources, split, seed=seed)


def _one_fft_thread():
    global _FFT_THREADS
    _FFT_THREADS = 1  # the other worker processes have the other cores


def _units(m, sources, split, seed, kw, units):
    """Patches of the given (size, seed sequence) units, concatenated (what a worker process runs)."""
    images = _cached_library(sources, split, seed)
    parts = [_batch(m, images, size, np.random.default_rng(ss), **kw) for size, ss in units]
    return tuple(np.concatenate(a) for a in zip(*parts))


def _in_processes(fn, jobs, workers):
    """``map(fn, jobs)`` on ``workers`` processes, in order, at most two jobs per process in flight
    (a set larger than memory is written while it is made)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: no fork of a parent whose threads (torch, CUDA) hold locks
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_fft_thread) as ex:
        jobs = iter(jobs)
        pending = collections.deque(ex.submit(fn, j) for _, j in zip(range(2 * workers), jobs))
        while pending:
            result = pending.popleft().result()
            for j in jobs:
                pending.append(ex.submit(fn, j))
                break
            yield result


def _range(v, name, lo, hi):
    """A (low, high) pair of numbers in [lo, hi], low <= high."""
    try:
        a, b = (real_number(x, name, minimum=lo, maximum=hi) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) range of numbers in [{lo:g}, {hi:g}], got {v!r}") from None
    if a > b:
        raise ValueError(f"{name} must be a (low, high) range with low <= high, got {v!r}")
    return (a, b)


def synthesize(n: int, model="Z3", *, sources=SOURCES, split: str = "train", seed: int = 0,
               invalid_fraction: float = 0.08, photons=PHOTONS, read_noise=(0.0, 3.0),
               illumination: float = 0.5, batch: int = 512, out=None, overwrite: bool = False,
               workers: int = 1, device=None, progress: bool = False):
    """Synthesize a training set of degraded 128² patches and the PSF parameters that blurred them.

    Parameters
    ----------
    n : int
        Number of patches.
    model : str or PSFModel
        PSF model (``lsfov.psf.MODELS``); parameters are drawn uniformly over its ranges.
    sources : str or sequence of str
        Image sources among ``SOURCES`` (scikit-image's bundled images, [syn] cells, [poi] points,
        [tex] textures).
    split : {"train", "test"}
        Which disjoint set of source images to use.
    seed : int
        Seeds everything: the same call gives the same bytes.
    invalid_fraction : float
        Fraction of deliberately black or flat (invalid) patches.
    photons, read_noise : (low, high)
        Range of the photon count at full scale (log-uniform): that of the sharp image's brightest
        level, before the illumination (gain <= 1) and the blur, so a patch's blurred peak is less (a
        median 0.3 of it, 0.01-0.6 from the 10th to the 90th percentile of test patches); and of the
        Gaussian read noise std in counts (uniform); quantum efficiency beta is uniform in [0.5, 1].
        ``photons=None``:
        noiseless patches in [0, 1]. The default, 500-5000 photons, is what the shipped models
        were trained on: below a few hundred photons the blur's cues drown.
    illumination : float
        Largest depth of the random illumination gradient across a patch (0: none).
    batch : int
        Patches generated (and written) at a time, rounded down to a multiple of 64 (at least 64); it
        sets memory use and the zarr chunking, never the values.
    out : path, optional
        Stream to this zarr group (``patches``, ``params``, ``valid`` + metadata) instead of
        returning arrays; written atomically.
    overwrite : bool
        Replace an existing zarr store at ``out``; without it an existing ``out`` is refused.
    workers : int
        Processes that make batches in parallel (each builds its own image library); the bytes
        are the same for any number.
    device : str, optional
        A torch device (``"cuda"``) for the blur and the noise, the costly part on a CPU (the
        Poisson draws above all); crops and PSFs stay on the host. The same distribution, seeded,
        but not the same bytes as without it. One process (``workers=1``); not for noiseless sets.
    progress : bool
        Show a progress bar (in patches).

    Returns
    -------
    dict or Path
        A dict with ``patches`` (n, 128, 128) float32 counts, ``params`` (n, N) float64 in the
        model's units, ``valid`` (n,) bool, and ``attrs`` (what the set was drawn from); or the path
        of the zarr group when ``out`` is given.

    Raises
    ------
    ValueError
        For an unknown ``model``, ``split`` or source; ``n``, ``batch`` or ``workers`` not a
        positive integer, ``seed`` negative; ``invalid_fraction`` outside [0, 0.99], ``illumination`` outside [0, 1],
        ``photons`` or ``read_noise`` not a (low, high) range; or ``device`` with ``workers`` > 1 or
        ``photons=None``.
    FileExistsError
        If ``out`` exists and ``overwrite`` is not given.

    Examples
    --------
    >>> from lsfov.estimate import open_training_set, synthesize
    >>> data = synthesize(128, "Z3", seed=0)
    >>> data["patches"].shape, data["patches"].dtype, data["params"].shape, data["valid"].dtype
    ((128, 128, 128), dtype('float32'), (128, 3), dtype('bool'))
    >>> data["attrs"]["params"], data["attrs"]["photons"], data["attrs"]["split"]
    (['focus', 'astigmatism', 'axis'], [500.0, 5000.0], 'train')

    Streamed to a zarr group, as ``lsfov train --synthesize`` writes a set for :func:`lsfov.estimate.train`:

    >>> print(synthesize(128, "Z3", seed=0, out="z3-train.zarr"))
    z3-train.zarr
    >>> open_training_set("z3-train.zarr")["patches"].shape
    (128, 128, 128)
    """
    n = positive_int(n, "n")
    batch = positive_int(batch, "batch")
    workers = positive_int(workers, "workers")
    progress = boolean(progress, "progress")
    m = _psf.get_model(model)
    invalid_fraction = real_number(invalid_fraction, "invalid_fraction", minimum=0, maximum=0.99)
    illumination = real_number(illumination, "illumination", minimum=0, maximum=1)
    seed = positive_int(seed, "seed", minimum=0)
    photons = None if photons is None else _range(photons, "photons", 1e-3, 1e12)
    read_noise = _range(read_noise, "read_noise", 0, 1e6)
    if isinstance(sources, str):
        sources = (sources,)
    if device is not None:
        from .model import torch_device  # torch only when asked for

        device = str(torch_device(device))
        if workers != 1 or photons is None:
            raise ValueError("device= synthesizes in this process and adds noise there: use workers=1 and a photon range")
    sources = tuple(sources)
    _check_sources(sources, split)  # here, not in a worker
    if out is not None and Path(out).exists() and not overwrite:  # before any patch is made (a link: its target)
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    attrs = {"type": "TrainingSet", **m.to_meta(), "patch": PATCH, "n": n,
             "sources": list(sources), "images": bundled_images(sources, split), "split": split, "seed": seed,
             "invalid_fraction": invalid_fraction,
             "photons": None if photons is None else list(photons), "read_noise": list(read_noise), "illumination": illumination,
             "device": device}
    kw = dict(invalid_fraction=invalid_fraction, photons=photons, read_noise=read_noise, illumination=illumination,
              device=device)
    # Every UNIT patches come from their own child generator, and are blurred as one FFT batch of
    # that size: the bytes depend on the seed only, not on ``batch`` (how many are made at a time).
    # The two splits draw apart: with one entropy, a training set and a test set of one seed had the
    # same PSF parameters, crops and noise draws, patch by patch (on other images). The test split
    # keeps the entropy of before (the test sets every figure was measured on).
    units = range(0, n, UNIT)
    rngs = np.random.SeedSequence([seed, 7] if split == "test" else [seed, 7, 1]).spawn(len(units))
    per = max(1, batch // UNIT)
    batch = per * UNIT
    jobs = [[(min(UNIT, n - units[u]), rngs[u]) for u in range(j, min(j + per, len(units)))]
            for j in range(0, len(units), per)]
    make = functools.partial(_units, m, sources, split, seed, kw)

    def batches():
        made = map(make, jobs) if workers == 1 or len(jobs) == 1 else _in_processes(make, jobs, workers)
        for j, part in zip(range(0, len(units), per), made):
            yield units[j], part
            bar.update(len(part[0]))

    from ..cluster import progress_bar

    with progress_bar(total=n, desc=f"synthesize {m.name}", unit="patch", disable=not progress) as bar:
        if out is None:
            parts = [b for _, b in batches()]
            return {"patches": np.concatenate([p[0] for p in parts]), "params": np.concatenate([p[1] for p in parts]),
                    "valid": np.concatenate([p[2] for p in parts]), "attrs": attrs}
        import zarr

        from ..io import atomic_directory

        with atomic_directory(out, overwrite=overwrite) as tmp:
            g = zarr.open_group(str(tmp), mode="w")
            g.attrs["lsfov"] = attrs
            # Every chunk stored, even one all of the fill value (an all-invalid flag chunk): a missing
            # chunk then always means a set copied or written in part (open_training_set refuses it).
            every = {"config": {"write_empty_chunks": True}}
            pa = g.create_array("patches", shape=(n, PATCH, PATCH), chunks=(min(batch, n), PATCH, PATCH),
                                dtype="float32", **every)
            pr = g.create_array("params", shape=(n, m.n_params), chunks=(n, m.n_params), dtype="float64", **every)
            va = g.create_array("valid", shape=(n,), chunks=(n,), dtype="bool", **every)
            params, valid = np.empty((n, m.n_params)), np.empty(n, bool)
            for s, (p, a, v) in batches():
                pa[s : s + len(p)] = p
                params[s : s + len(p)], valid[s : s + len(p)] = a, v
            pr[...] = params
            va[...] = valid
        return Path(out)


def open_training_set(path):
    """Open a training set written by :func:`synthesize` (``patches`` stays on disk, lazily).

    Parameters
    ----------
    path : str or Path
        The zarr group ``synthesize(..., out=path)`` (``lsfov train --synthesize``) wrote.

    Returns
    -------
    dict
        ``patches``: the zarr array (n, 128, 128) float32, read on indexing; ``params`` (n, N)
        float64 in the model's units and ``valid`` (n,) bool, in memory; ``attrs``: what the set was
        drawn from (PSF model, ranges, optics, split, seed, ...), as :func:`synthesize` returns.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is not a training set, lacks an array, or its arrays disagree with each other or
        its PSF model (shapes, non-finite parameters).
    """
    import zarr

    if not Path(path).exists():
        raise FileNotFoundError(f"no training set at {path}; make one with `lsfov train --synthesize N {path}`")
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs["lsfov"])
    except Exception:
        raise ValueError(f"{path} is not a training set written by `lsfov train --synthesize`") from None
    if attrs.get("type") != "TrainingSet":
        raise ValueError(f"{path} is not a training set written by `lsfov train --synthesize`")
    try:
        ds = {"patches": g["patches"], "params": g["params"][...], "valid": g["valid"][...], "attrs": attrs}
    except KeyError as e:
        raise ValueError(f"{path} lacks its {e.args[0]} array: the training set is damaged; synthesize it again") from None
    missing = missing_chunks(g)
    if missing:  # (zarr reads them as zeros: patches of nothing, invalid flags, parameters at 0)
        raise ValueError(f"{path}: {missing}: the set was copied or written only in part; synthesize it again")
    check_set(ds, path)
    return ds


def missing_chunks(g) -> str:
    """Which of a training set's arrays (a zarr group) lack chunks, as "3 of 8 chunks of patches
    missing"; '' if none."""
    said = []
    for name in ("patches", "params", "valid"):
        a = g[name]
        stored, total = a.nchunks_initialized, a.nchunks
        if stored < total:
            said.append(f"{total - stored} of {total} chunks of {name}")
    return ", ".join(said) + " missing" if said else ""


def check_set(ds: dict, name) -> None:
    """A training set's arrays agree with each other and its PSF model (a store edited or cut
    short would otherwise fail deep in training, or train a model on patches of another size)."""
    m = _psf.get_model(ds["attrs"]["psf_model"])
    n = ds["patches"].shape[0]
    params, valid = ds["params"], ds["valid"]
    if tuple(ds["patches"].shape[1:]) != (PATCH, PATCH) or params.shape != (n, m.n_params) or valid.shape != (n,):
        raise ValueError(f"{name}: a {m.name} training set holds patches (n, {PATCH}, {PATCH}), params (n, "
                         f"{m.n_params}) and valid (n,); got {tuple(ds['patches'].shape)}, {params.shape}, "
                         f"{valid.shape}: synthesize it again (lsfov.estimate.synthesize)")
    if not np.isfinite(params).all():
        raise ValueError(f"{name}: its parameters contain NaN or Inf; synthesize it again")
    if isinstance(ds["patches"], np.ndarray) and not np.isfinite(ds["patches"]).all():  # in memory: at once
        raise ValueError(f"{name} contains NaN or Inf patches; synthesize it again")
