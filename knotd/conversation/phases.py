"""The Knotencheck conversation as an explicit state machine; the script (phases, lines, transitions) is data.

A ``PhaseScript`` is loaded once (``knotd/data/phases.toml`` or ``session.phases``) and shared; each session
owns a ``PhaseMachine``. The machine knows the current phase, which transitions are legal, the history of
phases reached, and the user's answers to each step. ``plan(answer)`` works out the agent's next line and
the phases it leads to without changing anything; ``commit(reply)`` makes it so. The scripted LLM commits
as soon as it answers; an endpoint LLM commits only when its reply starts, so a failed request leaves the
conversation where it was.

Wire format (what the session publishes to the room on every transition and when a participant joins):

- data message on topic ``knotd.phase`` (reliable), UTF-8 JSON of ``PhaseMachine.to_wire()``::

    {"v": 1, "phase": "step_size", "title": "Größe", "previous": "step_location", "step": 2, "steps": 4,
     "is_terminal": false, "seq": 3, "at": 1714049000.12, "reached": ["greeting", "consent", ...]}

  ``seq`` counts transitions in this session (0 = initial phase) so a client can drop stale messages;
  ``at`` is the wall-clock time the phase was entered; ``step`` is null outside the guided steps.
- participant attribute ``knotd.phase`` on the agent: the phase name alone (``wire_attributes()``).

The user's answers never go on the wire. This module is pure: no livekit, no asyncio, and no I/O except
reading the script in ``PhaseScript.load()``; it publishes and counts nothing itself (listeners do).
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knotd.conversation.guardrails import TextMatcher, normalize
from knotd.conversation.recognition import Recognition, StepAnswer, parse_recognition
from knotd.datafiles import Locator, parse_toml, read_data_file
from knotd.errors import ConfigError, KnotdError

WIRE_TOPIC = "knotd.phase"
WIRE_ATTRIBUTE = "knotd.phase"
WIRE_VERSION = 1

# An answer read back in the summary is cut to this many characters (at a word boundary).
MAX_ANSWER_CHARS = 120
NO_ANSWER = "keine Angabe"

_SCRIPT_KEYS = {"initial", "interrupts", "reprompt", "finished", "instructions", "guidance", "anywhere"}
_PHASE_KEYS = {"title", "say", "step", "then", "terminal", "reprompt", "next", "recognition"}
_TRANSITION_KEYS = {"to", "words", "patterns"}


class IllegalTransition(KnotdError):
    """A transition the script does not allow (a bug in the caller, not a user error)."""


@dataclass(frozen=True)
class Transition:
    """Where an answer leads; without a matcher any non-empty answer leads there."""

    to: str
    matcher: TextMatcher | None = None

    def accepts(self, normalized_answer: str) -> bool:
        if self.matcher is None:
            return bool(normalized_answer)
        return self.matcher.matches(normalized_answer)


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    say: str
    next: tuple[Transition, ...] = ()
    then: str | None = None
    step: int | None = None
    is_terminal: bool = False
    reprompt: str | None = None
    recognition: Recognition | None = None  # what its answer is made of (the STT's context, the summary)


@dataclass(frozen=True)
class PhaseScript:
    """A loaded, immutable conversation script; share one across sessions."""

    phases: Mapping[str, Phase]
    initial: str
    interrupts: frozenset[str]
    anywhere: tuple[Transition, ...]
    reprompt: str
    finished: str
    instructions: str
    guidance: str
    source: str = "<script>"

    @classmethod
    def load(cls, path: Path | str | None = None) -> PhaseScript:
        """Read a script file, or the shipped Knotencheck script when ``path`` is None or empty.

        Raises:
            ConfigError: one line naming the file, the phase and the field that is wrong.
        """
        text, source = read_data_file("session.phases", path, "phases.toml")
        return cls.parse(text, source=source)

    @classmethod
    def parse(cls, text: str, source: str = "<script>") -> PhaseScript:
        """Build a script from TOML text; ``source`` names it in errors.

        Raises:
            ConfigError: for invalid TOML or an invalid script.
        """
        data = parse_toml("session.phases", text, source)
        return _parse_script(data, Locator(source, text))

    def phase(self, name: str) -> Phase:
        return self.phases[name]

    @property
    def step_count(self) -> int:
        return sum(1 for p in self.phases.values() if p.step is not None)

    def allowed(self, from_phase: str) -> frozenset[str]:
        """The phases that may follow ``from_phase``."""
        phase = self.phases[from_phase]
        if phase.is_terminal:
            return frozenset()
        targets = {t.to for t in phase.next} | set(self.interrupts)
        if phase.then:
            targets.add(phase.then)
        return frozenset(targets)


@dataclass(frozen=True)
class Visit:
    """One entry of the history: a phase and the wall-clock time it was entered."""

    phase: str
    at: float


@dataclass(frozen=True)
class PhaseChange:
    """What transition listeners receive."""

    previous: str
    phase: str
    at: float
    seq: int


@dataclass(frozen=True)
class Reply:
    """The agent's next line and the phases it leads into (in order); see ``PhaseMachine.plan``."""

    text: str
    path: tuple[str, ...] = ()
    answered: str | None = None  # the phase whose question ``answer`` answered
    answer: str | None = None


