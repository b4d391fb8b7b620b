"""Offline deep multi-task datasets: shapes, determinism, label ranges, task scales, argument checks."""
import numpy as np
import pytest

from mtl_jax.data import deep
from mtl_jax.data.deep import imbalanced_regression, multi_digits, school_multihead, task_scales


@pytest.fixture(scope="module")
def digits():
    return multi_digits(50, 20, canvas=(12, 12), seed=3)


def test_multi_digits_shapes_and_spec(digits):
    assert digits.train.x.shape == (50, 12, 12, 1)
    assert digits.test.x.shape == (20, 12, 12, 1)
    assert [y.shape for y in digits.train.y] == [(50,), (50,)]
    assert digits.train.mask.shape == (50, 2) and digits.train.mask.all()
    assert digits.spec.kinds == ("classification", "classification")
    assert digits.spec.out_dims == (10, 10)
    deep.validate_split(digits.train, digits.spec)
    deep.validate_split(digits.test, digits.spec)


def test_multi_digits_labels_and_pixels_in_range(digits):
    for split in (digits.train, digits.test):
        for y in split.y:
            assert y.dtype.kind == "i" and y.min() >= 0 and y.max() <= 9
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0


def test_multi_digits_is_the_max_of_two_shifted_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    data = multi_digits(5, 5, canvas=(10, 13), seed=0)
    # Left digit at rows 0..7, cols 0..7; right digit at rows 2..9, cols 5..12. Find the source
    # images of the right classes that match the parts only one digit covers, then check the max.
    for n in range(5):
        x = data.train.x[n, :, :, 0]
        y_left, y_right = data.train.y[0][n], data.train.y[1][n]
        lefts = [i for i in np.flatnonzero(labels == y_left) if np.allclose(images[i][:, :5], x[:8, :5])]
        rights = [i for i in np.flatnonzero(labels == y_right) if np.allclose(images[i][:, 3:], x[2:, 8:])]
        found = False
        for i in lefts:
            for j in rights:
                canvas_l, canvas_r = np.zeros((10, 13)), np.zeros((10, 13))
                canvas_l[:8, :8] = images[i]
                canvas_r[2:, 5:] = images[j]
                found |= np.allclose(x, np.maximum(canvas_l, canvas_r))
        assert found, f"image {n} is not max(left digit {y_left}, right digit {y_right})"


def test_multi_digits_deterministic_under_seed():
    a, b, c = multi_digits(30, 10, seed=1), multi_digits(30, 10, seed=1), multi_digits(30, 10, seed=2)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y[1], b.test.y[1])
    assert not np.array_equal(a.train.x, c.train.x)


