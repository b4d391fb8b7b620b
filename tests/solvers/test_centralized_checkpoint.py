"""Centralized checkpoints: chunks of APG iterations (or alternations) saved atomically, resumed with exactly the
numbers of an uninterrupted run; progress reported per chunk without changing a number."""
import numpy as np
import pytest

from mtl_jax.data.sites import to_sites
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.solvers import base, centralized

# the primal form (smooth loss) and the dual form (hinge), capped before convergence (restarts included)
CASES = {"primal": dict(lam1=1e-4, lam2=1.0, loss="squared", method="apg", tol=1e-12),
         "dual": dict(lam1=0.1, lam2=1.0, loss="hinge", method="apg", tol=1e-9)}
DIM = {"primal": 12, "dual": 4}
#: (iteration cap of the whole run, where the interrupted run stops, iterations per chunk)
CAPS = {"primal": (40, 18, 7), "dual": (90, 40, 17)}


@pytest.fixture(scope="module")
def data():
    out = {}
    for form, kw in CASES.items():
        X, y, task, _ = make_clustered_tasks(9, DIM[form], samples_per_task=(8, 20), loss=kw["loss"], seed=2)
        out[form] = to_sites(X, y, task)
    return out


@pytest.fixture(scope="module")
def whole(data):
    """The uninterrupted one-program runs, capped before convergence."""
    return {form: centralized.solve(data[form], max_iter=CAPS[form][0], **kw) for form, kw in CASES.items()}


def _same(a, b):
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    for x, y in zip(a.omega, b.omega, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (a.objective, a.gap, a.converged, a.iterations) == (b.objective, b.gap, b.converged, b.iterations)
    cols = [f for f in a.history[0]._fields if f != "seconds"]
    for ra, rb in zip(a.history, b.history, strict=True):
        np.testing.assert_array_equal([getattr(ra, f) for f in cols], [getattr(rb, f) for f in cols])  # NaN == NaN


@pytest.mark.parametrize("form", CASES)
def test_chunked_run_equals_one_program_bitwise(data, whole, form, tmp_path):
    n, _, every = CAPS[form]
    assert whole[form].iterations == n and not whole[form].converged
    chunked = centralized.solve(data[form], max_iter=n, checkpoint=str(tmp_path / "c.npz"), checkpoint_every=every,
                                **CASES[form])
    _same(whole[form], chunked)


def test_every_chunk_is_the_same_compiled_program(data, tmp_path):
    kw = CASES["dual"]
    centralized.solve(data["dual"], max_iter=40, checkpoint=str(tmp_path / "a.npz"), checkpoint_every=7, **kw)
    before = base.cache_info()["compiled"]
    centralized.solve(data["dual"], max_iter=60, checkpoint=str(tmp_path / "b.npz"), checkpoint_every=9,
                      **{**kw, "lam1": 0.2, "tol": 1e-8})
    assert base.cache_info()["compiled"] == before


@pytest.mark.parametrize("form", CASES)
def test_interrupted_run_resumes_to_the_uninterrupted_numbers(data, whole, form, tmp_path):
    path = str(tmp_path / "c.npz")
    n, stop, every = CAPS[form]
    first = centralized.solve(data[form], max_iter=stop, checkpoint=path, checkpoint_every=every, **CASES[form])
    assert first.iterations == stop and not first.converged  # "killed" at stop
    resumed = centralized.solve(data[form], max_iter=n, checkpoint=path, checkpoint_every=every, **CASES[form])
    _same(whole[form], resumed)
    again = centralized.solve(data[form], max_iter=n, checkpoint=path, checkpoint_every=every, **CASES[form])
    _same(whole[form], again)  # nothing left to do: the saved state as it is


def test_a_converged_run_resumes_as_converged(data, tmp_path):
    kw = {**CASES["dual"], "tol": 1e-5}
    one = centralized.solve(data["dual"], max_iter=120, **kw)  # the whole run's program (same history size)
    assert one.converged
    path = str(tmp_path / "c.npz")
    centralized.solve(data["dual"], max_iter=120, checkpoint=path, checkpoint_every=17, **kw)
    _same(one, centralized.solve(data["dual"], max_iter=120, checkpoint=path, checkpoint_every=17, **kw))


def test_progress_is_reported_per_chunk_and_changes_no_number(data, whole, monkeypatch):
    monkeypatch.setitem(centralized.PROGRESS_EVERY, "apg", 25)
    seen = []
    reported = centralized.solve(data["dual"], max_iter=90, progress=lambda rec, total: seen.append((rec, total)),
                                 **CASES["dual"])
    _same(whole["dual"], reported)
    assert [(r.round, total) for r, total in seen] == [(25, 90), (50, 90), (75, 90), (90, 90)]
    assert [r[:4] for r, _ in seen] == [whole["dual"].history[k - 1][:4] for k in (25, 50, 75, 90)]


def test_alternating_chunked_and_resumed_equal_the_uninterrupted_run(data, tmp_path):
    kw = dict(lam1=0.1, lam2=1.0, loss="squared", method="alternating", tol=1e-12)
    sites = data["primal"]._replace(y=data["primal"].y * 1.5)
    one = centralized.solve(sites, max_iter=8, **kw)
    path = str(tmp_path / "c.npz")
    seen = []
    first = centralized.solve(sites, max_iter=5, checkpoint=path, checkpoint_every=2,
                              progress=lambda rec, total: seen.append(rec.round), **kw)
    assert first.iterations == 5 and seen == [1, 2, 3, 4, 5]  # progress after every alternation
    _same(one, centralized.solve(sites, max_iter=8, checkpoint=path, checkpoint_every=2, **kw))


def test_a_checkpoint_of_another_problem_is_refused_with_the_reason(data, tmp_path):
    path = str(tmp_path / "c.npz")
    kw = CASES["dual"]
    centralized.solve(data["dual"], max_iter=5, checkpoint=path, **kw)
    for other in ({"lam2": 2.0}, {"tol": 1e-6}, {"method": "alternating"}, {"eps": 1e-3}):
        with pytest.raises(ValueError, match="^checkpoint: .*another problem"):
            centralized.solve(data["dual"], max_iter=10, checkpoint=path, **{**kw, **other})
    sites = data["dual"]._replace(X=data["dual"].X * 2.0)
    with pytest.raises(ValueError, match="^checkpoint: .*another problem"):
        centralized.solve(sites, max_iter=10, checkpoint=path, **kw)


def test_a_torn_or_foreign_file_is_refused_clearly(data, tmp_path):
    kw = CASES["dual"]
    torn = tmp_path / "torn.npz"
    torn.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="^checkpoint: .*not a valid .npz"):
        centralized.solve(data["dual"], max_iter=5, checkpoint=str(torn), **kw)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, W=np.zeros(3))
    with pytest.raises(ValueError, match="^checkpoint: .*not a centralized-solver checkpoint"):
        centralized.solve(data["dual"], max_iter=5, checkpoint=str(foreign), **kw)
    dmtrl_file = tmp_path / "dmtrl.npz"
    np.savez(dmtrl_file, format=np.array("mtl_jax.dmtrl_checkpoint/1"), fingerprint=np.array("x"))
    with pytest.raises(ValueError, match="^checkpoint: .*not a centralized-solver checkpoint"):
        centralized.solve(data["dual"], max_iter=5, checkpoint=str(dmtrl_file), **kw)


