"""Calibration from micro-bead images (paper 003): bead PSFs, PSF basis, coefficient maps, operators
and subspaces of operators."""
from .basis import PSFBasis, psf_basis, rank_threshold
from .beads import BeadPSFs, bead_psfs, detect_beads, estimate_radius, extract_psfs, radial_bump, remove_background
from .bss import identify_operator
from .cone import cone_columns, project_cone
from .interpolate import NodeGrid, coefficient_nodes, node_grid, voronoi_weights
from .single import calibrate_operator, dirac_comb, operator_distance, rescaled_distance
from .subspace import OperatorSubspace, learn_subspace

__all__ = [
    "BeadPSFs", "NodeGrid", "OperatorSubspace", "PSFBasis", "bead_psfs", "calibrate_operator", "coefficient_nodes",
    "cone_columns", "detect_beads", "dirac_comb", "estimate_radius", "extract_psfs", "identify_operator", "learn_subspace", "node_grid",
    "operator_distance", "project_cone", "psf_basis", "radial_bump", "rank_threshold", "remove_background",
    "rescaled_distance", "voronoi_weights",
]
