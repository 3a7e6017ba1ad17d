"""Restoration: TV-regularised Richardson-Lucy with any product-convolution operator, whole-array or
chunked on Dask with an exact halo exchange."""
from .tv_rl import DEFAULT_EPS, DEFAULT_TV, deconvolve, tv_curvature

__all__ = ["deconvolve", "tv_curvature", "DEFAULT_TV", "DEFAULT_EPS"]
