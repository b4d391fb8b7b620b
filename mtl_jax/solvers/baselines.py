"""Distributed baselines for DMTRL, reported on DMTRL's axes: rounds, bytes, simulated seconds, the gap of J.

Every baseline here minimises (or approximates the minimiser of) the same objective as DMTRL,

    J(W) = sum_t (1/n_t) sum_i loss(y_ti, <w_t, x_ti>) + (lam1/2) ||W||_F^2 + (lam2/2) ||W||_*^2 ,

on the same simulated sites (:class:`~mtl_jax.data.Sites`: site ``t`` keeps ``X_t`` (n_t, d) and
``y_t``; the server holds ``W`` (m, d)), and returns a :class:`~mtl_jax.solvers.base.SolveOutput` whose
history is a tuple of :class:`~mtl_jax.solvers.base.RoundRecord` (round 0 is the start; ``bytes``,
``bytes_up``, ``bytes_down`` cumulative; ``sim_seconds`` under DMTRL's cost model: a round lasts as
long as the slowest site's compute plus its upload, plus the download, with per-site ``speed`` in
coordinate steps per second, ``latency`` seconds per message and ``bandwidth`` bytes per second,
defaults :data:`mtl_jax.solvers.dmtrl.DEFAULT_SPEED`, ``DEFAULT_LATENCY``, ``DEFAULT_BANDWIDTH``).
A *coordinate step* is the cost unit of DMTRL's SDCA: one sample's dot product with a d-vector and one
d-vector update (``2 d`` flops); a pass of margins plus a gradient over ``n_t`` samples is ``n_t`` steps.

* :func:`distributed_apg`: the centralized certified APG (:func:`mtl_jax.solvers.centralized.solve`,
  FISTA with restart; primal for squared/logistic, dual for hinge) run as a protocol, one communication
  round per iteration. Message contents per site and round (numbers; :func:`apg_message_numbers`):

    - squared, primal: up ``d + 2`` (the loss gradient ``X_t^T (c_t loss'(a_t))`` at the new iterate,
      its loss value, its certificate dual term); down ``d`` (``w_t``). The gradient at the
      extrapolated point is linear in the stored ones, formed at the server.
    - logistic, primal: up ``2 d + 2`` (the gradient at the new iterate, and at the next extrapolated
      point, which the site forms from its stored margins, plus the two scalars); down ``d + 2``
      (``w_t``, the momentum weight, whether the last step was accepted).
    - hinge, dual: up ``d + 2`` (``X_t^T alpha_t``, the dual term, the loss at the last certified
      point); down ``2 d + 2`` (``w_t`` at the extrapolated dual point for the site's prox step, the
      certified point's ``w_t``, the momentum weight, acceptance). The loss at the certified point of
      iteration k travels in round k + 1's messages; it is counted in round k (same bytes).

  Round 0 carries the start: ``d`` numbers up per site (the gradient, or ``X_t^T alpha_t``, at the
  starting point). Certified by the duality gap of J, as the centralized solver.
* :func:`minibatch_sgd`: proximal mini-batch SGD on the primal; up ``d`` (the mini-batch gradient),
  down ``d`` (``w_t``) per site and round. J and its gap are computed every round by a monitor that
  is not part of the protocol (not counted).
* :func:`independent`: DMTRL with ``lam2 = 0``: per-task ridge / SVM / logistic regression, no coupling.
* :func:`fixed_identity`: DMTRL's alternating scheme with ``Omega = I / m`` never updated: the
  MOCHA-style W-step with no relationships learned (``Sigma = I / (lam1 + lam2 m)``, so per-task
  models with the weight ``lam1 + lam2 m``).
* :func:`centralize_bytes`: what the centralized solver communicates: all data, once.

References: V. Smith, C.-K. Chiang, M. Sanjabi, A. Talwalkar, "Federated Multi-Task Learning"
(MOCHA), NeurIPS 2017; C. Ma, V. Smith, M. Jaggi, M. I. Jordan, P. Richtarik, M. Takac, "Adding vs.
Averaging in Distributed Primal-Dual Optimization" (CoCoA+), ICML 2015; S. Liu, S. J. Pan, Q. Ho,
"Distributed Multi-Task Relationship Learning" (DMTRL), KDD 2017; A. Beck, M. Teboulle, FISTA, SIAM J.
Imaging Sci. 2009; L. Bottou, "Stochastic Gradient Descent Tricks", 2012 (the step schedule of SGD).
"""
from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data.sites import Sites, margins, sample_weights
from mtl_jax.losses import get_loss
from mtl_jax.mtrl import DEFAULT_EPS, SpectralMatrix, TraceNormSq, dual_objective, empirical_loss, omega_factored
from mtl_jax.solvers import centralized, dmtrl
from mtl_jax.solvers.base import RoundRecord, SolveOutput, compiled, history_capacity, numpy_tree

