"""The one boundary check for multi-task datasets and regularisation weights.

Every public entry point (``mtl_jax.fit``, ``mtl_jax.objective``, the loaders, ``to_sites``) calls
:func:`validate_dataset` once, outside ``jit``; code inside ``jit`` trusts its inputs. Each failure
raises ``ValueError`` whose message starts with the name of the offending argument (``X``, ``y``,
``task``, ``num_tasks``, ``loss``, ``lam1``, ``lam2``) and says what is wrong.
"""
from __future__ import annotations

import numbers

import jax
import numpy as np

from mtl_jax.names import CLASSIFICATION_LOSSES, LOSSES

KNOWN_LOSSES = LOSSES  # the name data.KNOWN_LOSSES has had since the start

_MAX_IDS_SHOWN = 10
#: Task ids must lie below this before the cast to int64 (a float 2^62 is exact, 2^63 is not in int64).
_MAX_TASK_ID = 2**62


def _show_ids(ids) -> str:
    ids = [int(i) for i in ids]
    head = ", ".join(str(i) for i in ids[:_MAX_IDS_SHOWN])
    return head + (f", ... ({len(ids)} in all)" if len(ids) > _MAX_IDS_SHOWN else "")


def check_loss(loss):
    """Return ``loss`` if it is one of :data:`KNOWN_LOSSES` (or None), else raise ``ValueError``."""
    if loss is None:
        return None
    if not isinstance(loss, str) or loss not in KNOWN_LOSSES:
        raise ValueError(f"loss: unknown loss {loss!r}; expected one of {', '.join(map(repr, KNOWN_LOSSES))}")
    return loss


def _as_numeric(name: str, a) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name}: cannot be converted to an array ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: must be real numbers, got an array of dtype {arr.dtype}")
    return arr


def _task_ids(task) -> np.ndarray:
    try:
        t = np.asarray(task)
    except Exception as e:
        raise ValueError(f"task: cannot be converted to an array ({e})") from None
    if t.ndim != 1:
        raise ValueError(f"task: must be 1-D (N,), got shape {t.shape}")
    if t.dtype.kind == "b" or t.dtype.kind not in "iuf":
        raise ValueError(f"task: ids must be integers, got an array of dtype {t.dtype}")
    if t.dtype.kind == "f":
        bad = ~np.isfinite(t) | (t != np.round(t))
        if bad.any():
            raise ValueError(
                f"task: ids must be whole numbers; got {t[bad][:_MAX_IDS_SHOWN].tolist()} "
                f"at rows {_show_ids(np.flatnonzero(bad))}"
            )
    if t.size and t.min() < 0:
        neg = np.flatnonzero(t < 0)
        raise ValueError(f"task: ids must be >= 0; negative ids at rows {_show_ids(neg)}")
    # Checked before the cast: a float id of 1e20 (or a uint64 above 2^63 - 1) would wrap around.
    # Ids that fit in int64 but exceed the number of rows are refused by validate_dataset.
    if t.size and t.max() >= _MAX_TASK_ID:
        big = np.flatnonzero(t >= _MAX_TASK_ID)
        raise ValueError(f"task: ids must be < 2**62; got {t[big][:_MAX_IDS_SHOWN].tolist()} at rows {_show_ids(big)}")
    return t.astype(np.int64)


def _all_finite(X) -> bool:
    """``np.isfinite(X).all()`` for a float (N, d) array in one BLAS pass and no (N, d) temporary.

    A NaN or an Inf makes its row's sum NaN or Inf, so finite row sums (``X @ 1``, at the memory
    rate of the matrix-vector product) prove every entry finite; only when a sum is not finite
    (a bad entry, or finite entries whose sum overflows) is the exact elementwise test run.
    """
    if X.ndim == 2 and X.size >= 1 << 16:
        if np.isfinite(X @ np.ones(X.shape[1], X.dtype)).all():
            return True
    return bool(np.isfinite(X).all())


