"""``speechlm data synth``: texts -> speech with word timestamps, as a resumable corpus.

Layout of an output directory::

    DIR/synth_config.json          the settings; a resumed run must use the same ones
    DIR/audio/shard-00000/ID.flac  16 kHz mono FLAC, one file per utterance
    DIR/shards/shard-00000.jsonl   rows of a finished shard (written last, atomically)
    DIR/manifest.jsonl             all rows, in job order (rebuilt at the end of a run)
    DIR/failed.jsonl               utterances a teacher could not align, with the reason

Work is cut into shards of ``shard_size`` utterances.  A shard is the unit of work and
of completion: one fresh worker process synthesizes it in a fixed order, then its rows
file appears.  So a re-run skips finished shards, and - because libespeak-ng keeps a
little state between utterances - the output is identical for a seed whatever the
number of workers and however often the run was interrupted.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..codec.audio import SAMPLE_RATE, save_audio
from ..codec.errors import SpeechLMError
from .textgen import voice_split
from .textnorm import normalize_text, spoken_words

MAX_TEXT_CHARS = 1000


@dataclass
class SynthConfig:
    voices: list[str]
    seed: int = 0
    voices_per_text: int = 1
    shard_size: int = 50

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Job:
    index: int
    id: str
    text: str
    voice: str
    extra: dict = field(default_factory=dict)


def voice_slug(voice: str) -> str:
    return voice.replace(":", "-").replace("+", "-").replace("/", "-")


def plan_jobs(items: list[dict], config: SynthConfig) -> list[Job]:
    """Assign voices to texts, deterministically for the seed."""
    jobs: list[Job] = []
    seen: set[str] = set()
    for item in items:
        text = item["text"]
        if len(text) > MAX_TEXT_CHARS:
            raise SpeechLMError(f"text {item['id']!r} is {len(text)} characters long; the limit is {MAX_TEXT_CHARS} (split it)")
        if not spoken_words(normalize_text(text)):
            raise SpeechLMError(f"text {item['id']!r} has no words to speak: {text!r}")
        rng = random.Random(f"{config.seed}:voices:{item['id']}")
        k = min(config.voices_per_text, len(config.voices))
        for voice in rng.sample(config.voices, k):
            utt_id = f"{item['id']}-{voice_slug(voice)}"
            if utt_id in seen:
                raise SpeechLMError(f"duplicate utterance id {utt_id!r}: give each text a distinct id")
            seen.add(utt_id)
            extra = {k2: v for k2, v in item.items() if k2 not in ("id", "text")}
            jobs.append(Job(len(jobs), utt_id, text, voice, extra))
    return jobs


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def synth_row(job: Job, shard: str, out: Path, seed: int) -> dict:
    """Synthesize one utterance, write its audio, return its manifest row."""
    from .teachers import get_teacher

    syn = get_teacher(job.voice).synthesize(job.text, random.Random(f"{seed}:synth:{job.id}"))
    return write_row(job, shard, out, syn.audio, syn.words, syn.params, job.extra)


def write_row(job: Job, shard: str, out: Path, audio, words: list, teacher: dict, extra: dict) -> dict:
    """Write one utterance's audio (T,) at 16 kHz into the corpus ``out`` and return its manifest row (``words``: objects
    with ``to_json``; ``teacher``: how it was made; ``extra``: more fields)."""
    rel = Path("audio") / shard / f"{job.id}.flac"
    save_audio(out / rel, audio, SAMPLE_RATE)
    return {
        "id": job.id,
        "text": job.text,
        "normalized_text": normalize_text(job.text),
        "audio": rel.as_posix(),
        "sample_rate": SAMPLE_RATE,
        "duration": round(len(audio) / SAMPLE_RATE, 4),
        "voice": job.voice,
        "voice_split": voice_split(job.voice),
        "words": [w.to_json() for w in words],
        "teacher": teacher,
        **extra,
    }


RowMaker = Callable[[Job, str, Path, int], dict]


def _run_shard(args: tuple[str, int, list, int, RowMaker]) -> tuple[int, int, int, float]:
    """Worker: make every row of one shard. Returns (shard, rows written, failures, seconds of audio)."""
    out_dir, k, jobs, seed, make_row = args
    from .teachers import AlignmentError

    out = Path(out_dir)
    rows, failures, seconds = [], [], 0.0
    for job in jobs:
        try:
            row = make_row(job, _shard_name(k), out, seed)
        except AlignmentError as e:
            failures.append({"id": job.id, "error": str(e)})
            continue
        seconds += row["duration"]
        rows.append(row)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    _write_jsonl_atomic(shard_dir / f"{_shard_name(k)}.failed.jsonl", failures)
    _write_jsonl_atomic(shard_dir / f"{_shard_name(k)}.jsonl", rows)  # last: marks the shard done
    return k, len(rows), len(failures), seconds


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass
class SynthSummary:
    utterances: int
    failed: int
    hours: float
    wall_seconds: float
    shards_done_before: int

    @property
    def hours_per_minute(self) -> float:
        return self.hours / max(self.wall_seconds / 60, 1e-9)


def _check_teachers(voices: list[str]) -> None:
    """Fail fast, in the parent, on unknown voices or missing teachers (one-line errors)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        pool.map(_load_teacher, voices)


