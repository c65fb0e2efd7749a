"""The knotd Grafana dashboard, as code: Grafana's own builders (grafana-foundation-sdk, Grafana 11.6).

    .venv/bin/python packaging/grafana/dashboard.py > packaging/grafana/knotd.json

knotd.json beside this file is its output, committed so the .deb ships it and operators import it as is;
tests/test_monitoring.py checks that the two agree and has a real Prometheus evaluate every query.
"""

from __future__ import annotations

import json
import sys

from grafana_foundation_sdk.builders import bargauge, dashboard, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    StackingConfig,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    GraphDrawStyle,
    GraphThresholdsStyleMode,
    HeatmapCellLayout,
    LegendDisplayMode,
    LegendPlacement,
    LineInterpolation,
    SortOrder,
    StackingMode,
    TooltipDisplayMode,
    VisibilityMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'job=~"$job", instance=~"$instance"'  # every query is scoped to the chosen job and instances
E2E = f'{SEL}, component="e2e"'
GOAL_S = 0.8  # the end-to-end latency goal (README), drawn as a threshold line

Panel = stat.Panel | timeseries.Panel | heatmap.Panel | bargauge.Panel


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range().datasource(DATASOURCE)


def steps(*pairs: tuple[float | None, str]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=color) for value, color in pairs])


def up_down(up: str, down: str) -> list[ValueMap]:
    return [ValueMap({"0": ValueMappingResult(text=down, color="red", index=0),
                      "1": ValueMappingResult(text=up, color="green", index=1)})]


def big(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "short",
        color: BigValueColorMode = BigValueColorMode.NONE, text: BigValueTextMode = BigValueTextMode.AUTO,
        thresholds: ThresholdsConfig | None = None) -> stat.Panel:
    panel = (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .height(4).span(4).color_mode(color).text_mode(text).graph_mode(BigValueGraphMode.NONE)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .thresholds(thresholds or steps((None, "green"))))
    return panel.targets(list(targets))


def graph(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "short", width: int = 12,
          height: int = 8, bars: bool = False, stacked: bool = False, step: bool = False,
          integer: bool = False, floor: bool = True, ceiling: float | None = None,
          goal: ThresholdsConfig | None = None) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(width).height(height).axis_soft_min(0).show_points(VisibilityMode.NEVER)
             .draw_style(GraphDrawStyle.BARS if bars else GraphDrawStyle.LINE)
             .fill_opacity(60 if bars else 10)
             .line_interpolation(LineInterpolation.STEP_AFTER if step else LineInterpolation.LINEAR)
             .stacking(StackingConfig().mode(StackingMode.NORMAL if stacked else StackingMode.NONE))
             .thresholds(goal or steps((None, "green")))
             .thresholds_style(GraphThresholdsStyleConfig().mode(
                 GraphThresholdsStyleMode.DASHED if goal else GraphThresholdsStyleMode.OFF))
             .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                     .show_legend(True).calcs([]))
             .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
    if integer:
        panel = panel.decimals(0)
    if floor and not bars:
        panel = panel.min(0)
    if ceiling is not None:
        panel = panel.max(ceiling)
    return panel.targets(list(targets))


def dashed_red(series: str) -> tuple[str, list[DynamicConfigValue]]:
    """An override that draws the series named ``series…`` (a limit) as a dashed red line without fill."""
    return f"{series}.*", [
        DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        DynamicConfigValue(id_val="custom.fillOpacity", value=0),
    ]


def buckets(title: str, description: str, expr: str) -> heatmap.Panel:
    target = query(expr, "{{le}}").format(PromQueryFormat.HEATMAP)
    return (heatmap.Panel().title(title).description(description).datasource(DATASOURCE).span(12).height(9)
            .calculate(False).cell_gap(1).show_legend().mode(TooltipDisplayMode.SINGLE).show_y_histogram()
            .color(heatmap.HeatmapColorOptions().mode("scheme").scheme("Oranges").scale("exponential")
                   .exponent(0.5).steps(64).fill("dark-orange"))
            .y_axis(heatmap.YAxisConfig().unit("s"))
            .rows_frame(heatmap.RowsHeatmapOptions().layout(HeatmapCellLayout.LE))
            .with_target(target))


def histogram_q(q: float, by: str, selector: str, metric: str = "knotd_turn_latency_seconds") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))"


