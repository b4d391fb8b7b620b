"""Multi-task networks and the MTRL-coupled heads, against NumPy/SciPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from mtl_jax import models


def _init(model, x):
    # jitted: one compilation is much faster than dispatching flax's init op by op
    return jax.jit(model.init)(jax.random.key(0), x)["params"]


@pytest.fixture(scope="module")
def mlp():
    """An MLP with two shared layers and hidden head layers, its params and a batch (one compile)."""
    model = models.make_model("mlp", (3, 3, 3), hidden=(8, 5), head_hidden=(4,), param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 2, 5))  # flattened to (6, 10)
    return model, _init(model, x), x


def test_mlp_gives_one_output_per_task(mlp):
    model, params, x = mlp
    outs = jax.jit(model.apply)({"params": params}, x)
    assert [o.shape for o in outs] == [(6, 3)] * 3
    assert models.num_heads(params) == 3
    assert models.last_shared_kernel(params).shape == (8, 5)
    assert set(params) == {"shared_0", models.SHARED_LAST, models.HEADS}
    assert params["heads"]["kernel"].shape == (3, 4, 3)  # (K, head_hidden[-1], max_out)


def test_stacked_heads_are_independent_per_task_mlps(mlp):
    model, params, x = mlp
    # Output k is a plain MLP through head k's slice of the stacked parameters.
    p = jax.tree.map(np.asarray, params)
    h = np.maximum(np.asarray(x).reshape(6, -1) @ p["shared_0"]["kernel"] + p["shared_0"]["bias"], 0)
    h = np.maximum(h @ p["shared_last"]["kernel"] + p["shared_last"]["bias"], 0)
    heads = p["heads"]
    outs = jax.jit(model.apply)({"params": params}, x)
    for k in range(3):
        hid = np.maximum(h @ heads["hidden_0_kernel"][k] + heads["hidden_0_bias"][k], 0)
        np.testing.assert_allclose(outs[k], hid @ heads["kernel"][k] + heads["bias"][k], rtol=1e-12)


def test_head_matrix_is_the_stacked_final_kernels(mlp):
    _, params, _ = mlp
    H = np.asarray(models.head_matrix(params))
    kernel = np.asarray(params["heads"]["kernel"])
    assert H.shape == (3, 4 * 3)
    for k in range(3):
        np.testing.assert_array_equal(H[k], kernel[k].reshape(-1))


def test_replace_last_shared_kernel_is_pure(mlp):
    _, params, _ = mlp
    new = models.replace_last_shared_kernel(params, jnp.zeros((8, 5)))
    assert float(jnp.abs(models.last_shared_kernel(params)).sum()) > 0
    np.testing.assert_array_equal(models.last_shared_kernel(new), 0.0)
    np.testing.assert_array_equal(new["shared_0"]["kernel"], params["shared_0"]["kernel"])


def test_cnn_gives_one_output_per_task():
    model = models.make_model("cnn", (10, 10), hidden=(16,), features=(4,), param_dtype=jnp.float64)
    x = jnp.ones((3, 12, 12, 1))
    params = _init(model, x)
    outs = jax.jit(model.apply)({"params": params}, x)
    assert [o.shape for o in outs] == [(3, 10), (3, 10)]
    # one 2x2 pool: 12 -> 6, so the last shared Dense sees 6 * 6 * 4 features
    assert params["shared_0"]["kernel"].shape == (3, 3, 1, 4)
    assert models.last_shared_kernel(params).shape == (6 * 6 * 4, 16)
    assert models.head_matrix(params).shape == (2, 16 * 10)


def test_mlp_class_with_shared_out_dim():
    model = models.MultiTaskMLP(hidden=(4,), num_tasks=3, out_dims=2)
    outs = jax.jit(model.apply)({"params": _init(model, jnp.ones((2, 3)))}, jnp.ones((5, 3)))
    assert [o.shape for o in outs] == [(5, 2)] * 3
    with pytest.raises(ValueError, match="out_dims"):
        models.MultiTaskMLP(hidden=(4,), num_tasks=3, out_dims=(2, 2)).init(jax.random.key(0), jnp.ones((1, 3)))


def test_unequal_heads_are_zero_padded():
    model = models.make_model("mlp", (2, 4), hidden=(3,))
    params = _init(model, jnp.ones((1, 5)))
    kernel = np.asarray(params["heads"]["kernel"])
    assert kernel.shape == (2, 3, 4)
    np.testing.assert_array_equal(kernel[0, :, 2:], 0.0)  # never used by task 0's 2 outputs
    assert np.all(kernel[1] != 0.0)
    outs = jax.jit(model.apply)({"params": params}, jnp.ones((7, 5)))
    assert [o.shape for o in outs] == [(7, 2), (7, 4)]


def test_mtrl_regulariser_matches_numpy(rng):
    H = rng.normal(size=(4, 6))
    A = rng.normal(size=(4, 4))
    omega = A @ A.T + 0.1 * np.eye(4)
    omega /= np.trace(omega)
    lam1, lam2 = 0.3, 0.7
    expected = 0.5 * lam1 * np.sum(H**2) + 0.5 * lam2 * np.trace(H.T @ np.linalg.inv(omega) @ H)
    got = models.mtrl_regulariser(jnp.asarray(H), jnp.asarray(omega), lam1, lam2)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_mtrl_regulariser_gradient_is_lam1_H_plus_lam2_inverse_omega_H(rng):
    H = rng.normal(size=(3, 5))
    omega = np.diag([0.5, 0.3, 0.2])
    grad = jax.grad(models.mtrl_regulariser)(jnp.asarray(H), jnp.asarray(omega), 0.1, 2.0)
    np.testing.assert_allclose(grad, 0.1 * H + 2.0 * np.linalg.inv(omega) @ H, rtol=1e-10)


def test_mtrl_regulariser_finite_for_singular_omega(rng):
    H = rng.normal(size=(3, 2))
    omega = np.diag([1.0, 0.0, 0.0])  # rank one: the floor keeps the inverse finite
    value = models.mtrl_regulariser(jnp.asarray(H), jnp.asarray(omega), 0.0, 1.0, eps=1e-6)
    floor = 1e-6 / 3
    np.testing.assert_allclose(value, 0.5 * (np.sum(H[0] ** 2) + np.sum(H[1:] ** 2) / floor), rtol=1e-10)


def test_refresh_omega_matches_sqrtm_every_k_steps(mlp):
    _, params, _ = mlp
    H = np.asarray(models.head_matrix(params))
    expected = scipy.linalg.sqrtm(H @ H.T).real
    expected /= np.trace(expected)
    old = models.initial_omega(3, jnp.float64)
    refresh = jax.jit(models.refresh_omega, static_argnums=3)
    np.testing.assert_allclose(refresh(params, old, jnp.int32(6), 3), expected, atol=1e-10)
    np.testing.assert_array_equal(refresh(params, old, jnp.int32(7), 3), old)


def test_make_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        models.make_model("rnn", (2,))
    with pytest.raises(ValueError, match="out_dims"):
        models.make_model("mlp", ())
    with pytest.raises(ValueError, match="hidden"):
        models.make_model("mlp", (2,), hidden=(0,))
    with pytest.raises(ValueError, match="features"):
        models.make_model("cnn", (2,), features=())
    with pytest.raises(ValueError, match="lam2"):
        models.validate_coupling(models.MTRLCoupling(lam2=0.0))
    with pytest.raises(ValueError, match="every"):
        models.validate_coupling(models.MTRLCoupling(every=0))


def test_validate_coupling_names_the_field_and_returns_python_numbers():
    got = models.validate_coupling(models.MTRLCoupling(lam1=np.float32(0.5), lam2=1, every=np.int64(3), eps=1e-6))
    assert got == models.MTRLCoupling(0.5, 1.0, 3, 1e-6)
    assert [type(v) for v in got] == [float, float, int, float]
    hash(got)
    for field, value in (("lam1", -1.0), ("lam1", float("inf")), ("lam2", 0.0), ("every", 1.5), ("every", True),
                         ("eps", 0.0), ("eps", "small")):
        with pytest.raises(ValueError, match=f"coupling.{field}:"):
            models.validate_coupling(models.MTRLCoupling()._replace(**{field: value}), "coupling")
    with pytest.raises(ValueError, match="mtrl:"):
        models.validate_coupling((0.0, 1.0, 10, 1e-8))


def test_make_model_embedding_bag_and_its_arguments():
    """The text model (mtl_jax.data.text): built by name, its arguments checked, token ids (B, L) only.
    Its forward pass against NumPy is in tests/data/test_text.py."""
    assert models.MODEL_KINDS == ("mlp", "cnn", "embedding_bag")
    model = models.make_model("embedding_bag", (3, 1), hidden=(4, 2), vocab_size=10, embed_dim=6)
    assert isinstance(model, models.EmbeddingBagMLP)
    assert (model.vocab_size, model.embed_dim, model.hidden, model.out_dims) == (10, 6, (4, 2), (3, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 7), jnp.int32))["params"]
    assert shapes["shared_embed"]["embedding"].shape == (11, 6)  # row 0: padding
    assert shapes[models.SHARED_LAST]["kernel"].shape == (4, 2)
    assert shapes[models.HEADS]["kernel"].shape == (2, 2, 3)
    with pytest.raises(ValueError, match="^x:"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 7, 1)))
    with pytest.raises(ValueError, match="^vocab_size:"):
        models.make_model("embedding_bag", (2,), vocab_size=0)
    with pytest.raises(ValueError, match="^embed_dim:"):
        models.make_model("embedding_bag", (2,), embed_dim=1.5)
    with pytest.raises(ValueError, match="^kind:.*embedding_bag"):
        models.make_model("rnn", (2,))