DEFAULT_SPEED = dmtrl.DEFAULT_SPEED
DEFAULT_LATENCY = dmtrl.DEFAULT_LATENCY
DEFAULT_BANDWIDTH = dmtrl.DEFAULT_BANDWIDTH
#: Names of the baselines (with DMTRL and the centralized solver, the methods the experiments compare).
BASELINES = ("distributed_apg", "minibatch_sgd", "independent", "fixed_identity")


# --- communication and the cost model --------------------------------------------------------------------

def centralize_bytes(sites: Sites, itemsize: int | None = None) -> int:
    """Bytes to ship every sample to one place once: ``itemsize * sum_t n_t (d + 1)`` (features and target)."""
    itemsize = np.dtype(sites.X.dtype).itemsize if itemsize is None else int(itemsize)
    return itemsize * int(np.sum(np.asarray(sites.counts))) * (sites.dim + 1)


def apg_message_numbers(loss: str, d: int) -> tuple[int, int]:
    """(numbers up, numbers down) per site and round of :func:`distributed_apg` (see the module docstring)."""
    loss_ = get_loss(loss)
    if loss_.curvature is None:          # dual APG (hinge)
        return d + 2, 2 * d + 2
    if loss_.linear_derivative:          # squared: the extrapolated gradient is formed at the server
        return d + 2, d
    return 2 * d + 2, d + 2              # logistic


def apg_site_steps(loss: str) -> float:
    """Coordinate steps per sample and round of :func:`distributed_apg` (dots + updates, halved).

    squared primal: margins at the new iterate and one gradient (1); logistic primal: margins and two
    gradients (1.5); hinge dual: margins at the extrapolated point, ``X_t^T alpha``, margins at the
    certified point (1.5).
    """
    loss_ = get_loss(loss)
    return 1.0 if loss_.linear_derivative else 1.5


def round_seconds(steps, up_bytes, down_bytes, *, speed, latency, bandwidth) -> float:
    """Simulated seconds of one round, DMTRL's cost model: ``max_t (steps_t / speed_t + latency + up / bandwidth)
    + latency + down / bandwidth`` (``steps`` (m,) coordinate steps; ``up_bytes``, ``down_bytes`` per site)."""
    steps = np.asarray(steps, float)
    speed = np.broadcast_to(np.asarray(speed, float), steps.shape)
    site = steps / speed + latency + np.asarray(up_bytes, float) / bandwidth
    return float(np.max(site) + latency + down_bytes / bandwidth)


