"""Speed perturbation of a synth corpus (training/perturb.py, `speechlm data perturb`)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from speechlm.cli import main
from speechlm.codec.audio import SAMPLE_RATE, load_audio, save_audio
from speechlm.codec.errors import SpeechLMError
from speechlm.training.perturb import draw_factor, perturb_corpus, speed_perturb


def tone(hz: float, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(audio))


def make_corpus(root, rows=3):
    manifest = []
    for i in range(rows):
        rel = f"audio/shard-00000/u{i}.flac"
        save_audio(root / rel, tone(200.0, 1.0), SAMPLE_RATE)
        manifest.append({"id": f"u{i}", "text": "one two", "audio": rel, "sample_rate": SAMPLE_RATE, "duration": 1.0,
                         "voice": "espeak:en-us+m1", "voice_split": "train", "split": "train",
                         "words": [{"word": "one", "start": 0.0, "end": 0.5}, {"word": "two", "start": 0.5, "end": 1.0}]})
    manifest.append({**manifest[0], "id": "held-out", "split": "test"})
    manifest.append({**manifest[0], "id": "held-out-voice", "voice_split": "test"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    return root


def test_speed_perturb_shortens_and_raises_pitch():
    y = speed_perturb(tone(200.0, 2.0), 1.1)
    assert abs(len(y) - 2.0 * SAMPLE_RATE / 1.1) <= 2
    assert peak_hz(y) == pytest.approx(220.0, abs=2.0)
    assert abs(len(speed_perturb(tone(200.0, 2.0), 0.9)) - 2.0 * SAMPLE_RATE / 0.9) <= 2
    with pytest.raises(SpeechLMError, match="> 0"):
        speed_perturb(tone(200.0, 0.1), 0.0)


def test_factors_keep_away_from_one():
    rng = random.Random(0)
    factors = [draw_factor(rng, (0.9, 1.1), 0.03) for _ in range(500)]
    assert all(0.9 <= f <= 1.1 and abs(f - 1) >= 0.03 for f in factors)
    assert draw_factor(rng, (1.05, 1.05), 0.03) == 1.05
    with pytest.raises(SpeechLMError, match="speed range"):
        draw_factor(rng, (1.2, 1.1), 0.03)


def test_perturb_corpus_rows_audio_words_and_resume(tmp_path):
    src = make_corpus(tmp_path / "src")
    s = perturb_corpus(src, tmp_path / "out", speeds=(0.8, 1.2), seed=3)
    assert s.rows == 3 and s.skipped == 2  # the held-out text and the held-out voice stay out
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        f = row["perturb"]["speed"]
        assert row["voice"].startswith("espeak:en-us+m1@speed") and row["perturb"]["source"] in {"u0", "u1", "u2"}
        audio = load_audio(tmp_path / "out" / row["audio"])
        assert abs(len(audio) / SAMPLE_RATE - 1.0 / f) < 0.01 and row["duration"] == pytest.approx(1.0 / f, abs=0.01)
        assert row["words"][1]["start"] == pytest.approx(0.5 / f, abs=1e-3) and row["words"][1]["end"] == pytest.approx(1.0 / f, abs=1e-3)
        assert peak_hz(audio) == pytest.approx(200.0 * f, abs=3.0)
    # a second run (resume) writes the same manifest; a seeded sample picks a subset
    before = (tmp_path / "out" / "manifest.jsonl").read_text()
    perturb_corpus(src, tmp_path / "out", speeds=(0.8, 1.2), seed=3)
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == before
    assert perturb_corpus(src, tmp_path / "few", count=2, seed=3).rows == 2


def test_perturb_bad_input(tmp_path, capsys):
    src = make_corpus(tmp_path / "src")
    with pytest.raises(SpeechLMError, match="new directory"):
        perturb_corpus(src, src)
    with pytest.raises(SpeechLMError, match="manifest not found"):
        perturb_corpus(tmp_path / "missing", tmp_path / "out")
    only_test = tmp_path / "t"
    only_test.mkdir()
    (only_test / "manifest.jsonl").write_text(json.dumps({"id": "x", "audio": "a.flac", "split": "test"}) + "\n")
    with pytest.raises(SpeechLMError, match="no training rows"):
        perturb_corpus(only_test, tmp_path / "out")
    with pytest.raises(SystemExit):
        main(["data", "perturb", str(src), "--out", str(tmp_path / "o"), "--speed", "1.2,0.9"])
    assert "0 < MIN <= MAX" in capsys.readouterr().err
    assert main(["data", "perturb", str(src), "--out", str(tmp_path / "o"), "--speed", "0.9,1.1", "--count", "1"]) == 0
    assert "1 perturbed utterances" in capsys.readouterr().out
