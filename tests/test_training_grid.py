"""train_grid: a grid of learning rates (and scheme hyper-parameters) x seeds as one compiled program.

The reference for every grid point is the separate run of that point's configuration
(``train_seeds`` / ``train`` with ``dataclasses.replace(config, learning_rate=lr, scheme_kwargs=...)``),
compiled on its own with the rate as a constant."""
import collections
import dataclasses

import jax
import numpy as np
import pytest

from mtl_jax.training import SCHEME_GRID_PARAMETERS, TrainConfig, train, train_grid, train_seeds
from mtl_jax import weighting

jax.config.update("jax_enable_x64", True)

from conftest import MIXED_SPEC, mixed_dataset  # noqa: E402  (the shared tiny problem)

SPEC = MIXED_SPEC
SEEDS = [0, 3]


@pytest.fixture(scope="module")
def data():
    return mixed_dataset(7)


BASE = TrainConfig(model="mlp", hidden=(8,), steps=8, batch_size=16, learning_rate=1e-2, dtype="float64",
                   steps_per_epoch=2)

# (config, learning_rates, scheme_values): equal with clipping (the injected rate inside optax.chain),
# dwa with its temperature on the grid too, uncertainty (its log-variances follow the model's rate).
CASES = {
    "equal": (dataclasses.replace(BASE, scheme="equal", max_grad_norm=1.0), [3e-3, 3e-2], None),
    "dwa": (dataclasses.replace(BASE, scheme="dwa"), [1e-2, 3e-2], {"temperature": [0.5, 2.0]}),
    "uncertainty": (dataclasses.replace(BASE, scheme="uncertainty"), [1e-2, 1e-1], None),
}


def _assert_same_run(got, want, what):
    """Every recorded number of two TrainResults (history, test metrics, final params, divergence) to 1e-6."""
    for field in ("task_losses", "weights", "total_loss", "regulariser"):
        np.testing.assert_allclose(getattr(got.history, field), getattr(want.history, field), rtol=1e-6, atol=1e-9,
                                   err_msg=f"{what}: history.{field}")
    np.testing.assert_array_equal(got.history.present, want.history.present)
    for field in got.test._fields:  # NaN where a metric does not apply: equal NaNs compare equal
        np.testing.assert_allclose(getattr(got.test, field), getattr(want.test, field), rtol=1e-6, atol=1e-9,
                                   err_msg=f"{what}: test.{field}")
    for g, w in zip(jax.tree.leaves(got.state.params), jax.tree.leaves(want.state.params)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9, err_msg=f"{what}: final params")
    np.testing.assert_array_equal(got.diverged_at, want.diverged_at)


@pytest.mark.parametrize("case", CASES)
def test_every_grid_point_equals_the_separate_run_of_its_config(data, case):
    config, rates, values = CASES[case]
    grid = train_grid(config, data, SEEDS, learning_rates=rates, scheme_values=values)
    n_values = 1 if values is None else int(np.prod([len(v) for v in values.values()]))
    G, S, T, K = len(rates) * n_values, len(SEEDS), config.steps, len(SPEC.kinds)
    assert grid.result.history.task_losses.shape == (G, S, T, K)
    assert grid.result.test.mse.shape == (G, S, K) and grid.result.diverged_at.shape == (G, S)
    assert grid.shape == (len(rates),) + tuple(len(v) for v in (values or {}).values())
    np.testing.assert_array_equal(grid.learning_rates, np.repeat(rates, n_values))  # the rate varies slowest
    # Every point's config is checked; the numbers of two points that differ in every gridded value against their
    # separate runs (each reference is a compilation of its own, this file's main cost): the first and the last,
    # or, on a 2 x 2 grid, the two mixed points (which a mix-up of the axes would exchange).
    checked = (1, 2) if G == 4 else (0, G - 1)
    for g in range(G):
        point = grid.point_config(g)
        assert point.learning_rate == grid.learning_rates[g]
        for name, v in (values or {}).items():
            assert dict(point.scheme_kwargs)[name] == grid.scheme_values[name][g]
        if g in checked:
            reference = train_seeds(point, data, SEEDS)
            _assert_same_run(jax.tree.map(lambda a: a[g], grid.result), reference, f"{case} point {g}")
        # the injected rate is the point's, in the model's optimizer state (after the clipping, if any)
        opt_state = grid.result.state.opt_state
        inject = opt_state if hasattr(opt_state, "hyperparams") else opt_state[-1]  # optax.chain: a tuple
        np.testing.assert_allclose(inject.hyperparams["learning_rate"][g], grid.learning_rates[g], rtol=1e-15)
    if case == "equal":  # one point against train() for a single seed as well
        single = train(dataclasses.replace(grid.point_config(G - 1), seed=SEEDS[1]), data)
        _assert_same_run(jax.tree.map(lambda a: a[G - 1, 1], grid.result), single, f"{case} last point, train()")
    if case == "uncertainty":  # its log-variances' Adam runs at each point's rate (TrainConfig.make_scheme)
        inner = grid.result.state.scheme_state.opt_state.hyperparams["learning_rate"]
        np.testing.assert_allclose(inner, np.repeat(np.asarray(rates)[:, None], S, 1), rtol=1e-15)
    # the grid is not degenerate: the points train differently
    losses = np.asarray(grid.result.history.task_losses)
    assert all(not np.allclose(losses[0], losses[g]) for g in range(1, G))


