"""Room augmentation of a synth corpus (training/rooms.py, `speechlm data rooms`)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the perturbation tests' corpus
from test_perturb import make_corpus, tone  # noqa: E402

from speechlm.cli import main  # noqa: E402
from speechlm.codec.audio import PEAK_LEVEL, SAMPLE_RATE, load_audio  # noqa: E402
from speechlm.codec.errors import SpeechLMError  # noqa: E402
from speechlm.training.rooms import NOISES, RoomConfig, active_rms, colored_noise, in_a_room, room_corpus  # noqa: E402


def band_power(x: np.ndarray, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum())


def test_noises_have_unit_rms_and_their_colour():
    rng = np.random.default_rng(0)
    n = 4 * SAMPLE_RATE
    noise = {kind: colored_noise(n, kind, rng) for kind in NOISES}
    for y in noise.values():
        assert y.dtype == np.float32 and len(y) == n and np.sqrt(np.mean(y.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-3)
    # low (100-400 Hz) over high (3.2-6.4 kHz) band power per Hz: white ~1, pink ~ the bands' frequency ratio, brown its square
    tilt = {kind: (band_power(y, 100, 400) / 300) / (band_power(y, 3200, 6400) / 3200) for kind, y in noise.items()}
    assert 0.7 < tilt["white"] < 1.4
    assert 5 < tilt["pink"] < 60 < tilt["brown"]
    hum = noise["hum"]
    assert band_power(hum, 45, 65) > 0.3 * band_power(hum, 0, SAMPLE_RATE / 2)  # mains dominates
    with pytest.raises(SpeechLMError, match="unknown noise"):
        colored_noise(10, "violet", rng)
    assert len(colored_noise(0, "white", rng)) == 0


def test_in_a_room_lead_tail_level_and_snr():
    speech = tone(300.0, 1.0)
    config = RoomConfig(lead=(0.5, 0.5), lead_share=1.0, tail=(0.25, 0.25), noise_share=1.0, snr_db=(20.0, 20.0), noises=("white",))
    y, drawn = in_a_room(speech, config, random.Random(0))
    assert drawn["lead"] == 0.5 and drawn["tail"] == 0.25 and drawn["noise"] == "white" and drawn["snr_db"] == 20.0
    assert len(y) == int(1.75 * SAMPLE_RATE) and float(np.abs(y).max()) == pytest.approx(PEAK_LEVEL, rel=1e-5)
    lead, body = y[: SAMPLE_RATE // 2], y[SAMPLE_RATE // 2 : 3 * SAMPLE_RATE // 2]
    noise_rms = float(np.sqrt(np.mean(lead.astype(np.float64) ** 2)))
    assert 20 * np.log10(active_rms(body) / noise_rms) == pytest.approx(20.0, abs=0.5)  # the room is under the speech at the SNR drawn
    # the other kinds of speechlm.training.noises (music, typing, held-out rain) at the same SNR
    placed = np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), speech, np.zeros(SAMPLE_RATE // 4, np.float32)])
    for kind in ("music", "clicks", "rain"):
        y, drawn = in_a_room(speech, RoomConfig(**{**config.__dict__, "noises": (kind,)}), random.Random(0))
        assert drawn["noise"] == kind
        scale = float(y @ placed / (placed @ placed))  # the peak normalization's gain (the noise is uncorrelated with the tone)
        room = y - scale * placed
        assert 20 * np.log10(active_rms(scale * speech) / np.sqrt(np.mean(np.square(room)))) == pytest.approx(20.0, abs=0.5)
    # no room: digital silence at the edges, the speech itself unchanged but for the level
    quiet, drawn = in_a_room(speech, RoomConfig(lead=(0.2, 0.2), lead_share=1.0, tail=(0.0, 0.0), noise_share=0.0), random.Random(0))
    assert drawn["noise"] is None and not quiet[: int(0.2 * SAMPLE_RATE)].any()
    np.testing.assert_allclose(quiet[int(0.2 * SAMPLE_RATE) :], speech * (PEAK_LEVEL / np.abs(speech).max()), atol=1e-6)
    # digital silence in: no noise can be scaled to it, nothing breaks
    silent, drawn = in_a_room(np.zeros(1000, np.float32), RoomConfig(noise_share=1.0), random.Random(0))
    assert drawn["noise"] is None and not silent.any()


def test_room_corpus_rows_audio_words_and_resume(tmp_path):
    src = make_corpus(tmp_path / "src")
    config = RoomConfig(lead=(0.3, 0.6), lead_share=1.0)
    s = room_corpus(src, tmp_path / "out", config=config, seed=3)
    assert s.rows == 3 and s.skipped == 2  # the held-out text and the held-out voice stay out
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        room = row["room"]
        assert row["voice"] == "espeak:en-us+m1@room" and room["source"] in {"u0", "u1", "u2"} and row["id"] == room["source"] + "-room"
        assert 0.3 <= room["lead"] <= 0.6 and 0 <= room["tail"] <= 0.6
        audio = load_audio(tmp_path / "out" / row["audio"])
        assert row["duration"] == pytest.approx(1.0 + room["lead"] + room["tail"], abs=1e-3) == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-3)
        assert row["words"][1]["start"] == pytest.approx(0.5 + room["lead"], abs=1e-3) and row["words"][1]["end"] == pytest.approx(1.0 + room["lead"], abs=1e-3)
    assert json.loads((tmp_path / "out" / "room_config.json").read_text())["lead"] == [0.3, 0.6]
    # a second run (resume) writes the same manifest; a seeded sample picks a subset; another seed draws other rooms
    before = (tmp_path / "out" / "manifest.jsonl").read_text()
    room_corpus(src, tmp_path / "out", config=config, seed=3)
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == before
    assert room_corpus(src, tmp_path / "few", count=2, seed=3).rows == 2
    other = room_corpus(src, tmp_path / "other", config=config, seed=4)
    assert other.rows == 3 and (tmp_path / "other" / "manifest.jsonl").read_text() != before


def test_rooms_bad_input(tmp_path, capsys):
    src = make_corpus(tmp_path / "src")
    with pytest.raises(SpeechLMError, match="new directory"):
        room_corpus(src, src)
    with pytest.raises(SpeechLMError, match="manifest not found"):
        room_corpus(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(SpeechLMError, match="lead range"):
        RoomConfig(lead=(1.0, 0.5))
    with pytest.raises(SpeechLMError, match="noise_share"):
        RoomConfig(noise_share=1.5)
    with pytest.raises(SpeechLMError, match="noises must be"):
        RoomConfig(noises=("white", "violet"))
    with pytest.raises(SystemExit):
        main(["data", "rooms", str(src), "--out", str(tmp_path / "o"), "--snr-db", "30,10"])
    assert "MIN <= MAX" in capsys.readouterr().err
    assert main(["data", "rooms", str(src), "--out", str(tmp_path / "o"), "--noises", "pink,hum", "--count", "1"]) == 0
    assert "1 utterances in a room" in capsys.readouterr().out
    assert main(["data", "rooms", str(src), "--out", str(tmp_path / "o2"), "--noises", "violet"]) != 0
    assert "noises must be" in capsys.readouterr().err
