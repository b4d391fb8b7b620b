"""DMTRL at scale: seconds per round for m = 10^3 .. 10^5 sites against the memory-bandwidth floor, where a
round's time goes at m = 10^5, and 1 vs 2 vs 4 launched processes on this host.

1. Time per round vs m (n = 100 samples per site, d = 20, float32 with ``jax_enable_x64`` off, squared loss,
   joint scheme, one local pass, random order). ``Sites`` is built directly (the padded layout) from a seeded
   generator. A round *with the certificate* (gap included) is timed as the jitted ``dmtrl.run_rounds`` with
   ``max_rounds`` R = 1 and R = 6 (tol = 0, so no early stop): per round = (t6 - t1) / 5, median of 3; the
   compile time is separate. The floor: a pass must read every site's data once (X: m n d 4 bytes, plus y
   and mask: m n 4 bytes each); the read bandwidth is measured in the same process on the same X (a jitted
   ``jnp.sum(X)`` and NumPy's ``X.sum()``; the faster one counts), floor = bytes / bandwidth and
   fraction = floor / round time. Target (the issue): m = 10^5 at most 0.4 s per round, gap included. Each m
   runs in a fresh process, so its peak resident memory (VmHWM) is its own.
2. Where the time goes at m = 10^5: ``dmtrl.local_sdca`` alone (random and cyclic order), the data layout of
   the pass (``dmtrl.sites_rows``, made once per ``run_rounds`` call, so outside the per-round figure), the
   pass's multiply-adds done densely (X w and X^T alpha), and the server step with the certificate alone
   (sums, server map, certificate).
3. 1 vs 2 vs 4 processes on this host: ``python -m mtl_jax launch --processes P -- fit ... --solver dmtrl
   --max-iter 50 --tol 0`` on a synthetic data file (float64, the CLI's default): wall time of the launch
   (python start, imports, compile and solve included), solve seconds per round and compile seconds from the
   run folder's manifest summary, and the largest difference of W from P = 1 (to be <= 1e-6). The bytes the
   processes exchange per round are *estimated from the compiled program*: ``dmtrl.round_step`` on a mesh of P
   devices (forced host devices in a child process, the same sharded program the launched workers run) is
   compiled and its collectives (all-reduce, all-gather, ...) are read from the optimized HLO with their
   shapes; payload = the sum of their result sizes; a ring all-reduce moves 2 (P - 1) / P of its payload
   per process.

    python benchmarks/bench_dmtrl_scale.py                # everything (~10 minutes on 2 CPU cores)
    python benchmarks/bench_dmtrl_scale.py --quick        # m up to 10^4, small launch: a smoke test
    python benchmarks/bench_dmtrl_scale.py --parts 1,3    # some parts only
    python benchmarks/bench_dmtrl_scale.py --parts 1 --sizes 65536,262144,1048576   # on a GPU (device_dmtrl.sh)

On a CPU with several cores part 1 also times the largest m with one CPU device per core (``jax_num_cpu_devices``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial

import jax

jax.config.update("jax_enable_x64", False)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import fresh_process, machine_line, median_time, peak_rss_gib  # noqa: E402

N_PER_SITE, DIM = 100, 20
LAM1, LAM2 = 0.1, 1.0
TARGET_S = 0.4
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# --- 1 and 2: a child process per m ------------------------------------------------------------------

def make_sites(m, n=N_PER_SITE, d=DIM, seed=0):
    """Padded ``Sites`` straight from a seeded generator (float32): y = <w_t, x> + 0.1 noise, every site full."""
    from mtl_jax.data.sites import Sites
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, n, d), dtype=np.float32)
    W_true = rng.standard_normal((m, d), dtype=np.float32)
    y = np.einsum("tnd,td->tn", X, W_true) + np.float32(0.1) * rng.standard_normal((m, n), dtype=np.float32)
    sites = Sites(jnp.asarray(X), jnp.asarray(y), jnp.ones((m, n), jnp.float32), jnp.full((m,), n, jnp.int32),
                  jnp.arange(m * n, dtype=jnp.int32).reshape(m, n))
    return sites, X


def setup(sites):
    import mtl_jax.mtrl
    from mtl_jax.solvers import dmtrl
    m, f32 = sites.num_sites, jnp.float32
    params = dmtrl.Params(*(jnp.asarray(v, f32) for v in (LAM1, LAM2, 0.0, mtl_jax.mtrl.DEFAULT_EPS)),
                          jnp.asarray(dmtrl._NEVER, jnp.int32), jnp.asarray(-1.0, f32))
    systems = dmtrl.Systems(jnp.ones((m,), jnp.int32), *(jnp.asarray(v, f32) for v in (1.0, 0.0, 0.25, 0.0)),
                            jnp.full((m,), dmtrl.DEFAULT_SPEED, f32),
                            *(jnp.asarray(v, f32) for v in (dmtrl.DEFAULT_LATENCY, dmtrl.DEFAULT_BANDWIDTH)))
    state = dmtrl.init_program(sites, params, jnp.zeros(sites.y.shape, f32), jnp.uint32(0), None,
                               loss="squared", scheme="joint", q_rule="lambda_max")
    return params, systems, jax.block_until_ready(state)


def server_step(state, alphas, dvs, participates, sites, params, *, loss, scheme):
    """The part of ``round_step`` after the local passes: the sums, the server map and the certificate."""
    from mtl_jax.data.sites import site_sums
    from mtl_jax.losses import get_loss
    from mtl_jax.solvers import dmtrl
    loss_ = get_loss(loss)
    alpha = jnp.where(participates[:, None], alphas, state.alpha)
    V = state.V + site_sums(jnp.where(participates[:, None], dvs, 0.0), sites)
    W, reg_conj, reg_at_W = dmtrl.server_map(V, state.omega, params, scheme=scheme)
    return alpha, V, W, dmtrl.certify(alpha, V, W, reg_conj, reg_at_W, sites, params, loss=loss_, scheme=scheme)


def child_round(m, reps, breakdown, devices=1):
    if devices > 1:   # before JAX starts its CPU backend: one CPU device per core, the sites split over them
        jax.config.update("jax_num_cpu_devices", devices)
    from mtl_jax import distributed
    from mtl_jax.solvers import dmtrl
    t0 = time.perf_counter()
    sites, X_np = make_sites(m)
    data_s = time.perf_counter() - t0
    params, systems, state = setup(sites)
    mesh = distributed.site_mesh(devices) if devices > 1 else None
    if mesh is not None:
        sites, systems, alpha, _ = dmtrl._spread(mesh, sites, systems, state.alpha, None)
        state = state._replace(alpha=alpha)
    rows = jax.block_until_ready(dmtrl.layout_program(sites, mesh))  # once per solve, as dmtrl.solve does
    static = dict(loss="squared", scheme="joint", q_rule="lambda_max", order="random", history_size=8, mesh=mesh)
    args = lambda R: (state, sites, params, systems, jnp.asarray(R, jnp.int32), jnp.asarray(False), rows)
    t0 = time.perf_counter()
    program = dmtrl.run_rounds.lower(*args(1), **static).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(program(*args(1)))  # warm
    t1s, t6s, gaps = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(program(*args(1)))
        t1s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = jax.block_until_ready(program(*args(6)))
        t6s.append(time.perf_counter() - t0)
        assert int(out.rounds) == 6
        gaps.append(float(out.state.gap))
    per_round = float(np.median([(b - a) / 5 for a, b in zip(t1s, t6s)]))
    rss_round = peak_rss_gib()

    # Read bandwidth over the same X (jitted sum, NumPy sum).
    xsum = jax.jit(jnp.sum)
    t_jax = median_time(lambda: jax.block_until_ready(xsum(sites.X)), 5, warm=True)
    t_np = median_time(lambda: X_np.sum(), 3, warm=True)
    x_bytes = X_np.nbytes
    res = dict(m=m, devices=devices, data_s=data_s, compile_s=compile_s, t1=float(np.median(t1s)), t6=float(np.median(t6s)),
               per_round=per_round, per_round_all=[(b - a) / 5 for a, b in zip(t1s, t6s)], gap6=gaps[-1],
               bytes=x_bytes + 2 * sites.y.size * 4, x_bytes=x_bytes, bw_jax=x_bytes / t_jax,
               bw_numpy=x_bytes / t_np, peak_rss_gib=rss_round)
    if breakdown and mesh is None:
        res["breakdown"] = child_breakdown(sites, params, state, reps)
        res["peak_rss_after_breakdown_gib"] = peak_rss_gib()
    return res


def child_breakdown(sites, params, state, reps):
    from mtl_jax.losses import get_loss
    from mtl_jax.solvers import dmtrl
    m, n, _ = sites.X.shape
    loss_ = get_loss("squared")
    layout = jax.jit(dmtrl.sites_rows)
    rows = jax.block_until_ready(layout(sites))
    budget = jnp.full((m,), n, jnp.int32)
    stream = dmtrl.round_stream(jnp.uint32(0), 0, 1)
    args = (rows, state.alpha, state.W, state.q, budget, stream)
    out = {"tile": int(rows.X.shape[-1])}
    for name, cyclic in (("local_random", False), ("local_cyclic", True)):
        f = jax.jit(partial(dmtrl.local_sdca, loss=loss_, cyclic=cyclic))
        out[name] = median_time(lambda: jax.block_until_ready(f(*args)), reps, warm=True)
    out["layout"] = median_time(lambda: jax.block_until_ready(layout(sites)), reps, warm=True)
    dense = jax.jit(lambda X, W, a: (jnp.einsum("tnd,td->tn", X, W), jnp.einsum("tnd,tn->td", X, a)))
    out["dense"] = median_time(lambda: jax.block_until_ready(dense(sites.X, state.W, state.alpha)), reps, warm=True)
    server = jax.jit(partial(server_step, loss="squared", scheme="joint"))
    live = jnp.ones((m,), bool)
    out["server"] = median_time(lambda: jax.block_until_ready(server(state, state.alpha, state.V, live, sites,
                                                                      params)), reps, warm=True)
    return out


def part1(sizes, reps):
    rows = []
    script = os.path.abspath(__file__)
    for m in sizes:
        rows.append(fresh_process(script, f"round:{m}:{reps}:{int(m == max(sizes))}:1"))
    cores = os.cpu_count() or 1
    if cores > 1 and jax.default_backend() == "cpu":   # the largest m again with one CPU device per core (jax_num_cpu_devices), sites split over them
        rows.append(fresh_process(script, f"round:{max(sizes)}:{reps}:0:{cores}"))
    print(f"\n## 1. seconds per round vs m (n = {N_PER_SITE}, d = {DIM}, float32, squared loss, joint scheme, "
          "1 local pass, random order; gap included)\n")
    print("per round = (t(R=6) - t(R=1)) / 5 of the compiled `dmtrl.run_rounds`, median of "
          f"{reps}; floor = bytes (X + y + mask) / the best measured read bandwidth; each m in a fresh process\n")
    print("| m | CPU devices | data build s | compile s | t(R=1) s | t(R=6) s | s per round | per round, each rep | ns per coord. step "
          "| bytes/pass MB | read BW jnp.sum GB/s | read BW NumPy GB/s | floor s | fraction of floor | peak RSS GiB |")
    print("|" + "---|" * 15)
    for r in rows:
        bw = max(r["bw_jax"], r["bw_numpy"])
        floor = r["bytes"] / bw
        print(f"| {r['m']:,} | {r['devices']} | {r['data_s']:.2f} | {r['compile_s']:.2f} | {r['t1']:.3f} | {r['t6']:.3f} | "
              f"{r['per_round']:.3f} | {', '.join(f'{x:.3f}' for x in r['per_round_all'])} | "
              f"{r['per_round'] / (r['m'] * N_PER_SITE) * 1e9:.0f} | {r['bytes'] / 1e6:.0f} | {r['bw_jax'] / 1e9:.1f} | "
              f"{r['bw_numpy'] / 1e9:.1f} | {floor:.4f} | {floor / r['per_round']:.1%} | {r['peak_rss_gib']:.2f} |")
    big = next(r for r in rows if r["m"] == max(sizes) and r["devices"] == 1)
    for r in rows:
        if r["m"] != big["m"]:
            continue
        verdict = "MET" if r["per_round"] <= TARGET_S else "NOT met"
        print(f"\ntarget m = {r['m']:,} <= {TARGET_S} s per round (gap included), {r['devices']} CPU device(s): "
              f"{verdict} ({r['per_round']:.3f} s, {r['per_round'] / TARGET_S:.2f}x the target); peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB (X alone {r['x_bytes'] / 2**30:.2f} GiB)", flush=True)
    return big


def part2(big):
    b = big.get("breakdown")
    if not b:
        return
    m = big["m"]
    print(f"\n## 2. where a round's time goes at m = {m:,} (median of warm calls, s)\n")
    print("| piece | s | share of the round |")
    print("|---|---|---|")
    pr = big["per_round"]
    items = [(f"local pass, random order (`local_sdca`, tiles of {b['tile']} sites)", b["local_random"]),
             ("local pass, cyclic order", b["local_cyclic"]),
             ("server step + certificate (sums, server map, J and gap)", b["server"]),
             ("the pass's multiply-adds done densely (X w, X^T alpha)", b["dense"]),
             ("the pass's data layout `dmtrl.sites_rows` (once per run_rounds call, not per round)", b["layout"]),
             ("whole round (part 1)", pr)]
    for name, t in items:
        print(f"| {name} | {t:.3f} | {t / pr:.0%} |")
    dom = "the local pass" if b["local_random"] > b["server"] else "the server step and certificate"
    print(f"\ndominant: {dom} (local pass {b['local_random']:.3f} s vs server + certificate {b['server']:.3f} s; "
          f"random - cyclic = {b['local_random'] - b['local_cyclic']:.3f} s is the price of the random order); "
          f"peak RSS after the breakdown {big['peak_rss_after_breakdown_gib']:.2f} GiB", flush=True)


# --- 3: processes ------------------------------------------------------------------------------------

def child_collectives(data, P):
    """Compile one ``round_step`` on a mesh of P (forced) host devices and list its collectives from the HLO."""
    jax.config.update("jax_enable_x64", True)
    import mtl_jax.mtrl
    from mtl_jax import distributed
    from mtl_jax.data.io import read_npz
    from mtl_jax.data.sites import to_sites
    from mtl_jax.solvers import dmtrl
    X, y, task = (np.asarray(read_npz(data)[k]) for k in ("X", "y", "task"))
    sites = to_sites(X, y, task)
    m, f64 = sites.num_sites, jnp.float64
    params = dmtrl.Params(*(jnp.asarray(v, f64) for v in (LAM1, LAM2, 0.0, mtl_jax.mtrl.DEFAULT_EPS)),
                          jnp.asarray(dmtrl._NEVER, jnp.int32), jnp.asarray(-1.0, f64))
    systems = dmtrl.Systems(jnp.ones((m,), jnp.int32), *(jnp.asarray(v, f64) for v in (1.0, 0.0, 0.25, 0.0)),
                            jnp.full((m,), dmtrl.DEFAULT_SPEED, f64),
                            *(jnp.asarray(v, f64) for v in (dmtrl.DEFAULT_LATENCY, dmtrl.DEFAULT_BANDWIDTH)))
    mesh = distributed.site_mesh(P)
    sites, systems, alpha0, _ = dmtrl._spread(mesh, sites, systems, jnp.zeros(sites.y.shape, f64), None)
    state = dmtrl.init_program(sites, params, alpha0, jnp.uint32(0), None, loss="squared", scheme="joint",
                               q_rule="lambda_max")
    step = jax.jit(partial(dmtrl.round_step, loss="squared", scheme="joint", q_rule="lambda_max", order="random",
                           mesh=mesh))
    text = step.lower(state, sites, params, systems).compile().as_text()
    sizes = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s64": 8, "u64": 8}
    found = []
    for line in text.splitlines():
        mt = re.search(r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                       r"(-start)?\(", line)
        if not mt:
            continue
        shapes = re.findall(r"(f64|f32|s32|u32|pred|s64|u64)\[([\d,]*)\]", mt.group(1))
        nbytes = sum(sizes[t] * int(np.prod([int(s) for s in dims.split(",") if s] or [1])) for t, dims in shapes)
        found.append(dict(op=mt.group(2), shapes=" ".join(f"{t}[{dims}]" for t, dims in shapes), bytes=int(nbytes)))
    return dict(P=P, m_padded=sites.num_sites, collectives=found)


def part3(m, d, samples, rounds):
    print("\n## 3. 1 vs 2 vs 4 processes on this host (`mtl-jax launch --processes P -- fit ... --solver dmtrl`)\n")
    env = dict(os.environ, MTL_JAX_NO_COMPILE_CACHE="1")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "d.npz")
        subprocess.run([sys.executable, "-m", "mtl_jax", "data", "synthetic", "--tasks", str(m), "--dim", str(d),
                        "--samples", str(samples), "--seed", "0", "--out", data], check=True, env=env,
                       capture_output=True, cwd=ROOT)
        print(f"data: `mtl-jax data synthetic --tasks {m} --dim {d} --samples {samples}` (squared loss); fit: "
              f"--lam1 {LAM1} --lam2 {LAM2} --max-iter {rounds} --tol 0, joint scheme, float64 (the CLI default), "
              "no compilation cache; one CPU device per process\n")
        from mtl_jax.runner import store
        W1 = None
        for P in (1, 2, 4):
            out = os.path.join(tmp, f"p{P}")
            cmd = [sys.executable, "-m", "mtl_jax", "launch", "--processes", str(P), "--timeout", "600", "--", "fit",
                   "--data", data, "--lam1", str(LAM1), "--lam2", str(LAM2), "--solver", "dmtrl", "--max-iter",
                   str(rounds), "--tol", "0", "--out", out]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"P = {P} failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
                continue
            run = store.read_run(out)
            W = np.asarray(run.arrays["W"])
            W1 = W if P == 1 else W1
            s = run.summary
            cols = run.columns()
            coll = None
            if P > 1:
                cenv = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={P}")
                cp = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", f"coll:{data}:{P}"],
                                    capture_output=True, text=True, env=cenv, cwd=HERE)
                coll = json.loads(cp.stdout.strip().splitlines()[-1]) if cp.returncode == 0 else None
                if coll is None:
                    print(f"collectives for P = {P} failed: {cp.stderr[-1500:]}")
            rows.append(dict(P=P, wall=wall, solve=s["solve_seconds"], compile=s["compile_seconds"],
                             it=s["iterations"], obj=s["objective"], gap=s["relative_gap"],
                             diff=float(np.max(np.abs(W - W1))) if W1 is not None else float("nan"),
                             rel=float(np.max(np.abs(W - W1)) / np.max(np.abs(W1))) if W1 is not None else 0.0,
                             devices=run.config.get("fit", {}).get("devices"), coll=coll,
                             model_bytes=float(cols["bytes"][-1]) / max(int(s["iterations"]), 1)))
    print("| P | devices | wall s (launch to exit) | compile s | solve s | solve ms per round | rounds | J | relative gap "
          "| max abs W - W(P=1) | max rel | W == P=1 to 1e-6 |")
    print("|" + "---|" * 12)
    for r in rows:
        print(f"| {r['P']} | {r['devices']} | {r['wall']:.1f} | {r['compile']:.2f} | {r['solve']:.3f} | "
              f"{r['solve'] / max(r['it'], 1) * 1e3:.2f} | {r['it']} | {r['obj']:.6g} | {r['gap']:.2e} | "
              f"{r['diff']:.1e} | {r['rel']:.1e} | {'yes' if r['rel'] <= 1e-6 else 'NO'} |")
    print("\nbytes exchanged between processes per round, from the compiled `round_step` on a mesh of P devices "
          "(its collectives in the optimized HLO; payload = the sum of their result sizes; a ring all-reduce moves "
          "2 (P - 1) / P of its payload per process):\n")
    print("| P | sites (padded) | collectives (op: shapes) | payload bytes per round | est. bytes sent per process "
          "(ring) | the solver's model of a round's messages (bytes, history) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r["coll"]
        if c is None:
            what = "none (one process)" if r["P"] == 1 else "(the compile failed)"
            print(f"| {r['P']} | - | {what} | 0 | 0 | {r['model_bytes']:.0f} |")
            continue
        ops = "; ".join(f"{x['op']}: {x['shapes']}" for x in c["collectives"]) or "none"
        payload = sum(x["bytes"] for x in c["collectives"])
        ring = sum(x["bytes"] * (2 * (r["P"] - 1) / r["P"] if x["op"] == "all-reduce" else (r["P"] - 1) / r["P"])
                   for x in c["collectives"])
        print(f"| {r['P']} | {c['m_padded']} | {ops} | {payload:,} | {ring:,.0f} | {r['model_bytes']:.0f} |")
    print("\n(the last column is `dmtrl.round_bytes`, the simulated site <-> server messages of the cost model "
          "(dv_t up, w_t down, two scalars per site), not what the processes move)", flush=True)


def child(key):
    kind, rest = key.split(":", 1)
    if kind == "round":
        m, reps, breakdown, devices = (int(x) for x in rest.split(":"))
        print(json.dumps(child_round(m, reps, bool(breakdown), devices)))
    elif kind == "coll":
        data, P = rest.rsplit(":", 1)
        print(json.dumps(child_collectives(data, int(P))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--sizes", default=None,
                    help="comma list of m for parts 1-2 (default 1000,10000,100000; on a GPU e.g. 65536,262144,1048576)")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    parts = set(a.parts.split(","))
    print(f"# DMTRL at scale, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    print(machine_line("this benchmark: float32 (jax_enable_x64 off) in parts 1-2, float64 in part 3"))
    print(f"\nload before: {os.getloadavg()}")
    if parts & {"1", "2"}:
        sizes = (10**3, 10**4) if a.quick else (10**3, 10**4, 10**5)
        if a.sizes:
            sizes = tuple(int(x) for x in a.sizes.split(","))
        big = part1(sizes, reps=3)
        if "2" in parts:
            part2(big)
    if "3" in parts:
        if a.quick:
            part3(m=64, d=5, samples=20, rounds=10)
        else:
            part3(m=500, d=10, samples=50, rounds=50)
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