def _records(objectives, gaps, *, m, start_up, up, down, start_steps, steps, passes, speed, latency, bandwidth,
             wall, itemsize):
    """RoundRecords 0..K from per-round J and gap (index 0 = the start); ``up``/``down`` numbers per site."""
    K = len(objectives) - 1
    per_round = wall / max(K, 1)
    up_b, down_b, start_b = itemsize * up, itemsize * down, itemsize * start_up
    sim = round_seconds(start_steps, start_b, 0, speed=speed, latency=latency, bandwidth=bandwidth) \
        if start_up else 0.0
    sec = round_seconds(steps, up_b, down_b, speed=speed, latency=latency, bandwidth=bandwidth)
    total_up, total_down = m * start_b, 0
    rows = []
    for k in range(K + 1):
        if k > 0:
            total_up += m * up_b
            total_down += m * down_b
            sim += sec
        J, g = float(objectives[k]), float(gaps[k])
        rows.append(RoundRecord(k, J, g, total_up + total_down, per_round * k, J, J - g, float("nan"),
                                total_up, total_down, 0.0 if k == 0 else passes, m, sim))
    return tuple(rows)


# --- distributed APG ------------------------------------------------------------------------------------------

@partial(jax.jit, static_argnames=("loss", "dual"))
def _start_certificate(sites, W0, alpha0, lam1, lam2, *, loss, dual):
    """(J, gap of J) at the start: ``W0`` with ``alpha = -c loss'(<w, x>)`` (primal), or ``alpha0`` with
    ``W = grad R*(X^T alpha0)`` (dual)."""
    loss_ = get_loss(loss)
    reg = TraceNormSq(lam1, lam2)
    if dual:
        D, W, reg_at_W = dual_objective(alpha0, sites, reg, loss_)
        J = empirical_loss(W, sites, loss_) + reg_at_W
        return J, J - D
    alpha = loss_.primal_to_dual(sites.y, margins(W0, sites), sample_weights(sites)) * sites.mask
    J = empirical_loss(W0, sites, loss_) + reg.value(W0)
    return J, J - dual_objective(alpha, sites, reg, loss_)[0]


def distributed_apg(sites: Sites, *, lam1, lam2, loss="squared", tol=1e-6, max_rounds=5000, W0=None, alpha0=None,
                    eps=DEFAULT_EPS, lmax=None, speed=DEFAULT_SPEED, latency=DEFAULT_LATENCY,
                    bandwidth=DEFAULT_BANDWIDTH) -> SolveOutput:
    """Accelerated proximal gradient on J as a distributed protocol: one round per iteration, certified.

    Primal (squared, logistic): each round every site evaluates its loss gradient
    ``g_t = X_t^T (c_t loss'(X_t w_t))`` (c_t = 1/n_t) at the server's new iterate and sends it with its
    loss value and certificate term; the server takes the FISTA step ``W <- prox_{R/L}(Z - G / L)`` with
    ``R = TraceNormSq(lam1, lam2)``, ``L = curvature * max_t lambda_max(X_t^T X_t) / n_t``, restarts the
    momentum when J rises, and sends each site its ``w_t``. Dual (hinge, not smooth): the same on
    ``D(alpha)``, each site stepping its own ``alpha_t`` and sending ``X_t^T alpha_t``. The iterates are
    exactly those of :func:`mtl_jax.solvers.centralized.solve` (``method="apg"``), whose per-iteration
    history supplies J and the gap; this function adds the protocol's rounds, bytes and simulated seconds
    (message contents: the module docstring, :func:`apg_message_numbers`).

    Args:
      sites: validated per-site data (either layout). lam1 > 0, lam2 >= 0, loss as in :func:`mtl_jax.fit`.
      tol: stop when the gap of J is at most ``tol * J``. max_rounds: round (iteration) cap.
      W0 (m, d) / alpha0 (K, n_max): warm starts of the primal / dual method (default zeros).
      lmax: (m,) ``lambda_max(X_t^T X_t)`` bounds when known.
      speed ((m,) or scalar), latency, bandwidth: the cost model (DMTRL's, same defaults).

    Returns a :class:`~mtl_jax.solvers.base.SolveOutput` with :class:`RoundRecord` history, rounds 0..K.
    """
    loss_ = get_loss(loss)
    dual = loss_.curvature is None
    m, d = sites.num_sites, sites.dim
    dtype = sites.X.dtype
    itemsize = np.dtype(dtype).itemsize
    out = centralized.solve(sites, lam1=lam1, lam2=lam2, loss=loss_.name, method="apg", tol=tol,
                            max_iter=max_rounds, W0=W0, alpha0=alpha0, eps=eps, lmax=lmax)
    W0_ = jnp.zeros((m, d), dtype) if W0 is None else jnp.asarray(W0, dtype)
    a0_ = jnp.zeros(sites.y.shape, dtype) if alpha0 is None else jnp.asarray(alpha0, dtype)
    J0, g0 = _start_certificate(sites, W0_, a0_, jnp.asarray(lam1, dtype), jnp.asarray(lam2, dtype),
                                loss=loss_.name, dual=dual)
    objectives = [float(J0)] + [r.objective for r in out.history]
    gaps = [float(g0)] + [r.gap for r in out.history]
    up, down = apg_message_numbers(loss_.name, d)
    counts = np.asarray(sites.counts, float)
    per_sample = apg_site_steps(loss_.name)
    history = _records(objectives, gaps, m=m, start_up=d, up=up, down=down, start_steps=counts,
                       steps=per_sample * counts, passes=per_sample, speed=speed, latency=latency,
                       bandwidth=bandwidth, wall=out.solve_seconds, itemsize=itemsize)
    return out._replace(history=history)


