"""Deep-training sweeps: a learning-rate grid x seeds as one compiled program (``train_grid``) against a loop
of ``train_seeds``, one compilation per rate.

The problem is the task-weighting experiment's MLP problem ``imbalanced_regression`` at its default size
(:func:`mtl_jax.experiments.task_weighting.setups`: 2000 training rows, 3 regression tasks whose scales
differ 100x, MLP (64,), Adam, 400 steps of batch 64, float32 parameters), its base rate 1e-2 times
(0.1, 0.3, 1, 3): 4 learning rates x 5 seeds, for equal weighting and dwa. Printed, per scheme:

* **loop**: ``train_seeds(dataclasses.replace(config, learning_rate=lr), data, seeds)`` for each rate,
  each a program of its own (the rate is a constant of it), compile included: before the loop every
  compiled program is forgotten (the package's program caches and JAX's in-memory caches), so each
  rate traces, lowers and compiles its run as a fresh process would (the weight init is compiled once,
  shared by the rates, as in a real loop); then the same loop warm (programs cached, median of ``--reps``).
* **grid**: ``train_grid(config, data, seeds, learning_rates=rates)``, the rates and seeds vmapped in
  one program (the rate injected into the optimizer state), compile included after the same clearing,
  then warm (median of ``--reps``).

The ratio ``grid / loop`` (compile included, and warm) is printed from the same run, with the largest
difference between the two (test MSE and the training losses: the same numbers up to floating-point
reassociation, float32) and the machine's load average. The persistent compilation cache is disabled.

    python benchmarks/bench_deep_sweep.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_deep_sweep.py --quick    # the experiment's quick size, 2 rates x 2 seeds (smoke test)
"""
from __future__ import annotations

import argparse
import dataclasses
import os

os.environ["MTL_JAX_NO_COMPILE_CACHE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from common import machine_line, median_time, timed  # noqa: E402

from mtl_jax import compilation, training  # noqa: E402
from mtl_jax.experiments.task_weighting import setups  # noqa: E402
from mtl_jax.training import train_grid, train_seeds  # noqa: E402


def cold():
    """Forget every compiled training program: the next call traces, lowers and compiles again."""
    training._compiled_run.cache_clear()
    training._compiled_init.cache_clear()
    training._compiled_grid.cache_clear()
    jax.clear_caches()


def loop(config, data, seeds, rates):
    """One ``train_seeds`` per rate; returns the G results (leading axis S) when they are done."""
    return jax.block_until_ready([train_seeds(dataclasses.replace(config, learning_rate=float(lr)), data, seeds)
                                  for lr in rates])


def grid(config, data, seeds, rates):
    return jax.block_until_ready(train_grid(config, data, seeds, learning_rates=rates).result)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the experiment's quick size, 2 rates x 2 seeds (smoke test)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the warm timings (median)")
    args = p.parse_args(argv)
    compilation.disable_compilation_cache()

    setup = setups("quick" if args.quick else "default")["imbalanced_regression"]
    data = setup.make(**setup.data_kwargs)
    base = setup.config
    factors = (0.3, 3.0) if args.quick else (0.1, 0.3, 1.0, 3.0)
    rates = [base.learning_rate * f for f in factors]
    seeds = list(range(2 if args.quick else 5))
    load0 = os.getloadavg()
    print(machine_line(f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at the start"))
    print(f"imbalanced_regression {setup.data_kwargs}; MLP {base.hidden}, {base.optimizer}, {base.steps} steps, "
          f"batch {base.batch_size}, {base.dtype}; {len(rates)} learning rates {[f'{r:g}' for r in rates]} x "
          f"{len(seeds)} seeds; persistent compile cache disabled\n")
    print("| scheme | loop of train_seeds, compile incl. (s) | train_grid, compile incl. (s) | ratio | "
          "loop warm (s) | grid warm (s) | ratio warm | max rel. diff test MSE | max rel. diff losses |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scheme in ("equal", "dwa"):
        config = dataclasses.replace(base, scheme=scheme)
        cold()
        t_loop, looped = timed(lambda: loop(config, data, seeds, rates))
        warm_loop = median_time(lambda: loop(config, data, seeds, rates), args.reps)
        cold()
        t_grid, gridded = timed(lambda: grid(config, data, seeds, rates))
        warm_grid = median_time(lambda: grid(config, data, seeds, rates), args.reps)

        def rel(a, b):
            a, b = np.asarray(a, float), np.asarray(b, float)
            return float(np.nanmax(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))

        # leading axes (G, S), as the grid's (the final states hold PRNG keys: not stacked)
        looped_test = np.stack([np.asarray(r.test.mse) for r in looped])
        looped_losses = np.stack([np.asarray(r.history.task_losses) for r in looped])
        d_test = rel(gridded.test.mse, looped_test)
        d_loss = rel(gridded.history.task_losses, looped_losses)
        print(f"| {scheme} | {t_loop:.2f} | {t_grid:.2f} | {t_grid / t_loop:.2f} | {warm_loop:.3f} | {warm_grid:.3f} | "
              f"{warm_grid / warm_loop:.2f} | {d_test:.1e} | {d_loss:.1e} |")
    load1 = os.getloadavg()
    print(f"\nload average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
