"""The fast solver's iteration written in plain NumPy: a reference point for the benchmarks.

Same algorithm, same data layout (sites padded on the leading axis), same step size and the same
certificate as ``mtl_jax.solvers.apg.primal_apg`` for squared loss, so iteration counts match and
only the execution differs. Not part of the library.
"""
from __future__ import annotations

import numpy as np


def _prox_squared_l1(s, c):
    k = np.arange(1, len(s) + 1)
    S = np.cumsum(s) / (1.0 + k * c)
    nxt = np.append(s[1:], 0.0)
    first = np.argmax(nxt <= c * S)
    return np.maximum(0.0, s - c * S[first])


def _svd_map(Z, fn):
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    t = fn(s)
    return (U * t) @ Vt, t, s


def _margins(W, X):
    return np.matmul(X, W[:, :, None])[..., 0]


def _backward(coef, X):
    return np.matmul(coef[:, None, :], X)[:, 0, :]


def numpy_apg_squared(X, y, mask, counts, lam1, lam2, lipschitz, *, max_iter, tol=0.0):
    """FISTA with function-value restart on J for squared loss. X (m, n, d), y/mask (m, n), counts (m,).

    Returns (W, objectives per iteration, gaps per iteration).
    """
    c = mask / counts[:, None]
    eta = 1.0 / lipschitz

    def spectral_value(t):
        return 0.5 * lam1 * np.sum(t**2) + 0.5 * lam2 * np.sum(t) ** 2

    def certificate(W, a, reg_at_W):
        alpha = 2.0 * c * (y - a)
        dual_term = np.sum(mask * (alpha * y - alpha**2 / (4.0 * np.where(mask > 0, c, 1.0))))
        _, t, s = _svd_map(_backward(alpha, X), lambda s: _prox_squared_l1(s / lam1, lam2 / lam1))
        conj = np.sum(t * s) - spectral_value(t)
        primal = np.sum(c * (y - a) ** 2) + reg_at_W
        return primal, primal - (dual_term - conj)

    W = np.zeros(X.shape[::2])
    a = _margins(W, X)
    obj, gap = certificate(W, a, 0.0)
    Z, aZ, t_mom = W, a, 1.0
    objs, gaps = [], []
    for _ in range(max_iter):
        grad = _backward(c * 2.0 * (aZ - y), X)
        shrink = 1.0 / (1.0 + eta * lam1)
        W_new, tv, _ = _svd_map(Z - eta * grad, lambda s: _prox_squared_l1(shrink * s, eta * lam2 * shrink))
        a_new = _margins(W_new, X)
        obj_new, gap_new = certificate(W_new, a_new, spectral_value(tv))
        if obj_new > obj + 16 * np.finfo(float).eps * abs(obj):
            Z, aZ, t_mom = W, a, 1.0
        else:
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t_mom**2))
            beta = (t_mom - 1.0) / t_next
            Z, aZ = W_new + beta * (W_new - W), a_new + beta * (a_new - a)
            W, a, obj, gap, t_mom = W_new, a_new, obj_new, gap_new, t_next
        objs.append(obj)
        gaps.append(gap)
        if gap <= tol * obj:
            break
    return W, np.array(objs), np.array(gaps)
