"""Jitted multi-task training with loss-driven task weighting, vmapped over seeds (docs/weighting.md).

One pure step does: draw a batch from the state's key, forward, per-task losses ``L`` (K,), weights
``w`` from the scheme (no gradient), the gradient of ``sum_k w_k L_k`` (+ the MTRL regulariser of the
heads, :mod:`mtl_jax.models`), an optax update, and the scheme's state update. Everything that changes
lives in one pytree, :class:`TrainState`. One pure function, built by :func:`make_run`, is the whole run
(initial state, a ``lax.scan`` of the step, test metrics); :func:`train` jits it and :func:`train_seeds`
``vmap``s it over seeds, so S seeds train as one compiled program (the weight init is compiled
separately, once per model, and shared by all schemes); :func:`train_grid` ``vmap``s it over a grid of
learning rates (and scheme hyper-parameters such as dwa's temperature) and seeds, so a whole sweep is one
compiled program -- the model's learning rate is injected into the optimizer state
(``optax.inject_hyperparams``), so it can be traced. Scripts that need a variant -- another scheme,
constant weights vmapped over rows, an ahead-of-time compiled benchmark -- build it with :func:`make_run`.

Typical use (what an experiment or benchmark script needs)::

    from mtl_jax.data.deep import multi_digits
    from mtl_jax.training import TrainConfig, train, train_seeds

    data = multi_digits(2000, 500, seed=0)
    cfg = TrainConfig(model="cnn", scheme="dwa", steps=500, batch_size=64, learning_rate=1e-3)
    res = train_seeds(cfg, data, seeds=range(5))
    res.history.task_losses   # (S, T, K) batch losses per step, unweighted
    res.history.weights       # (S, T, K) the weights the scheme gave at each step
    res.test.accuracy         # (S, K) per-task test accuracy (NaN for regression tasks)
    res.diverged_at           # (S,) first non-finite step of each seed, -1 if none (then warned)
    grid = train_grid(cfg, data, seeds=range(5), learning_rates=[3e-4, 1e-3, 3e-3],
                      scheme_values={"temperature": [1.0, 2.0]})   # 6 points x 5 seeds, one program
    grid.result.test.accuracy # (G, S, K) = (6, 5, K); grid.learning_rates, grid.scheme_values (G,)

Losses: softmax cross-entropy for a classification task, mean squared error (averaged over the task's
outputs) for a regression task. A task's batch loss is the mean over the batch samples that its mask
marks; a task with no marked sample in the batch is absent: its loss is 0 with no gradient, so its term
in the total is 0, and the scheme gets ``present[k] = False`` and uses the task's last observed loss
instead (:mod:`mtl_jax.weighting`; ``history.present`` records it). ``stratify=True`` puts every task in
every batch. Divergence: a step whose losses or update are non-finite stops the run there, frozen
(``TrainResult.diverged_at``, :func:`make_train_step`), and :func:`train` / :func:`train_seeds` warn
(:class:`DivergenceWarning`) naming the seed and step. Batches are drawn on the device from the state's key
(:func:`draw_batch`: uniformly with replacement, or stratified by task; ``batch_size=None``: the full
training set at every step), so the same seed gives the same numbers. Epochs: a scheme that needs
``epoch_end`` (dwa, gradnorm's first-epoch ``L(0)``) is told at the last step of each epoch of
``steps_per_epoch`` steps (default ``ceil(N_train / batch_size)``); a scheme with an ``after_step`` (famo)
gets the same batch's losses at the updated parameters, one more forward pass per step
(``history.losses_after``).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import gradient_methods as gradient_lib
from mtl_jax import weighting as weighting_lib
from mtl_jax.data.deep import CLASSIFICATION, MultiTaskDataset, Split, TaskSpec, validate_split, validate_spec
from mtl_jax.models import (
    HEADS,
    MODEL_KINDS,
    MTRLCoupling,
    TaskHeads,
    _task_out_dims,
    head_matrix,
    initial_omega,
    last_shared_kernel,
    make_model,
    mtrl_regulariser,
    num_heads,
    refresh_omega,
    validate_coupling,
)
from mtl_jax.solvers.base import check_checkpoint
from mtl_jax.validation import check_int, check_real

_SUPPORTED_EXTRAS = ("grad_norms", "epoch_end")
_OPTIMIZERS = ("adam", "sgd")
_DTYPES = ("float32", "float64")
#: ``TrainConfig.gradient_level``: where a gradient method sees the per-task gradients.
GRADIENT_LEVELS = ("params", "features")
_GRADIENT_MODES = ("vmap", "loop")
_SEED_LIMIT = 2**31  # seeds go through int32 arrays (vmapped over seeds)


# ----------------------------------------------------------------------------- state and records


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree (scan carry, vmapped over seeds).

    params: flax params of the model (the inner ``variables["params"]`` dict)
    opt_state: optax state of the model optimizer (its learning rate injected:
        ``opt_state.hyperparams["learning_rate"]``, in the last element of a chain with clipping)
    scheme_state: the weighting scheme's state (its NamedTuple)
    omega: (K, K) task-relationship matrix of the MTRL heads, or None without MTRL heads
    step: () int32, optimiser steps taken so far
    key: PRNG key from which the next batch is drawn
    diverged_at: () int32, -1 while every step has been finite; else the index of the first step whose
        losses or new state were non-finite (:func:`make_train_step`). The state is frozen from then on,
        so ``step == diverged_at`` at the end of a diverged run.
    method_state: the gradient method's state (:mod:`mtl_jax.gradient_methods`), or None without one
    """

    params: Any
    opt_state: Any
    scheme_state: Any
    omega: jax.Array | None
    step: jax.Array
    key: jax.Array
    diverged_at: jax.Array
    method_state: Any = None


class StepMetrics(NamedTuple):
    """What one step records (stacked by the scan: leading axis T, then S under :func:`train_seeds`).

    task_losses: (K,) unweighted batch losses, before the update
    weights: (K,) the scheme's weights used for this step
    total_loss: () ``sum(weights * task_losses) + regulariser``
    regulariser: () the MTRL head regulariser (0 without MTRL heads)
    grad_norms: (K,) norms of each unweighted task loss's gradient w.r.t. the last shared kernel,
        or None when the scheme does not need them
    present: (K,) bool, the task has at least one sample in the batch (an absent task's loss is 0
        and its term in ``total_loss`` is 0; the scheme is told, see :mod:`mtl_jax.weighting`)
    epoch_end: () bool, this step is the last of an epoch (:func:`make_train_step`; passed to a scheme
        that needs ``epoch_end``)
    losses_after: (K,) the same batch's task losses at the updated parameters, passed to the scheme's
        ``after_step`` (famo), or None when the scheme has none
    method_weights: (K,) the gradient method's coefficients of the shared direction,
        ``d = sum_k method_weights_k (w_k g_k)`` (its ``state.weights``), or None without a gradient
        method (or with graddrop, which has none)

    After a run has diverged (:class:`TrainState` ``diverged_at``), the steps after the diverged one
    record NaN in every float field and False in ``present``: no step was taken.
    """

    task_losses: jax.Array
    weights: jax.Array
    total_loss: jax.Array
    regulariser: jax.Array
    grad_norms: jax.Array | None
    present: jax.Array
    epoch_end: jax.Array | None = None
    losses_after: jax.Array | None = None
    method_weights: jax.Array | None = None


class TestMetrics(NamedTuple):
    """Per-task metrics on a split, all (K,); NaN where a metric does not apply to the task's kind.

    task_loss: cross-entropy or MSE (as in training); accuracy: classification tasks;
    mse, mae: regression tasks (averaged over the samples and the task's outputs)."""

    task_loss: jax.Array
    accuracy: jax.Array
    mse: jax.Array
    mae: jax.Array


class TrainResult(NamedTuple):
    """Output of :func:`train` (and, with a leading seed axis S on every leaf, of :func:`train_seeds`).

    state: the final :class:`TrainState`; history: :class:`StepMetrics` with leading axis T (steps);
    test: :class:`TestMetrics` of the final parameters on the test split; diverged_at: () int32 (S,
    under :func:`train_seeds`), -1 for a run whose steps were all finite, else the first step whose
    losses or update were non-finite -- the run stopped there, ``state`` holds the last finite
    parameters (those after ``diverged_at`` steps) and ``test`` is theirs."""

    state: TrainState
    history: StepMetrics
    test: TestMetrics
    diverged_at: jax.Array


class DivergenceWarning(RuntimeWarning):
    """Warned by :func:`train` and :func:`train_seeds` when a run's losses or update became non-finite.

    ``warnings.simplefilter("error", DivergenceWarning)`` turns it into an error."""


# ----------------------------------------------------------------------------- losses and metrics


