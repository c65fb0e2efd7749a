"""What the room and the LLM get from the phase machine: the `knotd.phase` message and attribute, the per-turn
guidance an endpoint LLM is given, the current question, and the answers the summary keeps.

Written for what mutation testing (`./dev.sh mutate`) found no fast test pinned down.
"""

from __future__ import annotations

from knotd.conversation.phases import PhaseMachine, PhaseScript

GUIDANCE = "Aktueller Schritt des Knotenchecks: {title}. Sage jetzt sinngemäß und kurz Folgendes und nichts anderes: "
SIZE = ("Wie groß ist der Knoten ungefähr? Vergleichen Sie ihn zum Beispiel mit einer Erbse, einer Kirsche oder "
        "einer Walnuss.")


def _machine() -> PhaseMachine:
    ticks = iter([1000.0, 1001.5, 1002.25, 1003.125, 1004.0, 1005.0])
    return PhaseMachine(PhaseScript.load(), clock=lambda: next(ticks))


def test_the_llm_is_told_the_step_and_the_line_to_say():
    machine = _machine()
    opening = machine.respond(None)
    assert machine.guidance(opening) == GUIDANCE.format(title="Einverständnis") + opening.text
    again = machine.plan("Blablub")  # no answer the consent step knows: asked again, same step
    assert again.path == () and machine.guidance(again) == GUIDANCE.format(title="Einverständnis") + again.text
    location = machine.plan("Ja, gerne.")
    assert machine.guidance(location) == GUIDANCE.format(title="Ort") + location.text


def test_the_room_sees_the_phase_message_and_attribute():
    machine = _machine()
    machine.respond(None)
    machine.respond("Ja, gerne.")
    machine.respond("Am Hals, links.")
    assert machine.to_wire() == {
        "v": 1, "phase": "step_size", "title": "Größe", "previous": "step_location", "step": 2, "steps": 4,
        "is_terminal": False, "seq": 3, "at": 1003.125,
        "reached": ["greeting", "consent", "step_location", "step_size"],
    }
    assert machine.wire_attributes() == {"knotd.phase": "step_size"}
    assert machine.line() == SIZE
    first = _machine().to_wire()
    assert (first["phase"], first["previous"], first["seq"], first["at"]) == ("greeting", None, 0, 1000.0)


def test_the_summary_keeps_whether_a_step_was_understood_and_the_answer_only_when_allowed():
    machine = _machine()
    for answer in (None, "Ja, gerne.", "Am Hals, links."):
        machine.respond(answer)
    kept = {k: v.to_record() for k, v in machine.recognised_answers(with_values=True).items()}
    private = {k: v.to_record() for k, v in machine.recognised_answers(with_values=False).items()}
    assert kept == {"location": {"understood": True, "answer": "Hals, links"}}
    assert private == {"location": {"understood": True}}
