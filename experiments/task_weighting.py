"""Loss-driven task weighting on three deep multi-task problems: every scheme, several seeds, Delta m.

For every scheme of :data:`mtl_jax.weighting.SCHEMES` and every dataset

* ``multi_digits``           two overlaid 8x8 digits, two 10-class tasks, small CNN (metric: accuracy);
* ``imbalanced_regression``  GradNorm-style regression, 10 tasks whose scales differ 100x, MLP (MSE);
* ``school_multihead``       the Exam data, one regression head per school gender, MLP (MSE);

one :func:`~mtl_jax.training.train_seeds` call trains all seeds as one vmapped program. The single-task
baselines are K runs with constant one-hot weights (:func:`mtl_jax.weighting.fixed`), also one vmapped
program per dataset. Written to the output folder:

* ``results.md``: one markdown table per dataset (per-task test metric, mean +- std over the seeds that
  did not diverge; Delta m % against equal weighting and against the single-task baselines, median and
  mean +- std over those seeds, :func:`mtl_jax.metrics.summarise_delta_m`; the number of diverged seeds,
  :func:`mtl_jax.metrics.diverged_seeds`);
* ``results.json``: the same numbers, per seed too, and the configuration;
* ``<dataset>_curves.png``: task losses and task weights over training, per scheme;
* ``cells/<dataset>/<scheme>/``: one finished (scheme, dataset) cell, a run folder of the results
  store (docs/results.md: manifest, per-seed training curves in history.jsonl, arrays); ``mtl-jax plot
  --results OUT`` draws them. A rerun with the same configuration skips finished cells (``--overwrite``
  recomputes them).

Delta m (Maninis et al. CVPR 2019; Liu et al. CVPR 2019), higher is better::

    Delta_m = (100 / K) sum_k (-1)^{l_k} (M_k - M_base,k) / M_base,k,   l_k = 1 if lower M_k is better.

    python experiments/task_weighting.py --out runs/task_weighting          # full run (~6 min on 2 CPU cores)
    python experiments/task_weighting.py --quick --out /tmp/tw_quick        # seconds
"""
from __future__ import annotations

import argparse
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
from mtl_jax.data.io import atomic_write
from mtl_jax.metrics import delta_m as delta_m  # re-exported: Delta m of a (..., K) metric against (K,)
from mtl_jax.metrics import diverged_seeds, summarise_delta_m
from mtl_jax.runner import store
from mtl_jax.training import TrainConfig, make_run, to_device, train_seeds

FORMAT = 3            # bump when a cell's content or meaning changes (old cells are then recomputed)
BASELINE = "equal"
SINGLE_TASK = "single_task"
CURVE_BINS = 100      # training curves are stored as means over this many windows of steps
SCHEME_KWARGS = {
    # Scale-free variant: raw losses would make the softmax follow the 100x target scales of the
    # imbalanced regression (all weight on the largest task). Every other scheme uses its defaults.
    "huq_pervin": {"mode": "relative"},
}


class Setup(NamedTuple):
    """One dataset of the experiment: its generator, the generator's arguments and the training config."""

    make: Callable[..., deep.MultiTaskDataset]
    data_kwargs: dict
    config: TrainConfig


def setups(quick: bool = False) -> dict[str, Setup]:
    """The datasets, their sizes and hyper-parameters (``quick``: tiny, for tests and smoke runs)."""
    if quick:
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
        }
    return {
        "multi_digits": Setup(deep.multi_digits, dict(n_train=2000, n_test=500, seed=0),
                              TrainConfig(model="cnn", features=(8, 16), hidden=(64,), steps=500,
                                          batch_size=64, learning_rate=2e-3)),
        "imbalanced_regression": Setup(deep.imbalanced_regression,
                                       dict(n_train=2000, n_test=500, in_dim=50, out_dim=20, seed=0),
                                       TrainConfig(model="mlp", hidden=(128, 128), steps=1500, batch_size=64,
                                                   learning_rate=1e-2)),
        "school_multihead": Setup(deep.school_multihead, dict(seed=0),
                                  TrainConfig(model="mlp", hidden=(32, 32), steps=2000, batch_size=96,
                                              stratify=True, learning_rate=3e-3)),
    }


DATASETS = tuple(setups())


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


