"""Small, offline, seeded multi-task datasets for deep multi-task networks.

Every generator returns a :class:`MultiTaskDataset`: a ``train`` and a ``test`` :class:`Split` of
arrays plus a static :class:`TaskSpec`. The layout is the one :mod:`mtl_jax.training` consumes:

    Split.x      (N, ...) inputs (images (N, H, W, 1), vectors (N, d))
    Split.y      tuple of K per-task targets: (N,) int labels for a classification task,
                 (N, D) floats for a regression task with D outputs
    Split.mask   (N, K) bool: sample n has a target for task k. Tasks defined on every sample
                 (digits, GradNorm regression) have an all-True mask; tasks that partition the
                 samples (one head per school group) mark only their own samples.

    TaskSpec.kinds     ("classification" | "regression",) * K
    TaskSpec.out_dims  (C_k or D_k,) * K  -- classes of a classification task, outputs of a regression task
    TaskSpec.names     human-readable task names

Problems: :func:`multi_digits`, :func:`imbalanced_regression`, :func:`school_multihead` and the text
problem ``trump_tweets`` (:func:`mtl_jax.data.text.trump_tweets`, also reachable as ``deep.trump_tweets``;
its inputs are (N, L) int64 token ids).

The arrays are NumPy (float64 inputs, int64 labels); :func:`mtl_jax.training.train` moves them to
the device once and casts them to the training dtype. The same seed gives the same arrays.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from mtl_jax.validation import check_int, check_real

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASK_KINDS = (CLASSIFICATION, REGRESSION)

_DIGIT = 8  # load_digits images are 8 x 8, grey levels 0..16


class TaskSpec(NamedTuple):
    """Static description of the K tasks (Python values, never traced)."""

    kinds: tuple[str, ...]
    out_dims: tuple[int, ...]
    names: tuple[str, ...]


class Split(NamedTuple):
    """One part (train or test) of a multi-task dataset; see the module docstring for shapes."""

    x: np.ndarray
    y: tuple[np.ndarray, ...]
    mask: np.ndarray


class MultiTaskDataset(NamedTuple):
    train: Split
    test: Split
    spec: TaskSpec


# ----------------------------------------------------------------------------- validation


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}: must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def validate_spec(spec: TaskSpec) -> TaskSpec:
    """Check a :class:`TaskSpec` (kinds known, out_dims positive, lengths equal); return it."""
    if not isinstance(spec, TaskSpec):
        raise ValueError(f"spec: must be a TaskSpec, got {type(spec).__name__}")
    k = len(spec.kinds)
    if k == 0:
        raise ValueError("spec: needs at least one task")
    if len(spec.out_dims) != k or len(spec.names) != k:
        raise ValueError(f"spec: kinds, out_dims and names must have one entry per task ({k})")
    for kind in spec.kinds:
        if kind not in TASK_KINDS:
            raise ValueError(f"spec: unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    for kind, dim in zip(spec.kinds, spec.out_dims):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"spec: out_dims must be integers >= 1, got {spec.out_dims}")
        if kind == CLASSIFICATION and dim < 2:
            raise ValueError(f"spec: a classification task needs >= 2 classes, got out_dims {spec.out_dims}")
    return spec


def validate_split(split: Split, spec: TaskSpec, name: str = "data") -> Split:
    """Check one split against its spec: leading sizes agree, labels in range, no NaN/Inf."""
    if not isinstance(split, Split):
        raise ValueError(f"{name}: must be a Split, got {type(split).__name__}")
    x = np.asarray(split.x)
    n = x.shape[0] if x.ndim else 0
    if x.ndim < 2 or n == 0:
        raise ValueError(f"{name}.x: must have shape (N, ...) with N >= 1, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}.x: contains NaN or Inf")
    k = len(spec.kinds)
    mask = np.asarray(split.mask)
    if mask.shape != (n, k) or mask.dtype != np.bool_:
        raise ValueError(f"{name}.mask: must be a bool array of shape ({n}, {k}), got {mask.dtype} {mask.shape}")
    empty = np.flatnonzero(~mask.any(axis=0))
    if empty.size:
        raise ValueError(f"{name}.mask: tasks {empty.tolist()} have no samples")
    if len(split.y) != k:
        raise ValueError(f"{name}.y: must hold one target array per task ({k}), got {len(split.y)}")
    for t, (y, kind, dim) in enumerate(zip(split.y, spec.kinds, spec.out_dims)):
        y = np.asarray(y)
        if kind == CLASSIFICATION:
            if y.shape != (n,) or y.dtype.kind not in "iu":
                raise ValueError(f"{name}.y[{t}]: classification labels must be integers of shape ({n},)")
            if y.size and (y.min() < 0 or y.max() >= dim):
                raise ValueError(f"{name}.y[{t}]: labels must lie in 0..{dim - 1}")
        else:
            if y.shape != (n, dim):
                raise ValueError(f"{name}.y[{t}]: regression targets must have shape ({n}, {dim}), got {y.shape}")
            if not np.all(np.isfinite(y)):
                raise ValueError(f"{name}.y[{t}]: contains NaN or Inf")
    return split


# ----------------------------------------------------------------------------- (a) multi-digit images


def _load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # shipped with scikit-learn: nothing is downloaded

    digits = load_digits()
    return digits.images.astype(np.float64) / 16.0, digits.target.astype(np.int64)


def _overlay(left: np.ndarray, right: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """(n, 8, 8) x 2 -> (n, H, W): left digit in the top-left corner, right digit in the bottom-right, max-combined."""
    h, w = canvas
    n = left.shape[0]
    img_left = np.zeros((n, h, w))
    img_right = np.zeros((n, h, w))
    img_left[:, :_DIGIT, :_DIGIT] = left
    img_right[:, h - _DIGIT:, w - _DIGIT:] = right
    return np.maximum(img_left, img_right)


def multi_digits(
    n_train: int = 2000,
    n_test: int = 500,
    *,
    canvas: tuple[int, int] = (12, 12),
    test_fraction: float = 0.25,
    seed: int = 0,
) -> MultiTaskDataset:
    """MultiMNIST-style two-digit images built from scikit-learn's ``load_digits`` (8 x 8, offline).

    Each image overlays two digits on an ``H x W`` canvas: the *left* digit in the top-left corner
    (rows 0..7, cols 0..7), the *right* digit in the bottom-right corner (rows H-8..H-1, cols
    W-8..W-1); where they overlap the brighter pixel wins (max). Pixels lie in [0, 1]. With the
    default 12 x 12 canvas the digits overlap in a 4 x 4 square, so neither task is trivial.

    Task 0 = class of the left digit, task 1 = class of the right digit (10 classes each).
    The 1797 source images are split once into train and test pools (``test_fraction``), so test
    images are built from digit images never seen in training. Pairs are drawn uniformly with
    replacement from each pool.

    Returns:
      :class:`MultiTaskDataset` with ``x`` (N, H, W, 1) float64, ``y`` = (left (N,), right (N,)) int64,
      mask all True, spec kinds ``("classification",) * 2``, out_dims ``(10, 10)``.
    """
    n_train = check_int("n_train", n_train, low=1)
    n_test = check_int("n_test", n_test, low=1)
    test_fraction = _fraction("test_fraction", test_fraction)
    seed = check_int("seed", seed, low=0)
    if (
        not isinstance(canvas, (tuple, list))
        or len(canvas) != 2
        or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < _DIGIT for c in canvas)
    ):
        raise ValueError(f"canvas: must be (H, W) integers >= {_DIGIT}, got {canvas!r}")
    canvas = (int(canvas[0]), int(canvas[1]))

    images, labels = _load_digit_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_pool_test = int(round(test_fraction * len(labels)))
    pools = {"test": order[:n_pool_test], "train": order[n_pool_test:]}

    def make(pool: np.ndarray, n: int) -> Split:
        i_left = rng.choice(pool, size=n)
        i_right = rng.choice(pool, size=n)
        x = _overlay(images[i_left], images[i_right], canvas)[..., None]
        return Split(x=x, y=(labels[i_left], labels[i_right]), mask=np.ones((n, 2), dtype=bool))

    train = make(pools["train"], n_train)
    test = make(pools["test"], n_test)
    spec = TaskSpec(kinds=(CLASSIFICATION, CLASSIFICATION), out_dims=(10, 10), names=("left", "right"))
    return MultiTaskDataset(train=train, test=test, spec=spec)


# ----------------------------------------------------------------------------- (b) GradNorm-style regression


def imbalanced_regression(
    n_train: int = 1000,
    n_test: int = 500,
    *,
    num_tasks: int = 10,
    in_dim: int = 250,
    out_dim: int = 100,
    max_scale_ratio: float = 100.0,
    basis_var: float = 10.0,
    task_var: float = 3.5,
    seed: int = 0,
) -> MultiTaskDataset:
    """K regression tasks sharing a basis, with output scales differing by ``max_scale_ratio``.

    After Chen et al., GradNorm (ICML 2018), section 4: task ``i`` has targets

        y_i = sigma_i * tanh((B + eps_i) x)        y_i in R^out_dim,  x in R^in_dim

    with ``B`` (out_dim, in_dim) shared, entries iid N(0, basis_var), and ``eps_i`` task-specific,
    entries iid N(0, task_var) (the paper's N(0, 10) and N(0, 3.5), read as variances). The scales are
    ``sigma_i = geomspace(1, max_scale_ratio, K)[i]``, so max/min = ``max_scale_ratio`` exactly and the
    squared-error losses differ by its square. One deviation from the paper, said here: inputs are drawn
    ``x ~ N(0, I / in_dim)`` so the pre-activations have variance ``basis_var + task_var`` rather than
    growing with ``in_dim`` (otherwise tanh is saturated and the tasks collapse to sign functions).
    Noise-free, as in the paper.

    Returns:
      :class:`MultiTaskDataset` with ``x`` (N, in_dim), ``y`` = K arrays (N, out_dim), mask all True,
      kinds ``("regression",) * K``, out_dims ``(out_dim,) * K``. The scales are recoverable from the
      task names (``"task{i}_scale{sigma_i:g}"``) and are returned exactly by :func:`task_scales`.
    """
    n_train = check_int("n_train", n_train, low=1)
    n_test = check_int("n_test", n_test, low=1)
    num_tasks = check_int("num_tasks", num_tasks, low=1)
    in_dim = check_int("in_dim", in_dim, low=1)
    out_dim = check_int("out_dim", out_dim, low=1)
    max_scale_ratio = check_real("max_scale_ratio", max_scale_ratio, strict=True)
    if max_scale_ratio < 1.0:
        raise ValueError(f"max_scale_ratio: must be >= 1, got {max_scale_ratio!r}")
    basis_var = check_real("basis_var", basis_var, strict=True)
    task_var = check_real("task_var", task_var, strict=True)
    seed = check_int("seed", seed, low=0)

    rng = np.random.default_rng(seed)
    basis = rng.normal(scale=np.sqrt(basis_var), size=(out_dim, in_dim))
    eps = rng.normal(scale=np.sqrt(task_var), size=(num_tasks, out_dim, in_dim))
    sigma = task_scales(num_tasks, max_scale_ratio)

    def make(n: int) -> Split:
        x = rng.normal(scale=1.0 / np.sqrt(in_dim), size=(n, in_dim))
        # (K, out, in) x (n, in) -> (K, n, out)
        pre = np.einsum("koi,ni->kno", basis[None] + eps, x)
        y = tuple(sigma[i] * np.tanh(pre[i]) for i in range(num_tasks))
        return Split(x=x, y=y, mask=np.ones((n, num_tasks), dtype=bool))

    train = make(n_train)
    test = make(n_test)
    spec = TaskSpec(
        kinds=(REGRESSION,) * num_tasks,
        out_dims=(out_dim,) * num_tasks,
        names=tuple(f"task{i}_scale{s:g}" for i, s in enumerate(sigma)),
    )
    return MultiTaskDataset(train=train, test=test, spec=spec)


def task_scales(num_tasks: int = 10, max_scale_ratio: float = 100.0) -> np.ndarray:
    """(K,) the scales ``sigma_i`` used by :func:`imbalanced_regression`: geomspace(1, max_scale_ratio, K)."""
    num_tasks = check_int("num_tasks", num_tasks, low=1)
    max_scale_ratio = check_real("max_scale_ratio", max_scale_ratio, strict=True)
    return np.geomspace(1.0, max_scale_ratio, num_tasks)


# ----------------------------------------------------------------------------- (c) School as multi-head regression

SCHOOL_GROUPINGS = {
    # grouping name -> (info key, the levels in head order)
    "schgend": ("schgend", ("mixed", "girls", "boys")),
    "vr": ("vr", ("bottom 25%", "mid 50%", "top 25%")),
    "school_type": ("school_type", ("Mxd", "Sngl")),
}


def school_multihead(
    *,
    grouping: str = "schgend",
    school_features: bool = True,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> MultiTaskDataset:
    """The ``Exam`` (School) data as a multi-head regression: one head per school group.

    Default grouping ``"schgend"`` (school gender: mixed / girls' / boys' school, 3 heads with
    2169 / 1377 / 513 pupils). Also ``"vr"`` (the pupil's verbal-reasoning intake band, 3 heads) and
    ``"school_type"`` (2 heads). Every pupil belongs to exactly one head: ``mask[n, k]`` is True
    when pupil n is in group k, and every head's target array holds ``normexam`` for all pupils
    (only the masked entries enter that head's loss and metrics).

    Inputs: the pupil features of :func:`mtl_jax.data.school.load_exam` (``standLRT``, ``female``,
    ``intake_top``, ``intake_bottom``; no intercept column, the network has biases) and, with
    ``school_features``, the school-level context ``schavg`` (school mean intake score) plus
    one-hot ``vr`` top / bottom band. The split is per pupil, stratified by head, so every head
    has test pupils.

    Returns:
      :class:`MultiTaskDataset` with ``x`` (N, 4 or 7) float64, ``y`` = K arrays (N, 1), ``mask`` (N, K),
      kinds ``("regression",) * K``, out_dims ``(1,) * K``.
    """
    if grouping not in SCHOOL_GROUPINGS:
        raise ValueError(f"grouping: unknown grouping {grouping!r}; expected one of {tuple(SCHOOL_GROUPINGS)}")
    if not isinstance(school_features, (bool, np.bool_)):
        raise ValueError(f"school_features: must be a bool, got {school_features!r}")
    test_fraction = _fraction("test_fraction", test_fraction)
    seed = check_int("seed", seed, low=0)

    from mtl_jax.data.school import load_exam

    X, y, _, info = load_exam(intercept=False)
    cols = [X]
    if school_features:
        vr = info["vr"]
        cols.append(np.stack([info["schavg"], vr == "top 25%", vr == "bottom 25%"], axis=1).astype(np.float64))
    x_all = np.concatenate(cols, axis=1)

    key, levels = SCHOOL_GROUPINGS[grouping]
    group = np.full(len(y), -1)
    for k, level in enumerate(levels):
        group[info[key] == level] = k
    assert (group >= 0).all(), f"unexpected {key} levels {set(info[key])}"

    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(y), dtype=bool)
    for k in range(len(levels)):
        members = rng.permutation(np.flatnonzero(group == k))
        is_test[members[: max(1, int(round(test_fraction * len(members))))]] = True

    def make(rows: np.ndarray) -> Split:
        mask = group[rows][:, None] == np.arange(len(levels))[None, :]
        targets = y[rows][:, None]
        return Split(x=x_all[rows], y=tuple(targets for _ in levels), mask=mask)

    train = make(np.flatnonzero(~is_test))
    test = make(np.flatnonzero(is_test))
    spec = TaskSpec(
        kinds=(REGRESSION,) * len(levels),
        out_dims=(1,) * len(levels),
        names=tuple(f"{grouping}={level}" for level in levels),
    )
    return MultiTaskDataset(train=train, test=test, spec=spec)


# ----------------------------------------------------------------------------- (d) a real text task


def __getattr__(name: str):
    """``deep.trump_tweets``: the tweets text problem, defined in :mod:`mtl_jax.data.text` (which builds on
    this module) and imported on first use (PEP 562), so either module can be imported first."""
    if name == "trump_tweets":
        from mtl_jax.data.text import trump_tweets

        return trump_tweets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
