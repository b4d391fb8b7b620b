"""The results store: the one layout of a run folder, one writer, one reader (docs/results.md).

A *run* is a folder holding three files:

* ``manifest.json``: ``format`` (:data:`FORMAT`), ``kind`` (one of :data:`KINDS`), ``name``, ``config``
  (the arguments that define the run), ``summary`` (its headline numbers), ``environment`` (package
  versions, JAX backend and devices, the git commit when there is one, host), ``started`` and
  ``ended`` (UTC, ISO 8601), and ``files``. Written last: a folder with a manifest is a complete run.
* ``history.jsonl``: JSON Lines, one record per logged round or step. Solver runs log
  ``{"round", "objective", "gap", "bytes", "seconds"}`` (the distributed solver adds the fields of
  :class:`mtl_jax.solvers.base.RoundRecord`); weighting runs log
  ``{"step", "seed", "task_losses": [K], "weights": [K]}``; sweep runs one record per (seed, grid point)
  (:meth:`mtl_jax.runner.sweep.SweepResult.records`).
* ``arrays.npz``: the run's arrays (read with ``allow_pickle=False``), e.g. ``W``, the factored Omega
  ``omega_U``, ``omega_a``, ``omega_b``.

Every file is written to a temporary name and renamed into place; the three renames happen after all
three files are staged, manifest last, so a failure leaves the previous run or nothing.

    from mtl_jax.runner import store
    store.write_run("runs/exam", kind="solver", config={...}, history=records, arrays={"W": W})
    run = store.read_run("runs/exam")
    run.columns()["objective"], run.arrays["W"], run.manifest["environment"]["jax"]
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from mtl_jax.data.io import atomic_write, read_npz

FORMAT = "mtl_jax.run/1"
MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
ARRAYS = "arrays.npz"
FILES = (MANIFEST, HISTORY, ARRAYS)
#: What a run is: a solver's fit (history per round), a task-weighting training (per step) or a
#: hyper-parameter sweep (one record per seed and grid point; :mod:`mtl_jax.runner.sweep`).
KINDS = ("solver", "weighting", "sweep")
#: The fields of a solver run's history records (:class:`mtl_jax.solvers.base.HistoryRecord`).
SOLVER_FIELDS = ("round", "objective", "gap", "bytes", "seconds")


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit(where: str) -> str | None:
    """The commit checked out where the package lives (with ``+dirty`` for local changes), or None."""
    try:
        out = subprocess.run(["git", "-C", where, "describe", "--always", "--dirty=+dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Package versions, the JAX backend and devices, the git commit (when there is one), the host."""
    import jax

    import mtl_jax

    versions = {"mtl_jax": mtl_jax.__version__, "python": platform.python_version(), "numpy": np.__version__,
                "jax": jax.__version__}
    for name in ("jaxlib", "optax", "flax", "chex"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "git_commit": _git_commit(os.path.dirname(os.path.abspath(mtl_jax.__file__))),
        "host": platform.node(),
        "platform": platform.platform(),
        "x64": bool(jax.config.jax_enable_x64),
    }


def jsonable(value):
    """``value`` with NumPy scalars/arrays as Python numbers/lists and non-finite floats as None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (str, int)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def records_from_columns(columns: Mapping[str, Any]) -> list[dict]:
    """``{field: (n, ...) array}`` -> n records ``{field: value}`` (rows of 2-D columns become lists)."""
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"history: columns differ in length ({ {k: len(a) for k, a in arrays.items()} })")
    n = lengths.pop() if lengths else 0
    return [{k: jsonable(a[i]) for k, a in arrays.items()} for i in range(n)]


def _read_records(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {number} is not a JSON object")
            records.append(record)
    return records


def columns_from_records(records: Iterable[Mapping]) -> dict[str, np.ndarray]:
    """Records -> ``{field: array}``; None (a non-finite value when written) reads back as NaN."""
    records = list(records)
    fields = list(dict.fromkeys(k for r in records for k in r))
    out = {}
    for field in fields:
        values = [r.get(field) for r in records]
        try:
            out[field] = np.array([np.nan if v is None else v for v in values], dtype=float)
        except (TypeError, ValueError):
            out[field] = np.array(values, dtype=object)
        if field in ("round", "step", "seed", "bytes") and out[field].dtype == float \
                and np.all(np.isfinite(out[field])) and np.all(out[field] == np.round(out[field])):
            out[field] = out[field].astype(np.int64)  # integral values only: steps may be window centres (9.5)
    return out


class Run(NamedTuple):
    """A run read back by :func:`read_run`."""

    path: str
    manifest: dict
    history: list   # of dict records
    arrays: dict    # name -> np.ndarray

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def summary(self) -> dict:
        return self.manifest.get("summary", {})

    def columns(self) -> dict[str, np.ndarray]:
        """The history as ``{field: (n, ...) array}``."""
        return columns_from_records(self.history)


def is_run(path) -> bool:
    """Whether ``path`` is a folder with a manifest (a complete run)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def existing_files(path) -> list[str]:
    """The run files (and files of the older result layout) already in folder ``path``."""
    path = os.fspath(path)
    legacy = ("result.npz", "config.json", "history.csv")
    return [f for f in FILES + legacy if os.path.exists(os.path.join(path, f))] if os.path.isdir(path) else []


