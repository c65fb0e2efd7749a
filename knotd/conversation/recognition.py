"""What a phase expects to hear, as data: the prompt Whisper gets and the normalised answer it yields.

A phase of the script may carry a ``[phase.<name>.recognition]`` table (see ``knotd/data/phases.toml``):

- ``field``: the name its answer has in the summary (``location``, ``size``, ``since``, ``changes``);
- ``terms``: the answer's vocabulary, each canonical word with the spellings that count as it
  (``Wochen = ["woche", "wochen"]``, matched like guardrail word lists; ``*`` = any letters).

``prompt(question)`` is what Whisper reads before the caller's answer: the question the agent asked and the
canonical words. ``correct(transcript)`` rewrites what Whisper still mishears into those words when it is
close in letters and in sound ("Kielkopf" -> "Kehlkopf", "Kirche" -> "Kirsche"); the STT applies it before
anyone reads the transcript. ``normalise(answer)`` is the answer reduced to its terms in the order said, each
with the number before it ("seit ungefähr drei Wochen" -> "3 Wochen") and a negation next to it ("schmerzt
nicht").

Pure: no I/O, no livekit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
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
    forms: tuple[_Form, ...] = ()  # the word and its spellings without `*`, as `Recognition.correct` writes them

    @classmethod
    def of(cls, word: str, spellings: list[str]) -> Term:
        regexes = []
        for spelling in spellings or [word]:
            body = r"\w*".join(re.escape(part) for part in normalize(spelling).split("*")).replace(r"\ ", r"\s+")
            regexes.append(re.compile(rf"(?<!\w){body}(?!\w)"))
        forms = {normalize(word): _Form.of(word)}
        for spelling in spellings:
            # A spelling is written as the word is: "tagen" for Tage gives "Tagen".
            written = spelling[:1].upper() + spelling[1:] if word[:1].isupper() else spelling
            if "*" not in spelling:
                forms.setdefault(normalize(spelling), _Form.of(written))
        return cls(word, tuple(regexes), tuple(forms.values()))

    def positions(self, normalized: str) -> list[int]:
        """Where the term starts in ``normalized`` (the output of ``normalize()``)."""
        return sorted({m.start() for regex in self.spellings for m in regex.finditer(normalized)})


# -- near-miss correction -----------------------------------------------------------------------------

# A transcript word (or two written apart: "Kiel kopf", "Kail-Kopf") is rewritten to a term of the
# phase when it sounds and looks like it: the mean of the letter similarity and the Kölner Phonetik code
# similarity (each 1 - edit distance / longer length) reaches CORRECTION_THRESHOLD. Chosen on the tuning
# half of tests/phase_answers.py (benchmarks/stt_context.py --set tuning --show): at 0.72 every rewrite of
# those transcripts is right ("Kielkopf" → Kehlkopf 0.88, "Kirche" → Kirsche 0.76, "gemachsend" →
# gewachsen 0.73, "Pallnuss" → Walnuss 0.75) and no word of a correctly heard answer changes; at 0.70
# "oberhalb", heard as "oder halb", became "oder Hals" (0.71; "Haus" → Hals is left at the same score), and
# at 0.68 "groß" became "größer" (0.69).
CORRECTION_THRESHOLD = 0.72
# Heard pieces shorter than this (letters, normalised) are never rewritten alone: "als", "Tag", "am".
MIN_CORRECTED_LETTERS = 4
MAX_JOINED_WORDS = 2
_HEARD = re.compile(r"\w+")
_JOINER = re.compile(r"[\s-]*")  # what may stand between the pieces of one misheard word


def _edit_distance(a: str, b: str, limit: int | None = None) -> int:
    """Levenshtein distance; above ``limit`` it stops early and returns ``limit + 1``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        if limit is not None and min(current) > limit:
            return limit + 1
        previous = current
    return previous[-1]


def _similarity(a: str, b: str) -> float:
    return 1.0 - _edit_distance(a, b) / max(len(a), len(b), 1)


_KOELN = {**dict.fromkeys("aeijouy", "0"), "b": "1", **dict.fromkeys("fvw", "3"), **dict.fromkeys("gkq", "4"),
          "l": "5", "m": "6", "n": "6", "r": "7", "s": "8", "z": "8"}


def koelner_phonetik(word: str) -> str:
    """The Kölner Phonetik code of a normalised word (lowercase, umlauts spelled out): how German hears it
    ("kielkopf" and "kehlkopf" are both 45413; "prost" and "brust" both 1782)."""
    w = word
    codes = []
    for i, ch in enumerate(w):
        before = w[i - 1] if i else ""
        after = w[i + 1] if i + 1 < len(w) else ""
        if ch == "h":
            code = ""
        elif ch == "p":
            code = "3" if after == "h" else "1"
        elif ch in "dt":
            code = "8" if after in ("c", "s", "z") and after else "2"
        elif ch == "c":
            if i == 0:
                code = "4" if after in "ahkloqrux" and after else "8"
            else:
                code = "4" if after in "ahkoqux" and after and before not in "sz" else "8"
        elif ch == "x":
            code = "8" if before in "ckq" and before else "48"
        else:
            code = _KOELN.get(ch, "")
        codes.append(code)
    out = ""
    for code in "".join(codes):
        if not out or code != out[-1]:
            out += code
    return out[:1] + out[1:].replace("0", "")


