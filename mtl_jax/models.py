"""Multi-task networks (flax.linen): a shared trunk and one head per task, optionally MTRL-coupled heads.

Parameter layout (the functions below rely on these names):

    params["shared_<i>"]        trunk layers (Dense for the MLP, Conv for the CNN)
    params[SHARED_LAST]         the last shared layer, a Dense: its kernel is where GradNorm measures
                                per-task gradient norms
    params["heads"]["kernel"]   (K, p, max_out) final layers of the K heads, stacked (bias (K, max_out));
                                head k uses kernel[k][:, :out_dims[k]]
    params["heads"]["hidden_<j>_kernel"]   optional hidden head layers, stacked the same way

MTRL-coupled heads (Zhang and Yeung, UAI 2010, inside a deep model): the final-layer kernels of the
K heads, flattened, are the rows of ``H`` (K, p * out) and the training loss gains

    R(H, Omega) = (lam1 / 2) ||H||_F^2 + (lam2 / 2) tr(H^T Omega^{-1} H),

with ``Omega`` (K, K) held in the training state (no gradient flows into it) and refreshed in closed
form, ``Omega = (H H^T)^{1/2} / tr((H H^T)^{1/2})`` (:func:`mtl_jax.mtrl.omega_update`), every
``every`` steps (the Omega-step of ``docs/mathematics.md``, section 2; its use in training:
``docs/weighting.md``, section 3). Head biases are not regularised.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.mtrl import SigmaQuadratic, as_spectral, omega_update
from mtl_jax.validation import check_int, check_real

SHARED_LAST = "shared_last"
HEADS = "heads"

Params = Any  # the inner flax params dict (variables["params"])


# ----------------------------------------------------------------------------- modules


def _padded_init(init: Callable, out_dims: tuple[int, ...]) -> Callable:
    """``init`` for a stacked (K, p, max_out) kernel, with the columns beyond task k's out_dims[k] zeroed
    (they never reach an output, so they get no gradient and stay zero)."""
    def wrapped(key, shape, dtype=jnp.float32):
        cols = jnp.arange(shape[-1])[None, :] < jnp.asarray(out_dims)[:, None]  # (K, max_out)
        return init(key, shape, dtype) * cols[:, None, :].astype(dtype)

    return wrapped


def _task_out_dims(num_tasks: int, out_dims) -> tuple[int, ...]:
    """``out_dims`` as a tuple with one entry per task (an int is shared by all ``num_tasks`` tasks)."""
    dims = (int(out_dims),) * num_tasks if isinstance(out_dims, int) else tuple(int(d) for d in out_dims)
    if len(dims) != num_tasks:
        raise ValueError(f"out_dims: need one output size per task ({num_tasks}), got {out_dims}")
    return dims


class TaskHeads(nn.Module):
    """K task heads on shared features, with all heads' parameters stacked along a leading task axis.

    (B, p) -> tuple of K arrays (B, out_dims[k]). Parameters: ``kernel`` (K, p', max_out) and ``bias``
    (K, max_out) for the final layer, ``hidden_<j>_kernel`` (K, ., w_j) / ``hidden_<j>_bias`` (K, w_j)
    for optional hidden layers; head k uses slice k (and the first out_dims[k] columns). One batched
    einsum per layer serves all heads, and the final kernel is the MTRL matrix H up to a reshape.
    Initialisation is flax's Dense default (LeCun normal kernels over the fan-in, zero biases), per head.
    """

    out_dims: tuple[int, ...]
    head_hidden: tuple[int, ...] = ()
    activation: Callable = nn.relu
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        num_tasks = len(self.out_dims)
        kernel_init = nn.initializers.lecun_normal(batch_axis=(0,))
        h = features  # (B, p), shared by all heads up to their first layer; then (K, B, w) per head
        for j, width in enumerate(self.head_hidden):
            kernel = self.param(f"hidden_{j}_kernel", kernel_init, (num_tasks, h.shape[-1], width), self.param_dtype)
            bias = self.param(f"hidden_{j}_bias", nn.initializers.zeros, (num_tasks, width), self.param_dtype)
            h = self.activation(_heads_dot(h, kernel) + bias[:, None, :])
        out = max(self.out_dims)
        kernel = self.param(
            "kernel", _padded_init(kernel_init, self.out_dims), (num_tasks, h.shape[-1], out), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (num_tasks, out), self.param_dtype)
        y = _heads_dot(h, kernel) + bias[:, None, :]  # (K, B, max_out)
        # jnp.split rather than K slices y[k]: its gradient is one concatenation of the K cotangents,
        # where K slices' gradients are K zero-padded (K, B, max_out) arrays summed.
        return tuple(part[0, :, :dim] for part, dim in zip(jnp.split(y, num_tasks, axis=0), self.out_dims))


def _heads_dot(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """(K, B, w) outputs of K stacked head layers ``kernel`` (K, p, w) on features ``h``: (B, p) shared by
    all heads, or (K, B, p) one slice per head.

    Shared features are contracted as one (B, p) x (p, K * w) product rather than broadcast to (K, B, p)
    first: the broadcast would be materialised and its gradient summed back over K, and K small batched
    products run far slower than one wide product on a CPU (with seeds vmapped, all the more)."""
    if h.ndim == 2:
        return jnp.einsum("bp,kpw->kbw", h, kernel)
    return jnp.einsum("kbp,kpw->kbw", h, kernel)


class MultiTaskMLP(nn.Module):
    """Shared MLP trunk + one head per task.

    ``x`` (B, ...) is flattened to (B, d); the trunk is Dense(hidden[0]) -> ... -> Dense(hidden[-1])
    (named ``shared_0``, ..., ``shared_last``), each followed by ``activation``; then
    :class:`TaskHeads`. ``out_dims``: one output size per task, or an int shared by the
    ``num_tasks`` tasks (classes of a classification task, outputs of a regression task).
    Returns a tuple of K arrays (B, out_dims[k]) (logits or regression outputs).
    """

    num_tasks: int
    out_dims: int | tuple[int, ...]
    hidden: tuple[int, ...] = (64, 64)
    head_hidden: tuple[int, ...] = ()
    activation: Callable = nn.relu
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            name = SHARED_LAST if i == len(self.hidden) - 1 else f"shared_{i}"
            h = self.activation(nn.Dense(width, param_dtype=self.param_dtype, name=name)(h))
        out_dims = _task_out_dims(self.num_tasks, self.out_dims)
        return TaskHeads(out_dims, self.head_hidden, self.activation, self.param_dtype, name=HEADS)(h)


class MultiTaskCNN(nn.Module):
    """Small shared CNN trunk for small images + one head per task.

    ``x`` (B, H, W) or (B, H, W, C). Trunk: for each entry of ``features`` a 3x3 SAME Conv (``shared_<i>``)
    + activation + 2x2 max-pool (skipped once the map is 1 pixel wide), then flatten and a Dense(hidden)
    ``shared_last`` + activation; then :class:`TaskHeads`. For a 12 x 12 image and ``features=(16, 32)``
    the flattened map is 3 x 3 x 32 = 288. ``out_dims`` as for :class:`MultiTaskMLP`.
    Returns a tuple of K arrays (B, out_dims[k]).
    """

    num_tasks: int
    out_dims: int | tuple[int, ...]
    features: tuple[int, ...] = (16, 32)
    hidden: int = 64
    head_hidden: tuple[int, ...] = ()
    activation: Callable = nn.relu
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x[..., None] if x.ndim == 3 else x
        for i, width in enumerate(self.features):
            conv = nn.Conv(width, (3, 3), padding="SAME", param_dtype=self.param_dtype, name=f"shared_{i}")
            h = self.activation(conv(h))
            if h.shape[1] > 1 and h.shape[2] > 1:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape((h.shape[0], -1))
        h = self.activation(nn.Dense(self.hidden, param_dtype=self.param_dtype, name=SHARED_LAST)(h))
        out_dims = _task_out_dims(self.num_tasks, self.out_dims)
        return TaskHeads(out_dims, self.head_hidden, self.activation, self.param_dtype, name=HEADS)(h)


def bag_mean(embedding: jax.Array, ids: jax.Array) -> jax.Array:
    """(B, e) masked mean of token embeddings: ``embedding`` (V + 1, e), ``ids`` (B, L) integers in 0..V.

    Row b is ``sum_l m_bl embedding[ids_bl] / max(sum_l m_bl, 1)`` with ``m_bl = ids_bl > 0``: padding
    (id 0) is left out, and a row without tokens gives zeros. Padding rows get no gradient."""
    mask = ids > 0
    weights = mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)  # (B, L)
    vectors = jnp.take(embedding, jnp.where(mask, ids, 0), axis=0)  # (B, L, e)
    return jnp.einsum("bl,ble->be", weights.astype(vectors.dtype), vectors)


class _Table(nn.Module):
    """An embedding table ``embedding`` (rows, width), entries N(0, 1) (flax's Embed default)."""

    rows: int
    width: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.normal(stddev=1.0), (self.rows, self.width), self.param_dtype)


class EmbeddingBagMLP(nn.Module):
    """Embedding bag (masked mean of token embeddings) + MLP trunk + one head per task, for text.

    ``x`` (B, L): token ids, 0 = padding (:mod:`mtl_jax.data.text`), as integers or as floats holding
    integers (the training loop casts inputs to its float dtype; they are rounded back, exact below
    2^24). Ids above ``vocab_size`` are folded, ``(id - 1) % vocab_size + 1``; negative ids count as
    padding. Trunk: the embedding table ``shared_embed`` (``embedding`` (vocab_size + 1, embed_dim),
    row 0 never used), :func:`bag_mean` (B, embed_dim), then Dense(hidden[0]) -> ... -> Dense(hidden[-1])
    (``shared_0``, ..., ``shared_last``), each followed by ``activation``; then :class:`TaskHeads`.
    ``out_dims`` as for :class:`MultiTaskMLP`. Returns a tuple of K arrays (B, out_dims[k]).
    """

    num_tasks: int
    out_dims: int | tuple[int, ...]
    vocab_size: int = 2**14
    embed_dim: int = 64
    hidden: tuple[int, ...] = (64,)
    head_hidden: tuple[int, ...] = ()
    activation: Callable = nn.relu
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.ndim != 2:
            raise ValueError(f"x: the embedding bag needs token ids of shape (B, L), got {x.shape}")
        ids = jnp.round(x).astype(jnp.int32) if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.int32)
        ids = jnp.where(ids > 0, (ids - 1) % self.vocab_size + 1, 0)
        embedding = _Table(self.vocab_size + 1, self.embed_dim, self.param_dtype, name="shared_embed")()
        h = bag_mean(embedding, ids)
        for i, width in enumerate(self.hidden):
            name = SHARED_LAST if i == len(self.hidden) - 1 else f"shared_{i}"
            h = self.activation(nn.Dense(width, param_dtype=self.param_dtype, name=name)(h))
        out_dims = _task_out_dims(self.num_tasks, self.out_dims)
        return TaskHeads(out_dims, self.head_hidden, self.activation, self.param_dtype, name=HEADS)(h)


