"""Shared fixtures. Float64 everywhere: the tests compare against NumPy/SciPy references."""
import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng():
    """A seeded NumPy generator: same seed, same numbers."""
    return np.random.default_rng(0)
