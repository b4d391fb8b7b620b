"""Centralized MTRL solvers on site-padded data: the fast certified solver and the classic alternation.

``method="apg"`` minimises J directly (docs/mathematics.md, section 3): accelerated proximal gradient
with restart, on the primal for smooth losses (squared, logistic) and on the dual for hinge, where the
prox of ``(lam2/2)||W||_*^2`` acts on the singular values of W. One ``lax.while_loop``, stopped by the
duality gap of J. Omega is computed once, at the end, in closed form from the optimal W.

``method="alternating"``: W-step at fixed Omega then Omega-step
(:mod:`mtl_jax.solvers.alternating`), certified on J after every alternation.

``method="apg_primal"`` / ``"apg_dual"`` force one side (the dual works for every loss: two code
paths to the same optimum, which the tests compare).

The solver-neutral pieces (history rows, the output, the compiled-program cache) live in
:mod:`mtl_jax.solvers.base`.
"""
from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import names
from mtl_jax.losses import get_loss
from mtl_jax.mtrl import DEFAULT_EPS, TraceNormSq, omega_factored
from mtl_jax.solvers.alternating import alternation
from mtl_jax.solvers.apg import dual_apg, dual_lipschitz, gram_lmax_bound, primal_apg, primal_lipschitz
from mtl_jax.solvers.base import (
    HistoryRecord,
    SolveOutput,
    check_options,
    compiled,
    history_capacity,
    numpy_tree,
    register_exportable,
)

METHODS = names.METHODS
#: Options of :func:`solve` beyond the common ones (the alternation's W-step accuracy).
OPTIONS = ("inner_tol", "inner_max_iter")
DEFAULT_MAX_ITER = {"apg": 5000, "alternating": 100}


@partial(jax.jit, static_argnames=("loss", "dual", "history_size"))
def apg_program(sites, W0, alpha0, lam1, lam2, lmax, tol, max_iter, *, loss, dual, history_size):
    """The whole APG solve as one program: :func:`~mtl_jax.solvers.apg.primal_apg` or ``dual_apg`` on J.

    Args:
      sites: padded per-site data. W0: (m, d) primal start; alpha0: (m, n_max) dual start.
      lam1, lam2, tol, max_iter: traced scalars (a new value does not compile again).
      lmax: (m,) ``lambda_max(X_t^T X_t)`` per site or an upper bound (:func:`~mtl_jax.solvers.apg.gram_lmax_bound`).
      loss: a loss name; dual: ascend the dual (needed for hinge); history_size: length of the
        recorded history, at least ``max_iter`` (:func:`~mtl_jax.solvers.base.history_capacity`).

    Returns:
      an :class:`~mtl_jax.solvers.apg.APGResult`.
    """
    reg = TraceNormSq(lam1, lam2)
    if dual:
        return dual_apg(sites, loss, reg, alpha0, lipschitz=dual_lipschitz(reg, lmax, sites), tol=tol,
                        max_iter=max_iter, history_size=history_size)
    return primal_apg(sites, loss, reg, W0, lipschitz=primal_lipschitz(loss, lmax, sites.counts, reg),
                      tol=tol, max_iter=max_iter, history_size=history_size)


#: ``lambda_max(X_t^T X_t)`` per site (an upper bound, :func:`~mtl_jax.solvers.apg.gram_lmax_bound`), compiled.
site_lmax = jax.jit(gram_lmax_bound)
factored_omega = jax.jit(omega_factored)


class APGSolution(NamedTuple):
    """What :func:`solve_program` hands back to the host: the certified point and its history, nothing more.

    (The loop's full state, with its extrapolated point and stored margins, stays on the device.)
    """

    W: jax.Array           # (m, d)
    alpha: jax.Array       # (m, n_max)
    omega: object          # SpectralMatrix of W
    objectives: jax.Array  # (history_size,)
    gaps: jax.Array        # (history_size,)
    objective: jax.Array   # ()
    gap: jax.Array         # ()
    converged: jax.Array   # () bool
    iterations: jax.Array  # () int
    lmax: jax.Array        # (m,) the step sizes' lambda_max, for reuse on the same data


