"""Guardrails for the Knotencheck conversation: rules as data, checked on user transcripts and LLM text.

A rule file (TOML, ``[[rule]]`` tables) names each rule and gives its direction (``input``: the user's final
transcript, ``output``: LLM text before TTS, ``both``), word lists and/or regular expressions, an action
(``block``: refuse and speak the reply; ``redirect``: speak the reply and move the conversation to
``phase``) and the German reply spoken instead. Rules are checked in file order; the first hit wins.

Matching sees *normalised* text: case-folded, ``ä/ö/ü`` as ``ae/oe/ue``, ``ß`` as ``ss``, and the dots of
common abbreviations (``z. B.``, ``ca.``, ``Dr.``) removed, so "Übelkeit", "uebelkeit" and "ÜBELKEIT" are one
word and an abbreviation never splits a sentence. Word entries match whole words; ``*`` stands for any
letters ("*tablette*" matches "Schmerztabletten"). An input rule with ``skip_negated = true`` ignores a match
that a negation governs: one of the two words right before it, in the same clause ("ich habe keine Atemnot",
but not "Keine Ahnung, Atemnot?"). Output is never exempted: "Das ist kein Krebs." is a diagnosis.
Before any of this, ``clean_text()`` removes Unicode disguises (zero-width characters, fullwidth letters,
Cyrillic look-alikes).

The semantic layer (``knotd.conversation.semantic``) is the second pass: when no word or pattern hits and a
sentence encoder was given to ``load()``, each rule's ``exemplars`` are compared with the text by meaning.
A ``Verdict`` says which layer decided (``rule`` or ``model``) and, for the model, the similarity.

Pieces: ``Guardrail`` (the loaded rules, shared), ``SentenceGuard`` (one streamed reply), ``SessionGuard`` (one
session: tallies and the closing step), ``guard_llm_output()`` (the output guard as an async generator for
``Agent.llm_node``). Prometheus counting is ``knotd.metrics.record_guardrail_verdict()``.

This module does not import livekit and does no I/O except reading the rules file in ``Guardrail.load()``.
Meaning is judged only by the exemplars in the rules file, never by an LLM.
Timing the ``input_guard`` and ``output_guard`` stages belongs to the session (``Verdict.elapsed_s`` helps).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knotd.conversation.semantic import ExemplarSet, SemanticLayer, SentenceEncoder
from knotd.conversation.textnorm import clean_text
from knotd.datafiles import Locator, parse_toml, read_data_file
from knotd.errors import ConfigError

DIRECTIONS = ("input", "output")
RULE_DIRECTIONS = ("input", "output", "both")
ACTIONS = ("block", "redirect")

TOO_LONG_RULE = "input_too_long"
TOO_LONG_REPLY = "Ihre Nachricht ist zu lang für mich. Bitte sagen Sie es mir kürzer, in ein oder zwei Sätzen."
DEFAULT_MAX_INPUT_CHARS = 2000

_RULE_KEYS = {"name", "direction", "action", "reply", "words", "patterns", "phase", "skip_negated", "exemplars",
              "output_exemplars", "threshold"}
_SEMANTIC_KEYS = {"threshold", "margin", "safe_input", "safe_output"}
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")

# Dots after these never end a sentence; normalisation drops them so patterns see "z b ibuprofen".
ABBREVIATIONS = frozenset((
    "z", "b", "d", "h", "u", "a", "o", "g", "s", "e", "i", "v", "dr", "ca", "bzw", "usw", "etc", "evtl", "ggf",
    "ggfs", "vgl", "nr", "prof", "inkl", "sog", "tgl", "bspw", "mind", "max", "min", "std", "str", "li", "re",
    "ua", "zb", "dh", "od",
))
NEGATORS = frozenset((
    "kein", "keine", "keinen", "keinem", "keiner", "keines", "nicht", "nie", "niemals", "ohne", "weder",
    "no", "not", "never", "without",
))

_TRANSLITERATE = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue",
                                "ẞ": "SS"})
_ABBREVIATION_DOT = re.compile(r"(?<!\w)(" + "|".join(sorted(ABBREVIATIONS, key=len, reverse=True)) +
                               r")\.", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Text as rules see it: Unicode disguises removed, case-folded, umlauts and ß spelled out, abbreviation dots
    dropped, single spaces."""
    text = clean_text(text).casefold().translate(_TRANSLITERATE)
    text = _ABBREVIATION_DOT.sub(r"\1", text)
    return _SPACES.sub(" ", text).strip()


