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


def launch_fit(*arguments, processes=2):
    """``mtl-jax launch --processes N -- fit ARGUMENTS`` in a subprocess; fails the test on a non-zero exit."""
    env = dict(os.environ, MTL_JAX_NO_COMPILE_CACHE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "mtl_jax", "launch", "--processes", str(processes), "--timeout",
                           "600", "--", "fit", *map(str, arguments)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


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
import numpy as np
import mtl_jax
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
rows = X.rows
W0 = np.asarray(out.W) * 0.5                                # a warm start (every process has all of W0)
warm = mtl_jax.api.fit_sites(sites, m, lam1=0.2, lam2=1.0, loss="hinge", max_iter=20, W0=W0, seed=4)
print("ROWS " + json.dumps([jax.process_index(), rows]), flush=True)
if jax.process_index() == 0:
    print("RESULT " + json.dumps({"W": out.W.tolist(), "m": m, "bytes": out.history[-1].bytes,
                                  "warm": warm.W.tolist()}), flush=True)
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
    warm = mtl_jax.fit(X, y, task, lam1=0.2, lam2=1.0, loss="hinge", solver="dmtrl", devices=1, max_iter=20,
                       W0=np.array(result["W"]) * 0.5, seed=4)
    np.testing.assert_allclose(np.array(result["warm"]), warm.W, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_two_launched_processes_with_center_write_the_single_process_result(tmp_path):
    from mtl_jax.data import center_by_task
    X, y, task, _ = make_clustered_tasks(11, 4, samples_per_task=(5, 20), loss="squared", seed=5)
    X = X + np.arange(11)[task, None] * 0.5                    # task means worth removing
    y = y + 2.0 * task
    data = tmp_path / "d.npz"
    save_npz(data, X=X, y=y, task=task)
    Xc, yc, means = center_by_task(X, y, task)                 # what the single-process `fit --center` fits
    expected = mtl_jax.fit(Xc, yc, task, lam1=0.1, lam2=1.0, solver="dmtrl", devices=1, tol=1e-8, seed=2)
    launch_fit("--data", data, "--center", "--lam1", "0.1", "--lam2", "1", "--solver", "dmtrl", "--tol", "1e-8",
               "--seed", "2", "--quiet", "--out", tmp_path / "two")
    run = store.read_run(tmp_path / "two")
    assert run.config["data"]["rows_read"] == "own sites per process"   # centred where the rows are
    assert run.config["data"]["preprocessing"] == "center" and run.config["fit"]["devices"] == 2
    np.testing.assert_array_equal(run.arrays["center_X"], means.X)      # every site's means, gathered
    np.testing.assert_array_equal(run.arrays["center_y"], means.y)
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-6, atol=1e-9)
    assert run.summary["iterations"] == expected.iterations


@pytest.mark.slow
def test_a_launched_warm_start_reads_own_rows_and_equals_the_single_process_one(tmp_path):
    import shutil
    X, y, task, _ = make_clustered_tasks(13, 4, samples_per_task=(5, 20), loss="hinge", seed=6)
    data = tmp_path / "d.npz"
    save_npz(data, X=X, y=y, task=task)
    common = ["--data", str(data), "--loss", "hinge", "--solver", "dmtrl", "--lam2", "1", "--seed", "3", "--quiet"]
    assert cli.main(["fit", *common, "--lam1", "0.1", "--max-iter", "30", "--out", str(tmp_path / "one")]) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    # lam1 changed: a warm start from the saved W and duals (the same loss and data), the history restarts
    warm = [*common, "--lam1", "0.2", "--max-iter", "40", "--resume"]
    assert cli.main(["fit", *warm, "--out", str(tmp_path / "one")]) == 0
    launch_fit(*warm, "--out", tmp_path / "two")
    one, two = store.read_run(tmp_path / "one"), store.read_run(tmp_path / "two")
    assert two.config["data"]["rows_read"] == "own sites per process" and two.config["fit"]["devices"] == 2
    assert one.config["resumed_from"]["dir"] == str(tmp_path / "one") and two.config["resumed_from"] is not None
    np.testing.assert_allclose(two.arrays["W"], one.arrays["W"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(two.arrays["alpha"], one.arrays["alpha"], rtol=1e-6, atol=1e-9)
    assert two.summary["iterations"] == one.summary["iterations"]


class Reads:
    """``a[rows]`` recording the rows read."""

    def __init__(self, a):
        self.a, self.rows = a, []

    def __getitem__(self, rows):
        self.rows.extend(np.asarray(rows).tolist())
        return self.a[rows]

    @property
    def shape(self):
        return self.a.shape

    @property
    def dtype(self):
        return self.a.dtype


def test_centred_rows_read_only_the_rows_asked_for_and_equal_center_by_task(tmp_path, rng):
    from mtl_jax.data import center_by_task
    from mtl_jax.data.io import npz_member_rows
    X, y, task = rng.normal(size=(30, 3)), rng.normal(size=30), rng.integers(0, 4, 30)
    save_npz(tmp_path / "d.npz", X=X, y=y, task=task)
    Xc, yc, means = center_by_task(X, y, task)
    mapped = Reads(npz_member_rows(tmp_path / "d.npz", "X"))
    lazy, lazy_y = cli._CenteredRows(mapped, task), cli._CenteredRows(Reads(y), task)
    rows = np.flatnonzero((task == 1) | (task == 3))            # two whole tasks
    np.testing.assert_array_equal(lazy[rows], Xc[rows])
    np.testing.assert_array_equal(lazy_y[rows], yc[rows])
    assert sorted(mapped.rows) == rows.tolist()                  # no other row of the file was read
    np.testing.assert_array_equal(lazy.sites, [1, 3])
    np.testing.assert_array_equal(lazy.means, means.X[[1, 3]])
    np.testing.assert_array_equal(lazy_y.means, means.y[[1, 3]])
    with pytest.raises(ValueError, match="every row of each task"):
        lazy[rows[1:]]                                           # part of a task: its mean is unknown


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
