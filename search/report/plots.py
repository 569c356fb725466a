"""Small charts as inline SVG strings, drawn with matplotlib, for a report.html that opens offline.

Two kinds: `bar_chart` (horizontal bars, one per label) and `xy_chart` (points and/or lines, with
labelled axes, a linear, log10 or log2 x axis, or a categorical x axis when any x is not a number).
`svg()` turns any matplotlib figure into the inline SVG the report embeds (search.report.figures uses
it for Optuna's own plots): no XML prolog, no xmlns or other URL, no script, text kept as <text>, and
the same bytes for the same figure. matplotlib escapes every text it writes, and `svg()` escapes the
hover tips it adds, so callers may pass user data as it is.

Axes of measured values (an objective, tokens/s, memory, MB) follow `axis_limits`, so that noise
does not read as a trend: a 0.96-1.00 throughput is drawn on an axis from 0.
"""
from __future__ import annotations

import io
import re
from contextlib import contextmanager
from dataclasses import dataclass
from html import escape
from typing import Dict, Iterator, Optional, Sequence, Tuple

import matplotlib
import matplotlib.style
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from search.numbers import is_number, show_number

SMALL = (5.8, 3.1)  # inches; at SVG's 72 pt per inch about 560 x 300 px, so two sit side by side in the page
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
MUTED = "#9a9a9a"
PAD = 0.04  # of an axis' span, each side, so no point sits on the frame

# Deterministic, searchable SVG: fixed ids (the salt is set per figure in `svg`), fonts as <text>
# rather than glyph outlines, and no mathtext, so a `$` in a user's name stays a `$`.
RC: Dict[str, object] = {"svg.fonttype": "none", "svg.hashsalt": "peft-search", "text.parse_math": False,
                         "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "axes.grid": True, "axes.axisbelow": True, "grid.color": "#eeeeee",
                         "legend.fontsize": 8, "legend.frameon": False}
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}  # no date, no URL


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Tuple[object, float]]    # (x, y); x may be a category (str, bool)
    tips: Sequence[str] = ()                  # hover text per point (an SVG <title>)
    hollow: bool = False                      # rings rather than dots: e.g. pruned trials
    line: bool = False                        # join the points in x order
    emphasis: bool = False                    # larger markers: e.g. the Pareto front
    color: Optional[str] = None               # default: the palette, in series order


def tick_label(value: float) -> str:
    return show_number(value, digits=2) if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) \
        else show_number(value)


def axis_limits(values: Sequence[float]) -> Tuple[float, float]:
    """(low, high) of an axis for measured values, wide enough that noise does not read as a trend.

    Non-negative values (tokens/s, memory, adapter MB, a loss) are drawn from 0, and ones within [0, 1]
    (an accuracy, a share, a ratio) on the whole of [0, 1]; values all below 0 up to 0. Only values of
    both signs keep their own range, which then holds 0 anyway. So a difference shows at its size
    relative to the values themselves, never zoomed into a 0.96-1.00 window. A small margin is added.
    """
    numbers = [float(v) for v in values if is_number(v)]
    if not numbers:
        return (0.0, 1.0)
    low, high = min(numbers), max(numbers)
    if low >= 0:
        low, high = 0.0, (1.0 if high <= 1 else high)
    elif high <= 0:
        high = 0.0
    span = high - low or 1.0  # every value 0
    return (low - PAD * span, low + span + PAD * span)


@contextmanager
def style() -> Iterator[None]:
    """matplotlib's defaults plus RC, whatever the user's matplotlibrc says, restored on exit: Optuna's
    plots call plt.style.use("ggplot"), which would otherwise restyle every later chart of the process."""
    with matplotlib.style.context(RC, after_reset=True):
        yield


_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.S)
_GROUP_ID = re.compile(r'<g id="([^"]*)">')


def svg(figure: Figure, label: str, tips: Optional[Dict[str, str]] = None, **savefig) -> str:
    """`figure` as inline SVG for report.html. `label` names it for screen readers (and salts its ids,
    so two figures on the page rarely share one); `tips` maps an artist's gid to its hover text, which
    becomes a <title> inside that artist's group."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"peft-search:{label}"}):
        figure.savefig(buffer, format="svg", metadata=NO_METADATA, **savefig)
    text = _PROLOG.sub("", buffer.getvalue())
    # Inline SVG in HTML5 needs no namespaces, and SVG 2 reads `href` without xlink: the page then holds no URL.
    text = text.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace(
        ' xmlns="http://www.w3.org/2000/svg"', "").replace("xlink:href=", "href=")
    text = text.replace("<svg ", f'<svg class="chart" role="img" aria-label="{escape(label)}" ', 1)
    tips = tips or {}

    def group(match: re.Match) -> str:
        # matplotlib names every group (figure_1, axes_1, ...): the same ids in each figure of the page, and
        # nothing refers to them, so they go; a tip's group gets its <title>.
        tip = tips.get(match.group(1))
        return f"<g><title>{escape(tip)}</title>" if tip is not None else "<g>"

    return _GROUP_ID.sub(group, text).strip()


def _format_numbers(axis, log: bool) -> None:
    """The report's number format on the ticks (matplotlib's log labels are mathtext, off in RC)."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: tick_label(value)))
    if log:
        axis.set_minor_formatter(NullFormatter())


