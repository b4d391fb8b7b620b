"""Figures of fits: convergence curves, task-covariance and sweep heat maps, task weights (matplotlib, no display).

Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, without
``pyplot``: nothing here selects a global backend, opens a window or needs a display, so the
module works on headless machines and does not disturb an interactive session that imports it.
Pass your own ``ax`` to draw into an existing figure (from ``pyplot`` or not).

    from mtl_jax import plotting
    axes = plotting.plot_convergence({"apg": result.history_arrays()})
    plotting.save_figure(axes[0].figure, "convergence.png")

A convergence plot shows, per labelled history, on log y axes:

* the relative sub-optimality ``(J_k - J*) / |J*|`` against the reference ``J*`` (the known
  optimum if given, else a *certified lower bound* on it, so the curve never touches zero and
  an upper bound on the true sub-optimality is shown), and
* the relative duality gap ``gap_k / |J_k|``, the solver's own certificate.

**Style.** Every figure of this module is built and saved inside :func:`paper_style`, the one place that sets
the look (:data:`STYLE`: 8 pt text, 7 pt ticks and legends, thin lines, 200 dpi PNG, embedded TrueType fonts in
PDF), and is sized for a paper: :data:`COLUMN` (3.4 in, one column) or :data:`PAGE` (7 in, both columns) wide,
so that it is printed at about its own size and the fonts stay 7 to 9 pt. Use it for your own figures too::

    with plotting.paper_style():
        fig = Figure(figsize=(plotting.COLUMN, 2.4), layout="constrained")
        ...
        plotting.save_figure(fig, "fig.png", formats=("png", "pdf"))
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtl_jax.data.io import atomic_write
from mtl_jax.validation import check_square_matrix

#: Figure widths in inches: one column and the full page (two columns) of a typical two-column paper.
COLUMN = 3.4
PAGE = 7.0
#: The one figure style (matplotlib rcParams) of every figure here: sizes readable at :data:`COLUMN` or
#: :data:`PAGE` width. :func:`paper_style` applies it.
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 9, "font.family": "sans-serif",
    "axes.linewidth": 0.6, "lines.linewidth": 1.1, "lines.markersize": 4, "grid.linewidth": 0.4,
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.minor.width": 0.4, "ytick.minor.width": 0.4,
    "xtick.major.size": 3, "ytick.major.size": 3, "xtick.minor.size": 1.5, "ytick.minor.size": 1.5,
    "legend.frameon": False, "legend.handlelength": 1.6, "axes.titlepad": 4,
    "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42, "ps.fonttype": 42, "image.cmap": "viridis",
}


def paper_style():
    """A context in which :data:`STYLE` is in force (``matplotlib.rc_context``); every figure of this module is
    made and saved inside it. Nesting is harmless; leaving restores the caller's settings."""
    return matplotlib.rc_context(STYLE)


