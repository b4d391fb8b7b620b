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
    """Z mapped through fn of its singular values, via eigh of the small Gram matrix (as the library)."""
    m, d = Z.shape
    lam, Q = np.linalg.eigh(Z.T @ Z if m >= d else Z @ Z.T)
    s, Q = np.sqrt(np.maximum(lam[::-1], 0.0)), Q[:, ::-1]
    t = fn(s)
    tiny = np.finfo(float).eps * max(s[0], np.finfo(float).tiny) * max(m, d)
    ratio = np.where(s > tiny, t / np.where(s > tiny, s, 1.0), 0.0)
    M = (Q * ratio) @ Q.T
    return (Z @ M if m >= d else M @ Z), t, s


def _margins(W, X):
    return np.einsum("tnd,td->tn", X, W)


def _backward(coef, X):
    return np.einsum("tn,tnd->td", coef, X)


def numpy_apg_squared(X, y, mask, counts, lam1, lam2, lipschitz, *, max_iter, tol=0.0):
    """FISTA with function-value restart on J for squared loss. X (m, n, d), y/mask (m, n), counts (m,).

    Returns (W, objectives per iteration, gaps per iteration).
    """
    c = mask / counts[:, None]
    eta = 1.0 / lipschitz

    def spectral_value(t):
        return 0.5 * lam1 * np.sum(t**2) + 0.5 * lam2 * np.sum(t) ** 2

    def certificate(W, a, grad, reg_at_W):
        alpha = 2.0 * c * (y - a)
        dual_term = np.sum(mask * (alpha * y - alpha**2 / (4.0 * np.where(mask > 0, c, 1.0))))
        _, t, s = _svd_map(-grad, lambda s: _prox_squared_l1(s / lam1, lam2 / lam1))
        conj = np.sum(t * s) - spectral_value(t)
        primal = np.sum(c * (y - a) ** 2) + reg_at_W
        return primal, primal - (dual_term - conj)

    def gradient(a):
        return _backward(2.0 * c * (a - y), X)

    W = np.zeros(X.shape[::2])
    a = _margins(W, X)
    g = gradient(a)
    obj, gap = np.inf, np.inf
    Z, gZ, t_mom = W, g, 1.0
    objs, gaps = [], []
    shrink = 1.0 / (1.0 + eta * lam1)
    for _ in range(max_iter):
        W_new, tv, _ = _svd_map(Z - eta * gZ, lambda s: _prox_squared_l1(shrink * s, eta * lam2 * shrink))
        a_new = _margins(W_new, X)
        g_new = gradient(a_new)
        obj_new, gap_new = certificate(W_new, a_new, g_new, spectral_value(tv))
        if obj_new > obj + 16 * np.finfo(float).eps * abs(obj):
            Z, gZ, t_mom = W, g, 1.0
        else:
            t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t_mom**2))
            beta = (t_mom - 1.0) / t_next
            Z, gZ = W_new + beta * (W_new - W), g_new + beta * (g_new - g)  # z's margins are never needed
            W, a, g, obj, gap, t_mom = W_new, a_new, g_new, obj_new, gap_new, t_next
        objs.append(obj)
        gaps.append(gap)
        if gap <= tol * obj:
            break
    return W, np.array(objs), np.array(gaps)
