"""mtl_jax.fit / objective never return NaN: the right answer, or a ValueError naming the argument.

Degenerate and extreme data (all-zero features, an all-zero task, features scaled by 1e-160 or 1e150,
zero targets, overflowing entries) and bad options. References are independent of the solver: closed
forms at W = 0, the first-order condition ``W = grad R*(X^T alpha)`` when the loss curvature is
negligible, per-task least squares when the regularisation is, and the exact power-of-two rescaling
``X -> s X, lam -> s^2 lam, W -> W / s``, which leaves J and the margins unchanged. Float64.
"""
import numpy as np
import pytest

import mtl_jax
from mtl_jax import cli, validation
from mtl_jax.api import FitResult
from mtl_jax.data import save_npz

LAMS = dict(lam1=0.1, lam2=1.0)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = rng.normal(size=60)
    task = np.repeat(np.arange(3), 20)
    return X, y, task


def _finite(res):
    return all(np.all(np.isfinite(v)) for v in (res.W, res.Omega, res.alpha, res.objective, res.gap))


def _loss_at_zero(y, task, loss):
    """J(0) = sum_t mean_i loss(y_ti, 0): (y^2), 1 (hinge), log 2 (logistic) per sample."""
    per_sample = {"squared": y**2, "hinge": np.ones_like(y), "logistic": np.full_like(y, np.log(2.0))}[loss]
    return sum(per_sample[task == t].mean() for t in np.unique(task))


def _grad_conjugate(V, lam1, lam2):
    """NumPy reference for grad R*(V) = prox(V / lam1; lam2 / lam1) by SVD (docs/mathematics.md, section 3)."""
    U, s, Vt = np.linalg.svd(V / lam1, full_matrices=False)
    c = lam2 / lam1
    for k in range(1, len(s) + 1):
        S = s[:k].sum() / (1 + k * c)
        if k == len(s) or s[k] <= c * S:
            break
    return (U * np.maximum(0.0, s - c * S)) @ Vt


# --- 1. all-zero features ---------------------------------------------------------------------------

@pytest.mark.parametrize("loss, method", [("squared", "apg"), ("squared", "apg_dual"), ("squared", "alternating"),
                                          ("hinge", "apg"), ("logistic", "apg"), ("logistic", "apg_dual")])
def test_zero_features_give_zero_weights(data, loss, method):
    X, y, task = data
    y = y if loss == "squared" else np.where(y > 0, 1.0, -1.0)
    res = mtl_jax.fit(0 * X, y, task, loss=loss, method=method, **LAMS)
    assert _finite(res)
    np.testing.assert_array_equal(res.W, 0.0)
    np.testing.assert_allclose(res.objective, _loss_at_zero(y, task, loss), rtol=1e-14)
    assert res.converged and abs(res.gap) <= 1e-12
    np.testing.assert_allclose(res.Omega, np.eye(3) / 3, atol=1e-15)  # the Omega-step's fallback at W = 0


@pytest.mark.parametrize("loss, method", [("squared", "apg"), ("squared", "apg_dual"), ("hinge", "apg")])
def test_one_all_zero_task_among_normal_ones(data, loss, method):
    """A task without features has w_t = 0 at the optimum (dropping a row never raises ||W||_*), and
    the other rows are those of the problem without it; J adds that task's constant loss at 0."""
    X, y, task = data
    y = y if loss == "squared" else np.where(y > 0, 1.0, -1.0)
    X = X.copy()
    X[task == 1] = 0.0
    kw = dict(loss=loss, method=method, tol=1e-10, **LAMS)
    res = mtl_jax.fit(X, y, task, **kw)
    keep = task != 1
    ref = mtl_jax.fit(X[keep], y[keep], np.where(task[keep] == 2, 1, 0), **kw)
    assert _finite(res) and res.converged
    assert np.abs(res.W[1]).max() <= 1e-12 * np.abs(res.W).max()
    # J is lam1-strongly convex: ||W - W*||_F <= sqrt(2 gap / lam1) for each certified point
    bound = sum(np.sqrt(2 * max(r.gap, 0.0) / LAMS["lam1"]) for r in (res, ref))
    assert np.linalg.norm(res.W[[0, 2]] - ref.W) <= bound + 1e-12
    np.testing.assert_allclose(res.objective, ref.objective + _loss_at_zero(y[~keep], task[~keep], loss), rtol=1e-9)


# --- 2. the scale of the data ----------------------------------------------------------------------

