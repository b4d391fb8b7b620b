"""DMTRL, the distributed dual solver of MTRL, end to end: how fast its certificate closes, per round, per byte,
per simulated second.

On synthetic clustered tasks (squared, hinge and logistic loss) and on mlmRev's ``Exam`` (65 schools, squared
loss), with lam1 = 0.1 and lam2 = 1 by default, it runs ``mtl_jax.fit(solver="dmtrl")`` in four groups of
variants:

* ``schemes``: the joint scheme (rounds on the dual of J) against the paper's alternating scheme (rounds on
  the W-problem at a fixed Omega, Omega-steps in between; q rule "auto");
* ``q_rules``: the alternating scheme with each rule for the local curvature q_t ("lambda_max",
  "gershgorin", "paper", "factored");
* ``local_passes``: 1, 5 and 20 SDCA passes per round, for both schemes;
* ``systems``: the joint scheme under stragglers (30 % of the sites make a tenth of their effort), dropout
  (20 % of the updates lost), both with a random effort in [0.5, 1]; three seeds each.

The reference optimum J* of each problem comes from the centralized solver (``tol=1e-12``). Every run is
written through the results store (``<out>/<dataset>/<variant>``, docs/results.md, so
``mtl-jax plot --results <out>/exam --x bytes`` renders any subset); the figures (PNG and PDF) show the
relative sub-optimality (J - J*)/J* and the relative duality gap against rounds, bytes communicated and
simulated seconds (cost model: 10^6 coordinate steps per second per site, 50 ms latency, 12.5 MB/s);
``results.md`` holds the summary table: rounds to a relative gap of 1e-4 and 1e-6 per variant and where the
alternating scheme stalls.

    mtl-jax run dmtrl_convergence --out runs/dmtrl_convergence                 # synthetic squared only
    mtl-jax run dmtrl_convergence --out runs/dmtrl_convergence --preset full   # all four problems, a few minutes
    mtl-jax run dmtrl_convergence --out runs/dmtrl_quick --preset quick        # CI-sized, ~30 s
    (or python experiments/dmtrl_convergence.py --out ... [--preset full] [--key value ...])
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

import jax
import numpy as np

import mtl_jax
from mtl_jax import plotting
from mtl_jax.data.io import atomic_write
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.runner import cells, configs, progress, store

Q_RULES = ("lambda_max", "gershgorin", "paper", "factored")
PASSES = (1, 5, 20)
TARGETS = (1e-4, 1e-6)
AXES = ("round", "bytes", "sim_seconds")
#: The systems variants (joint scheme): name -> options; each runs with every seed.
SYSTEMS = {
    "ideal": {},
    "stragglers 30%": dict(straggler_prob=0.3, straggler_effort=0.1, min_effort=0.5),
    "dropout 20%": dict(dropout_prob=0.2, min_effort=0.5),
    "stragglers+dropout": dict(straggler_prob=0.3, straggler_effort=0.1, dropout_prob=0.2, min_effort=0.5),
}


def datasets(quick: bool, names):
    """``{name: (X, y, task, loss, description)}`` of the problems to run."""
    out = {}
    m, d, n = (8, 5, (20, 40)) if quick else (30, 10, (30, 90))
    for loss in ("squared", "hinge", "logistic"):
        name = f"synthetic_{loss}"
        if names and name not in names:
            continue
        X, y, task, _ = make_clustered_tasks(m, d, samples_per_task=n, loss=loss, seed=0)
        out[name] = (X, y, task, loss, f"make_clustered_tasks({m}, {d}, samples_per_task={n}, loss={loss!r}, seed=0)")
    if names and "exam" in names:
        from mtl_jax.data.school import load_exam

        X, y, task, _ = load_exam()
        out["exam"] = (X, y, task, "squared", "Exam (mlmRev): 65 schools, 4059 pupils, d = 5 with intercept")
    return out


def variants(quick: bool):
    """``[(group, label, options, seeds)]``: every run of a data set."""
    runs = [("schemes", "joint", dict(scheme="joint"), (0,)),
            ("schemes", "alternating (q auto)", dict(scheme="alternating"), (0,))]
    if not quick:
        runs += [("q_rules", f"alternating q={q}", dict(scheme="alternating", q=q), (0,)) for q in Q_RULES]
    for p in PASSES:
        runs.append(("local_passes", f"joint, {p} pass{'es' if p > 1 else ''}", dict(scheme="joint", local_passes=p),
                     (0,)))
        if not quick:
            runs.append(("local_passes", f"alternating, {p} pass{'es' if p > 1 else ''}",
                         dict(scheme="alternating", local_passes=p), (0,)))
    seeds = (0, 1) if quick else (0, 1, 2)
    for name, opts in SYSTEMS.items():
        if quick and name not in ("ideal", "stragglers+dropout"):
            continue
        runs.append(("systems", f"joint, {name}", dict(scheme="joint", **opts), (0,) if not opts else seeds))
    return runs


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def first_round(history, target, *, optimum=None):
    """The first round whose relative gap (or, given ``optimum``, relative sub-optimality) is <= target; None."""
    J, gap, rounds = history["objective"], history["gap"], history["round"]
    rel = gap / np.maximum(np.abs(J), np.finfo(float).tiny) if optimum is None else (J - optimum) / abs(optimum)
    hit = np.flatnonzero(rel <= target)
    return (int(rounds[hit[0]]), int(hit[0])) if len(hit) else (None, None)


def stall(history, optimum):
    """(J - J*)/J* at the end and the first round within 10 % of it: where the curve goes flat."""
    sub = (history["objective"] - optimum) / abs(optimum)
    final = float(sub[-1])
    flat = np.flatnonzero(sub <= 1.1 * final) if final > 0 else np.flatnonzero(sub <= 0)
    return final, int(history["round"][flat[0]]) if len(flat) else None


def run_summary(history, optimum):
    """The numbers of one run that the table shows."""
    out = {}
    for t in TARGETS:
        r, i = first_round(history, t)
        out[f"rounds_gap_{t:g}"] = r
        out[f"bytes_gap_{t:g}"] = None if i is None else int(history["bytes"][i])
        out[f"sim_seconds_gap_{t:g}"] = None if i is None else float(history["sim_seconds"][i])
        out[f"rounds_subopt_{t:g}"] = first_round(history, t, optimum=optimum)[0]
    final, flat_from = stall(history, optimum)
    rel_gap = float(history["gap"][-1] / max(abs(history["objective"][-1]), np.finfo(float).tiny))
    out.update(rounds=int(history["round"][-1]), final_subopt=final, final_rel_gap=rel_gap, flat_from=flat_from)
    return out


def median_or_none(values):
    """The median over seeds, None when a seed never got there (the variant did not reliably reach it)."""
    return None if any(v is None for v in values) else float(np.median(values))


def fmt(v, kind="int"):
    if v is None:
        return "—"
    if kind == "int":
        return f"{v:.0f}"
    if kind == "kb":
        return f"{v / 1e3:.1f}"
    if kind == "s":
        return f"{v:.2f}"
    return f"{v:.1e}"


DESCRIPTION = "DMTRL convergence: schemes, q rules, local passes, stragglers/dropout; per round, byte, simulated s"
DATASETS = ("synthetic_squared", "synthetic_hinge", "synthetic_logistic", "exam")


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's settings (``mtl-jax run dmtrl_convergence --help``)."""

    out: str = configs.field("runs/dmtrl_convergence", "output folder")
    lam1: float = configs.field(0.1, "ridge weight lam1")
    lam2: float = configs.field(1.0, "task-coupling weight lam2")
    max_rounds: int | None = configs.field(None, "rounds per run of the joint scheme (none: 800; quick: 250)")
    alternating_rounds: int | None = configs.field(None, "rounds per run of the alternating scheme (none: 300; "
                                                         "quick: 100)")
    tol: float = configs.field(1e-8, "relative duality gap that stops a run")
    datasets: str = configs.field("synthetic_squared", f"comma list of {', '.join(DATASETS)}")
    quick: bool = configs.field(False, "CI-sized: small synthetic problem, fewer variants and rounds")
    compile_cache: bool = configs.field(True, "use the persistent compilation cache")


