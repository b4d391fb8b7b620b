"""Gradient-manipulation methods for deep multi-task networks (docs/gradient_methods.md).

Where a loss-driven scheme (:mod:`mtl_jax.weighting`) picks weights from the task losses, these methods
look at the ``K`` per-task gradients of the *shared* parameters and combine them into one update
direction. Each is an optax-style pair of pure functions bundled in a :class:`GradientMethod`::

    method = gradient_methods.pcgrad()                  # or gradient_methods.get("pcgrad")
    state = method.init(num_tasks, key)                 # key: the methods that draw random numbers
    tg = gradient_methods.task_gradients(loss_fn, shared, heads)   # one forward, one vmapped backward
    direction, state = method.update(tg.shared, state)  # (P,) in the space of tg.shared
    grads = {"shared": tg.unravel(direction), "heads": tg.heads}   # heads keep their own gradients

Shapes: ``task_grads`` (K, P), the K task gradients of the shared parameters flattened with
:func:`jax.flatten_util.ravel_pytree` (row k = grad of L_k); ``direction`` (P,), in ``task_grads``'
dtype. The direction is a *gradient* (descend along it: ``params - lr * direction``).

Contract shared by all methods:

- ``update`` is pure, jit-able and vmap-able (a stacked state and stacked gradients run several seeds
  as one program): no Python branch on a traced value; the inner solvers (MGDA, CAGrad, Nash-MTL) are
  ``lax.while_loop``s with an iteration cap, so a vmapped batch runs until its slowest member stops and
  every member gets exactly the numbers it would get alone.
- Randomness lives in the state: PCGrad and GradVac (the order in which task ``i`` meets the others)
  and GradDrop (its uniform draws) store a PRNG key given to ``init`` and split it at every update
  (``key, sub = jax.random.split(state.key)``); the other methods ignore ``key``.
- Every method except GradDrop returns a direction in the span of the task gradients,
  ``d = sum_k weights_k g_k``, and stores these coefficients in ``state.weights`` (K,). MGDA-UB and the
  other feature-level variants use them: see :func:`task_gradients` and docs/gradient_methods.md.
- The direction and the state carry no gradient (``jax.lax.stop_gradient``); state dtypes are fixed at
  ``init`` (so a state can be a ``lax.scan`` carry).
- ``update`` checks at trace time that ``task_grads`` is 2-D with ``K`` rows for the ``K`` tasks the
  state was initialised for, and raises ``ValueError`` naming the argument otherwise.
- Factories check their hyper-parameters once, in Python, and raise ``ValueError`` naming the argument.

Most methods work in "Gram space": everything they need of the gradients is the (K, K) Gram matrix
``M = g g^T``; they compute coefficients from it and form ``d = weights @ g`` once, so the cost beyond
the per-task gradients is ``O(K^2 P)`` for the Gram matrix plus a few ``K x K`` operations.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from mtl_jax.validation import check_int, check_real

__all__ = [
    "GradientMethod",
    "TaskGradients",
    "METHODS",
    "get",
    "task_gradients",
    "task_orders",
    "min_norm_weights",
    "mgda",
    "mgda_ub",
    "pcgrad",
    "cagrad",
    "imtl_g",
    "gradvac",
    "graddrop",
    "nash_mtl",
    "aligned_mtl",
    "MGDAState",
    "PCGradState",
    "CAGradState",
    "IMTLGState",
    "GradVacState",
    "GradDropState",
    "NashMTLState",
    "AlignedMTLState",
]


class GradientMethod(NamedTuple):
    """A gradient-manipulation method: ``init(num_tasks, key=None) -> state`` and
    ``update(task_grads, state, **extra) -> (direction, new_state)`` with ``task_grads`` (K, P) and
    ``direction`` (P,); ``name`` its registry name; ``needs`` the extra keyword inputs ``update``
    requires with the chosen options (only ``mgda`` with a loss-based normalisation: ``("losses",)``)."""

    init: Callable
    update: Callable
    name: str
    needs: tuple = ()


# ----------------------------------------------------------------------------------------------
# Per-task gradients in one pass
# ----------------------------------------------------------------------------------------------


_GRAD_MODES = ("vmap", "loop")


class TaskGradients(NamedTuple):
    losses: jax.Array  # (K,) the task losses
    shared: jax.Array  # (K, P) row k: gradient of L_k w.r.t. the shared parameters, flattened
    heads: Any         # gradient of sum_k L_k w.r.t. ``heads`` (same pytree), or None
    unravel: Callable  # (P,) -> pytree of the shared parameters
    aux: Any           # loss_fn's auxiliary output (has_aux=True), else None


def task_gradients(loss_fn: Callable, shared: Any, heads: Any = None, *, has_aux: bool = False,
                   mode: str = "vmap") -> TaskGradients:
    """The per-task gradients of the shared parameters from one forward pass and one ``vmap``ped backward pass.

    ``loss_fn(shared, heads) -> (K,)`` task losses (or ``((K,), aux)`` with ``has_aux``); close over the
    batch. With ``(losses, vjp) = jax.vjp(loss_fn, shared, heads)`` the rows of the Jacobian are
    ``vjp(e_k)`` for the unit vectors ``e_k``; ``mode="vmap"`` computes them as ``jax.vmap(vjp)(eye(K))``, one
    batched backward pass (what ``jax.jacrev`` does); ``mode="loop"`` as K calls ``vjp(e_k)`` (K ordinary
    backward passes, unrolled in the program). Either way the forward pass is done once and shared by the
    K tasks; the numbers are the same. Which is faster depends on the backend: on this repository's 2-core
    CPU ``"loop"`` was measured faster (XLA's CPU batched matrix products are slower than K plain ones;
    ``benchmarks/bench_gradient_methods.py``), on a GPU the batched pass is the usual choice.

    Returns :class:`TaskGradients`: ``shared`` (K, P), row k = ``ravel_pytree(grad_shared L_k)``;
    ``heads`` = the gradient of ``sum_k L_k`` w.r.t. ``heads``: a head only affects its own task's loss,
    so each head keeps its own task's gradient (the sum over k of the batched head gradients, whose
    other rows are zero); ``unravel`` maps a (P,) direction back to the shared pytree.

    For MGDA-UB (and the other methods applied to the shared *features*), call it with ``shared`` = the
    trunk's output ``z`` and ``loss_fn(z, heads)`` = the heads' losses: ``shared`` is then (K, B * F), and the
    direction the method returns is pulled back through the trunk with the trunk's own ``vjp``
    (docs/gradient_methods.md, section 3).
    """
    _check_choice("mode", mode, _GRAD_MODES)
    if has_aux:
        losses, vjp, aux = jax.vjp(loss_fn, shared, heads, has_aux=True)
    else:
        (losses, vjp), aux = jax.vjp(loss_fn, shared, heads), None
    if losses.ndim != 1:
        raise ValueError(f"loss_fn: must return the (K,) task losses, got shape {losses.shape}")
    eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
    if mode == "vmap":
        g_shared, g_heads = jax.vmap(vjp)(eye)
    else:
        rows = [vjp(e) for e in eye]
        g_shared, g_heads = jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(g_shared)
    _, unravel = ravel_pytree(shared)
    g_heads = None if heads is None else jax.tree.map(lambda g: jnp.sum(g, axis=0), g_heads)
    return TaskGradients(losses=losses, shared=flat, heads=g_heads, unravel=unravel, aux=aux)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: must be one of {choices}, got {value!r}")
    return value


def _num_tasks(num_tasks: Any) -> int:
    return check_int("num_tasks", num_tasks, low=1)


def _need_key(name: str, key: Any) -> jax.Array:
    if key is None:
        raise ValueError(f"key: {name} draws random numbers and keeps its PRNG key in the state; init needs a key, got None")
    return key


def _float(shape) -> jax.Array:
    return jnp.zeros(shape, dtype=jnp.result_type(float))


def _check_grads(task_grads: Any, num_tasks: int) -> jax.Array:
    """``task_grads`` as a float (K, P) array without gradient, checked against the state's K (trace time)."""
    g = jnp.asarray(task_grads)
    if not jnp.issubdtype(g.dtype, jnp.inexact):
        g = g.astype(jnp.result_type(float))
    if g.ndim != 2 or g.shape[0] != num_tasks:
        raise ValueError(f"task_grads: expected shape ({num_tasks}, P), one flattened gradient of the shared "
                         f"parameters per task the state was initialised for, got shape {g.shape}")
    return jax.lax.stop_gradient(g)


