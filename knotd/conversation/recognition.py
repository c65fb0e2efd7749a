"""What a phase expects to hear, as data: the prompt Whisper gets and the normalised answer it yields.

A phase of the script may carry a ``[phase.<name>.recognition]`` table (see ``knotd/data/phases.toml``):

- ``field``: the name its answer has in the summary (``location``, ``size``, ``since``, ``changes``);
- ``terms``: the answer's vocabulary, each canonical word with the spellings that count as it
  (``Wochen = ["woche", "wochen"]``, matched like guardrail word lists; ``*`` = any letters).

``prompt(question)`` is what Whisper reads before the caller's answer: the question the agent asked and the
canonical words. ``normalise(answer)`` is the answer reduced to its terms in the order said, each with the
number before it ("seit ungefähr drei Wochen" -> "3 Wochen") and a negation next to it ("schmerzt nicht").

Pure: no I/O, no livekit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from knotd.conversation.guardrails import normalize
from knotd.errors import ConfigError

# Whisper reads at most 223 prompt tokens; a long agent line keeps its end (the question comes last).
MAX_QUESTION_CHARS = 300

# "ein/eine/einer …" are left out: mostly articles ("wie eine Kirsche"), and "einer Woche" says it anyway.
NUMBERS = {
    "zwei": 2, "drei": 3, "vier": 4, "fuenf": 5,
    "sechs": 6, "sieben": 7, "acht": 8, "neun": 9, "zehn": 10, "elf": 11, "zwoelf": 12, "halben": 0.5,
}
NEGATIONS = frozenset({"nicht", "kein", "keine", "keinen", "keiner", "nichts", "nie"})
_TOKEN = re.compile(r"\w+")
_KEYS = {"field", "terms"}


@dataclass(frozen=True)
class StepAnswer:
    """The caller's answer to one check step, as the session summary keeps it.

    ``understood``: it named one of the phase's terms. ``answer``: its normalised form ("Hals, Kehlkopf";
    None when not understood); ``kept`` says whether the summary may hold it (``session.record_transcripts``).
    """

    understood: bool
    answer: str | None = None
    kept: bool = False

    def to_record(self) -> dict[str, Any]:
        return {"understood": self.understood, "answer": self.answer} if self.kept else {"understood": self.understood}


@dataclass(frozen=True)
class Term:
    """One word of a phase's vocabulary: how it is written, and what in a transcript counts as it."""

    word: str
    spellings: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, word: str, spellings: list[str]) -> Term:
        regexes = []
        for spelling in spellings or [word]:
            body = r"\w*".join(re.escape(part) for part in normalize(spelling).split("*")).replace(r"\ ", r"\s+")
            regexes.append(re.compile(rf"(?<!\w){body}(?!\w)"))
        return cls(word, tuple(regexes))

    def positions(self, normalized: str) -> list[int]:
        """Where the term starts in ``normalized`` (the output of ``normalize()``)."""
        return sorted({m.start() for regex in self.spellings for m in regex.finditer(normalized)})


@dataclass(frozen=True)
class Recognition:
    """A phase's recognition context (immutable, shared by every session)."""

    field: str
    terms: tuple[Term, ...]

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(t.word for t in self.terms)

    def prompt(self, question: str | None) -> str:
        """Whisper's prompt for an answer to ``question`` (the agent's last line): the question, then the words."""
        question = " ".join((question or "").split())
        if len(question) > MAX_QUESTION_CHARS:
            question = question[-MAX_QUESTION_CHARS:].split(" ", 1)[-1]
        return f"{question} {', '.join(self.words)}.".strip()

    def normalise(self, answer: str | None) -> str | None:
        """The answer's terms in the order said ("Hals, Kehlkopf"; "3 Wochen"); None if it has none."""
        text = normalize(answer or "")
        tokens = [(m.start(), m.group()) for m in _TOKEN.finditer(text)]
        found: list[tuple[int, str]] = []
        for term in self.terms:
            for start in term.positions(text):
                index = next(i for i, (at, _) in enumerate(tokens) if at >= start)
                found.append((index, term.word))
        parts: list[str] = []
        for index, word in sorted(found):
            before = [tok for _, tok in tokens[max(0, index - 2):index]]
            after = tokens[index + 1][1] if index + 1 < len(tokens) else ""
            part = word
            if before and (before[-1].isdigit() or before[-1] in NUMBERS):
                number = before[-1] if before[-1].isdigit() else _number(NUMBERS[before[-1]])
                part = f"{number} {word}"
            if after == "nicht":
                part = f"{part} nicht"
            elif negation := next((t for t in before if t in NEGATIONS), None):
                part = f"{negation} {part}"
            if part not in parts:
                parts.append(part)
        return ", ".join(parts) or None

    def understood(self, answer: str | None) -> bool:
        return self.normalise(answer) is not None


def _number(value: float) -> str:
    return "½" if value == 0.5 else str(int(value))


def parse_recognition(key: str, raw: Any, fail: Callable[[str, str], ConfigError]) -> Recognition:
    """A ``[phase.<name>.recognition]`` table; ``key`` names it in errors.

    Raises:
        ConfigError: a missing or mistyped field, an empty vocabulary.
    """
    if not isinstance(raw, dict):
        raise fail(key, "must be a table with 'field' and 'terms'")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", "unknown field (expected field, terms)")
    field = raw.get("field")
    if not isinstance(field, str) or not re.fullmatch(r"[a-z][a-z_]*", field):
        raise fail(f"{key}.field", "required: the answer's name in the summary, lowercase letters and _")
    terms_raw = raw.get("terms")
    if not isinstance(terms_raw, Mapping) or not terms_raw:
        raise fail(f"{key}.terms", "required: a table of words, each with the spellings that count as it")
    terms = []
    for word, spellings in terms_raw.items():
        if not isinstance(spellings, list) or not all(isinstance(s, str) and s.strip() for s in spellings):
            raise fail(f"{key}.terms.{word}", "expected a list of spellings (may be empty: the word itself)")
        terms.append(Term.of(word, spellings))
    return Recognition(field, tuple(terms))