def overview() -> list[Panel]:
    return [
        big("Ready", "knotd_ready: 1 when /readyz answers 200 (models loaded, worker registered, not draining).",
            query(f"max by (instance) (knotd_ready{{{SEL}}})", "{{instance}}"),
            color=BigValueColorMode.BACKGROUND, thresholds=steps((None, "red"), (1, "green")))
        .mappings(up_down("READY", "NOT READY")),
        big("LiveKit worker", "knotd_worker_registered: 1 while the agent worker is registered with LiveKit.",
            query(f"max by (instance) (knotd_worker_registered{{{SEL}}})", "{{instance}}"),
            color=BigValueColorMode.BACKGROUND, thresholds=steps((None, "red"), (1, "green")))
        .mappings(up_down("REGISTERED", "NOT REGISTERED")),
        big("Sessions / capacity", "Sessions running now and the configured worker.max_sessions.",
            query(f"sum(knotd_sessions_active{{{SEL}}})", "active"),
            query(f"sum(knotd_sessions_max{{{SEL}}})", "capacity", "B"),
            color=BigValueColorMode.VALUE, text=BigValueTextMode.VALUE_AND_NAME).decimals(0),
        big("Version", "knotd_build_info: the knotd version each instance runs.",
            query(f"max by (instance, version) (knotd_build_info{{{SEL}}})", "{{version}}"),
            text=BigValueTextMode.NAME),
        big("Uptime", "Time since the knotd process started (process_start_time_seconds).",
            query(f"time() - max by (instance) (process_start_time_seconds{{{SEL}}})", "{{instance}}"),
            unit="dtdurations"),
        big("Restarts in range", "How often the process start time changed in the selected range: systemd "
            "restarts after crashes, watchdog timeouts or deploys.",
            query(f"max by (instance) (changes(process_start_time_seconds{{{SEL}}}[$__range]))", "{{instance}}"),
            color=BigValueColorMode.BACKGROUND, thresholds=steps((None, "green"), (1, "orange"), (3, "red")))
        .decimals(0),
        graph("Readiness, registration and scrape", "1 = ready / registered / scraped. A dip in 'registered' "
              "with 'ready' following is a lost LiveKit connection; 'scraped' at 0 means Prometheus cannot "
              "reach /metrics.",
              query(f"max by (instance) (knotd_ready{{{SEL}}})", "ready {{instance}}"),
              query(f"max by (instance) (knotd_worker_registered{{{SEL}}})", "registered {{instance}}", "B"),
              query(f"max by (instance) (up{{{SEL}}})", "scraped {{instance}}", "C"),
              height=7, step=True, integer=True, ceiling=1),
        graph("Worker registrations (reconnects)", "Successful registrations with LiveKit per interval; after "
              "the first, each one is a reconnect.",
              query(f"sum by (instance) (increase(knotd_worker_registrations_total{{{SEL}}}[$__rate_interval]))",
                    "{{instance}}"),
              height=7, bars=True, integer=True),
    ]


def sessions() -> list[Panel]:
    return [
        graph("Active sessions vs capacity", "Sessions running now against worker.max_sessions (dashed). At "
              "capacity LiveKit routes new calls to other workers.",
              query(f"sum by (instance) (knotd_sessions_active{{{SEL}}})", "active {{instance}}"),
              query(f"max by (instance) (knotd_sessions_max{{{SEL}}})", "capacity {{instance}}", "B"),
              width=8, step=True, integer=True).override_by_regexp(*dashed_red("capacity")),
        graph("Worker load reported to LiveKit", "lk_agents_worker_load: the load knotd reports (active "
              "sessions / max_sessions); LiveKit sends no jobs at 1.",
              query(f"max by (instance) (lk_agents_worker_load{{{SEL}}})", "{{instance}}"),
              unit="percentunit", width=8, ceiling=1),
        graph("Finished sessions by outcome", "Sessions that ended per interval, by outcome (completed, "
              "disconnected, error, drained, interrupted).",
              query(f"sum by (outcome) (increase(knotd_sessions_total{{{SEL}}}[$__rate_interval]))", "{{outcome}}"),
              width=8, bars=True, stacked=True, integer=True),
        graph("Phase transitions", "Conversation phases entered per interval. A phase that is entered but whose "
              "successor never is shows where callers drop out.",
              query(f"sum by (phase) (increase(knotd_phase_transitions_total{{{SEL}}}[$__rate_interval]))",
                    "{{phase}}"),
              bars=True, stacked=True, integer=True),
        graph("Turns per minute", "Completed agent turns (e2e latency observations) per minute.",
              query(f"sum by (instance) (rate(knotd_turn_latency_seconds_count{{{E2E}}}[$__rate_interval])) * 60",
                    "{{instance}}")),
    ]