def write_run(path, *, kind: str, config: Mapping, history=(), arrays: Mapping | None = None,
              summary: Mapping | None = None, name: str | None = None, started: str | None = None,
              environment_info: Mapping | None = None) -> str:
    """Write a complete run into folder ``path`` (created if needed; an earlier run there is replaced).

    Args:
      kind: one of :data:`KINDS`.
      config: what defines the run (JSON-able: numbers, strings, lists, dicts; NumPy values converted).
      history: records (dicts), or columns ``{field: (n, ...) array}``.
      arrays: named arrays for ``arrays.npz`` (numeric or string dtypes; no objects).
      summary: headline numbers of the run.
      name: a label (default: the folder name). started: ISO time the run began (default: now).
      environment_info: default :func:`environment` (pass one to share a single probe across runs).

    Returns:
      ``path``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    if not isinstance(config, Mapping):
        raise ValueError(f"config: must be a dict, got {type(config).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path} exists and is not a folder")
    records = records_from_columns(history) if isinstance(history, Mapping) else [jsonable(dict(r)) for r in history]
    arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
    for key, a in arrays.items():
        if a.dtype.kind == "O":
            raise ValueError(f"arrays[{key!r}]: object arrays cannot be stored (they would need pickle)")
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "name": name if name is not None else os.path.basename(os.path.normpath(path)),
        "config": jsonable(config),
        "summary": jsonable(summary or {}),
        "environment": jsonable(environment_info if environment_info is not None else environment()),
        "started": started or now(),
        "ended": now(),
        "files": {HISTORY: len(records), ARRAYS: sorted(arrays)},
    }
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:  # renames happen on exit, in reverse order: manifest last
            f = stack.enter_context(atomic_write(os.path.join(path, MANIFEST), "w"))
            json.dump(manifest, f, indent=2, allow_nan=False)
            f.write("\n")
            f = stack.enter_context(atomic_write(os.path.join(path, HISTORY), "w"))
            for record in records:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f = stack.enter_context(atomic_write(os.path.join(path, ARRAYS), "wb"))
            np.savez(f, **arrays)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return path


def read_run(path) -> Run:
    """Read the run in folder ``path``; ValueError saying what is missing or malformed."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a folder")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        hint = " (it holds the older result.npz layout: rerun to write a run folder)" \
            if os.path.isfile(os.path.join(path, "result.npz")) else ""
        raise ValueError(f"{path}: no {MANIFEST}, not a run folder{hint}")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{manifest_path}: cannot be read as JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: not a {FORMAT} manifest (format {manifest.get('format')!r})"
                         if isinstance(manifest, dict) else f"{manifest_path}: not a JSON object")
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"{manifest_path}: unknown kind {manifest.get('kind')!r}; expected one of {KINDS}")
    history_path = os.path.join(path, HISTORY)
    history = _read_records(history_path) if os.path.isfile(history_path) else []
    arrays = {}
    arrays_path = os.path.join(path, ARRAYS)
    if os.path.isfile(arrays_path):
        arrays = read_npz(arrays_path)
    return Run(path, manifest, history, arrays)


