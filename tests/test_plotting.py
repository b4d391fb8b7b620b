"""mtl_jax.plotting: figures build without a display, reference values, atomic saving."""
import os

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mtl_jax import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def histories():
    J = np.array([10.0, 6.0, 5.2, 5.01, 5.001])
    gap = np.array([8.0, 2.0, 0.3, 0.02, 0.002])
    run = {"round": np.arange(1, 6), "objective": J, "gap": gap, "seconds": np.linspace(0.1, 0.5, 5)}
    slow = {"round": np.arange(1, 4), "objective": J[:3] + 1, "gap": gap[:3] + 1, "seconds": np.linspace(0.2, 0.6, 3)}
    return {"fast": run, "slow": slow}


def test_certified_lower_bound_is_max_of_J_minus_gap(histories):
    J, gap = histories["fast"]["objective"], histories["fast"]["gap"]
    assert plotting.certified_lower_bound(histories) == pytest.approx(np.max(J - gap))
    assert plotting.certified_lower_bound(histories) >= J.min() - gap.min()


def test_certified_lower_bound_without_gaps_falls_back_to_best_J():
    h = {"a": {"objective": np.array([3.0, 2.0]), "gap": np.array([np.nan, np.nan])}}
    assert plotting.certified_lower_bound(h) == 2.0


def test_plot_convergence_returns_two_log_axes(histories):
    ax_sub, ax_gap = plotting.plot_convergence(histories)
    assert isinstance(ax_sub, Axes) and isinstance(ax_gap, Axes) and ax_sub.figure is ax_gap.figure
    assert ax_sub.get_yscale() == ax_gap.get_yscale() == "log"
    assert [t.get_text() for t in ax_sub.get_legend().get_texts()] == ["fast", "slow"]
    fast_line = ax_sub.get_lines()[0]
    lower = 5.001 - 0.002       # max over both runs of J_k - gap_k, at the last round of "fast"
    np.testing.assert_allclose(fast_line.get_ydata(), (histories["fast"]["objective"] - lower) / lower)
    np.testing.assert_allclose(ax_gap.get_lines()[0].get_ydata(), histories["fast"]["gap"] / histories["fast"]["objective"])


def test_plot_convergence_given_optimum_seconds_and_single_axes(histories):
    fig = Figure()
    ax = fig.subplots()
    ax_sub, ax_gap = plotting.plot_convergence(histories, x="seconds", optimum=5.0, ax=ax)
    assert ax_sub is ax_gap is ax
    fast = ax.get_lines()[0]
    np.testing.assert_array_equal(fast.get_xdata(), histories["fast"]["seconds"])
    np.testing.assert_allclose(fast.get_ydata(), (histories["fast"]["objective"] - 5.0) / 5.0)
    assert len(ax.get_lines()) == 4     # sub-optimality and gap per run


def test_plot_convergence_masks_non_positive_values_for_log_axes():
    h = {"a": {"round": np.arange(1, 4), "objective": np.array([2.0, 1.0, 1.0]), "gap": np.array([1.0, 0.0, np.nan])}}
    ax_sub, ax_gap = plotting.plot_convergence(h, optimum=1.0)
    assert np.isnan(ax_sub.get_lines()[0].get_ydata()[1:]).all()
    assert np.isnan(ax_gap.get_lines()[0].get_ydata()[1:]).all()


def test_plot_convergence_accepts_an_empty_history(histories):
    empty = {k: np.array([]) for k in ("round", "objective", "gap", "seconds")}
    plotting.plot_convergence({**histories, "resumed at optimum": empty})


@pytest.mark.parametrize("kwargs, match", [
    (dict(histories={}), "histories"),
    (dict(histories={"a": {"round": [1], "objective": [1.0]}}), "gap"),
    (dict(histories={"a": {"round": [1, 2], "objective": [1.0], "gap": [0.1]}}), "length"),
    (dict(histories={"a": {"round": [1], "objective": [1.0], "gap": [0.1]}}, x="time"), "x"),
    (dict(histories={"a": {"round": [1], "objective": [1.0], "gap": [0.1]}}, optimum=float("nan")), "optimum"),
])
def test_plot_convergence_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_convergence(**kwargs)


def test_plot_omega_reorders(rng):
    A = rng.normal(size=(5, 3))
    Omega = A @ A.T
    order = np.array([4, 2, 0, 1, 3])
    ax = plotting.plot_omega(Omega, order=order, title="learned")
    assert isinstance(ax, Axes) and ax.get_title() == "learned"
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), Omega[np.ix_(order, order)])


