"""The command line ``python -m mtl_jax``: fit/data/plot in-process through ``cli.main``, on tiny data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mtl_jax
from mtl_jax import cli
from mtl_jax.data import save_npz
from mtl_jax.data.synthetic import make_clustered_tasks

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = dict(num_clusters=2, samples_per_task=20, seed=0)   # 6 tasks, 4 features, 120 samples
LAMS = ["--lam1", "0.1", "--lam2", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset():
    return make_clustered_tasks(6, 4, **SYNTH)


@pytest.fixture
def data_file(tmp_path, dataset):
    X, y, task, _ = dataset
    path = tmp_path / "data.npz"
    save_npz(path, X=X, y=y, task=task)
    return str(path)


def _fit(data, out, *extra):
    return cli.main(["fit", "--data", data, *LAMS, "--out", str(out), *extra])


def _snapshot(directory):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_fit_writes_result_config_history_matching_library(tmp_path, data_file, dataset, capsys):
    X, y, task, _ = dataset
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    assert sorted(os.listdir(out)) == ["config.json", "history.csv", "result.npz"]  # no temp files left

    expected = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)
    with np.load(out / "result.npz", allow_pickle=False) as r:
        np.testing.assert_allclose(r["W"], expected.W, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r["Omega"], expected.Omega, rtol=1e-10, atol=1e-12)
        U, a, b = r["omega_U"], r["omega_a"], r["omega_b"]
        np.testing.assert_allclose(b * np.eye(6) + (U * (a - b)) @ U.T, r["Omega"], atol=1e-12)
        assert r["alpha"].shape == (len(y),)
        hist = {c: r[f"history_{c}"] for c in cli.HISTORY_COLUMNS}
    assert len(hist["round"]) == expected.iterations

    config = json.loads((out / "config.json").read_text())
    assert config["arguments"]["lam1"] == 0.1 and config["arguments"]["method"] == "apg"
    assert config["data"]["path"] == os.path.abspath(data_file)
    assert config["data"] == {**config["data"], "num_tasks": 6, "dim": 4, "num_samples": 120}
    assert config["versions"]["jax"] and config["versions"]["mtl_jax"] == mtl_jax.__version__
    assert config["result"]["converged"] is True
    np.testing.assert_allclose(config["result"]["objective"], expected.objective, rtol=1e-12)
    assert config["result"]["iterations"] == expected.iterations
    assert config["resumed_from"] is None

    rows = np.loadtxt(out / "history.csv", delimiter=",", skiprows=1, ndmin=2)
    assert (out / "history.csv").read_text().splitlines()[0] == "round,objective,gap,bytes,seconds"
    np.testing.assert_array_equal(rows[:, 1], hist["objective"])
    np.testing.assert_array_equal(rows[:, 0], hist["round"])

    printed = capsys.readouterr().out
    for word in ("m = 6", "d = 4", "N = 120", "squared", "apg", "J =", "relative gap", "converged", "compile", str(out)):
        assert word in printed


def test_resume_continues_from_saved_W(tmp_path, data_file):
    scratch, out = tmp_path / "scratch", tmp_path / "run"
    assert _fit(data_file, scratch, "--tol", "1e-10") == 0
    assert _fit(data_file, out, "--tol", "1e-3") == 0
    assert _fit(data_file, out, "--tol", "1e-10", "--resume") == 0

    full = json.loads((scratch / "config.json").read_text())
    resumed = json.loads((out / "config.json").read_text())
    assert resumed["resumed_from"]["dir"] == os.path.abspath(out)
    assert resumed["result"]["converged"] and full["result"]["converged"]
    assert resumed["result"]["iterations"] < full["result"]["iterations"]
    np.testing.assert_allclose(resumed["result"]["objective"], full["result"]["objective"], rtol=1e-9)
    with np.load(out / "result.npz", allow_pickle=False) as r, np.load(scratch / "result.npz", allow_pickle=False) as s:
        np.testing.assert_allclose(r["W"], s["W"], atol=1e-5)
        assert len(r["history_round"]) == resumed["result"]["iterations"]  # the history restarts


def test_existing_output_is_refused_and_left_untouched(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _fit(data_file, out, "--tol", "1e-3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--out" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before


def test_overwrite_replaces_existing_output(tmp_path, data_file):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    assert cli.main(["fit", "--data", data_file, "--lam1", "0.1", "--lam2", "2", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["fit"]["lam2"] == 2.0
    assert sorted(os.listdir(out)) == ["config.json", "history.csv", "result.npz"]


def test_missing_data_file_exits_2_without_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert _fit(str(tmp_path / "nope.npz"), out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope.npz" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("lam1, problem", [("-1", "lam1: must be > 0"), ("abc", "--lam1"), ("inf", "lam1")])
def test_bad_lam1_exits_2_naming_it(tmp_path, data_file, capsys, lam1, problem):
    out = tmp_path / "run"
    assert cli.main(["fit", "--data", data_file, "--lam1", lam1, "--lam2", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and problem in err and "Traceback" not in err
    assert not out.exists()


def test_invalid_data_exits_2_naming_the_problem(tmp_path, dataset, capsys):
    X, y, task, _ = dataset
    path = tmp_path / "bad.npz"
    save_npz(path, X=X, y=y, task=task + 1)    # task 0 has no samples
    out = tmp_path / "run"
    assert _fit(str(path), out, "--loss", "squared") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "task" in err and "no samples" in err
    assert not out.exists()


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "data", "plot", "example workflow"):
        assert command in text


def test_python_m_help_subprocess():
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "mtl_jax", "--help"], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(c in done.stdout for c in ("fit", "data", "plot"))


def test_data_synthetic_then_fit_round_trip(tmp_path, dataset):
    X, y, task, info = dataset
    path = tmp_path / "sub" / "synth.npz"      # the parent directory is created
    assert cli.main(["data", "synthetic", "--tasks", "6", "--dim", "4", "--clusters", "2", "--samples", "20",
                     "--seed", "0", "--out", str(path)]) == 0
    with np.load(path, allow_pickle=False) as f:
        for name, want in (("X", X), ("y", y), ("task", task), ("clusters", info["clusters"])):
            np.testing.assert_array_equal(f[name], want)
    out = tmp_path / "run"
    assert _fit(str(path), out) == 0
    with np.load(out / "result.npz", allow_pickle=False) as r:
        np.testing.assert_allclose(r["W"], mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0).W, rtol=1e-10, atol=1e-12)


def test_data_synthetic_csv_and_bad_extension(tmp_path, capsys):
    csv_path = tmp_path / "synth.csv"
    assert cli.main(["data", "synthetic", "--tasks", "3", "--dim", "2", "--clusters", "1", "--samples", "4:6",
                     "--out", str(csv_path)]) == 0
    X, y, task = mtl_jax.data.load(csv_path)
    assert X.shape[1] == 2 and set(task.tolist()) == {0, 1, 2}
    assert cli.main(["data", "synthetic", "--tasks", "3", "--dim", "2", "--out", str(tmp_path / "s.txt")]) == 2
    assert ".npz or .csv" in capsys.readouterr().err


def test_fit_intercept_and_center(tmp_path, data_file):
    X, y, task, _ = make_clustered_tasks(6, 3, **SYNTH)     # 3 features + intercept: the same shapes, no recompile
    narrow = tmp_path / "narrow.npz"
    save_npz(narrow, X=X, y=y, task=task)
    assert _fit(str(narrow), tmp_path / "i", "--intercept") == 0
    with np.load(tmp_path / "i" / "result.npz", allow_pickle=False) as r:
        expected = mtl_jax.fit(mtl_jax.data.add_intercept(X), y, task, lam1=0.1, lam2=1.0)
        np.testing.assert_allclose(r["W"], expected.W, rtol=1e-10, atol=1e-12)
    assert _fit(data_file, tmp_path / "c", "--center") == 0
    with np.load(tmp_path / "c" / "result.npz", allow_pickle=False) as r:
        assert r["W"].shape == (6, 4) and r["center_X"].shape == (6, 4) and r["center_y"].shape == (6,)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["data"]["preprocessing"] == "center"


def test_plot_writes_png(tmp_path, data_file, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(data_file, a) == 0
    assert _fit(data_file, b, "--tol", "1e-2") == 0
    png = tmp_path / "figs" / "conv.png"
    assert cli.main(["plot", "--results", str(a), str(b), "--labels", "tight", "loose", "--omega",
                     "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(os.listdir(png.parent)) == ["conv.png"]   # no temporary file left
    assert cli.main(["plot", "--results", str(a), "--x", "seconds", "--out", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert cli.main(["plot", "--results", str(a), str(b), "--labels", "one", "--out", str(png)]) == 2
    assert "--labels" in capsys.readouterr().err
    assert cli.main(["plot", "--results", str(tmp_path / "none"), "--out", str(png)]) == 2
