"""The jitted, seed-vmapped training loop: equivalence with separate runs, MTRL heads, GradNorm's inputs."""
import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from mtl_jax import models, weighting
from mtl_jax.data.deep import MultiTaskDataset, Split, TaskSpec, multi_digits
from mtl_jax.training import (
    TrainConfig,
    draw_batch,
    to_device,
    init_params,
    init_state,
    make_components,
    make_run,
    make_train_step,
    task_losses,
    train,
    train_seeds,
)

from conftest import MIXED_SPEC, mixed_dataset  # noqa: E402  (the shared tiny problem)

SPEC = MIXED_SPEC


@pytest.fixture(scope="module")
def data():
    return mixed_dataset(42)


BASE = TrainConfig(model="mlp", hidden=(8,), steps=8, batch_size=16, learning_rate=1e-2, dtype="float64")

# One config per scheme under test; "equal" runs with MTRL-coupled heads, so the same compiled
# programs (cached by mtl_jax.training on the config) also serve the MTRL tests below.
CONFIGS = {
    "equal+mtrl": dataclasses.replace(BASE, scheme="equal", mtrl=models.MTRLCoupling(lam1=0.01, lam2=0.05, every=4)),
    "dwa": dataclasses.replace(BASE, scheme="dwa"),
    "gradnorm": dataclasses.replace(BASE, scheme="gradnorm"),
    "uncertainty": dataclasses.replace(BASE, scheme="uncertainty"),
}
SEEDS = [0, 1, 2]