def _word_regex(entry: str) -> str:
    """A word-list entry as a whole-word regex over normalised text (``*`` = any letters)."""
    parts = [re.escape(part) for part in normalize(entry).split("*")]
    body = r"\w*".join(parts).replace(r"\ ", r"\s+")
    return rf"(?<!\w){body}(?!\w)"


class TextMatcher:
    """Word lists and regexes over normalised text; reused by the phase script for answer matching.

    Args:
        words: whole-word entries (``*`` = any letters).
        patterns: regular expressions written against normalised text; umlauts/ß in them are spelled out.
        skip_negated: ignore a match governed by a negation (see ``_is_negated``), when ``matches`` allows it.

    Raises:
        re.error: for a pattern that does not compile (callers turn it into a ConfigError).
    """

    def __init__(self, words: Iterable[str] = (), patterns: Iterable[str] = (), *,
                 skip_negated: bool = False) -> None:
        sources = [_word_regex(w) for w in words] + [p.translate(_TRANSLITERATE) for p in patterns]
        self._regexes = [re.compile(s, re.IGNORECASE) for s in sources]
        self.skip_negated = skip_negated

    def __bool__(self) -> bool:
        return bool(self._regexes)

    def matches(self, normalized: str, *, negation_exempts: bool = True) -> bool:
        """Whether any entry matches ``normalized`` (the output of ``normalize()``).

        ``negation_exempts=False`` turns ``skip_negated`` off (the output guard: a negated diagnosis is one).
        """
        skip = self.skip_negated and negation_exempts
        for regex in self._regexes:
            for m in regex.finditer(normalized):
                if not (skip and _is_negated(normalized, m.start(), m.end())):
                    return True
        return False


# A clause ends at punctuation or at a conjunction that starts a new statement ("keine Schmerzen, aber Atemnot").
_CLAUSE_END = re.compile(r"[,.;:!?()\[\]\-–—]|\b(aber|sondern|doch|jedoch|und|oder|weil|dass|but|and|or)\b")


def _is_negated(text: str, start: int, end: int) -> bool:
    """True when a negator governs ``text[start:end]``: it stands within the two words right before it, or
    closes its clause within three words after it ("ohnmaechtig war ich nicht"), in the same clause."""
    before = text[max(0, start - 60):start]
    clause_before = before[max((m.end() for m in _CLAUSE_END.finditer(before)), default=0):]
    if any(word in NEGATORS for word in _WORD.findall(clause_before)[-2:]):
        return True
    after = text[end:end + 60]
    stop = _CLAUSE_END.search(after)
    clause_after = _WORD.findall(after[:stop.start()] if stop else after)
    return len(clause_after) <= 3 and bool(clause_after) and clause_after[-1] in NEGATORS