def validate_dataset(X, y, task, *, loss=None, num_tasks=None):
    """Check a flat multi-task dataset and return it in canonical form.

    Args:
      X: (N, d) features. float32 and float64 are kept; integers, booleans and other floats become float64.
      y: (N,) targets, cast to the dtype of the returned ``X``. In {-1, +1} when ``loss`` is
        ``"hinge"`` or ``"logistic"``.
      task: (N,) task ids in 0..m-1. Integers, or floats that are whole numbers.
      loss: None (no label check), ``"squared"``, ``"hinge"`` or ``"logistic"``.
      num_tasks: m; defaults to ``max(task) + 1``. Every id in 0..m-1 must have at least one sample.

    Returns:
      ``(X, y, task, num_tasks)`` as NumPy arrays: ``X`` (N, d) float, ``y`` (N,) same dtype,
      ``task`` (N,) int64, ``num_tasks`` a Python int.

    Raises:
      ValueError: naming the argument (``X``, ``y``, ``task``, ``num_tasks`` or ``loss``) and what
        is wrong: wrong number of dimensions, lengths that differ, an empty dataset, NaN/Inf,
        negative, non-integer or out-of-range task ids, a task id with no samples, labels outside
        {-1, +1} for a classification loss, or an unknown loss.
    """
    loss = check_loss(loss)

    X = _as_numeric("X", X)
    if X.ndim != 2:
        raise ValueError(f"X: must be 2-D (N, d), got shape {X.shape}")
    y = _as_numeric("y", y)
    if y.ndim != 1:
        raise ValueError(f"y: must be 1-D (N,), got shape {y.shape}")
    t = _task_ids(task)

    n, d = X.shape
    for name, other in (("y", y), ("task", t)):
        if len(other) != n:
            raise ValueError(f"{name}: has {len(other)} entries but X has {n} rows; lengths must match")
    if n == 0:
        raise ValueError("X: empty dataset (no rows)")
    if d == 0:
        raise ValueError("X: empty dataset (no feature columns)")

    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    X = X.astype(dtype, copy=False)
    y = y.astype(dtype, copy=False)
    if not _all_finite(X):
        rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"X: contains NaN or Inf (rows {_show_ids(rows)})")
    if not np.isfinite(y).all():
        rows = np.flatnonzero(~np.isfinite(y))
        raise ValueError(f"y: contains NaN or Inf (rows {_show_ids(rows)})")

    largest = int(t.max())
    if num_tasks is None:
        m = largest + 1
    else:
        if isinstance(num_tasks, (bool, np.bool_)) or not isinstance(num_tasks, numbers.Integral):
            raise ValueError(f"num_tasks: must be a positive integer, got {num_tasks!r}")
        m = int(num_tasks)
        if m < 1:
            raise ValueError(f"num_tasks: must be a positive integer, got {m}")
        if largest >= m:
            raise ValueError(
                f"task: ids must be < num_tasks = {m}; got id {largest} "
                f"(rows {_show_ids(np.flatnonzero(t >= m))})"
            )
        if m > n:  # checked before bincount, which would allocate m counters
            raise ValueError(f"num_tasks: {m} tasks but only {n} rows, so some tasks have no samples (each needs one)")
    if m > n:  # every id in 0..m-1 needs a row; refusing here also keeps bincount from allocating m counters
        raise ValueError(
            f"task: the largest id {largest} (rows {_show_ids(np.flatnonzero(t == largest))}) implies "
            f"{m} tasks but there are only {n} rows, so some ids have no samples; ids must be 0..m-1 with every id used"
        )
    counts = np.bincount(t, minlength=m)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"task: task ids {_show_ids(empty)} have no samples; every id in 0..{m - 1} needs at "
            "least one row (renumber the tasks, or pass a smaller num_tasks)"
        )

    if loss in CLASSIFICATION_LOSSES:
        bad = (y != 1) & (y != -1)
        if bad.any():
            raise ValueError(
                f"y: labels must be -1 or +1 for loss={loss!r}; got {np.unique(y[bad])[:_MAX_IDS_SHOWN].tolist()} "
                f"at rows {_show_ids(np.flatnonzero(bad))}"
            )
    return X, y, t, m


