"""Speed perturbation of a synth corpus: more voices for listening (ASR, spoken questions).

Each training row of ``src`` (text split and voice split both ``train``) is played back at a
speed factor ``f`` drawn per row from ``speeds`` (uniform, at least ``min_change`` away from
1): the audio is resampled as if it had been recorded at ``f`` x the sample rate, so it is
``f`` x shorter and its pitch and formants are ``f`` x higher — a shorter or longer vocal
tract, a quicker or slower talker (Kaldi's speed perturbation, Ko et al. 2015). Word times
scale by ``1 / f``. The row's voice becomes ``"<voice>@speed<f>"``: the LM's task mixture
uses such rows for listening (ASR, interleaving, spoken questions), never as the assistant's
voice.

The output is a corpus like ``speechlm data synth``'s (``manifest.jsonl`` + ``audio/``), ready
for ``speechlm data tokenize``. Rows are a pure function of ``(seed, row id)``; existing audio
files are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soxr

from ..codec.audio import SAMPLE_RATE, load_audio
from ..codec.errors import SpeechLMError
from .augment import AugmentSummary, Change, augment_corpus


def speed_perturb(audio: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(T,) float32 -> (~T / factor,) float32: played ``factor`` x faster (pitch up by ``factor``)."""
    if factor <= 0:
        raise SpeechLMError(f"speed factor must be > 0, got {factor}")
    y = soxr.resample(np.asarray(audio, dtype=np.float32), sample_rate * factor, sample_rate, quality="HQ")
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def draw_factor(rng: random.Random, speeds: tuple[float, float], min_change: float) -> float:
    lo, hi = speeds
    if not 0 < lo <= hi:
        raise SpeechLMError(f"speed range must be 0 < MIN <= MAX, got {lo},{hi}")
    if hi - lo < 1e-9:
        return lo
    for _ in range(100):
        f = rng.uniform(lo, hi)
        if abs(f - 1.0) >= min_change:
            return f
    return hi if abs(hi - 1.0) >= abs(lo - 1.0) else lo


def perturb_corpus(src: str | Path, out: str | Path, *, speeds: tuple[float, float] = (0.85, 1.15), min_change: float = 0.03,
                   count: int | None = None, seed: int = 0) -> AugmentSummary:
    """Write a speed-perturbed copy of ``src``'s training rows to ``out`` (see the module docstring)."""

    def change(row: dict, audio: Path, rng: random.Random) -> Change:
        f = draw_factor(rng, speeds, min_change)
        return Change(audio=lambda: speed_perturb(load_audio(audio), f), tag=f"sp{f:.3f}", voice_tag=f"speed{f:.3f}",
                      record={"speed": round(f, 4)}, word_time=lambda t: t / f)

    return augment_corpus(src, out, name="perturb", change=change, settings={"speeds": list(speeds), "min_change": min_change},
                          count=count, seed=seed)