@pytest.mark.parametrize("Omega, order, match", [
    (np.ones((2, 3)), None, "Omega"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), None, "NaN"),
    (np.eye(3), np.array([0, 0, 1]), "permutation"),
])
def test_plot_omega_rejects_bad_input(Omega, order, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_omega(Omega, order=order)


def test_save_figure_writes_png_atomically(tmp_path, histories):
    ax_sub, _ = plotting.plot_convergence(histories)
    path = tmp_path / "conv.png"
    path.write_bytes(b"old")
    assert plotting.save_figure(ax_sub.figure, path) == str(path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert os.listdir(tmp_path) == ["conv.png"]


def test_save_figure_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    ax = plotting.plot_omega(np.eye(3))
    path = tmp_path / "omega.png"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ax.figure, "savefig", fail)
    with pytest.raises(RuntimeError):
        plotting.save_figure(ax.figure, path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["omega.png"]


def test_save_figure_rejects_unknown_format(tmp_path):
    ax = plotting.plot_omega(np.eye(2))
    with pytest.raises(ValueError, match="format"):
        plotting.save_figure(ax.figure, tmp_path / "omega.xyz")
    assert os.listdir(tmp_path) == []


def test_save_figure_closes_pyplot_figures(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    plotting.plot_omega(np.eye(2), ax=fig.subplots())
    plotting.save_figure(fig, tmp_path / "o.png")
    assert not plt.fignum_exists(fig.number)


# --- the distributed solver's axes (bytes, simulated seconds) and seeds -------------------------------

@pytest.fixture
def rounds():
    """Histories shaped like a distributed solver's (RoundRecord columns), round 0 the starting point."""
    J = np.array([10.0, 6.0, 5.2, 5.01, 5.001])
    gap = np.array([8.0, 2.0, 0.3, 0.02, 0.002])
    return {"round": np.arange(5), "objective": J, "gap": gap, "seconds": np.linspace(0.0, 0.4, 5),
            "bytes": np.array([0, 100, 200, 300, 400]), "sim_seconds": np.array([0.0, 0.2, 0.45, 0.6, 0.9])}


@pytest.mark.parametrize("x", ["sim_seconds", "bytes"])
def test_plot_convergence_new_x_axes(rounds, x):
    ax_sub, ax_gap = plotting.plot_convergence({"run": rounds}, x=x, optimum=5.0)
    line = ax_sub.get_lines()[0]
    expected = rounds[x].astype(float)
    if x == "bytes":                          # log axis: the starting point's 0 bytes is not drawn
        expected = np.where(expected > 0, expected, np.nan)
    np.testing.assert_array_equal(line.get_xdata(), expected)
    np.testing.assert_allclose(line.get_ydata(), (rounds["objective"] - 5.0) / 5.0)
    assert ax_sub.get_xlabel() == ax_gap.get_xlabel() == plotting.X_AXES[x]
    assert ax_sub.get_xscale() == ("log" if x == "bytes" else "linear")


@pytest.mark.parametrize("x", ["sim_seconds", "bytes"])
def test_plot_convergence_missing_x_column_is_named(histories, x):
    with pytest.raises(ValueError, match=rf"missing column\(s\) \['{x}'\]"):
        plotting.plot_convergence(histories, x=x)
    with pytest.raises(ValueError, match=x):
        plotting.plot_runs({"a": [histories["fast"], histories["slow"]]}, x=x)


def test_x_axes_are_the_cli_choices():
    from mtl_jax.cli import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["plot"]._actions if a.dest == "x")
    assert tuple(action.choices) == tuple(plotting.X_AXES)


def test_plot_runs_single_history_matches_plot_convergence(rounds):
    a = plotting.plot_runs({"run": rounds}, x="bytes")
    b = plotting.plot_convergence({"run": rounds}, x="bytes")
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa.get_lines()[0].get_xdata(), pb.get_lines()[0].get_xdata())
        np.testing.assert_array_equal(pa.get_lines()[0].get_ydata(), pb.get_lines()[0].get_ydata())
        assert pa.get_title() == pb.get_title()


def test_seed_band_geometric_mean_and_spread(rounds):
    other = dict(rounds, objective=5.0 + (rounds["objective"] - 5.0) * 4, gap=rounds["gap"] * 4)
    short = {k: v[:3] for k, v in rounds.items()}   # a seed that stopped after round 2
    band = plotting.seed_band([rounds, other, short], "round", optimum=5.0)
    np.testing.assert_array_equal(band["x"], np.arange(5))
    sub, low, high = band["sub"]
    base = (rounds["objective"] - 5.0) / 5.0
    np.testing.assert_allclose(sub[:3], base[:3] * 4 ** (1 / 3))   # geometric mean of 1, 4, 1 times the base
    assert np.isnan(sub[3:]).all()                                  # not every seed ran that long
    np.testing.assert_allclose(low, base)
    np.testing.assert_allclose(high, base * 4)
    r, o = rounds["gap"] / rounds["objective"], other["gap"] / other["objective"]
    np.testing.assert_allclose(band["gap"][0][:3], np.cbrt(r * r * o)[:3])


def test_plot_runs_with_seeds_draws_mean_and_band(rounds):
    other = dict(rounds, objective=rounds["objective"] + 0.5, sim_seconds=rounds["sim_seconds"] * 2)
    ax_sub, ax_gap = plotting.plot_runs({"dropout": [rounds, other], "plain": rounds}, x="sim_seconds",
                                        optimum=5.0)
    assert [t.get_text() for t in ax_sub.get_legend().get_texts()] == ["dropout (2 seeds)", "plain"]
    assert len(ax_sub.collections) == len(ax_gap.collections) == 1      # one band, for the seeded label
    xs = ax_sub.get_lines()[0].get_xdata()
    assert xs[0] == 0.0 and xs[-1] == pytest.approx(1.8)                  # the grid spans both seeds' x range


def test_plot_runs_grid_has_a_row_per_axis(rounds):
    fig = plotting.plot_runs_grid({"a": rounds, "b": [rounds, rounds]}, title="t")
    assert len(fig.axes) == 6
    assert [a.get_xlabel() for a in fig.axes[::2]] == [plotting.X_AXES[x] for x in ("round", "bytes", "sim_seconds")]
    with pytest.raises(ValueError, match="x"):
        plotting.plot_runs_grid({"a": rounds}, xs=("round", "time"))


@pytest.mark.parametrize("runs, match", [
    ({}, "runs"),
    ({"a": []}, "non-empty list"),
    ({"a": "history"}, "non-empty list"),
])
def test_plot_runs_rejects_bad_input(runs, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_runs(runs)


# ----------------------------------------------------------------------------- style, sweep heat maps

def test_every_figure_is_made_in_the_paper_style_and_the_callers_settings_come_back(histories):
    import matplotlib
    before = dict(matplotlib.rcParams)
    ax_sub, _ = plotting.plot_convergence(histories)
    assert tuple(ax_sub.figure.get_size_inches()) == pytest.approx((plotting.PAGE, 2.8))
    assert ax_sub.title.get_fontsize() == plotting.STYLE["axes.titlesize"]
    assert ax_sub.xaxis.label.get_fontsize() == plotting.STYLE["axes.labelsize"]
    omega = plotting.plot_omega(np.eye(3))
    assert omega.figure.get_size_inches()[0] == plotting.COLUMN
    heat = plotting.plot_sweep(np.ones((2, 2)), [0.1, 1], [0.1, 1])
    assert heat.figure.get_size_inches()[0] == plotting.COLUMN
    fonts = [v for k, v in plotting.STYLE.items() if k.endswith(("fontsize", "labelsize", "titlesize", "font.size"))]
    assert len(fonts) == 8 and all(7 <= v <= 9 for v in fonts)      # readable at 3.4 / 7 in
    assert dict(matplotlib.rcParams) == before
    with plotting.paper_style():
        assert matplotlib.rcParams["font.size"] == plotting.STYLE["font.size"]


def test_plot_sweep_draws_the_mean_over_seeds_sorted_on_log_axes():
    lam1, lam2 = [1.0, 0.01, 0.1], [0.5, 5.0]           # unsorted, as a grid may be written
    values = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2) + 1
    ax = plotting.plot_sweep(values, lam1, lam2, selected=[(0.1, 5.0), (0.1, 5.0)], title="val")
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_title() == "val"
    mesh = ax.collections[0]
    order1 = np.argsort(lam1)
    expected = values.mean(axis=0)[order1].T            # rows: lam2 ascending; columns: lam1 ascending
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(2, 3), expected)
    edges = mesh.get_coordinates()[0, :, 0]
    assert edges[0] < 0.01 < edges[1] < 0.1 < edges[2] < 1.0 < edges[3]
    np.testing.assert_allclose(edges[1], np.sqrt(0.01 * 0.1))   # geometric midpoints
    marks = ax.collections[1]
    np.testing.assert_allclose(marks.get_offsets(), [[0.1, 5.0]])
    assert [t.get_text() for t in ax.texts] == ["2"]     # two seeds chose that point


