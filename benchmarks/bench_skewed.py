"""Long-tailed task sizes: the chunked Sites layout against equal task sizes of the same N, and against padding.

The issue's case: m = 1000 tasks, task 0 with 20,000 rows and the others one row each, d = 5 (X = 0.84 MB);
padded to the largest task, X would be 1000 x 20,000 x 5 (0.8 GB). It prints, from one run:

* warm ``mtl_jax.fit`` (squared loss, tol 1e-6; median of ``--reps`` after a warm-up, interleaved) on the
  skewed data (``layout="auto"`` chunks it) and on the same rows with equal task sizes (21 rows per task,
  the same N; ``auto`` pads it): seconds, iterations, milliseconds per iteration, and the ratios (target:
  skewed within 2x of equal);
* the same for hinge loss (the dual APG, one step size per site);
* the old padded layout on the skewed data (``to_sites(layout="padded")`` + ``centralized.solve``, one run):
  layout seconds, seconds per iteration;
* per-iteration time of padded and chunked layouts side by side (interleaved) on Exam (65 schools, 3.2 N
  when padded) and on a Pareto-tailed problem (m = 5000, d = 50; chunked against its equal-size twin);
* in a fresh process per contender: the first fit and the peak resident memory (VmHWM) against
  3 x data + 0.6 GiB.

    python benchmarks/bench_skewed.py            # about 2-3 minutes on 2 CPU cores
    python benchmarks/bench_skewed.py --quick    # fewer repetitions, no Pareto problem
"""
from __future__ import annotations

import argparse
import json
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import fresh_process, machine_line, peak_rss_gib  # noqa: E402

import mtl_jax  # noqa: E402
from mtl_jax.data.school import load_exam  # noqa: E402
from mtl_jax.data.sites import to_sites  # noqa: E402
from mtl_jax.solvers import centralized  # noqa: E402

LAM1, LAM2 = 0.1, 1.0


def skewed_problem(m=1000, big=20_000, d=5, seed=0):
    rng = np.random.default_rng(seed)
    task = rng.permutation(np.repeat(np.arange(m), [big] + [1] * (m - 1)))
    X = rng.normal(size=(task.size, d))
    y = np.sum(X * rng.normal(size=(m, d))[task], axis=1) + 0.1 * rng.normal(size=task.size)
    return X, y, task


def equal_twin(X, y, task):
    """The same rows with equal task sizes (the first N mod m tasks one row more): the same N, d and m."""
    m = int(task.max()) + 1
    return X, y, np.arange(len(y)) % m


def pareto_problem(m=5000, d=50, seed=0):
    rng = np.random.default_rng(seed)
    sizes = np.clip((rng.pareto(1.2, m) * 5).astype(int), 1, 5000)
    task = rng.permutation(np.repeat(np.arange(m), sizes))
    X = rng.normal(size=(task.size, d))
    y = np.sum(X * rng.normal(size=(m, d))[task], axis=1) + 0.1 * rng.normal(size=task.size)
    return X, y, task


def problem(key):
    if key.startswith("skewed"):
        return skewed_problem()
    if key == "equal":
        return equal_twin(*skewed_problem())
    raise ValueError(key)


def describe(task):
    counts = np.bincount(task)
    return (f"m = {counts.size}, N = {counts.sum()}, task sizes {counts.min()}-{counts.max()}, "
            f"padded rows / N = {counts.size * counts.max() / counts.sum():.1f}")


def layout_of(X, y, task):
    s = to_sites(X, y, task)
    if s.chunked:
        return f"chunked, {s.num_blocks} chunks of {s.n_max} rows ({s.X.size / X.size:.2f} N rows)"
    return f"padded, {s.num_sites} x {s.n_max} ({s.X.size / X.size:.2f} N rows)"


