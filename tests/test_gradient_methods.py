"""Gradient-manipulation methods (mtl_jax.gradient_methods) against NumPy references written from the papers'
equations, working on the gradient vectors themselves (the module works on their Gram matrix)."""
import functools
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from mtl_jax import gradient_methods as gm

KKT_TOL = 1e-6


def grads(rng, K, P=8):
    return rng.normal(size=(K, P))


@functools.lru_cache(maxsize=None)
def _method(name, items=()):
    """(method, jitted update) of ``get(name, **dict(items))``, built once: the tests share compilations."""
    method = gm.get(name, **dict(items))
    return method, jax.jit(method.update)


def method_and_update(name, **kwargs):
    """Cached by the arguments that differ from the factory's defaults (a default passed explicitly or not
    gives the same compiled update)."""
    defaults = {k: p.default for k, p in inspect.signature(getattr(gm, name)).parameters.items()}
    return _method(name, tuple(sorted((k, v) for k, v in kwargs.items() if defaults.get(k, object()) != v)))


def run(name, g, key=0, steps=1, **kwargs):
    """``steps`` jitted updates of method ``name`` on the same gradients; returns (direction, state) of the last."""
    method, update = method_and_update(name, **kwargs)
    state = method.init(g.shape[0], jax.random.key(key))
    for _ in range(steps):
        d, state = update(jnp.asarray(g), state)
    return np.asarray(d), state


@functools.partial(jax.jit, static_argnums=(1,))
def _subkey(key, step):
    for _ in range(step + 1):
        key, sub = jax.random.split(key)
    return sub


def subkey(key_seed, step=0):
    """The key a random method uses at update ``step`` (0-based): ``key, sub = split(key)`` at every update."""
    return _subkey(jax.random.key(key_seed), step)


orders = jax.jit(gm.task_orders, static_argnums=(1,))
uniform = jax.jit(jax.random.uniform, static_argnums=(1, 2))


# ----------------------------------------------------------------------------------------------- MGDA


def np_min_norm(g):
    """Min-norm point of the convex hull of the rows of g, by enumerating the support (exact for small K):
    on a support S the equality-constrained minimiser is alpha_S = M_SS^{-1} 1 / (1^T M_SS^{-1} 1); the answer
    is the one with alpha >= 0 that satisfies g_j . d >= ||d||^2 for every j (the KKT conditions)."""
    K = g.shape[0]
    M = g @ g.T
    best = None
    for r in range(1, K + 1):
        for S in itertools.combinations(range(K), r):
            S = list(S)
            try:
                x = np.linalg.solve(M[np.ix_(S, S)], np.ones(r))
            except np.linalg.LinAlgError:
                continue
            if x.sum() <= 0:
                continue
            alpha = np.zeros(K)
            alpha[S] = x / x.sum()
            d = alpha @ g
            if alpha.min() >= -1e-12 and np.all(g @ d >= d @ d - 1e-9):
                if best is None or d @ d < best[1] @ best[1]:
                    best = (alpha, d)
    return best


def test_mgda_two_tasks_matches_the_closed_form(rng):
    for _ in range(3):
        g = grads(rng, 2)
        g1, g2 = g
        a = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)
        d, state = run("mgda", g)
        np.testing.assert_allclose(d, a * g1 + (1 - a) * g2, atol=1e-8)
        np.testing.assert_allclose(np.asarray(state.weights), [a, 1 - a], atol=1e-8)
    # one gradient inside the other's half-space: the shorter one is the min-norm point
    g = np.stack([np.ones(4), 3 * np.ones(4)])
    d, _ = run("mgda", g[:, :4].repeat(2, axis=1))
    np.testing.assert_allclose(d, np.ones(8), atol=1e-10)


def test_mgda_matches_the_enumerated_min_norm_point_and_meets_kkt(rng):
    g = grads(rng, 3)
    alpha_ref, d_ref = np_min_norm(g)
    d, state = run("mgda", g)
    alpha = np.asarray(state.weights)
    np.testing.assert_allclose(d, d_ref, atol=1e-7)
    np.testing.assert_allclose(alpha, alpha_ref, atol=1e-6)
    # KKT of min alpha^T M alpha on the simplex, with multiplier ||d||^2: g_k . d >= ||d||^2, equality where alpha_k > 0
    slack = g @ d - d @ d
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12
    assert slack.min() >= -KKT_TOL
    assert np.sum(alpha * slack) <= KKT_TOL
    assert float(state.gap) <= 1e-9


