"""mtl_jax: multi-task optimisation in JAX.

Distributed Multi-Task Relationship Learning (Liu, Pan, Ho, KDD 2017) and loss-driven task weighting
(Huq and Pervin, IJ-AI 2022) as pure functional modules. The mathematics is in docs/mathematics.md,
the architecture in docs/architecture.md.

    import mtl_jax
    result = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)   # result.W (m, d), result.Omega (m, m)
    mtl_jax.objective(result.W, X, y, task, lam1=0.1, lam2=1.0)
"""
from mtl_jax import data, losses, mtrl, names, validation, weighting
from mtl_jax.api import FitResult, fit, objective
from mtl_jax.compilation import enable_compilation_cache

__all__ = ["FitResult", "data", "enable_compilation_cache", "fit", "losses", "mtrl", "names", "objective",
           "validation", "weighting"]
__version__ = "0.1.0"