def run_cell(setup: Setup, data: deep.MultiTaskDataset, scheme: str, seeds) -> dict[str, np.ndarray]:
    """Train one (scheme, dataset) cell for all seeds; the arrays stored in its cell file.

    ``metric`` (S, K) test metric per seed; ``task_losses``/``weights`` (S, B, K) binned curves and
    ``curve_x`` (B,); ``diverged`` (S,) bool, the seeds whose training diverged
    (:func:`mtl_jax.metrics.diverged_seeds` on the per-step losses; for the single-task baselines, seed s
    is flagged if any of its K runs diverged on its own task); ``seconds`` wall time of the call,
    compilation included."""
    t0 = time.perf_counter()
    if scheme == SINGLE_TASK:
        k = len(data.spec.kinds)
        history, test = train_fixed_weights(setup.config, data, seeds, np.eye(k))
        history, test = jax.block_until_ready((history, test))
        metric_all = task_metric(test, data.spec.kinds)             # (K runs, S, K tasks)
        metric = np.stack([metric_all[i, :, i] for i in range(k)], axis=1)  # task i from run i
        # Curves: task i's loss and weight from the run trained on task i.
        losses = np.stack([np.asarray(history.task_losses)[i, :, :, i] for i in range(k)], axis=-1)
        weights = np.stack([np.asarray(history.weights)[i, :, :, i] for i in range(k)], axis=-1)
        present = np.stack([np.asarray(history.present)[i, :, :, i] for i in range(k)], axis=-1)
        diverged = diverged_seeds(losses, test_metric=metric, present=present)
    else:
        config = dataclasses.replace(setup.config, scheme=scheme, scheme_kwargs=SCHEME_KWARGS.get(scheme, {}))
        result = jax.block_until_ready(train_seeds(config, data, seeds))
        metric = task_metric(result.test, data.spec.kinds)
        losses, weights = np.asarray(result.history.task_losses), np.asarray(result.history.weights)
        diverged = diverged_seeds(losses, diverged_at=result.diverged_at, test_metric=metric,
                                  present=result.history.present)
    seconds = time.perf_counter() - t0
    losses, curve_x = bin_curve(losses)
    weights, _ = bin_curve(weights)
    return dict(metric=metric, task_losses=losses, weights=weights, curve_x=curve_x, diverged=diverged,
                seconds=np.float64(seconds))


# ----------------------------------------------------------------------------- cells on disk (resume)


def fingerprint(dataset: str, setup: Setup, scheme: str, seeds) -> str:
    """A JSON string of everything that defines a cell; a stored cell is reused only if it matches."""
    config = dataclasses.asdict(setup.config)
    if scheme != SINGLE_TASK:
        config.update(scheme=scheme, scheme_kwargs=sorted(SCHEME_KWARGS.get(scheme, {}).items()))
    return json.dumps(dict(format=FORMAT, dataset=dataset, data_kwargs=setup.data_kwargs, config=config,
                           scheme=scheme, seeds=[int(s) for s in seeds]), sort_keys=True, default=str)


def cell_path(out: str, dataset: str, scheme: str) -> str:
    """The run folder of one (dataset, scheme) cell."""
    return os.path.join(out, "cells", dataset, scheme)


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
    return {**run.arrays, "seconds": np.float64(run.summary.get("seconds", np.nan))}


CELL_ARRAYS = {"metric", "task_losses", "weights", "curve_x", "diverged"}


def save_cell(path: str, cell: dict, *, dataset: str, scheme: str, expected: str, spec: deep.TaskSpec,
              seeds, started: str) -> None:
    """Store a finished cell as a weighting run: the binned curves per seed as history, the arrays, the
    fingerprint in the config (a rerun reuses the cell only if it matches)."""
    config = {"experiment": "task_weighting", "dataset": dataset, "scheme": scheme, "tasks": list(spec.names),
              "seeds": [int(s) for s in seeds], "fingerprint": expected}
    metric = np.asarray(cell["metric"], float)
    summary = {"seconds": float(cell["seconds"]), "metric_mean": metric.mean(axis=0), "metric_std": metric.std(axis=0),
               "diverged_seeds": [int(s) for s, d in zip(seeds, cell["diverged"]) if d]}
    store.write_run(path, kind="weighting", config=config, summary=summary, started=started,
                    history=store.curve_records(cell["task_losses"], cell["weights"], cell["curve_x"]),
                    arrays={k: cell[k] for k in CELL_ARRAYS})