def _assert_trees_close(a, b, **tol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _seed_slice(tree, i):
    return jax.tree.map(lambda leaf: leaf[i], tree)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vmapped_seeds_equal_separate_runs(data, name):
    config = CONFIGS[name]
    together = train_seeds(config, data, seeds=SEEDS)
    assert together.history.task_losses.shape == (3, BASE.steps, 3)
    assert together.history.weights.shape == (3, BASE.steps, 3)
    assert together.test.accuracy.shape == (3, 3)
    for i, seed in enumerate(SEEDS):
        alone = train(dataclasses.replace(config, seed=seed), data)
        _assert_trees_close(_seed_slice(together, i), alone, rtol=1e-10, atol=1e-12)
    # different seeds really are different runs
    assert not np.allclose(together.history.task_losses[0], together.history.task_losses[1])
    # the weights are the scheme's on the recorded inputs (48 rows / batch 16: epochs of 3 steps)
    h = _seed_slice(together.history, 1)
    np.testing.assert_array_equal(h.epoch_end, np.arange(1, BASE.steps + 1) % 3 == 0)
    scheme = config.make_scheme(SPEC)
    state = scheme.init(3, jax.random.split(jax.random.key(SEEDS[1]), 3)[1])
    for t in range(BASE.steps):
        extra = {"grad_norms": h.grad_norms[t] if h.grad_norms is not None else None, "epoch_end": h.epoch_end[t]}
        w, state = scheme.update(h.task_losses[t], state, present=h.present[t],
                                 **{n: v for n, v in extra.items() if n in scheme.needs})
        np.testing.assert_allclose(h.weights[t], w, rtol=1e-10, err_msg=f"step {t}")


def test_same_seed_same_numbers_and_total_loss_is_weighted_sum(data):
    config = dataclasses.replace(CONFIGS["dwa"], seed=4)
    a, b = train(config, data), train(config, data)
    _assert_trees_close(a, b, rtol=0, atol=0)
    h = a.history
    np.testing.assert_allclose(h.total_loss, np.sum(h.weights * h.task_losses, axis=1), rtol=1e-12)
    # DWA per epoch (3 steps here): weight 1 for the first two epochs, then K softmax(r / 2) of the
    # ratio of the two previous epochs' mean batch losses, the same for every step of an epoch
    np.testing.assert_array_equal(h.weights[:6], 1.0)
    means = np.asarray(h.task_losses[:6]).reshape(2, 3, 3).mean(axis=1)
    e = np.exp((means[1] / means[0]) / 2.0)
    np.testing.assert_allclose(h.weights[6:8], np.tile(3 * e / e.sum(), (2, 1)), rtol=1e-10)


def test_test_metrics_match_numpy(data):
    result = train(CONFIGS["dwa"], data)
    model = models.make_model("mlp", SPEC.out_dims, hidden=BASE.hidden, param_dtype=jnp.float64)
    outs = jax.jit(model.apply)({"params": result.state.params}, jnp.asarray(data.test.x))
    outs = [np.asarray(o) for o in outs]
    y, mask = data.test.y, data.test.mask
    np.testing.assert_allclose(result.test.accuracy[0], np.mean(outs[0].argmax(1) == y[0]), rtol=1e-12)
    for k in (1, 2):
        m = mask[:, k]
        np.testing.assert_allclose(result.test.mse[k], np.mean((outs[k] - y[k])[m] ** 2), rtol=1e-10)
        np.testing.assert_allclose(result.test.mae[k], np.mean(np.abs(outs[k] - y[k])[m]), rtol=1e-10)
    assert np.isnan(result.test.accuracy[1:]).all() and np.isnan(result.test.mse[0])


def _np_omega(H):
    root = scipy.linalg.sqrtm(H @ H.T).real
    return root / np.trace(root)


def test_mtrl_omega_inside_training_is_the_closed_form(data):
    config = CONFIGS["equal+mtrl"]
    assert config.steps % config.mtrl.every == 0  # so the last step refreshed Omega
    result = train(config, data)
    H = np.asarray(models.head_matrix(result.state.params))
    assert H.shape == (3, 8 * 2)
    np.testing.assert_allclose(result.state.omega, _np_omega(H), atol=1e-10)
    assert np.all(result.history.regulariser > 0)
    # ... and under vmap over seeds, seed by seed
    many = train_seeds(config, data, seeds=SEEDS)
    for i in range(len(SEEDS)):
        H_i = np.asarray(models.head_matrix(_seed_slice(many.state.params, i)))
        np.testing.assert_allclose(many.state.omega[i], _np_omega(H_i), atol=1e-10)


# --- single steps: GradNorm's inputs, the MTRL regulariser and schedule, the descent direction ---

LR = 0.05
COUPLING = models.MTRLCoupling(lam1=0.02, lam2=0.1, every=2)


@pytest.fixture(scope="module")
def stepper(data):
    """A full-batch SGD step with gradnorm weights and MTRL heads, its model and initial state."""
    model = models.make_model("mlp", SPEC.out_dims, hidden=(7, 5), param_dtype=jnp.float64)
    scheme, optimizer = weighting.gradnorm(learning_rate=0.5), optax.sgd(LR)
    step = make_train_step(model, scheme, optimizer, SPEC.kinds, batch_size=None, mtrl=COUPLING)
    split = to_device(data.train, SPEC, jnp.float64)
    state = jax.jit(init_state, static_argnums=(0, 1, 2), static_argnames="mtrl")(
        model, scheme, optimizer, jax.random.key(1), split.x[:1], mtrl=COUPLING)

    @jax.jit
    def per_task_grads(params):
        """(K,) pytree of dL_k/dparams, task by task with jax.grad (the reference)."""
        def loss_k(p, k):
            return task_losses(model, p, split.x, split.y, split.mask, SPEC.kinds)[k]
        return [jax.grad(loss_k)(params, k) for k in range(len(SPEC.kinds))]

    return model, step, split, state, per_task_grads


def test_gradnorm_grad_norms_equal_task_by_task_gradients(stepper):
    model, step, split, state, per_task_grads = stepper
    for _ in range(2):
        new_state, metrics = step(state, split)
        grads = per_task_grads(state.params)
        expected = [np.linalg.norm(models.last_shared_kernel(g)) for g in grads]
        assert metrics.grad_norms.shape == (3,)
        np.testing.assert_allclose(metrics.grad_norms, expected, rtol=1e-10)
        state = new_state


def test_step_descends_weighted_loss_plus_mtrl_regulariser(stepper):
    # With SGD: params' = params - lr * (sum_k w_k grad L_k + grad R(H, Omega)), w the scheme's weights;
    # R = (lam1/2)||H||^2 + (lam2/2) tr(H^T Omega^{-1} H) with Omega from the state; Omega refreshed
    # in closed form after every second step and held otherwise.
    model, step, split, state, per_task_grads = stepper
    np.testing.assert_allclose(state.omega, np.eye(3) / 3)
    for t in range(1, 6):
        H = np.asarray(models.head_matrix(state.params))
        omega = np.asarray(state.omega)
        new_state, metrics = step(state, split)
        inv = np.linalg.inv(omega)
        expected_reg = 0.5 * COUPLING.lam1 * np.sum(H**2) + 0.5 * COUPLING.lam2 * np.trace(H.T @ inv @ H)
        np.testing.assert_allclose(metrics.regulariser, expected_reg, rtol=1e-10)
        w = np.asarray(metrics.weights)
        np.testing.assert_allclose(metrics.total_loss, w @ np.asarray(metrics.task_losses) + expected_reg, rtol=1e-12)

        grads = per_task_grads(state.params)
        weighted = jax.tree.map(lambda *g: sum(wk * gk for wk, gk in zip(w, g)), *grads)
        reg_grad_H = COUPLING.lam1 * H + COUPLING.lam2 * inv @ H  # (K, p*out)
        expected = jax.tree.map(lambda p, g: p - LR * g, state.params, weighted)
        kernel = expected["heads"]["kernel"]  # (K, p, out): row k of H is kernel[k] flattened
        expected["heads"]["kernel"] = kernel - LR * reg_grad_H.reshape(kernel.shape)
        _assert_trees_close(new_state.params, expected, rtol=1e-10, atol=1e-13)

        if t % COUPLING.every == 0:
            np.testing.assert_allclose(new_state.omega, _np_omega(np.asarray(models.head_matrix(new_state.params))),
                                       atol=1e-10)
        else:
            np.testing.assert_array_equal(new_state.omega, omega)
        state = new_state
    assert not np.allclose(w, 1.0)  # gradnorm has moved the weights


def test_famo_step_takes_the_logit_step_on_the_same_batch_after_the_update(data):
    # One extra forward pass: losses_after are the batch's losses at the updated parameters, and the
    # logits follow FAMO's Algorithm 1 on (losses, losses_after), with Adam + L2 as in the official code.
    model = models.make_model("mlp", SPEC.out_dims, hidden=(5,), param_dtype=jnp.float64)
    scheme, optimizer = weighting.famo(learning_rate=0.2, weight_decay=0.01), optax.adam(0.05)
    step = make_train_step(model, scheme, optimizer, SPEC.kinds, batch_size=None)
    split = to_device(data.train, SPEC, jnp.float64)
    state = jax.jit(init_state, static_argnums=(0, 1, 2))(model, scheme, optimizer, jax.random.key(0), split.x[:1])
    losses_of = jax.jit(lambda p: task_losses(model, p, split.x, split.y, split.mask, SPEC.kinds))
    xi, m, v, gamma = np.zeros(3), np.zeros(3), np.zeros(3), 0.01
    for t in range(1, 5):
        state, metrics = step(state, split)
        after = np.asarray(metrics.losses_after)
        np.testing.assert_allclose(after, losses_of(state.params), rtol=1e-12)
        loss = np.asarray(metrics.task_losses)
        z = np.exp(xi) / np.exp(xi).sum()
        np.testing.assert_allclose(metrics.weights, 3 * (z / (loss + 1e-8)) / np.sum(z / (loss + 1e-8)), rtol=1e-10)
        delta = np.log(loss + 1e-8) - np.log(after + 1e-8)
        g = z * (delta - z @ delta) + gamma * xi
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        xi = xi - 0.2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(state.scheme_state.logits, xi, rtol=1e-9, atol=1e-12)
    assert np.all(after < loss) and np.ptp(xi) > 0.05


def test_config_gives_uncertainty_the_models_optimizer_and_the_data_kinds_and_clips_gradients():
    lr = 0.3
    config = TrainConfig(scheme="uncertainty", optimizer="sgd", learning_rate=lr)
    scheme = config.make_scheme(SPEC)  # classification, regression, regression
    c, s, state = np.array([1.0, 0.5, 0.5]), np.zeros(3), scheme.init(3)
    for loss in ([2.0, 0.5, 4.0], [1.5, 0.4, 3.0], [1.2, 0.3, 2.5]):
        w, state = scheme.update(jnp.asarray(loss), state)
        np.testing.assert_allclose(w, c * np.exp(-s), rtol=1e-12)
        s = s - lr * (0.5 - c * np.exp(-s) * np.asarray(loss))  # plain SGD, the model's optimizer
    np.testing.assert_allclose(state.log_vars, s, rtol=1e-12)
    # scheme_kwargs win: Adam with the given rate, Kendall's regression form for every task
    given = dataclasses.replace(config, scheme_kwargs={"optimizer": optax.adam(0.1), "kinds": ("regression",) * 3})
    w, _ = given.make_scheme(SPEC).update(jnp.ones(3), given.make_scheme(SPEC).init(3))
    np.testing.assert_allclose(w, 0.5)
    # max_grad_norm: clip by the global norm, then the optimizer
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([12.0])}  # norm 13
    opt = TrainConfig(optimizer="sgd", learning_rate=1.0, max_grad_norm=2.6).make_optimizer()
    updates, _ = opt.update(grads, opt.init(grads))
    np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-12)
    np.testing.assert_allclose(updates["b"], [-2.4], rtol=1e-12)
    for bad, name in ((dict(max_grad_norm=0.0), "max_grad_norm"), (dict(steps_per_epoch=0), "steps_per_epoch")):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**bad)


