#!/usr/bin/env bash
# The whole test suite on the device machine's JAX (0.11, Python 3.12): once on its CPU backend (the
# version check of requirements.txt's range), then the deep-learning tests on the GPU.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee "$OUT/tests.txt"
JAX_PLATFORMS=cpu timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 2>&1 | tail -15 | tee -a "$OUT/tests.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_models.py tests/test_weighting.py 2>&1 | tail -15 | tee -a "$OUT/tests.txt"
