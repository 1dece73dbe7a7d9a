"""The speech gate and noise gate (speechlm.streaming.gate) batched over sessions, and the duplex model
alone behind it: a room under the user's pauses reaches the LM as digital silence; rows keep their
gate through joins and leaves."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: reach the duplex tests' helpers
from test_duplex_model import codec, make_duplex, speech, tokenizer_dir  # noqa: E402, F401  (fixtures)

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import GREEDY
from speechlm.streaming.duplex_model import DuplexSpeechModel
from speechlm.streaming.gate import GateConfig, GateState, frame_rms, hear, noise_gate
from speechlm.training.espeak import Espeak
from speechlm.vad import DetectorConfig, SpeechDetector

N = 640
FRAME_S = N / 16_000
CFG = GateConfig()


def room(frames: int, rms: float, seed: int = 7) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(frames * N)).astype(np.float32)


def gate_run(audio: np.ndarray, config: GateConfig = CFG) -> tuple[list[bool], GateState]:
    state = GateState.fresh(1)
    voiced = [bool(hear(frame_rms(torch.from_numpy(f)[None]), state, config, FRAME_S)[0]) for f in audio.reshape(-1, N)]
    return voiced, state


def test_the_gate_follows_a_quiet_user_in_a_quiet_room_and_ignores_a_noisy_room():
    quiet_user = np.concatenate([room(4, 5e-4, 1), 0.033 * speech(10, 0) + room(10, 5e-4, 2), room(6, 5e-4, 3)])  # speech at ~-43 dBFS
    voiced, state = gate_run(quiet_user)
    assert voiced[4:14] == [True] * 10 and not any(voiced[:4]) and not any(voiced[14:])
    assert float(state.threshold[0]) < CFG.voiced_rms  # lowered by the quiet room
    voiced, _ = gate_run(quiet_user, GateConfig(min_voiced_rms=0.01))  # a fixed -40 dBFS gate hears nothing of it
    assert not any(voiced)
    voiced, state = gate_run(room(40, 0.006, 4))  # a noisy room (-44 dBFS) alone is not speech
    assert not any(voiced) and float(state.threshold[0]) == pytest.approx(CFG.voiced_rms)
    # digital silence says nothing about the room: level, floor and threshold stay
    before = (state.level.clone(), state.floor.clone(), state.threshold.clone())
    hear(torch.zeros(1), state, CFG, FRAME_S)
    assert all(torch.equal(a, b) for a, b in zip(before, (state.level, state.floor, state.threshold)))
    assert int(state.quiet_run[0]) > 40


def test_rows_of_a_batch_are_gated_as_if_alone():
    audio = [np.concatenate([room(5, r, s), g * speech(8, s) + room(8, r, s + 1), room(7, r, s + 2)])
             for s, (r, g) in enumerate([(5e-4, 0.03), (0.006, 1.0), (0.0, 1.0)])]  # fmt: skip
    alone = [gate_run(a) for a in audio]
    state = GateState.fresh(3)
    frames = torch.from_numpy(np.stack([a.reshape(-1, N) for a in audio], axis=1))  # (T, 3, N)
    for t, pcm in enumerate(frames):
        heard, voiced = noise_gate(pcm, state, CFG, FRAME_S)
        for b in range(3):
            assert bool(voiced[b]) == alone[b][0][t]
            talking = any(alone[b][0][max(0, t - CFG.talk_frames + 1) : t + 1])
            assert torch.equal(heard[b], pcm[b] if talking else torch.zeros(N))
    for b in range(3):
        assert torch.allclose(state.threshold[b], alone[b][1].threshold[0]) and torch.allclose(state.floor[b], alone[b][1].floor[0])
    state.reset_rows([1])
    assert float(state.threshold[1]) == -1 and int(state.quiet_run[1]) == GateState.fresh(1).quiet_run[0]
    assert float(state.threshold[0]) == pytest.approx(float(alone[0][1].threshold[0]))


def detector_that_hears(speech: bool) -> SpeechDetector:
    """A small detector that hears speech in every frame (``speech``) or in none."""
    detector = SpeechDetector(DetectorConfig(channels=8, dilations=[1], kernel_size=3)).eval()
    with torch.no_grad():
        detector.head.weight.zero_()
        detector.head.bias.fill_(10.0 if speech else -10.0)
    return detector


def detector_run(audio: np.ndarray, detector: SpeechDetector | None, config: GateConfig = CFG) -> tuple[list[bool], list[bool]]:
    """(voiced, open) per frame of one row through the noise gate with ``detector``."""
    state, voiced, opened = GateState.fresh(1, detector=detector), [], []
    for frame in torch.from_numpy(audio).reshape(-1, 1, N):
        heard, v = noise_gate(frame, state, config, FRAME_S, detector)
        voiced.append(bool(v[0]))
        opened.append(bool(heard.any()))
    return voiced, opened


def test_a_room_louder_than_the_gate_is_not_speech_to_a_detector():
    """A room at -34 dBFS is over the gate's ceiling (-40 dBFS) in every frame: by the level the user never stops.
    With a detector that hears no speech there, it is speech only for onset_frames, and the gate closes then (after
    talk_frames without mute_ruled_out); a detector that hears speech everywhere changes nothing the level decides."""
    loud = room(40, 0.02, 5)
    voiced, opened = detector_run(loud, None)
    assert all(voiced) and all(opened)
    voiced, opened = detector_run(loud, detector_that_hears(False))
    assert voiced == [True] * CFG.onset_frames + [False] * (40 - CFG.onset_frames)
    assert opened == voiced  # the room after the onset frames reaches the model as digital silence at once
    _, opened = detector_run(loud, detector_that_hears(False), GateConfig(mute_ruled_out=False))
    assert opened == [True] * (CFG.onset_frames + CFG.talk_frames - 1) + [False] * (40 - CFG.onset_frames - CFG.talk_frames + 1)
    quiet_user = np.concatenate([room(4, 5e-4, 1), 0.033 * speech(10, 0) + room(10, 5e-4, 2), room(6, 5e-4, 3)])
    for audio in (loud, quiet_user):
        assert detector_run(audio, detector_that_hears(True))[0] == gate_run(audio)[0]
    with pytest.raises(SpeechLMError, match="detector"):
        noise_gate(torch.zeros(1, N), GateState.fresh(1), CFG, FRAME_S, detector_that_hears(True))


def test_the_shipped_detector_lets_speech_through_a_loud_room_and_closes_the_gate_after_it():
    """vad-en frame by frame: a held-out espeak voice over white noise at -34 dBFS (the level gate hears 100 % speech):
    the gate is open while the user speaks and closed in the room before and after."""
    detector = SpeechDetector.from_pretrained("vad-en")
    said = Espeak.instance().synthesize("What is two plus three?", "en-us+m7").audio
    said = np.concatenate([said, np.zeros((-len(said)) % N, np.float32)]) * (0.5 / np.abs(said).max())
    lead, tail = 50, 50
    audio = np.concatenate([np.zeros(lead * N, np.float32), said, np.zeros(tail * N, np.float32)]) + room(lead + len(said) // N + tail, 0.02, 9)
    voiced, opened = detector_run(audio, detector)
    spoken = len(said) // N
    speech_frames = np.nonzero(np.sqrt((said.reshape(-1, N) ** 2).mean(axis=1)) > 0.03)[0] + lead
    assert all(opened[i] for i in speech_frames)  # the user heard while speaking
    assert not any(opened[20:lead]) and not any(opened[lead + spoken + 10 :])  # the room alone: digital silence


def test_bad_gate_settings_are_errors():
    with pytest.raises(SpeechLMError, match="gate"):
        GateConfig(min_voiced_rms=0.02, voiced_rms=0.01)
    with pytest.raises(SpeechLMError, match="talk_frames"):
        GateConfig(talk_frames=0)


def duplex_alone(tokenizer_dir, codec, **kwargs):  # noqa: F811
    return DuplexSpeechModel(make_duplex(tokenizer_dir), codec, text_sampling=GREEDY, audio_sampling=GREEDY, **kwargs)


def fed_to_codec(model: DuplexSpeechModel, users: np.ndarray) -> np.ndarray:
    """Run the model on ``users`` (B, T) frame by frame; what its codec's encoder was given, (frames, B, N)."""
    fed = []
    encode = model.codec.encode_step

    def spy(pcm, state):
        fed.append(pcm.numpy().copy())
        return encode(pcm, state)

    model.codec.encode_step = spy
    try:
        state = model.init_state(users.shape[0])
        for frame in np.swapaxes(users.reshape(users.shape[0], -1, N), 0, 1):
            _, _, state = model.step(torch.from_numpy(frame), state)
    finally:
        del model.codec.encode_step
    return np.stack(fed)


