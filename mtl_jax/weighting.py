"""Loss-driven task weighting for deep multi-task networks (docs/weighting.md).

Every scheme is an optax-style pair of pure functions bundled in a :class:`Weighting`::

    scheme = weighting.dwa(temperature=2.0)
    state = scheme.init(num_tasks)                      # or scheme.init(num_tasks, key) for rlw
    weights, state = scheme.update(task_losses, state)  # inside the jitted training step
    # (the training step passes present=(K,) bool, False for a task with no sample in the batch)
    total = jnp.sum(weights * task_losses)

Contract shared by all schemes:

- ``update`` is pure, jit-able and vmap-able (map it over a stacked state and stacked losses to run
  several seeds as one program); it never branches in Python on traced values.
- The returned weights carry no gradient (``jax.lax.stop_gradient``), are positive, and sum to the
  number of tasks ``K`` -- except ``uncertainty``, which returns its loss multipliers ``c_k exp(-s_k)``
  (``c_k = 1/2`` for a regression task, 1 for a classification task).
- A scheme is fully described by its weights and its own state update: the training loop only ever
  forms ``sum(weights * task_losses)``. A scheme that needs more than the losses lists the extra
  keyword inputs of ``update`` in ``Weighting.needs``: ``"grad_norms"`` (gradnorm) and
  ``"epoch_end"``, a () bool that is True at the last update of an epoch (dwa with ``per="epoch"`` and
  gradnorm with ``initial="epoch"``, the defaults). Schemes accept and ignore extra keywords they do
  not use, so a loop may pass them uniformly.
- A scheme that learns from the losses after the model step on the same batch (famo, by default) has
  ``Weighting.after_step(losses_after, state, present=None) -> state``, which the training loop calls
  after the update (one extra forward pass); for the others it is None.
- Losses are assumed positive where a scheme divides by them or takes their log (dwa, famo,
  gradnorm, huq_pervin "relative"), as in the papers.
- Randomness lives in the state: ``init(num_tasks, key)`` stores a PRNG key (rlw); the other schemes
  ignore ``key``.
- State dtypes are fixed at ``init`` (the default float dtype); weights come back in the dtype of the
  losses.
- ``update`` checks, at trace time, that ``task_losses`` (and ``present``, ``grad_norms``) have shape
  ``(K,)`` for the ``K`` tasks the state was initialised for, and raises ``ValueError`` naming the
  argument otherwise (shapes are static under jit/vmap/scan).

Tasks absent from a batch. Every ``update`` takes ``present=None`` or a (K,) bool mask; the training
loop passes ``present[k] = False`` when task k has no sample in the batch (its batch loss is then
meaningless: 0 in :mod:`mtl_jax.training`, and any value, NaN included, is ignored). The rule, the same
for every scheme: an absent task's loss -- and, for gradnorm, its gradient norm -- is replaced by its
last observed value, and the scheme proceeds exactly as if that value had been passed. A task not yet
observed at all is given the mean of the values the other tasks have this call (present or carried;
1 if none has any), and any loss history a scheme keeps for it restarts at its first observation
(dwa's two previous losses, famo's previous loss, the ``L(0)`` of huq_pervin "relative" and gradnorm,
huq_pervin's EMA). Weights therefore stay finite, and an absent task's weight is what it would be with
its loss unchanged. ``equal``, ``rlw`` and ``fixed`` do not look at the losses, so ``present`` changes
nothing for them. With ``present=None`` (or all True) the numbers are those of the plain formulas.

Factories validate their arguments once, in Python, and raise ``ValueError`` naming the argument;
a hyper-parameter passed as a traced array (a sweep under ``vmap``) is not checked.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import names
from mtl_jax.validation import check_int, check_real, is_traced

__all__ = [
    "Weighting",
    "SCHEMES",
    "get",
    "equal",
    "huq_pervin",
    "dwa",
    "uncertainty",
    "rlw",
    "famo",
    "gradnorm",
    "fixed",
    "EqualState",
    "HuqPervinState",
    "DWAState",
    "UncertaintyState",
    "RLWState",
    "FAMOState",
    "GradNormState",
    "FixedState",
]


class Weighting(NamedTuple):
    """A task-weighting scheme: ``init(num_tasks, key=None) -> state`` and
    ``update(task_losses, state, present=None, **extra) -> (weights, new_state)``, with
    ``task_losses`` (K,), ``present`` None or a (K,) bool mask of the tasks in the batch (module
    docstring), weights (K,); ``needs`` names the extra keyword inputs that ``update`` requires
    (``"grad_norms"``: (K,) gradient norms; ``"epoch_end"``: () bool, True at the last update of an epoch).

    ``after_step``: None, or ``after_step(losses_after, state, present=None) -> new_state``, which the
    training step calls after the model update with the (K,) losses of the same batch at the updated
    parameters (one extra forward pass; only ``famo`` with ``loss_change="same_batch"`` has one)."""

    init: Callable
    update: Callable
    needs: tuple = ()
    after_step: Callable | None = None


# ----------------------------------------------------------------------------------------------
# Small shared helpers
# ----------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> None:
    check_real(name, value, strict=True, allow_traced=True)


def _check_nonnegative(name: str, value: Any) -> None:
    check_real(name, value, allow_traced=True)


def _check_num_tasks(num_tasks: Any) -> int:
    return check_int("num_tasks", num_tasks, low=1)


def _float_zeros(num_tasks: int) -> jax.Array:
    return jnp.zeros((num_tasks,), dtype=jnp.result_type(float))


def _float_ones(num_tasks: int) -> jax.Array:
    return jnp.ones((num_tasks,), dtype=jnp.result_type(float))


def _count() -> jax.Array:
    return jnp.zeros((), dtype=jnp.int32)


def _as_input(x: Any) -> jax.Array:
    """An input of ``update`` as a float array that no gradient flows back into."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return jax.lax.stop_gradient(x)


