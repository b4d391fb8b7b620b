"""Task weighting, a fair comparison: every loss-driven scheme and every gradient method, four problems,
several seeds, a tuned equal-weighting baseline, Delta m with diverged seeds flagged, per-step costs.

Problems (``datasets``):

* ``multi_digits``           two overlaid 8x8 digits, two 10-class tasks, small CNN (metric: accuracy);
* ``imbalanced_regression``  GradNorm-style regression, tasks whose scales differ 100x, MLP (MSE);
* ``school_multihead``       the Exam data, one regression head per school gender, MLP (MSE);
* ``trump_tweets``           the text task (:mod:`mtl_jax.data.text`): tweet source (3 classes, accuracy) and
                             log retweets, log favourites, year (MSE) on their raw scales
                             (``standardize=False``: a 30-40x loss imbalance), embedding-bag model.

Runs (``methods``, :data:`RUNS`): ``equal``; the loss-driven schemes of :mod:`mtl_jax.weighting` with their
defaults (``dwa`` per epoch, ``famo`` same batch, ``gradnorm`` with the first epoch's ``L(0)``, ``rlw``,
``uncertainty`` from 0) plus ``uncertainty_loss`` (``initial="loss"``) and the three readings of Huq and
Pervin (``huq_pervin``: softmax of the losses relative to their first values, the earlier rule;
``huq_pervin_proportional``: ``w_k = K L_k / sum_j L_j``; ``huq_pervin_softmax``: ``K softmax(L / T)``, T = 1);
the gradient methods of :mod:`mtl_jax.gradient_methods` on the shared parameters (``mgda``, ``pcgrad``,
``cagrad``, ``imtl_g``, ``gradvac``, ``graddrop``, ``nash_mtl``, ``aligned_mtl``) and ``mgda_ub`` on the
trunk's output (``TrainConfig.gradient_level="features"``); and ``single_task``, K runs with one-hot weights.

Protocol (the same for every run, equal weighting included): a validation split (``val_fraction`` of the
training rows, drawn once with seed 0) is held out; every run trains on the rest at every learning rate of
the grid ``lr_factors`` x the problem's base rate, for ``seeds`` seeds (all the rates and seeds of one run
as one compiled program: the learning rate is injected into the optimizer state and vmapped,
:func:`run_cells`, :func:`mtl_jax.training.train_grid`). Per
run, the rate with the best median validation Delta m (against equal weighting at the base rate, the same
reference for all) is selected; the test numbers are those of the selected rate. Delta m on the test split
is then reported against the *tuned* equal weighting (equal at its own selected rate) and against the
single-task baselines (base rate): median, and mean +- std over the seeds that did not diverge
(:func:`mtl_jax.metrics.summarise_delta_m`); diverged seeds (non-finite or exploding loss,
:func:`mtl_jax.metrics.diverged_seeds`) are counted, not averaged in. Per-step cost: the execution time of a
run's compiled program (compilation excluded; each rate's share when several rates train together) per
step, relative to equal weighting's at the same rate, median over the grid.

Delta m (Maninis et al. CVPR 2019; Liu et al. CVPR 2019), higher is better::

    Delta_m = (100 / K) sum_k (-1)^{l_k} (M_k - M_base,k) / M_base,k,   l_k = 1 if lower M_k is better.

Written to ``out``: ``results.md`` (one table per problem and the per-step costs), ``results.json`` (also
per seed, per rate), ``<dataset>_curves.png`` (losses and weights of the loss-driven runs at their selected
rates), and one results-store run folder per cell, ``cells/<dataset>/<run>/lr<factor>/`` (``mtl-jax plot
--results OUT`` draws them). A rerun skips every finished cell whose configuration is unchanged (same
numbers; ``overwrite=true`` recomputes).

    mtl-jax run task_weighting --out runs/task_weighting                 # default (5 seeds): ~1 min on 2 CPU cores
    mtl-jax run task_weighting --out runs/task_weighting --preset full   # every run, 4 problems, 5 seeds
    python experiments/task_weighting.py --quick --out /tmp/tw_quick     # seconds
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import plotting, weighting
from mtl_jax.compilation import enable_compilation_cache
from mtl_jax.data import deep
from mtl_jax.data.deep import validate_spec
from mtl_jax.data.io import atomic_write
from mtl_jax.metrics import delta_m as delta_m  # re-exported: Delta m of a (..., K) metric against (K,)
from mtl_jax.metrics import diverged_seeds, summarise_delta_m
from mtl_jax.runner import configs, progress, store
from mtl_jax.solvers.base import check_checkpoint
from mtl_jax.training import TrainConfig, evaluate, make_components, make_grid_run, make_run, to_device

FORMAT = 5            # bump when a cell's content or meaning changes (old cells are then recomputed)
# 5: the rates of a (dataset, run) train as one program; a cell's compile/run seconds are its share
BASELINE = "equal"
SINGLE_TASK = "single_task"
CURVE_BINS = 100      # training curves are stored as means over this many windows of steps


class Run(NamedTuple):
    """One compared run: a weighting scheme (with arguments) and optionally a gradient method."""

    scheme: str
    scheme_kwargs: tuple = ()
    gradient_method: str | None = None
    gradient_kwargs: tuple = ()
    gradient_level: str = "params"

    def apply(self, config: TrainConfig) -> TrainConfig:
        return dataclasses.replace(config, scheme=self.scheme, scheme_kwargs=self.scheme_kwargs,
                                   gradient_method=self.gradient_method, gradient_kwargs=self.gradient_kwargs,
                                   gradient_level=self.gradient_level)


#: The compared runs, by name (module docstring).
RUNS: dict[str, Run] = {
    "equal": Run("equal"),
    # Huq and Pervin: three readings (the paper's formula is not available, weighting.huq_pervin)
    "huq_pervin": Run("huq_pervin", (("mode", "relative"),)),
    "huq_pervin_proportional": Run("huq_pervin", (("mode", "raw"), ("rule", "proportional"))),
    "huq_pervin_softmax": Run("huq_pervin", (("mode", "raw"), ("rule", "softmax"))),
    "dwa": Run("dwa"),
    "uncertainty": Run("uncertainty"),
    "uncertainty_loss": Run("uncertainty", (("initial", "loss"),)),
    "rlw": Run("rlw"),
    "famo": Run("famo"),
    "gradnorm": Run("gradnorm"),
    "mgda": Run("equal", (), "mgda"),
    "mgda_ub": Run("equal", (), "mgda_ub", (), "features"),
    "pcgrad": Run("equal", (), "pcgrad"),
    "cagrad": Run("equal", (), "cagrad"),
    "imtl_g": Run("equal", (), "imtl_g"),
    "gradvac": Run("equal", (), "gradvac"),
    "graddrop": Run("equal", (), "graddrop"),
    "nash_mtl": Run("equal", (), "nash_mtl"),
    "aligned_mtl": Run("equal", (), "aligned_mtl"),
}
LOSS_DRIVEN = tuple(n for n, r in RUNS.items() if r.gradient_method is None)


class Setup(NamedTuple):
    """One problem of the experiment: its generator, the generator's arguments and the training config
    (``learning_rate`` is the base rate that ``lr_factors`` multiply)."""

    make: Callable[..., deep.MultiTaskDataset]
    data_kwargs: dict
    config: TrainConfig


def setups(size: str = "default") -> dict[str, Setup]:
    """The problems, their sizes and hyper-parameters: ``"quick"`` (tiny, for tests), ``"default"``
    (small: the default config finishes in about a minute) or ``"full"`` (the paper-scale run)."""
    if size not in SIZES:
        raise ValueError(f"size: must be one of {SIZES}, got {size!r}")
    if size == "quick":
        return {
            "multi_digits": Setup(deep.multi_digits, dict(n_train=256, n_test=128, seed=0),
                                  TrainConfig(model="cnn", features=(4, 8), hidden=(16,), steps=20,
                                              batch_size=32, learning_rate=2e-3)),
            "imbalanced_regression": Setup(deep.imbalanced_regression,
                                           dict(n_train=256, n_test=128, num_tasks=3, in_dim=8, out_dim=4, seed=0),
                                           TrainConfig(model="mlp", hidden=(16,), steps=20, batch_size=32,
                                                       learning_rate=1e-2)),
            "school_multihead": Setup(deep.school_multihead, dict(seed=0),
                                      TrainConfig(model="mlp", hidden=(8,), steps=20, batch_size=48,
                                                  stratify=True, learning_rate=3e-3)),
            "trump_tweets": Setup(deep.trump_tweets, dict(n_train=256, n_test=128, num_buckets=2**8, max_len=32,
                                                          standardize=False, seed=0),
                                  TrainConfig(model="embedding_bag", vocab_size=2**8, embed_dim=8, hidden=(16,),
                                              steps=20, batch_size=32, learning_rate=3e-3)),
        }
    full = size == "full"
    return {
        "multi_digits": Setup(deep.multi_digits, dict(n_train=2000, n_test=500, seed=0),
                              TrainConfig(model="cnn", features=(8, 16), hidden=(64,), steps=500 if full else 200,
                                          batch_size=64, learning_rate=2e-3)),
        "imbalanced_regression": Setup(deep.imbalanced_regression,
                                       dict(n_train=2000, n_test=500, in_dim=50, out_dim=20, seed=0),
                                       TrainConfig(model="mlp", hidden=(128, 128) if full else (64,),
                                                   steps=1500 if full else 400, batch_size=64, learning_rate=1e-2)),
        "school_multihead": Setup(deep.school_multihead, dict(seed=0),
                                  TrainConfig(model="mlp", hidden=(32, 32), steps=2000 if full else 400,
                                              batch_size=96, stratify=True, learning_rate=3e-3)),
        "trump_tweets": Setup(deep.trump_tweets, dict(n_train=None if full else 4000, n_test=2000,
                                                      num_buckets=2**12 if full else 2**10, standardize=False,
                                                      seed=0),
                              TrainConfig(model="embedding_bag", vocab_size=2**12 if full else 2**10,
                                          embed_dim=32 if full else 16, hidden=(64,) if full else (32,),
                                          steps=1500 if full else 300, batch_size=128, learning_rate=3e-3)),
    }


SIZES = ("quick", "default", "full")
DATASETS = tuple(setups("quick"))


def holdout(data: deep.MultiTaskDataset, fraction: float, seed: int = 0):
    """``(fit, validation)``: the training split's rows cut in two by one seeded permutation; the
    validation part has ``round(fraction * N)`` rows (at least one on each side)."""
    n = np.asarray(data.train.x).shape[0]
    n_val = min(max(int(round(fraction * n)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)

    def take(rows):
        tr = data.train
        return deep.Split(x=np.asarray(tr.x)[rows], y=tuple(np.asarray(y)[rows] for y in tr.y),
                          mask=np.asarray(tr.mask)[rows])

    return take(np.sort(order[n_val:])), take(np.sort(order[:n_val]))


# ----------------------------------------------------------------------------- metrics


def metric_info(kinds) -> tuple[list[str], np.ndarray]:
    """The headline metric of each task and whether higher is better: accuracy for a classification
    task (higher is better), MSE for a regression task (lower is better)."""
    is_cls = np.array([kind == deep.CLASSIFICATION for kind in kinds])
    return ["accuracy" if c else "mse" for c in is_cls], is_cls


def task_metric(test, kinds) -> np.ndarray:
    """(..., K) each task's headline metric from :class:`~mtl_jax.training.TestMetrics` (leading axes kept)."""
    _, is_cls = metric_info(kinds)
    return np.where(is_cls, np.asarray(test.accuracy, float), np.asarray(test.mse, float))