#: The model kinds :func:`make_model` builds.
MODEL_KINDS = ("mlp", "cnn", "embedding_bag")


def make_model(
    kind: str,
    out_dims: Sequence[int],
    *,
    hidden: Sequence[int] = (64, 64),
    features: Sequence[int] = (16, 32),
    head_hidden: Sequence[int] = (),
    param_dtype: Any = jnp.float32,
    vocab_size: int = 2**14,
    embed_dim: int = 64,
) -> nn.Module:
    """Build ``"mlp"`` (:class:`MultiTaskMLP`, trunk widths ``hidden``), ``"cnn"`` (:class:`MultiTaskCNN`,
    conv widths ``features``, dense width ``hidden[-1]``) or ``"embedding_bag"`` (:class:`EmbeddingBagMLP`,
    ``vocab_size`` token ids (the tokenizer's ``num_buckets``, default
    :data:`mtl_jax.data.text.DEFAULT_NUM_BUCKETS` = 2^14), embeddings of width ``embed_dim``, trunk
    widths ``hidden``) with one head per entry of ``out_dims`` (:data:`MODEL_KINDS`)."""
    out_dims = tuple(int(d) for d in out_dims)
    if not out_dims or any(d < 1 for d in out_dims):
        raise ValueError(f"out_dims: need one positive output size per task, got {out_dims}")
    hidden = tuple(int(h) for h in hidden)
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden: need at least one positive width, got {hidden}")
    head_hidden = tuple(int(h) for h in head_hidden)
    if any(h < 1 for h in head_hidden):
        raise ValueError(f"head_hidden: widths must be positive, got {head_hidden}")
    if kind == "mlp":
        return MultiTaskMLP(len(out_dims), out_dims, hidden, head_hidden, param_dtype=param_dtype)
    if kind == "cnn":
        features = tuple(int(f) for f in features)
        if not features or any(f < 1 for f in features):
            raise ValueError(f"features: need at least one positive conv width, got {features}")
        return MultiTaskCNN(len(out_dims), out_dims, features, hidden[-1], head_hidden, param_dtype=param_dtype)
    if kind == "embedding_bag":
        vocab_size = check_int("vocab_size", vocab_size, low=1)
        embed_dim = check_int("embed_dim", embed_dim, low=1)
        return EmbeddingBagMLP(len(out_dims), out_dims, vocab_size, embed_dim, hidden, head_hidden,
                               param_dtype=param_dtype)
    raise ValueError(f"kind: unknown model {kind!r}; expected one of {MODEL_KINDS}")


