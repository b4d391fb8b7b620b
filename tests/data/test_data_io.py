"""load / save_npz / save_csv: round trips, atomic writes, files that are not what they claim."""
import os

import numpy as np
import pytest

from mtl_jax.data import load, save_csv, save_npz


@pytest.fixture
def data(rng):
    task = np.array([0, 1, 1, 2, 0, 2, 2])
    return rng.normal(size=(7, 3)), rng.normal(size=7), task


def test_npz_round_trip(tmp_path, data):
    X, y, task = data
    path = tmp_path / "d.npz"
    save_npz(path, X=X, y=y, task=task)
    for got, want in zip(load(path), data):
        np.testing.assert_array_equal(got, want)


def test_csv_round_trip(tmp_path, data):
    X, y, task = data
    path = tmp_path / "d.csv"
    save_csv(path, X, y, task, feature_names=["a", "b", "c"])
    assert path.read_text().splitlines()[0] == "a,b,c,y,task"
    for got, want in zip(load(path), data):
        np.testing.assert_array_equal(got, want)


def test_csv_custom_columns_any_order(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("school,f1,score,f2\n3,1.5,2.0,0\n0,2.5,1.0,1\n1,0,0,0\n2,1,1,1\n")
    X, y, task = load(path, task_column="school", target_column="score")
    np.testing.assert_array_equal(X, [[1.5, 0], [2.5, 1], [0, 0], [1, 1]])
    np.testing.assert_array_equal(y, [2.0, 1.0, 0, 1])
    np.testing.assert_array_equal(task, [3, 0, 1, 2])


def test_saves_leave_no_temp_files(tmp_path, data):
    X, y, task = data
    save_npz(tmp_path / "a.npz", X=X, y=y, task=task)
    save_npz(tmp_path / "a.npz", X=X, y=y, task=task)  # overwrite in place
    save_csv(tmp_path / "b.csv", X, y, task)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.csv"]


def test_failed_save_leaves_nothing_and_keeps_old_file(tmp_path, data):
    X, y, task = data
    path = tmp_path / "a.npz"
    save_npz(path, X=X, y=y, task=task)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_npz(path, X=np.array([object()], dtype=object))
    with pytest.raises(ValueError):
        save_csv(tmp_path / "b.csv", X, y, task, feature_names=["only_one"])
    assert os.listdir(tmp_path) == ["a.npz"] and path.read_bytes() == before


def test_text_renamed_npz_raises(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_text("X,y,task\n1,2,0\n")
    with pytest.raises(ValueError, match="fake.npz.*not a valid .npz"):
        load(path)


def test_npz_object_array_raises(tmp_path, data):
    X, y, task = data
    path = tmp_path / "obj.npz"
    np.savez(path, X=X, y=y, task=np.array([0, 1, 1, 2, 0, 2, "x"], dtype=object))  # needs pickle
    with pytest.raises(ValueError, match="obj.npz.*'task'"):
        load(path)


def test_npz_missing_array_raises(tmp_path, data):
    X, y, _ = data
    path = tmp_path / "m.npz"
    np.savez(path, X=X, y=y)
    with pytest.raises(ValueError, match="m.npz.*missing.*task"):
        load(path)


def test_npz_wrong_shape_raises(tmp_path, data):
    X, y, task = data
    path = tmp_path / "s.npz"
    np.savez(path, X=X.ravel(), y=y, task=task)
    with pytest.raises(ValueError, match="s.npz.*'X'"):
        load(path)


def test_csv_missing_column_raises(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("x0,y\n1,2\n")
    with pytest.raises(ValueError, match="c.csv.*'task'"):
        load(path)


def test_csv_non_numeric_value_raises(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("x0,y,task\n1,2,0\nabc,1,0\n")
    with pytest.raises(ValueError, match=r"c.csv.*'abc'.*'x0'.*line 3"):
        load(path)


def test_csv_empty_file_raises(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("")
    with pytest.raises(ValueError, match="e.csv.*empty"):
        load(path)


def test_csv_bad_data_is_named_with_path(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("x0,y,task\n1,nan,0\n")
    with pytest.raises(ValueError, match="n.csv: y.*NaN"):
        load(path)


def test_unknown_extension_raises(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="d.parquet.*extension"):
        load(path)


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os
    from mtl_jax.data.io import atomic_write
    path = tmp_path / "out.txt"
    with atomic_write(path, "w") as f:
        f.write("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_read_npz_refuses_object_arrays_in_its_own_words(tmp_path):
    from mtl_jax.data.io import read_npz

    path = tmp_path / "objects.npz"
    np.savez(path, X=np.array([{"a": 1}, None], dtype=object), y=np.ones(2))
    with pytest.raises(ValueError, match="Python objects") as e:
        read_npz(path)
    assert "allow_pickle" not in str(e.value) and "unsafely" not in str(e.value)
    np.testing.assert_array_equal(read_npz(path, ["y"])["y"], np.ones(2))


def test_read_npz_of_a_truncated_archive_names_the_file(tmp_path):
    from mtl_jax.data.io import read_npz

    path = tmp_path / "cut.npz"
    np.savez(path, X=np.arange(1000.0))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="not a valid .npz|cannot be read") as e:
        read_npz(path)
    assert str(path) in str(e.value) and "allow_pickle" not in str(e.value)


def test_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    from mtl_jax.data import load

    text = "task,x0,x1,y\n0,1.0,2.0,3.0\n1,4.0,5.0,6.0\n"
    (tmp_path / "plain.csv").write_text(text, encoding="utf-8")
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8-sig")   # what spreadsheets write as "CSV UTF-8"
    for a, b in zip(load(tmp_path / "plain.csv"), load(tmp_path / "bom.csv")):
        np.testing.assert_array_equal(a, b)
