"""Sites as the leading axis: a flat dataset as padded per-site arrays plus masks.

A flat dataset ``(X (N, d), y (N,), task (N,))`` with tasks of very different sizes becomes a
:class:`Sites` whose arrays all start with the sites axis ``m`` and are padded to ``n_max`` rows
per site, so per-site code can be ``vmap``ped (one device) or ``shard_map``ped (many). Padding
rows are zero in ``X`` and ``y`` and have ``mask == 0``; per-site sums must be weighted by
``mask`` (or use ``counts``). :func:`from_sites` restores the original flat arrays, row order
included.

Long-tailed task sizes (one site with 20,000 rows, a thousand with one) would make that padding
cost m x n_max rows; there :func:`to_sites` cuts each site into chunks of a few rows instead (the
*chunked* layout: the leading axis holds chunks, ``Sites.site`` names each chunk's site, see
:class:`Sites`). The contractions :func:`margins`, :func:`feature_sums`, :func:`site_sums` and
:func:`sample_weights` serve both layouts, so solvers written against them need not know which.

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
    """Per-site arrays; the leading axis holds blocks of rows, one site per block: a pytree.

    Two layouts share these fields (measurements: benchmarks/README.md, "Long-tailed task sizes"):

    * **padded** (``site is None``): block t is site t, padded to ``n_max`` rows (the largest site);
      ``X`` is (m, n_max, d). Used when padding costs little (padded rows <= 2 N, or a padded X <= 8 MB).
    * **chunked** (``site`` a (K,) array): each site's rows are cut into blocks ("chunks") of ``n_max``
      rows, the last one padded; the chunks of a site are consecutive (``site`` is sorted) and every
      site has at least one. ``X`` is (K, n_max, d) with K >= m; a site pads at most ``n_max - 1`` rows.
      Used for long-tailed task sizes, where padding every site to the largest would multiply memory.

    Per-site sums and the per-sample weights go through :func:`margins`, :func:`feature_sums`,
    :func:`site_sums` and :func:`sample_weights`, which serve both layouts; elementwise per-sample
    arrays (``y``, ``mask``, margins, dual variables) have the shape of ``y`` in either.

    Attributes:
      X: (K, n_max, d) features; padding rows are all zeros.
      y: (K, n_max) targets; zero at padding.
      mask: (K, n_max), the dtype of ``X``: 1 for a real sample, 0 for padding.
      counts: (m,) integer number of real samples per site, ``n_t``.
      index: (K, n_max) integer row of each slot in the original flat arrays, -1 at padding.
        Within a site, real rows come first and in their original order (across its chunks).
      site: None (padded: K = m, block t is site t) or (K,) the site of each chunk, sorted.

    With ``jax_enable_x64`` off JAX stores the float arrays as float32 and ``counts``/``index``
    as int32.
    """

    X: jax.Array
    y: jax.Array
    mask: jax.Array
    counts: jax.Array
    index: jax.Array
    site: jax.Array | None = None

    @property
    def num_sites(self) -> int:
        """m, the number of sites (tasks)."""
        return self.counts.shape[0]

    @property
    def num_blocks(self) -> int:
        """K, the leading axis of ``X``: m when padded, the number of chunks when chunked."""
        return self.X.shape[0]

    @property
    def n_max(self) -> int:
        """Rows per block: the largest site when padded, the chunk size when chunked."""
        return self.X.shape[1]

    @property
    def dim(self) -> int:
        return self.X.shape[2]

    @property
    def chunked(self) -> bool:
        return self.site is not None


def site_sums(values, sites: Sites):
    """Per-block values (K, ...) summed per site: (m, ...). The identity for the padded layout."""
    if sites.site is None:
        return values
    return jax.ops.segment_sum(values, sites.site, num_segments=sites.num_sites, indices_are_sorted=True)


def per_block(values, sites: Sites):
    """Per-site values (m, ...) repeated for every block: (K, ...). The identity for the padded layout."""
    return values if sites.site is None else values[sites.site]


def margins(W, X):
    """Forward contraction ``a_ti = <w_t, x_ti>`` for all sites at once: W (m, d) -> the shape of ``y``.

    ``X`` is a :class:`Sites` (either layout) or a padded (m, n_max, d) array. Padding rows of ``X``
    are zero, so their margins are zero. The chunked layout gathers ``W[site]`` ((K, d), small).
    """
    if isinstance(X, Sites):
        W = per_block(W, X)
        X = X.X
    return jnp.einsum("tnd,td->tn", X, W)


def feature_sums(coef, X):
    """Backward contraction ``X_t^T r_t = sum_i r_ti x_ti`` for all sites at once: coef (shape of ``y``) -> (m, d).

    ``X`` is a :class:`Sites` (either layout) or a padded (m, n_max, d) array. With ``coef`` the dual
    variables this is ``V`` (row t is ``v_t``); with ``c_t loss'(a_t)`` it is the gradient of the
    empirical loss. The chunked layout sums the chunks' (K, d) products per site (a sorted segment sum).
    """
    if isinstance(X, Sites):
        return site_sums(jnp.einsum("tn,tnd->td", coef, X.X), X)
    return jnp.einsum("tn,tnd->td", coef, X)


def sample_weights(sites: Sites):
    """Per-sample weights ``c_t = 1 / n_t`` (each task's loss is a mean), zero at padding: the shape of ``y``."""
    inv = 1.0 / jnp.maximum(sites.counts, 1).astype(sites.mask.dtype)
    return sites.mask * per_block(inv, sites)[:, None]


def site_gram_lmax_bound(sites: Sites, bound, budget: int = 32 << 20):
    """Per-site upper bound on ``lambda_max(X_t^T X_t)`` (m,) from ``bound``, a per-block bound (K, n, d) -> (K,).

    Padded: ``bound(sites.X)``. Chunked: a site's Gram is the sum of its chunks' Grams, so the sum of
    the chunks' bounds bounds it (``lambda_max`` is subadditive), but loosely (about
    ``(1 + sqrt(d / n_max))^2`` times too large for random rows). When the per-site d x d Grams fit in
    ``budget`` bytes (or in half of ``X``), they are summed exactly and their largest eigenvalue, plus a
    rigorous allowance for its rounding error, is taken where it is smaller.
    """
    per_chunk = bound(sites.X)
    if sites.site is None:
        return per_chunk
    summed = site_sums(per_chunk, sites)
    K, _, d = sites.X.shape
    m = sites.num_sites
    if max(K, m) * d * d * sites.X.dtype.itemsize > max(budget, sites.X.size * sites.X.dtype.itemsize // 2):
        return summed
    G = site_sums(jnp.einsum("knd,kne->kde", sites.X, sites.X), sites)
    top = jnp.linalg.eigvalsh(G)[:, -1]
    # eigvalsh is backward stable: |computed - exact| <= c d eps ||G||_2 <= c d eps tr(G); c = 64 is generous.
    slack = 64 * d * jnp.finfo(G.dtype).eps * jnp.trace(G, axis1=1, axis2=2)
    return jnp.maximum(jnp.minimum(summed, top + slack), 0.0)  # an all-zero site: 0, not -round-off


LAYOUTS = ("auto", "padded", "chunked")
#: ``layout="auto"`` pads every site to the largest while the padded rows are at most this many times N
#: (measured 2026-12-01: at 1.8 N padded and chunked run an iteration equally fast; at 3.2 N (Exam)
#: chunked is 2-3.5x faster per iteration, at 950 N (one task of 20,000 rows, 999 of one) 400-600x).
PADDED_WASTE_LIMIT = 2.0
#: ... or while the padded ``X`` is at most this many bytes: there padding costs little in absolute terms,
#: and the padded program is the smaller one (measured 2026-12-01 on Exam, 65 sites, 0.5 MB padded: a first
#: fit from the persistent compilation cache took 0.32 s padded, 0.34 s chunked, while a warm iteration
#: saves only ~0.1 ms chunked).
PADDED_SMALL_BYTES = 8 << 20
#: Cost of a chunk beyond its rows, in rows, for :func:`choose_chunk` (the gather of ``W[site]`` and
#: the segment sum, per chunk and pass).
CHUNK_OVERHEAD_ROWS = 4


def to_sites(X, y, task, num_tasks=None, n_max=None, layout="auto", chunk=None) -> Sites:
    """Split a flat dataset into per-site arrays (padded, or chunked for long-tailed task sizes).

    Args:
      X: (N, d) features; y: (N,) targets; task: (N,) ids in 0..m-1 (NumPy or array-like; checked
        with :func:`~mtl_jax.data.validate_dataset`, so every task needs at least one sample).
      num_tasks: m; defaults to ``max(task) + 1``.
      n_max: rows per site after padding; defaults to the largest task size. A larger value
        (e.g. a round number, so that datasets of different sizes share one compiled program) is
        allowed; a smaller one raises ``ValueError``. Giving it selects the padded layout.
      layout: "padded" (every site padded to ``n_max``), "chunked" (each site cut into chunks of
        ``chunk`` rows, see :class:`Sites`) or "auto": padded while the padded rows are at most
        :data:`PADDED_WASTE_LIMIT` x N or the padded ``X`` at most :data:`PADDED_SMALL_BYTES`, chunked
        otherwise.
      chunk: rows per chunk of the chunked layout; default :func:`choose_chunk`.

    Returns:
      A :class:`Sites` of JAX arrays: padded, ``X`` (m, n_max, d), ``y``/``mask``/``index`` (m, n_max),
      ``counts`` (m,); chunked, ``X`` (K, chunk, d), ... and ``site`` (K,). Samples keep their
      original relative order within each site.
    """
    X, y, task, m = validate_dataset(X, y, task, num_tasks=num_tasks)
    return pack_sites(X, y, task, m, n_max, layout=layout, chunk=chunk)


def choose_chunk(counts, overhead: int = CHUNK_OVERHEAD_ROWS) -> int:
    """The chunk size (a power of two, or the largest site) of least cost ``sum_t ceil(n_t / c) (c + overhead)``.

    The cost counts the rows each pass streams (padding included) plus a per-chunk overhead: small
    chunks waste little padding on small sites, but a large site then needs many chunks.
    """
    counts = np.asarray(counts, dtype=np.int64)
    largest = int(counts.max())
    candidates = sorted({1 << k for k in range(largest.bit_length())} | {largest})
    costs = [int(np.sum(-(-counts // c))) * (c + overhead) for c in candidates]
    return candidates[int(np.argmin(costs))]


def choose_layout(counts, row_bytes: int) -> str:
    """"padded" or "chunked", the choice of ``layout="auto"`` (see :func:`to_sites`); ``row_bytes`` = d x itemsize."""
    counts = np.asarray(counts, dtype=np.int64)
    padded_rows = counts.size * int(counts.max())
    if padded_rows <= PADDED_WASTE_LIMIT * counts.sum() or padded_rows * row_bytes <= PADDED_SMALL_BYTES:
        return "padded"
    return "chunked"


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


def _check_size(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    return int(value)


def pack_sites(X, y, task, m: int, n_max=None, *, layout="auto", chunk=None) -> Sites:
    """:func:`to_sites` on data that :func:`~mtl_jax.validation.validate_dataset` has already checked.

    X (N, d) float, y (N,), task (N,) int64 with every id in 0..m-1 present. One pass writes ``X``
    into the padded (m, n_max, d) or chunked (K, chunk, d) layout (no intermediate ``X[order]``
    copy), into memory that the device array then shares; when the rows are already grouped by task
    with equal counts that pass is a plain copy.
    """
    n, d = X.shape
    counts = np.bincount(task, minlength=m)
    largest = int(counts.max())
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
    if n_max is not None:
        n_max = _check_size("n_max", n_max)
        if n_max < largest:
            raise ValueError(f"n_max: {n_max} is smaller than the largest task ({largest} samples)")
        if layout == "chunked":
            raise ValueError("n_max: applies to the padded layout; give chunk= for the chunked one")
        layout = "padded"
    if chunk is not None:
        chunk = _check_size("chunk", chunk)
        if chunk < 1:
            raise ValueError(f"chunk: must be at least 1, got {chunk}")
        if layout == "padded":
            raise ValueError("chunk: applies to the chunked layout, not to layout='padded'")
        layout = "chunked"
    if layout == "auto":
        layout = choose_layout(counts, d * X.dtype.itemsize)
    if layout == "padded":
        return _pack_padded(X, y, task, m, counts, largest if n_max is None else n_max)
    return _pack_chunked(X, y, task, m, counts, choose_chunk(counts) if chunk is None else chunk)


def _pack_padded(X, y, task, m, counts, n_max) -> Sites:
    n, d = X.shape
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
        Xs, ys, mask = _gather_rows(X, y, index, Xs)
    return Sites(X=_device(Xs), y=jnp.asarray(ys), mask=jnp.asarray(mask),
                 counts=jnp.asarray(counts.astype(np.int64)), index=jnp.asarray(index))


def _pack_chunked(X, y, task, m, counts, chunk) -> Sites:
    n, d = X.shape
    blocks = -(-counts // chunk)                            # chunks per site, >= 1
    first = np.concatenate([[0], np.cumsum(blocks)[:-1]])   # each site's first chunk
    K = int(blocks.sum())
    order = np.argsort(task, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_task = task[order]
    slot = np.arange(n) - starts[sorted_task]
    index = np.full((K, chunk), -1, dtype=np.int64)
    index[first[sorted_task] + slot // chunk, slot % chunk] = order
    Xs, ys, mask = _gather_rows(X, y, index, _aligned_empty((K, chunk, d), X.dtype))
    site = np.repeat(np.arange(m, dtype=np.int64), blocks)
    return Sites(X=_device(Xs), y=jnp.asarray(ys), mask=jnp.asarray(mask),
                 counts=jnp.asarray(counts.astype(np.int64)), index=jnp.asarray(index), site=jnp.asarray(site))


def _gather_rows(X, y, index, Xs):
    """Fill ``Xs`` (K, c, d) from ``X`` by ``index`` (K, c) (-1: a zero padding row); return (Xs, ys, mask)."""
    K, c = index.shape
    d = X.shape[1]
    flat = index.reshape(-1)
    real = flat >= 0
    # Gather straight into the padded array; mode="clip" keeps np.take from buffering ``out``
    # (every index is valid: padding slots read row 0 and are zeroed next).
    np.take(X, np.where(real, flat, 0), axis=0, out=Xs.reshape(K * c, d), mode="clip")
    Xs.reshape(K * c, d)[~real] = 0
    ys = np.where(real, y[np.where(real, flat, 0)], 0).astype(X.dtype).reshape(K, c)
    mask = real.astype(X.dtype).reshape(K, c)
    return Xs, ys, mask


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
    block_site = np.arange(index.shape[0]) if sites.site is None else np.asarray(sites.site)
    site_of_slot = np.broadcast_to(block_site[:, None], index.shape)
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