def per_sample_losses(outputs: Sequence[jax.Array], ys: Sequence[jax.Array], kinds: Sequence[str]) -> jax.Array:
    """(B, K) loss of each sample for each task.

    outputs[k]: (B, C_k) logits or (B, D_k) predictions; ys[k]: (B,) int labels or (B, D_k) targets.
    Cross-entropy (natural log) for classification, mean over the D_k outputs of the squared error for
    regression."""
    columns = []
    for out, y, kind in zip(outputs, ys, kinds):
        if kind == CLASSIFICATION:
            columns.append(optax.softmax_cross_entropy_with_integer_labels(out, y))
        else:
            columns.append(jnp.mean((out - y) ** 2, axis=-1))
    return jnp.stack(columns, axis=1)


def masked_task_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, K) values, (B, K) bool mask -> (K,) mean over the marked samples of each task (0 if none)."""
    count = jnp.sum(mask, axis=0)
    total = jnp.sum(jnp.where(mask, values, 0.0), axis=0)
    return total / jnp.maximum(count, 1).astype(values.dtype)


def task_losses(model, params, x: jax.Array, ys, mask: jax.Array, kinds: Sequence[str]) -> jax.Array:
    """(K,) per-task mean losses of ``model`` with ``params`` on a batch ``x`` (B, ...)."""
    outputs = model.apply({"params": params}, x)
    return masked_task_mean(per_sample_losses(outputs, ys, kinds), mask)


def evaluate(model, params, split: Split, kinds: Sequence[str]) -> TestMetrics:
    """:class:`TestMetrics` of ``params`` on a whole split (arrays on the device)."""
    outputs = model.apply({"params": params}, split.x)
    dtype = outputs[0].dtype
    nan = jnp.full((), jnp.nan, dtype)
    loss = masked_task_mean(per_sample_losses(outputs, split.y, kinds), split.mask)
    acc, mse, mae = [], [], []
    for k, (out, y, kind) in enumerate(zip(outputs, split.y, kinds)):
        m = split.mask[:, k]
        n = jnp.maximum(jnp.sum(m), 1).astype(dtype)
        if kind == CLASSIFICATION:
            acc.append(jnp.sum(jnp.where(m, jnp.argmax(out, axis=-1) == y, False)) / n)
            mse.append(nan)
            mae.append(nan)
        else:
            err = out - y
            acc.append(nan)
            mse.append(jnp.sum(jnp.where(m, jnp.mean(err**2, axis=-1), 0.0)) / n)
            mae.append(jnp.sum(jnp.where(m, jnp.mean(jnp.abs(err), axis=-1), 0.0)) / n)
    return TestMetrics(loss, jnp.stack(acc).astype(dtype), jnp.stack(mse), jnp.stack(mae))


# ----------------------------------------------------------------------------- the step


def init_params(model, key: jax.Array, sample_x: jax.Array) -> Any:
    """The model's initial params for ``key`` (the same ones :func:`init_state` uses for that key)."""
    k_model, _, _ = jax.random.split(key, 3)
    return model.init(k_model, sample_x)["params"]


def init_state(
    model,
    scheme: weighting_lib.Weighting,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    sample_x: jax.Array,
    *,
    mtrl: MTRLCoupling | None = None,
    params: Any = None,
    method: gradient_lib.GradientMethod | None = None,
) -> TrainState:
    """The initial :class:`TrainState`. ``key`` is split three ways: model init, scheme init (rlw's key),
    and the batch key carried in the state. ``sample_x`` (B, ...) fixes the input shape and dtype.
    ``params``: the result of :func:`init_params` for the same key, when already computed (so the
    model init can be compiled once and shared by many schemes); None computes it here.
    With ``mtrl``, Omega starts at I / K (it is first recomputed after ``mtrl.every`` steps).
    ``method``: a gradient method (:mod:`mtl_jax.gradient_methods`), initialised with
    ``jax.random.fold_in(scheme key, 1)`` (so the other draws do not change), or None."""
    _, k_scheme, k_loop = jax.random.split(key, 3)
    if params is None:
        params = init_params(model, key, sample_x)
    num_tasks = num_heads(params)
    omega = None
    if mtrl is not None:
        omega = initial_omega(num_tasks, dtype=head_matrix(params).dtype)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        scheme_state=scheme.init(num_tasks, k_scheme),
        omega=omega,
        step=jnp.zeros((), jnp.int32),
        key=k_loop,
        diverged_at=jnp.full((), -1, jnp.int32),
        method_state=None if method is None else method.init(num_tasks, jax.random.fold_in(k_scheme, 1)),
    )


def draw_batch(data: Split, key: jax.Array, batch_size: int | None, stratify: bool = False):
    """A training batch ``(x, ys, mask)`` drawn on the device from ``key``.

    ``batch_size=None``: the whole split. Otherwise ``batch_size`` rows uniformly with replacement
    (``jax.random.randint``); a task with no marked row in the batch then gets loss 0 at that step.
    ``stratify=True`` (for tasks that own disjoint samples, e.g. one head per school group): for each
    task k, ``batch_size // K`` rows drawn uniformly with replacement among task k's own rows, each
    marked for task k only -- every task is in every batch with the same count.
    """
    if batch_size is None:
        return data.x, data.y, data.mask
    if not stratify:
        idx = jax.random.randint(key, (batch_size,), 0, data.x.shape[0])
        return data.x[idx], tuple(y[idx] for y in data.y), data.mask[idx]
    n, num_tasks = data.mask.shape
    per_task = batch_size // num_tasks

    def draw(k, member):  # member (N,) bool -> (per_task,) rows of that task
        return jax.random.choice(k, n, (per_task,), p=member / jnp.sum(member))

    idx = jax.vmap(draw)(jax.random.split(key, num_tasks), data.mask.T.astype(jnp.float32)).reshape(-1)
    own = jnp.repeat(jnp.eye(num_tasks, dtype=bool), per_task, axis=0)  # (K * per_task, K)
    return data.x[idx], tuple(y[idx] for y in data.y), data.mask[idx] & own