def warm_fits(contenders, reps, **kw):
    """Median seconds of a warm mtl_jax.fit per contender, interleaved; and the last result of each."""
    for X, y, task in contenders.values():
        mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, **kw)  # compile, and lmax for the data
    times = {k: [] for k in contenders}
    results = {}
    for _ in range(reps):
        for k, (X, y, task) in contenders.items():
            t0 = time.perf_counter()
            results[k] = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2, **kw)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, results


def bench_fits(reps):
    X, y, task = skewed_problem()
    Xe, ye, te = equal_twin(X, y, task)
    print(f"\n## the issue's skewed case: {describe(task)}, d = {X.shape[1]}, X = {X.nbytes / 1e6:.2f} MB")
    print(f"skewed: {layout_of(X, y, task)}; equal twin ({describe(te)}): {layout_of(Xe, ye, te)}")
    rows = []
    times, res = warm_fits({"skewed": (X, y, task), "equal": (Xe, ye, te)}, reps)
    rows.append(("squared, tol 1e-6", times, res))
    ys = np.where(y >= 0, 1.0, -1.0)
    times_h, res_h = warm_fits({"skewed": (X, ys, task), "equal": (Xe, ys, te)}, reps, loss="hinge")
    rows.append(("hinge (dual), tol 1e-6", times_h, res_h))
    print(f"warm mtl_jax.fit, median of {reps} (interleaved):")
    print("| loss | skewed s (iterations, ms/iter) | equal s (iterations, ms/iter) | ratio | ratio per iteration |")
    print("|---|---|---|---|---|")
    for name, t, r in rows:
        per = {k: t[k] / r[k].iterations * 1e3 for k in t}
        print(f"| {name} | {t['skewed']:.4f} ({r['skewed'].iterations}, {per['skewed']:.3f}) | {t['equal']:.4f} "
              f"({r['equal'].iterations}, {per['equal']:.3f}) | {t['skewed'] / t['equal']:.2f}x | "
              f"{per['skewed'] / per['equal']:.2f}x |")
    for name, t, r in rows:
        print(f"target fit time within 2x of equal sizes ({name}): "
              f"{'met' if t['skewed'] <= 2 * t['equal'] else 'NOT met'} ({t['skewed'] / t['equal']:.2f}x; per iteration "
              f"{t['skewed'] / r['skewed'].iterations / (t['equal'] / r['equal'].iterations):.2f}x; "
              f"converged {r['skewed'].converged} / {r['equal'].converged})")

    # the old layout: every task padded to 20,000 rows
    t0 = time.perf_counter()
    padded = to_sites(X, y, task, layout="padded")
    t_layout = time.perf_counter() - t0
    out = centralized.solve(padded, lam1=LAM1, lam2=LAM2, tol=1e-6)
    chunked_fit = res["skewed"]
    print(f"old padded layout (one run): X {padded.X.shape} = {padded.X.nbytes / 2**30:.2f} GiB, layout {t_layout:.2f} s, "
          f"compile {out.compile_seconds:.2f} s, solve {out.solve_seconds:.2f} s for {out.iterations} iterations "
          f"({out.solve_seconds / out.iterations * 1e3:.0f} ms/iter); chunked fit {times['skewed']:.4f} s all "
          f"included: {(t_layout + out.solve_seconds) / times['skewed']:.0f}x faster; same J: relative difference "
          f"{abs(out.objective - chunked_fit.objective) / chunked_fit.objective:.1e} (both certified to 1e-6)")
    del padded


def apg_executable(sites, iters):
    """The compiled APG program (squared loss, ``iters`` iterations, tol 0) and its arguments."""
    m, d, dt = sites.num_sites, sites.dim, sites.X.dtype
    lmax = centralized.site_lmax(sites)
    args = (sites, jnp.zeros((m, d), dt), jnp.zeros(sites.y.shape, dt), jnp.asarray(LAM1, dt), jnp.asarray(LAM2, dt),
            lmax, jnp.asarray(0.0, dt), jnp.asarray(iters, jnp.int32))
    return centralized.apg_program.lower(*args, loss="squared", dual=False, history_size=iters).compile(), args


