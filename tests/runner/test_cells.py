"""Resume at cell granularity (mtl_jax.runner.cells): a stored fit reads back exactly; another key recomputes."""
import numpy as np

import mtl_jax
from mtl_jax.data.synthetic import make_clustered_tasks
from mtl_jax.runner import cells, store


def test_stored_fit_reads_back_exactly_and_only_under_its_key(tmp_path):
    X, y, task, _ = make_clustered_tasks(5, 3, samples_per_task=12, loss="hinge", seed=0)
    for solver in ("centralized", "dmtrl"):
        res = mtl_jax.fit(X, y, task, lam1=0.1, lam2=1.0, loss="hinge", solver=solver, tol=1e-8)
        key = cells.cell_key(solver=solver, lam=(0.1, 1.0), tol=1e-8)
        path = tmp_path / solver
        assert cells.load_fit(path, key) is None   # nothing there yet
        store.write_fit(path, res, config={"fit": res.config, "cell": key})
        back = cells.load_fit(path, key)
        np.testing.assert_array_equal(back.W, res.W)
        np.testing.assert_array_equal(back.alpha, res.alpha)
        np.testing.assert_array_equal(back.omega.U, res.omega.U)
        assert (back.objective, back.converged, back.iterations, back.config) == \
            (res.objective, res.converged, res.iterations, res.config)
        want, got = res.history_arrays(), back.history_arrays()
        assert set(want) == set(got)
        for name in want:   # floats round-trip exactly through JSON; NaN stays NaN
            np.testing.assert_array_equal(got[name], want[name])
        assert type(back.history[0]) is type(res.history[0])
        assert cells.load_fit(path, cells.cell_key(solver=solver, lam=(0.1, 2.0), tol=1e-8)) is None
