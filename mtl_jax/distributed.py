"""Sites over devices: a mesh with one ``"sites"`` axis, empty sites for an even split, the local work under ``shard_map``.

The DMTRL round (:mod:`mtl_jax.solvers.dmtrl`) is a per-block part (the sites' SDCA passes, which see
only their own rows) plus server steps whose cross-site operations are sums over sites. Here the
per-block part runs under ``shard_map`` over a 1-D device mesh, every device holding a contiguous
slice of the blocks; the server's sums over the sharded sites axis become all-reduces that XLA's
partitioner inserts (the ``psum`` of the design), and the d x d Gram matrix of V and the small
decompositions are computed on every device alike. Nothing else of the round changes.

Sites that do not divide evenly over the devices are completed with *empty sites* (no rows, count 0,
zero duals): they change no sum, and everything that counts sites (the Omega-step's floor and trace,
participants, bytes) counts real sites only (``counts > 0``; a real site always has a sample).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtl_jax.data.sites import Sites

AXIS = "sites"


def site_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"sites"`` over ``devices``: None (all devices), a count, or a list of devices.

    "All devices" are this process's, or, in a run of several processes joined by
    :func:`mtl_jax.launch.initialize`, every process's (``jax.devices()``).
    """
    local = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    if devices is None:
        chosen = local
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices: must be between 1 and the {len(local)} local device(s), got {devices}")
        chosen = local[:int(devices)]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices: an empty list of devices")
    return Mesh(np.array(chosen), (AXIS,))


def pad_sites(sites: Sites, multiple: int) -> Sites:
    """``sites`` with empty blocks appended so that the number of blocks is a multiple of ``multiple``.

    Padded layout: the new blocks are new empty sites (count 0). Chunked layout: the new chunks belong
    to one new empty site. Either way ``num_sites`` may grow; real sites keep their ids.
    """
    K = sites.num_blocks
    extra = (-K) % multiple
    if extra == 0:
        return sites
    pad = lambda a, value=0: jnp.concatenate([a, jnp.full((extra,) + a.shape[1:], value, a.dtype)])
    X, y, mask, index = pad(sites.X), pad(sites.y), pad(sites.mask), pad(sites.index, -1)
    if sites.site is None:
        return Sites(X, y, mask, pad(sites.counts), index)
    m = sites.num_sites
    counts = jnp.concatenate([sites.counts, jnp.zeros((1,), sites.counts.dtype)])
    return Sites(X, y, mask, counts, index, pad(sites.site, m))


def block_spec(ndim: int) -> PartitionSpec:
    """The leading axis over ``"sites"``, the rest whole."""
    return PartitionSpec(AXIS, *([None] * (ndim - 1)))


def shard_blocks(tree, mesh: Mesh):
    """Every array leaf of ``tree`` placed with its leading axis split over the mesh (it must divide evenly)."""
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, NamedSharding(mesh, block_spec(a.ndim))), tree)


