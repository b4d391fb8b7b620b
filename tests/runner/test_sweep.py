"""Sweeps: the grid syntax, splits, selection, both ways of running the points, and the store's records.

Small data (6 tasks, 4 features) and small grids; accuracy checks run at tol 1e-14 (J ~ 1.5 to 14 here),
where the duality gap bounds ``||W - W*||_F <= sqrt(2 gap / lam1)`` near 1e-6 for the lam1 used here; the
measured differences are ~1e-7.
"""
import numpy as np
import pytest

import mtl_jax
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.runner import store
from mtl_jax.runner.sweep import (
    Grid,
    evaluate,
    parse_grid,
    path_order,
    read_sweep,
    select,
    split_by_task,
    sweep,
)

TIGHT = 1e-14
GRID = "lam1=0.05:2:3:log lam2=0,0.3,3 seeds=2"


@pytest.fixture(scope="module")
def data():
    X, y, task, _ = make_clustered_tasks(6, 4, num_clusters=2, samples_per_task=(12, 24), noise=0.5, seed=3)
    return X, y, task


@pytest.fixture(scope="module")
def path_run(data, tmp_path_factory):
    X, y, task = data
    out = tmp_path_factory.mktemp("sweep") / "run"
    return sweep(X, y, task, GRID, tol=TIGHT, strategy="path", out=out)


@pytest.fixture(scope="module")
def batched_run(data):
    """Batches of 5 of the 9 points: the first cold, the second (4 points, padded to 5) warm-started
    element-wise from the first; one compiled program for both."""
    X, y, task = data
    return sweep(X, y, task, GRID, tol=TIGHT, strategy="batched", batch_size=5)


# ----------------------------------------------------------------------------- grid syntax

def test_parse_grid_ranges_lists_and_seeds():
    g = parse_grid("lam1=1e-3:1e1:8:log lam2=0.1,1,10 seeds=5")
    np.testing.assert_allclose(g.lam1, np.geomspace(1e-3, 1e1, 8), rtol=1e-15)
    assert g.lam1[0] == 1e-3 and g.lam1[-1] == 10.0
    assert g.lam2 == (0.1, 1.0, 10.0) and g.seeds == (0, 1, 2, 3, 4)
    g = parse_grid(["lam1=0.5:1:3", "lam2=0.5"])
    assert g.lam1 == (0.5, 0.75, 1.0) and g.lam2 == (0.5,) and g.seeds == (0,)
    g = parse_grid("lam1=0.1:0.3:3:lin lam2=2, seeds=7,")
    np.testing.assert_allclose(g.lam1, (0.1, 0.2, 0.3))
    assert g.lam2 == (2.0,) and g.seeds == (7,)
    g = parse_grid({"lam1": [1.0, 0.1], "lam2": "0:1:3", "seeds": [4, 2]})
    assert g.lam1 == (1.0, 0.1) and g.lam2 == (0.0, 0.5, 1.0) and g.seeds == (4, 2)
    assert g.points().shape == (6, 2) and tuple(g.points()[1]) == (1.0, 0.5)   # lam1 major
    assert parse_grid(g.spec()) == g and parse_grid(g) is g
    big = parse_grid("lam1=1e-3:1e1:8:log lam2=1e-3:1e1:8:log seeds=5")
    assert parse_grid(big.spec()) == big   # the spec of explicit values reads back exactly


@pytest.mark.parametrize("spec, words", [
    ("lam1=1 lam3=2", ["lam3", "known"]),
    ("lam1=1 lam2=1 lam1=2", ["lam1", "twice"]),
    ("lam1 lam2=1", ["'lam1'", "KEY=VALUES"]),
    ("lam1=1e-3:1e1:x:log lam2=1", ["lam1", "'x'"]),
    ("lam1=1e-3:1e1:1:log lam2=1", ["lam1", ">= 2"]),
    ("lam1=1e-3:1e1:8:ln lam2=1", ["lam1", "'ln'"]),
    ("lam1=0:1:4:log lam2=1", ["lam1", "log range"]),
    ("lam1=1:2 lam2=1", ["lam1", "lo:hi:n"]),
    ("lam1=0.1,abc lam2=1", ["lam1", "'abc'"]),
    ("lam1=0,1 lam2=1", ["lam1", "> 0"]),
    ("lam1=1 lam2=-1,1", ["lam2", ">= 0"]),
    ("lam1=1,1 lam2=1", ["lam1", "repeated"]),
    ("lam1=inf lam2=1", ["lam1", "'inf'"]),
    ("lam1=1", ["lam2", "missing"]),
    ("lam1=1 lam2=1 seeds=0", ["seeds", "count"]),
    ("lam1=1 lam2=1 seeds=1,x", ["seeds", "'x'"]),
    ("lam1=1 lam2=1 seeds=2,2", ["seeds", "repeated"]),
])
def test_parse_grid_errors_name_the_key_and_token(spec, words):
    with pytest.raises(ValueError) as e:
        parse_grid(spec)
    assert str(e.value).startswith("grid:")
    for w in words:
        assert w in str(e.value)


