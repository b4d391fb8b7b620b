"""Entry point of the experiment ``dmtrl_accuracy``: the code, its config and presets are in
:mod:`mtl_jax.experiments.dmtrl_accuracy` (``--help`` lists the keys; ``mtl-jax run dmtrl_accuracy`` is the same).
"""
import sys

from mtl_jax.experiments.dmtrl_accuracy import *  # noqa: F401,F403  (the module's names, for notebooks and tests)
from mtl_jax.experiments.dmtrl_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
