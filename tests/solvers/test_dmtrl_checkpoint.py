"""DMTRL checkpoints: chunks of rounds saved atomically, resumed with exactly the numbers of an uninterrupted run."""
import numpy as np
import pytest

from mtl_jax.data.sites import to_sites
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.solvers import dmtrl

KW = dict(lam1=0.1, lam2=1.0, loss="hinge", tol=1e-7)
SYSTEMS = dict(dropout_prob=0.2, straggler_prob=0.3, seed=5)


@pytest.fixture(scope="module")
def sites():
    X, y, task, _ = make_clustered_tasks(9, 4, samples_per_task=(8, 20), loss="hinge", seed=2)
    return to_sites(X, y, task)


def _same(a, b):
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    cols = [f for f in a.history[0]._fields if f != "seconds"]
    for ra, rb in zip(a.history, b.history, strict=True):
        np.testing.assert_array_equal([getattr(ra, f) for f in cols], [getattr(rb, f) for f in cols])  # NaN == NaN


def test_chunked_run_equals_one_program_bitwise(sites, tmp_path):
    whole = dmtrl.solve(sites, max_iter=120, **KW, **SYSTEMS)
    chunked = dmtrl.solve(sites, max_iter=120, checkpoint=str(tmp_path / "c.npz"), checkpoint_every=17, **KW,
                          **SYSTEMS)
    _same(whole, chunked)
    assert chunked.iterations == whole.iterations


def test_progress_is_reported_per_chunk_and_changes_no_number(sites, monkeypatch):
    whole = dmtrl.solve(sites, max_iter=120, **KW, **SYSTEMS)
    monkeypatch.setattr(dmtrl, "PROGRESS_EVERY", 25)
    seen = []
    reported = dmtrl.solve(sites, max_iter=120, progress=lambda rec, total: seen.append((rec.round, total)), **KW,
                           **SYSTEMS)
    _same(whole, reported)
    n = whole.iterations
    assert seen == [(min(r, n), 120) for r in range(25, n + 25, 25)]


def test_interrupted_run_resumes_to_the_uninterrupted_numbers(sites, tmp_path):
    path = str(tmp_path / "c.npz")
    whole = dmtrl.solve(sites, max_iter=90, **KW, **SYSTEMS)
    first = dmtrl.solve(sites, max_iter=40, checkpoint=path, checkpoint_every=15, **KW, **SYSTEMS)  # "killed" at 40
    assert first.iterations == 40 and not first.converged
    resumed = dmtrl.solve(sites, max_iter=90, checkpoint=path, checkpoint_every=15, **KW, **SYSTEMS)
    _same(whole, resumed)
    again = dmtrl.solve(sites, max_iter=90, checkpoint=path, checkpoint_every=15, **KW, **SYSTEMS)  # nothing left
    _same(whole, again)


def test_a_checkpoint_of_another_problem_is_refused_with_the_reason(sites, tmp_path):
    path = str(tmp_path / "c.npz")
    dmtrl.solve(sites, max_iter=5, checkpoint=path, **KW)
    with pytest.raises(ValueError, match="^checkpoint: .*another problem"):
        dmtrl.solve(sites, max_iter=10, checkpoint=path, **{**KW, "lam2": 2.0})
    with pytest.raises(ValueError, match="^checkpoint: .*another problem"):
        dmtrl.solve(sites, max_iter=10, checkpoint=path, **KW, dropout_prob=0.5)


def test_a_torn_or_foreign_file_is_refused_clearly(sites, tmp_path):
    torn = tmp_path / "torn.npz"
    torn.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="^checkpoint: .*not a valid .npz"):
        dmtrl.solve(sites, max_iter=5, checkpoint=str(torn), **KW)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, W=np.zeros(3))
    with pytest.raises(ValueError, match="^checkpoint: .*not a DMTRL checkpoint"):
        dmtrl.solve(sites, max_iter=5, checkpoint=str(foreign), **KW)


def test_checkpoint_options_are_checked(sites, tmp_path):
    with pytest.raises(ValueError, match="^checkpoint: the folder"):
        dmtrl.solve(sites, checkpoint=str(tmp_path / "missing" / "c.npz"), **KW)
    with pytest.raises(ValueError, match="^checkpoint_every"):
        dmtrl.solve(sites, checkpoint=str(tmp_path / "c.npz"), checkpoint_every=0, **KW)


def test_new_probabilities_hyper_parameters_and_seeds_do_not_compile_again(sites):
    from mtl_jax.solvers import base
    dmtrl.run(sites, max_iter=5, **KW, **SYSTEMS)
    before = base.cache_info()["compiled"]
    dmtrl.run(sites, max_iter=5, lam1=0.3, lam2=0.5, loss="hinge", tol=1e-5, dropout_prob=0.6, straggler_prob=0.1,
              straggler_effort=0.5, min_effort=0.3, seed=9, latency=0.2, bandwidth=1e5, speed=1e3, local_passes=3)
    assert base.cache_info()["compiled"] == before