def test_stratified_batches_hold_every_task_equally(data):
    split = to_device(data.train, SPEC, jnp.float64)
    draw = jax.jit(draw_batch, static_argnums=(2, 3))
    x, ys, mask = draw(split, jax.random.key(3), 10, True)  # 10 // 3 = 3 rows per task
    assert x.shape == (9, 6) and mask.shape == (9, 3)
    np.testing.assert_array_equal(np.asarray(mask), np.repeat(np.eye(3, dtype=bool), 3, axis=0))
    # recover the source rows: those drawn for task 2 belong to task 2 (it owns every second sample)
    rows = np.array([np.flatnonzero((data.train.x == np.asarray(r)).all(1))[0] for r in x])
    assert data.train.mask[rows[6:], 2].all()
    np.testing.assert_array_equal(ys[1], data.train.y[1][rows])
    again = draw(split, jax.random.key(3), 10, True)
    np.testing.assert_array_equal(again[0], x)
    # unstratified: batch_size rows, masks as in the data
    x, ys, mask = draw(split, jax.random.key(3), 10, False)
    assert x.shape == (10, 6) and mask[:, 0].all()


def test_training_on_multi_digits_learns():
    digits = multi_digits(600, 200, seed=0)
    config = TrainConfig(model="mlp", hidden=(32,), steps=150, batch_size=32, learning_rate=3e-3,
                         scheme="dwa", dtype="float32")
    result = train(config, digits)
    acc = np.asarray(result.test.accuracy)
    assert (acc > 0.5).all(), acc  # chance is 0.1
    losses = np.asarray(result.history.task_losses)
    assert (losses[-20:].mean(0) < 0.5 * losses[:5].mean(0)).all()


