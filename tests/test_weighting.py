"""Task-weighting schemes against NumPy re-implementations written here, on fixed loss sequences."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import weighting

K = 3

# A fixed sequence of positive task losses (6 updates, 3 tasks): task 0 falls fast, task 1 slowly,
# task 2 stalls and rises.
LOSSES = np.array([
    [2.00, 1.00, 0.50],
    [1.50, 0.95, 0.52],
    [1.00, 0.90, 0.55],
    [0.80, 0.88, 0.60],
    [0.50, 0.80, 0.58],
    [0.40, 0.79, 0.61],
])
# Per-step gradient norms of the unweighted task losses (for gradnorm).
GRAD_NORMS = np.array([
    [3.0, 1.0, 0.2],
    [2.5, 1.1, 0.3],
    [2.0, 1.2, 0.3],
    [1.8, 1.0, 0.4],
    [1.5, 0.9, 0.4],
    [1.2, 0.9, 0.5],
])


# Epochs of two updates for the schemes that work per epoch (dwa, gradnorm's L(0)): True at the last
# update of each epoch.
EPOCH_END = np.arange(len(LOSSES)) % 2 == 1
# The same batches' losses after the model step (famo's default, loss_change="same_batch").
LOSSES_AFTER = LOSSES * np.array([[0.9, 0.97, 1.02], [0.8, 0.99, 1.01], [0.85, 0.95, 1.05],
                                  [0.9, 0.96, 0.97], [0.7, 0.99, 1.03], [0.95, 0.98, 1.0]])


def np_k_softmax(x):
    e = np.exp(x - np.max(x))
    return len(x) * e / e.sum()


def extra_for(scheme, step, epoch_end=EPOCH_END):
    extra = {"grad_norms": jnp.asarray(GRAD_NORMS[step])} if "grad_norms" in scheme.needs else {}
    if "epoch_end" in scheme.needs:
        extra["epoch_end"] = jnp.asarray(epoch_end[step])
    return extra


def run(scheme, losses=LOSSES, key=0, update=None, after=None, epoch_end=EPOCH_END):
    """All weights of ``scheme`` over a loss sequence, and the states before each update (``after_step``,
    if the scheme has one, gets ``after``, by default the losses times the factors of LOSSES_AFTER)."""
    update = update or scheme.update
    if after is None:
        factors = np.resize(LOSSES_AFTER / LOSSES, losses.shape)
        after = losses * factors
    state = scheme.init(losses.shape[1], jax.random.key(key))
    weights, states = [], []
    for t, loss in enumerate(losses):
        states.append(state)
        w, state = update(jnp.asarray(loss), state, **extra_for(scheme, t, epoch_end))
        if scheme.after_step is not None:
            state = scheme.after_step(jnp.asarray(after[t]), state)
        weights.append(np.asarray(w))
    return np.array(weights), states


# ------------------------------------------------------------------------------------------------
# Every scheme
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", weighting.SCHEMES)
def test_weights_are_positive_and_sum_to_num_tasks(name):
    scheme = weighting.get(name)
    weights, states = run(scheme)
    assert np.all(weights > 0)
    if name == "uncertainty":
        s = np.array([np.asarray(st.log_vars) for st in states])
        np.testing.assert_allclose(weights, np.exp(-s) / 2, rtol=1e-12)
    else:
        np.testing.assert_allclose(weights.sum(axis=1), K, rtol=1e-12)


@pytest.mark.parametrize("name", weighting.SCHEMES)
def test_no_gradient_flows_through_the_weights(name):
    scheme = weighting.get(name)
    _, states = run(scheme)
    state, loss, extra = states[3], jnp.asarray(LOSSES[3]), extra_for(scheme, 3)

    def total(loss):
        w, _ = scheme.update(loss, state, **extra)
        return jnp.sum(w * loss)

    w, _ = scheme.update(loss, state, **extra)
    np.testing.assert_allclose(jax.grad(total)(loss), w, rtol=1e-12)


@pytest.mark.parametrize("name", weighting.SCHEMES)
def test_update_under_jit_matches_eager(name):
    scheme = weighting.get(name)
    eager, _ = run(scheme)
    jitted, _ = run(scheme, update=jax.jit(scheme.update))
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)


@pytest.mark.parametrize("name", weighting.SCHEMES)
def test_vmap_over_three_seeds_matches_three_separate_runs(name):
    scheme = weighting.get(name)
    seeds = np.array([0, 1, 2])
    scales = np.array([[1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [3.0, 0.2, 1.5]])
    losses = LOSSES[None, :4] * scales[:, None, :]  # (seed, step, task)

    separate = [run(scheme, losses[i], key=int(seeds[i]))[0] for i in range(3)]

    keys = jax.vmap(jax.random.key)(seeds)
    state = jax.vmap(lambda k: scheme.init(K, k))(keys)
    step = jax.jit(jax.vmap(scheme.update))
    after_step = jax.jit(jax.vmap(scheme.after_step)) if scheme.after_step is not None else None
    after = losses * (LOSSES_AFTER / LOSSES)[None, :4]
    vmapped = []
    for t in range(losses.shape[1]):
        extra = {n: jnp.broadcast_to(v, (3,) + v.shape) for n, v in extra_for(scheme, t).items()}
        w, state = step(jnp.asarray(losses[:, t]), state, **extra)
        if after_step is not None:
            state = after_step(jnp.asarray(after[:, t]), state)
        vmapped.append(np.asarray(w))
    vmapped = np.stack(vmapped, axis=1)  # (seed, step, task)
    np.testing.assert_allclose(vmapped, np.array(separate), rtol=1e-12)


@pytest.mark.parametrize("name", weighting.SCHEMES)
def test_state_is_a_scan_carry_and_weights_take_the_losses_dtype(name):
    scheme = weighting.get(name)
    losses = jnp.asarray(LOSSES, dtype=jnp.float32)
    norms = jnp.asarray(GRAD_NORMS, dtype=jnp.float32)
    after = jnp.asarray(LOSSES_AFTER, dtype=jnp.float32)

    def step(state, inputs):
        loss, g, end, a = inputs
        extra = {"grad_norms": g, "epoch_end": end}
        extra = {n: v for n, v in extra.items() if n in scheme.needs}
        weights, state = scheme.update(loss, state, **extra)
        if scheme.after_step is not None:
            state = scheme.after_step(a, state)
        return state, weights

    _, weights = jax.lax.scan(step, scheme.init(K, jax.random.key(0)), (losses, norms, jnp.asarray(EPOCH_END), after))
    assert weights.dtype == jnp.float32
    np.testing.assert_allclose(weights, run(scheme)[0], rtol=1e-5)


def test_init_rejects_a_bad_num_tasks():
    with pytest.raises(ValueError, match="num_tasks"):
        weighting.equal().init(0)


# ------------------------------------------------------------------------------------------------
# DWA
# ------------------------------------------------------------------------------------------------


def test_dwa_per_step_gives_ones_then_k_softmax_of_loss_ratios():
    T = 2.0
    weights, _ = run(weighting.dwa(temperature=T, per="step"))
    expected = [np.ones(K), np.ones(K)]
    for t in range(2, len(LOSSES)):
        expected.append(np_k_softmax((LOSSES[t - 1] / LOSSES[t - 2]) / T))
    np.testing.assert_allclose(weights, np.array(expected), rtol=1e-12)
    assert not np.allclose(weights[2:], 1.0)


# A longer sequence with epochs of unequal lengths (3, 2, 3, 1, 3 updates) for the per-epoch schemes.
LONG = np.exp(np.random.default_rng(5).normal(size=(12, K)) * 0.3) * np.linspace(2.0, 0.5, 12)[:, None]
LONG_NORMS = np.exp(np.random.default_rng(6).normal(size=(12, K)))
LONG_END = np.zeros(12, bool)
LONG_END[[2, 4, 7, 8, 11]] = True


def np_epoch_means(losses, epoch_end, present=None):
    """(E, K) mean of each task's losses over the updates of each closed epoch where it is present
    (NaN where it never is)."""
    present = np.ones(losses.shape, bool) if present is None else present
    means, start = [], 0
    for t in np.flatnonzero(epoch_end):
        p = present[start:t + 1]
        n = p.sum(axis=0)
        means.append(np.where(n > 0, np.where(p, losses[start:t + 1], 0.0).sum(axis=0) / np.maximum(n, 1), np.nan))
        start = t + 1
    return np.array(means)


def np_dwa_per_epoch(losses, epoch_end, T, present=None):
    """LibMTL's DWA: the weights of every update of epoch e from the epoch means of e-1 and e-2 (ones for
    e < 2); an epoch in which a task is never present carries its previous epoch mean."""
    means = np_epoch_means(losses, epoch_end, present)
    for e in range(1, len(means)):
        means[e] = np.where(np.isnan(means[e]), means[e - 1], means[e])
    epoch = np.concatenate([[0], np.cumsum(epoch_end)[:-1]])  # the epoch of each update
    out = []
    for e in epoch:
        out.append(np.ones(losses.shape[1]) if e < 2 else np_k_softmax((means[e - 1] / means[e - 2]) / T))
    return np.array(out)


def test_dwa_per_epoch_uses_the_means_of_the_last_two_epochs():
    scheme = weighting.dwa(temperature=1.5)
    assert scheme.needs == ("epoch_end",)
    weights, _ = run(scheme, LONG, epoch_end=LONG_END)
    expected = np_dwa_per_epoch(LONG, LONG_END, 1.5)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    np.testing.assert_array_equal(weights[:5], 1.0)  # epochs 0 and 1
    assert not np.allclose(weights[5:], 1.0)
    # hand-written for epoch 2 (updates 5..7): the means of updates 0..2 and 3..4
    r = LONG[3:5].mean(axis=0) / LONG[0:3].mean(axis=0)
    np.testing.assert_allclose(weights[6], 3 * np.exp(r / 1.5) / np.exp(r / 1.5).sum(), rtol=1e-12)


def test_dwa_per_epoch_with_tasks_absent_for_part_or_all_of_an_epoch():
    present = np.ones(LONG.shape, bool)
    present[5:8, 1] = False   # task 1 misses the whole of epoch 2
    present[3, 2] = False     # task 2 misses half of epoch 1
    garbage = np.where(present, LONG, np.nan)
    scheme = weighting.dwa(temperature=2.0)
    state, weights = scheme.init(K), []
    for t in range(len(LONG)):
        w, state = jax.jit(scheme.update)(jnp.asarray(garbage[t]), state, present=jnp.asarray(present[t]),
                                          epoch_end=jnp.asarray(LONG_END[t]))
        weights.append(np.asarray(w))
    np.testing.assert_allclose(np.array(weights), np_dwa_per_epoch(LONG, LONG_END, 2.0, present), rtol=1e-12)


def test_dwa_per_epoch_requires_epoch_end_and_per_is_checked():
    scheme = weighting.dwa()
    with pytest.raises(ValueError, match="^epoch_end"):
        scheme.update(jnp.asarray(LOSSES[0]), scheme.init(K))
    with pytest.raises(ValueError, match="^epoch_end"):
        scheme.update(jnp.asarray(LOSSES[0]), scheme.init(K), epoch_end=jnp.ones(2, bool))
    with pytest.raises(ValueError, match="per"):
        weighting.dwa(per="batch")
    assert weighting.dwa(per="step").needs == ()


# ------------------------------------------------------------------------------------------------
# FAMO
# ------------------------------------------------------------------------------------------------


def np_famo(losses, lr=0.025, gamma=1e-3, eps=1e-8, b1=0.9, b2=0.999, adam_eps=1e-8):
    """FAMO weights (rescaled to sum K) with the logit update of Cranial-XIX/FAMO famo.py:
    Adam with L2 weight decay on the gradient J_softmax(xi)^T delta."""
    k = losses.shape[1]
    xi, m, v, n = np.zeros(k), np.zeros(k), np.zeros(k), 0
    out = []
    for t, loss in enumerate(losses):
        if t > 0:
            delta = np.log(losses[t - 1] + eps) - np.log(loss + eps)
            z = np.exp(xi) / np.exp(xi).sum()
            jac = np.diag(z) - np.outer(z, z)          # d z_i / d xi_j, symmetric
            g = jac.T @ delta + gamma * xi             # torch Adam's weight_decay: L2 added to the grad
            n += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g ** 2
            xi = xi - lr * (m / (1 - b1 ** n)) / (np.sqrt(v / (1 - b2 ** n)) + adam_eps)
        z = np.exp(xi) / np.exp(xi).sum()
        c = 1.0 / np.sum(z / (loss + eps))
        out.append(k * c * z / (loss + eps))           # the paper's weights sum to 1; ours to K
    return np.array(out), xi


def test_famo_next_batch_matches_numpy_logit_update():
    weights, _ = run(weighting.famo(learning_rate=0.025, weight_decay=1e-3, loss_change="next_batch"))
    expected, _ = np_famo(LOSSES)
    np.testing.assert_allclose(weights, expected, rtol=1e-10)


def test_famo_next_batch_logits_match_numpy_with_a_large_learning_rate():
    scheme = weighting.famo(learning_rate=0.5, weight_decay=0.01, loss_change="next_batch")
    _, states = run(scheme)  # states[5] is the state before the last update
    w, state = scheme.update(jnp.asarray(LOSSES[5]), states[5])
    expected_w, expected_xi = np_famo(LOSSES, lr=0.5, gamma=0.01)
    np.testing.assert_allclose(state.logits, expected_xi, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(w, expected_w[-1], rtol=1e-10)
    assert np.ptp(expected_xi) > 0.1  # the logits really moved


def np_famo_same_batch(losses, after, lr, gamma, eps=1e-8, b1=0.9, b2=0.999, adam_eps=1e-8):
    """FAMO's Algorithm 1 / official loop: weights from the logits, model step, then
    delta = log D(theta_t) - log D(theta_{t+1}) on the SAME batch and an Adam (+ L2) logit step."""
    k = losses.shape[1]
    xi, m, v = np.zeros(k), np.zeros(k), np.zeros(k)
    out = []
    for t, (loss, loss_after) in enumerate(zip(losses, after)):
        z = np.exp(xi) / np.exp(xi).sum()
        out.append(k * (z / (loss + eps)) / np.sum(z / (loss + eps)))
        delta = np.log(loss + eps) - np.log(loss_after + eps)
        g = (np.diag(z) - np.outer(z, z)) @ delta + gamma * xi
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        xi = xi - lr * (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + adam_eps)
    return np.array(out), xi


def test_famo_same_batch_steps_the_logits_after_the_model_step():
    scheme = weighting.famo(learning_rate=0.3, weight_decay=0.01)
    assert scheme.after_step is not None and scheme.needs == ()
    weights, states = run(scheme, after=LOSSES_AFTER)
    _, state = scheme.update(jnp.asarray(LOSSES[-1]), states[-1])
    state = scheme.after_step(jnp.asarray(LOSSES_AFTER[-1]), state)
    expected, xi = np_famo_same_batch(LOSSES, LOSSES_AFTER, lr=0.3, gamma=0.01)
    np.testing.assert_allclose(weights, expected, rtol=1e-10)
    np.testing.assert_allclose(state.logits, xi, rtol=1e-10, atol=1e-14)
    assert np.ptp(xi) > 0.1
    # update alone does not move the logits; an absent task's delta is 0 (its loss after is ignored)
    np.testing.assert_array_equal(scheme.update(jnp.asarray(LOSSES[0]), states[3])[1].logits, states[3].logits)
    present = np.array([True, False, True])
    s1 = scheme.after_step(jnp.asarray([1.0, np.nan, 0.5]), states[3]._replace(prev_losses=jnp.asarray([1.2, 0.8, 0.5])),
                           present=jnp.asarray(present))
    z = np.exp(np.asarray(states[3].logits)) / np.exp(np.asarray(states[3].logits)).sum()
    delta = np.log(np.array([1.2, 0.8, 0.5]) + 1e-8) - np.log(np.array([1.0, 0.8, 0.5]) + 1e-8)
    expected_grad = z * (delta - z @ delta)
    ref = optax.chain(optax.add_decayed_weights(0.01), optax.adam(0.3))
    upd, _ = ref.update(jnp.asarray(expected_grad), states[3].opt_state, states[3].logits)
    np.testing.assert_allclose(s1.logits, np.asarray(states[3].logits) + np.asarray(upd), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="^losses_after"):
        scheme.after_step(jnp.ones(4), states[0])
    with pytest.raises(ValueError, match="loss_change"):
        weighting.famo(loss_change="next_step")


# ------------------------------------------------------------------------------------------------
# Uncertainty
# ------------------------------------------------------------------------------------------------


def test_uncertainty_closed_form_gradient_equals_autodiff(rng):
    s = rng.normal(size=K)
    loss = LOSSES[1]
    auto = jax.grad(lambda s: jnp.sum((jnp.exp(-s) * loss + s) / 2))(jnp.asarray(s))
    np.testing.assert_allclose(auto, (1 - np.exp(-s) * loss) / 2, rtol=1e-12)


def test_uncertainty_log_variance_step_equals_optax_step_on_closed_form_gradient():
    lr = 0.1
    scheme = weighting.uncertainty(learning_rate=lr)
    state = scheme.init(K)
    opt = optax.adam(lr)
    s = np.zeros(K)
    opt_state = opt.init(jnp.asarray(s))
    for loss in LOSSES:
        w, state = scheme.update(jnp.asarray(loss), state)
        np.testing.assert_allclose(w, np.exp(-s) / 2, rtol=1e-12)
        grad = (1 - np.exp(-s) * loss) / 2
        updates, opt_state = opt.update(jnp.asarray(grad), opt_state, jnp.asarray(s))
        s = s + np.asarray(updates)
        np.testing.assert_allclose(state.log_vars, s, rtol=1e-12, atol=1e-15)
    assert np.ptp(s) > 0.1


@pytest.mark.parametrize("initial", [0.0, -0.5, "loss"])
def test_uncertainty_kendall_forms_and_initialisations_match_numpy(initial):
    # Kendall et al. 2018: term c_k exp(-s_k) L_k + s_k / 2, c = 1 for classification (eq. 10), 1/2 for
    # regression (eq. 5); plain SGD on s, s(0) = the constant or log(2 c L(0)).
    lr, kinds = 0.4, ("classification", "regression", "classification")
    c = np.array([1.0, 0.5, 1.0])
    scheme = weighting.uncertainty(optimizer=optax.sgd(lr), initial=initial, kinds=kinds)
    weights, states = run(scheme)
    s = np.log(2 * c * LOSSES[0]) if initial == "loss" else np.full(K, initial)
    for t, loss in enumerate(LOSSES):
        np.testing.assert_allclose(weights[t], c * np.exp(-s), rtol=1e-12)
        s = s - lr * (0.5 - c * np.exp(-s) * loss)
    if initial == "loss":  # every task starts balanced: w_k L_k(0) = 1/2
        np.testing.assert_allclose(weights[0] * LOSSES[0], 0.5, rtol=1e-12)


def test_uncertainty_checks_its_new_arguments():
    with pytest.raises(ValueError, match="initial"):
        weighting.uncertainty(initial="log")
    with pytest.raises(ValueError, match="initial"):
        weighting.uncertainty(initial=float("inf"))
    with pytest.raises(ValueError, match="kinds"):
        weighting.uncertainty(kinds=("regression", "ranking", "regression"))
    with pytest.raises(ValueError, match="kinds"):
        weighting.uncertainty(kinds=("regression",)).init(K)


# ------------------------------------------------------------------------------------------------
# GradNorm
# ------------------------------------------------------------------------------------------------


def np_gradnorm(losses, norms, alpha, lr, floor, adam=False, skip_first=False):
    """Returns the weights used at each step (GradNorm Algorithm 1) and how often the floor bound.

    L(0) = losses[0]; with ``skip_first`` row 0 is L(0) only (the updates are rows 1..). The step on w
    is plain gradient descent, or Adam (b1 0.9, b2 0.999, eps 1e-8, bias-corrected)."""
    k = losses.shape[1]
    w = np.ones(k)
    m, v = np.zeros(k), np.zeros(k)
    out, floored = [], 0
    for t in range(int(skip_first), len(losses)):
        out.append(w.copy())
        ratio = losses[t] / losses[0]
        r = ratio / ratio.mean()
        gw = w * norms[t]
        target = gw.mean() * r ** alpha
        g = np.sign(gw - target) * norms[t]
        if adam:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g**2
            n = t + 1 - int(skip_first)
            step = (m / (1 - 0.9 ** n)) / (np.sqrt(v / (1 - 0.999 ** n)) + 1e-8)
        else:
            step = g
        w = w - lr * step
        floored += int(np.sum(w < floor))
        w = np.maximum(w, floor)
        w = k * w / w.sum()
    return np.array(out), floored


@pytest.mark.parametrize("lr", [0.05, 0.6])
def test_gradnorm_batch_matches_numpy(lr):
    weights, _ = run(weighting.gradnorm(alpha=1.5, learning_rate=lr, floor=1e-3, optimizer=optax.sgd(lr),
                                        initial="batch"))
    expected, floored = np_gradnorm(LOSSES, GRAD_NORMS, alpha=1.5, lr=lr, floor=1e-3)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    np.testing.assert_allclose(weights[0], 1.0)
    if lr == 0.6:
        assert floored > 0  # the floor was exercised


def test_gradnorm_batch_steps_the_weights_with_adam():
    weights, _ = run(weighting.gradnorm(alpha=1.5, learning_rate=0.025, floor=1e-3, initial="batch"))
    expected, _ = np_gradnorm(LOSSES, GRAD_NORMS, alpha=1.5, lr=0.025, floor=1e-3, adam=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-10)


@pytest.mark.parametrize("adam", [False, True])
def test_gradnorm_default_takes_l0_from_the_first_epoch_mean(adam):
    # LibMTL's GradNorm: equal weights and no step during the first epoch (updates 0..2 of LONG);
    # from then on Algorithm 1 with L(0) = that epoch's mean loss.
    lr = 0.025 if adam else 0.2
    scheme = weighting.gradnorm(alpha=1.2, learning_rate=lr, floor=1e-3, optimizer=None if adam else optax.sgd(lr))
    assert scheme.needs == ("grad_norms", "epoch_end")
    state, weights = scheme.init(K), []
    for t in range(len(LONG)):
        w, state = scheme.update(jnp.asarray(LONG[t]), state, grad_norms=jnp.asarray(LONG_NORMS[t]),
                                 epoch_end=jnp.asarray(LONG_END[t]))
        weights.append(np.asarray(w))
    l0 = LONG[:3].mean(axis=0)
    stepped, _ = np_gradnorm(np.vstack([l0, LONG[3:]]), np.vstack([LONG_NORMS[3], LONG_NORMS[3:]]), alpha=1.2,
                             lr=lr, floor=1e-3, adam=adam, skip_first=True)
    np.testing.assert_allclose(np.array(weights[:4]), 1.0)
    np.testing.assert_allclose(np.array(weights[3:]), stepped, rtol=1e-10)
    np.testing.assert_allclose(state.initial_losses, l0, rtol=1e-12)
    assert not np.allclose(weights[-1], 1.0)


def test_gradnorm_requires_grad_norms_and_epoch_end():
    scheme = weighting.gradnorm()
    assert scheme.needs == ("grad_norms", "epoch_end")
    with pytest.raises(ValueError, match="grad_norms"):
        scheme.update(jnp.asarray(LOSSES[0]), scheme.init(K), epoch_end=True)
    with pytest.raises(ValueError, match="^epoch_end"):
        scheme.update(jnp.asarray(LOSSES[0]), scheme.init(K), grad_norms=jnp.ones(K))
    with pytest.raises(ValueError, match="initial"):
        weighting.gradnorm(initial="first")


def test_extra_inputs_each_scheme_needs():
    needs = {n: weighting.get(n).needs for n in weighting.SCHEMES}
    assert {n: v for n, v in needs.items() if v} == {"dwa": ("epoch_end",), "gradnorm": ("grad_norms", "epoch_end")}
    assert {n for n in weighting.SCHEMES if weighting.get(n).after_step is not None} == {"famo"}


# ------------------------------------------------------------------------------------------------
# RLW
# ------------------------------------------------------------------------------------------------


def test_rlw_weights_are_k_softmax_of_normal_draws_from_the_state_key():
    key = jax.random.key(7)
    weights, _ = run(weighting.rlw(), key=7)
    for t in range(len(LOSSES)):
        key, sub = jax.random.split(key)
        z = np.asarray(jax.random.normal(sub, (K,), dtype=jnp.float64))
        np.testing.assert_allclose(weights[t], np_k_softmax(z), rtol=1e-12)


def test_rlw_same_key_same_weights_different_keys_differ():
    a, _ = run(weighting.rlw(), key=1)
    b, _ = run(weighting.rlw(), key=1)
    c, _ = run(weighting.rlw(), key=2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a[0], a[1])  # fresh draw at every update


def test_rlw_init_without_key_raises():
    with pytest.raises(ValueError, match="key"):
        weighting.rlw().init(K)


# ------------------------------------------------------------------------------------------------
# Huq and Pervin
# ------------------------------------------------------------------------------------------------

HUQ_MODES = ["raw", "relative", "ema"]


def np_huq_pervin(losses, temperature, mode, beta, signal_only=False):
    out, ema = [], None
    for loss in losses:
        ema = loss if ema is None else beta * ema + (1 - beta) * loss
        signal = {"raw": loss, "relative": loss / losses[0], "ema": ema}[mode]
        out.append(signal if signal_only else np_k_softmax(signal / temperature))
    return np.array(out)


@pytest.mark.parametrize("mode", HUQ_MODES)
def test_huq_pervin_matches_numpy(mode):
    weights, _ = run(weighting.huq_pervin(temperature=0.5, mode=mode, beta=0.8))
    np.testing.assert_allclose(weights, np_huq_pervin(LOSSES, 0.5, mode, 0.8), rtol=1e-12)


@pytest.mark.parametrize("mode", HUQ_MODES)
def test_huq_pervin_proportional_matches_numpy(mode):
    # the proportional reading: w_k = K a_k / sum_j a_j (raw: K L_k / sum_j L_j)
    weights, _ = run(weighting.huq_pervin(mode=mode, beta=0.8, rule="proportional"))
    signal = np_huq_pervin(LOSSES, 1.0, mode, 0.8, signal_only=True)
    np.testing.assert_allclose(weights, K * signal / signal.sum(axis=1, keepdims=True), rtol=1e-12)
    if mode == "raw":
        np.testing.assert_allclose(weights, K * LOSSES / LOSSES.sum(axis=1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("rule", ["softmax", "proportional"])
@pytest.mark.parametrize("mode", HUQ_MODES)
def test_huq_pervin_raising_a_loss_raises_its_weight(mode, rule):
    scheme = weighting.huq_pervin(temperature=0.5, mode=mode, rule=rule)
    _, states = run(scheme)
    state, loss = states[3], LOSSES[3]
    base, _ = scheme.update(jnp.asarray(loss), state)
    for k in range(K):
        bumped = loss.copy()
        bumped[k] += 0.3
        w, _ = scheme.update(jnp.asarray(bumped), state)
        assert w[k] > base[k]
        np.testing.assert_allclose(np.sum(w), K, rtol=1e-12)
        assert np.all(np.asarray(w) > 0)
    if mode == "raw":  # the higher the current loss, the higher the weight
        np.testing.assert_array_equal(np.argsort(np.asarray(base)), np.argsort(loss))


@pytest.mark.parametrize("mode", HUQ_MODES)
def test_huq_pervin_permuting_tasks_permutes_weights(mode):
    perm = np.array([2, 0, 1])
    scheme = weighting.huq_pervin(temperature=0.5, mode=mode)
    weights, _ = run(scheme)
    permuted, _ = run(scheme, LOSSES[:, perm])
    np.testing.assert_allclose(permuted, weights[:, perm], rtol=1e-12)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(mode="log"), "mode"),
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(rule="power"), "rule"),
])
def test_huq_pervin_rejects_bad_knobs(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        weighting.huq_pervin(**kwargs)


# ------------------------------------------------------------------------------------------------
# Validation and the registry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, argument", [
    ("dwa", dict(temperature=0.0), "temperature"),
    ("uncertainty", dict(learning_rate=-1e-3), "learning_rate"),
    ("uncertainty", dict(optimizer="adam"), "optimizer"),
    ("rlw", dict(std=0.0), "std"),
    ("famo", dict(learning_rate=0.0), "learning_rate"),
    ("famo", dict(weight_decay=-1.0), "weight_decay"),
    ("famo", dict(eps=0.0), "eps"),
    ("gradnorm", dict(alpha=-1.0), "alpha"),
    ("gradnorm", dict(learning_rate=float("nan")), "learning_rate"),
    ("gradnorm", dict(floor=0.0), "floor"),
])
def test_factories_reject_bad_arguments_by_name(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        weighting.get(name, **kwargs)


def test_get_unknown_name_raises():
    with pytest.raises(ValueError, match="name"):
        weighting.get("pcgrad")


def test_get_constructs_every_scheme():
    assert weighting.SCHEMES == ("equal", "huq_pervin", "dwa", "uncertainty", "rlw", "famo", "gradnorm")
    for name in weighting.SCHEMES:
        scheme = weighting.get(name)
        assert isinstance(scheme, weighting.Weighting)
        assert callable(scheme.init) and callable(scheme.update)


# ------------------------------------------------------------------------------------------------
# fixed (constant weights; the single-task baseline)
# ------------------------------------------------------------------------------------------------


def test_fixed_returns_its_weights_at_every_update_and_keeps_its_state():
    w_fixed = np.array([0.0, 1.0, 0.0])
    scheme = weighting.get("fixed", weights=(0.0, 1.0, 0.0))
    weights, states = run(scheme)
    np.testing.assert_array_equal(weights, np.tile(w_fixed, (len(LOSSES), 1)))
    for state in states:
        np.testing.assert_array_equal(state.weights, w_fixed)
    assert "fixed" not in weighting.SCHEMES


def test_fixed_ones_equals_equal_under_jit_and_vmap():
    scheme = weighting.fixed(np.ones(K))
    states = jax.vmap(lambda _: scheme.init(K))(jnp.arange(2))
    w, _ = jax.jit(jax.vmap(scheme.update))(jnp.asarray(LOSSES[:2]), states)
    np.testing.assert_array_equal(w, np.ones((2, K)))


@pytest.mark.parametrize("weights", [(), (1.0, -1.0, 1.0), (0.0, 0.0, 0.0), (1.0, np.nan, 0.0), "abc", ((1.0,),)])
def test_fixed_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        weighting.fixed(weights)


def test_fixed_init_rejects_wrong_number_of_tasks():
    with pytest.raises(ValueError, match="weights"):
        weighting.fixed((1.0, 0.0)).init(K)


# ------------------------------------------------------------------------------------------------
# Shape checks at trace time
# ------------------------------------------------------------------------------------------------

ALL_SCHEMES = list(weighting.SCHEMES) + ["fixed"]


def make(name, **kwargs):
    return weighting.fixed((1.0, 2.0, 0.5)) if name == "fixed" else weighting.get(name, **kwargs)


# The per-update variants of the schemes whose default works per epoch or after the model step: with
# them, an absent task is exactly the scheme run on its last observed loss.
PER_UPDATE = {"dwa": dict(per="step"), "gradnorm": dict(initial="batch"), "famo": dict(loss_change="next_batch")}


@pytest.mark.parametrize("name", ALL_SCHEMES)
@pytest.mark.parametrize("wrap", ["eager", "jit", "vmap"])
def test_update_rejects_losses_for_another_number_of_tasks(name, wrap):
    scheme = make(name)
    state = scheme.init(K, jax.random.key(0))
    extra = {"grad_norms": jnp.ones(4)} if scheme.needs else {}
    update = scheme.update
    losses = jnp.ones(4)
    if wrap == "jit":
        update = jax.jit(update)
    elif wrap == "vmap":  # shapes inside vmap are the per-seed ones: the check still sees (4,) vs K = 3
        state = jax.tree.map(lambda x: jnp.stack([x, x]), state)
        losses = jnp.ones((2, 4))
        extra = {n: jnp.ones((2, 4)) for n in extra}
        update = jax.vmap(update)
    with pytest.raises(ValueError, match=r"^task_losses: expected shape \(3,\)"):
        update(losses, state, **extra)


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_update_rejects_a_present_mask_of_the_wrong_shape(name):
    scheme = make(name)
    state = scheme.init(K, jax.random.key(0))
    with pytest.raises(ValueError, match="^present"):
        scheme.update(jnp.ones(K), state, present=jnp.ones(2, bool), **extra_for(scheme, 0))


def test_gradnorm_rejects_grad_norms_of_the_wrong_shape():
    scheme = weighting.gradnorm()
    with pytest.raises(ValueError, match="^grad_norms"):
        scheme.update(jnp.ones(K), scheme.init(K), grad_norms=jnp.ones(4))


# ------------------------------------------------------------------------------------------------
# Tasks absent from a batch (present mask): the last observed loss stands in
# ------------------------------------------------------------------------------------------------

# Task 1 is absent at updates 2 and 3 (its "loss" there is garbage: NaN), task 2 at update 4.
PRESENT = np.ones(LOSSES.shape, dtype=bool)
PRESENT[2:4, 1] = False
PRESENT[4, 2] = False


def with_garbage(losses, present):
    return np.where(present, losses, np.nan)


def np_impute(values, present):
    """The documented rule, written out: last observed value; never observed: mean of the known ones."""
    out, last, seen = [], np.ones(values.shape[1]), np.zeros(values.shape[1], bool)
    for v, p in zip(values, present):
        known = p | seen
        filled = np.where(p, v, last)
        fallback = filled[known].mean() if known.any() else 1.0
        filled = np.where(known, filled, fallback)
        out.append(filled)
        last, seen = filled, seen | p
    return np.array(out)


def run_present(scheme, losses, present, norms=GRAD_NORMS, key=0):
    state = scheme.init(losses.shape[1], jax.random.key(key))
    after = np.where(present, LOSSES_AFTER, np.nan)  # an absent task has no loss after the step either
    out = []
    for t in range(len(losses)):
        extra = {"grad_norms": jnp.asarray(norms[t]), "epoch_end": jnp.asarray(EPOCH_END[t])}
        extra = {n: v for n, v in extra.items() if n in scheme.needs}
        w, state = jax.jit(scheme.update)(jnp.asarray(losses[t]), state, present=jnp.asarray(present[t]), **extra)
        if scheme.after_step is not None:
            state = jax.jit(scheme.after_step)(jnp.asarray(after[t]), state, present=jnp.asarray(present[t]))
        out.append(np.asarray(w))
    return np.array(out), state


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_absent_task_equals_the_scheme_on_its_last_observed_loss(name):
    scheme = make(name, **PER_UPDATE.get(name, {}))
    weights, _ = run_present(scheme, with_garbage(LOSSES, PRESENT), PRESENT,
                             norms=with_garbage(GRAD_NORMS, PRESENT))
    assert np.all(np.isfinite(weights))
    filled = np_impute(LOSSES, PRESENT)
    # hand-written: task 1 carries its update-1 loss through updates 2 and 3, task 2 its update-3 loss
    np.testing.assert_array_equal(filled[2:4, 1], LOSSES[1, 1])
    np.testing.assert_array_equal(filled[4, 2], LOSSES[3, 2])
    norms = np_impute(GRAD_NORMS, PRESENT)
    state = scheme.init(K, jax.random.key(0))
    expected = []
    for t in range(len(LOSSES)):
        extra = {"grad_norms": jnp.asarray(norms[t])} if scheme.needs else {}
        w, state = scheme.update(jnp.asarray(filled[t]), state, **extra)
        expected.append(np.asarray(w))
    np.testing.assert_allclose(weights, np.array(expected), rtol=1e-12)


def test_absent_task_matches_numpy_references():
    filled, norms = np_impute(LOSSES, PRESENT), np_impute(GRAD_NORMS, PRESENT)
    garbage, garbage_norms = with_garbage(LOSSES, PRESENT), with_garbage(GRAD_NORMS, PRESENT)
    T = 2.0
    w, _ = run_present(weighting.dwa(temperature=T, per="step"), garbage, PRESENT)
    expected = [np.ones(K), np.ones(K)] + [np_k_softmax((filled[t - 1] / filled[t - 2]) / T) for t in range(2, 6)]
    np.testing.assert_allclose(w, np.array(expected), rtol=1e-12)
    w, _ = run_present(weighting.famo(loss_change="next_batch"), garbage, PRESENT)
    np.testing.assert_allclose(w, np_famo(filled)[0], rtol=1e-10)
    for mode in HUQ_MODES:
        w, _ = run_present(weighting.huq_pervin(temperature=0.5, mode=mode, beta=0.8), garbage, PRESENT)
        np.testing.assert_allclose(w, np_huq_pervin(filled, 0.5, mode, 0.8), rtol=1e-12)
    w, _ = run_present(weighting.gradnorm(learning_rate=0.05, optimizer=optax.sgd(0.05), initial="batch"), garbage,
                       PRESENT, norms=garbage_norms)
    np.testing.assert_allclose(w, np_gradnorm(filled, norms, alpha=1.5, lr=0.05, floor=1e-3)[0], rtol=1e-12)
    # uncertainty: exp(-s)/2 with s stepped by plain SGD on (1 - exp(-s) L)/2, L the filled losses
    lr, s = 0.3, np.zeros(K)
    w, _ = run_present(weighting.uncertainty(optimizer=optax.sgd(lr)), garbage, PRESENT)
    for t in range(len(LOSSES)):
        np.testing.assert_allclose(w[t], np.exp(-s) / 2, rtol=1e-12)
        s = s - lr * (1 - np.exp(-s) * filled[t]) / 2


def test_all_present_mask_changes_nothing():
    for name in ALL_SCHEMES:
        scheme = make(name)
        plain, _ = run(scheme)
        masked, _ = run_present(scheme, LOSSES, np.ones(LOSSES.shape, bool))
        np.testing.assert_allclose(masked, plain, rtol=1e-13, err_msg=name)


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_a_task_absent_from_the_start_gets_finite_weights(name):
    present = np.ones(LOSSES.shape, dtype=bool)
    present[:3, 2] = False  # task 2 first observed at update 3
    weights, state = run_present(make(name), with_garbage(LOSSES, present), present,
                                 norms=with_garbage(GRAD_NORMS, present))
    assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact))


def test_a_task_absent_from_the_start_restarts_its_history_at_its_first_observation():
    present = np.ones(LOSSES.shape, dtype=bool)
    present[:3, 2] = False
    garbage = with_garbage(LOSSES, present)
    filled = np_impute(LOSSES, present)
    # never observed: the mean of the other two tasks' losses at that update
    np.testing.assert_allclose(filled[:3, 2], LOSSES[:3, :2].mean(axis=1), rtol=1e-15)
    # huq_pervin "relative": L_2(0) is task 2's first observation (update 3); signal 1 before
    w, _ = run_present(weighting.huq_pervin(temperature=0.5, mode="relative"), garbage, present)
    initial = np.array([LOSSES[0, 0], LOSSES[0, 1], LOSSES[3, 2]])
    for t in range(len(LOSSES)):
        signal = filled[t] / initial
        if t < 3:
            signal[2] = 1.0
        np.testing.assert_allclose(w[t], np_k_softmax(signal / 0.5), rtol=1e-12)
    # dwa: task 2's two stored losses restart at its first observation, so its ratio is 1 until
    # two observed losses exist (updates 3, 4 -> ratio used at update 5)
    w, _ = run_present(weighting.dwa(temperature=2.0, per="step"), garbage, present)
    for t in range(2, len(LOSSES)):
        ratio = filled[t - 1] / filled[t - 2]
        if t <= 4:
            ratio[2] = 1.0
        np.testing.assert_allclose(w[t], np_k_softmax(ratio / 2.0), rtol=1e-12)
