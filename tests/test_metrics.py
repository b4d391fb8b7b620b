"""Delta m and the diverged-seed flags of mtl_jax.metrics against hand computations."""
import numpy as np
import pytest

from mtl_jax import metrics

HIGHER = np.array([True, False])  # task 0 accuracy (higher is better), task 1 MSE (lower is better)


def test_delta_m_closed_form():
    base = np.array([0.5, 2.0])
    # accuracy up 10 %, MSE down 50 %: (10 + 50) / 2
    assert metrics.delta_m(np.array([0.55, 1.0]), base, HIGHER) == pytest.approx(30.0)
    # leading axes are kept; the baseline against itself is exactly 0
    got = metrics.delta_m(np.array([[0.5, 2.0], [0.45, 3.0]]), base, HIGHER)
    np.testing.assert_allclose(got, [0.0, 100 * (-0.1 - 0.5) / 2], rtol=1e-14)
    with pytest.raises(ValueError, match="^baseline"):
        metrics.delta_m(np.ones(3), base, HIGHER)
    with pytest.raises(ValueError, match="^higher_is_better"):
        metrics.delta_m(np.ones(2), base, [True])


def test_summary_leaves_out_diverged_seeds_and_reports_median_mean_and_spread():
    base_seeds = np.array([[0.5, 2.0], [0.7, 1.0], [0.1, 1e6]])  # the baseline's third seed diverged
    ref = np.array([0.6, 1.5])
    metric = np.array([[0.66, 1.2], [0.54, 1.5], [0.6, 0.9], [0.0, 1e9]])  # the last seed blew up
    diverged = np.array([False, False, False, True])
    s = metrics.summarise_delta_m(metric, base_seeds, HIGHER, diverged=diverged,
                                  baseline_diverged=np.array([False, False, True]))
    per_seed = 100 * ((metric[:, 0] - ref[0]) / ref[0] - (metric[:, 1] - ref[1]) / ref[1]) / 2
    np.testing.assert_allclose(s.per_seed, per_seed, rtol=1e-12)
    np.testing.assert_allclose([s.median, s.mean, s.std],
                               [np.median(per_seed[:3]), per_seed[:3].mean(), per_seed[:3].std()], rtol=1e-12)
    assert (s.n_kept, s.n_diverged) == (3, 1) and s.per_seed[3] < -1e7  # kept in per_seed, out of the summary
    # without the flags the blown-up seed dominates the mean
    assert metrics.summarise_delta_m(metric, ref, HIGHER).mean < -1e7
    none = metrics.summarise_delta_m(metric[3:], ref, HIGHER, diverged=np.array([True]))
    assert np.isnan(none.mean) and np.isnan(none.median) and none.n_kept == 0
    with pytest.raises(ValueError, match="^diverged"):
        metrics.summarise_delta_m(metric, ref, HIGHER, diverged=np.zeros(3, bool))
    with pytest.raises(ValueError, match="^baseline_diverged"):
        metrics.summarise_delta_m(metric, ref, HIGHER, baseline_diverged=np.zeros(2, bool))


def test_diverged_seeds_flags_non_finite_reported_and_exploding_runs():
    t = np.linspace(0, 1, 40)
    calm = np.stack([2.0 - t, 1.0 + 0 * t], axis=-1)          # (T, K) decreasing, flat
    losses = np.stack([calm] * 5)                              # 5 seeds
    losses[1, 30:, 0] = np.nan                                 # a frozen run's history after divergence
    losses[2, -4:, 1] = 11.0                                   # exploded: last window 11 > 10 x 1
    losses[3, -4:, 1] = 9.0                                    # grew 9x: not flagged at factor 10
    test_metric = np.ones((5, 2))
    test_metric[4, 0] = np.inf                                 # parameters that overflow at test time
    flags = metrics.diverged_seeds(losses, test_metric=test_metric)
    np.testing.assert_array_equal(flags, [False, True, True, False, True])
    at = np.array([-1, -1, -1, 7, -1])                         # the training step's own detection
    np.testing.assert_array_equal(metrics.diverged_seeds(losses[:, :, :], diverged_at=at, factor=20.0),
                                  [False, True, False, True, False])
    # steps where a task is absent (loss 0) are left out; an all-absent window is not compared
    present = np.ones(losses.shape, bool)
    present[0, :8, 1] = False
    zeroed = np.where(present, losses, 0.0)
    assert not metrics.diverged_seeds(zeroed[:1], present=present[:1])[0]
    with pytest.raises(ValueError, match="^task_losses"):
        metrics.diverged_seeds(np.ones((3, 4)))
    with pytest.raises(ValueError, match="^factor"):
        metrics.diverged_seeds(losses, factor=1.0)
    with pytest.raises(ValueError, match="^window"):
        metrics.diverged_seeds(losses, window=0)
    with pytest.raises(ValueError, match="^diverged_at"):
        metrics.diverged_seeds(losses, diverged_at=np.ones(2))
