"""The distributed baselines of DMTRL (mtl_jax.solvers.baselines) against closed forms and NumPy references."""
import numpy as np
import pytest

import mtl_jax
from mtl_jax.data.sites import to_sites
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.solvers import baselines
from mtl_jax.solvers.base import RoundRecord

M, D, N = 6, 5, 24
LAM1, LAM2 = 0.1, 0.2


@pytest.fixture(scope="module")
def data():
    X, y, task, info = make_clustered_tasks(M, D, num_clusters=2, samples_per_task=N, noise=0.3, seed=3)
    return X, y, task, to_sites(X, y, task, layout="padded")


def ridge(X, y, lam):
    """argmin_w (1/n) ||y - X w||^2 + (lam/2) ||w||^2: (2/n X^T X + lam I) w = 2/n X^T y."""
    n, d = X.shape
    return np.linalg.solve(2.0 / n * X.T @ X + lam * np.eye(d), 2.0 / n * X.T @ y)


def per_task_ridge(X, y, task, lam):
    return np.stack([ridge(X[task == t], y[task == t], lam) for t in range(M)])


def prox_trace_sq(Z, step, lam1, lam2):
    """NumPy prox of step * (lam1/2 ||W||_F^2 + lam2/2 ||W||_*^2): SVD, shrink, squared-l1 prox of the values.

    On singular values s: minimise sum (x - s)^2 / 2 + step (lam1/2 sum x^2 + lam2/2 (sum x)^2), x >= 0;
    with the k largest active, x_i = (s_i - step lam2 S) / (1 + step lam1), S = sum x the fixed point.
    """
    U, s, Vt = np.linalg.svd(Z, full_matrices=False)
    a, b = 1.0 + step * lam1, step * lam2
    for k in range(len(s), 0, -1):       # largest active set whose entries stay positive
        S = s[:k].sum() / (a + k * b)
        if s[k - 1] - b * S > 0:
            break
    x = np.maximum(0.0, (s - b * S) / a)
    return (U * x) @ Vt


def J_numpy(W, X, y, task, lam1, lam2):
    loss = sum(np.mean((y[task == t] - X[task == t] @ W[t]) ** 2) for t in range(M))
    s = np.linalg.svd(W, compute_uv=False)
    return loss + 0.5 * lam1 * np.sum(W ** 2) + 0.5 * lam2 * np.sum(s) ** 2


def test_distributed_apg_reaches_the_centralized_optimum_and_counts_bytes(data):
    X, y, task, sites = data
    ref = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, tol=1e-12)
    out = baselines.distributed_apg(sites, lam1=LAM1, lam2=LAM2, loss="squared", tol=1e-10, max_rounds=2000)
    assert out.converged
    assert abs(out.objective - ref.objective) <= 1e-6 * ref.objective
    np.testing.assert_allclose(out.W, ref.W, atol=1e-5)
    h = out.history
    assert all(isinstance(r, RoundRecord) for r in h)
    assert [r.round for r in h] == list(range(out.iterations + 1))
    assert h[-1].gap <= 1e-10 * h[-1].objective
    # Closed form: round 0 uploads the start's gradient (d numbers per site); every round after it
    # d + 2 numbers up (gradient, loss, dual term) and d down (w_t) per site, float64.
    up = np.diff([r.bytes_up for r in h])
    down = np.diff([r.bytes_down for r in h])
    assert h[0].bytes == h[0].bytes_up == 8 * M * D and h[0].bytes_down == 0
    assert np.all(up == 8 * M * (D + 2)) and np.all(down == 8 * M * D)
    assert np.all(np.diff([r.bytes for r in h]) == 8 * M * (2 * D + 2))
    assert all(r.bytes == r.bytes_up + r.bytes_down for r in h)
    # Simulated seconds: one round = slowest site's pass (N steps) + latency + upload, + latency + download.
    sec = np.diff([r.sim_seconds for r in h])
    expect = (N / baselines.DEFAULT_SPEED + 2 * baselines.DEFAULT_LATENCY
              + 8 * (2 * D + 2) / baselines.DEFAULT_BANDWIDTH)
    np.testing.assert_allclose(sec, expect, rtol=1e-12)


def test_message_sizes_and_centralize_bytes(data):
    X, y, task, sites = data
    assert baselines.apg_message_numbers("squared", D) == (D + 2, D)
    assert baselines.apg_message_numbers("logistic", D) == (2 * D + 2, D + 2)
    assert baselines.apg_message_numbers("hinge", D) == (D + 2, 2 * D + 2)
    assert baselines.centralize_bytes(sites) == 8 * M * N * (D + 1)


def test_minibatch_sgd_full_batch_constant_step_is_proximal_gradient_descent(data):
    X, y, task, sites = data
    step, rounds = 0.05, 4
    out = baselines.minibatch_sgd(sites, lam1=LAM1, lam2=LAM2, loss="squared", rounds=rounds, batch=N,
                                  step0=step, schedule="constant", seed=7)
    W = np.zeros((M, D))
    for k in range(rounds):
        G = np.stack([-2.0 / N * X[task == t].T @ (y[task == t] - X[task == t] @ W[t]) for t in range(M)])
        W = prox_trace_sq(W - step * G, step, LAM1, LAM2)
        np.testing.assert_allclose(out.history[k + 1].objective, J_numpy(W, X, y, task, LAM1, LAM2), rtol=1e-10)
    np.testing.assert_allclose(out.W, W, rtol=0, atol=1e-10)
    # Messages: d numbers up (the gradient) and d down (w_t) per site and round; J's gap is a valid bound.
    assert np.all(np.diff([r.bytes for r in out.history]) == 8 * M * 2 * D)
    assert all(r.gap >= -1e-12 for r in out.history)


def test_minibatch_sgd_decreases_J_and_is_seeded(data):
    X, y, task, sites = data
    kw = dict(lam1=LAM1, lam2=LAM2, loss="squared", rounds=200, batch=4, seed=1)
    out = baselines.minibatch_sgd(sites, **kw)
    again = baselines.minibatch_sgd(sites, **kw)
    J = np.array([r.objective for r in out.history])
    assert len(J) == 201 and out.history[0].round == 0 and out.history[-1].round == 200
    assert J[-1] < 0.5 * J[0] and np.mean(J[-20:]) < np.mean(J[20:40])
    opt = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, tol=1e-10).objective
    assert J[-1] - opt <= out.history[-1].gap + 1e-12     # the gap bounds the sub-optimality
    np.testing.assert_array_equal(out.W, again.W)
    other = baselines.minibatch_sgd(sites, **dict(kw, seed=2))
    assert not np.array_equal(out.W, other.W)


def test_fixed_identity_is_the_fixed_omega_w_step(data):
    # Omega = I/m: Sigma = (lam1 I + lam2 m I)^{-1} = I / (lam1 + lam2 m): per-task ridge at lam1 + lam2 m.
    X, y, task, sites = data
    out = baselines.fixed_identity(sites, lam1=LAM1, lam2=LAM2, loss="squared", tol=1e-12, max_rounds=3000)
    np.testing.assert_allclose(out.W, per_task_ridge(X, y, task, LAM1 + LAM2 * M), atol=1e-6)
    assert np.isfinite(out.history[-1].gap_w) and out.history[-1].gap > 0  # not J's optimum


def test_independent_is_per_task_ridge(data):
    X, y, task, sites = data
    out = baselines.independent(sites, lam1=LAM1, loss="squared", tol=1e-12, max_rounds=3000)
    assert out.converged
    np.testing.assert_allclose(out.W, per_task_ridge(X, y, task, LAM1), atol=1e-6)
