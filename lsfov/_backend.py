"""Array-type dispatch: the same maths on NumPy (scipy.fft) and CuPy (cupyx.scipy.fft).

Functions look at the array they are given, like dask-image does, instead of a global switch, so a
Dask graph whose chunks are CuPy arrays runs on the GPU without any flag.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.fft

__all__ = ["array_module", "fft_module", "next_fast_len", "to_numpy"]

# scipy.fft runs batched transforms on several threads; inside Dask worker threads that would
# oversubscribe the cores, so the default follows LSFOV_FFT_WORKERS (set to 1 on clusters).
_FFT_WORKERS = int(os.environ.get("LSFOV_FFT_WORKERS", "-1"))


def array_module(x):
    """Return ``numpy`` or ``cupy`` according to the type of ``x``."""
    mod = type(x).__module__
    if mod.startswith("cupy"):
        import cupy

        return cupy
    return np


class _ScipyFFT:
    """scipy.fft with a worker count, under the names cupyx.scipy.fft uses."""

    @staticmethod
    def rfft2(x, s=None, axes=(-2, -1)):
        return scipy.fft.rfft2(x, s=s, axes=axes, workers=_FFT_WORKERS)

    @staticmethod
    def irfft2(x, s=None, axes=(-2, -1), overwrite_x=False):
        # pocketfft's 2-D c2r is 1.5-2.5x slower than its two 1-D passes called one after the other
        # (measured in benchmarks/RESULTS.md, "FFT engine"): complex ifft over y, then c2r over x.
        if tuple(axes) not in ((-2, -1), (x.ndim - 2, x.ndim - 1)):
            return scipy.fft.irfft2(x, s=s, axes=axes, workers=_FFT_WORKERS, overwrite_x=overwrite_x)
        ny, nx = (x.shape[-2], 2 * (x.shape[-1] - 1)) if s is None else s
        y = scipy.fft.ifft(x, n=ny, axis=-2, workers=_FFT_WORKERS, overwrite_x=overwrite_x)
        return scipy.fft.irfft(y, n=nx, axis=-1, workers=_FFT_WORKERS, overwrite_x=True)

    @staticmethod
    def fft2(x, s=None, axes=(-2, -1)):
        return scipy.fft.fft2(x, s=s, axes=axes, workers=_FFT_WORKERS)

    @staticmethod
    def rfft(x, n=None, axis=-1):
        return scipy.fft.rfft(x, n=n, axis=axis, workers=_FFT_WORKERS)

    @staticmethod
    def irfft(x, n=None, axis=-1, overwrite_x=False):
        return scipy.fft.irfft(x, n=n, axis=axis, workers=_FFT_WORKERS, overwrite_x=overwrite_x)

    @staticmethod
    def fft(x, n=None, axis=-1, overwrite_x=False):
        return scipy.fft.fft(x, n=n, axis=axis, workers=_FFT_WORKERS, overwrite_x=overwrite_x)

    @staticmethod
    def ifft(x, n=None, axis=-1, overwrite_x=False):
        return scipy.fft.ifft(x, n=n, axis=axis, workers=_FFT_WORKERS, overwrite_x=overwrite_x)


def fft_module(x):
    """Return an object with ``rfft2``, ``irfft2``, ``fft2``, ``rfft``, ``irfft``, ``fft`` and ``ifft`` for the
    array type of ``x``."""
    if array_module(x) is np:
        return _ScipyFFT
    import cupyx.scipy.fft as cufft

    return cufft


def next_fast_len(n: int) -> int:
    """Smallest 11-smooth length >= n: pocketfft (and cuFFT) have native radices up to 11.

    Measured on 2-D float32 rfft2 + irfft2 between 500 and 2400 pixels, these lengths cost 20 %
    less time in total than the 5-smooth ones (``real=True``), e.g. 2079 vs 2160 for 2078.
    """
    return scipy.fft.next_fast_len(int(n), real=False)


def to_numpy(x):
    """Bring an array (NumPy, CuPy) to host memory as NumPy."""
    if array_module(x) is np:
        return np.asarray(x)
    return x.get()
