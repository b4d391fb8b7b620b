"""Held-out error of DMTRL against the baselines, on planted-cluster synthetic tasks and on Exam.

Methods (all on the same simulated sites, :mod:`mtl_jax.solvers.baselines` for the baselines):

* ``centralized``      certified APG on J with all data in one place (communication: all data once);
* ``dmtrl``            the distributed dual solver, joint scheme (:mod:`mtl_jax.solvers.dmtrl`);
* ``distributed_apg``  APG on J as a protocol, one round per iteration (same optimum, other rounds/bytes);
* ``minibatch_sgd``    proximal mini-batch SGD on J for a fixed number of rounds (``--sgd-rounds``);
* ``independent``      DMTRL with lam2 = 0 (per-task models), lam1 tuned on its own;
* ``fixed_identity``   DMTRL's W-step at Omega = I / m never updated (MOCHA-style, no relationships),
                       at the (lam1, lam2) selected for MTRL: what learning Omega adds at the same weights.

Data sets (``--datasets``): ``synthetic_squared``, ``synthetic_hinge``, ``synthetic_logistic`` (planted
clusters, :func:`mtl_jax.data.synthetic.make_clustered_tasks`: ``--tasks`` tasks in ``--dim`` dimensions,
3 clusters, ``--samples`` samples per task, noise 1.0, a new draw per seed; half of every task's samples
are held out) and ``exam`` (:func:`mtl_jax.data.school.load_exam`, 65 schools, 20 % of each school's pupils
held out, a new split per seed). Error: held-out mean squared error (squared loss; pooled over all test
samples) or misclassification rate (hinge, logistic; ``sign(<w_t, x>)``, 0 counts as +1).

Hyper-parameters: per seed, a validation split (a third of each task's training samples; 20 % for Exam)
and the grid lam1 in ``LAM1_GRID``, lam2 in ``LAM2_GRID`` (3 x 3; ``--quick``: 2 x 2): the centralized
solver (exact, fast) is fitted on the rest of the training data for every pair and the pair of least
validation error is kept for every coupled method (centralized, dmtrl, distributed_apg, minibatch_sgd,
fixed_identity); ``independent`` gets the lam1 of least validation error at lam2 = 0. Every method then
fits the whole training set. Iterative methods stop at a relative duality gap of J of ``--tol`` (1e-4) or
after ``--max-rounds`` rounds (10000); SGD runs exactly ``--sgd-rounds`` (200, batch 8). A gap bounds the
distance to the optimum, ``||W - W*||_F^2 <= 2 gap / lam1`` (J is lam1-strongly convex), so at a small
selected lam1 a method stopped by the cap can still predict differently from the optimum: the table gives
each method's rounds and final relative gap of J (for ``independent`` and ``fixed_identity``: the gap of
their own problem, J at lam2 = 0 and the W-problem at Omega = I/m; J's gap does not vanish for them).

Results go through the results store: one solver run per (data set, method, seed) in
``<out>/<dataset>/<method>/seed<k>/`` (its round history, ``W``, DMTRL's Omega, the held-out error and the
selected lam1/lam2 in the summary; ``mtl-jax plot --results`` draws them), plus ``results.md`` (the table),
``results.json`` (per-seed numbers) and the figures ``errors.png/.pdf`` (mean +- std over seeds per method
per data set) and ``omega.png/.pdf`` (DMTRL's Omega of seed 0 as a heat map, tasks ordered by planted
cluster; Exam by the leading eigenvector).

    mtl-jax run dmtrl_accuracy --out runs/dmtrl_accuracy                  # default: 2 data sets x 2 seeds
    mtl-jax run dmtrl_accuracy --out runs/dmtrl_accuracy --preset full    # the paper-scale run: 4 x 5 seeds
    mtl-jax run dmtrl_accuracy --out /tmp/dmtrl_accuracy --preset quick   # CI-sized
    (or python experiments/dmtrl_accuracy.py --out ... [--preset full] [--key value ...])
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from matplotlib.figure import Figure

import mtl_jax
from mtl_jax import plotting
from mtl_jax.data.io import atomic_write
from mtl_jax.data.sites import pack_sites
from mtl_jax.data.synthetic import cluster_recovery, make_clustered_tasks
from mtl_jax.runner import cells, configs, progress, store
from mtl_jax.solvers import baselines, centralized, dmtrl

DATASETS = ("synthetic_squared", "synthetic_hinge", "synthetic_logistic", "exam")
METHODS = ("centralized", "dmtrl", "distributed_apg", "minibatch_sgd", "independent", "fixed_identity")
LAM1_GRID = (1e-3, 1e-2, 1e-1)
LAM2_GRID = (1e-3, 1e-2, 1e-1)
QUICK_LAM1_GRID = (1e-2, 1e-1)
QUICK_LAM2_GRID = (1e-2, 1e-1)


# --- data --------------------------------------------------------------------------------------------------

def split_per_task(task, fraction, rng, within=None):
    """A boolean mask holding out ``round(fraction * n_t)`` samples of each task (at least one stays)."""
    pool = np.ones(len(task), bool) if within is None else within
    held = np.zeros(len(task), bool)
    for t in np.unique(task):
        idx = np.flatnonzero((task == t) & pool)
        k = min(len(idx) - 1, int(round(fraction * len(idx))))
        held[rng.choice(idx, size=k, replace=False)] = True
    return held


def load(name, seed, args):
    """``(X, y, task, loss, test mask, val mask (within train), info)`` for data set ``name`` and ``seed``."""
    rng = np.random.default_rng(1000 + seed)
    if name == "exam":
        from mtl_jax.data.school import load_exam
        X, y, task, info = load_exam()
        loss, test_frac, val_frac = "squared", 0.2, 0.2
        info = {"order": None}
    else:
        loss = name.split("_", 1)[1]
        X, y, task, info = make_clustered_tasks(args.tasks, args.dim, num_clusters=3, samples_per_task=args.samples,
                                                loss=loss, noise=1.0, seed=seed)
        test_frac, val_frac = 0.5, 1.0 / 3.0
        info = {"order": np.argsort(info["clusters"], kind="stable"), "clusters": info["clusters"]}
    test = split_per_task(task, test_frac, rng)
    val = split_per_task(task, val_frac, rng, within=~test)
    return X, y, task, loss, test, val, info


def error(W, X, y, task, loss):
    """Held-out mean squared error (squared) or misclassification rate (hinge, logistic)."""
    a = np.sum(X * W[task], axis=1)
    if loss == "squared":
        return float(np.mean((y - a) ** 2))
    return float(np.mean(np.where(a >= 0, 1.0, -1.0) != y))


# --- one data set and seed ---------------------------------------------------------------------------------

def select(X, y, task, loss, val, m, n_max, lam1_grid, lam2_grid):
    """Validation errors of centralized fits on the grid.

    Returns (best (lam1, lam2) with lam2 > 0, best lam1 at lam2 = 0, {(lam1, lam2): validation error}).
    """
    fit_rows = ~val
    sites = pack_sites(X[fit_rows], y[fit_rows], task[fit_rows], m, n_max=n_max)
    table = {}
    for lam1 in lam1_grid:
        for lam2 in (0.0, *lam2_grid):
            out = centralized.solve(sites, lam1=lam1, lam2=lam2, loss=loss, tol=1e-6)
            table[(lam1, lam2)] = error(out.W, X[val], y[val], task[val], loss)
    coupled = min((k for k in table if k[1] > 0), key=table.get)
    alone = min((k for k in table if k[1] == 0), key=table.get)[0]
    return coupled, alone, table


def run_methods(sites, lam1, lam2, lam1_alone, loss, args):
    """{method: SolveOutput} on the training sites."""
    common = dict(loss=loss, tol=args.tol)
    return {
        "centralized": centralized.solve(sites, lam1=lam1, lam2=lam2, **common),
        "dmtrl": dmtrl.solve(sites, lam1=lam1, lam2=lam2, max_iter=args.max_rounds, **common),
        "distributed_apg": baselines.distributed_apg(sites, lam1=lam1, lam2=lam2, max_rounds=args.max_rounds,
                                                     **common),
        "minibatch_sgd": baselines.minibatch_sgd(sites, lam1=lam1, lam2=lam2, loss=loss, rounds=args.sgd_rounds,
                                                 batch=args.sgd_batch, seed=args.sgd_seed),
        "independent": baselines.independent(sites, lam1=lam1_alone, max_rounds=args.max_rounds, **common),
        "fixed_identity": baselines.fixed_identity(sites, lam1=lam1, lam2=lam2, max_rounds=args.max_rounds,
                                                   **common),
    }


def communication(name, out, sites):
    """(rounds, bytes, simulated seconds) of a solve; centralized: all data shipped once, no rounds."""
    if name == "centralized":
        return 0, baselines.centralize_bytes(sites), float("nan")
    last = out.history[-1]
    return int(last.round), int(last.bytes), float(last.sim_seconds)


def one_seed(name, seed, args, grids, env, started):
    X, y, task, loss, test, val, info = load(name, seed, args)
    # A finished (data set, seed) cell -- every method's run folder with this key -- is read back.
    settings = {k: v for k, v in configs.to_dict(args).items() if k not in ("out", "compile_cache", "seeds",
                                                                            "datasets")}
    key = cells.cell_key(dataset=name, seed=seed, grids=grids, settings=settings)
    runs = {method: cells.finished(os.path.join(args.out, name, method, f"seed{seed}"), key) for method in METHODS}
    if all(run is not None for run in runs.values()):
        rows = {method: {k: (np.nan if v is None else v) for k, v in run.summary.items()}
                for method, run in runs.items()}
        return rows, runs["dmtrl"].arrays["Omega"], info
    m = int(task.max()) + 1
    train = ~test
    n_max = int(np.bincount(task[train], minlength=m).max())  # selection fits share the final fits' program
    (lam1, lam2), lam1_alone, table = select(X[train], y[train], task[train], loss, val[train], m, n_max, *grids)
    sites = pack_sites(X[train], y[train], task[train], m, n_max=n_max)
    outs = run_methods(sites, lam1, lam2, lam1_alone, loss, args)
    rows = {}
    for method, out in outs.items():
        err = error(out.W, X[test], y[test], task[test], loss)
        rounds, nbytes, sim = communication(method, out, sites)
        lams = (lam1_alone, 0.0) if method == "independent" else (lam1, lam2)
        Omega = np.asarray(mtl_jax.mtrl.SpectralMatrix(*out.omega).dense())
        last = out.history[-1]
        own = method == "fixed_identity"  # certified on its own W-problem
        gap, value = (last.gap_w, last.primal) if own else (out.gap, out.objective)
        row = dict(error=err, rounds=rounds, bytes=nbytes, sim_seconds=sim, objective=out.objective,
                   relative_gap=gap / max(abs(value), 1e-300),
                   J_relative_gap=out.gap / max(abs(out.objective), 1e-300),
                   converged=bool(out.converged),
                   lam1=lams[0], lam2=lams[1], seconds=out.solve_seconds, compile_seconds=out.compile_seconds)
        if "clusters" in info:
            row["cluster_recovery"] = cluster_recovery(Omega, info["clusters"])
        rows[method] = row
        config = {"experiment": "dmtrl_accuracy", "dataset": name, "method": method, "seed": seed, "loss": loss,
                  "lam1": lams[0], "lam2": lams[1], "tol": args.tol, "max_rounds": args.max_rounds,
                  "num_tasks": m, "dim": int(X.shape[1]), "train": int(train.sum()), "test": int(test.sum()),
                  "validation": {"lam1_grid": list(grids[0]), "lam2_grid": list(grids[1]),
                                 "errors": [[k[0], k[1], v] for k, v in table.items()]}, "cell": key}
        if method == "minibatch_sgd":
            config.update(rounds=args.sgd_rounds, batch=args.sgd_batch, sgd_seed=args.sgd_seed)
        arrays = {"W": out.W, "test_mask": test}
        if method in ("dmtrl", "centralized"):
            arrays["Omega"] = Omega
        store.write_run(os.path.join(args.out, name, method, f"seed{seed}"), kind="solver", config=config,
                        history=[r._asdict() for r in out.history], arrays=arrays, summary=row,
                        started=started, environment_info=env)
    omega = np.asarray(mtl_jax.mtrl.SpectralMatrix(*outs["dmtrl"].omega).dense())
    return rows, omega, info


# --- report ------------------------------------------------------------------------------------------------

def _mean_or_dash(values):
    values = np.asarray(values, float)
    return "-" if np.all(np.isnan(values)) else f"{np.nanmean(values):.2f}"


def table_lines(results, seeds):
    lines = [f"Held-out error, mean +- std over {len(seeds)} seeds (seeds {seeds[0]}..{seeds[-1]}); rounds, MB and "
             "simulated seconds (DMTRL's cost model) are means, the relative gap the median; centralized ships all "
             "data once.", ""]
    for name, per_seed in results.items():
        metric = "MSE" if name in ("synthetic_squared", "exam") else "misclassification"
        lines += [f"### {name} ({metric})", "",
                  "| method | error | rounds | MB | sim s | rel. gap (own problem) | lam1 | lam2 | Omega recovery |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            rows = [s[method] for s in per_seed]
            e = np.array([r["error"] for r in rows])
            rec = [r.get("cluster_recovery") for r in rows]
            rec = "" if rec[0] is None or method not in ("dmtrl", "centralized") else f"{np.mean(rec):.2f}"
            lam1 = sorted({r["lam1"] for r in rows})
            lam2 = sorted({r["lam2"] for r in rows})
            lines.append(
                f"| {method} | {e.mean():.4f} +- {e.std():.4f} | {np.mean([r['rounds'] for r in rows]):.0f} | "
                f"{np.mean([r['bytes'] for r in rows]) / 1e6:.3f} | "
                f"{_mean_or_dash([r['sim_seconds'] for r in rows])} | "
                f"{np.median([r['relative_gap'] for r in rows]):.1e} | {','.join(f'{v:g}' for v in lam1)} | "
                f"{','.join(f'{v:g}' for v in lam2)} | {rec} |")
        lines.append("")
    return lines


@plotting.styled
def error_figure(results):
    names = list(results)
    fig = Figure(figsize=(min(plotting.PAGE, plotting.COLUMN * len(names)), 2.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names):
        errs = np.array([[s[mth]["error"] for mth in METHODS] for s in results[name]])  # (seeds, methods)
        x = np.arange(len(METHODS))
        means, stds = errs.mean(0), errs.std(0)
        outlier = means > 2.5 * np.median(means)  # drawn at the top edge and labelled with its value
        top = errs[:, ~outlier].max()
        lo = errs.min()
        pad = 0.15 * (top - lo + 1e-12)
        for i in x:
            shown = top + 0.5 * pad if outlier[i] else means[i]
            ax.errorbar(i, shown, yerr=None if outlier[i] else stds[i], fmt="o", color=f"C{i}", capsize=4,
                        markersize=7)
            seeds = np.minimum(errs[:, i], top + 0.5 * pad) if outlier[i] else errs[:, i]
            ax.plot(i + np.linspace(-0.15, 0.15, errs.shape[0]), seeds, "k.", markersize=3)
            if outlier[i]:
                ax.annotate(f"{means[i]:.3g} +- {stds[i]:.2g}", (i, top + 0.5 * pad), ha="right", va="top",
                            fontsize="x-small", xytext=(-6, -4), textcoords="offset points")
        ax.set_ylim(max(0.0, lo - pad), top + pad)
        ax.set_xticks(x, METHODS, rotation=40, ha="right", fontsize="small")
        ax.set_title(name, fontsize="medium")
        ax.set_ylabel("held-out MSE" if name in ("synthetic_squared", "exam") else "held-out misclassification")
        ax.grid(True, axis="y", alpha=0.3)
    return fig


@plotting.styled
def omega_figure(omegas):
    fig = Figure(figsize=(min(plotting.PAGE, plotting.COLUMN * len(omegas)), 2.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(omegas)))
    for ax, (name, (Omega, order)) in zip(axes, omegas.items()):
        if order is None:  # no planted clusters: the leading eigenvector orders the tasks
            order = np.argsort(np.linalg.eigh(Omega)[1][:, -1])
        plotting.plot_omega(Omega, ax=ax, order=np.asarray(order),
                            title=f"{name}: DMTRL Omega" + (" (by planted cluster)" if name != "exam" else ""))
    return fig


DESCRIPTION = "held-out error of DMTRL vs centralized, distributed APG, SGD, independent, fixed Omega (per seed)"


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's settings (``mtl-jax run dmtrl_accuracy --help``)."""

    out: str = configs.field("runs/dmtrl_accuracy", "output folder")
    datasets: str = configs.field("synthetic_squared,exam", f"comma list of {', '.join(DATASETS)}")
    seeds: int = configs.field(2, "seeds 0..seeds-1 (new data or split per seed)")
    tasks: int = configs.field(30, "synthetic: number of tasks")
    dim: int = configs.field(20, "synthetic: dimension")
    samples: int = configs.field(60, "synthetic: samples per task (half held out)")
    tol: float = configs.field(1e-4, "relative duality gap at which solvers stop")
    max_rounds: int = configs.field(10000, "rounds at most per iterative method")
    sgd_rounds: int = configs.field(200, "rounds of mini-batch SGD")
    sgd_batch: int = configs.field(8, "SGD batch per task")
    sgd_seed: int = configs.field(0, "SGD sampling seed")
    small_grid: bool = configs.field(False, "2 x 2 lam grid instead of 3 x 3")
    compile_cache: bool = configs.field(True, "use the persistent compilation cache")


