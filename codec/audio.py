"""Audio I/O: read anything libsndfile reads, downmix, resample to 16 kHz; write WAV/FLAC.

Internal format everywhere in speechlm: float32 mono numpy arrays at 16 kHz.
``soundfile`` reads and writes, ``soxr`` resamples (torchaudio is not used: it
does not import on CPU-only machines).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

SAMPLE_RATE = 16_000
PEAK_LEVEL = 0.9  # the synthetic corpus's speech is peak-normalized to this (speechlm.training.teachers)
# suffix -> (libsndfile format, subtype): 16-bit PCM, or lossy (Ogg Vorbis, Ogg Opus, MP3)
WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"), ".opus": ("OGG", "OPUS"),
                 ".mp3": ("MP3", "MPEG_LAYER_III")}  # fmt: skip


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample ``audio`` of shape (T,) or (T, C) from ``sr_in`` to ``sr_out`` Hz (soxr HQ)."""
    if sr_in == sr_out:
        return np.asarray(audio, dtype=np.float32)
    if sr_in <= 0:
        raise AudioError(f"invalid sample rate {sr_in}")
    return soxr.resample(np.asarray(audio, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int | None = SAMPLE_RATE,
    mono: bool = True,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """Read an audio file as float32.

    Args:
        path: any format libsndfile reads (WAV, FLAC, OGG/Vorbis, Opus, MP3 with libsndfile >= 1.1).
        sample_rate: resample to this rate; ``None`` keeps the file's rate.
        mono: downmix by averaging channels.
        min_seconds: reject files shorter than this (after resampling).

    Returns:
        ``(T,)`` when ``mono`` else ``(T, C)``.

    Raises:
        AudioError: missing, unreadable, corrupt or empty file (one-line message).
    """
    audio, _ = load_audio_with_rate(path, sample_rate=sample_rate, mono=mono, min_seconds=min_seconds)
    return audio


def load_audio_with_rate(
    path: str | os.PathLike,
    sample_rate: int | None = SAMPLE_RATE,
    mono: bool = True,
    min_seconds: float = 0.0,
) -> tuple[np.ndarray, int]:
    """Like :func:`load_audio` but also returns the rate of the returned array."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"audio file not found: {p}")
    if p.is_dir():
        raise AudioError(f"expected an audio file, got a directory: {p}")
    if p.stat().st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {p}")
    try:
        audio, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot read {p} as audio (corrupt or unsupported format): {e}") from None
    if audio.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {p}")
    if mono:
        audio = audio.mean(axis=1)
    if sample_rate is not None and sr != sample_rate:
        audio = resample(audio, sr, sample_rate)
        sr = sample_rate
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"audio file holds NaN or infinite samples: {p}")
    if audio.shape[0] < min_seconds * sr:
        raise AudioError(f"audio too short: {audio.shape[0] / sr:.3f} s < {min_seconds:.3f} s in {p}")
    return np.ascontiguousarray(audio, dtype=np.float32), sr


def save_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write ``audio`` ((T,) or (T, C), float in [-1, 1]) atomically, in the format of the suffix
    (:data:`WRITE_FORMATS`: 16-bit PCM ``.wav``/``.flac``, or ``.ogg`` (Vorbis), ``.opus``, ``.mp3``).
    The file is written to a temporary name first and renamed, so a killed process never leaves half a file.
    """
    p = Path(path)
    fmt, subtype = audio_format(p)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim not in (1, 2):
        raise AudioError(f"audio must be (T,) or (T, C), got shape {audio.shape}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:  # e.g. a sample rate Opus does not take
        tmp.unlink(missing_ok=True)
        raise AudioError(f"cannot write {p}: {e}") from None
    os.replace(tmp, p)
    return p


def open_audio_writer(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> sf.SoundFile:
    """An open mono file at ``path`` (format from the suffix, as :func:`save_audio`; its folders made) to write
    speech into as it comes (``speechlm tts --stream``: a player can read what is written); AudioError if it
    cannot be opened."""
    p = Path(path)
    fmt, subtype = audio_format(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        return sf.SoundFile(str(p), "w", samplerate=sample_rate, channels=1, format=fmt, subtype=subtype)
    except (OSError, sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise AudioError(f"cannot write {p}: {e}") from None


def audio_format(path: str | os.PathLike) -> tuple[str, str]:
    """The (libsndfile format, subtype) :func:`save_audio` writes ``path`` in, from its suffix; AudioError for others."""
    p = Path(path)
    if p.suffix.lower() not in WRITE_FORMATS:
        raise AudioError(f"cannot write {p}: use one of {', '.join(WRITE_FORMATS)}")
    return WRITE_FORMATS[p.suffix.lower()]


def to_pcm16(audio: np.ndarray) -> bytes:
    """float32 (T,) in [-1, 1] -> little-endian PCM16 bytes."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    """little-endian PCM16 bytes -> float32 (T,)."""
    if len(data) % 2:
        raise AudioError(f"PCM16 data must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def is_silent(audio: np.ndarray, threshold_db: float = -60.0) -> bool:
    """True when the RMS level of ``audio`` is below ``threshold_db`` dBFS (or it is empty)."""
    if audio.size == 0:
        return True
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return rms <= 10 ** (threshold_db / 20)


def sound_span(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, *, below_peak_db: float = 50.0, noise_margin: float = 3.0,
               window_s: float = 0.01) -> tuple[int, int] | None:
    """(start, end) sample indices of ``audio`` (T,) from its first sound to the end of its last, or
    None when nothing sounds. A sound is a ``window_s`` window whose RMS is within ``below_peak_db``
    of the loudest window's and ``noise_margin`` times above the quietest tenth of the windows (the room)."""
    n = max(1, int(window_s * sample_rate))
    if len(audio) < n:
        return None if is_silent(audio) else (0, len(audio))
    loud = np.nonzero(_loud_windows(_window_rms(audio, n), below_peak_db, noise_margin))[0]
    if len(loud) == 0:
        return None
    return int(loud[0]) * n, min(len(audio), (int(loud[-1]) + 1) * n)


def _window_rms(audio: np.ndarray, n: int) -> np.ndarray:
    """RMS of each whole window of n samples of ``audio`` (len // n,)."""
    frames = len(audio) // n
    return np.sqrt(np.mean(np.square(audio[: frames * n].reshape(frames, n), dtype=np.float64), axis=1))


def _loud_windows(rms: np.ndarray, below_peak_db: float, noise_margin: float) -> np.ndarray:
    """Which windows sound, from their RMS (W,) -> bool (W,): see :func:`sound_span`."""
    floor = float(np.sort(rms)[: max(1, len(rms) // 10)].mean())
    threshold = max(float(rms.max()) * 10 ** (-below_peak_db / 20), noise_margin * floor, 1e-5)
    return rms > threshold


def split_at_pauses(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, *, pause_s: float = 0.25, max_seconds: float = 6.0,
                    below_peak_db: float = 40.0, noise_margin: float = 3.0, window_s: float = 0.01, trail_s: float = 0.02) -> list[tuple[int, int]]:
    """The sounding part of ``audio`` (T,) in pieces (start, end), cut in the middle of every pause of at
    least ``pause_s`` (quiet: as :func:`sound_span`'s, but within ``below_peak_db`` of the peak, so that a
    breath between sentences counts as quiet); a piece still longer than ``max_seconds`` is cut again at
    its longest pause, or, with none, at its quietest window in the middle half. Each piece runs from its
    first sound to ``trail_s`` after its last: the speech LM was trained on utterances that start with
    their first sound, and hears a sentence differently when a few milliseconds of quiet come before it
    (its codec frames fall elsewhere in the sound). [] when nothing sounds."""
    n = max(1, int(window_s * sample_rate))
    if len(audio) < n:
        return [] if is_silent(audio) else [(0, len(audio))]
    rms = _window_rms(audio, n)
    loud = _loud_windows(rms, below_peak_db, noise_margin)
    where = np.nonzero(loud)[0]
    if len(where) == 0:
        return []
    first, last = int(where[0]), int(where[-1]) + 1
    runs = []  # quiet runs between the first and the last sound: (start, end) in windows
    start = None
    for i in range(first, last):
        if not loud[i] and start is None:
            start = i
        elif loud[i] and start is not None:
            runs.append((start, i))
            start = None
    cuts = sorted((a + b) // 2 for a, b in runs if (b - a) * window_s >= pause_s)
    pieces = list(zip([first, *cuts], [*cuts, last]))
    limit = max(1, int(max_seconds / window_s))
    out: list[tuple[int, int]] = []
    while pieces:
        a, b = pieces.pop(0)
        if b - a <= limit:
            out.append((a, b))
            continue
        inside = [(s, e) for s, e in runs if a < s and e < b]
        if inside:
            s, e = max(inside, key=lambda r: r[1] - r[0])
            cut = (s + e) // 2
        else:
            lo, hi = a + (b - a) // 4, b - (b - a) // 4
            cut = lo + int(np.argmin(rms[lo:hi]))
        pieces[:0] = [(a, cut), (cut, b)]
    pad = int(trail_s * sample_rate)
    spans = []
    for a, b in out:
        sounding = np.nonzero(loud[a:b])[0]
        if len(sounding):
            spans.append(((a + int(sounding[0])) * n, min(len(audio), (a + int(sounding[-1]) + 1) * n + pad)))
    return spans


def trim_quiet_edges(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, *, max_lead_s: float = 0.06, lead_s: float = 0.02,
                     max_trail_s: float = 0.15, trail_s: float = 0.1, span: tuple[int, int] | None = None) -> np.ndarray:
    """``audio`` (T,) with a long quiet start or end cut short: more than ``max_lead_s`` of quiet
    (silence or a room's steady noise) before the first sound becomes ``lead_s``, more than
    ``max_trail_s`` after the last becomes ``trail_s``; shorter edges stay as they are. ``span``: the
    audio's :func:`sound_span` when the caller has it already."""
    span = span or sound_span(audio, sample_rate)
    if span is None:
        return audio
    start, end = span
    if start > max_lead_s * sample_rate:
        start -= int(lead_s * sample_rate)
    else:
        start = 0
    if len(audio) - end > max_trail_s * sample_rate:
        end += int(trail_s * sample_rate)
    else:
        end = len(audio)
    return audio[start:end]
