"""The results store: one run-folder layout, written atomically, read back exactly, errors that name the path."""
import json
import os

import jax
import numpy as np
import pytest

import mtl_jax
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.runner import store

ENV = {"versions": {"jax": "test"}}   # a fixed environment: most tests do not need the real probe


def _write(path, **kwargs):
    kwargs.setdefault("kind", "solver")
    kwargs.setdefault("config", {"lam1": 0.1})
    kwargs.setdefault("environment_info", ENV)
    return store.write_run(path, **kwargs)


def _listing(folder):
    return sorted(os.listdir(folder))


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in _listing(folder)}


@pytest.fixture(scope="module")
def small_fit():
    X, y, task, _ = make_clustered_tasks(5, 3, num_clusters=2, samples_per_task=15, seed=1)
    return mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0)


# ----------------------------------------------------------------------------- write / read

def test_round_trip_keeps_arrays_config_summary_and_history(tmp_path, rng):
    W, labels = rng.normal(size=(4, 3)), np.array(["a", "bc"])
    history = [{"round": 1, "objective": 2.5, "gap": 0.25}, {"round": 2, "objective": 2.0, "gap": 0.125}]
    config = {"lam1": 0.1, "nested": {"tasks": ["x", "y"], "m": 4}}
    path = _write(tmp_path / "run", config=config, history=history, arrays={"W": W, "labels": labels},
                  summary={"objective": 2.0}, name="label", started="2024-01-01T00:00:00+00:00")
    run = store.read_run(path)
    assert run.path == str(tmp_path / "run") and run.kind == "solver"
    assert sorted(run.arrays) == ["W", "labels"]
    np.testing.assert_array_equal(run.arrays["W"], W)
    assert run.arrays["W"].dtype == np.float64
    np.testing.assert_array_equal(run.arrays["labels"], labels)
    assert run.history == history
    assert run.config == config and run.summary == {"objective": 2.0}
    assert run.manifest["format"] == store.FORMAT and run.manifest["name"] == "label"
    assert run.manifest["started"] == "2024-01-01T00:00:00+00:00"
    assert run.manifest["environment"] == ENV
    assert run.manifest["files"] == {store.HISTORY: 2, store.ARRAYS: ["W", "labels"]}
    assert _listing(tmp_path / "run") == sorted(store.FILES)


def test_name_defaults_to_the_folder_name(tmp_path):
    assert store.read_run(_write(tmp_path / "exam")).manifest["name"] == "exam"


def test_history_given_as_columns_reads_back_as_the_same_columns(tmp_path, rng):
    columns = {"round": np.arange(1, 6), "objective": rng.normal(size=5), "weights": rng.random((5, 3))}
    run = store.read_run(_write(tmp_path / "run", history=columns))
    assert len(run.history) == 5 and run.history[0]["round"] == 1
    assert run.history[2]["weights"] == columns["weights"][2].tolist()
    got = run.columns()
    assert sorted(got) == sorted(columns)
    assert got["round"].dtype == np.int64
    for key, want in columns.items():
        np.testing.assert_array_equal(got[key], want)


def test_records_from_columns_refuses_columns_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        store.records_from_columns({"round": [1, 2, 3], "objective": [1.0, 2.0]})


