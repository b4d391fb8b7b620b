"""Entry point of the experiment ``task_weighting``: the code, its config and presets are in
:mod:`mtl_jax.experiments.task_weighting` (``--help`` lists the keys; ``mtl-jax run task_weighting`` is the same).
"""
from mtl_jax.experiments.task_weighting import *  # noqa: F401,F403  (the module's names, for notebooks and tests)
from mtl_jax.experiments.task_weighting import main

if __name__ == "__main__":
    main()