def shard_sites(sites: Sites, mesh: Mesh) -> Sites:
    """The block arrays of ``sites`` split over the mesh; ``counts`` (and ``site``) too when they divide evenly."""
    n = mesh.devices.size
    if sites.num_blocks % n:
        raise ValueError(f"sites: {sites.num_blocks} blocks do not divide over {n} devices; pad_sites first")
    X, y, mask, index = shard_blocks((sites.X, sites.y, sites.mask, sites.index), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    counts = jax.device_put(sites.counts, replicated)
    site = None if sites.site is None else jax.device_put(sites.site, NamedSharding(mesh, block_spec(1)))
    return Sites(X, y, mask, counts, index, site)


def to_host(x) -> np.ndarray:
    """A (possibly sharded) array as one NumPy array on this host; across processes a collective
    (``process_allgather``), so every process must call it."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_writer() -> bool:
    """Whether this process writes results (process 0 of a multi-process run; always true otherwise)."""
    return jax.process_index() == 0


def process_sites(X, y, task, mesh: Mesh, *, num_tasks=None, loss=None, dtype=None) -> tuple[Sites, int]:
    """Global :class:`Sites` (padded layout) over ``mesh``, each process reading only its own sites' rows.

    ``task`` (N,) is read whole (it says which rows belong to which site); ``X`` (N, d) and ``y`` (N,) are
    anything that supports ``a[rows]`` with a sorted integer array, e.g. the memory maps of
    :func:`mtl_jax.data.io.npz_member_rows`: this process reads the rows of the sites its devices hold and no
    others. The sites are padded with empty ones to a multiple of the mesh size; each process's rows are
    checked here (finite numbers; labels for hinge and logistic). Returns ``(sites, m)`` with ``m`` the real
    number of sites. ``dtype``: of the rows as computed (default: as read). The same call in every process of
    a multi-process run (every argument alike).
    """
    from mtl_jax.data.sites import pack_sites
    from mtl_jax.validation import validate_dataset

    task = np.asarray(task)
    m = int(task.max()) + 1 if num_tasks is None else int(num_tasks)
    counts = np.bincount(task, minlength=m)
    if np.any(counts == 0):
        raise ValueError(f"task: every task needs at least one sample; none for {np.flatnonzero(counts == 0)[:5]}")
    m_pad = _padded(m, mesh)
    n_max, d = int(counts.max()), int(X.shape[1])
    mine = process_site_ids(m, mesh)
    real = mine[mine < m]
    order = np.argsort(task, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = np.concatenate([order[starts[t]:starts[t + 1]] for t in real]) if real.size else np.zeros(0, np.int64)
    sorted_rows = np.sort(rows)
    X_own = np.asarray(X[sorted_rows], dtype=dtype)
    y_own = np.asarray(y[sorted_rows], dtype=X_own.dtype)
    local_task = np.searchsorted(real, task[sorted_rows])
    X_own, y_own, local_task, _ = validate_dataset(X_own, y_own, local_task, loss=loss, num_tasks=real.size)
    local = pack_sites(X_own, y_own, local_task, real.size, n_max, layout="padded")
    empty = mine.size - real.size

    def blocks(a, fill=0):
        a = np.asarray(a)
        return np.concatenate([a, np.full((empty,) + a.shape[1:], fill, a.dtype)])

    index = np.asarray(local.index)
    index = np.where(index >= 0, sorted_rows[np.maximum(index, 0)], -1)  # global row ids
    arrays = [blocks(local.X), blocks(local.y), blocks(local.mask), blocks(index, -1)]
    shapes = [(m_pad, n_max, d), (m_pad, n_max), (m_pad, n_max), (m_pad, n_max)]
    X_g, y_g, mask_g, index_g = (
        jax.make_array_from_process_local_data(NamedSharding(mesh, block_spec(len(shape))), a, shape)
        for a, shape in zip(arrays, shapes))
    all_counts = np.concatenate([counts, np.zeros(m_pad - m, counts.dtype)])
    counts_g = jax.device_put(all_counts.astype(np.asarray(local.counts).dtype), NamedSharding(mesh, PartitionSpec()))
    return Sites(X_g, y_g, mask_g, counts_g, index_g), m


def _padded(m: int, mesh: Mesh) -> int:
    """``m`` sites completed with empty ones to a multiple of the mesh size."""
    D = mesh.devices.size
    return -(-int(m) // D) * D


def process_site_ids(m: int, mesh: Mesh) -> np.ndarray:
    """The blocks that this process's devices hold when ``m`` sites lie over ``mesh`` as :func:`process_sites`
    places them: site ids in increasing order, those ``>= m`` being the empty sites of the padding."""
    m_pad = _padded(m, mesh)
    index_map = NamedSharding(mesh, block_spec(1)).addressable_devices_indices_map((m_pad,))
    spans = sorted({(sl[0].start or 0, m_pad if sl[0].stop is None else sl[0].stop) for sl in index_map.values()})
    return np.concatenate([np.arange(lo, hi) for lo, hi in spans]) if spans else np.zeros(0, np.int64)


def gather_sites(values, m: int, mesh: Mesh) -> np.ndarray:
    """Per-site values computed where the sites are -> every site's, on every process (a collective: every process
    calls it). ``values`` (r, ...): one row for each real site this process holds
    (``process_site_ids(m, mesh)`` below ``m``, in that order), e.g. the task means of ``mtl-jax fit --center``
    from its own rows. Returns an (m, ...) NumPy array, site t in row t. Small vectors only (like ``W``)."""
    mine = process_site_ids(m, mesh)
    r = int(np.sum(mine < m))
    values = np.asarray(values)
    if values.ndim < 1 or values.shape[0] != r:
        raise ValueError(f"values: need one row for each of this process's {r} sites, got shape {values.shape}")
    local = np.zeros((mine.size,) + values.shape[1:], values.dtype)
    local[:r] = values  # the real sites come first (ids in increasing order)
    shape = (_padded(m, mesh),) + values.shape[1:]
    spread = jax.make_array_from_process_local_data(NamedSharding(mesh, block_spec(len(shape))), local, shape)
    return to_host(spread)[:m]


def process_rows(values, sites: Sites) -> jax.Array:
    """Per-row values (N,) in the input row order -> laid out like ``sites.y`` (zero at padding), each process
    reading only the rows of the sites it holds (``values`` may be a memory map): e.g. a dual warm start for sites
    placed by :func:`process_sites` (``sites.index`` holds the global row ids)."""
    index = sites.index
    shards = []
    for shard in index.addressable_shards:
        ids = np.asarray(shard.data)
        rows = ids[ids >= 0]
        ordered = np.sort(rows)  # read in increasing row order (a memory map's best)
        read = np.asarray(values[ordered])
        local = np.zeros(ids.shape, read.dtype)
        local[ids >= 0] = read[np.searchsorted(ordered, rows)]
        shards.append(jax.device_put(local, shard.device))
    return jax.make_array_from_single_device_arrays(index.shape, index.sharding, shards)


def is_spread(sites: Sites, mesh: Mesh) -> bool:
    """Whether ``sites`` already lie over ``mesh`` as :func:`shard_sites` or :func:`process_sites` place them."""
    sharding = getattr(sites.X, "sharding", None)
    return (isinstance(sharding, NamedSharding) and sharding.mesh.devices.size == mesh.devices.size
            and sites.num_blocks % mesh.devices.size == 0 and sharding.spec[:1] == (AXIS,))


def map_blocks(fn, mesh: Mesh | None, num_batched: int):
    """``fn`` over blocks, split over the mesh: the first ``num_batched`` arguments are per-block arrays
    or pytrees of them (leading axis over ``"sites"``), the rest are replicated; the outputs are per-block. ``mesh=None``: ``fn``.
    """
    if mesh is None or mesh.devices.size == 1:
        return fn

    def call(*args):
        batched, rest = args[:num_batched], args[num_batched:]
        in_specs = tuple(jax.tree_util.tree_map(lambda a: block_spec(jnp.ndim(a)), a) for a in batched) + tuple(
            PartitionSpec() for _ in rest)
        # The outputs' ranks from one device's share: ``fn`` may only make sense on a shard (the local pass's
        # tiles are laid out per device, so the global tile count need not match the global block count).
        n = mesh.devices.size
        shard = lambda a: jax.ShapeDtypeStruct((a.shape[0] // n,) + tuple(a.shape[1:]), a.dtype)
        out_shapes = jax.eval_shape(fn, *(jax.tree_util.tree_map(shard, a) for a in batched), *rest)
        out_specs = jax.tree_util.tree_map(lambda s: block_spec(len(s.shape)), out_shapes)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return call
