"""LiveKit's local end-of-turn model (``turn-detector-v1-mini``): loaded once per daemon, self-tested.

The model ships inside the ``livekit-local-inference`` wheel (a livekit-agents dependency; nothing is
downloaded) as a native singleton: ``init_eot()`` loads it for the whole process, and every ``EOT()`` (one
per session, made by livekit's ``TurnDetector``) shares it. Its licence allows use with LiveKit Agents only,
which is how knotd uses it.

The model is optional: when it cannot load or fails its self-test, the daemon logs one line, records the
stage with ``status="error"`` and ends turns with the VAD instead; readiness does not wait for it.
"""

from __future__ import annotations

import time

import numpy as np
import structlog

from knotd import stages
from knotd.errors import ModelError
from knotd.speech.models import SELFTEST_CLIP, read_selftest_clip

log = structlog.get_logger(__name__)

SAMPLE_RATE = 16000
# The self-test: the last 1.2 s of the bundled clip ("… den Knotencheck starten.") followed by 0.2 s of
# silence (livekit asks the model after 0.2 s of silence), and the probability the model gave for it when
# recorded. The model is deterministic; a broken build or a CPU that computes garbage lands far from it.
SELFTEST_SILENCE_S = 0.2
SELFTEST_PROBABILITY = 0.276
SELFTEST_TOLERANCE = 0.02


def selftest_input() -> np.ndarray:
    """The self-test's model input: int16 PCM, 16 kHz, at most the model's 1.2 s."""
    from livekit.local_inference import EOT_MAX_SAMPLES

    speech = (read_selftest_clip(SELFTEST_CLIP) * 32767).astype(np.int16)
    loud = np.nonzero(np.abs(speech) > 300)[0]
    speech = speech[: loud[-1] + 1] if loud.size else speech
    pcm = np.concatenate([speech, np.zeros(int(SELFTEST_SILENCE_S * SAMPLE_RATE), dtype=np.int16)])
    return pcm[-EOT_MAX_SAMPLES:]


def run_self_test() -> float:
    """Predict on the bundled clip and compare with the recorded answer; returns the probability.

    Raises:
        ModelError: the prediction raised or is not the known answer.
    """
    from livekit.local_inference import EOT

    try:
        with EOT() as eot:
            probability = float(eot.predict(selftest_input()))
    except (RuntimeError, ValueError, OSError) as err:
        raise ModelError(f"end-of-turn model self-test raised {type(err).__name__}: {err}") from err
    if not abs(probability - SELFTEST_PROBABILITY) <= SELFTEST_TOLERANCE:
        raise ModelError(f"end-of-turn model self-test gave {probability:.3f} for the bundled clip, expected "
                         f"{SELFTEST_PROBABILITY:.3f} ± {SELFTEST_TOLERANCE}; the model computes wrong results")
    return probability


def load_turn_model() -> bool:
    """Load the end-of-turn model into this process and self-test it; True if usable. Blocks (≈ 0.2–3 s).

    Stages: ``eot_load`` then ``eot_selftest``. On failure exactly one warning line (the failed stage's, with
    the reason and ``fallback=vad``) and ``knotd_stage_duration_seconds{stage=…,status="error"}``; never raises.
    """
    for name, step in (("eot_load", _init), ("eot_selftest", run_self_test)):
        started = time.perf_counter()
        try:
            step()
        except Exception as err:  # noqa: BLE001 - an optional model: any failure means "use the VAD"
            reason = str(err) if isinstance(err, ModelError) else f"{type(err).__name__}: {err}"
            stages.record(name, time.perf_counter() - started, type(err), reason=reason[:300], fallback="vad")
            return False
        stages.record(name, time.perf_counter() - started)
    return True


def _init() -> None:
    try:
        from livekit.local_inference import init_eot
    except ImportError as err:  # e.g. a CPU or libc the native module was not built for
        raise ModelError(f"livekit-local-inference cannot be imported: {err}") from err
    init_eot()