def test_plot_sweep_with_a_zero_value_uses_an_index_axis():
    ax = plotting.plot_sweep(np.ones((2, 3)), [0.1, 1.0], [0.0, 1.0, 10.0], selected=[(1.0, 0.0)])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "10"]
    np.testing.assert_allclose(ax.collections[1].get_offsets(), [[1.0, 0.0]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(values=np.ones((3, 2))), "values"),
    (dict(values=np.ones((2, 2)), selected=[(0.5, 1.0)]), "selected"),
    (dict(values=np.ones((2, 2)), ax="x"), "ax"),
])
def test_plot_sweep_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_sweep(lam1=[0.1, 1.0], lam2=[0.1, 1.0], **kwargs)


def test_plot_sweep_run_of_a_sweep_result_a_run_and_read_sweep():
    from types import SimpleNamespace

    from mtl_jax.runner import store
    lam1, lam2 = [1.0, 0.1], [0.1, 1.0]
    points = np.array([(a, b) for a in lam1 for b in lam2])
    rng = np.random.default_rng(0)
    val, test, selected = rng.random((2, 4)) + 0.5, rng.random((2, 4)) + 0.5, np.array([1, 3])
    config = {"sweep": {"lam1": lam1, "lam2": lam2, "metric": "mse"}}
    arrays = {"val": val, "test": test, "selected": selected, "points": points}
    result = SimpleNamespace(grid=SimpleNamespace(lam1=lam1, lam2=lam2), val=val, test=test, selected=selected,
                             points=points, metric="mse")
    run = store.Run("mem", {"kind": "sweep", "config": config}, [], arrays)
    for source in (result, run, {"config": config, "arrays": arrays}):
        fig = plotting.plot_sweep_run(source)
        assert len(fig.axes) == 4 and fig.get_size_inches()[0] == plotting.PAGE   # 2 heat maps + colour bars
        mean = val.reshape(2, 2, 2).mean(axis=0)[::-1]                               # lam1 drawn ascending
        np.testing.assert_allclose(np.asarray(fig.axes[0].collections[0].get_array()).reshape(2, 2), mean.T)
        np.testing.assert_allclose(fig.axes[0].collections[1].get_offsets(), [[1.0, 1.0]])
        np.testing.assert_allclose(fig.axes[0].collections[2].get_offsets(), [[0.1, 1.0]])
        at = test[[0, 1], selected]
        assert f"{at.mean():.4g} +- {np.std(at, ddof=1):.3g}" in fig._suptitle.get_text()
    one = plotting.plot_sweep_run(result, which="test")
    assert len(one.axes) == 2 and one.get_size_inches()[0] == plotting.COLUMN
    with pytest.raises(ValueError, match="which"):
        plotting.plot_sweep_run(result, which=("W",))
    with pytest.raises(ValueError, match="sweep"):
        plotting.plot_sweep_run({"config": {}})


