"""End-of-turn detection: LiveKit's local model loaded once and self-tested, how turns end, cut-offs.

How well the model ends turns (false cut-offs, delays) is measured by benchmarks/turns.py, not here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import numpy as np
import pytest
from livekit import rtc
from prometheus_client import REGISTRY

from knotd import logs, stages
from knotd.config import ConfigError, Settings, SttSettings, TurnSettings, load_settings
from knotd.conversation.turns import CutoffWatch, TurnDecision
from knotd.speech import turn_model
from tests.audio import cached_clip

GERMAN_THRESHOLD = 0.245  # livekit's shipped threshold for "de"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- how a turn ended, cut-offs (pure) ---------------------------------------------------------------
@pytest.mark.parametrize(("probability", "ending"), [(0.9, "model"), (GERMAN_THRESHOLD, "model"),
                                                      (0.1, "max_delay"), (None, "min_delay")])
def test_a_turn_ends_by_the_models_answer_or_a_delay(probability, ending):
    assert TurnDecision(probability, GERMAN_THRESHOLD).ending == ending


def test_a_caller_talking_into_an_answer_within_a_second_is_one_cutoff():
    cutoffs = []
    watch = CutoffWatch(lambda: cutoffs.append(1))

    watch.agent_speaking(10.0)
    watch.user_speaking(10.6)  # cut off
    watch.user_speaking(10.8)  # the same answer: not counted again
    watch.agent_speaking(20.0)
    watch.user_speaking(21.5)  # a barge-in later in the answer is not a cut-off
    watch.user_speaking(30.0)  # no answer running

    assert cutoffs == [1]


# -- configuration -------------------------------------------------------------------------------------
def test_turn_detection_defaults_to_the_vad_and_rejects_other_values(tmp_path):
    assert TurnSettings().detection == "vad"
    path = tmp_path / "knotd.toml"
    path.write_text('[turn]\ndetection = "stt"\n')

    with pytest.raises(ConfigError) as err:
        load_settings(path, {}, require_livekit=False)

    assert "turn.detection" in str(err.value) and "model, vad" in str(err.value)


# -- the model: loaded once, self-tested, optional -----------------------------------------------------
def test_the_model_loads_and_gives_the_known_answer_on_the_bundled_clip():
    assert turn_model.load_turn_model() is True

    recorded = {r.name: r.status for r in stages.recent(10)}
    assert recorded["eot_load"] == recorded["eot_selftest"] == "ok"
    assert turn_model.run_self_test() == pytest.approx(turn_model.SELFTEST_PROBABILITY,
                                                       abs=turn_model.SELFTEST_TOLERANCE)


def test_a_model_that_cannot_load_is_one_warning_and_an_error_stage(monkeypatch, capsys):
    # What a CPU or libc the native module was not built for looks like: the import fails.
    monkeypatch.setitem(sys.modules, "livekit.local_inference", None)
    errors_before = sample("knotd_stage_duration_seconds_count", {"stage": "eot_load", "status": "error"})
    logs.configure("info", "console")  # what `knotd run` sets up: one line per event on stderr
    capsys.readouterr()

    assert turn_model.load_turn_model() is False

    assert sample("knotd_stage_duration_seconds_count",
                  {"stage": "eot_load", "status": "error"}) == errors_before + 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "warning" in lines[0] and "stage=eot_load" in lines[0] and "fallback=vad" in lines[0]
    assert "livekit-local-inference cannot be imported" in lines[0]


def test_a_model_giving_wrong_answers_fails_its_self_test(monkeypatch):
    monkeypatch.setattr(turn_model, "SELFTEST_PROBABILITY", 0.9)

    assert turn_model.load_turn_model() is False

    assert [r for r in stages.recent(5) if r.name == "eot_selftest"][-1].status == "error"


# -- in a session (real models, real audio) ------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_models(model_dir):
    from knotd.agent import register_plugins
    from knotd.speech.models import load_models

    register_plugins()
    return load_models(Settings(stt=SttSettings(model=str(model_dir)), turn=TurnSettings(detection="model")))


def _clip(text: str) -> rtc.AudioFrame:
    from knotd.agent.local_io import read_wav

    frame = read_wav(cached_clip(text))
    pcm = np.concatenate([np.frombuffer(bytes(frame.data), dtype=np.int16), np.zeros(2 * 16000, dtype=np.int16)])
    return rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, len(pcm))


async def _converse(shared_models, model_dir, tmp_path, detection: str, models=None):
    from knotd.agent.local_session import converse
    from knotd.agent.session import AgentResources
    from knotd.bootstrap import session_observers
    from knotd.state import DaemonState

    settings = Settings(stt=SttSettings(model=str(model_dir)), turn=TurnSettings(detection=detection))
    settings = dataclasses.replace(settings, session=dataclasses.replace(settings.session,
                                                                         state_dir=str(tmp_path / "state")))
    resources = AgentResources.load(settings, models or shared_models)
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    result = await converse(resources, session_observers(settings, state), [_clip("Ja, ich bin einverstanden.")],
                            realtime_playout=False)
    return result, state


@pytest.mark.models
async def test_with_the_model_a_spoken_turn_is_answered_and_counted_by_how_it_ended(shared_models, model_dir,
                                                                                       tmp_path):
    assert shared_models.turn_model
    used_before = sample("knotd_stt_speculative_total", {"result": "used"})
    endings_before = {how: sample("knotd_turn_endings_total", {"how": how})
                      for how in ("model", "max_delay", "min_delay", "vad")}

    result, state = await _converse(shared_models, model_dir, tmp_path, "model")

    assert result.conversation.detection == "model"
    users = [i.text_content for i in result.conversation.session.history.items if getattr(i, "role", "") == "user"]
    assert len(users) == 1 and "einverstanden" in users[0].lower()
    # The model decided (an answer, not a timeout), and the transcript was the speculative one.
    assert sum(state.turn_endings.values()) == 1 and set(state.turn_endings) <= {"model", "max_delay"}
    how = next(iter(state.turn_endings))
    assert sample("knotd_turn_endings_total", {"how": how}) == endings_before[how] + 1
    assert sample("knotd_stt_speculative_total", {"result": "used"}) >= used_before + 1
    assert state.snapshot().to_json()["turn_endings"] == {how: 1}


@pytest.mark.models
async def test_vad_detection_and_a_missing_model_end_turns_with_the_vad(shared_models, model_dir, tmp_path):
    result, state = await _converse(shared_models, model_dir, tmp_path, "vad")
    assert result.conversation.detection == "vad" and state.turn_endings == {"vad": 1}

    without_model = dataclasses.replace(shared_models, turn_model=False)
    result, state = await _converse(shared_models, model_dir, tmp_path, "model", models=without_model)
    assert result.conversation.detection == "vad" and state.turn_endings == {"vad": 1}
