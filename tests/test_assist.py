"""Answer assist (speechlm.streaming.assist): the duplex model's turn starts ask the speech LM,
its words become the duplex model's inner monologue; turns end, yield and restart; rows keep their
bookkeeping through the scheduler's joins and leaves; the server builds it from --assist."""

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: reach the duplex tests' helpers
from test_duplex_model import TEXTS, C, Q, codec, drain, make_duplex, run_ticks, speech, tokenizer_dir  # noqa: E402, F401  (fixtures)

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import GREEDY
from speechlm.lm.adapters import AdapterConfig
from speechlm.speech import fast_dtype
from speechlm.streaming.assist import AssistConfig, AssistedDuplexModel, AssistedState, _Job, _Say
from speechlm.streaming.duplex_model import DuplexSpeechModel
from speechlm.streaming.models import DuplexModel
from speechlm.streaming.scheduler import Scheduler
from speechlm.streaming.server import ServerConfig, build_model
from speechlm.streaming.settings import add_serve_arguments, config_from_args
from speechlm.vad import STREAM_HOP, DetectorConfig, SpeechDetector

N = 640


class FakeSpeech:
    """Stands in for the speech LM: records what it is asked, answers with fixed text."""

    sample_rate = 16_000

    def __init__(self, transcript="hello world", reply="the quick brown fox"):
        self.transcript, self.reply = transcript, reply
        self.questions: list[np.ndarray] = []
        self.asked: list[str] = []

    def asr(self, audio, sample_rate=16_000, generation=None):
        self.questions.append(np.asarray(audio))
        return self.transcript

    def reply_text(self, question, generation=None):
        self.asked.append(question)
        return self.reply

    def tts(self, text, stream=True, generation=None):
        """Two frames a word; frame k of the reply's speech is a constant 0.1 * (k + 1)."""
        assert stream and text == self.reply
        return (np.full(N, 0.1 * (k + 1), np.float32) for k in range(2 * len(text.split())))


def assisted(tokenizer_dir, codec, *, talkative=True, mute=False, speech_lm=None, **config):  # noqa: F811
    duplex = make_duplex(tokenizer_dir)
    if talkative:  # the model would start a word every frame: the plan decides what it says
        duplex.allowed_text[duplex.text_pad] = False
    if mute:  # the model never makes a sound
        with torch.no_grad():
            duplex.lm.audio_head.out_bias[0, C] = 50.0
    inner = DuplexSpeechModel(duplex, codec, text_sampling=GREEDY, audio_sampling=GREEDY)
    return AssistedDuplexModel(inner, speech_lm or FakeSpeech(), AssistConfig(**config))


def without_user_events(piece):
    """A text piece less its user-talking events ({"user": "started"/"stopped"}, tested apart): a plain model piece when
    that is all it held."""
    if not isinstance(piece, dict) or "events" not in piece:
        return piece
    events = [e for e in piece["events"] if "user" not in e]
    rest = {k: v for k, v in piece.items() if k != "events"} | ({"events": events} if events else {})
    return (rest["model"] or None) if list(rest) == ["model"] else rest  # (a frame with no piece is None, not "")


def run(model, user: np.ndarray, keep_user_events: bool = False):
    state, texts, pcm = model.init_state(1), [], []
    for frame in user.reshape(-1, N):
        out, pieces, state = model.step(torch.from_numpy(frame)[None], state)
        texts.append(pieces[0] if keep_user_events else without_user_events(pieces[0]))
        pcm.append(out[0].numpy())
    return np.concatenate(pcm), texts, state


def test_the_user_starting_and_stopping_to_talk_goes_out_as_events(tokenizer_dir, codec):  # noqa: F811
    """{"user": "started"} with the first frame of the question, {"user": "stopped"} once the user has been quiet
    talk_frames frames (the server sends them as METADATA {"type": "user"})."""
    model = assisted(tokenizer_dir, codec, mute=True)
    user = np.concatenate([np.zeros(3 * N, np.float32), speech(8, 4), np.zeros(12 * N, np.float32)])
    _, texts, _ = run(model, user, keep_user_events=True)
    events = [(t, e["user"]) for t, piece in enumerate(texts) if isinstance(piece, dict) for e in piece.get("events", []) if "user" in e]
    assert events == [(3, "started"), (11 + model.config.talk_frames - 1, "stopped")], events


def words(model, text):
    return [model.duplex.piece(i) for w in text.split() for i in model.duplex.lm.tokenizer.encode(" " + w, add_special_tokens=False)]


def test_a_turn_asks_the_speech_lm_and_says_its_words(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, voice="duplex")
    assert isinstance(model, DuplexModel)
    user = np.concatenate([speech(10, 0), np.zeros(15 * N, np.float32)])
    _, texts, state = run(model, user)
    fake = model.speech
    # while the user talks, the model's words are its own (a backchannel) and no turn starts;
    # after 1 quiet frame (plan_quiet_frames) the reply is planned, after 3 (talk_frames) the turn starts
    assert all(isinstance(t, str) for t in texts[:12]) and model.turns == 1
    assert len(fake.questions) == 1 and fake.asked == ["hello world"]
    np.testing.assert_array_equal(fake.questions[0], user[: 10 * N])  # voiced frames 0..9 (the margin's frames are digital silence: dropped)
    assert texts[12] == {"model": words(model, "the")[0], "user": "hello world"}
    said = [texts[12]["model"], *texts[13:]]
    plan = words(model, fake.reply)
    assert said[: len(plan)] == plan
    assert all(t is None for t in said[len(plan) :])  # the plan is said: no more words
    assert state.rows[0].plan == [] and len(state.rows[0].heard) == 25 - 11  # heard anew from where the plan was made (the next question)


def room(frames: int, rms: float, seed: int = 7) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(frames * N)).astype(np.float32)


def test_the_speech_gate_follows_the_user_and_the_room(tokenizer_dir, codec):  # noqa: F811
    """A quiet microphone in a quiet room (a question at RMS ~0.007, under the -40 dBFS gate; the room
    at -66 dBFS) is heard whole, as at full level; with the gate fixed at -40 dBFS it is not heard at
    all. In a noisy room (RMS 0.006, under -40 dBFS) the noise alone is not speech: no turn."""
    quiet = np.concatenate([room(4, 5e-4, 1), speech(10, 0) * 0.033 + room(10, 5e-4, 2), room(15, 5e-4, 3)])
    model = assisted(tokenizer_dir, codec)  # the speech LM's voice: no turn of the model's own before the question
    run(model, quiet)
    assert model.turns == 1 and model.speech.asked == ["hello world"]
    heard = model.speech.questions[0]
    # the voiced frames, the 3 margin frames before them and the 1 quiet frame heard when it was planned
    np.testing.assert_array_equal(heard, quiet[1 * N : 15 * N])
    fixed = assisted(tokenizer_dir, codec, min_voiced_rms=0.01)
    run(fixed, quiet)
    assert fixed.speech.questions == []
    noisy = assisted(tokenizer_dir, codec)
    pcm, _, state = run(noisy, room(40, 0.006, 4))
    assert noisy.speech.questions == [] and noisy.turns == 0 and not np.abs(pcm).any()
    assert state.rows[0].gate == pytest.approx(0.01)