# ----------------------------------------------------------------------------- parameter access


def num_heads(params: Params) -> int:
    """K, the number of task heads in ``params``."""
    return params[HEADS]["kernel"].shape[0]


def last_shared_kernel(params: Params) -> jax.Array:
    """The kernel (q, p) of the last shared layer (``shared_last``): GradNorm's reference layer."""
    return params[SHARED_LAST]["kernel"]


def replace_last_shared_kernel(params: Params, kernel: jax.Array) -> Params:
    """A copy of ``params`` with the last shared kernel replaced (pure; for per-task gradients)."""
    return {**params, SHARED_LAST: {**params[SHARED_LAST], "kernel": kernel}}


def head_matrix(params: Params) -> jax.Array:
    """H (K, p * max_out): row k is task k's final head kernel (p, max_out), flattened row-major.

    Meant for heads of equal output size (the MTRL coupling requires it; with unequal sizes the
    zero padding columns would be part of H)."""
    kernel = params[HEADS]["kernel"]
    return kernel.reshape(kernel.shape[0], -1)


# ----------------------------------------------------------------------------- MTRL coupling


class MTRLCoupling(NamedTuple):
    """Settings of the MTRL-coupled heads: R = (lam1/2)||H||^2 + (lam2/2) tr(H^T Omega^{-1} H).

    ``every``: Omega is recomputed from H after every ``every``-th optimiser step. ``eps``: the relative
    eigenvalue floor (a fraction of the mean eigenvalue), used by the Omega update
    (:func:`mtl_jax.mtrl.omega_update`) and by the inverse in :func:`mtrl_regulariser`."""

    lam1: float = 0.0
    lam2: float = 1e-3
    every: int = 10
    eps: float = 1e-8