def make_train_step(
    model,
    scheme: weighting_lib.Weighting,
    optimizer: optax.GradientTransformation,
    task_kinds: Sequence[str],
    *,
    batch_size: int | None = None,
    stratify: bool = False,
    mtrl: MTRLCoupling | None = None,
    freeze_on_divergence: bool = True,
    steps_per_epoch: int | None = None,
    gradient_method: gradient_lib.GradientMethod | None = None,
    gradient_level: str = "params",
    gradient_mode: str = "vmap",
) -> Callable[[TrainState, Split], tuple[TrainState, StepMetrics]]:
    """A pure, jitted ``step(state, data) -> (state, StepMetrics)``.

    ``data`` is the training :class:`Split` as device arrays (y: int labels / float targets, mask bool).
    One step:

      1. split ``state.key``; draw a batch with :func:`draw_batch` (``batch_size``, ``stratify``);
      2. ``L, vjp = jax.vjp(task_losses, params)`` -- one forward pass, L (K,);
      3. if the scheme needs ``grad_norms``: ``G_k = ||dL_k / dW_shared||``, W_shared the last shared
         kernel, from the same forward pass (K cotangent passes; under jit only the path from the
         losses back to that kernel is computed);
         ``epoch_end`` (if the scheme needs it): ``(state.step + 1) % steps_per_epoch == 0``, the
         last step of an epoch; ``steps_per_epoch`` defaults to ``ceil(N / batch_size)`` for N training
         rows (1 with ``batch_size=None``): batches are drawn with replacement, so an "epoch" is as many
         steps as one pass over the data would take;
      4. ``w, scheme_state = scheme.update(L, scheme_state, present=present, **extra)``, ``w``
         stop-gradient'ed; ``present`` (K,) bool marks the tasks with a sample in the batch (an absent
         task's L is 0 with no gradient, and the scheme uses its last observed loss instead);
      5. grads = ``vjp(w)`` = gradient of ``sum_k w_k L_k`` (+ the gradient of the MTRL regulariser
         ``R(H, Omega)`` with Omega from the state), optax update; if the scheme has an ``after_step``
         (famo): one more forward pass, the losses ``L'`` (K,) of the same batch at the updated
         parameters, and ``scheme_state = scheme.after_step(L', scheme_state, present=present)``;
      6. ``step += 1``; with MTRL heads, Omega is recomputed in closed form from the new heads when
         ``step % mtrl.every == 0`` (so after ``n * every`` steps, Omega = omega_update(H(params)));
      7. divergence: if ``L``, the weights or the total loss, or any float leaf of the new state
         (params, optimizer and scheme states, Omega) is non-finite, ``diverged_at`` is set to this
         step's index (``state.step``) and -- with ``freeze_on_divergence`` (the default) -- the state
         is left as it was: no update is applied, now or later (``jnp.where`` selects, so this works
         under vmap, where each seed freezes on its own). This step's metrics are recorded as computed;
         every later step records NaN (``present`` False). ``freeze_on_divergence=False`` applies every
         update regardless (the plain loop, e.g. as a reference), still recording ``diverged_at``.

    With a ``gradient_method`` (:mod:`mtl_jax.gradient_methods`; the state must come from
    :func:`init_state` with ``method=``), steps 2 and 5 change: the parameters are split into the shared
    ones ``theta`` (everything but the heads) and the heads ``H``, and

      2'. ``gradient_methods.task_gradients`` gives the losses L (K,) and the per-task gradients
          ``g_k = dL_k / dtheta`` (K, P) from one forward pass and one vmapped backward pass
          (``gradient_mode="loop"``: K unrolled backward passes, same numbers);
      5'. the scheme's weights scale the rows, ``G = w[:, None] * g`` (with ``equal``, w = 1: the plain
          per-task gradients), the method turns them into the shared direction
          ``d, method_state = method.update(G, method_state)`` (P,) (``losses=L`` too for mgda's
          loss-based normalisations), and the gradient is ``{theta: d, H: dH}`` with ``dH`` the
          gradient of ``sum_k w_k L_k`` w.r.t. the heads: each head keeps its own task's gradient
          (head k only affects L_k). MTRL's regulariser gradient is added as before.

    ``gradient_level="features"`` (MGDA-UB, Sener and Koltun 2018, section 3.3, and the other methods
    on the same bound): ``g_k = dL_k / dz`` w.r.t. the trunk's output ``z`` (B, F) of the batch (P = B F),
    and the direction is pulled back through the trunk with one more backward pass, ``dtheta = J_z^T d``.
    A task with no sample in the batch has ``g_k = 0``. Schemes that need ``grad_norms`` (gradnorm) are
    not combined with a gradient method (ValueError).
    """
    kinds = tuple(task_kinds)
    needs = tuple(getattr(scheme, "needs", ()))
    unknown = [n for n in needs if n not in _SUPPORTED_EXTRAS]
    if unknown:
        raise ValueError(f"scheme: needs inputs {unknown} that the training step cannot supply "
                         f"(supported: {_SUPPORTED_EXTRAS})")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, low=1)
    if stratify and batch_size is not None and batch_size < len(kinds):
        raise ValueError(f"batch_size: stratified batches need at least one row per task "
                         f"({len(kinds)}), got {batch_size}")
    if mtrl is not None:
        mtrl = validate_coupling(mtrl)
    if steps_per_epoch is not None:
        steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, low=1)
    wants_grad_norms = "grad_norms" in needs
    after_step = getattr(scheme, "after_step", None)
    method = gradient_method
    if method is not None:
        if not isinstance(method, gradient_lib.GradientMethod):
            raise ValueError(f"gradient_method: must be a gradient_methods.GradientMethod or None, got {method!r}")
        if wants_grad_norms:
            raise ValueError("gradient_method: cannot be combined with a scheme that needs grad_norms (gradnorm)")
        unknown = [n for n in method.needs if n != "losses"]
        if unknown:
            raise ValueError(f"gradient_method: needs inputs {unknown} that the training step cannot supply")
    if gradient_level not in GRADIENT_LEVELS:
        raise ValueError(f"gradient_level: must be one of {GRADIENT_LEVELS}, got {gradient_level!r}")
    if gradient_mode not in _GRADIENT_MODES:
        raise ValueError(f"gradient_mode: must be one of {_GRADIENT_MODES}, got {gradient_mode!r}")
    trunk, heads_apply = _split_model(model) if method is not None and gradient_level == "features" else (None, None)

    def method_gradients(params, x, ys, mask):
        """(losses (K,), per-task shared gradients (K, P), head gradients of sum_k L_k, pull-back of a (P,) direction)."""
        shared = {name: value for name, value in params.items() if name != HEADS}
        heads = params[HEADS]
        if gradient_level == "params":
            def loss_fn(sh, hd):
                return task_losses(model, {**sh, HEADS: hd}, x, ys, mask, kinds)

            tg = gradient_lib.task_gradients(loss_fn, shared, heads, mode=gradient_mode)
            return tg.losses, tg.shared, tg.heads, tg.unravel

        z, trunk_vjp = jax.vjp(lambda sh: trunk(sh, x), shared)

        def head_loss(features, hd):
            return masked_task_mean(per_sample_losses(heads_apply(hd, features), ys, kinds), mask)

        tg = gradient_lib.task_gradients(head_loss, z, heads, mode=gradient_mode)
        return tg.losses, tg.shared, tg.heads, lambda d: trunk_vjp(tg.unravel(d))[0]

    @jax.jit
    def step(state: TrainState, data: Split) -> tuple[TrainState, StepMetrics]:
        key, batch_key = jax.random.split(state.key)
        x, ys, mask = draw_batch(data, batch_key, batch_size, stratify)
        if method is None:
            losses, vjp_fn = jax.vjp(lambda p: task_losses(model, p, x, ys, mask, kinds), state.params)
        else:
            losses, shared_grads, head_grads, pull_back = method_gradients(state.params, x, ys, mask)
        num_tasks = losses.shape[0]
        # A task with no sample in the batch has loss 0/1 = 0 (no gradient); the scheme must not take
        # that 0 for a loss (dwa's ratios would become 0/0), so it is told which tasks are present.
        present = jnp.any(mask, axis=0)
        per_epoch = steps_per_epoch or (1 if batch_size is None else -(-data.x.shape[0] // batch_size))
        epoch_end = (state.step + 1) % per_epoch == 0

        extra, grad_norms = {}, None
        if "epoch_end" in needs:
            extra["epoch_end"] = epoch_end
        if wants_grad_norms:
            # Row k of the identity pulls back dL_k / dparams; only the shared kernel's part is kept,
            # so XLA prunes the rest of the K backward passes.
            per_task = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))[0]
            kernel_grads = last_shared_kernel(per_task)  # (K, q, p)
            grad_norms = jnp.sqrt(jnp.sum(kernel_grads**2, axis=tuple(range(1, kernel_grads.ndim))))
            extra["grad_norms"] = grad_norms

        weights, scheme_state = scheme.update(losses, state.scheme_state, present=present, **extra)
        weights = jax.lax.stop_gradient(weights).astype(losses.dtype)
        method_state, method_weights = state.method_state, None
        if method is None:
            (grads,) = vjp_fn(weights)
        else:
            method_extra = {"losses": losses} if "losses" in method.needs else {}
            direction, method_state = method.update(weights[:, None] * shared_grads, state.method_state,
                                                    **method_extra)
            # Every head leaf has the task axis first (TaskHeads): row k is head k's, scaled by w_k.
            scaled_heads = jax.tree.map(lambda g: g * weights.reshape((-1,) + (1,) * (g.ndim - 1)), head_grads)
            grads = {**pull_back(direction.astype(losses.dtype)), HEADS: scaled_heads}
            method_weights = getattr(method_state, "weights", None)
        total = jnp.dot(weights, losses)

        regulariser = jnp.zeros((), losses.dtype)
        if mtrl is not None:
            def reg_fn(p):
                return mtrl_regulariser(head_matrix(p), state.omega, mtrl.lam1, mtrl.lam2, mtrl.eps)

            regulariser, reg_grads = jax.value_and_grad(reg_fn)(state.params)
            grads = jax.tree.map(jnp.add, grads, reg_grads)
            regulariser = regulariser.astype(losses.dtype)
            total = total + regulariser

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        losses_after = None
        if after_step is not None:
            # The same batch at the updated parameters (one forward pass, no gradient): famo's loss change.
            losses_after = jax.lax.stop_gradient(task_losses(model, params, x, ys, mask, kinds)).astype(losses.dtype)
            scheme_state = after_step(losses_after, scheme_state, present=present)
        step_count = state.step + 1
        omega = None
        if mtrl is not None:
            omega = refresh_omega(params, state.omega, step_count, mtrl.every, mtrl.eps)

        metrics = StepMetrics(losses, weights, total, regulariser, grad_norms, present, epoch_end, losses_after,
                              method_weights)
        new_state = TrainState(params, opt_state, scheme_state, omega, step_count, key, state.diverged_at,
                               method_state)

        finite = _all_finite((losses, weights, total, losses_after, new_state))
        was_diverged = state.diverged_at >= 0
        diverged_at = jnp.where(was_diverged | finite, state.diverged_at, state.step).astype(jnp.int32)
        new_state = new_state._replace(diverged_at=diverged_at)
        if freeze_on_divergence:
            # Frozen: the state before the first non-finite step, kept to the end of the scan (under
            # vmap a where, not a branch, so each seed freezes on its own).
            stop = diverged_at >= 0
            new_state = _select(stop, state._replace(diverged_at=diverged_at), new_state)
            metrics = jax.tree.map(lambda m: _after_divergence(was_diverged, m), metrics)
        return new_state, metrics

    return step


def _split_model(model):
    """(trunk, heads_apply) of a model whose heads are a :class:`~mtl_jax.models.TaskHeads` named ``heads``.

    ``trunk(shared_params, x) -> z`` (B, F), the input of the heads (the model run with the heads'
    call intercepted); ``heads_apply(head_params, z)`` -> the K outputs."""
    import flax.linen as nn

    heads_module = TaskHeads(_task_out_dims(model.num_tasks, model.out_dims), model.head_hidden,
                             model.activation, model.param_dtype)

    def trunk(shared, x):
        captured = []

        def intercept(next_fun, args, kwargs, context):
            if isinstance(context.module, TaskHeads) and context.method_name == "__call__":
                captured.append(args[0])
                return ()
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(intercept):
            model.apply({"params": shared}, x)
        return captured[0]

    def heads_apply(head_params, z):
        return heads_module.apply({"params": head_params}, z)

    return trunk, heads_apply