def _check_losses(task_losses: Any, num_tasks: int) -> jax.Array:
    """``task_losses`` as an input array, checked to be (K,) for the K tasks the state was made for.

    Shapes are static under jit/vmap/scan, so a mismatch raises here, at trace time, instead of as an
    opaque broadcasting error deep inside the scheme."""
    losses = _as_input(task_losses)
    if losses.shape != (num_tasks,):
        raise ValueError(f"task_losses: expected shape ({num_tasks},), one loss per task the scheme's state "
                         f"was initialised for, got shape {losses.shape}")
    return losses


def _check_present(present: Any, losses: jax.Array) -> jax.Array:
    """The (K,) bool ``present`` mask of ``update`` (None: every task present)."""
    if present is None:
        return jnp.ones(losses.shape, dtype=bool)
    present = jnp.asarray(present)
    if present.shape != losses.shape:
        raise ValueError(f"present: expected shape {losses.shape}, one flag per task, got shape {present.shape}")
    return present.astype(bool)


def _impute(values: jax.Array, present: jax.Array, last: jax.Array, seen: jax.Array) -> jax.Array:
    """(K,) ``values`` with each absent task's entry replaced (the absence rule of the module docstring).

    A task absent now but observed before gets ``last``, its last observed value; a task never observed
    gets the mean over the tasks that have a value this call (present, or observed before), or 1 when no
    task has ever been observed. Absent entries of ``values`` are never read (they may be NaN)."""
    known = present | seen
    carried = jnp.where(present, values, last.astype(values.dtype))
    n_known = jnp.sum(known)
    mean_known = jnp.sum(jnp.where(known, carried, 0.0)) / jnp.maximum(n_known, 1).astype(values.dtype)
    fallback = jnp.where(n_known > 0, mean_known, jnp.ones((), values.dtype))
    return jnp.where(known, carried, fallback)


def _float_false(num_tasks: int) -> jax.Array:
    return jnp.zeros((num_tasks,), dtype=bool)


def _k_softmax(logits: jax.Array) -> jax.Array:
    """``K * softmax(logits)``: positive weights summing to ``K = logits.shape[-1]``."""
    return logits.shape[-1] * jax.nn.softmax(logits, axis=-1)


def _sum_to_k(w: jax.Array) -> jax.Array:
    """Rescale positive ``w`` so that it sums to its length K."""
    return w * (w.shape[-1] / jnp.sum(w, axis=-1, keepdims=True))


def _finish(weights: jax.Array, losses: jax.Array, new_state: Any, old_state: Any):
    """Common tail of every ``update``: weights without gradient, in the losses' dtype; the state
    keeps the dtypes it was initialised with (so it can be a ``lax.scan`` carry)."""

    def keep(new, old):
        old_dtype = jnp.asarray(old).dtype
        if jnp.issubdtype(old_dtype, jnp.inexact):
            return jnp.asarray(new).astype(old_dtype)
        return new

    new_state = jax.tree.map(keep, new_state, old_state)
    return jax.lax.stop_gradient(weights.astype(losses.dtype)), new_state


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leaf-wise ``jnp.where`` over two pytrees of the same structure (vmap-friendly ``cond``)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# ----------------------------------------------------------------------------------------------
# equal
# ----------------------------------------------------------------------------------------------


class EqualState(NamedTuple):
    """Equal weighting keeps no state but the task count, for the shape check of ``update``."""

    tasks: jax.Array  # (K,) bool, all True: its static shape is the task count K


def equal() -> Weighting:
    """Equal weighting: ``w_k = 1`` for every task, i.e. ``total = sum_k L_k``.

    The multi-task baseline of every paper below (e.g. Liu et al. CVPR 2019, Lin et al. TMLR 2022).
    """

    def init(num_tasks, key=None):
        return EqualState(tasks=jnp.ones((_check_num_tasks(num_tasks),), dtype=bool))

    def update(task_losses, state, present=None, **extra):
        losses = _check_losses(task_losses, state.tasks.shape[-1])
        _check_present(present, losses)  # absent tasks change nothing: the weights ignore the losses
        return _finish(jnp.ones_like(losses), losses, state, state)

    return Weighting(init, update)


# ----------------------------------------------------------------------------------------------
# Huq and Pervin
# ----------------------------------------------------------------------------------------------

_HUQ_MODES = ("raw", "relative", "ema")
_HUQ_RULES = ("softmax", "proportional")


class HuqPervinState(NamedTuple):
    initial: jax.Array  # (K,) each task's first observed loss, L(0) (mode "relative")
    ema: jax.Array      # (K,) exponential moving average of the losses (mode "ema")
    count: jax.Array    # () int32, number of updates so far
    last: jax.Array     # (K,) each task's last observed loss (stands in for it while it is absent)
    seen: jax.Array     # (K,) bool, task observed at some update so far


