"""Per-sample losses of the MTRL objective, their convex conjugates and the dual coordinate step.

docs/mathematics.md, sections 1 and 4. For a sample with target ``y``, margin ``a = <w_t, x>`` and task weight
``c = 1 / n_t`` the primal term is ``c * loss(y, a)``; the Fenchel dual term of its dual variable
``alpha`` is ``-c * loss*(-alpha / c; y)``:

=========  ===================  ====================================================  ==========================
loss       ``loss(y, a)``       ``-c loss*(-alpha/c)``                                dual domain
=========  ===================  ====================================================  ==========================
squared    ``(y - a)^2``        ``alpha y - alpha^2 / (4 c)``                         all reals
hinge      ``max(0, 1 - y a)``  ``alpha y``                                           ``0 <= y alpha <= c``
logistic   ``log(1+e^{-y a})``  ``-c [s log s + (1-s) log(1-s)]``, ``s = y alpha/c``  ``0 <= s <= 1``
=========  ===================  ====================================================  ==========================

Squared loss has no 1/2, as in MTRL (Zhang and Yeung, UAI 2010). Hinge and logistic need labels in
{-1, +1}. The dual coordinate step is the one-variable problem that SDCA (Shalev-Shwartz and Zhang,
JMLR 2013) solves at every sample, in the form of the DMTRL local subproblem (Liu, Pan, Ho, KDD 2017):

    maximise over d:  dual_term(alpha + d) - a d - (Q / 2) d^2 ,     Q = q_t ||x||^2 >= 0 ,

closed form for squared and hinge, safeguarded Newton (rtsafe) for logistic. With ``a = 0, Q = 1/eta`` the
same step is the proximal operator of the dual term, which the dual accelerated solver uses.

All functions are elementwise and broadcast, pure and jit-able; padded slots (``c`` anything,
``y = 0``) are the caller's to mask.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax import names

LOSSES = names.LOSSES

_NEWTON_STEPS = 40  # rtsafe steps of the logistic coordinate step: Newton's rate, bisection's guarantee


class Loss(NamedTuple):
    """A loss as a bundle of pure elementwise functions (chosen by name at trace time, never traced).

    Attributes:
      name: "squared", "hinge" or "logistic".
      value: ``(y, a) -> loss(y, a)``.
      derivative: ``(y, a) -> d loss / d a`` (for hinge a subgradient, ``-y`` where ``y a < 1``).
      curvature: an upper bound on ``d^2 loss / d a^2`` (``None`` for the non-smooth hinge).
      dual_term: ``(alpha, y, c) -> -c loss*(-alpha / c; y)`` at a feasible ``alpha``.
      dual_step: ``(alpha, y, c, a, Q) -> alpha_new``, the maximiser of the coordinate problem above.
      primal_to_dual: ``(y, a, c) -> alpha = -c loss'(y, a)``, the dual point matched to a margin
        (optimal pairing at the optimum; for hinge the subgradient choice ``c y 1[y a < 1]``).
      needs_pm1_labels: labels must be in {-1, +1}.
      linear_derivative: ``derivative`` is affine in ``a`` (squared loss), so gradients at an
        extrapolated point are the same combination of known gradients.
    """

    name: str
    value: Callable
    derivative: Callable
    curvature: float | None
    dual_term: Callable
    dual_step: Callable
    primal_to_dual: Callable
    needs_pm1_labels: bool
    linear_derivative: bool = False


# --- squared: (y - a)^2 ---------------------------------------------------------------------------

def _squared_value(y, a):
    return (y - a) ** 2


def _squared_derivative(y, a):
    return 2.0 * (a - y)


def _squared_dual_term(alpha, y, c):
    return alpha * y - alpha**2 / (4.0 * c)


def _squared_dual_step(alpha, y, c, a, Q):
    # Stationarity of (alpha+d) y - (alpha+d)^2/(4c) - a d - Q d^2/2: a linear equation in d.
    delta = (y - a - alpha / (2.0 * c)) / (1.0 / (2.0 * c) + Q)
    return alpha + delta


def _squared_primal_to_dual(y, a, c):
    return 2.0 * c * (y - a)


# --- hinge: max(0, 1 - y a) -----------------------------------------------------------------------

def _hinge_value(y, a):
    return jnp.maximum(0.0, 1.0 - y * a)


def _hinge_derivative(y, a):
    return jnp.where(y * a < 1.0, -y, 0.0)


def _hinge_dual_term(alpha, y, c):
    return alpha * y


def _hinge_dual_step(alpha, y, c, a, Q):
    # Linear objective plus -Q d^2/2 over the box 0 <= y(alpha+d) <= c: the unconstrained maximiser
    # y(1 - y a)/Q, clipped. Q = 0 (a zero feature vector) pushes to the box end that the slope picks.
    q_safe = jnp.maximum(Q, jnp.finfo(jnp.result_type(Q, float)).tiny)
    s = jnp.clip(y * alpha + (1.0 - y * a) / q_safe, 0.0, c)
    return y * s


def _hinge_primal_to_dual(y, a, c):
    return jnp.where(y * a < 1.0, c * y, 0.0)


# --- logistic: log(1 + exp(-y a)) -----------------------------------------------------------------

def _logistic_value(y, a):
    return jnp.logaddexp(0.0, -y * a)


def _logistic_derivative(y, a):
    return -y * jax.nn.sigmoid(-y * a)


def _binary_entropy(s):
    s = jnp.clip(s, 0.0, 1.0)
    return -(jax.scipy.special.xlogy(s, s) + jax.scipy.special.xlogy(1.0 - s, 1.0 - s))


def _logistic_dual_term(alpha, y, c):
    return c * _binary_entropy(y * alpha / c)


def _logistic_dual_step(alpha, y, c, a, Q):
    # With s = y(alpha+d)/c = sigmoid(z), the stationarity condition reads
    #     phi(z) = z + K sigmoid(z) - B = 0,   K = Q c >= 0,   B = y (Q alpha - a),
    # phi is increasing with phi' in [1, 1 + K/4], and sigmoid in (0, 1) brackets the root in
    # [B - K, B]. Newton alone can 2-cycle for large K, so this is rtsafe (Numerical Recipes 9.4):
    # bisect whenever Newton leaves the closed bracket or fails to halve the previous step.
    K = Q * c
    B = y * (Q * alpha - a)
    lo, hi = B - K, B
    z = jnp.clip(B - K * jax.nn.sigmoid(B), lo, hi)
    eps = jnp.finfo(jnp.result_type(z)).eps

    def body(_, carry):
        z, lo, hi, dx_old = carry
        sg = jax.nn.sigmoid(z)
        phi = z + K * sg - B
        dphi = 1.0 + K * sg * (1.0 - sg)
        lo = jnp.where(phi < 0, z, lo)
        hi = jnp.where(phi > 0, z, hi)
        newton = z - phi / dphi
        converged = jnp.abs(phi / dphi) <= 4 * eps * (1.0 + jnp.abs(z))
        fast = 2.0 * jnp.abs(phi) <= jnp.abs(dx_old * dphi)
        ok = (newton >= lo) & (newton <= hi) & (fast | converged)
        z_new = jnp.where(phi == 0, z, jnp.where(ok, newton, 0.5 * (lo + hi)))
        return z_new, lo, hi, jnp.abs(z_new - z)

    z, _, _, _ = jax.lax.fori_loop(0, _NEWTON_STEPS, body, (z, lo, hi, hi - lo))
    return c * y * jax.nn.sigmoid(z)


def _logistic_primal_to_dual(y, a, c):
    return c * y * jax.nn.sigmoid(-y * a)


_REGISTRY = {
    "squared": Loss("squared", _squared_value, _squared_derivative, 2.0, _squared_dual_term,
                    _squared_dual_step, _squared_primal_to_dual, False, True),
    "hinge": Loss("hinge", _hinge_value, _hinge_derivative, None, _hinge_dual_term,
                  _hinge_dual_step, _hinge_primal_to_dual, True),
    "logistic": Loss("logistic", _logistic_value, _logistic_derivative, 0.25, _logistic_dual_term,
                     _logistic_dual_step, _logistic_primal_to_dual, True),
}


assert tuple(_REGISTRY) == LOSSES, "mtl_jax.names.LOSSES and the loss registry disagree"


def get_loss(name: str | Loss) -> Loss:
    """The :class:`Loss` called ``name`` (one of :data:`LOSSES`); a :class:`Loss` passes through."""
    if isinstance(name, Loss):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"loss: must be one of {LOSSES}, got {name!r}")
    return _REGISTRY[name]


def dual_prox(loss: Loss, beta, y, c, step):
    """``argmax_alpha dual_term(alpha) - ||alpha - beta||^2 / (2 step)``: the dual step with a=0, Q=1/step."""
    return loss.dual_step(beta, y, c, jnp.zeros_like(beta), 1.0 / step)