def _float_leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]


def _all_finite(tree) -> jax.Array:
    """() bool: every float leaf of ``tree`` is finite (PRNG keys and integer leaves are skipped)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in _float_leaves(tree)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.ones((), bool)


def _select(pred: jax.Array, on_true, on_false):
    """Leaf-wise ``jnp.where`` over two pytrees of the same structure (PRNG keys through their data)."""
    def pick(a, b):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(a)
            return jax.random.wrap_key_data(jnp.where(pred, jax.random.key_data(a), jax.random.key_data(b)),
                                            impl=impl)
        return jnp.where(pred, a, b)

    return jax.tree.map(pick, on_true, on_false)


def _after_divergence(was_diverged: jax.Array, metric: jax.Array) -> jax.Array:
    """A step's metric, or its 'no step taken' value (NaN; False for ``present``) once diverged."""
    if jnp.issubdtype(metric.dtype, jnp.inexact):
        return jnp.where(was_diverged, jnp.full_like(metric, jnp.nan), metric)
    return jnp.where(was_diverged, jnp.zeros_like(metric), metric)


# ----------------------------------------------------------------------------- config and the loop


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _as_pairs(name: str, kwargs) -> tuple:
    """A dict or (name, value) pairs as sorted, hashable pairs (ValueError naming ``name``)."""
    items = kwargs.items() if isinstance(kwargs, dict) else kwargs
    try:
        items = tuple(sorted((str(k), v) for k, v in items))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a dict or (name, value) pairs, got {kwargs!r}") from None
    try:
        hash(items)
    except TypeError:
        raise ValueError(f"{name}: values must be hashable (numbers, strings, tuples), got {kwargs!r}") from None
    return items


def _as_coupling(value) -> MTRLCoupling | None:
    """``mtrl`` as a checked :class:`MTRLCoupling` of Python numbers (hashable), or None.

    A dict of its fields (``{"lam2": 0.05, "every": 4}``, the others at their defaults) is accepted
    for convenience, e.g. from a JSON file."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(MTRLCoupling._fields))
        if unknown:
            raise ValueError(f"mtrl: unknown fields {unknown}; expected some of {MTRLCoupling._fields}")
        value = MTRLCoupling(**value)
    elif not isinstance(value, MTRLCoupling):
        raise ValueError(f"mtrl: must be None, an MTRLCoupling or a dict of its fields, got {value!r}")
    return validate_coupling(value, "mtrl")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the data and the seed list.

    model: ``"mlp"`` (trunk widths ``hidden``) or ``"cnn"`` (conv widths ``features``, dense width
        ``hidden[-1]``); ``head_hidden``: hidden widths inside each task head (default: linear heads).
    optimizer: ``"adam"`` or ``"sgd"``, with ``learning_rate``; max_grad_norm: None, or clip the model's
        gradient (of the weighted total) to this global norm before the optimizer
        (``optax.clip_by_global_norm``; FAMO's official code clips, see :func:`mtl_jax.weighting.famo`).
    steps: optimiser steps T; batch_size: samples per step (None: full batch); stratify: draw
        ``batch_size // K`` rows per task from its own rows (:func:`draw_batch`), for tasks on disjoint
        samples such as :func:`~mtl_jax.data.deep.school_multihead`.
    steps_per_epoch: the steps that make an epoch for the schemes that work per epoch (dwa, gradnorm's
        ``L(0)``); None: ``ceil(N_train / batch_size)`` (:func:`make_train_step`).
    scheme: a name of :data:`mtl_jax.weighting.SCHEMES`; scheme_kwargs: its keyword arguments (a dict
        or pairs; stored as sorted pairs so the config is hashable). For ``"uncertainty"``, unless
        given in ``scheme_kwargs``: the log-variances are stepped by the model's optimizer (``"adam"``
        or ``"sgd"``, without the clipping) with the model's ``learning_rate`` (or the given
        ``learning_rate``), and ``kinds`` are the data's task kinds (Kendall's classification form for
        a classification task) when the scheme is built for data (:meth:`make_scheme` with a spec).
    seed: the seed of :func:`train` (``train_seeds`` takes its own list).
    mtrl: None (independent heads), or a :class:`~mtl_jax.models.MTRLCoupling` (or a dict of its
        fields) coupling the heads by the MTRL regulariser
        ``(lam1/2)||H||^2 + (lam2/2) tr(H^T Omega^{-1} H)``, Omega recomputed every ``every`` steps with
        relative eigenvalue floor ``eps`` (``docs/weighting.md``, section 3). Needs tasks with equal
        output sizes.
    dtype: ``"float32"`` or ``"float64"`` (parameters and inputs; float64 needs ``jax_enable_x64``).
    vocab_size, embed_dim: the ``"embedding_bag"`` model's token ids (the tokenizer's ``num_buckets``)
        and embedding width (:func:`mtl_jax.models.make_model`; unused by the other models).
    gradient_method: None (the scheme's weighted sum is backpropagated), or a name of
        :data:`mtl_jax.gradient_methods.METHODS`: the shared parameters then descend along the method's
        combination of the per-task gradients (rows scaled by the scheme's weights), the heads along their
        own gradients (:func:`make_train_step`); gradient_kwargs: the method's keyword arguments (dict or
        pairs, stored sorted); gradient_level: ``"params"`` (gradients of the shared parameters) or
        ``"features"`` (of the trunk's output, pulled back through the trunk: MGDA-UB's bound);
        gradient_mode: ``"vmap"`` (one batched backward pass) or ``"loop"`` (K unrolled passes, the
        same numbers; measured faster on a small CPU, docs/gradient_methods.md).

    A config is hashable (the compiled programs are cached on it): containers are normalised to
    tuples, ``scheme_kwargs`` to sorted pairs and ``mtrl`` to an ``MTRLCoupling`` of Python numbers.
    """

    model: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    features: tuple[int, ...] = (16, 32)
    head_hidden: tuple[int, ...] = ()
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    steps: int = 500
    batch_size: int | None = 64
    stratify: bool = False
    steps_per_epoch: int | None = None
    max_grad_norm: float | None = None
    scheme: str = "equal"
    scheme_kwargs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    mtrl: MTRLCoupling | None = None
    dtype: str = "float32"
    vocab_size: int = 2**14
    embed_dim: int = 64
    gradient_method: str | None = None
    gradient_kwargs: tuple[tuple[str, Any], ...] = ()
    gradient_level: str = "params"
    gradient_mode: str = "vmap"

    def __post_init__(self):
        # Normalise containers so that equal configs hash equal (the compiled program is cached on it).
        for name in ("hidden", "features", "head_hidden"):
            widths = tuple(check_int(name, v, low=1) for v in _as_tuple(getattr(self, name)))
            object.__setattr__(self, name, widths)
        for field in ("scheme_kwargs", "gradient_kwargs"):
            object.__setattr__(self, field, _as_pairs(field, getattr(self, field)))
        object.__setattr__(self, "mtrl", _as_coupling(self.mtrl))
        self._validate()

    def _validate(self):
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: must be one of {MODEL_KINDS}, got {self.model!r}")
        check_int("vocab_size", self.vocab_size, low=1, high=2**24)
        check_int("embed_dim", self.embed_dim, low=1)
        # The widths themselves were checked (integers >= 1) when normalised in __post_init__.
        if not self.hidden:
            raise ValueError(f"hidden: need at least one width, got {self.hidden}")
        if not self.features:
            raise ValueError(f"features: need at least one width, got {self.features}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer: must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        check_real("learning_rate", self.learning_rate, low=0.0, strict=True)
        check_int("steps", self.steps, low=1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, low=1)
        if not isinstance(self.stratify, (bool, np.bool_)):
            raise ValueError(f"stratify: must be a bool, got {self.stratify!r}")
        if self.steps_per_epoch is not None:
            check_int("steps_per_epoch", self.steps_per_epoch, low=1)
        if self.max_grad_norm is not None:
            check_real("max_grad_norm", self.max_grad_norm, low=0.0, strict=True)
        if self.scheme not in weighting_lib.SCHEMES:
            raise ValueError(f"scheme: must be one of {weighting_lib.SCHEMES}, got {self.scheme!r}")
        check_int("seed", self.seed, low=0, high=_SEED_LIMIT)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {_DTYPES}, got {self.dtype!r}")
        self.make_scheme()  # the factory checks scheme_kwargs (ValueError naming the argument)
        if self.gradient_level not in GRADIENT_LEVELS:
            raise ValueError(f"gradient_level: must be one of {GRADIENT_LEVELS}, got {self.gradient_level!r}")
        if self.gradient_mode not in _GRADIENT_MODES:
            raise ValueError(f"gradient_mode: must be one of {_GRADIENT_MODES}, got {self.gradient_mode!r}")
        if self.gradient_method is None:
            if self.gradient_kwargs:
                raise ValueError(f"gradient_kwargs: given without a gradient_method, got {dict(self.gradient_kwargs)}")
            return
        if self.gradient_method not in gradient_lib.METHODS:
            raise ValueError(f"gradient_method: must be None or one of {gradient_lib.METHODS}, "
                             f"got {self.gradient_method!r}")
        if "grad_norms" in self.make_scheme().needs:
            raise ValueError(f"gradient_method: cannot be combined with scheme {self.scheme!r}, which needs "
                             "grad_norms")
        self.make_gradient_method()  # checks gradient_kwargs

    def make_gradient_method(self) -> gradient_lib.GradientMethod | None:
        """The config's gradient method (:mod:`mtl_jax.gradient_methods`), or None."""
        if self.gradient_method is None:
            return None
        try:
            return gradient_lib.get(self.gradient_method, **dict(self.gradient_kwargs))
        except TypeError as e:
            raise ValueError(f"gradient_kwargs: {e}") from None

    def coupling(self) -> MTRLCoupling | None:
        """The :class:`~mtl_jax.models.MTRLCoupling` of this config (``self.mtrl``), or None without MTRL heads."""
        return self.mtrl

    def make_scheme(self, spec: TaskSpec | None = None, *, learning_rate: Any = None,
                    overrides: dict[str, Any] | None = None) -> weighting_lib.Weighting:
        """The config's weighting scheme; ``spec``: the data's :class:`~mtl_jax.data.deep.TaskSpec`, which
        gives ``"uncertainty"`` its per-task ``kinds`` (None: the scheme's default, all regression).

        ``learning_rate``: the model's rate to use instead of ``self.learning_rate`` (a () array, possibly
        traced: :func:`train_grid`), which ``"uncertainty"`` also steps its log-variances with unless its
        ``scheme_kwargs`` give ``learning_rate`` or ``optimizer``. ``overrides``: keyword arguments of the
        scheme that replace ``scheme_kwargs`` (possibly traced; :data:`SCHEME_GRID_PARAMETERS`)."""
        kwargs = {**dict(self.scheme_kwargs), **dict(overrides or {})}
        if self.scheme == "uncertainty":
            if "optimizer" not in kwargs:
                rate = self.learning_rate if learning_rate is None else learning_rate
                kwargs["optimizer"] = self._base_optimizer(kwargs.pop("learning_rate", rate), None)
            if spec is not None and "kinds" not in kwargs:
                kwargs["kinds"] = tuple(spec.kinds)
        return weighting_lib.get(self.scheme, **kwargs)

    def _base_optimizer(self, learning_rate: Any, dtype) -> optax.GradientTransformation:
        """``optimizer`` with its rate injected (``optax.inject_hyperparams``): the rate is a () array in
        the optimizer's state, ``opt_state.hyperparams["learning_rate"]``, so a traced rate (a grid under
        ``vmap``) runs the same program. ``dtype``: the rate's dtype (None: that of the parameters, as
        optax does); a traced rate is cast to it, so it rounds as a Python float would."""
        check_real("learning_rate", learning_rate, low=0.0, strict=True, allow_traced=True)
        if isinstance(learning_rate, (jax.Array, np.ndarray)):
            learning_rate = jnp.asarray(learning_rate).astype(dtype or jnp.result_type(float))
        factory = optax.adam if self.optimizer == "adam" else optax.sgd
        return optax.inject_hyperparams(factory, hyperparam_dtype=dtype)(learning_rate=learning_rate)

    def make_optimizer(self, learning_rate: Any = None) -> optax.GradientTransformation:
        """The model's optimizer: ``optimizer`` with ``learning_rate``, after clipping by ``max_grad_norm``.

        The rate is injected (``optax.inject_hyperparams``, in the config's ``dtype``): it lives in the
        optimizer state. ``learning_rate``: a rate to use instead of ``self.learning_rate`` (a () array,
        possibly traced: :func:`train_grid`)."""
        rate = self.learning_rate if learning_rate is None else learning_rate
        base = self._base_optimizer(rate, jnp.dtype(self.dtype))
        if self.max_grad_norm is None:
            return base
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), base)