def huq_pervin(temperature: float = 1.0, mode: str = "raw", beta: float = 0.9, rule: str = "softmax") -> Weighting:
    """Adaptive, loss-driven weights: a task with a higher loss gets a higher weight.

    Three interpretations of the paper's idea (see the source note below: none is a transcription of
    its equation), chosen by ``rule``::

        rule "softmax" (default):  w = K * softmax(a / T),   i.e.  w_k = K exp(a_k / T) / sum_j exp(a_j / T)
        rule "proportional":       w_k = K a_k / sum_j a_j   (no temperature; the weights are the signal's
                                                              shares, e.g. K L_k / sum_j L_j with mode "raw")

    where ``T = temperature`` and the loss signal ``a`` depends on ``mode``. The earlier rule (kept, and
    the default) is ``rule="softmax"``; its two natural readings are ``rule="proportional"`` with
    ``mode="raw"`` (``w_k = K L_k / sum_j L_j``) and ``rule="softmax"`` with ``mode="raw"`` (a softmax of
    the losses with a temperature). The experiment's variant is ``rule="softmax", mode="relative"``.
    Signals:

    - ``"raw"``:      ``a_k = L_k(t)``, the current losses;
    - ``"relative"``: ``a_k = L_k(t) / L_k(0)``, losses relative to their value at the first update
      (so the first update gives ``w = 1``);
    - ``"ema"``:      ``a_k = m_k(t)`` with ``m(0) = L(0)`` and ``m(t) = beta m(t-1) + (1 - beta) L(t)``
      (``beta = 0`` is ``"raw"``).

    Both rules give weights that are positive (losses are positive), sum to ``K``, increase strictly
    with a task's own signal, and are equivariant under a permutation of the tasks; "proportional" is
    scale-free in ``a`` (multiplying every loss by a constant changes nothing) and parameter-free, but
    puts weight ``~ K L_k / sum_j L_j`` on the scales of the raw losses (use ``"relative"`` when they
    differ by orders of magnitude). For "softmax", ``T`` sets how strongly they follow the losses:
    ``T -> inf`` gives equal weights, a small ``T`` concentrates the weight on the hardest task. With
    ``mode="raw"`` the weights depend on the losses' scale, so choose ``T`` on the scale of the loss
    differences (or use ``"relative"``, which is scale-free).

    Absent tasks (``present[k] = False``, module docstring): the task's last observed loss stands in for
    it. ``L_k(0)`` and ``m_k(0)`` are task k's *first observed* loss: until then its relative signal is
    1 and its EMA follows the stand-in value, and both restart when the task is first observed.

    Source: A. Huq and M. T. Pervin, "Adaptive weight assignment scheme for multi-task learning",
    IAES Int. J. Artificial Intelligence (IJ-AI) 11(1):173-178, 2022, doi 10.11591/ijai.v11.i1.pp173-178,
    arXiv 2303.07278. Only the paper's abstract could be consulted when this was written (the full
    text was not available to us); the abstract states the goal -- more weight to the more difficult,
    higher-loss tasks, computed adaptively from the task losses, compared against DWA and uncertainty
    weighting -- but not the formula. Both rules above are therefore interpretations of it, not a
    transcription of the paper's equation; check them against the paper before citing numbers as theirs.

    Shapes: ``task_losses`` (K,), ``present`` None or (K,) bool; weights (K,).
    """
    _check_positive("temperature", temperature)
    if not isinstance(rule, str) or rule not in _HUQ_RULES:
        raise ValueError(f"rule must be one of {_HUQ_RULES}, got {rule!r}")
    if not isinstance(mode, str) or mode not in _HUQ_MODES:
        raise ValueError(f"mode must be one of {_HUQ_MODES}, got {mode!r}")
    b = check_real("beta", beta, low=None, allow_traced=True)
    if b is not None and not 0.0 <= b < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        return HuqPervinState(initial=_float_ones(k), ema=_float_zeros(k), count=_count(),
                              last=_float_ones(k), seen=_float_false(k))

    def update(task_losses, state, present=None, **extra):
        observed = _check_losses(task_losses, state.seen.shape[-1])
        present = _check_present(present, observed)
        losses = _impute(observed, present, state.last, state.seen)
        # L(0) and m(0) are set by a task's first observation (with every task present: the first call);
        # until then they follow the stand-in loss, so the relative signal is 1.
        first = ~state.seen
        initial = jnp.where(first, losses, state.initial)
        ema = jnp.where(first, losses, beta * state.ema + (1.0 - beta) * losses)
        if mode == "raw":
            signal = losses
        elif mode == "relative":
            signal = losses / initial
        else:
            signal = ema
        if rule == "softmax":
            weights = _k_softmax(signal / temperature)
        else:
            weights = _sum_to_k(signal)
        new_state = HuqPervinState(initial=initial, ema=ema, count=state.count + 1, last=losses,
                                   seen=state.seen | present)
        return _finish(weights, losses, new_state, state)

    return Weighting(init, update)


# ----------------------------------------------------------------------------------------------
# DWA
# ----------------------------------------------------------------------------------------------


_DWA_PER = ("epoch", "step")


class DWAState(NamedTuple):
    last: jax.Array         # (K,) L(t-1): the previous update's losses, or (per="epoch") the last finished epoch's mean
    before_last: jax.Array  # (K,) L(t-2): the one before
    count: jax.Array        # () int32, number of updates (per="step") or of finished epochs (per="epoch") so far
    seen: jax.Array         # (K,) bool, task observed at some update (per="step") / finished epoch (per="epoch")
    epoch_sum: jax.Array    # (K,) per="epoch": sum of the task's observed losses in the current epoch (else unused)
    epoch_n: jax.Array      # (K,) per="epoch": how many of them (float)


def _epoch_end_input(epoch_end: Any, who: str) -> jax.Array:
    """The () bool ``epoch_end`` input of ``update`` (True at the last update of an epoch)."""
    if epoch_end is None:
        raise ValueError(f"epoch_end is required by {who}: a () bool, True at the last update of each epoch "
                         f"(the training step passes it; docs/weighting.md, section 3)")
    epoch_end = jnp.asarray(epoch_end)
    if epoch_end.shape != ():
        raise ValueError(f"epoch_end: expected a scalar bool (one flag per update), got shape {epoch_end.shape}")
    return epoch_end.astype(bool)