def test_path_order_visits_neighbours_from_large_to_small():
    g = parse_grid("lam1=0.1,1,10 lam2=0.5,5")
    order = path_order(g)
    assert sorted(order) == list(range(6))
    pts = g.points()[order]
    assert pts[0].tolist() == [10.0, 5.0]            # the most regularised point first
    steps = np.abs(np.diff(np.log(pts), axis=0))
    assert np.all(np.sum(steps > 0, axis=1) == 1)   # each step changes one coordinate by one grid step


# ----------------------------------------------------------------------------- splits and selection

def test_split_by_task_is_stratified_seeded_and_disjoint(data):
    _, _, task = data
    tr0, va0, te0 = split_by_task(task, 0)
    tr1, va1, te1 = split_by_task(task, 1)
    again = split_by_task(task, 0)
    assert all(np.array_equal(a, b) for a, b in zip((tr0, va0, te0), again))       # same seed, same split
    assert not np.array_equal(te0, te1)                                           # a new split per seed
    assert np.all(tr0.astype(int) + va0 + te0 == 1)                               # a partition
    for a, b in ((tr0, tr1), (va0, va1), (te0, te1)):                             # same counts per task
        assert np.array_equal(np.bincount(task[a], minlength=6), np.bincount(task[b], minlength=6))
    n = np.bincount(task)
    np.testing.assert_array_equal(np.bincount(task[te0], minlength=6), np.rint(0.2 * n))
    assert np.all(np.bincount(task[tr0], minlength=6) >= 1)


def test_select_least_validation_with_ties_to_the_most_regularised():
    pts = parse_grid("lam1=0.1,1 lam2=0,1").points()
    assert select([3.0, 2.0, 1.0, 4.0], pts) == 2
    assert select([1.0, 1.0, 1.0 + 1e-12, 5.0], pts) == 2       # a tie within rtol: larger lam1 wins
    assert select([1.0, 1.0, 5.0, 5.0], pts) == 1               # then the larger lam2
    assert select([np.nan, 2.0, 3.0, np.nan], pts) == 1
    with pytest.raises(ValueError, match="val"):
        select([np.nan] * 4, pts)


# ----------------------------------------------------------------------------- sweeps against fit

def test_sweep_equals_fit_point_by_point_and_selects_the_same(data, path_run):
    X, y, task = data
    res = path_run
    assert res.strategy == "path" and res.W.shape == (2, 9, 6, 4) and res.converged.all()
    for k, seed in enumerate(res.seeds):
        train, val = res.masks["train"][k], res.masks["val"][k]
        np.testing.assert_array_equal(train, split_by_task(task, seed)[0])
        Ws, objs = [], []
        for lam1, lam2 in res.points:
            f = mtl_jax.fit(X[train], y[train], task[train], lam1=lam1, lam2=lam2, tol=TIGHT, num_tasks=6)
            Ws.append(f.W)
            objs.append(f.objective)
        np.testing.assert_allclose(res.W[k], np.stack(Ws), atol=1e-6, rtol=0)
        np.testing.assert_allclose(res.objective[k], objs, atol=1e-6, rtol=0)
        assert select(evaluate(np.stack(Ws), X[val], y[val], task[val], "squared"), res.points) == res.selected[k]


def test_path_and_batched_agree(path_run, batched_run):
    a, b = path_run, batched_run
    assert b.strategy == "batched" and b.converged.all()
    np.testing.assert_allclose(a.W, b.W, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.objective, b.objective, atol=1e-6, rtol=0)
    # certified: J is lam1-strongly convex, so each W is within sqrt(2 gap / lam1) of the one optimum
    lam1 = a.points[:, 0]
    bound = np.sqrt(2 * a.gap / lam1) + np.sqrt(2 * b.gap / lam1)
    assert np.all(np.sqrt(np.sum((a.W - b.W) ** 2, axis=(2, 3))) <= bound)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_allclose(a.test, b.test, atol=1e-6)
    assert a.selected_params == [dict(p, val=q["val"], test=q["test"]) for p, q in
                                 zip(b.selected_params, a.selected_params)]


