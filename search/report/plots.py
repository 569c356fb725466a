"""Small charts as inline SVG strings, for a report.html that opens offline with nothing to load.

Two kinds: `bar_chart` (horizontal bars, one per label) and `xy_chart` (points and/or lines, with
labelled axes, a linear, log10 or log2 x axis, or a categorical x axis when any x is not a number).
Every text that reaches the SVG (titles, labels, hover tips) is escaped here, so callers may pass
user data as it is. No xmlns: inline SVG in HTML5 needs none, and the page then holds no URL at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import List, Optional, Sequence, Tuple

from search.numbers import is_number, show_number

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 30, 52
LEGEND_WIDTH = 120  # kept right of the plot area, so the legend never hides a point
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
MUTED = "#9a9a9a"


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


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


@dataclass
class Scale:
    """Data value -> pixel along one axis, with its ticks [(value, label)]."""
    low_px: float
    high_px: float
    log_base: Optional[int] = None
    categories: List[str] = field(default_factory=list)
    lo: float = 0.0
    hi: float = 1.0

    @classmethod
    def fit(cls, values: Sequence[object], low_px: float, high_px: float, log_base: Optional[int] = None) -> "Scale":
        if any(not is_number(v) for v in values):
            categories = list(dict.fromkeys(str(v) for v in values))
            return cls(low_px, high_px, categories=categories, lo=-0.5, hi=len(categories) - 0.5)
        numbers = [float(v) for v in values] or [0.0, 1.0]
        if log_base and min(numbers) > 0:
            lo, hi = (math.log(min(numbers), log_base), math.log(max(numbers), log_base))
            pad = max((hi - lo) * 0.05, 0.25)
            return cls(low_px, high_px, log_base=log_base, lo=lo - pad, hi=hi + pad)
        lo, hi = min(numbers), max(numbers)
        pad = (hi - lo) * 0.05 or max(abs(lo) * 0.1, 1e-9)
        return cls(low_px, high_px, lo=lo - pad, hi=hi + pad)

    def position(self, value: object) -> float:
        if self.categories:
            t = float(self.categories.index(str(value)))
        else:
            t = math.log(float(value), self.log_base) if self.log_base else float(value)
        return self.low_px + (t - self.lo) / (self.hi - self.lo) * (self.high_px - self.low_px)

    def ticks(self) -> List[Tuple[object, str]]:
        if self.categories:
            return [(c, c) for c in self.categories]
        if self.log_base:
            exponents = range(math.ceil(self.lo), math.floor(self.hi) + 1)
            step = max(1, math.ceil(len(exponents) / 8))  # at most ~8 labels on long spans
            return [(float(self.log_base) ** e, tick_label(float(self.log_base) ** e)) for e in exponents[::step]]
        step = _nice_step(self.hi - self.lo)
        first = math.ceil(self.lo / step) * step
        count = int(math.floor((self.hi - first) / step + 1e-9)) + 1
        return [(first + i * step, tick_label(round(first + i * step, 12))) for i in range(count)]


def _frame(title: str, body: List[str], label: str, height: int = HEIGHT) -> str:
    return (f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
            f'aria-label="{escape(label)}"><title>{escape(label)}</title>'
            f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" class="chart-title">{escape(title)}</text>'
            + "".join(body) + "</svg>")


def _axes(x: Scale, y: Scale, x_label: str, y_label: str) -> List[str]:
    bottom, left, right = HEIGHT - BOTTOM, LEFT, x.high_px
    out = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>',
           f'<line x1="{left}" y1="{TOP}" x2="{left}" y2="{bottom}" class="axis"/>']
    for value, label in x.ticks():
        px = x.position(value)
        out.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" class="axis"/>'
                   f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle" class="tick">{escape(label)}</text>')
    for value, label in y.ticks():
        py = y.position(value)
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end" class="tick">{escape(label)}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{HEIGHT - 10}" text-anchor="middle" '
               f'class="axis-label">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {(TOP + bottom) / 2}) rotate(-90)" text-anchor="middle" '
               f'class="axis-label">{escape(y_label)}</text>')
    return out


def xy_chart(series: Sequence[Series], title: str, x_label: str, y_label: str,
             log_x: Optional[int] = None) -> str:
    """Points (and lines) of every series on shared axes; `log_x`: 10 or 2 for a log x axis (used only
    when every x is positive). A legend names the series when there are several."""
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    right = WIDTH - RIGHT - (LEGEND_WIDTH if len(series) > 1 else 0)
    x = Scale.fit(xs, LEFT, right, log_base=log_x)
    y = Scale.fit(ys, HEIGHT - BOTTOM, TOP)
    body = _axes(x, y, x_label, y_label)
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        if s.line and len(s.points) > 1:
            ordered = sorted(s.points, key=lambda p: x.position(p[0]))
            path = " ".join(f"{x.position(px):.1f},{y.position(py):.1f}" for px, py in ordered)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        radius = 5 if s.emphasis else 3.5
        fill = "none" if s.hollow else color
        for j, (px, py) in enumerate(s.points):
            tip = f"<title>{escape(s.tips[j])}</title>" if j < len(s.tips) else ""
            body.append(f'<circle cx="{x.position(px):.1f}" cy="{y.position(py):.1f}" r="{radius}" fill="{fill}" '
                        f'stroke="{color}" stroke-width="1.5">{tip}</circle>')
    if len(series) > 1:
        for i, s in enumerate(series):
            color = s.color or PALETTE[i % len(PALETTE)]
            ly = TOP + 4 + 14 * i
            body.append(f'<circle cx="{right + 16}" cy="{ly}" r="4" fill="{"none" if s.hollow else color}" '
                        f'stroke="{color}"/><text x="{right + 24}" y="{ly + 4}" class="legend">'
                        f'{escape(s.name)}</text>')
    return _frame(title, body, f"{title}: {y_label} vs {x_label}")


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, value_label: str) -> str:
    """Horizontal bars from zero, one per label, in the order given."""
    row = 22
    height = TOP + row * len(labels) + 40
    longest = max((len(str(label)) for label in labels), default=4)
    left = min(220, 12 + 7 * longest)
    top_value = max([v for v in values if is_number(v)] + [1e-12])
    scale = (WIDTH - RIGHT - left - 48) / top_value
    body = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = TOP + i * row
        width = max(0.0, float(value)) * scale if is_number(value) else 0.0
        body.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" class="tick">{escape(str(label))}</text>'
                    f'<rect x="{left}" y="{y + 3}" width="{width:.1f}" height="{row - 6}" fill="{PALETTE[0]}">'
                    f'<title>{escape(str(label))}: {escape(tick_label(float(value)) if is_number(value) else "")}'
                    f'</title></rect><text x="{left + width + 4:.1f}" y="{y + 15}" class="tick">'
                    f'{escape(tick_label(float(value)) if is_number(value) else "n/a")}</text>')
    body.append(f'<text x="{(left + WIDTH - RIGHT) / 2}" y="{height - 10}" text-anchor="middle" '
                f'class="axis-label">{escape(value_label)}</text>')
    return _frame(title, body, f"{title}: {value_label}", height=height)
