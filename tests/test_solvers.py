"""Centralized solvers: exact W-step, agreement of independent solvers, certificates, cluster recovery."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import mtl_jax
from mtl_jax import mtrl
from mtl_jax.data.sites import to_sites
from mtl_jax.data.synthetic import cluster_recovery, make_clustered_tasks
from mtl_jax.solvers.alternating import w_step_squared


def _full_rank_problem(loss, seed=3, m=3, d=5, n=40):
    """Random task vectors: the optimum of J has full rank, so the alternation converges too."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m * n, d))
    task = np.repeat(np.arange(m), n)
    a = np.sum(X * rng.normal(size=(m, d))[task], axis=1)
    if loss == "squared":
        y = a + 0.3 * rng.normal(size=a.shape)
    else:
        y = np.sign(a + 0.5 * rng.normal(size=a.shape))
    return X, y, task


def test_w_step_squared_equals_dense_normal_equations(rng):
    m, d = 3, 4
    counts = np.array([5, 11, 8])
    task = np.repeat(np.arange(m), counts)
    X = rng.normal(size=(len(task), d))
    y = rng.normal(size=len(task))
    A = rng.normal(size=(m, m))
    Omega = A @ A.T + 0.05 * np.eye(m)
    Omega /= np.trace(Omega)
    lam1, lam2 = 0.2, 1.5
    # Stationarity: (2/n_t) X_t^T (X_t w_t - y_t) + (Sigma^{-1} W)_t = 0 with Sigma^{-1} = lam1 I + lam2 Omega^{-1}.
    Sinv = lam1 * np.eye(m) + lam2 * np.linalg.inv(Omega)
    H = np.kron(Sinv, np.eye(d))
    b = np.zeros(m * d)
    for t in range(m):
        Xt, yt = X[task == t], y[task == t]
        H[t * d:(t + 1) * d, t * d:(t + 1) * d] += 2.0 / counts[t] * Xt.T @ Xt
        b[t * d:(t + 1) * d] = 2.0 / counts[t] * Xt.T @ yt
    expected = np.linalg.solve(H, b).reshape(m, d)
    sites = to_sites(X, y, task)
    reg = mtrl.SigmaQuadratic(mtrl.as_spectral(Omega), lam1, lam2)
    np.testing.assert_allclose(w_step_squared(sites, reg, tol=1e-14), expected, atol=1e-9)


@pytest.mark.parametrize("loss", ["squared", "logistic", "hinge"])
def test_alternating_and_fast_solver_agree(loss):
    X, y, task = _full_rank_problem(loss)
    kw = dict(lam1=0.1, lam2=0.05, loss=loss, tol=1e-9)
    fast = mtl_jax.fit(X, y, task, method="apg", max_iter=50000, **kw)
    alt = mtl_jax.fit(X, y, task, method="alternating", max_iter=500, **kw)
    assert fast.converged and alt.converged
    np.testing.assert_allclose(fast.objective, alt.objective, rtol=1e-6)
    # the certificates reached zero (to the tolerance) and bound the true sub-optimality
    best = min(fast.objective, alt.objective)
    for res in (fast, alt):
        assert res.gap <= 1e-9 * res.objective
        for rec in res.history:
            assert rec.objective - best <= rec.gap * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_primal_and_dual_apg_agree(loss):
    X, y, task, _ = make_clustered_tasks(6, 4, num_clusters=2, samples_per_task=(10, 30), loss=loss, seed=2)
    kw = dict(lam1=0.1, lam2=1.0, loss=loss, tol=1e-10, max_iter=50000)
    primal = mtl_jax.fit(X, y, task, method="apg_primal", **kw)
    dual = mtl_jax.fit(X, y, task, method="apg_dual", **kw)
    assert primal.converged and dual.converged
    np.testing.assert_allclose(primal.objective, dual.objective, rtol=1e-8)
    np.testing.assert_allclose(primal.W, dual.W, atol=1e-4)


