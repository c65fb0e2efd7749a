"""Geometry for the page's hand-drawn SVG charts: a latency sparkline and range bars on a fixed scale.

Only numbers come out of here (coordinates in a chart's viewBox, percentages of a bar's width); the
templates draw them. Fixed scales keep a chart comparable from one minute to the next: a value beyond the
scale is drawn at the edge and flagged ``clipped``, its real number stays in the text next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

E2E_GOAL_S = 0.8  # the voice-to-voice target: end of user speech to first agent audio


@dataclass(frozen=True)
class Scale:
    """Maps seconds to 0–100 (% of a bar's width), linearly or by decades; ``ticks`` label the axis.

    Ticks are evenly spaced on the scale, so an axis can be drawn as equal-width cells.
    """

    low_s: float
    high_s: float
    is_log: bool
    ticks: tuple[tuple[float, str], ...]  # (seconds, label)

    def percent(self, seconds: float) -> float:
        if self.is_log:
            seconds = max(seconds, self.low_s)
            span = math.log10(self.high_s) - math.log10(self.low_s)
            value = (math.log10(seconds) - math.log10(self.low_s)) / span
        else:
            value = (seconds - self.low_s) / (self.high_s - self.low_s)
        return round(100 * min(max(value, 0.0), 1.0), 2)

    def is_clipped(self, seconds: float) -> bool:
        return seconds > self.high_s


# Pipeline and lifecycle stages run from well under a millisecond (a guardrail) to tens of seconds (loading
# a model): only decades show both on one chart.
STAGE_SCALE = Scale(
    0.001, 100.0, is_log=True,
    ticks=((0.001, "1 ms"), (0.01, "10 ms"), (0.1, "100 ms"), (1.0, "1 s"), (10.0, "10 s"), (100.0, "100 s")),
)
# Turn components live around the 0.8 s goal, which sits in the middle of this scale.
TURN_SCALE = Scale(
    0.0, 1.6, is_log=False, ticks=((0.0, "0"), (0.4, "0.4"), (0.8, "0.8"), (1.2, "1.2"), (1.6, "1.6 s")),
)


@dataclass(frozen=True)
class RangeBar:
    """One bar: solid to the median, lighter on to the 95th percentile (percent of the bar's width)."""

    p50_pct: float
    p95_pct: float
    is_clipped: bool


def range_bar(scale: Scale, p50_s: float | None, p95_s: float | None) -> RangeBar | None:
    """The bar for a median and 95th percentile, or None when there is nothing to draw."""
    if p50_s is None or p95_s is None:
        return None
    return RangeBar(scale.percent(p50_s), scale.percent(p95_s), scale.is_clipped(p95_s))


@dataclass(frozen=True)
class SparkPoint:
    x: float
    y: float
    seconds: float
    is_over_goal: bool
    is_clipped: bool


@dataclass(frozen=True)
class Sparkline:
    """A line through the latest values, oldest left, in a ``width`` × ``height`` viewBox."""

    width: int
    height: int
    points: tuple[SparkPoint, ...]
    goal_y: float
    top_s: float

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x},{p.y}" for p in self.points)

    @property
    def over_goal(self) -> int:
        return sum(p.is_over_goal for p in self.points)


def sparkline(
    values: Sequence[float], *, goal_s: float = E2E_GOAL_S, top_s: float = 1.6, width: int = 320, height: int = 80,
) -> Sparkline:
    """Place ``values`` (seconds) on a 0..``top_s`` axis; values above ``top_s`` sit on the top edge."""
    pad = 6.0  # keep the dots inside the box
    inner_w, inner_h = width - 2 * pad, height - 2 * pad

    def y_of(seconds: float) -> float:
        return round(pad + inner_h * (1 - min(seconds, top_s) / top_s), 1)

    step = inner_w / (len(values) - 1) if len(values) > 1 else 0.0
    points = tuple(
        SparkPoint(
            x=round(pad + (i * step if len(values) > 1 else inner_w / 2), 1),
            y=y_of(v),
            seconds=v,
            is_over_goal=v > goal_s,
            is_clipped=v > top_s,
        )
        for i, v in enumerate(values)
    )
    return Sparkline(width, height, points, y_of(goal_s), top_s)