def test_config_and_inputs_are_validated(data):
    with pytest.raises(ValueError, match="scheme"):
        TrainConfig(scheme="pcgrad")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match="mtrl.lam2"):
        TrainConfig(mtrl=models.MTRLCoupling(lam2=-1.0))
    with pytest.raises(ValueError, match="seed"):
        TrainConfig(seed=2**31)
    with pytest.raises(ValueError, match="hidden"):
        TrainConfig(hidden=(8, 0))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        train(dataclasses.replace(BASE, stratify=True, batch_size=2), data)
    with pytest.raises(ValueError, match="seeds"):
        train_seeds(BASE, data, seeds=[])
    with pytest.raises(ValueError, match="seeds"):
        train_seeds(BASE, data, seeds=[-1])
    with pytest.raises(ValueError, match="data"):
        train(BASE, data.train)
    bad = data._replace(train=data.train._replace(mask=data.train.mask[:, :2]))
    with pytest.raises(ValueError, match="mask"):
        train(BASE, bad)
    # scheme kwargs are kept (hashable) and reach the scheme
    assert TrainConfig(scheme="dwa", scheme_kwargs={"temperature": 1.0}).scheme_kwargs == (("temperature", 1.0),)
    with pytest.raises(ValueError, match="temperature"):
        TrainConfig(scheme="dwa", scheme_kwargs={"temperature": -1.0})
    with pytest.raises(ValueError, match="scheme_kwargs"):
        TrainConfig(scheme="dwa", scheme_kwargs={"temperature": [1.0]})