def test_batched_points_are_frozen_when_converged(data, batched_run):
    """A point of a cold batch stops where it would stop alone: the iterations of a cold single fit (+-1
    for round-off in the vectorised arithmetic), although the batch runs until its slowest point is done."""
    X, y, task = data
    res = batched_run
    k, train = 0, res.masks["train"][0]
    first = res.order[:5]                                   # the first batch, started from zeros
    its = res.iterations[k, first]
    assert its.max() > its.min()
    for p in (first[np.argmin(its)], first[np.argmax(its)]):
        lam1, lam2 = res.points[p]
        f = mtl_jax.fit(X[train], y[train], task[train], lam1=lam1, lam2=lam2, tol=TIGHT, num_tasks=6)
        assert abs(f.iterations - res.iterations[k, p]) <= 1
        np.testing.assert_allclose(res.W[k, p], f.W, atol=1e-9, rtol=0)


def test_same_seed_same_numbers_and_seeds_independent(data, path_run):
    X, y, task = data
    calls = []
    one = sweep(X, y, task, GRID.replace("seeds=2", "seeds=1,"), tol=TIGHT, strategy="path",
                progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 9) for k in range(1, 10)]
    np.testing.assert_array_equal(one.W[0], path_run.W[1])          # seed 1 alone = seed 1 after seed 0
    np.testing.assert_array_equal(one.val[0], path_run.val[1])
    again = sweep(X, y, task, GRID.replace("seeds=2", "seeds=1,"), tol=TIGHT, strategy="path")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in one.records()]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in again.records()]


def test_hinge_sweep_warm_starts_the_dual(data):
    X, y, task = data
    yc = np.where(y >= 0, 1.0, -1.0)
    res = sweep(X, yc, task, "lam1=0.3,1 lam2=0,1", loss="hinge", tol=1e-10, strategy="path")
    assert res.metric == "error" and res.converged.all()
    train = res.masks["train"][0]
    for p, (lam1, lam2) in enumerate(res.points):
        f = mtl_jax.fit(X[train], yc[train], task[train], lam1=lam1, lam2=lam2, loss="hinge", tol=1e-10)
        assert abs(f.objective - res.objective[0, p]) <= 1e-6
        assert res.gap[0, p] <= 1e-10 * res.objective[0, p]


# ----------------------------------------------------------------------------- the store

def test_records_and_arrays_in_the_store(path_run):
    res = path_run
    run = store.read_run(res.path)
    assert run.kind == "sweep" and run.manifest["files"][store.HISTORY] == 18
    assert parse_grid(run.config["sweep"]["grid"]) == res.grid
    recs = run.history
    assert [(r["seed"], r["point"]) for r in recs] == [(s, p) for s in (0, 1) for p in range(9)]
    assert sum(r["selected"] for r in recs) == 2
    for r in recs:
        k = int(r["seed"])
        assert r["lam1"] == res.points[r["point"], 0] and r["objective"] == res.objective[k, r["point"]]
        assert r["val_mse"] == res.val[k, r["point"]] and r["converged"] is True
    assert sorted(r["order"] for r in recs if r["seed"] == 0) == list(range(9))
    assert run.arrays["W"].shape == (2, 9, 6, 4) and run.arrays["test_mask"].dtype == bool
    np.testing.assert_array_equal(run.arrays["selected"], res.selected)
    s = run.summary
    assert s["test"]["values"] == pytest.approx(res.selected_metric("test").tolist())
    assert s["test"]["mean"] == pytest.approx(np.mean(s["test"]["values"]))
    assert s["test"]["std"] == pytest.approx(np.std(s["test"]["values"], ddof=1))
    assert [p["point"] for p in s["selected"]] == res.selected.tolist()
    assert read_sweep(res.path)["records"] == recs
    heat = res.metric_grid("val")
    assert heat.shape == (2, 3, 3) and heat[1, 2, 0] == res.val[1, 6]     # lam1[2], lam2[0] is point 6
    with pytest.raises(ValueError, match="which"):
        res.metric_grid("W")


def test_sweep_argument_errors_name_the_argument(data, tmp_path):
    X, y, task = data
    g = Grid((1.0,), (0.0,), (0,))
    for kwargs, word in [(dict(strategy="gpu"), "strategy"), (dict(batch_size=2, strategy="path"), "batch_size"),
                         (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction"),
                         (dict(method="alternating"), "method"), (dict(tol=-1), "tol"),
                         (dict(val_fraction=0), "val_fraction"), (dict(eps=2), "eps"),
                         (dict(progress=3), "progress")]:
        with pytest.raises(ValueError, match=word):
            sweep(X, y, task, g, **kwargs)
    with pytest.raises(ValueError, match="grid: lam2"):
        sweep(X, y, task, "lam1=1")
    with pytest.raises(ValueError, match="grid: must be"):
        parse_grid(5)
    with pytest.raises(ValueError, match="not a sweep"):
        store.write_run(tmp_path / "plain", kind="solver", config={"lam1": 1.0})
        read_sweep(tmp_path / "plain")
