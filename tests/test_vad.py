"""The speech detector (speechlm.vad): causal frames, save/load, the training labels and noises, exact resume,
and the shipped vad-en keeping noise from the ASR while letting speech through."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.codec.audio import SAMPLE_RATE
from speechlm.codec.errors import SpeechLMError
from speechlm.training.espeak import Espeak
from speechlm.training.vad_train import FRAME, HELD_OUT_NOISES, TRAIN_NOISES, VadTrainConfig, VadTrainer, noise, speech_frames
from speechlm.vad import DetectorConfig, SpeechDetector

torch.set_num_threads(1)
TINY = {"channels": 16, "dilations": [1, 2], "kernel_size": 3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("vad-corpus")
    (root / "audio").mkdir()
    rows = []
    for i, (text, voice) in enumerate([("Hello world.", "en-us"), ("Set a timer for ten minutes.", "en-gb"), ("Please call my sister.", "en-us+f3")]):
        result = Espeak.instance().synthesize(text, voice)
        sf.write(root / "audio" / f"{i}.flac", result.audio, result.sample_rate)
        rows.append({"id": str(i), "text": text, "audio": f"audio/{i}.flac", "voice": f"espeak:{voice}"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_frames_are_causal_and_their_count_known():
    model = SpeechDetector(DetectorConfig(**TINY)).eval()
    audio = torch.randn(1, 2 * SAMPLE_RATE) * 0.1
    with torch.no_grad():
        whole = model(audio)
        prefix = model(audio[:, :SAMPLE_RATE])
    assert whole.shape == (1, SpeechDetector.frames(2 * SAMPLE_RATE, model.config)) == (1, 100)
    exact = (SAMPLE_RATE - 360) // FRAME + 1  # frames whose audio (their STFT windows' too) ends inside the prefix
    torch.testing.assert_close(prefix[:, :exact], whole[:, :exact], rtol=1e-5, atol=1e-5)
    probs = model.probabilities([audio[0, :8000].numpy(), audio[0].numpy()])
    assert [len(p) for p in probs] == [25, 100] and all(((p >= 0) & (p <= 1)).all() for p in probs)


def test_frame_by_frame_equals_offline_for_rows_that_start_apart():
    """Chunk by chunk (the server's speech gate), each row's frames equal the offline frames of its own stream, for
    rows starting together, one reset mid-way (a new session in its place) and chunks of 640 or 320 samples."""
    model = SpeechDetector(DetectorConfig(channels=16, dilations=[1, 2, 4], kernel_size=5)).eval()
    rng = np.random.default_rng(3)
    audio = torch.from_numpy((rng.standard_normal((2, 40 * 640)) * [[0.1], [0.01]]).astype(np.float32))
    for chunk in (640, 320):
        state, got = model.init_stream(2), []
        restart = 13 * 640  # row 1's stream starts again here
        with torch.inference_mode():
            for start in range(0, audio.shape[1], chunk):
                if start == restart:
                    state.reset_rows([1])
                logits, state = model.stream(audio[:, start : start + chunk], state)
                assert logits.shape == (2, chunk // 320)
                got.append(logits)
            got = torch.cat(got, dim=1)  # (2, 80): frames -1 .. 78 of each row's stream
            whole = model(audio)
            again = model(audio[1:, restart:])
        assert torch.isinf(got[:, 0]).all() and (got[:, 0] < 0).all()  # frame -1 of a stream: none, probability 0
        torch.testing.assert_close(got[0, 1:], whole[0, :79], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1, 1 : restart // 320], whole[1, : restart // 320 - 1], rtol=1e-4, atol=1e-4)
        after = got[1, restart // 320 :]
        assert torch.isinf(after[0]) and after[0] < 0
        torch.testing.assert_close(after[1:], again[0, : len(after) - 1], rtol=1e-4, atol=1e-4)
    with pytest.raises(SpeechLMError, match="multiple of 320"):
        model.stream(torch.zeros(2, 500), model.init_stream(2))


def test_save_load_gives_the_same_probabilities(tmp_path):
    model = SpeechDetector(DetectorConfig(**TINY, threshold=0.4)).eval()
    model.save_pretrained(tmp_path / "d")
    loaded = SpeechDetector.from_pretrained(tmp_path / "d")
    audio = [np.random.default_rng(0).standard_normal(12000).astype(np.float32) * 0.1]
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.probabilities(audio)[0], model.probabilities(audio)[0])
    with pytest.raises(SpeechLMError, match="no speech detector"):
        SpeechDetector.from_pretrained(tmp_path)


def test_labels_follow_the_clean_speech():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    clean = np.zeros(3 * SAMPLE_RATE, np.float32)
    clean[SAMPLE_RATE: 2 * SAMPLE_RATE] = 0.3 * np.sin(2 * np.pi * 220 * t)
    clean[SAMPLE_RATE + 8000: SAMPLE_RATE + 8000 + 1600] = 0  # a 100 ms stop inside: closed
    labels = speech_frames(clean)
    assert labels.shape == (150,) and labels[50:100].all()
    assert labels[49] and labels[100] and not labels[:48].any() and not labels[102:].any()  # a frame added at each end
    assert not speech_frames(np.zeros(SAMPLE_RATE, np.float32)).any()


def test_noises_have_unit_level_and_unknown_kinds_fail():
    rng = np.random.default_rng(0)
    for kind in TRAIN_NOISES + HELD_OUT_NOISES:
        y = noise(kind, SAMPLE_RATE, rng)
        assert y.dtype == np.float32 and np.isfinite(y).all() and np.sqrt(np.mean(y**2)) == pytest.approx(1.0, rel=1e-3), kind
    with pytest.raises(SpeechLMError, match="unknown noise"):
        noise("waves", 100, rng)


def test_training_resumes_exactly_and_learns(corpus, tmp_path):
    config = VadTrainConfig(data=[str(corpus)], out=str(tmp_path / "run"), held_out=1, steps=80, batch_size=8, crop_seconds=1.0,
                            lr=5e-3, warmup_steps=5, eval_every=1000, threads=1, model=TINY)
    first = VadTrainer(config)
    assert len(first.train_clips) == 2 and len(first.held_clips) == 1
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    expected = first.train_step()
    resumed = VadTrainer(config)
    assert resumed.step == 3 and resumed.train_step() == pytest.approx(expected, rel=1e-6)
    first.train(progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 76 and np.mean(losses[-20:]) < 0.85 * np.mean(losses[:10])  # it learns (the first 4 steps ran outside train())
    assert SpeechDetector.from_pretrained(tmp_path / "run" / "model").config == first.model.config
    with pytest.raises(SpeechLMError, match="not a synth corpus"):
        VadTrainer(VadTrainConfig(data=[str(tmp_path)], out=str(tmp_path / "bad")))


def test_the_shipped_detector_hears_speech_and_not_noise():
    detector = SpeechDetector.from_pretrained("vad-en")
    rng = np.random.default_rng(1)
    speech = [Espeak.instance().synthesize(text, voice).audio for text, voice in
              [("What is two plus three?", "en-us+m7"), ("Open the window, please.", "en-gb+f4")]]  # held-out variants
    noises = [noise(kind, 3 * SAMPLE_RATE, rng) * 0.05 for kind in ("white", "hum", "tone", "clicks", "music", "sweep")]
    assert detector.has_speech(speech) == [True, True]
    assert detector.has_speech(noises) == [False] * len(noises)
    quiet_in_noise = [s * 0.1 + noise("pink", len(s), rng) * 0.003 for s in speech]  # -50 dBFS-ish speech, 10 dB over pink noise
    assert detector.has_speech(quiet_in_noise) == [True, True]
