"""What every solver shares: the history record, the solve output, the compiled-program cache, options.

A solver module (``centralized``, and the distributed ``dmtrl``) turns validated
:class:`~mtl_jax.data.Sites` into a :class:`SolveOutput`; :func:`mtl_jax.fit` wraps that into a
``FitResult`` and the results store (:mod:`mtl_jax.runner.store`) writes its history. Nothing here
knows about a particular algorithm (docs/architecture.md, section 4: where a new solver goes).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from collections import OrderedDict
from typing import NamedTuple

import jax
import numpy as np

from mtl_jax import compilation
from mtl_jax.data.io import atomic_write
from mtl_jax.mtrl import SpectralMatrix


class HistoryRecord(NamedTuple):
    """One row of a solver's history (docs/results.md describes how it is stored).

    ``round`` counts iterations (APG), alternations or communication rounds; ``objective`` is J(W);
    ``gap`` the duality gap of J, an upper bound on ``J(W) - min J`` (NaN where a solver has none);
    ``bytes`` the bytes communicated between sites and server since the start (0: centralized); ``seconds`` the wall
    time since the start. When a whole loop is one compiled program its seconds are the loop's time
    apportioned evenly over its iterations (compilation excluded).
    """

    round: int
    objective: float
    gap: float
    bytes: int
    seconds: float


HISTORY_FIELDS = HistoryRecord._fields


class RoundRecord(NamedTuple):
    """One communication round of a distributed solver: the :class:`HistoryRecord` fields, then more.

    The first five fields are those of :class:`HistoryRecord` (``bytes = bytes_up + bytes_down``, counted
    since the start; ``seconds`` the wall time), so every reader of a history reads a distributed one too.

    Attributes (beyond the first five):
      primal: the primal objective of the problem the round works on (J for the joint scheme; P(W, Omega)
        at the current Omega for the alternating one).
      dual: its dual objective at the round's dual point.
      gap_w: the duality gap of the W-problem at fixed Omega (alternating scheme; NaN otherwise).
      bytes_up, bytes_down: bytes sent from the sites to the server and back, since the start (like ``bytes``).
      passes: local effort: mean number of passes over its data that a participating site made.
      participants: number of sites whose update reached the server.
      sim_seconds: simulated time since the start under the cost model (slowest participating site's
        compute plus communication, summed over rounds).
    """

    round: int
    objective: float
    gap: float
    bytes: int
    seconds: float
    primal: float
    dual: float
    gap_w: float
    bytes_up: int
    bytes_down: int
    passes: float
    participants: int
    sim_seconds: float


_INTEGER_FIELDS = ("round", "bytes", "bytes_up", "bytes_down", "participants")


class SolveOutput(NamedTuple):
    """What a solver returns to :func:`mtl_jax.fit` (NumPy leaves, sites order)."""

    W: np.ndarray          # (m, d)
    omega: SpectralMatrix  # factored Omega of W, numpy leaves
    alpha: np.ndarray      # (m, n_max) dual point of the certificate
    history: tuple         # of HistoryRecord
    objective: float       # J(W)
    gap: float             # certificate: J(W) - D(alpha)
    converged: bool
    iterations: int
    compile_seconds: float
    solve_seconds: float


def history_columns(history) -> dict[str, np.ndarray]:
    """Records (:class:`HistoryRecord` or :class:`RoundRecord`) as columns ``{field: (n,) array}``.

    The fields are those of the first record's type (:class:`HistoryRecord`'s for an empty history);
    counts (round, bytes, participants) come out as int64.
    """
    history = tuple(history)
    fields = type(history[0])._fields if history and hasattr(history[0], "_fields") else HISTORY_FIELDS
    rows = np.array([tuple(r) for r in history], dtype=float).reshape(-1, len(fields))
    cols = {name: rows[:, i] for i, name in enumerate(fields)}
    for name in _INTEGER_FIELDS:
        if name in cols:
            cols[name] = cols[name].astype(np.int64)
    return cols


def numpy_tree(tree):
    """Every leaf of ``tree`` as a NumPy array (copies device arrays to the host)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def check_options(options: dict, allowed: tuple[str, ...], where: str) -> dict:
    """``options`` if every key is in ``allowed``; else ValueError naming the unknown keys and the known ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {known}")
    return options


def history_capacity(max_iter: int, smallest: int = 64) -> int:
    """Static history length for a traced ``max_iter``: the next power of two >= ``max_iter``.

    The iteration cap is a traced argument of the compiled loop, but the history buffer needs a static
    size; rounding up to a power of two means that a new ``max_iter`` compiles again only when it
    crosses a power of two (and never when it shrinks).
    """
    return max(smallest, 1 << max(0, math.ceil(math.log2(max(1, max_iter)))))


# --- the compiled-program cache ----------------------------------------------------------------------

_COMPILED: OrderedDict = OrderedDict()
MAX_COMPILED = 32
_stats = {"compiled": 0, "hits": 0, "loaded": 0}
_EXPORTABLE: set = set()


def register_exportable(*classes) -> None:
    """Let NamedTuple ``classes`` appear in programs stored on disk (:func:`compiled`'s persistent layer).

    A program whose arguments or results hold an unregistered pytree node type is simply not stored.
    """
    for cls in classes:
        if cls in _EXPORTABLE:
            continue
        jax.export.register_namedtuple_serialization(cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}")
        _EXPORTABLE.add(cls)


register_exportable(SpectralMatrix)


def _source_digest() -> str:
    """A digest of the package's source files: a stored program is only reused by the code that made it."""
    if "digest" not in _SOURCE:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        _SOURCE["digest"] = h.hexdigest()
    return _SOURCE["digest"]


_SOURCE: dict = {}


def _leaf_key(x):
    """What of one argument leaf changes the compiled program: shape, dtype, and where it lives.

    A committed JAX array carries its sharding (devices and layout over them): a program compiled
    for inputs on one device must not be called with inputs spread over several. NumPy arrays and
    Python numbers are placed by the program itself (key None), and so is an array on the default
    device alone (a program's own output, committed there, must hit the program compiled for
    uncommitted inputs).
    """
    if isinstance(x, jax.Array):
        sharding = x.sharding if getattr(x, "committed", True) else None
        if sharding is not None and sharding.device_set == {jax.devices()[0]}:
            sharding = None
        return (x.shape, str(x.dtype), sharding, bool(getattr(x, "weak_type", False)))
    a = np.asarray(x)
    return (a.shape, str(a.dtype), None, isinstance(x, (int, float, complex)))


def compiled(fn, args, static: dict):
    """``fn`` (a ``jax.jit`` function) compiled ahead of time for ``args`` and ``static`` options, cached.

    Compiling ahead of time lets a solver report compilation apart from solving; the cache keeps a
    second call with arguments of the same shapes, dtypes and placement (another lam1, lam2, tol,
    iteration cap or warm start: all traced) from compiling again. The key holds everything that
    changes the program: the argument tree, each leaf's shape, dtype and sharding, and the static
    options. Returns ``(executable, seconds spent compiling now)`` (0.0 on a cache hit).
    """
    leaves, tree = jax.tree_util.tree_flatten(args)
    leaf_keys = tuple(_leaf_key(x) for x in leaves)
    key = (fn, tree, leaf_keys, tuple(sorted(static.items())))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        _stats["hits"] += 1
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = _stored_program(fn, args, static, key) if all(k[2] is None or _single_device(k[2]) for k in leaf_keys) \
        else None
    if exe is None:
        exe = fn.lower(*args, **static).compile()
    if len(_COMPILED) >= MAX_COMPILED:
        _COMPILED.popitem(last=False)  # the least recently used
    _COMPILED[key] = exe
    _stats["compiled"] += 1
    return exe, time.perf_counter() - t0


def _single_device(sharding) -> bool:
    return len(sharding.device_set) == 1


def _stored_program(fn, args, static, key):
    """The program of ``key`` through the persistent layer, or None when that layer is off or fails.

    With the persistent compilation cache on (:func:`mtl_jax.enable_compilation_cache`), tracing and
    lowering our Python is most of a new process's first solve; so the lowered program itself is
    stored next to XLA's cache (``jax.export`` serialisation, a flatbuffer, no pickle), keyed on the
    program's identity, the argument shapes, dtypes and placement, the static options, the JAX
    version and a digest of this package's source. Loading it skips tracing; XLA's cache then skips
    compiling. Any failure (an unregistered pytree node, a version mismatch) falls back to tracing.
    """
    folder = compilation.cache_dir()
    if folder is None:
        return None
    try:
        text = repr((getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)), key[1], key[2], key[3],
                     jax.__version__, jax.default_backend(), _source_digest()))
        path = os.path.join(folder, "mtl_jax_programs", hashlib.sha256(text.encode()).hexdigest() + ".jaxexport")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                exported = jax.export.deserialize(bytearray(f.read()))
            _stats["loaded"] += 1
        else:
            exported = jax.export.export(fn)(*args, **static)
            blob = exported.serialize()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_write(path, "wb") as f:
                f.write(blob)
        return jax.jit(exported.call).lower(*args).compile()
    except Exception:  # the store is an optimisation: never let it break a solve
        return None