PRESETS = {
    "full": {"datasets": ",".join(DATASETS)},
    "quick": {"quick": True},
}


def _run_datasets(args: Config, names, results: dict, lines: list, started, env, max_rounds, alt_rounds, fig_dir,
                  update) -> None:
    """Every dataset's reference and variants: runs written, table rows appended to ``lines``, ``results`` filled."""
    done_runs = 0
    for name, (X, y, task, loss, description) in datasets(args.quick, names).items():
        m = int(task.max()) + 1
        t0 = time.perf_counter()
        data_cfg = {"name": name, "description": description, "loss": loss, "num_tasks": m, "dim": int(X.shape[1]),
                    "num_samples": int(len(y)), "quick": args.quick}
        # A finished cell (same data and settings) is read back: a stopped run resumes where it was.
        ref_dir = os.path.join(args.out, name, "reference_centralized")
        ref_key = cells.cell_key(data=data_cfg, lam1=args.lam1, lam2=args.lam2, reference=True)
        ref = cells.load_fit(ref_dir, ref_key)
        if ref is None:
            ref = mtl_jax.fit(X, y, task, lam1=args.lam1, lam2=args.lam2, loss=loss, solver="centralized",
                              tol=1e-12, max_iter=50000)
            store.write_fit(ref_dir, ref, config={"experiment": "dmtrl_convergence", "data": data_cfg,
                                                  "fit": ref.config, "cell": ref_key},
                            started=started, environment_info=env)
        J_star = ref.objective
        t_ref = time.perf_counter() - t0
        print(f"\n## {name}: {description}; {loss} loss, m = {m}, N = {len(y)}, d = {X.shape[1]}\n"
              f"J* = {J_star:.12g} (centralized, relative gap {ref.relative_gap:.1e}, {ref.iterations} iterations)",
              flush=True)
        groups, table, done = {}, {}, {}
        compile_s = 0.0
        for group, label, opts, seeds in variants(args.quick):
            histories, summaries = [], []
            for seed in seeds:
                cap = alt_rounds if opts["scheme"] == "alternating" else max_rounds
                defaults = dict(q="auto", local_passes=1)  # the same fit under several labels runs once
                key = (json.dumps({**defaults, **opts}, sort_keys=True), seed)
                folder = slug(label) + (f"_seed{seed}" if len(seeds) > 1 else "")
                run_dir = os.path.join(args.out, name, folder)
                cell = cells.cell_key(data=data_cfg, lam1=args.lam1, lam2=args.lam2, tol=args.tol, max_iter=cap,
                                      seed=seed, options={**defaults, **opts}, reference=J_star)
                if key not in done:
                    done[key] = cells.load_fit(run_dir, cell)
                if done[key] is None:
                    done[key] = mtl_jax.fit(X, y, task, lam1=args.lam1, lam2=args.lam2, loss=loss, solver="dmtrl",
                                            tol=args.tol, max_iter=cap, seed=seed, **opts)
                    compile_s += done[key].compile_seconds
                res = done[key]
                h = res.history_arrays()
                s = run_summary(h, J_star)
                if cells.finished(run_dir, cell) is None:
                    store.write_fit(run_dir, res,
                                    config={"experiment": "dmtrl_convergence", "group": group, "variant": label,
                                            "data": data_cfg, "fit": res.config, "cell": cell},
                                    summary={"reference_objective": J_star, **s}, started=started,
                                    environment_info=env)
                histories.append(h)
                done_runs += 1
                update(done_runs, data=name, variant=label)
                summaries.append(s)
            groups.setdefault(group, {})[label] = histories if len(histories) > 1 else histories[0]
            row = {k: median_or_none([s[k] for s in summaries]) for k in summaries[0]
                   if k.startswith(("rounds_", "bytes_", "sim_"))}
            row.update(final_subopt=float(np.median([s["final_subopt"] for s in summaries])),
                       final_rel_gap=float(np.median([s["final_rel_gap"] for s in summaries])),
                       flat_from=summaries[0]["flat_from"], rounds=max(s["rounds"] for s in summaries),
                       seeds=len(seeds), group=group)
            table[label] = row
        t_fig = time.perf_counter()
        for group, runs in groups.items():
            fig = plotting.plot_runs_grid(runs, xs=AXES, optimum=J_star,
                                          title=f"DMTRL on {name} ({loss}, m = {m}): {group.replace('_', ' ')}")
            for ext in ("png", "pdf"):  # an Agg figure (not pyplot's) can be saved twice
                plotting.save_figure(fig, os.path.join(fig_dir, f"{name}_{group}.{ext}"))
        t_fig = time.perf_counter() - t_fig
        section = [f"## {name}", "", f"{description}; {loss} loss, m = {m}, N = {len(y)}, d = {X.shape[1]}; "
                   f"J* = {J_star:.12g}; {time.perf_counter() - t0:.0f} s (reference {t_ref:.0f} s, DMTRL compiling "
                   f"{compile_s:.0f} s, figures {t_fig:.0f} s).", "",
                   "| variant | rounds to gap 1e-4 | rounds to gap 1e-6 | rounds to (J-J*)/J* 1e-6 | kB to gap 1e-6 | "
                   "sim s to gap 1e-6 | rounds run | final (J-J*)/J* | final gap/J | flat from round |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in table.items():
            seeds = f" ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
            section.append(
                f"| {label}{seeds} | {fmt(r['rounds_gap_0.0001'])} | {fmt(r['rounds_gap_1e-06'])} | "
                f"{fmt(r['rounds_subopt_1e-06'])} | {fmt(r['bytes_gap_1e-06'], 'kb')} | "
                f"{fmt(r['sim_seconds_gap_1e-06'], 's')} | {r['rounds']} | {fmt(r['final_subopt'], 'e')} | "
                f"{fmt(r['final_rel_gap'], 'e')} | "
                f"{fmt(r['flat_from']) if r['rounds_gap_1e-06'] is None else ''} |")
        print("\n".join(section[2:]), flush=True)
        lines += section + [""]
        results[name] = {"reference_objective": J_star, "data": data_cfg, "variants": table}


def main(argv=None):
    """``python experiments/dmtrl_convergence.py [--key value ...] [--preset full|quick]``."""
    return configs.script_main(sys.modules[__name__], argv)


def run(args: Config) -> int:
    """Run the experiment with ``args`` (a :class:`Config`); everything goes under ``args.out``."""
    configs.prepare(args)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = set(names) - set(DATASETS)
    if unknown:
        raise ValueError(f"datasets: unknown {sorted(unknown)}; choose from {DATASETS}")
    max_rounds = args.max_rounds or (250 if args.quick else 800)
    alt_rounds = args.alternating_rounds or (100 if args.quick else 300)
    os.makedirs(args.out, exist_ok=True)
    fig_dir = os.path.join(args.out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    started, env = store.now(), store.environment()
    t_start = time.perf_counter()

    lines = [f"# DMTRL convergence ({started})", "",
             f"lam1 = {args.lam1}, lam2 = {args.lam2}; runs stop at a relative duality gap of {args.tol:g} or after "
             f"{max_rounds} rounds (alternating scheme: {alt_rounds}). Relative gap = gap / J (the certificate); "
             "sub-optimality = (J - J*) / J* against the centralized optimum. Seeded variants: the median over seeds (— when a seed never got there). "
             "'flat from': the first round within 10 % of the final sub-optimality (where a run that does not "
             "converge stalls).", ""]
    results = {}
    cells = len(names) * sum(len(seeds) for *_, seeds in variants(args.quick))
    with progress.bar(cells, "dmtrl_convergence runs") as update:
        _run_datasets(args, names, results, lines, started, env, max_rounds, alt_rounds, fig_dir, update)
    lines.append(f"Total {time.perf_counter() - t_start:.0f} s on {os.cpu_count()} CPUs, jax {jax.__version__}, "
                 f"{jax.default_backend()}.")
    with atomic_write(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with atomic_write(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(store.jsonable({"started": started, "lam1": args.lam1, "lam2": args.lam2, "tol": args.tol,
                                  "max_rounds": max_rounds, "alternating_rounds": alt_rounds, "quick": args.quick,
                                  "results": results}), f, indent=1)
    print(f"\nwrote {args.out}/results.md, results.json, figures/*.png|pdf and the runs; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