def _finish(direction: jax.Array, grads: jax.Array, new_state: Any, old_state: Any):
    """The direction without gradient in the gradients' dtype; the state in the dtypes it was made with."""

    def keep(new, old):
        old = jnp.asarray(old)
        new = jnp.asarray(new)
        if jnp.issubdtype(old.dtype, jnp.inexact):
            new = new.astype(old.dtype)
        return jax.lax.stop_gradient(new)

    new_state = jax.tree.map(keep, new_state, old_state)
    return jax.lax.stop_gradient(direction.astype(grads.dtype)), new_state


def _gram(g: jax.Array) -> jax.Array:
    """The (K, K) Gram matrix ``g g^T`` at full precision (TF32 on a GPU would cost the solvers digits)."""
    return jnp.matmul(g, g.T, precision=jax.lax.Precision.HIGHEST)


def _combine(weights: jax.Array, g: jax.Array) -> jax.Array:
    """``sum_k weights_k g_k`` (P,)."""
    return jnp.matmul(weights.astype(g.dtype), g, precision=jax.lax.Precision.HIGHEST)


def _safe_div(a, b):
    """``a / b`` where ``b != 0``, else 0."""
    ok = b != 0
    return jnp.where(ok, a / jnp.where(ok, b, 1), 0)


def _tol(tol: float, dtype) -> float:
    """A stopping tolerance the dtype can reach: at least 100 machine epsilons."""
    return max(float(tol), 100.0 * float(jnp.finfo(dtype).eps))


def task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
    """(K, K-1) int32: row ``i`` is a uniformly random order of the tasks other than ``i`` (the argsort of
    ``jax.random.uniform(key, (K, K - 1))`` row by row, task ``i`` skipped).

    PCGrad and GradVac let task ``i`` meet the other tasks in this order; their ``update`` does
    ``key, sub = jax.random.split(state.key)`` and uses ``task_orders(sub, K)``."""
    k = int(num_tasks)
    if k < 2:
        return jnp.zeros((k, 0), dtype=jnp.int32)
    perms = jnp.argsort(jax.random.uniform(key, (k, k - 1)), axis=1)           # (K, K-1) of 0..K-2, uniform
    rows = jnp.arange(k)[:, None]
    return (perms + (perms >= rows)).astype(jnp.int32)                          # skip task i itself