def dwa(temperature: float = 2.0, per: str = "epoch") -> Weighting:
    """Dynamic Weight Average (Liu, Johns, Davison, "End-to-end multi-task learning with attention",
    CVPR 2019, arXiv 1803.10704, eq. 7)::

        w_k(e) = K exp(r_k(e-1) / T) / sum_j exp(r_j(e-1) / T),   r_k(e-1) = L_k(e-1) / L_k(e-2),

    with ``T = 2`` in the paper, and ``w = 1`` for ``e = 0, 1``.

    ``per="epoch"`` (default, as the paper and LibMTL's ``DWA``): ``e`` counts epochs and ``L_k(e)`` is
    the mean of task k's batch losses over epoch ``e``. ``update(task_losses, state, epoch_end=b)``
    needs ``epoch_end`` (a () bool, True at the last update of an epoch; the training step passes it,
    ``needs = ("epoch_end",)``). The weights are constant within an epoch: every update of epoch ``e``
    returns ``w(e)``, built from the means of the two epochs before; the losses passed now are added
    to the current epoch's mean, which is closed by ``epoch_end`` (the update that closes it still
    returns ``w(e)``).

    ``per="step"``: ``e`` counts updates and ``L_k(e)`` is the loss passed at update ``e`` (no
    ``epoch_end``; the behaviour of earlier versions). One batch's noise then feeds back into the
    weights at every step, which can destabilise training (docs/weighting.md).

    Absent tasks (``present[k] = False``, module docstring): per step, ``L_k(t)`` is the task's last
    observed loss, so its ratio is 1 for the update after an absence. Per epoch, only the batches in
    which a task is present enter its epoch mean; an epoch without any gives it its previous epoch's
    mean (ratio 1). A task's two stored losses restart at its first observation
    (``L_k(e-1) = L_k(e-2)`` = that loss), so a task first seen late starts at ratio 1 too; a task not
    observed yet gets the mean of the others' (the module's rule, at the level of epochs when
    ``per="epoch"``). (Without this, an absent task's batch loss 0 makes the next ratios 0 and then
    0/0: NaN.)

    Shapes: ``task_losses`` (K,), ``present`` None or (K,) bool, ``epoch_end`` () bool; weights (K,).
    """
    _check_positive("temperature", temperature)
    if not isinstance(per, str) or per not in _DWA_PER:
        raise ValueError(f"per must be one of {_DWA_PER}, got {per!r}")

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        return DWAState(last=_float_ones(k), before_last=_float_ones(k), count=_count(), seen=_float_false(k),
                        epoch_sum=_float_zeros(k), epoch_n=_float_zeros(k))

    def shifted(state, losses, present):
        """The state with ``losses`` (K, absent tasks imputed) pushed as the newest entry of the history."""
        # A task's history starts at its first observation (with every task present: the first entry,
        # whose weights are 1 whatever is stored), so its first ratio is 1, not a stand-in's.
        before_last = jnp.where(state.seen, state.last, losses)
        return state._replace(last=losses, before_last=before_last, count=state.count + 1,
                              seen=state.seen | present)

    def update(task_losses, state, present=None, epoch_end=None, **extra):
        observed = _check_losses(task_losses, state.seen.shape[-1])
        present = _check_present(present, observed)
        ratio = state.last / state.before_last
        weights = jnp.where(state.count >= 2, _k_softmax(ratio / temperature), jnp.ones_like(ratio))
        if per == "step":
            new_state = shifted(state, _impute(observed, present, state.last, state.seen), present)
            return _finish(weights, observed, new_state, state)
        end = _epoch_end_input(epoch_end, "dwa(per='epoch')")
        epoch_sum = state.epoch_sum + jnp.where(present, observed, 0.0)
        epoch_n = state.epoch_n + present
        in_epoch = epoch_n > 0
        mean = epoch_sum / jnp.maximum(epoch_n, 1.0)
        closed = shifted(state, _impute(mean, in_epoch, state.last, state.seen), in_epoch)
        zeros = jnp.zeros_like(epoch_sum)
        closed = closed._replace(epoch_sum=zeros, epoch_n=zeros)
        new_state = _select(end, closed, state._replace(epoch_sum=epoch_sum, epoch_n=epoch_n))
        return _finish(weights, observed, new_state, state)

    return Weighting(init, update, needs=("epoch_end",) if per == "epoch" else ())


# ----------------------------------------------------------------------------------------------
# Uncertainty weighting
# ----------------------------------------------------------------------------------------------


_UNCERTAINTY_KINDS = ("regression", "classification")


class UncertaintyState(NamedTuple):
    log_vars: jax.Array  # (K,) s_k = log sigma_k^2, at its initial value (see ``initial``)
    opt_state: Any       # the optax state of the optimizer on s
    last: jax.Array      # (K,) each task's last observed loss (stands in for it while it is absent)
    seen: jax.Array      # (K,) bool, task observed at some update so far


def _uncertainty_initial(initial: Any):
    if isinstance(initial, str):
        if initial != "loss":
            raise ValueError(f"initial must be a real number or 'loss', got {initial!r}")
        return initial
    if isinstance(initial, bool):
        raise ValueError(f"initial must be a real number or 'loss', got {initial!r}")
    check_real("initial", initial, low=None, allow_traced=True)
    return initial