def per_iteration_ms(sites_list, iters=30, reps=7):
    """Warm ms per iteration of the compiled APG program for each Sites, interleaved, LAPACK on one thread."""
    programs = [apg_executable(s, iters) for s in sites_list]
    times = [[] for _ in programs]
    with centralized.one_blas_thread():
        for exe, args in programs:
            jax.block_until_ready(exe(*args))
        for _ in range(reps):
            for (exe, args), ts in zip(programs, times):
                t0 = time.perf_counter()
                jax.block_until_ready(exe(*args))
                ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) / iters * 1e3 for ts in times]


def bench_layouts(quick):
    print("\n## per iteration, layouts side by side (compiled APG, squared loss, 30 iterations, median of 7, interleaved)")
    print("| problem | contender | rows / N | ms per iteration |")
    print("|---|---|---|---|")
    X, y, task, _ = load_exam()
    contenders = [("padded (auto: X is small)", to_sites(X, y, task, layout="padded")),
                  ("chunked", to_sites(X, y, task, layout="chunked"))]
    cases = [(f"Exam ({describe(task)})", X, contenders)]
    if not quick:
        X, y, task = pareto_problem()
        contenders = [("chunked (auto)", to_sites(X, y, task)),
                      ("equal sizes, same N (padded)", to_sites(X, y, np.arange(len(y)) % (task.max() + 1)))]
        cases.append((f"Pareto d = 50 ({describe(task)})", X, contenders))
    for problem_name, X, contenders in cases:
        for (name, s), ms in zip(contenders, per_iteration_ms([s for _, s in contenders])):
            print(f"| {problem_name} | {name}{f', chunk {s.n_max}' if s.chunked else ''} | {s.X.size / X.size:.2f} | "
                  f"{ms:.3f} |")


def child(key):
    X, y, task = problem(key)
    data_gib = (X.nbytes + y.nbytes + task.nbytes) / 2**30
    t0 = time.perf_counter()
    if key == "skewed-padded":
        res = centralized.solve(to_sites(X, y, task, layout="padded"), lam1=LAM1, lam2=LAM2)
    else:
        res = mtl_jax.fit(X, y, task, lam1=LAM1, lam2=LAM2)
    first = time.perf_counter() - t0
    print(json.dumps(dict(first_fit_s=first, compile_s=res.compile_seconds, peak_gib=peak_rss_gib(),
                          data_gib=data_gib)))


def bench_memory(with_padded):
    print("\n## fresh process per contender: first fit (no persistent cache) and peak resident memory")
    print("| contender | first fit s (compile s) | peak RSS GiB | data GiB | 3 x data + 0.6 GiB | target |")
    print("|---|---|---|---|---|---|")
    keys = ["skewed", "equal"] + (["skewed-padded"] if with_padded else [])
    for key in keys:
        r = fresh_process(__file__, key)
        limit = 3 * r["data_gib"] + 0.6
        name = {"skewed": "skewed, mtl_jax.fit (chunked)", "equal": "equal sizes, mtl_jax.fit (padded)",
                "skewed-padded": "skewed, old padded layout + solve"}[key]
        print(f"| {name} | {r['first_fit_s']:.2f} ({r['compile_s']:.2f}) | {r['peak_gib']:.2f} | {r['data_gib']:.4f} | "
              f"{limit:.2f} | {'met' if r['peak_gib'] <= limit else 'NOT met'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no Pareto problem")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each warm fit (default 7, quick 3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    print(f"# bench_skewed  {time.strftime('%Y-%m-%d %H:%M')}")
    print(machine_line(f"lam1 = {LAM1}, lam2 = {LAM2}"))
    bench_fits(args.reps or (3 if args.quick else 7))
    bench_layouts(args.quick)
    bench_memory(with_padded=True)


if __name__ == "__main__":
    main()
