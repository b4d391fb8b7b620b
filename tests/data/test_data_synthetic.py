"""make_clustered_tasks and cluster_recovery."""
import numpy as np
import pytest
import scipy.linalg

from mtl_jax.data import cluster_recovery, make_clustered_tasks


def test_same_seed_same_arrays_different_seed_differs():
    a = make_clustered_tasks(8, 4, samples_per_task=(3, 9), seed=5)
    b = make_clustered_tasks(8, 4, samples_per_task=(3, 9), seed=5)
    c = make_clustered_tasks(8, 4, samples_per_task=(3, 9), seed=6)
    for u, v in zip(a[:3] + (a[3]["clusters"], a[3]["W_true"]), b[:3] + (b[3]["clusters"], b[3]["W_true"])):
        np.testing.assert_array_equal(u, v)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_hinge_labels_are_plus_minus_one():
    _, y, _, _ = make_clustered_tasks(6, 3, loss="hinge", seed=1)
    assert set(np.unique(y)) == {-1.0, 1.0}


def test_unequal_sizes_within_range():
    X, y, task, info = make_clustered_tasks(40, 3, samples_per_task=(2, 6), seed=2)
    sizes = np.bincount(task, minlength=40)
    assert sizes.min() >= 2 and sizes.max() <= 6 and len(set(sizes)) > 1
    assert X.shape == (task.size, 3) and y.shape == (task.size,)
    assert info["W_true"].shape == (40, 3) and info["clusters"].shape == (40,)


def test_squared_targets_follow_the_model():
    X, y, task, info = make_clustered_tasks(5, 4, noise=0.0, seed=3)
    np.testing.assert_allclose(y, np.sum(X * info["W_true"][task], axis=1), rtol=1e-12)


def test_planted_clusters_are_balanced():
    _, _, _, info = make_clustered_tasks(10, 5, num_clusters=3, seed=4)
    assert sorted(np.bincount(info["clusters"])) == [3, 3, 4]


def test_recovery_is_perfect_on_true_covariance():
    _, _, _, info = make_clustered_tasks(30, 10, num_clusters=3, seed=0)
    W = info["W_true"]
    Omega = scipy.linalg.sqrtm(W @ W.T).real
    Omega /= np.trace(Omega)
    assert cluster_recovery(Omega, info["clusters"]) == 1.0


def test_recovery_is_near_chance_on_random_psd(rng):
    _, _, _, info = make_clustered_tasks(90, 5, num_clusters=3, seed=0)
    scores = []
    for _ in range(10):
        A = rng.normal(size=(90, 90))
        scores.append(cluster_recovery(A @ A.T, info["clusters"]))
    assert 0.2 < np.mean(scores) < 0.45  # chance: (30 - 1) / (90 - 1) = 0.33


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_tasks": 0}, "num_tasks"), ({"dim": 2.5}, "dim"), ({"num_clusters": 9}, "num_clusters"),
     ({"samples_per_task": (5, 2)}, "samples_per_task"), ({"samples_per_task": 0}, "samples_per_task"),
     ({"loss": "l1"}, "loss"), ({"noise": -1.0}, "noise"), ({"cluster_spread": np.nan}, "cluster_spread"),
     ({"seed": -1}, "seed")],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"num_tasks": 8, "dim": 3, **kwargs}
    with pytest.raises(ValueError) as err:
        make_clustered_tasks(args.pop("num_tasks"), args.pop("dim"), **args)
    assert str(err.value).startswith(name)