register_exportable(APGSolution)  # so that the persistent layer of ``compiled`` can store solve_program

@partial(jax.jit, static_argnames=("loss", "dual", "history_size"))
def solve_program(sites, W0, alpha0, lam1, lam2, lmax, tol, max_iter, eps, lmax_known, *, loss, dual,
                  history_size):
    """One compiled program for a whole APG solve: the step size's ``lmax`` (when unknown), the loop, Omega.

    One program rather than three (``site_lmax``, ``apg_program``, ``factored_omega``): a first fit in a
    new process compiles (or loads from the persistent cache) once, and a later fit that knows
    ``lmax`` runs the same program (``lmax_known``, a traced bool, skips its computation). Arguments
    as :func:`apg_program`, plus ``eps`` (traced), the Omega-step's relative floor. Returns an
    :class:`APGSolution`.
    """
    lmax = jax.lax.cond(lmax_known, lambda s: lmax, gram_lmax_bound, sites)
    res = apg_program(sites, W0, alpha0, lam1, lam2, lmax, tol, max_iter, loss=loss, dual=dual,
                      history_size=history_size)
    s = res.state
    return APGSolution(s.W, s.alpha, omega_factored(s.W, eps), res.objectives, res.gaps, s.objective, s.gap,
                       res.converged, s.iteration, lmax)


_blas = {"controller": None}


def one_blas_thread():
    """A context in which the BLAS/LAPACK libraries loaded in the process (OpenBLAS) use one thread.

    The compiled programs call LAPACK (``eigh`` of the d x d Gram matrix, twice per APG iteration)
    from XLA's own threads; a multi-threaded OpenBLAS then competes with XLA for the cores and, on a
    small shared machine, spins: a 100 x 100 ``eigh`` took ~100 ms instead of ~1 ms on 2 cores. The
    small factorisations gain nothing from threads. A no-op without ``threadpoolctl``.
    """
    if _blas["controller"] is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return contextlib.nullcontext()
        controller = ThreadpoolController()
        if not controller.select(user_api="blas").lib_controllers:
            return contextlib.nullcontext()  # LAPACK not loaded yet: look again next time
        _blas["controller"] = controller
    return _blas["controller"].limit(limits=1, user_api="blas")


_LMAX_CACHE: dict = {}
_LMAX_CACHE_SIZE = 8