def cache_info() -> dict:
    """``{"compiled": programs compiled so far, "hits": calls served from the in-process cache,
    "loaded": programs loaded from the persistent store, "size": entries held}``."""
    return {**_stats, "size": len(_COMPILED)}


def clear_cache() -> None:
    """Forget every compiled program (the next solve compiles again)."""
    _COMPILED.clear()
    _stats.update(compiled=0, hits=0, loaded=0)


# --- checkpoints -------------------------------------------------------------------------------------

def check_checkpoint(path, every, *, default: int) -> tuple:
    """``(path, every)`` of a solver's ``checkpoint``/``checkpoint_every`` options, checked; ``every`` None -> ``default``.

    ValueError naming ``checkpoint`` (not a path, or its folder missing) or ``checkpoint_every`` (not an int >= 1).
    """
    from mtl_jax.validation import check_int
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"checkpoint: must be a file path (str or os.PathLike), got {path!r}")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint: the folder {folder} does not exist")
    every = default if every is None else check_int("checkpoint_every", every, low=1, high=2**31 - 1)
    return path, every


def fingerprint(leaves, extra) -> str:
    """A sha256 of arrays (shape, dtype and bytes of each of ``leaves``) and of ``repr(extra)``: what must
    match for a checkpoint to continue a run. Arrays spread over processes contribute their shapes only."""
    h = hashlib.sha256()
    for leaf in leaves:
        h.update(repr((np.shape(leaf), str(getattr(leaf, "dtype", np.asarray(leaf).dtype)))).encode())
        if getattr(leaf, "is_fully_addressable", True):
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def named_arrays(tree, prefix: str) -> dict:
    """The leaves of a (nested) NamedTuple as ``{prefix_field[_subfield]: array}`` (None fields left out)."""
    out = {}
    for name, value in tree._asdict().items():
        key = f"{prefix}_{name}"
        if value is None:
            continue
        if hasattr(value, "_asdict"):
            out.update(named_arrays(value, key))
        else:
            out[key] = value
    return out