def get_cell(out, dataset, setup, data, scheme, seeds, overwrite, log) -> tuple[dict, bool]:
    """A cell's arrays, from disk when finished with the same configuration, else trained and stored
    atomically. Returns ``(arrays, computed)``."""
    path = cell_path(out, dataset, scheme)
    expected = fingerprint(dataset, setup, scheme, seeds)
    if not overwrite:
        cell = load_cell(path, expected)
        if cell is not None:
            log(f"  {dataset:22s} {scheme:12s} done (stored)")
            return cell, False
    started = store.now()
    cell = run_cell(setup, data, scheme, seeds)
    save_cell(path, cell, dataset=dataset, scheme=scheme, expected=expected, spec=data.spec, seeds=seeds,
              started=started)
    log(f"  {dataset:22s} {scheme:12s} {float(cell['seconds']):6.1f} s")
    return cell, True


# ----------------------------------------------------------------------------- summary, table, figure


def summarise(cells: dict[str, dict], spec: deep.TaskSpec) -> dict[str, Any]:
    """Per-run mean/std of the metric over the seeds that did not diverge, and Delta m against equal
    weighting and the single-task baselines (:func:`mtl_jax.metrics.summarise_delta_m`: the baseline's
    mean over its non-diverged seeds is the reference; median, mean and std over the run's non-diverged
    seeds; ``diverged`` lists the flags, per seed)."""
    metric_names, higher = metric_info(spec.kinds)
    rows = {}
    for name, cell in cells.items():
        metric, diverged = np.asarray(cell["metric"], float), np.asarray(cell["diverged"], bool)
        kept = metric[~diverged] if (~diverged).any() else np.full((1, metric.shape[1]), np.nan)
        row = dict(mean=kept.mean(axis=0).tolist(), std=kept.std(axis=0).tolist(), per_seed=metric.tolist(),
                   diverged=diverged.tolist(), n_diverged=int(diverged.sum()), seconds=float(cell["seconds"]))
        for key, ref in (("delta_m_equal", BASELINE), ("delta_m_single_task", SINGLE_TASK)):
            summary = summarise_delta_m(metric, cells[ref]["metric"], higher, diverged=diverged,
                                        baseline_diverged=np.asarray(cells[ref]["diverged"], bool))
            row[key] = summary.mean
            row[key + "_std"] = summary.std
            row[key + "_median"] = summary.median
            row[key + "_per_seed"] = summary.per_seed.tolist()
        rows[name] = row
    return dict(tasks=list(spec.names), metrics=metric_names, higher_is_better=higher.tolist(), runs=rows)


def _fmt(mean: float, std: float, metric: str) -> str:
    return f"{mean:.3f} ± {std:.3f}" if metric == "accuracy" else f"{mean:.4g} ± {std:.2g}"


