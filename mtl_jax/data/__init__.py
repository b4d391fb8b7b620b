"""Multi-task datasets: checks, per-site padded arrays, files, synthetic and real data.

A dataset is flat, ``X`` (N, d), ``y`` (N,), ``task`` (N,) with ids 0..m-1; :func:`to_sites` turns
it into per-site padded arrays with masks (sites as the leading axis) and :func:`from_sites` back.
"""
from .io import atomic_write, load, save_csv, save_npz
from .school import load_exam
from .sites import Sites, TaskMeans, add_intercept, center_by_task, from_sites, to_sites
from .synthetic import cluster_recovery, make_clustered_tasks
from .text import encode as encode_texts, tokenize, trump_tweets
from mtl_jax.validation import KNOWN_LOSSES, check_loss, validate_dataset, validate_lams

__all__ = [
    "KNOWN_LOSSES",
    "Sites",
    "TaskMeans",
    "add_intercept",
    "atomic_write",
    "center_by_task",
    "check_loss",
    "cluster_recovery",
    "encode_texts",
    "from_sites",
    "load",
    "load_exam",
    "make_clustered_tasks",
    "save_csv",
    "save_npz",
    "to_sites",
    "tokenize",
    "trump_tweets",
    "validate_dataset",
    "validate_lams",
]