def test_mtrl_field_takes_a_coupling_or_a_dict_and_hashes(data):
    as_dict = TrainConfig(mtrl={"lam1": 0.01, "lam2": 0.05, "every": 4})
    as_tuple = TrainConfig(mtrl=models.MTRLCoupling(lam1=0.01, lam2=np.float64(0.05), every=np.int64(4)))
    assert as_dict == as_tuple and hash(as_dict) == hash(as_tuple)  # one cached program for both
    assert as_dict.mtrl == models.MTRLCoupling(0.01, 0.05, 4, 1e-8) and as_dict.coupling() is as_dict.mtrl
    assert type(as_tuple.mtrl.every) is int and type(as_tuple.mtrl.lam2) is float
    assert TrainConfig().mtrl is None and TrainConfig().coupling() is None
    for bad, name in ((dict(every=0), "mtrl.every"), (dict(every=2.5), "mtrl.every"), (dict(eps=0.0), "mtrl.eps"),
                      (dict(lam1=-0.1), "mtrl.lam1"), (dict(lam1=float("nan")), "mtrl.lam1"),
                      (dict(omega_every=4), "mtrl")):
        with pytest.raises(ValueError, match=name):
            TrainConfig(mtrl=bad)
    with pytest.raises(ValueError, match="mtrl"):
        TrainConfig(mtrl=True)
    def widen(split):  # the last task gets a third output: heads of unequal sizes cannot be coupled
        y = split.y[:2] + (np.concatenate([split.y[2], split.y[2][:, :1]], axis=1),)
        return split._replace(y=y)

    unequal = MultiTaskDataset(widen(data.train), widen(data.test), data.spec._replace(out_dims=(2, 2, 3)))
    with pytest.raises(ValueError, match="mtrl"):
        train(CONFIGS["equal+mtrl"], unequal)


# --- the public run builder: train's program, and the constant-weight runs of the experiment ---