def turn_latency() -> list[Panel]:
    return [
        graph(f"End-to-end latency vs {GOAL_S} s goal", "End of user speech to the first agent audio: p50 and "
              f"p95 per instance. Dashed red line: the {GOAL_S} s goal. KnotdE2ELatencyHigh fires when p95 "
              "stays above 1.2 s.",
              query(histogram_q(0.5, "instance", E2E), "p50 {{instance}}"),
              query(histogram_q(0.95, "instance", E2E), "p95 {{instance}}", "B"),
              unit="s", height=9, goal=steps((None, "green"), (GOAL_S, "red"))),
        buckets("End-to-end latency distribution", "Turns per latency bucket over time (buckets have "
                f"boundaries at 0.5 s and {GOAL_S} s).",
                f"sum by (le) (increase(knotd_turn_latency_seconds_bucket{{{E2E}}}[$__rate_interval]))"),
        graph("Per-turn breakdown (p95 by component)", "p95 of each part of a turn: eou (end-of-utterance "
              "delay), stt (final transcript), llm_ttft (first LLM token), tts_ttfb (first audio byte). They "
              "overlap, so they do not add up to e2e.",
              query(histogram_q(0.95, "component", f'{SEL}, component!="e2e"'), "{{component}}"),
              unit="s", height=9),
        graph(f"Turns within the {GOAL_S} s goal", f"Share of turns whose e2e latency was at most {GOAL_S} s (a "
              "bucket boundary, so this is exact).",
              query(f'sum by (instance) (rate(knotd_turn_latency_seconds_bucket{{{E2E}, le="{GOAL_S}"}}'
                    f"[$__rate_interval])) / sum by (instance) (rate(knotd_turn_latency_seconds_count{{{E2E}}}"
                    "[$__rate_interval]))", "{{instance}}"),
              unit="percentunit", height=9, ceiling=1,
              goal=steps((None, "red"), (0.8, "orange"), (0.95, "green"))),
        graph("How turns ended", "User turns by what ended them: model, max_delay, min_delay, vad.",
              query(f"sum by (how) (increase(knotd_turn_endings_total{{{SEL}}}[$__rate_interval]))", "{{how}}"),
              bars=True, stacked=True, integer=True, height=9),
        graph("Cut-off answers", "Share of turns the caller talked into within 1 s of the answer starting.",
              query(f"sum by (detection) (rate(knotd_turn_cutoffs_total{{{SEL}}}[$__rate_interval])) / "
                    f"scalar(sum(rate(knotd_turn_endings_total{{{SEL}}}[$__rate_interval])))", "{{detection}}"),
              unit="percentunit", height=9, ceiling=1),
    ]


def stages() -> list[Panel]:
    stage_sel = f'{SEL}, stage=~"$stage"'
    ok = f'{stage_sel}, status="ok"'
    return [
        graph("Stage latency p95 by stage", "knotd_stage_duration_seconds: p95 per stage over the interval. "
              "One-off start-up stages (model_load, stt_load, ...) show in 'Mean duration per stage' instead.",
              query(histogram_q(0.95, "stage", stage_sel, "knotd_stage_duration_seconds"), "{{stage}}"),
              unit="s", height=9),
        buckets("Stage latency distribution ($stage)", "Observations per latency bucket of the selected stages.",
                f"sum by (le) (increase(knotd_stage_duration_seconds_bucket{{{stage_sel}}}[$__rate_interval]))"),
        bargauge.Panel().title("Mean duration per stage since process start")
        .description("Sum / count of each stage since the process started; for start-up stages that ran once "
                     "this is their duration.")
        .datasource(DATASOURCE).unit("s").min(0).span(12).height(9)
        .thresholds(steps((None, "green"), (1, "orange"), (10, "red")))
        .orientation(VizOrientation.HORIZONTAL).display_mode(BarGaugeDisplayMode.GRADIENT).show_unfilled(True)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(prometheus.Dataquery().instant().ref_id("A").legend_format("{{stage}}").datasource(DATASOURCE)
                     .expr(f"max by (stage) (knotd_stage_duration_seconds_sum{{{ok}}} / "
                           f"knotd_stage_duration_seconds_count{{{ok}}})")),
        graph("Stage errors", "Stages that ended with an exception, per interval (the log has the exception "
              "type).",
              query(f'sum by (stage) (increase(knotd_stage_duration_seconds_count{{{SEL}, status="error"}}'
                    "[$__rate_interval]))", "{{stage}}"),
              height=9, bars=True, stacked=True, integer=True),
    ]


