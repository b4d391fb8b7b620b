"""validate_dataset / validate_lams: every bad input raises ValueError naming the argument."""
import numpy as np
import pytest

from mtl_jax.data import validate_dataset, validate_lams


def _good():
    X = np.arange(12.0).reshape(6, 2)
    y = np.array([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    task = np.array([0, 1, 2, 0, 1, 2])
    return X, y, task


def _case(**change):
    X, y, task = _good()
    kwargs = {"X": X, "y": y, "task": task}
    kwargs.update(change)
    return kwargs


def _with(a, idx, value):
    a = np.array(a, dtype=float)
    a[idx] = value
    return a


BAD_CASES = {
    "X 1-D": (_case(X=np.arange(6.0)), "X"),
    "X 3-D": (_case(X=np.zeros((6, 2, 1))), "X"),
    "X non-numeric": (_case(X=np.array([["a", "b"]] * 6)), "X"),
    "y 2-D": (_case(y=np.ones((6, 1))), "y"),
    "y shorter": (_case(y=np.ones(5)), "y"),
    "task longer": (_case(task=np.zeros(7, dtype=int)), "task"),
    "no rows": (_case(X=np.zeros((0, 2)), y=np.zeros(0), task=np.zeros(0, dtype=int)), "X"),
    "no features": (_case(X=np.zeros((6, 0))), "X"),
    "NaN in X": (_case(X=_with(_good()[0], (2, 1), np.nan)), "X"),
    "Inf in X": (_case(X=_with(_good()[0], (0, 0), -np.inf)), "X"),
    "NaN in y": (_case(y=_with(_good()[1], 3, np.nan)), "y"),
    "Inf in y": (_case(y=_with(_good()[1], 3, np.inf)), "y"),
    "negative task id": (_case(task=np.array([0, 1, 2, 0, -1, 2])), "task"),
    "fractional task id": (_case(task=np.array([0, 1, 2, 0, 1.5, 2])), "task"),
    "NaN task id": (_case(task=np.array([0, 1, 2, 0, np.nan, 2])), "task"),
    "string task ids": (_case(task=np.array(["a", "b", "c", "a", "b", "c"])), "task"),
    "boolean task ids": (_case(task=np.array([0, 1, 0, 1, 0, 1], dtype=bool)), "task"),
    "task id >= num_tasks": (dict(_case(), num_tasks=2), "task"),
    "task with no samples": (_case(task=np.array([0, 2, 2, 0, 2, 0])), "task"),
    "num_tasks leaves empty tasks": (dict(_case(), num_tasks=5), "task"),
    "num_tasks not an int": (dict(_case(), num_tasks=3.5), "num_tasks"),
    "num_tasks zero": (dict(_case(), num_tasks=0), "num_tasks"),
    "labels not +-1 for hinge": (dict(_case(y=np.array([1.0, 0.0, 1, 1, -1, -1])), loss="hinge"), "y"),
    "labels not +-1 for logistic": (dict(_case(y=np.array([1.0, 2.0, 1, 1, -1, -1])), loss="logistic"), "y"),
    "unknown loss": (dict(_case(), loss="absolute"), "loss"),
}


@pytest.mark.parametrize("kwargs, name", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_bad_dataset_raises_value_error_naming_the_argument(kwargs, name):
    kwargs = dict(kwargs)
    X, y, task = kwargs.pop("X"), kwargs.pop("y"), kwargs.pop("task")
    with pytest.raises(ValueError) as err:
        validate_dataset(X, y, task, **kwargs)
    assert str(err.value).startswith(name)


def test_empty_task_ids_are_named():
    X, y, _ = _good()
    with pytest.raises(ValueError, match=r"task ids 1, 3 have no samples"):
        validate_dataset(X, y, np.array([0, 2, 2, 0, 4, 0]))


def test_good_dataset_canonical_form():
    X, y, task = _good()
    Xv, yv, tv, m = validate_dataset(X.astype(np.int32), y, task.astype(float), loss="hinge")
    assert (Xv.dtype, yv.dtype, tv.dtype, m) == (np.float64, np.float64, np.int64, 3)
    np.testing.assert_array_equal(Xv, X)
    np.testing.assert_array_equal(tv, task)


def test_float32_is_kept():
    X, y, task = _good()
    Xv, yv, _, _ = validate_dataset(X.astype(np.float32), y, task)
    assert Xv.dtype == yv.dtype == np.float32


def test_squared_loss_accepts_any_real_targets():
    X, _, task = _good()
    validate_dataset(X, np.linspace(-3, 3, 6), task, loss="squared")


@pytest.mark.parametrize(
    "lam1, lam2, name",
    [(0.0, 1.0, "lam1"), (-1.0, 1.0, "lam1"), (np.nan, 1.0, "lam1"), (np.inf, 1.0, "lam1"), ("a", 1.0, "lam1"),
     (True, 1.0, "lam1"), (1.0, -0.1, "lam2"), (1.0, np.inf, "lam2"), (1.0, None, "lam2"),
     (np.array([0.1, 0.0]), 1.0, "lam1")],
)
def test_bad_lams_raise_value_error_naming_them(lam1, lam2, name):
    with pytest.raises(ValueError) as err:
        validate_lams(lam1, lam2)
    assert str(err.value).startswith(name)


def test_good_lams():
    assert validate_lams(0.1, 0) == (0.1, 0.0)
    l1, l2 = validate_lams(np.array([0.1, 1.0]), 2)
    np.testing.assert_array_equal(l1, [0.1, 1.0])
    assert l2 == 2.0
