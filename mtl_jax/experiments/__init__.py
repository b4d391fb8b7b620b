"""The project's experiments, each a typed config and a ``run`` (docs/experiments.md; :mod:`mtl_jax.runner.configs`).

``mtl-jax list`` shows them, ``mtl-jax run NAME --out DIR [key=value ...] [--preset full|quick]`` runs one; the
scripts in the repository's ``experiments/`` folder are thin entry points over these modules.
"""