@pytest.mark.parametrize("k", [400, -400])
@pytest.mark.parametrize("loss, method", [("squared", "apg"), ("squared", "apg_dual"), ("hinge", "apg")])
def test_power_of_two_rescaling_is_exact(data, k, loss, method):
    """J(W; s X, s^2 lam) = J(s W... ): with X -> s X and lam -> s^2 lam the solution is W / s, same J, gap, alpha."""
    X, y, task = data
    y = y if loss == "squared" else np.where(y > 0, 1.0, -1.0)
    s = 2.0**k
    kw = dict(loss=loss, method=method, tol=1e-10)
    base = mtl_jax.fit(X, y, task, **kw, **LAMS)
    res = mtl_jax.fit(X * s, y, task, lam1=LAMS["lam1"] * s * s, lam2=LAMS["lam2"] * s * s, **kw)
    assert _finite(res) and res.converged
    np.testing.assert_allclose(res.W * s, base.W, rtol=1e-8, atol=1e-8 * np.abs(base.W).max())
    np.testing.assert_allclose(res.objective, base.objective, rtol=1e-12)
    np.testing.assert_allclose(res.alpha, base.alpha, atol=1e-10 * np.abs(base.alpha).max())
    np.testing.assert_allclose(
        res.objective, mtl_jax.objective(res.W, X * s, y, task, lam1=0.1 * s * s, lam2=s * s, loss=loss), rtol=1e-12)


@pytest.mark.parametrize("method", ["apg", "apg_dual"])
def test_tiny_features_exact(data, method):
    """X * 1e-160, lam1 = 0.1: the loss curvature (~1e-320) is negligible against lam1, so the optimum is
    W = grad R*(V) at the dual point of W = 0, V = X^T (2 c y) (relative error ~1e-319)."""
    X, y, task = data
    s = 1e-160
    V = np.stack([2.0 * X[task == t].T @ y[task == t] / 20 for t in range(3)])  # unscaled: exact reference
    W_ref = _grad_conjugate(V, **LAMS) * s
    res = mtl_jax.fit(X * s, y, task, method=method, **LAMS)
    assert _finite(res) and res.converged
    np.testing.assert_allclose(res.W, W_ref, rtol=1e-8, atol=1e-8 * np.abs(W_ref).max())
    assert res.objective == mtl_jax.objective(res.W, X * s, y, task, **LAMS)


def test_tiny_features_alternating_is_certified(data):
    """The classic alternation stops after its first W-step here: that W (the ridge solution at Omega = I / m)
    is not J's minimiser, but its J exceeds min J by ~1e-320, below J's resolution, and the certificate says so."""
    X, y, task = data
    res = mtl_jax.fit(X * 1e-160, y, task, method="alternating", **LAMS)
    assert _finite(res) and res.converged
    np.testing.assert_allclose(res.objective, mtl_jax.objective(res.W, X * 1e-160, y, task, **LAMS), rtol=1e-15)


def test_huge_features_right_weights_honest_certificate(data):
    """X * 1e150, lam1 = 0.1: regularisation ~1e-301 of the data's curvature, so W is per-task least squares
    to ~1e-300. The certificate R*(X^T alpha) ~ ||rounding of X^T alpha||^2 / lam1 cannot reach tol in
    float64 (docstring of fit): the fit must then say converged=False with a finite, valid gap."""
    X, y, task = data
    Xh = X * 1e150
    W_ref = np.stack([np.linalg.lstsq(Xh[task == t], y[task == t], rcond=None)[0] for t in range(3)])
    J_ref = mtl_jax.objective(W_ref, Xh, y, task, **LAMS)
    for method, max_iter in (("apg", 300), ("alternating", 5)):  # the alternation's CG overflowed to NaN
        res = mtl_jax.fit(Xh, y, task, method=method, max_iter=max_iter, **LAMS)
        assert _finite(res)
        np.testing.assert_allclose(res.W, W_ref, rtol=1e-8)
        np.testing.assert_allclose(res.objective, mtl_jax.objective(res.W, Xh, y, task, **LAMS), rtol=1e-14)
        assert res.objective - res.gap <= J_ref * (1 + 1e-14)  # a valid lower bound
        assert not res.converged


def test_huge_targets_squared_loss_are_exactly_homogeneous(data):
    """Squared loss: W(r y) = r W(y), J(r y) = r^2 J(y); r = 2^490 (~3e147) is within the documented limit."""
    X, y, task = data
    r = 2.0**490
    base = mtl_jax.fit(X, y, task, tol=1e-10, **LAMS)
    res = mtl_jax.fit(X, y * r, task, tol=1e-10, **LAMS)
    assert _finite(res) and res.converged
    np.testing.assert_allclose(res.W / r, base.W, rtol=1e-8, atol=1e-8 * np.abs(base.W).max())
    np.testing.assert_allclose(res.objective / r**2, base.objective, rtol=1e-12)