def test_non_finite_floats_are_written_as_json_null_and_read_back_as_nan(tmp_path):
    history = [{"round": 1, "objective": float("nan"), "gap": np.float64(np.inf)},
               {"round": 2, "objective": 1.5, "gap": -np.inf}]
    path = _write(tmp_path / "run", config={"optimum": np.nan}, summary={"gap": np.inf}, history=history)
    for name in (store.MANIFEST, store.HISTORY):   # strict JSON: no NaN/Infinity literals
        text = (tmp_path / "run" / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
    lines = (tmp_path / "run" / store.HISTORY).read_text().splitlines()
    assert json.loads(lines[0]) == {"round": 1, "objective": None, "gap": None}
    run = store.read_run(path)
    assert run.config["optimum"] is None and run.summary["gap"] is None
    cols = run.columns()
    np.testing.assert_array_equal(cols["objective"], [np.nan, 1.5])
    np.testing.assert_array_equal(cols["gap"], [np.nan, np.nan])
    np.testing.assert_array_equal(cols["round"], [1, 2])


def test_jsonable_converts_numpy_values_paths_and_tuples(tmp_path):
    value = {"i": np.int32(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(3),
             "t": (1, 2), "p": tmp_path, 4: "key"}
    got = store.jsonable(value)
    assert got == {"i": 3, "f": 0.5, "b": True, "a": [0, 1, 2], "t": [1, 2], "p": str(tmp_path), "4": "key"}
    assert type(got["i"]) is int and type(got["b"]) is bool
    json.dumps(got, allow_nan=False)


def test_object_arrays_are_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"arrays\['bad'\].*object"):
        _write(tmp_path / "run", arrays={"ok": np.zeros(2), "bad": np.array([{}, None], dtype=object)})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "other"}, "kind"),
    ({"config": [("lam1", 0.1)]}, "config"),
])
def test_write_run_refuses_bad_kind_and_config(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _write(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_write_run_refuses_a_path_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="not a folder") as e:
        _write(path)
    assert str(path) in str(e.value)


def test_the_manifest_is_renamed_into_place_last(tmp_path, monkeypatch):
    renamed, real_replace = [], os.replace

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    _write(tmp_path / "run", history=[{"round": 1}], arrays={"W": np.ones(2)})
    assert sorted(renamed) == sorted(store.FILES) and renamed[-1] == store.MANIFEST


def test_failed_write_leaves_the_previous_run_intact_and_no_temp_files(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _write(folder, history=[{"round": 1, "objective": 1.0}], arrays={"W": np.ones(3)})
    before = _snapshot(folder)

    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        _write(folder, config={"lam1": 9.0}, history=[{"round": 1, "objective": 5.0}], arrays={"W": np.zeros(3)})
    assert _snapshot(folder) == before     # the same three files, byte for byte; no .tmp files
    monkeypatch.undo()
    run = store.read_run(folder)
    assert run.config == {"lam1": 0.1}
    np.testing.assert_array_equal(run.arrays["W"], np.ones(3))


def test_failed_write_into_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError):
        _write(tmp_path / "run", arrays={"W": np.ones(3)})
    assert _listing(tmp_path) == []


def test_rewriting_a_run_replaces_all_three_files(tmp_path):
    folder = tmp_path / "run"
    _write(folder, history=[{"round": 1}, {"round": 2}], arrays={"W": np.ones(2), "old": np.ones(1)})
    _write(folder, history=[{"round": 7}], arrays={"W": np.zeros(2)})
    run = store.read_run(folder)
    assert run.history == [{"round": 7}] and sorted(run.arrays) == ["W"]
    assert _listing(folder) == sorted(store.FILES)


def test_is_run_and_existing_files(tmp_path):
    assert not store.is_run(tmp_path) and store.existing_files(tmp_path) == []
    assert store.existing_files(tmp_path / "missing") == []
    (tmp_path / "result.npz").write_bytes(b"")
    assert store.existing_files(tmp_path) == ["result.npz"]
    _write(tmp_path / "run")
    assert store.is_run(tmp_path / "run")
    assert store.existing_files(tmp_path / "run") == list(store.FILES)


# ----------------------------------------------------------------------------- find_runs

def test_find_runs_finds_nested_runs_but_not_the_subfolders_of_a_run(tmp_path):
    for sub in ("b", "a/deep/run", "a/x", "a/x/inner"):   # a/x/inner sits inside the run a/x
        _write(tmp_path / sub)
    (tmp_path / "empty" / "folder").mkdir(parents=True)
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "result.npz").write_bytes(b"")
    assert store.find_runs(tmp_path) == [str(tmp_path / p) for p in ("a/deep/run", "a/x", "b")]


def test_find_runs_of_a_run_folder_is_that_folder(tmp_path):
    _write(tmp_path / "run")
    _write(tmp_path / "run" / "sub")
    assert store.find_runs(tmp_path / "run") == [str(tmp_path / "run")]


