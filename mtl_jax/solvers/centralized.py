"""Centralized MTRL solvers on site-padded data: the fast certified solver and the classic alternation.

``method="apg"`` minimises J directly (DESIGN section 2): accelerated proximal gradient with restart,
on the primal for smooth losses (squared, logistic) and on the dual for hinge, where the prox of
``(lam2/2)||W||_*^2`` acts on the singular values of W. One ``lax.while_loop``, stopped by the
duality gap of J. Omega is computed once, at the end, in closed form from the optimal W.

``method="alternating"``: W-step at fixed Omega then Omega-step
(:mod:`mtl_jax.solvers.alternating`), certified on J after every alternation.

``method="apg_primal"`` / ``"apg_dual"`` force one side (the dual works for every loss: two code
paths to the same optimum, which the tests compare).
"""
from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.losses import get_loss
from mtl_jax.mtrl import DEFAULT_EPS, SpectralMatrix, TraceNormSq, omega_factored
from mtl_jax.solvers.alternating import alternation
from mtl_jax.solvers.apg import dual_apg, dual_lipschitz, gram_lmax, primal_apg, primal_lipschitz

METHODS = ("apg", "apg_primal", "apg_dual", "alternating")


class HistoryRecord(NamedTuple):
    """One row of a solver's history (DESIGN section 6).

    ``round`` counts iterations (APG) or alternations; ``objective`` is J(W); ``gap`` the duality gap
    of J, an upper bound on ``J(W) - min J``; ``bytes`` the bytes communicated (0: centralized);
    ``seconds`` the wall time since the start. For APG the loop is one compiled program, so its
    seconds are the loop's time apportioned evenly over its iterations (compilation excluded).
    """

    round: int
    objective: float
    gap: float
    bytes: int
    seconds: float


class SolveOutput(NamedTuple):
    W: np.ndarray          # (m, d)
    omega: SpectralMatrix  # factored Omega of W, numpy leaves
    alpha: np.ndarray      # (m, n_max) dual point of the certificate
    history: tuple         # of HistoryRecord
    objective: float       # J(W)
    gap: float             # certificate: J(W) - D(alpha)
    converged: bool
    iterations: int
    compile_seconds: float
    solve_seconds: float


@partial(jax.jit, static_argnames=("loss", "dual", "max_iter"))
def _apg_program(sites, W0, alpha0, lam1, lam2, gram, tol, *, loss, dual, max_iter):
    reg = TraceNormSq(lam1, lam2)
    if dual:
        return dual_apg(sites, loss, reg, alpha0, lipschitz=dual_lipschitz(reg, gram), tol=tol,
                        max_iter=max_iter)
    return primal_apg(sites, loss, reg, W0, lipschitz=primal_lipschitz(loss, gram, sites.counts),
                      tol=tol, max_iter=max_iter)


_gram_lmax = jax.jit(gram_lmax)
_omega_factored = jax.jit(omega_factored, static_argnames="eps")
_COMPILED: dict = {}
_MAX_COMPILED = 32


def _compiled(fn, args, static):
    """Ahead-of-time compiled ``fn`` for these argument shapes and static options, cached.

    Compiling ahead of time lets ``solve`` report compilation apart from solving; the cache keeps a
    second fit of the same shapes (another lam1, lam2, tol or warm start: all traced) from compiling again.
    Returns (executable, seconds spent compiling now).
    """
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (fn, tree, tuple((x.shape, str(x.dtype)) for x in map(jnp.asarray, leaves)),
           tuple(sorted(static.items())))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = fn.lower(*args, **static).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))  # the oldest
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