@pytest.mark.parametrize("gate", [True, False])
def test_the_duplex_model_hears_pauses_as_digital_silence(tokenizer_dir, codec, gate):  # noqa: F811
    """Noise gate: the room under the user's pauses reaches the duplex model as zeros from the 3rd quiet
    frame on (talk_frames), their speech unchanged from its first frame; noise_gate=False passes all."""
    user = np.concatenate([room(6, 0.001, 1), speech(8, 0) + room(8, 0.001, 2), room(10, 0.001, 3)])
    model = assisted(tokenizer_dir, codec, noise_gate=gate)
    fed = []
    tick = model.duplex.tick

    def spy(user_pcm, state, **kwargs):
        fed.append(user_pcm[0].numpy().copy())
        return tick(user_pcm, state, **kwargs)

    model.duplex.tick = spy
    run(model, user)
    fed = np.stack(fed)
    frames = user.reshape(-1, N)
    if not gate:
        np.testing.assert_array_equal(fed, frames)
        return
    np.testing.assert_array_equal(fed[6:14], frames[6:14])  # speech: as it was
    np.testing.assert_array_equal(fed[14:16], frames[14:16])  # the first quiet frames: still open (the user may go on)
    assert not fed[16:].any() and not fed[:6].any()  # from the 3rd quiet frame, and before the user spoke: digital silence


def test_a_silent_model_ends_its_turn_and_nothing_heard_means_its_own_words(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, mute=True, end_frames=2, voice="duplex")
    user = np.concatenate([speech(8, 1), np.zeros(20 * N, np.float32)])
    pcm, texts, state = run(model, user)
    assert np.abs(pcm).max() == 0
    # turn 1 at frame 11 never made a sound: it ends after 3 x end_frames silent frames; turn 2
    # hears only silence: no question to the speech LM, the model says its own words (a "free" turn)
    assert model.turns >= 2 and len(model.speech.questions) == 1
    assert all(isinstance(t, str) for t in texts[-3:])  # its own words (a plan said out would give pads)


def test_the_plan_goes_on_when_the_model_pauses_and_stops_when_the_user_talks(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, talkative=False, end_frames=3, voice="duplex")
    pad = model.pad
    state = model.init_state(1)
    row = state.rows[0]
    row.plan, row.spoke, row.silent_run = [[7, 8], [9]], True, 1
    hear(model, state, np.zeros(3 * N, np.float32))
    # the model sampled pad after falling silent, the user is quiet: the next planned word starts
    assert model._choose(row, pad) == 7 and model._choose(row, pad) == 8 and row.plan == [[9]]
    # the user talks over it: the model may yield (pad), and after end_frames silent frames the turn is over
    hear(model, state, speech(1, 2))
    assert model._choose(row, pad) == pad
    for _ in range(3):
        model._after(row, silent=True)
    assert not row.in_turn and row.plan is None


def test_the_speech_lm_voices_the_reply_pauses_for_a_backchannel_and_drops_it_for_an_interruption(tokenizer_dir, codec):  # noqa: F811
    # the duplex model would start words every frame but never makes a sound itself
    model = assisted(tokenizer_dir, codec, mute=True)
    user = np.concatenate([speech(8, 4), np.zeros(6 * N, np.float32), speech(4, 5), np.zeros(12 * N, np.float32)])
    pcm, texts, _ = run(model, user)
    frames = pcm.reshape(-1, N)
    # nothing is said or sounded while the user asks (no backchannel words in this voice)
    assert all(t is None for t in texts[:10]) and np.abs(frames[:10]).max() == 0
    # the turn starts once the user's last 3 frames are quiet: the reply's speech plays frame by frame ...
    assert texts[10]["user"] == "hello world" and model.speech.asked[0] == "hello world"
    np.testing.assert_allclose(frames[10:14, 0], [0.1, 0.2, 0.3, 0.4])
    # ... pauses while the user makes a short sound over it (frames 14-17; the duplex model is silent) ...
    assert np.abs(frames[14:20]).max() == 0
    # ... and goes on once they are quiet again (3 frames): a backchannel
    np.testing.assert_allclose(frames[20:24, 0], [0.5, 0.6, 0.7, 0.8])
    assert np.abs(frames[24:]).max() == 0 and model.turns == 1

    # a longer sound (20 frames > backchannel_frames) is an interruption: the rest is dropped, and it is the next question
    model = assisted(tokenizer_dir, codec, mute=True, end_frames=5)
    user = np.concatenate([speech(8, 4), np.zeros(6 * N, np.float32), speech(20, 6), np.zeros(14 * N, np.float32)])
    pcm, texts, _ = run(model, user)
    frames = pcm.reshape(-1, N)
    np.testing.assert_allclose(frames[10:14, 0], [0.1, 0.2, 0.3, 0.4])
    assert np.abs(frames[14:36]).max() == 0
    assert model.turns == 2 and texts[36]["user"] == "hello world" and frames[36, 0] == np.float32(0.1)
    np.testing.assert_array_equal(model.speech.questions[1], user[14 * N : 34 * N])
    # a sound as long without speech (the speech detector hears none in it: a door, a car) only holds the reply
    noise = FakeSpeech()
    noise.heard_speech = lambda audios, g: [False] * len(audios)
    model = assisted(tokenizer_dir, codec, mute=True, end_frames=5, speech_lm=noise)
    pcm, texts, _ = run(model, user)
    frames = pcm.reshape(-1, N)
    np.testing.assert_allclose(frames[10:14, 0], [0.1, 0.2, 0.3, 0.4])
    assert np.abs(frames[14:36]).max() == 0  # held while the sound lasts (20 frames) and the user's first quiet frames
    np.testing.assert_allclose(frames[36:40, 0], [0.5, 0.6, 0.7, 0.8])  # then the rest of the reply, as it was
    np.testing.assert_array_equal(noise.questions[0], user[: 8 * N])  # the question heard; the sound was no interruption
    # barge_frames: the user talking 5 frames pauses the reply even while the duplex model talks on
    loud = assisted(tokenizer_dir, codec)
    state = loud.init_state(1)
    row = state.rows[0]
    row.plan, row.job = [], _Job(None, 0)
    row.job.frames.extend(np.full(N, 0.5, np.float32) for _ in range(10))
    voice = speech(5, 7)
    hear(loud, state, voice[: 4 * N])  # 4 voiced frames in a row
    assert loud._voice_frame(row, duplex_silent=False) is not None and not row.paused
    hear(loud, state, voice[4 * N :])  # the 5th
    assert loud._voice_frame(row, duplex_silent=False) is None and row.paused

    # a question the speech LM hears as nothing gives no turn (and no words) in this voice
    quiet = assisted(tokenizer_dir, codec, mute=True, speech_lm=FakeSpeech(transcript=""))
    pcm, texts, _ = run(quiet, user)
    assert quiet.turns == 0 and np.abs(pcm).max() == 0 and all(t is None for t in texts)
    with pytest.raises(SpeechLMError, match="voice"):
        AssistConfig(voice="robot")


