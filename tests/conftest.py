"""Shared fixtures. Float64 everywhere: the tests compare against NumPy/SciPy references."""
import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng():
    """A seeded NumPy generator: same seed, same numbers."""
    return np.random.default_rng(0)


#: The tiny mixed multi-task problem of the training tests: one 2-class task, two 2-output regressions.
MIXED_SPEC = None  # set below (imports kept out of the module's top for the tests that do not need them)


def mixed_dataset(seed: int, n_train: int = 48, n_test: int = 20):
    """A tiny mixed ``MultiTaskDataset`` (spec :data:`MIXED_SPEC`): x (n, 6); a 2-class task, two 2-output
    regressions, the last one labelled on half the samples. Same seed, same numbers."""
    from mtl_jax.data.deep import MultiTaskDataset, Split

    def split(rng, n):
        x = rng.normal(size=(n, 6))
        labels = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
        reg = np.stack([np.sin(x[:, 2]), x[:, 3] * x[:, 4]], axis=1)
        reg_half = 3.0 * np.stack([x[:, 5], x[:, 0] - x[:, 2]], axis=1)
        mask = np.ones((n, 3), dtype=bool)
        mask[::2, 2] = False
        return Split(x=x, y=(labels, reg, reg_half), mask=mask)

    rng = np.random.default_rng(seed)
    return MultiTaskDataset(train=split(rng, n_train), test=split(rng, n_test), spec=MIXED_SPEC)


def _mixed_spec():
    from mtl_jax.data.deep import TaskSpec
    return TaskSpec(kinds=("classification", "regression", "regression"), out_dims=(2, 2, 2),
                    names=("cls", "reg", "reg_half"))


MIXED_SPEC = _mixed_spec()


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """``arm(n)``: the next checkpointed run dies (KeyboardInterrupt, as a kill would stop it) right after its
    n-th checkpoint is written (``mtl_jax.solvers.base.write_checkpoint``); ``disarm()``: writes work again."""
    from mtl_jax.solvers import base

    real = base.write_checkpoint

    class Kill:
        def arm(self, n: int):
            writes = []

            def write_then_die(*args, **kwargs):
                real(*args, **kwargs)
                writes.append(1)
                if len(writes) == n:
                    raise KeyboardInterrupt

            monkeypatch.setattr(base, "write_checkpoint", write_then_die)

        def disarm(self):
            monkeypatch.setattr(base, "write_checkpoint", real)

    return Kill()
