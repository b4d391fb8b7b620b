"""Accelerated proximal gradient on the primal or the dual of ``loss + R``, certified by the duality gap.

The problem is ``min_W  F(W) = sum_t c_t sum_i loss(y_ti, <w_t, x_ti>) + R(W)`` with ``R`` one of the
regularisers of :mod:`mtl_jax.mtrl` (the squared trace norm of J, or the Sigma-quadratic of P at a
fixed Omega). Both methods are FISTA (Beck and Teboulle 2009) with the function-value restart of
O'Donoghue and Candes (2015): a step that makes the objective worse is discarded and the momentum
reset, so the iteration is monotone and adapts to the (unknown) local strong convexity.

* ``primal``: for smooth losses (squared, logistic). Step ``1 / L`` with
  ``L = curvature * max_t c_t lambda_max(X_t^T X_t)``; the prox of ``R`` carries lam1, lam2.
  The certificate pairs ``W`` with ``alpha = -c loss'(a)``.
* ``dual``: for any loss, required for the non-smooth hinge. Ascent on
  ``D(alpha) = sum -c loss*(-alpha/c) - R*(X^T alpha)``; ``R*`` is smooth because ``R`` is
  lam1-strongly convex, step ``1 / (Lip(grad R*) max_t lambda_max(X_t^T X_t))``, and the dual
  term's prox is the loss's coordinate step. The certificate pairs ``alpha`` with ``W = grad R*(V)``.

Margins are linear in ``W``, so the extrapolated point's margins are combined from stored ones, and
the gradient at the new iterate doubles as the certificate's dual vector ``V``: a primal iteration
costs one pass over the data forward and one back (two for a non-quadratic loss), plus two small
Gram eigendecompositions (prox and certificate). The whole loop is one ``lax.while_loop``: one compiled program.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.losses import Loss, dual_prox, get_loss
from mtl_jax.data.sites import Sites, feature_sums, margins, per_block, sample_weights, site_gram_lmax_bound
from mtl_jax.mtrl import dual_objective, empirical_loss


class APGState(NamedTuple):
    """State of either method; ``x`` is ``W`` (m, d) for the primal and ``alpha`` (m, n_max) for the dual."""

    x: jax.Array          # current iterate
    z: jax.Array          # extrapolated point
    t: jax.Array          # () FISTA momentum parameter
    value: jax.Array      # () the monotone quantity: F(W) (primal) or -D(alpha) (dual)
    W: jax.Array          # (m, d) primal point certified by ``gap``
    alpha: jax.Array      # (m, n_max) dual point certified by ``gap``
    objective: jax.Array  # () F(W)
    gap: jax.Array        # () F(W) - D(alpha) >= 0
    iteration: jax.Array  # () int
    restarts: jax.Array   # () int
    carry: "PrimalCarry | None" = None  # the primal method's stored margins, gradients, previous point; None for the dual


class PrimalCarry(NamedTuple):
    """What the primal method keeps between iterations so that it passes over the data only once each way.

    The extrapolated point ``z = x + beta (x - prev)`` is never stored: margins are linear in ``W``, and
    so is the gradient of a quadratic loss, so ``z``'s margins (and, for squared loss, its gradient)
    are the same combination of stored ones, formed where they are used. Keeping the previous point
    instead of ``z`` makes the restart's bookkeeping one select per array instead of two (``prev`` is
    the old ``x`` whether the step is accepted or not; a rejected step sets ``beta = 0``).
    """

    x_margins: jax.Array     # (m, n_max) margins of the current iterate x
    x_grad: jax.Array        # (m, d) loss gradient at x
    prev: jax.Array          # (m, d) the iterate before x
    prev_margins: jax.Array  # (m, n_max) its margins
    prev_grad: jax.Array     # (m, d) its loss gradient
    beta: jax.Array          # () momentum weight of the next extrapolation (0 after a restart)


class _PrimalLoop(NamedTuple):
    """The primal loop's state: F(W) is both the monotone value and the certified objective."""

    x: jax.Array          # (m, d) current iterate, the certified W
    t: jax.Array          # () FISTA momentum parameter
    objective: jax.Array  # () F(x)
    gap: jax.Array        # () certificate of x
    iteration: jax.Array  # () int
    restarts: jax.Array   # () int
    carry: PrimalCarry


