"""Compile once: the in-process program cache (``solvers.base.compiled``) and JAX's persistent cache
(``mtl_jax.enable_compilation_cache``).

The persistent cache is process-wide state, so the tests that turn it on do so in fresh subprocesses
(or restore it at once); no test writes into ~/.cache.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mtl_jax
from mtl_jax import compilation
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.solvers import base

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_persistent_cache_by_default(monkeypatch):
    """Nothing here may write into the default cache folder."""
    monkeypatch.setenv(compilation.ENV_DISABLE, "1")


@pytest.fixture(scope="module")
def problem():
    X, y, task, _ = make_clustered_tasks(7, 5, num_clusters=2, samples_per_task=13, seed=3)  # shapes of no other test
    return X, y, task


def _python(code, *args, env=None, timeout=300):
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    full_env = {k: v for k, v in os.environ.items() if k != compilation.ENV_DISABLE}
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _objective(W, X, y, task, lam1, lam2):
    """J(W) for squared loss, in NumPy (singular values by LAPACK's SVD)."""
    loss = sum(np.mean((y[task == t] - X[task == t] @ W[t]) ** 2) for t in range(W.shape[0]))
    return loss + lam1 / 2 * np.sum(W**2) + lam2 / 2 * np.sum(np.linalg.svd(W, compute_uv=False)) ** 2


# ----------------------------------------------------------------------------- the in-process cache

def test_fits_differing_in_tol_and_max_iter_compile_once(problem):
    X, y, task = problem
    base.clear_cache()
    loose = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, tol=1e-3, max_iter=100)
    tight = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, tol=1e-10, max_iter=120)  # both within 128 rounds
    info = base.cache_info()
    assert info["compiled"] == 1 and info["hits"] == 1 and info["size"] == 1
    assert loose.compile_seconds > 0 and tight.compile_seconds == 0.0
    assert loose.converged and tight.converged
    assert loose.relative_gap <= 1e-3 and tight.relative_gap <= 1e-10
    assert tight.gap < loose.gap and tight.iterations > loose.iterations
    assert tight.objective <= loose.objective
    assert loose.objective - tight.objective <= loose.gap   # the loose gap bounds its sub-optimality


@pytest.mark.parametrize("persistent", [False, True])
def test_a_second_fit_of_new_data_hits_the_program_of_the_first(problem, tmp_path, monkeypatch, persistent):
    """The first fit of new data computes lmax inside the program; the second reuses it (a committed
    array, the first program's output, placed as the stored program's outputs are): both must run the
    same compiled program, with and without the persistent layer."""
    from mtl_jax.solvers import centralized

    X, y, task = problem
    base.clear_cache()
    centralized._LMAX_CACHE.clear()
    if persistent:
        monkeypatch.delenv(compilation.ENV_DISABLE)
        assert compilation.enable_compilation_cache(tmp_path) is not None
    try:
        first = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
        second = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    finally:
        compilation.disable_compilation_cache()
    info = base.cache_info()
    assert info["compiled"] == 1 and info["hits"] == 1 and second.compile_seconds == 0.0
    np.testing.assert_allclose(second.W, first.W, rtol=0, atol=1e-12)


def test_new_lam_values_do_not_compile_again(problem):
    X, y, task = problem
    base.clear_cache()
    first = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    second = mtl_jax.fit(X, y, task, lam1=0.3, lam2=0.5)
    assert base.cache_info()["compiled"] == 1 and base.cache_info()["hits"] == 1
    assert second.config["lam1"] == 0.3 and second.objective != first.objective
    np.testing.assert_allclose(second.objective, _objective(second.W, X, y, task, 0.3, 0.5), rtol=1e-12)
    np.testing.assert_allclose(first.objective, _objective(first.W, X, y, task, 0.1, 1.0), rtol=1e-12)


def test_max_iter_across_a_power_of_two_compiles_again(problem):
    X, y, task = problem
    base.clear_cache()
    mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, max_iter=100)   # history of 128 rounds
    mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, max_iter=200)   # 256: another program
    assert base.cache_info()["compiled"] == 2 and base.cache_info()["hits"] == 0
    assert base.history_capacity(100) == 128 and base.history_capacity(128) == 128
    assert base.history_capacity(200) == 256 and base.history_capacity(1) == 64


def test_clear_cache_forgets_programs_and_counts(problem):
    X, y, task = problem
    mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    base.clear_cache()
    info = base.cache_info()
    assert info["compiled"] == info["hits"] == info["size"] == 0
    again = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    assert base.cache_info()["compiled"] == 1 and again.compile_seconds > 0