def to_device(split: Split, spec: TaskSpec, dtype=jnp.float32) -> Split:
    """NumPy split -> device arrays: inputs and regression targets in ``dtype``, labels int32, mask bool."""
    ys = tuple(
        jnp.asarray(y, jnp.int32) if kind == CLASSIFICATION else jnp.asarray(y, dtype)
        for y, kind in zip(split.y, spec.kinds)
    )
    return Split(x=jnp.asarray(split.x, dtype), y=ys, mask=jnp.asarray(split.mask, bool))


class Components(NamedTuple):
    """The pieces :func:`train` builds from a config: reuse them to time or drive single steps."""

    model: Any
    scheme: weighting_lib.Weighting
    optimizer: optax.GradientTransformation
    mtrl: MTRLCoupling | None
    step: Callable[[TrainState, Split], tuple[TrainState, StepMetrics]]
    method: gradient_lib.GradientMethod | None = None


def make_components(config: TrainConfig, spec: TaskSpec, scheme: weighting_lib.Weighting | None = None,
                    learning_rate: Any = None) -> Components:
    """Model, scheme, optimizer, MTRL coupling and jitted step exactly as :func:`make_run` uses them.

    ``scheme``: a :class:`~mtl_jax.weighting.Weighting` used instead of the config's ``scheme`` and
    ``scheme_kwargs`` (None: ``config.make_scheme(spec, learning_rate=learning_rate)``).
    ``learning_rate``: the model's rate instead of ``config.learning_rate`` (a () array, possibly traced;
    it only enters the optimizer's initial state, :meth:`TrainConfig.make_optimizer`). With
    ``data = to_device(dataset.train, spec, config.dtype)`` and
    ``state = init_state(c.model, c.scheme, c.optimizer, jax.random.key(seed), data.x[:1], mtrl=c.mtrl)``,
    ``c.step(state, data)`` is one training step of the run with that seed."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: must be a TrainConfig, got {type(config).__name__}")
    spec = validate_spec(spec)
    model = make_model(config.model, spec.out_dims, hidden=config.hidden, features=config.features,
                       head_hidden=config.head_hidden, param_dtype=jnp.dtype(config.dtype),
                       vocab_size=config.vocab_size, embed_dim=config.embed_dim)
    if scheme is None:
        scheme = config.make_scheme(spec, learning_rate=learning_rate)
    optimizer = config.make_optimizer(learning_rate)
    mtrl, method = config.coupling(), config.make_gradient_method()
    step = make_train_step(model, scheme, optimizer, spec.kinds, batch_size=config.batch_size,
                           stratify=config.stratify, mtrl=mtrl, steps_per_epoch=config.steps_per_epoch,
                           gradient_method=method, gradient_level=config.gradient_level,
                           gradient_mode=config.gradient_mode)
    return Components(model, scheme, optimizer, mtrl, step, method)


def make_run(
    config: TrainConfig, spec: TaskSpec, scheme: weighting_lib.Weighting | None = None,
    learning_rate: Any = None,
) -> Callable[[jax.Array, Any, Split, Split], TrainResult]:
    """The whole training run of ``config`` as one pure function ``run(seed, params, train, test)``.

    ``run`` builds the initial :class:`TrainState` from ``jax.random.key(seed)`` (:func:`init_state`),
    takes ``config.steps`` steps of the jitted step (:func:`make_components`) in one ``lax.scan`` over
    the ``train`` split, and evaluates the final parameters on the ``test`` split; it returns a
    :class:`TrainResult` (history leading axis T = ``config.steps``, test metrics (K,)).

      seed: () integer (``config.seed`` is not used: the seed is an argument, so it can be vmapped);
      params: ``init_params(model, jax.random.key(seed), train.x[:1])``, or None to draw them inside
          ``run`` (the same numbers; precompute them to compile the weight init once for many runs);
      train, test: :class:`Split` s of device arrays, as :func:`to_device` gives them.

    ``run`` is not jitted: ``jax.jit(run)`` is :func:`train`'s program and
    ``jax.jit(jax.vmap(run, in_axes=(0, 0, None, None)))`` is :func:`train_seeds`'. ``scheme``
    replaces the config's scheme; since the scheme is built before ``run`` is traced, a scheme with
    traced arrays inside works too, e.g. ``make_run(config, spec, weighting.fixed(w))(seed, None, tr, te)``
    inside a ``vmap`` over weight rows ``w``. ``learning_rate``: the model's rate instead of
    ``config.learning_rate``, possibly traced (:func:`make_grid_run`; it is injected into the optimizer's
    state, :meth:`TrainConfig.make_optimizer`). Inputs are not checked here (:func:`train` does that)."""
    start, advance, finish = make_run_parts(config, spec, scheme, learning_rate)

    def run(seed, params, train_split: Split, test_split: Split) -> TrainResult:
        state, history = advance(start(seed, params, train_split), train_split, config.steps)
        return finish(state, history, test_split)

    return run


def make_run_parts(config: TrainConfig, spec: TaskSpec, scheme: weighting_lib.Weighting | None = None,
                   learning_rate: Any = None):
    """:func:`make_run`'s run in three pure pieces, for runs in chunks (:func:`train_seeds` with a checkpoint):

      start(seed, params, train) -> TrainState        the initial state (``params`` as for ``run``)
      advance(state, train, length) -> (TrainState, StepMetrics)   ``length`` (static) steps in a ``lax.scan``
      finish(state, history, test) -> TrainResult     the test metrics of the final parameters

    ``run`` is ``finish(*advance(start(seed, params, train), train, config.steps), test)``."""
    spec = validate_spec(spec)
    model, scheme, optimizer, mtrl, step, method = make_components(config, spec, scheme, learning_rate)

    def start(seed, params, train_split: Split) -> TrainState:
        return init_state(model, scheme, optimizer, jax.random.key(seed), train_split.x[:1], mtrl=mtrl,
                          params=params, method=method)

    def advance(state: TrainState, train_split: Split, length: int):
        return jax.lax.scan(lambda s, _: step(s, train_split), state, None, length=length)

    def finish(state: TrainState, history: StepMetrics, test_split: Split) -> TrainResult:
        return TrainResult(state, history, evaluate(model, state.params, test_split, spec.kinds), state.diverged_at)

    return start, advance, finish


@functools.lru_cache(maxsize=64)
def _compiled_init(model):
    """(init_one, init_many): jitted ``seed -> params`` and its vmap over seeds.

    Separate from the run and cached on the model alone: drawing the initial weights (threefry) is a
    large part of a small program's compile time, and it is the same for every scheme and setting."""
    def init(seed, sample_x):
        return init_params(model, jax.random.key(seed), sample_x)

    return jax.jit(init), jax.jit(jax.vmap(init, in_axes=(0, None)))