def markdown_table(dataset: str, summary: dict, setup: Setup, seeds) -> str:
    """One dataset's results as a markdown section."""
    c = setup.config
    model = f"CNN features {c.features}, dense {c.hidden[-1]}" if c.model == "cnn" else f"MLP {c.hidden}"
    arrows = ["↑" if h else "↓" for h in summary["higher_is_better"]]
    lines = [
        f"### {dataset}",
        "",
        f"{model}; Adam lr {c.learning_rate:g}, {c.steps} steps, batch {c.batch_size}"
        f"{' (stratified by task)' if c.stratify else ''}; data {setup.data_kwargs}; {len(seeds)} seeds. "
        f"Test metric per task, mean ± std over the seeds that did not diverge. Δm % (higher is better) "
        f"against equal weighting and against the single-task baselines (their mean over non-diverged "
        f"seeds): median; mean ± std over the non-diverged seeds. Diverged: seeds with a non-finite or "
        f"exploding (10x) training loss, left out.",
        "",
        "| run | " + " | ".join(f"{t} {m} {a}" for t, m, a in zip(summary["tasks"], summary["metrics"], arrows))
        + " | Δm vs equal % (median; mean ± std) | Δm vs single-task % (median; mean ± std) | diverged | seconds |",
        "|---|" + "---|" * (len(summary["tasks"]) + 4),
    ]
    for name, row in summary["runs"].items():
        cells = [_fmt(m, s, metric) for m, s, metric in zip(row["mean"], row["std"], summary["metrics"])]
        dm = [f"{row[k + '_median']:+.2f}; {row[k]:+.2f} ± {row[k + '_std']:.2f}"
              for k in ("delta_m_equal", "delta_m_single_task")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {dm[0]} | {dm[1]}"
                     + f" | {row['n_diverged']}/{len(row['diverged'])} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def curves_figure(cells: dict[str, dict], spec: deep.TaskSpec, path: str, dpi: int = 80) -> str:
    """Task losses and weights over training for each scheme (single-task runs excluded), as a PNG."""
    curves = {name: dict(task_losses=c["task_losses"], weights=c["weights"])
              for name, c in cells.items() if name != SINGLE_TASK}
    x = next(iter(cells.values()))["curve_x"]
    axes = plotting.plot_task_curves(curves, x=x, task_names=spec.names)
    return plotting.save_figure(axes[0, 0].figure, path, dpi=dpi)


# ----------------------------------------------------------------------------- command line


def _names(text: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if text is None:
        return allowed
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ValueError(f"{what}: unknown or empty {unknown or text!r}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(names))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/task_weighting", help="output folder (default runs/task_weighting)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..n-1 (default 5; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps for every dataset "
                        "(default per dataset: multi_digits 500, imbalanced_regression 1500, school_multihead 2000)")
    parser.add_argument("--datasets", default=None, help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--schemes", default=None, help=f"comma-separated subset of {','.join(weighting.SCHEMES)} "
                        f"('{BASELINE}' is always run: it is the Delta m baseline)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 20 steps, 2 seeds (seconds)")
    parser.add_argument("--overwrite", action="store_true", help="recompute finished cells")
    parser.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
    return parser.parse_args(argv)


def main(argv=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the experiment; returns ``{"computed": [...], "skipped": [...], "results": {...}}`` where the
    lists name the (dataset, scheme) cells trained now and those reused from disk."""
    args = parse_args(argv)
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if n_seeds < 1:
        raise ValueError(f"--seeds: must be >= 1, got {n_seeds}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {args.steps}")
    datasets = _names(args.datasets, DATASETS, "--datasets")
    schemes = _names(args.schemes, weighting.SCHEMES, "--schemes")
    schemes = (BASELINE,) + tuple(s for s in schemes if s != BASELINE)
    seeds = list(range(n_seeds))
    if not args.no_compile_cache:
        enable_compilation_cache()
    os.makedirs(args.out, exist_ok=True)

    all_setups = setups(args.quick)
    computed, skipped, results, sections, figures = [], [], {}, [], {}
    for dataset in datasets:
        setup = all_setups[dataset]
        if args.steps is not None:
            setup = setup._replace(config=dataclasses.replace(setup.config, steps=args.steps))
        data = setup.make(**setup.data_kwargs)
        cells = {}
        for scheme in (SINGLE_TASK,) + schemes:
            cells[scheme], fresh = get_cell(args.out, dataset, setup, data, scheme, seeds, args.overwrite, log)
            (computed if fresh else skipped).append((dataset, scheme))
        results[dataset] = summarise(cells, data.spec)
        results[dataset]["config"] = dict(data_kwargs=setup.data_kwargs, train=dataclasses.asdict(setup.config))
        sections.append(markdown_table(dataset, results[dataset], setup, seeds))
        figures[dataset] = curves_figure(cells, data.spec, os.path.join(args.out, f"{dataset}_curves.png"))

    header = (f"# Task weighting: results\n\nGenerated {datetime.date.today().isoformat()} by "
              f"`python experiments/task_weighting.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f" (jax {jax.__version__}, {jax.devices()[0].platform}). Scheme arguments: library defaults, "
              f"except {SCHEME_KWARGS}.\n\n")
    with atomic_write(os.path.join(args.out, "results.md"), "w") as f:
        f.write(header + "\n".join(sections))
    payload = dict(seeds=seeds, quick=args.quick, scheme_kwargs=SCHEME_KWARGS, datasets=results, figures=figures)
    with atomic_write(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=1)
    log(f"wrote {os.path.join(args.out, 'results.md')} ({len(computed)} cells trained, {len(skipped)} reused)")
    return dict(computed=computed, skipped=skipped, results=results)


if __name__ == "__main__":
    main()