def test_checkpoint_options_are_checked(data, tmp_path):
    kw = CASES["dual"]
    with pytest.raises(ValueError, match="^checkpoint: the folder"):
        centralized.solve(data["dual"], checkpoint=str(tmp_path / "missing" / "c.npz"), **kw)
    with pytest.raises(ValueError, match="^checkpoint_every"):
        centralized.solve(data["dual"], checkpoint=str(tmp_path / "c.npz"), checkpoint_every=0, **kw)
    with pytest.raises(ValueError, match="^progress"):
        centralized.solve(data["dual"], progress=True, **kw)


def test_fit_passes_checkpoint_and_progress_to_the_centralized_solver(tmp_path):
    import mtl_jax
    X, y, task, _ = make_clustered_tasks(9, DIM["dual"], samples_per_task=(8, 20), loss="hinge", seed=2)
    kw = dict(CASES["dual"], max_iter=CAPS["dual"][0])  # the programs compiled above: no compilation here
    one = mtl_jax.fit(X, y, task, **kw)
    path = str(tmp_path / "c.npz")
    seen = []
    mtl_jax.fit(X, y, task, **{**kw, "max_iter": 30}, checkpoint=path, checkpoint_every=10,
                progress=lambda rec, total: seen.append(rec.round))
    assert seen == [10, 20, 30]
    resumed = mtl_jax.fit(X, y, task, **kw, checkpoint=path, checkpoint_every=10)
    np.testing.assert_array_equal(one.W, resumed.W)
    np.testing.assert_array_equal(one.alpha, resumed.alpha)
    assert (one.objective, one.gap, one.iterations) == (resumed.objective, resumed.gap, resumed.iterations)
    assert "checkpoint" not in resumed.config and resumed.config == one.config   # where it is saved is not the problem
    with pytest.raises(ValueError, match="^checkpoint_every"):
        mtl_jax.fit(X, y, task, **kw, checkpoint=path, checkpoint_every=0)
    with pytest.raises(ValueError, match="^checkpoint: the folder"):
        mtl_jax.fit(X, y, task, **kw, checkpoint=str(tmp_path / "missing" / "c.npz"))
