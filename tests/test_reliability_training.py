"""Training reliability: divergence is detected, stopped and reported; tasks absent from a batch keep
every scheme's weights finite (docs/weighting.md, section 3)."""
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import weighting
from mtl_jax.data.deep import MultiTaskDataset, Split, TaskSpec, school_multihead
from mtl_jax.training import (
    DivergenceWarning,
    TrainConfig,
    init_state,
    make_components,
    make_run,
    make_train_step,
    to_device,
    train,
    train_seeds,
)

SPEC = TaskSpec(kinds=("classification", "regression", "regression"), out_dims=(2, 2, 2),
                names=("cls", "reg", "rare"))


def _split(rng, n, rare_every):
    """One 2-class task, two 2-output regressions; the last is marked on every ``rare_every``-th sample."""
    x = rng.normal(size=(n, 6))
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    reg = np.stack([np.sin(x[:, 2]), x[:, 3] * x[:, 4]], axis=1)
    rare = 3.0 * np.stack([x[:, 5], x[:, 0] - x[:, 2]], axis=1)
    mask = np.ones((n, 3), dtype=bool)
    mask[:, 2] = np.arange(n) % rare_every == 0
    return Split(x=x, y=(labels, reg, rare), mask=mask)


def _dataset(rare_every):
    rng = np.random.default_rng(42)
    return MultiTaskDataset(train=_split(rng, 48, rare_every), test=_split(rng, 20, 1), spec=SPEC)


def _finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


# ----------------------------------------------------------------------------- divergence

DIVERGING = TrainConfig(model="mlp", hidden=(8,), steps=10, batch_size=16, optimizer="sgd", learning_rate=1e6,
                        dtype="float64", scheme="equal")


def _reference_first_bad_step(config, data, seed):
    """Step by step with the plain step (every update applied): the first step whose losses, weights or
    total are non-finite, or whose new state is; with the states before each step."""
    c = make_components(config, data.spec)
    step = make_train_step(c.model, c.scheme, c.optimizer, data.spec.kinds, batch_size=config.batch_size,
                           freeze_on_divergence=False)
    split = to_device(data.train, data.spec, jnp.float64)
    state = init_state(c.model, c.scheme, c.optimizer, jax.random.key(seed), split.x[:1])
    states, metrics = [], []
    for t in range(config.steps):
        states.append(state)
        state, m = step(state, split)
        metrics.append(m)
        params_finite = _finite((state.params, state.opt_state, state.scheme_state))
        if not (_finite((m.task_losses, m.weights, m.total_loss)) and params_finite):
            return t, states, metrics, params_finite
    return -1, states, metrics, True


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_warns():
    data = _dataset(1)
    with pytest.warns(DivergenceWarning, match=r"seed 0 at step (\d+)") as record:
        result = train(DIVERGING, data)
    t, states, metrics, params_finite = _reference_first_bad_step(DIVERGING, data, 0)
    assert 0 < t < DIVERGING.steps - 1
    assert int(result.diverged_at) == t
    assert f"seed 0 at step {t}." in str(record[0].message)
    # here the loss itself is what goes non-finite first (the parameters before it are finite)
    assert params_finite and not np.isfinite(metrics[t].total_loss)
    h = result.history
    # before the diverged step: the plain loop's numbers; at it: what was computed; after it: NaN
    np.testing.assert_allclose(h.task_losses[:t], np.stack([m.task_losses for m in metrics[:t]]), rtol=1e-6)
    np.testing.assert_array_equal(np.isfinite(h.total_loss[t]), np.isfinite(metrics[t].total_loss))
    assert np.isnan(h.task_losses[t + 1:]).all() and np.isnan(h.weights[t + 1:]).all()
    assert np.isnan(h.total_loss[t + 1:]).all() and not h.present[t + 1:].any()
    # frozen: the state is the last finite one, after t steps, and the test metrics are its own
    assert int(result.state.step) == t
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), result.state.params, states[t].params)
    assert _finite(result.state.params)


def test_train_seeds_reports_each_diverged_seed_and_keeps_the_result():
    data = _dataset(1)
    with pytest.warns(DivergenceWarning) as record:
        many = train_seeds(DIVERGING, data, seeds=[0, 3])
    message = str(record[0].message)
    assert many.diverged_at.shape == (2,)
    for i, seed in enumerate([0, 3]):
        expected, *_ = _reference_first_bad_step(DIVERGING, data, seed)
        assert int(many.diverged_at[i]) == expected
        assert f"seed {seed} at step {expected}" in message
    assert "2 of 2 run(s)" in message


def test_under_vmap_a_diverging_row_freezes_alone():
    # Rows of constant weights vmapped as one program (as the single-task baselines are): weights 1e7
    # make SGD diverge, weights 1 do not; the calm row equals its own separate run.
    data = _dataset(1)
    split, test = to_device(data.train, SPEC, jnp.float64), to_device(data.test, SPEC, jnp.float64)
    config = dataclasses.replace(DIVERGING, learning_rate=1e-2)
    rows = jnp.asarray([[1.0, 1.0, 1.0], [1e7, 1e7, 1e7]])
    program = jax.jit(jax.vmap(lambda w: make_run(config, SPEC, weighting.fixed(w))(jnp.int32(0), None, split, test)))
    both = program(rows)
    assert int(both.diverged_at[0]) == -1 and int(both.diverged_at[1]) >= 0
    assert int(both.state.step[1]) == int(both.diverged_at[1]) and _finite(jax.tree.map(lambda x: x[1], both.state.params))
    alone = jax.jit(make_run(config, SPEC, weighting.fixed(np.ones(3))))(jnp.int32(0), None, split, test)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-10, atol=1e-12),
                 (both.history, both.test, both.state.params), (alone.history, alone.test, alone.state.params))


