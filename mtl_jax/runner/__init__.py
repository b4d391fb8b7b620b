"""Running experiments: the results store (one run-folder format, :mod:`mtl_jax.runner.store`)."""
from mtl_jax.runner import store
from mtl_jax.runner.store import Run, find_runs, read_run, write_run

__all__ = ["Run", "find_runs", "read_run", "store", "write_run"]
