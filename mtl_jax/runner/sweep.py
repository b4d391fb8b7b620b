"""Hyper-parameter sweeps of the centralized MTRL solver: a (lam1, lam2) grid x seeds, compiled once.

For every seed the data are split per task into train / validation / test (:func:`split_by_task`, a
new split per seed); J is minimised on the training rows at every grid point, the point of least
validation error is selected, and its test error is reported, with mean and spread over the seeds
(docs/sweeps.md). Every point's numbers are one JSON Lines record of one run folder written by the
results store (:mod:`mtl_jax.runner.store`).

    from mtl_jax.runner.sweep import parse_grid, sweep
    res = sweep(X, y, task, "lam1=1e-3:1e1:8:log lam2=1e-3:1e1:8:log seeds=5", out="runs/exam_sweep")
    res.selected_params          # [{"seed": 0, "lam1": ..., "lam2": ...}, ...]
    res.test_summary()           # {"mean": ..., "std": ..., "min": ..., "max": ..., "values": [...]}

lam1, lam2 (and tol, max_iter, eps, the warm start) are traced arguments of the solver's one compiled
program (:func:`mtl_jax.solvers.centralized.solve_program`), so a grid compiles once. Two ways to run
the points (``strategy``):

* ``"path"`` (CPU default): the compiled program is called point by point along the regularisation
  path, each point warm-started from the solution of the point before it (:func:`path_order`: lam1
  from large to small, lam2 back and forth, so consecutive points are grid neighbours).
* ``"batched"`` (default on any other backend): ``batch_size`` points (default all) in one ``vmap``ped
  program. The batched ``while_loop`` runs until its slowest point converges; a point whose own stopping
  rule holds is frozen (its state is kept by a select on its own predicate, the batching rule of
  ``lax.while_loop``), so it ends exactly where it would alone. Consecutive batches warm-start
  element-wise from the batch before (with ``batch_size`` = the number of lam2 values a batch is one
  lam1 row and each point starts from its neighbour at the next larger lam1).

Both stop each point at the duality gap ``gap <= tol * J(W)``; J is lam1-strongly convex, so
``||W - W*||_F^2 <= 2 gap / lam1`` and the two ways agree to that bound.
"""
from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data.sites import pack_sites
from mtl_jax.losses import get_loss
from mtl_jax.mtrl import DEFAULT_EPS
from mtl_jax.runner import store
from mtl_jax.solvers import centralized
from mtl_jax.solvers.base import compiled, history_capacity
from mtl_jax.validation import check_int, check_real, check_scale, validate_dataset

#: The hyper-parameters a grid may sweep (traced arguments of the solver's compiled program).
PARAMS = ("lam1", "lam2")
#: Keys of a grid spec: the hyper-parameters and ``seeds``.
KEYS = PARAMS + ("seeds",)
STRATEGIES = ("auto", "path", "batched")
#: Centralized methods a sweep runs (one compiled APG program; the alternation is a host loop).
SWEEP_METHODS = ("apg", "apg_primal", "apg_dual")


# ----------------------------------------------------------------------------- the grid

class Grid(NamedTuple):
    """A parsed grid: values per hyper-parameter (in the order given) and the seeds.

    ``points()`` is the (P, 2) array of (lam1, lam2) with ``P = len(lam1) * len(lam2)``, lam1 major:
    point ``i * len(lam2) + j`` is ``(lam1[i], lam2[j])``. That index is a point's id everywhere
    (records, arrays, ``SweepResult.selected``).
    """

    lam1: tuple[float, ...]
    lam2: tuple[float, ...]
    seeds: tuple[int, ...]

    def points(self) -> np.ndarray:
        a, b = np.meshgrid(np.asarray(self.lam1, float), np.asarray(self.lam2, float), indexing="ij")
        return np.stack([a.ravel(), b.ravel()], axis=1)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.lam1), len(self.lam2)

    def spec(self) -> str:
        """The grid as explicit lists, ``"lam1=a,b,... lam2=... seeds=s,t,..."``; ``parse_grid`` reads it back exactly."""
        def values(v):
            return ",".join(repr(float(x)) for x in v) + ("," if len(v) == 1 else "")
        seeds = ",".join(str(s) for s in self.seeds) + ("," if len(self.seeds) == 1 else "")
        return f"lam1={values(self.lam1)} lam2={values(self.lam2)} seeds={seeds}"


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _number(key: str, token: str, text: str) -> float:
    text = text.strip()
    if not _NUMBER.match(text):
        raise ValueError(f"grid: {key}: {text!r} in {token!r} is not a finite number")
    return float(text)


