"""The public contract: mtl_jax.fit / mtl_jax.objective, their results and their errors."""
import numpy as np
import pytest

import mtl_jax
from mtl_jax.data.synthetic import make_clustered_tasks


@pytest.fixture
def data():
    X, y, task, _ = make_clustered_tasks(5, 3, samples_per_task=(4, 9), seed=7)
    return X, y, task


def test_fit_result_contract(data):
    X, y, task = data
    res = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    assert res.W.shape == (5, 3)
    Omega = res.Omega
    assert Omega.shape == (5, 5)
    np.testing.assert_allclose(Omega, Omega.T, atol=1e-12)
    np.testing.assert_allclose(np.trace(Omega), 1.0, atol=1e-10)
    assert np.linalg.eigvalsh(Omega).min() > 0
    rounds = [r.round for r in res.history]
    assert rounds == list(range(1, res.iterations + 1))
    arrays = res.history_arrays()
    assert set(arrays) == {"round", "objective", "gap", "bytes", "seconds"}
    assert np.all(np.diff(arrays["seconds"]) >= 0)
    # two compiled programs summing in different orders: equal to float64 round-off (GPU too)
    np.testing.assert_allclose(mtl_jax.objective(res.W, X, y, task, lam1=0.1, lam2=1.0), res.objective, rtol=1e-9)
    assert res.alpha.shape == y.shape
    assert res.config["method"] == "apg" and res.config["num_tasks"] == 5


def test_same_seed_same_numbers(data):
    X, y, task = data
    a = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    b = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    np.testing.assert_array_equal(a.W, b.W)


def test_row_order_does_not_matter(data):
    X, y, task = data
    perm = np.random.default_rng(0).permutation(len(y))
    a = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, tol=1e-10)
    b = mtl_jax.fit(X[perm], y[perm], task[perm], lam1=0.1, lam2=1.0, tol=1e-10)
    np.testing.assert_allclose(a.W, b.W, atol=1e-8)
    np.testing.assert_allclose(b.alpha, a.alpha[perm], atol=1e-7)  # alpha comes back in input order


def _bad_cases(X, y, task):
    nan_X = X.copy(); nan_X[0, 0] = np.nan
    inf_y = y.copy(); inf_y[1] = np.inf
    neg = task.copy(); neg[0] = -1
    frac = task.astype(float); frac[0] = 0.5
    gap = task.copy(); gap[task == 2] = 1  # task 2 has no samples
    return [
        ("X", dict(X=nan_X)),
        ("y", dict(y=inf_y)),
        ("y", dict(y=y[:-1])),
        ("task", dict(task=neg)),
        ("task", dict(task=frac)),
        ("task", dict(task=gap)),
        ("X", dict(X=X[:0], y=y[:0], task=task[:0])),
        ("lam1", dict(lam1=0.0)),
        ("lam1", dict(lam1=-1.0)),
        ("lam2", dict(lam2=-0.1)),
        ("y", dict(loss="hinge")),  # labels are not +-1
        ("loss", dict(loss="absolute")),
        ("method", dict(method="newton")),
        ("solver", dict(solver="magic")),
        ("W0", dict(W0=np.zeros((2, 2)))),
        ("max_iter", dict(max_iter=0)),
        ("tol", dict(tol=-1.0)),
    ]


@pytest.mark.parametrize("case", range(17))
def test_fit_rejects_bad_input_naming_the_argument(data, case):
    X, y, task = data
    name, override = _bad_cases(X, y, task)[case]
    kwargs = dict(X=X, y=y, task=task, lam1=0.1, lam2=1.0)
    kwargs.update(override)
    with pytest.raises(ValueError, match=name):
        mtl_jax.fit(kwargs.pop("X"), kwargs.pop("y"), kwargs.pop("task"), **kwargs)


def test_objective_rejects_mismatched_w(data):
    X, y, task = data
    with pytest.raises(ValueError, match="W"):
        mtl_jax.objective(np.zeros((5, 4)), X, y, task, lam1=0.1, lam2=1.0)
    with pytest.raises(ValueError, match="W"):
        mtl_jax.objective(np.full((5, 3), np.nan), X, y, task, lam1=0.1, lam2=1.0)


def test_dual_warm_start_from_alpha():
    X, y, task, _ = make_clustered_tasks(6, 4, samples_per_task=20, loss="hinge", seed=3)
    kw = dict(lam1=0.1, lam2=1.0, loss="hinge", tol=1e-8)
    cold = mtl_jax.fit(X, y, task, **kw)
    warm = mtl_jax.fit(X, y, task, alpha0=cold.alpha, **kw)
    assert warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.objective, cold.objective, rtol=1e-7)


def test_infeasible_alpha0_is_rejected():
    X, y, task, _ = make_clustered_tasks(6, 4, samples_per_task=20, loss="hinge", seed=3)
    with pytest.raises(ValueError, match="alpha0"):
        mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge", alpha0=-y)  # y * alpha0 < 0
    with pytest.raises(ValueError, match="alpha0"):
        mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge", alpha0=np.zeros(3))


def test_second_fit_of_the_same_shapes_does_not_compile_again(data):
    X, y, task = data
    mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    again = mtl_jax.fit(X, y, task, lam1=0.3, lam2=0.5, tol=1e-8)  # hyper-parameters are traced
    assert again.compile_seconds == 0.0