def bin_curve(a: np.ndarray, bins: int = CURVE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(S, T, K) -> (S, B, K) means over B <= ``bins`` consecutive windows of steps, and (B,) window centres."""
    a = np.asarray(a, float)
    edges = np.linspace(0, a.shape[1], min(bins, a.shape[1]) + 1).astype(int)
    means = np.stack([a[:, lo:hi].mean(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], axis=1)
    return means, (edges[:-1] + edges[1:] - 1) / 2.0



# ----------------------------------------------------------------------------- training


def train_fixed_weights(config: TrainConfig, data: deep.MultiTaskDataset, seeds, weight_rows):
    """Train one model per (row of ``weight_rows``, seed) with constant task weights, as one program.

    The runs are those of :func:`~mtl_jax.training.train_seeds` with the scheme replaced by
    :func:`mtl_jax.weighting.fixed` (same initial weights, batches and steps for a seed): one-hot rows
    give the single-task baselines. ``weight_rows`` (R, K), ``seeds`` S integers. Returns
    ``(history, test)`` with leading axes (R, S): e.g. ``history.task_losses`` (R, S, T, K),
    ``test.mse`` (R, S, K)."""
    spec = data.spec
    dtype = jnp.dtype(config.dtype)
    train_split, test_split = to_device(data.train, spec, dtype), to_device(data.test, spec, dtype)

    def run(weights, seed, tr, te):
        # The scheme holds the traced weight row, so the run is built inside the vmap over rows.
        # params=None: drawn from the seed inside the run; it depends on the seed alone, so the
        # vmap over rows computes it once per seed.
        result = make_run(config, spec, weighting.fixed(weights))(seed, None, tr, te)
        return result.history, result.test  # the final states (R * S models) are not needed

    over_seeds = jax.vmap(run, in_axes=(None, 0, None, None))
    program = jax.jit(jax.vmap(over_seeds, in_axes=(0, None, None, None)))
    rows = jnp.asarray(weight_rows, jnp.result_type(float))
    return program(rows, jnp.asarray(list(seeds), jnp.int32), train_split, test_split)


# ----------------------------------------------------------------------------- one cell


def run_cells(config: TrainConfig, spec: deep.TaskSpec, fit, val, test, seeds, learning_rates, *,
              checkpoint=None, checkpoint_every: int | None = None) -> list[dict]:
    """Train ``config`` at every rate of ``learning_rates`` (L rates) for every seed (S) on ``fit``, as ONE
    vmapped, ahead-of-time compiled program: :func:`mtl_jax.training.make_grid_run` (the rate injected
    into the optimizer's state, traced) under ``jit(vmap(vmap(run, seeds), rates))``, so all the rates of
    a (dataset, run) cost one compilation; ``config.learning_rate`` is not used. Rate ``l`` with seed ``s``
    gives the numbers of ``train(dataclasses.replace(config, learning_rate=learning_rates[l], seed=s))``
    on ``fit`` (to floating-point reassociation).

    Returns one cell per rate, the arrays stored in it: ``metric_val`` / ``metric`` (S, K) validation /
    test metric of the final parameters, ``task_losses`` / ``weights`` (S, B, K) binned curves and
    ``curve_x`` (B,), ``diverged`` (S,) bool (:func:`mtl_jax.metrics.diverged_seeds`), ``compile_seconds``
    and ``run_seconds``: the program's compilation and execution (compilation excluded) divided by L, each
    rate's share (the per-step time of a rate is ``run_seconds / steps``).

    ``checkpoint``: a ``.npz`` path: the steps run in checkpointed chunks of ``checkpoint_every``
    (:func:`mtl_jax.training.train_grid`'s driver), so a killed run continues from its last chunk; then
    ``compile_seconds`` is NaN and ``run_seconds`` is the wall time of the chunks, compilation included."""
    dtype = jnp.dtype(config.dtype)
    tr, va, te = (to_device(s, spec, dtype) for s in (fit, val, test))
    model = make_components(config, spec).model
    if checkpoint is not None:
        return _chunked_cells(config, spec, (fit, val, test), (tr, va, te), seeds, learning_rates, model,
                              checkpoint, checkpoint_every)
    run = make_grid_run(config, spec)

    def one(learning_rate, seed, tr, va, te):
        # params=None: drawn from the seed inside the run; they depend on the seed alone, so the vmap
        # over rates computes them once per seed.
        result = run(learning_rate, {}, seed, None, tr, va)
        return result.history, result.test, evaluate(model, result.state.params, te, spec.kinds), result.diverged_at

    over_seeds = jax.vmap(one, in_axes=(None, 0, None, None, None))
    program = jax.jit(jax.vmap(over_seeds, in_axes=(0, None, None, None, None)))
    rates = jnp.asarray(np.asarray(learning_rates, float).reshape(-1), jnp.result_type(float))
    seed_array = jnp.asarray(list(seeds), jnp.int32)
    t0 = time.perf_counter()
    compiled = program.lower(rates, seed_array, tr, va, te).compile()
    t1 = time.perf_counter()
    history, val_metrics, test_metrics, diverged_at = jax.block_until_ready(compiled(rates, seed_array, tr, va, te))
    t2 = time.perf_counter()
    share = float(rates.shape[0])
    metric_all = task_metric(test_metrics, spec.kinds)                        # (L, S, K)
    metric_val_all = task_metric(val_metrics, spec.kinds)
    losses_all, weights_all = np.asarray(history.task_losses), np.asarray(history.weights)  # (L, S, T, K)
    present_all, diverged_at = np.asarray(history.present), np.asarray(diverged_at)
    return _cells(metric_all, metric_val_all, losses_all, weights_all, present_all, diverged_at,
                  (t1 - t0) / share, (t2 - t1) / share)


def _cells(metric_all, metric_val_all, losses_all, weights_all, present_all, diverged_at, compile_s, run_s):
    """One cell per rate from the (L, S, ...) outputs of a run's program."""
    cells = []
    for i in range(len(metric_all)):
        diverged = diverged_seeds(losses_all[i], diverged_at=diverged_at[i], test_metric=metric_all[i],
                                  present=present_all[i])
        losses, curve_x = bin_curve(losses_all[i])
        weights, _ = bin_curve(weights_all[i])
        cells.append(dict(metric=metric_all[i], metric_val=metric_val_all[i], task_losses=losses, weights=weights,
                          curve_x=curve_x, diverged=diverged, compile_seconds=np.float64(compile_s),
                          run_seconds=np.float64(run_s)))
    return cells


def _drop_foreign_checkpoint(config, host_splits, seeds, learning_rates, checkpoint):
    """Remove a run's training checkpoint that belongs to another set of rates or settings (left by a run that
    was stopped before it stored its cells, then changed): the run starts afresh instead of failing."""
    from mtl_jax import training
    from mtl_jax.solvers import base

    if not os.path.exists(checkpoint):
        return
    print_ = training.chunks_fingerprint(_cells_identity(config, host_splits, seeds, learning_rates)[0])
    try:
        base.read_checkpoint(checkpoint, format=training._CHECKPOINT_FORMAT, fingerprint=print_, what="", differs="")
    except ValueError:
        os.remove(checkpoint)


def _cells_identity(config, host_splits, seeds, learning_rates):
    """``(identity of the run's chunked training, the grid's config, the rates as traced)``."""
    key = dataclasses.replace(config, seed=0, learning_rate=1.0)
    rates = jnp.asarray(np.asarray(learning_rates, float).reshape(-1), jnp.result_type(float))
    return (host_splits, key, tuple(seeds), tuple(np.asarray(rates).tolist())), key, rates


def _chunked_cells(config, spec, host_splits, splits, seeds, learning_rates, model, path, every):
    """:func:`run_cells` with the grid's steps in checkpointed chunks (``mtl_jax.training._run_chunked``)."""
    from mtl_jax import training

    _, every = check_checkpoint(path, every, default=training.CHECKPOINT_EVERY)
    tr, va, te = splits
    identity, key, rates = _cells_identity(config, host_splits, seeds, learning_rates)
    start, advance, _ = training._compiled_grid_parts(key, validate_spec(spec), ())
    seed_array = jnp.asarray(list(seeds), jnp.int32)
    evaluate_all = jax.jit(jax.vmap(jax.vmap(lambda p, s: evaluate(model, p, s, spec.kinds), in_axes=(0, None)),
                                    in_axes=(0, None)))

    def finish(state, history):
        return history, evaluate_all(state.params, va), evaluate_all(state.params, te), state.diverged_at

    t0 = time.perf_counter()
    history, val_metrics, test_metrics, diverged_at = jax.block_until_ready(training._run_chunked(
        lambda: start(rates, {}, seed_array, None, tr),
        lambda state, n: advance(rates, {}, state, tr, n),
        finish, steps=config.steps, axis=2, path=path, every=every, identity=identity))
    share = float(rates.shape[0])
    return _cells(task_metric(test_metrics, spec.kinds), task_metric(val_metrics, spec.kinds),
                  np.asarray(history.task_losses), np.asarray(history.weights), np.asarray(history.present),
                  np.asarray(diverged_at), np.nan, (time.perf_counter() - t0) / share)


def _timing(cell: dict, share: int) -> str:
    """The log's seconds of a program of ``share`` cells; a NaN part is folded into the other (chunked runs
    and single-task networks do not time their compilation apart)."""
    compile_s, run_s = (float(cell[k]) * share for k in CELL_SCALARS)
    if np.isnan(compile_s) or np.isnan(run_s):
        return f"compile + run {np.nansum([compile_s, run_s]):6.1f} s"
    return f"compile {compile_s:5.1f} s, run {run_s:6.2f} s"


def run_cell(config: TrainConfig, spec: deep.TaskSpec, fit, val, test, seeds) -> dict[str, np.ndarray]:
    """One cell at ``config.learning_rate``: :func:`run_cells` with that single rate."""
    return run_cells(config, spec, fit, val, test, seeds, [config.learning_rate])[0]


def run_single_task(config: TrainConfig, spec: deep.TaskSpec, fit, test, seeds) -> dict[str, np.ndarray]:
    """The single-task baselines (one-hot constant weights, :func:`train_fixed_weights`) at ``config``'s rate."""
    t0 = time.perf_counter()
    data = deep.MultiTaskDataset(train=fit, test=test, spec=spec)
    k = len(spec.kinds)
    history, test_m = jax.block_until_ready(train_fixed_weights(config, data, seeds, np.eye(k)))
    metric_all = task_metric(test_m, spec.kinds)                    # (K runs, S, K tasks)
    metric = np.stack([metric_all[i, :, i] for i in range(k)], axis=1)  # task i from run i
    losses = np.stack([np.asarray(history.task_losses)[i, :, :, i] for i in range(k)], axis=-1)
    weights = np.stack([np.asarray(history.weights)[i, :, :, i] for i in range(k)], axis=-1)
    present = np.stack([np.asarray(history.present)[i, :, :, i] for i in range(k)], axis=-1)
    diverged = diverged_seeds(losses, test_metric=metric, present=present)
    losses, curve_x = bin_curve(losses)
    weights, _ = bin_curve(weights)
    seconds = np.float64(time.perf_counter() - t0)
    return dict(metric=metric, metric_val=np.full_like(metric, np.nan), task_losses=losses, weights=weights,
                curve_x=curve_x, diverged=diverged, compile_seconds=seconds, run_seconds=np.float64(np.nan))


# ----------------------------------------------------------------------------- cells on disk (resume)

CELL_ARRAYS = {"metric", "metric_val", "task_losses", "weights", "curve_x", "diverged"}
CELL_SCALARS = ("compile_seconds", "run_seconds")


def lr_label(factor: float) -> str:
    return f"lr{factor:g}"


def fingerprint(dataset: str, setup: Setup, config: TrainConfig, name: str, seeds, val_fraction: float) -> str:
    """A JSON string of everything that defines a cell; a stored cell is reused only if it matches."""
    return json.dumps(dict(format=FORMAT, dataset=dataset, data_kwargs=setup.data_kwargs,
                           config=dataclasses.asdict(config), run=name, seeds=[int(s) for s in seeds],
                           val_fraction=val_fraction), sort_keys=True, default=str)


def cell_path(out: str, dataset: str, name: str, factor: float) -> str:
    """The run folder of one (dataset, run, learning-rate factor) cell."""
    return os.path.join(out, "cells", dataset, name, lr_label(factor))


def load_cell(path: str, expected: str) -> dict[str, np.ndarray] | None:
    """The arrays of a finished cell in run folder ``path`` if its fingerprint is ``expected``, else None."""
    if not store.is_run(path):
        return None
    try:
        run = store.read_run(path)
    except ValueError:
        return None  # unreadable: recompute
    if run.config.get("fingerprint") != expected or not CELL_ARRAYS <= set(run.arrays):
        return None
    return {**run.arrays, **{k: np.float64(run.summary.get(k, np.nan)) for k in CELL_SCALARS}}


def save_cell(path: str, cell: dict, *, dataset: str, name: str, factor: float, expected: str,
              spec: deep.TaskSpec, seeds, started: str, learning_rate: float) -> None:
    """Store a finished cell as a weighting run: the binned curves per seed as history, the arrays, the
    fingerprint in the config (a rerun reuses the cell only if it matches)."""
    config = {"experiment": "task_weighting", "dataset": dataset, "scheme": name, "lr_factor": factor,
              "learning_rate": learning_rate, "tasks": list(spec.names), "seeds": [int(s) for s in seeds],
              "fingerprint": expected}
    metric = np.asarray(cell["metric"], float)
    summary = {**{k: float(cell[k]) for k in CELL_SCALARS}, "metric_mean": metric.mean(axis=0),
               "metric_std": metric.std(axis=0),
               "diverged_seeds": [int(s) for s, d in zip(seeds, cell["diverged"]) if d]}
    store.write_run(path, kind="weighting", config=config, summary=summary, started=started,
                    history=store.curve_records(cell["task_losses"], cell["weights"], cell["curve_x"]),
                    arrays={k: cell[k] for k in CELL_ARRAYS})


# ----------------------------------------------------------------------------- selection and summary


def select_rates(cells: dict, spec: deep.TaskSpec, factors) -> tuple[dict[str, float], dict]:
    """Per run, the learning-rate factor of best median validation Delta m against equal weighting at the
    reference factor (1 if in the grid, else the middle one). Returns ``(selected, validation)`` with
    ``validation[name][factor]`` that median (NaN if every seed diverged; such a factor is never chosen
    unless all are)."""
    _, higher = metric_info(spec.kinds)
    ref = 1.0 if 1.0 in factors else factors[len(factors) // 2]
    reference = cells[(BASELINE, ref)]
    selected, validation = {}, {}
    for name in dict.fromkeys(n for n, _ in cells if n != SINGLE_TASK):
        scores = {}
        for f in factors:
            c = cells[(name, f)]
            summary = summarise_delta_m(c["metric_val"], reference["metric_val"], higher,
                                        diverged=np.asarray(c["diverged"], bool),
                                        baseline_diverged=np.asarray(reference["diverged"], bool))
            scores[f] = float(summary.median)
        validation[name] = scores
        finite = {f: v for f, v in scores.items() if np.isfinite(v)}
        selected[name] = max(finite, key=finite.get) if finite else ref
    return selected, validation


def summarise(cells: dict, spec: deep.TaskSpec, factors, steps: int) -> dict[str, Any]:
    """Per run at its selected rate: per-task test metric mean/std over non-diverged seeds, Delta m
    against the tuned equal weighting and the single-task baselines (median; mean, std), the diverged
    count, and the per-step cost relative to equal weighting (median over the grid of the ratio at each
    rate) with ``ms_per_step``, the median over the grid of a cell's time per training step (its seeds
    vmapped; a cell's ``run_seconds`` cover ``steps`` steps)."""
    metric_names, higher = metric_info(spec.kinds)
    selected, validation = select_rates(cells, spec, factors)
    refs = {"delta_m_equal": cells[(BASELINE, selected[BASELINE])], "delta_m_single_task": cells[(SINGLE_TASK, 1.0)]}
    rows = {}
    for name in (SINGLE_TASK,) + tuple(selected):
        factor = selected.get(name, 1.0)
        cell = cells[(name, factor)]
        metric, diverged = np.asarray(cell["metric"], float), np.asarray(cell["diverged"], bool)
        kept = metric[~diverged] if (~diverged).any() else np.full((1, metric.shape[1]), np.nan)
        row = dict(lr_factor=factor, mean=kept.mean(axis=0).tolist(), std=kept.std(axis=0).tolist(),
                   per_seed=metric.tolist(), diverged=diverged.tolist(), n_diverged=int(diverged.sum()),
                   validation=validation.get(name, {}))
        for key, ref in refs.items():
            summary = summarise_delta_m(metric, ref["metric"], higher, diverged=diverged,
                                        baseline_diverged=np.asarray(ref["diverged"], bool))
            row[key], row[key + "_std"], row[key + "_median"] = summary.mean, summary.std, summary.median
            row[key + "_per_seed"] = summary.per_seed.tolist()
        if name != SINGLE_TASK:
            ratios = [float(cells[(name, f)]["run_seconds"] / cells[(BASELINE, f)]["run_seconds"]) for f in factors]
            row["cost_ratio"] = float(np.median(ratios))
            row["ms_per_step"] = 1e3 * float(np.median([cells[(name, f)]["run_seconds"] for f in factors])) / steps
        rows[name] = row
    return dict(tasks=list(spec.names), metrics=metric_names, higher_is_better=higher.tolist(), runs=rows)


# ----------------------------------------------------------------------------- tables and figures


def _fmt(mean: float, std: float, metric: str) -> str:
    return f"{mean:.3f} ± {std:.3f}" if metric == "accuracy" else f"{mean:.4g} ± {std:.2g}"


def markdown_table(dataset: str, summary: dict, setup: Setup, seeds, factors) -> str:
    """One problem's results as a markdown section."""
    c = setup.config
    model = {"cnn": f"CNN features {c.features}, dense {c.hidden[-1]}",
             "embedding_bag": f"embedding bag {c.vocab_size} x {c.embed_dim}, MLP {c.hidden}"}.get(c.model, f"MLP {c.hidden}")
    arrows = ["↑" if h else "↓" for h in summary["higher_is_better"]]
    lines = [
        f"### {dataset}",
        "",
        f"{model}; Adam, base lr {c.learning_rate:g} x factors {list(factors)}, {c.steps} steps, batch "
        f"{c.batch_size}{' (stratified by task)' if c.stratify else ''}; data {setup.data_kwargs}; {len(seeds)} "
        f"seeds. lr: the factor selected on validation. Test metric per task, mean ± std over the seeds that did "
        f"not diverge. Δm % (higher is better) against the tuned equal weighting and against the single-task "
        f"baselines: median; mean ± std over the non-diverged seeds. Cost: per-step time relative to equal "
        f"(in parentheses: ms per step of the {len(seeds)} vmapped seeds, compilation excluded; medians over the "
        f"rates).",
        "",
        "| run | lr | " + " | ".join(f"{t} {m} {a}" for t, m, a in zip(summary["tasks"], summary["metrics"], arrows))
        + " | Δm vs tuned equal % | Δm vs single-task % | diverged | cost |",
        "|---|---|" + "---|" * (len(summary["tasks"]) + 4),
    ]
    for name, row in summary["runs"].items():
        cells = [_fmt(m, s, metric) for m, s, metric in zip(row["mean"], row["std"], summary["metrics"])]
        dm = [f"{row[k + '_median']:+.2f}; {row[k]:+.2f} ± {row[k + '_std']:.2f}"
              for k in ("delta_m_equal", "delta_m_single_task")]
        cost = f"{row['cost_ratio']:.2f}x ({row['ms_per_step']:.3g} ms)" if "cost_ratio" in row else "–"
        lines.append(f"| {name} | {row['lr_factor']:g} | " + " | ".join(cells) + f" | {dm[0]} | {dm[1]}"
                     + f" | {row['n_diverged']}/{len(row['diverged'])} | {cost} |")
    return "\n".join(lines) + "\n"


def curves_figure(cells: dict[str, dict], spec: deep.TaskSpec, path: str, dpi: int = 80) -> str:
    """Task losses and weights over training for the loss-driven runs (at their selected rates), as a PNG."""
    curves = {name: dict(task_losses=c["task_losses"], weights=c["weights"]) for name, c in cells.items()}
    x = next(iter(cells.values()))["curve_x"]
    axes = plotting.plot_task_curves(curves, x=x, task_names=spec.names)
    return plotting.save_figure(axes[0, 0].figure, path, dpi=dpi)


# ----------------------------------------------------------------------------- config and entry points

DESCRIPTION = "task weighting: loss-driven schemes and gradient methods vs tuned equal weighting, Delta m, costs"


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's settings (``mtl-jax run task_weighting --help``)."""

    out: str = configs.field("runs/task_weighting", "output folder")
    datasets: str = configs.field("school_multihead", f"comma list of {', '.join(DATASETS)}")
    methods: str = configs.field("equal,dwa,pcgrad",
                                 "comma list of runs, or 'all' (equal is always run: the baseline)")
    seeds: int = configs.field(5, "seeds 0..seeds-1")
    lr_factors: str = configs.field("0.3,1,3", "learning-rate grid: factors of each problem's base rate")
    size: str = configs.field("default", f"problem sizes and steps: one of {', '.join(SIZES)}")
    val_fraction: float = configs.field(0.2, "share of the training rows held out for choosing the rate")
    overwrite: bool = configs.field(False, "recompute finished cells")
    compile_cache: bool = configs.field(True, "use the persistent compilation cache")
    checkpoint_every: int = configs.field(0, "steps per checkpointed chunk of a run's training, so a killed run "
                                             "continues within it (0: one program per run, resumed whole)")


PRESETS = {
    "full": {"datasets": ",".join(DATASETS), "methods": "all", "seeds": 5, "size": "full"},
    "quick": {"datasets": "school_multihead", "methods": "equal,dwa", "seeds": 2, "lr_factors": "1",
              "size": "quick"},
}


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return allowed
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ValueError(f"{what}: unknown or empty {unknown or text!r}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(names))


def _factors(text: str) -> tuple[float, ...]:
    try:
        values = tuple(dict.fromkeys(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise ValueError(f"lr_factors: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"lr_factors: need positive numbers, got {text!r}")
    return values


def main(argv=None):
    """``python experiments/task_weighting.py [--key value ...] [--preset full|quick] [--quick]``."""
    return configs.script_main(sys.modules[__name__], argv)


def run(config: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the experiment; returns ``{"computed": [...], "skipped": [...], "results": {...}}`` where the
    lists name the (dataset, run, lr factor) cells trained now and those reused from disk."""
    if not isinstance(config, Config):
        raise ValueError(f"config: must be a task_weighting.Config, got {type(config).__name__}")
    if config.seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {config.seeds}")
    if not 0.0 < config.val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {config.val_fraction}")
    datasets = _names(config.datasets, DATASETS, "datasets")
    methods = _names(config.methods, tuple(RUNS), "methods")
    methods = (BASELINE,) + tuple(m for m in methods if m != BASELINE)
    factors = _factors(config.lr_factors)
    all_setups = setups(config.size)
    seeds = list(range(config.seeds))
    if config.compile_cache:
        enable_compilation_cache()
    os.makedirs(config.out, exist_ok=True)

    computed, skipped, results, sections, figures = [], [], {}, [], {}
    total = len(datasets) * (1 + len(methods) * len(factors))
    with progress.bar(total, "task_weighting cells") as update:
        for dataset in datasets:
            setup = all_setups[dataset]
            data = setup.make(**setup.data_kwargs)
            fit, val = holdout(data, config.val_fraction)
            cells = {}
            # Every run, equal weighting (the baseline) included, on the same grid of rates; the rates of
            # one run that are not stored yet train as one program (run_cells).
            for name in (SINGLE_TASK,) + methods:
                base = setup.config if name == SINGLE_TASK else RUNS[name].apply(setup.config)
                todo = []
                for factor in (1.0,) if name == SINGLE_TASK else factors:
                    cfg = dataclasses.replace(base, learning_rate=base.learning_rate * factor)
                    path = cell_path(config.out, dataset, name, factor)
                    expected = fingerprint(dataset, setup, cfg, name, seeds, config.val_fraction)
                    cell = None if config.overwrite else load_cell(path, expected)
                    if cell is None:
                        todo.append((factor, cfg, path, expected))
                        continue
                    cells[(name, factor)] = cell
                    skipped.append((dataset, name, factor))
                    log(f"  {dataset:22s} {name:24s} {lr_label(factor):8s} done (stored)")
                    update(len(computed) + len(skipped), data=dataset, run=name)
                if not todo:
                    continue
                started = store.now()
                if name == SINGLE_TASK:
                    new = [run_single_task(todo[0][1], data.spec, fit, data.test, seeds)]
                else:
                    rates = [t[1].learning_rate for t in todo]
                    chunked = {}
                    if config.checkpoint_every > 0:  # within the run: a checkpoint beside its cells
                        folder = os.path.join(config.out, "cells", dataset, name)
                        os.makedirs(folder, exist_ok=True)
                        chunked = dict(checkpoint=os.path.join(folder, "training.npz"),
                                       checkpoint_every=config.checkpoint_every)
                        _drop_foreign_checkpoint(base, (fit, val, data.test), seeds, rates, chunked["checkpoint"])
                    new = run_cells(base, data.spec, fit, val, data.test, seeds, rates, **chunked)
                for (factor, cfg, path, expected), cell in zip(todo, new):
                    save_cell(path, cell, dataset=dataset, name=name, factor=factor, expected=expected,
                              spec=data.spec, seeds=seeds, started=started, learning_rate=cfg.learning_rate)
                    cells[(name, factor)] = cell
                    computed.append((dataset, name, factor))
                    update(len(computed) + len(skipped), data=dataset, run=name)
                if name != SINGLE_TASK and config.checkpoint_every > 0:
                    os.remove(os.path.join(config.out, "cells", dataset, name, "training.npz"))  # cells saved
                labels = ",".join(lr_label(t[0]) for t in todo)
                log(f"  {dataset:22s} {name:24s} {labels:8s} {_timing(cell, len(new))} ({len(new)} rate(s), one program)")
            results[dataset] = summarise(cells, data.spec, factors, setup.config.steps)
            results[dataset]["config"] = dict(data_kwargs=setup.data_kwargs, train=dataclasses.asdict(setup.config))
            sections.append(markdown_table(dataset, results[dataset], setup, seeds, factors))
            chosen = {n: cells[(n, results[dataset]["runs"][n]["lr_factor"])] for n in methods if n in LOSS_DRIVEN}
            figures[dataset] = curves_figure(chosen, data.spec, os.path.join(config.out, f"{dataset}_curves.png"))

    header = (f"# Task weighting: results\n\nGenerated {datetime.date.today().isoformat()} by "
              f"`mtl-jax run task_weighting` with {configs.to_dict(config)} (jax {jax.__version__}, "
              f"{jax.devices()[0].platform}). Runs: {', '.join(f'{n} = {RUNS[n]}' for n in methods)}.\n\n")
    with atomic_write(os.path.join(config.out, "results.md"), "w") as f:
        f.write(header + "\n".join(sections))
    payload = dict(config=configs.to_dict(config), seeds=seeds, lr_factors=factors,
                   runs={n: RUNS[n]._asdict() for n in methods}, datasets=results, figures=figures)
    with atomic_write(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(store.jsonable(payload), f, indent=1)
    log(f"wrote {os.path.join(config.out, 'results.md')} ({len(computed)} cells trained, {len(skipped)} reused)")
    return dict(computed=computed, skipped=skipped, results=results)