@dataclass(frozen=True)
class Rule:
    name: str
    directions: frozenset[str]
    action: str
    reply: str
    matcher: TextMatcher = field(compare=False)
    phase: str | None = None
    exemplars: tuple[str, ...] = ()
    threshold: float | None = None
    output_exemplars: tuple[str, ...] = ()

    def exemplars_for(self, direction: str) -> tuple[str, ...]:
        """The exemplars the semantic layer compares ``direction``'s text with (none if the rule skips it)."""
        if direction not in self.directions:
            return ()
        if direction == "output" and self.output_exemplars:
            return self.output_exemplars
        return self.exemplars


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    ``allowed`` is False on a hit; then ``rule`` names the rule, ``reply`` is the safe line to speak instead,
    ``action`` is ``block`` or ``redirect`` and ``phase`` the phase a redirect moves to. ``checked`` lists the
    rules evaluated (in order, up to and including the hit), for ``knotd_guardrail_checks_total``;
    ``elapsed_s`` is how long the check took (for the ``input_guard`` / ``output_guard`` stages). ``layer`` is
    ``rule`` or ``model`` (which pass decided; None when nothing hit) and ``score`` the semantic layer's
    similarity to the closest exemplar (None when the model did not run).
    """

    allowed: bool
    rule: str | None = None
    reply: str | None = None
    action: str | None = None
    phase: str | None = None
    checked: tuple[str, ...] = ()
    elapsed_s: float = field(default=0.0, compare=False)
    layer: str | None = None
    score: float | None = field(default=None, compare=False)
    closest_rule: str | None = field(default=None, compare=False)


class Guardrail:
    """An immutable, loaded rule set; share one across sessions and threads."""

    def __init__(self, rules: Sequence[Rule], source: str = "<rules>", *, semantic: SemanticLayer | None = None,
                 semantic_config: SemanticConfig | None = None,
                 max_input_chars: int = DEFAULT_MAX_INPUT_CHARS) -> None:
        self.rules = tuple(rules)
        self.max_input_chars = max_input_chars
        self.source = source
        self.semantic = semantic
        self.semantic_config = semantic_config or SemanticConfig()
        self._by_name = {r.name: r for r in self.rules}

    @classmethod
    def load(cls, path: Path | str | None = None, *, encoder: SentenceEncoder | None = None,
             max_input_chars: int = DEFAULT_MAX_INPUT_CHARS) -> Guardrail:
        """Read a rules file, or the shipped Knotencheck rules when ``path`` is None or empty.

        With ``encoder`` the rules' exemplars are embedded and the semantic layer is on; without it the rules
        alone decide (tests, and ``knotd check-config``). Input longer than ``max_input_chars`` is refused
        before any rule or model sees it (rule ``input_too_long``).

        Raises:
            ConfigError: one line naming the file, the rule and the field that is wrong.
        """
        text, source = read_data_file("guardrails.rules", path, "guardrails.toml")
        return cls.parse(text, source=source, encoder=encoder, max_input_chars=max_input_chars)

    @classmethod
    def parse(cls, text: str, source: str = "<rules>", *, encoder: SentenceEncoder | None = None,
              max_input_chars: int = DEFAULT_MAX_INPUT_CHARS) -> Guardrail:
        """Build a rule set from TOML text; ``source`` names it in errors.

        Raises:
            ConfigError: for invalid TOML or an invalid rule.
        """
        data = parse_toml("guardrails.rules", text, source)
        unknown = sorted(set(data) - {"rule", "semantic"})
        if unknown:
            raise ConfigError("guardrails.rules", f"unknown top-level key {unknown[0]!r} (expected [[rule]] or "
                              "[semantic])", source)
        config = _parse_semantic(data.get("semantic", {}), source)
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list) or not raw_rules:
            raise ConfigError("guardrails.rules", "no rules: add at least one [[rule]] table", source)
        locate = Locator(source, text)
        rules: list[Rule] = []
        for index, raw in enumerate(raw_rules, 1):
            rule = _parse_rule(raw, index, locate)
            if any(r.name == rule.name for r in rules):
                raise ConfigError(f"rule[{rule.name}].name", "duplicate rule name", locate.of_value("name", rule.name))
            rules.append(rule)
        guardrail = cls(rules, source, semantic_config=config, max_input_chars=max_input_chars)
        return guardrail.with_encoder(encoder) if encoder is not None else guardrail

    def with_encoder(self, encoder: SentenceEncoder) -> Guardrail:
        """The same rules with the semantic layer on: every exemplar embedded once, now."""
        config = self.semantic_config
        sets = [ExemplarSet(r.name, frozenset({direction}), r.exemplars_for(direction),
                            config.threshold if r.threshold is None else r.threshold)
                for direction in DIRECTIONS for r in self.rules if r.exemplars_for(direction)]
        layer = SemanticLayer(encoder, sets, {"input": config.safe_input, "output": config.safe_output},
                              config.margin)
        return Guardrail(self.rules, self.source, semantic=layer, semantic_config=config,
                         max_input_chars=self.max_input_chars)

    def rule_names(self, direction: str) -> tuple[str, ...]:
        """Names of the rules checked in ``direction`` (input or output), in check order."""
        return tuple(r.name for r in self.rules if direction in r.directions)

    def hit_labels(self, direction: str) -> tuple[str, ...]:
        """Every ``rule`` label a hit in ``direction`` can carry (the rules, and ``input_too_long`` on input)."""
        return self.rule_names(direction) + ((TOO_LONG_RULE,) if direction == "input" else ())

    def check_input(self, text: str) -> Verdict:
        """Check a user's final transcript before the LLM sees it."""
        return self._check("input", text)

    def check_output(self, text: str) -> Verdict:
        """Check LLM text (a sentence, or a whole reply) before TTS and the transcript see it."""
        return self._check("output", text)

    def _check(self, direction: str, text: str) -> Verdict:
        start = time.perf_counter()
        if direction == "input" and len(text) > self.max_input_chars:
            return Verdict(False, TOO_LONG_RULE, TOO_LONG_REPLY, "block", None, (), time.perf_counter() - start,
                           layer="rule")
        normalized = normalize(text)
        checked: list[str] = []
        for rule in self.rules:
            if direction not in rule.directions:
                continue
            checked.append(rule.name)
            if normalized and rule.matcher.matches(normalized, negation_exempts=direction == "input"):
                return Verdict(False, rule.name, rule.reply, rule.action, rule.phase, tuple(checked),
                               time.perf_counter() - start, layer="rule")
        if self.semantic is None or not normalized:
            return Verdict(True, checked=tuple(checked), elapsed_s=time.perf_counter() - start)
        scored = self.semantic.score(text, direction)
        if scored.fired and scored.rule is not None:
            rule = self._by_name[scored.rule]
            return Verdict(False, rule.name, rule.reply, rule.action, rule.phase, tuple(checked),
                           time.perf_counter() - start, layer="model", score=scored.score, closest_rule=rule.name)
        return Verdict(True, checked=tuple(checked), elapsed_s=time.perf_counter() - start, score=scored.score,
                       closest_rule=scored.rule)


