"""Room augmentation of a synth corpus: speech as a microphone hears it (for listening: ASR, spoken questions).

The teachers' speech starts within milliseconds of the file and has nothing under it; a
microphone's recording starts before the speaker, ends after, and carries the room. The speech
LM trained on the first alone was helpless before a quiet start (80 ms of silence before a
question took its ASR from 18 to 65 % WER) and under a room's noise (59 % at −46 dBFS).

Each training row of ``src`` (text split and voice split both ``train``) gets, drawn per row:

* a quiet **lead** before the speech (``lead_share`` of the rows; seconds uniform in ``lead``)
  and a quiet **tail** after it (seconds uniform in ``tail``);
* with probability ``noise_share`` a **room** under all of it: by default white, pink (1/f), brown (1/f²)
  noise or mains hum (50 or 60 Hz and its harmonics over a little white noise); any kind of
  :mod:`speechlm.training.noises` when asked (``noises``: music, clicks, tones, ...); at a
  signal-to-noise ratio uniform in ``snr_db`` against the speech's active level (the RMS of its
  voiced 20 ms windows); else the edges are digital silence;
* the result peak-normalized to the corpus level (``PEAK_LEVEL``), as the teachers' speech is and
  as ``SpeechPipeline.asr`` hears.

Word times shift by the lead. The row's voice becomes ``"<voice>@room"``: the LM's task mixture
uses such rows for listening (ASR, interleaving, spoken questions), never as the assistant's voice.
The output is a corpus like ``speechlm data synth``'s (``manifest.jsonl`` + ``audio/``), ready for
``speechlm data tokenize``. Rows are a pure function of ``(seed, row id)``; existing audio files
are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..codec.audio import PEAK_LEVEL, SAMPLE_RATE, load_audio
from ..codec.errors import SpeechLMError
from .augment import AugmentSummary, Change, augment_corpus
from .noises import HELD_OUT_NOISES, TRAIN_NOISES, colored_noise, noise

NOISES = ("white", "pink", "brown", "hum")  # the default kinds (any of speechlm.training.noises' may be asked for)
KNOWN_NOISES = TRAIN_NOISES + HELD_OUT_NOISES


@dataclass(frozen=True)
class RoomConfig:
    lead: tuple[float, float] = (0.05, 1.0)  # seconds of quiet before the speech, where there is a lead
    lead_share: float = 0.8  # rows that get a lead
    tail: tuple[float, float] = (0.0, 0.6)  # seconds of quiet after it
    noise_share: float = 0.7  # rows with a room under them (else digital silence at the edges)
    snr_db: tuple[float, float] = (5.0, 40.0)  # speech's active level over the room's
    noises: tuple[str, ...] = NOISES

    def __post_init__(self) -> None:
        for name in ("lead", "tail", "snr_db"):
            lo, hi = getattr(self, name)
            if lo > hi or (name != "snr_db" and lo < 0):
                raise SpeechLMError(f"{name} range must be MIN,MAX with {'0 <= ' if name != 'snr_db' else ''}MIN <= MAX, got {lo},{hi}")
        for name in ("lead_share", "noise_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise SpeechLMError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        unknown = set(self.noises) - set(KNOWN_NOISES)
        if not self.noises or unknown:
            raise SpeechLMError(f"noises must be some of {', '.join(KNOWN_NOISES)}, got {', '.join(self.noises) or 'none'}")


def active_rms(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """RMS of the voiced part: the 20 ms windows within 30 dB of the loudest (0 for silence)."""
    w = sample_rate // 50
    frames = audio[: len(audio) // w * w].reshape(-1, w) if len(audio) >= w else audio[None]
    energy = (frames.astype(np.float64) ** 2).mean(axis=1)
    if not len(energy) or energy.max() <= 0:
        return 0.0
    return float(np.sqrt(energy[energy >= energy.max() * 1e-3].mean()))


def in_a_room(audio: np.ndarray, config: RoomConfig, rng: random.Random, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, dict]:
    """(T,) speech -> (T', audio as a microphone in a room hears it, what was drawn); see the module doc."""
    lead = rng.uniform(*config.lead) if rng.random() < config.lead_share else 0.0
    tail = rng.uniform(*config.tail)
    pre, post = int(round(lead * sample_rate)), int(round(tail * sample_rate))
    y = np.concatenate([np.zeros(pre, np.float32), np.asarray(audio, np.float32), np.zeros(post, np.float32)])
    drawn = {"lead": round(pre / sample_rate, 4), "tail": round(post / sample_rate, 4), "noise": None}
    level = active_rms(np.asarray(audio, np.float32), sample_rate)
    if rng.random() < config.noise_share and level > 0:
        kind = rng.choice(config.noises)
        snr = rng.uniform(*config.snr_db)
        generator = np.random.default_rng(rng.getrandbits(32))
        room = colored_noise(len(y), kind, generator, sample_rate) if kind in NOISES else noise(kind, len(y), generator)
        y = y + room * (level / 10 ** (snr / 20))
        drawn.update(noise=kind, snr_db=round(snr, 2))
    peak = float(np.abs(y).max()) if len(y) else 0.0
    if peak > 0:
        y = y * (PEAK_LEVEL / peak)
    return y.astype(np.float32), drawn


def room_corpus(src: str | Path, out: str | Path, *, config: RoomConfig | None = None, count: int | None = None,
                seed: int = 0) -> AugmentSummary:
    """Write a room-augmented copy of ``src``'s training rows to ``out`` (see the module docstring)."""
    config = config or RoomConfig()

    def change(row: dict, audio: Path, rng: random.Random) -> Change:
        y, drawn = in_a_room(load_audio(audio), config, rng)
        return Change(audio=lambda: y, tag="room", voice_tag="room", record=drawn, word_time=lambda t: t + drawn["lead"])

    return augment_corpus(src, out, name="room", change=change, settings=asdict(config), count=count, seed=seed)
