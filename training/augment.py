"""The loop shared by the corpus augmentations (``speechlm data perturb``, ``speechlm data rooms``).

Each training row of a synth corpus (text split and voice split both ``train``; a seeded sample of
``count`` of them, or all) becomes one new row: its audio changed by a per-row function of a
``random.Random`` seeded by ``(seed, name, row id)``, written once (existing files are kept, so an
interrupted run resumes) and listed in a new ``manifest.jsonl`` (written atomically), beside a
``<name>_config.json`` that records how.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codec.audio import SAMPLE_RATE, load_audio, save_audio
from ..codec.errors import SpeechLMError
from .synth import read_manifest


@dataclass
class Change:
    """What a row's augmentation did: the new audio, the suffix of its id, its voice's new tag,
    the new row's record of it, and how word times move."""

    audio: Callable[[], np.ndarray]  # made only where the output file is not there yet (a resumed run skips it)
    tag: str  # the new id is "<id>-<tag>"
    voice_tag: str  # the new voice is "<voice>@<voice_tag>"
    record: dict
    word_time: Callable[[float], float]


@dataclass
class AugmentSummary:
    rows: int
    seconds: float
    skipped: int  # source rows not used (held-out text or voice, or not drawn by --count)


def augment_corpus(src: str | Path, out: str | Path, *, name: str, change: Callable[[dict, Path, random.Random], Change],
                   settings: dict, count: int | None = None, seed: int = 0) -> AugmentSummary:
    """Write ``change`` of each (drawn) training row of ``src`` to ``out``; ``change(row, audio path, rng)``."""
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise SpeechLMError("--out must be a new directory, not the source corpus")
    rows = read_manifest(src)
    train = [r for r in rows if r.get("split", "train") == "train" and r.get("voice_split", "train") == "train"]
    if not train:
        raise SpeechLMError(f"{src} has no training rows (split and voice_split 'train') to augment")
    if count is not None:
        train = random.Random(f"{seed}:{name}-pick").sample(train, min(count, len(train)))
    out.mkdir(parents=True, exist_ok=True)
    new_rows, seconds = [], 0.0
    for row in train:
        c = change(row, src / row["audio"], random.Random(f"{seed}:{name}:{row['id']}"))
        rel = Path("audio") / Path(row["audio"]).parent.name / f"{row['id']}-{c.tag}.flac"
        path = out / rel
        if path.exists():
            n = len(load_audio(path))
        else:
            audio = c.audio()
            save_audio(path, audio, SAMPLE_RATE)  # atomic
            n = len(audio)
        duration = n / SAMPLE_RATE
        seconds += duration
        new = {**row, "id": f"{row['id']}-{c.tag}", "audio": str(rel), "duration": round(duration, 4),
               "voice": f"{row.get('voice', 'unknown')}@{c.voice_tag}", name: {**c.record, "source": row["id"]}}
        if row.get("words"):
            new["words"] = [{**w, "start": round(c.word_time(w["start"]), 4), "end": round(c.word_time(w["end"]), 4)} for w in row["words"]]
        new_rows.append(new)
    tmp = out / f".manifest.jsonl.tmp{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as fh:
        for r in new_rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, out / "manifest.jsonl")
    (out / f"{name}_config.json").write_text(json.dumps({"source": str(src.resolve()), **settings, "count": count, "seed": seed}, indent=2))
    return AugmentSummary(rows=len(new_rows), seconds=seconds, skipped=len(rows) - len(new_rows))