def test_a_gap_in_a_reply_under_way_counts_as_the_speech_falling_behind(tokenizer_dir, codec):  # noqa: F811
    """assist_load: of the ticks with a reply under way, the share where its speech had no frame ready."""
    model = assisted(tokenizer_dir, codec, mute=True)
    state = model.init_state(1)
    assert model.assist_load(60) is None
    row = state.rows[0]
    row.plan, row.job, row.spoke = [], _Job(None, 0), True  # a reply under way, its first frame played
    row.job.frames.extend(np.full(N, 0.5, np.float32) for _ in range(2))
    quiet = torch.zeros(1, N)
    sounded = []
    for _ in range(3):  # two frames ready, then none: the third tick is a gap
        pcm, _, state = model.step(quiet, state)
        sounded.append(bool(pcm.abs().max() > 0))
    row.job.done.set()  # the reply is all said: silence now is its end, not a gap
    model.step(quiet, state)
    assert sounded == [True, True, False]
    assert model.assist_load(60) == {"ticks": 4, "starved_share": 0.25}


class SlowSpeech(FakeSpeech):
    """The speech LM's ASR waits until the test lets it go on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.go = threading.Event()

    def asr(self, audio, sample_rate=16_000, generation=None):
        assert self.go.wait(10)
        return super().asr(audio, sample_rate, generation)


def test_in_the_background_ticks_go_on_while_the_speech_lm_works(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, mute=True, background=True, speech_lm=SlowSpeech())
    state = model.init_state(1)
    user = np.concatenate([speech(8, 7), np.zeros(30 * N, np.float32)]).reshape(-1, N)

    def tick(t):
        nonlocal state
        pcm, texts, state = model.step(torch.from_numpy(user[t])[None], state)
        return pcm[0].numpy(), without_user_events(texts[0])

    for t in range(10):  # the reply is planned at frame 9; the ASR is held: the ticks go on, silent
        pcm, text = tick(t)
    for t in range(10, 15):
        pcm, text = tick(t)
        assert text is None and np.abs(pcm).max() == 0
    job = state.rows[0].job
    assert job is not None and not job.planned.is_set() and model.turns == 0
    model.speech.go.set()
    assert job.planned.wait(10) and job.done.wait(10)
    pcm, text = tick(15)  # the reply is planned and spoken ahead: the turn starts on the next tick
    assert text["user"] == "hello world" and pcm[0] == np.float32(0.1) and model.turns == 1
    model.close()

    # the user talks on while the turn is being planned: the plan is dropped, the question grows
    model = assisted(tokenizer_dir, codec, mute=True, background=True, speech_lm=SlowSpeech())
    state = model.init_state(1)
    user = np.concatenate([speech(8, 7), np.zeros(4 * N, np.float32), speech(8, 8), np.zeros(20 * N, np.float32)]).reshape(-1, N)
    for t in range(12):
        tick(t)
    first = state.rows[0].job
    assert first is not None
    tick(12)  # the user talks again
    assert first.cancelled and state.rows[0].job is None
    model.speech.go.set()
    for t in range(13, 32):
        pcm, text = tick(t)
        if isinstance(text, dict):
            break
        time.sleep(0.02)  # let the assist thread work
    assert isinstance(text, dict) and model.turns == 1
    assert len(model.speech.questions[-1]) == (8 + 8) * N  # the whole question: both parts (the zero frames of the pause dropped)
    job = state.rows[0].job
    model.close()  # the server stops: work in progress stops too
    assert job.cancelled and model._thread is None


class SlowFrames(FakeSpeech):
    """The reply's speech takes 0.3 s a frame to make (a slow torch step)."""

    def tts(self, text, stream=True, generation=None):
        for frame in super().tts(text, stream, generation):
            time.sleep(0.3)
            yield frame


def test_close_waits_for_the_assist_thread_to_end(tokenizer_dir, codec):  # noqa: F811
    """A server's Ctrl-C while a reply was being made aborted the process (a thread in a torch op at exit): close()
    now returns only once the assist thread has ended."""
    model = assisted(tokenizer_dir, codec, mute=True, background=True, speech_lm=SlowFrames())
    state = model.init_state(1)
    for frame in np.concatenate([speech(8, 7), np.zeros(6 * N, np.float32)]).reshape(-1, N):
        _, _, state = model.step(torch.from_numpy(frame)[None], state)
    job = state.rows[0].job
    assert job is not None and job.planned.wait(10)
    for _ in range(50):  # the reply's speech under way
        if job.frames:
            break
        time.sleep(0.05)
    thread = model._thread
    assert job.frames and not job.done.is_set() and thread.is_alive()
    model.close()
    assert not thread.is_alive()


class BrokenSpeech(FakeSpeech):
    def asr(self, audio, sample_rate=16_000, generation=None):
        raise SpeechLMError("prompt (5000 positions) exceeds the model's limit")


def test_a_speech_lm_error_costs_the_turn_not_the_session(tokenizer_dir, codec, caplog):  # noqa: F811
    model = assisted(tokenizer_dir, codec, speech_lm=BrokenSpeech())
    user = np.concatenate([speech(8, 6), np.zeros(6 * N, np.float32)])
    pcm, texts, state = run(model, user)
    assert model.turns == 0 and np.abs(pcm).max() == 0 and all(t is None for t in texts)
    assert "no answer this turn" in caplog.text and state.batch_size == 1


class StutteringSpeech(FakeSpeech):
    """The first reply's speech fails after 3 frames; later replies are whole."""

    def __init__(self):
        super().__init__()
        self.replies = 0

    def tts(self, text, stream=True, generation=None):
        self.replies += 1
        frames = super().tts(text, stream, generation)
        if self.replies > 1:
            return frames

        def broken():
            for k, frame in enumerate(frames):
                if k == 3:
                    raise RuntimeError("out of memory")
                yield frame

        return broken()


def test_an_error_in_the_replies_speech_costs_those_replies_not_the_assist(tokenizer_dir, codec, caplog):  # noqa: F811
    model = assisted(tokenizer_dir, codec, background=True, speech_lm=StutteringSpeech())
    first = model._submit(speech(8, 7), 0)
    assert first.done.wait(10) and len(first.frames) == 3 and "the replies' speech stopped: out of memory" in caplog.text
    second = model._submit(speech(8, 8), 0)  # the assist thread goes on, with fresh streams
    assert second.done.wait(10) and len(second.frames) == 2 * len(FakeSpeech().reply.split())
    model.close()