@pytest.mark.parametrize("where, loss, name", [
    ("X", "squared", "X"), ("X", "hinge", "X"), ("y", "squared", "y"), ("Xy", "squared", "lam1"),
])
def test_overflowing_scales_are_refused_naming_the_argument(data, where, loss, name):
    X, y, task = data
    X, y = X.copy(), (y if loss == "squared" else np.where(y > 0, 1.0, -1.0))
    if where == "X":
        X[0, 0] = 1e200
    elif where == "y":
        y = y.copy()
        y[0] = 1e200
    else:  # each within its own limit, but ||X^T alpha||^2 / lam1 overflows
        X, y = X * 1e100, y * 1e100
    with pytest.raises(ValueError) as err:
        mtl_jax.fit(X, y, task, loss=loss, **LAMS)
    message = str(err.value)
    assert message.startswith(f"{name}: ") and ("rescale" in message or "raise lam1" in message)


def test_largest_accepted_scales_give_finite_results(data):
    """Just inside the limits of validation.scale_limits nothing overflows (lam1 = 1000 keeps the third
    limit, max|X| max|y| against lam1, from binding first)."""
    X, y, task = data
    lams = dict(lam1=1e3, lam2=1.0)
    x_lim, y_lim, _ = validation.scale_limits(np.float64, rows=20, dim=4, tasks=3, lam1=lams["lam1"])
    for Xs, ys in ((X / np.abs(X).max() * x_lim * 0.99, y), (X, y / np.abs(y).max() * y_lim * 0.99)):
        res = mtl_jax.fit(Xs, ys, task, max_iter=50, **lams)
        assert _finite(res) and res.gap >= -1e-12 * res.objective
        np.testing.assert_allclose(res.objective, mtl_jax.objective(res.W, Xs, ys, task, **lams), rtol=1e-12)


# --- 3. every option validated ----------------------------------------------------------------------

BAD_OPTIONS = {
    "eps nan": (dict(eps=float("nan")), "eps"),
    "eps negative": (dict(eps=-0.5), "eps"),
    "eps zero": (dict(eps=0.0), "eps"),
    "eps one": (dict(eps=1.0), "eps"),
    "eps two": (dict(eps=2.0), "eps"),
    "eps string": (dict(eps="1e-8"), "eps"),
    "tol string": (dict(tol="1e-6"), "tol"),
    "tol nan": (dict(tol=float("nan")), "tol"),
    "tol negative": (dict(tol=-1e-6), "tol"),
    "tol array": (dict(tol=np.array([1e-6, 1e-7])), "tol"),
    "max_iter inf": (dict(max_iter=float("inf")), "max_iter"),
    "max_iter nan": (dict(max_iter=float("nan")), "max_iter"),
    "max_iter float": (dict(max_iter=2.5), "max_iter"),
    "max_iter zero": (dict(max_iter=0), "max_iter"),
    "max_iter string": (dict(max_iter="10"), "max_iter"),
    "max_iter bool": (dict(max_iter=True), "max_iter"),
    "W0 strings": (dict(W0=[["a"] * 4] * 3), "W0"),
    "W0 shape": (dict(W0=np.zeros((4, 3))), "W0"),
    "W0 nan": (dict(W0=np.full((3, 4), np.nan)), "W0"),
    "W0 ragged": (dict(W0=[[0.0] * 4, [0.0] * 3, [0.0] * 4]), "W0"),
    "alpha0 strings": (dict(alpha0=["a"] * 60), "alpha0"),
    "alpha0 shape": (dict(alpha0=np.zeros(59)), "alpha0"),
    "alpha0 inf": (dict(alpha0=np.full(60, np.inf)), "alpha0"),
    "inner_tol nan": (dict(method="alternating", inner_tol=float("nan")), "inner_tol"),
    "inner_tol string": (dict(method="alternating", inner_tol="1e-9"), "inner_tol"),
    "inner_max_iter float": (dict(method="alternating", inner_max_iter=1.5), "inner_max_iter"),
    "inner_max_iter inf": (dict(method="alternating", inner_max_iter=float("inf")), "inner_max_iter"),
    "inner_max_iter zero": (dict(method="alternating", inner_max_iter=0), "inner_max_iter"),
    "num_tasks float": (dict(num_tasks=2.5), "num_tasks"),
    "num_tasks string": (dict(num_tasks="3"), "num_tasks"),
    "num_tasks zero": (dict(num_tasks=0), "num_tasks"),
    "num_tasks huge": (dict(num_tasks=10**12), "num_tasks"),  # refused before bincount allocates 10^12 counters
    "lam1 array": (dict(lam1=np.array([0.1, 0.2])), "lam1"),
    "lam1 list of one": (dict(lam1=[0.1]), "lam1"),
    "lam2 array": (dict(lam2=np.array([1.0, 2.0])), "lam2"),
    "lam1 nan": (dict(lam1=float("nan")), "lam1"),
    "lam1 zero": (dict(lam1=0.0), "lam1"),
    "lam2 negative": (dict(lam2=-1.0), "lam2"),
}


