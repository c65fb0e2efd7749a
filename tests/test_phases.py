"""Phases: the Knotencheck script as a state machine, its transitions, history, wire format and script files."""

from __future__ import annotations

import itertools
import json

import pytest

from knotd.conversation.guardrails import Guardrail
from knotd.conversation.phases import (
    WIRE_ATTRIBUTE,
    IllegalTransition,
    PhaseMachine,
    PhaseScript,
)
from knotd.errors import ConfigError

HAPPY_PATH = [
    # (user answer, phase after the agent's reply)
    ("Hallo, ich möchte einen Knotencheck machen.", "consent"),
    ("Ja, ich bin einverstanden.", "step_location"),
    ("Am Hals, links unter dem Ohr.", "step_size"),
    ("Etwa erbsengroß.", "step_since"),
    ("Seit zwei Wochen.", "step_changes"),
    ("Nein, er tut nicht weh und ist gleich geblieben.", "goodbye"),
]


@pytest.fixture(scope="module")
def script() -> PhaseScript:
    return PhaseScript.load()


@pytest.fixture
def machine(script) -> PhaseMachine:
    ticks = itertools.count(1000)
    return PhaseMachine(script, clock=lambda: float(next(ticks)))


def walk(machine: PhaseMachine, answers: list[str]) -> list[str]:
    return [machine.respond(answer).text for answer in answers]


def test_happy_path_walks_greeting_consent_steps_summary_goodbye(machine):
    """1. The user opens, agrees and answers the four steps.
    Result: the phases follow the script and the conversation ends in goodbye."""
    for answer, expected in HAPPY_PATH:
        machine.respond(answer)
        assert machine.current == expected
    assert machine.reached() == ["greeting", "consent", "step_location", "step_size", "step_since",
                                 "step_changes", "summary", "goodbye"]
    assert machine.is_finished


def test_opening_says_the_greeting_and_asks_for_consent_whatever_was_said(machine, script):
    """The first reply is the greeting followed at once by the consent question."""
    reply = machine.respond("Ist das Krebs?")
    assert reply.text == f"{script.phase('greeting').say} {script.phase('consent').say}"
    assert machine.current == "consent"


def test_summary_reads_back_the_answers_without_closing_punctuation(machine):
    """The summary line repeats what the user said in each step."""
    texts = walk(machine, [a for a, _ in HAPPY_PATH])
    summary = texts[-1]
    assert "Ort: Am Hals, links unter dem Ohr." in summary
    assert "Größe: Etwa erbsengroß." in summary
    assert "Veränderungen: Nein, er tut nicht weh und ist gleich geblieben." in summary
    assert summary.endswith("auf Wiedersehen.")


@pytest.mark.parametrize(("answer", "expected"), [
    ("Ja", "step_location"),
    ("ja gerne", "step_location"),
    ("Okay, legen wir los.", "step_location"),
    ("Warum nicht.", "step_location"),
    ("Kein Problem.", "step_location"),
    ("Nein", "aborted"),
    ("Nein, lieber nicht.", "aborted"),
    ("Ich bin nicht einverstanden.", "aborted"),
])
def test_consent_answer_decides_between_the_check_and_aborting(machine, answer, expected):
    """Yes-like answers start the check, no-like ones (even with "einverstanden" in them) abort it."""
    machine.respond(None)
    machine.respond(answer)
    assert machine.current == expected


def test_unclear_consent_answer_reprompts_and_stays(machine, script):
    """An answer that matches nothing repeats the question and changes nothing."""
    machine.respond(None)
    reply = machine.respond("Hm, vielleicht, ich weiß nicht so recht.")
    assert reply.text == script.phase("consent").reprompt
    assert reply.path == ()
    assert machine.current == "consent"


def test_abort_words_end_the_check_from_any_step(machine):
    """Saying "abbrechen" in a guided step moves to aborted."""
    walk(machine, [None, "Ja", "Am Hals"])
    machine.respond("Ich möchte abbrechen.")
    assert machine.current == "aborted"