def test_uncertainty_with_its_own_rate_keeps_it_at_every_point(data):
    """An explicit rate of the log-variances (scheme_kwargs) is kept whatever the model's rate."""
    config, rates, _ = CASES["uncertainty"]
    grid = train_grid(dataclasses.replace(config, scheme_kwargs={"learning_rate": 0.05}), data, SEEDS,
                      learning_rates=rates)
    np.testing.assert_allclose(grid.result.state.scheme_state.opt_state.hyperparams["learning_rate"], 0.05,
                               rtol=1e-15)
    assert dict(grid.point_config(1).scheme_kwargs) == {"learning_rate": 0.05}
    _assert_same_run(jax.tree.map(lambda a: a[1], grid.result), train_seeds(grid.point_config(1), data, SEEDS),
                     "uncertainty with its own rate, point 1")


class _TraceCounter:
    """Counts jaxpr traces (one per jitted function traced: a new program, whether or not its
    compiled code then comes from the persistent cache)."""

    def __init__(self):
        self.counts = collections.Counter()
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        self.counts[name] += 1

    @property
    def traces(self) -> int:
        return self.counts["/jax/core/compile/jaxpr_trace_duration"]


TRACES = _TraceCounter()


def test_the_grid_compiles_once_whatever_its_size_and_values(data):
    # fresh configs (widths used nowhere else), so nothing is cached yet
    one = dataclasses.replace(BASE, hidden=(5, 3), steps=4, scheme="dwa")
    four = dataclasses.replace(one, hidden=(7, 3))
    before = TRACES.traces
    train_grid(one, data, SEEDS, learning_rates=[1e-2])
    traced_one = TRACES.traces - before
    before = TRACES.traces
    train_grid(four, data, SEEDS, learning_rates=[1e-3, 1e-2], scheme_values={"temperature": [1.0, 3.0]})
    traced_four = TRACES.traces - before
    assert traced_one >= 2                      # the weight init and the run at least
    assert traced_four == traced_one            # 4 grid points: the same programs, not 4 of them
    before = TRACES.traces                      # other rates, temperatures and base rate: nothing new
    train_grid(dataclasses.replace(four, learning_rate=0.3), data, SEEDS, learning_rates=[2e-2, 5e-2],
               scheme_values={"temperature": [0.7, 2.0]})
    assert TRACES.traces == before
    # the counter does see per-config programs: train_seeds at a new rate traces a new run
    before = TRACES.traces
    train_seeds(dataclasses.replace(four, learning_rate=2e-2), data, SEEDS)
    assert TRACES.traces - before >= 1


def test_grid_of_a_diverging_rate_warns_naming_the_point(data):
    from mtl_jax.training import DivergenceWarning
    config = dataclasses.replace(BASE, steps=4, scheme="equal", optimizer="sgd")
    with pytest.warns(DivergenceWarning, match=r"learning_rate 1e\+08, seed 0 at step \d"):
        grid = train_grid(config, data, SEEDS, learning_rates=[1e-2, 1e8])
    assert np.all(np.asarray(grid.result.diverged_at[0]) == -1)
    assert np.all(np.asarray(grid.result.diverged_at[1]) >= 0)


def test_every_scheme_has_grid_parameters_its_factory_accepts_traced():
    assert set(SCHEME_GRID_PARAMETERS) == set(weighting.SCHEMES)
    for scheme, names in SCHEME_GRID_PARAMETERS.items():
        for name in names:
            def build(v, scheme=scheme, name=name):
                w = weighting.get(scheme, **{name: v})
                return w.init(3, jax.random.key(0))
            jax.jit(build)(0.5)  # traced value accepted by the factory and its init


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rates=[]), "learning_rates"),
    (dict(learning_rates=[1e-2, -1e-3]), "learning_rates"),
    (dict(learning_rates=[float("nan")]), "learning_rates"),
    (dict(learning_rates=[[1e-2]]), "learning_rates"),
    (dict(scheme_values={"gamma": [1.0]}), "scheme_values.*gamma"),
    (dict(scheme_values={"temperature": []}), "scheme_values"),
    (dict(scheme_values={"temperature": [1.0, 0.0]}), "scheme_values.*temperature"),
    (dict(scheme_values=[("temperature", [1.0])]), "scheme_values"),
    (dict(seeds=[]), "seeds"),
    (dict(seeds=[0.5]), "seeds"),
])
def test_bad_arguments_raise_value_error_naming_them(data, kwargs, match):
    arguments = {**dict(seeds=SEEDS, learning_rates=[1e-2], scheme_values=None), **kwargs}
    with pytest.raises(ValueError, match=match):
        train_grid(dataclasses.replace(BASE, scheme="dwa"), data, **arguments)


