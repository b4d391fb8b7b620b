"""Resume at cell granularity: a finished fit of an experiment is read back instead of being computed again.

An experiment is a set of cells (one fit, one (data set, method, seed), ...). Each finished cell is a run
folder written atomically through the results store (docs/results.md) with a ``cell`` key in its config: a
digest of everything that determines its numbers. A rerun reads a folder whose key matches and recomputes
the others, so a run stopped at any moment (SIGKILL included) continues where it was and ends with the numbers
of an uninterrupted run (a cell is either complete on disk or recomputed from its start).

    key = cells.cell_key(data=data_cfg, fit=options)
    res = cells.load_fit(path, key)          # a FitResult, or None: compute it
    if res is None:
        res = mtl_jax.fit(...)
    store.write_fit(path, res, config={..., "cell": key})
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from mtl_jax.runner import store

__all__ = ["cell_key", "finished", "load_fit"]


def cell_key(**parts: Any) -> str:
    """A digest of ``parts`` (JSON-able after :func:`mtl_jax.runner.store.jsonable`): the identity of a cell."""
    text = json.dumps(store.jsonable(parts), sort_keys=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def finished(path, key: str) -> store.Run | None:
    """The run at ``path`` if it is complete and its config's ``cell`` is ``key``; else None (recompute)."""
    if not store.is_run(path):
        return None
    try:
        run = store.read_run(path)
    except ValueError:  # a damaged folder is recomputed, not trusted
        return None
    return run if run.config.get("cell") == key else None


def load_fit(path, key: str):
    """The :class:`mtl_jax.FitResult` of a finished fit cell (:func:`finished`), or None.

    Rebuilt from what :func:`mtl_jax.runner.store.write_fit` stored: ``W``, the factored Omega, the duals, the
    history (floats round-trip exactly through JSON), the summary; ``config`` is the fit's own (``config["fit"]``
    when the experiment nested it).
    """
    from mtl_jax.api import FitResult
    from mtl_jax.mtrl import SpectralMatrix
    from mtl_jax.solvers.base import HistoryRecord, RoundRecord

    run = finished(path, key)
    if run is None or run.kind != "solver" or "W" not in run.arrays:
        return None
    cols = run.columns()
    record = RoundRecord if set(RoundRecord._fields) <= set(cols) else HistoryRecord
    n = len(cols[record._fields[0]]) if cols else 0
    ints = {"round", "bytes", "bytes_up", "bytes_down", "participants"}
    history = tuple(record(*((int(cols[f][i]) if f in ints else float(cols[f][i])) for f in record._fields))
                    for i in range(n))
    a = run.arrays
    omega = SpectralMatrix(a["omega_U"], a["omega_a"], np.asarray(a["omega_b"]))
    s = {k: (np.nan if v is None else v) for k, v in run.summary.items()}  # non-finite values are stored as null
    return FitResult(W=a["W"], omega=omega, history=history, objective=float(s["objective"]), gap=float(s["gap"]),
                     converged=bool(s["converged"]), iterations=int(s["iterations"]),
                     config=dict(run.config.get("fit", run.config)), alpha=a.get("alpha"),
                     compile_seconds=float(s.get("compile_seconds", 0.0)),
                     solve_seconds=float(s.get("solve_seconds", 0.0)))
