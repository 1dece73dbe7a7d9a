"""What ASR hears (speechlm.speech.hearing_audio): a long quiet start or end is cut short, the room's
steady noise heard there is suppressed under the speech, and audio that starts at once is untouched."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the ASR-view tests' tiny model
from test_asr_views import C, model  # noqa: E402, F401  (fixture)

from speechlm import speech
from speechlm.codec.audio import sound_span, split_at_pauses, trim_quiet_edges
from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.denoise import spectral_denoise
from speechlm.speech import Generation, SpeechPipeline, hearing_audio

SR = 16_000


def voice(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A voiced sound that starts at once: a 180 Hz tone with a syllable-rate envelope."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    return (0.5 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 1)))).astype(np.float32)


def quiet(seconds: float, rms: float = 0.0, seed: int = 1) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def test_the_quiet_edges_are_cut_short_and_a_prompt_start_is_kept():
    speech = voice()
    np.testing.assert_array_equal(trim_quiet_edges(speech), speech)
    np.testing.assert_array_equal(hearing_audio(speech), speech)
    padded = np.concatenate([quiet(0.5), speech, quiet(0.5)])
    assert sound_span(padded) == (int(0.5 * SR), int(1.5 * SR))
    cut = trim_quiet_edges(padded)  # 20 ms kept before the sound, 100 ms after
    np.testing.assert_array_equal(cut, padded[int(0.48 * SR) : int(1.6 * SR)])
    short = np.concatenate([quiet(0.04), speech, quiet(0.1)])  # edges short enough stay
    np.testing.assert_array_equal(trim_quiet_edges(short), short)
    assert sound_span(quiet(0.3)) is None and len(trim_quiet_edges(quiet(0.3))) == int(0.3 * SR)


def test_the_rooms_noise_heard_before_the_speech_is_suppressed_under_it():
    room, speech = quiet(2.5, 0.003, 2), voice(1.5)
    noisy = speech + room[int(0.5 * SR) : int(2.0 * SR)]
    out = spectral_denoise(np.concatenate([room[: int(0.5 * SR)], noisy]), room[: int(0.5 * SR)])
    assert out.shape == (int(2.0 * SR),) and out.dtype == np.float32
    quiet_part, speech_part = out[: int(0.5 * SR)], out[int(0.5 * SR) :]
    assert np.sqrt(np.mean(quiet_part**2)) < 0.2 * 0.003  # the room alone: down by more than 14 dB
    err_before = np.sqrt(np.mean((noisy - speech) ** 2))
    err_after = np.sqrt(np.mean((speech_part - speech) ** 2))
    assert err_after < 0.7 * err_before  # closer to the clean speech than the noisy input was
    np.testing.assert_array_equal(spectral_denoise(noisy, quiet(0.5)), noisy)  # digital silence: no noise to take out
    recorded = np.concatenate([room[: int(0.5 * SR)], noisy, room[int(2.0 * SR) :]])
    heard = hearing_audio(recorded)
    assert int(1.5 * SR) < len(heard) < int(1.65 * SR)  # 20 ms before the speech, 100 ms after it
    assert np.sqrt(np.mean(heard[: int(0.015 * SR)] ** 2)) < 0.003  # the lead kept is the room suppressed


def test_asr_hears_a_late_start_as_a_prompt_one(model, hears_any_sound):  # noqa: F811
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    pipeline = hears_any_sound(SpeechPipeline(model, codec))
    heard = []
    transcribe = pipeline.transcribe_views
    pipeline.transcribe_views = lambda views, g: heard.append(views[0]) or transcribe(views, g)
    speech = voice(0.8)
    g = Generation(max_text_tokens=6, asr_views=2)
    prompt = pipeline.asr(speech, generation=g)
    late = pipeline.asr(np.concatenate([quiet(0.5), speech]), generation=g)
    assert len(heard[1]) == len(heard[0]) + int(0.02 * SR)  # only 20 ms of the half second before it
    np.testing.assert_allclose(heard[1][int(0.02 * SR) :], heard[0], atol=1e-6)
    assert isinstance(late, str) and isinstance(prompt, str)
    as_is = pipeline.asr(np.concatenate([quiet(0.5), speech]), generation=Generation(max_text_tokens=6, asr_views=2, asr_edges=False))
    assert isinstance(as_is, str) and len(heard[2]) == len(speech) + int(0.5 * SR)


@pytest.mark.parametrize("n", [0, 100, 511])
def test_short_inputs_pass(n):
    audio = quiet(n / SR, 0.01)
    np.testing.assert_array_equal(spectral_denoise(audio, quiet(0.5, 0.01)), audio)
    assert len(hearing_audio(audio)) == n


def test_a_recording_is_cut_at_its_pauses_into_pieces_that_start_with_their_first_sound():
    def seconds(pieces):
        return [(round(s / SR, 2), round(e / SR, 2)) for s, e in pieces]

    a, b, c = voice(1.0, 1), voice(1.5, 2), voice(0.8, 3)
    audio = np.concatenate([quiet(0.3), a, quiet(0.5), b, quiet(0.2), c, quiet(0.4)])
    # one cut, at the half-second pause (the 0.2 s one is a breath inside a sentence); each piece from its
    # first sound to 20 ms after its last
    assert seconds(split_at_pauses(audio, pause_s=0.3)) == [(0.3, 1.32), (1.8, 4.32)]
    assert seconds(split_at_pauses(audio, pause_s=0.15)) == [(0.3, 1.32), (1.8, 3.32), (3.5, 4.32)]
    # a piece over max_seconds is cut again at its longest pause, a pause-less one at its quietest point
    assert seconds(split_at_pauses(audio, pause_s=1.0, max_seconds=3.0)) == [(0.3, 1.32), (1.8, 4.32)]
    assert seconds(split_at_pauses(audio, pause_s=1.0, max_seconds=2.0)) == [(0.3, 1.32), (1.8, 3.32), (3.5, 4.32)]
    long = np.concatenate([quiet(0.5), voice(2.0, 4), 0.05 * voice(0.1, 5), voice(2.0, 6), quiet(0.5)])
    ((s0, e0), (s1, e1)) = split_at_pauses(long, max_seconds=3.0)
    assert s0 == int(0.5 * SR) and e1 == int(4.62 * SR) and int(2.5 * SR) <= s1 <= int(2.6 * SR) and e0 >= s1  # cut in the dip
    # a room's noise under the pauses: still pauses
    noisy = audio + quiet(len(audio) / SR, 0.003, seed=7)
    assert [s for s, _ in seconds(split_at_pauses(noisy))] == [0.3, 1.8]
    assert split_at_pauses(quiet(2.0, 0.003)) == [] and split_at_pauses(np.zeros(0, np.float32)) == []
    assert split_at_pauses(voice(0.5)) == [(0, int(0.5 * SR))]


def test_asr_hears_each_piece_of_a_recording_alone(model, monkeypatch, capsys, hears_any_sound):  # noqa: F811
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    pipeline = hears_any_sound(SpeechPipeline(model, codec))
    heard = []
    piece = pipeline._asr_piece
    pipeline._asr_piece = lambda audio, sr, decoder, g: heard.append(len(audio)) or piece(audio, sr, decoder, g)
    audio = np.concatenate([voice(0.8, 1), quiet(0.5), voice(0.6, 2), quiet(0.5), quiet(0.1, 0.001)])
    g = Generation(max_text_tokens=4, asr_views=1, asr_check_rounds=0, asr_piece_seconds=2.0)  # the 2.5 s: longer than a piece
    assert isinstance(pipeline.asr(audio, generation=g), str)
    assert heard == [int(0.82 * SR), int(0.62 * SR)]  # each piece alone, from its first sound
    segments = pipeline.asr_segments(audio, generation=g)
    assert [(s.start, s.end) for s in segments] == [(0.0, 0.82), (1.3, 1.92)]
    assert pipeline.asr(audio, generation=g) == " ".join(s.text for s in segments if s.text)
    capsys.readouterr()
    assert pipeline.asr_segments(audio, generation=g, progress=True) == segments  # a progress bar over the pieces
    assert "asr:" in (err := capsys.readouterr().err) and "/2 " in err
    heard.clear()
    pipeline.asr(audio, generation=Generation(max_text_tokens=4, asr_views=1, asr_check_rounds=0, asr_pause_seconds=0))
    assert heard == [len(audio)]  # 0: one piece, as given
    # no longer than a piece: heard whole as well, and the transcript the checker hears better kept
    short = dataclasses.replace(g, asr_piece_seconds=6.0)
    for whole_wins in (True, False):
        monkeypatch.setattr(pipeline, "_sounds_more_like", lambda audio, first, second, g, w=whole_wins: w)
        heard.clear()
        segments = pipeline.asr_segments(audio, generation=short)
        assert sorted(heard) == sorted([int(0.82 * SR), int(0.62 * SR), len(audio)])
        assert [(s.start, s.end) for s in segments] == ([(0.0, len(audio) / SR)] if whole_wins else [(0.0, 0.82), (1.3, 1.92)])
    with pytest.raises(SpeechLMError, match="asr_pause_seconds"):
        pipeline.asr(audio, generation=Generation(asr_pause_seconds=-1))
    with pytest.raises(SpeechLMError, match="asr_short_pause_seconds"):
        pipeline.asr(audio, generation=Generation(asr_short_pause_seconds=-1))


def test_asr_hears_a_piece_whole_and_in_two_at_a_short_pause(model, monkeypatch, hears_any_sound):  # noqa: F811
    """A pause shorter than ``asr_pause_seconds`` (two sentences, or a comma): the piece heard whole and in two
    there, each half in two again at its own; the checker keeps the whole or the halves."""
    pipeline = hears_any_sound(SpeechPipeline(model, Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()))
    heard = []
    piece = pipeline._asr_piece
    pipeline._asr_piece = lambda audio, sr, decoder, g: heard.append(len(audio)) or piece(audio, sr, decoder, g)
    # 0.8 s, a 0.2 s pause, 0.6 s, a 0.16 s pause, 0.4 s: one piece at 0.25 s pauses
    audio = np.concatenate([voice(0.8, 1), quiet(0.2), voice(0.6, 2), quiet(0.16), voice(0.4, 3), quiet(0.3)])
    g = Generation(max_text_tokens=4, asr_views=1, asr_check_rounds=0)
    first, second, third = (0.0, 0.82), (1.0, 1.62), (1.76, 2.18)
    for keep_halves, spans in ((False, [(0.0, len(audio) / SR)]), (True, [first, second, third])):
        monkeypatch.setattr(pipeline, "_sounds_more_like", lambda audio, whole, halves, g, k=keep_halves: not k)
        heard.clear()
        segments = pipeline.asr_segments(audio, generation=g)
        assert [(s.start, s.end) for s in segments] == spans
        # the whole; the first 0.8 s (cut at the longest pause); the rest whole, and in two at its own pause
        assert heard == [len(audio), int(0.82 * SR), int(1.18 * SR), int(0.62 * SR), int(0.42 * SR)]
    heard.clear()
    monkeypatch.setattr(speech, "MAX_SPLIT_DEPTH", 1)  # the halves are not cut again
    assert [(s.start, s.end) for s in pipeline.asr_segments(audio, generation=g)] == [first, (1.0, 2.18)]
    assert heard == [len(audio), int(0.82 * SR), int(1.18 * SR)]
    heard.clear()
    assert len(pipeline.asr_segments(audio, generation=dataclasses.replace(g, asr_short_pause_seconds=0))) == 1
    assert heard == [len(audio)]  # no pause of 0.25 s: heard once, as given