# --- proximal mini-batch SGD --------------------------------------------------------------------------------

@partial(jax.jit, static_argnames=("loss", "batch", "history_size"))
def sgd_program(sites, W0, lam1, lam2, step0, key, rounds, constant, *, loss, batch, history_size):
    """``rounds`` (traced) rounds of proximal mini-batch SGD as one ``lax.while_loop``.

    Round k (from 0): each site draws ``b_t = min(batch, n_t)`` of its samples without replacement
    (``fold_in(key, k)``; the ``b_t`` smallest of uniform keys, padding excluded) and sends
    ``G_t = X_B^T (loss'(y_B, X_B w_t)) / b_t``, an unbiased estimate of its loss gradient; the server sets
    ``W <- prox_{eta_k R}(W - eta_k G)``, ``eta_k = step0 / (1 + lam1 step0 k)`` (``constant``, a traced
    bool: ``step0``).
    Records J(W) and the gap of J with the dual point ``alpha = -c loss'(<w_t, x>)`` after every round.

    Returns ``(W, alpha, objectives (history_size,), gaps (history_size,), J0, gap0)``.
    """
    loss_ = get_loss(loss)
    reg = TraceNormSq(lam1, lam2)
    X, y, mask = sites.X, sites.y, sites.mask
    B = min(batch, sites.n_max)
    c = sample_weights(sites)
    b = jnp.minimum(jnp.asarray(batch, dtype=X.dtype), sites.counts.astype(X.dtype))  # (m,)

    def certificate(W):
        alpha = loss_.primal_to_dual(y, margins(W, sites), c) * mask
        J = empirical_loss(W, sites, loss_) + reg.value(W)
        return J, J - dual_objective(alpha, sites, reg, loss_)[0], alpha

    def body(k, carry):
        W, objs, gaps = carry
        u = jax.random.uniform(jax.random.fold_in(key, k), y.shape, X.dtype)
        u = jnp.where(mask > 0, u, jnp.inf)
        _, idx = jax.lax.top_k(-u, B)                                  # (m, B): b_t real samples first
        Xb = jnp.take_along_axis(X, idx[:, :, None], axis=1)
        yb = jnp.take_along_axis(y, idx, axis=1)
        mb = jnp.take_along_axis(mask, idx, axis=1) * (jnp.arange(B)[None, :] < b[:, None])
        a = jnp.einsum("tbd,td->tb", Xb, W)
        G = jnp.einsum("tb,tbd->td", mb * loss_.derivative(yb, a) / b[:, None], Xb)
        kf = k.astype(X.dtype)
        eta = jnp.where(constant, step0, step0 / (1.0 + lam1 * step0 * kf))
        W, _ = reg.prox(W - eta * G, eta)
        J, gap, _ = certificate(W)
        return W, objs.at[k].set(J, mode="drop"), gaps.at[k].set(gap, mode="drop")

    nan = jnp.full((history_size,), jnp.nan, X.dtype)
    J0, gap0, _ = certificate(W0)
    W, objs, gaps = jax.lax.fori_loop(0, rounds, body, (W0, nan, nan))
    _, _, alpha = certificate(W)
    return W, alpha, objs, gaps, J0, gap0