def _values(key: str, token: str, text) -> tuple[float, ...]:
    """Values of one hyper-parameter from ``lo:hi:n[:log|:lin]``, ``a,b,c`` or ``a``, checked."""
    if isinstance(text, str):
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (3, 4):
                raise ValueError(f"grid: {key}: range {text!r} in {token!r} must be lo:hi:n or lo:hi:n:log|lin")
            lo, hi = _number(key, token, parts[0]), _number(key, token, parts[1])
            if not re.fullmatch(r"\s*\d+\s*", parts[2]) or int(parts[2]) < 2:
                raise ValueError(f"grid: {key}: the number of points in {token!r} must be an integer >= 2, "
                                 f"got {parts[2]!r} (write a single value as {key}=VALUE)")
            n = int(parts[2])
            scale = parts[3].strip().lower() if len(parts) == 4 else "lin"
            if scale not in ("log", "lin"):
                raise ValueError(f"grid: {key}: scale {parts[3]!r} in {token!r} must be 'log' or 'lin'")
            if scale == "log":
                if lo <= 0 or hi <= 0:
                    raise ValueError(f"grid: {key}: a log range needs lo, hi > 0, got {token!r}")
                vals = np.geomspace(lo, hi, n)
            else:
                vals = np.linspace(lo, hi, n)
            vals[0], vals[-1] = lo, hi  # the end points exactly as written
        else:
            items = [s for s in text.split(",")]
            if items and items[-1].strip() == "" and len(items) > 1:
                items = items[:-1]  # "a," is the one-value list
            vals = np.array([_number(key, token, s) for s in items], float)
    else:  # a sequence of numbers (the Python API)
        try:
            vals = np.asarray(text, float).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"grid: {key}: must be numbers or a spec string, got {text!r}") from None
        if vals.size == 0:
            raise ValueError(f"grid: {key}: no values")
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"grid: {key}: values must be finite, got {token!r}")
    if key == "lam1" and np.any(vals <= 0):
        raise ValueError(f"grid: lam1: every value must be > 0, got {token!r}")
    if key == "lam2" and np.any(vals < 0):
        raise ValueError(f"grid: lam2: every value must be >= 0, got {token!r}")
    if len(np.unique(vals)) != len(vals):
        raise ValueError(f"grid: {key}: repeated values in {token!r}")
    return tuple(float(v) for v in vals)