def test_fast_solver_matches_scipy_on_j():
    X, y, task = _full_rank_problem("squared", seed=5, m=2, d=3, n=15)
    lam1, lam2 = 0.2, 0.1

    def J(w):
        return mtl_jax.objective(w.reshape(2, 3), X, y, task, lam1=lam1, lam2=lam2)

    # Independent reference: generic quasi-Newton on J (smooth at a full-rank optimum).
    ref = minimize(J, np.ones(6), method="BFGS", options=dict(gtol=1e-10))
    res = mtl_jax.fit(X, y, task, lam1=lam1, lam2=lam2, tol=1e-12, max_iter=10000)
    assert np.linalg.matrix_rank(res.W) == 2
    np.testing.assert_allclose(res.objective, ref.fun, rtol=1e-9)
    np.testing.assert_allclose(res.W.ravel(), ref.x, atol=1e-5)


def test_hinge_rejects_primal_method():
    X, y, task = _full_rank_problem("hinge")
    with pytest.raises(ValueError, match="apg_primal"):
        mtl_jax.fit(X, y, task, lam1=0.1, lam2=0.1, loss="hinge", method="apg_primal")


def test_alternating_stalls_where_the_optimum_is_low_rank():
    # Many tasks, few features: W W^T is rank deficient and Omega's floored eigenvalues lock W in.
    X, y, task, _ = make_clustered_tasks(12, 3, num_clusters=3, samples_per_task=20, seed=4, noise=0.5)
    kw = dict(lam1=0.1, lam2=1.0, tol=1e-9)
    fast = mtl_jax.fit(X, y, task, method="apg", **kw)
    alt = mtl_jax.fit(X, y, task, method="alternating", max_iter=50, **kw)
    assert fast.converged
    assert alt.objective >= fast.objective - 1e-9 * fast.objective
    assert alt.gap >= alt.objective - fast.objective - 1e-12  # its certificate is honest


def test_learned_omega_recovers_planted_clusters():
    # Measure: fraction of tasks whose most-correlated other task (in Omega's correlation) shares its cluster.
    X, y, task, info = make_clustered_tasks(24, 8, num_clusters=3, samples_per_task=30, noise=0.3, seed=0)
    res = mtl_jax.fit(X, y, task, lam1=0.01, lam2=0.1, tol=1e-8)
    assert res.converged
    assert cluster_recovery(res.Omega, info["clusters"]) == 1.0
    # and a scrambled assignment scores near chance (the measure can fail)
    assert cluster_recovery(res.Omega, np.roll(info["clusters"], 1)) < 0.6


def test_warm_start_resumes_with_fewer_iterations():
    X, y, task, _ = make_clustered_tasks(8, 5, samples_per_task=25, seed=1)
    kw = dict(lam1=0.1, lam2=1.0, tol=1e-9)
    cold = mtl_jax.fit(X, y, task, **kw)
    warm = mtl_jax.fit(X, y, task, W0=cold.W, **kw)
    assert warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.objective, cold.objective, rtol=1e-9)


def test_float32_run_reaches_float32_accuracy():
    X, y, task, _ = make_clustered_tasks(8, 5, samples_per_task=25, seed=1)
    ref = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, tol=1e-10)
    res = mtl_jax.fit(X.astype(np.float32), y.astype(np.float32), task, lam1=0.1, lam2=1.0, tol=1e-4)
    assert res.W.dtype == np.float32
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-4)


def test_many_tasks_keep_omega_factored():
    X, y, task, _ = make_clustered_tasks(300, 4, samples_per_task=5, seed=2)
    res = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, tol=1e-6)
    assert res.converged
    assert res.omega.U.shape == (300, 4)  # O(m d), never (m, m) on the fast path
    np.testing.assert_allclose(float(jnp.asarray(res.omega.trace())), 1.0, rtol=1e-10)


