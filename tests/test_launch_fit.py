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
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-6, atol=1e-9)
    assert run.summary["iterations"] == expected.iterations
    assert run.columns()["bytes"][-1] == expected.history[-1].bytes


def test_launch_needs_a_worker_command(capsys):
    assert cli.main(["launch", "--processes", "2"]) == 2
    assert "launch: give the command" in capsys.readouterr().err
