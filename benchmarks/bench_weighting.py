"""Speed of loss-driven task weighting (docs/weighting.md), as ratios measured side by side in one run.

(a) ``schemes``: per-step time of each weighting scheme relative to ``equal`` -- the same model, data and
    batch size, the training run of :func:`mtl_jax.training.make_run` with ``--scan`` steps inside its
    one ``lax.scan`` (so dispatch is amortised; the run's initial state and its test metrics on 64
    samples cost well under one step); the schemes are timed round-robin, medians of ``--reps``.
(b) ``seeds``: five seeds as one vmapped :func:`~mtl_jax.training.train_seeds` program against five
    sequential :func:`~mtl_jax.training.train` calls (same config), compile-inclusive (first call after
    ``jax.clear_caches()``) and compile-exclusive (medians of repeated calls).
(c) ``cnn``: steps per second of the CNN on ``multi_digits`` at batch 256, one model and five seeds vmapped.
(d) ``runs``: per-step time of every run of the task-weighting experiment (``RUNS`` of
    :mod:`mtl_jax.experiments.task_weighting`: the loss-driven schemes and their variants, the gradient
    methods) relative to ``equal``, on issue 11's MLP: a 64-256-256 ReLU trunk, 4 regression heads (8 outputs
    each), batch 256, Adam (lr 1e-3), float32 -- the library's own training step
    (:func:`~mtl_jax.training.make_run`), timed as in (a). Targets: a loss-only run <= 1.05x; a gradient
    method <= 2x (FAMO and GradNorm, which do work beyond the losses, are reported). ``--gradient-mode
    loop`` times the gradient methods with K unrolled backward passes as well (rows ``name [loop]``).

Compilation is timed on its own (ahead-of-time ``lower().compile()`` in (a) and (c)). Nothing here assumes
a CPU: on a GPU machine ``--only cnn`` runs (c) alone. Run it with the package installed
(``pip install -e .``) or with the repository root on ``PYTHONPATH``.

    python benchmarks/bench_weighting.py              # everything (~3-4 min on 2 CPU cores)
    python benchmarks/bench_weighting.py --only cnn   # (c) only
    python benchmarks/bench_weighting.py --only runs --gradient-mode both   # (d), both gradient modes (~4 min)
    python benchmarks/bench_weighting.py --quick      # seconds (smoke test)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import weighting
from mtl_jax.data.deep import imbalanced_regression, multi_digits, school_multihead
from mtl_jax.training import TrainConfig, init_params, make_components, make_run, to_device, train, train_seeds

PARTS = ("schemes", "seeds", "cnn", "runs")
LOSS_ONLY_TARGET = 1.05
GRADIENT_TARGET = 2.0
GRADIENT_MODES = ("vmap", "loop", "both")
SEEDS_TARGET = 3.0


def machine_line() -> str:
    return (f"{datetime.datetime.now().isoformat(timespec='minutes')} | jax {jax.__version__} | "
            f"devices {jax.devices()} | CPU count {os.cpu_count()}")


def block(x):
    return jax.block_until_ready(x)


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of ``fn()`` with its result ready."""
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def round_robin(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time of each function, after one warm-up call each, timed in turns (so slow drifts of a
    shared machine hit every contender alike)."""
    for fn in fns.values():
        block(fn())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def compiled_run(config: TrainConfig, data, steps: int, seeds: int | None = None):
    """``(program, args, compile_seconds)``: :func:`~mtl_jax.training.make_run`'s run of ``config`` with
    ``steps`` steps, compiled ahead of time (vmapped over seeds 0..``seeds``-1 when given), and its
    arguments ``(seed, params, train, test)``; ``program(*args)`` is one timed run.

    The initial weights are drawn here, outside the timed program, as :func:`~mtl_jax.training.train`
    does (the threefry init is not a cost of the scheme)."""
    spec = data.spec
    config = dataclasses.replace(config, steps=steps)
    model = make_components(config, spec).model
    train_split, test_split = to_device(data.train, spec), to_device(data.test, spec)
    run = make_run(config, spec)
    seed = jnp.asarray(0 if seeds is None else np.arange(seeds), jnp.int32)

    def init(s):
        return init_params(model, jax.random.key(s), train_split.x[:1])

    if seeds is None:
        params, program = block(jax.jit(init)(seed)), jax.jit(run)
    else:
        params, program = block(jax.jit(jax.vmap(init))(seed)), jax.jit(jax.vmap(run, in_axes=(0, 0, None, None)))
    args = (seed, params, train_split, test_split)
    t0 = time.perf_counter()
    compiled = program.lower(*args).compile()
    return compiled, args, time.perf_counter() - t0


# ----------------------------------------------------------------------------- (a) schemes


def extra_work(scheme: weighting.Weighting) -> list[str]:
    """What a scheme's step computes beyond the losses: its ``needs`` except ``epoch_end`` (a () bool the
    step derives from its counter, free) and, with an ``after_step`` (famo), one more forward pass. An
    empty list: a loss-only scheme, held to the <= LOSS_ONLY_TARGET check (dwa's per-epoch default is one)."""
    work = [n for n in scheme.needs if n != "epoch_end"]
    if scheme.after_step is not None:
        work.append("after_step: one forward pass")
    return work


def bench_schemes(quick: bool, reps: int, scan: int, schemes: tuple[str, ...] = weighting.SCHEMES) -> dict:
    """Per-step time of ``schemes`` relative to equal, on the imbalanced regression MLP (K = 10 tasks)."""
    schemes = ("equal",) + tuple(s for s in schemes if s != "equal")
    data = imbalanced_regression(256 if quick else 2000, 64, in_dim=50, out_dim=20, seed=0)
    config = TrainConfig(model="mlp", hidden=(32,) if quick else (128, 128), batch_size=64, learning_rate=1e-2)
    programs, compile_s = {}, {}
    for name in schemes:
        compiled, args, compile_s[name] = compiled_run(dataclasses.replace(config, scheme=name), data, scan)
        programs[name] = (lambda c=compiled, a=args: c(*a))
    med = round_robin(programs, reps)
    print(f"\n(a) per-step time relative to equal: MLP {config.hidden}, K = {len(data.spec.kinds)} regression tasks, "
          f"batch {config.batch_size}, {scan} steps per lax.scan, median of {reps}")
    print(f"{'scheme':12s} {'ms/step':>9s} {'ratio':>7s} {'compile s':>10s}  target")
    rows = {}
    for name in schemes:
        ratio = med[name] / med["equal"]
        target = run_target(weighting.get(name), ratio)
        print(f"{name:12s} {1e3 * med[name] / scan:9.3f} {ratio:7.3f} {compile_s[name]:10.2f}  {target}")
        rows[name] = dict(ms_per_step=1e3 * med[name] / scan, ratio=ratio, compile_s=compile_s[name])
    return rows


# ----------------------------------------------------------------------------- (b) seeds


def seed_configs(quick: bool) -> dict[str, tuple]:
    """The small-model configurations of (b): name -> (data, config)."""
    if quick:
        return {"regression MLP (16,)": (imbalanced_regression(128, 32, num_tasks=3, in_dim=8, out_dim=4, seed=0),
                                         TrainConfig(model="mlp", hidden=(16,), steps=20, batch_size=32))}
    return {
        "school MLP (32, 32), batch 96": (school_multihead(seed=0),
                                          TrainConfig(model="mlp", hidden=(32, 32), steps=1000, batch_size=96,
                                                      stratify=True, learning_rate=3e-3)),
        "regression MLP (128, 128), batch 64": (imbalanced_regression(2000, 500, in_dim=50, out_dim=20, seed=0),
                                                TrainConfig(model="mlp", hidden=(128, 128), steps=1000,
                                                            batch_size=64, learning_rate=1e-2)),
    }


def bench_seeds(quick: bool, reps: int, n_seeds: int = 5) -> dict:
    """``n_seeds`` seeds: one vmapped train_seeds program vs sequential train calls."""
    seeds = list(range(n_seeds))
    print(f"\n(b) {n_seeds} seeds: one vmapped train_seeds program vs {n_seeds} sequential train calls "
          f"(scheme equal; first call after jax.clear_caches(), then median of {reps})")
    print(f"{'config':38s} {'steps':>5s} {'seq first s':>11s} {'vmap first s':>12s} {'ratio':>6s} "
          f"{'seq s':>7s} {'vmap s':>7s} {'ratio':>6s}  target >= {SEEDS_TARGET}x (compile-exclusive)")
    rows = {}
    for name, (data, config) in seed_configs(quick).items():
        def sequential(data=data, config=config):
            return [train(dataclasses.replace(config, seed=s), data) for s in seeds]

        def vmapped(data=data, config=config):
            return train_seeds(config, data, seeds)

        jax.clear_caches()
        seq_first = seconds(sequential)
        jax.clear_caches()
        vmap_first = seconds(vmapped)
        med = round_robin({"seq": sequential, "vmap": vmapped}, reps)
        incl, excl = seq_first / vmap_first, med["seq"] / med["vmap"]
        met = "met" if excl >= SEEDS_TARGET else "NOT met"
        print(f"{name:38s} {config.steps:5d} {seq_first:11.2f} {vmap_first:12.2f} {incl:6.2f} "
              f"{med['seq']:7.2f} {med['vmap']:7.2f} {excl:6.2f}  {met}")
        rows[name] = dict(seq_first_s=seq_first, vmap_first_s=vmap_first, ratio_with_compile=incl,
                          seq_s=med["seq"], vmap_s=med["vmap"], ratio=excl)
    return rows


# ----------------------------------------------------------------------------- (c) CNN


def bench_cnn(quick: bool, reps: int, scan: int, n_seeds: int = 5) -> dict:
    """Steps per second of the CNN on multi_digits, batch 256 (quick: batch 32, tiny CNN)."""
    data = multi_digits(512 if quick else 2000, 64, seed=0)
    config = TrainConfig(model="cnn", features=(4, 8) if quick else (16, 32), hidden=(16,) if quick else (64,),
                         batch_size=32 if quick else 256, learning_rate=1e-3)
    one, args1, c1 = compiled_run(config, data, scan)
    many, args5, c5 = compiled_run(config, data, scan, seeds=n_seeds)
    med = round_robin({"one": lambda: one(*args1), "many": lambda: many(*args5)}, reps)
    print(f"\n(c) CNN on multi_digits: features {config.features}, dense {config.hidden[-1]}, batch "
          f"{config.batch_size}, scheme equal, {scan} steps per lax.scan, median of {reps} "
          f"({jax.devices()[0].platform})")
    print(f"{'run':18s} {'steps/s':>9s} {'model-steps/s':>14s} {'compile s':>10s}")
    rows = {}
    for label, key, seeds, comp_s in (("1 model", "one", 1, c1), (f"{n_seeds} seeds vmapped", "many", n_seeds, c5)):
        rate = scan / med[key]
        print(f"{label:18s} {rate:9.1f} {rate * seeds:14.1f} {comp_s:10.2f}")
        rows[label] = dict(steps_per_s=rate, model_steps_per_s=rate * seeds, compile_s=comp_s)
    return rows


# ----------------------------------------------------------------------------- (d) the experiment's runs


def benchmark_mlp(quick: bool):
    """(data, config) of the weighting benchmark's MLP, the one issue 11 specifies (quick: a tiny one)."""
    if quick:
        return (imbalanced_regression(256, 32, num_tasks=4, in_dim=8, out_dim=4, seed=0),
                TrainConfig(model="mlp", hidden=(16, 16), batch_size=32, learning_rate=1e-3))
    return (imbalanced_regression(4096, 64, num_tasks=4, in_dim=64, out_dim=8, seed=0),
            TrainConfig(model="mlp", hidden=(256, 256), batch_size=256, learning_rate=1e-3))


def run_target(scheme: weighting.Weighting, ratio: float, gradient_method: bool = False) -> str:
    """The issue's target for a step with ``scheme`` (and a gradient method, if ``gradient_method``) and
    whether ``ratio`` meets it."""
    if gradient_method:
        limit = GRADIENT_TARGET
    else:
        costly = extra_work(scheme)
        if costly:
            return f"reported (needs {', '.join(costly)})"
        limit = LOSS_ONLY_TARGET
    return f"<= {limit}x: {'met' if ratio <= limit else 'NOT met'}"


def bench_runs(quick: bool, reps: int, scan: int, runs: tuple[str, ...] | None = None,
               gradient_mode: str = "vmap") -> dict:
    """Per-step time of the experiment's ``runs`` relative to equal weighting on :func:`benchmark_mlp`."""
    from mtl_jax.experiments.task_weighting import RUNS

    names = ("equal",) + tuple(n for n in (runs or tuple(RUNS)) if n not in ("equal", "single_task"))
    modes = ("vmap", "loop") if gradient_mode == "both" else (gradient_mode,)
    data, base = benchmark_mlp(quick)
    contenders = {}
    for name in names:
        for mode in modes if RUNS[name].gradient_method is not None else ("vmap",):
            label = name if len(modes) == 1 or RUNS[name].gradient_method is None else f"{name} [{mode}]"
            contenders[label] = (RUNS[name], dataclasses.replace(RUNS[name].apply(base), gradient_mode=mode))
    programs, compile_s = {}, {}
    for label, (_, config) in contenders.items():
        compiled, args, compile_s[label] = compiled_run(config, data, scan)
        programs[label] = (lambda c=compiled, a=args: c(*a))
    med = round_robin(programs, reps)
    print(f"\n(d) the task-weighting experiment's runs, per step relative to equal: MLP in {data.train.x.shape[1]} - "
          f"{' - '.join(map(str, base.hidden))}, K = {len(data.spec.kinds)} regression heads, batch "
          f"{base.batch_size}, Adam {base.learning_rate:g}, {scan} steps per lax.scan, median of {reps}")
    print(f"{'run':32s} {'ms/step':>9s} {'ratio':>7s} {'compile s':>10s}  target")
    rows = {}
    for label, (run, _) in contenders.items():
        ratio = med[label] / med["equal"]
        print(f"{label:32s} {1e3 * med[label] / scan:9.3f} {ratio:7.3f} {compile_s[label]:10.2f}  "
              f"{run_target(weighting.get(run.scheme, **dict(run.scheme_kwargs)), ratio, run.gradient_method is not None)}")
        rows[label] = dict(ms_per_step=1e3 * med[label] / scan, ratio=ratio, compile_s=compile_s[label])
    return rows


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts among {', '.join(PARTS)}")
    parser.add_argument("--schemes", default=",".join(weighting.SCHEMES),
                        help="comma-separated schemes timed in (a) (equal is always timed: the reference)")
    parser.add_argument("--runs", default=None,
                        help="comma-separated runs of the task-weighting experiment timed in (d) (default: all)")
    parser.add_argument("--gradient-mode", default="vmap", help=f"(d): one of {', '.join(GRADIENT_MODES)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (seconds)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; --quick 2)")
    parser.add_argument("--scan", type=int, default=None, help="steps per lax.scan in (a) (default 50; --quick 5)")
    parser.add_argument("--cnn-steps", type=int, default=None, help="steps per lax.scan in (c) (default 20; --quick 3)")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"--only: choose among {', '.join(PARTS)}, got {args.only!r}")
    schemes = tuple(n.strip() for n in args.schemes.split(",") if n.strip())
    if any(n not in weighting.SCHEMES for n in schemes):
        raise ValueError(f"--schemes: choose among {', '.join(weighting.SCHEMES)}, got {args.schemes!r}")
    runs = None
    if args.runs is not None:
        from mtl_jax.experiments.task_weighting import RUNS

        runs = tuple(n.strip() for n in args.runs.split(",") if n.strip())
        if not runs or any(n not in RUNS for n in runs):
            raise ValueError(f"--runs: choose among {', '.join(RUNS)}, got {args.runs!r}")
    if args.gradient_mode not in GRADIENT_MODES:
        raise ValueError(f"--gradient-mode: choose among {', '.join(GRADIENT_MODES)}, got {args.gradient_mode!r}")
    reps = args.reps if args.reps is not None else (2 if args.quick else 7)
    scan = args.scan if args.scan is not None else (5 if args.quick else 50)
    cnn_steps = args.cnn_steps if args.cnn_steps is not None else (3 if args.quick else 20)
    for name, value in (("--reps", reps), ("--scan", scan), ("--cnn-steps", cnn_steps)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")

    print(f"bench_weighting{' --quick' if args.quick else ''}: {machine_line()}")
    out = {}
    if "schemes" in parts:
        out["schemes"] = bench_schemes(args.quick, reps, scan, schemes)
    if "seeds" in parts:
        out["seeds"] = bench_seeds(args.quick, max(1, reps // 2) if not args.quick else 1)
    if "cnn" in parts:
        out["cnn"] = bench_cnn(args.quick, reps, cnn_steps)
    if "runs" in parts:
        out["runs"] = bench_runs(args.quick, reps, scan, runs, args.gradient_mode)
    return out


if __name__ == "__main__":
    main()