def test_a_turn_wanted_just_as_the_user_stops_starts_once_they_stay_quiet(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, talkative=False)
    state = model.init_state(1)
    row = state.rows[0]
    hear(model, state, speech(10, 9))
    hear(model, state, np.zeros(N, np.float32))  # the user just stopped: still "talking" for the 3-frame window
    word = int(model.duplex.lm.tokenizer.encode(" hello", add_special_tokens=False)[0])
    assert model._choose(row, word) == model.pad and row.turn_wanted and model.turns == 0
    hear(model, state, np.zeros(2 * N, np.float32))
    # the model samples pad now, but the turn it wanted starts: the plan's first word
    assert model._choose(row, model.pad) == words_ids(model, "the")[0] and model.turns == 1 and not row.turn_wanted
    # the duplex model's own (unplayed) audio sounding is a wish for the turn too
    state3 = model.init_state(1)
    row3 = state3.rows[0]
    hear(model, state3, speech(10, 9))
    hear(model, state3, np.zeros(3 * N, np.float32))
    row3.duplex_sounding = True
    assert model._choose(row3, model.pad) == words_ids(model, "the")[0] and row3.in_turn
    # a wish cancelled by the user speaking again
    state2 = model.init_state(1)
    row2 = state2.rows[0]
    hear(model, state2, speech(10, 9))
    hear(model, state2, np.zeros(N, np.float32))
    model._choose(row2, word)
    hear(model, state2, speech(1, 10))
    model._choose(row2, model.pad)
    assert not row2.turn_wanted


def test_the_reply_is_planned_once_the_user_is_quiet_but_said_only_when_the_duplex_model_speaks(tokenizer_dir, codec):  # noqa: F811
    user = np.concatenate([speech(8, 11), np.zeros(10 * N, np.float32)])
    for early in (True, False):
        model = assisted(tokenizer_dir, codec, talkative=False, plan_early=early)
        model.duplex.lm.allowed_text[:] = False
        model.duplex.lm.allowed_text[model.pad] = True  # this duplex model never wants to speak
        pcm, texts, _ = run(model, user)
        assert model.speech.asked == (["hello world"] if early else []) and model.turns == 0
        assert np.abs(pcm).max() == 0 and all(t is None for t in texts)


def test_the_question_keeps_a_quiet_margin_but_not_digital_silence(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec)
    row = model.init_state(1).rows[0]
    hum = 0.001 * np.ones(N, np.float32)  # a quiet room: below the voiced level, not zero
    voice = speech(8, 12).reshape(-1, N)
    for f in [np.zeros(N, np.float32), hum, hum, *voice[:4], np.zeros(N, np.float32), *voice[4:], hum, np.zeros(N, np.float32), hum]:
        row.hear(f, False)
    question = model.question_audio(row)
    np.testing.assert_array_equal(question, np.concatenate([hum, hum, *voice, hum, hum]))
    row = model.init_state(1).rows[0]
    for _ in range(5):
        row.hear(hum, False)
    assert model.question_audio(row) is None  # nothing voiced
    # a loud room the gate's speech detector ruled out as speech is trimmed like a quiet one
    fan = 0.05 * np.ones(N, np.float32)
    row = model.init_state(1).rows[0]
    for f, spoken in [*[(fan, False)] * 6, *[(f + fan, True) for f in voice], *[(fan, False)] * 6]:
        row.hear(f, spoken, loud=True, speech=spoken)
    np.testing.assert_array_equal(model.question_audio(row), np.concatenate([fan, fan, fan, *(voice + fan), fan, fan, fan]))


