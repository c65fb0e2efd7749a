"""The line a finished session leaves in sessions.jsonl, field by field, written and read back by the product's
journal (``SessionSummary.to_record`` → ``SessionJournal`` → ``read_records``); and the latency figures in it.

Written for what mutation testing (`./dev.sh mutate`) showed no other fast test pinned down.
"""

from __future__ import annotations

from knotd.conversation.guardrails import GuardSummary
from knotd.conversation.recognition import StepAnswer
from knotd.conversation.summary import SessionSummary, TranscriptLine, latency_summary
from knotd.journal import SessionJournal, read_records


def _summary(**changes) -> SessionSummary:
    fields = dict(
        session_id="AJ_1", room="knotencheck-7", started_at=1000.12345, ended_at=1062.5, outcome="completed",
        phases_reached=("consent", "step_location", "goodbye"), final_phase="goodbye", turns=3,
        latency_s={"e2e": {"n": 3, "p50": 0.81, "p95": 1.2, "max": 1.3}},
        guardrail=GuardSummary(checks={"input": 3, "output": 4}, hits={"input": {"diagnosis": 1}},
                               discarded_chars=12),
        task_failures=1, agent_speeches={"generate_reply": 4, "say": 1, "interrupted": 1},
        answers={"location": StepAnswer(True, "Hals", kept=False), "size": StepAnswer(False)},
    )
    fields.update(changes)
    return SessionSummary(**fields)


def test_the_record_in_sessions_jsonl_holds_every_field_and_no_transcript_by_default(tmp_path):
    summary = _summary()
    SessionJournal(tmp_path).session_finished(summary)
    (record,) = read_records(tmp_path)
    assert record == {
        "session_id": "AJ_1", "room": "knotencheck-7", "started_at": 1000.123, "ended_at": 1062.5,
        "duration_s": 62.377, "outcome": "completed", "phases_reached": ["consent", "step_location", "goodbye"],
        "final_phase": "goodbye", "turns": 3, "latency_s": {"e2e": {"n": 3, "p50": 0.81, "p95": 1.2, "max": 1.3}},
        "guardrail": {"checks": {"input": 3, "output": 4}, "hits": {"input": {"diagnosis": 1}},
                      "discarded_chars": 12},
        "task_failures": 1, "agent_speeches": {"generate_reply": 4, "say": 1, "interrupted": 1},
        "answers": {"location": {"understood": True}, "size": {"understood": False}},
    }
    assert summary.duration_s == 1062.5 - 1000.12345 and summary.e2e_p50_s == 0.81
    assert _summary(latency_s={}).e2e_p50_s is None


def test_a_recorded_transcript_is_in_the_record_with_its_times(tmp_path):
    lines = (TranscriptLine("assistant", "Guten Tag.", 1001.23456), TranscriptLine("user", "Ja.", 1003.5))
    SessionJournal(tmp_path).session_finished(_summary(transcript=lines))
    (record,) = read_records(tmp_path)
    assert record["transcript"] == [{"role": "assistant", "text": "Guten Tag.", "at": 1001.235},
                                    {"role": "user", "text": "Ja.", "at": 1003.5}]


def test_latency_figures_are_count_median_p95_and_max_per_component_in_seconds():
    turns = [{"e2e": 1.0, "stt": 0.2}, {"e2e": 3.0, "stt": 0.1}, {"e2e": 2.0}, {"e2e": 4.0001}]
    assert latency_summary(turns) == {
        "e2e": {"n": 4, "p50": 2.5, "p95": 3.85, "max": 4.0},
        "stt": {"n": 2, "p50": 0.15, "p95": 0.195, "max": 0.2},
    }
    assert latency_summary([{"e2e": 0.5}]) == {"e2e": {"n": 1, "p50": 0.5, "p95": 0.5, "max": 0.5}}
    assert latency_summary([]) == {}
    assert list(latency_summary([{"tts": 1.0, "e2e": 1.0}])) == ["e2e", "tts"]  # sorted by component


def test_times_are_kept_to_the_millisecond_and_p95_interpolates_between_neighbours(tmp_path):
    SessionJournal(tmp_path).session_finished(_summary(started_at=1000.12345, ended_at=1062.56789))
    (record,) = read_records(tmp_path)
    assert (record["started_at"], record["ended_at"], record["duration_s"]) == (1000.123, 1062.568, 62.444)
    assert latency_summary([{"stt": 0.2002}, {"stt": 0.1001}])["stt"] == {"n": 2, "p50": 0.15, "p95": 0.195,
                                                                          "max": 0.2}
    thirty = latency_summary([{"e2e": float(i)} for i in range(1, 31)])["e2e"]
    assert (thirty["p50"], thirty["p95"], thirty["max"]) == (15.5, 28.55, 30.0)
