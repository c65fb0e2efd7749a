"""p50/p95 per stage and per turn component, read from knotd's Prometheus histograms.

The estimate is Prometheus' own ``histogram_quantile()`` (linear interpolation inside the bucket), so the
page shows the numbers a Grafana panel over the same series shows. One exception: a series with a single
observation (a lifecycle stage such as ``model_load``) reports that observation exactly (it is the
histogram's ``_sum``), where interpolation would only blur it across its bucket.

It reads the histogram objects through their public ``collect()``; it never observes anything and never
imports ``prometheus_client``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from knotd import metrics


class Collectable(Protocol):
    """What a prometheus_client metric offers to readers: its current families."""

    def collect(self) -> Iterable[Any]: ...


@dataclass
class Buckets:
    """Cumulative bucket counts of one series (or of several series added up), by upper bound."""

    counts: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0

    def add(self, upper: float, cumulative: float) -> None:
        self.counts[upper] = self.counts.get(upper, 0.0) + cumulative

    @property
    def total(self) -> int:
        return int(self.counts.get(math.inf, 0.0))


@dataclass(frozen=True)
class LatencySummary:
    """How many observations a series has, their mean, and the estimated median and 95th percentile (seconds)."""

    count: int
    mean_s: float | None
    p50_s: float | None
    p95_s: float | None


@dataclass(frozen=True)
class LatencyHistograms:
    """The two histograms the status page summarises; tests and demos hand in their own."""

    stages: Collectable = metrics.STAGE_DURATION
    turns: Collectable = metrics.TURN_LATENCY


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of ``buckets`` the way Prometheus' ``histogram_quantile()`` computes it.

    None when the series has no observations. A rank that falls into the ``+Inf`` bucket gives the
    highest finite upper bound, as in Prometheus.
    """
    bounds = sorted(buckets.counts)
    if not bounds or bounds[-1] != math.inf or buckets.counts[math.inf] <= 0:
        return None
    rank = q * buckets.counts[math.inf]
    lower, below = 0.0, 0.0
    for upper in bounds:
        cumulative = buckets.counts[upper]
        if cumulative >= rank:
            if upper == math.inf:
                return lower
            in_bucket = cumulative - below
            if in_bucket <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / in_bucket
        lower, below = upper, cumulative
    return lower


def read_buckets(histogram: Collectable, by: str) -> dict[str, Buckets]:
    """Bucket counts of ``histogram`` per value of label ``by``, adding up every other label."""
    grouped: dict[str, Buckets] = {}
    for family in histogram.collect():
        for sample in family.samples:
            key = sample.labels.get(by, "")
            if sample.name.endswith("_bucket"):
                grouped.setdefault(key, Buckets()).add(float(sample.labels["le"]), sample.value)
            elif sample.name.endswith("_sum"):
                grouped.setdefault(key, Buckets()).sum += sample.value
    return grouped


def summarise(buckets: Buckets) -> LatencySummary:
    """Count, mean, p50 and p95 of ``buckets``; a single observation is reported exactly."""
    count = buckets.total
    if count == 0:
        return LatencySummary(0, None, None, None)
    mean = buckets.sum / count
    if count == 1:
        return LatencySummary(1, mean, mean, mean)
    return LatencySummary(count, mean, histogram_quantile(0.5, buckets), histogram_quantile(0.95, buckets))


def error_counts(histogram: Collectable) -> dict[str, int]:
    """Observations with ``status="error"`` per stage."""
    errors: dict[str, int] = {}
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels.get("status") == "error":
                stage = sample.labels.get("stage", "")
                errors[stage] = errors.get(stage, 0) + int(sample.value)
    return errors


def stage_summaries(histograms: LatencyHistograms) -> dict[str, LatencySummary]:
    """Per stage (every status together), only stages that have observations, in name order."""
    per_stage = read_buckets(histograms.stages, "stage")
    return {name: summarise(b) for name, b in sorted(per_stage.items()) if b.total > 0}


def turn_summaries(histograms: LatencyHistograms) -> dict[str, LatencySummary]:
    """Per turn component in pipeline order (eou, stt, llm_ttft, tts_ttfb, e2e), including empty ones."""
    per_component = read_buckets(histograms.turns, "component")
    names = list(metrics.TURN_COMPONENTS) + sorted(set(per_component) - set(metrics.TURN_COMPONENTS))
    return {name: summarise(per_component.get(name, Buckets())) for name in names}


def observation_count(histograms: LatencyHistograms) -> int:
    """How many observations both histograms hold; it moves whenever a percentile may have moved."""
    total = 0.0
    for histogram in (histograms.stages, histograms.turns):
        for family in histogram.collect():
            total += sum(s.value for s in family.samples if s.name.endswith("_count"))
    return int(total)