@dataclass(frozen=True)
class SemanticConfig:
    """The ``[semantic]`` table: default threshold, margin over safe exemplars, and the safe exemplars."""

    threshold: float = 0.5
    margin: float = 0.05
    safe_input: tuple[str, ...] = ()
    safe_output: tuple[str, ...] = ()


def _parse_semantic(raw: Any, source: str) -> SemanticConfig:
    if not isinstance(raw, dict):
        raise ConfigError("semantic", "must be a table ([semantic])", source)
    unknown = sorted(set(raw) - _SEMANTIC_KEYS)
    if unknown:
        expected = ", ".join(sorted(_SEMANTIC_KEYS))
        raise ConfigError(f"semantic.{unknown[0]}", f"unknown field (expected one of {expected})", source)

    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(f"semantic.{key}", reason, source)

    threshold = _similarity(raw, "threshold", 0.5, fail)
    margin = raw.get("margin", 0.05)
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not -1.0 <= margin <= 1.0:
        raise fail("margin", f"expected a number from -1 to 1; got {margin!r}")
    safe_input = _string_list(raw, "safe_input", fail)
    safe_output = _string_list(raw, "safe_output", fail)
    return SemanticConfig(threshold, float(margin), tuple(safe_input), tuple(safe_output))


def _similarity(raw: dict[str, Any], key: str, default: float | None,
                fail: Callable[[str, str], ConfigError]) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise fail(key, f"expected a similarity above 0 and at most 1; got {value!r}")
    return float(value)


def _parse_rule(raw: Any, index: int, locate: Locator) -> Rule:
    label = f"rule[#{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(label, "must be a table ([[rule]])", locate.source)
    name = raw.get("name")
    if isinstance(name, str) and _NAME_RE.fullmatch(name):
        label = f"rule[{name}]"
    # tomllib keeps no positions: the rule's ``name = ...`` line stands for the whole rule
    where = locate.of_value("name", name) if isinstance(name, str) and name else locate.source

    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(f"{label}.{key}", reason, where)

    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown field (expected one of {', '.join(sorted(_RULE_KEYS))})")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise fail("name", "required: lower-case letters, digits and '_' (it becomes a metric label)")
    direction = _choice(raw, "direction", RULE_DIRECTIONS, fail)
    action = _choice(raw, "action", ACTIONS, fail)
    reply = raw.get("reply")
    if not isinstance(reply, str) or not reply.strip():
        raise fail("reply", "required: the German line spoken instead")
    words = _string_list(raw, "words", fail)
    patterns = _string_list(raw, "patterns", fail)
    exemplars = _string_list(raw, "exemplars", fail)
    output_exemplars = _string_list(raw, "output_exemplars", fail)
    if output_exemplars and direction != "both":
        raise fail("output_exemplars", "only for direction = \"both\" (otherwise 'exemplars' serve the one direction)")
    if not words and not patterns and not exemplars:
        raise fail("words", "a rule needs at least one entry in 'words', 'patterns' or 'exemplars'")
    skip_negated = raw.get("skip_negated", False)
    if not isinstance(skip_negated, bool):
        raise fail("skip_negated", "expected true or false")
    if skip_negated and direction == "output":
        raise fail("skip_negated", "applies to input only: a negated diagnosis or dose is still one")
    threshold = _similarity(raw, "threshold", None, fail)
    phase = raw.get("phase")
    if phase is not None and (not isinstance(phase, str) or not phase):
        raise fail("phase", "expected a phase name")
    if action == "redirect" and phase is None:
        raise fail("phase", "required when action = \"redirect\" (the phase the conversation moves to)")
    for pattern in patterns:
        try:
            re.compile(pattern.translate(_TRANSLITERATE))
        except re.error as err:
            raise fail("patterns", f"invalid regex {pattern!r}: {err}") from None
    directions = frozenset(DIRECTIONS) if direction == "both" else frozenset({direction})
    matcher = TextMatcher(words, patterns, skip_negated=skip_negated)
    return Rule(name, directions, action, reply.strip(), matcher, phase, tuple(exemplars), threshold,
                tuple(output_exemplars))


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], fail: Callable[[str, str], ConfigError]) -> str:
    value = raw.get(key)
    if value not in choices:
        raise fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _string_list(raw: dict[str, Any], key: str, fail: Callable[[str, str], ConfigError]) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise fail(key, "expected a list of non-empty strings")
    return value


