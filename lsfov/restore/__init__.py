"""Restoration with any product-convolution operator, whole-array or chunked on Dask with an exact
halo exchange: TV-regularised Richardson-Lucy, and sparse+smooth deblurring of point sources."""
from . import chunked, scratch  # their helpers are named in the README: loaded with the package
from .sparse_smooth import estimate_noise, locate_sources, sparse_smooth_deblur
from .tv_rl import DEFAULT_EPS, DEFAULT_TV, deconvolve, tv_curvature

__all__ = ["deconvolve", "sparse_smooth_deblur", "estimate_noise", "locate_sources", "tv_curvature", "DEFAULT_TV",
           "DEFAULT_EPS", "chunked", "scratch"]
