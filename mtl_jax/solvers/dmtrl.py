"""DMTRL: the distributed dual solver of MTRL (Liu, Pan, Ho, KDD 2017), simulated sites on one device.

docs/dmtrl.md is the user's guide; docs/mathematics.md, sections 4 and 5, the derivation. Every site ``t``
keeps its samples ``X_t, y_t`` and their dual variables ``alpha_t``. One communication round:

1. the server sends each site its model ``w_t`` (d numbers; and ``q_t`` when it changed);
2. each site runs passes of SDCA on its *local subproblem*

       maximise over dalpha_t:  sum_i dual_term(alpha_ti + dalpha_ti) - <w_t, dv_t> - (q_t / 2) ||dv_t||^2 ,
       dv_t = X_t^T dalpha_t ,

   updating coordinate ``i`` with the margin ``<w_t + q_t dv_t, x_ti>`` (its own pending change counts)
   and the curvature ``Q = q_t ||x_ti||^2`` (:attr:`mtl_jax.losses.Loss.dual_step`), and sends ``dv_t``
   (d numbers) plus two scalars for the certificate (its dual term and its loss);
3. the server sets ``V += sum_t dv_t`` and maps ``V`` to ``W``.

A ``q_t`` is *safe* when ``R*(V + dV) <= R*(V) + <W, dV> + sum_t (q_t / 2) ||dv_t||^2`` for every
``dV``: then the dual objective rises by at least the sum of the local improvements (CoCoA+ "adding",
Ma et al. 2015), so the dual ascends monotonically and sites that skip a round (dropout) or stop early
(stragglers) cannot break it. Two outer schemes (``SCHEMES``):

* ``"joint"`` (default): rounds on the dual of J itself, ``R(W) = lam1/2 ||W||_F^2 + lam2/2 ||W||_*^2``.
  The server map is ``W = grad R*(V)`` (the prox of the squared trace norm at ``V / lam1``: the
  Omega-step done implicitly every round) and ``q_t = 1 / lam1`` is safe because ``R*`` is
  ``1/lam1``-smooth. The duality gap of J certifies every round; nothing can stall.
* ``"alternating"`` (the paper's): rounds on the W-problem at a fixed Omega, ``R*(V) = 1/2 tr(V^T Sigma V)``,
  ``W = Sigma V``, with ``q_t`` from one of the rules in :data:`Q_RULES`; Omega is recomputed in closed
  form from W every ``omega_every`` rounds or when the W-problem's relative gap is below ``omega_tol``,
  the duals warm-started. Certified on J too (the duals are feasible for J's dual), but it can stall
  above min J, as the centralized alternation does.

The round is a per-block function (``vmap`` over the leading axis of :class:`~mtl_jax.data.Sites`) plus
a server step whose only cross-site operations are sums over sites (``V``, the certificate's scalars,
and the ``d x d`` Gram matrix of ``V`` inside the server map): the shape that ``shard_map`` needs. With
the chunked layout every chunk is a worker of its own: its ``q`` is its site's ``q_t`` times the site's
number of chunks (``||sum_c dv_c||^2 <= k sum_c ||dv_c||^2``), which keeps the step safe.

Systems realism, as in MOCHA (Smith et al., NeurIPS 2017), all traced (:class:`Systems`): per-site
local passes; an effort fraction drawn each round from ``U(min_effort, 1)``; stragglers (a site
straggles with ``straggler_prob`` and then makes ``straggler_effort`` of its effort); dropout (a site's
update is lost with ``dropout_prob``); and a cost model (per-site speed in coordinate steps per second,
latency, bandwidth) giving simulated seconds per round: the slowest participating site's compute and
upload, plus the download.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import distributed, names
from mtl_jax.data.sites import Sites, feature_sums, margins, per_block, sample_weights, site_sums
from mtl_jax.launch import heartbeat
from mtl_jax.losses import Loss, get_loss
from mtl_jax.mtrl import (
    DEFAULT_EPS,
    SigmaQuadratic,
    SpectralMatrix,
    TraceNormSq,
    as_spectral,
    dual_terms,
    empirical_loss,
    omega_factored,
)
from mtl_jax.solvers.base import (
    RoundRecord,
    SolveOutput,
    check_checkpoint,
    check_options,
    compiled,
    history_capacity,
    numpy_tree,
    register_exportable,
)
from mtl_jax.validation import check_int, check_real, check_square_matrix

SCHEMES = names.DMTRL_SCHEMES
#: ``q_t`` rules of the alternating scheme (the joint scheme always uses ``1 / lam1``).
#: ``"lambda_max"``: ``lambda_max(Sigma)`` for every site; ``"gershgorin"``: the row sum ``sum_t' |Sigma_tt'|``
#: (O(m^2 r) time, computed in row blocks: never an m x m array); ``"paper"``: DMTRL's ``sigma' Sigma_tt``,
#: ``sigma' = max_t rowsum_t / Sigma_tt``; ``"factored"``: ``|b| + sum_k |a_k - b| |U_tk| ||U_:k||_1`` from
#: ``Sigma = U diag(a) U^T + b (I - U U^T)`` in O(m r); ``"auto"``: the measured fastest (benchmarks/README.md).
Q_RULES = names.Q_RULES
AUTO_Q_RULE = "lambda_max"
ORDERS = ("random", "cyclic")
DEFAULT_MAX_ROUNDS = 2000
#: Options of :func:`solve` (and of ``fit(solver="dmtrl", ...)``) beyond the common ones.
OPTIONS = ("scheme", "local_passes", "q", "omega_every", "omega_tol", "omega0", "order", "seed", "min_effort",
           "straggler_prob", "straggler_effort", "dropout_prob", "speed", "latency", "bandwidth", "devices",
           "checkpoint", "checkpoint_every")
#: The cost model's defaults: a site makes 10^6 coordinate steps per second; a message takes 50 ms plus its
#: size over 12.5 MB/s (a 100 Mbit/s wide-area link).
DEFAULT_SPEED = 1e6
DEFAULT_LATENCY = 0.05
DEFAULT_BANDWIDTH = 12.5e6
_NEVER = 2**31 - 1


class Systems(NamedTuple):
    """The traced systems model of a run: changing any of it does not compile again.

    passes: (m,) int, nominal local passes per site and round (0: the site computes nothing).
    min_effort: () in [0, 1]; each round a site's effort fraction is drawn from ``U(min_effort, 1)`` (1: fixed).
    straggler_prob: () probability that a site straggles in a round; straggler_effort: () its effort factor.
    dropout_prob: () probability that a site's update is lost in a round.
    speed: (m,) coordinate steps per second; latency: () seconds per message; bandwidth: () bytes per second.
    """

    passes: jax.Array
    min_effort: jax.Array
    straggler_prob: jax.Array
    straggler_effort: jax.Array
    dropout_prob: jax.Array
    speed: jax.Array
    latency: jax.Array
    bandwidth: jax.Array


class Params(NamedTuple):
    """Traced hyper-parameters: lam1, lam2, tol (relative gap of J), eps (Omega's floor), the Omega schedule."""

    lam1: jax.Array
    lam2: jax.Array
    tol: jax.Array
    eps: jax.Array
    omega_every: jax.Array  # () int32, rounds between Omega-steps (alternating); _NEVER: never
    omega_tol: jax.Array    # () relative gap of the W-problem that triggers an Omega-step; < 0: never


class DMTRLState(NamedTuple):
    """The state after a round: the dual point, its ``V`` and ``W``, Omega (alternating), the certificates."""

    alpha: jax.Array        # (K, n_max) dual variables, zero at padding
    V: jax.Array            # (m, d) sum_i alpha_ti x_ti per site
    W: jax.Array            # (m, d) the server's map of V
    omega: SpectralMatrix   # alternating: the Omega in use (factored); joint: unused (I / m)
    q: jax.Array            # (m,) the sites' q_t
    seed: jax.Array         # () uint32, the run's seed (every random draw is a hash of it and counters)
    round: jax.Array        # () int32, rounds done
    since_omega: jax.Array  # () int32, rounds since the last Omega-step
    objective: jax.Array    # () J(W)
    gap: jax.Array          # () J(W) - D_J(alpha), the certificate of J
    primal: jax.Array       # () the scheme's primal objective (J, or P(W, Omega))
    dual: jax.Array         # () the scheme's dual objective
    gap_w: jax.Array        # () the W-problem's gap (alternating; NaN for joint)
    sim_seconds: jax.Array  # () simulated seconds since the start


class RoundStats(NamedTuple):
    """What one round reports (every number of the history comes from here)."""

    objective: jax.Array
    gap: jax.Array
    primal: jax.Array
    dual: jax.Array
    gap_w: jax.Array
    participants: jax.Array  # () int32
    passes: jax.Array        # () mean passes of the participating sites
    omega_step: jax.Array    # () bool, an Omega-step began this round
    sim_seconds: jax.Array   # () cumulative


class LocalUpdate(NamedTuple):
    """What a block (a site, or a chunk of one) computes in a round; only ``dv`` and two scalars travel."""

    alpha: jax.Array  # (n_max,) its new dual variables (stay at the site)
    dv: jax.Array     # (d,)
    steps: jax.Array  # () coordinate steps made on real samples
    conj: jax.Array   # () its part of the dual's loss terms at the new duals, sum_i -c loss*(-alpha_i / c)


# --- the site's part ---------------------------------------------------------------------------------

class BlockedRows(NamedTuple):
    """The blocks' rows in the layout of the local pass (:func:`block_rows`): tiles of ``tile`` blocks,
    slot-major, blocks on the last (fastest) axis. Built once per solve; constant over the rounds.

    X: (T, n, d, tile); y, c, mask, sq: (T, n, tile) targets, weights ``1/n_t`` (1 at empty slots), real-row
    mask, ``||x_i||^2``. Tile ``t`` holds blocks ``tile_starts(K, tile)[t]`` onwards (the last tile overlaps the
    one before it when ``tile`` does not divide K; nothing is padded).
    """

    X: jax.Array
    y: jax.Array
    c: jax.Array
    mask: jax.Array
    sq: jax.Array


#: Bytes of a tile's (d, tile) working arrays (its model, its pending change, a row of each block) that
#: :func:`block_rows` aims for: about a core's L2 cache share.
TILE_BYTES = 64 << 10


def tile_size(K: int, d: int, dtype) -> int:
    """Blocks per tile of the local pass: ``TILE_BYTES / (d * itemsize)``, at least 8, at most K."""
    return int(min(K, max(8, TILE_BYTES // (d * jnp.dtype(dtype).itemsize))))


def tile_starts(K: int, tile: int):
    """(T,) the first block of each tile: ``t tile``, except the last tile, which ends at block K.

    ``T = ceil(K / tile)``. When ``tile`` does not divide K the last tile overlaps the one before it instead of
    being padded: its shared blocks are computed twice, identically (every block works alone, from the same
    inputs, in the same visiting order), and no copy of the data or of the duals is ever padded.
    """
    T = -(-K // tile)
    return jnp.minimum(jnp.arange(T) * tile, K - tile)


def _to_tiles(a, tile: int):
    """(K, ...) -> (T, ..., tile): the blocks of each tile (:func:`tile_starts`), moved last."""
    K = a.shape[0]
    T = -(-K // tile)
    if T * tile != K:
        a = jnp.concatenate([a[:(T - 1) * tile], a[K - tile:]])
    return jnp.moveaxis(a.reshape((T, tile) + a.shape[1:]), 1, -1)


def block_rows(X, y, c, mask, sq=None, tile: int | None = None) -> BlockedRows:
    """The blocks' rows laid out for :func:`local_sdca` (one copy of the data, made once per solve).

    Why this layout: a step of the pass touches slot ``i`` of every block of a tile at once. Slot-major
    tiles make that a contiguous (d, tile) slab, and with the blocks on the fastest axis the step's
    products and its sum over the d features are plain vector operations over blocks (with d last, XLA:CPU
    reduced along a short axis of 20 and copied the rows into visiting order at every pass; measured
    2026-12-01, m = 20,480, n = 100, d = 20, float32: 3-5x faster per pass).

    Args: X (K, n, d); y, c, mask (K, n); sq (K, n) the rows' squared norms (default: computed here, from the
    laid-out rows, where the sum over features is a fast vector sum); ``tile`` blocks per tile (default
    :func:`tile_size`).
    """
    K, n, d = X.shape
    tile = tile_size(K, d, X.dtype) if tile is None else min(int(tile), K)
    safe_c = jnp.where(mask > 0, c, 1.0)
    # The barrier keeps XLA from fusing the transposition into each reader (measured 2026-12-01, 1,024 sites:
    # 110 ms with the fusion, 20 ms without).
    Xt = jax.lax.optimization_barrier(_to_tiles(X, tile))
    sq = jnp.sum(Xt * Xt, axis=2) if sq is None else _to_tiles(sq, tile)
    return BlockedRows(Xt, *(_to_tiles(a, tile) for a in (y, safe_c, mask)), sq)


def local_sdca(rows: BlockedRows, alpha, w, q, budget, stream, *, loss: Loss, cyclic: bool) -> LocalUpdate:
    """SDCA on the local subproblems of a batch of blocks: ``budget`` coordinate steps each, pass after pass.

    Every block works alone (only its own rows, duals, ``w`` and ``q``); the leading axis K is a batch
    of blocks (``K = 1`` is one site alone). A pass visits each slot once, in the pass's random order
    (:func:`visiting_order`; ``cyclic``: storage order), updating coordinate ``i`` with the margin
    ``<w + q dv, x_i>`` and curvature ``q ||x_i||^2`` (``Loss.dual_step``).

    All blocks share a pass's order: it depends on ``(stream, pass)`` only, so it is the same whatever
    tile, device or process a block is processed in, and a step reads one contiguous slab of the tile
    (:func:`block_rows`). Each block's order is still a fresh random permutation in every pass, which is
    what SDCA's analysis needs of a block; the blocks' subproblems are independent of one another.

    How it is laid out: the tiles go one after another (a ``fori_loop`` that indexes the laid-out rows in place:
    slicing a tile out first copied it) so that a tile's model and pending change stay in cache through the n
    sequential steps of a pass (a ``lax.scan``). A coordinate is visited once per pass, so a step reads its old
    dual from the pass's start and emits its change as a scan output, and the changes are added after the pass:
    the duals are never carried through the steps (carrying them made XLA copy the whole dual array at every
    step). The margin's sum over the d features is written out as d vector multiply-adds over the tile's blocks
    (XLA:CPU's reduction over the short leading axis was slower), as ``<w, x_i> + q <dv, x_i>`` so that no
    ``w + q dv`` is written out at every step; the steps taken are counted once per pass.

    Args:
      rows: the blocks' rows, :func:`block_rows` of X (K, n, d) and y, c, mask, sq (K, n).
      alpha: (K, n) current duals. w: (K, d) each block's site model. q: (K,) each block's ``q``.
      budget: (K,) int, coordinate steps to make (``passes * n`` for whole passes; padding slots count).
      stream: () integer, the round's random stream (:func:`round_stream`); unused when ``cyclic``.
    Returns a :class:`LocalUpdate` of (K, ...) arrays.
    """
    K = alpha.shape[0]
    T, n, d, tile = rows.X.shape
    # The per-block arrays stay in their (K, ...) layout; each tile's share is cut out and turned to the pass's
    # layout inside the loop, where it is small (turning the whole (K, n) duals in and out of the tiled layout
    # took about a fifth of a round at 10^5 sites).
    starts = tile_starts(K, tile)
    cut = lambda a, t: jax.lax.dynamic_slice_in_dim(a, starts[t], tile, 0)

    def one_tile(t, out):
        alpha_out, dv_out, steps_out, conj_out = out
        part = _local_tile(rows, t, cut(alpha, t).T, cut(w, t).T, cut(q, t), cut(budget, t),
                           stream=stream, loss=loss, cyclic=cyclic)
        put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, starts[t], 0)
        return (put(alpha_out, part.alpha.T), put(dv_out, part.dv.T), put(steps_out, part.steps),
                put(conj_out, part.conj))

    out = (alpha, jnp.zeros_like(w), jnp.zeros(budget.shape, jnp.int32), jnp.zeros(budget.shape, alpha.dtype))
    return LocalUpdate(*(one_tile(0, out) if T == 1 else jax.lax.fori_loop(0, T, one_tile, out)))


def _local_tile(rows: BlockedRows, t, alpha, w, q, budget, *, stream, loss: Loss, cyclic: bool) -> LocalUpdate:
    """:func:`local_sdca` on tile ``t`` of ``rows``: alpha (n, tile); w (d, tile); q, budget (tile,)."""
    _, n, d, _ = rows.X.shape
    passes = jnp.max((budget + n - 1) // n)

    def one_pass(p, carry):
        alpha, dv, steps = carry
        order = jnp.arange(n) if cyclic else visiting_order(stream, p, n)

        def step(dv, s):
            i = order[s]
            x, ai = rows.X[t, i], alpha[i]
            a_w, a_dv = w[0] * x[0], dv[0] * x[0]
            for k in range(1, d):
                a_w, a_dv = a_w + w[k] * x[k], a_dv + dv[k] * x[k]
            a = a_w + q * a_dv
            new = loss.dual_step(ai, rows.y[t, i], rows.c[t, i], a, q * rows.sq[t, i])
            live = (p * n + s < budget) & (rows.mask[t, i] > 0)
            delta = jnp.where(live, new - ai, 0.0)
            return dv + delta * x, delta

        dv, deltas = jax.lax.scan(step, dv, jnp.arange(n))
        live = (p * n + jnp.arange(n)[:, None] < budget) & (rows.mask[t][order] > 0)
        return alpha.at[order].add(deltas), dv, steps + jnp.sum(live, axis=0, dtype=jnp.int32)

    carry = (alpha, jnp.zeros_like(w), jnp.zeros(budget.shape, jnp.int32))
    alpha, dv, steps = jax.lax.fori_loop(0, passes, one_pass, carry)
    # The certificate's dual loss terms, here where the tile's duals and rows are at hand (a separate sum over all
    # the duals after the pass read them again).
    conj = jnp.sum(jnp.where(rows.mask[t] > 0, loss.dual_term(alpha, rows.y[t], rows.c[t]), 0.0), axis=0)
    return LocalUpdate(alpha, dv, steps, conj)


#: Block sizes up to which a pass's order is a random affine permutation (``a i + b mod n``, 32-bit exact);
#: above it, the argsort of random bits.
AFFINE_ORDER_MAX_N = 1 << 16


def _units(n: int) -> np.ndarray:
    """The multipliers ``a`` in [1, n) with ``gcd(a, n) = 1`` (``[1]`` for n <= 2): each makes ``a i + b mod n`` a permutation."""
    return np.array([a for a in range(1, n) if math.gcd(a, n) == 1] or [1], np.uint32)


def visiting_order(stream, p, n: int):
    """(n,) the slots in the order pass ``p`` visits them, shared by all blocks: a random permutation per pass.

    For ``n <= AFFINE_ORDER_MAX_N`` a random affine permutation ``i -> (a i + b) mod n`` (``a`` a random unit
    mod n, ``b`` a random shift; both from :func:`counter_bits` of ``(stream, p)``): it costs nothing next to
    the pass and gives a fresh order in every pass. Beyond that size, the argsort of random bits (a uniform
    permutation).
    """
    if n > AFFINE_ORDER_MAX_N:
        return jnp.argsort(counter_bits(stream, p, jnp.arange(n)))
    units = jnp.asarray(_units(n))
    a = units[counter_bits(stream, p, 0) % jnp.uint32(units.shape[0])]
    b = counter_bits(stream, p, 1) % jnp.uint32(n)
    i = jnp.arange(n, dtype=jnp.uint32)
    return ((a * i + b) % jnp.uint32(n)).astype(jnp.int32)


def site_draws(stream, systems: Systems, n_max, site_ids=None):
    """The round's random systems draws per site: (budget in coordinate steps (m,), participates (m,) bool).

    Three uniforms per site (effort fraction, straggling, dropout) from :func:`counter_bits` of
    ``(stream, site id, j)``: a site's draws depend on its global id only.
    """
    m = systems.passes.shape[0]
    ids = jnp.arange(m) if site_ids is None else site_ids
    u = uniform(counter_bits(stream, ids[:, None], jnp.arange(3)[None, :]), systems.min_effort.dtype)
    effort = systems.min_effort + (1.0 - systems.min_effort) * u[:, 0]
    effort = jnp.where(u[:, 1] < systems.straggler_prob, effort * systems.straggler_effort, effort)
    participates = u[:, 2] >= systems.dropout_prob
    budget = jnp.round(effort * systems.passes * n_max).astype(jnp.int32)
    return budget, participates


# --- random streams ------------------------------------------------------------------------------------

def _hash32(x):
    """lowbias32 (C. Wellons' integer hash prospector): a bijective 32-bit mixer, elementwise on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def counter_bits(*counters):
    """32 random bits from integer counters (broadcast together): ``h <- hash(h + golden * (c + 1))`` in turn.

    A counter-based generator (as in Salmon et al., SC 2011, with a cheaper mixer than Threefry): every
    draw is a pure function of its indices (seed, round, stream, site, pass, slot), so the draws do not
    depend on batching or on how sites are spread over devices, and the program needs no PRNG kernel
    (Threefry's unrolled rounds were a large part of the round's compile time). Not cryptographic;
    ample for shuffling coordinates and simulating stragglers.
    """
    h = jnp.zeros((), jnp.uint32)
    for c in counters:
        h = _hash32(h + jnp.uint32(0x9E3779B9) * (jnp.asarray(c).astype(jnp.uint32) + jnp.uint32(1)))
    return h


def uniform(bits, dtype):
    """Uniform numbers in [0, 1) from 32 random bits (24 of them: exact in float32 and float64)."""
    return (bits >> 8).astype(dtype) * jnp.asarray(2.0**-24, dtype)


def round_stream(seed, round_, purpose):
    """The random stream of one round and purpose (0: systems draws, 1: coordinate orders)."""
    return counter_bits(seed, round_, purpose)


# --- q_t rules -----------------------------------------------------------------------------------------

def _row_abs_sums(M: SpectralMatrix, block: int = 256):
    """``sum_t' |M_tt'|`` per row of a factored M, O(m^2 r) time in row blocks (never an m x m array)."""
    m = M.U.shape[0]
    pad = (-m) % block
    U = jnp.pad(M.U, ((0, pad), (0, 0)))
    rows = jnp.arange(m + pad).reshape(-1, block)
    scaled = M.U * (M.a - M.b)

    def one(idx):
        B = U[idx] @ scaled.T                                  # (block, m) = rows of U diag(a-b) U^T
        B = B + M.b * (idx[:, None] == jnp.arange(m)[None, :])
        return jnp.sum(jnp.abs(B), axis=1)

    return jax.lax.map(one, rows).reshape(-1)[:m]


def q_values(sigma: SpectralMatrix, rule: str):
    """Per-site ``q_t`` (m,) for ``Sigma`` (factored) by one of :data:`Q_RULES` (``"auto"`` resolved first)."""
    m = sigma.U.shape[0]
    if rule == "lambda_max":
        return jnp.full((m,), sigma.max_eigenvalue())
    if rule == "factored":
        d = sigma.a - sigma.b
        return jnp.abs(sigma.b) + jnp.abs(sigma.U) @ (jnp.abs(d) * jnp.sum(jnp.abs(sigma.U), axis=0))
    rows = _row_abs_sums(sigma)
    if rule == "gershgorin":
        return rows
    if rule == "paper":
        diag = sigma.b + jnp.sum(sigma.U**2 * (sigma.a - sigma.b), axis=1)
        safe = jnp.maximum(diag, jnp.finfo(diag.dtype).tiny)
        return jnp.max(rows / safe) * diag
    raise ValueError(f"q: must be one of {Q_RULES}, got {rule!r}")


# --- certificates ----------------------------------------------------------------------------------------

def server_map(V, omega, params: Params, *, scheme: str):
    """``W`` from ``V``: ``grad R*(V)`` of the squared trace norm (joint) or ``Sigma V`` (alternating).

    Returns ``(W, R*(V), R(W))`` of the scheme's regulariser; ``R(W) = R*(V) = <V, Sigma V>/2`` for
    the alternating one (the stable form: never a difference of large terms).
    """
    if scheme == "joint":
        return TraceNormSq(params.lam1, params.lam2).conjugate(V)
    return SigmaQuadratic(omega, params.lam1, params.lam2).conjugate(V)


def certify(alpha, V, W, reg_conj, reg_at_W, sites, params: Params, *, loss: Loss, scheme: str, conj=None):
    """(J(W), gap of J, the scheme's primal, dual, W-problem gap). The sites' two scalars are the sums here.

    The dual point ``alpha`` is feasible for J's dual in both schemes, so ``J(W) - D_J(alpha)`` bounds
    ``J(W) - min J`` whatever Omega the alternating scheme is at. ``conj``: ``dual_terms(alpha, sites, loss)``
    when the caller has it (the local pass sums it per block).
    """
    conj = dual_terms(alpha, sites, loss) if conj is None else conj
    emp = empirical_loss(W, sites, loss)
    primal = emp + reg_at_W
    dual = conj - reg_conj
    if scheme == "joint":
        return primal, primal - dual, primal, dual, jnp.full((), jnp.nan, primal.dtype)
    trace = TraceNormSq(params.lam1, params.lam2)
    J = emp + trace.value(W)
    dual_J = conj - trace.conjugate(V)[1]
    gap_w = emp - conj + jnp.sum(V * W)  # P - D at W = Sigma V, without the cancelling regulariser terms
    return J, J - dual_J, primal, dual, gap_w


# --- the round ---------------------------------------------------------------------------------------

def sites_rows(sites: Sites, mesh=None) -> BlockedRows:
    """:func:`block_rows` of the sites' blocks; with a mesh, each device lays out its own blocks (tiles never
    straddle devices, so the tiles' leading axis splits over the mesh like the blocks do)."""
    def lay(X, y, c, mask):
        return block_rows(X, y, c, mask)

    return distributed.map_blocks(lay, mesh, 4)(sites.X, sites.y, sample_weights(sites), sites.mask)


def _chunks_per_site(sites: Sites):
    if sites.site is None:
        return jnp.ones((sites.num_sites,), sites.X.dtype)
    return site_sums(jnp.ones((sites.num_blocks,), sites.X.dtype), sites)


def pad_factors(omega: SpectralMatrix, width: int) -> SpectralMatrix:
    """``omega`` with zero columns appended to ``U`` (eigenvalue ``b`` on them): the same matrix, ``width`` columns.

    The state's Omega keeps one shape for the whole run (a ``lax.cond`` between "keep" and "new Omega"
    needs it), while a given ``omega0`` may have more columns than an Omega-step's ``min(m, d)``.
    A zero column with eigenvalue ``b`` adds nothing to ``apply``, ``map``, ``trace``, ``max_eigenvalue``
    or the q_t rules.
    """
    extra = width - omega.U.shape[1]
    if extra <= 0:
        return omega
    U = jnp.pad(omega.U, ((0, 0), (0, extra)))
    return SpectralMatrix(U, jnp.concatenate([omega.a, jnp.broadcast_to(omega.b, (extra,))]), omega.b)


def real_sites(sites: Sites):
    """(m,) bool: the sites that hold data (a real site has at least one sample; empty ones pad a device split)."""
    return sites.counts > 0


def _omega_q(W, params: Params, num_tasks, *, scheme: str, q_rule: str, width: int = 0):
    """The Omega-step from ``W`` (factored, at least ``width`` columns) and the q_t of its Sigma."""
    omega = pad_factors(omega_factored(W, params.eps, num_tasks), width)
    if scheme == "joint":
        return omega, jnp.full((W.shape[0],), 1.0 / params.lam1, W.dtype)
    sigma = SigmaQuadratic(omega, params.lam1, params.lam2).sigma
    return omega, q_values(sigma, q_rule).astype(W.dtype)


def init_state(sites: Sites, params: Params, alpha0, seed, omega0=None, *, loss: str, scheme: str, q_rule: str):
    """The state before the first round: ``V = X^T alpha0``, ``W`` its map, certificates, ``q``.

    ``omega0`` (factored) is the alternating scheme's first Omega (default: the Omega-step of W = 0, I / m).
    """
    loss_ = get_loss(loss)
    dtype = sites.X.dtype
    m, d = sites.num_sites, sites.dim
    if scheme == "alternating" and omega0 is not None:
        omega = pad_factors(omega0, min(m, d))
        q = q_values(SigmaQuadratic(omega, params.lam1, params.lam2).sigma, q_rule).astype(dtype)
    else:
        omega, q = _omega_q(jnp.zeros((m, d), dtype), params, jnp.sum(real_sites(sites)), scheme=scheme,
                            q_rule=q_rule)
    V = feature_sums(alpha0, sites)
    W, reg_conj, reg_at_W = server_map(V, omega, params, scheme=scheme)
    J, gap, primal, dual, gap_w = certify(alpha0, V, W, reg_conj, reg_at_W, sites, params, loss=loss_, scheme=scheme)
    zero = jnp.zeros((), jnp.int32)
    seed = jnp.asarray(seed).astype(jnp.uint32)
    return DMTRLState(alpha0, V, W, omega, q, seed, zero, zero, J, gap, primal, dual, gap_w, jnp.zeros((), dtype))


def round_step(state: DMTRLState, sites: Sites, params: Params, systems: Systems, *, loss: str, scheme: str,
               q_rule: str, order: str = "random", mesh=None, rows: BlockedRows | None = None):
    """One communication round; returns ``(new state, RoundStats)``. jit-able.

    The sites' part (:func:`local_sdca`) works on all blocks at once; with a ``mesh`` (static; see
    :mod:`mtl_jax.distributed`) it runs under ``shard_map``, each device on its own blocks, and the
    server's sums over sites become all-reduces. ``rows``: the data in the local pass's layout
    (:func:`sites_rows`), when the caller made it once for many rounds (it costs a copy of the data).

    Alternating scheme: an Omega-step (from the W of the last round) begins the round when it is due
    (``omega_every`` rounds since the last, or the W-problem's relative gap at most ``omega_tol``).
    """
    loss_ = get_loss(loss)
    dtype = sites.X.dtype
    d = sites.dim
    omega, q, W, since = state.omega, state.q, state.W, state.since_omega
    omega_step = jnp.zeros((), bool)
    if scheme == "alternating":
        omega_step = (since >= params.omega_every) | (
            (params.omega_tol >= 0) & (state.gap_w <= params.omega_tol * jnp.abs(state.primal)))

        def new_omega(_):
            om, qq = _omega_q(state.W, params, jnp.sum(real_sites(sites)), scheme=scheme, q_rule=q_rule,
                              width=omega.U.shape[1])
            return om, qq, server_map(state.V, om, params, scheme=scheme)[0]

        omega, q, W = jax.lax.cond(omega_step, new_omega, lambda _: (omega, q, W), None)
        since = jnp.where(omega_step, 0, since)

    k_sys, k_order = round_stream(state.seed, state.round, 0), round_stream(state.seed, state.round, 1)
    budget_site, participates = site_draws(k_sys, systems, sites.n_max)
    chunks = _chunks_per_site(sites)
    rows = sites_rows(sites, mesh) if rows is None else rows

    def local_part(rows, alpha, w, q, budget, stream):
        return local_sdca(rows, alpha, w, q, budget, stream, loss=loss_, cyclic=order == "cyclic")

    # A site that sits the round out gets no budget: its duals stay as they were and its change is exactly 0.
    budget_live = jnp.where(participates, budget_site, 0)
    local = distributed.map_blocks(local_part, mesh, 5)(
        rows, state.alpha, per_block(W, sites), per_block(q * chunks, sites), per_block(budget_live, sites), k_order)
    alpha = local.alpha
    V = state.V + site_sums(local.dv, sites)
    W_new, reg_conj, reg_at_W = server_map(V, omega, params, scheme=scheme)
    # The certificate's margins from the (K, n, d) rows: XLA:CPU's batched dot reads them ~6x faster than the
    # pass's layout does (measured 2026-12-01, 50,000 sites: 0.06 s vs 0.36 s). Its dual loss terms come from the
    # pass (LocalUpdate.conj).
    J, gap, primal, dual, gap_w = certify(alpha, V, W_new, reg_conj, reg_at_W, sites, params, loss=loss_,
                                          scheme=scheme, conj=jnp.sum(local.conj))

    steps = site_sums(local.steps.astype(dtype), sites)
    participates = participates & real_sites(sites)
    live = participates.astype(dtype)
    participants = jnp.sum(participates, dtype=jnp.int32)
    passes = jnp.sum(live * steps / jnp.maximum(sites.counts, 1)) / jnp.maximum(participants, 1)
    itemsize = jnp.dtype(dtype).itemsize
    up = (d + 2) * itemsize
    down = (d + omega_step.astype(dtype)) * itemsize
    site_seconds = steps / systems.speed + systems.latency + up / systems.bandwidth
    seconds = jnp.max(jnp.where(participates, site_seconds, 0.0)) + systems.latency + down / systems.bandwidth
    sim = state.sim_seconds + seconds
    new = DMTRLState(alpha, V, W_new, omega, q, state.seed, state.round + 1, since + 1, J, gap, primal, dual,
                     gap_w, sim)
    return new, RoundStats(J, gap, primal, dual, gap_w, participants, passes, omega_step, sim)


def converged(state: DMTRLState, params: Params, fixed_omega):
    """J's relative gap at most ``tol``; with a fixed Omega (alternating), the W-problem's instead."""
    on_j = state.gap <= params.tol * jnp.abs(state.objective)
    on_w = state.gap_w <= params.tol * jnp.abs(state.primal)
    return jnp.where(fixed_omega, on_w, on_j)


class RunOutput(NamedTuple):
    """A chunk of rounds run as one program: the state after it and the per-round stats (first ``rounds`` rows)."""

    state: DMTRLState
    stats: RoundStats   # each field (history_size,)
    rounds: jax.Array   # () rounds run in this chunk
    converged: jax.Array


register_exportable(Systems, Params, DMTRLState, RoundStats, RunOutput, BlockedRows)


@partial(jax.jit, static_argnames=("loss", "scheme", "q_rule", "order", "history_size", "mesh"))
def run_rounds(state: DMTRLState, sites: Sites, params: Params, systems: Systems, max_rounds, fixed_omega,
               rows: BlockedRows | None = None, *, loss: str, scheme: str, q_rule: str, order: str,
               history_size: int, mesh=None) -> RunOutput:
    """Rounds from ``state`` until the certificate reaches ``tol`` or ``max_rounds`` (traced) more are done.

    One ``lax.while_loop``: a chunk of rounds is one compiled program, whatever its length. ``rows``: the
    data in the local pass's layout (:func:`sites_rows`, :data:`layout_program`), made once per solve by the
    driver (default: made here, once per call).
    """
    dtype = sites.X.dtype
    nan = jnp.full((history_size,), jnp.nan, dtype)
    empty = RoundStats(nan, nan, nan, nan, nan, jnp.zeros((history_size,), jnp.int32), nan,
                       jnp.zeros((history_size,), bool), nan)

    rows = sites_rows(sites, mesh) if rows is None else rows  # once for all the rounds

    def cond(carry):
        s, _, k = carry
        return (k < max_rounds) & ~converged(s, params, fixed_omega)

    def body(carry):
        s, buf, k = carry
        s, stats = round_step(s, sites, params, systems, loss=loss, scheme=scheme, q_rule=q_rule, order=order,
                              mesh=mesh, rows=rows)
        buf = jax.tree_util.tree_map(lambda b, v: b.at[jnp.minimum(k, history_size - 1)].set(v), buf, stats)
        return s, buf, k + 1

    state, buf, k = jax.lax.while_loop(cond, body, (state, empty, jnp.zeros((), jnp.int32)))
    return RunOutput(state, buf, k, converged(state, params, fixed_omega))


init_program = jax.jit(init_state, static_argnames=("loss", "scheme", "q_rule"))
#: :func:`sites_rows` compiled: the driver lays the data out once per solve (a copy of X; at 10^5 sites about
#: as long as two rounds), not once per chunk of rounds.
layout_program = jax.jit(sites_rows, static_argnames=("mesh",))


# --- the host-side driver ----------------------------------------------------------------------------------

def _per_site(name, value, m, dtype, *, low, integer=False):
    """A scalar or an (m,) array of per-site values as an (m,) NumPy array; ValueError naming ``name``."""
    arr = np.asarray(value)
    if arr.dtype == bool or arr.dtype.kind not in "iuf" or arr.ndim > 1 or (arr.ndim == 1 and arr.shape != (m,)):
        raise ValueError(f"{name}: must be a number or an array of {m} numbers (one per site), got {value!r}")
    if not np.all(np.isfinite(arr)) or np.any(arr < low) or (integer and np.any(arr != np.round(arr))):
        kind = "integers" if integer else "finite numbers"
        raise ValueError(f"{name}: must be {kind} >= {low}, got {value!r}")
    return np.broadcast_to(arr, (m,)).astype(dtype)


def _probability(name, value, *, high_open=False):
    v = check_real(name, value)
    if v > 1 or (high_open and v >= 1):
        raise ValueError(f"{name}: must be a probability in [0, {'1)' if high_open else '1]'}, got {value!r}")
    return v


def check_dmtrl_options(options: dict, m: int) -> dict:
    """Validate :data:`OPTIONS` for ``m`` sites; returns them with defaults filled in (ValueError naming the option)."""
    check_options(options, OPTIONS, "solver_options")
    o = dict(options)
    scheme = o.setdefault("scheme", "joint")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: must be one of {SCHEMES}, got {scheme!r}")
    q = o.setdefault("q", "auto")
    if q not in Q_RULES:
        raise ValueError(f"q: must be one of {Q_RULES}, got {q!r}")
    if scheme == "joint" and q != "auto":
        raise ValueError(f"q: the joint scheme uses q_t = 1/lam1 (the only safe constant there); q={q!r} applies "
                         "to scheme='alternating'")
    order = o.setdefault("order", "random")
    if order not in ORDERS:
        raise ValueError(f"order: must be one of {ORDERS}, got {order!r}")
    passes = o.setdefault("local_passes", 1)
    if np.ndim(passes) == 0:
        check_int("local_passes", passes, low=1, high=2**20)
    o["local_passes"] = _per_site("local_passes", passes, m, np.int32, low=0, integer=True)
    every = o.setdefault("omega_every", 10)
    o["omega_every"] = _NEVER if every is None else check_int("omega_every", every, low=1, high=_NEVER)
    otol = o.setdefault("omega_tol", 1e-3)
    o["omega_tol"] = -1.0 if otol is None else check_real("omega_tol", otol)
    o["seed"] = check_int("seed", o.setdefault("seed", 0), low=0, high=2**32)
    o["min_effort"] = _probability("min_effort", o.setdefault("min_effort", 1.0))
    o["straggler_prob"] = _probability("straggler_prob", o.setdefault("straggler_prob", 0.0))
    o["straggler_effort"] = _probability("straggler_effort", o.setdefault("straggler_effort", 0.25))
    o["dropout_prob"] = _probability("dropout_prob", o.setdefault("dropout_prob", 0.0), high_open=True)
    o["speed"] = _per_site("speed", o.setdefault("speed", DEFAULT_SPEED), m, np.float64, low=0)
    if np.any(o["speed"] <= 0):
        raise ValueError("speed: must be > 0 (coordinate steps per second at each site)")
    o["latency"] = check_real("latency", o.setdefault("latency", DEFAULT_LATENCY))
    o["bandwidth"] = check_real("bandwidth", o.setdefault("bandwidth", DEFAULT_BANDWIDTH), strict=True)
    o.setdefault("omega0", None)
    devices = o.setdefault("devices", None)
    if devices is not None and not (isinstance(devices, (int, np.integer)) and not isinstance(devices, bool)):
        raise ValueError(f"devices: must be None (all local devices) or a number of devices, got {devices!r}")
    o["mesh"] = distributed.site_mesh(devices)
    o["checkpoint"], o["checkpoint_every"] = check_checkpoint(o.get("checkpoint"), o.get("checkpoint_every"),
                                                              default=100)
    return o


def _as_omega(omega0, m, dtype):
    if omega0 is None:
        return None
    if isinstance(omega0, SpectralMatrix):
        om = SpectralMatrix(*(jnp.asarray(x, dtype) for x in omega0))
        if om.U.ndim != 2 or om.U.shape[0] != m:
            raise ValueError(f"omega0: U must have {m} rows (one per task), got shape {om.U.shape}")
        return om
    M = check_square_matrix("omega0", omega0)
    if M.shape != (m, m):
        raise ValueError(f"omega0: must be ({m}, {m}), got {M.shape}")
    if not np.allclose(M, M.T, atol=1e-12 * max(1.0, np.abs(M).max())):
        raise ValueError("omega0: must be symmetric")
    if np.linalg.eigvalsh(0.5 * (M + M.T)).min() <= 0:
        raise ValueError("omega0: must be positive definite")
    return as_spectral(jnp.asarray(M, dtype))


#: Rounds per compiled chunk when a progress callback is given (the callback is called after each chunk).
PROGRESS_EVERY = 50


def solve(sites: Sites, *, lam1, lam2, loss="squared", tol=1e-6, max_iter=None, W0=None, alpha0=None,
          eps=DEFAULT_EPS, progress=None, **options) -> SolveOutput:
    """Run DMTRL on ``sites`` (validated) until J's relative gap is at most ``tol`` or ``max_iter`` rounds.

    Args:
      lam1, lam2, loss, tol, eps: as for the centralized solver; traced.
      max_iter: communication rounds (default 2000).
      W0: (m, d) a primal warm start; the duals start at ``alpha = -c loss'(<w_t, x>)`` (feasible).
      alpha0: (K, n_max) a dual warm start (it wins over W0).
      **options: :data:`OPTIONS` (validated by :func:`check_dmtrl_options`): ``scheme`` ("joint" or
        "alternating"), ``local_passes`` (an int >= 1, or one int >= 0 per site), ``q`` (a rule of
        :data:`Q_RULES`, alternating only), ``omega_every`` (rounds between Omega-steps, None: never),
        ``omega_tol`` (the W-problem's relative gap that triggers one, None: never), ``omega0`` (the
        first Omega, dense (m, m) or factored; with ``omega_every=None, omega_tol=None`` it stays fixed and the
        run stops on the W-problem's gap), ``order`` ("random" or "cyclic"), ``seed``, and the systems
        model: ``min_effort``, ``straggler_prob``, ``straggler_effort``, ``dropout_prob``, ``speed``,
        ``latency``, ``bandwidth`` (:class:`Systems`); ``devices`` (None: all local devices, or a count;
        :mod:`mtl_jax.distributed`); ``checkpoint`` (a .npz path: the run goes in chunks of
        ``checkpoint_every`` rounds (default 100), the state and history are saved atomically after each,
        and a run started with an existing checkpoint of the same problem continues from it, ending
        with exactly the numbers of an uninterrupted run).
      progress: ``None`` or a callable ``progress(record, max_rounds)`` called with the last
        :class:`~mtl_jax.solvers.base.RoundRecord` after every chunk of rounds (chunks of
        :data:`PROGRESS_EVERY` rounds, or ``checkpoint_every`` with a checkpoint: the same compiled program,
        and the same numbers as one chunk; :mod:`mtl_jax.runner.progress` draws a bar from it).

    Returns a :class:`~mtl_jax.solvers.base.SolveOutput` whose history holds
    :class:`~mtl_jax.solvers.base.RoundRecord` rows (round 0 is the starting point).
    """
    m, d = sites.num_sites, sites.dim
    o = check_dmtrl_options(options, m)
    loss_ = get_loss(loss)
    dtype = sites.X.dtype
    scheme = o["scheme"]
    q_rule = AUTO_Q_RULE if o["q"] == "auto" else o["q"]
    max_rounds = DEFAULT_MAX_ROUNDS if max_iter is None else int(max_iter)
    params = Params(*(jnp.asarray(v, dtype) for v in (lam1, lam2, tol, eps)),
                    jnp.asarray(o["omega_every"], jnp.int32), jnp.asarray(o["omega_tol"], dtype))
    systems = Systems(jnp.asarray(o["local_passes"], jnp.int32),
                      *(jnp.asarray(o[k], dtype) for k in ("min_effort", "straggler_prob", "straggler_effort",
                                                             "dropout_prob", "speed", "latency", "bandwidth")))
    mesh = o["mesh"] if o["mesh"].devices.size > 1 else None
    placed = mesh is not None and distributed.is_spread(sites, mesh)  # by the caller (process_sites)
    if placed and alpha0 is not None and (not isinstance(alpha0, jax.Array) or alpha0.shape != sites.y.shape):
        raise ValueError("alpha0: for sites placed by process_sites, an array laid out like sites.y "
                         "(mtl_jax.distributed.process_rows)")
    if alpha0 is not None:
        alpha0 = jnp.asarray(alpha0, dtype)
    elif W0 is not None:
        if placed:  # every process has all of W0 (small): padded with the empty sites' zero rows, replicated
            W0 = np.asarray(W0, dtype)
            if W0.ndim != 2 or W0.shape[0] > sites.num_sites or W0.shape[1] != d:
                raise ValueError(f"W0: must have shape (m, {d}) for the m real sites, got {W0.shape}")
            W0 = np.concatenate([W0, np.zeros((sites.num_sites - W0.shape[0],) + W0.shape[1:], dtype)])
            W0 = jax.device_put(W0, jax.sharding.NamedSharding(o["mesh"], jax.sharding.PartitionSpec()))
        W0 = jnp.asarray(W0, dtype)
        alpha0 = loss_.primal_to_dual(sites.y, margins(W0, sites), sample_weights(sites)) * sites.mask
    else:
        alpha0 = jnp.zeros_like(sites.y) if placed else jnp.zeros(sites.y.shape, dtype)
    omega0 = _as_omega(o["omega0"], m, dtype)
    fixed = scheme == "alternating" and o["omega_every"] == _NEVER and o["omega_tol"] < 0
    seed = jnp.asarray(o["seed"], jnp.uint32)
    K = sites.num_blocks
    path = o["checkpoint"]
    fingerprint = None if path is None else _fingerprint(sites, params, systems, o, loss_.name, q_rule)
    if placed:  # count the real sites
        m = int(np.sum(distributed.to_host(sites.counts) > 0))
        K = m if sites.site is None else K
    elif mesh is not None:  # empty sites for an even split; the per-site arrays grow with them
        sites, systems, alpha0, omega0 = _spread(mesh, sites, systems, alpha0, omega0)

    static = dict(loss=loss_.name, scheme=scheme, q_rule=q_rule)
    init_args = (sites, params, alpha0, seed, omega0)
    init, c_init = compiled(init_program, init_args, static)
    state = init(*init_args)
    chunked = path is not None or progress is not None
    chunk = min(o["checkpoint_every"] if path is not None else max_rounds,
                PROGRESS_EVERY if progress is not None else max_rounds)
    history = [_start_record(state)]
    if path is not None and os.path.exists(path):
        state, history = load_checkpoint(path, state, fingerprint)
    itemsize = np.dtype(dtype).itemsize
    fixed = jnp.asarray(fixed)
    layout, c_run = compiled(layout_program, (sites,), dict(mesh=mesh))
    t0 = time.perf_counter()
    rows = jax.block_until_ready(layout(sites))
    solve_seconds = time.perf_counter() - t0
    done = False
    while True:
        remaining = max_rounds - (len(history) - 1)
        if remaining <= 0 or done:
            break
        args = (state, sites, params, systems, jnp.asarray(min(chunk, remaining), jnp.int32), fixed, rows)
        program, c = compiled(run_rounds, args, dict(static, order=o["order"], mesh=mesh,
                                                     history_size=history_capacity(chunk if chunked else max_rounds)))
        c_run += c
        t1 = time.perf_counter()
        out = jax.block_until_ready(program(*args))
        seconds = time.perf_counter() - t1
        solve_seconds += seconds
        history.extend(_rows(out, history[-1], itemsize=itemsize, m=m, d=d, wall=seconds))
        state = out.state
        done = bool(out.converged) or int(out.rounds) < int(args[4])
        if path is not None:
            save_checkpoint(path, state, history, fingerprint)
        if progress is not None:
            progress(history[-1], max_rounds)
        heartbeat()
    converged_ = bool(converged(state, params, fixed))
    W = distributed.to_host(state.W)[:m]
    alpha = distributed.to_host(state.alpha)[:K]
    return SolveOutput(W, numpy_tree(omega_factored(W, params.eps)), alpha, tuple(history),
                       float(state.objective), float(state.gap), converged_, len(history) - 1, c_init + c_run,
                       solve_seconds)


def _spread(mesh, sites, systems: Systems, alpha0, omega0):
    """Sites padded with empty ones to a multiple of the devices and split over them; per-site inputs padded alike."""
    n = mesh.devices.size
    padded = distributed.pad_sites(sites, n)
    extra = padded.num_sites - sites.num_sites
    grow = lambda a, value: jnp.concatenate([a, jnp.full((extra,) + a.shape[1:], value, a.dtype)])
    if extra:
        systems = systems._replace(passes=grow(systems.passes, 0), speed=grow(systems.speed, 1.0))
        if omega0 is not None:
            omega0 = SpectralMatrix(grow(omega0.U, 0.0), omega0.a, omega0.b)
    alpha0 = jnp.concatenate([alpha0, jnp.zeros((padded.num_blocks - sites.num_blocks,) + alpha0.shape[1:],
                                                alpha0.dtype)])
    return distributed.shard_sites(padded, mesh), systems, distributed.shard_blocks(alpha0, mesh), omega0


def round_bytes(participants: int, omega_step: bool, *, m: int, d: int, itemsize: int) -> tuple[int, int]:
    """(bytes up, bytes down) of one round: ``dv_t`` from each participating site plus every site's two
    certificate scalars; ``w_t`` to every site (and ``q_t`` after an Omega-step)."""
    return itemsize * (participants * d + 2 * m), itemsize * m * (d + int(omega_step))


def _start_record(start: DMTRLState) -> RoundRecord:
    return RoundRecord(int(start.round), float(start.objective), float(start.gap), 0, 0.0, float(start.primal),
                       float(start.dual), float(start.gap_w), 0, 0, 0.0, 0, float(start.sim_seconds))


def _rows(out: RunOutput, last: RoundRecord, *, itemsize, m, d, wall) -> list:
    """History rows of a chunk of rounds, continuing the counts of ``last`` (cumulative bytes and seconds)."""
    n = int(out.rounds)
    cols = {k: np.asarray(v)[:n] for k, v in out.stats._asdict().items()}
    per_round = wall / max(n, 1)
    total_up, total_down = last.bytes_up, last.bytes_down
    rows = []
    for k in range(n):
        up, down = round_bytes(int(cols["participants"][k]), bool(cols["omega_step"][k]), m=m, d=d,
                               itemsize=itemsize)
        total_up, total_down = total_up + up, total_down + down
        rows.append(RoundRecord(last.round + k + 1, float(cols["objective"][k]), float(cols["gap"][k]),
                                total_up + total_down, last.seconds + per_round * (k + 1), float(cols["primal"][k]),
                                float(cols["dual"][k]), float(cols["gap_w"][k]), total_up, total_down,
                                float(cols["passes"][k]), int(cols["participants"][k]),
                                float(cols["sim_seconds"][k])))
    return rows


# --- checkpoints -----------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "mtl_jax.dmtrl_checkpoint/1"


def _fingerprint(sites, params: Params, systems: Systems, options: dict, loss: str, q_rule: str) -> str:
    """What must match for a checkpoint to continue a run: the data, the hyper-parameters, the options."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves((sites, params, systems)):
        h.update(repr((leaf.shape, str(leaf.dtype))).encode())
        if getattr(leaf, "is_fully_addressable", True):  # data spread over processes: shapes and counts only
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    keep = {k: v for k, v in options.items() if k not in ("checkpoint", "checkpoint_every", "mesh", "omega0",
                                                        "devices")}
    h.update(repr(sorted((k, repr(v)) for k, v in keep.items())).encode())
    h.update(repr((loss, q_rule, options.get("omega0") is None)).encode())
    return h.hexdigest()


def save_checkpoint(path, state: DMTRLState, history, fingerprint: str) -> None:
    """Write the state after a chunk of rounds and the history so far to ``path`` (.npz), atomically.

    A kill at any moment leaves the previous checkpoint or the new one, never a torn file
    (:func:`mtl_jax.solvers.base.write_checkpoint`). Arrays only: read back without pickle.
    """
    from mtl_jax.solvers.base import named_arrays, write_checkpoint
    arrays = {k: distributed.to_host(v) for k, v in named_arrays(state, "state").items()}
    if not distributed.is_writer():  # every process gathers (a collective); process 0 writes
        return
    write_checkpoint(path, arrays, history, format=CHECKPOINT_FORMAT, fingerprint=fingerprint)


def load_checkpoint(path, like: DMTRLState, fingerprint: str):
    """The state and history saved at ``path``, placed like ``like`` (shapes, dtypes, devices).

    Raises ValueError naming ``checkpoint`` and saying why when the file is not a DMTRL checkpoint of
    this problem (another format, other data, other hyper-parameters or options, other shapes).
    """
    from mtl_jax.solvers.base import read_checkpoint, restored
    saved = read_checkpoint(path, format=CHECKPOINT_FORMAT, fingerprint=fingerprint, what="a DMTRL checkpoint",
                            differs="data, lam1, lam2, loss, scheme or systems model")
    state = restored(saved, like, "state", path)
    rows = saved["history"]
    types = [type(x) for x in RoundRecord(0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0.0, 0, 0.0)]
    history = [RoundRecord(*(t(v) for t, v in zip(types, row))) for row in rows]
    return state, history



#: The optimistix-style name of the whole solve (``init_state``, ``round_step``, ``run``).
run = solve