@pytest.mark.parametrize("shape", [(50, 8, 20), (40, 30, 6), (7, 1, 3)])
def test_lmax_bound_is_an_upper_bound_and_tight(shape):
    # lambda_max <= (tr K^q)^(1/q) <= rank^(1/q) lambda_max, per site, also for all-zero sites.
    from mtl_jax.solvers.apg import gram_lmax_bound
    rng = np.random.default_rng(3)
    X = rng.normal(size=shape) * rng.uniform(0.1, 10.0, size=(shape[0], 1, 1))
    X[0] = 0.0
    exact = np.linalg.eigvalsh(np.einsum("tnd,tne->tde", X, X))[:, -1]
    bound = np.asarray(gram_lmax_bound(jnp.asarray(X)))
    rank = min(shape[1], shape[2])
    assert bound[0] == 0.0
    assert np.all(bound >= exact * (1 - 1e-12))
    assert np.all(bound <= exact * rank ** (1 / 64) * (1 + 1e-12))


def test_lmax_reuse_follows_the_data():
    # fit reuses the step size's lmax for the same data and recomputes it when X changes in place.
    from mtl_jax.solvers import centralized
    X, y, task, _ = make_clustered_tasks(6, 4, samples_per_task=(5, 9), seed=2)
    first = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    again = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    np.testing.assert_array_equal(again.W, first.W)
    X *= 10.0  # same array object, new content: a stale lmax would be 100x too small
    scaled = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    centralized._LMAX_CACHE.clear()
    fresh = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    np.testing.assert_array_equal(scaled.W, fresh.W)
    assert scaled.converged


def test_lipschitz_constants_are_floored_and_finite():
    """All-zero features give lambda_max = 0; the step 1 / L must stay finite (inf * 0 is NaN)."""
    from mtl_jax.solvers.apg import dual_lipschitz, lipschitz_floor, primal_lipschitz

    lmax, counts = jnp.zeros(3), jnp.array([2, 3, 4])
    reg = mtrl.TraceNormSq(jnp.asarray(0.1), jnp.asarray(1.0))
    floor = lipschitz_floor(jnp.float64)
    assert 0 < floor and np.isfinite(1 / floor)
    assert float(primal_lipschitz("squared", lmax, counts)) == floor
    np.testing.assert_allclose(float(primal_lipschitz("squared", lmax, counts, reg)), np.finfo(float).eps * 0.1)
    assert float(dual_lipschitz(reg, lmax)) == floor
    # no floor where the data sets the constant: 2 * max(lmax / n)
    assert float(primal_lipschitz("squared", jnp.array([4.0, 3.0, 8.0]), counts, reg)) == 4.0


@pytest.mark.parametrize("scale", [1e-160, 1e150])
def test_w_step_squared_at_extreme_feature_scales(scale):
    """The CG of the squared W-step solves for a power-of-two-scaled right-hand side: at features of 1e150
    its products A p overflowed (NaN), at 1e-160 its inner products underflowed. Reference: the normal
    equations (B + Sigma^{-1}) W = b at Omega = I / m, solved in NumPy on the unscaled data."""
    rng = np.random.default_rng(1)
    X, y, task = rng.normal(size=(30, 3)), rng.normal(size=30), np.repeat(np.arange(3), 10)
    lam1, lam2, m = 0.1, 1.0, 3
    sites = to_sites(X * scale, y, task)
    omega = mtrl.as_spectral(np.eye(m) / m)
    W = np.asarray(w_step_squared(sites, mtrl.SigmaQuadratic(omega, lam1, lam2), tol=1e-14))
    # Sigma^{-1} = (lam1 + lam2 m) I; per task: (2/n X^T X s^2 + (lam1 + lam2 m) I) w = 2/n s X^T y
    ref = np.stack([np.linalg.solve(2 / 10 * X[task == t].T @ X[task == t] * scale**2 + (lam1 + lam2 * m) * np.eye(3),
                                    2 / 10 * scale * X[task == t].T @ y[task == t]) for t in range(m)])
    assert np.all(np.isfinite(W))
    np.testing.assert_allclose(W, ref, rtol=1e-8)