def test_empty_answer_repeats_the_current_question(machine, script):
    """With nothing new to answer the agent asks its current question again."""
    walk(machine, [None, "Ja"])
    assert machine.respond("").text == script.phase("step_location").say
    assert machine.current == "step_location"


def test_after_a_terminal_phase_every_answer_gets_the_finished_line(machine, script):
    """Once the check is over it stays over."""
    walk(machine, [None, "Nein"])
    assert machine.respond("Doch, ja!").text == script.finished
    assert machine.current == "aborted"


def test_plan_changes_nothing_until_commit(machine):
    """plan() is side-effect free; commit() applies exactly the planned path."""
    walk(machine, [None])
    reply = machine.plan("Ja")
    assert machine.current == "consent"
    machine.commit(reply)
    assert machine.current == "step_location"


def test_listeners_see_every_transition_with_its_sequence_number(machine):
    """Transition listeners (the session counts and publishes there) see each phase entered, in order."""
    changes = []
    machine.add_listener(changes.append)
    walk(machine, [None, "Ja"])
    assert [(c.previous, c.phase, c.seq) for c in changes] == [
        ("greeting", "consent", 1), ("consent", "step_location", 2)]


def test_history_records_when_each_phase_was_entered(machine):
    """History holds each phase reached with the wall-clock time it was entered."""
    walk(machine, [None, "Ja"])
    assert [(v.phase, v.at) for v in machine.history] == [
        ("greeting", 1000.0), ("consent", 1001.0), ("step_location", 1002.0)]


def test_illegal_transition_raises_and_changes_nothing(machine):
    """Jumping from greeting straight to the summary is refused."""
    with pytest.raises(IllegalTransition, match="greeting -> summary"):
        machine.advance("summary")
    assert machine.current == "greeting" and len(machine.history) == 1


def test_interrupt_phases_are_reachable_from_any_non_terminal_phase(script):
    """urgent and aborted can be entered from every phase that is not terminal, and nothing leaves them."""
    for name, phase in script.phases.items():
        allowed = script.allowed(name)
        if phase.is_terminal:
            assert allowed == frozenset()
        else:
            assert {"urgent", "aborted"} <= allowed


def test_guardrail_redirect_moves_a_step_to_urgent(machine):
    """The emergency redirect's phase is a legal move mid-check."""
    walk(machine, [None, "Ja"])
    machine.advance("urgent")
    assert machine.is_finished
    assert not machine.can_advance("consent")


def test_to_wire_describes_the_current_phase_without_user_text(machine):
    """The published JSON names the phase, its step and the path, but never the user's answers."""
    walk(machine, [None, "Ja", "Am Hals, links unter dem Ohr"])
    wire = machine.to_wire()
    assert wire == {
        "v": 1, "phase": "step_size", "title": "Größe", "previous": "step_location", "step": 2, "steps": 4,
        "is_terminal": False, "seq": 3, "at": 1003.0,
        "reached": ["greeting", "consent", "step_location", "step_size"],
    }
    assert "Hals" not in json.dumps(wire, ensure_ascii=False)
    assert machine.wire_attributes() == {WIRE_ATTRIBUTE: "step_size"}


def test_reset_starts_over(machine):
    """reset() returns to the initial phase with no history or answers."""
    walk(machine, [None, "Ja", "Am Hals"])
    machine.reset()
    assert machine.current == "greeting" and not machine.is_started and len(machine.history) == 1


def test_every_scripted_line_passes_the_shipped_output_guardrails(script):
    """The scripted agent never trips its own output guard (summary filled with ordinary answers)."""
    rules = Guardrail.load()
    machine = PhaseMachine(script)
    lines = walk(machine, [a for a, _ in HAPPY_PATH]) + [p.say for p in script.phases.values() if "{" not in p.say]
    lines += [script.finished, script.reprompt] + [p.reprompt for p in script.phases.values() if p.reprompt]
    for line in lines:
        verdict = rules.check_output(line)
        assert verdict.allowed, f"{line!r} blocked by {verdict.rule}"


