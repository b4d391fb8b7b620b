"""Sweeps: a 64-point (lam1, lam2) grid on Exam, against 64 separate ``fit`` calls, in one run.

The grid is ``lam1=1e-3:1e1:8:log lam2=1e-3:1e1:8:log`` on one seed's split of Exam (65 schools; 20 % of
each school's pupils for validation, 20 % for test, :func:`mtl_jax.runner.sweep.split_by_task`), squared
loss, relative duality gap ``--tol`` (1e-6, ``fit``'s default). Printed, side by side:

* **64 cold fits**: ``mtl_jax.fit`` on the training rows, point by point, each call compiling afresh as
  a user running one fit per process does (before every call the package's program cache, JAX's
  in-memory caches and the step-size cache are cleared, so each call traces, lowers and compiles its
  program again; data loading and Python start-up are not counted). The validation error of each
  point then selects the point (:func:`mtl_jax.runner.sweep.select`, the sweep's rule).
* **64 fits in one process**: the same loop without the clearing (the first call compiles, the
  other 63 reuse its program): what a loop in one Python session costs.
* **sweep, path** (the CPU strategy): :func:`mtl_jax.runner.sweep.sweep` with the caches cleared first,
  so compilation is included; then again warm (median of ``--reps``).
* **sweep, batched** (the GPU strategy, on this CPU for reference): the 64 points in one ``vmap``ped
  program, compile included, then warm.
* **sweep, path, 5 seeds**: the whole 320-point job of ``seeds=5``, compile included.

The persistent compilation cache is **disabled** for the whole run (``MTL_JAX_NO_COMPILE_CACHE=1`` and
``jax_compilation_cache_dir`` unset): with a cache, even one pointed at an empty temporary folder, the
first cold fit would fill it and the other 63 would load instead of compiling, which is no longer a
cold call (and writing the cache would be counted in the first).

The ratio ``sweep path (compile included) / 64 cold fits`` is the target (<= 0.5), with the same
selected point. The line also gives the ratio against the one-process loop, the largest difference in
W and J between the sweep and the separate fits, and the machine's load average.

    python benchmarks/bench_sweep.py              # ~2-3 minutes on 2 CPU cores (the cold loop dominates)
    python benchmarks/bench_sweep.py --quick      # 4 x 4 grid, smoke test
"""
from __future__ import annotations

import argparse
import os
import time

