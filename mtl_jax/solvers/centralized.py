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
import os
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
from mtl_jax.solvers.apg import (
    PrimalCarry,
    _PrimalLoop,
    dual_apg,
    dual_lipschitz,
    dual_parts,
    gram_lmax_bound,
    primal_apg,
    primal_lipschitz,
    primal_parts,
    run_chunk,
)
from mtl_jax.solvers.base import (
    HistoryRecord,
    SolveOutput,
    check_checkpoint,
    check_options,
    compiled,
    fingerprint,
    history_capacity,
    named_arrays,
    numpy_tree,
    read_checkpoint,
    register_exportable,
    restored,
    write_checkpoint,
)

METHODS = names.METHODS
#: Options of :func:`solve` (and of ``fit(solver="centralized", ...)``) beyond the common ones: the
#: alternation's W-step accuracy, and the checkpoint (a .npz path) with its chunk length.
OPTIONS = ("inner_tol", "inner_max_iter", "checkpoint", "checkpoint_every")
DEFAULT_MAX_ITER = {"apg": 5000, "alternating": 100}
#: Iterations (APG) or alternations per chunk between checkpoints, by default.
CHECKPOINT_EVERY = {"apg": 500, "alternating": 10}
#: APG iterations per chunk when a progress callback is given (and no checkpoint with fewer); the
#: alternation reports after every alternation.
PROGRESS_EVERY = {"apg": 100}


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
          alpha0=None, eps=DEFAULT_EPS, lmax=None, data_key=None, checkpoint=None, checkpoint_every=None,
          progress=None, **options) -> SolveOutput:
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
      checkpoint: None, or a .npz path: the run goes in chunks of ``checkpoint_every`` iterations (APG,
        default 500) or alternations (default 10), and after each chunk the solver's whole state and the
        history so far are saved there atomically (:func:`save_checkpoint`). A run started with an existing
        checkpoint of the same problem (data, lam1, lam2, loss, method, tol, eps, options; not ``max_iter``,
        and the warm start is ignored) continues from it and ends with exactly the numbers of an
        uninterrupted run (same device: bitwise; history seconds aside). A checkpoint of another problem,
        or a file that is not one: ValueError naming ``checkpoint``.
      progress: None, or a callable ``progress(record, max_iter)`` called with the last
        :class:`~mtl_jax.solvers.base.HistoryRecord` after every chunk of APG iterations (chunks of
        :data:`PROGRESS_EVERY`, or ``checkpoint_every`` with a checkpoint if fewer) or after every
        alternation. Chunks change no number: every chunk of APG
        iterations is the same compiled program (the count traced), continuing the loop's full state.
        Without checkpoint and progress the solve is one compiled program (:func:`solve_program`).
      **options: ``inner_tol`` (default 1e-10) and ``inner_max_iter`` (default 2000), the
        alternation's W-step accuracy (:data:`OPTIONS`).
    """
    check_options(options, OPTIONS[:2], "solver options")
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
    checkpoint, every = check_checkpoint(checkpoint, checkpoint_every, default=CHECKPOINT_EVERY[kind])
    if progress is not None and not callable(progress):
        raise ValueError(f"progress: must be None or a callable(record, max_iter), got {progress!r}")
    chunk = None
    if kind == "apg" and (checkpoint is not None or progress is not None):
        chunk = min(every if checkpoint is not None else max_iter,
                    PROGRESS_EVERY["apg"] if progress is not None else max_iter)
    inner = (options.get("inner_tol", 1e-10), options.get("inner_max_iter", 2000))

    if method == "alternating":
        ckpt = None if checkpoint is None else Checkpoint(
            checkpoint, _fingerprint(sites, lam1, lam2, tol, eps, loss_.name, "alternating", inner))
        with one_blas_thread():
            lmax = site_lmax(sites) if lmax is None else lmax
            _remember_lmax(data_key, lmax)
            return _alternate(sites, W0, alpha0, lam1, lam2, lmax, loss_.name, tol, max_iter, eps, *inner,
                              every=every, ckpt=ckpt, progress=progress)

    dual = method == "apg_dual" or (method == "apg" and loss_.curvature is None)
    if method == "apg_primal" and loss_.curvature is None:
        raise ValueError(f"method: 'apg_primal' needs a smooth loss; loss {loss_.name!r} is not (use 'apg_dual')")
    known = lmax is not None
    lmax = jnp.zeros((m,), dtype) if lmax is None else lmax
    if chunk is not None:
        ckpt = None if checkpoint is None else Checkpoint(
            checkpoint, _fingerprint(sites, lam1, lam2, tol, eps, loss_.name, "apg_dual" if dual else "apg_primal"))
        return _apg_chunked(sites, W0, alpha0, lam1, lam2, lmax, known, tol, max_iter, eps, loss_.name, dual,
                            chunk=chunk, ckpt=ckpt, progress=progress, data_key=data_key)
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


def _alternate(sites, W, alpha, lam1, lam2, lmax, loss, tol, max_iter, eps, inner_tol, inner_max_iter, *,
               every=1, ckpt=None, progress=None):
    """The alternation, one compiled program per alternation called from here: ``ckpt`` (a :class:`Checkpoint`)
    saves after every ``every`` alternations and at the end, ``progress`` is called after every alternation."""
    dtype = W.dtype
    history = []
    converged = False
    J = gap = float("nan")
    if ckpt is not None and os.path.exists(ckpt.path):
        saved = ckpt.read()
        W, alpha, lmax = restored(saved, _AltState(W, alpha, lmax), "state", ckpt.path)
        history = _history(saved["history"])
        if history:
            J, gap = history[-1].objective, history[-1].gap
            converged = gap <= tol * abs(J)
    args = (W, alpha, sites, lam1, lam2, lmax, jnp.asarray(inner_tol, dtype),
            jnp.asarray(inner_max_iter, jnp.int32), jnp.asarray(eps, dtype))
    step, compile_seconds = compiled(alternation, args, dict(loss=loss))
    traced = args[2:]
    offset = history[-1].seconds if history else 0.0
    t1 = time.perf_counter()
    for k in range(len(history), max_iter):
        if converged:
            break
        W, alpha, J, gap, _ = step(W, alpha, *traced)
        J, gap = float(J), float(gap)  # blocks: the seconds below are real
        history.append(HistoryRecord(k + 1, J, gap, 0, offset + time.perf_counter() - t1))
        if gap <= tol * abs(J):
            converged = True
        if ckpt is not None and (converged or (k + 1) % every == 0 or k + 1 == max_iter):
            ckpt.write(_AltState(W, alpha, lmax), history)
        if progress is not None:
            progress(history[-1], max_iter)
    t2 = time.perf_counter()
    omega = numpy_tree(factored_omega(W, args[-1]))
    return SolveOutput(np.asarray(W), omega, np.asarray(alpha), tuple(history), J, gap, converged,
                       len(history), compile_seconds, t2 - t1)


# --- chunks of APG iterations and checkpoints ------------------------------------------------------------

CHECKPOINT_FORMAT = "mtl_jax.centralized_checkpoint/1"
register_exportable(_PrimalLoop, PrimalCarry)


class _AltState(NamedTuple):
    """What the alternation carries between alternations (checkpointed)."""

    W: jax.Array      # (m, d)
    alpha: jax.Array  # (m, n_max)
    lmax: jax.Array   # (m,) the step sizes' lambda_max


class _APGCheckpoint(NamedTuple):
    """What an APG checkpoint holds besides the history: the loop's whole state and its step sizes."""

    loop: object      # the loop state (apg._PrimalLoop or apg.APGState)
    lmax: jax.Array   # (m,)
    converged: jax.Array  # () bool


