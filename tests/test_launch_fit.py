"""``mtl-jax launch --processes 2 -- fit --solver dmtrl``: two processes on JAX's runtime give the one-process answer."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mtl_jax
from mtl_jax import cli
from mtl_jax.data import save_npz
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.runner import store


@pytest.mark.slow
def test_two_launched_processes_write_the_single_process_result(tmp_path):
    X, y, task, _ = make_clustered_tasks(37, 5, samples_per_task=(6, 30), loss="hinge", seed=3)
    data = tmp_path / "d.npz"
    save_npz(data, X=X, y=y, task=task)
    expected = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge", solver="dmtrl", devices=1,
                           dropout_prob=0.2, seed=4)
    env = dict(os.environ, MTL_JAX_NO_COMPILE_CACHE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "mtl_jax", "launch", "--processes", "2", "--timeout", "600", "--",
                           "fit", "--data", str(data), "--lam1", "0.1", "--lam2", "1", "--loss", "hinge", "--solver",
                           "dmtrl", "--dropout-prob", "0.2", "--seed", "4", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = store.read_run(tmp_path / "two")
    assert run.config["fit"]["devices"] == 2
    assert run.config["data"]["rows_read"] == "own sites per process"   # each process read its own rows only
    alpha = run.arrays["alpha"]                                            # duals back in the input row order
    np.testing.assert_allclose(alpha, expected.alpha, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-6, atol=1e-9)
    assert run.summary["iterations"] == expected.iterations
    assert run.columns()["bytes"][-1] == expected.history[-1].bytes


WORKER = """
import json, sys
from mtl_jax import launch
launch.initialize()
import jax
jax.config.update("jax_enable_x64", True)
from mtl_jax import distributed
from mtl_jax.data.io import npz_member_rows, read_npz
from mtl_jax.solvers import dmtrl

class Counting:  # counts the rows of X this process reads
    def __init__(self, a):
        self.a, self.rows = a, 0
    def __getitem__(self, rows):
        self.rows += len(rows)
        return self.a[rows]
    @property
    def shape(self):
        return self.a.shape

path = sys.argv[1]
X = Counting(npz_member_rows(path, "X"))
task = read_npz(path, ["task"])["task"]
sites, m = distributed.process_sites(X, npz_member_rows(path, "y"), task, distributed.site_mesh(), loss="hinge")
out = dmtrl.solve(sites, lam1=0.1, lam2=1.0, loss="hinge", tol=1e-8, max_iter=300, dropout_prob=0.2, seed=4)
print("ROWS " + json.dumps([jax.process_index(), X.rows]), flush=True)
if jax.process_index() == 0:
    print("RESULT " + json.dumps({"W": out.W.tolist(), "m": m, "bytes": out.history[-1].bytes}), flush=True)
launch.exit_worker(0)
"""


@pytest.mark.slow
def test_each_process_reads_only_its_own_sites_rows_and_the_result_is_the_single_process_one(tmp_path):
    import json
    X, y, task, _ = make_clustered_tasks(37, 5, samples_per_task=(6, 30), loss="hinge", seed=3)
    data = tmp_path / "d.npz"
    save_npz(data, X=X, y=y, task=task)
    expected = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge", solver="dmtrl", devices=1, tol=1e-8,
                           max_iter=300, dropout_prob=0.2, seed=4)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, MTL_JAX_NO_COMPILE_CACHE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "mtl_jax.launch", "--processes", "2", "--timeout", "600", "--",
                           sys.executable, str(worker), str(data)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rows = dict(json.loads(l.split("ROWS ", 1)[1]) for l in lines if "ROWS " in l)
    result = json.loads(next(l for l in lines if "RESULT " in l).split("RESULT ", 1)[1])
    assert sorted(rows) == [0, 1] and sum(rows.values()) == len(y) and all(0 < r < len(y) for r in rows.values())
    assert result["m"] == 37 and result["bytes"] == expected.history[-1].bytes
    np.testing.assert_allclose(np.array(result["W"]), expected.W, rtol=1e-6, atol=1e-9)


def test_npz_member_rows_maps_stored_arrays_and_reads_compressed_ones(tmp_path, rng):
    from mtl_jax.data.io import npz_member_rows
    X = rng.normal(size=(9, 3))
    np.savez(tmp_path / "s.npz", X=X, F=np.asfortranarray(X))
    np.savez_compressed(tmp_path / "c.npz", X=X)
    assert isinstance(npz_member_rows(tmp_path / "s.npz", "X"), np.memmap)
    for path, name in ((tmp_path / "s.npz", "X"), (tmp_path / "s.npz", "F"), (tmp_path / "c.npz", "X")):
        np.testing.assert_array_equal(npz_member_rows(path, name)[[1, 4, 8]], X[[1, 4, 8]])
    with pytest.raises(ValueError, match="no array 'Z'"):
        npz_member_rows(tmp_path / "s.npz", "Z")


def test_launch_needs_a_worker_command(capsys):
    assert cli.main(["launch", "--processes", "2"]) == 2
    assert "launch: give the command" in capsys.readouterr().err