def _seeds(token: str, text) -> tuple[int, ...]:
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        text = str(int(text))
    if isinstance(text, str):
        text = text.strip()
        if "," not in text:
            if not re.fullmatch(r"\d+", text) or int(text) < 1:
                raise ValueError(f"grid: seeds: {token!r} must be a count >= 1 (seeds 0..N-1) or a list a,b,...")
            return tuple(range(int(text)))
        items = text.split(",")
        if items[-1].strip() == "" and len(items) > 1:
            items = items[:-1]
    else:
        items = list(text) if isinstance(text, Sequence) or isinstance(text, np.ndarray) else [text]
    seeds = []
    for s in items:
        s = str(s).strip()
        if not re.fullmatch(r"\d+", s):
            raise ValueError(f"grid: seeds: {s!r} in {token!r} is not a non-negative integer")
        seeds.append(int(s))
    if not seeds:
        raise ValueError(f"grid: seeds: no seeds in {token!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"grid: seeds: repeated seeds in {token!r}")
    return tuple(seeds)


def parse_grid(spec) -> Grid:
    """A :class:`Grid` from a spec such as ``"lam1=1e-3:1e1:8:log lam2=0.1,1,10 seeds=5"``.

    Args:
      spec: a string of whitespace-separated ``KEY=VALUES`` tokens, a sequence of such tokens (as a
        command line gives them), a mapping ``{key: values}`` (values a token string, a number or a
        sequence of numbers; ``seeds`` a count or a sequence), or a :class:`Grid` (returned as is).
        Keys: ``lam1`` (required, values > 0), ``lam2`` (required, values >= 0) and ``seeds``
        (default 1). VALUES is

        * ``lo:hi:n:log`` -- n >= 2 points, geometric: ``lo * (hi/lo)^(k/(n-1))``, k = 0..n-1 (lo, hi > 0);
        * ``lo:hi:n:lin`` or ``lo:hi:n`` -- n >= 2 points, evenly spaced from lo to hi;
        * ``a,b,c`` -- the listed values (``a,`` a one-value list); ``a`` -- one value;
        * for ``seeds``: ``N`` -- seeds 0..N-1; ``a,b,c`` -- those seeds (``a,`` one seed).

    Returns:
      a :class:`Grid`, values in the order written (no repeats).

    Raises:
      ValueError: naming the key and the token: an unknown or repeated key, a token without ``=``,
      a value that is not a finite number, a bad range, lam1 <= 0, lam2 < 0, repeated values, a
      missing lam1 or lam2.
    """
    if isinstance(spec, Grid):
        return spec
    if isinstance(spec, Mapping):
        entries = [(str(k), v, f"{k}={v!r}") for k, v in spec.items()]
    elif not isinstance(spec, (str, Sequence)):
        raise ValueError(f"grid: must be a spec string, a list of KEY=VALUES tokens, a dict or a Grid, "
                         f"got {type(spec).__name__}")
    else:
        tokens = spec.split() if isinstance(spec, str) else [str(t) for t in spec]
        entries = []
        for token in tokens:
            if "=" not in token:
                raise ValueError(f"grid: token {token!r} must be KEY=VALUES with KEY one of {', '.join(KEYS)}")
            key, value = token.split("=", 1)
            entries.append((key.strip(), value, token))
    found = {}
    for key, value, token in entries:
        if key not in KEYS:
            raise ValueError(f"grid: unknown key {key!r} in {token!r}; known: {', '.join(KEYS)}")
        if key in found:
            raise ValueError(f"grid: key {key!r} given twice ({token!r})")
        found[key] = _seeds(token, value) if key == "seeds" else _values(key, token, value)
    for key in PARAMS:
        if key not in found:
            raise ValueError(f"grid: {key}: missing (give {key}=VALUES, e.g. {key}=1e-3:1e1:8:log or {key}=0.1)")
    return Grid(found["lam1"], found["lam2"], found.get("seeds", (0,)))


def path_order(grid: Grid) -> np.ndarray:
    """The order in which the ``"path"`` strategy visits the points: (P,) point ids.

    lam1 from its largest value to its smallest (the strongly regularised end first: its solution is
    near 0, where a cold start begins); inside each lam1 value lam2 from largest to smallest, then back
    (a snake), so that each point's predecessor differs in one coordinate by one grid step.
    """
    n1, n2 = grid.shape
    rows = np.argsort(-np.asarray(grid.lam1), kind="stable")
    cols = np.argsort(-np.asarray(grid.lam2), kind="stable")
    order = []
    for k, i in enumerate(rows):
        for j in (cols if k % 2 == 0 else cols[::-1]):
            order.append(i * n2 + j)
    return np.asarray(order, dtype=np.int64)


# ----------------------------------------------------------------------------- splits and metrics

def split_by_task(task, seed: int, *, val_fraction: float = 0.2, test_fraction: float = 0.2, num_tasks=None):
    """Seed-dependent train / validation / test masks, stratified by task: three (N,) bool arrays.

    Task t with ``n_t`` samples gets ``k_test = min(round(test_fraction n_t), n_t - 1)`` test samples and
    ``k_val = min(round(val_fraction n_t), n_t - 1 - k_test)`` validation samples, drawn uniformly by
    ``np.random.default_rng((0x5EEB, seed))``; at least one stays for training. The counts per task do
    not depend on the seed, so every seed's training data have the same shapes (one compiled program).
    """
    task = np.asarray(task, np.int64)
    m = int(task.max()) + 1 if num_tasks is None else int(num_tasks)
    counts = np.bincount(task, minlength=m)
    rng = np.random.default_rng((0x5EEB, int(seed)))
    order = np.lexsort((rng.random(task.size), task))          # rows grouped by task, random inside
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(task.size, np.int64)
    rank[order] = np.arange(task.size) - starts[task[order]]   # position of each row inside its task
    k_test = np.minimum(np.rint(test_fraction * counts).astype(np.int64), np.maximum(counts - 1, 0))
    k_val = np.minimum(np.rint(val_fraction * counts).astype(np.int64), np.maximum(counts - 1 - k_test, 0))
    test = rank < k_test[task]
    val = ~test & (rank < (k_test + k_val)[task])
    return ~(test | val), val, test


def metric_name(loss: str) -> str:
    """``"mse"`` (mean squared error) for squared loss, ``"error"`` (misclassification rate) otherwise."""
    return "mse" if loss == "squared" else "error"


def evaluate(W, X, y, task, loss: str) -> np.ndarray:
    """Held-out metric of models ``W`` (..., m, d) on rows X (n, d), y (n,), task (n,): shape (...).

    Squared loss: ``mean_i (y_i - <w_{t_i}, x_i>)^2``, pooled over the rows. Hinge and logistic: the
    misclassification rate of ``sign(<w_{t_i}, x_i>)`` (0 counts as +1). NaN when there are no rows.
    """
    W = np.asarray(W)
    if len(y) == 0:
        return np.full(W.shape[:-2], np.nan)
    a = np.einsum("nd,...nd->...n", X, W[..., task, :])
    if loss == "squared":
        return np.mean((y - a) ** 2, axis=-1)
    return np.mean(np.where(a >= 0, 1.0, -1.0) != y, axis=-1)


# ----------------------------------------------------------------------------- the compiled programs

@partial(jax.jit, static_argnames=("loss", "dual", "history_size"))
def batched_program(sites, W0, alpha0, lam1, lam2, lmax, tol, max_iter, eps, lmax_known, *, loss, dual,
                    history_size):
    """:func:`~mtl_jax.solvers.centralized.solve_program` ``vmap``ped over B points: one program.

    Args:
      sites: one data set (not batched). W0: (B, m, d), alpha0: (B, m, n_max) starts; lam1, lam2: (B,).
      lmax, tol, max_iter, eps, lmax_known, loss, dual, history_size: as for ``solve_program``, shared.

    Returns:
      an :class:`~mtl_jax.solvers.centralized.APGSolution` whose leaves have a leading B axis. The loop
      runs while any point's stopping rule fails; the others are frozen (``lax.while_loop`` batched
      over a per-point predicate keeps each point's state where its predicate is false).
    """
    def one(W0_, alpha0_, lam1_, lam2_):
        return centralized.solve_program(sites, W0_, alpha0_, lam1_, lam2_, lmax, tol, max_iter, eps, lmax_known,
                                         loss=loss, dual=dual, history_size=history_size)

    return jax.vmap(one)(W0, alpha0, lam1, lam2)


class _Solved(NamedTuple):
    W: np.ndarray           # (P, m, d) in point-id order
    objective: np.ndarray   # (P,)
    gap: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    seconds: np.ndarray     # (P,) solve time per point (a batch's time is split evenly over its points)
    compile_seconds: float
    order: np.ndarray       # (P,) visiting order (path) / batch order


def _program_inputs(sites, loss, method, dtype):
    loss_ = get_loss(loss)
    if method == "apg_primal" and loss_.curvature is None:
        raise ValueError(f"method: 'apg_primal' needs a smooth loss; loss {loss_.name!r} is not (use 'apg_dual')")
    dual = method == "apg_dual" or (method == "apg" and loss_.curvature is None)
    W0 = jnp.zeros((sites.num_sites, sites.dim), dtype)
    alpha0 = jnp.zeros(sites.y.shape, dtype)
    return loss_.name, dual, W0, alpha0


def _solve_path(sites, points, order, *, loss, method, tol, max_iter, eps, progress=None) -> _Solved:
    """The points one after another in ``order``, each warm-started from the one before: one program."""
    dtype = sites.X.dtype
    loss_name, dual, W, alpha = _program_inputs(sites, loss, method, dtype)
    m = sites.num_sites
    lmax, known = jnp.zeros((m,), dtype), jnp.asarray(False)
    fixed = (jnp.asarray(tol, dtype), jnp.asarray(max_iter, jnp.int32), jnp.asarray(eps, dtype))
    args = (sites, W, alpha, jnp.asarray(points[order[0], 0], dtype), jnp.asarray(points[order[0], 1], dtype),
            lmax, *fixed, known)
    static = dict(loss=loss_name, dual=dual, history_size=history_capacity(max_iter))
    program, compile_seconds = compiled(centralized.solve_program, args, static)
    P = len(points)
    outs, seconds = [None] * P, np.zeros(P)
    with centralized.one_blas_thread():
        for k, p in enumerate(order):
            t0 = time.perf_counter()
            res = program(sites, W, alpha, jnp.asarray(points[p, 0], dtype), jnp.asarray(points[p, 1], dtype),
                          lmax, *fixed, known)
            # The next point starts here; lmax (the step size's data bound) is computed once.
            W, alpha, lmax, known = res.W, res.alpha, res.lmax, jnp.asarray(True)
            jax.block_until_ready(res.gap)
            seconds[p] = time.perf_counter() - t0
            outs[p] = (res.W, res.objective, res.gap, res.converged, res.iterations)
            if progress is not None:
                progress(1)
    W_all, obj, gap, conv, its = (np.stack([np.asarray(o[i]) for o in outs]) for i in range(5))
    return _Solved(W_all, obj, gap, conv.astype(bool), its.astype(np.int64), seconds, compile_seconds,
                   np.asarray(order))


def _solve_batched(sites, points, order, batch_size, *, loss, method, tol, max_iter, eps, progress=None) -> _Solved:
    """The points in batches of ``batch_size`` (in ``order``), each batch one call of :func:`batched_program`;
    batch k+1 starts element-wise from batch k's solutions (cold zeros for the first)."""
    dtype = sites.X.dtype
    loss_name, dual, W0, alpha0 = _program_inputs(sites, loss, method, dtype)
    m, P = sites.num_sites, len(points)
    B = min(batch_size, P)
    lmax, known = jnp.zeros((m,), dtype), jnp.asarray(False)
    fixed = (jnp.asarray(tol, dtype), jnp.asarray(max_iter, jnp.int32), jnp.asarray(eps, dtype))
    static = dict(loss=loss_name, dual=dual, history_size=64)  # the history is not kept: smallest buffer
    W = jnp.broadcast_to(W0, (B,) + W0.shape)
    alpha = jnp.broadcast_to(alpha0, (B,) + alpha0.shape)
    compile_seconds = 0.0
    results, seconds = {}, np.zeros(P)
    with centralized.one_blas_thread():
        for start in range(0, P, B):
            ids = np.asarray(order[start:start + B])
            n = len(ids)
            lam = np.asarray(points[ids], float)
            if n < B:  # the last, short batch: pad with its first point (results dropped)
                lam = np.concatenate([lam, np.repeat(lam[:1], B - n, axis=0)])
            args = (sites, W, alpha, jnp.asarray(lam[:, 0], dtype), jnp.asarray(lam[:, 1], dtype), lmax, *fixed,
                    known)
            program, c = compiled(batched_program, args, static)
            compile_seconds += c
            t0 = time.perf_counter()
            res = jax.block_until_ready(program(*args))
            seconds[ids] = (time.perf_counter() - t0) / n
            W, alpha, lmax, known = res.W, res.alpha, res.lmax[0], jnp.asarray(True)
            host = [np.asarray(a) for a in (res.W, res.objective, res.gap, res.converged, res.iterations)]
            for k, p in enumerate(ids):
                results[int(p)] = tuple(a[k] for a in host)
            if progress is not None:
                progress(n)
    W_all, obj, gap, conv, its = (np.stack([results[p][i] for p in range(P)]) for i in range(5))
    return _Solved(W_all, obj, gap, conv.astype(bool), its.astype(np.int64), seconds, compile_seconds,
                   np.asarray(order))


# ----------------------------------------------------------------------------- the sweep

@dataclass(frozen=True, eq=False)
class SweepResult:
    """What :func:`sweep` returns. S seeds, P = len(lam1) * len(lam2) points (ids as in :class:`Grid`).

    Attributes:
      grid: the :class:`Grid`. points: (P, 2) (lam1, lam2) per point id. seeds: (S,) the seeds.
      metric: ``"mse"`` or ``"error"`` (:func:`evaluate`).
      val, test: (S, P) the metric on each seed's validation and test rows.
      objective, gap: (S, P) J(W) on the training rows and its duality gap (``J(W) - min J <= gap``).
      converged: (S, P) bool, ``gap <= tol * J``. iterations: (S, P).
      W: (S, P, m, d) the models (trained on each seed's training rows).
      selected: (S,) the point id chosen on validation per seed (:func:`select`).
      strategy: ``"path"`` or ``"batched"``; order: (P,) the order the points were run in.
      seconds: (S, P) solve time per point; compile_seconds: compilation (all seeds);
      wall_seconds: the whole sweep (splits, solves, metrics; not the writing).
      masks: ``{"train", "val", "test"}`` each (S, N) bool, in the input row order.
      config: the sweep's settings (as written to the store). path: the run folder, or None.
    """

    grid: Grid
    points: np.ndarray
    seeds: np.ndarray
    metric: str
    val: np.ndarray
    test: np.ndarray
    objective: np.ndarray
    gap: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    W: np.ndarray
    selected: np.ndarray
    strategy: str
    order: np.ndarray
    seconds: np.ndarray
    compile_seconds: float
    wall_seconds: float
    masks: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def selected_params(self) -> list[dict]:
        """Per seed ``{"seed", "point", "lam1", "lam2", "val", "test"}`` of the selected point."""
        return [{"seed": int(s), "point": int(p), "lam1": float(self.points[p, 0]), "lam2": float(self.points[p, 1]),
                 "val": float(self.val[k, p]), "test": float(self.test[k, p])}
                for k, (s, p) in enumerate(zip(self.seeds, self.selected))]

    def selected_metric(self, which: str = "test") -> np.ndarray:
        """(S,) the ``"test"`` (or ``"val"``) metric at each seed's selected point."""
        if which not in ("test", "val"):
            raise ValueError(f"which: must be 'test' or 'val', got {which!r}")
        values = {"test": self.test, "val": self.val}[which]
        return values[np.arange(len(self.seeds)), self.selected]

    def metric_grid(self, which: str = "val") -> np.ndarray:
        """The ``"val"`` or ``"test"`` metric (or ``"objective"``, ``"gap"``, ``"iterations"``) as (S, n1, n2):
        ``[s, i, j]`` is seed s at ``(lam1[i], lam2[j])`` in the grid's order (for heat maps over the grid)."""
        values = {"val": self.val, "test": self.test, "objective": self.objective, "gap": self.gap,
                  "iterations": self.iterations}
        if which not in values:
            raise ValueError(f"which: must be one of {tuple(values)}, got {which!r}")
        return values[which].reshape((len(self.seeds),) + self.grid.shape)

    def test_summary(self, which: str = "test") -> dict:
        """Mean and spread over seeds of the metric at the selected points: ``{"mean", "std", "min", "max",
        "values"}``; ``std`` is the sample standard deviation (ddof = 1), 0 for a single seed."""
        return _spread(self.selected_metric(which))

    def records(self) -> list[dict]:
        """One dict per (seed, point), seeds in order, then point ids (the store's JSON Lines records):
        ``seed, point, lam1, lam2, objective, gap, relative_gap, converged, iterations, val_<metric>,
        test_<metric>, selected, order`` (position in the run order) and ``seconds`` (the only field that
        changes between identical runs)."""
        rank = np.empty(len(self.order), np.int64)
        rank[self.order] = np.arange(len(self.order))
        out = []
        for k, s in enumerate(self.seeds):
            for p in range(len(self.points)):
                J, gap = float(self.objective[k, p]), float(self.gap[k, p])
                out.append({
                    "seed": int(s), "point": p, "lam1": float(self.points[p, 0]), "lam2": float(self.points[p, 1]),
                    "objective": J, "gap": gap, "relative_gap": gap / max(abs(J), np.finfo(np.float64).tiny),
                    "converged": bool(self.converged[k, p]), "iterations": int(self.iterations[k, p]),
                    f"val_{self.metric}": float(self.val[k, p]), f"test_{self.metric}": float(self.test[k, p]),
                    "selected": bool(self.selected[k] == p), "order": int(rank[p]),
                    "seconds": float(self.seconds[k, p])})
        return out

    def summary(self) -> dict:
        """The headline numbers, as written to the run's manifest."""
        return {"metric": self.metric, "test": self.test_summary("test"), "val": self.test_summary("val"),
                "selected": self.selected_params, "strategy": self.strategy, "points": int(len(self.points)),
                "seeds": [int(s) for s in self.seeds], "all_converged": bool(np.all(self.converged)),
                "max_relative_gap": float(np.max(self.gap / np.maximum(np.abs(self.objective),
                                                                         np.finfo(np.float64).tiny))),
                "iterations": int(np.sum(self.iterations)), "compile_seconds": self.compile_seconds,
                "solve_seconds": float(np.sum(self.seconds)), "wall_seconds": self.wall_seconds}


def _spread(values) -> dict:
    v = np.asarray(values, float)
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "min": float(np.min(v)), "max": float(np.max(v)),
            "values": [float(x) for x in v]}