def _load_task_weighting():
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "task_weighting.py"
    spec = importlib.util.spec_from_file_location("task_weighting", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_run_is_trains_program(data):
    config = dataclasses.replace(CONFIGS["equal+mtrl"], seed=2)
    split, test = to_device(data.train, SPEC, jnp.float64), to_device(data.test, SPEC, jnp.float64)
    run = jax.jit(make_run(config, SPEC))
    model = make_components(config, SPEC).model
    params = jax.jit(lambda s: init_params(model, jax.random.key(s), split.x[:1]))(jnp.int32(2))
    expected = train(config, data)
    _assert_trees_close(run(jnp.int32(2), params, split, test), expected, rtol=0, atol=0)
    # params=None draws the same initial weights inside the run
    _assert_trees_close(run(jnp.int32(2), None, split, test), expected, rtol=1e-12, atol=1e-14)


def test_make_run_with_fixed_one_hot_weights_is_the_single_task_baseline(data):
    task_weighting = _load_task_weighting()
    config, seeds, rows = CONFIGS["dwa"], [0, 1], np.eye(3)
    history, test_metrics = task_weighting.train_fixed_weights(config, data, seeds, rows)
    assert history.task_losses.shape == (3, 2, BASE.steps, 3) and test_metrics.mse.shape == (3, 2, 3)
    split, test = to_device(data.train, SPEC, jnp.float64), to_device(data.test, SPEC, jnp.float64)
    for r, row in enumerate(rows):
        # the scheme overrides the config's ("dwa"): constant one-hot weights, task r alone
        run = jax.jit(make_run(config, SPEC, weighting.fixed(row)))
        for i, seed in enumerate(seeds):
            alone = run(jnp.int32(seed), None, split, test)
            np.testing.assert_array_equal(alone.history.weights, np.broadcast_to(row, (BASE.steps, 3)))
            _assert_trees_close((alone.history, alone.test), _seed_slice(_seed_slice((history, test_metrics), r), i),
                                rtol=1e-10, atol=1e-12)
    # one-hot runs differ from each other and from the adaptive scheme's run
    assert not np.allclose(history.task_losses[0], history.task_losses[1])
    ones = jax.jit(make_run(config, SPEC, weighting.fixed(np.ones(3))))(jnp.int32(0), None, split, test)
    equal = train(dataclasses.replace(config, scheme="equal"), data)
    _assert_trees_close((ones.state.params, ones.history, ones.test), (equal.state.params, equal.history, equal.test),
                        rtol=1e-12, atol=1e-14)  # (the schemes' states differ in kind)


# ----------------------------------------------------------------------------- gradient methods in the step

GM_SPEC = TaskSpec(kinds=("regression", "classification"), out_dims=(1, 2), names=("reg", "cls"))
GM_BASE = TrainConfig(model="mlp", hidden=(5,), steps=1, batch_size=None, optimizer="sgd", learning_rate=0.1,
                      dtype="float64")


@pytest.fixture(scope="module")
def gm_data():
    rng = np.random.default_rng(4)  # a draw whose two task gradients conflict at the seed-0 init (cos -0.22)

    def split(n):
        x = rng.normal(size=(n, 3))
        return Split(x=x, y=(np.sin(x[:, :1]) * 3.0, (x[:, 1] > 0).astype(np.int64)), mask=np.ones((n, 2), bool))

    return MultiTaskDataset(train=split(12), test=split(6), spec=GM_SPEC)


def _one_step(config, data):
    """Params before and after one step of ``config``'s training step (seed 0), and the step's metrics."""
    c = make_components(config, data.spec)
    split = to_device(data.train, data.spec, jnp.float64)
    state = init_state(c.model, c.scheme, c.optimizer, jax.random.key(0), split.x[:1], method=c.method)
    new, metrics = c.step(state, split)
    return c.model, state.params, new.params, metrics, split


def _reference_task_grads(model, params, split):
    """Per-task gradients of the shared params (each task's own jax.grad, flattened) and of the heads' sum."""
    shared = {k: v for k, v in params.items() if k != "heads"}
    flat, unravel = jax.flatten_util.ravel_pytree(shared)

    def loss(k, flat_shared, heads):
        return task_losses(model, {**unravel(flat_shared), "heads": heads}, split.x, split.y, split.mask,
                           GM_SPEC.kinds)[k]

    g = np.stack([np.asarray(jax.grad(loss, argnums=1)(k, flat, params["heads"])) for k in range(2)])
    head_grads = jax.grad(lambda h: loss(0, flat, h) + loss(1, flat, h))(params["heads"])
    return g, flat, unravel, head_grads


def test_pcgrad_step_is_the_hand_computed_projection(gm_data):
    # Yu et al. 2020, two tasks: g1' = g1 - min(0, g1.g2) g2 / |g2|^2 (and symmetrically), d = g1' + g2'
    # (the same for either order); the shared params take an SGD step along d, the heads along their own
    # gradients.
    config = dataclasses.replace(GM_BASE, gradient_method="pcgrad")
    model, before, after, metrics, split = _one_step(config, gm_data)
    g, flat, unravel, head_grads = _reference_task_grads(model, before, split)
    dot = g[0] @ g[1]
    assert dot < 0, "the data are chosen so that the two task gradients conflict"
    d = (g[0] - dot / (g[1] @ g[1]) * g[1]) + (g[1] - dot / (g[0] @ g[0]) * g[0])
    expected = {**unravel(flat - 0.1 * d), "heads": jax.tree.map(lambda p, q: p - 0.1 * q, before["heads"], head_grads)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), after, expected)
    # coefficients of d in the task gradients
    np.testing.assert_allclose(metrics.method_weights, [1 - dot / (g[0] @ g[0]), 1 - dot / (g[1] @ g[1])], rtol=1e-10)


def test_aligned_gradients_make_pcgrad_plain_equal_weighting(gm_data):
    # Without a conflict PCGrad projects nothing and is equal weighting: with K = 1 there is no other
    # task to conflict with, so three steps equal the plain run's (vmap and loop modes alike).
    one = TaskSpec(kinds=("regression",), out_dims=(1,), names=("reg",))
    d = MultiTaskDataset(train=Split(gm_data.train.x, gm_data.train.y[:1], gm_data.train.mask[:, :1]),
                         test=Split(gm_data.test.x, gm_data.test.y[:1], gm_data.test.mask[:, :1]), spec=one)
    cfg = dataclasses.replace(GM_BASE, steps=3)
    plain = train(cfg, d)
    with_pcgrad = train(dataclasses.replace(cfg, gradient_method="pcgrad", gradient_mode="loop"), d)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
                 plain.state.params, with_pcgrad.state.params)