def solve(sites, *, lam1, lam2, loss="squared", method="apg", tol=1e-6, max_iter=None, W0=None,
          alpha0=None, eps=DEFAULT_EPS, lmax=None, data_key=None, **options) -> SolveOutput:
    """Minimise J on ``sites`` (a :class:`mtl_jax.data.Sites`); inputs are assumed validated.

    Args:
      lam1, lam2: regularisation (lam1 > 0, lam2 >= 0); traced, so changing them does not recompile.
      loss: "squared", "hinge" or "logistic".
      method: one of :data:`METHODS`.
      tol: stop when the duality gap of J is at most ``tol * J(W)`` (relative accuracy); traced.
      max_iter: iterations (APG, default 5000) or alternations (default 100); traced.
      W0: (m, d) warm start for the primal methods; ``alpha0`` (m, n_max) for the dual ones.
      eps: relative eigenvalue floor of the Omega-step.
      lmax: (m,) ``lambda_max(X_t^T X_t)`` per site (or an upper bound), when already known (it sets
        the step sizes; computing it costs a pass over the data and some small matrix products, see
        :func:`site_lmax`).
      data_key: a hashable fingerprint of the data (``mtl_jax.fit`` passes one): solves with the same
        key reuse the ``lmax`` of the first (kept for the last few keys).
      **options: ``inner_tol`` (default 1e-10) and ``inner_max_iter`` (default 2000), the
        alternation's W-step accuracy (:data:`OPTIONS`).
    """
    check_options(options, OPTIONS, "solver options")
    loss_ = get_loss(loss)
    if method not in METHODS:
        raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
    dtype = sites.X.dtype
    m, d = sites.num_sites, sites.dim  # the padded or the chunked layout
    W0 = jnp.zeros((m, d), dtype) if W0 is None else jnp.asarray(W0, dtype)
    alpha0 = jnp.zeros(sites.y.shape, dtype) if alpha0 is None else jnp.asarray(alpha0, dtype)
    lam1 = jnp.asarray(lam1, dtype)
    lam2 = jnp.asarray(lam2, dtype)
    if lmax is None and data_key is not None:
        lmax = _LMAX_CACHE.get(data_key)
    elif lmax is not None:
        lmax = jnp.asarray(lmax, dtype)
    kind = "alternating" if method == "alternating" else "apg"
    max_iter = DEFAULT_MAX_ITER[kind] if max_iter is None else int(max_iter)

    if method == "alternating":
        with one_blas_thread():
            lmax = site_lmax(sites) if lmax is None else lmax
            _remember_lmax(data_key, lmax)
            return _alternate(sites, W0, alpha0, lam1, lam2, lmax, loss_.name, tol, max_iter, eps,
                              options.get("inner_tol", 1e-10), options.get("inner_max_iter", 2000))

    dual = method == "apg_dual" or (method == "apg" and loss_.curvature is None)
    if method == "apg_primal" and loss_.curvature is None:
        raise ValueError(f"method: 'apg_primal' needs a smooth loss; loss {loss_.name!r} is not (use 'apg_dual')")
    known = lmax is not None
    lmax = jnp.zeros((m,), dtype) if lmax is None else lmax
    args = (sites, W0, alpha0, lam1, lam2, lmax, jnp.asarray(tol, dtype), jnp.asarray(max_iter, jnp.int32),
            jnp.asarray(eps, dtype), jnp.asarray(known))
    static = dict(loss=loss_.name, dual=dual, history_size=history_capacity(max_iter))
    program, compile_seconds = compiled(solve_program, args, static)
    t1 = time.perf_counter()
    with one_blas_thread():
        res = jax.block_until_ready(program(*args))
    t2 = time.perf_counter()
    _remember_lmax(data_key, res.lmax)
    its = int(res.iterations)
    per_iter = (t2 - t1) / max(its, 1)
    objs, gaps = np.asarray(res.objectives), np.asarray(res.gaps)
    history = tuple(HistoryRecord(k + 1, float(objs[k]), float(gaps[k]), 0, per_iter * (k + 1))
                    for k in range(its))
    return SolveOutput(np.asarray(res.W), numpy_tree(res.omega), np.asarray(res.alpha), history,
                       float(res.objective), float(res.gap), bool(res.converged), its, compile_seconds, t2 - t1)


def _remember_lmax(data_key, lmax):
    if data_key is None:
        return
    _LMAX_CACHE.pop(data_key, None)
    if len(_LMAX_CACHE) >= _LMAX_CACHE_SIZE:
        _LMAX_CACHE.pop(next(iter(_LMAX_CACHE)))  # the oldest
    _LMAX_CACHE[data_key] = lmax


def _alternate(sites, W, alpha, lam1, lam2, lmax, loss, tol, max_iter, eps, inner_tol, inner_max_iter):
    dtype = W.dtype
    args = (W, alpha, sites, lam1, lam2, lmax, jnp.asarray(inner_tol, dtype),
            jnp.asarray(inner_max_iter, jnp.int32), jnp.asarray(eps, dtype))
    step, compile_seconds = compiled(alternation, args, dict(loss=loss))
    traced = args[2:]
    t1 = time.perf_counter()
    history = []
    converged = False
    J = gap = float("nan")
    for k in range(max_iter):
        W, alpha, J, gap, _ = step(W, alpha, *traced)
        J, gap = float(J), float(gap)  # blocks: the seconds below are real
        history.append(HistoryRecord(k + 1, J, gap, 0, time.perf_counter() - t1))
        if gap <= tol * abs(J):
            converged = True
            break
    t2 = time.perf_counter()
    omega = numpy_tree(factored_omega(W, args[-1]))
    return SolveOutput(np.asarray(W), omega, np.asarray(alpha), tuple(history), J, gap, converged,
                       len(history), compile_seconds, t2 - t1)
