"""to_sites / from_sites, center_by_task, add_intercept."""
import jax
import numpy as np
import pytest

from mtl_jax.data import add_intercept, center_by_task, from_sites, to_sites


def _unequal(rng):
    sizes = [7, 1, 3, 12]                               # includes a size-1 task
    task = rng.permutation(np.repeat(np.arange(4), sizes))
    X = rng.normal(size=(task.size, 3))
    y = rng.normal(size=task.size)
    return X, y, task, sizes


def test_round_trip_restores_original_rows_exactly(rng):
    X, y, task, _ = _unequal(rng)
    Xr, yr, tr = from_sites(to_sites(X, y, task))
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, y)
    np.testing.assert_array_equal(tr, task)


def test_sites_layout_matches_a_loop_reference(rng):
    X, y, task, sizes = _unequal(rng)
    s = to_sites(X, y, task, n_max=15)
    assert s.X.shape == (4, 15, 3) and s.y.shape == s.mask.shape == s.index.shape == (4, 15)
    np.testing.assert_array_equal(s.counts, sizes)
    for t in range(4):
        rows = np.flatnonzero(task == t)                # original order within the task
        n = len(rows)
        np.testing.assert_array_equal(s.index[t, :n], rows)
        np.testing.assert_array_equal(s.X[t, :n], X[rows])
        np.testing.assert_array_equal(s.y[t, :n], y[rows])


def test_padding_is_zero_and_masked(rng):
    X, y, task, sizes = _unequal(rng)
    s = to_sites(X, y, task)
    assert s.mask.dtype == s.X.dtype
    expected_mask = np.arange(s.n_max)[None, :] < np.array(sizes)[:, None]
    np.testing.assert_array_equal(s.mask, expected_mask.astype(float))
    pad = ~expected_mask
    assert np.all(np.asarray(s.X)[pad] == 0)
    assert np.all(np.asarray(s.y)[pad] == 0)
    assert np.all(np.asarray(s.index)[pad] == -1)


def test_n_max_too_small_raises(rng):
    X, y, task, _ = _unequal(rng)
    with pytest.raises(ValueError, match="^n_max"):
        to_sites(X, y, task, n_max=11)


def test_sites_vmap_masked_sums(rng):
    X, y, task, _ = _unequal(rng)
    s = to_sites(X, y, task)
    sums = jax.vmap(lambda Xt, mt: (Xt * mt[:, None]).sum(0))(s.X, s.mask)
    expected = np.stack([X[task == t].sum(0) for t in range(4)])
    np.testing.assert_allclose(sums, expected, rtol=1e-12)


def test_center_by_task_gives_zero_task_means(rng):
    X, y, task, _ = _unequal(rng)
    Xc, yc, means = center_by_task(X + 5.0, y - 2.0, task)
    for t in range(4):
        np.testing.assert_allclose(Xc[task == t].mean(0), 0, atol=1e-12)
        np.testing.assert_allclose(yc[task == t].mean(), 0, atol=1e-12)
        np.testing.assert_allclose(means.X[t], (X + 5.0)[task == t].mean(0), rtol=1e-12)
        np.testing.assert_allclose(means.y[t], (y - 2.0)[task == t].mean(), rtol=1e-12)


def test_add_intercept_appends_ones(rng):
    X = rng.normal(size=(5, 2))
    Xi = add_intercept(X)
    np.testing.assert_array_equal(Xi, np.column_stack([X, np.ones(5)]))
    np.testing.assert_array_equal(add_intercept(jax.numpy.asarray(X)), Xi)


def test_grouped_equal_counts_take_the_copy_path_and_match_the_gather_path(rng):
    # Rows grouped by task with equal counts are packed by one copy; shuffled rows by a gather.
    # Both must give the same sites (up to the order of rows, which index records).
    m, n, d = 6, 5, 4
    X = rng.normal(size=(m * n, d))
    y = rng.normal(size=m * n)
    task = np.repeat(np.arange(m), n)
    grouped = to_sites(X, y, task)
    perm = rng.permutation(m * n)
    shuffled = to_sites(X[perm], y[perm], task[perm])
    np.testing.assert_array_equal(grouped.index, np.arange(m * n).reshape(m, n))
    np.testing.assert_array_equal(np.asarray(grouped.X), X.reshape(m, n, d))
    np.testing.assert_array_equal(np.asarray(grouped.y), y.reshape(m, n))
    np.testing.assert_array_equal(np.asarray(grouped.mask), np.ones((m, n)))
    for t in range(m):  # same rows per site, in their (original, resp. shuffled) order
        np.testing.assert_array_equal(np.sort(np.asarray(shuffled.X[t]), axis=0), np.sort(X.reshape(m, n, d)[t], axis=0))


def test_packed_sites_do_not_share_memory_with_the_input(rng):
    # The device array may share the packing buffer, never the caller's X: writing X afterwards
    # must not change the sites.
    m, n, d = 4, 3, 2
    X = rng.normal(size=(m * n, d))
    s = to_sites(X, rng.normal(size=m * n), np.repeat(np.arange(m), n))
    before = np.asarray(s.X).copy()
    X[:] = 0.0
    np.testing.assert_array_equal(np.asarray(s.X), before)