class APGResult(NamedTuple):
    state: APGState
    objectives: jax.Array  # (history_size,) F(W) after each iteration (NaN past the last one)
    gaps: jax.Array        # (history_size,) certificate after each iteration
    converged: jax.Array   # () bool: gap <= tol * F


def gram_lmax_bound(X, squarings: int = 5):
    """Per-task upper bound on ``lambda_max(X_t^T X_t)``: X (m, n_max, d) -> (m,), from traces of Gram powers.

    With ``K_t`` the smaller Gram matrix of site t (``X_t X_t^T`` (n_max, n_max) when n_max <= d, else
    ``X_t^T X_t``; both have the same nonzero eigenvalues ``lambda_i``) and ``q = 2^(squarings + 1)``,

        lambda_max <= (tr K_t^q)^(1/q) = (sum_i lambda_i^q)^(1/q) <= r^(1/q) lambda_max ,

    r = rank <= min(n_max, d): a guaranteed upper bound (a too-small Lipschitz constant would make
    steps too long, which the restart can only reject, so the step size needs an upper bound), at
    most ``r^(1/q)`` above (7 % for r = 100, q = 64; a fraction of a percent when the top eigenvalue
    stands out). ``K_t^(q/2)`` comes from ``squarings`` repeated squarings, each renormalised to unit
    trace so nothing overflows, and ``tr K^q = ||K^(q/2)||_F^2``. Costs one pass over the data and
    ``O(m s^3 squarings)`` work with s = min(n_max, d); unlike power iteration
    it has no start vector to be unlucky with (a 30-step power iteration fell 12-14 % short on some sites).
    """
    if isinstance(X, Sites):  # either layout; a chunked site's bound covers all its chunks
        return site_gram_lmax_bound(X, lambda A: gram_lmax_bound(A, squarings))
    m, n, d = X.shape
    blocks = _lmax_blocks(m, min(n, d) ** 2 * X.dtype.itemsize)
    if blocks > 1:  # a block of sites at a time: the Gram powers' temporaries are a fraction of X
        bound = jax.lax.map(lambda Xb: gram_lmax_bound(Xb, squarings), X.reshape(blocks, m // blocks, n, d))
        return bound.reshape(m)
    K = jnp.einsum("tnd,tkd->tnk", X, X) if n <= d else jnp.einsum("tnd,tne->tde", X, X)
    tiny = jnp.finfo(X.dtype).tiny

    def unit_trace(A):
        tr = jnp.trace(A, axis1=1, axis2=2)
        safe = jnp.where(tr > 0, tr, 1.0)  # an all-zero site has K = 0 and bound 0
        return A / safe[:, None, None], jnp.log(safe)

    A, log_scale = unit_trace(K)            # K = exp(log_scale) A
    for _ in range(squarings):              # K^(2^j) = exp(log_scale) A, tr A = 1
        A, log_tr = unit_trace(A @ A)
        log_scale = 2.0 * log_scale + log_tr
    log_trace_q = 2.0 * log_scale + jnp.log(jnp.maximum(jnp.sum(A * A, axis=(1, 2)), tiny))
    bound = jnp.exp(log_trace_q / 2 ** (squarings + 1))
    return jnp.where(jnp.trace(K, axis1=1, axis2=2) > 0, bound, 0.0)


def _lmax_blocks(m: int, gram_bytes: int, budget: int = 32 << 20) -> int:
    """Blocks of sites for :func:`gram_lmax_bound`: the fewest that divide ``m`` and keep a block's Gram
    matrices (``gram_bytes`` each) within ``budget`` bytes; 1 (no blocking) when no divisor up to 64 does."""
    for blocks in range(1, min(m, 64) + 1):
        if m % blocks == 0 and (m // blocks) * gram_bytes <= budget:
            return blocks
    return 1


def primal_lipschitz(loss: Loss, lmax, counts, reg=None):
    """Lipschitz constant of the loss part's gradient: ``curvature * max_t lmax_t / n_t``, floored.

    ``lmax`` (m,) holds ``lambda_max(X_t^T X_t)`` per site, or an upper bound (:func:`gram_lmax_bound`).
    The step is ``1 / L``, so ``L`` is floored (:func:`lipschitz_floor`): all-zero features give
    ``L = 0`` and an infinite step (``inf * 0 = NaN`` in the gradient step), features below ~1e-154
    a subnormal ``L``. Any ``L`` above the true constant is a valid (shorter) step.
    With ``reg`` given, the floor is also ``eps * mu`` (``mu = 1 / Lip(grad R*)``, the strong convexity
    of ``R``: lam1 for J): then ``step * lam1 <= 1 / eps``, so the prox's ``1 + step lam1`` stays finite,
    and where the floor acts the loss part's curvature is below ``eps`` of the regulariser's.
    """
    L = get_loss(loss).curvature * jnp.max(lmax / jnp.maximum(counts, 1))
    floor = lipschitz_floor(L.dtype)
    if reg is not None:
        floor = jnp.maximum(floor, jnp.finfo(L.dtype).eps / reg.conjugate_lipschitz())
    return jnp.maximum(L, floor)


def dual_lipschitz(reg, lmax, sites=None):
    """Lipschitz constant of the smooth dual part's gradient: ``Lip(grad R*) * max_t lmax_t``, floored.

    With ``sites``, one constant per site instead, ``Lip(grad R*) lmax_t`` for each block's rows ((K, 1)):
    ``||dV||_F^2 = sum_t ||X_t^T dalpha_t||^2 <= sum_t lmax_t ||dalpha_t||^2`` makes that a valid
    block-diagonal majoriser, and the dual prox is per coordinate, so every site takes its own step
    (long-tailed task sizes: the skewed hinge case of benchmarks/README.md needed 8604 iterations with
    the global step and 83 with per-site steps).

    ``0`` for all-zero features (the smooth part is then constant); the floor of
    :func:`lipschitz_floor` keeps the step ``1 / L`` finite, so the step's ``step * X W`` is 0, not NaN.
    """
    L = reg.conjugate_lipschitz() * (jnp.max(lmax) if sites is None else per_block(lmax, sites)[:, None])
    return jnp.maximum(L, lipschitz_floor(L.dtype))


def lipschitz_floor(dtype):
    """``tiny / eps`` (~1e-292 in float64, ~1e-31 in float32): the smallest Lipschitz constant used.

    Its step ``eps / tiny`` is finite with room to spare (a step times a gradient of size up to
    ``max / step`` stays finite), and it is far below the constant of any data with entries above ~1e-140.
    """
    info = jnp.finfo(dtype)
    return info.tiny / info.eps


def _primal_certificate(W, a, grad, sites, loss: Loss, reg, reg_at_W):
    """(F(W), gap, alpha) with the dual point ``alpha = -c loss'(a)`` matched to ``W``.

    ``grad`` (m, d) is the loss part's gradient at ``W``, ``X^T (c loss'(a)) = -V(alpha)``: the
    certificate reuses it instead of passing over the data again.
    """
    c = sample_weights(sites)
    alpha = loss.primal_to_dual(sites.y, a, c) * sites.mask
    dual, _, _ = dual_objective(alpha, sites, reg, loss, V=-grad)
    primal = empirical_loss(W, sites, loss, a) + reg_at_W
    return primal, primal - dual, alpha


def _loop(step, state, max_iter, tol, history_size, offset=None):
    """Iterate ``step`` until the relative gap is at most ``tol`` or ``max_iter`` steps (both traced).

    ``history_size`` (static) is the length of the per-iteration history; iterations past it are run
    but not recorded (callers size it to at least ``max_iter``). ``offset`` (traced, for a loop that
    continues a state: :func:`run_chunk`): the iteration count of ``state``, recorded at history entry 0.
    """
    n = history_size
    dtype = state.objective.dtype
    hist = (jnp.full((n,), jnp.nan, dtype), jnp.full((n,), jnp.nan, dtype))

    def cond(carry):
        s, _ = carry
        return (s.iteration < max_iter) & ((s.iteration == 0) | (s.gap > tol * jnp.abs(s.objective)))

    def body(carry):
        s, (objs, gaps) = carry
        s = step(s)
        i = s.iteration - 1 if offset is None else s.iteration - 1 - offset
        return s, (objs.at[i].set(s.objective, mode="drop"), gaps.at[i].set(s.gap, mode="drop"))

    state, (objs, gaps) = jax.lax.while_loop(cond, body, (state, hist))
    converged = state.gap <= tol * jnp.abs(state.objective)
    return APGResult(state, objs, gaps, converged)


def _increased(new, old):
    """Whether the monotone quantity went up by more than round-off.

    Changes below a few ulps are noise: counting them as increases would reject every step once the
    value is flat to machine precision, freezing iterates that still approach the optimum (the
    hinge dual reaches a flat value long before its primal point W(alpha) is accurate).
    """
    return new > old + 16 * jnp.finfo(old.dtype).eps * jnp.abs(old)


def _momentum(t):
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    return t_next, (t - 1.0) / t_next


def _advance(s: APGState, x_new, value_new, W_new, alpha_new, objective_new, gap_new):
    """FISTA-with-restart bookkeeping shared by both methods.

    A step that raises the monotone ``value`` is rejected: the state keeps its point and the next
    step restarts from it without momentum. Returns (new state, rejected?, momentum beta); ``carry``
    is left for the caller to update.
    """
    worse = _increased(value_new, s.value)
    t_next, beta = _momentum(s.t)

    def pick(new, old):
        return jnp.where(worse, old, new)

    state = APGState(
        x=pick(x_new, s.x),
        z=pick(x_new + beta * (x_new - s.x), s.x),
        t=jnp.where(worse, jnp.ones_like(s.t), t_next),
        value=pick(value_new, s.value),
        W=pick(W_new, s.W),
        alpha=pick(alpha_new, s.alpha),
        objective=pick(objective_new, s.objective),
        gap=pick(gap_new, s.gap),
        iteration=s.iteration + 1,
        restarts=s.restarts + worse.astype(jnp.int32),
        carry=s.carry,
    )
    return state, worse, beta


def primal_apg(sites, loss, reg, W0, *, lipschitz, tol=1e-6, max_iter=1000, history_size=None) -> APGResult:
    """FISTA with restart on ``F(W) = loss + R``; ``lipschitz`` is L of the loss part's gradient.

    Args:
      sites: padded per-site data (``mtl_jax.data.Sites``).
      loss: a smooth loss name or :class:`~mtl_jax.losses.Loss`.
      reg: a regulariser with ``prox`` and ``conjugate`` (see :mod:`mtl_jax.mtrl`).
      W0: (m, d) starting point.
      lipschitz: ``curvature * max_t c_t lambda_max(X_t^T X_t)``.
      tol: stop when ``gap <= tol * F(W)``.
      max_iter: iteration cap (may be traced).
      history_size: length of the recorded history (static); default ``max_iter``, which must then be an int.
    """
    parts = primal_parts(sites, loss, reg, lipschitz=lipschitz)
    res = _loop(parts.step, parts.init(W0), max_iter, tol, max_iter if history_size is None else history_size)
    return res._replace(state=parts.finish(res.state))


class APGParts(NamedTuple):
    """One APG method cut at its loop: ``init(start) -> loop state``, ``step(loop state) -> loop state``,
    ``finish(loop state) -> APGState``. The loop state is everything the ``while_loop`` carries (a
    :class:`_PrimalLoop` for the primal method, an :class:`APGState` for the dual), so a run cut into
    chunks (:func:`run_chunk`) and continued from a saved loop state computes exactly the same numbers."""

    init: object
    step: object
    finish: object


def primal_parts(sites, loss, reg, *, lipschitz) -> APGParts:
    """:func:`primal_apg` cut at its loop (:class:`APGParts`; ``init`` takes ``W0`` (m, d))."""
    loss = get_loss(loss)
    if loss.curvature is None:
        raise ValueError(f"loss {loss.name!r} is not smooth: use the dual method")
    c = sample_weights(sites)
    step_size = 1.0 / lipschitz
    X = sites  # either layout: the contractions take the Sites

    def gradient(a):
        return feature_sums(c * loss.derivative(sites.y, a), X)

    def init(W0):
        # The starting point is certified by the first step rather than here: the certificate is the
        # costliest code to compile, and an infinite value makes that first step always accepted.
        a0 = margins(W0, X)
        g0 = gradient(a0)
        inf = jnp.asarray(jnp.inf, W0.dtype)
        zero = jnp.zeros((), W0.dtype)
        return _PrimalLoop(W0, jnp.ones((), W0.dtype), inf, inf, jnp.zeros((), jnp.int32),
                           jnp.zeros((), jnp.int32), PrimalCarry(a0, g0, W0, a0, g0, zero))

    def step(s: _PrimalLoop) -> _PrimalLoop:
        zero = jnp.zeros((), s.x.dtype)
        aW, gW, prev, a_prev, g_prev, beta = s.carry
        z = s.x + beta * (s.x - prev)
        if loss.linear_derivative:
            gZ = gW + beta * (gW - g_prev)
        else:
            gZ = gradient(aW + beta * (aW - a_prev))
        W_new, reg_new = reg.prox(z - step_size * gZ, step_size)
        a_new = margins(W_new, X)
        g_new = gradient(a_new)
        obj_new, gap_new, _ = _primal_certificate(W_new, a_new, g_new, sites, loss, reg, reg_new)
        worse = _increased(obj_new, s.objective)
        t_next, beta_next = _momentum(s.t)

        def keep(new, old):
            return jnp.where(worse, old, new)

        return _PrimalLoop(
            x=keep(W_new, s.x),
            t=jnp.where(worse, jnp.ones_like(s.t), t_next),
            objective=keep(obj_new, s.objective),
            gap=keep(gap_new, s.gap),
            iteration=s.iteration + 1,
            restarts=s.restarts + worse.astype(jnp.int32),
            carry=PrimalCarry(keep(a_new, aW), keep(g_new, gW), s.x, aW, gW, jnp.where(worse, zero, beta_next)),
        )

    def finish(s: _PrimalLoop) -> APGState:
        aW, _, prev, _, _, beta = s.carry
        alpha = loss.primal_to_dual(sites.y, aW, c) * sites.mask  # the certificate's dual point of x
        return APGState(s.x, s.x + beta * (s.x - prev), s.t, s.objective, s.x, alpha, s.objective, s.gap,
                        s.iteration, s.restarts, s.carry)

    return APGParts(init, step, finish)


def dual_apg(sites, loss, reg, alpha0, *, lipschitz, tol=1e-6, max_iter=1000, history_size=None) -> APGResult:
    """FISTA with restart, ascending the dual; ``lipschitz`` is ``Lip(grad R*) max_t lambda_max(X_t^T X_t)``.

    ``alpha0`` (m, n_max) must be dual feasible (zeros are, for every loss) and zero at padding.
    ``max_iter`` and ``history_size`` as in :func:`primal_apg`.
    """
    parts = dual_parts(sites, loss, reg, lipschitz=lipschitz)
    return _loop(parts.step, parts.init(alpha0), max_iter, tol, max_iter if history_size is None else history_size)


def dual_parts(sites, loss, reg, *, lipschitz) -> APGParts:
    """:func:`dual_apg` cut at its loop (:class:`APGParts`; ``init`` takes ``alpha0``; the loop state is the
    :class:`APGState` itself, ``finish`` the identity)."""
    loss = get_loss(loss)
    c = jnp.where(sites.mask > 0, sample_weights(sites), 1.0)
    step_size = 1.0 / lipschitz
    X = sites  # either layout: the contractions take the Sites

    def certify(alpha):
        dual, W, reg_at_W = dual_objective(alpha, sites, reg, loss)
        primal = empirical_loss(W, sites, loss) + reg_at_W
        return dual, W, primal

    def init(alpha0):
        inf = jnp.asarray(jnp.inf, alpha0.dtype)
        W0 = jnp.zeros((sites.num_sites, sites.dim), alpha0.dtype)
        return APGState(alpha0, alpha0, jnp.ones((), alpha0.dtype), inf, W0, alpha0, inf, inf,
                        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def step(s: APGState) -> APGState:
        W_z, _, _ = reg.conjugate(feature_sums(s.z, X))
        beta_point = s.z - step_size * margins(W_z, X)
        alpha_new = dual_prox(loss, beta_point, sites.y, c, step_size) * sites.mask
        dual_new, W_new, primal_new = certify(alpha_new)
        return _advance(s, alpha_new, -dual_new, W_new, alpha_new, primal_new, primal_new - dual_new)[0]

    return APGParts(init, step, lambda s: s)


def run_chunk(parts: APGParts, state, stop, tol, history_size) -> APGResult:
    """Continue the loop state ``state`` (of ``parts``) until the relative gap is at most ``tol`` or the
    iteration count reaches ``stop`` (both traced). The history's entry 0 is iteration ``state.iteration + 1``.
    Chunks of any lengths give exactly the numbers of one loop (the same ``step``, the same carried state).
    Returns an :class:`APGResult` whose ``state`` is the loop state (not finished)."""
    return _loop(parts.step, state, stop, tol, history_size, offset=state.iteration)
