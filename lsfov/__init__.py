"""lsfov: measure and undo spatially varying blur in large-field-of-view microscopy."""
__version__ = "0.1.0"

from . import psf, simulate
from .io import open_image, open_result, save
from .operators import ProductConvolution
from .psf import Optics
from .restore import deconvolve

__all__ = ["Optics", "ProductConvolution", "deconvolve", "psf", "simulate", "open_image", "open_result", "save",
           "__version__"]