class LoudIsSpeech(SpeechDetector):
    """A speech detector that hears speech in a frame exactly when its RMS is over 0.05, without lag."""

    def __init__(self):
        super().__init__(DetectorConfig(channels=8, dilations=[1], kernel_size=3))

    def stream(self, chunk, state):
        rms = chunk.float().square().mean(dim=1, keepdim=True).sqrt()
        return torch.where(rms > 0.05, 10.0, -10.0).expand(-1, chunk.shape[1] // STREAM_HOP), state


def test_a_click_after_the_question_keeps_the_plan_unless_the_detector_hears_speech_in_it(tokenizer_dir, codec):  # noqa: F811
    """A sound right after the question passes the gate as speech for its onset frames while the detector makes up
    its mind. The planned turn waits for the verdict instead of being dropped: a sound ruled out (a key click) leaves
    the question as it was, and counts as quiet (the turn starts as if it never was); a sound the detector hears as speech is the
    user going on (the plan dropped, the question asked again with it). Without a detector every sound is speech."""
    click, word = room(1, 0.03, 3), room(1, 0.1, 3)  # both over the gate's threshold; the detector hears the second
    question = speech(10, 0)
    for detector, sound, asked in [(LoudIsSpeech(), click, 1), (LoudIsSpeech(), word, 2), (None, click, 2)]:
        duplex = make_duplex(tokenizer_dir)
        duplex.allowed_text[duplex.text_pad] = False
        inner = DuplexSpeechModel(duplex, codec, text_sampling=GREEDY, audio_sampling=GREEDY, speech_detector=detector)
        model = AssistedDuplexModel(inner, FakeSpeech(), AssistConfig(voice="duplex"))
        _, texts, _ = run(model, np.concatenate([question, np.zeros(N, np.float32), sound, np.zeros(15 * N, np.float32)]))
        questions = model.speech.questions
        assert len(questions) == asked and model.turns == 1
        np.testing.assert_array_equal(questions[0], question)
        if asked == 1:
            turn = 12  # the click is frame 11; ruled out, it counts as quiet: the turn starts as if it never was
            assert texts[turn] == {"model": words(model, "the")[0], "user": "hello world"}
            assert all(not isinstance(t, dict) for t in texts[:turn])
        else:
            np.testing.assert_array_equal(questions[1], np.concatenate([question, sound]))  # (the zero frame dropped)


def hear(model, state, audio):
    """Feed ``audio`` to the one row of ``state`` frame by frame, as a step does."""
    for frame in audio.reshape(-1, N):
        model.hear(state, torch.from_numpy(frame)[None])


def words_ids(model, text):
    return [i for w in text.split() for i in model.duplex.lm.tokenizer.encode(" " + w, add_special_tokens=False)]


def test_rows_keep_their_plans_through_joins_and_leaves(tokenizer_dir, codec):  # noqa: F811
    inputs = {name: np.concatenate([speech(8, seed), np.zeros(8 * N, np.float32)]) for seed, name in enumerate("abc")}
    solo: dict = {}
    run_ticks(Scheduler(assisted(tokenizer_dir, codec), use_thread=False, output_seconds=10), {0: [("join", "a")]}, solo, inputs, 16)
    model = assisted(tokenizer_dir, codec)
    crowd: dict = {}
    plan = {0: [("join", "a")], 1: [("join", "b"), ("join", "c")], 6: [("leave", "b")], 9: [("leave", "c")]}
    run_ticks(Scheduler(model, use_thread=False, output_seconds=10), plan, crowd, inputs, 16)
    pcm, texts = drain(crowd["a"])
    solo_pcm, solo_texts = drain(solo["a"])
    assert texts == solo_texts and any(isinstance(t, dict) for t in texts)
    np.testing.assert_allclose(pcm, solo_pcm, atol=1e-4)
    state = model.select_rows(model.init_state(3), [2, 0])
    assert isinstance(state, AssistedState) and state.batch_size == 2 and len(state.rows) == 2


def test_serve_builds_the_assisted_model_from_a_speech_lm_directory(tokenizer_dir, codec, tmp_path):  # noqa: F811
    duplex = make_duplex(tokenizer_dir)
    duplex.save_pretrained(tmp_path / "duplex")
    duplex.lm.add_adapter(AdapterConfig("voice-two", rank=2))
    duplex.lm.save_pretrained(tmp_path / "speech")  # any speech LM on the same codec (here with a second voice)
    codec.save_pretrained(tmp_path / "codec")
    config = dict(model="duplex", lm=str(tmp_path / "duplex"), codec=str(tmp_path / "codec"), device="cpu")
    built = build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), assist_views=2))
    assert isinstance(built, AssistedDuplexModel) and built.generation.asr_views == 2 and built.generation.asr_adapter == "asr"
    assert built.generation.voice == "default"
    # --voice: the assisted replies in another of the speech LM's voices; one it lacks fails at start, in one line
    voiced = build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), voice="two"))
    assert voiced.generation.voice == "two" and voiced.speech.tts_adapter(voiced.generation) == "voice-two"
    with pytest.raises(SpeechLMError, match="no voice 'nope'; it speaks: default, two"):
        build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), voice="nope"))
    with pytest.raises(SpeechLMError, match="must be said by it"):
        build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), assist_voice="duplex", voice="two"))
    assert built.generation.asr_check_rounds == 0  # the transcript check: off unless asked for
    checked = build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), assist_check_rounds=3))
    assert checked.generation.asr_check_rounds == 3 and checked.config.asr_check_rounds == 3
    with pytest.raises(SpeechLMError, match="asr_check_rounds"):
        build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), assist_check_rounds=-1))
    # the speech detector that keeps noise from being heard as a question: vad-en unless told (--assist-speech-detector none)
    assert built.generation.speech_detector == "vad-en" == built.config.speech_detector
    deaf = build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), assist_speech_detector="none"))
    assert deaf.generation.speech_detector is None
    with pytest.raises(SpeechLMError, match="asr_views"):
        build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), assist_views=0))
    state = built.init_state(2)
    for frame in np.concatenate([speech(6, 3), np.zeros(6 * N, np.float32)]).reshape(-1, N):
        pcm, texts, state = built.step(torch.from_numpy(np.stack([frame, frame])), state)
        assert pcm.shape == (2, N) and len(texts) == 2
    alone = build_model(ServerConfig(**config, assist=None))
    assert isinstance(alone, DuplexSpeechModel) and alone.noise_gate is not None and built.config.noise_gate
    # --no-noise-gate: the duplex model alone, and the assist, pass the user's pauses as they are
    assert build_model(ServerConfig(**config, assist=None, noise_gate=False)).noise_gate is None
    # the noise gate's speech detector: vad-en unless told (--gate-detector none), and none without a noise gate
    assert isinstance(alone.speech_detector, SpeechDetector) and isinstance(built.duplex.speech_detector, SpeechDetector)
    assert build_model(ServerConfig(**config, assist=None, gate_detector=None)).speech_detector is None
    assert build_model(ServerConfig(**config, assist=None, noise_gate=False)).speech_detector is None
    assert config_from_args_of([]).gate_detector == "vad-en" and config_from_args_of(["--gate-detector", "none"]).gate_detector is None
    assert not build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), noise_gate=False)).config.noise_gate
    # --dtype: the duplex LM's and the assist's speech LM's (default auto: this machine's fast dtype)
    assert next(built.speech.lm.parameters()).dtype == fast_dtype("cpu")
    full = build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), dtype="float32"))
    assert next(full.speech.lm.parameters()).dtype == torch.float32 and next(full.duplex.lm.parameters()).dtype == torch.float32
    half = build_model(ServerConfig(**config, assist=str(tmp_path / "speech"), dtype="bfloat16"))
    assert next(half.speech.lm.parameters()).dtype == torch.bfloat16 and next(half.duplex.lm.parameters()).dtype == torch.bfloat16
    assert config_from_args_of(["--assist", "none"]).assist is None
    assert config_from_args_of([]).assist == "speechlm-default"
    assert config_from_args_of(["--assist-views", "1"]).assist_views == 1
    assert config_from_args_of(["--voice", "f2"]).voice == "f2" and config_from_args_of([]).voice == "default"
    assert config_from_args_of(["--assist-check-rounds", "3"]).assist_check_rounds == 3
    assert config_from_args_of([]).assist_check_rounds is None
    assert config_from_args_of([]).noise_gate and not config_from_args_of(["--no-noise-gate"]).noise_gate
    with pytest.raises(Exception, match="not found|no such|does not exist|speech LM"):
        build_model(ServerConfig(**config, assist=str(tmp_path / "missing")))