@pytest.mark.parametrize("gate", [True, False])
def test_the_duplex_model_alone_hears_the_users_pauses_as_digital_silence(tokenizer_dir, codec, gate):  # noqa: F811
    user = np.concatenate([room(6, 0.001, 1), speech(8, 0) + room(8, 0.001, 2), room(10, 0.001, 3)])
    model = duplex_alone(tokenizer_dir, codec, **({} if gate else {"noise_gate": None}))
    fed = fed_to_codec(model, user[None])[:, 0]
    frames = user.reshape(-1, N)
    if not gate:
        np.testing.assert_array_equal(fed, frames)
        return
    np.testing.assert_array_equal(fed[6:16], frames[6:16])  # speech from its first frame, and the 2 quiet frames after it
    assert not fed[16:].any() and not fed[:6].any()  # from the 3rd quiet frame, and before the user spoke: digital silence


def test_rows_keep_their_gate_through_joins_and_leaves(tokenizer_dir, codec):  # noqa: F811
    model = duplex_alone(tokenizer_dir, codec)
    quiet = np.concatenate([room(3, 5e-4, 1), 0.033 * speech(6, 0) + room(6, 5e-4, 2)]).reshape(-1, N)
    state = model.init_state(2)
    for frame in quiet:  # row 0: a quiet user in a quiet room; row 1: digital silence
        _, _, state = model.step(torch.from_numpy(np.stack([frame, np.zeros(N, np.float32)])), state)
    learned = float(state.gate.threshold[0])
    assert learned < CFG.voiced_rms and int(state.gate.quiet_run[0]) == 0
    state = model.select_rows(state, [0])  # row 1 leaves
    state = model.grow_state(state, 2)  # a new one joins
    assert float(state.gate.threshold[0]) == learned and float(state.gate.threshold[1]) == -1
    state = model.reset_rows(state, [0])
    assert float(state.gate.threshold[0]) == -1


