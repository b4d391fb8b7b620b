"""`mtl_jax.losses` against references written here: NumPy formulas, finite differences, and SciPy
one-dimensional optimisation (the convex conjugate and the dual coordinate step are computed
numerically, never with the module's own formulas).

Conventions (docs/mathematics.md, sections 1 and 4): squared ``(y - a)^2``, hinge ``max(0, 1 - y a)``, logistic
``log(1 + exp(-y a))``; dual term ``-c loss*(-alpha/c; y)`` with
``loss*(u) = sup_a u a - loss(y, a)``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from mtl_jax.losses import LOSSES, dual_prox, get_loss

N_CASES = 40
XATOL = 1e-12  # bounded Brent tolerance on the argument


_JITTED = {}


def run_step(loss, *arrays):
    """``loss.dual_step`` under ``jax.jit`` (compiled once per loss and shape, to keep the file
    fast; eager calls are compared with jitted ones in ``test_dual_step_vectorised_and_jit``)."""
    if loss.name not in _JITTED:
        _JITTED[loss.name] = jax.jit(loss.dual_step)
    return np.asarray(_JITTED[loss.name](*(jnp.asarray(v, dtype=jnp.float64) for v in arrays)))


# --- independent NumPy references -----------------------------------------------------------------

def np_value(name, y, a):
    if name == "squared":
        return (y - a) ** 2
    if name == "hinge":
        return np.maximum(0.0, 1.0 - y * a)
    if name == "logistic":
        return np.logaddexp(0.0, -y * a)
    raise AssertionError(name)


def np_conjugate(name, u, y):
    """``loss*(u) = sup_a u a - loss(y, a)``, numerically with scipy (where it is finite)."""
    def neg(a):
        return -(u * a - np_value(name, y, a))

    if name == "squared":
        # maximiser y + u/2; bracket it generously
        half = 10.0 + abs(u)
        lo, hi = y - half, y + half
    elif name == "hinge":
        lo, hi = -30.0, 30.0  # maximiser a = y (y a = 1) for 0 < s < 1
    else:
        lo, hi = -40.0, 40.0  # maximiser y log((1-s)/s), |.| < 37 for any float s in (0, 1)
    res = optimize.minimize_scalar(neg, bounds=(lo, hi), method="bounded",
                                   options={"xatol": XATOL, "maxiter": 2000})
    assert res.success
    return -res.fun


def np_dual_term(name, alpha, y, c):
    """Closed forms of docs/mathematics.md, section 4 (checked against ``np_conjugate`` in this file)."""
    if name == "squared":
        return alpha * y - alpha**2 / (4.0 * c)
    s = y * alpha / c
    if name == "hinge":
        return np.where((s >= -1e-15) & (s <= 1 + 1e-15), alpha * y, -np.inf)
    s = np.clip(s, 0.0, 1.0)
    return c * (special.entr(s) + special.entr(1.0 - s))


def feasible_interval(name, y, c):
    """The dual domain of alpha (None for squared: all reals)."""
    if name == "squared":
        return None
    return (min(0.0, c * y), max(0.0, c * y))


def random_labels(rng, name, n):
    """Targets: real (scaled normal) for squared loss, {-1, +1} for hinge and logistic."""
    return rng.normal(size=n) * 2.0 if name == "squared" else rng.choice([-1.0, 1.0], size=n)


def random_cases(rng, name, n=N_CASES, extreme=True):
    """Random (alpha, y, c, a, Q): alpha feasible, c in (0.01, 1), a in [-3, 3], Q in [0, 10];
    one case in eight has Q = 0, and (if ``extreme``) a few have extreme margins, margins next to
    the hinge kink, or tiny Q. Hinge alphas include the box ends. Note K = Q c < 10 here."""
    c = rng.uniform(0.01, 1.0, n)
    y = random_labels(rng, name, n)
    if name == "squared":
        alpha = rng.normal(size=n) * 2.0 * c
    else:
        s = rng.uniform(0.0, 1.0, n)
        if name == "hinge":
            s[::5] = 0.0
            s[1::5] = 1.0
        else:
            s = np.clip(s, 1e-3, 1 - 1e-3)
        alpha = y * s * c
    a = rng.uniform(-3.0, 3.0, n)
    Q = rng.uniform(0.0, 10.0, n)
    Q[::8] = 0.0
    if extreme:
        a[2::9] = 25.0 * rng.choice([-1.0, 1.0], size=a[2::9].shape)  # extreme margins
        a[3::9] = y[3::9] * (1.0 + 1e-9)  # right next to the hinge kink
        a[4::9] = 1e-9  # margin ~ 0
        Q[5::9] = 1e-6
    return alpha, y, c, a, Q


def step_objective(name, d, alpha, y, c, a, Q):
    return np_dual_term(name, alpha + d, y, c) - a * d - 0.5 * Q * d**2


def scipy_step(name, alpha, y, c, a, Q):
    """argmax_d dual_term(alpha + d) - a d - Q d^2/2 over the feasible d, with scipy."""
    def neg(d):
        return -step_objective(name, d, alpha, y, c, a, Q)

    box = feasible_interval(name, y, c)
    if box is None:
        # squared: strictly concave (curvature >= 1/(2c)); the maximiser lies within
        # |d| <= 2c(|y| + |a|) + |alpha|
        r = 2.0 * c * (abs(y) + abs(a)) + abs(alpha) + 1.0
        lo, hi = -r, r
    else:
        lo, hi = box[0] - alpha, box[1] - alpha
    res = optimize.minimize_scalar(neg, bounds=(lo, hi), method="bounded",
                                   options={"xatol": XATOL, "maxiter": 5000})
    d = res.x
    # bounded Brent never evaluates the end points exactly: compare with them too
    cands = [d, lo, hi]
    vals = [-neg(x) for x in cands]
    k = int(np.argmax(vals))
    return alpha + cands[k], vals[k]


# --- name lookup ----------------------------------------------------------------------------------

def test_get_loss_names():
    assert set(LOSSES) == {"squared", "hinge", "logistic"}
    for name in LOSSES:
        loss = get_loss(name)
        assert loss.name == name
        assert get_loss(loss) is loss
    assert get_loss("hinge").needs_pm1_labels and get_loss("logistic").needs_pm1_labels
    assert not get_loss("squared").needs_pm1_labels


def test_get_loss_unknown_raises():
    with pytest.raises(ValueError, match="loss"):
        get_loss("nope")


# --- value, derivative, curvature -----------------------------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
def test_value_matches_numpy(name, rng):
    n = 200
    y = random_labels(rng, name, n)
    a = np.concatenate([rng.uniform(-5, 5, n - 4), [-800.0, 800.0, 40.0, -40.0]])
    got = np.asarray(get_loss(name).value(jnp.asarray(y), jnp.asarray(a)))
    want = np_value(name, y, a)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", LOSSES)
def test_derivative_matches_finite_difference(name, rng):
    n = 200
    y = random_labels(rng, name, n)
    a = rng.uniform(-5, 5, n)
    if name == "hinge":
        a = np.where(np.abs(1.0 - y * a) > 1e-3, a, a + 0.5)  # away from the kink y a = 1
    loss = get_loss(name)
    h = 1e-6
    fd = (np_value(name, y, a + h) - np_value(name, y, a - h)) / (2 * h)
    got = np.asarray(loss.derivative(jnp.asarray(y), jnp.asarray(a)))
    np.testing.assert_allclose(got, fd, rtol=1e-7, atol=1e-8)


def test_hinge_subgradient_at_kink():
    # at y a = 1 the module's choice must lie in the subdifferential [-1, 0] * y
    loss = get_loss("hinge")
    for y in (-1.0, 1.0):
        g = float(loss.derivative(jnp.asarray(y), jnp.asarray(y)))
        assert 0.0 <= -y * g <= 1.0


@pytest.mark.parametrize("name", ["squared", "logistic"])
def test_curvature_bounds_second_derivative(name):
    curv = get_loss(name).curvature
    assert curv is not None and np.isfinite(curv) and curv > 0
    a = np.linspace(-12.0, 12.0, 4801)
    h = 1e-4
    for y in (-1.0, 1.0, 0.3):
        if name == "logistic" and y not in (-1.0, 1.0):
            continue
        f = np_value(name, y, a)
        second = (np_value(name, y, a + h) - 2 * f + np_value(name, y, a - h)) / h**2
        assert second.max() <= curv * (1 + 1e-5) + 1e-6
        # the contract is only an upper bound; a grossly slack one would slow every solver down
        # (the suprema are 2 and 1/4, attained at a = y and a = 0)
        assert second.max() >= 0.5 * curv


def test_hinge_has_no_curvature():
    assert get_loss("hinge").curvature is None


# --- dual term against the numerical conjugate ----------------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
def test_dual_term_is_numerical_conjugate(name, rng):
    loss = get_loss(name)
    alpha, y, c, _, _ = random_cases(rng, name, n=N_CASES, extreme=False)
    if name == "hinge":
        # s in the open box (the sup is attained at a = y); the box ends are checked below
        s = rng.uniform(0.01, 0.99, N_CASES)
        alpha = y * s * c
    got = np.asarray(loss.dual_term(jnp.asarray(alpha), jnp.asarray(y), jnp.asarray(c)))
    # hinge: the sup sits on the kink, where bounded Brent (relative x-tolerance ~1.5e-8) loses
    # accuracy linearly, not quadratically
    tol = 1e-7 if name == "hinge" else 1e-9
    for i in range(N_CASES):
        want = -c[i] * np_conjugate(name, -alpha[i] / c[i], y[i])
        assert got[i] == pytest.approx(want, rel=tol, abs=tol * c[i]), (i, alpha[i], y[i], c[i])


@pytest.mark.parametrize("name", ["hinge", "logistic"])
def test_dual_term_box_ends(name):
    # s = 0 and s = 1: the sup is a limit; closed forms 0 (s = 0) and c (hinge) / 0 (logistic) at
    # s = 1
    loss = get_loss(name)
    for y in (-1.0, 1.0):
        for c in (0.05, 0.7):
            assert float(loss.dual_term(jnp.asarray(0.0), jnp.asarray(y), jnp.asarray(c))) == \
                pytest.approx(0.0, abs=1e-15)
            want = c if name == "hinge" else 0.0
            assert float(loss.dual_term(jnp.asarray(c * y), jnp.asarray(y), jnp.asarray(c))) == \
                pytest.approx(want, abs=1e-15)
            # and the numerical conjugate tends to the same limit
            for s in (1e-7, 1 - 1e-7):
                num = -c * np_conjugate(name, -y * s, y)
                lim = (c * s if name == "hinge" else 0.0)
                assert num == pytest.approx(lim, abs=1e-5 * c)


def test_np_dual_term_reference_matches_conjugate(rng):
    # the closed forms used as the reference for dual_step / dual_prox are themselves checked
    for name in LOSSES:
        alpha, y, c, _, _ = random_cases(rng, name, n=10, extreme=False)
        if name == "hinge":
            alpha = y * rng.uniform(0.01, 0.99, 10) * c
        for i in range(10):
            want = -c[i] * np_conjugate(name, -alpha[i] / c[i], y[i])
            got = np_dual_term(name, alpha[i], y[i], c[i])
            assert got == pytest.approx(want, rel=1e-7, abs=1e-9)


# --- primal_to_dual: Fenchel-Young ----------------------------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
def test_primal_to_dual_fenchel_young(name, rng):
    loss = get_loss(name)
    n = N_CASES
    c = rng.uniform(0.01, 1.0, n)
    y = random_labels(rng, name, n)
    a = rng.uniform(-4, 4, n)
    a[:4] = [30.0, -30.0, 300.0, -300.0]
    if name == "hinge":
        a = np.where(np.abs(1.0 - y * a) > 1e-6, a, a + 0.25)
    alpha = np.asarray(loss.primal_to_dual(jnp.asarray(y), jnp.asarray(a), jnp.asarray(c)))
    assert np.all(np.isfinite(alpha))
    if name != "squared":
        s = y * alpha / c
        assert np.all((s >= 0.0) & (s <= 1.0))
    # -c loss'(y, a) (hinge: the subgradient choice)
    h = 1e-6
    fd = (np_value(name, y, a + h) - np_value(name, y, a - h)) / (2 * h)
    np.testing.assert_allclose(alpha, -c * fd, rtol=1e-6, atol=1e-8)
    # Fenchel-Young equality with the independent reference dual term ...
    fy = c * np_value(name, y, a) - np_dual_term(name, alpha, y, c) + alpha * a
    scale = 1.0 + np.abs(alpha * a)
    np.testing.assert_allclose(fy / scale, 0.0, atol=1e-12)
    # ... and with the module's dual term
    dt = np.asarray(loss.dual_term(jnp.asarray(alpha), jnp.asarray(y), jnp.asarray(c)))
    fy2 = c * np_value(name, y, a) - dt + alpha * a
    np.testing.assert_allclose(fy2 / scale, 0.0, atol=1e-12)
    # ... and with the numerically computed conjugate at moderate margins
    for i in range(4, 14):
        if name == "logistic" and not (0 < y[i] * alpha[i] / c[i] < 1):
            continue
        conj = np_conjugate(name, -alpha[i] / c[i], y[i])
        assert c[i] * np_value(name, y[i], a[i]) + c[i] * conj + alpha[i] * a[i] == \
            pytest.approx(0.0, abs=1e-8)


def test_hinge_primal_to_dual_at_kink_is_feasible():
    loss = get_loss("hinge")
    for y in (-1.0, 1.0):
        alpha = float(loss.primal_to_dual(jnp.asarray(y), jnp.asarray(y), jnp.asarray(0.3)))
        assert 0.0 <= y * alpha <= 0.3
        # at the kink every feasible alpha satisfies Fenchel-Young: c*0 - alpha y + alpha y = 0
        assert 0.3 * np_value("hinge", y, y) - np_dual_term("hinge", alpha, y, 0.3) + alpha * y == \
            pytest.approx(0.0, abs=1e-15)


# --- dual_step against scipy ----------------------------------------------------------------------

def _check_steps(name, alpha, y, c, a, Q, got):
    for i in range(alpha.size):
        ref, ref_val = scipy_step(name, alpha[i], y[i], c[i], a[i], Q[i])
        d = got[i] - alpha[i]
        val = step_objective(name, d, alpha[i], y[i], c[i], a[i], Q[i])
        info = dict(i=i, alpha=alpha[i], y=y[i], c=c[i], a=a[i], Q=Q[i], got=got[i], ref=ref)
        assert np.isfinite(val), info
        assert val >= ref_val - 1e-10, (val, ref_val, info)
        # the maximiser is unique unless the objective is flat (hinge, Q = 0, y a = 1)
        flat = name == "hinge" and Q[i] == 0 and abs(1 - y[i] * a[i]) < 1e-12
        if not flat:
            assert got[i] == pytest.approx(ref, abs=1e-6 * max(1.0, abs(ref))), (val, ref_val, info)


@pytest.mark.parametrize("name", LOSSES)
def test_dual_step_matches_scipy(name, rng):
    loss = get_loss(name)
    alpha, y, c, a, Q = random_cases(rng, name)
    got = run_step(loss, alpha, y, c, a, Q)
    assert got.shape == alpha.shape
    _check_steps(name, alpha, y, c, a, Q, got)
    if name != "squared":
        s = y * got / c
        assert np.all((s >= 0.0) & (s <= 1.0)), s
    if name == "logistic":
        # |z| <= |Q alpha| + |a| <= 35 here, so sigmoid(z) is not rounded to 0 or 1
        assert np.all((s > 0.0) & (s < 1.0)), s


@pytest.mark.parametrize("name", LOSSES)
def test_dual_step_q_zero(name, rng):
    # Q = 0: the step maximises dual_term(alpha') - a alpha'; for squared and logistic that is the
    # Fenchel-Young partner of the margin a, i.e. -c loss'(y, a); for hinge the box end that the
    # sign of 1 - y a picks.
    loss = get_loss(name)
    n = N_CASES
    alpha, y, c, a, _ = random_cases(rng, name, n=n, extreme=False)
    Q = np.zeros(n)
    got = run_step(loss, alpha, y, c, a, Q)
    _check_steps(name, alpha, y, c, a, Q, got)
    h = 1e-6
    fd = (np_value(name, y, a + h) - np_value(name, y, a - h)) / (2 * h)
    np.testing.assert_allclose(got, -c * fd, rtol=1e-6, atol=1e-9)


def test_logistic_dual_step_strictly_inside(rng):
    # moderate margins and curvatures (|z| well below 36): s = y alpha'/c stays in the open (0, 1)
    loss = get_loss("logistic")
    alpha, y, c, a, Q = random_cases(rng, "logistic", n=200, extreme=False)
    got = run_step(loss, alpha, y, c, a, Q)
    s = y * got / c
    assert np.all((s > 0.0) & (s < 1.0)), s


def test_logistic_dual_step_from_box_ends(rng):
    # starting from the (closed) ends of the box, as padding / clipped initial points may do
    loss = get_loss("logistic")
    n = N_CASES
    c = rng.uniform(0.01, 1.0, n)
    y = rng.choice([-1.0, 1.0], size=n)
    alpha = np.where(np.arange(n) % 2 == 0, 0.0, c * y)
    a = rng.uniform(-3.0, 3.0, n)
    Q = rng.uniform(0.1, 10.0, n)
    got = run_step(loss, alpha, y, c, a, Q)
    _check_steps("logistic", alpha, y, c, a, Q, got)


def logistic_step_root(alpha, y, c, a, Q):
    """The logistic coordinate step to machine precision, from its stationarity condition derived
    here: with s = y alpha'/c, d/ds [c H(s) - a y c s - Q c^2 (s - s0)^2 / 2] = 0, i.e.
    g(s) = log((1 - s)/s) - y a - Q c (s - s0) = 0, g strictly decreasing on (0, 1); brentq."""
    s0 = y * alpha / c

    def g(s):
        return np.log1p(-s) - np.log(s) - y * a - Q * c * (s - s0)

    lo, hi = 1e-300, 1.0 - 2.0**-53
    if g(lo) <= 0:
        return y * c * lo
    if g(hi) >= 0:
        return y * c * hi
    s = optimize.brentq(g, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    return y * c * s


def _logistic_cases(rng, n, K_lo, K_hi):
    c = rng.uniform(0.01, 1.0, n)
    y = rng.choice([-1.0, 1.0], size=n)
    alpha = y * c * rng.uniform(1e-3, 1 - 1e-3, n)
    a = rng.uniform(-3.0, 3.0, n)
    Q = rng.uniform(K_lo, K_hi, n) / c
    return alpha, y, c, a, Q


def test_logistic_dual_step_accuracy(rng):
    # In the brief's range (K = Q c < 10) the step must be at least as accurate as the module's own
    # worst-case argument promises: the root bracket [B - K, B] of z (alpha' = c y sigmoid(z)) has
    # width K, 30 safeguarded iterations are no worse than 30 bisections, so
    #     |z - z*| <= max(K, 1) 2^-30  =>  |alpha' - alpha'*| <= c/4 max(K, 1) 2^-30 .
    # (Safeguarded Newton on this smooth problem should in fact reach ~1e-15.)
    loss = get_loss("logistic")
    n = 200
    alpha, y, c, a, Q = _logistic_cases(rng, n, 0.0, 10.0)
    got = run_step(loss, alpha, y, c, a, Q)
    ref = np.array([logistic_step_root(*v) for v in zip(alpha, y, c, a, Q)])
    bound = c / 4 * np.maximum(Q * c, 1.0) * 2.0**-30 + 1e-15
    bad = np.nonzero(np.abs(got - ref) > bound)[0]
    assert bad.size == 0, [dict(alpha=alpha[i], y=y[i], c=c[i], a=a[i], Q=Q[i], K=Q[i] * c[i],
                                got=got[i], ref=ref[i], err_over_c=abs(got[i] - ref[i]) / c[i])
                           for i in bad[:5]]


@pytest.mark.parametrize("K_range", [(10.0, 20.0), (20.0, 100.0), (100.0, 1e4)])
def test_logistic_dual_step_large_curvature(rng, K_range):
    # K = Q c beyond 10 is ordinary in practice: Q = q_t ||x||^2 with q_t up to 1/lam1 and
    # ||x||^2 ~ d, c = 1/n_t; and dual_prox uses Q = 1/step. The step must still be the maximiser.
    loss = get_loss("logistic")
    n = N_CASES
    alpha, y, c, a, Q = _logistic_cases(rng, n, *K_range)
    got = run_step(loss, alpha, y, c, a, Q)
    ref = np.array([logistic_step_root(*v) for v in zip(alpha, y, c, a, Q)])
    err = np.abs(got - ref) / c
    bad = np.nonzero(err > 1e-8)[0]
    assert bad.size == 0, (f"{bad.size}/{n} wrong, worst |alpha - alpha*|/c = {err.max():.3g}",
                           [dict(alpha=alpha[i], y=y[i], c=c[i], a=a[i], Q=Q[i], K=Q[i] * c[i],
                                 got=got[i], ref=ref[i]) for i in bad[:3]])


def test_logistic_dual_step_regression_two_cycle():
    # One concrete case (K = Q c = 44.8): the safeguarded Newton iteration alternates between
    # z ~ -2.80 and z ~ 9.55 inside the bracket for all 30 iterations and returns s = 0.057,
    # while the maximiser has s = 0.890 (objective short by ~4).
    loss = get_loss("logistic")
    args = (-0.21584527581303423, -1.0, 0.23320759035772468, 0.49388478844621275,
            192.28840101889745)
    got = float(run_step(loss, *args))
    ref = logistic_step_root(*args)
    ref2, _ = scipy_step("logistic", *args)
    assert ref == pytest.approx(ref2, abs=1e-7)
    assert got == pytest.approx(ref, abs=1e-10), (got, ref)


@pytest.mark.parametrize("name", LOSSES)
def test_dual_step_increases_dual_objective(name, rng):
    # the step never decreases its own objective (d = 0 is feasible)
    loss = get_loss(name)
    alpha, y, c, a, Q = random_cases(rng, name)
    got = run_step(loss, alpha, y, c, a, Q)
    new = step_objective(name, got - alpha, alpha, y, c, a, Q)
    old = step_objective(name, 0.0 * alpha, alpha, y, c, a, Q)
    assert np.all(new >= old - 1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_dual_step_vectorised_and_jit(name, rng):
    # alpha, y, a of shape (5, 7); c of shape (5, 1) and Q of shape (1, 7) broadcast against them
    loss = get_loss(name)
    shape = (5, 7)
    alpha, y, _, a, _ = (v.reshape(shape) for v in random_cases(rng, name, n=35))
    c = rng.uniform(0.01, 1.0, (5, 1))
    Q = rng.uniform(0.0, 10.0, (1, 7))
    Q[0, 0] = 0.0
    if name != "squared":
        alpha = y * c * rng.uniform(0.0, 1.0, shape)  # feasible for the broadcast c
    args = tuple(jnp.asarray(v) for v in (alpha, y, c, a, Q))
    batch = np.asarray(loss.dual_step(*args))  # eager
    assert batch.shape == shape
    # elementwise: one scalar call per entry (jitted once for 0-d inputs, to keep the file fast)
    scalar_step = jax.jit(loss.dual_step)
    single = np.array([[float(scalar_step(*(jnp.asarray(v) for v in
                                            (alpha[i, j], y[i, j], c[i, 0], a[i, j], Q[0, j]))))
                        for j in range(shape[1])] for i in range(shape[0])])
    np.testing.assert_allclose(batch, single, rtol=1e-12, atol=1e-15)
    jitted = np.asarray(jax.jit(loss.dual_step)(*args))
    np.testing.assert_allclose(jitted, batch, rtol=1e-12, atol=1e-15)
    # vmap over the leading axis (c row by row, Q shared)
    vargs = (args[0], args[1], args[2][:, 0], args[3], args[4][0])
    vmapped = np.asarray(jax.jit(jax.vmap(loss.dual_step, in_axes=(0, 0, 0, 0, None)))(*vargs))
    np.testing.assert_allclose(vmapped, batch, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", LOSSES)
def test_other_functions_jit_and_broadcast(name, rng):
    loss = get_loss(name)
    alpha, y, _, a, _ = (v.reshape(5, 7) for v in random_cases(rng, name, n=35, extreme=False))
    c = rng.uniform(0.01, 1.0, (5, 1))
    alpha = y * c * rng.uniform(0.0, 1.0, (5, 7))
    ja, jy, jc, jm = (jnp.asarray(v) for v in (alpha, y, c, a))
    want = {"value": np_value(name, y, a), "dual_term": np_dual_term(name, alpha, y, c)}
    for key, f, args in (("value", loss.value, (jy, jm)), ("derivative", loss.derivative, (jy, jm)),
                         ("dual_term", loss.dual_term, (ja, jy, jc)),
                         ("primal_to_dual", loss.primal_to_dual, (jy, jm, jc))):
        got = np.asarray(jax.jit(f)(*args))
        assert got.shape == (5, 7), key
        if key in want:
            np.testing.assert_allclose(got, want[key], rtol=1e-12, atol=1e-15, err_msg=key)


# --- dual_prox ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
def test_dual_prox_matches_scipy(name, rng):
    loss = get_loss(name)
    n = N_CASES
    c = rng.uniform(0.01, 1.0, n)
    y = random_labels(rng, name, n)
    # possibly outside the dual box
    beta = rng.uniform(-2.0, 2.0, n) * (c if name != "squared" else 1.0) * 1.5
    step = np.exp(rng.uniform(np.log(0.01), np.log(10.0), n))
    got = np.asarray(dual_prox(loss, *(jnp.asarray(v) for v in (beta, y, c, step))))
    for i in range(n):
        def neg(al, i=i):
            return -(np_dual_term(name, al, y[i], c[i]) - (al - beta[i]) ** 2 / (2 * step[i]))

        box = feasible_interval(name, y[i], c[i])
        if box is None:
            r = abs(beta[i]) + step[i] * abs(y[i]) + 1.0
            box = (-r, r)
        res = optimize.minimize_scalar(neg, bounds=box, method="bounded",
                                       options={"xatol": XATOL, "maxiter": 5000})
        cands = [res.x, box[0], box[1]]
        vals = [-neg(x) for x in cands]
        k = int(np.argmax(vals))
        info = dict(i=i, beta=beta[i], y=y[i], c=c[i], step=step[i], got=got[i], ref=cands[k])
        assert -neg(got[i]) >= vals[k] - 1e-10, info
        assert got[i] == pytest.approx(cands[k], abs=1e-6 * max(1.0, abs(cands[k]))), info


def test_dual_prox_logistic_small_step(rng):
    # Small prox steps mean Q = 1/step large (K = c/step up to 100 here): the logistic prox must
    # still be the maximiser (reference: the stationarity root, with beta possibly outside the box).
    loss = get_loss("logistic")
    n = N_CASES
    c = rng.uniform(0.01, 1.0, n)
    y = rng.choice([-1.0, 1.0], size=n)
    beta = rng.uniform(-1.5, 1.5, n) * c
    step = c / rng.uniform(10.0, 100.0, n)
    got = np.asarray(dual_prox(loss, *(jnp.asarray(v) for v in (beta, y, c, step))))
    ref = np.array([logistic_step_root(b, yy, cc, 0.0, 1.0 / st)
                    for b, yy, cc, st in zip(beta, y, c, step)])
    err = np.abs(got - ref) / c
    assert np.all(err <= 1e-8), (f"{np.sum(err > 1e-8)}/{n} wrong, worst |alpha - alpha*|/c = "
                                 f"{err.max():.3g}")
