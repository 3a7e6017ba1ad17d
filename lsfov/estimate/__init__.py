"""PSF estimation from the image itself: the CNN regressor of paper 000 (training data, networks,
training, evaluation, shipped models) and spatially varying PSF maps."""
from .blind import blind_deconvolve
from .depth import DepthCalibration, calibrate_depth, estimate_depth
from .mapping import NothingToMap, estimate_psf_map, fill_invalid, operator_from_psf_map
from .model import PSFRegressor, load_model
from .synth import library, open_training_set, synthesize
from .stream import PatchStream, train_stream
from .training import evaluate, r2_scores, robustness, train

__all__ = ["blind_deconvolve", "DepthCalibration", "calibrate_depth", "estimate_depth", "PSFRegressor", "load_model", "estimate_psf_map", "fill_invalid", "operator_from_psf_map", "NothingToMap", "library", "open_training_set", "synthesize", "train", "evaluate", "PatchStream", "train_stream",
           "r2_scores", "robustness"]