def config_from_args_of(argv: list[str]) -> ServerConfig:
    """``speechlm serve`` arguments -> the ServerConfig they make."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv))


assert TEXTS  # the tokenizer's corpus (imported for the fixture's vocabulary)


def test_the_replys_guidance_is_the_generations_unless_the_config_says(tokenizer_dir, codec):  # noqa: F811
    from speechlm.speech import Generation

    assert assisted(tokenizer_dir, codec).generation.guidance == Generation().guidance
    assert assisted(tokenizer_dir, codec, guidance=0.0).generation.guidance == 0.0


def test_the_question_and_the_reply_text_use_int8_products_and_the_speech_does_not(tokenizer_dir, codec):  # noqa: F811
    seen = {}

    class Recording(FakeSpeech):  # a bfloat16 speech LM on a CPU: what its thread's products are in each call
        def asr(self, audio, sample_rate=16_000, generation=None):
            seen["asr"] = getattr(self.lm._int8_state, "products", None)
            return super().asr(audio, sample_rate, generation)

        def reply_text(self, question, generation=None):
            seen["reply"] = getattr(self.lm._int8_state, "products", None)
            return super().reply_text(question, generation)

        def tts(self, text, stream=True, generation=None):
            seen["tts"] = getattr(self.lm._int8_state, "products", None)
            return super().tts(text, stream, generation)

    user = np.concatenate([speech(10, 0), np.zeros(15 * N, np.float32)])
    for rows in (4, None):
        recording = Recording()
        recording.lm = make_duplex(tokenizer_dir).lm.to(torch.bfloat16)
        seen.clear()
        run(assisted(tokenizer_dir, codec, speech_lm=recording, int8_rows=rows), user)
        assert set(seen) == {"asr", "reply", "tts"} and seen["tts"] is None
        assert (seen["asr"].max_rows if rows else seen["asr"]) == rows and seen["reply"] is seen["asr"]
    with pytest.raises(SpeechLMError, match="int8_rows"):
        AssistConfig(int8_rows=0)


def test_a_question_waiting_goes_before_the_rest_of_another_sessions_reply(tokenizer_dir, codec):  # noqa: F811
    class SlowVoice(FakeSpeech):  # a long reply whose frames take a while: the events in the order they happen
        def __init__(self):
            super().__init__(reply=" ".join(["word"] * 30))  # 60 frames
            self.events: list[str] = []

        def asr(self, audio, sample_rate=16_000, generation=None):
            self.events.append("asr")
            return super().asr(audio, sample_rate, generation)

        def tts(self, text, stream=True, generation=None):
            for frame in super().tts(text, stream, generation):
                time.sleep(0.002)
                self.events.append("frame")
                yield frame

    for ahead in (6, 0):
        voice = SlowVoice()
        model = assisted(tokenizer_dir, codec, background=True, speech_lm=voice, ahead_frames=ahead)
        first = model._submit(speech(8, 7), 0)
        assert first.planned.wait(10)
        while not first.frames:  # the first reply's speech has begun
            time.sleep(0.001)
        second = model._submit(speech(8, 8), 0)
        assert second.done.wait(10) and first.done.wait(10)
        made_before = voice.events[: [i for i, e in enumerate(voice.events) if e == "asr"][1]].count("frame")
        if ahead:  # the second question was heard once the first reply was `ahead` frames ahead, then the rest came
            assert ahead <= made_before < 60
        else:  # the first reply was made whole first
            assert made_before == 60
        assert len(first.frames) == len(second.frames) == 60  # every frame, in order
        np.testing.assert_allclose([f[0] for f in first.frames], [0.1 * (k + 1) for k in range(60)], rtol=1e-6)
        model.close()
    with pytest.raises(SpeechLMError, match="ahead_frames"):
        AssistConfig(ahead_frames=-1)


def test_the_replies_of_several_sessions_are_spoken_as_rows_of_one_batch(tokenizer_dir, codec):  # noqa: F811
    """Three questions at once on the assist thread: each reply joins the running speech batch as soon as it
    is written (ahead_frames 1), each session gets what its reply alone streams, and the three together take
    fewer backbone forwards than one after another."""
    from transformers import LlamaConfig

    from speechlm.lm import SpeechLM, load_tokenizer
    from speechlm.speech import SpeechPipeline

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    backbone = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    lm = SpeechLM.from_backbone(backbone, tokenizer, num_codebooks=Q, codebook_size=C, output_head="parallel_delay",
                                delays=[0] + [1] * (Q - 1), mctp_modules=2, speech_layout="word_aligned", codec_id=codec.codec_id)  # fmt: skip
    with torch.no_grad():  # random heads this small barely depend on their input; make them matter
        for p in (*lm.audio_embedding.parameters(), *lm.audio_head.parameters(), *lm.mctp.parameters()):
            if p.ndim > 1:
                p.mul_(20)
    pipeline = SpeechPipeline(lm.eval(), codec)
    replies = ["hello world", "what is two plus three", "it is five"]

    class Replies(FakeSpeech):  # fixed replies, spoken by the real (tiny) speech LM's streams
        def __init__(self):
            super().__init__()
            self.left, self.streams = list(replies), []

        def reply_text(self, question, generation=None):
            return self.left.pop(0)

        def speech_streams(self, generation):
            self.streams.append(pipeline.speech_streams(generation))
            return self.streams[-1]

        def tts(self, text, stream=True, generation=None):
            return pipeline.tts(text, stream=stream, generation=generation)

    voice = Replies()
    model = assisted(tokenizer_dir, codec, background=True, speech_lm=voice, ahead_frames=1)
    jobs = [model._submit(speech(8, k), 0) for k in range(3)]
    assert all(job.done.wait(30) for job in jobs)
    alone_forwards = 0
    for job, reply in zip(jobs, replies):
        alone = list(pipeline.tts(reply, stream=True, generation=model.generation))
        assert len(job.frames) == len(alone) and np.allclose(np.concatenate(job.frames), np.concatenate(alone), atol=1e-5), reply
        solo = pipeline.speech_streams(model.generation)
        solo.add(reply)
        while solo:
            solo.step()
        alone_forwards += solo.batch.backbone_forwards
    assert len(voice.streams) == 1 and voice.streams[0].batch.backbone_forwards < alone_forwards
    said = [np.concatenate(job.frames) for job in jobs]
    model.close()
    voice = Replies()  # batched_speech=False: one stream per reply, in turn; the same speech
    model = assisted(tokenizer_dir, codec, background=True, speech_lm=voice, ahead_frames=1, batched_speech=False)
    again = [model._submit(speech(8, k), 0) for k in range(3)]
    assert all(job.done.wait(30) for job in again) and not voice.streams
    assert all(np.allclose(a, np.concatenate(b.frames), atol=1e-5) for a, b in zip(said, again))
    model.close()


class BatchedSpeech(FakeSpeech):
    """Hears and answers several questions at once (asr_many / reply_texts); the first call waits for ``go``;
    a question of ``bad_length`` samples is one the speech LM cannot take (its batch fails)."""

    def __init__(self, bad_length=None):
        super().__init__()
        self.go, self.sizes, self.bad_length = threading.Event(), [], bad_length

    def asr_many(self, audios, sample_rate=16_000, generation=None):
        assert self.go.wait(10)
        self.sizes.append(len(audios))
        if any(len(a) == self.bad_length for a in audios):
            raise SpeechLMError("prompt (5000 positions) exceeds the model's limit")
        return [self.asr(a, sample_rate, generation) for a in audios]

    def reply_texts(self, questions, generation=None):
        return [self.reply_text(q, generation) for q in questions]


def test_questions_waiting_together_are_heard_and_answered_as_one_batch(tokenizer_dir, codec, caplog):  # noqa: F811
    voice = BatchedSpeech()
    model = assisted(tokenizer_dir, codec, background=True, speech_lm=voice)
    first = model._submit(speech(8, 1), 0)  # taken up at once; its hearing waits
    time.sleep(0.1)
    rest = [model._submit(speech(8, k), 0) for k in (2, 3, 4)]  # wait together meanwhile
    voice.go.set()
    assert all(job.done.wait(10) for job in [first, *rest])
    assert voice.sizes == [1, 3] and voice.asked == ["hello world"] * 4 and all(len(job.frames) == 8 for job in [first, *rest])
    model.close()
    # a batch the speech LM cannot take is planned again question by question: only the bad one goes unanswered
    voice = BatchedSpeech(bad_length=9 * N)
    model = assisted(tokenizer_dir, codec, background=True, speech_lm=voice)
    jobs = [model._submit(q, 0) for q in (speech(8, 1), speech(9, 2), speech(8, 3))]
    voice.go.set()
    assert all(job.done.wait(10) for job in jobs)
    assert [job.reply for job in jobs] == [FakeSpeech().reply, "", FakeSpeech().reply] and "no answer this turn" in caplog.text
    model.close()


def test_each_session_hears_the_replies_in_its_own_voice(tokenizer_dir, codec):  # noqa: F811
    class Voiced(FakeSpeech):  # a speech LM with a second voice: records the voice each reply is said in
        def __init__(self):
            super().__init__()
            self.said_in = []

        def voices(self):
            return {"default": "its own", "joe": "a voice adapter"}

        def tts(self, text, stream=True, generation=None):
            self.said_in.append(generation.voice)
            return super().tts(text, stream, generation)

    voice = Voiced()
    model = assisted(tokenizer_dir, codec, speech_lm=voice)
    assert model.voices() == ["default", "joe"]
    state = model.configure_rows(model.init_state(2), {1: {"voice": "joe"}})
    assert [row.voice for row in state.rows] == [None, "joe"]
    with pytest.raises(SpeechLMError, match="no voice 'anna'"):
        model.configure_rows(state, {0: {"voice": "anna"}})
    user = np.concatenate([speech(10, 0), np.zeros(15 * N, np.float32)]).reshape(-1, N)
    for frame in user:  # both sessions ask at once; each reply in its session's voice
        _, _, state = model.step(torch.from_numpy(np.stack([frame, frame])), state)
    assert sorted(voice.said_in, key=str) == ["default", "joe"] and model.turns == 2
    state = model.configure_rows(state, {0: {"voice": "joe"}, 1: {"voice": "default"}})  # live sessions change voices
    for frame in np.concatenate([np.zeros((40, N), np.float32), user]):  # the next replies are said in the new ones
        _, _, state = model.step(torch.from_numpy(np.stack([frame, frame])), state)
    assert model.turns == 4 and voice.said_in[2:] == ["joe", "default"]
    state = model.reset_rows(state, [1])  # a new session in that row: the default voice again
    assert state.rows[1].voice is None
    assert assisted(tokenizer_dir, codec, speech_lm=voice, voice="duplex").voices() == ["default"]


class AnySpeech(FakeSpeech):
    """Speaks any text: two frames a word, every frame of the n-th text asked at level 0.1 * n."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spoken: list[str] = []

    def tts(self, text, stream=True, generation=None):
        self.spoken.append(text)
        level = 0.1 * len(self.spoken)
        return (np.full(N, level, np.float32) for _ in range(2 * len(text.split())))