def test_mgda_frank_wolfe_reaches_the_same_point(rng):
    g = grads(rng, 3)
    d_ref = np_min_norm(g)[1]
    d, state = run("mgda", g, solver="frank_wolfe", max_iter=20000, tol=1e-9)
    np.testing.assert_allclose(d, d_ref, atol=1e-4)
    # two tasks: the first Frank-Wolfe step's exact line search already lands on the closed form
    g2 = grads(rng, 2)
    a = np.clip((g2[1] - g2[0]) @ g2[1] / ((g2[0] - g2[1]) @ (g2[0] - g2[1])), 0.0, 1.0)
    np.testing.assert_allclose(run("mgda", g2, solver="frank_wolfe", max_iter=20000, tol=1e-9)[0],
                               a * g2[0] + (1 - a) * g2[1], atol=1e-10)


@pytest.mark.parametrize("normalization", ["l2", "loss+"])
def test_mgda_normalised_gradients_give_alpha_applied_to_raw_gradients(rng, normalization):
    g = grads(rng, 3) * np.array([[1.0], [5.0], [0.2]])
    losses = np.array([0.5, 2.0, 1.5])
    norms = np.linalg.norm(g, axis=1)
    n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    alpha_ref, _ = np_min_norm(g / n[:, None])
    method, update = method_and_update("mgda", normalization=normalization)
    d, state = update(jnp.asarray(g), method.init(3), losses=jnp.asarray(losses))
    np.testing.assert_allclose(np.asarray(state.weights), alpha_ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d), alpha_ref @ g, atol=1e-6)
    assert method.needs == (("losses",) if normalization != "l2" else ())


def test_mgda_ub_pulled_back_through_the_trunk_equals_the_weighted_parameter_gradient(rng):
    """MGDA-UB: the solver on feature gradients; vjp of the z-direction = grad of sum_k alpha_k L_k."""
    x, W = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.normal(size=(4, 5)))
    heads = jnp.asarray(rng.normal(size=(3, 5)))
    y = jnp.asarray(rng.normal(size=(3, 6)))

    def trunk(W):
        return jnp.tanh(x @ W)

    def head_losses(z, heads):
        return jnp.mean((z @ heads.T - y.T) ** 2, axis=0)

    method = gm.mgda_ub()

    @jax.jit
    def both(W, heads):
        z, trunk_vjp = jax.vjp(trunk, W)
        tg = gm.task_gradients(head_losses, z, heads)
        d_z, state = method.update(tg.shared, method.init(3))
        (g_W,) = trunk_vjp(tg.unravel(d_z))
        return g_W, jax.grad(lambda W: jnp.sum(state.weights * head_losses(trunk(W), heads)))(W)

    g_W, expected = both(W, heads)
    np.testing.assert_allclose(np.asarray(g_W), np.asarray(expected), atol=1e-12)
    assert method.name == "mgda_ub"


# ----------------------------------------------------------------------------------------------- PCGrad / GradVac


def np_pcgrad(g, orders):
    out = []
    for i in range(g.shape[0]):
        gi = g[i].copy()
        for j in orders[i]:
            dot = gi @ g[j]
            if dot < 0:
                gi = gi - dot / (g[j] @ g[j]) * g[j]
        out.append(gi)
    return np.sum(out, axis=0)


def test_pcgrad_two_tasks_does_not_depend_on_the_order(rng):
    g = grads(rng, 2)
    g[1] = -0.5 * g[0] + 0.3 * g[1]             # make them conflict
    assert g[0] @ g[1] < 0
    g1, g2 = g
    expected = (g1 - g1 @ g2 / (g2 @ g2) * g2) + (g2 - g1 @ g2 / (g1 @ g1) * g1)
    for seed in range(4):
        d, _ = run("pcgrad", g, key=seed)
        np.testing.assert_allclose(d, expected, atol=1e-12)


