"""Centralized MTRL: the fast certified solver against the classic alternation and plain NumPy.

For each problem (Exam: 65 schools; synthetic: m = 1000 tasks, d = 50) it prints, from one run:
iterations and seconds for the fast solver (JAX, compiled) to reach 1e-4 and 1e-6 relative accuracy of
J (against an optimum certified to 1e-10 by the duality gap), the same iteration in plain NumPy, the
accuracy that the alternating scheme reaches in the same time and in a much longer one, the compile
time on its own, and the ratios. Then the fast solver alone at m = 100,000 tasks with peak memory.

    python benchmarks/bench_centralized.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_centralized.py --quick    # small sizes, seconds: a smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from numpy_apg import numpy_apg_squared  # noqa: E402

from mtl_jax.data.school import load_exam  # noqa: E402
from mtl_jax.data.sites import to_sites  # noqa: E402
from mtl_jax.data.synthetic import make_clustered_tasks  # noqa: E402
from mtl_jax.solvers import centralized  # noqa: E402
from mtl_jax.solvers.apg import gram_lmax, primal_lipschitz  # noqa: E402

LAM1, LAM2 = 0.1, 1.0


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def numpy_time(fn, reps):
    """Best of NumPy's default BLAS threading and one BLAS thread (OpenBLAS threads can thrash on a
    small shared machine: 12x slower here), so the reference is NumPy at its best. Returns (s, setting)."""
    timings = {"default threads": median_time(fn, reps)}
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return timings["default threads"], "default threads"
    with threadpool_limits(limits=1):
        timings["1 BLAS thread"] = median_time(fn, reps)
    best = min(timings, key=timings.get)
    return timings[best], best


def first_reaching(objectives, optimum, target):
    rel = (np.asarray(objectives) - optimum) / optimum
    hit = np.nonzero(rel <= target)[0]
    return int(hit[0]) + 1 if len(hit) else None


def compiled_apg(sites, max_iter):
    dtype = sites.X.dtype
    m, n, d = sites.X.shape
    lmax = centralized.site_lmax(sites.X)
    args = (sites, jnp.zeros((m, d), dtype), jnp.zeros((m, n), dtype), jnp.asarray(LAM1, dtype),
            jnp.asarray(LAM2, dtype), lmax, jnp.asarray(0.0, dtype), jnp.asarray(max_iter, jnp.int32))
    t0 = time.perf_counter()
    exe = centralized.apg_program.lower(*args, loss="squared", dual=False, history_size=max_iter).compile()
    return exe, args, time.perf_counter() - t0


def bench_problem(name, X, y, task, *, reps, alt_iters):
    sites = to_sites(X, y, task)
    m, n_max, d = sites.X.shape
    print(f"\n## {name}: m = {m} tasks, d = {d}, N = {len(y)} samples (padded to {m} x {n_max})")

    ref = centralized.solve(sites, lam1=LAM1, lam2=LAM2, tol=1e-11, max_iter=20000)
    optimum = ref.objective
    print(f"optimum J* = {optimum:.12g} (relative duality gap {ref.gap / optimum:.1e}, {ref.iterations} iterations)")
    objs = [r.objective for r in ref.history]
    rows = []
    compile_s = None
    numpy_inputs = [np.asarray(a) for a in (sites.X, sites.y, sites.mask, sites.counts)]
    lipschitz = float(primal_lipschitz("squared", jax.jit(gram_lmax)(sites.X), sites.counts))
    for target in (1e-4, 1e-6):
        k = first_reaching(objs, optimum, target)
        exe, args, c_s = compiled_apg(sites, k)
        compile_s = c_s if compile_s is None else max(compile_s, c_s)
        t_jax = median_time(lambda: jax.block_until_ready(exe(*args)), reps)
        W_np, objs_np, _ = numpy_apg_squared(*numpy_inputs, LAM1, LAM2, lipschitz, max_iter=k)
        t_np, np_setting = numpy_time(lambda: numpy_apg_squared(*numpy_inputs, LAM1, LAM2, lipschitz, max_iter=k),
                                      max(1, reps // 2))
        res_jax = exe(*args)
        agree = abs(float(res_jax.state.objective) - objs_np[-1]) / optimum
        rows.append((target, k, t_jax, t_np, np_setting, agree))

    alt = centralized.solve(sites, lam1=LAM1, lam2=LAM2, method="alternating", tol=0.0, max_iter=alt_iters)
    alt_objs = np.array([r.objective for r in alt.history])
    alt_secs = np.array([r.seconds for r in alt.history])
    t_fast6 = rows[-1][2]
    within = alt_secs <= t_fast6
    acc_same_time = (alt_objs[within].min() - optimum) / optimum if within.any() else float("nan")
    acc_long = (alt_objs.min() - optimum) / optimum

    print(f"compile (fast solver, once per shape): {compile_s:.2f} s")
    print("| target | iterations | JAX s | NumPy s (best setting) | NumPy / JAX | same J (rel diff) |")
    print("|---|---|---|---|---|---|")
    for target, k, t_jax, t_np, setting, agree in rows:
        print(f"| {target:.0e} | {k} | {t_jax:.4f} | {t_np:.4f} ({setting}) | {t_np / t_jax:.2f}x | {agree:.1e} |")
    print(f"alternating: after {t_fast6:.4f} s (the fast solver's time to 1e-6): "
          f"{'no alternation finished' if not within.any() else f'{acc_same_time:.2e} above J*'}; "
          f"after {len(alt_objs)} alternations ({alt_secs[-1]:.2f} s): {acc_long:.2e} above J*; "
          f"reached 1e-4: {'yes' if acc_long <= 1e-4 else 'no'}")
    return rows, compile_s


def bench_many_tasks(m, d, n):
    X, y, task, _ = make_clustered_tasks(m, d, samples_per_task=n, seed=0)
    t0 = time.perf_counter()
    sites = to_sites(X, y, task)
    del X, y, task
    t_layout = time.perf_counter() - t0
    out = centralized.solve(sites, lam1=LAM1, lam2=LAM2, tol=1e-6, max_iter=2000)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dense_gib = m * m * 8 / 2**30
    print(f"\n## many tasks: m = {m}, d = {d}, n = {n} per task (fast solver, tol 1e-6)")
    print(f"layout {t_layout:.1f} s, compile {out.compile_seconds:.2f} s, solve {out.solve_seconds:.2f} s, "
          f"{out.iterations} iterations, relative gap {out.gap / out.objective:.1e}, converged {out.converged}")
    print(f"peak resident memory {peak_gib:.2f} GiB (a dense m x m Omega alone would need {dense_gib:.0f} GiB); "
          f"Omega kept factored: U {out.omega.U.shape}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--many-tasks", type=int, default=100_000, help="m of the large run (0 skips it)")
    args = parser.parse_args()

    print(f"# bench_centralized  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, devices {jax.devices()}, "
          f"numpy {np.__version__}; float64; lam1 = {LAM1}, lam2 = {LAM2}, squared loss")
    reps = 3 if args.quick else 7
    X, y, task, _ = load_exam()
    bench_problem("Exam (school data)", X, y, task, reps=reps, alt_iters=30 if args.quick else 300)
    m, d = (100, 10) if args.quick else (1000, 50)
    X, y, task, _ = make_clustered_tasks(m, d, num_clusters=5, samples_per_task=(10, 50), noise=0.5, seed=0)
    bench_problem(f"synthetic m = {m}, d = {d}", X, y, task, reps=reps, alt_iters=10 if args.quick else 40)
    if args.many_tasks:
        bench_many_tasks(1000 if args.quick else args.many_tasks, 10 if args.quick else 50, 10)


if __name__ == "__main__":
    main()
