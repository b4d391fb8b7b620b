"""Rounds and bytes to a relative duality gap of 1e-4 and 1e-6: DMTRL against the distributed baselines.

Part 1, the experiment problems (experiments/dmtrl_accuracy.py's data, seed 0, its training split sizes):
synthetic planted-cluster tasks (30 tasks, d = 20, 30 training samples per task, noise 1) with squared,
hinge and logistic loss, and Exam (65 schools, d = 5, all 4059 pupils), at fixed ``--lam1``/``--lam2``.
For each method: the first round at which ``gap <= tol * J`` (J's certificate) for tol = 1e-4 and 1e-6,
the bytes sent up to then, and the simulated seconds (DMTRL's cost model, its defaults). Methods:

* DMTRL joint scheme with 1 and 5 local SDCA passes per round, DMTRL alternating (the paper's scheme);
* ``distributed_apg`` (certified FISTA on J, one round per iteration), ``minibatch_sgd`` (batch 8, the
  decaying step of :func:`mtl_jax.solvers.baselines.minibatch_sgd`, ``--sgd-rounds`` rounds);
* ``independent`` (lam2 = 0) and ``fixed_identity`` (Omega = I/m fixed) solve *other* problems, so J's gap
  never vanishes for them: their rows give the rounds to the same relative gap of *their own* problem
  (independent: J at lam2 = 0; fixed_identity: the W-problem at Omega = I/m), marked "(own)";
* ``centralized``: no rounds; its bytes are the whole data set shipped once.

">N" means not reached within the cap of N rounds.

Part 2, the sweep: synthetic squared loss, 30 tasks, lam2 = 1e-2, lam1 from 1 down to 1e-4, so that the
condition number ``kappa = L / lam1`` grows (``L = curvature * max_t lambda_max(X_t^T X_t) / n_t``, the
smoothness of the loss part); rounds to 1e-6 for DMTRL joint (1 and 5 passes) and distributed APG, and who
wins in rounds, on two data sets: n_t = 30 samples per task in d = 20 (the loss part is strongly convex by
itself, which APG's restart exploits) and n_t = 10 in d = 40 (it is not: only lam1 makes J strongly convex).
Dual coordinate ascent with the safe ``q_t = 1/lam1`` (DMTRL, CoCoA+) needs O(kappa) rounds, accelerated
gradient O(sqrt(kappa)) (less where the data add curvature): DMTRL is expected to win at small kappa only.

    python benchmarks/bench_dmtrl_baselines.py            # ~5 min on 2 CPU cores
    python benchmarks/bench_dmtrl_baselines.py --quick    # small caps, seconds
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

import mtl_jax  # noqa: E402
from mtl_jax.data.sites import pack_sites  # noqa: E402
from mtl_jax.data.synthetic import make_clustered_tasks  # noqa: E402
from mtl_jax.losses import get_loss  # noqa: E402
from mtl_jax.solvers import baselines, centralized, dmtrl  # noqa: E402

TOLS = (1e-4, 1e-6)


def problems():
    out = {}
    for loss in ("squared", "hinge", "logistic"):
        X, y, task, _ = make_clustered_tasks(30, 20, num_clusters=3, samples_per_task=30, loss=loss, noise=1.0,
                                             seed=0)
        out[f"synthetic_{loss}"] = (pack_sites(X, y, task, 30, layout="padded"), loss)
    from mtl_jax.data.school import load_exam
    X, y, task, _ = load_exam()
    out["exam"] = (pack_sites(X, y, task, 65, layout="padded"), "squared")
    return out


def first_reach(history, tol, own=None):
    """(rounds, bytes, sim seconds) at the first record with gap <= tol * J (``own``: "gap_w" uses the
    W-problem's gap and primal); None when never."""
    for r in history:
        gap, value = (r.gap_w, r.primal) if own == "gap_w" else (r.gap, r.objective)
        if np.isfinite(gap) and gap <= tol * abs(value):
            return r.round, r.bytes, r.sim_seconds
    return None


def fmt_reach(hit, cap):
    if hit is None:
        return f">{cap}", "-", "-"
    return str(hit[0]), f"{hit[1] / 1e6:.3f}", f"{hit[2]:.2f}"


def part1(args, log):
    cap, sgd_cap = args.max_rounds, args.sgd_rounds
    log(f"## Part 1: rounds / MB / simulated s to a relative gap of 1e-4 and 1e-6 "
        f"(lam1 = {args.lam1}, lam2 = {args.lam2}; cap {cap} rounds, SGD {sgd_cap})\n")
    log("| problem | method | rounds 1e-4 | MB 1e-4 | sim s 1e-4 | rounds 1e-6 | MB 1e-6 | sim s 1e-6 | wall s |")
    log("|---|---|---|---|---|---|---|---|---|")
    for name, (sites, loss) in problems().items():
        common = dict(lam1=args.lam1, loss=loss, tol=TOLS[-1])
        runs = {
            "dmtrl joint, 1 pass": (lambda: dmtrl.solve(sites, lam2=args.lam2, max_iter=cap, **common), None),
            "dmtrl joint, 5 passes": (lambda: dmtrl.solve(sites, lam2=args.lam2, max_iter=cap, local_passes=5,
                                                          **common), None),
            "dmtrl alternating": (lambda: dmtrl.solve(sites, lam2=args.lam2, max_iter=cap, scheme="alternating",
                                                      **common), None),
            "distributed_apg": (lambda: baselines.distributed_apg(sites, lam2=args.lam2, max_rounds=cap, **common),
                                None),
            "minibatch_sgd (batch 8)": (lambda: baselines.minibatch_sgd(sites, lam1=args.lam1, lam2=args.lam2,
                                                                        loss=loss, rounds=sgd_cap, batch=8), None),
            "independent (own)": (lambda: baselines.independent(sites, max_rounds=cap, **common), None),
            "fixed_identity (own)": (lambda: baselines.fixed_identity(sites, lam2=args.lam2, max_rounds=cap,
                                                                      **common), "gap_w"),
        }
        for label, (fn, own) in runs.items():
            t = time.perf_counter()
            out = fn()
            wall = time.perf_counter() - t
            this_cap = sgd_cap if label.startswith("minibatch") else cap
            cells = [c for tol in TOLS for c in fmt_reach(first_reach(out.history, tol, own), this_cap)]
            log(f"| {name} | {label} | " + " | ".join(cells) + f" | {wall:.1f} |")
        mb = baselines.centralize_bytes(sites) / 1e6
        log(f"| {name} | centralized (all data once) | 0 | {mb:.3f} | - | 0 | {mb:.3f} | - | - |")
    log("")


#: The sweep's two data sets: the loss part strongly convex on its own (n_t > d) or not (n_t < d).
SWEEP_DATA = (("n_t = 30 > d = 20", 20, 30), ("n_t = 10 < d = 40", 40, 10))


def part2(args, log):
    cap = args.sweep_rounds
    for label, dim, samples in SWEEP_DATA:
        X, y, task, _ = make_clustered_tasks(30, dim, num_clusters=3, samples_per_task=samples, loss="squared",
                                             noise=1.0, seed=0)
        sites = pack_sites(X, y, task, 30, layout="padded")
        lmax = np.asarray(centralized.site_lmax(sites)) / np.asarray(sites.counts)
        L = get_loss("squared").curvature * float(np.max(lmax))
        log(f"## Part 2: synthetic squared, 30 tasks, {label}, lam2 = {args.sweep_lam2}: rounds to a relative gap "
            f"of 1e-6 as lam1 falls (L = {L:.3f}; cap {cap} rounds)\n")
        log("| lam1 | kappa = L/lam1 | DMTRL joint 1 pass | DMTRL joint 5 passes | distributed APG | fewer rounds | "
            "MB DMTRL 1 pass / APG | sim s DMTRL 1 pass / APG |")
        log("|---|---|---|---|---|---|---|---|")
        for lam1 in args.sweep_lam1:
            common = {"lam1": lam1, "lam2": args.sweep_lam2, "loss": "squared", "tol": 1e-6}
            res = {"p1": dmtrl.solve(sites, max_iter=cap, **common),
                   "p5": dmtrl.solve(sites, max_iter=cap, local_passes=5, **common),
                   "apg": baselines.distributed_apg(sites, max_rounds=cap, **common)}
            hits = {k: first_reach(v.history, 1e-6) for k, v in res.items()}
            rounds = {k: (h[0] if h else np.inf) for k, h in hits.items()}
            best_dmtrl = min(rounds["p1"], rounds["p5"])
            winner = "DMTRL" if best_dmtrl < rounds["apg"] else ("APG" if rounds["apg"] < best_dmtrl else "tie")
            mb = " / ".join(f"{hits[k][1] / 1e6:.3f}" if hits[k] else "-" for k in ("p1", "apg"))
            sim = " / ".join(f"{hits[k][2]:.1f}" if hits[k] else "-" for k in ("p1", "apg"))
            cell = {k: (str(h[0]) if h else f">{cap}") for k, h in hits.items()}
            log(f"| {lam1:g} | {L / lam1:.3g} | {cell['p1']} | {cell['p5']} | {cell['apg']} | {winner} | {mb} | "
                f"{sim} |")
        log("")


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lam1", type=float, default=1e-2)
    parser.add_argument("--lam2", type=float, default=1e-2)
    parser.add_argument("--max-rounds", type=int, default=5000)
    parser.add_argument("--sgd-rounds", type=int, default=2000)
    parser.add_argument("--sweep-lam1", type=lambda s: [float(v) for v in s.split(",")],
                        default=[1.0, 1e-1, 1e-2, 1e-3, 1e-4])
    parser.add_argument("--sweep-lam2", type=float, default=1e-2)
    parser.add_argument("--sweep-rounds", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="caps of 300 rounds, sweep lam1 in {1, 0.01}")
    parser.add_argument("--part", choices=("1", "2", "both"), default="both")
    parser.add_argument("--no-compile-cache", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_rounds, args.sgd_rounds, args.sweep_rounds, args.sweep_lam1 = 300, 300, 300, [1.0, 1e-2]
    if not args.no_compile_cache:
        mtl_jax.enable_compilation_cache()
    t0 = time.perf_counter()
    log(f"bench_dmtrl_baselines, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    log(machine_line(f"cost model: {dmtrl.DEFAULT_SPEED:g} steps/s per site, latency {dmtrl.DEFAULT_LATENCY} s, "
                     f"bandwidth {dmtrl.DEFAULT_BANDWIDTH / 1e6:g} MB/s") + "\n")
    if args.part in ("1", "both"):
        part1(args, log)
    if args.part in ("2", "both"):
        part2(args, log)
    log(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