def test_the_gates_detector_state_follows_rows_through_joins_and_leaves(tokenizer_dir, codec):  # noqa: F811
    """With a speech detector, each row's detector state moves with the row (select, grow, reset) like the rest."""
    model = duplex_alone(tokenizer_dir, codec, speech_detector=detector_that_hears(False))
    loud = torch.from_numpy(room(8, 0.02, 3).reshape(8, N))
    state = model.init_state(2)
    for frame in loud:
        _, _, state = model.step(torch.stack([frame, frame * 0.5]), state)
    detector = state.gate.detector
    assert detector.batch_size == 2 and not detector.fresh.any()
    kept = detector.audio[1].clone()
    state = model.grow_state(model.select_rows(state, [1]), 2)  # row 0 leaves, a new one joins after row 1
    assert torch.equal(state.gate.detector.audio[0], kept) and state.gate.detector.fresh.tolist() == [False, True]
    state = model.reset_rows(state, [0])
    assert state.gate.detector.fresh.tolist() == [True, True] and not state.gate.detector.audio.any()
    _, _, state = model.step(loud[:2], state)
    assert int(state.gate.loud_run[0]) == 1 and not state.gate.detector.fresh.any()


def test_a_row_resets_right_after_a_tick(tokenizer_dir, codec):  # noqa: F811
    """The scheduler resets a row straight after a tick (a session rejoins): the gate's tensors made inside
    the tick's inference mode must still take it."""
    model = duplex_alone(tokenizer_dir, codec)
    state = model.init_state(2)
    for frame in np.stack([room(4, 0.003, 1), room(4, 0.003, 2)], axis=1).reshape(4, 2, N)[..., :N]:
        _, _, state = model.step(torch.from_numpy(np.ascontiguousarray(frame)), state)
    state = model.reset_rows(state, [1])
    assert float(state.gate.threshold[1]) == -1 and float(state.gate.threshold[0]) != -1
    _, _, state = model.step(torch.zeros(2, N), state)