class PhaseMachine:
    """One session's position in the script.

    Args:
        script: the shared script.
        clock: wall-clock time source (``time.time``), replaceable in tests.
    """

    def __init__(self, script: PhaseScript, *, clock: Callable[[], float] = time.time) -> None:
        self.script = script
        self._clock = clock
        self._listeners: list[Callable[[PhaseChange], None]] = []
        self.reset()

    def reset(self) -> None:
        """Back to the initial phase with an empty history and no answers; listeners stay."""
        self._history = [Visit(self.script.initial, self._clock())]
        self._answers: dict[str, str] = {}
        self.is_started = False

    @property
    def current(self) -> str:
        return self._history[-1].phase

    @property
    def phase(self) -> Phase:
        return self.script.phases[self.current]

    @property
    def history(self) -> tuple[Visit, ...]:
        return tuple(self._history)

    @property
    def is_finished(self) -> bool:
        return self.phase.is_terminal

    def reached(self) -> list[str]:
        """Phase names in the order first reached (for the session summary)."""
        return list(dict.fromkeys(v.phase for v in self._history))

    def add_listener(self, listener: Callable[[PhaseChange], None]) -> None:
        """Call ``listener(change)`` after every transition (the session counts and publishes there)."""
        self._listeners.append(listener)

    def can_advance(self, to: str) -> bool:
        return to in self.script.allowed(self.current)

    def advance(self, to: str) -> PhaseChange:
        """Enter phase ``to`` and notify listeners.

        Raises:
            IllegalTransition: when the script does not allow ``current -> to``.
        """
        if not self.can_advance(to):
            raise IllegalTransition(f"phase transition {self.current} -> {to} is not allowed by {self.script.source}")
        previous = self.current
        self._history.append(Visit(to, self._clock()))
        change = PhaseChange(previous, to, self._history[-1].at, len(self._history) - 1)
        for listener in list(self._listeners):
            listener(change)
        return change

    def plan(self, answer: str | None) -> Reply:
        """The agent's next line for the user's ``answer`` (None: no new answer), without changing state.

        Before the conversation has started the reply is the opening (the initial phase's line and the
        phases that follow it at once), whatever was said. An answer that matches no transition gets the
        reprompt and the question again; after a terminal phase the reply is the script's ``finished`` line.
        """
        phase = self.phase
        if not self.is_started:
            path = self._then_chain(phase.name)
            return Reply(self._lines((phase.name, *path), self._answers), path)
        if phase.is_terminal:
            return Reply(self.script.finished)
        answer = (answer or "").strip()
        if not answer:
            return Reply(self._line(phase.name, self._answers))
        normalized = normalize(answer)
        target = next((t.to for t in (*self.script.anywhere, *phase.next) if t.accepts(normalized)), None)
        if target is None:
            again = phase.reprompt or f"{self.script.reprompt} {self._line(phase.name, self._answers)}"
            return Reply(again)
        path = (target, *self._then_chain(target))
        answers = {**self._answers, phase.name: answer}
        return Reply(self._lines(path, answers), path, answered=phase.name, answer=answer)

    def commit(self, reply: Reply) -> None:
        """Make a planned reply happen: record the answer and walk its path (listeners see each step).

        Raises:
            IllegalTransition: when the machine moved since ``plan()`` and the path is no longer legal.
        """
        self.is_started = True
        if reply.answered is not None and reply.answer is not None:
            self._answers[reply.answered] = reply.answer
        for name in reply.path:
            self.advance(name)

    def respond(self, answer: str | None) -> Reply:
        """``plan(answer)`` and ``commit()`` it at once; what the scripted LLM does."""
        reply = self.plan(answer)
        self.commit(reply)
        return reply

    def recognised_answers(self, *, with_values: bool) -> dict[str, StepAnswer]:
        """The answers to phases with a recognition context, by field, in script order.

        Each says whether it was understood (it named one of the expected terms) and, with ``with_values``,
        keeps its normalised form ("Hals, Kehlkopf"). Phases the caller never answered are left out.
        """
        out: dict[str, StepAnswer] = {}
        for phase in self.script.phases.values():
            if phase.recognition is None or phase.name not in self._answers:
                continue
            value = phase.recognition.normalise(self._answers[phase.name])
            out[phase.recognition.field] = StepAnswer(value is not None, value if with_values else None, with_values)
        return out

    def line(self) -> str:
        """The current phase's line (its question), with answers filled in."""
        return self._line(self.current, self._answers)

    def guidance(self, reply: Reply) -> str:
        """The per-turn instruction an endpoint LLM gets so it says ``reply`` in its own words."""
        title = self.script.phases[reply.path[-1]].title if reply.path else self.phase.title
        return self.script.guidance.format(title=title, line=reply.text)

    def to_wire(self) -> dict[str, Any]:
        """The state published to the room as JSON on topic ``knotd.phase`` (see the module docstring)."""
        phase = self.phase
        previous = self._history[-2].phase if len(self._history) > 1 else None
        return {
            "v": WIRE_VERSION,
            "phase": phase.name,
            "title": phase.title,
            "previous": previous,
            "step": phase.step,
            "steps": self.script.step_count,
            "is_terminal": phase.is_terminal,
            "seq": len(self._history) - 1,
            "at": round(self._history[-1].at, 3),
            "reached": self.reached(),
        }

    def wire_attributes(self) -> dict[str, str]:
        """The participant attributes to set on the agent (``knotd.phase`` = phase name)."""
        return {WIRE_ATTRIBUTE: self.current}

    def _then_chain(self, name: str) -> tuple[str, ...]:
        chain: list[str] = []
        following = self.script.phases[name].then
        while following is not None:
            chain.append(following)
            following = self.script.phases[following].then
        return tuple(chain)

    def _lines(self, names: tuple[str, ...], answers: Mapping[str, str]) -> str:
        return " ".join(self._line(name, answers) for name in names)

    def _line(self, name: str, answers: Mapping[str, str]) -> str:
        values = {p: _spoken_answer(answers.get(p)) for p in self.script.phases}
        return self.script.phases[name].say.format_map(values)