os.environ["MTL_JAX_NO_COMPILE_CACHE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from common import machine_line, timed  # noqa: E402

import mtl_jax  # noqa: E402
from mtl_jax import compilation  # noqa: E402
from mtl_jax.data.school import load_exam  # noqa: E402
from mtl_jax.runner.sweep import evaluate, parse_grid, select, split_by_task, sweep  # noqa: E402
from mtl_jax.solvers import base, centralized  # noqa: E402


def cold():
    """Forget every compiled program and cached step size: the next solve compiles as in a new process."""
    base.clear_cache()
    centralized._LMAX_CACHE.clear()
    jax.clear_caches()


def fit_loop(X, y, task, train, val, points, tol, *, fresh):
    """Fits point by point; returns (seconds, W (P, m, d), J (P,), compile seconds (P,), val metric (P,))."""
    Ws, Js, comp = [], [], []
    t0 = time.perf_counter()
    for lam1, lam2 in points:
        if fresh:
            cold()
        r = mtl_jax.fit(X[train], y[train], task[train], lam1=float(lam1), lam2=float(lam2), tol=tol)
        Ws.append(r.W)
        Js.append(r.objective)
        comp.append(r.compile_seconds)
    W = np.stack(Ws)
    v = evaluate(W, X[val], y[val], task[val], "squared")  # inside the timing: the sweep computes it too
    return time.perf_counter() - t0, W, np.array(Js), np.array(comp), v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 4 x 4 grid (smoke test)")
    p.add_argument("--tol", type=float, default=1e-6, help="relative duality gap of every solve (default 1e-6)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the warm timings (median)")
    args = p.parse_args(argv)
    compilation.disable_compilation_cache()

    n = 4 if args.quick else 8
    spec = f"lam1=1e-3:1e1:{n}:log lam2=1e-3:1e1:{n}:log"
    grid = parse_grid(spec)
    points = grid.points()
    P = len(points)
    X, y, task, _ = load_exam()
    train, val, test = split_by_task(task, 0)
    load0 = os.getloadavg()
    print(machine_line(f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at the start"))
    print(f"Exam, {len(points)} points ({spec}), seed 0: {train.sum()} train / {val.sum()} val / {test.sum()} test rows, "
          f"tol {args.tol:g}, persistent compile cache disabled\n")

    t_cold, W_fit, J_fit, comp_cold, v_fit = fit_loop(X, y, task, train, val, points, args.tol, fresh=True)
    sel_fit = select(v_fit, points)
    cold()
    t_loop, _, _, comp_loop, _ = fit_loop(X, y, task, train, val, points, args.tol, fresh=False)

    cold()
    t_path, res = timed(lambda: sweep(X, y, task, grid._replace(seeds=(0,)), tol=args.tol, strategy="path"))
    warm_path = [timed(lambda: sweep(X, y, task, grid, tol=args.tol, strategy="path"))[0] for _ in range(args.reps)]
    cold()
    t_batch, resb = timed(lambda: sweep(X, y, task, grid, tol=args.tol, strategy="batched"))
    warm_batch = [timed(lambda: sweep(X, y, task, grid, tol=args.tol, strategy="batched"))[0]
                  for _ in range(max(1, args.reps - 2))]
    cold()
    t_five, res5 = timed(lambda: sweep(X, y, task, grid._replace(seeds=tuple(range(5))), tol=args.tol,
                                       strategy="path"))
    load1 = os.getloadavg()

    dW = np.abs(res.W[0] - W_fit).max()
    dWb = np.abs(resb.W[0] - W_fit).max()
    dJ = np.max(np.abs(res.objective[0] - J_fit) / np.abs(J_fit))
    lam1 = points[:, 0]
    bound = np.max(2 * np.sqrt(2 * np.maximum(res.gap[0], resb.gap[0]) / lam1))

    def show(p):
        return f"lam1={points[p, 0]:.4g}, lam2={points[p, 1]:.4g}"

    rows = [
        (f"{P} cold fits (compile per call)", t_cold, f"compile {comp_cold.sum():.2f} s ({comp_cold.mean():.2f} s/call)",
         show(sel_fit)),
        (f"{P} fits in one process", t_loop, f"compile {comp_loop.sum():.2f} s", show(sel_fit)),
        ("sweep, path (CPU default), compile incl.", t_path, f"compile {res.compile_seconds:.2f} s, "
         f"{int(res.iterations.sum())} iterations", show(res.selected[0])),
        ("sweep, path, warm (median)", float(np.median(warm_path)), "", ""),
        ("sweep, batched (GPU default), compile incl.", t_batch, f"compile {resb.compile_seconds:.2f} s, "
         f"{int(resb.iterations.sum())} iterations, batch runs {int(resb.iterations.max())}", show(resb.selected[0])),
        ("sweep, batched, warm (median)", float(np.median(warm_batch)), "", ""),
        (f"sweep, path, 5 seeds x {P} points, compile incl.", t_five, f"compile {res5.compile_seconds:.2f} s",
         "test mse {mean:.4f} +- {std:.4f}".format(**res5.test_summary())),
    ]
    print("| run | seconds | notes | selected |")
    print("|---|---:|---|---|")
    for name, sec, note, sel in rows:
        print(f"| {name} | {sec:.3f} | {note} | {sel} |")
    same = sel_fit == res.selected[0] == resb.selected[0]
    print(f"\nratio sweep path (compile incl.) / {P} cold fits: {t_path / t_cold:.3f} (target <= 0.5: "
          f"{'met' if t_path <= 0.5 * t_cold else 'NOT met'}); same selected point: {same}")
    print(f"ratio sweep path (compile incl.) / {P} fits in one process: {t_path / t_loop:.3f}; "
          f"warm sweep / warm loop part ({t_loop - comp_loop.sum():.3f} s): "
          f"{np.median(warm_path) / max(t_loop - comp_loop.sum(), 1e-9):.3f}")
    print(f"ratio sweep batched (compile incl.) / sweep path (compile incl.) on this CPU: {t_batch / t_path:.2f}")
    print(f"sweep vs separate fits: max |dW| path {dW:.2e}, batched {dWb:.2e} (certified bound 2 sqrt(2 gap / lam1) "
          f"<= {bound:.2e}); max relative |dJ| {dJ:.2e}")
    print(f"load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