def test_pcgrad_matches_numpy_with_the_same_orders(rng):
    K = 3
    g = grads(rng, K)
    for seed in range(3):
        order = np.asarray(orders(subkey(seed), K))
        assert [sorted(row) for row in order] == [sorted(set(range(K)) - {i}) for i in range(K)]
        d, state = run("pcgrad", g, key=seed)
        np.testing.assert_allclose(d, np_pcgrad(g, order), atol=1e-12)
        np.testing.assert_allclose(np.asarray(state.weights) @ g, d, atol=1e-12)
    d_mean, _ = run("pcgrad", g, key=0, reduction="mean")
    np.testing.assert_allclose(d_mean, np_pcgrad(g, np.asarray(orders(subkey(0), K))) / K, atol=1e-12)


def np_gradvac(g, orders, targets, beta):
    targets = targets.copy()
    out = []
    for i in range(g.shape[0]):
        gi = g[i].copy()
        for j in orders[i]:
            phi = gi @ g[j] / (np.linalg.norm(gi) * np.linalg.norm(g[j]))
            t = targets[i, j]
            if phi < t:
                w = np.linalg.norm(gi) * (t * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - t ** 2)) / (
                    np.linalg.norm(g[j]) * np.sqrt(1 - t ** 2))
                gi = gi + w * g[j]
            targets[i, j] = (1 - beta) * t + beta * phi
        out.append(gi)
    return np.sum(out, axis=0), targets


def test_gradvac_matches_numpy_over_several_steps(rng):
    K, beta = 3, 0.5
    gs = [grads(rng, K) for _ in range(4)]
    method, update = method_and_update("gradvac", beta=beta)
    state = method.init(K, jax.random.key(7))
    targets = np.zeros((K, K))
    for step, g in enumerate(gs):
        expected, targets = np_gradvac(g, np.asarray(orders(subkey(7, step), K)), targets, beta)
        d, state = update(jnp.asarray(g), state)
        np.testing.assert_allclose(np.asarray(d), expected, atol=1e-10)
        np.testing.assert_allclose(np.asarray(state.targets), targets, atol=1e-12)
    assert np.any(targets > 0)                 # some targets moved above 0: later steps did more than PCGrad


def test_gradvac_with_zero_targets_and_beta_zero_is_pcgrad(rng):
    g = grads(rng, 3)
    np.testing.assert_allclose(run("gradvac", g, key=3, beta=0.0)[0], run("pcgrad", g, key=3)[0], atol=1e-12)


# ----------------------------------------------------------------------------------------------- CAGrad


def np_cagrad(g, c, rescale=1):
    """The authors' ``cagrad_exact``: SLSQP on the dual objective over the simplex, then d."""
    K = g.shape[0]
    A = g @ g.T
    g0 = g.mean(0)
    sqrt_phi = c * np.linalg.norm(g0)
    b = np.full(K, 1.0 / K)

    def F(w):
        return w @ A @ b + sqrt_phi * np.sqrt(w @ A @ w)

    res = scipy.optimize.minimize(F, b, bounds=[(0, 1)] * K, method="SLSQP", options=dict(ftol=1e-15, maxiter=1000),
                                  constraints={"type": "eq", "fun": lambda w: w.sum() - 1})
    w = res.x
    gw = w @ g
    d = g0 + sqrt_phi / np.linalg.norm(gw) * gw
    return d / {0: 1.0, 1: 1 + c ** 2, 2: 1 + c}[rescale], w


@pytest.mark.parametrize("K,c", [(3, 0.4), (3, 1.5)])
def test_cagrad_matches_the_slsqp_reference_and_meets_kkt(rng, K, c):
    g = grads(rng, K)
    d_ref, _ = np_cagrad(g, c)
    d, state = run("cagrad", g, c=c)
    np.testing.assert_allclose(d, d_ref, atol=1e-5)
    # KKT of min F(w) on the simplex: grad F_k >= lambda, equality on the support (lambda = w . grad F)
    w = np.asarray(state.w)
    gw = w @ g
    gradF = g @ g.mean(0) + c * np.linalg.norm(g.mean(0)) * (g @ gw) / np.linalg.norm(gw)
    lam = w @ gradF
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    assert gradF.min() >= lam - KKT_TOL
    assert np.sum(w * (gradF - lam)) <= KKT_TOL
    # the direction it returns: d = (g0 + c ||g0|| g_w / ||g_w||) / (1 + c^2), and weights @ g = d
    np.testing.assert_allclose(d, (g.mean(0) + c * np.linalg.norm(g.mean(0)) * gw / np.linalg.norm(gw)) / (1 + c * c),
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(state.weights) @ g, d, atol=1e-12)
    # the primal problem: d (before rescaling) is on the sphere ||d - g0|| = c ||g0|| and no point of the
    # ball improves the worst task more (max_d min_i g_i . d is attained by the dual's d)
    d0 = d * (1 + c * c)
    np.testing.assert_allclose(np.linalg.norm(d0 - g.mean(0)), c * np.linalg.norm(g.mean(0)), rtol=1e-8)
    u = rng.normal(size=(2000, g.shape[1]))
    ball = g.mean(0) + c * np.linalg.norm(g.mean(0)) * u / np.linalg.norm(u, axis=1, keepdims=True)
    assert (ball @ g.T).min(axis=1).max() <= (g @ d0).min() + 1e-9


