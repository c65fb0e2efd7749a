"""A bad guardrails rules file is one line that names the rule and the field and says what to write (as
`knotd check-config` prints it); and the output guard's handling of the LLM stream it cuts.

Written for what mutation testing (`./dev.sh mutate`) showed the other guardrail tests let through.
"""
# ruff: noqa: E501

from __future__ import annotations

import pytest

from knotd.conversation.guardrails import Guardrail, SentenceGuard, guard_llm_output
from knotd.errors import ConfigError

CASES = [
    # (id, rules file text, the whole error line)
    ('not a table', 'rule = ["x"]\n',
     'config error at rule[#1] (rules.toml): must be a table ([[rule]])'),
    ('unknown field', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\ncolour = 1\n',
     'config error at rule[r].colour (rules.toml:2): unknown field (expected one of action, direction, exemplars, name, output_exemplars, patterns, phase, reply, skip_negated, threshold, words)'),
    ('no name', '[[rule]]\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     "config error at rule[#1].name (rules.toml): required: lower-case letters, digits and '_' (it becomes a metric label)"),
    ('empty name', '[[rule]]\nname = ""\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     "config error at rule[#1].name (rules.toml): required: lower-case letters, digits and '_' (it becomes a metric label)"),
    ('bad name', '[[rule]]\nname = "Bad Name"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     "config error at rule[#1].name (rules.toml:2): required: lower-case letters, digits and '_' (it becomes a metric label)"),
    ('no reply', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nwords = ["x"]\n',
     'config error at rule[r].reply (rules.toml:2): required: the German line spoken instead'),
    ('blank reply', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "  "\nwords = ["x"]\n',
     'config error at rule[r].reply (rules.toml:2): required: the German line spoken instead'),
    ('patterns not a list', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\npatterns = "x"\n',
     'config error at rule[r].patterns (rules.toml:2): expected a list of non-empty strings'),
    ('output_exemplars not a list', '[[rule]]\nname = "r"\ndirection = "both"\naction = "block"\nreply = "Nein."\nwords = ["x"]\noutput_exemplars = "x"\n',
     'config error at rule[r].output_exemplars (rules.toml:2): expected a list of non-empty strings'),
    ('output_exemplars on input', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\noutput_exemplars = ["x"]\n',
     'config error at rule[r].output_exemplars (rules.toml:2): only for direction = "both" (otherwise \'exemplars\' serve the one direction)'),
    ('nothing to match', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\n',
     "config error at rule[r].words (rules.toml:2): a rule needs at least one entry in 'words', 'patterns' or 'exemplars'"),
    ('skip_negated not bool', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\nskip_negated = "yes"\n',
     'config error at rule[r].skip_negated (rules.toml:2): expected true or false'),
    ('skip_negated on output', '[[rule]]\nname = "r"\ndirection = "output"\naction = "block"\nreply = "Nein."\nwords = ["x"]\nskip_negated = true\n',
     'config error at rule[r].skip_negated (rules.toml:2): applies to input only: a negated diagnosis or dose is still one'),
    ('phase not a string', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\nphase = 3\n',
     'config error at rule[r].phase (rules.toml:2): expected a phase name'),
    ('empty phase', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\nphase = ""\n',
     'config error at rule[r].phase (rules.toml:2): expected a phase name'),
    ('redirect without phase', '[[rule]]\nname = "r"\ndirection = "input"\naction = "redirect"\nreply = "Nein."\nwords = ["x"]\n',
     'config error at rule[r].phase (rules.toml:2): required when action = "redirect" (the phase the conversation moves to)'),
    ('semantic not a table', 'semantic = 3\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     'config error at semantic (rules.toml): must be a table ([semantic])'),
    ('unknown semantic field', '[semantic]\ncolour = 1\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     'config error at semantic.colour (rules.toml): unknown field (expected one of margin, safe_input, safe_output, threshold)'),
    ('threshold a boolean', '[semantic]\nthreshold = true\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     'config error at semantic.threshold (rules.toml): expected a similarity above 0 and at most 1; got True'),
    ('threshold a string', '[semantic]\nthreshold = "high"\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     "config error at semantic.threshold (rules.toml): expected a similarity above 0 and at most 1; got 'high'"),
    ('threshold zero', '[semantic]\nthreshold = 0\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     'config error at semantic.threshold (rules.toml): expected a similarity above 0 and at most 1; got 0'),
    ('threshold above one', '[semantic]\nthreshold = 1.5\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     'config error at semantic.threshold (rules.toml): expected a similarity above 0 and at most 1; got 1.5'),
    ('rule threshold zero', '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\nthreshold = 0.0\n',
     'config error at rule[r].threshold (rules.toml:2): expected a similarity above 0 and at most 1; got 0.0'),
    ('two unknown top-level keys', 'zeta = 1\nalpha = 2\n[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n',
     "config error at guardrails.rules (rules.toml): unknown top-level key 'alpha' (expected [[rule]] or [semantic])"),
    ('no rules at all', '[semantic]\nthreshold = 0.5\n',
     'config error at guardrails.rules (rules.toml): no rules: add at least one [[rule]] table'),
    ('rule is not a list', 'rule = 3\n',
     'config error at guardrails.rules (rules.toml): no rules: add at least one [[rule]] table'),
    ('empty rule list', 'rule = []\n',
     'config error at guardrails.rules (rules.toml): no rules: add at least one [[rule]] table'),
    ('not TOML', '[[rule]\n',
     "config error at guardrails.rules (rules.toml): invalid TOML: Expected ']]' at the end of an array declaration (at line 1, column 7)"),
]


@pytest.mark.parametrize("text,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_bad_rule_gets_its_own_sentence(text, message):
    with pytest.raises(ConfigError) as info:
        Guardrail.parse(text, source="rules.toml")
    assert str(info.value) == message


async def test_after_a_hit_the_llm_stream_is_closed_and_nothing_more_is_read():
    """The LLM's answer goes on after an unsafe sentence: knotd stops reading and closes the stream."""
    read, closed = [], []

    async def llm():
        try:
            for piece in ("Das ist Krebs. ", "Und noch mehr. ", "Noch mehr."):
                read.append(piece)
                yield piece
        finally:
            closed.append(True)

    stream = llm()  # held here: only the guard may close it
    guard = SentenceGuard(Guardrail.load())
    spoken = [piece async for piece in guard_llm_output(stream, guard)]
    assert guard.hit is not None and guard.hit.rule == "no_diagnosis"
    assert spoken == [guard.hit.reply]
    assert closed == [True] and read == ["Das ist Krebs. "]


def test_a_discarded_reply_holds_nothing_and_releases_nothing():
    guard = SentenceGuard(Guardrail.load())
    assert guard.feed("Wo sitzt der Kno") == []
    assert guard.discard() == len("Wo sitzt der Kno")
    assert guard.pending == "" and guard.is_stopped
    assert guard.feed("ten? ") == [] and guard.flush() == []


def test_a_missing_rules_file_names_the_setting_and_the_path():
    with pytest.raises(ConfigError) as info:
        Guardrail.load("/nonexistent/rules.toml")
    assert str(info.value) == "config error at guardrails.rules: file not found: /nonexistent/rules.toml"


def test_a_similarity_of_exactly_one_is_allowed():
    rule = '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n'
    assert Guardrail.parse("[semantic]\nthreshold = 1.0\n" + rule + "threshold = 1\n").rules[0].threshold == 1.0


def test_rules_given_as_text_are_named_rules_in_errors():
    with pytest.raises(ConfigError) as info:
        Guardrail.parse("rule = []\n")
    assert str(info.value) == "config error at guardrails.rules (<rules>): no rules: add at least one [[rule]] table"


def test_a_pattern_written_with_capitals_still_matches():
    """Rules see normalised (lower-case) text; an operator's pattern in capitals must not silently never fire."""
    guard = Guardrail.parse('[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\n'
                            'patterns = ["\\\\bICD\\\\b"]\n')
    assert guard.check_input("Welcher ICD-Code ist das?").rule == "r"


# --- the output guard's sentences: what reaches the speaker, and when ----------------------------------------


@pytest.mark.parametrize("text,released", [
    ("Wählen Sie die 112... Jetzt", ["Wählen Sie die 112... "]),  # an ellipsis after a number ends a sentence
    ("Wählen Sie die 112.. Jetzt", ["Wählen Sie die 112.. "]),
    ("Erste Zeile\nZweite", ["Erste Zeile\n"]),  # a line break ends one
    ("Sagen Sie „Ja“. Dann", ["Sagen Sie „Ja“. "]),  # a full stop after a quote
    ("Das ist z. B. gut. Weiter", ["Das ist z. B. gut. "]),  # an abbreviation does not stop the search
])
def test_a_sentence_is_released_as_soon_as_it_ends(text, released):
    assert SentenceGuard(Guardrail.load()).feed(text) == released


def test_text_without_a_sentence_end_is_cut_only_beyond_400_characters():
    held = SentenceGuard(Guardrail.load())
    assert held.feed("wort " * 80) == [] and len(held.pending) == 400
    cut = SentenceGuard(Guardrail.load())
    assert cut.feed("wort " * 80 + "x") == ["wort " * 80] and cut.pending == "x"
    lead = SentenceGuard(Guardrail.load())
    assert lead.feed(" " + "x" * 450) == [" "]  # the only space is the first character
    both = SentenceGuard(Guardrail.load())
    released = both.feed("Kurz. " + "wort " * 85)
    assert released[0] == "Kurz. " and "".join(released) + both.pending == "Kurz. " + "wort " * 85


def test_flush_releases_what_is_held_once_and_nothing_from_an_empty_guard():
    guard = SentenceGuard(Guardrail.load())
    assert guard.flush() == [] and guard.busy_s == 0.0
    guard.feed("Bis bald")
    assert guard.busy_s >= 0.0  # feed() adds the time it spent
    assert guard.flush() == ["Bis bald"] and guard.pending == "" and guard.flush() == []
    assert 0.0 <= guard.busy_s < 3600  # the output_guard stage: a duration, not a clock reading


def test_sentences_are_checked_one_by_one_not_with_the_one_before():
    guard = Guardrail.parse('[[rule]]\nname = "pair"\ndirection = "output"\naction = "block"\nreply = "Nein."\n'
                            'patterns = ["ja\\\\W+nein"]\n')
    stream = SentenceGuard(guard)
    assert stream.feed("Sagen Sie ja. Nein heißt nein. ") == ["Sagen Sie ja. ", "Nein heißt nein. "]
    assert stream.hit is None


async def test_the_output_guard_reads_an_llm_stream_that_cannot_be_closed():
    class Stream:  # an async iterator without aclose()
        def __init__(self):
            self.pieces = ["Wo sitzt ", "der Knoten? "]

        def __aiter__(self):
            return self

        async def __anext__(self):
            if not self.pieces:
                raise StopAsyncIteration
            return self.pieces.pop(0)

    spoken = [p async for p in guard_llm_output(Stream(), SentenceGuard(Guardrail.load()))]
    assert "".join(spoken) == "Wo sitzt der Knoten? "


def test_a_session_counts_a_keyed_message_once_and_remembers_the_last_16():
    from knotd.conversation.guardrails import SessionGuard

    session = SessionGuard(Guardrail.load())
    for n in range(16):
        session.check_input(f"Antwort {n}", key=f"m{n}")
    session.check_input("Antwort 0", key="m0")  # asked again by a second hook: not counted again
    assert session.close().checks == {"input": 16}
    session = SessionGuard(Guardrail.load())
    for n in range(17):
        session.check_input(f"Antwort {n}", key=f"m{n}")
    session.check_input("Antwort 0", key="m0")  # the oldest of 17 is forgotten: counted again
    assert session.close().checks == {"input": 18}


def test_closing_a_session_counts_the_reply_text_still_held_back():
    from knotd.conversation.guardrails import SessionGuard

    session = SessionGuard(Guardrail.load())
    first = session.sentence_guard()
    first.feed("Halb gesagt")
    session.sentence_guard().feed("Fertig. ")
    assert session.close().discarded_chars == len("Halb gesagt")


RULE = '[[rule]]\nname = "r"\ndirection = "input"\naction = "block"\nreply = "Nein."\nwords = ["x"]\n'


@pytest.mark.parametrize("text,message", [
    ('[semantic]\nmargin = -1.5\n' + RULE,
     'config error at semantic.margin (rules.toml): expected a number from -1 to 1; got -1.5'),
    ('[semantic]\nsafe_output = "x"\n' + RULE,
     'config error at semantic.safe_output (rules.toml): expected a list of non-empty strings'),
    (RULE + RULE, 'config error at rule[r].name (rules.toml:2): duplicate rule name'),
], ids=["margin below -1", "safe_output not a list", "duplicate rule name"])
def test_more_bad_rules_files_get_their_own_sentence(text, message):
    test_each_bad_rule_gets_its_own_sentence(text, message)


def test_an_emergency_redirects_to_the_urgent_phase_and_an_overlong_message_is_blocked():
    """The verdict's action is what the session acts on: redirect moves the conversation, block refuses."""
    rules = Guardrail.load(max_input_chars=100)
    verdict = rules.check_input("Ich habe Atemnot.")
    assert (verdict.rule, verdict.action, verdict.phase) == ("emergency", "redirect", "urgent")
    assert rules.check_input("ab " * 33 + "c").allowed  # exactly 100 characters: not too long
    too_long = rules.check_input("ab " * 33 + "cd")
    assert (too_long.allowed, too_long.rule, too_long.action) == (False, "input_too_long", "block")
