"""Entry point of the experiment ``school_convergence``: the code, its config and presets are in
:mod:`mtl_jax.experiments.school_convergence` (``--help`` lists the keys; ``mtl-jax run school_convergence`` is the same).
"""
import sys

from mtl_jax.experiments.school_convergence import *  # noqa: F401,F403  (the module's names, for notebooks and tests)
from mtl_jax.experiments.school_convergence import main

if __name__ == "__main__":
    sys.exit(main())