def _numpy_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def solve(sites, *, lam1, lam2, loss="squared", method="apg", tol=1e-6, max_iter=None, W0=None,
          alpha0=None, eps=DEFAULT_EPS, inner_tol=1e-10, inner_max_iter=2000) -> SolveOutput:
    """Minimise J on ``sites`` (a :class:`mtl_jax.data.Sites`); inputs are assumed validated.

    Args:
      lam1, lam2: regularisation (lam1 > 0, lam2 >= 0); traced, so changing them does not recompile.
      loss: "squared", "hinge" or "logistic".
      method: one of :data:`METHODS`.
      tol: stop when the duality gap of J is at most ``tol * J(W)`` (relative accuracy).
      max_iter: iterations (APG, default 5000) or alternations (default 100).
      W0: (m, d) warm start for the primal methods; ``alpha0`` (m, n_max) for the dual ones.
      eps: relative eigenvalue floor of the Omega-step.
      inner_tol, inner_max_iter: the W-step's accuracy in the alternation.
    """
    loss_ = get_loss(loss)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = sites.X.dtype
    m, n_max, d = sites.X.shape
    W0 = jnp.zeros((m, d), dtype) if W0 is None else jnp.asarray(W0, dtype)
    alpha0 = jnp.zeros((m, n_max), dtype) if alpha0 is None else jnp.asarray(alpha0, dtype)
    lam1 = jnp.asarray(lam1, dtype)
    lam2 = jnp.asarray(lam2, dtype)
    gram = _gram_lmax(sites.X)

    if method == "alternating":
        return _alternate(sites, W0, alpha0, lam1, lam2, gram, loss_.name, tol,
                          100 if max_iter is None else max_iter, eps, inner_tol, inner_max_iter)

    dual = method == "apg_dual" or (method == "apg" and loss_.curvature is None)
    if method == "apg_primal" and loss_.curvature is None:
        raise ValueError(f"method 'apg_primal' needs a smooth loss; loss {loss_.name!r} is not (use 'apg_dual')")
    max_iter = 5000 if max_iter is None else int(max_iter)
    args = (sites, W0, alpha0, lam1, lam2, gram, jnp.asarray(tol, dtype))
    kwargs = dict(loss=loss_.name, dual=dual, max_iter=max_iter)
    compiled, compile_seconds = _compiled(_apg_program, args, kwargs)
    t1 = time.perf_counter()
    res = jax.block_until_ready(compiled(*args))
    t2 = time.perf_counter()
    st = _numpy_tree(res.state)
    its = int(st.iteration)
    per_iter = (t2 - t1) / max(its, 1)
    objs, gaps = np.asarray(res.objectives), np.asarray(res.gaps)
    history = tuple(HistoryRecord(k + 1, float(objs[k]), float(gaps[k]), 0, per_iter * (k + 1))
                    for k in range(its))
    omega = _numpy_tree(_omega_factored(st.W, eps=eps))
    return SolveOutput(st.W, omega, st.alpha, history, float(st.objective), float(st.gap),
                       bool(res.converged), its, compile_seconds, t2 - t1)


def _alternate(sites, W, alpha, lam1, lam2, gram, loss, tol, max_iter, eps, inner_tol, inner_max_iter):
    kwargs = dict(loss=loss, inner_max_iter=inner_max_iter, eps=eps)
    inner_tol = jnp.asarray(inner_tol, W.dtype)
    step, compile_seconds = _compiled(alternation, (W, alpha, sites, lam1, lam2, gram, inner_tol), kwargs)
    t1 = time.perf_counter()
    history = []
    converged = False
    J = gap = float("nan")
    for k in range(max_iter):
        W, alpha, J, gap, _ = step(W, alpha, sites, lam1, lam2, gram, inner_tol)
        J, gap = float(J), float(gap)  # blocks: the seconds below are real
        history.append(HistoryRecord(k + 1, J, gap, 0, time.perf_counter() - t1))
        if gap <= tol * abs(J):
            converged = True
            break
    t2 = time.perf_counter()
    omega = _numpy_tree(_omega_factored(W, eps=eps))
    return SolveOutput(np.asarray(W), omega, np.asarray(alpha), tuple(history), J, gap, converged,
                       len(history), compile_seconds, t2 - t1)
