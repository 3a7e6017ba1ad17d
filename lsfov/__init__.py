"""lsfov: measure and undo spatially varying blur in large-field-of-view microscopy."""
from . import psf
from .psf import Optics

__version__ = "0.1.0"
from .operators import ProductConvolution
from . import simulate
from .io import open_image, open_result, save

__all__ = ["Optics", "ProductConvolution", "psf", "simulate", "open_image", "open_result", "save", "__version__"]
