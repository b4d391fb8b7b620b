"""The names users pass as strings, each listed once.

Validation (:mod:`mtl_jax.validation`), the command line's ``choices`` and the docs read these
tuples; the modules that implement the names check at import time that they agree with them.
"""
from __future__ import annotations

#: Losses of the linear models (:mod:`mtl_jax.losses`).
LOSSES = ("squared", "hinge", "logistic")
#: Losses whose labels must be -1 or +1.
CLASSIFICATION_LOSSES = ("hinge", "logistic")
#: ``fit(solver=...)``: where the problem is solved.
SOLVERS = ("centralized", "dmtrl")
#: ``fit(method=...)`` of the centralized solver (:mod:`mtl_jax.solvers.centralized`).
METHODS = ("apg", "apg_primal", "apg_dual", "alternating")
#: ``fit(solver="dmtrl", scheme=...)``: the outer scheme of the distributed solver (:mod:`mtl_jax.solvers.dmtrl`).
DMTRL_SCHEMES = ("joint", "alternating")
#: ``fit(solver="dmtrl", q=...)``: the alternating scheme's local curvature rules.
Q_RULES = ("auto", "lambda_max", "gershgorin", "paper", "factored")
#: The adaptive task-weighting schemes compared in experiments (:mod:`mtl_jax.weighting`).
SCHEMES = ("equal", "huq_pervin", "dwa", "uncertainty", "rlw", "famo", "gradnorm")
#: Schemes reachable through ``mtl_jax.weighting.get`` that are baselines, not compared schemes.
EXTRA_SCHEMES = ("fixed",)