def uncertainty(learning_rate: float = 1e-3, optimizer: optax.GradientTransformation | None = None,
                initial: float | str = 0.0, kinds: tuple[str, ...] | None = None) -> Weighting:
    """Homoscedastic-uncertainty weighting (Kendall, Gal, Cipolla, "Multi-task learning using
    uncertainty to weigh losses for scene geometry and semantics", CVPR 2018, arXiv 1705.07115).

    Joint objective over the model parameters ``theta`` and the log-variances ``s = log sigma^2`` (K,)::

        total(theta, s) = sum_k (c_k exp(-s_k) L_k(theta) + s_k / 2),
        c_k = 1/2 for a regression task (the paper's eq. 5, Gaussian likelihood: L / (2 sigma^2) + log sigma),
        c_k = 1   for a classification task (eq. 10, scaled softmax: L / sigma^2 + log sigma).

    ``update`` returns the multipliers ``w_k = c_k exp(-s_k)`` (not summing to K) and takes one
    optimizer step on ``s`` with the closed-form gradient::

        d total / d s_k = 1/2 - c_k exp(-s_k) L_k ,       zero at  s_k* = log(2 c_k L_k).

    ``kinds``: one of ``"regression"`` / ``"classification"`` per task (None: every task regression,
    ``w = exp(-s)/2``, the form of earlier versions); :class:`~mtl_jax.training.TrainConfig` passes the
    data's task kinds. ``initial``: the starting log-variances -- a number ``c`` (``s = c`` for every
    task: ``0``, the default, is ``sigma = 1``; LibMTL's ``UW`` starts at ``-0.5``) or ``"loss"``:
    ``s_k = log(2 c_k L_k(0))``, the minimiser of task k's term at its first observed loss (``log L_k(0)``
    for a regression task), so every task starts with ``w_k L_k(0) = 1/2``, balanced. With ``s = 0``
    and losses far from 1 the log-variances have a long way to go, and Adam's step (about its learning
    rate per update) makes that slow.

    Equivalence to training ``s`` jointly with the model: with ``w`` held fixed, the model gradient of
    ``sum_k w_k L_k`` equals ``d total / d theta`` (the ``s_k / 2`` term has no ``theta`` gradient), and
    the ``s`` step uses the gradient of ``total`` at the same point ``(theta_t, s_t)`` -- the weights
    returned are those of ``s_t``, the state carries ``s_{t+1}``. So this is exactly a simultaneous
    gradient step on ``(theta, s)``, provided ``s`` uses the same kind of optimizer as the model (Adam
    acts per coordinate, so one Adam over ``(theta, s)`` equals two Adams with the same
    hyper-parameters, unless something couples them such as clipping by the global norm). Default
    here ``optax.adam(learning_rate)``; the training configuration passes the model's optimizer (kind
    and learning rate) unless ``optimizer`` or ``learning_rate`` is given. Pass ``optimizer`` to use
    another optax transformation on ``s``. The logged ``sum(w * L)`` omits the constant-in-theta term
    ``sum(s) / 2`` of ``total``.

    Absent tasks (``present[k] = False``, module docstring): the ``s_k`` step uses the task's last
    observed loss (``s_k`` keeps moving towards ``log(2 c_k L_k)`` of that loss; with a zero loss it
    would drift to ever larger weights); with ``initial="loss"``, ``s_k`` is set at the task's first
    observation (until then from the stand-in loss).

    Shapes: ``task_losses`` (K,), ``present`` None or (K,) bool; weights (K,).
    """
    if optimizer is None:
        _check_positive("learning_rate", learning_rate)
        optimizer = optax.adam(learning_rate)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation or None, got {optimizer!r}")
    initial = _uncertainty_initial(initial)
    if kinds is not None:
        if isinstance(kinds, str) or not all(isinstance(k, str) and k in _UNCERTAINTY_KINDS for k in kinds):
            raise ValueError(f"kinds must be None or a sequence of {_UNCERTAINTY_KINDS}, one per task, got {kinds!r}")
        kinds = tuple(kinds)
    from_loss = isinstance(initial, str)

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        if kinds is not None and len(kinds) != k:
            raise ValueError(f"kinds has {len(kinds)} entries but the scheme is initialised for {k} tasks")
        s = _float_zeros(k) if from_loss else jnp.full((k,), initial, dtype=jnp.result_type(float))
        return UncertaintyState(log_vars=s, opt_state=optimizer.init(s), last=_float_ones(k), seen=_float_false(k))

    def update(task_losses, state, present=None, **extra):
        observed = _check_losses(task_losses, state.log_vars.shape[-1])
        present = _check_present(present, observed)
        losses = _impute(observed, present, state.last, state.seen)
        scale = 0.5 if kinds is None else jnp.asarray([1.0 if k == "classification" else 0.5 for k in kinds],
                                                      dtype=losses.dtype)
        s = state.log_vars
        if from_loss:  # s_k(0) = log(2 c_k L_k(0)), set until the task is first observed
            s = jnp.where(state.seen, s, jnp.log(2.0 * scale * losses).astype(s.dtype))
        multiplier = scale * jnp.exp(-s)
        grad = 0.5 - multiplier * losses
        updates, opt_state = optimizer.update(grad.astype(s.dtype), state.opt_state, s)
        new_state = UncertaintyState(log_vars=optax.apply_updates(s, updates), opt_state=opt_state,
                                     last=losses, seen=state.seen | present)
        return _finish(multiplier, losses, new_state, state)

    return Weighting(init, update)


# ----------------------------------------------------------------------------------------------
# RLW
# ----------------------------------------------------------------------------------------------


class RLWState(NamedTuple):
    key: jax.Array    # PRNG key, split at every update
    tasks: jax.Array  # (K,) bool, all True: its static shape is the task count K


def rlw(std: float = 1.0) -> Weighting:
    """Random loss weighting (Lin et al., "Reasonable effectiveness of random weighting: a litmus test
    for multi-task learning", TMLR 2022), its normal-softmax variant::

        w = K softmax(z),   z ~ N(0, std^2 I),  drawn fresh at every update.

    The key lives in the state: ``update`` does ``key, sub = jax.random.split(state.key)``, draws
    ``z = std * jax.random.normal(sub, (K,))`` and stores ``key``. ``init`` needs a key.
    """
    _check_positive("std", std)

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        if key is None:
            raise ValueError("key must be a PRNG key for rlw (its randomness lives in the state), got None")
        return RLWState(key=key, tasks=jnp.ones((k,), dtype=bool))

    def update(task_losses, state, present=None, **extra):
        losses = _check_losses(task_losses, state.tasks.shape[-1])
        _check_present(present, losses)  # absent tasks change nothing: the weights ignore the losses
        key, sub = jax.random.split(state.key)
        z = std * jax.random.normal(sub, losses.shape, dtype=jnp.result_type(float))
        return _finish(_k_softmax(z), losses, RLWState(key=key, tasks=state.tasks), state)

    return Weighting(init, update)


# ----------------------------------------------------------------------------------------------
# FAMO
# ----------------------------------------------------------------------------------------------


_FAMO_LOSS_CHANGE = ("same_batch", "next_batch")


class FAMOState(NamedTuple):
    logits: jax.Array       # (K,) xi, initialised at 0 (z = softmax(xi) uniform)
    opt_state: Any          # optax state of the logits' optimizer
    prev_losses: jax.Array  # (K,) losses passed to the last update (absent tasks: last observed)
    count: jax.Array        # () int32, number of updates so far
    seen: jax.Array         # (K,) bool, task observed at some update so far


