"""The School experiment of the MTRL papers, end to end: fit, certify, compare, plot.

Loads mlmRev's ``Exam`` (4059 pupils, 65 schools, one task per school, offline), fits MTRL with the
fast certified solver, with the classic alternation and with the distributed solver DMTRL (every school
a site that keeps its pupils; docs/dmtrl.md), prints a result table (markdown) and writes

* ``convergence.png``: relative sub-optimality and duality gap per iteration and per second;
* ``omega.png``: the learned task covariance, schools ordered by their leading eigenvector;
* ``results.md``: the table; ``apg/``, ``alternating/`` and ``dmtrl/`` the fits as run folders of the
  results store (docs/results.md), which ``mtl-jax plot --results runs/school`` renders.

    mtl-jax run school_convergence --out runs/school
    python experiments/school_convergence.py --out runs/school     # the same
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

import mtl_jax
from mtl_jax import plotting
from mtl_jax.data.io import atomic_write
from mtl_jax.data.school import load_exam
from mtl_jax.runner import cells, configs, store


def held_out_r2(W, X, y, task, test):
    """Explained variance of the task models on held-out pupils."""
    pred = np.sum(X[test] * W[task[test]], axis=1)
    return 1.0 - np.mean((y[test] - pred) ** 2) / np.var(y[test])


DESCRIPTION = "the main job: MTRL on Exam (65 schools) with APG, the classic alternation and DMTRL; table and plots"


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's settings (``mtl-jax run school_convergence --help``)."""

    out: str = configs.field("runs/school", "output folder")
    lam1: float = configs.field(0.1, "ridge weight lam1")
    lam2: float = configs.field(1.0, "task-coupling weight lam2")
    alternations: int = configs.field(100, "alternations of the classic scheme")
    rounds: int = configs.field(1000, "communication rounds of DMTRL at most")
    seed: int = configs.field(0, "seed of the train/test split")
    compile_cache: bool = configs.field(True, "use the persistent compilation cache")


PRESETS = {
    "full": {},  # the defaults are the papers' setting
    "quick": {"alternations": 3, "rounds": 400},
}


def main(argv=None):
    """``python experiments/school_convergence.py [--key value ...] [--preset full|quick]``."""
    return configs.script_main(sys.modules[__name__], argv)


def run(args: Config) -> int:
    """Run the experiment with ``args`` (a :class:`Config`); everything goes under ``args.out``."""
    configs.prepare(args)
    os.makedirs(args.out, exist_ok=True)
    started = store.now()
    env = store.environment()

    X, y, task, info = load_exam()
    # Hold out 20 % of each school's pupils (at least one stays in training).
    rng = np.random.default_rng(args.seed)
    test = np.zeros(len(y), bool)
    for t in np.unique(task):
        idx = np.flatnonzero(task == t)
        k = min(len(idx) - 1, int(round(0.2 * len(idx))))
        test[rng.choice(idx, size=k, replace=False)] = True
    train = ~test

    runs = {
        "fast (APG, certified)": dict(method="apg", tol=1e-9),
        "alternating (classic MTRL)": dict(method="alternating", tol=1e-9, max_iter=args.alternations),
        "DMTRL (distributed, 1 pass per round)": dict(solver="dmtrl", tol=1e-9, max_iter=args.rounds),
    }
    results = {}
    for label, kw in runs.items():
        path = os.path.join(args.out, kw.get("method", kw.get("solver")))
        key = cells.cell_key(split_seed=args.seed, lam1=args.lam1, lam2=args.lam2, fit=kw)
        res = cells.load_fit(path, key)  # a finished fit of the same settings is read back (resume)
        fresh = res is None
        if fresh:
            res = mtl_jax.fit(X[train], y[train], task[train], lam1=args.lam1, lam2=args.lam2, **kw)
        results[label] = res
        r2 = held_out_r2(res.W, X, y, task, test)
        config = {"experiment": "school_convergence", "label": label, "data": {"name": "Exam", "split_seed": args.seed,
                  "features": list(info["feature_names"]), "train": int(train.sum()), "test": int(test.sum())},
                  "fit": res.config, "cell": key}
        if fresh:
            store.write_fit(path, res, config=config, summary={"held_out_r2": r2}, arrays={"test_mask": test},
                            started=started, environment_info=env)

    best = max(r.objective - r.gap for r in results.values())  # the best certified lower bound on min J
    lines = [
        f"School (Exam): m = 65 tasks, d = {X.shape[1]} ({', '.join(info['feature_names'])}), "
        f"{train.sum()} training / {test.sum()} held-out pupils; lam1 = {args.lam1}, lam2 = {args.lam2}, squared loss",
        "",
        "| solver | iterations / rounds | J(W) | (J - J*) / J* | relative duality gap | solve s | compile s | "
        "MB sent | held-out R^2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r.iterations} | {r.objective:.8f} | {(r.objective - best) / best:.2e} | "
            f"{r.relative_gap:.2e} | {r.solve_seconds:.3f} | {r.compile_seconds:.2f} | "
            f"{r.history[-1].bytes / 1e6:.2f} | {held_out_r2(r.W, X, y, task, test):.4f} |")
    table = "\n".join(lines)
    print(table)
    with atomic_write(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")

    histories = {label: r.history_arrays() for label, r in results.items()}
    fig = plotting.plot_convergence(histories, x="round")[0].figure  # against a certified lower bound on J*
    plotting.save_figure(fig, os.path.join(args.out, "convergence.png"))
    fast = results["fast (APG, certified)"]
    order = np.argsort(np.linalg.eigh(fast.Omega)[1][:, -1])
    fig = plotting.plot_omega(fast.Omega, order=order, title="Exam: learned task covariance Omega").figure
    plotting.save_figure(fig, os.path.join(args.out, "omega.png"))
    print(f"\nwrote {args.out}/convergence.png, {args.out}/omega.png, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