def select(val, points, *, rtol: float = 1e-9) -> int:
    """The selected point id: least validation metric; near-ties go to the most regularised point.

    Points whose ``val`` is within ``rtol * |min|`` of the least value (NaN never counts) are tied; of
    those the one with the largest lam1, then the largest lam2, is chosen. The tie rule keeps the choice
    independent of how accurately (and in which order) the points were solved, down to ``rtol``.
    """
    val = np.asarray(val, float)
    finite = np.isfinite(val)
    if not finite.any():
        raise ValueError("val: no finite validation metric to select on")
    best = np.min(val[finite])
    tied = np.flatnonzero(finite & (val <= best + rtol * abs(best)))
    key = np.lexsort((-points[tied, 1], -points[tied, 0]))   # lam1 descending, then lam2 descending
    return int(tied[key[0]])


def default_strategy() -> str:
    """``"path"`` on CPU (one program called point by point, warm-started), ``"batched"`` elsewhere."""
    return "path" if jax.default_backend() == "cpu" else "batched"


def sweep(X, y, task, grid, *, loss="squared", method="apg", tol=1e-6, max_iter=None, eps=DEFAULT_EPS,
          num_tasks=None, val_fraction=0.2, test_fraction=0.2, strategy="auto", batch_size=None,
          select_rtol=1e-9, out=None, name=None, config=None, progress=None) -> SweepResult:
    """Sweep (lam1, lam2) x seeds with the centralized MTRL solver; select per seed on validation.

    For each seed s: rows split by :func:`split_by_task` (seed s); at every grid point minimise
    ``J(W) = sum_t (1/n_t) sum_i loss(y_ti, <w_t, x_ti>) + (lam1/2)||W||_F^2 + (lam2/2)||W||_*^2`` over the
    training rows (to ``gap <= tol * J``); evaluate :func:`evaluate` on the validation and test rows;
    select the point of least validation metric (:func:`select`). A seed's numbers depend on that seed
    and the settings only (each seed starts cold): same seed, same numbers.

    Args:
      X: (N, d) features, y: (N,) targets, task: (N,) ids 0..m-1 (as for :func:`mtl_jax.fit`).
      grid: a spec for :func:`parse_grid` (``"lam1=1e-3:1e1:8:log lam2=0.1,1,10 seeds=5"``), its tokens,
        a mapping, or a :class:`Grid`.
      loss, method ("apg", "apg_primal", "apg_dual"), tol, max_iter (default 5000), eps: as for ``fit``.
      num_tasks: m, when larger than ``max(task) + 1``.
      val_fraction, test_fraction: per-task fractions held out (>= 0, sum < 1; val_fraction > 0).
      strategy: ``"auto"`` (:func:`default_strategy`), ``"path"`` or ``"batched"`` (module docstring).
      batch_size: points per batched call (``"batched"`` only; default all points).
      select_rtol: the tie tolerance of :func:`select`.
      out: a folder: write the sweep there as one run of the results store (one JSON Lines record per
        seed and point, :meth:`SweepResult.records`; arrays ``points``, ``seeds``, ``W`` (S, P, m, d),
        ``val``, ``test``, ``objective``, ``gap``, ``iterations``, ``selected``, ``train_mask``, ``val_mask``,
        ``test_mask``; the summary of :meth:`SweepResult.summary`). name: the run's name (default: folder).
      config: extra entries for the run's config (e.g. the data's path), next to ``"sweep"``.
      progress: None, or a callable ``progress(done, total)`` called after every point (``"path"``) or
        batch (``"batched"``) with the points done so far over all seeds and ``total = S * P`` (for a
        progress bar, e.g. the ``update`` of ``mtl_jax.runner.progress.bar``; called outside the compiled program).

    Returns:
      a :class:`SweepResult`.

    Raises:
      ValueError: naming the argument (``X``, ``y``, ``task``, ``grid``, ``loss``, ``method``, ``tol``,
        ``max_iter``, ``eps``, ``val_fraction``, ``test_fraction``, ``strategy``, ``batch_size``, ``select_rtol``).
    """
    started = store.now()
    t_start = time.perf_counter()
    grid = parse_grid(grid)
    X, y, task, m = validate_dataset(X, y, task, loss=loss, num_tasks=num_tasks)
    if method not in SWEEP_METHODS:
        raise ValueError(f"method: a sweep runs one of {SWEEP_METHODS}, got {method!r}")
    tol = check_real("tol", tol)
    max_iter = centralized.DEFAULT_MAX_ITER["apg"] if max_iter is None else check_int("max_iter", max_iter, low=1,
                                                                                      high=2**31 - 1)
    eps = check_real("eps", eps, strict=True)
    if eps >= 1:
        raise ValueError(f"eps: must be a finite number in (0, 1) (the Omega-step's relative floor), got {eps!r}")
    val_fraction = check_real("val_fraction", val_fraction, strict=True)
    test_fraction = check_real("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction: val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    select_rtol = check_real("select_rtol", select_rtol)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress: must be None or a callable progress(done, total), got {type(progress).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: must be one of {STRATEGIES}, got {strategy!r}")
    strategy = default_strategy() if strategy == "auto" else strategy
    points = grid.points()
    P = len(points)
    if batch_size is not None:
        if strategy != "batched":
            raise ValueError("batch_size: applies to strategy='batched' only")
        batch_size = check_int("batch_size", batch_size, low=1)
    check_scale(X, y, np.bincount(task, minlength=m), lam1=min(grid.lam1), loss=loss)
    order = path_order(grid) if strategy == "path" else _batched_order(grid)

    S, N = len(grid.seeds), len(y)
    masks = {k: np.zeros((S, N), bool) for k in ("train", "val", "test")}
    fields = {k: [] for k in ("W", "objective", "gap", "converged", "iterations", "seconds", "val", "test")}
    compile_seconds = 0.0
    metric = metric_name(loss)
    settings = dict(loss=loss, method=method, tol=tol, max_iter=max_iter, eps=eps)
    done = [0]

    def advance(n):
        done[0] += n
        progress(done[0], S * P)

    for k, seed in enumerate(grid.seeds):
        train, val, test = split_by_task(task, seed, val_fraction=val_fraction, test_fraction=test_fraction,
                                         num_tasks=m)
        if not val.any():
            raise ValueError(f"val_fraction: {val_fraction} holds out no validation samples for these tasks")
        masks["train"][k], masks["val"][k], masks["test"][k] = train, val, test
        sites = pack_sites(X[train], y[train], task[train], m)
        if strategy == "path":
            solved = _solve_path(sites, points, order, **settings, progress=None if progress is None else advance)
        else:
            solved = _solve_batched(sites, points, order, P if batch_size is None else batch_size, **settings,
                                    progress=None if progress is None else advance)
        compile_seconds += solved.compile_seconds
        for key in ("W", "objective", "gap", "converged", "iterations", "seconds"):
            fields[key].append(getattr(solved, key))
        fields["val"].append(evaluate(solved.W, X[val], y[val], task[val], loss))
        fields["test"].append(evaluate(solved.W, X[test], y[test], task[test], loss))
    arrays = {key: np.stack(v) for key, v in fields.items()}
    selected = np.array([select(v, points, rtol=select_rtol) for v in arrays["val"]], np.int64)
    sweep_config = {"grid": grid.spec(), "lam1": list(grid.lam1), "lam2": list(grid.lam2),
                    "seeds": list(grid.seeds), **settings, "num_tasks": m, "dim": int(X.shape[1]),
                    "num_samples": N, "val_fraction": val_fraction, "test_fraction": test_fraction,
                    "strategy": strategy, "batch_size": batch_size, "select_rtol": select_rtol, "metric": metric}
    res = SweepResult(grid=grid, points=points, seeds=np.asarray(grid.seeds), metric=metric, val=arrays["val"],
                      test=arrays["test"], objective=arrays["objective"], gap=arrays["gap"],
                      converged=arrays["converged"], iterations=arrays["iterations"], W=arrays["W"],
                      selected=selected, strategy=strategy, order=order, seconds=arrays["seconds"],
                      compile_seconds=compile_seconds, wall_seconds=time.perf_counter() - t_start, masks=masks,
                      config={"sweep": sweep_config, **dict(config or {})})
    if out is not None:
        res = write_sweep(out, res, name=name, started=started)
    return res


