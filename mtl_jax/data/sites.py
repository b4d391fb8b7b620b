"""Sites as the leading axis: a flat dataset as padded per-site arrays plus masks.

A flat dataset ``(X (N, d), y (N,), task (N,))`` with tasks of very different sizes becomes a
:class:`Sites` whose arrays all start with the sites axis ``m`` and are padded to ``n_max`` rows
per site, so per-site code can be ``vmap``ped (one device) or ``shard_map``ped (many). Padding
rows are zero in ``X`` and ``y`` and have ``mask == 0``; per-site sums must be weighted by
``mask`` (or use ``counts``). :func:`from_sites` restores the original flat arrays, row order
included.

Intercepts (docs/mathematics.md, section 1). The models are linear without a bias term, ``a = <w_t, x>``. Give
each task an intercept in one of two ways, and say which you used:

* :func:`add_intercept` appends a constant-1 feature, so the intercept is one more weight of
  ``w_t`` and is regularised (and coupled across tasks through Omega) like every other weight —
  the MTRL convention, and what ``load_exam(intercept=True)`` does; or
* :func:`center_by_task` removes each task's feature and target means, so an unregularised
  per-task intercept is implicit: predict ``<w_t, x - mean_X[t]> + mean_y[t]``. For squared loss
  this is exactly the unpenalised-intercept solution. It does not apply to hinge/logistic labels
  (centring ``y`` would leave {-1, +1}); use :func:`add_intercept` there.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.validation import validate_dataset


class Sites(NamedTuple):
    """Per-site padded arrays; the leading axis is the site (task), a pytree that ``vmap`` maps over.

    Attributes:
      X: (m, n_max, d) features; padding rows are all zeros.
      y: (m, n_max) targets; zero at padding.
      mask: (m, n_max), the dtype of ``X``: 1 for a real sample, 0 for padding.
      counts: (m,) integer number of real samples per site, ``n_t``.
      index: (m, n_max) integer row of each slot in the original flat arrays, -1 at padding.
        Within a site, real rows come first and in their original order.

    With ``jax_enable_x64`` off JAX stores the float arrays as float32 and ``counts``/``index``
    as int32.
    """

    X: jax.Array
    y: jax.Array
    mask: jax.Array
    counts: jax.Array
    index: jax.Array

    @property
    def num_sites(self) -> int:
        return self.X.shape[0]

    @property
    def n_max(self) -> int:
        return self.X.shape[1]

    @property
    def dim(self) -> int:
        return self.X.shape[2]


def margins(W, X):
    """Forward contraction ``a_ti = <w_t, x_ti>`` for all sites at once: W (m, d), X (m, n_max, d) -> (m, n_max).

    Padding rows of ``X`` are zero, so their margins are zero.
    """
    return jnp.einsum("tnd,td->tn", X, W)


def feature_sums(coef, X):
    """Backward contraction ``X_t^T r_t = sum_i r_ti x_ti`` for all sites at once: (m, n_max), (m, n_max, d) -> (m, d).

    With ``coef`` the dual variables this is ``V`` (row t is ``v_t``); with ``c_t loss'(a_t)`` it is the
    gradient of the empirical loss.
    """
    return jnp.einsum("tn,tnd->td", coef, X)


def sample_weights(sites: Sites):
    """Per-sample weights ``c_t = 1 / n_t`` (each task's loss is a mean), zero at padding: (m, n_max)."""
    return sites.mask / jnp.maximum(sites.counts, 1).astype(sites.mask.dtype)[:, None]


def to_sites(X, y, task, num_tasks=None, n_max=None) -> Sites:
    """Split a flat dataset into padded per-site arrays.

    Args:
      X: (N, d) features; y: (N,) targets; task: (N,) ids in 0..m-1 (NumPy or array-like; checked
        with :func:`~mtl_jax.data.validate_dataset`, so every task needs at least one sample).
      num_tasks: m; defaults to ``max(task) + 1``.
      n_max: rows per site after padding; defaults to the largest task size. A larger value
        (e.g. a round number, so that datasets of different sizes share one compiled program) is
        allowed; a smaller one raises ``ValueError``.

    Returns:
      A :class:`Sites` of JAX arrays: ``X`` (m, n_max, d), ``y``/``mask``/``index`` (m, n_max),
      ``counts`` (m,). Samples keep their original relative order within each site.
    """
    X, y, task, m = validate_dataset(X, y, task, num_tasks=num_tasks)
    return pack_sites(X, y, task, m, n_max)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data start on an ``align``-byte boundary.

    ``jax.device_put`` of a 64-byte aligned NumPy array on the CPU shares its memory instead of
    copying it: the padded ``X`` is then written once, by the packing, and never copied again.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _device(a: np.ndarray) -> jax.Array:
    """``a`` on the default device; shares the memory of an aligned array on the CPU (see :func:`_aligned_empty`).

    The caller gives up ``a``: it must not be written afterwards.
    """
    if not jax.config.jax_enable_x64 and a.dtype.itemsize > 4:
        return jnp.asarray(a)  # stored as float32 / int32: a conversion, so a copy anyway
    return jax.device_put(a)


def pack_sites(X, y, task, m: int, n_max=None) -> Sites:
    """:func:`to_sites` on data that :func:`~mtl_jax.validation.validate_dataset` has already checked.

    X (N, d) float, y (N,), task (N,) int64 with every id in 0..m-1 present. One pass writes ``X``
    into the padded (m, n_max, d) layout (no intermediate ``X[order]`` copy), into memory that the
    device array then shares; when the rows are already grouped by task with equal counts that
    pass is a plain copy.
    """
    n, d = X.shape
    counts = np.bincount(task, minlength=m)
    largest = int(counts.max())
    if n_max is None:
        n_max = largest
    else:
        if isinstance(n_max, (bool, np.bool_)) or not isinstance(n_max, (int, np.integer)):
            raise ValueError(f"n_max: must be an integer, got {n_max!r}")
        n_max = int(n_max)
        if n_max < largest:
            raise ValueError(f"n_max: {n_max} is smaller than the largest task ({largest} samples)")

    Xs = _aligned_empty((m, n_max, d), X.dtype)
    grouped = n == m * n_max and bool(np.all(task[1:] >= task[:-1]))  # sorted ids, every task n_max rows
    if grouped:
        index = np.arange(n, dtype=np.int64).reshape(m, n_max)
        np.copyto(Xs.reshape(n, d), X)
        ys = y.reshape(m, n_max).copy()
        mask = np.ones((m, n_max), dtype=X.dtype)
    else:
        order = np.argsort(task, kind="stable")             # rows grouped by task, original order kept
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sorted_task = task[order]
        slot = np.arange(n) - starts[sorted_task]           # position of each row inside its site
        index = np.full((m, n_max), -1, dtype=np.int64)
        index[sorted_task, slot] = order
        flat = index.reshape(-1)
        real = flat >= 0
        # Gather straight into the padded array; mode="clip" keeps np.take from buffering ``out``
        # (every index is valid: padding slots read row 0 and are zeroed next).
        np.take(X, np.where(real, flat, 0), axis=0, out=Xs.reshape(m * n_max, d), mode="clip")
        Xs.reshape(m * n_max, d)[~real] = 0
        ys = np.where(real, y[np.where(real, flat, 0)], 0).astype(X.dtype).reshape(m, n_max)
        mask = real.astype(X.dtype).reshape(m, n_max)
    return Sites(
        X=_device(Xs),
        y=jnp.asarray(ys),
        mask=jnp.asarray(mask),
        counts=jnp.asarray(counts.astype(np.int64)),
        index=jnp.asarray(index),
    )


def from_sites(sites: Sites):
    """Flatten a :class:`Sites` back to ``(X (N, d), y (N,), task (N,) int64)`` NumPy arrays.

    Rows return to exactly the order they had before :func:`to_sites` (``sites.index`` says
    where each slot came from); padding is dropped.
    """
    index = np.asarray(sites.index).astype(np.int64)
    Xs = np.asarray(sites.X)
    ys = np.asarray(sites.y)
    real = index >= 0
    n = int(real.sum())
    rows = index[real]
    if not np.array_equal(np.sort(rows), np.arange(n)):
        raise ValueError("sites: index is not a permutation of 0..N-1 over the real slots")
    site_of_slot = np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape)
    X = np.empty((n, Xs.shape[2]), dtype=Xs.dtype)
    y = np.empty(n, dtype=ys.dtype)
    task = np.empty(n, dtype=np.int64)
    X[rows] = Xs[real]
    y[rows] = ys[real]
    task[rows] = site_of_slot[real]
    return X, y, task


