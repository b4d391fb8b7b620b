"""Summaries of multi-task results over seeds: Delta m, and which seeds diverged (docs/weighting.md, section 4).

Pure NumPy functions on finished results (host arrays), for experiments and reports::

    from mtl_jax import metrics
    flags = metrics.diverged_seeds(result.history.task_losses, diverged_at=result.diverged_at)
    summary = metrics.summarise_delta_m(metric, baseline_metric, higher_is_better, diverged=flags)
    summary.median, summary.mean, summary.std, summary.n_diverged

Delta m (Maninis, Radosavovic, Kokkinos, CVPR 2019, arXiv 1904.08918; Liu, Johns, Davison, CVPR 2019),
in percent, higher is better::

    Delta_m = (100 / K) sum_k (-1)^{l_k} (M_k - M_base,k) / M_base,k ,     l_k = 1 if lower M_k is better.

A seed whose training diverged (a non-finite loss or update, or a loss that exploded) would dominate a
mean over seeds; :func:`summarise_delta_m` therefore reports the median and the mean with its spread over
the seeds that did not diverge, and says how many did.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

__all__ = ["delta_m", "diverged_seeds", "DeltaMSummary", "summarise_delta_m"]


def delta_m(metric, baseline, higher_is_better) -> np.ndarray:
    """Delta m % of ``metric`` (..., K) against ``baseline`` (K,): the mean over the K tasks of the
    relative change, sign-corrected so that higher is better; returns shape (...).

    ``higher_is_better`` (K,) bool: True for a metric such as accuracy, False for an error such as MSE.
    Raises ValueError naming ``baseline`` or ``higher_is_better`` when the shapes do not match."""
    metric, baseline = np.asarray(metric, float), np.asarray(baseline, float)
    if baseline.ndim != 1 or metric.ndim < 1 or metric.shape[-1] != baseline.shape[0]:
        raise ValueError(f"baseline: need one value per task ({metric.shape[-1:]}), got shape {baseline.shape}")
    higher = np.asarray(higher_is_better, bool)
    if higher.shape != baseline.shape:
        raise ValueError(f"higher_is_better: need one flag per task {baseline.shape}, got shape {higher.shape}")
    sign = np.where(higher, 1.0, -1.0)
    return 100.0 * np.mean(sign * (metric - baseline) / baseline, axis=-1)


def diverged_seeds(task_losses, *, diverged_at=None, test_metric=None, present=None, factor: float = 10.0,
                   window: int | None = None) -> np.ndarray:
    """(S,) bool: which seeds diverged, from their training-loss curves ``task_losses`` (S, T, K).

    A seed is flagged when

    * ``diverged_at`` (S,) is given and ``>= 0`` (the training step's non-finite detection,
      :class:`mtl_jax.training.TrainResult`), or
    * any entry of its curve or of ``test_metric`` (S, K) is not finite (a frozen run's history is NaN
      after the step that diverged), or
    * its loss exploded: for some task, the median over the last ``window`` points of the curve is
      more than ``factor`` times the median over the first ``window`` points (``window`` defaults to
      ``max(1, T // 10)``; tasks whose first-window median is not positive are not compared).

    ``present`` (S, T, K) bool: the steps at which the task had a sample in the batch (its loss is 0
    otherwise, :class:`mtl_jax.training.StepMetrics`); other steps are left out of the medians. The
    curves may be per step or binned means (the experiment's stored curves)."""
    losses = np.asarray(task_losses, float)
    if losses.ndim != 3:
        raise ValueError(f"task_losses: expected shape (S, T, K), got {losses.shape}")
    s, t, _ = losses.shape
    if not (isinstance(factor, (int, float)) and np.isfinite(factor) and factor > 1):
        raise ValueError(f"factor: must be a finite number > 1, got {factor!r}")
    if window is None:
        window = max(1, t // 10)
    if not isinstance(window, (int, np.integer)) or not 1 <= window <= t:
        raise ValueError(f"window: must be an integer in [1, {t}], got {window!r}")
    flags = ~np.all(np.isfinite(losses), axis=(1, 2))
    if diverged_at is not None:
        at = np.asarray(diverged_at).reshape(-1)
        if at.shape != (s,):
            raise ValueError(f"diverged_at: expected shape ({s},), got {np.shape(diverged_at)}")
        flags |= at >= 0
    if test_metric is not None:
        test = np.asarray(test_metric, float)
        if test.ndim < 1 or test.shape[0] != s:
            raise ValueError(f"test_metric: expected a leading seed axis of {s}, got shape {test.shape}")
        flags |= ~np.all(np.isfinite(test.reshape(s, -1)), axis=1)
    if present is not None:
        present = np.asarray(present, bool)
        if present.shape != losses.shape:
            raise ValueError(f"present: expected shape {losses.shape}, got {present.shape}")
        losses = np.where(present, losses, np.nan)
    with warnings.catch_warnings():  # an all-NaN window (task absent throughout) is simply not compared
        warnings.simplefilter("ignore", RuntimeWarning)
        first = np.nanmedian(np.where(np.isfinite(losses[:, :window]), losses[:, :window], np.nan), axis=1)
        last = np.nanmedian(np.where(np.isfinite(losses[:, -window:]), losses[:, -window:], np.nan), axis=1)
        exploded = (first > 0) & (last > factor * first)  # NaN compares False
    return flags | np.any(exploded, axis=1)


class DeltaMSummary(NamedTuple):
    """Delta m of a method's seeds against a baseline (:func:`summarise_delta_m`).

    per_seed: (S,) Delta m % of each seed (diverged ones included, as computed, possibly non-finite);
    median, mean, std: over the seeds that did not diverge (NaN if none); ``mean`` is Delta m of their
    mean metric, which equals the mean of their per-seed values; ``std`` the population standard
    deviation of those values. diverged: (S,) bool, the flags used; n_kept, n_diverged: counts."""

    per_seed: np.ndarray
    median: float
    mean: float
    std: float
    diverged: np.ndarray
    n_kept: int
    n_diverged: int


def summarise_delta_m(metric, baseline, higher_is_better, *, diverged=None, baseline_diverged=None) -> DeltaMSummary:
    """Delta m of each seed of ``metric`` (S, K) against a reference, and its median, mean and spread
    over the seeds that did not diverge.

    ``baseline``: (K,) reference metrics, or (S_b, K) the baseline's seeds, whose mean over the seeds not
    flagged by ``baseline_diverged`` (S_b,) is the reference. ``diverged`` (S,) bool flags the method's
    seeds to leave out (e.g. :func:`diverged_seeds`; None: none). Raises ValueError naming the argument
    on mismatched shapes."""
    metric = np.asarray(metric, float)
    if metric.ndim != 2:
        raise ValueError(f"metric: expected shape (S, K), got {metric.shape}")
    s = metric.shape[0]
    diverged = _flags("diverged", diverged, s)
    base = np.asarray(baseline, float)
    if base.ndim == 2:
        kept_b = ~_flags("baseline_diverged", baseline_diverged, base.shape[0])
        base = base[kept_b].mean(axis=0) if kept_b.any() else np.full(base.shape[1], np.nan)
    elif baseline_diverged is not None:
        raise ValueError("baseline_diverged: only meaningful with a (S_b, K) baseline of seeds")
    per_seed = delta_m(metric, base, higher_is_better)
    kept = ~diverged
    if kept.any():
        median = float(np.median(per_seed[kept]))
        mean = float(delta_m(metric[kept].mean(axis=0), base, higher_is_better))
        std = float(np.std(per_seed[kept]))
    else:
        median = mean = std = float("nan")
    return DeltaMSummary(per_seed=per_seed, median=median, mean=mean, std=std, diverged=diverged,
                         n_kept=int(kept.sum()), n_diverged=int(diverged.sum()))


def _flags(name: str, flags, n: int) -> np.ndarray:
    if flags is None:
        return np.zeros(n, bool)
    flags = np.asarray(flags)
    if flags.shape != (n,) or flags.dtype.kind != "b":
        raise ValueError(f"{name}: expected a bool array of shape ({n},), got {flags.dtype} {flags.shape}")
    return flags