def write_checkpoint(path, arrays: dict, history, *, format: str, fingerprint: str) -> None:
    """Write ``arrays`` (host arrays), the ``history`` rows (float64) and the ``format`` tag and ``fingerprint``
    to the .npz ``path`` atomically: a kill at any moment leaves the previous checkpoint or the new one, never
    a torn file (:func:`mtl_jax.data.io.atomic_write`). Arrays only: read back without pickle."""
    arrays = dict(arrays)
    rows = np.array([tuple(r) for r in history], dtype=np.float64)
    arrays.update(history=rows, format=np.array(format), fingerprint=np.array(fingerprint))
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def read_checkpoint(path, *, format: str, fingerprint: str, what: str, differs: str) -> dict:
    """The arrays of the checkpoint at ``path``, after checking that it is one (``format``) of this problem.

    ValueError naming ``checkpoint`` and saying why: not a valid .npz (torn, foreign), not ``what``
    (another format tag), or another problem (``fingerprint`` differs; ``differs`` lists what may).
    """
    from mtl_jax.data.io import read_npz
    try:
        saved = read_npz(path)
    except ValueError as e:
        raise ValueError(f"checkpoint: {e}; delete it to start afresh") from None
    if str(saved.get("format", "")) != format:
        raise ValueError(f"checkpoint: {path} is not {what} ({format})")
    if str(saved.get("fingerprint", "")) != fingerprint:
        raise ValueError(f"checkpoint: {path} belongs to another problem or other options ({differs} differ); "
                         "delete it or choose another path")
    return saved


def restored(saved: dict, like, prefix: str, path, place=None):
    """``like`` (a nested NamedTuple of arrays) with every leaf replaced by ``saved[prefix_field...]``, after
    checking its shape and dtype (ValueError naming ``checkpoint``); ``place(array, like_leaf)`` puts it on
    the device (default: ``jax.device_put`` with the leaf's sharding)."""
    def one(key, leaf):
        if key not in saved:
            raise ValueError(f"checkpoint: {path}: missing array {key}")
        a = saved[key]
        if a.shape != leaf.shape or a.dtype != leaf.dtype:
            raise ValueError(f"checkpoint: {path}: {key} has shape {a.shape} {a.dtype}, expected {leaf.shape} "
                             f"{leaf.dtype}")
        return place(a, leaf) if place is not None else jax.device_put(a, leaf.sharding)

    fields = {}
    for name, value in like._asdict().items():
        key = f"{prefix}_{name}"
        fields[name] = None if value is None else (restored(saved, value, key, path, place)
                                                   if hasattr(value, "_asdict") else one(key, value))
    return type(like)(**fields)
