"""lsfov: measure and undo spatially varying blur in large-field-of-view microscopy."""
__version__ = "0.1.0"

from . import calibrate, psf, simulate
from ._validate import LsfovWarning
from .calibrate import OperatorSubspace, calibrate_operator, identify_operator, learn_subspace
from .io import open_image, open_result, save
from .operators import ProductConvolution
from .psf import Optics
from .restore import deconvolve, sparse_smooth_deblur

# The CNN side imports torch (a second or two): loaded on first use, so Dask workers and
# deconvolution-only scripts do not pay for it.
_LAZY = {"load_model": "estimate", "estimate_psf_map": "estimate", "operator_from_psf_map": "estimate",
         "estimate_depth": "estimate", "calibrate_depth": "estimate", "DepthCalibration": "estimate",
         "blind_deconvolve": "estimate",
         "estimate": None}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(".estimate", __name__)
        return mod if _LAZY[name] is None else getattr(mod, name)
    raise AttributeError(f"module 'lsfov' has no attribute {name!r}")


__all__ = ["Optics", "ProductConvolution", "OperatorSubspace", "calibrate", "calibrate_operator", "learn_subspace",
           "identify_operator", "deconvolve", "sparse_smooth_deblur", "psf", "simulate", "open_image", "open_result", "save",
           "load_model", "estimate_psf_map", "operator_from_psf_map", "estimate_depth", "calibrate_depth", "DepthCalibration",
           "blind_deconvolve", "estimate", "LsfovWarning", "__version__"]