def famo(learning_rate: float = 0.025, weight_decay: float = 1e-3, eps: float = 1e-8,
         optimizer: optax.GradientTransformation | None = None, loss_change: str = "same_batch") -> Weighting:
    """FAMO: Fast Adaptive Multitask Optimization (B. Liu, Y. Feng, P. Stone, Q. Liu, NeurIPS 2023,
    arXiv 2306.03792).

    Logits ``xi`` (K,), ``z = softmax(xi)``, ``D_k = L_k + eps``. The model step minimises
    ``sum_k z_k log D_k`` scaled by ``c = (sum_k z_k / D_k)^{-1}``, whose parameter gradient is the
    one of ``sum_k w_k L_k`` with the (stop-gradient) weights::

        w_k = c z_k / D_k     (paper: sum_k w_k = 1);   returned here: K w_k  (sum = K).

    After the model step ``theta -> theta'`` the logits follow the decrease of the log-losses::

        delta_k = log D_k(theta) - log D_k(theta'),
        g       = (d z / d xi)^T delta = z * (delta - <z, delta>),
        xi     <- optimizer step on g,  default Adam(learning_rate) with L2 weight decay
                  (g + weight_decay * xi fed to Adam; i.e. torch.optim.Adam(weight_decay=gamma)).

    ``loss_change`` says where ``D(theta')`` comes from:

    - ``"same_batch"`` (default, as the paper's Algorithm 1 and the official code): the losses of the
      SAME batch at the updated parameters. ``update`` returns the weights and stores ``L(theta)``;
      the training step then runs one extra forward pass on the batch with ``theta'`` and calls
      ``Weighting.after_step(losses_after, state, present=present)``, which takes the logit step. The
      extra pass costs about one forward pass per step (no backward).
    - ``"next_batch"``: no extra pass; ``update`` at step ``t+1`` first steps the logits with
      ``delta = log D(t) - log D(t+1)`` from the losses stored at step ``t`` and the next batch's, then
      returns the weights for ``L(t+1)`` with the new logits (the first update makes no logit step).
      ``delta`` then mixes the change of batch with the model's progress (the behaviour of earlier
      versions).

    What we followed: the official implementation, repository Cranial-XIX/FAMO, file ``famo.py``
    (commit 250873e; ``get_weighted_loss`` and ``update``): ``D = losses - min_losses + 1e-8`` with
    ``min_losses = 0`` by default (we drop ``min_losses``), ``c_code = sum(z / D)`` (the inverse of the
    ``c`` above), loss ``sum(log(D) z / c_code)``,
    ``delta = log(D_prev) - log(D_curr)``, the logit gradient through ``softmax`` by autograd, and
    ``torch.optim.Adam([w], lr=0.025, weight_decay=gamma)``; its training loops recompute the losses on
    the same batch after ``optimizer.step()`` and pass them to ``update``. Defaults:
    ``learning_rate = 0.025`` (that file's ``w_lr``); ``weight_decay = 1e-3``, the paper's gamma as we
    understand it (not checked against the paper's text here; that file's default is ``gamma = 0.01``,
    pass it to reproduce the code). Pass ``optimizer`` to replace the default chain, e.g.
    ``optax.chain(optax.add_decayed_weights(gamma), optax.sgd(beta))`` for the plain step
    ``xi <- xi - beta (g + gamma xi)``.

    Gradient clipping: the official code clips the model gradient by its global norm
    (``clip_grad_norm_(params, max_norm)``, 1.0 in its experiments). That is a property of the model's
    optimizer: ``TrainConfig(max_grad_norm=...)``. Because the weights here are ``K`` times the paper's,
    the gradient is ``K`` times larger: ``max_grad_norm = K * c`` reproduces the official clip at ``c``
    (with Adam, which ignores the constant factor ``K`` up to its ``eps``).

    Scaling: we return ``K`` times the paper's weights so that every scheme is on the scale of
    ``equal`` (sum ``K``). With Adam-type model optimizers this is harmless (Adam is invariant to a
    constant gradient scale, up to its ``eps``); with SGD it multiplies the model's learning rate by
    ``K``.

    Absent tasks (``present[k] = False``, module docstring): ``D_k`` uses the task's last observed loss,
    so its ``delta_k`` is 0 while it is absent (and at its first observation; with ``"same_batch"`` an
    absent task's loss after the step is its stored one too); with a zero loss instead, ``D_k = eps``
    would give the absent task almost all the weight and a huge ``delta``.

    Shapes: ``task_losses`` and ``losses_after`` (K,), ``present`` None or (K,) bool; weights (K,).
    """
    _check_positive("eps", eps)
    if optimizer is None:
        _check_positive("learning_rate", learning_rate)
        _check_nonnegative("weight_decay", weight_decay)
        optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation or None, got {optimizer!r}")
    if not isinstance(loss_change, str) or loss_change not in _FAMO_LOSS_CHANGE:
        raise ValueError(f"loss_change must be one of {_FAMO_LOSS_CHANGE}, got {loss_change!r}")

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        xi = _float_zeros(k)
        return FAMOState(logits=xi, opt_state=optimizer.init(xi), prev_losses=_float_ones(k), count=_count(),
                         seen=_float_false(k))

    def logit_step(xi, opt_state, before, after):
        """One optimizer step of the logits on ``z * (delta - <z, delta>)``, ``delta = log D(before) - log D(after)``."""
        z = jax.nn.softmax(xi)
        delta = jnp.log(before + eps) - jnp.log(after + eps)
        grad = (z * (delta - jnp.sum(z * delta))).astype(xi.dtype)
        updates, opt_state = optimizer.update(grad, opt_state, xi)
        return optax.apply_updates(xi, updates), opt_state

    def update(task_losses, state, present=None, **extra):
        observed = _check_losses(task_losses, state.seen.shape[-1])
        present = _check_present(present, observed)
        losses = _impute(observed, present, state.prev_losses, state.seen)
        xi, opt_state = state.logits, state.opt_state
        if loss_change == "next_batch":
            # A task's history starts at its first observation: no logit signal from a stand-in loss.
            prev = jnp.where(state.seen, state.prev_losses, losses)
            stepped = logit_step(xi, opt_state, prev, losses)
            xi, opt_state = _select(state.count > 0, stepped, (xi, opt_state))
        z = jax.nn.softmax(xi)
        weights = _sum_to_k(z / (losses + eps))
        new_state = FAMOState(logits=xi, opt_state=opt_state, prev_losses=losses, count=state.count + 1,
                              seen=state.seen | present)
        return _finish(weights, losses, new_state, state)

    def after_step(losses_after, state, present=None, **extra):
        """The logit step from the same batch's losses after the model step (``loss_change="same_batch"``)."""
        after = _as_input(losses_after)
        if after.shape != state.prev_losses.shape:
            raise ValueError(f"losses_after: expected shape {state.prev_losses.shape}, one loss per task, "
                             f"got shape {after.shape}")
        present = _check_present(present, after)
        # An absent task (no sample in the batch) has no loss after the step either: delta_k = 0.
        after = jnp.where(present, after, state.prev_losses.astype(after.dtype))
        xi, opt_state = logit_step(state.logits, state.opt_state, state.prev_losses, after)
        new_state = state._replace(logits=xi, opt_state=opt_state)
        return _finish(after, after, new_state, state)[1]

    if loss_change == "same_batch":
        return Weighting(init, update, after_step=after_step)
    return Weighting(init, update)


