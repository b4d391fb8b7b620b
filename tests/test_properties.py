"""Property tests over seeded random inputs: ``fit`` and ``train`` either return finite results that pass their
certificates, or raise a ValueError that names an argument. Never NaN, never another exception.

The generator is our own (seeded NumPy), so a failing case is reproduced by its index alone: the shapes, scales
(1e-150 to 1e150), label sets, task-size skew and option values of case k are ``_fit_case(k)``.
"""
import re
import warnings

import numpy as np
import pytest

import mtl_jax
from mtl_jax.data.deep import imbalanced_regression
from mtl_jax.training import DivergenceWarning, TrainConfig, train

FIT_ARGUMENTS = ("X", "y", "task", "num_tasks", "loss", "lam1", "lam2", "tol", "max_iter", "eps", "method",
                 "W0", "alpha0", "inner_tol", "inner_max_iter")
NAMED = re.compile(r"^(" + "|".join(FIT_ARGUMENTS) + r")\b")


def _fit_case(k):
    """Case k: a dataset and fit options drawn from a seeded generator (some of them invalid on purpose)."""
    rng = np.random.default_rng(1000 + k)
    m = int(rng.integers(1, 7))
    d = int(rng.integers(1, 6))
    sizes = rng.integers(1, 12, size=m)
    if rng.random() < 0.3:                                  # long-tailed: one big task
        sizes[0] = int(rng.integers(20, 80))
    task = np.repeat(np.arange(m), sizes)
    rng.shuffle(task)
    n = len(task)
    scale = 10.0 ** rng.choice([-150, -40, -3, 0, 0, 0, 3, 40, 150])
    X = rng.normal(size=(n, d)) * scale
    if rng.random() < 0.15:
        X[:, :] = 0.0                                       # no signal at all
    loss = str(rng.choice(["squared", "hinge", "logistic"]))
    if loss == "squared":
        y = rng.normal(size=n) * 10.0 ** rng.choice([-100, 0, 0, 3, 100])
        if rng.random() < 0.1:
            y[:] = 0.0
    else:
        y = rng.choice([-1.0, 1.0], size=n)
        if rng.random() < 0.1:
            y[:] = 1.0                                      # one class only
        if rng.random() < 0.05:
            y[0] = 0.5                                      # invalid label
    options = dict(lam1=float(10.0 ** rng.uniform(-4, 2)), lam2=float(10.0 ** rng.uniform(-4, 2)), loss=loss,
                   tol=float(rng.choice([1e-3, 1e-6, 1e-9])), max_iter=int(rng.choice([50, 500, 5000])))
    if rng.random() < 0.25:
        options["method"] = str(rng.choice(["alternating", "apg_dual"]))
        if options["method"] == "alternating":
            options["max_iter"] = 30
    bad = rng.random()
    if bad < 0.05:
        options["lam1"] = float(rng.choice([0.0, -1.0, np.nan]))
    elif bad < 0.10:
        options["eps"] = float(rng.choice([np.nan, -0.5, 0.0]))
    elif bad < 0.13:
        options["tol"] = "1e-6"
    elif bad < 0.16:
        options["max_iter"] = float(rng.choice([np.inf, np.nan, 0.0]))
    return X, y, task, options


@pytest.mark.slow
@pytest.mark.parametrize("k", range(40))
def test_fit_returns_certified_finite_results_or_names_the_bad_argument(k):
    X, y, task, options = _fit_case(k)
    try:
        res = mtl_jax.fit(X, y, task, **options)
    except ValueError as e:
        assert NAMED.match(str(e)), f"case {k}: the error does not start with an argument name: {e}"
        return
    values = [res.objective, res.gap, res.relative_gap]
    assert np.all(np.isfinite(res.W)) and np.all(np.isfinite(values)), f"case {k}: non-finite result {values}"
    assert np.all(np.isfinite(res.Omega))
    assert res.gap >= -1e-9 * max(abs(res.objective), 1e-300), f"case {k}: negative gap {res.gap}"
    if res.converged:
        assert res.relative_gap <= options["tol"] * (1 + 1e-9) or res.gap == 0.0
    # The certificate is a bound: J(W) - gap <= min J <= J(W') for any W', e.g. W' = 0.
    J0 = mtl_jax.objective(np.zeros_like(res.W), X, y, task, lam1=options["lam1"], lam2=options["lam2"],
                           loss=options["loss"])
    assert res.objective - res.gap <= J0 * (1 + 1e-9) + 1e-300, f"case {k}: certificate above J(0)"
    J = mtl_jax.objective(res.W, X, y, task, lam1=options["lam1"], lam2=options["lam2"], loss=options["loss"])
    assert J == pytest.approx(res.objective, rel=1e-7, abs=1e-300)


def _train_case(k):
    rng = np.random.default_rng(2000 + k)
    config = dict(hidden=(int(rng.choice([4, 8])),), steps=int(rng.choice([5, 12])),
                  batch_size=int(rng.choice([2, 4, 16])),
                  scheme=str(rng.choice(["equal", "huq_pervin", "dwa", "uncertainty", "rlw", "famo", "gradnorm"])),
                  optimizer=str(rng.choice(["adam", "sgd"])),
                  learning_rate=float(10.0 ** rng.choice([-3, -2, 0, 6])), seed=int(rng.integers(0, 100)))
    if rng.random() < 0.1:
        config["learning_rate"] = float(rng.choice([0.0, -1.0, np.nan]))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("k", range(12))
def test_train_returns_finite_metrics_or_reports_divergence_or_names_the_argument(k):
    options = _train_case(k)
    data = imbalanced_regression(n_train=64, n_test=32, num_tasks=3, in_dim=4, out_dim=2, seed=k)
    try:
        config = TrainConfig(**options)
    except ValueError as e:
        assert re.match(r"^\w+", str(e)) and str(e).split(":")[0] in TrainConfig.__dataclass_fields__, str(e)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config, data)
    diverged = int(np.asarray(result.diverged_at))
    warned = [str(w.message) for w in caught if issubclass(w.category, DivergenceWarning)]
    if diverged < 0:
        assert np.all(np.isfinite(np.asarray(result.history.weights)))
        if not np.all(np.isfinite(np.asarray(result.test.task_loss))):
            assert any("test loss is not finite" in w for w in warned), f"case {k}: non-finite test loss, no warning"
        else:
            assert not warned, f"case {k}: a warning without divergence: {warned}"
    else:
        assert any(f"at step {diverged}" in w for w in warned), f"case {k}: diverged at {diverged} without a warning"
