"""Fixtures shared by several test modules."""
import warnings

import numpy as np
import pytest

from lsfov import simulate as sim


@pytest.fixture(scope="session")
def blurred_cell():
    """A cell image blurred by a 3x3 Z3 grid with Poisson-Gaussian noise: (operator, image, truth)."""
    sharp = sim.sample_image("cell", (200, 230))
    op, _ = sim.psf_field(sharp.shape, "Z3", (3, 3), seed=1, size=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = np.maximum(sim.degrade(sharp, op, photons=300, seed=0), 0)
    return op, y, sharp / sharp.max() * 300
