"""Running experiments: the results store (one run-folder format, :mod:`mtl_jax.runner.store`) and
hyper-parameter sweeps (:mod:`mtl_jax.runner.sweep`: ``sweep.sweep(X, y, task, "lam1=... lam2=... seeds=5")``)."""
from mtl_jax.runner import store, sweep
from mtl_jax.runner.store import Run, find_runs, read_run, write_run
from mtl_jax.runner.sweep import Grid, SweepResult, parse_grid

__all__ = ["Grid", "Run", "SweepResult", "find_runs", "parse_grid", "read_run", "store", "sweep", "write_run"]
