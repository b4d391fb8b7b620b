"""The persistent layer of the compiled-program cache: a program stored by one process, loaded by the next."""
import json
import os
import subprocess
import sys

import pytest

CODE = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import mtl_jax
from mtl_jax.solvers import base
mtl_jax.enable_compilation_cache(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(size=(90, 4)); y = rng.normal(size=90); y = np.sign(y) if sys.argv[2] == "hinge" else y; task = np.repeat(np.arange(6), 15)
res = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss=sys.argv[2], tol=1e-10)
print(json.dumps({"W": res.W.tolist(), "gap": res.gap, "iterations": res.iterations, **base.cache_info()}))
"""


def _fit_in_new_process(cache, loss):
    env = {k: v for k, v in os.environ.items() if k != "MTL_JAX_NO_COMPILE_CACHE"}
    out = subprocess.run([sys.executable, "-c", CODE, str(cache), loss], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["squared", "hinge"])
def test_stored_program_is_loaded_by_a_new_process_and_gives_the_same_numbers(tmp_path, loss):
    first = _fit_in_new_process(tmp_path, loss)
    stored = os.listdir(tmp_path / "mtl_jax_programs")
    second = _fit_in_new_process(tmp_path, loss)
    assert first["loaded"] == 0 and second["loaded"] == 1   # the second process did not trace the solver
    assert os.listdir(tmp_path / "mtl_jax_programs") == stored  # nothing new written
    assert second["W"] == first["W"]                          # bit for bit
    assert second["iterations"] == first["iterations"] and second["gap"] == first["gap"]
