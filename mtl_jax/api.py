"""The public entry points ``mtl_jax.fit`` and ``mtl_jax.objective`` (docs/architecture.md, section 5)."""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from mtl_jax import distributed, names
from mtl_jax.data.sites import pack_sites, to_sites
from mtl_jax.mtrl import DEFAULT_EPS, SpectralMatrix, objective_J
from mtl_jax.solvers import centralized, dmtrl
from mtl_jax.solvers.base import check_checkpoint, check_options, history_columns
from mtl_jax.validation import check_array, check_int, check_real, check_scale, validate_dataset, validate_lams

SOLVERS = names.SOLVERS


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      W: (m, d) task weights, row t is task t's model.
      omega: the task covariance in factored form ``U diag(a) U^T + b (I - U U^T)`` (a
        :class:`~mtl_jax.mtrl.SpectralMatrix`: ``omega.U`` (m, r), ``omega.a`` (r,), ``omega.b`` ();
        ``omega.apply(M)`` is ``Omega @ M`` in O(m r k) for M (m, k)). Use it at many tasks.
      Omega: (property) the dense (m, m) Omega, for m up to
        :data:`mtl_jax.mtrl.DENSE_OMEGA_MAX_TASKS` (20,000); ValueError above (use ``omega``).
      history: per-round :class:`~mtl_jax.solvers.base.HistoryRecord` rows
        (round, objective J, duality gap, bytes communicated, seconds).
      objective: J(W) at the end.
      gap: the final duality gap of J, an upper bound on ``J(W) - min J``.
      converged: whether ``gap <= tol * |J(W)|`` was reached (at ``J = 0`` only ``gap <= 0`` converges:
        ``J >= 0``, so ``J(W) = 0`` means ``W`` is optimal and the certificate then gives ``gap = 0``).
      iterations: iterations (APG) or alternations run.
      config: the arguments of the fit, for the record.
      alpha: (N,) the certificate's dual variables, one per sample, in the input order.
      compile_seconds, solve_seconds: time to compile and time to run (excluding compilation).
    """

    W: np.ndarray
    omega: SpectralMatrix
    history: tuple
    objective: float
    gap: float
    converged: bool
    iterations: int
    config: dict = field(default_factory=dict)
    alpha: np.ndarray | None = None
    compile_seconds: float = 0.0
    solve_seconds: float = 0.0

    @property
    def Omega(self) -> np.ndarray:
        """The (m, m) task covariance, materialised from :attr:`omega` (O(m^2) memory).

        Raises ValueError when m exceeds :data:`mtl_jax.mtrl.DENSE_OMEGA_MAX_TASKS` (an (m, m) array
        of 10^5 tasks is 80 GB): use the factors :attr:`omega` instead.
        """
        from mtl_jax.mtrl import DENSE_OMEGA_MAX_TASKS
        m = int(np.shape(self.omega.U)[0])
        if m > DENSE_OMEGA_MAX_TASKS:
            gb = m * m * np.dtype(np.asarray(self.omega.U).dtype).itemsize / 1e9
            raise ValueError(
                f"Omega: {m} tasks; a dense ({m}, {m}) Omega would take {gb:.3g} GB, above the limit of "
                f"{DENSE_OMEGA_MAX_TASKS} tasks (mtl_jax.mtrl.DENSE_OMEGA_MAX_TASKS). Use the factors, "
                f"Omega = U diag(a) U^T + b (I - U U^T): res.omega.U ({m}, r), res.omega.a (r,), res.omega.b; "
                f"res.omega.apply(M) computes Omega @ M for an ({m}, k) M without forming Omega "
                f"(res.omega.dense() forces the dense array)")
        return np.asarray(self.omega.dense())

    @property
    def relative_gap(self) -> float:
        """``gap / max(|J(W)|, tiny)``: the gap relative to the objective, the quantity ``tol`` bounds.

        ``tiny`` is the smallest normal float64, so ``gap = 0`` gives 0 also when ``J(W) = 0`` (zero
        targets: ``W = 0`` is optimal and certified exactly), never ``0 / 0``; a positive gap at
        ``J = 0`` gives a huge value (``inf`` only past the float range).
        """
        return _relative_gap(self.gap, self.objective)

    def history_arrays(self) -> dict[str, np.ndarray]:
        """The history as a dict of arrays keyed by the :class:`HistoryRecord` field names."""
        return history_columns(self.history)


def _relative_gap(gap: float, objective: float) -> float:
    """``gap / max(|objective|, tiny)`` (see :attr:`FitResult.relative_gap`)."""
    return float(gap) / max(abs(float(objective)), float(np.finfo(np.float64).tiny))


def fit(X, y, task, *, lam1, lam2, loss="squared", solver="centralized", method=None, tol=1e-6,
        max_iter=None, W0=None, alpha0=None, num_tasks=None, eps=DEFAULT_EPS, progress=None,
        **solver_options) -> FitResult:
    """Learn MTRL task models ``W`` and the task covariance ``Omega`` (Zhang and Yeung 2010; DMTRL 2017).

    Minimises ``J(W) = sum_t (1/n_t) sum_i loss(y_ti, <w_t, x_ti>) + (lam1/2)||W||_F^2
    + (lam2/2)||W||_*^2`` (= ``min_Omega P(W, Omega)``) and returns ``Omega = (W W^T)^{1/2} / tr``.
    No intercept is added: append a constant feature (``mtl_jax.data.add_intercept``) or centre each
    task (``mtl_jax.data.center_by_task``) first. Computation follows the dtype of ``X`` where JAX
    allows it (float64 needs ``jax.config.update("jax_enable_x64", True)``).

    Args:
      X: (N, d) features. y: (N,) targets ({-1, +1} for hinge and logistic).
      task: (N,) integer task ids 0..m-1; every task needs at least one sample.
      lam1: > 0, the Frobenius weight. lam2: >= 0, the task-relationship weight.
      loss: "squared" ``(y - a)^2``, "hinge" or "logistic".
      solver: "centralized" (all data in one place) or "dmtrl" (the distributed dual solver, simulated
        sites: each task is a site that keeps its data; docs/dmtrl.md).
      method: the centralized solver's algorithm: "apg" (fast, certified; default), "alternating"
        (classic MTRL), "apg_primal", "apg_dual". Not for "dmtrl" (it has ``scheme``).
      tol: relative duality-gap tolerance on J, a finite number >= 0: stop when ``gap <= tol * |J(W)|``.
      max_iter: iteration cap (APG, default 5000), alternation cap (default 100) or communication rounds
        (dmtrl, default 2000), an integer >= 1.
      W0: (m, d) warm start (primal methods), e.g. the ``W`` of an earlier result.
      alpha0: (N,) warm start of the dual variables, in the input row order (dual methods, and the
        hinge W-step of the alternation), e.g. the ``alpha`` of an earlier result.
      num_tasks: m, when it is larger than ``max(task) + 1`` would say (every task still needs data).
      eps: relative eigenvalue floor of the Omega-step, ``0 < eps < 1``: the floor is ``eps`` times the
        mean eigenvalue of ``(W W^T)^{1/2}``, so ``eps >= 1`` would lift every eigenvalue below the
        mean to at least the mean and wash out the task relationships that Omega is for.
      progress: ``True`` draws a progress bar (round, J, gap) on stderr, updated after every chunk of
        rounds or iterations (``MTL_JAX_QUIET=1`` silences it); a callable ``progress(record, max_iter)``
        is called instead; ``None`` (default): nothing (the centralized solver is then one compiled program).
      **solver_options: centralized: ``inner_tol`` (>= 0), ``inner_max_iter`` (integer >= 1) of the
        alternation's W-step; ``checkpoint`` (a .npz path) and ``checkpoint_every`` (iterations or
        alternations per chunk): save the state after every chunk and continue from an existing
        checkpoint of the same problem, exactly (:func:`mtl_jax.solvers.centralized.solve`).
        dmtrl: ``scheme`` ("joint", default, or "alternating"), ``local_passes``, ``q``, ``omega_every``,
        ``omega_tol``, ``omega0``, ``order``, ``seed``, ``checkpoint``, ``checkpoint_every`` and the systems model
        ``min_effort``, ``straggler_prob``, ``straggler_effort``, ``dropout_prob``, ``speed``, ``latency``,
        ``bandwidth`` (:func:`mtl_jax.solvers.dmtrl.solve`; docs/dmtrl.md).

    Scale of the data. Small scales are handled: all-zero features (or an all-zero task) give
    ``W = 0`` there, and tiny features (tested at 1e-160 with lam1 = 0.1) give the exact optimum
    (the solvers floor their Lipschitz constants and normalise their Gram matrices by powers of two;
    ``method="alternating"``, a reference, may stop at its first W-step there, which its certificate
    shows to be optimal to ~1e-320, J's resolution). Large scales are refused, before any work, where an intermediate
    value would overflow (``mtl_jax.validation.scale_limits``; ``F = finfo.max / 64``, about 2.8e306
    in float64, ``n`` the largest task's sample count, ``d`` the features, ``m`` the tasks):
    ``max|X| <= sqrt(F / (n d))`` (``lambda_max(X_t^T X_t)``, about 1.7e153 / sqrt(n d)),
    for squared loss ``max|y| <= sqrt(F / (4 m))`` (``J`` itself, about 8e152 / sqrt(m)), and
    ``max|X| r <= sqrt(F lam1 / (2 m d))`` with ``r = 2 max|y|`` (squared) or 1 (the certificate's
    ``R*(X^T alpha)``; ValueError naming ``lam1``). Rescaling is exact for powers of two:
    ``X -> 2^-k X`` with ``lam1, lam2 -> 4^-k lam1, 4^-k lam2`` leaves J and the margins unchanged
    and maps ``W -> 2^k W``; for squared loss ``y -> r y`` maps ``W -> r W`` and ``J -> r^2 J``.
    Within the limits the certificate is still only as good as floating point allows: when
    ``lam1`` is tiny against ``max|X|^2`` (below about ``eps^2 / tol`` of it) the gap cannot reach
    ``tol`` and the fit reports ``converged=False`` with the (valid) gap it has.

    Returns:
      a :class:`FitResult`.

    Raises:
      ValueError: naming the argument (``X``, ``y``, ``task``, ``lam1``, ``lam2``, ``tol``, ``max_iter``,
        ``W0``, ``alpha0``, ``num_tasks``, ``eps``, ``inner_tol``, ``inner_max_iter``, ...) and what is wrong.
    """
    X, y, task, m = validate_dataset(X, y, task, loss=loss, num_tasks=num_tasks)
    lam1, lam2 = validate_lams(lam1, lam2, scalar=True)  # arrays of weights are sweeps, not one fit
    check_scale(X, y, np.bincount(task, minlength=m), lam1=lam1, loss=loss)
    if solver not in SOLVERS:
        raise ValueError(f"solver: must be one of {SOLVERS}, got {solver!r}")
    if solver == "dmtrl" and method is not None:
        raise ValueError(f"method: chooses the centralized solver's algorithm; solver='dmtrl' takes scheme= "
                         f"({', '.join(dmtrl.SCHEMES)}) instead, got method={method!r}")
    method = "apg" if method is None and solver == "centralized" else method
    if solver == "centralized" and method not in names.METHODS:
        raise ValueError(f"method: must be one of {names.METHODS}, got {method!r}")
    tol = check_real("tol", tol)
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter, low=1, high=2**31)
    eps = check_real("eps", eps, strict=True)
    if eps >= 1:
        raise ValueError(f"eps: must be a finite number in (0, 1) (the Omega-step's relative floor), got {eps!r}")
    if W0 is not None:
        W0 = check_array("W0", W0, (m, X.shape[1]), X.dtype)
    if solver == "dmtrl":
        dmtrl.check_dmtrl_options(solver_options, m)  # validated before the data are packed
    else:
        check_options(solver_options, centralized.OPTIONS, "solver_options")
        check_checkpoint(solver_options.get("checkpoint"), solver_options.get("checkpoint_every"), default=1)
    if "inner_tol" in solver_options:
        solver_options["inner_tol"] = check_real("inner_tol", solver_options["inner_tol"])
    if "inner_max_iter" in solver_options:
        solver_options["inner_max_iter"] = check_int("inner_max_iter", solver_options["inner_max_iter"],
                                                     low=1, high=2**31)

    sites = pack_sites(X, y, task, m)  # validated above: no second check
    if alpha0 is not None:
        alpha0 = _dual_start(alpha0, y, task, loss, np.asarray(sites.index))
    if solver == "dmtrl":
        with _progress(progress, "dmtrl rounds") as report:
            out = dmtrl.solve(sites, lam1=lam1, lam2=lam2, loss=loss, tol=tol, max_iter=max_iter, W0=W0,
                              alpha0=alpha0, eps=eps, progress=report, **solver_options)
    else:
        with _progress(progress, f"{method} iterations" if method != "alternating" else "alternations") as report:
            out = centralized.solve(sites, lam1=lam1, lam2=lam2, loss=loss, method=method, tol=tol,
                                    max_iter=max_iter, W0=W0, alpha0=alpha0, eps=eps,
                                    data_key=_data_key(X, task, m), progress=report, **solver_options)
    alpha = np.zeros(len(y), dtype=out.alpha.dtype)
    index = np.asarray(sites.index)
    alpha[index[index >= 0]] = out.alpha[index >= 0]
    config = dict(lam1=float(lam1), lam2=float(lam2), loss=loss, solver=solver, method=method,
                  tol=float(tol), max_iter=max_iter, eps=float(eps), num_tasks=m, dim=int(X.shape[1]),
                  num_samples=int(len(y)), **_recordable(solver_options))
    if solver == "dmtrl":
        config.setdefault("scheme", "joint")
        config["devices"] = int(distributed.site_mesh(solver_options.get("devices")).devices.size)
    return FitResult(W=out.W, omega=out.omega, history=out.history, objective=out.objective,
                     gap=out.gap, converged=out.converged, iterations=out.iterations, config=config,
                     alpha=alpha, compile_seconds=out.compile_seconds, solve_seconds=out.solve_seconds)


@contextlib.contextmanager
def _progress(progress, description: str):
    """``progress`` of :func:`fit` as the solver's per-chunk callback: None/False -> None; True -> a bar
    (:mod:`mtl_jax.runner.progress`; silent with ``MTL_JAX_QUIET=1``); a callable -> itself."""
    if progress is None or progress is False:
        yield None
    elif callable(progress):
        yield progress
    elif progress is True:
        from mtl_jax.runner.progress import bar
        # Every process of a multi-process run gets a callback (the same chunks of rounds, so the same
        # collectives in every process); only process 0 draws.
        with bar(None, description, quiet=None if distributed.is_writer() else True) as update:
            def report(record, total):
                rel = record.gap / abs(record.objective) if record.objective else float("nan")
                update(record.round, total=total, J=f"{record.objective:.6g}", rel_gap=f"{rel:.1e}")
            yield report
    else:
        raise ValueError(f"progress: must be None, a bool or a callable(record, max_rounds), got {progress!r}")


def fit_sites(sites, num_tasks: int, *, lam1, lam2, loss="squared", tol=1e-6, max_iter=None, W0=None, alpha0=None,
              eps=DEFAULT_EPS, progress=None, **options) -> FitResult:
    """DMTRL on sites already laid out over the devices (``mtl_jax.distributed.process_sites``): a :class:`FitResult`.

    For multi-process runs in which each process read only its own sites' rows (``fit`` needs the whole
    data in every process). ``num_tasks`` is the real number of sites (``process_sites`` returns it);
    ``lam1``, ``lam2``, ``tol``, ``max_iter``, ``eps`` and the DMTRL options as for :func:`fit`. Every process
    calls it and gets the same result (``W``, ``alpha`` in the input row order, gathered). Warm starts as for
    :func:`fit`, the same in every process: ``W0`` (m, d) whole (small), ``alpha0`` (N,) in the input row order,
    of which each process reads only its own sites' rows (it may be a memory map).
    """
    from mtl_jax.distributed import process_rows, site_mesh, to_host
    lam1, lam2 = validate_lams(lam1, lam2, scalar=True)
    tol = check_real("tol", tol)
    if max_iter is not None:
        max_iter = check_int("max_iter", max_iter, low=1, high=2**31)
    dtype = sites.X.dtype
    if W0 is not None:
        W0 = check_array("W0", W0, (int(num_tasks), int(sites.dim)), dtype)
    if alpha0 is not None:
        n = int(np.sum(to_host(sites.counts)))
        if tuple(np.shape(alpha0)) != (n,):
            raise ValueError(f"alpha0: must have shape {(n,)}, got {tuple(np.shape(alpha0))}")
        alpha0 = _placed_dual_start(process_rows(alpha0, sites).astype(dtype), sites, loss)
    with _progress(progress, "dmtrl rounds") as report:
        out = dmtrl.solve(sites, lam1=lam1, lam2=lam2, loss=loss, tol=tol, max_iter=max_iter, W0=W0,
                          alpha0=alpha0, eps=eps, progress=report, **options)
    index = to_host(sites.index)[:out.alpha.shape[0]]
    alpha = np.zeros(int(np.sum(index >= 0)), dtype=out.alpha.dtype)
    alpha[index[index >= 0]] = out.alpha[index >= 0]
    config = dict(lam1=float(lam1), lam2=float(lam2), loss=loss, solver="dmtrl", method=None, tol=float(tol),
                  max_iter=max_iter, eps=float(eps), num_tasks=int(num_tasks), dim=int(sites.dim),
                  num_samples=int(alpha.size), **_recordable(options))
    config.setdefault("scheme", "joint")
    config["devices"] = int(site_mesh(options.get("devices")).devices.size)
    return FitResult(W=out.W, omega=out.omega, history=out.history, objective=out.objective, gap=out.gap,
                     converged=out.converged, iterations=out.iterations, config=config, alpha=alpha,
                     compile_seconds=out.compile_seconds, solve_seconds=out.solve_seconds)


def _recordable(options: dict) -> dict:
    """Solver options for ``FitResult.config``: per-site arrays as lists, a given Omega as its shape only;
    where checkpoints go is not part of the problem and is left out (the same fit, saved or not)."""
    out = {}
    for k, v in options.items():
        if k in ("checkpoint", "checkpoint_every"):
            continue
        if k == "omega0" and v is not None:
            out[k] = "given"
        elif isinstance(v, (np.ndarray, list, tuple)):
            out[k] = np.asarray(v).tolist()
        else:
            out[k] = v
    return out


def _data_key(X, task, m):
    """A fingerprint of the grouped features, so that fits of the same data reuse the step size's ``lmax``.

    ``lmax`` depends on ``X`` and ``task`` only (not on ``y``, lam1, lam2 or the loss): the key hashes
    ``X @ r`` for a fixed random ``r`` (one pass at the matrix-vector rate; any change of a row
    changes its product with probability one) together with ``task``, the shape and the dtype.
    """
    r = np.random.default_rng(0x5EED).uniform(0.5, 1.5, X.shape[1]).astype(X.dtype)
    digest = hashlib.blake2b(np.ascontiguousarray(X @ r).tobytes(), digest_size=16)
    digest.update(np.ascontiguousarray(task).tobytes())
    return (X.shape, str(X.dtype), m, digest.hexdigest())


def _dual_start(alpha0, y, task, loss, index):
    """``alpha0`` (N,) in input order -> padded (m, n_max), checked to lie in the dual domain."""
    alpha0 = check_array("alpha0", alpha0, y.shape, y.dtype)
    if loss in ("hinge", "logistic"):
        # Dual domain: 0 <= y alpha <= c_t = 1 / n_t.
        c = 1.0 / np.bincount(task)[task]
        scaled = y * alpha0 / c
        if np.any(scaled < -1e-9) or np.any(scaled > 1 + 1e-9):
            raise ValueError("alpha0: not dual feasible: need 0 <= y * alpha0 <= 1 / n_t for every sample")
        alpha0 = y * c * np.clip(scaled, 0.0, 1.0)
    padded = np.zeros(index.shape, dtype=alpha0.dtype)
    padded[index >= 0] = alpha0[index[index >= 0]]
    return padded


def _placed_dual_start(alpha0, sites, loss):
    """:func:`_dual_start` on sites placed by ``process_sites``: ``alpha0`` laid out like ``sites.y``, each process
    checking and clipping its own sites' duals (the same arithmetic)."""
    from mtl_jax.data.sites import sample_weights
    real = sites.mask > 0
    if not bool(jnp.all(jnp.isfinite(alpha0))):
        raise ValueError("alpha0: contains NaN or Inf")
    if loss in ("hinge", "logistic"):
        c = jnp.where(real, sample_weights(sites), 1.0)
        scaled = jnp.where(real, sites.y * alpha0 / c, 0.0)
        if bool(jnp.any(scaled < -1e-9) | jnp.any(scaled > 1 + 1e-9)):
            raise ValueError("alpha0: not dual feasible: need 0 <= y * alpha0 <= 1 / n_t for every sample")
        alpha0 = jnp.where(real, sites.y * c * jnp.clip(scaled, 0.0, 1.0), 0.0)
    return alpha0


def objective(W, X, y, task, *, lam1, lam2, loss="squared"):
    """``J(W) = sum_t (1/n_t) sum_i loss(y_ti, <w_t, x_ti>) + (lam1/2)||W||_F^2 + (lam2/2)||W||_*^2``.

    Args:
      W: (m, d) task weights, finite real numbers. X (N, d), y (N,), task (N,) as in :func:`fit`.
      lam1, lam2: single numbers, ``lam1 > 0``, ``lam2 >= 0`` (evaluate a grid one value at a time).

    Returns:
      J(W) as a Python float.

    Raises:
      ValueError: naming the argument (``W``, ``X``, ``y``, ``task``, ``lam1``, ``lam2``, ``loss``).
    """
    W = check_array("W", W, None, np.float64)
    if W.ndim != 2:
        raise ValueError(f"W: must be a 2-D (m, d) array, got shape {W.shape}")
    X, y, task, m = validate_dataset(X, y, task, loss=loss, num_tasks=W.shape[0])
    lam1, lam2 = validate_lams(lam1, lam2, scalar=True)
    if W.shape != (m, X.shape[1]):
        raise ValueError(f"W: must have shape ({m}, {X.shape[1]}) to match task and X, got {W.shape}")
    sites = to_sites(X, y, task, num_tasks=m)
    return float(objective_J(jnp.asarray(W, sites.X.dtype), sites, lam1=lam1, lam2=lam2, loss=loss))
