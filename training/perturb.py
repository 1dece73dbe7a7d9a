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

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from ..codec.audio import SAMPLE_RATE, load_audio, save_audio
from ..codec.errors import SpeechLMError
from .synth import read_manifest


@dataclass
class PerturbSummary:
    rows: int
    seconds: float
    skipped: int  # source rows not perturbed (held-out text or voice, or not drawn by --count)


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
                   count: int | None = None, seed: int = 0) -> PerturbSummary:
    """Write a speed-perturbed copy of ``src``'s training rows to ``out`` (see the module docstring)."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise SpeechLMError("--out must be a new directory, not the source corpus")
    rows = read_manifest(src)
    train = [r for r in rows if r.get("split", "train") == "train" and r.get("voice_split", "train") == "train"]
    if not train:
        raise SpeechLMError(f"{src} has no training rows (split and voice_split 'train') to perturb")
    if count is not None:
        train = random.Random(f"{seed}:perturb-pick").sample(train, min(count, len(train)))
    out.mkdir(parents=True, exist_ok=True)
    new_rows, seconds = [], 0.0
    for row in train:
        rng = random.Random(f"{seed}:perturb:{row['id']}")
        f = draw_factor(rng, speeds, min_change)
        tag = f"sp{f:.3f}"
        rel = Path("audio") / Path(row["audio"]).parent.name / f"{row['id']}-{tag}.flac"
        path = out / rel
        if path.exists():
            n = len(load_audio(path))
        else:
            audio = speed_perturb(load_audio(src / row["audio"]), f)
            save_audio(path, audio, SAMPLE_RATE)  # atomic
            n = len(audio)
        duration = n / SAMPLE_RATE
        seconds += duration
        new = {**row, "id": f"{row['id']}-{tag}", "audio": str(rel), "duration": round(duration, 4),
               "voice": f"{row.get('voice', 'unknown')}@speed{f:.3f}", "perturb": {"speed": round(f, 4), "source": row["id"]}}
        if row.get("words"):
            new["words"] = [{**w, "start": round(w["start"] / f, 4), "end": round(w["end"] / f, 4)} for w in row["words"]]
        new_rows.append(new)
    tmp = out / f".manifest.jsonl.tmp{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as fh:
        for r in new_rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, out / "manifest.jsonl")
    (out / "perturb_config.json").write_text(json.dumps({"source": str(src.resolve()), "speeds": list(speeds), "min_change": min_change,
                                                         "count": count, "seed": seed}, indent=2))
    return PerturbSummary(rows=len(new_rows), seconds=seconds, skipped=len(rows) - len(new_rows))