@pytest.mark.parametrize("options, name", list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_bad_option_raises_value_error_naming_it(data, options, name):
    X, y, task = data
    kwargs = {**LAMS, **options}
    with pytest.raises(ValueError) as err:
        mtl_jax.fit(X, y, task, **kwargs)
    assert str(err.value).startswith(f"{name}: ")


@pytest.mark.parametrize("W, lams, name", [
    ([["a"] * 4] * 3, LAMS, "W"),
    (np.zeros(4), LAMS, "W"),
    (np.full((3, 4), np.inf), LAMS, "W"),
    (np.zeros((3, 4)), dict(lam1=np.array([0.1, 0.2]), lam2=1.0), "lam1"),
    (np.zeros((3, 4)), dict(lam1=0.1, lam2=[1.0, 2.0]), "lam2"),
])
def test_objective_bad_input_names_the_argument(data, W, lams, name):
    X, y, task = data
    with pytest.raises(ValueError) as err:
        mtl_jax.objective(W, X, y, task, **lams)
    assert str(err.value).startswith(f"{name}: ")


def test_lam_arrays_still_accepted_for_sweeps():
    lam1, lam2 = validation.validate_lams(np.array([0.1, 0.2]), np.array([0.0, 1.0]))
    np.testing.assert_array_equal(lam1, [0.1, 0.2])
    assert validation.validate_lams(0.1, np.float64(1.0), scalar=True) == (0.1, 1.0)


def test_eps_just_below_one_is_allowed(data):
    X, y, task = data
    assert mtl_jax.fit(X, y, task, eps=0.5, **LAMS).converged


# --- 4. zero targets: J = 0 ------------------------------------------------------------------------

def test_zero_targets_relative_gap_zero(data):
    X, y, task = data
    res = mtl_jax.fit(X, 0 * y, task, **LAMS)
    np.testing.assert_array_equal(res.W, 0.0)
    assert res.objective == 0.0 and res.gap == 0.0 and res.relative_gap == 0.0
    assert res.converged and res.iterations == 1


def test_relative_gap_definition():
    def result(objective, gap):
        return FitResult(W=np.zeros((1, 1)), omega=None, history=(), objective=objective, gap=gap,
                         converged=False, iterations=0)

    assert result(0.0, 0.0).relative_gap == 0.0
    assert result(-2.0, 1e-6).relative_gap == 5e-7
    assert np.isfinite(result(0.0, 1e-300).relative_gap)


def test_cli_prints_a_finite_relative_gap_for_zero_targets(tmp_path, data, capsys):
    X, y, task = data
    path = tmp_path / "zero.npz"
    save_npz(path, X=X, y=0 * y, task=task)
    assert cli.main(["fit", "--data", str(path), "--lam1", "0.1", "--lam2", "1", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "relative gap = 0 " in out and "inf" not in out and "nan" not in out


# --- 6. task ids out of range -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1e20, 2.0**62, float(2**63)])
def test_huge_float_task_id_names_task(data, bad):
    X, y, task = data
    task = task.astype(float)
    task[0] = bad
    with pytest.raises(ValueError) as err:
        mtl_jax.fit(X, y, task, **LAMS)
    assert str(err.value).startswith("task: ")


@pytest.mark.parametrize("bad", [np.uint64(2**63 + 5), np.int64(10**12)])
def test_huge_integer_task_id_names_task_without_allocating(data, bad):
    X, y, task = data
    task = task.astype(type(bad))
    task[0] = bad
    with pytest.raises(ValueError) as err:
        mtl_jax.fit(X, y, task, **LAMS)
    assert str(err.value).startswith("task: ")