def ticks(model, state, user: np.ndarray, says: dict[int, list] | None = None):
    """Step the one row through ``user`` (frames), handing ``says[t]`` to the model before tick t; the PCM's
    first sample per frame, the texts, and the say events by tick."""
    levels, texts, events = [], [], {}
    for t, frame in enumerate(user.reshape(-1, N)):
        if says and t in says:
            state = model.say_rows(state, {0: says[t]})
        out, pieces, state = model.step(torch.from_numpy(frame)[None], state)
        levels.append(round(float(out[0, 0]), 3))
        piece = without_user_events(pieces[0])
        texts.append(piece)
        if isinstance(piece, dict) and "events" in piece:
            events[t] = [(e["id"], e["event"]) for e in piece["events"]]
    return levels, texts, events, state


def test_a_say_is_said_once_the_user_is_quiet_and_its_events_follow_its_frames(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, mute=True, speech_lm=AnySpeech())
    state = model.init_state(1)
    levels, texts, events, state = ticks(model, state, np.zeros(20 * N, np.float32), {0: [("Hello there.", "greet")]})
    # said at once (nobody talks), two frames a word, its words the duplex model's text; done after its last frame
    assert model.speech.spoken == ["Hello there."] and levels[:5] == [0.1, 0.1, 0.1, 0.1, 0.0] and max(levels[5:]) == 0
    said = "".join(t["model"] if isinstance(t, dict) else t or "" for t in texts)
    assert said == "".join(words(model, "Hello there")) and texts[0]["model"] == words(model, "Hello")[0]
    assert events == {0: [("greet", "started")], 4: [("greet", "done")]}
    assert model.turns == 1 and state.rows[0].job is None and model.speech.asked == []  # the turn ended (10 quiet frames)


def test_replies_written_by_the_client_the_question_goes_out_and_says_join_the_reply(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, mute=True, speech_lm=AnySpeech())
    state = model.configure_rows(model.init_state(1), {0: {"replies": "client"}})
    user = np.concatenate([speech(8, 4), np.zeros(40 * N, np.float32)])
    # a say while the user talks (tick 2) waits until they are quiet; two more while it is said join it
    levels, texts, events, state = ticks(model, state, user, {2: [("One two.", 1)], 12: [("Three.", 2), ("...", 3)]})
    # the question's transcript goes out when the duplex model takes its turn (3 quiet frames); no reply is written
    assert texts[10]["user"] == "hello world" and len(model.speech.questions) == 1 and model.speech.asked == []
    assert levels[:10] == [0.0] * 10 and levels[10:14] == [0.1] * 4  # the waiting say, at once
    assert levels[14:18] == [0.0] * 4 and levels[18:20] == [0.2] * 2 and max(levels[20:]) == 0  # the pause, the next say
    assert model.speech.spoken == ["One two.", "Three."] and model.turns == 1
    assert events == {10: [(1, "started")], 14: [(1, "done")], 18: [(2, "started")], 20: [(2, "done"), (3, "dropped")]}