# --- script files ----------------------------------------------------------------------------------------

MINIMAL = """
[script]
initial = "start"
interrupts = ["end"]
reprompt = "Wie bitte?"
finished = "Vorbei."
instructions = "Sei nett."
guidance = "{title}: {line}"

[phase.start]
say = "Hallo."
[[phase.start.next]]
to = "end"

[phase.end]
say = "Tschüss."
terminal = true
"""

BAD_SCRIPTS = [
    (MINIMAL.replace('initial = "start"', 'initial = "nowhere"'), ["script.initial", "unknown phase 'nowhere'"]),
    (MINIMAL.replace('to = "end"', 'to = "limbo"'), ["phase.start.next.to", "'limbo'"]),
    (MINIMAL.replace('say = "Hallo."', 'say = "Hallo {who}."'), ["phase.start.say", "{who}"]),
    (MINIMAL.replace('[[phase.start.next]]\nto = "end"', ""), ["phase.start.next", "dead end"]),
    (MINIMAL.replace("terminal = true", 'terminal = true\nthen = "start"'), ["phase.end.terminal"]),
    (MINIMAL.replace('say = "Tschüss."', 'sag = "Tschüss."'), ["phase.end.sag", "unknown field"]),
    (MINIMAL.replace('guidance = "{title}: {line}"', 'guidance = "{step}"'), ["script.guidance", "{step}"]),
    (MINIMAL.replace('reprompt = "Wie bitte?"', ""), ["script.reprompt", "required"]),
    (MINIMAL.replace('to = "end"', 'to = "end"\nwords = "ja"'), ["phase.start.next.words", "list"]),
    (MINIMAL + '\n[[phase.start.next]]\nto = "end"\npatterns = ["(x"]\n', ["phase.start.next.patterns", "regex"]),
    (MINIMAL.replace('[phase.start]', '[phase.start]\nthen = "loop"') + '\n[phase.loop]\nsay = "x"\nthen = "start"\n',
     ["then", "loop"]),
    ("[script", ["invalid TOML"]),
]


@pytest.mark.parametrize(("content", "fragments"), BAD_SCRIPTS)
def test_bad_script_gives_one_line_naming_file_phase_and_field(tmp_path, content, fragments):
    """A broken phase script raises ConfigError with one line naming the file and the field."""
    path = tmp_path / "phases.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        PhaseScript.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_custom_script_is_walked_like_the_shipped_one(tmp_path):
    """A minimal two-phase script loads and runs."""
    path = tmp_path / "phases.toml"
    path.write_text(MINIMAL)
    machine = PhaseMachine(PhaseScript.load(path))
    assert machine.respond(None).text == "Hallo."
    assert machine.respond("irgendwas").text == "Tschüss."
    assert machine.is_finished


def test_bad_script_error_points_at_the_line_of_the_key(tmp_path):
    """Like the config and the rules file, a phase script error names the key and file:line."""
    from importlib import resources

    shipped = resources.files("knotd").joinpath("data/phases.toml").read_text(encoding="utf-8")
    lines = shipped.splitlines()
    consent_say = next(i for i, line in enumerate(lines) if line.startswith("[phase.consent]"))
    consent_say = next(i for i in range(consent_say, len(lines)) if lines[i].startswith("say ="))
    lines[consent_say] = 'say = ""'
    path = tmp_path / "phases.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        PhaseScript.load(path)
    assert "phase.consent.say" in str(err.value) and f"{path}:{consent_say + 1})" in str(err.value)

    lines[consent_say] = shipped.splitlines()[consent_say]
    initial = next(i for i, line in enumerate(lines) if line.startswith("initial ="))
    lines[initial] = 'initial = "nowhere"'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"script\.initial \({path}:{initial + 1}\)"):
        PhaseScript.load(path)
