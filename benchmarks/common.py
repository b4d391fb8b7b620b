"""What the benchmark scripts share: the machine line, peak memory, and a fit in a fresh process."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

import jax
import numpy as np


def machine_line(extra: str = "") -> str:
    """``machine: x86_64, 2 CPUs, jax ..., devices [...], numpy ...; float64`` plus ``extra``."""
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, devices {jax.devices()}, "
            f"numpy {np.__version__}; float64" + (f"; {extra}" if extra else ""))


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux carries the parent's resident
    size at fork into a child's ``ru_maxrss`` across exec, which would charge the benchmark's own memory
    to the fresh process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fresh_process(script: str, key: str, cache_dir: str | None = None) -> dict:
    """Run ``script --child key`` in a new Python process and return the JSON object it prints last.

    Without ``cache_dir`` no persistent compilation cache is used (a true first fit); with it, the child
    sees ``MTL_JAX_NO_COMPILE_CACHE=0`` and ``MTL_JAX_CACHE_DIR=cache_dir``."""
    env = dict(os.environ, MTL_JAX_NO_COMPILE_CACHE="1")
    if cache_dir is not None:
        env.update(MTL_JAX_NO_COMPILE_CACHE="0", MTL_JAX_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, os.path.abspath(script), "--child", key], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fresh process for {key!r} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_time(fn, reps: int, *, warm: bool = False) -> float:
    """Median wall seconds of ``reps`` calls of ``fn`` (after one unmeasured call when ``warm``)."""
    import time

    import numpy as np

    if warm:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timed(fn):
    """``(wall seconds, result)`` of one call of ``fn``."""
    import time

    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
