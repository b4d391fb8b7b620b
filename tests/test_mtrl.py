"""mtl_jax.mtrl against NumPy/SciPy references: Omega-step, Sigma, the regularisers, J and P."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.optimize import minimize

from mtl_jax import mtrl
from mtl_jax.data.sites import to_sites


def _np_sqrt_psd(M):
    lam, U = np.linalg.eigh(M)
    return (U * np.sqrt(np.clip(lam, 0, None))) @ U.T


def _random_omega(rng, m):
    A = rng.normal(size=(m, m))
    O = A @ A.T + 0.1 * np.eye(m)
    return O / np.trace(O)


def test_omega_update_matches_closed_form(rng):
    W = rng.normal(size=(5, 8))  # full row rank: the floor never binds
    expected = scipy.linalg.sqrtm(W @ W.T).real
    expected /= np.trace(expected)
    np.testing.assert_allclose(mtrl.omega_update(W), expected, atol=1e-10)


def test_omega_factored_equals_dense_for_rank_deficient_w(rng):
    W = rng.normal(size=(9, 3))  # m > d: six eigenvalues of W W^T are zero and get floored
    dense = np.asarray(mtrl.omega_update(W, eps=1e-3))
    factored = mtrl.omega_factored(W, eps=1e-3)
    assert factored.U.shape == (9, 3)
    np.testing.assert_allclose(np.asarray(factored.dense()), dense, atol=1e-12)
    np.testing.assert_allclose(np.trace(dense), 1.0, atol=1e-12)


def test_omega_floor_is_relative_to_mean_root(rng):
    W = rng.normal(size=(6, 2))
    eps = 1e-2
    roots = np.linalg.svd(W, compute_uv=False)
    floor = eps * roots.sum() / 6
    expected_eigs = np.sort(np.concatenate([roots, [floor] * 4]))
    expected_eigs /= expected_eigs.sum()
    got = np.linalg.eigvalsh(np.asarray(mtrl.omega_update(W, eps=eps)))
    np.testing.assert_allclose(got, expected_eigs, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3), (7, 2), (3, 5)])
def test_omega_at_zero_w_is_uniform(shape):
    W = np.zeros(shape)
    np.testing.assert_allclose(mtrl.omega_update(W), np.eye(shape[0]) / shape[0])
    np.testing.assert_allclose(mtrl.omega_factored(W).dense(), np.eye(shape[0]) / shape[0])


def test_omega_rank_one_w_has_no_nan_and_is_psd(rng):
    u = rng.normal(size=(6, 1))
    W = u @ rng.normal(size=(1, 4))
    O = np.asarray(jax.jit(mtrl.omega_update)(W))
    assert np.all(np.isfinite(O))
    assert np.linalg.eigvalsh(O).min() > 0
    # the dominant direction is u
    top = np.linalg.eigh(O)[1][:, -1]
    np.testing.assert_allclose(abs(top @ u[:, 0]) / np.linalg.norm(u), 1.0, atol=1e-8)


def test_sigma_matches_numpy_inverse_formula(rng):
    O = _random_omega(rng, 5)
    lam1, lam2 = 0.3, 1.7
    expected = np.linalg.inv(lam1 * np.eye(5) + lam2 * np.linalg.inv(O))
    np.testing.assert_allclose(mtrl.sigma(O, lam1, lam2), expected, atol=1e-12)


def test_sigma_defined_for_singular_omega(rng):
    v = rng.normal(size=(4, 2))
    O = v @ v.T
    O /= np.trace(O)
    lam1, lam2 = 0.5, 2.0
    expected = O @ np.linalg.inv(lam1 * O + lam2 * np.eye(4))
    got = np.asarray(mtrl.sigma(O, lam1, lam2))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_spectral_matrix_apply_equals_dense(rng):
    W = rng.normal(size=(8, 3))
    S = mtrl.omega_factored(W, eps=0.1)
    Z = rng.normal(size=(8, 5))
    np.testing.assert_allclose(S.apply(Z), np.asarray(S.dense()) @ Z, atol=1e-12)
    np.testing.assert_allclose(S.trace(), 1.0, atol=1e-12)


def test_prox_squared_l1_matches_bounded_minimiser(rng):
    for c in (0.05, 0.7, 5.0):
        s = np.sort(rng.uniform(0, 3, size=7))[::-1]
        got = np.asarray(mtrl.prox_squared_l1(jnp.asarray(s), c))
        f = lambda x: 0.5 * np.sum((x - s) ** 2) + 0.5 * c * np.sum(x) ** 2
        ref = minimize(f, s, jac=lambda x: x - s + c * np.sum(x), bounds=[(0, None)] * 7,
                       method="L-BFGS-B", options=dict(ftol=1e-15, gtol=1e-12))
        np.testing.assert_allclose(got, ref.x, atol=1e-6)
        assert f(got) <= ref.fun + 1e-12


def test_prox_trace_norm_sq_is_optimal(rng):
    Z = rng.normal(size=(6, 4))
    c = 0.4
    W = np.asarray(mtrl.prox_trace_norm_sq(Z, c))

    def f(w):
        w = w.reshape(6, 4)
        return 0.5 * np.sum((w - Z) ** 2) + 0.5 * c * np.sum(np.linalg.svd(w, compute_uv=False)) ** 2

    base = f(W.ravel())
    worse = [f(W.ravel() + 1e-3 * rng.normal(size=24)) - base for _ in range(300)]
    assert min(worse) > 0
    # singular vectors are kept: W = U diag(x) V^T with x the vector prox of Z's singular values
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    x = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose((U * x) @ Vt, W, atol=1e-10)


def test_trace_norm_conjugate_fenchel_young(rng):
    reg = mtrl.TraceNormSq(0.3, 1.1)
    V = rng.normal(size=(5, 3))
    W_star, conj, reg_at = reg.conjugate(V)

    def R(w):
        return 0.15 * np.sum(w**2) + 0.55 * np.sum(np.linalg.svd(w, compute_uv=False)) ** 2

    np.testing.assert_allclose(reg_at, R(np.asarray(W_star)), rtol=1e-12)
    np.testing.assert_allclose(conj, np.sum(W_star * V) - R(np.asarray(W_star)), rtol=1e-12)
    for _ in range(50):  # R*(V) >= <W, V> - R(W) for every W
        W = rng.normal(size=(5, 3))
        assert conj >= np.sum(W * V) - R(W) - 1e-12
    # independent value: von Neumann reduces R* to a vector problem over singular values
    sv = np.linalg.svd(V, compute_uv=False)
    g = lambda x: -(x @ sv - 0.15 * x @ x - 0.55 * np.sum(x) ** 2)
    ref = minimize(g, sv, bounds=[(0, None)] * 3, method="L-BFGS-B", options=dict(ftol=1e-15, gtol=1e-12))
    np.testing.assert_allclose(conj, -ref.fun, rtol=1e-8)


def test_trace_norm_prox_matches_definition(rng):
    reg = mtrl.TraceNormSq(0.2, 0.9)
    Z = rng.normal(size=(4, 6))
    step = 0.7
    W, val = reg.prox(Z, step)
    W = np.asarray(W)

    def f(w):
        w = w.reshape(4, 6)
        return 0.5 * np.sum((w - Z) ** 2) + step * (0.1 * np.sum(w**2) + 0.45 * np.sum(np.linalg.svd(w, compute_uv=False)) ** 2)

    base = f(W.ravel())
    assert min(f(W.ravel() + 1e-3 * rng.normal(size=24)) - base for _ in range(300)) > 0
    np.testing.assert_allclose(val, 0.1 * np.sum(W**2) + 0.45 * np.sum(np.linalg.svd(W, compute_uv=False)) ** 2)


def test_sigma_quadratic_against_numpy(rng):
    O = _random_omega(rng, 4)
    lam1, lam2 = 0.2, 0.8
    reg = mtrl.SigmaQuadratic(mtrl.as_spectral(O), lam1, lam2)
    W = rng.normal(size=(4, 3))
    Oinv = np.linalg.inv(O)
    S = np.linalg.inv(lam1 * np.eye(4) + lam2 * Oinv)
    np.testing.assert_allclose(reg.value(W), 0.5 * lam1 * np.sum(W**2) + 0.5 * lam2 * np.trace(W.T @ Oinv @ W))
    step = 0.3
    prox, _ = reg.prox(W, step)
    np.testing.assert_allclose(prox, np.linalg.solve(np.eye(4) + step * np.linalg.inv(S), W), atol=1e-12)
    Wc, conj, _ = reg.conjugate(W)
    np.testing.assert_allclose(Wc, S @ W, atol=1e-12)
    np.testing.assert_allclose(conj, 0.5 * np.trace(W.T @ S @ W))
    np.testing.assert_allclose(reg.conjugate_lipschitz(), np.linalg.eigvalsh(S).max())


def _flat_J(W, X, y, task, lam1, lam2):
    m = W.shape[0]
    a = np.sum(X * W[task], axis=1)
    counts = np.bincount(task, minlength=m)
    data = np.sum((y - a) ** 2 / counts[task])
    return data + 0.5 * lam1 * np.sum(W**2) + 0.5 * lam2 * np.sum(np.linalg.svd(W, compute_uv=False)) ** 2


@pytest.fixture
def small_problem(rng):
    m, d = 4, 6
    counts = np.array([3, 9, 5, 12])
    task = np.repeat(np.arange(m), counts)
    X = rng.normal(size=(len(task), d))
    y = rng.normal(size=len(task))
    return X, y, task, m, d


def test_objective_j_matches_flat_numpy(small_problem, rng):
    X, y, task, m, d = small_problem
    W = rng.normal(size=(m, d))
    sites = to_sites(X, y, task)
    got = mtrl.objective_J(jnp.asarray(W), sites, lam1=0.3, lam2=0.7, loss="squared")
    np.testing.assert_allclose(got, _flat_J(W, X, y, task, 0.3, 0.7), rtol=1e-12)


def test_min_over_omega_of_p_equals_j(small_problem, rng):
    X, y, task, m, d = small_problem
    sites = to_sites(X, y, task)
    W = rng.normal(size=(m, d))
    J = float(mtrl.objective_J(jnp.asarray(W), sites, lam1=0.3, lam2=0.7))
    P_star = float(mtrl.objective_P(W, mtrl.omega_update(W, eps=1e-14), sites, lam1=0.3, lam2=0.7))
    np.testing.assert_allclose(P_star, J, rtol=1e-10)
    for _ in range(20):  # any other trace-one Omega gives a larger P
        O = _random_omega(rng, m)
        assert float(mtrl.objective_P(W, O, sites, lam1=0.3, lam2=0.7)) >= J - 1e-10


def test_p_is_infinite_off_the_range_of_singular_omega(rng):
    v = rng.normal(size=(3, 1))
    O = v @ v.T / (v.T @ v)
    reg = mtrl.SigmaQuadratic(mtrl.as_spectral(O), 0.1, 1.0)
    assert np.isinf(reg.value(rng.normal(size=(3, 2))))
    W_in_range = v @ rng.normal(size=(1, 2))
    assert np.isfinite(reg.value(W_in_range))


def test_duality_gap_is_nonnegative(small_problem, rng):
    X, y, task, m, d = small_problem
    sites = to_sites(X, y, task)
    reg = mtrl.TraceNormSq(0.3, 0.7)
    for _ in range(10):
        W = rng.normal(size=(m, d))
        alpha = rng.normal(size=sites.y.shape) * np.asarray(sites.mask)
        assert float(mtrl.duality_gap(W, alpha, sites, reg, "squared")) >= 0


def test_objective_of_a_low_rank_w_matches_an_svd_reference_to_round_off():
    """J of a rank-2 W (as at the optimum): the trace norm from LAPACK's SVD, not from Gram eigenvalues,
    whose zero singular values would come out near sqrt(eps) * s_max and overstate J."""
    import mtl_jax

    rng = np.random.default_rng(7)
    m, d = 12, 6
    W = rng.normal(size=(m, 2)) @ rng.normal(size=(2, d))
    X = rng.normal(size=(m * 10, d))
    task = np.repeat(np.arange(m), 10)
    y = rng.normal(size=m * 10)
    s = np.linalg.svd(W, compute_uv=False)
    loss = sum(np.mean((y[task == t] - X[task == t] @ W[t]) ** 2) for t in range(m))
    expected = loss + 0.1 / 2 * np.sum(W**2) + 1.0 / 2 * np.sum(s) ** 2
    got = mtl_jax.objective(W, X, y, task, lam1=0.1, lam2=1.0)
    assert abs(got - expected) <= 1e-13 * expected


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
@pytest.mark.parametrize("k", [-600, -520, 0, 520, 600])
def test_gram_maps_are_exact_under_power_of_two_scaling(rng, shape, k):
    """The Gram route of the prox and of grad R* works at any scale: prox(2^k Z; c) = 2^k prox(Z; c)
    (the map is positively homogeneous), also where Z^T Z itself would under- or overflow."""
    Z = rng.normal(size=shape)
    s = 2.0**k
    ref = np.asarray(mtrl.prox_trace_norm_sq(jnp.asarray(Z), 0.3))
    got = np.asarray(mtrl.prox_trace_norm_sq(jnp.asarray(Z * s), 0.3))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got / s, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())
    W, conj, _ = mtrl.TraceNormSq(0.1, 1.0).conjugate(jnp.asarray(Z * s))
    W_ref, conj_ref, _ = mtrl.TraceNormSq(0.1, 1.0).conjugate(jnp.asarray(Z))
    np.testing.assert_allclose(np.asarray(W) / s, np.asarray(W_ref), rtol=1e-12, atol=1e-14 * np.abs(W_ref).max())
    if abs(k) < 500:  # R*(V) scales by s^2 and is itself representable
        np.testing.assert_allclose(float(conj) / s**2, float(conj_ref), rtol=1e-12)


def test_gram_map_of_zero_is_zero():
    W, conj, reg = mtrl.TraceNormSq(0.1, 1.0).conjugate(jnp.zeros((4, 3)))
    assert np.all(np.asarray(W) == 0) and float(conj) == 0 and float(reg) == 0