def test_save_figure_also_writes_a_pdf_twin(tmp_path):
    ax = plotting.plot_omega(np.eye(2))
    path = plotting.save_figure(ax.figure, tmp_path / "o.png", also=("pdf",))
    assert path == str(tmp_path / "o.png")
    assert (tmp_path / "o.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "o.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match="also"):
        plotting.save_figure(ax.figure, tmp_path / "p.png", also=("bmpx",))
    assert sorted(os.listdir(tmp_path)) == ["o.pdf", "o.png"]


def test_task_curve_titles_of_long_run_names_do_not_overlap(tmp_path):
    # the task-weighting figure: ten runs side by side, some names much wider than a panel
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    rng = np.random.default_rng(0)
    names = ["equal", "huq_pervin", "huq_pervin_proportional", "huq_pervin_softmax", "dwa", "uncertainty",
             "uncertainty_loss", "rlw", "famo", "gradnorm"]
    curves = {n: dict(task_losses=rng.random((2, 30, 3)) + 0.1, weights=rng.random((2, 30, 3))) for n in names}
    axes = plotting.plot_task_curves(curves, task_names=["a", "b", "c"])
    fig = axes[0, 0].figure
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in axes[0]]
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, (left, right)
    # one figure legend, below every panel and their labels (it once sat over the first panel's y label)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "c"]
    below = legend.get_window_extent(renderer)
    for ax in axes.flat:
        assert below.y1 <= ax.get_tightbbox(renderer).y0 + 1, (below, ax)
    # wrapped at underscores, nothing lost
    assert [ax.title.get_text().replace("\n", "") for ax in axes[0]] == names
    assert "\n" in axes[0, 2].title.get_text() and axes[0, 0].title.get_text() == "equal"
    plotting.save_figure(fig, str(tmp_path / "curves.png"))


def test_wrap_label_breaks_after_separators_and_keeps_long_words():
    assert plotting._wrap_label("huq_pervin_proportional", 12) == "huq_pervin_\nproportional"
    assert plotting._wrap_label("short", 3) == "short"
    assert plotting._wrap_label("a_b_c_d", 4) == "a_b_\nc_d"
    assert plotting._wrap_label("one two three", 5) == "one\ntwo\nthree"
