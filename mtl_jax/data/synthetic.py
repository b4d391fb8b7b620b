"""Seeded synthetic multi-task data with planted task clusters, and the measure of recovering them.

The tasks fall into ``num_clusters`` groups; tasks of a group share a centre, so their true
weight vectors are strongly correlated and a learned task covariance ``Omega`` should show the
groups. :func:`cluster_recovery` scores how well it does.
"""
from __future__ import annotations

import numpy as np

from mtl_jax.validation import CLASSIFICATION_LOSSES, check_int, check_loss, check_real, check_square_matrix


def make_clustered_tasks(
    num_tasks,
    dim,
    *,
    num_clusters=3,
    samples_per_task=50,
    loss="squared",
    noise=0.1,
    cluster_spread=0.1,
    seed=0,
):
    """Generate ``num_tasks`` linear tasks in ``dim`` dimensions whose weights form planted clusters.

    The model, all draws from ``numpy.random.default_rng(seed)`` (same seed, same arrays):

    * tasks are assigned to clusters as evenly as possible (sizes differ by at most one), in a
      random order: ``clusters[t]`` in 0..num_clusters-1;
    * cluster centres ``c_k`` have norm ``sqrt(dim)`` (the typical norm of a N(0, I_dim) draw) and
      are mutually orthogonal when ``num_clusters <= dim`` (a random orthonormal set, scaled);
      otherwise they are independent N(0, I_dim) draws;
    * ``w_t = c_{clusters[t]} + cluster_spread * z_t`` with ``z_t ~ N(0, I_dim)``, so
      ``cluster_spread`` is the per-task deviation relative to the centre's scale;
    * task t has ``n_t`` samples: ``samples_per_task`` if an int, else drawn uniformly from the
      inclusive range ``(low, high)``;
    * ``x ~ N(0, I_dim)``; ``y = <w_t, x> + noise * e`` with ``e ~ N(0, 1)`` for squared loss, and
      ``y = sign(<w_t, x> + noise * e)`` in {-1, +1} (0 maps to +1) for hinge/logistic.

    Rows are grouped by task (task 0's rows first). No intercept: the data have zero mean.

    Returns:
      ``(X (N, dim) float64, y (N,) float64, task (N,) int64, info)`` with ``N = sum_t n_t`` and
      ``info = {"clusters": (m,) int64, "W_true": (m, dim), "centers": (num_clusters, dim)}``.
      With ``num_tasks >= 2 * num_clusters`` every cluster has at least two tasks, which
      :func:`cluster_recovery` needs for a perfect score.
    """
    m = check_int("num_tasks", num_tasks, low=1)
    d = check_int("dim", dim, low=1)
    k = check_int("num_clusters", num_clusters, low=1)
    if k > m:
        raise ValueError(f"num_clusters: {k} clusters for {m} tasks; need num_clusters <= num_tasks")
    if isinstance(samples_per_task, (tuple, list)):
        if len(samples_per_task) != 2:
            raise ValueError(f"samples_per_task: a (low, high) pair expected, got {samples_per_task!r}")
        low = check_int("samples_per_task", samples_per_task[0], low=1)
        high = check_int("samples_per_task", samples_per_task[1], low=1)
        if low > high:
            raise ValueError(f"samples_per_task: low {low} > high {high}")
    else:
        low = high = check_int("samples_per_task", samples_per_task, low=1)
    loss = check_loss(loss)
    if loss is None:
        raise ValueError("loss: must be 'squared', 'hinge' or 'logistic', got None")
    noise = check_real("noise", noise)
    cluster_spread = check_real("cluster_spread", cluster_spread)
    seed = check_int("seed", seed, low=0)

    rng = np.random.default_rng(seed)
    clusters = rng.permutation(np.arange(m) % k).astype(np.int64)
    G = rng.standard_normal((d, k))
    if k <= d:
        Q, _ = np.linalg.qr(G)                         # (d, k) orthonormal columns
        centers = np.sqrt(d) * Q.T
    else:
        centers = G.T
    W_true = centers[clusters] + cluster_spread * rng.standard_normal((m, d))
    sizes = rng.integers(low, high + 1, size=m) if high > low else np.full(m, low)
    task = np.repeat(np.arange(m, dtype=np.int64), sizes)
    X = rng.standard_normal((task.size, d))
    a = np.einsum("nd,nd->n", X, W_true[task]) + noise * rng.standard_normal(task.size)
    y = np.where(a >= 0, 1.0, -1.0) if loss in CLASSIFICATION_LOSSES else a
    return X, y, task, {"clusters": clusters, "W_true": W_true, "centers": centers}


def cluster_recovery(Omega, clusters) -> float:
    """Fraction of tasks whose most-correlated other task, according to ``Omega``, is in their own cluster.

    ``Omega`` (m, m) is a task covariance (for example the learned MTRL ``Omega``); it is turned
    into the correlation matrix ``C_ij = Omega_ij / sqrt(Omega_ii Omega_jj)``, and for each task i
    the nearest neighbour ``j* = argmax_{j != i} C_ij`` is found (ties: the lowest j). The score
    is the fraction of tasks i with ``clusters[j*] == clusters[i]``: 1.0 means every task's
    nearest neighbour is in its planted cluster; for an Omega unrelated to the clusters it is
    about ``(m/K - 1) / (m - 1)``, roughly 1/K for K equal clusters.

    Args:
      Omega: (m, m) with a positive diagonal, m >= 2.
      clusters: (m,) integer cluster id per task (``info["clusters"]`` of
        :func:`make_clustered_tasks`).
    """
    Omega = check_square_matrix("Omega", Omega, min_size=2)
    diag = np.diag(Omega)
    if (diag <= 0).any():
        raise ValueError(f"Omega: diagonal must be positive; non-positive at tasks {np.flatnonzero(diag <= 0)[:10].tolist()}")
    clusters = np.asarray(clusters)
    if clusters.shape != (Omega.shape[0],):
        raise ValueError(f"clusters: must have shape ({Omega.shape[0]},), got {clusters.shape}")
    s = np.sqrt(diag)
    C = Omega / s[:, None] / s[None, :]
    np.fill_diagonal(C, -np.inf)
    nearest = np.argmax(C, axis=1)
    return float(np.mean(clusters[nearest] == clusters))