def default_step(sites: Sites, loss: str, lmax=None) -> float:
    """``1 / L``, ``L = curvature * max_t lambda_max(X_t^T X_t) / n_t`` (curvature 1 for the hinge's subgradient)."""
    loss_ = get_loss(loss)
    lmax = centralized.site_lmax(sites) if lmax is None else jnp.asarray(lmax)
    curvature = 1.0 if loss_.curvature is None else loss_.curvature
    L = curvature * float(jnp.max(lmax / jnp.maximum(sites.counts, 1)))
    return 1.0 / max(L, float(np.finfo(np.float64).tiny))


def minibatch_sgd(sites: Sites, *, lam1, lam2, loss="squared", rounds=500, batch=16, step0=None, seed=0,
                  schedule="decay", W0=None, tol=0.0, eps=DEFAULT_EPS, speed=DEFAULT_SPEED,
                  latency=DEFAULT_LATENCY, bandwidth=DEFAULT_BANDWIDTH) -> SolveOutput:
    """Proximal mini-batch SGD on J, one round per step, reported on DMTRL's axes.

    Round k: every site sends the gradient of its loss on a seeded mini-batch of ``min(batch, n_t)`` of its
    samples, ``G_t = (1/b_t) sum_{i in B_t} loss'(y_ti, <w_t, x_ti>) x_ti`` (d numbers up), the server
    takes ``W <- prox_{eta_k R}(W - eta_k G)`` with ``R = (lam1/2)||W||_F^2 + (lam2/2)||W||_*^2``
    (:meth:`mtl_jax.mtrl.TraceNormSq.prox`) and sends each site its ``w_t`` (d numbers down).

    Step sizes (``schedule="decay"``, default): ``eta_k = step0 / (1 + lam1 step0 k)``, k = 0, 1, ...:
    ``step0`` while ``k < 1 / (lam1 step0)``, then ``~1 / (lam1 k)``, the classic rate for a
    lam1-strongly-convex objective (J is; Bottou 2012's ``eta_0 / (1 + lam eta_0 t)``), which makes the
    iterates converge to min J at O(1/k) in expectation. ``step0`` defaults to ``1 / L`` (:func:`default_step`),
    the full-gradient step. ``schedule="constant"``: ``eta_k = step0`` (with ``batch >= n_t`` for every
    site this is proximal gradient descent, exactly).

    J and its duality gap (``W`` paired with the feasible ``alpha = -c loss'(<w_t, x>)``, scored by
    :func:`mtl_jax.mtrl.dual_objective` with ``TraceNormSq``) are recorded every round by a monitor
    outside the protocol (not counted in bytes). The whole run is one compiled ``lax.while_loop``.

    Args:
      sites: validated per-site data, padded layout. rounds: number of rounds. batch: samples per site and
        round. step0: first step (None: ``1 / L``). seed: the mini-batch draws. W0: (m, d) start (zeros).
      tol: ``converged`` reports ``gap <= tol * J`` at the end (SGD never stops early).
      speed, latency, bandwidth: DMTRL's cost model.
    """
    if sites.chunked:
        raise ValueError("minibatch_sgd: needs the padded layout (pack with layout='padded')")
    if schedule not in ("decay", "constant"):
        raise ValueError(f"schedule: must be 'decay' or 'constant', got {schedule!r}")
    loss_ = get_loss(loss)
    m, d = sites.num_sites, sites.dim
    dtype = sites.X.dtype
    itemsize = np.dtype(dtype).itemsize
    rounds, batch = int(rounds), int(batch)
    step0 = default_step(sites, loss_.name) if step0 is None else float(step0)
    W0 = jnp.zeros((m, d), dtype) if W0 is None else jnp.asarray(W0, dtype)
    args = (sites, W0, jnp.asarray(lam1, dtype), jnp.asarray(lam2, dtype), jnp.asarray(step0, dtype),
            jax.random.PRNGKey(seed), jnp.asarray(rounds, jnp.int32), jnp.asarray(schedule == "constant"))
    static = dict(loss=loss_.name, batch=min(batch, sites.n_max), history_size=history_capacity(rounds))
    program, c_seconds = compiled(sgd_program, args, static)
    t1 = time.perf_counter()
    W, alpha, objs, gaps, J0, gap0 = jax.block_until_ready(program(*args))
    wall = time.perf_counter() - t1
    objectives = np.concatenate([[float(J0)], np.asarray(objs)[:rounds]])
    gap_list = np.concatenate([[float(gap0)], np.asarray(gaps)[:rounds]])
    counts = np.asarray(sites.counts, float)
    b = np.minimum(batch, counts)
    history = _records(objectives, gap_list, m=m, start_up=0, up=d, down=d, start_steps=counts, steps=b,
                       passes=float(np.mean(b / counts)), speed=speed, latency=latency, bandwidth=bandwidth,
                       wall=wall, itemsize=itemsize)
    J, gap = float(objectives[-1]), float(gap_list[-1])
    return SolveOutput(np.asarray(W), numpy_tree(omega_factored(W, eps)), np.asarray(alpha), history, J, gap,
                       bool(gap <= tol * abs(J)), rounds, c_seconds, wall)