@functools.lru_cache(maxsize=64)
def _compiled_run(config: TrainConfig, spec: TaskSpec):
    """(run_one, run_many): :func:`make_run`'s ``run`` jitted, and jitted after a vmap over seeds and params.

    Cached on (config without its seed, spec), so repeated calls -- several seeds, a benchmark --
    reuse one compiled program per input shape."""
    run = make_run(config, spec)
    return jax.jit(run), jax.jit(jax.vmap(run, in_axes=(0, 0, None, None)))


def _prepare(config: TrainConfig, data: MultiTaskDataset):
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(data, MultiTaskDataset):
        raise ValueError(f"data: must be a MultiTaskDataset, got {type(data).__name__}")
    spec = validate_spec(data.spec)
    validate_split(data.train, spec, "data.train")
    validate_split(data.test, spec, "data.test")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("config: dtype 'float64' needs jax.config.update('jax_enable_x64', True)")
    if config.mtrl is not None and len(set(spec.out_dims)) != 1:
        raise ValueError(f"config: mtrl (coupled heads) needs tasks with equal output sizes, got {spec.out_dims}")
    if config.model == "cnn" and np.asarray(data.train.x).ndim not in (3, 4):
        raise ValueError(f"config: model 'cnn' needs images (N, H, W[, C]), "
                         f"got inputs of shape {np.shape(data.train.x)}")
    if config.model == "embedding_bag" and np.asarray(data.train.x).ndim != 2:
        raise ValueError(f"config: model 'embedding_bag' needs token ids (N, L), "
                         f"got inputs of shape {np.shape(data.train.x)}")
    dtype = jnp.dtype(config.dtype)
    init_fns = _compiled_init(make_components(config, spec).model)
    run_fns = _compiled_run(dataclasses.replace(config, seed=0), spec)
    return init_fns, run_fns, to_device(data.train, spec, dtype), to_device(data.test, spec, dtype)


def _warn_if_diverged(result: TrainResult, seeds: Sequence[int], labels: Sequence[str] | None = None) -> None:
    """Warn (:class:`DivergenceWarning`) naming each diverged seed and its step, and each seed whose test
    loss is not finite although training never was (parameters grown so large that evaluating them
    overflows); waits for the run. ``labels``: one name per run (flattened leading axes) instead of
    ``"seed s"``."""
    steps = np.asarray(result.diverged_at).reshape(-1)
    if labels is None:
        labels = [f"seed {int(s)}" for s in seeds]
    bad = [f"{label} at step {int(t)}" for label, t in zip(labels, steps) if t >= 0]
    if bad:
        warnings.warn(
            f"training diverged (non-finite loss or update) for {len(bad)} of {len(steps)} run(s): "
            f"{', '.join(bad)}. Each stopped there: its parameters are the last finite ones, its history "
            f"is NaN after that step, and its test metrics are those of the stopped model "
            f"(TrainResult.diverged_at; -1 for the runs that did not diverge).",
            DivergenceWarning, stacklevel=3)
    test_loss = np.asarray(result.test.task_loss).reshape(len(steps), -1)
    overflow = [label for label, t, row in zip(labels, steps, test_loss) if t < 0 and not np.all(np.isfinite(row))]
    if overflow:
        warnings.warn(
            f"the test loss is not finite for {', '.join(overflow)}, although every training loss and update "
            "was: the parameters grew until evaluating them overflowed "
            "(the learning rate is probably too large for this model).", DivergenceWarning, stacklevel=3)


def _check_seeds(seeds) -> list[int]:
    """``seeds`` as a list of ints in [0, 2^31) (ValueError naming ``seeds``)."""
    arr = np.asarray(list(seeds) if isinstance(seeds, range) else seeds)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(f"seeds: must be a non-empty 1-D sequence of integers, got {seeds!r}")
    return [check_int("seeds", int(s), low=0, high=_SEED_LIMIT) for s in arr]


def train(config: TrainConfig, data: MultiTaskDataset) -> TrainResult:
    """Train one model with ``config.seed``; returns :class:`TrainResult` (history leading axis T).

    A run whose losses or update become non-finite stops at that step (``TrainResult.diverged_at``,
    :func:`make_train_step`) and a :class:`DivergenceWarning` names the step; this waits for the run
    to finish."""
    (init_one, _), (run_one, _), train_split, test_split = _prepare(config, data)
    seed = jnp.asarray(config.seed, jnp.int32)
    result = run_one(seed, init_one(seed, train_split.x[:1]), train_split, test_split)
    _warn_if_diverged(result, [config.seed])
    return result


def train_seeds(config: TrainConfig, data: MultiTaskDataset, seeds: Sequence[int], *, checkpoint=None,
                checkpoint_every: int | None = None, progress: bool | None = None) -> TrainResult:
    """Train one model per seed, all seeds at once: the weight init and the whole training loop are
    each ``vmap``ped over the seeds, so S seeds cost one compilation of each, not S runs.

    Seed ``s`` gives the same numbers as ``train(dataclasses.replace(config, seed=s), data)`` (to
    floating-point reassociation). Every leaf of the returned :class:`TrainResult` gains a leading
    axis S = len(seeds): ``history.task_losses`` (S, T, K), ``test.accuracy`` (S, K), and so on.
    ``config.seed`` is ignored.

    A seed whose losses or update become non-finite stops at that step, on its own (the others go
    on); ``diverged_at`` (S,) gives the step (-1 for the others) and one :class:`DivergenceWarning`
    names every diverged seed and its step. The result is returned in full, so one diverged seed does
    not end a sweep; this waits for the runs to finish.

    ``checkpoint``: a ``.npz`` path. The steps then run in compiled chunks of ``checkpoint_every`` (default
    :data:`CHECKPOINT_EVERY`) and after each chunk the state of every seed and the history so far are written
    there atomically (:func:`mtl_jax.solvers.base.write_checkpoint`; arrays only, read back without pickle).
    Called again with the same config, data and seeds it continues from that file and ends with exactly the
    numbers of an uninterrupted chunked run (bitwise on the same device; the unchunked run's to floating-point
    reassociation). A checkpoint of another config, data or seeds is refused (ValueError naming
    ``checkpoint``). The file is kept after the run (delete it to train afresh). ``progress=True``: a bar per
    chunk on stderr (step, task losses; ``MTL_JAX_QUIET=1`` silences it).
    """
    seeds = _check_seeds(seeds)
    path, every = check_checkpoint(checkpoint, checkpoint_every, default=CHECKPOINT_EVERY)
    if checkpoint_every is not None and path is None:
        raise ValueError("checkpoint_every: needs a checkpoint path")
    (_, init_many), (_, run_many), train_split, test_split = _prepare(config, data)
    seed_array = jnp.asarray(seeds, jnp.int32)
    params = init_many(seed_array, train_split.x[:1])
    if path is None:
        result = run_many(seed_array, params, train_split, test_split)
    else:
        result = _train_in_chunks(config, data, seeds, seed_array, params, train_split, test_split, path, every,
                                  bool(progress))
    _warn_if_diverged(result, seeds)
    return result