@dataclass(frozen=True)
class _Form:
    """One way a term may be written (its word, or a spelling without `*`), for near-miss matching."""

    text: str  # what the transcript gets
    letters: str  # normalised, letters only
    code: str  # Kölner Phonetik

    @classmethod
    def of(cls, text: str) -> _Form:
        letters = "".join(_HEARD.findall(normalize(text))).replace("_", "")
        return cls(text, letters, koelner_phonetik(letters))

    def score(self, letters: str, code: str, at_least: float) -> float:
        """How like this form a heard run is (`letters` normalised, `code` their Kölner Phonetik), 0…1; 0 when
        it is below `at_least`. The short codes are compared first; the letters only as far as could still
        reach `at_least`: most pairs are settled without a full comparison."""
        longer = max(len(letters), len(self.letters), 1)
        if abs(len(letters) - len(self.letters)) > (2 - 2 * at_least) * longer:  # even if they sound the same
            return 0.0
        sounds = _similarity(code, self.code)
        looks_at_least = 2 * at_least - sounds
        if looks_at_least > 1:
            return 0.0
        distance = _edit_distance(letters, self.letters, int((1 - looks_at_least) * longer + 1e-9))
        score = (1 - distance / longer + sounds) / 2
        return score if score >= at_least else 0.0


@dataclass(frozen=True)
class Recognition:
    """A phase's recognition context (immutable, shared by every session)."""

    field: str
    terms: tuple[Term, ...]

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(t.word for t in self.terms)

    @cached_property
    def forms(self) -> tuple[_Form, ...]:
        """Every term's written forms of `MIN_CORRECTED_LETTERS` or more letters (for `correct`)."""
        return tuple(form for term in self.terms for form in term.forms
                     if len(form.letters) >= MIN_CORRECTED_LETTERS)

    def correct(self, text: str) -> str:
        """``text`` with near-misses of the phase's terms rewritten to them ("Kielkopf" → "Kehlkopf",
        "Kiel kopf" → "Kehlkopf", "Kirche" → "Kirsche" when the size is asked); nothing else is changed.

        One heard word, or two apart only by spaces or hyphens, is rewritten to the term form it is most like
        when that similarity reaches `CORRECTION_THRESHOLD` (see `_Form.score`); a word that already is a
        term is kept, and overlapping candidates go to the most similar. Only this phase's
        terms are candidates: outside their question "Kirche" stays a church.
        """
        tokens = list(_HEARD.finditer(text))
        if not tokens or not self.forms:
            return text
        keys = [normalize(t.group()) for t in tokens]
        exact = [self._is_term(k) for k in keys]
        candidates: list[tuple[float, int, int, str]] = []
        for i in range(len(tokens)):
            for j in range(i, min(i + MAX_JOINED_WORDS, len(tokens))):
                if j > i and not _JOINER.fullmatch(text, tokens[j - 1].end(), tokens[j].start()):
                    break
                if any(exact[i:j + 1]):
                    break
                letters = "".join(keys[i:j + 1]).replace("_", "")
                if len(letters) < MIN_CORRECTED_LETTERS or (j > i and self._is_term(" ".join(keys[i:j + 1]))):
                    continue
                score, form = self._nearest(letters)
                if form is not None:
                    heard = tokens[i].group()
                    # "Link in der Brust" → "Links in der Brust": the heard word's capital stays.
                    written = form.text[:1].upper() + form.text[1:] if heard[:1].isupper() else form.text
                    candidates.append((score, i, j, written))
        taken: set[int] = set()
        chosen = []
        for _score, i, j, replacement in sorted(candidates, key=lambda c: (-c[0], c[2] - c[1], c[1])):
            if taken.isdisjoint(range(i, j + 1)):
                taken.update(range(i, j + 1))
                chosen.append((i, j, replacement))
        for i, j, replacement in sorted(chosen, reverse=True):
            text = text[:tokens[i].start()] + replacement + text[tokens[j].end():]
        return text

    def _is_term(self, normalized: str) -> bool:
        return any(regex.fullmatch(normalized) for term in self.terms for regex in term.spellings)

    def _nearest(self, letters: str) -> tuple[float, _Form | None]:
        """The form most like `letters` if it reaches `CORRECTION_THRESHOLD`, with its score; else (0, None)."""
        best: tuple[float, _Form | None] = (0.0, None)
        code = koelner_phonetik(letters)
        for form in self.forms:
            score = form.score(letters, code, max(CORRECTION_THRESHOLD, best[0]))
            if score > best[0]:
                best = (score, form)
        return best

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

