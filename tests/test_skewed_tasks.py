"""Long-tailed task sizes: the chunked Sites layout gives the same fits as the padded one.

The skewed case of the reliability issue: 1000 tasks, task 0 with 20,000 rows and the others one
row each, d = 5 (X is 0.84 MB; padded to the largest task it would be 0.8 GB). References: the padded
layout on a smaller skewed problem (same iterates to round-off), and an independent NumPy
certificate of J (primal J(W) and the Fenchel dual D(alpha) from the flat arrays, with alpha in the
input order).
"""
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax
from mtl_jax.data import sites as sites_module
from mtl_jax.data.sites import from_sites, to_sites
from mtl_jax.solvers import centralized

LAM1, LAM2 = 0.1, 1.0


def skewed_problem(m=1000, big=20_000, d=5, loss="squared", seed=0):
    """Task 0 with ``big`` rows, tasks 1..m-1 with one row each, rows shuffled."""
    rng = np.random.default_rng(seed)
    task = rng.permutation(np.repeat(np.arange(m), [big] + [1] * (m - 1)))
    X = rng.normal(size=(task.size, d))
    a = np.sum(X * rng.normal(size=(m, d))[task], axis=1)
    y = a + 0.1 * rng.normal(size=a.shape) if loss == "squared" else np.where(a + 0.3 * rng.normal(size=a.shape) >= 0, 1.0, -1.0)
    return X, y, task


@pytest.fixture(scope="module")
def skewed():
    return skewed_problem()


# --- an independent NumPy certificate of J --------------------------------------------------------

def _prox_sq_trace(Z, c):
    """argmin_W (1/2)||W - Z||^2 + (c/2)||W||_*^2 by an SVD (docs/mathematics.md, section 3)."""
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    x = np.zeros_like(s)
    for k in range(1, len(s) + 1):
        S = s[:k].sum() / (1 + k * c)
        if k == len(s) or s[k] <= c * S:
            x = np.maximum(0.0, s - c * S)
            break
    return (U * x) @ Vt


def _reg(W):
    return 0.5 * LAM1 * np.sum(W * W) + 0.5 * LAM2 * np.linalg.svd(W, compute_uv=False).sum() ** 2


def numpy_certificate(W, alpha, X, y, task, loss):
    """(J(W), D(alpha)) from the flat arrays; ``alpha`` (N,) in the input order."""
    n = np.bincount(task)
    c = 1.0 / n[task]
    a = np.sum(X * W[task], axis=1)
    if loss == "squared":
        primal = np.sum(c * (y - a) ** 2)
        dual_term = np.sum(alpha * y - alpha ** 2 / (4 * c))
    else:  # hinge; alpha must lie in its box
        assert np.all(y * alpha >= -1e-15) and np.all(y * alpha <= c * (1 + 1e-12))
        primal = np.sum(c * np.maximum(0.0, 1 - y * a))
        dual_term = np.sum(alpha * y)
    V = np.zeros_like(W)
    np.add.at(V, task, alpha[:, None] * X)
    Wd = _prox_sq_trace(V / LAM1, LAM2 / LAM1)  # grad R*(V)
    return primal + _reg(W), dual_term - (np.sum(Wd * V) - _reg(Wd))


# --- the full skewed case -------------------------------------------------------------------------

def test_skewed_case_is_chunked_and_round_trips(skewed):
    X, y, task = skewed
    s = to_sites(X, y, task)
    assert s.chunked and s.num_sites == 1000
    assert s.X.size <= 2 * X.size                       # not 1000 x 20,000 rows
    Xr, yr, tr = from_sites(s)
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, y)
    np.testing.assert_array_equal(tr, task)


def test_skewed_squared_fit_is_certified_by_numpy(skewed):
    X, y, task = skewed
    res = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, tol=1e-10)
    assert res.converged and res.W.shape == (1000, 5) and res.alpha.shape == y.shape
    J = mtl_jax.objective(res.W, X, y, task, lam1=LAM1, lam2=LAM2)
    np.testing.assert_allclose(res.objective, J, rtol=1e-10)
    J_np, D_np = numpy_certificate(res.W, res.alpha, X, y, task, "squared")
    np.testing.assert_allclose(J_np, J, rtol=1e-10)
    np.testing.assert_allclose(J_np - D_np, res.gap, rtol=1e-6, atol=1e-10 * J)
    assert 0 <= J_np - D_np <= 1e-10 * J * (1 + 1e-6) + 1e-12
    # the duals come back in the input order: alpha_i = 2 c_t (y_i - <w_t, x_i>) at the certified W
    c = 1.0 / np.bincount(task)[task]
    np.testing.assert_allclose(res.alpha, 2 * c * (y - np.sum(X * res.W[task], axis=1)), rtol=1e-9, atol=1e-14)