def find_runs(root) -> list[str]:
    """``root`` if it is a run, else every run folder below it (sorted, depth first)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a folder")
    if is_run(root):
        return [root]
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders.sort()
        if is_run(folder):
            found.append(folder)
            subfolders[:] = []  # a run's own subfolders are not separate runs
    return found


# --- solver runs ---------------------------------------------------------------------------------------

#: Above this many tasks a solver run stores Omega factored only (a dense m x m would be 32 MB at 2000).
DENSE_OMEGA_MAX_TASKS = 2000


def fit_arrays(result) -> dict[str, np.ndarray]:
    """The arrays of a :class:`mtl_jax.FitResult` as stored: ``W`` (m, d), the factored Omega ``omega_U``
    (m, r), ``omega_a`` (r,), ``omega_b`` (), ``alpha`` (N,) in input order, and the dense ``Omega``
    (m, m) when m <= :data:`DENSE_OMEGA_MAX_TASKS`."""
    arrays = {"W": np.asarray(result.W), "omega_U": np.asarray(result.omega.U),
              "omega_a": np.asarray(result.omega.a), "omega_b": np.asarray(result.omega.b)}
    if result.alpha is not None:
        arrays["alpha"] = np.asarray(result.alpha)
    if arrays["W"].shape[0] <= DENSE_OMEGA_MAX_TASKS:
        arrays["Omega"] = np.asarray(result.Omega)
    return arrays


def fit_summary(result) -> dict[str, Any]:
    """The headline numbers of a :class:`mtl_jax.FitResult` (J, gap, convergence, iterations, times)."""
    return {"objective": result.objective, "gap": result.gap, "relative_gap": result.relative_gap,
            "converged": result.converged, "iterations": result.iterations,
            "compile_seconds": result.compile_seconds, "solve_seconds": result.solve_seconds}


def write_fit(path, result, *, config: Mapping | None = None, arrays: Mapping | None = None,
              summary: Mapping | None = None, **kwargs) -> str:
    """Write a :class:`mtl_jax.FitResult` as a solver run: its history, :func:`fit_arrays` (plus ``arrays``),
    ``config`` (default ``result.config``) and :func:`fit_summary` (plus ``summary``). ``kwargs`` go to
    :func:`write_run` (``name``, ``started``, ``environment_info``)."""
    return write_run(path, kind="solver", config=dict(result.config if config is None else config),
                     history=result.history_arrays(), arrays={**fit_arrays(result), **(arrays or {})},
                     summary={**fit_summary(result), **(summary or {})}, **kwargs)


def dense_omega(run: Run) -> np.ndarray:
    """The (m, m) Omega of a solver run: stored dense, or materialised from its factors.

    Raises ValueError when the run has neither, or more than :data:`DENSE_OMEGA_MAX_TASKS` tasks.
    """
    if "Omega" in run.arrays:
        return run.arrays["Omega"]
    try:
        U, a, b = run.arrays["omega_U"], run.arrays["omega_a"], run.arrays["omega_b"]
    except KeyError:
        raise ValueError(f"{run.path}: has neither Omega nor omega_U/omega_a/omega_b") from None
    m = U.shape[0]
    if m > DENSE_OMEGA_MAX_TASKS:
        raise ValueError(f"{run.path}: {m} tasks is too many for a dense Omega (at most {DENSE_OMEGA_MAX_TASKS}); "
                         "use the factors omega_U, omega_a, omega_b")
    return b * np.eye(m) + (U * (a - b)) @ U.T


# --- weighting runs -------------------------------------------------------------------------------------

def curve_records(task_losses, weights, x) -> list[dict]:
    """(S, T, K) task losses and weights over T logged steps ``x`` (T,) -> one record per (seed, step)."""
    task_losses, weights, x = np.asarray(task_losses), np.asarray(weights), np.asarray(x)
    if task_losses.ndim != 3 or weights.shape != task_losses.shape or x.shape != task_losses.shape[1:2]:
        raise ValueError(f"curves: need task_losses and weights (S, T, K) and x (T,), got "
                         f"{task_losses.shape}, {weights.shape}, {x.shape}")
    return [{"step": jsonable(x[t]), "seed": s, "task_losses": jsonable(task_losses[s, t]),
             "weights": jsonable(weights[s, t])}
            for s in range(task_losses.shape[0]) for t in range(task_losses.shape[1])]


def weighting_curves(run: Run) -> dict[str, np.ndarray]:
    """A weighting run's history as arrays: ``task_losses``, ``weights`` (S, T, K), ``x`` (T,), ``seeds`` (S,)."""
    cols = run.columns()
    missing = [k for k in ("step", "seed", "task_losses", "weights") if k not in cols]
    if missing:
        raise ValueError(f"{run.path}: history records lack {missing}")
    seeds, x = np.unique(cols["seed"]), np.unique(cols["step"])
    if len(cols["seed"]) != len(seeds) * len(x):
        raise ValueError(f"{run.path}: history is not one record per (seed, step)")
    order = np.lexsort((cols["step"], cols["seed"]))
    shape = (len(seeds), len(x), -1)
    return {"task_losses": np.asarray(cols["task_losses"][order].tolist(), float).reshape(shape),
            "weights": np.asarray(cols["weights"][order].tolist(), float).reshape(shape),
            "x": x.astype(float), "seeds": seeds}
