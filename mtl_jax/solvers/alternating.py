"""The classic MTRL alternation: a W-step at fixed Omega, then the closed-form Omega-step.

Zhang and Yeung (UAI 2010); DMTRL (Liu, Pan, Ho, KDD 2017) distributes its W-step. Each alternation

1. W-step: ``min_W loss(W) + (1/2) tr(W^T Sigma^{-1} W)``, ``Sigma = Omega (lam1 Omega + lam2 I)^{-1}``:
   * squared loss: the normal equations ``(B + Sigma^{-1}) W = b``, ``B_t = 2 c_t X_t^T X_t``, solved
     by conjugate gradients in the variable ``Z = Sigma^{-1/2} W``, where the system
     ``I + Sigma^{1/2} B Sigma^{1/2}`` has eigenvalues in ``[1, 1 + ||B|| / lam1]`` however small the
     eigenvalues of Omega get (in ``W`` they reach ``lam2 / floor``);
   * logistic: primal APG; hinge: dual APG (:mod:`mtl_jax.solvers.apg`) with the Sigma-quadratic
     regulariser, warm-started, to a relative duality gap of ``inner_tol``;
2. Omega-step: ``Omega = (W W^T)^{1/2} / tr(.)`` with a relative eigenvalue floor, kept factored.

Every alternation is certified on J (not on P): the W-step's dual point ``alpha`` is also feasible
for J's dual, so ``J(W) - D_J(alpha) >= J(W) - J*``. The alternation is monotone in P but, once an
eigenvalue of Omega collapses to the floor, ``Omega^{-1}`` keeps W out of that direction: measured on
``Exam`` it stalls about 1.2 % above min J (docs/mathematics.md, section 3; benchmarks/README.md). Use it as a reference, not to reach the optimum.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import cg

from mtl_jax.losses import get_loss
from mtl_jax.mtrl import (
    SigmaQuadratic,
    TraceNormSq,
    dual_objective,
    empirical_loss,
    omega_factored,
    scale_exponent,
)
from mtl_jax.data.sites import feature_sums, margins, sample_weights
from mtl_jax.solvers.apg import dual_apg, dual_lipschitz, primal_apg, primal_lipschitz


def w_step_squared(sites, reg: SigmaQuadratic, *, tol=1e-12, max_iter=1000):
    """Exact W-step for squared loss at fixed Omega, by preconditioned-variable CG. Returns W (m, d)."""
    X = sites  # either layout: the contractions take the Sites
    c = sample_weights(sites)
    root = reg.sigma.map(jnp.sqrt)
    rhs = root.apply(feature_sums(2.0 * c * sites.y, X))

    def matvec(Z):
        W = root.apply(Z)
        return Z + root.apply(feature_sums(2.0 * c * margins(W, X), X))

    # CG is linear in the right-hand side and its tolerance relative: solve for rhs 2^-e (exact) and
    # scale back, so that the products A p stay representable for features of 1e150 (A ~ 1e300,
    # rhs ~ 1e150 overflowed to NaN) and the inner products do not underflow for features of 1e-160.
    e = scale_exponent(rhs)
    Z, _ = cg(matvec, jnp.ldexp(rhs, -e), tol=tol, maxiter=max_iter)
    return root.apply(jnp.ldexp(Z, e))


@partial(jax.jit, static_argnames=("loss",))
def alternation(W, alpha, sites, lam1, lam2, lmax, inner_tol, inner_max_iter, eps, *, loss):
    """One alternation from ``W`` (m, d) and the dual point ``alpha`` (m, n_max) of the last W-step.

    ``lmax`` (m,) holds ``lambda_max(X_t^T X_t)`` (an upper bound, ``gram_lmax_bound``), which sets the APG step sizes.
    ``inner_tol``, ``inner_max_iter`` (the W-step's accuracy and cap) and ``eps`` (the Omega-step's
    relative floor) are traced: changing them does not compile again.
    Returns ``(W, alpha, J(W), gap_J, omega)`` with ``omega`` the Omega used by this W-step.
    """
    loss_ = get_loss(loss)
    omega = omega_factored(W, eps)
    reg = SigmaQuadratic(omega, lam1, lam2)
    c = sample_weights(sites)
    if loss_.name == "squared":
        W = w_step_squared(sites, reg, tol=inner_tol, max_iter=inner_max_iter)
        alpha = loss_.primal_to_dual(sites.y, margins(W, sites), c) * sites.mask
    elif loss_.curvature is not None:
        lipschitz = primal_lipschitz(loss_, lmax, sites.counts)
        res = primal_apg(sites, loss_, reg, W, lipschitz=lipschitz, tol=inner_tol, max_iter=inner_max_iter,
                         history_size=1)
        W, alpha = res.state.W, res.state.alpha
    else:
        lipschitz = dual_lipschitz(reg, lmax, sites)
        res = dual_apg(sites, loss_, reg, alpha, lipschitz=lipschitz, tol=inner_tol, max_iter=inner_max_iter,
                       history_size=1)
        W, alpha = res.state.W, res.state.alpha
    trace = TraceNormSq(lam1, lam2)
    J = empirical_loss(W, sites, loss_) + trace.value(W)
    dual_J, _, _ = dual_objective(alpha, sites, trace, loss_)
    return W, alpha, J, J - dual_J, omega