def _fingerprint(sites, lam1, lam2, tol, eps, loss: str, method: str, inner=()) -> str:
    """What must match for a checkpoint to continue a run: the data, lam1, lam2, tol, eps, loss, method, options."""
    dtype = sites.X.dtype
    scalars = [np.asarray(v, dtype) for v in (lam1, lam2, tol, eps)]
    return fingerprint(list(jax.tree_util.tree_leaves(sites)) + scalars,
                       (CHECKPOINT_FORMAT, loss, method, tuple(repr(v) for v in inner)))


class Checkpoint(NamedTuple):
    """A centralized checkpoint file: its path and the fingerprint of the problem it must belong to."""

    path: str
    fingerprint: str

    def write(self, state, history) -> None:
        """Save ``state`` (a NamedTuple of arrays) and ``history`` atomically (:func:`save_checkpoint`)."""
        save_checkpoint(self.path, state, history, self.fingerprint)

    def read(self) -> dict:
        return read_checkpoint(self.path, format=CHECKPOINT_FORMAT, fingerprint=self.fingerprint,
                               what="a centralized-solver checkpoint",
                               differs="data, lam1, lam2, loss, method, tol, eps or solver options")


def save_checkpoint(path, state, history, fingerprint_: str) -> None:
    """Write a solver state (a NamedTuple of arrays, saved as ``state_<field>[_<subfield>]``) and the
    history rows (``history``, (n, 5) float64: round, objective, gap, bytes, seconds) to the .npz ``path``
    atomically, with ``format`` (:data:`CHECKPOINT_FORMAT`) and ``fingerprint``: no pickle."""
    arrays = {k: np.asarray(v) for k, v in named_arrays(state, "state").items()}
    write_checkpoint(path, arrays, history, format=CHECKPOINT_FORMAT, fingerprint=fingerprint_)