def _spoken_answer(answer: str | None) -> str:
    if not answer:
        return NO_ANSWER
    answer = " ".join(answer.split()).rstrip(" .!?;,")
    if len(answer) > MAX_ANSWER_CHARS:
        answer = answer[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0]
    return answer or NO_ANSWER


# --- parsing ----------------------------------------------------------------------------------------------


def _parse_script(data: dict[str, Any], locate: Locator) -> PhaseScript:
    fail = locate.error

    unknown = sorted(set(data) - {"script", "phase"})
    if unknown:
        raise fail(unknown[0], "unknown top-level key (expected [script] and [phase.<name>] tables)")
    script = data.get("script")
    if not isinstance(script, dict):
        raise fail("script", "missing [script] table")
    raw_phases = data.get("phase")
    if not isinstance(raw_phases, dict) or not raw_phases:
        raise fail("phase", "no phases: add [phase.<name>] tables")
    unknown = sorted(set(script) - _SCRIPT_KEYS)
    if unknown:
        raise fail(f"script.{unknown[0]}", f"unknown field (expected one of {', '.join(sorted(_SCRIPT_KEYS))})")

    phases = {name: _parse_phase(name, raw, fail) for name, raw in raw_phases.items()}
    names = set(phases)

    def target(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in names:
            raise fail(key, f"unknown phase {value!r} (phases: {', '.join(phases)})")
        return value

    initial = target("script.initial", script.get("initial"))
    interrupts = script.get("interrupts", [])
    if not isinstance(interrupts, list):
        raise fail("script.interrupts", "expected a list of phase names")
    interrupts = frozenset(target("script.interrupts", name) for name in interrupts)
    texts = {key: script.get(key) for key in ("reprompt", "finished", "instructions", "guidance")}
    for key, value in texts.items():
        if not isinstance(value, str) or not value.strip():
            raise fail(f"script.{key}", "required: a non-empty string")
    _check_fields("script.guidance", texts["guidance"], {"title", "line"}, fail)
    anywhere = _parse_transitions("script.anywhere", script.get("anywhere", []), fail)
    for t in anywhere:
        if t.to not in interrupts:
            raise fail("script.anywhere.to", f"{t.to!r} must be listed in script.interrupts")
    for phase in phases.values():
        prefix = f"phase.{phase.name}"
        for t in phase.next:
            target(f"{prefix}.next.to", t.to)
        if phase.then is not None:
            target(f"{prefix}.then", phase.then)
        _check_fields(f"{prefix}.say", phase.say, names, fail)
        if phase.is_terminal and (phase.next or phase.then):
            raise fail(f"{prefix}.terminal", "a terminal phase has no 'next' or 'then'")
        if not phase.is_terminal and not (phase.next or phase.then):
            raise fail(f"{prefix}.next", "dead end: give 'next' transitions or 'then', or set terminal = true")
        _check_then_chain(phase.name, phases, fail)
    fields: dict[str, str] = {}
    for phase in phases.values():
        if phase.recognition is not None:
            field_name = phase.recognition.field
            if field_name in fields:
                raise fail(f"phase.{phase.name}.recognition.field",
                           f"{field_name!r} is already the field of phase {fields[field_name]}")
            fields[field_name] = phase.name
    return PhaseScript(phases, initial, interrupts, anywhere, texts["reprompt"].strip(), texts["finished"].strip(),
                       texts["instructions"].strip(), texts["guidance"].strip(), locate.source)


def _parse_phase(name: str, raw: Any, fail: Callable[[str, str], ConfigError]) -> Phase:
    prefix = f"phase.{name}"
    if not isinstance(raw, dict):
        raise fail(prefix, "must be a table")
    unknown = sorted(set(raw) - _PHASE_KEYS)
    if unknown:
        raise fail(f"{prefix}.{unknown[0]}", f"unknown field (expected one of {', '.join(sorted(_PHASE_KEYS))})")
    say = raw.get("say")
    if not isinstance(say, str) or not say.strip():
        raise fail(f"{prefix}.say", "required: the German line the agent says")
    title = raw.get("title", name)
    if not isinstance(title, str) or not title:
        raise fail(f"{prefix}.title", "expected a non-empty string")
    step = raw.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise fail(f"{prefix}.step", "expected a whole number from 1")
    then = raw.get("then")
    is_terminal = raw.get("terminal", False)
    if not isinstance(is_terminal, bool):
        raise fail(f"{prefix}.terminal", "expected true or false")
    reprompt = raw.get("reprompt")
    if reprompt is not None and (not isinstance(reprompt, str) or not reprompt.strip()):
        raise fail(f"{prefix}.reprompt", "expected a non-empty string")
    transitions = _parse_transitions(f"{prefix}.next", raw.get("next", []), fail)
    recognition = None
    if "recognition" in raw:
        recognition = parse_recognition(f"{prefix}.recognition", raw["recognition"], fail)
    return Phase(name, title, say.strip(), transitions, then, step, is_terminal, reprompt, recognition)


def _parse_transitions(key: str, raw: Any, fail: Callable[[str, str], ConfigError]) -> tuple[Transition, ...]:
    if not isinstance(raw, list):
        raise fail(key, "expected [[...]] tables with 'to' and optional 'words' / 'patterns'")
    transitions = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise fail(key, "expected a table")
        unknown = sorted(set(entry) - _TRANSITION_KEYS)
        if unknown:
            raise fail(f"{key}.{unknown[0]}", "unknown field (expected to, words, patterns)")
        words, patterns = entry.get("words", []), entry.get("patterns", [])
        for field_name, values in (("words", words), ("patterns", patterns)):
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise fail(f"{key}.{field_name}", "expected a list of non-empty strings")
        if not isinstance(entry.get("to"), str):
            raise fail(f"{key}.to", "required: the phase this answer leads to")
        try:
            matcher = TextMatcher(words, patterns) if (words or patterns) else None
        except re.error as err:
            raise fail(f"{key}.patterns", f"invalid regex: {err}") from None
        transitions.append(Transition(entry["to"], matcher))
    return tuple(transitions)


def _check_fields(key: str, text: str, allowed: set[str], fail: Callable[[str, str], ConfigError]) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        raise fail(key, f"bad {{placeholder}}: {err}") from None
    for name in fields:
        if name not in allowed:
            raise fail(key, f"unknown placeholder {{{name}}} (allowed: {', '.join(sorted(allowed))})")


def _check_then_chain(start: str, phases: Mapping[str, Phase], fail: Callable[[str, str], ConfigError]) -> None:
    seen = {start}
    following = phases[start].then
    while following is not None:
        if following in seen:
            raise fail(f"phase.{start}.then", "'then' phases form a loop")
        seen.add(following)
        following = phases[following].then if following in phases else None
