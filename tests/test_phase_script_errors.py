"""A bad phase script is one line naming the key and saying what is wrong (`knotd check-config` prints it),
for every check the script parser makes; the valid minimal script loads.

Written for what mutation testing (`./dev.sh mutate`) showed test_phases.py let through: it checked that a
bad script fails, not what the operator reads. The file:line part is the Locator's (tested elsewhere).
"""
# ruff: noqa: E501

from __future__ import annotations

import re

import pytest

from knotd.conversation.phases import PhaseMachine, PhaseScript
from knotd.errors import ConfigError

S = '''[script]
initial = "start"
interrupts = ["stop"]
reprompt = "Bitte?"
finished = "Fertig."
instructions = "Sei kurz."
guidance = "{title}: {line}"

[[script.anywhere]]
to = "stop"
words = ["abbrechen"]

[phase.start]
say = "Hallo."
then = "ask"

[phase.ask]
say = "Wo?"
[[phase.ask.next]]
to = "end"
words = ["hals"]
[[phase.ask.next]]
to = "end"

[phase.end]
say = "Tschuess."
terminal = true

[phase.stop]
say = "Abgebrochen."
terminal = true
'''


def rep(a, b, s=S):
    assert a in s, a
    return s.replace(a, b, 1)


CASES = [
 ("unknown top-level key", "extra = 1\n" + S),
 ("no script table", S.split("[[script.anywhere]]")[1].split("\n", 1)[1].replace('to = "stop"\nwords = ["abbrechen"]\n', "")),
 ("no phases", S.split("[phase.start]")[0].replace('[[script.anywhere]]\nto = "stop"\nwords = ["abbrechen"]\n', "")),
 ("unknown script field", rep('initial = "start"', 'initial = "start"\ncolour = 1')),
 ("unknown initial phase", rep('initial = "start"', 'initial = "begin"')),
 ("interrupts not a list", rep('interrupts = ["stop"]', 'interrupts = "stop"')),
 ("unknown interrupt", rep('interrupts = ["stop"]', 'interrupts = ["stop", "halt"]')),
 ("blank reprompt", rep('reprompt = "Bitte?"', 'reprompt = " "')),
 ("missing finished", rep('finished = "Fertig."\n', '')),
 ("unknown guidance placeholder", rep('guidance = "{title}: {line}"', 'guidance = "{title}: {satz}"')),
 ("bad guidance placeholder", rep('guidance = "{title}: {line}"', 'guidance = "{title: {line}"')),
 ("anywhere target not an interrupt", rep('[[script.anywhere]]\nto = "stop"', '[[script.anywhere]]\nto = "end"')),
 ("phase not a table", rep('[phase.stop]\nsay = "Abgebrochen."\nterminal = true\n', '[phase]\nstop = 3\n').replace("[phase.start]", "[phase.start]")),
 ("unknown phase field", rep('say = "Hallo."', 'say = "Hallo."\ncolour = 1')),
 ("no say", rep('say = "Hallo."\n', '')),
 ("empty title", rep('say = "Hallo."', 'say = "Hallo."\ntitle = ""')),
 ("step zero", rep('say = "Wo?"', 'say = "Wo?"\nstep = 0')),
 ("step a boolean", rep('say = "Wo?"', 'say = "Wo?"\nstep = true')),
 ("terminal not a boolean", rep('say = "Tschuess."\nterminal = true', 'say = "Tschuess."\nterminal = "yes"')),
 ("blank phase reprompt", rep('say = "Wo?"', 'say = "Wo?"\nreprompt = "  "')),
 ("next not tables", rep('say = "Hallo."\nthen = "ask"', 'say = "Hallo."\nnext = "ask"')),
 ("next entry not a table", rep('say = "Hallo."\nthen = "ask"', 'say = "Hallo."\nnext = ["ask"]')),
 ("unknown transition field", rep('to = "end"\nwords = ["hals"]', 'to = "end"\nwords = ["hals"]\ncolour = 1')),
 ("words not strings", rep('words = ["hals"]', 'words = ["hals", ""]')),
 ("patterns not a list", rep('words = ["hals"]', 'patterns = "hals"')),
 ("transition without to", rep('to = "end"\nwords = ["hals"]', 'words = ["hals"]')),
 ("bad regex", rep('words = ["hals"]', 'patterns = ["(hals"]')),
 ("unknown next target", rep('to = "end"\nwords = ["hals"]', 'to = "ende"\nwords = ["hals"]')),
 ("unknown then target", rep('then = "ask"', 'then = "asked"')),
 ("unknown say placeholder", rep('say = "Wo?"', 'say = "Wo? {hals}"')),
 ("terminal with next", rep('say = "Tschuess."\nterminal = true', 'say = "Tschuess."\nterminal = true\nthen = "start"')),
 ("dead end", rep('say = "Tschuess."\nterminal = true', 'say = "Tschuess."')),
 ("then loop", rep('say = "Hallo."\nthen = "ask"', 'say = "Hallo."\nthen = "start"')),
]