def _batched_order(grid: Grid) -> np.ndarray:
    """Batched order: lam1 descending (major), lam2 descending: a batch of len(lam2) points is one lam1 row,
    and point j of the next batch (next smaller lam1, same lam2) starts from point j of this one."""
    n1, n2 = grid.shape
    rows = np.argsort(-np.asarray(grid.lam1), kind="stable")
    cols = np.argsort(-np.asarray(grid.lam2), kind="stable")
    return np.asarray([i * n2 + j for i in rows for j in cols], np.int64)


def write_sweep(out, res: SweepResult, *, name=None, started=None) -> SweepResult:
    """Write ``res`` as one run folder of the results store (kind ``"sweep"``, ``config["sweep"]``);
    returns ``res`` with ``path`` set."""
    arrays = {"points": res.points, "seeds": res.seeds, "W": res.W, "val": res.val, "test": res.test,
              "objective": res.objective, "gap": res.gap, "converged": res.converged,
              "iterations": res.iterations, "selected": res.selected, "order": res.order,
              **{f"{k}_mask": v for k, v in res.masks.items()}}
    path = store.write_run(out, kind="sweep", config=res.config, history=res.records(), arrays=arrays,
                           summary=res.summary(), name=name, started=started)
    return replace(res, path=path)


def read_sweep(path) -> dict:
    """A sweep run folder read back: ``{"config", "summary", "records" (list of dicts), "arrays"}``.

    ValueError when ``path`` is not a run of the store or not a sweep (kind ``"sweep"``; folders written
    before that kind existed are kind ``"solver"`` with ``config["sweep"]`` and are read too).
    """
    run = store.read_run(path)
    if run.kind not in ("sweep", "solver") or "sweep" not in run.config:
        raise ValueError(f"{path}: not a sweep run (its config has no 'sweep' entry)")
    return {"config": run.config, "summary": run.summary, "records": run.history, "arrays": run.arrays}


__all__ = ["Grid", "KEYS", "PARAMS", "STRATEGIES", "SweepResult", "batched_program", "default_strategy",
           "evaluate", "metric_name", "parse_grid", "path_order", "read_sweep", "select", "split_by_task",
           "sweep", "write_sweep"]
