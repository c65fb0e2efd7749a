"""Recognition context as phase-script data: the prompt Whisper gets, normalised answers, validation."""

from __future__ import annotations

import pytest

from knotd.conversation.phases import PhaseMachine, PhaseScript
from knotd.conversation.recognition import koelner_phonetik
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


# -- near-miss correction: what the STT hands the session -----------------------------------------------

@pytest.mark.parametrize(("phase", "heard", "corrected"), [
    # The examples: the demo's location answer as Whisper base wrote it, with and without context.
    ("step_location", "Er fliegt Tom Hals, Leben dem Kielkopf.", "Er fliegt Tom Hals, Leben dem Kehlkopf."),
    ("step_location", "Elite Tomhals, live in dem Kail-Kopf.", "Elite Tomhals, live in dem Kehlkopf."),
    ("step_location", "Er liegt im Haus, live in dem Kiel kopf.", "Er liegt im Haus, live in dem Kehlkopf."),
    ("step_size", "Etma, so groß, wie eine Kirche.", "Etma, so groß, wie eine Kirsche."),
    # From the tuning half of tests/phase_answers.py (benchmarks/stt_context.py --set tuning --show).
    ("step_location", "Link in der Prost, oder halb der Prost-Machsel.",
     "Links in der Brust, oder halb der Brust-Achsel."),
    ("step_size", "Etma, so goss, nie einer Pallnuss.", "Etma, so goss, nie einer Walnuss."),
    ("step_since", "Naht es mach's ihn taugen.", "Naht es mach's ihn Tagen."),  # a spelling: Tagen, not Tage
    ("step_changes", "Ja, er ist gemachsend.", "Ja, er ist gewachsen."),
    ("step_changes", "Er schmärkt nicht, ist haben gemacht sind.", "Er schmerzt nicht, ist haben gemacht sind."),
])
def test_near_misses_of_the_phases_words_are_written_as_the_words(script, phase, heard, corrected):
    recognition = script.phase(phase).recognition
    assert recognition.correct(heard) == corrected
    assert recognition.normalise(corrected) is not None


def test_a_correctly_heard_answer_is_never_rewritten(script):
    """Every answer of the tuning half, heard word for word, comes out of its phase's correction unchanged."""
    from tests.phase_answers import TUNING

    changed = [(a.text, script.phase(a.phase).recognition.correct(a.text)) for a in TUNING]
    assert [pair for pair in changed if pair[0] != pair[1]] == []


@pytest.mark.parametrize(("phase", "text"), [
    ("step_location", "Wir waren in der Kirche."),  # Kirsche is a size: not a candidate while the place is asked
    ("step_size", "Er sitzt am Hals, neben dem Kehlkopf."),
    ("step_location", "Oder halb der Brust."),  # "halb" is one letter from "Hals", but does not sound like it
    ("step_changes", "Er ist so groß wie am Anfang."),  # "groß" is not "größer"
    ("step_since", "Ich habe ihn am Tag bemerkt."),  # short words are never rewritten alone
    ("consent", "Ja, gerne."),  # a phase without recognition context has nothing to correct towards
])
def test_ordinary_words_and_other_phases_words_stay(script, phase, text):
    recognition = script.phase(phase).recognition
    assert (recognition.correct(text) if recognition is not None else text) == text


def test_the_correction_follows_the_phase_script(tmp_path):
    """The words come from the script: a replaced script corrects towards its own terms."""
    content = SCRIPT.replace("{recognition}", '[phase.ask.recognition]\nfield = "location"\n'
                                              'terms = { Ellenbogen = [], "Knöchel" = ["knoechel"] }'
                             ).replace("{other}", "")
    path = tmp_path / "phases.toml"
    path.write_text(content, encoding="utf-8")
    recognition = PhaseScript.load(path).phase("ask").recognition
    assert recognition.correct("Am Elenbogen, nicht am Knüchel.") == "Am Ellenbogen, nicht am Knöchel."
    assert recognition.correct("Am Kehl kopf.") == "Am Kehl kopf."


@pytest.mark.parametrize(("word", "code"), [
    ("wikipedia", "3412"), ("muellerluedenscheidt", "65752682"), ("kielkopf", "45413"),
    ("kehlkopf", "45413"), ("prost", "1782"), ("brust", "1782"), ("xaver", "4837"),
])
def test_koelner_phonetik_codes(word, code):
    assert koelner_phonetik(word) == code