def test_skewed_hinge_fit_is_certified_by_numpy(skewed):
    X, y, task = skewed
    y = np.where(y >= 0, 1.0, -1.0)
    res = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, loss="hinge", max_iter=300)
    J = mtl_jax.objective(res.W, X, y, task, lam1=LAM1, lam2=LAM2, loss="hinge")
    np.testing.assert_allclose(res.objective, J, rtol=1e-10)
    J_np, D_np = numpy_certificate(res.W, res.alpha, X, y, task, "hinge")
    np.testing.assert_allclose(J_np, J, rtol=1e-10)
    np.testing.assert_allclose(J_np - D_np, res.gap, rtol=1e-8)
    # a warm start from these duals (input order in, input order out) continues from them
    more = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, loss="hinge", max_iter=300, alpha0=res.alpha)
    J_more, D_more = numpy_certificate(more.W, more.alpha, X, y, task, "hinge")
    np.testing.assert_allclose(J_more - D_more, more.gap, rtol=1e-8)
    assert D_more >= D_np - 1e-12 * abs(D_np)


# --- padded against chunked on a smaller skewed problem: the same iterates -------------------------

@pytest.mark.parametrize("loss,method", [("squared", "apg"), ("hinge", "apg"), ("squared", "apg_dual"),
                                         ("squared", "alternating")])
def test_chunked_and_padded_layouts_give_the_same_iterates(loss, method):
    X, y, task = skewed_problem(m=60, big=600, d=4, loss=loss, seed=1)
    padded = to_sites(X, y, task, layout="padded")
    chunked = to_sites(X, y, task, layout="chunked")
    assert chunked.chunked and not padded.chunked
    lmax = np.asarray(centralized.site_lmax(padded))
    lmax_chunked = np.asarray(centralized.site_lmax(chunked))
    exact = np.array([np.linalg.eigvalsh(X[task == t].T @ X[task == t])[-1] for t in range(60)])
    assert np.all(lmax_chunked >= exact * (1 - 1e-12)) and np.all(lmax >= exact * (1 - 1e-12))
    kw = dict(lam1=LAM1, lam2=LAM2, loss=loss, method=method, tol=0.0, lmax=lmax,
              max_iter=5 if method == "alternating" else 60)
    a = centralized.solve(padded, **kw)
    b = centralized.solve(chunked, **kw)
    assert a.iterations == b.iterations
    np.testing.assert_allclose(b.W, a.W, rtol=1e-10, atol=1e-12 * np.abs(a.W).max())
    np.testing.assert_allclose(b.objective, a.objective, rtol=1e-10)
    np.testing.assert_allclose(b.gap, a.gap, rtol=1e-8, atol=1e-12 * a.objective)
    def input_order(s, alpha):
        index = np.asarray(s.index)
        flat = np.zeros(len(y))
        flat[index[index >= 0]] = alpha[index >= 0]
        return flat

    ref = input_order(padded, a.alpha)  # the same duals, once mapped to the input order
    np.testing.assert_allclose(input_order(chunked, b.alpha), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("loss", ["squared", "hinge"])
def test_converged_fits_agree_across_layouts(loss, monkeypatch):
    monkeypatch.setattr(sites_module, "PADDED_SMALL_BYTES", 0)  # fit chunks this small problem too
    X, y, task = skewed_problem(m=60, big=600, d=4, loss=loss, seed=2)
    assert to_sites(X, y, task).chunked
    res = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, loss=loss, tol=1e-9, max_iter=100_000)
    ref = centralized.solve(to_sites(X, y, task, layout="padded"), lam1=LAM1, lam2=LAM2, loss=loss, tol=1e-9,
                            max_iter=100_000)
    assert res.converged and ref.converged
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-8)
    J_np, D_np = numpy_certificate(res.W, res.alpha, X, y, task, loss)
    assert J_np - D_np <= 1e-9 * J_np * (1 + 1e-6)
    J = mtl_jax.objective(jnp.asarray(res.W), X, y, task, lam1=LAM1, lam2=LAM2, loss=loss)
    np.testing.assert_allclose(J, res.objective, rtol=1e-12)