def styled(function):
    """Decorator: run ``function`` inside :func:`paper_style` (the plotting functions of this module)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with paper_style():
            return function(*args, **kwargs)
    return wrapper


#: The horizontal axes a convergence plot can use (history columns) and their labels. ``round``,
#: ``seconds`` are in every solver history; ``bytes`` (communicated, cumulative) and ``sim_seconds``
#: (the distributed solver's cost model) in those of :class:`mtl_jax.solvers.base.RoundRecord`.
X_AXES = {"round": "iteration / round", "seconds": "seconds (compilation excluded)",
          "sim_seconds": "simulated seconds (cost model)", "bytes": "bytes communicated (up + down)"}
#: Axes drawn on a log scale: bytes grow with the rounds over orders of magnitude.
LOG_X_AXES = ("bytes",)


def _history_columns(label, history, x):
    if not isinstance(history, Mapping):
        raise ValueError(f"histories[{label!r}]: must be a dict of arrays, got {type(history).__name__}")
    missing = [k for k in (x, "objective", "gap") if k not in history]
    if missing:
        raise ValueError(f"histories[{label!r}]: missing column(s) {missing} (found: {sorted(history)})")
    cols = {}
    for k in (x, "objective", "gap"):
        a = np.asarray(history[k], dtype=float)
        if a.ndim != 1:
            raise ValueError(f"histories[{label!r}][{k!r}]: must be 1-D, got shape {a.shape}")
        cols[k] = a
    n = len(cols[x])
    if any(len(a) != n for a in cols.values()):
        raise ValueError(f"histories[{label!r}]: columns {x!r}, 'objective', 'gap' differ in length")
    return cols[x], cols["objective"], cols["gap"]


def _positive_or_nan(a):
    """Values a log axis can show; the rest (<= 0, NaN, Inf) become NaN (a break in the line)."""
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def certified_lower_bound(histories) -> float:
    """The best lower bound on ``min J`` that the histories certify: ``max_k (J_k - gap_k)``.

    Every finite duality gap gives ``J_k - gap_k <= min J``; the largest such value is at least
    ``min_k J_k - min_k gap_k`` (the best J minus the smallest gap), and tighter. When no history
    has a finite gap, the smallest J is returned (then only an estimate, not a bound). All
    histories are assumed to minimise the same J.

    Args:
      histories: ``{label: {"objective": (n,), "gap": (n,), ...}}``.
    """
    lows, best = [], []
    for h in histories.values():
        J, g = np.asarray(h["objective"], dtype=float), np.asarray(h["gap"], dtype=float)
        ok = np.isfinite(J) & np.isfinite(g)
        if ok.any():
            lows.append(np.max(J[ok] - np.maximum(g[ok], 0.0)))
        if np.isfinite(J).any():
            best.append(np.min(J[np.isfinite(J)]))
    if lows:
        return float(max(lows))
    if best:
        return float(min(best))
    raise ValueError("histories: no finite objective value to take as the optimum")


@styled
def plot_convergence(histories, *, x="round", optimum=None, ax=None):
    """Convergence curves of several runs on log y axes.

    Args:
      histories: ``{label: history}``, each history a dict of 1-D arrays of one length n (n may be
        0) with keys ``"objective"`` (J_k), ``"gap"`` (duality gap of J_k; NaN where undefined) and
        the x column (``"round"``, ``"seconds"``, ``"sim_seconds"`` or ``"bytes"``), e.g.
        ``FitResult.history_arrays()``.
      x: the horizontal axis, a key of :data:`X_AXES`: ``"round"``, ``"seconds"``, ``"sim_seconds"``
        (simulated time of a distributed run) or ``"bytes"`` (communicated; a log axis, where the
        starting point's 0 bytes is not drawn).
      optimum: the reference ``J*`` of the sub-optimality ``(J_k - J*) / |J*|`` (absolute
        ``J_k - J*`` when ``J* = 0``). Default: :func:`certified_lower_bound` over all
        histories, which assumes they minimise the same J.
      ax: None (a new figure with two panels), one ``Axes`` (both quantities on it: sub-optimality
        solid, gap dashed) or a pair of ``Axes`` (sub-optimality, gap).

    Returns:
      ``(ax_suboptimality, ax_gap)``, the two Axes drawn into (the same Axes twice when one was
      given); the figure is ``ax_suboptimality.figure``.

    Raises:
      ValueError: empty ``histories``, a history without the needed columns or with columns of
        different lengths, an unknown ``x``, a non-finite ``optimum``, a bad ``ax``.
    """
    _check_x(x)
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError("histories: must be a non-empty dict {label: history}")
    columns = {str(label): _history_columns(label, h, x) for label, h in histories.items()}
    optimum, reference = _reference(optimum, list(columns.values()))
    scale = abs(optimum) if optimum != 0 else 1.0
    ax_sub, ax_gap = _two_axes(ax)
    shared = ax_sub is ax_gap

    for i, (label, (xs, J, gap)) in enumerate(columns.items()):
        color = f"C{i % 10}"
        sub, rel_gap = _relative_curves(J, gap, optimum, scale)
        xs = _x_values(xs, x)
        ax_sub.plot(xs, sub, color=color, label=f"{label}: (J - J*)/|J*|" if shared else label)
        ax_gap.plot(xs, rel_gap, color=color, linestyle="--" if shared else "-",
                    label=f"{label}: gap/J" if shared else label)
    _finish_axes(ax_sub, ax_gap, x, optimum, reference)
    return ax_sub, ax_gap


def _check_x(x):
    if x not in X_AXES:
        raise ValueError(f"x: must be one of {sorted(X_AXES)}, got {x!r}")


def _reference(optimum, columns):
    """``(J*, how it was obtained)``: the given optimum (checked finite) or the certified lower bound."""
    if optimum is None:
        optimum = certified_lower_bound({i: {"objective": c[1], "gap": c[2]} for i, c in enumerate(columns)})
        return optimum, "certified bound"
    try:
        optimum = float(optimum)
    except (TypeError, ValueError):
        raise ValueError(f"optimum: must be a number, got {optimum!r}") from None
    if not np.isfinite(optimum):
        raise ValueError(f"optimum: must be finite, got {optimum!r}")
    return optimum, "given"


def _two_axes(ax):
    if ax is None:
        fig = Figure(figsize=(PAGE, 2.8), layout="constrained")
        ax_sub, ax_gap = fig.subplots(1, 2)
        return ax_sub, ax_gap
    if isinstance(ax, Axes):
        return ax, ax
    if isinstance(ax, Sequence) and len(ax) == 2 and all(isinstance(a, Axes) for a in ax):
        return ax[0], ax[1]
    raise ValueError("ax: must be None, a matplotlib Axes or a pair of Axes")


def _relative_curves(J, gap, optimum, scale):
    """(relative sub-optimality, relative gap), NaN where a log axis cannot show them."""
    sub = _positive_or_nan((J - optimum) / scale)
    rel_gap = _positive_or_nan(gap / np.maximum(np.abs(J), np.finfo(float).tiny))  # as FitResult.relative_gap
    return sub, rel_gap


def _x_values(xs, x):
    xs = np.asarray(xs, dtype=float)
    return _positive_or_nan(xs) if x in LOG_X_AXES else xs


def _finish_axes(ax_sub, ax_gap, x, optimum, reference, legend_loc="best"):
    shared = ax_sub is ax_gap
    ax_sub.set_yscale("log")
    ax_gap.set_yscale("log")
    ax_sub.set_xlabel(X_AXES[x])
    ax_gap.set_xlabel(X_AXES[x])
    if shared:
        ax_sub.set_ylabel("relative sub-optimality (solid), relative gap (dashed)")
        ax_sub.set_title(f"convergence, J* = {optimum:.8g} ({reference})")
        ax_sub.legend(loc=legend_loc)
    else:
        ax_sub.set_ylabel("(J - J*) / |J*|" if optimum != 0 else "J - J*")
        ax_sub.set_title(f"sub-optimality, J* = {optimum:.8g} ({reference})")
        ax_gap.set_ylabel("duality gap / J")
        ax_gap.set_title("relative duality gap (certificate)")
        ax_sub.legend(loc=legend_loc)
        ax_gap.legend(loc=legend_loc)
    for a in {id(ax_sub): ax_sub, id(ax_gap): ax_gap}.values():
        a.grid(True, which="major", alpha=0.3)
        if x in LOG_X_AXES:
            a.set_xscale("log")
        if x == "round":
            a.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))


def _seed_histories(label, value, x):
    """A label's value (one history, or a non-empty sequence of histories: seeds) -> list of columns."""
    if isinstance(value, Mapping):
        return [_history_columns(label, value, x)]
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        return [_history_columns(f"{label}[{i}]", h, x) for i, h in enumerate(value)]
    raise ValueError(f"runs[{label!r}]: must be a history (dict of arrays) or a non-empty list of histories "
                     f"(one per seed), got {type(value).__name__}")


def _common_grid(xs_list, x, points=400):
    """Positions at which the seeds of a label are compared: every round, else a grid over their range."""
    finite = [a[np.isfinite(a)] for a in xs_list]
    finite = [a for a in finite if len(a)]
    if not finite:
        return np.zeros(0)
    lo, hi = min(a.min() for a in finite), max(a.max() for a in finite)
    if x == "round":
        return np.arange(np.floor(lo), np.floor(hi) + 1)
    if x in LOG_X_AXES and lo > 0:
        return np.geomspace(lo, hi, points)
    return np.linspace(lo, hi, points)


def _on_grid(grid, xs, values):
    """log10 of ``values`` (positive ones) interpolated at ``grid``; NaN outside the run's x range."""
    logv = np.log10(_positive_or_nan(values))
    ok = np.isfinite(xs) & np.isfinite(logv)
    out = np.full(grid.shape, np.nan)
    if ok.sum() == 0:
        return out
    xo, vo = xs[ok], logv[ok]
    order = np.argsort(xo, kind="stable")
    xo, vo = xo[order], vo[order]
    inside = (grid >= xo[0]) & (grid <= xo[-1])
    out[inside] = np.interp(grid[inside], xo, vo)
    return out


def seed_band(histories, x, *, optimum, grid=None):
    """Mean and spread over seeds of the relative sub-optimality and gap, on a common x grid.

    Each seed's curves are interpolated (in log10) at the grid points inside its own x range. The mean is
    geometric (the mean of log10) and drawn only where every seed has a value (a run that stopped early
    is not averaged as if it went on); the band is the smallest to the largest seed's value where any has one.

    Args:
      histories: a list of histories (dicts of arrays with ``x``, ``"objective"``, ``"gap"``).
      x: a key of :data:`X_AXES`. optimum: the reference ``J*`` (a number).
      grid: positions (default: every round, or 400 points over the seeds' x range).

    Returns:
      ``{"x": grid, "sub": (mean, low, high), "gap": (mean, low, high)}``, each array the grid's length.
    """
    _check_x(x)
    cols = _seed_histories("histories", list(histories), x)
    optimum, _ = _reference(optimum, cols)
    scale = abs(optimum) if optimum != 0 else 1.0
    grid = _common_grid([c[0] for c in cols], x) if grid is None else np.asarray(grid, dtype=float)
    out = {"x": grid}
    for which in ("sub", "gap"):
        logs = np.stack([_on_grid(grid, xs, _relative_curves(J, gap, optimum, scale)[which == "gap"])
                         for xs, J, gap in cols])
        some = np.isfinite(logs).any(axis=0)
        every = np.isfinite(logs).all(axis=0)
        with np.errstate(invalid="ignore"):
            mean = np.where(every, np.mean(np.where(every, logs, 0.0), axis=0), np.nan)
            low = np.where(some, np.nanmin(np.where(some, logs, 0.0), axis=0), np.nan)
            high = np.where(some, np.nanmax(np.where(some, logs, 0.0), axis=0), np.nan)
        out[which] = (10.0 ** mean, 10.0 ** low, 10.0 ** high)
    return out


@styled
def plot_runs(runs, *, x="round", optimum=None, ax=None):
    """Sub-optimality and duality gap of several labelled runs, each one history or several seeds.

    Like :func:`plot_convergence` (same axes, labels and reference ``J*``), but a label may hold a list
    of histories (seeds of a randomised run: dropout, stragglers, sampling order): it is drawn as the
    geometric mean over the seeds with a band from the best to the worst seed (:func:`seed_band`).

    Args:
      runs: ``{label: history or [history, ...]}``; histories as for :func:`plot_convergence`.
      x: a key of :data:`X_AXES` (``"round"``, ``"seconds"``, ``"sim_seconds"``, ``"bytes"``).
      optimum: the reference ``J*`` (default: :func:`certified_lower_bound` over every history).
      ax: None (a new figure), one ``Axes`` or a pair ``(ax_suboptimality, ax_gap)``.

    Returns:
      ``(ax_suboptimality, ax_gap)``.

    Raises:
      ValueError: empty ``runs``, a label with no history, a history missing the ``x`` column (named),
        an unknown ``x``, a non-finite ``optimum``, a bad ``ax``.
    """
    _check_x(x)
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs: must be a non-empty dict {label: history or list of histories}")
    columns = {str(label): _seed_histories(label, v, x) for label, v in runs.items()}
    optimum, reference = _reference(optimum, [c for cols in columns.values() for c in cols])
    scale = abs(optimum) if optimum != 0 else 1.0
    ax_sub, ax_gap = _two_axes(ax)
    shared = ax_sub is ax_gap
    for i, (label, cols) in enumerate(columns.items()):
        color = f"C{i % 10}"
        style = dict(color=color, linestyle="--" if shared else "-")
        if len(cols) == 1:
            xs, J, gap = cols[0]
            sub, rel_gap = _relative_curves(J, gap, optimum, scale)
            xs = _x_values(xs, x)
        else:
            histories = [{x: c[0], "objective": c[1], "gap": c[2]} for c in cols]
            band = seed_band(histories, x, optimum=optimum)
            xs = _x_values(band["x"], x)
            (sub, *sub_band), (rel_gap, *gap_band) = band["sub"], band["gap"]
            ax_sub.fill_between(xs, *sub_band, color=color, alpha=0.2, linewidth=0)
            ax_gap.fill_between(xs, *gap_band, color=color, alpha=0.2, linewidth=0)
            label = f"{label} ({len(cols)} seeds)"
        ax_sub.plot(xs, sub, color=color, label=f"{label}: (J - J*)/|J*|" if shared else label)
        ax_gap.plot(xs, rel_gap, label=f"{label}: gap/J" if shared else label, **style)
    # A fixed legend corner: "best" scans every vertex of every line for overlaps, seconds per figure for long
    # histories; curves run from the upper left down to the right, so the upper right is usually free.
    _finish_axes(ax_sub, ax_gap, x, optimum, reference, legend_loc="upper right")
    return ax_sub, ax_gap


@styled
def plot_runs_grid(runs, *, xs=("round", "bytes", "sim_seconds"), optimum=None, title=None):
    """A figure of :func:`plot_runs`, one row per horizontal axis in ``xs`` (sub-optimality left, gap right).

    Returns:
      the ``Figure``; its axes are ``fig.axes`` (row by row).
    """
    xs = tuple(xs)
    if not xs:
        raise ValueError("xs: need at least one horizontal axis")
    for x in xs:
        _check_x(x)
    fig = Figure(figsize=(PAGE, 2.5 * len(xs) + (0.25 if title else 0.0)), layout="constrained")
    axes = fig.subplots(len(xs), 2, squeeze=False)
    for row, x in zip(axes, xs):
        plot_runs(runs, x=x, optimum=optimum, ax=(row[0], row[1]))
    if title:
        fig.suptitle(title)
    return fig


@styled
def plot_omega(Omega, *, ax=None, order=None, title=None):
    """Heat map of a task covariance ``Omega`` (m, m), optionally with the tasks reordered.

    The colour scale is diverging and symmetric about 0 (``Omega`` is positive semi-definite, but
    off-diagonal entries can be negative: anti-correlated tasks).

    Args:
      Omega: (m, m) real, finite matrix (``FitResult.Omega``).
      ax: an ``Axes`` to draw into; None makes a new figure.
      order: (m,) a permutation of 0..m-1; row/column i of the picture is task ``order[i]``.
        To group planted clusters: ``order=np.argsort(clusters, kind="stable")``.
      title: the Axes title (default ``"Omega (m x m)"``).

    Returns:
      the ``Axes`` drawn into (its figure is ``ax.figure``; a colour bar is attached).

    Raises:
      ValueError: ``Omega`` not a finite square real matrix, ``order`` not a permutation, bad ``ax``.
    """
    Omega = check_square_matrix("Omega", Omega)
    m = Omega.shape[0]
    if order is not None:
        order = np.asarray(order)
        if order.shape != (m,) or order.dtype.kind not in "iu" or not np.array_equal(np.sort(order), np.arange(m)):
            raise ValueError(f"order: must be a permutation of 0..{m - 1} (integer array of shape ({m},))")
        Omega = Omega[np.ix_(order, order)]
    if ax is None:
        fig = Figure(figsize=(COLUMN, 2.9), layout="constrained")
        ax = fig.subplots()
    elif not isinstance(ax, Axes):
        raise ValueError("ax: must be None or a matplotlib Axes")
    vmax = float(np.max(np.abs(Omega))) or 1.0
    image = ax.imshow(Omega, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, shrink=0.85)
    ax.set_title(f"Omega ({m} x {m})" if title is None else title)
    ax.set_xlabel("task" + (" (reordered)" if order is not None else ""))
    ax.set_ylabel("task" + (" (reordered)" if order is not None else ""))
    return ax


def save_figure(fig, path, *, dpi=None, also=()):
    """Write ``fig`` to ``path`` atomically (in :func:`paper_style`) and close it.

    The image goes to a temporary file next to ``path`` which is renamed over ``path``
    (``os.replace``) only once complete, so a reader never sees a partial image; on failure no
    temporary file is left. The format follows the extension (``.png``, ``.pdf``, ``.svg``, ...).
    The figure is closed afterwards (released from ``pyplot`` if it was made there), also on failure.

    Args:
      fig: a matplotlib ``Figure`` (an ``Axes`` is accepted too: its figure is saved).
      path: the output file.
      dpi: resolution of raster formats (default: :data:`STYLE`'s ``savefig.dpi``, 200).
      also: more formats written next to ``path`` with the same stem, e.g. ``("pdf",)`` for a PNG's vector
        twin (``fig.png`` and ``fig.pdf``).

    Returns:
      ``path`` as a string.
    """
    if isinstance(fig, Axes):
        fig = fig.figure
    if not isinstance(fig, Figure):
        raise ValueError(f"fig: must be a matplotlib Figure, got {type(fig).__name__}")
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    ext = ext.lower().lstrip(".")
    if not ext:
        raise ValueError(f"path: {path!r} needs an extension naming the image format (e.g. .png)")
    supported = fig.canvas.get_supported_filetypes()
    if ext not in supported:
        raise ValueError(f"path: unsupported image format {ext!r}; expected one of {', '.join(sorted(supported))}")
    if isinstance(also, str):
        also = (also,)
    extra = [str(e).lower().lstrip(".") for e in also]
    for e in extra:
        if e not in supported:
            raise ValueError(f"also: unsupported image format {e!r}; expected one of {', '.join(sorted(supported))}")
    try:
        with paper_style():
            for target, fmt in [(path, ext)] + [(f"{stem}.{e}", e) for e in extra if e != ext]:
                with atomic_write(target, "wb") as f:
                    fig.savefig(f, format=fmt, dpi=dpi)  # None: rcParams savefig.dpi
    finally:
        if "matplotlib.pyplot" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["matplotlib.pyplot"].close(fig)
    return path


def _seed_band(a, name):
    """(S, T, K) or (T, K) -> mean over seeds and std over seeds (0 for one seed), each (T, K)."""
    a = np.asarray(a, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"{name}: must have shape (S, T, K) or (T, K), got {np.shape(a)}")
    return a.mean(axis=0), a.std(axis=0)


@styled
def plot_task_curves(curves, *, x=None, task_names=None, log_loss=True, axes=None):
    """Task losses (top row) and task weights (bottom row) over training, one column per run label.

    Each line is one task: the mean over seeds, with a band of +- one standard deviation over seeds.
    Typical use: ``{scheme: {"task_losses": res.history.task_losses, "weights": res.history.weights}}``
    for the results of :func:`mtl_jax.training.train_seeds`.

    Args:
      curves: ``{label: {"task_losses": a, "weights": b}}``, ``a`` and ``b`` of shape (S, T, K) (seeds,
        steps, tasks) or (T, K); T and K must agree across labels.
      x: (T,) positions on the horizontal axis (e.g. the step of each binned value); default 0..T-1.
      task_names: K names for the legend (default ``task 0``, ...).
      log_loss: log scale for the losses (values <= 0 are not drawn).
      axes: None (a new figure) or a (2, n_labels) array of ``Axes`` to draw into.

    Returns:
      the (2, n_labels) array of Axes; the figure is ``axes[0, 0].figure``.

    Raises:
      ValueError: empty ``curves``, missing keys, shapes that disagree, wrong ``x``/``task_names``/``axes``.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves: must be a non-empty dict {label: {'task_losses': ..., 'weights': ...}}")
    bands = {}
    for label, c in curves.items():
        if not isinstance(c, Mapping) or not {"task_losses", "weights"} <= set(c):
            raise ValueError(f"curves[{label!r}]: must be a dict with 'task_losses' and 'weights'")
        loss = _seed_band(c["task_losses"], f"curves[{label!r}]['task_losses']")
        weight = _seed_band(c["weights"], f"curves[{label!r}]['weights']")
        if loss[0].shape != weight[0].shape:
            raise ValueError(f"curves[{label!r}]: task_losses and weights differ in shape "
                             f"{loss[0].shape} vs {weight[0].shape}")
        bands[str(label)] = (loss, weight)
    shapes = {b[0][0].shape for b in bands.values()}
    if len(shapes) != 1:
        raise ValueError(f"curves: all labels need the same (T, K), got {sorted(shapes)}")
    (t_len, k), = shapes
    xs = np.arange(t_len) if x is None else np.asarray(x, dtype=float)
    if xs.shape != (t_len,):
        raise ValueError(f"x: must have shape ({t_len},), got {np.shape(x)}")
    names = [f"task {i}" for i in range(k)] if task_names is None else [str(n) for n in task_names]
    if len(names) != k:
        raise ValueError(f"task_names: need {k} names, got {len(names)}")
    n = len(bands)
    if axes is None:
        # 1.5 in per run: a wide figure for many runs rather than panels too narrow to read
        fig = Figure(figsize=(max(COLUMN, 1.5 * n + 0.8), 3.6 + 0.2 * -(-k // 5)), layout="constrained")
        axes = fig.subplots(2, n, sharex=True, sharey="row", squeeze=False)
    else:
        axes = np.asarray(axes, dtype=object)
        if axes.shape != (2, n) or not all(isinstance(a, Axes) for a in axes.flat):
            raise ValueError(f"axes: must be a (2, {n}) array of matplotlib Axes")

    for j, (label, rows) in enumerate(bands.items()):
        for i, (mean, std) in enumerate(rows):
            ax = axes[i, j]
            log = log_loss and i == 0
            for t in range(k):
                color = f"C{t % 10}"
                lo, hi = mean[:, t] - std[:, t], mean[:, t] + std[:, t]
                if log:
                    lo, hi = _positive_or_nan(lo), _positive_or_nan(hi)
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
                ax.plot(xs, _positive_or_nan(mean[:, t]) if log else mean[:, t], color=color, linewidth=1.0,
                        label=names[t])
            if log:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0, j].set_title(label)
        axes[1, j].set_xlabel("step")
    _fit_titles(axes[0])
    axes[0, 0].set_ylabel("task loss (batch)" + (", log" if log_loss else ""))
    axes[1, 0].set_ylabel("task weight")
    # one legend for the figure, under the panels (inside the first panel it covered its curves and label)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].figure.legend(handles, labels, loc="outside lower center", ncol=min(k, 5), fontsize="small")
    return axes


def _wrap_label(label: str, width: int) -> str:
    """``label`` broken after underscores or spaces into lines of at most ``width`` characters where it can be
    (a single longer word stays whole)."""
    if len(label) <= width:
        return label
    lines, line = [], ""
    for part in re.split(r"(?<=[_ ])", label):
        if line and len(line) + len(part) > width:
            lines.append(line.rstrip())
            line = part
        else:
            line += part
    return "\n".join(lines + [line.rstrip()])


def _fit_titles(row) -> None:
    """Wrap each title of a row of side-by-side axes to its axes' width, so that long run names
    (``huq_pervin_proportional``) do not run into their neighbours'."""
    for ax in row:
        title = ax.title
        text = title.get_text()
        if not text:
            continue
        width_in = ax.get_position().width * ax.figure.get_size_inches()[0]
        # an average glyph is about 0.55 em wide; keep a margin between neighbouring titles
        size = title.get_fontsize()
        chars = max(4, int(width_in * 72 / (0.58 * size)))
        wrapped = _wrap_label(text.replace("\n", " "), chars)
        longest = max(len(line) for line in wrapped.split("\n"))
        if longest > chars:  # a word wider than the panel: a smaller font rather than a collision
            title.set_fontsize(max(5.0, size * chars / longest))
        title.set_text(wrapped)


# --- sweep heat maps ------------------------------------------------------------------------------------

def _grid_axis(values):
    """``(order, edges, log)`` of one swept hyper-parameter: the permutation sorting ``values``, the cell edges
    of the sorted values (geometric midpoints on a log axis when all are > 0, else cell indices), log or not."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    v = values[order]
    if np.all(v > 0):
        logs = np.log10(v)
        if len(v) == 1:
            return order, 10.0 ** (logs[0] + np.array([-0.5, 0.5])), True
        mids = (logs[:-1] + logs[1:]) / 2
        edges = np.concatenate([[2 * logs[0] - mids[0]], mids, [2 * logs[-1] - mids[-1]]])
        return order, 10.0 ** edges, True
    return order, np.arange(len(v) + 1) - 0.5, False


def _label_index_axis(axis, values):
    """Categorical axis: one tick per cell, labelled with its value."""
    axis.set_ticks(np.arange(len(values)))
    axis.set_ticklabels([f"{v:.3g}" for v in values])


@styled
def plot_sweep(values, lam1, lam2, *, selected=None, ax=None, title=None, label=None, log_color=None):
    """Heat map of a metric over a (lam1, lam2) sweep grid: lam1 across, lam2 up, log axes (when > 0).

    Args:
      values: (n1, n2) or (S, n1, n2), ``[s, i, j]`` the metric of seed s at ``(lam1[i], lam2[j])``
        (``SweepResult.metric_grid``); with seeds the mean over seeds is drawn (NaN ignored).
      lam1, lam2: (n1,), (n2,) the grid's values in the order of ``values`` (any order; drawn sorted). A
        hyper-parameter with a value <= 0 (e.g. lam2 = 0) is drawn on an index axis labelled with its values.
      selected: None or (k, 2) the selected ``(lam1, lam2)`` of each seed: circled in red, with the number of
        seeds that chose a point next to it when k > 1.
      ax: an ``Axes`` to draw into; None makes a new :data:`COLUMN`-wide figure.
      title: the Axes title. label: the colour bar's label.
      log_color: a log colour scale; default when every value is > 0 and they span more than a factor 20.

    Returns:
      the ``Axes`` (its figure is ``ax.figure``; a colour bar is attached).

    Raises:
      ValueError: ``values`` not of shape (n1, n2) / (S, n1, n2), ``selected`` not (k, 2) grid values, bad ``ax``.
    """
    from matplotlib.colors import LogNorm, Normalize

    lam1, lam2 = np.asarray(lam1, float).ravel(), np.asarray(lam2, float).ravel()
    values = np.asarray(values, dtype=float)
    if values.ndim == 3:
        with np.errstate(invalid="ignore"), _quiet_nan_warnings():
            values = np.nanmean(values, axis=0)
    if values.ndim != 2 or values.shape != (len(lam1), len(lam2)) or 0 in values.shape:
        raise ValueError(f"values: must have shape (n1, n2) = ({len(lam1)}, {len(lam2)}) or (S, n1, n2), "
                         f"got {np.shape(values)}")
    o1, e1, log1 = _grid_axis(lam1)
    o2, e2, log2 = _grid_axis(lam2)
    Z = values[np.ix_(o1, o2)]
    finite = Z[np.isfinite(Z)]
    if log_color is None:
        log_color = finite.size > 0 and finite.min() > 0 and finite.max() > 20 * finite.min()
    norm = (LogNorm(finite.min(), finite.max()) if log_color and finite.size and finite.min() > 0
            else Normalize(*(finite.min(), finite.max()) if finite.size else (0, 1)))
    if ax is None:
        fig = Figure(figsize=(COLUMN, 2.7), layout="constrained")
        ax = fig.subplots()
    elif not isinstance(ax, Axes):
        raise ValueError("ax: must be None or a matplotlib Axes")
    mesh = ax.pcolormesh(e1, e2, np.ma.masked_invalid(Z.T), norm=norm, cmap="viridis", shading="flat")
    ax.figure.colorbar(mesh, ax=ax, label=label)
    if log1:
        ax.set_xscale("log")
    else:
        _label_index_axis(ax.xaxis, lam1[o1])
    if log2:
        ax.set_yscale("log")
    else:
        _label_index_axis(ax.yaxis, lam2[o2])
    ax.set_xlim(e1[0], e1[-1])
    ax.set_ylim(e2[0], e2[-1])
    ax.set_xlabel("lam1 (Frobenius)")
    ax.set_ylabel("lam2 (task coupling)")
    if selected is not None:
        chosen = np.asarray(selected, dtype=float).reshape(-1, 2) if np.size(selected) else np.zeros((0, 2))
        pos1 = {v: k for k, v in enumerate(lam1[o1])}
        pos2 = {v: k for k, v in enumerate(lam2[o2])}
        counts = {}
        for a, b in chosen:
            if a not in pos1 or b not in pos2:
                raise ValueError(f"selected: ({a:g}, {b:g}) is not a point of the grid")
            counts[(a, b)] = counts.get((a, b), 0) + 1
        for (a, b), c in counts.items():
            xa = a if log1 else pos1[a]
            yb = b if log2 else pos2[b]
            ax.scatter([xa], [yb], s=28 + 10 * c, facecolors="none", edgecolors="red", linewidths=1.2, zorder=3)
            if len(chosen) > 1:
                ax.annotate(str(c), (xa, yb), xytext=(4, 3), textcoords="offset points", color="red", fontsize=7,
                            zorder=4)
    if title is not None:
        ax.set_title(title)
    return ax


@contextlib.contextmanager
def _quiet_nan_warnings():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


def _sweep_parts(sweep):
    """``(lam1, lam2, val (S, P), test (S, P), selected (S,), points (P, 2), metric)`` of a
    :class:`mtl_jax.runner.sweep.SweepResult`, or of a sweep run (``store.read_run``/``read_sweep``'s dict)."""
    if hasattr(sweep, "grid") and hasattr(sweep, "val"):
        return (np.asarray(sweep.grid.lam1), np.asarray(sweep.grid.lam2), np.asarray(sweep.val),
                np.asarray(sweep.test), np.asarray(sweep.selected), np.asarray(sweep.points), sweep.metric)
    if hasattr(sweep, "manifest"):   # a store.Run
        sweep = {"config": sweep.config, "arrays": sweep.arrays}
    try:
        cfg, arrays = sweep["config"]["sweep"], sweep["arrays"]
        return (np.asarray(cfg["lam1"], float), np.asarray(cfg["lam2"], float), arrays["val"], arrays["test"],
                arrays["selected"], arrays["points"], cfg.get("metric", "mse"))
    except (KeyError, TypeError):
        raise ValueError("sweep: must be a SweepResult or a sweep run (config['sweep'] with lam1, lam2; arrays "
                         "val, test, selected, points)") from None


@styled
def plot_sweep_run(sweep, *, which=("val", "test"), title=None):
    """The figure of a sweep: one :func:`plot_sweep` heat map per metric in ``which`` (``"val"``: validation,
    ``"test"``), mean over seeds, each seed's selected point circled; the title gives the test metric at the
    selected points, mean +- standard deviation over seeds.

    Args:
      sweep: a :class:`mtl_jax.runner.sweep.SweepResult`, a sweep run (``store.read_run``) or
        ``read_sweep``'s dict.
      which: the panels, left to right. title: the figure's title (default: the test summary).

    Returns:
      the ``Figure`` (:data:`COLUMN` wide for one panel, :data:`PAGE` for two).
    """
    lam1, lam2, val, test, selected, points, metric = _sweep_parts(sweep)
    which = (which,) if isinstance(which, str) else tuple(which)
    if not which or any(w not in ("val", "test") for w in which):
        raise ValueError(f"which: panels from ('val', 'test'), got {which!r}")
    S, n1, n2 = len(selected), len(lam1), len(lam2)
    grids = {"val": np.asarray(val, float).reshape(S, n1, n2), "test": np.asarray(test, float).reshape(S, n1, n2)}
    chosen = np.asarray(points)[np.asarray(selected, int)]
    name = "MSE" if metric == "mse" else "error rate" if metric == "error" else metric
    fig = Figure(figsize=(COLUMN if len(which) == 1 else PAGE, 2.7), layout="constrained")
    axes = fig.subplots(1, len(which), squeeze=False)[0]
    seeds = f"mean over {S} seeds" if S > 1 else "one seed"
    for ax, w in zip(axes, which):
        what = {"val": "validation", "test": "test"}[w]
        plot_sweep(grids[w], lam1, lam2, selected=chosen, ax=ax, title=f"{what} {name} ({seeds})",
                   label=f"{what} {name}")
    at = np.asarray(test, float)[np.arange(S), np.asarray(selected, int)]
    spread = f" +- {np.std(at, ddof=1):.3g} (std over {S} seeds)" if S > 1 else ""
    fig.suptitle(title if title is not None else
                 f"test {name} at the selected points (circled): {np.mean(at):.4g}{spread}")
    return fig
