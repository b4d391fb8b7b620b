"""train_seeds in checkpointed chunks: the uninterrupted run's numbers, and exactly those after an interruption."""
import dataclasses

import jax
import numpy as np
import pytest

from conftest import mixed_dataset  # the shared tiny problem
from mtl_jax.training import TrainConfig, train_seeds

SEEDS = [1, 4]
CONFIG = TrainConfig(model="mlp", hidden=(8,), steps=10, batch_size=16, learning_rate=2e-2, dtype="float64",
                     scheme="dwa", steps_per_epoch=3)


@pytest.fixture(scope="module")
def data():
    return mixed_dataset(3)


def _leaves(result):
    return [np.asarray(jax.random.key_data(x) if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree_util.tree_leaves(result)]


def test_chunks_give_the_one_program_numbers(data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MTL_JAX_QUIET", raising=False)
    whole = train_seeds(CONFIG, data, SEEDS)
    chunked = train_seeds(CONFIG, data, SEEDS, checkpoint=str(tmp_path / "c.npz"), checkpoint_every=4,  # 4 + 4 + 2
                          progress=True)
    err = capsys.readouterr().err   # the bar, per chunk: steps done and the task losses
    assert "training steps" in err and "10/10" in err and "loss" in err
    assert chunked.history.task_losses.shape == whole.history.task_losses.shape == (2, 10, 3)
    for a, b in zip(_leaves(chunked), _leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_an_interrupted_run_resumes_to_the_uninterrupted_numbers_bitwise(data, tmp_path, kill_after_checkpoint):
    reference = train_seeds(CONFIG, data, SEEDS, checkpoint=str(tmp_path / "ref.npz"), checkpoint_every=3)
    path = str(tmp_path / "run.npz")
    kill_after_checkpoint.arm(2)
    with pytest.raises(KeyboardInterrupt):
        train_seeds(CONFIG, data, SEEDS, checkpoint=path, checkpoint_every=3)
    kill_after_checkpoint.disarm()
    assert int(np.load(path)["steps_done"]) == 6
    resumed = train_seeds(CONFIG, data, SEEDS, checkpoint=path, checkpoint_every=3)
    for a, b in zip(_leaves(resumed), _leaves(reference)):
        np.testing.assert_array_equal(a, b)
    again = train_seeds(CONFIG, data, SEEDS, checkpoint=path, checkpoint_every=3)   # finished: read back
    for a, b in zip(_leaves(again), _leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_run_or_bad_options_are_refused(data, tmp_path):
    path = str(tmp_path / "c.npz")
    train_seeds(CONFIG, data, SEEDS, checkpoint=path, checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint: .* another problem"):
        train_seeds(dataclasses.replace(CONFIG, learning_rate=1e-2), data, SEEDS, checkpoint=path)
    with pytest.raises(ValueError, match="checkpoint: .* another problem"):
        train_seeds(CONFIG, data, [1, 5], checkpoint=path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_seeds(CONFIG, data, SEEDS, checkpoint_every=5)
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_seeds(CONFIG, data, SEEDS, checkpoint=path, checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint: the folder"):
        train_seeds(CONFIG, data, SEEDS, checkpoint=str(tmp_path / "missing" / "c.npz"))


def test_a_checkpointed_grid_gives_the_one_program_grid_and_resumes(data, tmp_path, kill_after_checkpoint):
    from mtl_jax.training import train_grid
    rates, values = [1e-2, 3e-2], {"temperature": [0.5, 2.0]}
    whole = train_grid(CONFIG, data, SEEDS, learning_rates=rates, scheme_values=values)
    path = str(tmp_path / "grid.npz")
    kill_after_checkpoint.arm(1)
    with pytest.raises(KeyboardInterrupt):
        train_grid(CONFIG, data, SEEDS, learning_rates=rates, scheme_values=values, checkpoint=path,
                   checkpoint_every=4)
    kill_after_checkpoint.disarm()
    resumed = train_grid(CONFIG, data, SEEDS, learning_rates=rates, scheme_values=values, checkpoint=path,
                         checkpoint_every=4)
    assert resumed.result.history.task_losses.shape == (4, 2, 10, 3)
    for a, b in zip(_leaves(resumed.result), _leaves(whole.result)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="checkpoint: .* another problem"):
        train_grid(CONFIG, data, SEEDS, learning_rates=[1e-2, 4e-2], scheme_values=values, checkpoint=path)
