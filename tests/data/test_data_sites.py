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


@pytest.mark.parametrize("layout", ["auto", "padded", "chunked"])
def test_round_trip_restores_original_rows_exactly(rng, layout):
    X, y, task, _ = _unequal(rng)
    Xr, yr, tr = from_sites(to_sites(X, y, task, layout=layout))
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
    s = to_sites(X, y, task, layout="padded")
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
    s = to_sites(X, y, task, layout="padded")
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


# --- the chunked layout (long-tailed task sizes) ---------------------------------------------------

def _skewed(rng, d=3):
    sizes = [40, 1, 1, 3, 1, 9, 1]                      # one large task, several of one row
    task = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    return rng.normal(size=(task.size, d)), rng.normal(size=task.size), task, sizes


def test_auto_layout_pads_equal_sizes_and_chunks_long_tails(rng, monkeypatch):
    from mtl_jax.data import sites as sites_module

    X, y, task, sizes = _skewed(rng)
    assert not to_sites(X, y, task).chunked             # padded X of a few kB: padded
    assert sites_module.choose_layout([20000] + [1] * 999, 40) == "chunked"
    assert sites_module.choose_layout([25] * 999 + [50], 800) == "padded"  # 1.9 N padded rows
    monkeypatch.setattr(sites_module, "PADDED_SMALL_BYTES", 0)
    assert to_sites(X, y, task).chunked                 # 7 x 40 padded rows > 2 N = 112
    m, n = 6, 5
    equal = to_sites(rng.normal(size=(m * n, 2)), rng.normal(size=m * n), np.repeat(np.arange(m), n))
    assert not equal.chunked and equal.X.shape == (m, n, 2) and equal.site is None
    s = to_sites(X, y, task, n_max=40)                  # n_max selects the padded layout
    assert not s.chunked and s.X.shape == (7, 40, 3)


def test_chunked_layout_matches_a_loop_reference(rng):
    X, y, task, sizes = _skewed(rng)
    s = to_sites(X, y, task, chunk=4)
    blocks = [-(-n // 4) for n in sizes]
    assert s.X.shape == (sum(blocks), 4, 3) and s.num_sites == 7 and s.num_blocks == sum(blocks) and s.n_max == 4
    np.testing.assert_array_equal(s.site, np.repeat(np.arange(7), blocks))
    np.testing.assert_array_equal(s.counts, sizes)
    index, Xs, ys, mask = (np.asarray(a) for a in (s.index, s.X, s.y, s.mask))
    for t in range(7):
        rows = np.flatnonzero(task == t)                # original order, across the site's chunks
        slots = index[np.asarray(s.site) == t].reshape(-1)
        np.testing.assert_array_equal(slots[:len(rows)], rows)
        assert np.all(slots[len(rows):] == -1)          # padding only at the end of the last chunk
    real = index >= 0
    np.testing.assert_array_equal(mask, real.astype(float))
    np.testing.assert_array_equal(Xs[real], X[index[real]])
    np.testing.assert_array_equal(ys[real], y[index[real]])
    assert np.all(Xs[~real] == 0) and np.all(ys[~real] == 0)


def test_contractions_agree_across_layouts(rng):
    """margins, feature_sums, sample_weights and the objectives: the same numbers on either layout."""
    import jax.numpy as jnp

    from mtl_jax import mtrl
    from mtl_jax.data.sites import feature_sums, margins, sample_weights, site_sums
    from mtl_jax.solvers.apg import gram_lmax_bound

    X, y, task, sizes = _skewed(rng)
    W = jnp.asarray(rng.normal(size=(7, 3)))
    padded, chunked = to_sites(X, y, task, layout="padded"), to_sites(X, y, task, chunk=4)

    def flat(s, a):  # per-slot values back to input order
        index = np.asarray(s.index)
        out = np.zeros(len(y))
        out[index[index >= 0]] = np.asarray(a)[index >= 0]
        return out

    for s in (padded, chunked):
        np.testing.assert_allclose(flat(s, margins(W, s)), np.sum(X * np.asarray(W)[task], 1), rtol=1e-13)
        np.testing.assert_allclose(flat(s, sample_weights(s)), 1.0 / np.array(sizes)[task], rtol=1e-15)
        r = rng.normal(size=len(y))
        coef = np.zeros(s.y.shape)
        index = np.asarray(s.index)
        coef[index >= 0] = r[index[index >= 0]]
        expected = np.stack([X[task == t].T @ r[task == t] for t in range(7)])
        np.testing.assert_allclose(feature_sums(jnp.asarray(coef), s), expected, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(site_sums(jnp.asarray(s.mask).sum(1), s), sizes)
        lmax = np.array([np.linalg.eigvalsh(X[task == t].T @ X[task == t])[-1] for t in range(7)])
        bound = np.asarray(gram_lmax_bound(s))
        assert np.all(bound >= lmax * (1 - 1e-12)) and np.all(bound <= 1.2 * lmax)
    reg = mtrl.TraceNormSq(0.3, 0.7)
    alpha_flat = rng.normal(size=len(y))
    values = []
    for s in (padded, chunked):
        index = np.asarray(s.index)
        alpha = np.zeros(s.y.shape)
        alpha[index >= 0] = alpha_flat[index[index >= 0]]
        values.append([float(mtrl.objective_J(W, s, lam1=0.3, lam2=0.7)),
                       float(mtrl.dual_objective(jnp.asarray(alpha), s, reg, "squared")[0]),
                       float(mtrl.duality_gap(W, jnp.asarray(alpha), s, reg, "squared"))])
    np.testing.assert_allclose(values[0], values[1], rtol=1e-12)


def test_layout_options_are_checked(rng):
    X, y, task, _ = _skewed(rng)
    with pytest.raises(ValueError, match="^layout"):
        to_sites(X, y, task, layout="flat")
    with pytest.raises(ValueError, match="^chunk"):
        to_sites(X, y, task, layout="padded", chunk=4)
    with pytest.raises(ValueError, match="^chunk"):
        to_sites(X, y, task, chunk=0)
    with pytest.raises(ValueError, match="^n_max"):
        to_sites(X, y, task, layout="chunked", n_max=40)


def test_choose_chunk_trades_padding_for_chunks():
    from mtl_jax.data.sites import choose_chunk

    assert choose_chunk([40] * 10) == 40                # equal sizes: one chunk per site
    assert choose_chunk([20000] + [1] * 999) in (4, 8)  # a long tail: a few rows per chunk