#: Steps per compiled chunk of a checkpointed :func:`train_seeds`.
CHECKPOINT_EVERY = 500
_CHECKPOINT_FORMAT = "mtl_jax.training.train_seeds/1"


@functools.lru_cache(maxsize=64)
def _compiled_parts(config: TrainConfig, spec: TaskSpec):
    """:func:`make_run_parts` jitted and vmapped over seeds (``advance``'s length static), cached like the run."""
    start, advance, finish = make_run_parts(config, spec)
    return (jax.jit(jax.vmap(start, in_axes=(0, 0, None))),
            jax.jit(jax.vmap(advance, in_axes=(0, None, None)), static_argnums=2),
            jax.jit(jax.vmap(finish, in_axes=(0, 0, None))))


def _host_leaves(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as host arrays; PRNG keys as their raw key data."""
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree_util.tree_leaves(tree)]


def _like(saved: list[np.ndarray], like, path):
    """``like``'s structure with the ``saved`` leaves (keys rewrapped), each checked against ``like``'s shape."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if len(saved) != len(leaves):
        raise ValueError(f"checkpoint: {path} holds {len(saved)} arrays where {len(leaves)} are expected")
    out = []
    for a, leaf in zip(saved, leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
        if a.shape != leaf.shape or a.dtype != leaf.dtype:
            raise ValueError(f"checkpoint: {path}: an array of shape {a.shape} {a.dtype} where {leaf.shape} "
                             f"{leaf.dtype} is expected")
        out.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(treedef, out)


def _train_in_chunks(config, data, seeds, seed_array, params, train_split, test_split, path, every, progress):
    """:func:`train_seeds` in chunks of ``every`` steps, checkpointed to ``path`` after each (resumed from it)."""
    spec = validate_spec(data.spec)
    start, advance, finish = _compiled_parts(dataclasses.replace(config, seed=0), spec)
    return _run_chunked(lambda: start(seed_array, params, train_split),
                        lambda state, n: advance(state, train_split, n),
                        lambda state, history: finish(state, history, test_split),
                        steps=config.steps, axis=1, path=path, every=every,
                        identity=((data.train, data.test), dataclasses.replace(config, seed=0), tuple(seeds)),
                        progress=progress)


def chunks_fingerprint(identity) -> str:
    """What a checkpoint of chunked training must match: ``identity`` is the data splits, then anything with
    a stable ``repr`` (config, seeds, grid)."""
    from mtl_jax.solvers import base

    splits, *rest = identity
    return base.fingerprint(jax.tree_util.tree_leaves(splits), (_CHECKPOINT_FORMAT, *rest))


def _run_chunked(start, advance, finish, *, steps, axis, path, every, identity, progress=False):
    """The driver of a checkpointed run: ``start() -> state``; ``advance(state, n) -> (state, history of n
    steps)``, the step axis of the history's leaves at ``axis``; ``finish(state, history) -> TrainResult``.
    After each chunk of ``every`` steps the state and the history so far go to ``path`` (atomically); a run
    finds its chunks there again when ``identity`` (the data splits, then anything with a stable ``repr``) matches.
    ``progress``: a bar on stderr, per chunk: the step and the last step's task losses (mean over runs)."""
    import os

    from mtl_jax.solvers import base

    print_ = chunks_fingerprint(identity)
    state = start()
    done, hist = 0, None   # hist: the history so far as host leaves (each chunk's is fetched once)
    if os.path.exists(path):
        saved = base.read_checkpoint(path, format=_CHECKPOINT_FORMAT, fingerprint=print_,
                                     what="a training checkpoint", differs="the config, data, seeds or grid")
        state = _like([saved[f"state_{i}"] for i in range(int(saved["num_state"]))], state, path)
        done = int(saved["steps_done"])
        if done:
            hist = [saved[f"history_{i}"] for i in range(int(saved["num_history"]))]
    from mtl_jax.runner.progress import bar

    with bar(steps, "training steps", quiet=None if progress else True) as update:
        update(done)
        while done < steps:
            state, part = advance(state, min(every, steps - done))
            new = _host_leaves(part)
            hist = new if hist is None else [np.concatenate([a, b], axis=axis) for a, b in zip(hist, new)]
            done = min(steps, done + every)
            arrays = {f"state_{i}": a for i, a in enumerate(_host_leaves(state))}
            arrays.update({f"history_{i}": a for i, a in enumerate(hist)})
            arrays.update(num_state=np.array(len(arrays) - len(hist)), num_history=np.array(len(hist)),
                          steps_done=np.array(done))
            base.write_checkpoint(path, arrays, [], format=_CHECKPOINT_FORMAT, fingerprint=print_)
            # the last step's unweighted task losses, mean over seeds (and grid points)
            last = np.take(np.asarray(part.task_losses), -1, axis=axis).reshape(-1, part.task_losses.shape[-1])
            update(done, loss=" ".join(f"{v:.3g}" for v in np.nanmean(last, axis=0)))
    return finish(state, _like(hist, jax.eval_shape(lambda st: advance(st, steps), state)[1], path))


# ----------------------------------------------------------------------------- hyper-parameter grids

#: The numeric hyper-parameters of each scheme that :func:`train_grid` can put on a grid: its factory
#: (:mod:`mtl_jax.weighting`) accepts them as traced values, so every value runs in the same program.
#: ``uncertainty``'s ``learning_rate`` is the log-variances' own rate (by default they follow the model's).
SCHEME_GRID_PARAMETERS: dict[str, tuple[str, ...]] = {
    "equal": (),
    "huq_pervin": ("temperature", "beta"),
    "dwa": ("temperature",),
    "uncertainty": ("learning_rate", "initial"),
    "rlw": ("std",),
    "famo": ("learning_rate", "weight_decay"),
    "gradnorm": ("alpha", "learning_rate", "floor"),
}
assert set(SCHEME_GRID_PARAMETERS) == set(weighting_lib.SCHEMES), "a scheme is missing from SCHEME_GRID_PARAMETERS"


class GridResult(NamedTuple):
    """Output of :func:`train_grid`: G grid points x S seeds, trained as one program.

    result: a :class:`TrainResult` whose every leaf has leading axes (G, S): ``history.task_losses``
        (G, S, T, K), ``test.accuracy`` (G, S, K), ``diverged_at`` (G, S), the final ``state`` per run;
    learning_rates: (G,) the model's learning rate of each grid point;
    scheme_values: ``{name: (G,)}``, each gridded scheme hyper-parameter's value at each grid point;
    seeds: (S,) the seeds;
    shape: ``(L, V_1, ..., V_n)``, the grid before flattening: L learning rates (slowest), then the
        scheme hyper-parameters in the order of ``scheme_values`` -- ``G = prod(shape)``, point ``g`` is
        ``np.unravel_index(g, shape)``, so ``result.test.mse.reshape(shape + (S, K))`` restores the axes;
    config: the base configuration (:meth:`point_config` gives each point's).
    """

    result: TrainResult
    learning_rates: np.ndarray
    scheme_values: dict
    seeds: np.ndarray
    shape: tuple
    config: "TrainConfig"

    def point_config(self, g: int) -> TrainConfig:
        """The configuration of grid point ``g``: :func:`train_seeds` with it (and ``seeds``) gives the
        numbers of ``result[g]`` (to floating-point reassociation)."""
        return _point_config(self.config, self.learning_rates[g],
                             {name: values[g] for name, values in self.scheme_values.items()})


def _point_config(config: TrainConfig, learning_rate, values: dict) -> TrainConfig:
    kwargs = {**dict(config.scheme_kwargs), **{name: float(v) for name, v in values.items()}}
    return dataclasses.replace(config, learning_rate=float(learning_rate), scheme_kwargs=kwargs)


def _grid_axis(name: str, values, positive: bool) -> np.ndarray:
    """A grid axis: a non-empty 1-D sequence of finite real numbers (> 0 with ``positive``), as float64."""
    arr = np.asarray(list(values) if isinstance(values, (range, tuple, list)) else values)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: must be a non-empty 1-D sequence of real numbers, got {values!r}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        raise ValueError(f"{name}: must be finite{' and > 0' if positive else ''}, got {values!r}")
    return arr


def make_grid_run(config: TrainConfig, spec: TaskSpec, names: Sequence[str] = ()) -> Callable[..., TrainResult]:
    """:func:`make_run`'s run with the learning rate and scheme hyper-parameters as arguments:
    ``run(learning_rate, values, seed, params, train, test) -> TrainResult``.

      learning_rate: () float, the model's rate (injected into the optimizer's state,
          :meth:`TrainConfig.make_optimizer`; ``"uncertainty"`` steps its log-variances with it too
          unless its ``scheme_kwargs`` say otherwise, as :meth:`TrainConfig.make_scheme`);
      values: ``{name: () float}`` for every name of ``names`` (a subset of
          :data:`SCHEME_GRID_PARAMETERS` ``[config.scheme]``), replacing those ``scheme_kwargs``;
      seed, params, train, test: as :func:`make_run`'s.

    All of them may be traced: the scheme and optimizer are built inside ``run`` from the values, so
    ``jax.vmap`` over ``learning_rate`` and ``values`` runs a grid as one program (:func:`train_grid`:
    ``jit(vmap(vmap(run, seeds), grid points))``). ``config.learning_rate`` is not used."""
    parts = _grid_point_parts(config, spec, names)

    def run(learning_rate, values, seed, params, train_split: Split, test_split: Split) -> TrainResult:
        start, advance, finish = parts(learning_rate, values)
        return finish(*advance(start(seed, params, train_split), train_split, config.steps), test_split)

    return run


def _grid_point_parts(config: TrainConfig, spec: TaskSpec, names: Sequence[str]):
    """``parts(learning_rate, values) -> (start, advance, finish)`` of one grid point (:func:`make_run_parts`),
    its scheme and optimizer built from the (possibly traced) rate and values."""
    spec = validate_spec(spec)
    names = tuple(names)

    def parts(learning_rate, values):
        scheme = config.make_scheme(spec, learning_rate=learning_rate, overrides={n: values[n] for n in names})
        return make_run_parts(config, spec, scheme, learning_rate)

    return parts


@functools.lru_cache(maxsize=32)
def _compiled_grid(config: TrainConfig, spec: TaskSpec, names: tuple[str, ...]):
    """:func:`make_grid_run`'s run, vmapped over seeds (with their params) inside a vmap over grid
    points, jitted. Cached on (config without its seed, learning rate and gridded scheme arguments,
    spec, names): any grid of the same size reuses one compiled program."""
    run = make_grid_run(config, spec, names)
    over_seeds = jax.vmap(run, in_axes=(None, None, 0, 0, None, None))
    return jax.jit(jax.vmap(over_seeds, in_axes=(0, 0, None, None, None, None)))


@functools.lru_cache(maxsize=32)
def _compiled_grid_parts(config: TrainConfig, spec: TaskSpec, names: tuple[str, ...]):
    """:func:`make_run_parts` of a grid point (the scheme and optimizer built from the traced rate and values,
    as :func:`make_grid_run`), vmapped over seeds inside a vmap over grid points, jitted: (start, advance, finish)."""
    parts = _grid_point_parts(config, spec, names)

    def start(lr, values, seed, params, train_split):
        return parts(lr, values)[0](seed, params, train_split)

    def advance(lr, values, state, train_split, length):
        return parts(lr, values)[1](state, train_split, length)

    def finish(lr, values, state, history, test_split):
        return parts(lr, values)[2](state, history, test_split)

    def over(fn, seeds_axes, grid_axes, **jit):
        return jax.jit(jax.vmap(jax.vmap(fn, in_axes=seeds_axes), in_axes=grid_axes), **jit)

    return (over(start, (None, None, 0, 0, None), (0, 0, None, None, None)),
            over(advance, (None, None, 0, None, None), (0, 0, 0, None, None), static_argnums=4),
            over(finish, (None, None, 0, 0, None), (0, 0, 0, 0, None)))


def train_grid(config: TrainConfig, data: MultiTaskDataset, seeds: Sequence[int],
               learning_rates: Sequence[float] | None = None,
               scheme_values: dict[str, Sequence[float]] | None = None, *, checkpoint=None,
               checkpoint_every: int | None = None, progress: bool | None = None) -> GridResult:
    """Train every point of a hyper-parameter grid for every seed, as ONE compiled program.

    The grid is the Cartesian product of ``learning_rates`` (L values; None: ``(config.learning_rate,)``)
    and, for each ``name: values`` of ``scheme_values`` (None: no scheme axis), the values of that
    numeric hyper-parameter of ``config.scheme`` (:data:`SCHEME_GRID_PARAMETERS`: dwa's or huq_pervin's
    ``temperature``, ...); G = L x V_1 x ... x V_n points, flattened in C order (learning rate slowest;
    :class:`GridResult` ``shape``). Point g with seed s gives the numbers of
    ``train(dataclasses.replace(config, learning_rate=lr_g, scheme_kwargs={..., name: v_g}, seed=s))``
    (:meth:`GridResult.point_config`; to floating-point reassociation), including ``"uncertainty"``'s
    log-variances, stepped with the point's rate as :meth:`TrainConfig.make_scheme` does.

    How: the model's learning rate is injected into the optimizer's state
    (``optax.inject_hyperparams``), the scheme is built from traced values (:func:`make_grid_run`), and
    the run is ``jax.jit(jax.vmap(jax.vmap(run, seeds), grid points))``: the weight init is compiled
    once per model and vmapped over the seeds (shared by every grid point), the training loop once per
    grid size. Another grid of the same size, or another base rate, reuses the compiled program.

    Returns a :class:`GridResult`; its ``result`` leaves have leading axes (G, S). Diverged runs stop on
    their own, as in :func:`train_seeds`, and one :class:`DivergenceWarning` names each (rate, values,
    seed) and step. ``config.seed`` is ignored. Raises ValueError naming the argument: ``seeds`` (empty,
    not integers), ``learning_rates`` (empty, not finite and > 0), ``scheme_values`` (not a dict, a name
    that is not a gridded hyper-parameter of the scheme, empty or non-finite values, a value the scheme
    rejects, e.g. a temperature <= 0).

    ``checkpoint``, ``checkpoint_every``, ``progress``: as for :func:`train_seeds`: the grid's steps in compiled
    chunks, every point's and seed's state checkpointed after each, an interrupted grid continued exactly.
    """
    seeds = _check_seeds(seeds)
    path, every = check_checkpoint(checkpoint, checkpoint_every, default=CHECKPOINT_EVERY)
    if checkpoint_every is not None and path is None:
        raise ValueError("checkpoint_every: needs a checkpoint path")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: must be a TrainConfig, got {type(config).__name__}")
    rates = _grid_axis("learning_rates", (config.learning_rate,) if learning_rates is None else learning_rates,
                       positive=True)
    if scheme_values is None:
        scheme_values = {}
    if not isinstance(scheme_values, dict):
        raise ValueError(f"scheme_values: must be a dict of hyper-parameter name -> values, got {scheme_values!r}")
    allowed = SCHEME_GRID_PARAMETERS[config.scheme]
    axes = {}
    for name, values in scheme_values.items():
        if name not in allowed:
            raise ValueError(f"scheme_values: {name!r} is not a hyper-parameter of scheme {config.scheme!r} that "
                             f"can be on a grid (those: {allowed})")
        axes[name] = _grid_axis(f"scheme_values[{name!r}]", values, positive=False)
        for v in axes[name]:  # the factory checks the range (e.g. temperature > 0), naming the argument
            try:
                _point_config(config, config.learning_rate, {name: v})
            except ValueError as e:
                raise ValueError(f"scheme_values: {name}={v:g} is not valid for scheme {config.scheme!r}: {e}") from None
    shape = (len(rates),) + tuple(len(v) for v in axes.values())
    mesh = [m.reshape(-1) for m in np.meshgrid(rates, *axes.values(), indexing="ij")]
    grid_rates, grid_values = mesh[0], dict(zip(axes, mesh[1:]))

    (_, init_many), _, train_split, test_split = _prepare(config, data)
    key = dataclasses.replace(config, seed=0, learning_rate=1.0,  # traced in the program, not part of it
                              scheme_kwargs=[(k, v) for k, v in config.scheme_kwargs if k not in axes])
    seed_array = jnp.asarray(seeds, jnp.int32)
    float_dtype = jnp.result_type(float)  # cast to each optimizer's dtype inside, as a Python float would be
    lrs = jnp.asarray(grid_rates, float_dtype)
    vals = {n: jnp.asarray(v, float_dtype) for n, v in grid_values.items()}
    params = init_many(seed_array, train_split.x[:1])
    if path is None:
        program = _compiled_grid(key, validate_spec(data.spec), tuple(axes))
        result = program(lrs, vals, seed_array, params, train_split, test_split)
    else:
        start, advance, finish = _compiled_grid_parts(key, validate_spec(data.spec), tuple(axes))
        result = _run_chunked(lambda: start(lrs, vals, seed_array, params, train_split),
                              lambda state, n: advance(lrs, vals, state, train_split, n),
                              lambda state, history: finish(lrs, vals, state, history, test_split),
                              steps=config.steps, axis=2, path=path, every=every,
                              identity=((data.train, data.test), key, tuple(seeds), tuple(grid_rates.tolist()),
                                        tuple((n, tuple(v.tolist())) for n, v in grid_values.items())),
                              progress=bool(progress))
    labels = [", ".join([f"learning_rate {grid_rates[g]:g}"] + [f"{n} {v[g]:g}" for n, v in grid_values.items()]
                        + [f"seed {s}"]) for g in range(len(grid_rates)) for s in seeds]
    _warn_if_diverged(result, seeds, labels)
    return GridResult(result, grid_rates, grid_values, np.asarray(seeds), shape, config)