class TaskMeans(NamedTuple):
    """Per-task means removed by :func:`center_by_task`: ``X`` (m, d) and ``y`` (m,)."""

    X: np.ndarray
    y: np.ndarray


def center_by_task(X, y, task, num_tasks=None):
    """Remove each task's mean from its features and targets (the alternative to an intercept).

    Args:
      X: (N, d); y: (N,); task: (N,) ids in 0..m-1 (validated).
      num_tasks: m; defaults to ``max(task) + 1``.

    Returns:
      ``(Xc, yc, means)``: ``Xc`` (N, d) and ``yc`` (N,) with zero mean inside every task, and
      ``means`` a :class:`TaskMeans` with ``X`` (m, d) and ``y`` (m,). A model fitted on the
      centred data predicts ``<w_t, x - means.X[t]> + means.y[t]`` for task t: each task gets its
      own unregularised intercept. For squared loss only (see the module docstring).
    """
    X, y, task, m = validate_dataset(X, y, task, num_tasks=num_tasks)
    counts = np.bincount(task, minlength=m).astype(X.dtype)
    sum_X = np.zeros((m, X.shape[1]), dtype=X.dtype)
    np.add.at(sum_X, task, X)
    sum_y = np.bincount(task, weights=y, minlength=m).astype(X.dtype)
    means = TaskMeans(X=sum_X / counts[:, None], y=sum_y / counts)
    return X - means.X[task], y - means.y[task], means


def add_intercept(X):
    """Append a constant-1 column: (N, d) -> (N, d + 1), the intercept being the last weight.

    The intercept is then regularised and coupled across tasks like every other weight (the
    MTRL convention). Works on NumPy arrays (returns NumPy, float dtype kept, integers become
    float64) and on JAX arrays (returns JAX).
    """
    if isinstance(X, jax.Array):
        if X.ndim != 2:
            raise ValueError(f"X: must be 2-D (N, d), got shape {X.shape}")
        return jnp.concatenate([X, jnp.ones((X.shape[0], 1), dtype=X.dtype)], axis=1)
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X: must be 2-D (N, d), got shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"X: must be real numbers, got an array of dtype {X.dtype}")
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    return np.concatenate([X.astype(dtype, copy=False), np.ones((X.shape[0], 1), dtype=dtype)], axis=1)
