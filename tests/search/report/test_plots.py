"""search.report.plots: the axis rule that keeps noise from reading as a trend, and the matplotlib charts
the report embeds (ticks on log2, log10 and categorical axes, hover tips, inline SVG that loads nothing
and is the same bytes each time)."""
import re

import matplotlib
import pytest

from search.report import plots


def texts(svg):
    """The text of every <text> element, in document order (matplotlib draws the x axis before the y axis)."""
    return re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)


# --- the axis rule ---------------------------------------------------------------------------------
def test_throughput_near_one_is_drawn_from_zero():
    low, high = plots.axis_limits([0.96, 0.98, 1.00])  # tokens/s that barely moved
    assert -0.1 < low <= 0 and high >= 1.0


@pytest.mark.parametrize("values", [[950.0, 1000.0], [2.31, 2.35], [512, 512, 530]])  # tokens/s, a loss, MB
def test_non_negative_amounts_are_drawn_from_zero(values):
    low, high = plots.axis_limits(values)
    assert -0.05 * high < low <= 0 and high >= max(values)


def test_a_score_in_0_1_is_not_zoomed_into_its_spread():
    low, high = plots.axis_limits([0.90, 0.905, 0.91])
    assert low <= 0 and high >= 1  # the whole [0, 1], not a 0.01 window
    assert high - low < 1.2  # with a small margin only


def test_negative_and_mixed_values():
    low, high = plots.axis_limits([-2.35, -2.31])  # e.g. a log-likelihood: up to 0
    assert low <= -2.35 and 0 <= high < 0.2
    low, high = plots.axis_limits([-1.0, 3.0])  # both signs: their own range, with a margin
    assert -1.5 < low < -1.0 and 3.0 < high < 3.5


def test_degenerate_inputs():
    assert plots.axis_limits([]) == (0.0, 1.0)
    assert plots.axis_limits([float("nan"), None]) == (0.0, 1.0)
    low, high = plots.axis_limits([0, 0])
    assert low < 0 < high


# --- the charts -----------------------------------------------------------------------------------
def test_xy_chart_axes_use_the_rule_and_readable_ticks():
    throughput = plots.xy_chart([plots.Series("s", [(2, 0.96), (8, 0.98), (32, 1.0)], line=True)],
                                "tokens/s vs r", "r (log2)", "tokens_per_s", log_x=2)
    labels = texts(throughput)
    assert labels[:labels.index("r (log2)")] == ["2", "4", "8", "16", "32"]  # log2 x: powers of two, plain
    assert labels[labels.index("r (log2)") + 1] == "0"  # the y axis starts at 0, not at 0.96
    lr = plots.xy_chart([plots.Series("s", [(1e-5, 0.5), (1e-2, 0.7)])], "t", "learning_rate (log)", "acc", log_x=10)
    assert texts(lr)[:4] == ["1e-5", "1e-4", "0.001", "0.01"]  # no mathtext $10^{-5}$
    categories = plots.xy_chart([plots.Series("s", [("qv", 0.5), ("all", 0.6), ("qv", 0.7)])], "t", "target", "acc")
    assert texts(categories)[:2] == ["qv", "all"]  # in order of first appearance


def test_measured_x_follows_the_rule_too():
    points = [plots.Series("s", [(40.0, 0.5), (50.0, 0.6)])]
    assert "20" in texts(plots.xy_chart(points, "Pareto front", "adapter_mb", "acc", measured_x=True))  # x from 0
    assert "20" not in texts(plots.xy_chart(points, "Pareto front", "adapter_mb", "acc"))  # a setting: its own range


def test_svg_is_inline_deterministic_and_keeps_tips():
    def chart():
        return plots.xy_chart([plots.Series("complete", [(1, 0.5), (2, 0.6)], tips=["trial 0", "trial 1"]),
                               plots.Series("pruned", [(3, 0.4)], tips=["trial 2"], hollow=True, color=plots.MUTED)],
                              "acc vs x", "x", "acc")
    svg = chart()
    assert svg == chart()
    assert svg.startswith('<svg class="chart"') and svg.endswith("</svg>")
    for needle in ("<?xml", "DOCTYPE", "http", "xlink", "<script", "<image"):
        assert needle not in svg, needle
    assert [t for t in ("<title>trial 0</title>", "<title>trial 1</title>", "<title>trial 2</title>") if t in svg] \
        == ["<title>trial 0</title>", "<title>trial 1</title>", "<title>trial 2</title>"]
    assert "fill-opacity: 0; stroke: #9a9a9a" in svg  # pruned: rings
    assert {"complete", "pruned", "acc vs x"} <= set(texts(svg))  # a legend for several series; text stays text
    assert not re.search(r'<g id="', svg)  # matplotlib's group ids (figure_1, ...) would repeat across the page


def test_bar_chart_values_and_tips():
    svg = plots.bar_chart(["learning_rate", "r_log2", "target"], [0.7, 0.25, float("nan")], "fanova importance",
                          "importance (sums to 1)")
    labels = texts(svg)
    assert {"learning_rate", "r_log2", "target", "0.7", "0.25", "n/a", "importance (sums to 1)"} <= set(labels)
    assert "<title>learning_rate: 0.7</title>" in svg and "<title>target: n/a</title>" in svg


def test_charts_leave_matplotlib_settings_alone():
    before = dict(matplotlib.rcParams)
    plots.bar_chart(["a"], [1.0], "t", "v")
    assert dict(matplotlib.rcParams) == before