PRESETS = {
    "full": {"datasets": ",".join(DATASETS), "seeds": 5},
    "quick": {"datasets": "synthetic_squared", "seeds": 2, "tasks": 10, "dim": 8, "samples": 30, "max_rounds": 1000,
              "sgd_rounds": 50, "small_grid": True},
}


def main(argv=None):
    """``python experiments/dmtrl_accuracy.py [--key value ...] [--preset full|quick]``."""
    return configs.script_main(sys.modules[__name__], argv)


def run(args: Config, log=print) -> int:
    """Run the experiment with ``args`` (a :class:`Config`); everything goes under ``args.out``."""
    configs.prepare(args)
    grids = (QUICK_LAM1_GRID, QUICK_LAM2_GRID) if args.small_grid else (LAM1_GRID, LAM2_GRID)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise ValueError(f"datasets: unknown {unknown}; choose from {DATASETS}")
    os.makedirs(args.out, exist_ok=True)
    started, env, t0 = store.now(), store.environment(), time.perf_counter()
    seeds = list(range(args.seeds))
    results, omegas = {}, {}
    with progress.bar(len(names) * len(seeds), "dmtrl_accuracy cells") as update:
        for name in names:
            results[name] = []
            for seed in seeds:
                rows, omega, info = one_seed(name, seed, args, grids, env, started)
                results[name].append(rows)
                if seed == 0:
                    omegas[name] = (omega, info["order"])
                log(f"{name} seed {seed}: " + ", ".join(f"{k} {v['error']:.4f}" for k, v in rows.items())
                    + f"  ({time.perf_counter() - t0:.0f} s)")
                update(sum(map(len, results.values())), data=name, seed=seed)
    lines = table_lines(results, seeds)
    text = "\n".join(lines)
    log("\n" + text)
    with atomic_write(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with atomic_write(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(store.jsonable({"config": configs.to_dict(args), "lam1_grid": grids[0], "lam2_grid": grids[1],
                                  "seeds": seeds, "results": results, "environment": env,
                                  "seconds": time.perf_counter() - t0}), f, indent=1, allow_nan=False)
    for stem, fig_fn, arg in (("errors", error_figure, results), ("omega", omega_figure, omegas)):
        for ext in ("png", "pdf"):
            plotting.save_figure(fig_fn(arg), os.path.join(args.out, f"{stem}.{ext}"))
    log(f"\nwrote {args.out}/results.md, results.json, errors.png/.pdf, omega.png/.pdf and "
        f"{len(names) * len(seeds) * len(METHODS)} runs ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