def test_mgda_ub_on_features_is_the_closed_form_on_the_trunk_output(gm_data):
    # Sener & Koltun 2018, sec. 3.3 with two tasks: z-gradients G_k = dL_k/dz (B, F), alpha_1 =
    # clip((G_2 - G_1).G_2 / |G_1 - G_2|^2, 0, 1); the shared params descend along the trunk's pull-back of
    # sum_k alpha_k G_k, i.e. the gradient of sum_k alpha_k L_k w.r.t. the shared params.
    config = dataclasses.replace(GM_BASE, gradient_method="mgda_ub", gradient_level="features")
    model, before, after, metrics, split = _one_step(config, gm_data)

    def z_of(p):  # the trunk by hand: Dense + ReLU (hidden=(5,))
        layer = p["shared_last"]
        return jax.nn.relu(split.x @ layer["kernel"] + layer["bias"])

    def head_losses(z, heads):
        outs = models.TaskHeads((1, 2)).apply({"params": heads}, z)
        return jnp.stack([jnp.mean((outs[0] - split.y[0]) ** 2),
                          jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outs[1], split.y[1]))])

    z = z_of(before)
    G = np.stack([np.asarray(jax.grad(lambda zz: head_losses(zz, before["heads"])[k])(z)).ravel() for k in range(2)])
    a1 = np.clip((G[1] - G[0]) @ G[1] / np.sum((G[0] - G[1]) ** 2), 0.0, 1.0)
    alpha = np.array([a1, 1 - a1])
    np.testing.assert_allclose(metrics.method_weights, alpha, atol=1e-8)
    shared = {k: v for k, v in before.items() if k != "heads"}
    g_shared = jax.grad(lambda sh: jnp.dot(alpha, head_losses(z_of(sh), before["heads"])))(shared)
    g_heads = jax.grad(lambda h: jnp.sum(head_losses(z, h)))(before["heads"])
    expected = jax.tree.map(lambda p, q: p - 0.1 * q, before, {**g_shared, "heads": g_heads})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10), after, expected)


@pytest.mark.parametrize("level", ["params", "features"])
def test_gradient_method_seeds_vmapped_equal_separate_runs(gm_data, level):
    # PCGrad draws its task order from its key: the key must travel with each seed.
    config = dataclasses.replace(GM_BASE, steps=4, batch_size=6, optimizer="adam", learning_rate=1e-2,
                                 gradient_method="pcgrad", gradient_level=level, scheme="dwa")
    many = train_seeds(config, gm_data, seeds=[3, 1])
    for i, seed in enumerate([3, 1]):
        one = train(dataclasses.replace(config, seed=seed), gm_data)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-9, atol=1e-12),
                     (many.history, many.state.params, many.test), (one.history, one.state.params, one.test))
    assert np.isfinite(np.asarray(many.history.task_losses)).all()


def test_gradient_method_config_errors():
    with pytest.raises(ValueError, match="gradient_method"):
        TrainConfig(gradient_method="nope")
    with pytest.raises(ValueError, match="gradient_level"):
        TrainConfig(gradient_method="pcgrad", gradient_level="layers")
    with pytest.raises(ValueError, match="gradient_kwargs"):
        TrainConfig(gradient_kwargs={"c": 0.5})
    with pytest.raises(ValueError, match="gradient_kwargs"):
        TrainConfig(gradient_method="cagrad", gradient_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="gradient_method"):
        TrainConfig(gradient_method="pcgrad", scheme="gradnorm")
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="transformer")
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(model="embedding_bag", vocab_size=0)
    cfg = TrainConfig(gradient_method="cagrad", gradient_kwargs={"c": 0.5})
    assert cfg.gradient_kwargs == (("c", 0.5),) and hash(cfg) == hash(TrainConfig(gradient_method="cagrad",
                                                                                 gradient_kwargs=[("c", 0.5)]))