# --- streaming output -------------------------------------------------------------------------------------

# A sentence ends at . ! ? or … (plus closing quotes/brackets) followed by white space, or at a line break.
_BOUNDARY = re.compile(r"[.!?…]+[\"'»«“”„)\]]*\s+|\n\s*")
_TOKEN_BEFORE = re.compile(r"(\w+)[.]$")


def _is_sentence_end(text: str, match: re.Match[str]) -> bool:
    punct = match.group().rstrip()
    if not punct or punct[0] != "." or len(punct) > 1:
        return True
    token = _TOKEN_BEFORE.search(text[: match.start() + 1])
    if token is None:
        return True
    word = token.group(1).casefold()
    # "z. B.", "ca." and ordinals ("am 3. Mai", "1. Schritt") do not end a sentence.
    return not (word in ABBREVIATIONS or word.isdigit())


class SentenceGuard:
    """Releases streamed LLM text sentence by sentence, each one checked by the output rules.

    ``feed()`` returns the complete sentences that passed, holding an incomplete one back. On a hit it
    returns the rule's reply instead of the sentence and stops: everything after is dropped, so an unsafe
    sentence never reaches TTS or the transcript. ``flush()`` checks and releases what is held at the end
    of the stream. Text without any sentence end is split at a space after ``max_pending_chars``; such a
    piece is checked together with the piece before it, so a forced split cannot cut a pattern in two.
    """

    def __init__(self, guardrail: Guardrail, *, on_verdict: Callable[[Verdict], None] | None = None,
                 max_pending_chars: int = 400) -> None:
        self._guardrail = guardrail
        self._on_verdict = on_verdict
        self._max_pending = max_pending_chars
        self._buffer = ""
        self._context = ""
        self._is_discarded = False
        self.hit: Verdict | None = None
        self.busy_s = 0.0  # time spent in feed() and flush(): the output_guard stage

    @property
    def is_stopped(self) -> bool:
        """True after a hit or ``discard()``: nothing more is released."""
        return self.hit is not None or self._is_discarded

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._buffer

    def feed(self, chunk: str) -> list[str]:
        """Add streamed text; return the safe complete sentences (or the reply of a hit)."""
        if self.is_stopped:
            return []
        started = time.perf_counter()
        try:
            return self._feed(chunk)
        finally:
            self.busy_s += time.perf_counter() - started

    def _feed(self, chunk: str) -> list[str]:
        self._buffer += chunk
        released: list[str] = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            if not _is_sentence_end(self._buffer, match):
                continue
            released += self._release(self._buffer[start:match.end()])
            start = match.end()
            if self.is_stopped:
                return released
        self._buffer = self._buffer[start:]
        if len(self._buffer) > self._max_pending:
            cut = self._buffer.rfind(" ", 0, self._max_pending) + 1 or self._max_pending
            piece, self._buffer = self._buffer[:cut], self._buffer[cut:]
            released += self._release(piece, forced=True)
        return released

    def flush(self) -> list[str]:
        """End of stream: check and release the held text."""
        if self.is_stopped or not self._buffer:
            return []
        started = time.perf_counter()
        piece, self._buffer = self._buffer, ""
        try:
            return self._release(piece)
        finally:
            self.busy_s += time.perf_counter() - started

    def discard(self) -> int:
        """Drop the held text without releasing it and stop; return how many characters were dropped."""
        dropped = len(self._buffer.strip())
        self._buffer = ""
        self._is_discarded = True
        return dropped

    def _release(self, piece: str, *, forced: bool = False) -> list[str]:
        if not piece.strip():
            return [piece]
        verdict = self._guardrail.check_output(self._context + piece)
        self._context = piece if forced else ""
        if self._on_verdict is not None:
            self._on_verdict(verdict)
        if verdict.allowed:
            return [piece]
        self.hit = verdict
        self._buffer = ""
        return [verdict.reply or ""]


