"""Per-step cost of the gradient-manipulation methods (docs/gradient_methods.md) relative to equal weighting,
measured side by side in one run.

The model is the MLP of the weighting benchmark's issue spec: a shared 64-256-256 ReLU trunk, 4 linear
regression heads (8 outputs each), batch 256, Adam (lr 1e-3), float32. Every contender is a full training
step (forward, backward, method, Adam update) inside one ``lax.scan`` of ``--scan`` steps (dispatch amortised),
compiled ahead of time (compile seconds reported apart), timed round-robin, median of ``--reps``:

* ``equal``: ``grad(sum_k L_k)``, one ordinary backward pass -- the reference (ratio 1);
* ``task grads + sum``: the per-task gradients of the shared parameters from
  :func:`mtl_jax.gradient_methods.task_gradients` (one forward, one vmapped backward over the K tasks),
  then their plain sum: the cost of the per-task gradients alone;
* every method of :data:`mtl_jax.gradient_methods.METHODS` on those (K, P) gradients; the heads keep their
  own gradients (``tg.heads``);
* ``task grads loop + sum``: the same with ``task_gradients(mode="loop")``: one forward, K ordinary
  backward passes (``--loop``: every method that way too, rows ``name loop``);
* ``K grads + sum``: K separate ``jax.grad`` calls (one per task loss; XLA may share their forward passes),
  summed;
* ``mgda_ub``: MGDA on the gradients w.r.t. the trunk's output (K, B * 256), the direction pulled back
  through the trunk with one ordinary ``vjp`` (no per-task backward through the trunk); with ``--features``
  every other method the same way (rows ``name @z``, docs/gradient_methods.md, section 3).

Target (issue 11): a gradient-based step <= 2x equal weighting with one vmapped backward pass.

    python benchmarks/bench_gradient_methods.py            # ~2-4 min on 2 CPU cores
    python benchmarks/bench_gradient_methods.py --quick    # seconds (smoke test)
    python benchmarks/bench_gradient_methods.py --methods pcgrad,mgda
    python benchmarks/bench_gradient_methods.py --features   # + every method on feature gradients (~5 min)
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import gradient_methods as gm

TARGET = 2.0


def machine_line() -> str:
    return (f"{datetime.datetime.now().isoformat(timespec='minutes')} | jax {jax.__version__} | "
            f"devices {jax.devices()} | CPU count {os.cpu_count()}")


def init_mlp(key, in_dim: int, hidden: tuple[int, ...], num_tasks: int, out_dim: int):
    """(shared, heads): the trunk's (W, b) per layer and the K stacked linear heads, LeCun-normal weights."""
    keys = jax.random.split(key, len(hidden) + 1)
    shared, d = [], in_dim
    for k, width in zip(keys[:-1], hidden):
        shared.append({"W": jax.random.normal(k, (d, width)) / np.sqrt(d), "b": jnp.zeros(width)})
        d = width
    heads = {"W": jax.random.normal(keys[-1], (num_tasks, d, out_dim)) / np.sqrt(d), "b": jnp.zeros((num_tasks, out_dim))}
    return shared, heads


def trunk(shared, x):
    for layer in shared:
        x = jax.nn.relu(x @ layer["W"] + layer["b"])
    return x


def head_losses(z, heads, y):
    """(K,) mean squared errors of the K heads on features ``z`` (B, F); ``y`` (B, K, out)."""
    out = jnp.einsum("bf,kfo->kbo", z, heads["W"]) + heads["b"][:, None, :]
    return jnp.mean((out - jnp.swapaxes(y, 0, 1)) ** 2, axis=(1, 2))


def make_program(kind: str, method: gm.GradientMethod | None, data, batch: int, steps: int, lr: float,
                 mode: str = "vmap"):
    """A jitted function ``(params, opt_state, method_state, key) -> (params, opt_state, method_state, loss)``
    running ``steps`` training steps of ``kind`` ("equal", "sum", "method", "ub") in one ``lax.scan``."""
    X, Y = data
    opt = optax.adam(lr)

    def batch_at(key):
        idx = jax.random.randint(key, (batch,), 0, X.shape[0])
        return X[idx], Y[idx]

    def grads_of(params, mstate, x, y):
        shared, heads = params

        def loss_fn(s, h):
            return head_losses(trunk(s, x), h, y)

        if kind == "equal":
            losses, vjp = jax.vjp(loss_fn, shared, heads)
            g_s, g_h = vjp(jnp.ones_like(losses))
            return (g_s, g_h), mstate, losses
        if kind == "loop":                                 # K separate gradients, for comparison
            g_s = [jax.grad(lambda s, k=k: loss_fn(s, heads)[k])(shared) for k in range(len(heads["b"]))]
            g_s = jax.tree.map(lambda *leaves: sum(leaves), *g_s)
            g_h = jax.grad(lambda h: jnp.sum(loss_fn(shared, h)))(heads)
            return (g_s, g_h), mstate, loss_fn(shared, heads)
        if kind == "ub":
            z, trunk_vjp = jax.vjp(lambda s: trunk(s, x), shared)
            tg = gm.task_gradients(lambda z, h: head_losses(z, h, y), z, heads, mode=mode)
            d_z, mstate = method.update(tg.shared, mstate)
            (g_s,) = trunk_vjp(tg.unravel(d_z))
            return (g_s, tg.heads), mstate, tg.losses
        tg = gm.task_gradients(loss_fn, shared, heads, mode=mode)
        if kind == "sum":
            d = jnp.ones((tg.shared.shape[0],), tg.shared.dtype) @ tg.shared   # (XLA's CPU column sum is slow)
        else:
            d, mstate = method.update(tg.shared, mstate)
        return (tg.unravel(d), tg.heads), mstate, tg.losses

    def step(carry, _):
        params, opt_state, mstate, key = carry
        key, sub = jax.random.split(key)
        x, y = batch_at(sub)
        grads, mstate, losses = grads_of(params, mstate, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, mstate, key), jnp.sum(losses)

    def program(params, opt_state, mstate, key):
        (params, opt_state, mstate, key), losses = jax.lax.scan(step, (params, opt_state, mstate, key), None, length=steps)
        return params, opt_state, mstate, losses

    return jax.jit(program), opt