def validate_coupling(coupling: MTRLCoupling, name: str = "mtrl") -> MTRLCoupling:
    """Check an :class:`MTRLCoupling`: lam1 >= 0, lam2 > 0 and eps > 0 finite numbers, every an integer >= 1.

    Returns it with Python numbers (float, float, int, float), so it hashes and compares by value.
    ``name``: the argument it came in as; a ValueError names the field, e.g. ``mtrl.lam2``."""
    if not isinstance(coupling, MTRLCoupling):
        raise ValueError(f"{name}: must be an MTRLCoupling, got {type(coupling).__name__}")
    return MTRLCoupling(
        lam1=check_real(f"{name}.lam1", coupling.lam1, low=0.0),
        lam2=check_real(f"{name}.lam2", coupling.lam2, low=0.0, strict=True),
        every=check_int(f"{name}.every", coupling.every, low=1),
        eps=check_real(f"{name}.eps", coupling.eps, low=0.0, strict=True),
    )


def mtrl_regulariser(H: jax.Array, omega: jax.Array, lam1: float, lam2: float, eps: float = 1e-8) -> jax.Array:
    """R(H, Omega) = (lam1/2) ||H||_F^2 + (lam2/2) tr(H^T Omega^{-1} H), a scalar.

    H (K, p), Omega (K, K) symmetric PSD. The inverse goes through ``eigh(Omega) = U diag(w) U^T``
    with ``w`` floored at ``f = eps * tr(Omega) / K`` (relative, like :func:`mtl_jax.mtrl.omega_update`):
    tr(H^T Omega^{-1} H) = sum_i ||(U^T H)_i||^2 / max(w_i, f), so a singular Omega gives a large but
    finite penalty. Omega gets no gradient (it is a state, not a
    parameter): the gradient w.r.t. H is lam1 H + lam2 Omega^{-1} H.
    """
    omega = as_spectral(jax.lax.stop_gradient(omega))
    floor = eps * omega.trace() / omega.U.shape[0]
    floored = omega.map(lambda w: jnp.maximum(w, floor))
    return SigmaQuadratic(floored, lam1, lam2).value(H)


def initial_omega(num_tasks: int, dtype=jnp.float32) -> jax.Array:
    """Omega before the first update: I / K (tasks unrelated, trace 1)."""
    return jnp.eye(num_tasks, dtype=dtype) / num_tasks


def refresh_omega(params: Params, omega: jax.Array, step: jax.Array, every: int, eps: float = 1e-8) -> jax.Array:
    """Omega after optimiser step ``step`` (the count of steps taken so far, an int array).

    Returns ``omega_update(head_matrix(params))`` when ``step % every == 0``, else ``omega``. Pure:
    ``lax.cond`` on the traced counter, so it runs inside ``jit``/``scan``/``vmap`` (under a batched
    counter ``vmap`` turns it into a select, still correct).
    """
    return jax.lax.cond(
        step % every == 0,
        lambda: omega_update(head_matrix(params), eps=eps).astype(omega.dtype),
        lambda: omega,
    )
