"""Networks that regress PSF-model parameters from a 128² patch (paper 000 Sec. II-E-2, III-A).

torchvision is not importable on every build, so the residual blocks are written here:
``resnet34`` is the paper's network (He et al.'s ResNet-34, one input channel, N+1 outputs),
``compact`` a small residual network (1.2 M parameters, 5 MB) that trains on a laptop CPU,
``spectral``: ``compact`` plus a branch that reads the patch's log power spectrum (1.6 M
parameters), which learns faster but fails on noiseless patches (see the README), and ``polar``:
``spectral`` plus the spectrum's angular harmonics per radius and a wider head (2.1 M parameters),
whose head trains on a CPU in minutes over a fixed ``spectral`` trunk.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["ARCHITECTURES", "build", "loss", "standardize", "polar_harmonics"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic blocks for one-channel patches; ``n_out`` linear outputs."""

    def __init__(self, n_out: int, stages, widths, stem: nn.Module, head_hidden: int = 0):
        super().__init__()
        self.stem = stem
        layers, cin = [], widths[0]
        for i, (n_blocks, cout) in enumerate(zip(stages, widths)):
            for b in range(n_blocks):
                layers.append(BasicBlock(cin, cout, stride=2 if (b == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if head_hidden:
            self.head = nn.Sequential(nn.Linear(cin, head_hidden), nn.ReLU(inplace=True), nn.Linear(head_hidden, n_out))
        else:
            self.head = nn.Linear(cin, n_out)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity: stable early training

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet34(n_out: int) -> ResNet:
    """The paper's ResNet-34: 7x7/2 stem and max-pool, stages of 3, 4, 6, 3 blocks (64..512 channels)."""
    stem = nn.Sequential(nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    return ResNet(n_out, (3, 4, 6, 3), (64, 128, 256, 512), stem)


def compact(n_out: int) -> ResNet:
    """A compact residual network, one block per scale from 32² to 4².

    The blur lives in the finest scales, so the stem does not subsample: it folds each 4x4 pixel
    block into 16 channels (lossless) and convolves those, which keeps every pixel and runs 4-5x
    faster on a CPU than a full-resolution convolution with few channels.
    """
    stem = nn.Sequential(nn.PixelUnshuffle(4), nn.Conv2d(16, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32),
                         nn.ReLU(inplace=True))
    return ResNet(n_out, (1, 1, 1, 1), (32, 64, 128, 256), stem, head_hidden=64)


class SpectralNet(nn.Module):
    """The compact network plus a branch that reads the patch's log power spectrum.

    A blurred patch's spectrum is the object's times the OTF, |F f|² |H|²: defocus and astigmatism
    draw (elliptical) rings and cut-offs in it that a natural object's spectrum lacks. A small CNN
    sees those where they are; a spatial CNN would have to learn a Fourier transform to find them.
    The two branches' features meet in the head.
    """

    FLOOR = 3e-3  # ~ the noise of 5000 peak photons, relative to a textured patch's power

    def __init__(self, n_out: int, size: int = 128):
        super().__init__()
        self.spatial = compact(n_out)
        self.spatial.head = nn.Identity()
        layers, cin = [nn.BatchNorm2d(1)], 1  # a learned scale for the log power
        for cout in (16, 32, 64, 64):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        fy, fx = size, size // 2 + 1  # the rfft's half plane
        for _ in range(4):
            fy, fx = (fy + 1) // 2, (fx + 1) // 2
        self.spectral = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * fy * fx, 128), nn.ReLU(inplace=True))
        w = torch.hann_window(size, periodic=False)
        self.register_buffer("window", torch.outer(w, w), persistent=False)
        self.head = nn.Sequential(nn.Linear(256 + 128, 64), nn.ReLU(inplace=True), nn.Linear(64, n_out))
        for m in self.spectral.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def log_power(self, x):
        """``log(P + floor)``, ``P = |rfft2(window · x)|²``, zero frequency in the middle row (rings stay
        contiguous).

        Windowed (Hann): the patch's edges would otherwise draw a cross, which looks like astigmatism
        along the axes. The floor, ``FLOOR`` times the patch's mean power, is a white-noise level
        like that of a bright training patch: beyond the OTF's cut-off a noiseless patch has no power
        at all, and without the floor its log would fall far below anything seen in training.
        """
        f = torch.fft.rfft2(x * self.window)
        p = f.real**2 + f.imag**2
        floor = self.FLOOR * p.mean(dim=(-2, -1), keepdim=True) + 1e-12
        return torch.fft.fftshift(torch.log(p + floor), dim=-2)

    def forward(self, x):
        return self.head(torch.cat([self.spatial(x), self.spectral(self.log_power(x))], dim=1))


def spectral(n_out: int) -> SpectralNet:
    """``compact`` plus a log-power-spectrum branch (1.6 M parameters)."""
    return SpectralNet(n_out)


def polar_harmonics(size: int = 128, n_radii: int = 40, r_min: float = 0.01, r_max: float = 0.5,
                    orders=(2, 4)) -> np.ndarray:
    """Projection of a centred half-plane power spectrum onto rings and angular harmonics.

    For the layout of :meth:`SpectralNet.log_power` (``size`` x ``size // 2 + 1``, zero frequency
    in the middle row), column ``r * (1 + 2 len(orders)) + j`` of the result averages ring ``r``
    (``n_radii`` equal rings of spatial frequency from ``r_min`` to ``r_max`` cycles per pixel)
    weighted by 1, then ``cos(k phi)``, ``sin(k phi)`` for each order ``k`` less their mean over the
    ring; ``phi`` is the angle of the frequency (a power spectrum is centro-symmetric, so only even
    orders carry anything).

    Returns
    -------
    ndarray, float32, shape (size * (size // 2 + 1), n_radii * (1 + 2 len(orders)))
    """
    ky = np.fft.fftshift(np.fft.fftfreq(size))[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    radius, phi = np.hypot(ky, kx), np.arctan2(ky, kx)
    ring = np.digitize(radius, np.linspace(r_min, r_max, n_radii + 1)) - 1
    # Each entry off the kx = 0 column also stands for its mirror -k, absent from the half plane:
    # weighted twice, the rings are those of the whole plane and the 90° rotations stay symmetries.
    weight = np.where(kx > 0, 2.0, 1.0) * np.ones_like(ky)
    waves = [np.ones_like(phi)] + [f(k * phi) for k in orders for f in (np.cos, np.sin)]
    cols = []
    for r in range(n_radii):
        inside = weight * (ring == r)
        inside /= max(inside.sum(), 1)
        # Less each wave's mean over the ring (the pixel lattice's own order-4 pattern): a flat
        # spectrum has no harmonics.
        cols += [(inside * (w - (inside * w).sum() * (j > 0))).ravel() for j, w in enumerate(waves)]
    return np.stack(cols, axis=1).astype(np.float32)


class PolarNet(SpectralNet):
    """``spectral`` plus the log power spectrum's angular harmonics per ring, and a wider head.

    Defocus draws rings in the spectrum and astigmatism makes them elliptical, turning with the
    axis: per ring, the mean log power and its cos/sin 2phi and 4phi harmonics hold the blur in a
    few hundred numbers (a fixed linear map, :func:`polar_harmonics`) that a rotation only shifts
    in phase. Learning them from pixels is what the convolutional branches find hard.

    The network is ``tail(features(x))``: ``features`` is the ``spectral`` trunk (both branches)
    and the fixed harmonics, ``tail`` a normalised multilayer perceptron. Training with a frozen
    trunk (``lsfov.estimate.train(freeze=True)``) computes ``features`` once per patch.
    """

    def __init__(self, n_out: int, size: int = 128):
        super().__init__(n_out, size)
        del self.head  # the tail replaces it (a spectral model's head does not carry over)
        self.register_buffer("harmonics", torch.from_numpy(polar_harmonics(size)), persistent=False)
        n_feat = 256 + 128 + self.harmonics.shape[1]
        self.tail = nn.Sequential(nn.BatchNorm1d(n_feat), nn.Linear(n_feat, 512), nn.ReLU(inplace=True),
                                  nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Linear(256, n_out))

    #: The modules that a frozen training run keeps fixed (those a ``spectral`` model provides).
    trunk = ("spatial", "spectral")

    def features(self, x):
        lp = self.log_power(x)
        return torch.cat([self.spatial(x), self.spectral(lp), lp.flatten(1) @ self.harmonics], dim=1)

    def forward(self, x):
        return self.tail(self.features(x))


def polar(n_out: int) -> PolarNet:
    """``spectral`` plus angular harmonics of the log power spectrum and a wider head (2.1 M parameters)."""
    return PolarNet(n_out)


ARCHITECTURES = {"compact": compact, "resnet34": resnet34, "spectral": spectral, "polar": polar}


def build(arch: str, n_out: int) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown network {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](n_out)


def standardize(patches: torch.Tensor, *, with_std: bool = False):
    """Per-patch zero mean, unit variance: the network sees structure, not the camera's gain or offset.
    Each patch is first scaled to a peak |value| of 1, so that the floor of the deviation is relative
    and the reading the same at any intensity scale (and no variance overflows float32); a patch
    with NaN or Inf is left as it is. ``with_std``: also return the per-patch standard deviation
    (..., 1, 1) of the scaled patch, whose peak is 1 (or 0 for an all-zero patch)."""
    peak = patches.abs().amax(dim=(-2, -1), keepdim=True)
    patches = patches / torch.where(torch.isfinite(peak) & (peak > 0), peak, torch.ones_like(peak))
    mean = patches.mean(dim=(-2, -1), keepdim=True)
    std = patches.std(dim=(-2, -1), keepdim=True)
    z = (patches - mean) / torch.clamp(std, min=1e-6 * (mean.abs() + 1))
    return (z, std) if with_std else z


def loss(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Paper 000 Eq. 11, with validity v = 1 - a0 (1 = the patch can be read).

    ``gamma (v - v~)² + v / (2N) * sum_n (t_n - t~_n)²`` averaged over the batch; ``out[:, 0]`` is the
    validity logit and ``out[:, 1:]`` the N encoded parameters. Invalid patches teach validity only.
    """
    v = valid.to(out.dtype)
    validity = gamma * (v - torch.sigmoid(out[:, 0])) ** 2
    n = target.shape[1]
    params = v * ((out[:, 1:] - target) ** 2).sum(dim=1) / (2 * n)
    return (validity + params).mean()