def test_a_say_talked_over_is_interrupted_and_the_next_ones_are_dropped(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, mute=True, end_frames=5, speech_lm=AnySpeech())
    state = model.configure_rows(model.init_state(1), {0: {"replies": "client"}})
    user = np.concatenate([np.zeros(4 * N, np.float32), speech(20, 6), np.zeros(20 * N, np.float32)])
    says = {0: [("one two three four five six seven eight.", "a"), ("nine ten.", "b")]}
    levels, texts, events, state = ticks(model, state, user, says)
    assert levels[:4] == [0.1] * 4 and max(levels[4:]) == 0  # paused at the user's first frame, then dropped
    assert events[0] == [("a", "started")] and [e for t in sorted(events) if t > 0 for e in events[t]] == [("a", "interrupted"), ("b", "dropped")]
    assert [t for t in texts if isinstance(t, dict) and "user" in t][0]["user"] == "hello world"  # the interruption: a question

    # a model that does not speak in the speech LM's voice cannot say texts; a session's replies are "model" or "client"
    duplex_voice = assisted(tokenizer_dir, codec, voice="duplex")
    assert not duplex_voice.can_say()
    with pytest.raises(SpeechLMError, match="speech LM's voice"):
        duplex_voice.say_rows(duplex_voice.init_state(1), {0: [("hi", None)]})
    with pytest.raises(SpeechLMError, match="speech LM's voice"):
        duplex_voice.configure_rows(duplex_voice.init_state(1), {0: {"replies": "client"}})
    with pytest.raises(SpeechLMError, match="replies must be one of model, client"):
        model.configure_rows(model.init_state(1), {0: {"replies": "robot"}})


def test_says_in_the_background_go_on_as_more_come(tokenizer_dir, codec):  # noqa: F811
    """On the assist thread (the server): a say that comes after the speech of the ones before is all made, but before
    the turn is over, is spoken after them in the same turn."""
    model = assisted(tokenizer_dir, codec, mute=True, background=True, speech_lm=AnySpeech())
    state = model.say_rows(model.init_state(1), {0: [("One.", 1)]})
    quiet = torch.zeros(1, N)
    levels, got = [], {}
    for t in range(30):
        if t == 1:
            job = state.rows[0].job
            assert job.done.wait(10)  # the first say's speech is all made
            state = model.say_rows(state, {0: [("Two three.", 2)]})
        if t > 1:
            for _ in range(100):  # let the thread make the next frames
                if state.rows[0].job is None or state.rows[0].job.frames or state.rows[0].job.done.is_set():
                    break
                time.sleep(0.01)
        out, pieces, state = model.step(quiet, state)
        levels.append(round(float(out[0, 0]), 3))
        if isinstance(pieces[0], dict):
            got.update({e["id"]: got.get(e["id"], []) + [e["event"]] for e in pieces[0].get("events", [])})
    model.close()
    assert got == {1: ["started", "done"], 2: ["started", "done"]} and model.turns == 1
    # (the first frame is made on the thread while tick 0 runs: it may be ready for tick 0 or tick 1)
    s = levels.index(0.1)
    assert s <= 1 and max(levels[:s], default=0) == 0, levels
    assert levels[s : s + 2] == [0.1, 0.1] and levels[s + 2 : s + 6] == [0.0] * 4 and levels[s + 6 : s + 10] == [0.2] * 4, levels
    assert max(levels[s + 10 :]) == 0


class FailingSpeech(AnySpeech):
    """Its speech fails on a text with "boom" in it."""

    def tts(self, text, stream=True, generation=None):
        if "boom" in text:
            raise SpeechLMError("text too long for the speech LM")
        return super().tts(text, stream, generation)


def test_a_say_whose_speech_fails_is_dropped_and_the_next_is_said(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, mute=True, speech_lm=FailingSpeech())
    levels, _, events, _ = ticks(model, model.init_state(1), np.zeros(20 * N, np.float32), {0: [("boom boom.", "a"), ("Fine.", "b")]})
    assert events == {0: [("a", "dropped"), ("b", "started")], 2: [("b", "done")]} and levels[:3] == [0.1, 0.1, 0.0]


def test_the_client_stops_the_reply_and_the_says_waiting(tokenizer_dir, codec):  # noqa: F811
    """hush_rows (CONTROL interrupt with reply): the turn ends at once, its say interrupted, the ones waiting dropped."""
    model = assisted(tokenizer_dir, codec, mute=True, speech_lm=AnySpeech())
    state = model.say_rows(model.init_state(1), {0: [("one two three four five.", "a")]})
    quiet = np.zeros(N, np.float32)
    levels, _, events, state = ticks(model, state, np.tile(quiet, 3))
    state = model.say_rows(state, {0: [("six.", "b")]})  # joins the turn
    state.rows[0].says.append(_Say("seven.", "later"))  # one waiting for a turn of its own
    state = model.hush_rows(state, [0])
    more, _, after, state = ticks(model, state, np.tile(quiet, 15))
    assert levels == [0.1] * 3 and max(more) == 0 and state.rows[0].job is None and not state.rows[0].in_turn
    assert events == {0: [("a", "started")]} and after == {0: [("a", "interrupted"), ("b", "dropped"), ("later", "dropped")]}


class RoundsSpeech(BatchedSpeech):
    """Records each batch's size and the transcript check's rounds it was heard with."""

    def __init__(self):
        super().__init__()
        self.go.set()
        self.heard_with: list[tuple[int, int]] = []

    def asr_many(self, audios, sample_rate=16_000, generation=None):
        self.heard_with.append((len(audios), generation.asr_check_rounds))
        return super().asr_many(audios, sample_rate, generation)


def test_a_session_chooses_its_transcript_check_and_questions_are_heard_in_batches_by_it(tokenizer_dir, codec):  # noqa: F811
    voice = RoundsSpeech()
    model = assisted(tokenizer_dir, codec, speech_lm=voice)
    state = model.configure_rows(model.init_state(3), {1: {"check_rounds": 3, "replies": "client"}})
    jobs = [model._submit(speech(8, k), 0, check_rounds=state.rows[k].check_rounds) for k in range(3)]  # inline: one each
    assert voice.heard_with == [(1, 0), (1, 3), (1, 0)] and [j.transcript for j in jobs] == ["hello world"] * 3
    voice.heard_with.clear()
    model._plan([_Job(speech(8, k), 0, check_rounds=r) for k, r in ((0, None), (1, 3), (2, None), (3, 3))])
    assert voice.heard_with == [(2, 0), (2, 3)]  # questions waiting together: one batch per check
    with pytest.raises(SpeechLMError, match="check_rounds must be an integer from 0 to 5"):
        model.configure_rows(state, {0: {"check_rounds": 9}})


def test_the_clients_question_goes_out_even_if_the_duplex_model_never_takes_the_turn(tokenizer_dir, codec):  # noqa: F811
    model = assisted(tokenizer_dir, codec, talkative=False, mute=True)
    model.duplex.lm.allowed_text[:] = False
    model.duplex.lm.allowed_text[model.pad] = True  # this duplex model never wants to speak
    state = model.configure_rows(model.init_state(1), {0: {"replies": "client"}})
    _, texts, _, _ = ticks(model, state, np.concatenate([speech(8, 11), np.zeros(15 * N, np.float32)]))
    sent = [t for t, piece in enumerate(texts) if isinstance(piece, dict) and "user" in piece]
    assert sent == [17] and texts[17]["user"] == "hello world"  # after end_frames (10) quiet frames
    assert model.speech.asked == [] and model.turns == 0