def test_a_normal_run_reports_no_divergence_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        result = train_seeds(dataclasses.replace(DIVERGING, learning_rate=1e-2), _dataset(1), seeds=[0, 1])
    np.testing.assert_array_equal(result.diverged_at, [-1, -1])
    np.testing.assert_array_equal(result.state.step, [DIVERGING.steps] * 2)
    assert np.isfinite(result.history.total_loss).all()


# ----------------------------------------------------------------------------- tasks absent from a batch

ABSENT = TrainConfig(model="mlp", hidden=(8,), steps=12, batch_size=4, learning_rate=1e-2, dtype="float64")
ALL_SCHEMES = list(weighting.SCHEMES) + ["fixed"]


def np_impute(values, present):
    """The documented rule: an absent task's value is its last observed one (every task is observed at
    the first step in the runs checked here)."""
    assert present[0].all()
    out, last = [], None
    for v, p in zip(values, present):
        last = v if last is None else np.where(p, v, last)
        out.append(last)
    return np.array(out)


# Per-update variants of the per-epoch defaults: their weights are a function of the imputed losses
# step by step, which the replay below checks against the documented rule (np_impute).
PER_UPDATE = {"dwa_step": ("dwa", {"per": "step"}), "gradnorm_batch": ("gradnorm", {"initial": "batch"})}
# Schemes fed per-epoch means (epoch_end): the replay feeds the raw losses with ``present`` and the
# recorded epoch ends, so it checks the training step's inputs (the per-epoch mean over the observed
# batches, absent ones left out, is checked against NumPy in tests/test_weighting.py).
PER_EPOCH = ("dwa", "gradnorm")


@pytest.mark.parametrize("name", ALL_SCHEMES + list(PER_UPDATE))
def test_every_scheme_trains_through_batches_missing_a_task(name):
    data = _dataset(6)  # the rare task is in 8 of 48 samples: a batch of 4 misses it about half the time
    split, test = to_device(data.train, SPEC, jnp.float64), to_device(data.test, SPEC, jnp.float64)
    scheme_name, kwargs = PER_UPDATE.get(name, ("equal" if name == "fixed" else name, {}))
    # 3 steps per epoch: 4 epochs in the 12 steps, so the per-epoch schemes move their weights
    config = dataclasses.replace(ABSENT, scheme=scheme_name, scheme_kwargs=kwargs, steps_per_epoch=3)
    scheme = weighting.fixed((1.0, 0.5, 2.0)) if name == "fixed" else config.make_scheme()
    run = jax.jit(jax.vmap(make_run(config, SPEC, scheme), in_axes=(0, None, None, None)))
    seeds = np.arange(6)
    results = run(jnp.asarray(seeds, jnp.int32), None, split, test)
    h = results.history
    np.testing.assert_array_equal(results.diverged_at, -1)
    assert _finite((h.weights, h.total_loss, results.state.params, results.test.task_loss))
    assert (~np.asarray(h.present[:, :, 2])).sum() >= 10  # the rare task really was absent
    assert np.asarray(h.present[:, :, :2]).all()
    np.testing.assert_array_equal(np.asarray(h.epoch_end), np.tile(np.arange(1, 13) % 3 == 0, (6, 1)))
    # an absent task's loss is 0 and its term in the total is 0
    absent = ~np.asarray(h.present)
    np.testing.assert_array_equal(np.asarray(h.task_losses)[absent], 0.0)
    np.testing.assert_allclose(h.total_loss, np.sum(h.weights * h.task_losses, axis=-1), rtol=1e-12)
    if name in ("dwa", "gradnorm"):  # the per-epoch weights do move (not all 1)
        assert np.ptp(np.asarray(h.weights)[:, 6:]) > 1e-3
    # the weights are the scheme's on the losses with each absent one replaced by its last observed one
    uses_norms = "grad_norms" in scheme.needs
    checked = 0
    for i, seed in enumerate(seeds):
        present = np.asarray(h.present[i])
        if not present[0].all():
            continue  # the never-observed rule is checked in tests/test_weighting.py
        raw = np.asarray(h.task_losses[i])
        losses = np_impute(raw, present)
        norms = np_impute(np.asarray(h.grad_norms[i]), present) if uses_norms else None
        _, k_scheme, _ = jax.random.split(jax.random.key(int(seed)), 3)
        state = scheme.init(3, k_scheme)
        for t in range(config.steps):
            extra = {"grad_norms": jnp.asarray(norms[t])} if uses_norms else {}
            if "epoch_end" in scheme.needs:
                extra["epoch_end"] = jnp.asarray(bool(h.epoch_end[i, t]))
            if name in PER_EPOCH:
                w, state = scheme.update(jnp.asarray(raw[t]), state, present=jnp.asarray(present[t]), **extra)
            else:
                w, state = scheme.update(jnp.asarray(losses[t]), state, **extra)
            np.testing.assert_allclose(h.weights[i, t], w, rtol=1e-10, err_msg=f"seed {seed} step {t}")
            if scheme.after_step is not None:  # famo: the same batch after the step, absent ones imputed
                after = np.where(present[t], np.asarray(h.losses_after[i, t]), losses[t])
                state = scheme.after_step(jnp.asarray(after), state)
        checked += 1
    assert checked >= 2


def test_dwa_on_school_with_tiny_batches_stays_finite():
    # The call: batches of 4 pupils often miss the smallest school group.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        result = train(TrainConfig(hidden=(16,), steps=200, batch_size=4, scheme="dwa"), school_multihead())
    assert int(result.diverged_at) == -1
    assert (~np.asarray(result.history.present)).any()
    assert np.isfinite(result.history.weights).all()
    assert np.isfinite(result.test.mse).all() and np.isfinite(result.test.mae).all()
