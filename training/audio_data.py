"""Audio for codec training: sources held in memory, random crops chosen from (seed, step).

A source spec is one of

* ``manifest:DIR`` - a `speechlm data synth` corpus (its ``manifest.jsonl``);
* ``librispeech:DIR[:train|test|all]`` - the shared LibriSpeech folder, split by speaker
  id (< 7000 train, >= 7000 test, as recommended in its README);
* ``dir:DIR`` - every audio file below DIR;

optionally followed by ``@WEIGHT`` (the share of crops drawn from it; default 1).

Batches are a pure function of (seed, step, rank): resuming at step s draws exactly the
crops an uninterrupted run would have drawn, and a DDP rank takes its slice of the same
global batch a single process would have used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codec.audio import SAMPLE_RATE, load_audio
from ..codec.errors import SpeechLMError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus"}
LIBRISPEECH_TEST_SPEAKER_MIN = 7000


def librispeech_speaker(path: Path) -> int:
    return int(path.name.split("-")[0])


def list_source_files(spec: str) -> tuple[list[Path], float]:
    """Files and weight of one source spec (see the module docstring)."""
    body, _, weight = spec.partition("@")
    kind, _, rest = body.partition(":")
    if kind == "manifest":
        d = Path(rest)
        manifest = d / "manifest.jsonl"
        if not manifest.exists():
            raise SpeechLMError(f"no manifest.jsonl in {d} (make one with speechlm data synth)")
        files = [d / json.loads(line)["audio"] for line in manifest.read_text().splitlines() if line.strip()]
    elif kind == "librispeech":
        folder, _, split = rest.partition(":")
        split = split or "train"
        files = sorted(p for p in Path(folder).glob("*.flac"))
        if split == "train":
            files = [p for p in files if librispeech_speaker(p) < LIBRISPEECH_TEST_SPEAKER_MIN]
        elif split == "test":
            files = [p for p in files if librispeech_speaker(p) >= LIBRISPEECH_TEST_SPEAKER_MIN]
        elif split != "all":
            raise SpeechLMError(f"librispeech split must be train, test or all, got {split!r}")
    elif kind == "dir":
        files = sorted(p for p in Path(rest).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    else:
        raise SpeechLMError(f"bad data source {spec!r}: use manifest:DIR, librispeech:DIR[:split] or dir:DIR, with optional @WEIGHT")
    if not files:
        raise SpeechLMError(f"data source {spec!r} has no audio files")
    try:
        w = float(weight) if weight else 1.0
    except ValueError:
        raise SpeechLMError(f"bad weight in data source {spec!r}") from None
    return files, w


@dataclass
class _Source:
    spec: str
    clips: list[np.ndarray]  # int16 (T,)
    weight: float
    cumulative: np.ndarray  # cumulative lengths, for length-weighted file choice


class AudioPool:
    """All training audio in memory as int16 (1 h of 16 kHz audio = 115 MB)."""

    def __init__(self, specs: list[str], min_seconds: float = 0.5):
        self.sources: list[_Source] = []
        for spec in specs:
            files, weight = list_source_files(spec)
            clips = []
            for f in files:
                audio = load_audio(f)
                if len(audio) >= min_seconds * SAMPLE_RATE:
                    clips.append((np.clip(audio, -1, 1) * 32767).astype(np.int16))
            if not clips:
                raise SpeechLMError(f"data source {spec!r} has no clip longer than {min_seconds} s")
            self.sources.append(_Source(spec, clips, weight, np.cumsum([len(c) for c in clips])))
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.source_probs = w / w.sum()

    @property
    def hours(self) -> float:
        return sum(int(s.cumulative[-1]) for s in self.sources) / SAMPLE_RATE / 3600

    def describe(self) -> str:
        return ", ".join(f"{s.spec}: {len(s.clips)} clips, {s.cumulative[-1] / SAMPLE_RATE / 3600:.2f} h" for s in self.sources)

    def batch(self, seed: int, step: int, batch_size: int, crop: int, gain_db: tuple[float, float] = (-18.0, 0.0),
              rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The rank's slice of global batch ``step``: (batch_size // world_size, crop) float32."""
        rng = np.random.default_rng([seed, step])
        out = np.zeros((batch_size, crop), dtype=np.float32)
        for i in range(batch_size):
            src = self.sources[rng.choice(len(self.sources), p=self.source_probs)]
            k = int(np.searchsorted(src.cumulative, rng.integers(src.cumulative[-1]), side="right"))
            clip = src.clips[k]
            start = int(rng.integers(0, max(1, len(clip) - crop)))
            seg = clip[start : start + crop].astype(np.float32) / 32768.0
            peak = float(np.abs(seg).max()) + 1e-4
            gain = 10 ** (rng.uniform(*gain_db) / 20) / peak * 0.95  # peak-normalise, then a random level
            out[i, : len(seg)] = seg * min(gain, 10 ** (24 / 20))
        per_rank = batch_size // world_size
        return torch.from_numpy(out[rank * per_rank : (rank + 1) * per_rank])