# --- DMTRL without relationships --------------------------------------------------------------------------------

def independent(sites: Sites, *, lam1, loss="squared", tol=1e-6, max_rounds=None, **options) -> SolveOutput:
    """Independent per-task models: DMTRL (joint scheme) with ``lam2 = 0``, i.e. ``m`` separate problems
    ``min_w (1/n_t) sum_i loss(y_ti, <w, x_ti>) + (lam1/2) ||w||^2`` (ridge, SVM, logistic regression), solved
    with the same rounds and messages as DMTRL. ``options``: DMTRL's (:data:`mtl_jax.solvers.dmtrl.OPTIONS`)."""
    return dmtrl.solve(sites, lam1=lam1, lam2=0.0, loss=loss, tol=tol, max_iter=max_rounds, **options)


def fixed_identity(sites: Sites, *, lam1, lam2, loss="squared", tol=1e-6, max_rounds=None, **options) -> SolveOutput:
    """DMTRL's alternating scheme with ``Omega = I / m`` held fixed: the MOCHA-style W-step, no relationships learned.

    With ``Omega = I / m``, ``Sigma = (lam1 I + lam2 Omega^{-1})^{-1} = I / (lam1 + lam2 m)``, so the W-problem
    is ``m`` separate problems with the weight ``lam1 + lam2 m``. The run stops on the W-problem's relative
    gap (DMTRL's rule for a fixed Omega); its history still carries J's gap (which does not vanish: the
    fixed-Omega optimum is not J's). ``options``: DMTRL's, except the Omega schedule.
    """
    m = sites.num_sites
    for k in ("scheme", "omega0", "omega_every", "omega_tol"):
        if k in options:
            raise ValueError(f"fixed_identity: {k} is fixed (alternating, Omega = I/m, never updated)")
    r = min(m, sites.dim)  # the rank of DMTRL's factored Omega (that of the SVD of W)
    U = np.eye(m, r)
    omega0 = SpectralMatrix(U, np.full((r,), 1.0 / m), np.asarray(1.0 / m))  # I / m, factored
    return dmtrl.solve(sites, lam1=lam1, lam2=lam2, loss=loss, tol=tol, max_iter=max_rounds, scheme="alternating",
                       omega0=omega0, omega_every=None, omega_tol=None, **options)
