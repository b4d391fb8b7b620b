"""Exact resume: a fit killed with SIGKILL half-way and resumed ends with the numbers of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from mtl_jax import cli
from mtl_jax.runner import store


def _records(path):
    run = store.read_run(path)
    cols = [c for c in run.history[0] if c != "seconds"]
    return [[r[c] for c in cols] for r in run.history], run


def test_dmtrl_fit_killed_half_way_resumes_to_the_uninterrupted_numbers(tmp_path):
    data = str(tmp_path / "s.npz")
    assert cli.main(["data", "synthetic", "--tasks", "6", "--dim", "4", "--seed", "1", "--loss", "hinge",
                     "--out", data]) == 0
    # hundreds of rounds saved after every 2 (a checkpoint per chunk keeps the run busy for seconds)
    args = ["fit", "--data", data, "--loss", "hinge", "--lam1", "0.1", "--lam2", "1", "--tol", "0", "--max-iter", "2000",
            "--checkpoint-every", "2", "--quiet", "--solver", "dmtrl", "--dropout-prob", "0.2", "--seed", "3"]
    whole = str(tmp_path / "whole")
    assert cli.main(args + ["--out", whole]) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, JAX_ENABLE_X64="1")
    proc = subprocess.Popen([sys.executable, "-m", "mtl_jax", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / cli.CHECKPOINT
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)   # some chunks in
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not store.existing_files(killed)   # killed before the result was written

    # without --resume the folder is not silently started again
    assert cli.main(args + ["--out", str(killed)]) == 2
    assert cli.main(args + ["--out", str(killed), "--resume"]) == 0
    got, run = _records(killed)
    want, ref = _records(whole)
    assert len(got) == len(want) > 100
    np.testing.assert_array_equal(np.array(got, float), np.array(want, float))   # bitwise, NaN == NaN
    np.testing.assert_array_equal(run.arrays["W"], ref.arrays["W"])
    assert run.manifest["config"]["resumed_from"]["checkpoint"] == cli.CHECKPOINT


def test_centralized_fit_stopped_at_its_cap_continues_exactly(tmp_path):
    """A fit stopped by --max-iter and continued with --resume and a larger cap ends with the numbers of one run."""
    data = str(tmp_path / "s.npz")
    assert cli.main(["data", "synthetic", "--tasks", "6", "--dim", "4", "--seed", "2", "--out", data]) == 0
    args = ["fit", "--data", data, "--lam1", "0.01", "--lam2", "1", "--tol", "0", "--checkpoint-every", "7", "--quiet"]
    assert cli.main(args + ["--max-iter", "20", "--out", str(tmp_path / "whole")]) == 0
    part = str(tmp_path / "part")
    assert cli.main(args + ["--max-iter", "9", "--out", part]) == 0
    assert cli.main(args + ["--max-iter", "20", "--out", part, "--resume"]) == 0
    got, run = _records(part)
    want, ref = _records(tmp_path / "whole")
    assert len(got) == len(want) == 20
    np.testing.assert_array_equal(np.array(got, float), np.array(want, float))
    np.testing.assert_array_equal(run.arrays["W"], ref.arrays["W"])