def test_equal_weighting_has_no_grid_parameter(data):
    with pytest.raises(ValueError, match="scheme_values.*temperature.*'equal'"):
        train_grid(BASE, data, SEEDS, scheme_values={"temperature": [1.0]})
    with pytest.raises(ValueError, match="config"):
        train_grid("not a config", data, SEEDS)


# ----------------------------------------------------------------------------- the task-weighting experiment


def test_task_weighting_cells_of_one_program_equal_the_per_rate_cells(data):
    """run_cells trains all the rates of a run as one program; each rate's cell is the one run_cell
    (a program of its own, the rate a constant) gives."""
    from mtl_jax.experiments import task_weighting

    config = dataclasses.replace(BASE, scheme="dwa")
    fit, val = task_weighting.holdout(data, 0.25)
    rates = [1e-2, 4e-2]
    cells = task_weighting.run_cells(config, SPEC, fit, val, data.test, SEEDS, rates)
    assert len(cells) == 2
    for rate, cell in zip(rates, cells):
        want = task_weighting.run_cell(dataclasses.replace(config, learning_rate=rate), SPEC, fit, val, data.test, SEEDS)
        assert set(cell) == set(want)
        for key in ("metric", "metric_val", "task_losses", "weights", "curve_x"):
            np.testing.assert_allclose(cell[key], want[key], rtol=1e-6, atol=1e-9, err_msg=key)
        np.testing.assert_array_equal(cell["diverged"], want["diverged"])
    assert not np.allclose(cells[0]["task_losses"], cells[1]["task_losses"])


def test_task_weighting_tunes_equal_on_the_same_grid_and_resumes_a_partial_grid(tmp_path):
    from mtl_jax.experiments import task_weighting

    # --checkpoint-every: each run's training in checkpointed chunks (removed once its cells are stored)
    argv = ["--quick", "--out", str(tmp_path), "--methods", "dwa", "--datasets", "school_multihead",
            "--lr-factors", "0.5,2", "--no-compile-cache", "--checkpoint-every", "7"]
    first = task_weighting.main(argv)
    factors = (0.5, 2.0)
    assert sorted(first["computed"]) == sorted([("school_multihead", n, f) for n in ("equal", "dwa") for f in factors]
                                               + [("school_multihead", "single_task", 1.0)])
    runs = first["results"]["school_multihead"]["runs"]
    for name in ("equal", "dwa"):  # the baseline is tuned over the same rates as every other run
        assert sorted(runs[name]["validation"]) == list(factors) and runs[name]["lr_factor"] in factors
    assert not list(tmp_path.rglob("training.npz"))
    # resume: one rate of dwa removed -> only that rate is trained again, the others are read back
    import shutil
    shutil.rmtree(task_weighting.cell_path(str(tmp_path), "school_multihead", "dwa", 2.0))
    stale = tmp_path / "cells" / "school_multihead" / "dwa" / "training.npz"
    stale.write_bytes(b"a checkpoint of some other run")   # not this run's: dropped, not trusted, no failure
    again = task_weighting.main(argv)
    assert again["computed"] == [("school_multihead", "dwa", 2.0)] and len(again["skipped"]) == 4
    assert not stale.exists()
    np.testing.assert_allclose(again["results"]["school_multihead"]["runs"]["dwa"]["per_seed"],
                               runs["dwa"]["per_seed"], rtol=1e-6)


def test_task_weighting_cells_in_checkpointed_chunks_equal_one_program_and_resume(data, tmp_path, kill_after_checkpoint):
    from mtl_jax.experiments import task_weighting

    config = dataclasses.replace(BASE, scheme="dwa")
    fit, val = task_weighting.holdout(data, 0.25)
    rates = [1e-2, 4e-2]
    whole = task_weighting.run_cells(config, SPEC, fit, val, data.test, SEEDS, rates)
    path = str(tmp_path / "training.npz")
    kill_after_checkpoint.arm(1)
    with pytest.raises(KeyboardInterrupt):
        task_weighting.run_cells(config, SPEC, fit, val, data.test, SEEDS, rates, checkpoint=path, checkpoint_every=3)
    kill_after_checkpoint.disarm()
    chunked = task_weighting.run_cells(config, SPEC, fit, val, data.test, SEEDS, rates, checkpoint=path,
                                       checkpoint_every=3)
    for w, c in zip(whole, chunked):
        for key in ("metric", "metric_val", "task_losses", "weights", "curve_x"):
            np.testing.assert_allclose(c[key], w[key], rtol=1e-6, atol=1e-9, err_msg=key)
        np.testing.assert_array_equal(c["diverged"], w["diverged"])
        assert np.isnan(c["compile_seconds"]) and c["run_seconds"] > 0