def _history(rows) -> list:
    return [HistoryRecord(int(r[0]), float(r[1]), float(r[2]), int(r[3]), float(r[4])) for r in rows]


def _apg_parts(sites, lam1, lam2, lmax, loss, dual):
    reg = TraceNormSq(lam1, lam2)
    if dual:
        return dual_parts(sites, loss, reg, lipschitz=dual_lipschitz(reg, lmax, sites))
    return primal_parts(sites, loss, reg, lipschitz=primal_lipschitz(loss, lmax, sites.counts, reg))


@partial(jax.jit, static_argnames=("loss", "dual"))
def chunk_start(sites, W0, alpha0, lam1, lam2, lmax, lmax_known, *, loss, dual):
    """``(lmax, the APG loop's first state)``, as :func:`solve_program` starts (arguments as there)."""
    lmax = jax.lax.cond(lmax_known, lambda s: lmax, gram_lmax_bound, sites)
    parts = _apg_parts(sites, lam1, lam2, lmax, loss, dual)
    return lmax, parts.init(alpha0 if dual else W0)


@partial(jax.jit, static_argnames=("loss", "dual", "history_size"))
def chunk_program(sites, state, lam1, lam2, lmax, tol, stop, *, loss, dual, history_size):
    """One chunk of APG iterations from the loop state ``state`` until the iteration count ``stop`` (traced)
    or convergence: one compiled program for every chunk. Returns an APGResult holding the loop state."""
    return run_chunk(_apg_parts(sites, lam1, lam2, lmax, loss, dual), state, stop, tol, history_size)


@partial(jax.jit, static_argnames=("loss", "dual"))
def chunk_finish(sites, state, lam1, lam2, lmax, eps, *, loss, dual):
    """``(W, alpha, Omega)`` of a loop state, as :func:`solve_program` ends."""
    s = _apg_parts(sites, lam1, lam2, lmax, loss, dual).finish(state)
    return s.W, s.alpha, omega_factored(s.W, eps)


def _apg_chunked(sites, W0, alpha0, lam1, lam2, lmax, known, tol, max_iter, eps, loss, dual, *, chunk, ckpt,
                 progress, data_key):
    """:func:`solve`'s APG run in chunks of ``chunk`` iterations, checkpointed and reported after each."""
    dtype = sites.X.dtype
    static = dict(loss=loss, dual=dual)
    start_args = (sites, W0, alpha0, lam1, lam2, lmax, jnp.asarray(known))
    start, compile_seconds = compiled(chunk_start, start_args, static)
    with one_blas_thread():
        lmax, state = start(*start_args)
    history, converged = [], False
    if ckpt is not None and os.path.exists(ckpt.path):
        saved = ckpt.read()
        state, lmax, converged = restored(saved, _APGCheckpoint(state, lmax, jnp.asarray(False)), "state",
                                          ckpt.path)
        converged = bool(converged)
        history = _history(saved["history"])
    its = int(state.iteration)
    tol_ = jnp.asarray(tol, dtype)
    solve_seconds = 0.0
    while not converged and its < max_iter:
        stop = min(its + chunk, max_iter)
        args = (sites, state, lam1, lam2, lmax, tol_, jnp.asarray(stop, jnp.int32))
        program, c = compiled(chunk_program, args, dict(static, history_size=history_capacity(chunk)))
        compile_seconds += c
        t1 = time.perf_counter()
        with one_blas_thread():
            res = jax.block_until_ready(program(*args))
        seconds = time.perf_counter() - t1
        solve_seconds += seconds
        state, converged = res.state, bool(res.converged)
        n = int(state.iteration) - its
        objs, gaps = np.asarray(res.objectives), np.asarray(res.gaps)
        last = history[-1].seconds if history else 0.0
        history.extend(HistoryRecord(its + k + 1, float(objs[k]), float(gaps[k]), 0, last + seconds * (k + 1) / max(n, 1))
                       for k in range(n))
        its += n
        if ckpt is not None:
            ckpt.write(_APGCheckpoint(state, lmax, res.converged), history)
        if progress is not None and history:
            progress(history[-1], max_iter)
        if its < stop and not converged:  # the loop stopped early (a NaN gap): as the one program does
            break
    _remember_lmax(data_key, lmax)
    finish, c = compiled(chunk_finish, (sites, state, lam1, lam2, lmax, jnp.asarray(eps, dtype)), static)
    compile_seconds += c
    W, alpha, omega = finish(sites, state, lam1, lam2, lmax, jnp.asarray(eps, dtype))
    return SolveOutput(np.asarray(W), numpy_tree(omega), np.asarray(alpha), tuple(history), float(state.objective),
                       float(state.gap), converged, its, compile_seconds, solve_seconds)
