import numpy as np
import pytest
import soundfile as sf

from speechlm.codec.audio import SAMPLE_RATE, from_pcm16, is_silent, load_audio, save_audio, to_pcm16
from speechlm.codec.errors import AudioError


def test_roundtrip_wav_and_flac(tmp_path):
    audio = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    for suffix in (".wav", ".flac"):
        path = save_audio(tmp_path / f"a{suffix}", audio)
        back = load_audio(path)
        assert back.shape == audio.shape
        assert np.abs(back - audio).max() < 1e-3


def test_lossy_formats_round_trip(tmp_path):
    """.ogg (Vorbis), .opus and .mp3: written and read back at the same rate and length, the tone kept."""
    audio = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    for suffix in (".ogg", ".opus", ".mp3"):
        back = load_audio(save_audio(tmp_path / f"a{suffix}", audio))
        assert abs(len(back) - len(audio)) <= 0.02 * len(audio), suffix
        spectrum = np.abs(np.fft.rfft(back[4000:12000]))
        assert abs(spectrum.argmax() * SAMPLE_RATE / 8000 - 440) <= 2 and 0.3 < np.sqrt(np.mean(back[4000:12000] ** 2)) < 0.4, suffix


def test_downmix_and_resample(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 200 * t), np.zeros_like(t)], axis=1).astype(np.float32) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 8000)
    out = load_audio(tmp_path / "s.wav")
    assert out.ndim == 1 and abs(len(out) - SAMPLE_RATE) <= 1
    assert 0.2 < np.abs(out).max() < 0.3  # averaged with the silent channel


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), (b"", "empty"), (b"this is not audio at all" * 10, "cannot read")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=message):
        load_audio(path)


def test_too_short_and_unsupported_suffix(tmp_path):
    save_audio(tmp_path / "short.wav", np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="too short"):
        load_audio(tmp_path / "short.wav", min_seconds=0.5)
    with pytest.raises(AudioError, match="cannot write"):
        save_audio(tmp_path / "x.mp4", np.zeros(10, np.float32))
    with pytest.raises(AudioError, match="cannot write .*x.opus"):  # Opus takes 8, 12, 16, 24 or 48 kHz only
        save_audio(tmp_path / "x.opus", np.zeros(1000, np.float32), sample_rate=22050)
    assert not list(tmp_path.glob(".x.opus*"))  # no temporary file left


def test_pcm16_and_silence():
    x = np.array([0.0, 0.5, -0.5, 1.0], np.float32)
    assert np.abs(from_pcm16(to_pcm16(x)) - x).max() < 1e-4
    with pytest.raises(AudioError):
        from_pcm16(b"abc")
    assert is_silent(np.zeros(100, np.float32)) and not is_silent(x)
