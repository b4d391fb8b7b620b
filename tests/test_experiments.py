"""The experiment and benchmark scripts, end to end on tiny settings, and their outputs plotted by the CLI."""
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from mtl_jax import cli
from mtl_jax.data.deep import school_multihead
from mtl_jax.runner import configs, store
from mtl_jax.training import TrainConfig, train_seeds

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """Import a script of the repository (not a package) as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def task_weighting():
    return load_script("experiments/task_weighting.py")


@pytest.fixture(scope="module")
def quick_run(task_weighting, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_weighting")
    argv = ["--quick", "--out", str(out), "--methods", "equal,dwa", "--datasets", "school_multihead",
            "--no-compile-cache"]
    first = task_weighting.main(argv)   # --quick: the quick preset (configs.script_main)
    return out, argv, first


def test_quick_run_writes_tables_json_figure_and_cells(quick_run):
    out, _, first = quick_run
    for name in ("results.md", "results.json", "school_multihead_curves.png"):
        assert (out / name).stat().st_size > 0
    assert sorted(first["computed"]) == [("school_multihead", s, 1.0) for s in ("dwa", "equal", "single_task")]
    table = (out / "results.md").read_text()
    assert "### school_multihead" in table and "| dwa |" in table and "| single_task |" in table
    results = json.loads((out / "results.json").read_text())
    runs = results["datasets"]["school_multihead"]["runs"]
    assert set(runs) == {"single_task", "equal", "dwa"}
    assert np.asarray(runs["dwa"]["per_seed"]).shape == (2, 3)  # 2 seeds, 3 heads
    assert runs["dwa"]["lr_factor"] == 1.0 and runs["equal"]["cost_ratio"] == 1.0 and runs["dwa"]["cost_ratio"] > 0
    # ms per step: the cell's execution seconds over its steps (one rate here, so no median to take)
    cell = store.read_run(out / "cells" / "school_multihead" / "dwa" / "lr1")
    steps = results["datasets"]["school_multihead"]["config"]["train"]["steps"]
    assert runs["dwa"]["ms_per_step"] == pytest.approx(1e3 * cell.summary["run_seconds"] / steps)
    assert f"({runs['dwa']['ms_per_step']:.3g} ms)" in table


def test_delta_m_of_equal_against_itself_is_zero(quick_run):
    runs = quick_run[2]["results"]["school_multihead"]["runs"]
    assert runs["equal"]["delta_m_equal"] == 0.0
    assert runs["single_task"]["delta_m_single_task"] == 0.0


def test_rerun_skips_finished_cells(quick_run, task_weighting):
    out, argv, _ = quick_run
    cell = out / "cells" / "school_multihead" / "dwa" / "lr1" / store.MANIFEST
    before = cell.stat().st_mtime_ns
    again = task_weighting.main(argv)
    assert again["computed"] == []
    assert len(again["skipped"]) == 3
    assert cell.stat().st_mtime_ns == before
    assert again["results"] == quick_run[2]["results"]


def test_cli_run_of_task_weighting_exits_zero(quick_run):
    # the experiment's run returns its results (a dict); the command line must still exit 0
    out, _, _ = quick_run
    cell = out / "cells" / "school_multihead" / "equal" / "lr1" / store.MANIFEST
    before = cell.stat().st_mtime_ns
    assert cli.main(["run", "task_weighting", "--preset", "quick", "compile_cache=false", "--out", str(out)]) == 0
    assert cell.stat().st_mtime_ns == before      # the same config as the script's quick run: its cells reused
    assert set(json.loads((out / "results.json").read_text())["datasets"]) == set(quick_run[2]["results"])


def test_cells_are_weighting_runs_whose_history_is_the_stored_curves(quick_run):
    out, _, _ = quick_run
    paths = store.find_runs(out)
    assert sorted(os.path.relpath(p, out) for p in paths) == [
        os.path.join("cells", "school_multihead", s, "lr1") for s in ("dwa", "equal", "single_task")]
    run = store.read_run(out / "cells" / "school_multihead" / "dwa" / "lr1")
    assert run.kind == "weighting" and run.config["scheme"] == "dwa" and run.config["seeds"] == [0, 1]
    curves = store.weighting_curves(run)
    np.testing.assert_array_equal(curves["task_losses"], run.arrays["task_losses"])
    np.testing.assert_array_equal(curves["weights"], run.arrays["weights"])
    np.testing.assert_array_equal(curves["x"], run.arrays["curve_x"])
    assert run.manifest["environment"]["versions"]["jax"]


def test_task_weighting_output_plots_through_the_cli(quick_run, tmp_path):
    out, _, _ = quick_run
    assert cli.main(["plot", "--results", str(out), "--out", str(tmp_path / "tw.png")]) == 0
    assert (tmp_path / "tw.png").stat().st_size > 0   # one data set: one figure, no suffix


def test_school_experiment_smallest_setting_writes_runs_that_plot_through_the_cli(tmp_path):
    school = load_script("experiments/school_convergence.py")
    out = tmp_path / "school"
    assert school.main(["--out", str(out), "--alternations", "3", "--rounds", "400", "--no-compile-cache"]) == 0
    runs = [store.read_run(p) for p in store.find_runs(out)]
    assert sorted(os.path.basename(r.path) for r in runs) == ["alternating", "apg", "dmtrl"]
    dmtrl = next(r for r in runs if r.path.endswith("dmtrl"))
    assert dmtrl.columns()["bytes"][-1] > 0 and dmtrl.summary["objective"] == pytest.approx(
        next(r for r in runs if r.path.endswith("apg")).summary["objective"], rel=1e-6)
    apg = next(r for r in runs if r.path.endswith("apg"))
    assert apg.summary["converged"] and apg.summary["relative_gap"] <= 1e-9
    cols = apg.columns()
    assert cols["round"][-1] == apg.summary["iterations"] and cols["gap"][-1] == pytest.approx(apg.summary["gap"])
    for name in ("convergence.png", "omega.png", "results.md"):
        assert (out / name).stat().st_size > 0
    assert cli.main(["plot", "--results", str(out), "--omega", "--out", str(tmp_path / "school.png")]) == 0
    assert (tmp_path / "school.png").stat().st_size > 0


def test_delta_m_signs_and_values(task_weighting):
    base = np.array([0.5, 2.0])
    # accuracy up 10 % on task 0 (higher is better), MSE down 50 % on task 1 (lower is better)
    got = task_weighting.delta_m(np.array([0.55, 1.0]), base, [True, False])
    assert got == pytest.approx(100 * (0.1 + 0.5) / 2)
    with pytest.raises(ValueError, match="baseline"):
        task_weighting.delta_m(np.ones(3), base, [True, False])


def test_log_timing_folds_an_untimed_compilation_into_the_run():
    from mtl_jax.experiments import task_weighting

    timed = dict(compile_seconds=np.float64(2.0), run_seconds=np.float64(0.5))
    assert task_weighting._timing(timed, 3) == "compile   6.0 s, run   1.50 s"
    chunked = dict(compile_seconds=np.float64(np.nan), run_seconds=np.float64(0.5))
    assert task_weighting._timing(chunked, 3) == "compile + run    1.5 s"
    assert "nan" not in task_weighting._timing(dict(compile_seconds=np.float64(4.0), run_seconds=np.nan), 1)


def test_bad_arguments_raise_value_error(task_weighting, tmp_path):
    def config(**values):
        return configs.make_config(task_weighting.Config, "quick", task_weighting.PRESETS, out=str(tmp_path), **values)

    with pytest.raises(ValueError, match="methods"):
        task_weighting.run(config(methods="equal,nope"))
    with pytest.raises(ValueError, match="seeds"):
        task_weighting.run(config(seeds=0))
    with pytest.raises(ValueError, match="lr_factors"):
        task_weighting.run(config(lr_factors="1,-2"))
    with pytest.raises(ValueError, match="size"):
        task_weighting.run(config(size="huge"))
    assert "task_weighting" in configs.EXPERIMENTS


def test_fixed_ones_runs_match_train_seeds_equal(task_weighting):
    """The single-task runner is train_seeds with constant weights: all-ones weights reproduce equal."""
    data = school_multihead(seed=0)
    config = TrainConfig(model="mlp", hidden=(8,), steps=15, batch_size=48, stratify=True, learning_rate=3e-3)
    ref = train_seeds(config, data, [0, 1])
    history, test = task_weighting.train_fixed_weights(config, data, [0, 1], np.ones((1, 3)))
    np.testing.assert_allclose(np.asarray(test.mse)[0], np.asarray(ref.test.mse), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(history.task_losses)[0], np.asarray(ref.history.task_losses), rtol=1e-5)


def test_benchmark_quick_smoke(capsys):
    bench = load_script("benchmarks/bench_weighting.py")
    out = bench.main(["--quick", "--schemes", "equal,gradnorm", "--only", "schemes,seeds"])
    printed = capsys.readouterr().out
    assert "CPU count" in printed and "gradnorm" in printed
    assert out["schemes"]["equal"]["ratio"] == 1.0
    assert all(np.isfinite(row["ratio"]) for row in out["seeds"].values())
    with pytest.raises(ValueError, match="--only"):
        bench.main(["--only", "gpu"])
    runs = bench.main(["--quick", "--only", "runs", "--runs", "pcgrad", "--gradient-mode", "both"])["runs"]
    assert set(runs) == {"equal", "pcgrad [vmap]", "pcgrad [loop]"} and runs["equal"]["ratio"] == 1.0
    assert "<= 2.0x" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--runs"):
        bench.main(["--only", "runs", "--runs", "nope"])
    with pytest.raises(ValueError, match="--gradient-mode"):
        bench.main(["--only", "runs", "--gradient-mode", "scan"])


def test_dmtrl_accuracy_quick_writes_every_run_the_table_and_the_figures(tmp_path):
    accuracy = load_script("experiments/dmtrl_accuracy.py")
    out = tmp_path / "acc"
    assert accuracy.main(["--quick", "--no-compile-cache", "--out", str(out)]) == 0
    runs = [store.read_run(p) for p in store.find_runs(out)]
    assert len(runs) == 12   # 6 methods x 2 seeds on one data set
    for name in ("results.md", "errors.png", "omega.png"):
        assert (out / name).stat().st_size > 0
    assert cli.main(["plot", "--results", str(out), "--out", str(tmp_path / "acc.png")]) == 0


def test_dmtrl_convergence_quick_writes_runs_tables_and_figures(tmp_path):
    # through the config runner (mtl-jax run), the same code as the script
    out = tmp_path / "conv"
    assert cli.main(["run", "dmtrl_convergence", "--preset", "quick", "compile_cache=false", "--out", str(out)]) == 0
    runs = [store.read_run(p) for p in store.find_runs(out)]
    assert runs and all(r.kind == "solver" for r in runs)
    assert any(r.config.get("fit", {}).get("solver") == "dmtrl" for r in runs)
    assert (out / "results.md").stat().st_size > 0
    figures = list((out / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 0 for f in figures)
    assert all(f.with_suffix(".pdf").exists() for f in figures)
    # resume at cell granularity: finished runs are read back, a missing one is recomputed; same numbers
    first = json.loads((out / "results.json").read_text())["results"]
    folders = sorted(p for p in store.find_runs(out) if "reference" not in str(p))
    kept = pathlib.Path(folders[0]) / "manifest.json"
    kept_text = kept.read_text()
    import shutil
    shutil.rmtree(folders[-1])
    assert cli.main(["run", "dmtrl_convergence", "--preset", "quick", "compile_cache=false", "--out", str(out),
                     "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["results"] == first
    assert kept.read_text() == kept_text and store.is_run(folders[-1])