def guardrails() -> list[Panel]:
    by_rule = "sum by (direction, rule)"
    return [
        graph("Guardrail hits by rule", "Texts blocked or replaced per interval, by direction (input: caller "
              "transcript, output: LLM text) and rule.",
              query(f"{by_rule} (increase(knotd_guardrail_hits_total{{{SEL}}}[$__rate_interval]))",
                    "{{direction}}/{{rule}}"),
              bars=True, stacked=True, integer=True),
        graph("Guardrail hit ratio by rule", "Hits / checks per rule: the share of checked texts a rule stopped.",
              query(f"{by_rule} (rate(knotd_guardrail_hits_total{{{SEL}}}[$__rate_interval])) / {by_rule} "
                    f"(rate(knotd_guardrail_checks_total{{{SEL}}}[$__rate_interval]))", "{{direction}}/{{rule}}"),
              unit="percentunit", ceiling=1),
    ]


def handlers_and_llm() -> list[Panel]:
    return [
        graph("Bridged-task failures by handler", "Async tasks spawned by event handlers that failed or were "
              "cancelled, per interval.",
              query(f'sum by (handler, outcome) (increase(knotd_handler_tasks_total{{{SEL}, outcome!="ok"}}'
                    "[$__rate_interval]))", "{{handler}} {{outcome}}"),
              width=8, bars=True, stacked=True, integer=True),
        graph("Bridged tasks in flight", "Handler tasks running now. A line that only grows means tasks that "
              "never finish.",
              query(f"sum by (handler) (knotd_handler_tasks_inflight{{{SEL}}})", "{{handler}}"),
              width=8, integer=True),
        graph("LLM failures by reason", "LLM requests that failed and were answered with the fallback line, per "
              "interval.",
              query(f"sum by (reason) (increase(knotd_llm_failures_total{{{SEL}}}[$__rate_interval]))", "{{reason}}"),
              width=8, bars=True, stacked=True, integer=True),
    ]


def process() -> list[Panel]:
    return [
        graph("CPU", "CPU seconds per second used by the knotd process (1 = one full core).",
              query(f"rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])", "{{instance}}"), width=8),
        graph("Resident memory", "RSS of the knotd process (Whisper, VAD and TTS models are shared by all "
              "sessions).",
              query(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}"), unit="bytes", width=8),
        graph("Open file descriptors", "Open file descriptors against the limit (dashed).",
              query(f"process_open_fds{{{SEL}}}", "open {{instance}}"),
              query(f"process_max_fds{{{SEL}}}", "limit {{instance}}", "B"),
              width=8, integer=True).override_by_regexp(*dashed_red("limit")),
    ]


def variable(name: str, label: str, promql: str, *, multi: bool) -> QueryVariable:
    var = (QueryVariable(name).label(label).datasource(DATASOURCE).refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
           .sort(VariableSort.ALPHABETICAL_ASC)
           .query({"query": promql, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1}))
    return var.multi(True).include_all(True).all_value(".*") if multi else var


def build() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("knotd").uid("knotd-overview").editable().tooltip(DashboardCursorSync.CROSSHAIR)
        .description("knotd: readiness, LiveKit registration, sessions, turn and stage latency, guardrails, bridged "
                     "tasks, LLM failures and the process. Needs Prometheus scraping knotd's /metrics.")
        .tags(["knotd", "livekit", "voice-agent"]).time("now-6h", "now").refresh("30s")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(variable("job", "Job", "label_values(knotd_build_info, job)", multi=False))
        .with_variable(variable("instance", "Instance", 'label_values(knotd_build_info{job=~"$job"}, instance)',
                                multi=True))
        .with_variable(variable("stage", "Stage", f"label_values(knotd_stage_duration_seconds_count{{{SEL}}}, stage)",
                                multi=True))
        .annotation(AnnotationQuery().name("knotd restarts").datasource(DATASOURCE).enable(True).hide(False)
                    .icon_color("orange")
                    .expr(f"changes(process_start_time_seconds{{{SEL}}}[$__rate_interval]) > 0"))
    )
    rows = [("Overview", overview()), ("Sessions", sessions()), ("Turn latency", turn_latency()),
            ("Pipeline and lifecycle stages", stages()), ("Guardrails", guardrails()),
            ("Event handlers and LLM", handlers_and_llm()), ("Process", process())]
    ids = iter(range(1, 1000))
    for title, panels in rows:
        board = board.with_row(Row(title).id(next(ids)))
        for panel in panels:
            board = board.with_panel(panel.id(next(ids)))
    return board.build()


def render() -> str:
    """The dashboard JSON exactly as committed in knotd.json."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