def _check_lam(name: str, value, *, positive: bool):
    arr = _finite_reals(name, value, low=0.0, strict=positive, shape_ok=lambda shape: len(shape) <= 1)
    return float(arr) if arr.ndim == 0 else arr


def validate_lams(lam1, lam2, *, scalar: bool = False):
    """Check the regularisation weights: ``lam1`` finite and > 0, ``lam2`` finite and >= 0.

    Scalars are returned as Python floats. Arrays (a sweep's grid) are accepted too and every
    entry is checked; they come back as float64 NumPy arrays. With ``scalar=True`` (``fit``,
    ``objective``: one problem at a time) only a single number is accepted.

    Raises:
      ValueError: naming ``lam1`` or ``lam2``.
    """
    if scalar:
        for name, value in (("lam1", lam1), ("lam2", lam2)):
            try:
                shape = np.shape(value)
            except Exception:  # ragged input: _check_lam names it below
                shape = ()
            if shape != ():
                raise ValueError(f"{name}: must be a single number here, got an array of shape {shape} "
                                 "(a grid of weights is a sweep: fit once per value)")
    return _check_lam("lam1", lam1, positive=True), _check_lam("lam2", lam2, positive=False)


def check_array(name: str, value, shape: tuple | None, dtype) -> np.ndarray:
    """``value`` as a finite real array of exactly ``shape`` (None: any), cast to ``dtype``; ValueError naming ``name``.

    For warm starts and weights (``W0``, ``alpha0``, ``W``): strings, objects, booleans, ragged lists,
    NaN and Inf are refused with the argument's name rather than NumPy's own message.
    """
    arr = _as_numeric(name, value)
    if arr.dtype.kind == "b":
        raise ValueError(f"{name}: must be real numbers, got an array of dtype bool")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name}: must have shape {tuple(shape)}, got {arr.shape}")
    arr = arr.astype(dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or Inf (or values too large for {np.dtype(dtype).name})")
    return arr


#: Headroom below the largest float for the scale checks of :func:`check_scale`: the solvers add up
#: m per-task terms and multiply by the curvature (2) and small constants; 2^6 leaves room for those.
_SCALE_HEADROOM = 64.0


def scale_limits(dtype, *, rows: int, dim: int, tasks: int, lam1: float):
    """The largest ``max|X|``, ``max|y|`` (squared loss) and ``max|X| max|y|`` that :func:`check_scale` accepts.

    With ``F = finfo(dtype).max / 64``, ``n`` the largest task's row count, ``d`` the features, ``m`` the tasks:

    * ``max|X| <= sqrt(F / (n d))``: the step size needs ``lambda_max(X_t^T X_t) <= n d max|X|^2``;
    * ``max|y| <= sqrt(F / (4 m))``: ``J`` sums m per-task means of ``(y - a)^2``, started from ``a = 0``
      and with ``|y - a|`` up to about ``2 max|y|`` in the certificate's dual point;
    * ``max|X| r <= sqrt(F lam1 / (2 m d))`` with ``r = 2 max|y|`` (squared) or 1 (hinge, logistic): the
      certificate evaluates ``R*(V) <= ||V||^2 / (2 lam1)`` at ``V = X^T alpha`` with ``|alpha_ti| <= c_t r``.

    In float64 the first two are about ``1.7e153 / sqrt(n d)`` and ``8e152 / sqrt(m)``.
    """
    big = float(np.finfo(dtype).max) / _SCALE_HEADROOM
    return (np.sqrt(big / (rows * dim)), np.sqrt(big / (4.0 * tasks)), np.sqrt(big * lam1 / (2.0 * tasks * dim)))


def check_scale(X, y, counts, *, lam1: float, loss: str):
    """Refuse data whose scale would overflow the solvers' intermediate values (:func:`scale_limits`).

    Small scales need no check: the solvers floor the Lipschitz constant and normalise their Gram
    matrices by powers of two, so tiny or all-zero features give the exact answer. ValueError naming
    ``X``, ``y`` or ``lam1``, saying why and to rescale.
    """
    x_max = max(float(X.max()), -float(X.min()))  # max|X| without an (N, d) temporary
    y_max = float(np.max(np.abs(y)))
    m, d = len(counts), X.shape[1]
    x_lim, y_lim, xy_lim = scale_limits(X.dtype, rows=int(np.max(counts)), dim=d, tasks=m, lam1=lam1)
    name = np.dtype(X.dtype).name
    if x_max > x_lim:
        raise ValueError(
            f"X: max|X| = {x_max:.3g} is too large for {name}: the step size needs lambda_max(X_t^T X_t) "
            f"<= n_t d max|X|^2, which overflows above max|X| = {x_lim:.3g} for these shapes; rescale X "
            "(X * 2^-k with lam1, lam2 * 4^-k gives the same J, with W * 2^k)")
    r = 1.0
    if loss == "squared":
        if y_max > y_lim:
            raise ValueError(
                f"y: max|y| = {y_max:.3g} is too large for {name}: J sums (y - a)^2 over {m} tasks, which "
                f"overflows above max|y| = {y_lim:.3g}; rescale y (for squared loss W(r y) = r W(y))")
        r = 2.0 * y_max
    if x_max * r > xy_lim:
        raise ValueError(
            f"lam1: {lam1:g} is too small for the scale of the data (max|X| = {x_max:.3g}, "
            f"max|y| = {y_max:.3g}): the duality-gap certificate evaluates ||X^T alpha||^2 / (2 lam1), "
            f"which overflows {name}; raise lam1 or rescale X and y")


def check_square_matrix(name: str, M, *, min_size: int = 1) -> np.ndarray:
    """``M`` as a finite real float64 (m, m) array with m >= ``min_size``; ValueError naming ``name`` otherwise."""
    M = np.asarray(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < min_size:
        raise ValueError(f"{name}: must be a square (m, m) matrix with m >= {min_size}, got shape {M.shape}")
    if M.dtype.kind not in "iuf":
        raise ValueError(f"{name}: must be real numbers, got dtype {M.dtype}")
    M = M.astype(np.float64)
    if not np.isfinite(M).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return M


def is_traced(value) -> bool:
    """Whether ``value`` is a JAX tracer (inside ``jit``/``vmap``/``grad``), whose value cannot be checked."""
    return isinstance(value, jax.core.Tracer)


def check_int(name: str, value, *, low: int, high: int | None = None) -> int:
    """``value`` as a Python int in ``[low, high)``; ValueError naming ``name`` for bools, non-integers, others."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value >= high)):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be an integer {bound}, got {value!r}")
    return int(value)


def _finite_reals(name: str, value, *, low: float | None, strict: bool, shape_ok) -> np.ndarray:
    """``value`` as a float64 array of finite numbers ``> low`` (``strict``) or ``>= low`` (``low=None``: any),
    of a shape that ``shape_ok`` accepts; bools, empty and non-numeric input refused. ValueError naming ``name``."""
    bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
    what = f"must be a finite number{bound}, got {value!r}"
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: {what}")
    try:
        arr = np.asarray(value)
    except Exception:
        raise ValueError(f"{name}: {what}") from None
    if arr.dtype.kind not in "iuf" or arr.size == 0 or not shape_ok(arr.shape):
        raise ValueError(f"{name}: {what}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all() or (low is not None and not ((arr > low) if strict else (arr >= low)).all()):
        raise ValueError(f"{name}: {what}")
    return arr


def check_real(name: str, value, *, low: float | None = 0.0, strict: bool = False, allow_traced: bool = False):
    """``value`` as a finite float ``> low`` (``strict``) or ``>= low`` (``low=None``: any finite number).

    Python and NumPy scalars and 0-d arrays are accepted; bools are not. With ``allow_traced`` a JAX
    tracer is let through unchecked and None is returned (a value under ``jit`` cannot be inspected).
    Raises ValueError naming ``name`` otherwise.
    """
    if allow_traced and is_traced(value):
        return None
    return float(_finite_reals(name, value, low=low, strict=strict, shape_ok=lambda shape: shape == ()))