SHARDED = """
import json
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mtl_jax.data import to_sites
from mtl_jax.solvers import base, centralized

rng = np.random.default_rng(0)
m, d, n = 8, 3, 12
X = rng.normal(size=(m * n, d)); y = rng.normal(size=m * n); task = np.repeat(np.arange(m), n)
sites = to_sites(X, y, task)
base.clear_cache()
plain = centralized.solve(sites, lam1=0.1, lam2=1.0, tol=1e-12)
after_plain = base.cache_info()["compiled"]
mesh = Mesh(np.array(jax.devices()), ("sites",))
spread = jax.tree_util.tree_map(lambda a: jax.device_put(a, NamedSharding(mesh, P("sites"))), sites)
sharded = centralized.solve(spread, lam1=0.1, lam2=1.0, tol=1e-12)
print(json.dumps({"devices": jax.device_count(), "placed": len(spread.X.sharding.device_set),
                  "after_plain": after_plain, "after_sharded": base.cache_info()["compiled"],
                  "W_plain": plain.W.tolist(), "W_sharded": sharded.W.tolist(),
                  "converged": [plain.converged, sharded.converged]}))
"""


def test_sharded_inputs_do_not_reuse_the_program_compiled_for_unsharded_ones():
    out = _python(SHARDED, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
                                compilation.ENV_DISABLE: "1"})
    assert out["devices"] == 4 and out["placed"] == 4        # the sites really are spread over 4 devices
    assert out["after_plain"] == 1 and out["after_sharded"] == 2
    assert out["converged"] == [True, True]
    np.testing.assert_allclose(out["W_sharded"], out["W_plain"], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- the persistent cache

PERSISTENT = """
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
import numpy as np
import mtl_jax
folder = mtl_jax.enable_compilation_cache(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(size=(60, 3)); y = rng.normal(size=60); task = np.repeat(np.arange(5), 12)
res = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, tol=1e-10)
prefix = "/jax/compilation_cache/"
print(json.dumps({"folder": folder, "W": res.W.tolist(),
                  **{k[len(prefix):]: v for k, v in events.items() if k.startswith(prefix)}}))
"""


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_persistent_cache_is_written_by_one_process_and_reused_by_the_next(tmp_path):
    cache = tmp_path / "cache"
    first = _python(PERSISTENT, cache)
    assert first["folder"] == str(cache)
    written = _files(cache)
    assert first["compile_requests_use_cache"] > 0 and first.get("cache_hits", 0) == 0
    assert len(written) >= first["cache_misses"] > 0          # every compiled program was stored

    second = _python(PERSISTENT, cache)
    assert second["compile_requests_use_cache"] == first["compile_requests_use_cache"]
    assert second["cache_hits"] == second["compile_requests_use_cache"]   # every program came from the cache
    assert second.get("cache_misses", 0) == 0
    assert _files(cache) == written                                      # nothing new written
    assert second["W"] == first["W"]                                     # the same numbers, bit for bit


@pytest.fixture
def restore_cache_config():
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation._reset_cache_state()


def test_enable_then_disable_in_process(tmp_path, monkeypatch, restore_cache_config):
    monkeypatch.delenv(compilation.ENV_DISABLE)
    folder = tmp_path / "new" / "cache"                  # created, parents included
    assert compilation.enable_compilation_cache(folder) == str(folder)
    assert compilation.cache_dir() == str(folder)
    jax.jit(lambda x: x * 3.0 + 17.0)(np.arange(11.0)).block_until_ready()
    written = _files(folder)
    assert len(written) >= 1
    compilation.disable_compilation_cache()
    assert compilation.cache_dir() is None
    jax.jit(lambda x: x * 5.0 - 19.0)(np.arange(13.0)).block_until_ready()
    assert _files(folder) == written


def test_no_compile_cache_env_turns_enable_into_a_no_op(tmp_path, monkeypatch, restore_cache_config):
    before = jax.config.jax_compilation_cache_dir
    for value in ("1", "yes"):
        monkeypatch.setenv(compilation.ENV_DISABLE, value)
        assert compilation.enable_compilation_cache(tmp_path / "cache") is None
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "cache").exists()


def test_enable_on_a_path_that_is_a_file_raises_naming_path(tmp_path, monkeypatch, restore_cache_config):
    monkeypatch.delenv(compilation.ENV_DISABLE)
    before = jax.config.jax_compilation_cache_dir
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="path") as e:
        compilation.enable_compilation_cache(path)
    assert str(path) in str(e.value) and "not a folder" in str(e.value)
    assert jax.config.jax_compilation_cache_dir == before


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation.ENV_DIR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compilation.default_cache_dir() == str(tmp_path / "home" / ".cache" / "mtl_jax" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.default_cache_dir() == str(tmp_path / "xdg" / "mtl_jax" / "jax")
    monkeypatch.setenv(compilation.ENV_DIR, str(tmp_path / "mine"))
    assert compilation.default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(compilation.ENV_DIR, "relative")
    assert compilation.default_cache_dir() == str(tmp_path / "relative")