EXPECTED = {
    'unknown top-level key': 'config error at extra: unknown top-level key (expected [script] and [phase.<name>] tables)',
    'no script table': 'config error at script: missing [script] table',
    'no phases': 'config error at phase: no phases: add [phase.<name>] tables',
    'unknown script field': 'config error at script.colour: unknown field (expected one of anywhere, finished, guidance, initial, instructions, interrupts, reprompt)',
    'unknown initial phase': "config error at script.initial: unknown phase 'begin' (phases: start, ask, end, stop)",
    'interrupts not a list': 'config error at script.interrupts: expected a list of phase names',
    'unknown interrupt': "config error at script.interrupts: unknown phase 'halt' (phases: start, ask, end, stop)",
    'blank reprompt': 'config error at script.reprompt: required: a non-empty string',
    'missing finished': 'config error at script.finished: required: a non-empty string',
    'unknown guidance placeholder': 'config error at script.guidance: unknown placeholder {satz} (allowed: line, title)',
    'bad guidance placeholder': "config error at script.guidance: bad {placeholder}: unmatched '{' in format spec",
    'anywhere target not an interrupt': "config error at script.anywhere.to: 'end' must be listed in script.interrupts",
    'phase not a table': 'config error at phase.stop: must be a table',
    'unknown phase field': 'config error at phase.start.colour: unknown field (expected one of next, recognition, reprompt, say, step, terminal, then, title)',
    'no say': 'config error at phase.start.say: required: the German line the agent says',
    'empty title': 'config error at phase.start.title: expected a non-empty string',
    'step zero': 'config error at phase.ask.step: expected a whole number from 1',
    'step a boolean': 'config error at phase.ask.step: expected a whole number from 1',
    'terminal not a boolean': 'config error at phase.end.terminal: expected true or false',
    'blank phase reprompt': 'config error at phase.ask.reprompt: expected a non-empty string',
    'next not tables': "config error at phase.start.next: expected [[...]] tables with 'to' and optional 'words' / 'patterns'",
    'next entry not a table': 'config error at phase.start.next: expected a table',
    'unknown transition field': 'config error at phase.ask.next.colour: unknown field (expected to, words, patterns)',
    'words not strings': 'config error at phase.ask.next.words: expected a list of non-empty strings',
    'patterns not a list': 'config error at phase.ask.next.patterns: expected a list of non-empty strings',
    'transition without to': 'config error at phase.ask.next.to: required: the phase this answer leads to',
    'bad regex': 'config error at phase.ask.next.patterns: invalid regex: missing ), unterminated subpattern at position 0',
    'unknown next target': "config error at phase.ask.next.to: unknown phase 'ende' (phases: start, ask, end, stop)",
    'unknown then target': "config error at phase.start.then: unknown phase 'asked' (phases: start, ask, end, stop)",
    'unknown say placeholder': 'config error at phase.ask.say: unknown placeholder {hals} (allowed: ask, end, start, stop)',
    'terminal with next': "config error at phase.end.terminal: a terminal phase has no 'next' or 'then'",
    'dead end': "config error at phase.end.next: dead end: give 'next' transitions or 'then', or set terminal = true",
    'then loop': "config error at phase.start.then: 'then' phases form a loop",
}


@pytest.mark.parametrize("text,name", [(text, name) for name, text in CASES], ids=[name for name, _ in CASES])
def test_each_bad_script_gets_its_own_sentence(text, name):
    with pytest.raises(ConfigError) as info:
        PhaseScript.parse(text, source="phases.toml")
    assert re.sub(r" [(][^()]*[)]:", ":", str(info.value), count=1) == EXPECTED[name]


def test_the_minimal_script_loads_and_walks():
    script = PhaseScript.parse(S, source="phases.toml")
    assert (script.initial, script.reprompt, script.finished, script.instructions) == ("start", "Bitte?", "Fertig.", "Sei kurz.")
    assert script.interrupts == frozenset({"stop"}) and script.source == "phases.toml"
    machine = PhaseMachine(script)
    assert machine.current == "start"



def test_a_missing_script_file_names_the_setting_and_the_path():
    with pytest.raises(ConfigError) as info:
        PhaseScript.load("/nonexistent/phases.toml")
    assert str(info.value) == "config error at session.phases: file not found: /nonexistent/phases.toml"


def test_a_then_chain_that_runs_into_a_loop_is_refused():
    text = rep('say = "Wo?"\n', 'say = "Wo?"\nthen = "loop"\n').replace(
        '[[phase.ask.next]]\nto = "end"\nwords = ["hals"]\n[[phase.ask.next]]\nto = "end"\n', "")
    text += '\n[phase.loop]\nsay = "Und?"\nthen = "ask"\n'
    with pytest.raises(ConfigError) as info:
        PhaseScript.parse(text, source="phases.toml")
    assert "'then' phases form a loop" in str(info.value)


def test_an_answer_no_step_knows_gets_the_reprompt_and_the_question_again():
    text = S.replace('[[phase.ask.next]]\nto = "end"\n\n', "\n")
    machine = PhaseMachine(PhaseScript.parse(text, source="phases.toml"))
    assert machine.respond(None).text == "Hallo. Wo?"
    assert machine.respond("Am Bein.").text == "Bitte? Wo?"
    assert machine.current == "ask"
    assert machine.respond("Am Hals.").text == "Tschuess."