def test_cagrad_with_c_zero_is_the_mean_gradient(rng):
    g = grads(rng, 3)
    np.testing.assert_allclose(run("cagrad", g, c=0.0)[0], g.mean(0), atol=1e-12)


# ----------------------------------------------------------------------------------------------- IMTL-G


@pytest.mark.parametrize("K", [2, 3])
def test_imtl_g_matches_the_papers_closed_form_and_equalises_projections(rng, K):
    g = grads(rng, K)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    D = g[0] - g[1:]
    U = u[0] - u[1:]
    rest = g[0] @ U.T @ np.linalg.inv(D @ U.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    d, state = run("imtl_g", g)
    np.testing.assert_allclose(np.asarray(state.weights), alpha, atol=1e-10)
    np.testing.assert_allclose(d, alpha @ g, atol=1e-10)
    proj = u @ d
    np.testing.assert_allclose(proj, proj[0], atol=1e-10)


# ----------------------------------------------------------------------------------------------- GradDrop


def test_graddrop_matches_numpy_with_the_same_draws(rng):
    K, P = 3, 8
    g = grads(rng, K, P)
    g[:, :3] = 0.0                              # all-zero coordinates give 0
    for leak in (0.0, 0.3):
        d, _ = run("graddrop", g, key=5, leak=leak)
        U = np.asarray(uniform(subkey(5), (P,), jnp.float64))
        with np.errstate(invalid="ignore"):
            purity = 0.5 * (1 + np.where(np.abs(g).sum(0) > 0, g.sum(0) / np.abs(g).sum(0), 0.0))
        M = (purity > U) * (g > 0) + (purity < U) * (g < 0)
        np.testing.assert_allclose(d, ((leak + (1 - leak) * M) * g).sum(0), atol=1e-12)
        assert np.all(d[:3] == 0)


def test_graddrop_keeps_one_sign_per_coordinate(rng):
    g = grads(rng, 3)
    d, _ = run("graddrop", g, key=1)
    pos, neg = np.where(g > 0, g, 0).sum(0), np.where(g < 0, g, 0).sum(0)
    assert np.all(np.isclose(d, pos) | np.isclose(d, neg))


# ----------------------------------------------------------------------------------------------- Nash-MTL


@pytest.mark.parametrize("K", [2, 3])
def test_nash_mtl_solves_the_bargaining_equations(rng, K):
    g = grads(rng, K)
    d, state = run("nash_mtl", g)
    alpha = np.asarray(state.weights)
    M = g @ g.T
    # KKT / first-order conditions of F(alpha) = alpha^T M alpha / 2 - sum log alpha: alpha_k (M alpha)_k = 1
    assert alpha.min() > 0
    np.testing.assert_allclose(alpha * (M @ alpha), 1.0, atol=KKT_TOL)
    np.testing.assert_allclose(g @ d, 1.0 / alpha, rtol=KKT_TOL)      # g_k . d = 1 / alpha_k
    # an independent solver of the same convex problem
    res = scipy.optimize.minimize(lambda a: (0.5 * a @ M @ a - np.log(a).sum(), M @ a - 1 / a), np.ones(K),
                                  jac=True, method="L-BFGS-B", bounds=[(1e-12, None)] * K,
                                  options=dict(gtol=1e-13, ftol=1e-15, maxiter=10000))
    np.testing.assert_allclose(alpha, res.x, rtol=1e-5)


def test_nash_mtl_warm_start_and_max_norm(rng):
    g = grads(rng, 3)
    _, state = run("nash_mtl", g)
    _, state2 = run("nash_mtl", g, steps=2)
    assert int(state2.iterations) <= 1                 # warm start at the solution
    np.testing.assert_allclose(np.asarray(state2.weights), np.asarray(state.weights), rtol=1e-10)
    d, _ = run("nash_mtl", g)
    dc, _ = run("nash_mtl", g, max_norm=0.1)
    np.testing.assert_allclose(dc, d * 0.1 / np.linalg.norm(d), atol=1e-12)


# ----------------------------------------------------------------------------------------------- Aligned-MTL


def np_aligned(g, scale="min"):
    """G = U S V^T; G_hat = sigma U V^T (rank-r part, r by the authors' eigenvalue rule); d = G_hat^T 1."""
    U, S, Vt = np.linalg.svd(g, full_matrices=False)
    keep = S ** 2 > (S ** 2).max() * g.shape[0] * np.finfo(float).eps
    U, S, Vt = U[:, keep], S[keep], Vt[keep]
    sigma = {"min": S.min(), "median": np.median(S), "rmse": np.sqrt(np.mean(S ** 2))}[scale]
    return (sigma * U @ Vt).sum(0)


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_matches_the_svd_form(rng, scale):
    g = grads(rng, 3)
    np.testing.assert_allclose(run("aligned_mtl", g, scale=scale)[0], np_aligned(g, scale), atol=1e-10)


def test_aligned_mtl_drops_null_directions_of_rank_deficient_gradients(rng):
    g = grads(rng, 3)
    g = np.concatenate([g, g[:1]])               # K = 4, rank 3
    d, _ = run("aligned_mtl", g)
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d, np_aligned(g), atol=1e-10)
    # the aligned gradients have equal norms and are orthogonal: G_hat G_hat^T = sigma^2 (projector)
    U, S, Vt = np.linalg.svd(g, full_matrices=False)
    Gh = S[2] * U[:, :3] @ Vt[:3]
    np.testing.assert_allclose(Gh @ Gh.T, S[2] ** 2 * U[:, :3] @ U[:, :3].T, atol=1e-10)