def _load_teacher(voice: str) -> None:
    from .teachers import get_teacher

    get_teacher(voice)


def synthesize_corpus(items: list[dict], out_dir: str | Path, config: SynthConfig, workers: int = 1, progress: bool = True) -> SynthSummary:
    """Synthesize ``items`` (dicts with ``id`` and ``text``) into ``out_dir``; resumable."""
    jobs = plan_jobs(items, config)
    return run_shards(out_dir, config.to_json(), jobs, config.shard_size, config.seed, synth_row, sorted(set(config.voices)), workers, progress)


def run_shards(
    out_dir: str | Path,
    settings: dict,
    jobs: list,
    shard_size: int,
    seed: int,
    make_row: RowMaker,
    voices: list[str],
    workers: int = 1,
    progress: bool = True,
    desc: str = "synth",
) -> SynthSummary:
    """Cut ``jobs`` into shards and make the missing ones in fresh worker processes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "synth_config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous != settings:
            raise SpeechLMError(f"{out} was made with other settings ({previous}); use a new directory or the same settings")
    else:
        config_path.write_text(json.dumps(settings, indent=2))
    shards = [jobs[i : i + shard_size] for i in range(0, len(jobs), shard_size)]
    todo = [k for k in range(len(shards)) if not (out / "shards" / f"{_shard_name(k)}.jsonl").exists()]
    done_before = len(shards) - len(todo)
    if todo:
        _check_teachers(voices)
    start = time.time()
    seconds = 0.0
    ctx = mp.get_context("spawn")
    bar = tqdm(total=sum(len(shards[k]) for k in todo), unit="utt", disable=not progress, desc=desc)
    # One fresh process per shard (maxtasksperchild=1): see the module docstring.
    with ctx.Pool(max(1, min(workers, len(todo) or 1)), maxtasksperchild=1) as pool:
        for _k, n_rows, n_failed, secs in pool.imap_unordered(_run_shard, [(str(out), k, shards[k], seed, make_row) for k in todo]):
            seconds += secs
            bar.update(n_rows + n_failed)
            bar.set_postfix(hours=f"{seconds / 3600:.3f}")
    bar.close()
    wall = time.time() - start
    rows, failed = _merge_shards(out, len(shards))
    return SynthSummary(utterances=rows, failed=failed, hours=seconds / 3600, wall_seconds=wall, shards_done_before=done_before)


def _merge_shards(out: Path, n_shards: int) -> tuple[int, int]:
    """Rebuild manifest.jsonl and failed.jsonl from the shard files, in job order."""
    rows, failed = [], []
    for k in range(n_shards):
        rows += read_manifest(out / "shards" / f"{_shard_name(k)}.jsonl")
        failed_path = out / "shards" / f"{_shard_name(k)}.failed.jsonl"
        if failed_path.exists():
            failed += read_manifest(failed_path)
    _write_jsonl_atomic(out / "manifest.jsonl", rows)
    _write_jsonl_atomic(out / "failed.jsonl", failed)
    return len(rows), len(failed)


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest (``DIR`` or ``DIR/manifest.jsonl``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.jsonl"
    if not p.exists():
        raise SpeechLMError(f"manifest not found: {p}")
    with p.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