def test_multi_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        multi_digits(0, 10)
    with pytest.raises(ValueError, match="n_test"):
        multi_digits(10, 2.5)
    with pytest.raises(ValueError, match="canvas"):
        multi_digits(10, 10, canvas=(7, 12))
    with pytest.raises(ValueError, match="test_fraction"):
        multi_digits(10, 10, test_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        multi_digits(10, 10, seed=-1)


def test_imbalanced_regression_shapes_and_scale_ratio():
    data = imbalanced_regression(40, 15, num_tasks=10, in_dim=12, out_dim=3, max_scale_ratio=100.0, seed=0)
    assert data.train.x.shape == (40, 12) and data.test.x.shape == (15, 12)
    assert len(data.train.y) == 10 and all(y.shape == (40, 3) for y in data.train.y)
    assert data.spec.kinds == ("regression",) * 10 and data.spec.out_dims == (3,) * 10
    sigma = task_scales(10, 100.0)
    assert sigma.max() / sigma.min() == pytest.approx(100.0)
    # |y_i| <= sigma_i (tanh is bounded by 1), and the empirical scales follow sigma: the target
    # magnitudes of the last and first task differ by the ratio of their scales.
    for y, s in zip(data.train.y, sigma):
        assert np.abs(y).max() <= s + 1e-12
    mags = np.array([np.abs(y).mean() / s for y, s in zip(data.train.y, sigma)])
    np.testing.assert_allclose(mags, mags.mean(), rtol=0.5)  # same tanh shape, up to sampling
    ratio = np.abs(data.train.y[-1]).mean() / np.abs(data.train.y[0]).mean()
    assert 30 < ratio < 300


def test_imbalanced_regression_matches_formula():
    # Rebuild the targets from the same random stream: y_i = sigma_i tanh((B + eps_i) x).
    data = imbalanced_regression(7, 3, num_tasks=4, in_dim=5, out_dim=2, max_scale_ratio=10.0, seed=11)
    rng = np.random.default_rng(11)
    B = rng.normal(scale=np.sqrt(10.0), size=(2, 5))
    eps = rng.normal(scale=np.sqrt(3.5), size=(4, 2, 5))
    x = rng.normal(scale=1 / np.sqrt(5), size=(7, 5))
    np.testing.assert_allclose(data.train.x, x)
    sigma = np.geomspace(1, 10, 4)
    for i in range(4):
        np.testing.assert_allclose(data.train.y[i], sigma[i] * np.tanh(x @ (B + eps[i]).T), rtol=1e-12)


def test_imbalanced_regression_deterministic_and_validated():
    a = imbalanced_regression(10, 5, in_dim=4, out_dim=2, seed=5)
    b = imbalanced_regression(10, 5, in_dim=4, out_dim=2, seed=5)
    np.testing.assert_array_equal(a.test.y[3], b.test.y[3])
    with pytest.raises(ValueError, match="num_tasks"):
        imbalanced_regression(10, 5, num_tasks=0)
    with pytest.raises(ValueError, match="max_scale_ratio"):
        imbalanced_regression(10, 5, max_scale_ratio=0.5)
    with pytest.raises(ValueError, match="out_dim"):
        imbalanced_regression(10, 5, out_dim=True)
    with pytest.raises(ValueError, match="basis_var"):
        imbalanced_regression(10, 5, basis_var=float("nan"))


@pytest.fixture(scope="module")
def school():
    return school_multihead(seed=0)


def test_school_multihead_one_head_per_school_gender(school):
    assert school.spec.names == ("schgend=mixed", "schgend=girls", "schgend=boys")
    assert school.spec.kinds == ("regression",) * 3 and school.spec.out_dims == (1, 1, 1)
    n_train, n_test = len(school.train.x), len(school.test.x)
    assert n_train + n_test == 4059
    assert school.train.x.shape[1] == 7
    # Every pupil is in exactly one head; the heads' sizes are the counts of the Exam data.
    for split in (school.train, school.test):
        assert (split.mask.sum(axis=1) == 1).all()
        assert all(y.shape == (len(split.x), 1) for y in split.y)
    sizes = school.train.mask.sum(0) + school.test.mask.sum(0)
    np.testing.assert_array_equal(sizes, [2169, 1377, 513])
    np.testing.assert_allclose(school.test.mask.sum(0) / sizes, 0.25, atol=0.01)


def test_school_multihead_deterministic_and_validated(school):
    again = school_multihead(seed=0)
    np.testing.assert_array_equal(again.test.x, school.test.x)
    other = school_multihead(grouping="vr", school_features=False, seed=1)
    assert other.train.x.shape[1] == 4 and len(other.spec.kinds) == 3
    with pytest.raises(ValueError, match="grouping"):
        school_multihead(grouping="region")
    with pytest.raises(ValueError, match="test_fraction"):
        school_multihead(test_fraction=0)


def test_validate_split_names_the_problem(digits):
    bad = digits.train._replace(y=(digits.train.y[0], digits.train.y[1] + 10))
    with pytest.raises(ValueError, match=r"y\[1\].*labels"):
        deep.validate_split(bad, digits.spec, "train")
    with pytest.raises(ValueError, match="mask"):
        deep.validate_split(digits.train._replace(mask=digits.train.mask[:, :1]), digits.spec)
    with pytest.raises(ValueError, match="spec"):
        deep.validate_spec(deep.TaskSpec(("classification",), (1,), ("a",)))
