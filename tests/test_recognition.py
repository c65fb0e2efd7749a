"""Recognition context as phase-script data: the prompt Whisper gets, normalised answers, validation."""

from __future__ import annotations

import pytest

from knotd.conversation.phases import PhaseMachine, PhaseScript
from knotd.speech.whisper import is_prompt_echo
from tests import test_phases as phase_tests

STEPS = {"step_location": "location", "step_size": "size", "step_since": "since", "step_changes": "changes"}


@pytest.fixture(scope="module")
def script() -> PhaseScript:
    return PhaseScript.load()


def test_every_check_step_carries_its_recognition_context(script):
    """The four questions each name their answer's field and words; the other phases have none."""
    for name, phase in script.phases.items():
        if name in STEPS:
            assert phase.recognition is not None and phase.recognition.field == STEPS[name]
        else:
            assert phase.recognition is None, name
    assert {"Hals", "Achsel", "Brust", "Leiste", "Kehlkopf"} <= set(script.phase("step_location").recognition.words)
    assert {"Erbse", "Kirsche", "Walnuss"} <= set(script.phase("step_size").recognition.words)
    assert {"Tage", "Wochen", "Monate"} <= set(script.phase("step_since").recognition.words)
    assert {"gewachsen", "schmerzt", "gerötet"} <= set(script.phase("step_changes").recognition.words)


def test_prompt_is_the_question_then_the_expected_words(script):
    recognition = script.phase("step_size").recognition
    prompt = recognition.prompt("Wie groß ist der Knoten ungefähr?")
    assert prompt.startswith("Wie groß ist der Knoten ungefähr? ")
    assert "Erbse, " in prompt and "Kirsche, " in prompt and prompt.endswith(".")


def test_a_long_agent_line_keeps_its_end_in_the_prompt(script):
    """The summary line before a question is long; the question at its end is what the answer answers."""
    recognition = script.phase("step_since").recognition
    line = "Vielen Dank. " * 60 + "Seit wann bemerken Sie den Knoten?"
    prompt = recognition.prompt(line)
    assert "Seit wann bemerken Sie den Knoten?" in prompt
    assert len(prompt) < len(line)


@pytest.mark.parametrize(("phase", "answer", "normalised"), [
    ("step_location", "Er sitzt am Hals, neben dem Kehlkopf.", "Hals, Kehlkopf"),
    ("step_location", "In der linken Achselhöhle.", "links, Achsel"),
    ("step_size", "Ungefähr so groß wie eine Kirsche.", "Kirsche"),
    ("step_size", "Etwa 2 cm.", "2 Zentimeter"),
    ("step_since", "Seit ungefähr drei Wochen.", "3 Wochen"),
    ("step_since", "Seit einem halben Jahr.", "½ Jahr"),
    ("step_changes", "Er schmerzt nicht, ist aber gewachsen.", "schmerzt nicht, gewachsen"),
    ("step_changes", "Nein, keine Veränderung.", "keine Veränderung"),
    ("step_changes", "Die Haut darüber ist gerötet.", "gerötet"),
])
def test_answers_are_normalised_to_the_terms_said(script, phase, answer, normalised):
    assert script.phase(phase).recognition.normalise(answer) == normalised


@pytest.mark.parametrize("answer", ["Er fliegt Tom Hause, Leben dem Kielkopf.", "Weiß ich nicht.", "", None])
def test_an_answer_without_an_expected_term_is_not_understood(script, answer):
    recognition = script.phase("step_location").recognition
    assert recognition.normalise(answer) is None
    assert not recognition.understood(answer)


def test_summary_answers_keep_values_only_when_allowed(script):
    """With record_transcripts the record keeps the normalised answers, else only whether each was understood."""
    machine = PhaseMachine(script)
    for answer in ("Hallo", "Ja.", "Er sitzt am Hals, neben dem Kehlkopf.", "Wie eine Kirche.",
                   "Seit ungefähr drei Wochen."):
        machine.respond(answer)
    assert machine.current == "step_changes"

    def records(with_values: bool) -> dict:
        return {k: v.to_record() for k, v in machine.recognised_answers(with_values=with_values).items()}

    assert records(True) == {
        "location": {"understood": True, "answer": "Hals, Kehlkopf"},
        "size": {"understood": False, "answer": None},  # "Kirche" is not "Kirsche"
        "since": {"understood": True, "answer": "3 Wochen"},
    }
    assert records(False) == {
        "location": {"understood": True}, "size": {"understood": False}, "since": {"understood": True},
    }


SCRIPT = """
[script]
initial = "ask"
reprompt = "Bitte?"
finished = "Fertig."
instructions = "Sei nett."
guidance = "{title}: {line}"

[phase.ask]
say = "Wo?"
then = "end"
{recognition}

[phase.end]
say = "Tschüss."
terminal = true
{other}
"""


@pytest.mark.parametrize(("recognition", "other", "fragments"), [
    ("[phase.ask.recognition]\nterms = { Hals = [] }", "", ["phase.ask.recognition.field", "required"]),
    ('[phase.ask.recognition]\nfield = "Ort!"\nterms = { Hals = [] }', "", ["phase.ask.recognition.field"]),
    ('[phase.ask.recognition]\nfield = "location"', "", ["phase.ask.recognition.terms", "required"]),
    ('[phase.ask.recognition]\nfield = "location"\nterms = { Hals = "hals" }', "",
     ["phase.ask.recognition.terms.Hals", "list of spellings"]),
    ('[phase.ask.recognition]\nfield = "location"\nterms = { Hals = [] }\nhint = "x"', "",
     ["phase.ask.recognition.hint", "unknown field"]),
    ("recognition = 3", "", ["phase.ask.recognition", "table"]),
    ('[phase.ask.recognition]\nfield = "location"\nterms = { Hals = [] }',
     '[phase.end.recognition]\nfield = "location"\nterms = { Leiste = [] }',
     ["phase.end.recognition.field", "already the field of phase ask"]),
])
def test_bad_recognition_context_is_one_line_naming_the_field(tmp_path, recognition, other, fragments):
    content = SCRIPT.replace("{recognition}", recognition).replace("{other}", other)
    phase_tests.test_bad_script_gives_one_line_naming_file_phase_and_field(tmp_path, content, fragments)


@pytest.mark.parametrize(("text", "echo"), [
    ("Sie ihn zum Beispiel mit einer Kirsche oder einer Walnuss.", True),  # what base made of white noise
    ("Wie groß ist der Knoten ungefähr?", True),
    ("Wie groß ist der Knoten ungefähr? Erbse, Kirsche.", True),
    ("erbse kirsche haselnuss walnuss", True),
    ("Wie eine Kirsche.", False),  # an answer using the question's words
    ("Kirsche.", False),
    ("Ungefähr so groß wie eine Kirsche.", False),
    ("Sie ihn, eine Kirsche.", False),
    ("...", False),
])
def test_prompt_echo_is_a_long_run_of_prompt_words_not_an_answer_that_reuses_them(script, text, echo):
    phase = script.phase("step_size")
    assert is_prompt_echo(text, phase.recognition.prompt(phase.say)) is echo


def test_an_answer_in_the_words_of_the_question_is_not_an_echo(script):
    """Heard right, "Die Haut darüber ist gerötet." shares four words with its question; it is an answer."""
    phase = script.phase("step_changes")
    assert not is_prompt_echo("Die Haut darüber ist gerötet.", phase.recognition.prompt(phase.say))
