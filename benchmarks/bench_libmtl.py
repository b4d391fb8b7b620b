"""mtl_jax against LibMTL (PyTorch, CPU): per-step time of each weighting / gradient method, side by side in
one run on the same machine (issue 11: where LibMTL has the method, our step at most half of LibMTL's).

The problem is the MLP of the issue's spec (``bench_gradient_methods.py``): a shared 64-256-256 ReLU trunk,
4 linear regression heads (8 outputs each, MSE), batch 256 drawn with replacement from 4096 fixed rows,
Adam (lr 1e-3), float32. Both sides draw their data from the same NumPy generator.

* JAX: the jitted step of :func:`mtl_jax.training.make_components` for a ``TrainConfig`` with the
  matching ``scheme`` / ``gradient_method`` (a gradient method on the shared parameters twice, by default:
  ``gradient_mode="vmap"``, the config's default, and ``"loop"`` in the extra row ``name [loop]``), timed two
  ways: ``scan``, ``--steps`` steps inside one ``lax.scan`` as :func:`~mtl_jax.training.train` runs them
  (compiled ahead of time); ``call``, ``--steps`` calls of the jitted step from Python (a dispatch per
  step, as a PyTorch loop has).
* LibMTL: its own weighting classes, in a separate Python that has torch and LibMTL
  (``benchmarks/libmtl_worker.py``, started with ``--torch-python`` or ``$MTL_JAX_TORCH_PYTHON``), built and
  driven as ``LibMTL.Trainer`` does (``class MTLmodel(HPS, Weighting)``, ``model.backward(losses,
  **weight_args)`` between ``optimizer.zero_grad()`` and ``optimizer.step()``), with ``rep_grad`` as the
  method requires: False (gradients of the shared parameters) except GradDrop (rep_grad=True only) and
  the extra ``MGDA rep_grad`` row, compared with our methods at ``gradient_level="features"``.

Interleaved: for each row, ``--rounds`` rounds of [JAX scan block, JAX call block (per JAX variant), LibMTL
block] of ``--steps`` steps each (the order rotated each round), after warm-up; the medians are reported,
and "best-of" ratios from each side's fastest block (less sensitive to other jobs on a shared machine).
Threads: ``--threads 1`` (default) gives each side one thread -- ``torch.set_num_threads(1)`` and, for XLA,
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` set before JAX is imported;
``--threads N`` > 1: ``torch.set_num_threads(N)`` and XLA's default thread pool (all cores).

Rows: EW, DWA, UW, RLW, GradNorm, MGDA (+ ``MGDA rep_grad``), PCGrad, CAGrad (LibMTL 1.1.5's fails at K = 4;
``CAGrad K=3`` has both sides at 3 tasks), IMTL, GradVac, GradDrop; Nash_MTL, Aligned_MTL and FAMO only when the
worker's LibMTL has them (not the PyPI release 1.1.5; ``--libmtl-src`` points at a source tree that does).
Hyper-parameters: LibMTL's ``config.py`` defaults, ours set to match (``ROWS``).

Without a torch Python the script says so and exits 0. Setting up one: ``benchmarks/README.md``, section
"LibMTL side by side (bench_libmtl.py)".

    python benchmarks/bench_libmtl.py --torch-python /tmp/torchvenv/bin/python           # ~5-10 min
    python benchmarks/bench_libmtl.py --torch-python /tmp/torchvenv/bin/python --quick   # ~1 min
    python benchmarks/bench_libmtl.py --torch-python ... --rows EW,MGDA,PCGrad
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
SCALES = (1.0, 3.0, 0.3, 10.0)   # target scales of the tasks, as in bench_gradient_methods.py
HALF = 2.0                       # the issue's bound: LibMTL's step >= 2x ours


class Row(NamedTuple):
    label: str
    libmtl: str                 # LibMTL weighting class name
    rep_grad: bool
    weight_args: dict           # LibMTL's weight_args (its config.py defaults)
    scheme: str = "equal"
    scheme_kwargs: tuple = ()
    method: str | None = None
    method_kwargs: tuple = ()
    level: str = "params"
    tasks: int = 4


ROWS = (
    Row("EW", "EW", False, {}),
    Row("DWA", "DWA", False, {"T": 2.0}, "dwa", (("temperature", 2.0),)),
    Row("UW", "UW", False, {}, "uncertainty"),
    Row("RLW", "RLW", False, {"dist": "Normal"}, "rlw", (("std", 1.0),)),
    Row("GradNorm", "GradNorm", False, {"alpha": 1.5}, "gradnorm", (("alpha", 1.5),)),
    Row("MGDA", "MGDA", False, {"mgda_gn": "none"}, method="mgda", method_kwargs=(("normalization", "none"),)),
    Row("MGDA rep_grad", "MGDA", True, {"mgda_gn": "none"}, method="mgda",
        method_kwargs=(("normalization", "none"),), level="features"),
    Row("PCGrad", "PCGrad", False, {}, method="pcgrad"),
    Row("CAGrad", "CAGrad", False, {"calpha": 0.5, "rescale": 1}, method="cagrad",
        method_kwargs=(("c", 0.5), ("rescale", 1))),
    Row("CAGrad K=3", "CAGrad", False, {"calpha": 0.5, "rescale": 1}, method="cagrad",
        method_kwargs=(("c", 0.5), ("rescale", 1)), tasks=3),
    Row("IMTL", "IMTL", False, {}, method="imtl_g"),
    Row("GradVac", "GradVac", False, {"beta": 0.5}, method="gradvac", method_kwargs=(("beta", 0.5),)),
    Row("GradDrop rep_grad", "GradDrop", True, {"leak": 0.0}, method="graddrop",
        method_kwargs=(("leak", 0.0),), level="features"),
    # In LibMTL's later sources only (not in the PyPI release 1.1.5): timed when the worker's LibMTL has them.
    Row("Nash_MTL", "Nash_MTL", False, {"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0},
        method="nash_mtl", method_kwargs=(("max_norm", 1.0),)),
    Row("Aligned_MTL", "Aligned_MTL", False, {}, method="aligned_mtl"),
    Row("FAMO", "FAMO", False, {"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3}, "famo"),
)
ROW_NOTES = {
    "MGDA rep_grad": "LibMTL: MGDA on the gradients of the trunk's output; ours: mgda at gradient_level='features' (MGDA-UB)",
    "GradDrop rep_grad": "LibMTL's GradDrop needs rep_grad=True; ours: graddrop at gradient_level='features'",
    "CAGrad": "LibMTL 1.1.5's CAGrad hard-codes 3 tasks (x.reshape(1,3)): it fails at K = 4; row 'CAGrad K=3' has both sides at K = 3",
    "IMTL": "LibMTL's IMTL is the hybrid (IMTL-L loss scales + IMTL-G); ours: imtl_g",
    "GradNorm": "LibMTL: norms of the whole trunk's gradients (K backward passes); ours: of the last shared kernel",
    "FAMO": "ours: one more forward pass per step (after_step), as LibMTL's FAMO with its update after the step",
}


class TorchWorker:
    """``libmtl_worker.py`` in the torch Python, spoken to by JSON lines."""

    def __init__(self, python: str, threads: int, libmtl_src: str | None, log_path: str):
        cmd = [python, os.path.join(HERE, "libmtl_worker.py")]
        if libmtl_src:
            cmd += ["--libmtl-src", libmtl_src]
        self.log = open(log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.pop("XLA_FLAGS", None)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.hello = self.ask({"cmd": "hello", "threads": threads})

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker ended (exit {self.proc.poll()}); its log: {self.log.name}")
        return json.loads(line)

    def close(self):
        try:
            self.ask({"cmd": "quit"})
        except Exception:
            pass
        self.proc.wait(timeout=30)
        self.log.close()


def build_jax_row(row: Row, data_np, sizes, steps: int, gradient_mode: str | None):
    """(call_block, scan_block, compile_seconds): each ``*_block()`` runs ``steps`` steps and returns
    their wall seconds."""
    import dataclasses

    import jax
    import numpy as np

    from mtl_jax.data.deep import REGRESSION, MultiTaskDataset, Split, TaskSpec
    from mtl_jax.training import TrainConfig, init_state, make_components, to_device

    in_dim, hidden, out_dim, batch, lr = sizes
    X, Y = data_np
    K = row.tasks
    spec = TaskSpec(kinds=(REGRESSION,) * K, out_dims=(out_dim,) * K, names=tuple(f"task{k}" for k in range(K)))
    split = Split(x=X, y=tuple(Y[:, k, :] for k in range(K)), mask=np.ones((X.shape[0], K), bool))
    dataset = MultiTaskDataset(train=split, test=split, spec=spec)
    config = TrainConfig(model="mlp", hidden=hidden, batch_size=batch, learning_rate=lr, scheme=row.scheme,
                         scheme_kwargs=row.scheme_kwargs, gradient_method=row.method,
                         gradient_kwargs=row.method_kwargs, gradient_level=row.level, steps=steps)
    if gradient_mode is not None:
        config = dataclasses.replace(config, gradient_mode=gradient_mode)
    c = make_components(config, spec)
    train = to_device(dataset.train, spec)
    state0 = init_state(c.model, c.scheme, c.optimizer, jax.random.key(0), train.x[:1], mtrl=c.mtrl, method=c.method)

    def scanned(state, data):
        return jax.lax.scan(lambda s, _: c.step(s, data), state, None, length=steps)

    t0 = time.perf_counter()
    scan_program = jax.jit(scanned).lower(state0, train).compile()
    state, _ = c.step(state0, train)                      # compiles the step
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    holder = {"state": jax.block_until_ready(scan_program(state, train)[0])}   # warm-up

    def call_block():
        s = holder["state"]
        t = time.perf_counter()
        for _ in range(steps):
            s, _ = c.step(s, train)
        jax.block_until_ready(s)
        dt = time.perf_counter() - t
        holder["state"] = s
        return dt

    def scan_block():
        t = time.perf_counter()
        s, hist = scan_program(holder["state"], train)
        jax.block_until_ready((s, hist))
        dt = time.perf_counter() - t
        holder["state"] = s
        return dt

    call_block()                                           # warm-up of the Python path
    return call_block, scan_block, compile_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-python", default=os.environ.get("MTL_JAX_TORCH_PYTHON"),
                        help="a Python with torch and LibMTL (default $MTL_JAX_TORCH_PYTHON; none: skip)")
    parser.add_argument("--libmtl-src", default=None,
                        help="a folder containing LibMTL/ to use instead of the torch Python's installed LibMTL")
    parser.add_argument("--rows", default=None, help=f"comma-separated rows among: {', '.join(r.label for r in ROWS)}")
    parser.add_argument("--quick", action="store_true", help="few steps and rounds, EW/MGDA/PCGrad only (~1 min)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block (default 20; --quick 5)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row (default 7; --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="threads of each side (default 1)")
    parser.add_argument("--gradient-mode", choices=("vmap", "loop", "both"), default="both",
                        help="our gradient methods' task_gradients mode on the shared parameters; both (default): "
                             "TrainConfig's vmap and, in extra rows '[loop]', loop, against the same LibMTL blocks")
    parser.add_argument("--log", default=None, help="the torch worker's stderr (default: a temp file)")
    args = parser.parse_args(argv)

    if not args.torch_python:
        print("bench_libmtl: skipped -- no torch Python given (pass --torch-python PATH or set "
              "MTL_JAX_TORCH_PYTHON to a Python with torch and LibMTL; benchmarks/README.md, section "
              "'LibMTL side by side (bench_libmtl.py)', says how to make one)")
        return 0
    if not os.path.exists(args.torch_python):
        print(f"bench_libmtl: skipped -- --torch-python {args.torch_python!r} does not exist")
        return 0
    steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 7)
    if steps < 1 or rounds < 1 or args.threads < 1:
        parser.error("--steps, --rounds and --threads must be >= 1")
    wanted = [r.label for r in ROWS] if args.rows is None else [s.strip() for s in args.rows.split(",") if s.strip()]
    if args.quick and args.rows is None:
        wanted = ["EW", "MGDA", "PCGrad"]
    unknown = [w for w in wanted if w not in {r.label for r in ROWS}]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose among {[r.label for r in ROWS]}")

    if args.threads == 1:   # before JAX is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", False)
    log_path = args.log or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"libmtl_worker.{os.getpid()}.log")
    try:
        worker = TorchWorker(args.torch_python, args.threads, args.libmtl_src, log_path)
    except RuntimeError as e:   # e.g. that Python has no torch, or no LibMTL
        with open(log_path) as f:
            tail = f.read()[-1500:]
        print(f"bench_libmtl: the torch worker failed to start ({e}):\n{tail}")
        return 1
    hello = worker.hello
    if not hello.get("ok"):
        print(f"bench_libmtl: the torch worker failed to start: {hello}")
        worker.close()
        return 1
    have = set(hello["weightings"])
    rows = [r for r in ROWS if r.label in wanted]
    missing = [r.label for r in rows if r.libmtl not in have]
    rows = [r for r in rows if r.libmtl in have]

    in_dim, hidden, out_dim, batch, lr = 64, (256, 256), 8, 256, 1e-3
    n_rows = 4096
    rng = np.random.default_rng(0)   # the worker draws the same numbers (its setup)
    X = rng.normal(size=(n_rows, in_dim)).astype(np.float32)
    Y_full = rng.normal(size=(n_rows, len(SCALES), out_dim))
    load = os.getloadavg()
    print(f"bench_libmtl{' --quick' if args.quick else ''}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"JAX {jax.__version__} ({jax.devices()[0].platform}), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | "
          f"torch {hello['torch']} ({hello['threads']} thread{'s' if hello['threads'] > 1 else ''}), "
          f"LibMTL {hello['libmtl']}, Python {hello['python']}")
    print(f"MLP {in_dim}-{'-'.join(map(str, hidden))} trunk, K linear regression heads ({out_dim} outputs, MSE), "
          f"batch {batch}, Adam lr {lr}, float32; {steps} steps per block, {rounds} interleaved rounds, medians")
    if missing:
        print(f"not in this LibMTL ({hello['libmtl']}), left out: {', '.join(missing)}")

    modes = ("vmap", "loop") if args.gradient_mode == "both" else (args.gradient_mode,)
    results = []
    for row in rows:
        K = row.tasks
        Y = (Y_full[:, :K, :] * np.asarray(SCALES)[None, :K, None]).astype(np.float32)
        setup = worker.ask({"cmd": "setup", "method": row.libmtl, "rep_grad": row.rep_grad, "kwargs": row.weight_args,
                            "tasks": K, "in_dim": in_dim, "hidden": list(hidden), "out_dim": out_dim, "batch": batch,
                            "lr": lr, "rows": n_rows, "scales": list(SCALES), "warmup": max(3, steps // 5)})
        # the JAX variants of this row: one per gradient mode for a method on the shared parameters
        variants = {}
        for mode in (modes if row.method is not None and row.level == "params" else (None,)):
            if mode is None or (mode == "vmap" and len(modes) > 1):
                label = row.label
            else:
                label = f"{row.label} [{mode}]"
            variants[label] = build_jax_row(row, (X, Y), (in_dim, hidden, out_dim, batch, lr), steps,
                                            None if mode is None else mode)
        blocks = {"libmtl": None}
        for label, (call_block, scan_block, _) in variants.items():
            blocks[(label, "scan")] = scan_block
            blocks[(label, "call")] = call_block
        times = {name: [] for name in blocks}
        names = list(blocks)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]   # rotated each round
            for name in order:
                if name != "libmtl":
                    times[name].append(blocks[name]())
                elif setup.get("ok"):
                    answer = worker.ask({"cmd": "time", "steps": steps})
                    if answer.get("ok"):
                        times["libmtl"].append(answer["seconds"])
                    else:
                        setup = answer
        error = None if setup.get("ok") else setup.get("error", "failed")

        def ms(values, how):
            return 1e3 * how(values) / steps if values else None

        lib_med, lib_best = ms(times["libmtl"], statistics.median), ms(times["libmtl"], min)
        for label in variants:
            med = {w: ms(times[(label, w)], statistics.median) for w in ("scan", "call")}
            best = {w: ms(times[(label, w)], min) for w in ("scan", "call")}
            results.append(dict(row=row, label=label, error=error, libmtl=lib_med, lib_best=lib_best, best=best, **med))
            status = f"LibMTL {lib_med:.2f}" if lib_med is not None else f"LibMTL error: {error}"
            print(f"  {label}: JAX scan {med['scan']:.2f}, call {med['call']:.2f} ms/step; {status}", flush=True)
    worker.close()

    by_label = {r["row"].label: r for r in results}
    print(f"\nmedians of {rounds} rounds; best-of: the fastest block of each side; [loop]: our gradient_mode='loop'")
    print(f"{'method':20s} {'K':>2s} {'JAX scan':>9s} {'JAX call':>9s} {'LibMTL':>9s} {'Lib/scan':>9s} "
          f"{'Lib/call':>9s}  {'<= half':9s} {'best-of':>9s}")
    print(f"{'':20s} {'':>2s} {'ms/step':>9s} {'ms/step':>9s} {'ms/step':>9s} {'':>9s} {'':>9s}  "
          f"{'scan/call':9s} {'scan/call':>9s}")
    for res in results:
        row, lib = res["row"], res["libmtl"]
        if lib is None:
            lib_s, r_scan, r_call, half, best = "error", "-", "-", "-", "-"
        else:
            lib_s = f"{lib:.2f}"
            r_scan, r_call = lib / res["scan"], lib / res["call"]
            half = f"{'yes' if r_scan >= HALF else 'NO'}/{'yes' if r_call >= HALF else 'NO'}"
            best = f"{res['lib_best'] / res['best']['scan']:.1f}/{res['lib_best'] / res['best']['call']:.1f}"
            r_scan, r_call = f"{r_scan:.1f}x", f"{r_call:.1f}x"
        print(f"{res['label']:20s} {row.tasks:2d} {res['scan']:9.2f} {res['call']:9.2f} {lib_s:>9s} {r_scan:>9s} "
              f"{r_call:>9s}  {half:9s} {best:>9s}")
    notes = [f"{label}: {ROW_NOTES[label]}" for label in by_label if label in ROW_NOTES]
    errors = [f"{label}: LibMTL {r['error']}" for label, r in by_label.items() if r["error"]]
    if notes or errors:
        print("\nnotes:")
        for line in notes + errors:
            print(f"  {line}")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch worker log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
