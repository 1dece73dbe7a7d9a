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