# ----------------------------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("name", gm.METHODS)
def test_jit_and_vmap_over_seeds_give_the_numbers_of_a_loop(rng, name):
    K, seeds, steps = 3, [0, 1, 2], 2
    gs = rng.normal(size=(steps, len(seeds), K, 8))
    method, update = method_and_update(name)
    loop = []
    for s_i, s in enumerate(seeds):
        state = method.init(K, jax.random.key(s))
        out = []
        for t in range(steps):
            d, state = update(jnp.asarray(gs[t, s_i]), state)
            out.append(np.asarray(d))
        loop.append(out)
    states = jax.vmap(lambda k: method.init(K, k))(jax.vmap(jax.random.key)(jnp.asarray(seeds)))
    step = jax.jit(jax.vmap(method.update))
    vm = []
    for t in range(steps):
        d, states = step(jnp.asarray(gs[t]), states)
        vm.append(np.asarray(d))
    np.testing.assert_allclose(np.stack(vm, 1), np.array(loop), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("name", gm.METHODS)
def test_state_is_a_scan_carry_and_the_direction_takes_the_gradients_dtype(name, K):
    """The new state has the structure, shapes and dtypes of the old one (what a lax.scan carry needs), also
    for float32 gradients and a float64 state, and for a single task; the direction has the gradients' dtype
    (traced only)."""
    method = gm.get(name)
    state = method.init(K, jax.random.key(0))
    d, new = jax.eval_shape(method.update, jax.ShapeDtypeStruct((K, 16), jnp.float32), state)
    assert d.shape == (16,) and d.dtype == jnp.float32
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_solvers_in_float32_reach_the_float64_answer_on_large_gradients(rng):
    """float32 gradients of norm ~1e3 (the solvers normalise the Gram matrix; a float32 stopping rule
    that cannot be met, or a badly scaled start, would stall at the iteration cap)."""
    g = 300.0 * grads(rng, 3)
    for name, cap in (("mgda", 250), ("cagrad", 500), ("nash_mtl", 50)):
        d64, _ = run(name, g)
        d32, state = run(name, g.astype(np.float32))
        assert d32.dtype == np.float32
        np.testing.assert_allclose(d32, d64, rtol=1e-3, atol=1e-3 * np.abs(d64).max())
        assert int(state.iterations) < cap


def test_task_gradients_matches_jacrev_in_both_modes_and_heads_keep_their_own_gradients(rng):
    x = jnp.asarray(rng.normal(size=(5, 3)))
    shared = {"W": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.zeros(4)}
    heads = jnp.asarray(rng.normal(size=(2, 4)))

    def loss_fn(shared, heads):
        h = jnp.tanh(x @ shared["W"] + shared["b"])
        return jnp.mean((h @ heads.T) ** 2, axis=0) + jnp.array([0.0, 1.0])

    def both_modes(s, h):
        out = []
        for mode in ("vmap", "loop"):
            t = gm.task_gradients(loss_fn, s, h, mode=mode)
            out.append((t._replace(unravel=None), t.unravel(t.shared[1])))
        return out

    (tg, unravel), (tg_loop, _) = jax.jit(both_modes)(shared, heads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12), tg, tg_loop)
    jac = jax.jit(jax.jacrev(loss_fn))(shared, heads)
    expected = np.concatenate([np.asarray(jac["W"]).reshape(2, -1), np.asarray(jac["b"])], axis=1)
    flat = np.asarray(tg.shared)
    assert flat.shape == (2, 16)
    np.testing.assert_allclose(np.sort(flat, axis=1), np.sort(expected, axis=1), atol=1e-12)
    np.testing.assert_allclose(np.asarray(unravel["W"]), np.asarray(jac["W"][1]), atol=1e-12)
    heads_grad = jax.jit(jax.grad(lambda h: loss_fn(shared, h).sum()))(heads)
    np.testing.assert_allclose(np.asarray(tg.heads), np.asarray(heads_grad), atol=1e-12)
    np.testing.assert_allclose(np.asarray(tg.losses), np.asarray(loss_fn(shared, heads)))