def plain_log_ticks(figure: Figure) -> None:
    """The report's numbers (1e-4, 0.001, 32) on every log axis of `figure`, e.g. one Optuna drew: its
    default labels are mathtext, which RC turns off."""
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                _format_numbers(axis, log=True)


def xy_chart(series: Sequence[Series], title: str, x_label: str, y_label: str,
             log_x: Optional[int] = None, measured_x: bool = False) -> str:
    """Points (and lines) of every series on shared axes; `log_x`: 10 or 2 for a log x axis (used only
    when every x is positive). The y axis follows `axis_limits`, and so does x when `measured_x` (x is
    an objective too, as on a Pareto plot). A legend names the series when there are several."""
    xs = [p[0] for s in series for p in s.points]
    categorical = any(not is_number(x) for x in xs)
    log = bool(log_x) and not categorical and bool(xs) and min(float(x) for x in xs) > 0
    tips: Dict[str, str] = {}
    with style():
        figure = Figure(figsize=SMALL, layout="constrained")
        ax = figure.add_subplot()
        categories = list(dict.fromkeys(str(x) for x in xs)) if categorical else []
        if categories:  # in order of first appearance, which matplotlib keeps
            ax.xaxis.update_units(categories)
        for i, s in enumerate(series):
            color = s.color or PALETTE[i % len(PALETTE)]
            points = [(str(x) if categorical else float(x), float(y)) for x, y in s.points]
            if s.line and len(points) > 1:
                ordered = sorted(points, key=lambda p: categories.index(p[0]) if categorical else p[0])
                ax.plot([x for x, _ in ordered], [y for _, y in ordered], color=color, linewidth=1.5, zorder=2)
            marker = dict(marker="o", linestyle="none", markersize=7 if s.emphasis else 5, color=color,
                          markerfacecolor="none" if s.hollow else color, markeredgewidth=1.5, zorder=3)
            # one artist per point, so each can carry its own hover tip; the first one names the series
            for j, (x, y) in enumerate(points):
                (artist,) = ax.plot([x], [y], label=s.name if j == 0 else "_nolegend_", **marker)
                if j < len(s.tips):
                    artist.set_gid(f"tip-{i}-{j}")
                    tips[f"tip-{i}-{j}"] = s.tips[j]
        if log:
            ax.set_xscale("log", base=log_x)
            ax.xaxis.set_major_locator(LogLocator(base=log_x))
        if not categorical:
            _format_numbers(ax.xaxis, log)
        if measured_x and not categorical and not log:
            ax.set_xlim(axis_limits(xs))
        ax.set_ylim(axis_limits([p[1] for s in series for p in s.points]))
        _format_numbers(ax.yaxis, False)
        ax.set(title=title, xlabel=x_label, ylabel=y_label)
        if len(series) > 1:  # outside the plot area, so the legend never hides a point
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return svg(figure, f"{title}: {y_label} vs {x_label}", tips)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, value_label: str) -> str:
    """Horizontal bars from zero, one per label, in the order given (the first on top), each with its value."""
    numbers = [float(v) if is_number(v) else 0.0 for v in values]
    tips: Dict[str, str] = {}
    with style():
        figure = Figure(figsize=(SMALL[0], 0.9 + 0.28 * max(len(labels), 1)), layout="constrained")
        ax = figure.add_subplot()
        positions = list(range(len(labels)))
        bars = ax.barh(positions, numbers, color=PALETTE[0], height=0.7)
        for i, (bar, label, value) in enumerate(zip(bars, labels, values)):
            shown = tick_label(float(value)) if is_number(value) else "n/a"
            bar.set_gid(f"bar-{i}")
            tips[f"bar-{i}"] = f"{label}: {shown}"
            ax.annotate(shown, (bar.get_width(), i), xytext=(4, 0), textcoords="offset points", va="center")
        ax.set_yticks(positions, [str(label) for label in labels])
        ax.invert_yaxis()
        low, high = axis_limits(numbers)
        ax.set_xlim(0, high * 1.1)  # bars start at 0; the room right of the longest holds its value
        _format_numbers(ax.xaxis, False)
        ax.grid(axis="y", visible=False)
        ax.set(title=title, xlabel=value_label)
        return svg(figure, f"{title}: {value_label}", tips)