def round_robin(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median wall time of each function, after one warm-up call each, timed in turns."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(gm.METHODS), help="comma-separated methods (equal is always timed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (seconds)")
    parser.add_argument("--loop", action="store_true",
                        help="also time every method with task_gradients(mode='loop') (rows 'name loop')")
    parser.add_argument("--features", action="store_true",
                        help="also time every method on the trunk-output gradients, pulled back like mgda_ub ('@z')")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; --quick 2)")
    parser.add_argument("--scan", type=int, default=None, help="steps per lax.scan (default 20; --quick 3)")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if any(m not in gm.METHODS for m in methods):
        raise ValueError(f"--methods: choose among {', '.join(gm.METHODS)}, got {args.methods!r}")
    reps = args.reps if args.reps is not None else (2 if args.quick else 7)
    scan = args.scan if args.scan is not None else (3 if args.quick else 20)
    for name, value in (("--reps", reps), ("--scan", scan)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")

    in_dim, hidden, K, out_dim, batch = (8, (16, 16), 4, 2, 32) if args.quick else (64, (256, 256), 4, 8, 256)
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(4096, in_dim)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=(4096, K, out_dim)) * np.array([1.0, 3.0, 0.3, 10.0])[:K, None], jnp.float32)
    params = init_mlp(jax.random.key(0), in_dim, hidden, K, out_dim)
    n_shared = sum(p.size for p in jax.tree.leaves(params[0]))
    print(f"bench_gradient_methods{' --quick' if args.quick else ''}: {machine_line()}")
    print(f"MLP {in_dim}-{'-'.join(map(str, hidden))} trunk ({n_shared} shared parameters), {K} regression heads "
          f"({out_dim} outputs), batch {batch}, Adam, float32, {scan} steps per lax.scan, median of {reps}")

    contenders = {"equal": ("equal", None, "vmap"), "task grads + sum": ("sum", None, "vmap"),
                  "task grads loop + sum": ("sum", None, "loop"), "K grads + sum": ("loop", None, "vmap")}
    for name in methods:
        contenders[name] = ("ub" if name == "mgda_ub" else "method", gm.get(name), "vmap")
    if args.loop:
        for name in methods:
            if name != "mgda_ub":
                contenders[f"{name} loop"] = ("method", gm.get(name), "loop")
    if args.features:
        for name in methods:
            if name != "mgda_ub":
                contenders[f"{name} @z"] = ("ub", gm.get(name), "vmap")
    programs, compile_s = {}, {}
    key = jax.random.key(1)
    for label, (kind, method, mode) in contenders.items():
        program, opt = make_program(kind, method, (X, Y), batch, scan, 1e-3, mode)
        mstate = method.init(K, jax.random.key(2)) if method is not None else ()
        call_args = (params, opt.init(params), mstate, key)
        t0 = time.perf_counter()
        compiled = program.lower(*call_args).compile()
        compile_s[label] = time.perf_counter() - t0
        programs[label] = (lambda c=compiled, a=call_args: c(*a))
    med = round_robin(programs, reps)
    print(f"\n{'step':22s} {'ms/step':>9s} {'ratio':>7s} {'compile s':>10s}  target <= {TARGET}x")
    rows = {}
    for label in contenders:
        ratio = med[label] / med["equal"]
        note = "reference" if label == "equal" else ("met" if ratio <= TARGET else "NOT met")
        print(f"{label:22s} {1e3 * med[label] / scan:9.3f} {ratio:7.3f} {compile_s[label]:10.2f}  {note}")
        rows[label] = dict(ms_per_step=1e3 * med[label] / scan, ratio=ratio, compile_s=compile_s[label])
    return rows


if __name__ == "__main__":
    main()