# ----------------------------------------------------------------------------------------------
# GradNorm
# ----------------------------------------------------------------------------------------------


_GRADNORM_INITIAL = ("epoch", "batch")


class GradNormState(NamedTuple):
    weights: jax.Array         # (K,) w(t), positive, summing to K; ones at init
    initial_losses: jax.Array  # (K,) L(0): the first epoch's mean loss (initial="epoch") or first observed loss
    count: jax.Array           # () int32, number of updates so far
    last: jax.Array            # (K,) each task's last observed loss (stands in for it while it is absent)
    last_grad_norms: jax.Array # (K,) each task's last observed gradient norm (likewise)
    seen: jax.Array            # (K,) bool, task observed at some update so far
    opt_state: Any = ()        # the optimizer's state for the weights
    epochs: Any = ()           # () int32, finished epochs (initial="epoch"; () otherwise)
    epoch_sum: Any = ()        # (K,) sum of the task's observed losses in the first epoch (initial="epoch")
    epoch_n: Any = ()          # (K,) how many of them (float)
    has_initial: Any = ()      # (K,) bool, the task has its L(0) (initial="epoch"; with "batch" that is ``seen``)


def gradnorm(alpha: float = 1.5, learning_rate: float = 0.025, floor: float = 1e-3,
             optimizer: optax.GradientTransformation | None = None, initial: str = "epoch") -> Weighting:
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: gradient normalization for adaptive
    loss balancing in deep multitask networks", ICML 2018, arXiv 1711.02257, Algorithm 1).

    ``update(task_losses, state, grad_norms=G, epoch_end=b)``, where ``G_k = ||grad_W L_k||`` is the norm
    of the gradient of the UNWEIGHTED task loss ``L_k`` with respect to the last shared layer ``W``
    (computed by the training loop at the same parameters as ``task_losses``). With the current weights
    ``w``::

        G_w,k    = w_k G_k,                 Gbar = mean_k G_w,k
        Ltilde_k = L_k / L_k(0),            r_k  = Ltilde_k / mean_j Ltilde_j
        target_k = Gbar * r_k^alpha         (held constant, as in the paper)
        L_grad   = sum_k |G_w,k - target_k|,   d L_grad / d w_k = sign(G_w,k - target_k) G_k
        w'       = one optimizer step on w with that gradient
        w_new    = K * max(w', floor) / sum_j max(w', floor)   (renormalised, kept positive)

    ``update`` returns the current weights ``w(t)`` -- the ones the model step must use, as in the
    paper's Algorithm 1 -- and stores ``w(t+1) = w_new``. ``alpha = 1.5`` is the paper's value for its
    imbalanced regression.

    ``initial`` says what ``L(0)`` is:

    - ``"epoch"`` (default, as LibMTL's ``GradNorm``): the mean of each task's batch losses over the first
      epoch. During that epoch the weights stay at 1 and are not stepped (the ratios are not defined
      yet); ``update`` needs ``epoch_end`` (a () bool, True at the last update of an epoch, passed by the
      training step: ``needs = ("grad_norms", "epoch_end")``), and the first step is taken at the first
      update of the second epoch (so the weights move from its second update on).
    - ``"batch"``: the losses of the first update (one batch, noisy). The first update returns ones,
      stores ``L(0)`` and already takes a step with ``r = 1`` (all tasks at the same relative rate, so
      ``target = Gbar`` equalises the weighted gradient norms). The behaviour of earlier versions.

    The paper trains ``w`` with the network's optimizer; the default here is ``optax.adam(learning_rate)``
    (as common implementations do), which matters: the raw gradient ``sign(.) G_k`` scales with the
    gradient norms, which can span orders of magnitude between tasks (a plain step of
    ``learning_rate * G_k`` then barely moves the weights of small-gradient tasks). Pass ``optimizer``
    (e.g. ``optax.sgd(learning_rate)`` for the plain step) to change it. ``floor`` (absolute, before
    renormalisation) keeps the weights positive.

    Absent tasks (``present[k] = False``, module docstring): both the loss and the gradient norm of an
    absent task are its last observed ones (its actual norm is 0, which would pull ``Gbar`` down). Only
    the batches in which a task is present enter its first-epoch mean; a task absent for the whole first
    epoch (or, with ``"batch"``, not observed yet) takes as ``L_k(0)`` its first observed loss after that
    (``r_k`` uses the stand-in until then).

    Shapes: ``task_losses`` and ``grad_norms`` (K,), ``present`` None or (K,) bool, ``epoch_end`` () bool;
    weights (K,).
    """
    _check_nonnegative("alpha", alpha)
    _check_positive("learning_rate", learning_rate)
    _check_positive("floor", floor)
    if optimizer is None:
        optimizer = optax.adam(learning_rate)
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation or None, got {optimizer!r}")
    if not isinstance(initial, str) or initial not in _GRADNORM_INITIAL:
        raise ValueError(f"initial must be one of {_GRADNORM_INITIAL}, got {initial!r}")
    by_epoch = initial == "epoch"

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        w = _float_ones(k)
        epoch_fields = dict(epochs=_count(), epoch_sum=_float_zeros(k), epoch_n=_float_zeros(k),
                            has_initial=_float_false(k)) if by_epoch else {}
        return GradNormState(weights=w, initial_losses=_float_ones(k), count=_count(), last=_float_ones(k),
                             last_grad_norms=_float_ones(k), seen=_float_false(k), opt_state=optimizer.init(w),
                             **epoch_fields)

    def update(task_losses, state, grad_norms=None, present=None, epoch_end=None, **extra):
        if grad_norms is None:
            raise ValueError("grad_norms is required by gradnorm: the (K,) norms of each unweighted task "
                             "loss's gradient w.r.t. the last shared layer")
        observed = _check_losses(task_losses, state.weights.shape[-1])
        present = _check_present(present, observed)
        norms = _as_input(grad_norms)
        if norms.shape != observed.shape:
            raise ValueError(f"grad_norms: expected shape {observed.shape}, one norm per task, got shape {norms.shape}")
        losses = _impute(observed, present, state.last, state.seen)
        norms = _impute(norms, present, state.last_grad_norms, state.seen)
        has_initial = state.has_initial if by_epoch else state.seen
        # L(0) of a task without one yet: its loss now (rel = 1), kept once the task is observed.
        initial_now = jnp.where(has_initial, state.initial_losses, losses)
        w = state.weights
        weighted_norms = w * norms
        rel = losses / initial_now
        target = jnp.mean(weighted_norms) * (rel / jnp.mean(rel)) ** alpha
        grad = (jnp.sign(weighted_norms - target) * norms).astype(w.dtype)
        updates, opt_state = optimizer.update(grad, state.opt_state, w)
        w_new = _sum_to_k(jnp.maximum(optax.apply_updates(w, updates), floor))
        new_state = state._replace(weights=w_new, initial_losses=initial_now, count=state.count + 1, last=losses,
                                   last_grad_norms=norms, seen=state.seen | present, opt_state=opt_state)
        if by_epoch:
            end = _epoch_end_input(epoch_end, "gradnorm(initial='epoch')")
            stepping = new_state._replace(has_initial=has_initial | present, epochs=state.epochs + end)
            # First epoch: no step, the weights stay at 1; the observed losses are summed, and their mean
            # becomes L(0) when it ends (a task absent throughout takes its first observation after it).
            epoch_sum = state.epoch_sum + jnp.where(present, observed, 0.0)
            epoch_n = state.epoch_n + present
            closes = end & (epoch_n > 0)
            waiting = new_state._replace(
                weights=w, opt_state=state.opt_state,
                initial_losses=jnp.where(closes, epoch_sum / jnp.maximum(epoch_n, 1.0), state.initial_losses),
                has_initial=closes, epochs=state.epochs + end, epoch_sum=epoch_sum, epoch_n=epoch_n)
            new_state = _select(state.epochs == 0, waiting, stepping)
        return _finish(w, losses, new_state, state)

    needs = ("grad_norms", "epoch_end") if by_epoch else ("grad_norms",)
    return Weighting(init, update, needs=needs)


# ----------------------------------------------------------------------------------------------
# fixed (constant weights; single-task baselines)
# ----------------------------------------------------------------------------------------------


class FixedState(NamedTuple):
    weights: jax.Array  # (K,) the constant weights, in the default float dtype


def fixed(weights) -> Weighting:
    """Constant weights: ``w_k = weights[k]`` at every update, used as given (not renormalised).

    Not an adaptive scheme but a baseline: one-hot ``weights`` (``(0, 1, 0)``) train the shared network
    on task k alone -- the other heads get no gradient and the trunk sees task k's loss only -- so
    ``fixed`` with one-hot weights is the single-task baseline of the Delta m metric (Maninis et al.
    CVPR 2019; Liu et al. CVPR 2019); ``fixed((1,) * K)`` equals :func:`equal`.

    Unlike the other schemes the weights need not be positive nor sum to ``K``: they must be finite,
    non-negative, with at least one positive. They live in the state (so ``update`` is jit- and
    vmap-friendly, and a stacked state can run several weight vectors as one program); ``init``
    checks that there is one weight per task. A traced ``weights`` (under ``jit``/``vmap``) is not
    checked. ``fixed`` is available through :func:`get` but is not in :data:`SCHEMES` (the adaptive
    schemes compared in the experiments).
    """
    if not is_traced(weights):
        try:
            w = np.asarray(weights, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"weights must be a 1-D sequence of real numbers, got {weights!r}") from None
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be a non-empty 1-D sequence of finite numbers, got {weights!r}")
        if np.any(w < 0) or not np.any(w > 0):
            raise ValueError(f"weights must be >= 0 with at least one > 0, got {weights!r}")

    def init(num_tasks, key=None):
        k = _check_num_tasks(num_tasks)
        if not is_traced(weights) and np.shape(weights) != (k,):
            raise ValueError(f"weights must have one entry per task ({k}), got {np.shape(weights)}")
        return FixedState(weights=jnp.asarray(weights, dtype=jnp.result_type(float)))

    def update(task_losses, state, present=None, **extra):
        losses = _check_losses(task_losses, state.weights.shape[-1])
        _check_present(present, losses)  # absent tasks change nothing: the weights are constant
        return _finish(state.weights, losses, state, state)

    return Weighting(init, update)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., Weighting]] = {
    "equal": equal,
    "huq_pervin": huq_pervin,
    "dwa": dwa,
    "uncertainty": uncertainty,
    "rlw": rlw,
    "famo": famo,
    "gradnorm": gradnorm,
}

SCHEMES: tuple[str, ...] = names.SCHEMES
assert tuple(_FACTORIES) == SCHEMES, "mtl_jax.names.SCHEMES and the factories disagree"

# Baselines reachable through get() but not compared as schemes (SCHEMES lists the adaptive ones).
_FACTORIES.update({name: globals()[name] for name in names.EXTRA_SCHEMES})


def get(name: str, **kwargs) -> Weighting:
    """The scheme called ``name`` (one of :data:`SCHEMES`, or ``"fixed"``), built with ``kwargs``."""
    if not isinstance(name, str) or name not in _FACTORIES:
        raise ValueError(f"name must be one of {tuple(_FACTORIES)}, got {name!r}")
    return _FACTORIES[name](**kwargs)