def _text_of(chunk: object) -> str | None:
    if isinstance(chunk, str):
        return chunk
    delta = getattr(chunk, "delta", None)  # livekit ChatChunk, without importing livekit here
    return getattr(delta, "content", None)


async def guard_llm_output(chunks: AsyncIterable[object], guard: SentenceGuard) -> AsyncIterator[str]:
    """The output guard for ``Agent.llm_node``: yields only the text ``guard`` releases.

    ``chunks`` is what livekit's default ``llm_node`` yields (``ChatChunk``s, ``str``s; anything without text,
    such as a ``FlushSentinel``, is dropped). After a hit it stops reading and closes ``chunks``, which
    closes the LLM stream.
    """
    source = aiter(chunks)
    try:
        async for chunk in source:
            text = _text_of(chunk)
            if text:
                for piece in guard.feed(text):
                    yield piece
            if guard.is_stopped:
                return
        for piece in guard.flush():
            yield piece
    finally:
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()


# --- one session's view -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardSummary:
    """What the guardrail saw in one session, for the session summary record."""

    checks: dict[str, int]
    hits: dict[str, dict[str, int]]
    discarded_chars: int

    @property
    def total_hits(self) -> int:
        return sum(sum(per_rule.values()) for per_rule in self.hits.values())

    def to_dict(self) -> dict[str, Any]:
        return {"checks": dict(self.checks), "hits": {d: dict(r) for d, r in self.hits.items()},
                "discarded_chars": self.discarded_chars}


_REMEMBERED_INPUTS = 16


class SessionGuard:
    """One session's guardrail: checks both directions, tallies hits per rule, and closes the session.

    Args:
        guardrail: the shared rule set.
        on_verdict: called as ``on_verdict(direction, verdict)`` after every check; pass
            ``knotd.metrics.record_guardrail_verdict`` to count checks and hits in Prometheus.
    """

    def __init__(self, guardrail: Guardrail, *, on_verdict: Callable[[str, Verdict], None] | None = None) -> None:
        self.guardrail = guardrail
        self._on_verdict = on_verdict
        self._checks: Counter[str] = Counter()
        self._hits: dict[str, Counter[str]] = {d: Counter() for d in DIRECTIONS}
        self._streams: list[SentenceGuard] = []
        self._input_verdicts: dict[str, Verdict] = {}
        self._summary: GuardSummary | None = None

    def check_input(self, text: str, *, key: str | None = None) -> Verdict:
        """Check a final user transcript; tallied.

        With ``key`` (the user message's id) a message is checked and counted once, however many hooks ask:
        voice turns reach ``Agent.on_user_turn_completed`` and then ``llm_node``, while text input
        (``session.run``, room chat) reaches only ``llm_node``.
        """
        if key is not None and key in self._input_verdicts:
            return self._input_verdicts[key]
        verdict = self.guardrail.check_input(text)
        self._tally("input", verdict)
        if key is not None:
            self._input_verdicts[key] = verdict
            while len(self._input_verdicts) > _REMEMBERED_INPUTS:
                del self._input_verdicts[next(iter(self._input_verdicts))]
        return verdict

    def sentence_guard(self) -> SentenceGuard:
        """A SentenceGuard for one streamed reply; its checks are tallied and ``close()`` sees what it holds."""
        self._streams = [s for s in self._streams if s.pending and not s.is_stopped]
        stream = SentenceGuard(self.guardrail, on_verdict=lambda v: self._tally("output", v))
        self._streams.append(stream)
        return stream

    def close(self) -> GuardSummary:
        """The closing guard step: drop output still held back (it was never spoken), return the tallies.

        Idempotent: later calls return the same summary.
        """
        if self._summary is None:
            discarded = sum(s.discard() for s in self._streams)
            self._streams.clear()
            self._summary = GuardSummary(
                checks=dict(self._checks),
                hits={d: dict(c) for d, c in self._hits.items() if c},
                discarded_chars=discarded,
            )
        return self._summary

    def _tally(self, direction: str, verdict: Verdict) -> None:
        self._checks[direction] += 1
        if not verdict.allowed and verdict.rule:
            self._hits[direction][verdict.rule] += 1
        if self._on_verdict is not None:
            self._on_verdict(direction, verdict)
