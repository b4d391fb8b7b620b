#!/usr/bin/env bash
# One short device session for DMTRL at scale and GPU sweeps (issues 9 and 10): a few DMTRL tests on the
# accelerator, then seconds per round at 2^16 .. 2^20 sites against the HBM read floor (target: a full round,
# gap included, <= 10 ms at 10^6 sites) and the batched sweep against a loop (target >= 10x).
# Run from the repository root on the device machine (JAX, flax, optax preinstalled there); output under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/log.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_large_m.py \
    "tests/solvers/test_dmtrl.py::test_tiled_local_pass_equals_all_blocks_at_once" 2>&1 | tail -5 | tee -a "$OUT/log.txt"
timeout 240 python3 benchmarks/bench_dmtrl_scale.py --parts 1,2 --sizes 65536,262144,1048576 2>&1 \
    | tee "$OUT/bench_dmtrl_scale_gpu.txt"
timeout 120 python3 benchmarks/bench_sweep.py 2>&1 | tee "$OUT/bench_sweep_gpu.txt"