def _project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` (K,) onto the simplex ``{w >= 0, sum w = 1}`` (sort-based, Duchi et al. 2008)."""
    k = v.shape[-1]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    ind = jnp.arange(1, k + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - css / ind > 0, jnp.arange(1, k + 1), 1))
    theta = jnp.sum(jnp.where(jnp.arange(1, k + 1) == rho, css, 0.0)) / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _fw_gap(w: jax.Array, grad: jax.Array) -> jax.Array:
    """Frank-Wolfe gap ``w . grad - min_k grad_k`` on the simplex: >= f(w) - min f, and 0 exactly at a KKT point
    (it is the complementary-slackness residual ``sum_k w_k (grad_k - lambda)`` with ``lambda = min_k grad_k``)."""
    return jnp.dot(w, grad) - jnp.min(grad)


class _SolverInfo(NamedTuple):
    gap: jax.Array         # () Frank-Wolfe gap at the returned point (KKT residual)
    iterations: jax.Array  # () int32


def _simplex_minimize(fun: Callable, w0: jax.Array, lipschitz: jax.Array, max_iter: int, tol: float,
                      backtrack: bool = True):
    """Minimise a smooth convex ``f`` over the simplex by accelerated projected gradient (FISTA with
    backtracking on the step and gradient-based restart), stopping when the Frank-Wolfe gap is <= ``tol``
    or after ``max_iter`` iterations. ``fun(w) -> (f, grad)``; ``lipschitz`` a first guess of the gradient's
    Lipschitz constant (doubled while the sufficient-decrease test fails; with ``backtrack=False`` it must be an
    upper bound and is used as is). Returns ``(w, _SolverInfo)``."""
    dtype = w0.dtype
    slack = 10.0 * jnp.finfo(dtype).eps

    def step(y, fy, gy, L):
        x = _project_simplex(y - gy / L)
        dx = x - y
        fx, gx = fun(x)
        ok = fx <= fy + jnp.dot(gy, dx) + 0.5 * L * jnp.dot(dx, dx) + slack * (1.0 + jnp.abs(fy))
        return x, fx, gx, ok

    def body(s):
        x_prev, y, t, L, it, _ = s
        fy, gy = fun(y)
        x, fx, gx, ok = step(y, fy, gy, L)

        def bt_cond(c):
            return (~c[4]) & (c[5] < 60)

        def bt_body(c):
            L2 = 2.0 * c[0]
            x2, fx2, gx2, ok2 = step(y, fy, gy, L2)
            return (L2, x2, fx2, gx2, ok2, c[5] + 1)

        if backtrack:                                      # (static) not needed when ``lipschitz`` is exact
            L, x, fx, gx, _, _ = jax.lax.while_loop(bt_cond, bt_body, (L, x, fx, gx, ok, jnp.zeros((), jnp.int32)))
        gap = _fw_gap(x, gx)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_new = x + ((t - 1.0) / t_new) * (x - x_prev)
        restart = jnp.dot(y - x, x - x_prev) > 0
        t_new = jnp.where(restart, jnp.ones_like(t), t_new)
        y_new = jnp.where(restart, x, y_new)
        return (x, y_new, t_new, L, it + 1, gap)

    def cond(s):
        return (s[4] < max_iter) & (s[5] > tol)

    _, g0 = fun(w0)
    init = (w0, w0, jnp.ones((), dtype), jnp.asarray(lipschitz, dtype), jnp.zeros((), jnp.int32), _fw_gap(w0, g0))
    x, _, _, _, it, gap = jax.lax.while_loop(cond, body, init)
    return x, _SolverInfo(gap=gap, iterations=it)


def _max_eig(M: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.linalg.eigvalsh(M)[-1], 0.0)


def _normalised_gram(M: jax.Array):
    """``(M / s, s)`` with ``s`` the mean squared gradient norm (1 if all gradients are zero): the solvers
    work on a Gram matrix of unit scale, so their tolerances are relative."""
    s = jnp.mean(jnp.diagonal(M))
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    return M / s, s


# ----------------------------------------------------------------------------------------------
# MGDA / MGDA-UB
# ----------------------------------------------------------------------------------------------

_MGDA_NORMALISATIONS = ("none", "l2", "loss", "loss+")
_MGDA_SOLVERS = ("projected", "frank_wolfe")


def min_norm_weights(gram: jax.Array, *, solver: str = "projected", max_iter: int = 250, tol: float = 1e-10):
    """The min-norm point of the convex hull of K gradients from their (K, K) Gram matrix ``M``::

        alpha = argmin_{alpha in simplex} || sum_k alpha_k g_k ||^2 = argmin alpha^T M alpha .

    ``solver="projected"``: accelerated projected gradient (FISTA, step ``1 / (2 lambda_max(M))``, restart),
    the projected-gradient form of Sener and Koltun's ``MinNormSolver``; ``"frank_wolfe"``: the paper's
    Algorithm 2 (Frank-Wolfe with exact line search), linear convergence at best, slower to high accuracy.
    Both stop when the Frank-Wolfe gap ``alpha^T grad - min_k grad_k`` (``grad = 2 M alpha``) of the normalised
    problem (``M`` divided by its mean diagonal) is <= ``tol`` (at least 100 machine epsilons), or after
    ``max_iter`` iterations. Returns ``(alpha (K,), gap (), iterations ())``; ``gap`` is relative to the mean
    squared gradient norm."""
    Mn, _ = _normalised_gram(gram)
    k = Mn.shape[-1]
    tol = _tol(tol, Mn.dtype)
    w0 = jnp.full((k,), 1.0 / k, Mn.dtype)
    if solver == "projected":
        def fun(w):
            Mw = Mn @ w
            return jnp.dot(w, Mw), 2.0 * Mw

        L = 2.0 * _max_eig(Mn) * (1.0 + 1e-6) + jnp.finfo(Mn.dtype).tiny
        w, info = _simplex_minimize(fun, w0, L, max_iter, tol, backtrack=False)
        return w, info.gap, info.iterations

    def fw_body(s):
        w, it, _ = s
        Mw = Mn @ w
        t = jnp.argmin(Mw)
        wMw, tMw, tMt = jnp.dot(w, Mw), Mw[t], Mn[t, t]
        denom = wMw - 2.0 * tMw + tMt                       # ||d - g_t||^2
        gamma = jnp.clip(_safe_div(wMw - tMw, denom), 0.0, 1.0)
        w = (1.0 - gamma) * w + gamma * jax.nn.one_hot(t, k, dtype=w.dtype)
        return w, it + 1, _fw_gap(w, 2.0 * (Mn @ w))

    def fw_cond(s):
        return (s[1] < max_iter) & (s[2] > tol)

    w, it, gap = jax.lax.while_loop(fw_cond, fw_body, (w0, jnp.zeros((), jnp.int32), _fw_gap(w0, 2.0 * (Mn @ w0))))
    return w, gap, it


class MGDAState(NamedTuple):
    weights: jax.Array     # (K,) alpha of the last update, on the simplex: d = sum_k alpha_k g_k
    gap: jax.Array         # () the solver's Frank-Wolfe gap (KKT residual, relative to mean ||g_k||^2)
    iterations: jax.Array  # () int32, the solver's iterations


def _check_solver_knobs(max_iter, tol) -> None:
    check_int("max_iter", max_iter, low=1)
    check_real("tol", tol, strict=True)


def mgda(normalization: str = "none", solver: str = "projected", max_iter: int = 250, tol: float = 1e-10,
         *, _name: str = "mgda") -> GradientMethod:
    """MGDA (O. Sener and V. Koltun, "Multi-task learning as multi-objective optimization", NeurIPS 2018):
    descend along the min-norm element of the convex hull of the task gradients::

        alpha = argmin_{alpha >= 0, sum alpha = 1} || sum_k alpha_k g_k / n_k ||^2,    d = sum_k alpha_k g_k,

    with the gradient normalisers ``n_k`` of the authors' code (``normalization``): ``"none"`` (1, the
    paper's algorithm), ``"l2"`` (``||g_k||``), ``"loss"`` (``L_k``) or ``"loss+"`` (``L_k ||g_k||``); the last
    two need ``update(..., losses=L)`` with the (K,) losses. As in the authors' code, ``alpha`` found on the
    normalised gradients multiplies the raw gradients (their training step backpropagates
    ``sum_k alpha_k L_k``). ``d`` is 0 exactly when the tasks are Pareto-stationary; otherwise ``-d`` decreases
    every task loss (``g_k . d >= ||d||^2`` for the normalised problem). ``d`` has the scale of a *mean* of the
    gradients (sum alpha = 1), where equal weighting's ``sum_k g_k`` has K times that.

    The min-norm problem is solved on the Gram matrix by :func:`min_norm_weights` (``solver``, ``max_iter``,
    ``tol``). For two tasks its solution is closed-form:
    ``alpha_1 = clip((g_2 - g_1) . g_2 / ||g_1 - g_2||^2, 0, 1)``.

    MGDA-UB (:func:`mgda_ub`, the paper's efficient upper bound, section 3.3) is the same solver applied to
    the gradients of the task losses w.r.t. the shared *representation* ``z`` (K, B * F) instead of the
    shared parameters: pass those as ``task_grads``; the returned direction is then in ``z``-space and is
    pulled back through the trunk with its ``vjp`` (or, equivalently, backpropagate
    ``sum_k state.weights[k] L_k``), so only one backward pass through the trunk is needed.

    State :class:`MGDAState`: ``weights`` alpha (K,), the solver's ``gap`` and ``iterations``.
    """
    _check_choice("normalization", normalization, _MGDA_NORMALISATIONS)
    _check_choice("solver", solver, _MGDA_SOLVERS)
    _check_solver_knobs(max_iter, tol)
    needs = ("losses",) if normalization in ("loss", "loss+") else ()

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return MGDAState(weights=jnp.full((k,), 1.0 / k, jnp.result_type(float)), gap=_float(()),
                         iterations=jnp.zeros((), jnp.int32))

    def update(task_grads, state, losses=None, **extra):
        g = _check_grads(task_grads, state.weights.shape[-1])
        M = _gram(g)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(M), 0.0))
        if normalization == "none":
            n = jnp.ones_like(norms)
        else:
            if normalization in ("loss", "loss+"):
                if losses is None:
                    raise ValueError(f"losses: mgda with normalization={normalization!r} needs the (K,) task losses")
                losses = jax.lax.stop_gradient(jnp.asarray(losses, g.dtype))
                if losses.shape != norms.shape:
                    raise ValueError(f"losses: expected shape {norms.shape}, one loss per task, got shape {losses.shape}")
            n = {"l2": norms, "loss": losses, "loss+": losses * norms if losses is not None else None}[normalization]
            n = jnp.where(n > 0, n, jnp.ones_like(n))
        alpha, gap, it = min_norm_weights(M / jnp.outer(n, n), solver=solver, max_iter=max_iter, tol=tol)
        new_state = MGDAState(weights=alpha, gap=gap, iterations=it)
        return _finish(_combine(alpha, g), g, new_state, state)

    return GradientMethod(init, update, _name, needs)


def mgda_ub(normalization: str = "none", solver: str = "projected", max_iter: int = 250,
            tol: float = 1e-10) -> GradientMethod:
    """MGDA-UB (Sener and Koltun 2018, section 3.3): :func:`mgda` applied to the gradients w.r.t. the shared
    representation. The method is the same; what differs is what the caller passes as ``task_grads``: the
    (K, B * F) gradients of the task losses w.r.t. the trunk's output ``z`` (``task_gradients(head_losses, z,
    heads)``), and the returned direction (in ``z``-space) is pulled back through the trunk with the trunk's
    ``vjp`` -- or ``sum_k state.weights[k] L_k`` is backpropagated -- so the shared parameters need one
    backward pass, not K. Minimising the bound ``||sum_k alpha_k grad_z L_k||`` instead of the norm of the
    parameter gradient gives a Pareto-stationary point under the paper's full-rank assumption on
    ``dz / dtheta``."""
    return mgda(normalization, solver, max_iter, tol, _name="mgda_ub")


# ----------------------------------------------------------------------------------------------
# PCGrad
# ----------------------------------------------------------------------------------------------


class PCGradState(NamedTuple):
    key: jax.Array      # PRNG key, split at every update
    weights: jax.Array  # (K,) coefficients of the last direction: d = sum_k weights_k g_k


_REDUCTIONS = ("sum", "mean")


def _project_conflicts(M: jax.Array, orders: jax.Array, targets: jax.Array | None = None):
    """Run PCGrad's (``targets`` None) or GradVac's projections in Gram space.

    Each projected gradient is kept as coefficients ``C[i]`` over the original gradients
    (``g_i^PC = sum_m C[i, m] g_m``), so ``g_i^PC . g_j = (C M)[i, j]`` and ``||g_i^PC||^2 = (C M C^T)[i, i]``.
    All K tasks advance together: at position ``p`` task ``i`` meets ``j = orders[i, p]``. Returns ``C``
    (K, K) and, for GradVac, the (K, K) cosines ``phi[i, j]`` seen when task i met task j (diagonal 0)."""
    k = M.shape[0]
    C = jnp.eye(k, dtype=M.dtype)
    sq = jnp.diagonal(M)
    norms = jnp.sqrt(jnp.maximum(sq, 0.0))
    phis = jnp.zeros((k, k), M.dtype)
    for p in range(orders.shape[1]):                       # K - 1 static steps, no branch on values
        j = orders[:, p]
        onehot = jax.nn.one_hot(j, k, dtype=M.dtype)       # (K, K): row i selects task j = orders[i, p]
        dots = jnp.sum((C @ M) * onehot, axis=1)           # g_i^PC . g_j
        if targets is None:                                # PCGrad: project out the conflict, if any
            coef = jnp.where(dots < 0, -_safe_div(dots, sq[j]), 0.0)
        else:                                              # GradVac: raise cos(g_i^PC, g_j) to its target
            n_i = jnp.sqrt(jnp.maximum(jnp.einsum("im,mn,in->i", C, M, C), 0.0))
            phi = _safe_div(dots, n_i * norms[j])
            tgt = jnp.sum(targets * onehot, axis=1)
            num = n_i * (tgt * jnp.sqrt(jnp.maximum(1.0 - phi ** 2, 0.0)) - phi * jnp.sqrt(jnp.maximum(1.0 - tgt ** 2, 0.0)))
            coef = jnp.where(phi < tgt, _safe_div(num, norms[j] * jnp.sqrt(jnp.maximum(1.0 - tgt ** 2, 0.0))), 0.0)
            phis = phis + phi[:, None] * onehot
        C = C + coef[:, None] * onehot
    return C, phis


def pcgrad(reduction: str = "sum") -> GradientMethod:
    """PCGrad, "projecting conflicting gradients" (T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn,
    "Gradient surgery for multi-task learning", NeurIPS 2020, Algorithm 1). For each task ``i``,
    starting from ``g_i^PC = g_i``, for each other task ``j`` in a random order::

        if g_i^PC . g_j < 0:   g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j,

    then ``d = sum_i g_i^PC`` (``reduction="mean"``: divided by K, as the authors' code's default). Each task
    gets its own uniformly random order of the others (:func:`task_orders` with the state's key). With two
    tasks the order does not matter. Runs in Gram space (coefficients over the original gradients).

    State :class:`PCGradState`: the PRNG key (``init`` needs one) and the coefficients ``weights``.
    """
    _check_choice("reduction", reduction, _REDUCTIONS)

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return PCGradState(key=_need_key("pcgrad", key), weights=jnp.ones((k,), jnp.result_type(float)))

    def update(task_grads, state, **extra):
        k = state.weights.shape[-1]
        g = _check_grads(task_grads, k)
        key, sub = jax.random.split(state.key)
        C, _ = _project_conflicts(_gram(g), task_orders(sub, k))
        weights = jnp.sum(C, axis=0) / (k if reduction == "mean" else 1)
        return _finish(_combine(weights, g), g, PCGradState(key=key, weights=weights), state)

    return GradientMethod(init, update, "pcgrad")


# ----------------------------------------------------------------------------------------------
# CAGrad
# ----------------------------------------------------------------------------------------------


class CAGradState(NamedTuple):
    w: jax.Array           # (K,) the subproblem's solution on the simplex
    weights: jax.Array     # (K,) coefficients of the direction: d = sum_k weights_k g_k
    gap: jax.Array         # () the solver's Frank-Wolfe gap (KKT residual of the normalised subproblem)
    iterations: jax.Array  # () int32


def cagrad(c: float = 0.4, rescale: int = 1, max_iter: int = 500, tol: float = 1e-10) -> GradientMethod:
    """CAGrad, conflict-averse gradient descent (B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, NeurIPS 2021).
    With ``g_0 = (1/K) sum_k g_k``, ``g_w = sum_k w_k g_k`` and ``phi = c^2 ||g_0||^2``, the dual problem::

        w* = argmin_{w in simplex} F(w) = g_w . g_0 + sqrt(phi) ||g_w||,
        d  = g_0 + (sqrt(phi) / ||g_w*||) g_w*,

    the maximiser of the worst task's improvement ``min_i g_i . d`` in the ball ``||d - g_0|| <= c ||g_0||``.
    ``c = 0`` gives ``d = g_0``. ``rescale`` as in the authors' code: 0 none, 1 (default) ``d / (1 + c^2)``,
    2 ``d / (1 + c)``. ``F`` is solved on the Gram matrix (normalised by its mean diagonal) by accelerated
    projected gradient with backtracking until the Frank-Wolfe gap is <= ``tol`` (the authors use 20 SGD
    steps on softmax logits, or SLSQP). ``d`` has the scale of the mean gradient.

    State :class:`CAGradState`: ``w``, the direction's coefficients ``weights``
    (``(1/K + sqrt(phi) w / ||g_w||) / rescale``), the solver's ``gap`` and ``iterations``.
    """
    cv = check_real("c", c)
    if rescale not in (0, 1, 2) or isinstance(rescale, bool):
        raise ValueError(f"rescale: must be 0, 1 or 2, got {rescale!r}")
    _check_solver_knobs(max_iter, tol)
    divisor = {0: 1.0, 1: 1.0 + cv ** 2, 2: 1.0 + cv}[rescale]

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return CAGradState(w=jnp.full((k,), 1.0 / k, jnp.result_type(float)), weights=_float((k,)),
                           gap=_float(()), iterations=jnp.zeros((), jnp.int32))

    def update(task_grads, state, **extra):
        k = state.w.shape[-1]
        g = _check_grads(task_grads, k)
        g_gram = _gram(g)
        Mn, _ = _normalised_gram(g_gram)
        b = jnp.mean(Mn, axis=1)                            # g_k . g_0 (normalised)
        sqrt_phi = cv * jnp.sqrt(jnp.maximum(jnp.mean(b), 0.0))   # c ||g_0||
        tiny = jnp.finfo(Mn.dtype).tiny

        def fun(w):
            Mw = Mn @ w
            nw = jnp.sqrt(jnp.maximum(jnp.dot(w, Mw), tiny))
            return jnp.dot(w, b) + sqrt_phi * nw, b + sqrt_phi * Mw / nw

        w0 = jnp.full((k,), 1.0 / k, Mn.dtype)
        n0 = jnp.sqrt(jnp.maximum(jnp.dot(w0, Mn @ w0), tiny))
        L0 = sqrt_phi * _max_eig(Mn) / n0 + jnp.finfo(Mn.dtype).eps
        w, info = _simplex_minimize(fun, w0, L0, max_iter, _tol(tol, Mn.dtype))
        gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, g_gram @ w), 0.0))
        sqrt_phi_raw = cv * jnp.sqrt(jnp.maximum(jnp.mean(g_gram), 0.0))
        weights = (1.0 / k + _safe_div(sqrt_phi_raw, gw_norm) * w) / divisor
        new_state = CAGradState(w=w, weights=weights, gap=info.gap, iterations=info.iterations)
        return _finish(_combine(weights, g), g, new_state, state)

    return GradientMethod(init, update, "cagrad")


# ----------------------------------------------------------------------------------------------
# IMTL-G
# ----------------------------------------------------------------------------------------------


class IMTLGState(NamedTuple):
    weights: jax.Array  # (K,) alpha of the last update (sum 1): d = sum_k alpha_k g_k


def imtl_g() -> GradientMethod:
    """IMTL-G, the gradient half of impartial multi-task learning (L. Liu, Y. Li, Z. Kuang, J.-H. Xue,
    Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards impartial multi-task learning", ICLR 2021): the
    direction ``d = sum_k alpha_k g_k`` with ``sum alpha = 1`` whose projections on every unit gradient
    ``u_k = g_k / ||g_k||`` are equal. With ``D`` (K-1, P) the rows ``g_1 - g_k`` and ``U`` the rows
    ``u_1 - u_k`` (k = 2..K), the closed form is::

        alpha_{2:K} = g_1 U^T (D U^T)^{-1},    alpha_1 = 1 - sum_{k >= 2} alpha_k .

    Computed in Gram space; ``alpha`` may be negative. ``D U^T`` is singular when the gradients are linearly
    dependent (e.g. K > P + 1) or one of them is 0, where the solution is not defined (a NaN or huge alpha). The paper applies
    it to the gradients w.r.t. the shared features; pass those as ``task_grads`` for that variant (as with
    :func:`mgda_ub`). ``d`` has the scale of a mean of the gradients. No hyper-parameters.
    """

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return IMTLGState(weights=jnp.full((k,), 1.0 / k, jnp.result_type(float)))

    def update(task_grads, state, **extra):
        k = state.weights.shape[-1]
        g = _check_grads(task_grads, k)
        if k == 1:
            alpha = jnp.ones((1,), g.dtype)
        else:
            M = _gram(g)
            n = jnp.sqrt(jnp.maximum(jnp.diagonal(M), 0.0))
            Mu = _safe_div(M, n[None, :])                   # Mu[a, b] = g_a . u_b
            # (D U^T)[a, b] = (g_1 - g_a) . (u_1 - u_b), (U g_1)[b] = (u_1 - u_b) . g_1, for a, b = 2..K
            DU = Mu[0, 0] - Mu[0, 1:][None, :] - Mu[1:, 0][:, None] + Mu[1:, 1:]
            Ug1 = Mu[0, 0] - Mu[0, 1:]
            rest = jnp.linalg.solve(DU.T, Ug1)
            alpha = jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest])
        return _finish(_combine(alpha, g), g, IMTLGState(weights=alpha), state)

    return GradientMethod(init, update, "imtl_g")


# ----------------------------------------------------------------------------------------------
# GradVac
# ----------------------------------------------------------------------------------------------


class GradVacState(NamedTuple):
    key: jax.Array      # PRNG key, split at every update
    targets: jax.Array  # (K, K) phi_hat[i, j], EMA of cos(g_i^PC, g_j), zeros at init (diagonal unused)
    weights: jax.Array  # (K,) coefficients of the last direction


def gradvac(beta: float = 0.01) -> GradientMethod:
    """Gradient Vaccine (Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient vaccine: investigating and
    improving multi-task optimization in massively multilingual models", ICLR 2021, Algorithm 2). For each
    task ``i``, starting from ``g_i' = g_i``, for each other task ``j`` in a random order, with
    ``phi = cos(g_i', g_j)`` and the target ``phi_hat = phi_hat_ij``::

        if phi < phi_hat:  g_i' <- g_i' + ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                                           / (||g_j|| sqrt(1 - phi_hat^2)) g_j
        phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi          (every meeting, with phi before the change)

    then ``d = sum_i g_i'``. The targets start at 0, where the update is PCGrad's projection (so ``beta =
    0`` is PCGrad with the same orders). ``beta = 0.01`` is the paper's value (LibMTL's default is 0.5).
    The paper applies it per parameter group (layer); here it is applied to the whole flattened vector
    (call it per group for the paper's variant). Orders: :func:`task_orders` with the state's key.

    State :class:`GradVacState`: the PRNG key (``init`` needs one), the (K, K) targets, the coefficients.
    """
    b = check_real("beta", beta)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"beta: must be in [0, 1], got {beta!r}")

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return GradVacState(key=_need_key("gradvac", key), targets=_float((k, k)),
                            weights=jnp.ones((k,), jnp.result_type(float)))

    def update(task_grads, state, **extra):
        k = state.weights.shape[-1]
        g = _check_grads(task_grads, k)
        key, sub = jax.random.split(state.key)
        targets = state.targets.astype(g.dtype)
        C, phis = _project_conflicts(_gram(g), task_orders(sub, k), targets)
        off = ~jnp.eye(k, dtype=bool)
        new_targets = jnp.where(off, (1.0 - b) * targets + b * phis, targets)
        weights = jnp.sum(C, axis=0)
        return _finish(_combine(weights, g), g, GradVacState(key=key, targets=new_targets, weights=weights), state)

    return GradientMethod(init, update, "gradvac")


# ----------------------------------------------------------------------------------------------
# GradDrop
# ----------------------------------------------------------------------------------------------


class GradDropState(NamedTuple):
    key: jax.Array    # PRNG key, split at every update
    tasks: jax.Array  # (K,) bool, all True: its static shape is the task count K


def graddrop(leak: float = 0.0) -> GradientMethod:
    """GradDrop, gradient sign dropout (Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai,
    D. Anguelov, "Just pick a sign: optimizing deep multitask models with gradient sign dropout",
    NeurIPS 2020). Per coordinate ``p``, the positive-sign purity and a uniform draw::

        P_p = (1 + sum_i g_ip / sum_i |g_ip|) / 2,     U_p ~ Uniform(0, 1),
        M_ip = [P_p > U_p] [g_ip > 0] + [P_p < U_p] [g_ip < 0],
        d_p  = sum_i (leak + (1 - leak) M_ip) g_ip,

    so at each coordinate only the gradients of one sign survive, positive with probability ``P_p``.
    ``leak`` in [0, 1] (the paper's leak parameters ``l_i``, one shared value; 0 = pure GradDrop, 1 = the plain
    sum). A coordinate where every gradient is 0 gives 0. The paper applies it to the gradients w.r.t. a
    layer of activations (with a sign correction and a sum over the batch before ``P``); pass such feature
    gradients as ``task_grads`` for that variant. ``d`` has the scale of the sum. The draw:
    ``key, sub = jax.random.split(state.key)``, ``U = jax.random.uniform(sub, (P,), task_grads.dtype)``.

    State :class:`GradDropState`: the PRNG key (``init`` needs one). Not in Gram space: it costs
    ``O(K P)`` element-wise work and ``P`` random numbers per update.
    """
    lk = check_real("leak", leak)
    if lk > 1.0:
        raise ValueError(f"leak: must be in [0, 1], got {leak!r}")

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return GradDropState(key=_need_key("graddrop", key), tasks=jnp.ones((k,), dtype=bool))

    def update(task_grads, state, **extra):
        g = _check_grads(task_grads, state.tasks.shape[-1])
        key, sub = jax.random.split(state.key)
        ones = jnp.ones((g.shape[0],), g.dtype)           # sums over tasks as products with ones: XLA's CPU
        purity = 0.5 * (1.0 + _safe_div(_combine(ones, g), _combine(ones, jnp.abs(g))))  # column sum is ~50x slower
        u = jax.random.uniform(sub, purity.shape, g.dtype)
        mask = ((purity > u)[None, :] & (g > 0)) | ((purity < u)[None, :] & (g < 0))
        direction = _combine(ones, (lk + (1.0 - lk) * mask.astype(g.dtype)) * g)
        return _finish(direction, g, GradDropState(key=key, tasks=state.tasks), state)

    return GradientMethod(init, update, "graddrop")


# ----------------------------------------------------------------------------------------------
# Nash-MTL
# ----------------------------------------------------------------------------------------------


class NashMTLState(NamedTuple):
    weights: jax.Array     # (K,) alpha > 0 of the last update (warm start of the next; 0 at init): d = sum_k alpha_k g_k
    residual: jax.Array    # () max_k |alpha_k (M alpha)_k - 1| at the returned alpha
    iterations: jax.Array  # () int32, Newton iterations


def nash_mtl(max_iter: int = 50, tol: float = 1e-10, max_norm: float | None = None) -> GradientMethod:
    """Nash-MTL (A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya,
    "Multi-task learning as a bargaining game", ICML 2022): the Nash bargaining solution
    ``d = sum_k alpha_k g_k`` where ``alpha > 0`` solves (M the Gram matrix)::

        alpha_k (M alpha)_k = 1   for every k,   i.e.  M alpha = 1 / alpha   (paper eq. 2),

    so each task's directional derivative ``g_k . d`` is ``1 / alpha_k``. It is the unique minimiser of the
    strictly convex, self-concordant ``F(alpha) = alpha^T M alpha / 2 - sum_k log alpha_k`` over ``alpha > 0``,
    found here by damped Newton steps (``alpha <- alpha - Delta / (1 + lambda)``, full steps once the Newton
    decrement ``lambda < 1/4``; every iterate stays positive) on ``M`` normalised by its Frobenius norm, warm
    started at the previous ``alpha`` (the first update starts at ``1 / ||g_k||``, exact for orthogonal
    gradients), until ``max_k |alpha_k (M alpha)_k - 1| <= tol`` (at least 100 machine
    epsilons) or ``max_iter`` iterations. (The authors solve a sequence of convex approximations with CVXPY;
    the fixed point is the same.) If 0 is in the cone of the gradients (they can be combined with positive
    weights into 0), ``F`` is unbounded and ``alpha`` grows until ``max_iter``. ``max_norm`` (the authors' 1.0,
    default None = off) clips ``||d||`` to at most ``max_norm``.

    State :class:`NashMTLState`: ``weights`` alpha, the ``residual`` and Newton ``iterations``.
    """
    _check_solver_knobs(max_iter, tol)
    if max_norm is not None:
        check_real("max_norm", max_norm, strict=True)

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return NashMTLState(weights=_float((k,)), residual=_float(()),
                            iterations=jnp.zeros((), jnp.int32))

    def update(task_grads, state, **extra):
        k = state.weights.shape[-1]
        g = _check_grads(task_grads, k)
        M = _gram(g)
        s = jnp.sqrt(jnp.sum(M * M))
        s = jnp.where(s > 0, s, jnp.ones_like(s))
        Mn = M / s                                          # alpha_n = sqrt(s) alpha solves Mn alpha_n = 1/alpha_n
        eps = _tol(tol, g.dtype)
        # warm start at the previous alpha; at the first update (weights 0) at the solution for orthogonal
        # gradients, alpha_k = 1 / ||g_k|| (normalised)
        a0 = state.weights.astype(g.dtype) * jnp.sqrt(s)
        cold = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(Mn), jnp.finfo(g.dtype).eps))
        a0 = jnp.where(jnp.all(jnp.isfinite(a0) & (a0 > 0)), a0, cold)

        def residual(a):
            return jnp.max(jnp.abs(a * (Mn @ a) - 1.0))

        def body(c):
            a, it, _ = c
            grad = Mn @ a - 1.0 / a
            H = Mn + jnp.diag(1.0 / (a * a))
            delta = jnp.linalg.solve(H, grad)
            lam = jnp.sqrt(jnp.maximum(jnp.dot(grad, delta), 0.0))
            a = a - jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam)) * delta
            return a, it + 1, residual(a)

        def cond(c):
            return (c[1] < max_iter) & (c[2] > eps)

        a, it, res = jax.lax.while_loop(cond, body, (a0, jnp.zeros((), jnp.int32), residual(a0)))
        alpha = a / jnp.sqrt(s)
        if max_norm is not None:
            dnorm = jnp.sqrt(jnp.maximum(jnp.dot(alpha, M @ alpha), 0.0))
            alpha = alpha * jnp.minimum(1.0, _safe_div(jnp.asarray(max_norm, g.dtype), dnorm) + (dnorm == 0))
        new_state = NashMTLState(weights=alpha, residual=res, iterations=it)
        return _finish(_combine(alpha, g), g, new_state, state)

    return GradientMethod(init, update, "nash_mtl")


# ----------------------------------------------------------------------------------------------
# Aligned-MTL
# ----------------------------------------------------------------------------------------------

_ALIGNED_SCALES = ("min", "median", "rmse")


class AlignedMTLState(NamedTuple):
    weights: jax.Array  # (K,) coefficients of the last direction: d = sum_k weights_k g_k


def aligned_mtl(scale: str = "min") -> GradientMethod:
    """Aligned-MTL (D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent component alignment
    for multi-task learning", CVPR 2023): replace the gradient matrix ``G`` (K, P) by the closest matrix
    with orthogonal rows of equal norm, i.e. condition number 1. With the SVD ``G = U S V^T`` (rank r)::

        G_hat = sigma U V^T,     d = G_hat^T 1 = sum_k alpha_k g_k,   alpha = sigma V_M Lambda^{-1/2} V_M^T 1,

    where ``M = G G^T = V_M Lambda V_M^T`` (so ``U = V_M``, ``S = Lambda^{1/2}``), only the ``r`` eigenvalues
    above ``lambda_max K eps`` count (the authors' rank rule), and ``sigma`` is the smallest kept singular
    value (``scale="min"``, the paper's) or their median or root mean square (``"median"``, ``"rmse"``, the
    authors' code's other modes; the median of an even count is the mean of the two middle values).
    Pre-weights are equal (1). Computed in Gram space with one K x K ``eigh``.

    State :class:`AlignedMTLState`: the coefficients ``weights`` alpha.
    """
    _check_choice("scale", scale, _ALIGNED_SCALES)

    def init(num_tasks, key=None):
        k = _num_tasks(num_tasks)
        return AlignedMTLState(weights=jnp.ones((k,), jnp.result_type(float)))

    def update(task_grads, state, **extra):
        k = state.weights.shape[-1]
        g = _check_grads(task_grads, k)
        lam, V = jnp.linalg.eigh(_gram(g))
        keep = lam > jnp.max(lam) * k * jnp.finfo(g.dtype).eps
        sv = jnp.sqrt(jnp.where(keep, lam, 0.0))
        inv = jnp.where(keep, 1.0 / jnp.where(keep, sv, 1.0), 0.0)
        if scale == "min":
            sigma = jnp.min(jnp.where(keep, sv, jnp.inf))
        elif scale == "rmse":
            sigma = jnp.sqrt(_safe_div(jnp.sum(jnp.where(keep, lam, 0.0)), jnp.sum(keep).astype(g.dtype)))
        else:
            sigma = jnp.nanmedian(jnp.where(keep, sv, jnp.nan))
        sigma = jnp.where(jnp.any(keep), sigma, 0.0)
        alpha = sigma * (V @ (inv * jnp.sum(V, axis=0)))   # sigma V diag(inv) V^T 1
        return _finish(_combine(alpha, g), g, AlignedMTLState(weights=alpha), state)

    return GradientMethod(init, update, "aligned_mtl")


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., GradientMethod]] = {
    "mgda": mgda,
    "mgda_ub": mgda_ub,
    "pcgrad": pcgrad,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "gradvac": gradvac,
    "graddrop": graddrop,
    "nash_mtl": nash_mtl,
    "aligned_mtl": aligned_mtl,
}

#: The gradient-manipulation methods, by registry name.
METHODS: tuple[str, ...] = tuple(_FACTORIES)
#: The methods that need a PRNG key at ``init``.
RANDOM_METHODS: tuple[str, ...] = ("pcgrad", "gradvac", "graddrop")


def get(name: str, **kwargs) -> GradientMethod:
    """The method called ``name`` (one of :data:`METHODS`), built with ``kwargs``."""
    if not isinstance(name, str) or name not in _FACTORIES:
        raise ValueError(f"name: must be one of {METHODS}, got {name!r}")
    return _FACTORIES[name](**kwargs)