def typing(frames: int, every: int, seed: int = 11) -> np.ndarray:
    """Key clicks: a decaying 10 ms burst at the start of every ``every``-th frame, in a quiet room."""
    rng = np.random.default_rng(seed)
    audio = room(frames, 5e-4, seed)
    burst = 0.3 * rng.standard_normal(160) * np.exp(-np.arange(160) / 40)
    for start in range(0, frames * N, every * N):
        audio[start : start + 160] += burst.astype(np.float32)
    return audio


def test_typing_is_speech_once_then_only_when_the_detector_hears_it():
    """Each click is a new sound over the threshold: by its onset frames alone every one passed as speech. Once the
    detector ruled one out, the clicks after it within doubt_frames are not speech, and the gate stays closed;
    after a pause of doubt_frames a sound gets its onset frames again."""
    every, clicks = 5, 8
    audio = np.concatenate([typing(every * clicks, every), room(CFG.doubt_frames, 5e-4, 3), typing(every, every)])
    onsets = [i * every for i in range(clicks)] + [every * clicks + CFG.doubt_frames]
    voiced, opened = detector_run(audio, None)
    assert [i for i, v in enumerate(voiced) if v] == onsets  # by the level: every click is speech
    voiced, opened = detector_run(audio, detector_that_hears(False))
    assert [i for i, v in enumerate(voiced) if v] == [onsets[0], onsets[-1]]
    assert not any(opened[CFG.talk_frames : onsets[-1]])
    voiced, _ = detector_run(audio, detector_that_hears(False), GateConfig(doubt_frames=0))
    assert [i for i, v in enumerate(voiced) if v] == onsets  # without the doubt: as by the level
    assert detector_run(audio, detector_that_hears(True))[0] == gate_run(audio)[0]


def test_the_shipped_detector_hears_speech_right_after_typing():
    """vad-en: typing up to 0.2 s before the user speaks keeps the gate shut, and the speech still opens it within a
    few frames of its start (the detector's verdict instead of the onset frames)."""
    detector = SpeechDetector.from_pretrained("vad-en")
    said = Espeak.instance().synthesize("What is two plus three?", "en-us+m7").audio
    said = np.concatenate([said, np.zeros((-len(said)) % N, np.float32)]) * (0.3 / np.abs(said).max())
    keys, gap = 60, 5
    audio = np.concatenate([typing(keys, 4), room(gap, 5e-4, 4), said + room(len(said) // N, 5e-4, 5)])
    voiced, opened = detector_run(audio, detector)
    assert not any(opened[4 * 2 : keys + gap])  # the second click on: shut
    loud = np.nonzero(np.sqrt((said.reshape(-1, N) ** 2).mean(axis=1)) > 0.02)[0] + keys + gap
    assert opened[loud[0] + 3] and np.mean([opened[i] for i in loud]) > 0.9


def test_a_sound_is_ruled_out_by_its_last_frames():
    """A sound whose last onset_frames frames (and the frame after) held no speech is ruled out, though it began as
    speech (clicks run into the tail of the user's words): the next sound gets no onset frames. A sound whose speech
    went on into its last onset_frames frames is not, nor one whose frame after it holds speech (the detector lags)."""
    loud, quiet = 0.05, 0.0005

    def next_sound_voiced(spoken: int, unheard: int, after: bool = False) -> bool:
        state = GateState.fresh(1)
        frames = [(loud, True)] * spoken + [(loud, False)] * unheard + [(quiet, after)] * 2 + [(loud, False)]
        voiced = [bool(hear(torch.tensor([r]), state, CFG, FRAME_S, torch.tensor([s]))[0]) for r, s in frames]
        assert voiced[:spoken] == [True] * spoken
        return voiced[-1]

    assert not next_sound_voiced(3, CFG.onset_frames)
    assert next_sound_voiced(3, CFG.onset_frames - 1)
    assert next_sound_voiced(3, CFG.onset_frames, after=True)
    assert not next_sound_voiced(0, 1) and not next_sound_voiced(0, 2)  # clicks