def test_find_runs_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(ValueError, match="not a folder") as e:
        store.find_runs(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


# ----------------------------------------------------------------------------- read_run errors

def _manifest(folder, **changes):
    path = folder / store.MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_read_run_of_a_missing_folder_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="not a folder") as e:
        store.read_run(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_read_run_without_manifest_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json") as e:
        store.read_run(tmp_path)
    assert str(tmp_path) in str(e.value) and "result.npz" not in str(e.value)


def test_read_run_of_the_old_layout_says_so(tmp_path):
    (tmp_path / "result.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="older result.npz layout") as e:
        store.read_run(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_read_run_of_a_wrong_format_names_the_manifest(tmp_path):
    _write(tmp_path / "run")
    _manifest(tmp_path / "run", format="mtl_jax.run/99")
    with pytest.raises(ValueError, match="not a mtl_jax.run/1 manifest") as e:
        store.read_run(tmp_path / "run")
    assert str(tmp_path / "run" / store.MANIFEST) in str(e.value) and "run/99" in str(e.value)


@pytest.mark.parametrize("text, problem", [("[1, 2]", "not a JSON object"), ("{not json", "cannot be read as JSON")])
def test_read_run_of_a_manifest_that_is_not_a_json_object_names_it(tmp_path, text, problem):
    _write(tmp_path / "run")
    (tmp_path / "run" / store.MANIFEST).write_text(text)
    with pytest.raises(ValueError, match=problem) as e:
        store.read_run(tmp_path / "run")
    assert str(tmp_path / "run" / store.MANIFEST) in str(e.value)


def test_read_run_of_an_unknown_kind_names_the_manifest(tmp_path):
    _write(tmp_path / "run")
    _manifest(tmp_path / "run", kind="banana")
    with pytest.raises(ValueError, match="unknown kind 'banana'") as e:
        store.read_run(tmp_path / "run")
    assert str(tmp_path / "run" / store.MANIFEST) in str(e.value)


@pytest.mark.parametrize("line, message", [("{broken", "line 2 is not JSON"), ("[1, 2]", "line 2 is not a JSON object")])
def test_read_run_of_a_malformed_history_line_names_file_and_line(tmp_path, line, message):
    _write(tmp_path / "run", history=[{"round": 1}, {"round": 2}])
    path = tmp_path / "run" / store.HISTORY
    path.write_text(path.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        store.read_run(tmp_path / "run")
    assert str(path) in str(e.value)


def test_read_run_skips_blank_history_lines(tmp_path):
    _write(tmp_path / "run", history=[{"round": 1}, {"round": 2}])
    path = tmp_path / "run" / store.HISTORY
    path.write_text(path.read_text().replace("\n", "\n\n"))
    assert store.read_run(tmp_path / "run").history == [{"round": 1}, {"round": 2}]


def test_read_run_of_a_corrupt_arrays_file_names_it(tmp_path):
    _write(tmp_path / "run", arrays={"W": np.ones(2)})
    (tmp_path / "run" / store.ARRAYS).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid .npz") as e:
        store.read_run(tmp_path / "run")
    assert str(tmp_path / "run" / store.ARRAYS) in str(e.value)
    assert "allow_pickle" not in str(e.value)


# ----------------------------------------------------------------------------- weighting runs

def test_weighting_curves_invert_curve_records_exactly(tmp_path, rng):
    losses, weights = rng.random((2, 3, 4)), rng.dirichlet(np.ones(4), size=(2, 3))
    x = np.array([9.5, 29.5, 49.5])    # window centres, as the experiments store them
    records = store.curve_records(losses, weights, x)
    assert len(records) == 6 and records[0] == {"step": 9.5, "seed": 0, "task_losses": losses[0, 0].tolist(),
                                                "weights": weights[0, 0].tolist()}
    run = store.read_run(_write(tmp_path / "run", kind="weighting", config={"dataset": "d"}, history=records))
    curves = store.weighting_curves(run)
    np.testing.assert_array_equal(curves["task_losses"], losses)
    np.testing.assert_array_equal(curves["weights"], weights)
    np.testing.assert_array_equal(curves["x"], x)
    np.testing.assert_array_equal(curves["seeds"], [0, 1])


def test_weighting_curves_do_not_depend_on_the_record_order(rng):
    losses, weights = rng.random((3, 2, 2)), rng.random((3, 2, 2))
    records = store.curve_records(losses, weights, np.array([0, 10]))
    shuffled = [records[i] for i in rng.permutation(len(records))]
    curves = store.weighting_curves(store.Run("mem", {"kind": "weighting"}, shuffled, {}))
    np.testing.assert_array_equal(curves["task_losses"], losses)
    np.testing.assert_array_equal(curves["weights"], weights)
    np.testing.assert_array_equal(curves["x"], [0.0, 10.0])


def test_weighting_curves_of_a_history_without_curves_names_the_run():
    with pytest.raises(ValueError, match=r"mem: history records lack \['task_losses', 'weights'\]"):
        store.weighting_curves(store.Run("mem", {"kind": "weighting"}, [{"step": 1, "seed": 0}], {}))


def test_curve_records_refuses_shapes_that_disagree():
    with pytest.raises(ValueError, match="curves"):
        store.curve_records(np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), np.arange(4))
    with pytest.raises(ValueError, match="curves"):
        store.curve_records(np.zeros((3, 2)), np.zeros((3, 2)), np.arange(3))


# ----------------------------------------------------------------------------- solver runs

def test_write_fit_stores_the_result(tmp_path, small_fit):
    run = store.read_run(store.write_fit(tmp_path / "fit", small_fit, environment_info=ENV))
    np.testing.assert_array_equal(run.arrays["W"], small_fit.W)
    np.testing.assert_array_equal(run.arrays["alpha"], small_fit.alpha)
    assert run.config == store.jsonable(small_fit.config)
    assert run.summary["objective"] == small_fit.objective and run.summary["iterations"] == small_fit.iterations
    assert run.summary["converged"] is True
    cols = run.columns()
    assert sorted(cols) == sorted(store.SOLVER_FIELDS)
    for key, want in small_fit.history_arrays().items():
        np.testing.assert_array_equal(cols[key], want)


def test_dense_omega_equals_the_fit_result_omega(tmp_path, small_fit):
    run = store.read_run(store.write_fit(tmp_path / "fit", small_fit, environment_info=ENV))
    np.testing.assert_allclose(store.dense_omega(run), small_fit.Omega, rtol=0, atol=1e-12)


def test_dense_omega_from_the_factors_equals_the_fit_result_omega(tmp_path, small_fit):
    run = store.read_run(store.write_fit(tmp_path / "fit", small_fit, environment_info=ENV))
    factors_only = run._replace(arrays={k: v for k, v in run.arrays.items() if k != "Omega"})
    np.testing.assert_allclose(store.dense_omega(factors_only), small_fit.Omega, rtol=0, atol=1e-12)


def test_dense_omega_refuses_more_tasks_than_the_cap(tmp_path, small_fit, monkeypatch):
    monkeypatch.setattr(store, "DENSE_OMEGA_MAX_TASKS", small_fit.W.shape[0] - 1)
    run = store.read_run(store.write_fit(tmp_path / "fit", small_fit, environment_info=ENV))
    assert "Omega" not in run.arrays and {"omega_U", "omega_a", "omega_b"} <= set(run.arrays)
    with pytest.raises(ValueError, match="too many for a dense Omega") as e:
        store.dense_omega(run)
    assert str(tmp_path / "fit") in str(e.value)


def test_dense_omega_without_omega_arrays_names_the_run(tmp_path):
    run = store.read_run(_write(tmp_path / "run", arrays={"W": np.ones((2, 2))}))
    with pytest.raises(ValueError, match="neither Omega nor omega_U") as e:
        store.dense_omega(run)
    assert str(tmp_path / "run") in str(e.value)


# ----------------------------------------------------------------------------- environment

def test_environment_has_versions_backend_and_devices():
    env = store.environment()
    assert env["versions"]["jax"] == jax.__version__ and env["versions"]["numpy"] == np.__version__
    assert env["versions"]["mtl_jax"] == mtl_jax.__version__
    assert env["backend"] == jax.default_backend()
    assert env["devices"] == [str(d) for d in jax.devices()] and len(env["devices"]) >= 1
    assert env["x64"] is True
    json.dumps(store.jsonable(env), allow_nan=False)


def test_write_run_records_the_environment_and_times_by_default(tmp_path):
    run = store.read_run(store.write_run(tmp_path / "run", kind="solver", config={}))
    env = run.manifest["environment"]
    assert env["versions"]["jax"] == jax.__version__ and env["backend"] == jax.default_backend()
    assert run.manifest["started"] <= run.manifest["ended"]


def test_a_sweep_is_a_kind_of_run(tmp_path):
    assert "sweep" in store.KINDS
    run = store.read_run(store.write_run(tmp_path / "s", kind="sweep", config={"sweep": {"lam1": [1.0]}},
                                         history=[{"seed": 0, "point": 0, "val_mse": 0.5}]))
    assert run.kind == "sweep" and run.history == [{"seed": 0, "point": 0, "val_mse": 0.5}]