# ----------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name,kwargs,argument", [
    ("mgda", dict(normalization="max"), "normalization"),
    ("mgda", dict(solver="newton"), "solver"),
    ("mgda", dict(max_iter=0), "max_iter"),
    ("mgda", dict(tol=-1.0), "tol"),
    ("pcgrad", dict(reduction="max"), "reduction"),
    ("cagrad", dict(c=-0.1), "c"),
    ("cagrad", dict(rescale=3), "rescale"),
    ("gradvac", dict(beta=1.5), "beta"),
    ("graddrop", dict(leak=-0.1), "leak"),
    ("graddrop", dict(leak=2.0), "leak"),
    ("nash_mtl", dict(max_norm=0.0), "max_norm"),
    ("nash_mtl", dict(max_iter=1.5), "max_iter"),
    ("aligned_mtl", dict(scale="mean"), "scale"),
])
def test_factories_reject_bad_hyper_parameters_by_name(name, kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        gm.get(name, **kwargs)


@pytest.mark.parametrize("name", gm.METHODS)
def test_update_rejects_task_grads_of_the_wrong_shape_also_under_jit(name):
    method = gm.get(name)
    state = method.init(3, jax.random.key(0))
    for bad in (jnp.ones((4, 5)), jnp.ones((5,)), jnp.ones((3, 5, 2))):
        with pytest.raises(ValueError, match="^task_grads"):
            jax.jit(method.update)(bad, state)


def test_init_and_get_reject_bad_arguments():
    for name in gm.RANDOM_METHODS:
        with pytest.raises(ValueError, match="^key"):
            gm.get(name).init(3)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="^num_tasks"):
            gm.mgda().init(bad)
    with pytest.raises(ValueError, match="^name"):
        gm.get("sgd")
    with pytest.raises(ValueError, match="^losses"):
        method = gm.mgda(normalization="loss")
        method.update(jnp.ones((3, 4)), method.init(3))
    with pytest.raises(ValueError, match="^loss_fn"):
        gm.task_gradients(lambda s, h: jnp.sum(s), jnp.ones(3))
    with pytest.raises(ValueError, match="^mode"):
        gm.task_gradients(lambda s, h: s, jnp.ones(3), mode="jacfwd")
    assert set(gm.METHODS) == {"mgda", "mgda_ub", "pcgrad", "cagrad", "imtl_g", "gradvac", "graddrop", "nash_mtl",
                               "aligned_mtl"}
