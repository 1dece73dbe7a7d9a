"""``speechlm data import``: recordings with transcripts -> a corpus like ``speechlm data synth``'s.

People's recordings come without word timestamps; :func:`speechlm.align.align_words` finds them (CTC forced
alignment with the pronunciation checker), so that ``speechlm data tokenize`` and the LM's interleaving read an
imported corpus as they read a synthetic one. The layout is synth's (``DIR/audio/shard-*/ID.flac`` at 16 kHz mono,
``DIR/manifest.jsonl``, ``DIR/failed.jsonl``, resumable shard by shard); a row's ``voice`` is ``import:SPEAKER`` and
its ``teacher`` says how it was aligned (``{"aligner": CHECKER, "align_score": nats per phoneme}``: 0 = the
checker hears exactly the transcript's phonemes; a transcript that does not match its audio scores high).

Sources:

* a table (``.tsv``; ``.csv`` by its extension) with a header row: a column of audio paths (relative to the table's
  folder), one of transcripts, and optionally one of speakers;
* a folder (searched through its subfolders) of audio files (``.wav``, ``.flac``, ``.ogg``, ``.mp3``, ``.opus``), each
  with its transcript beside it in ``NAME.txt`` or ``NAME.lab`` — the speaker: the file's folder — or
  ``NAME.normalized.txt`` (LibriTTS) — the speaker: the name's first underscore-separated field — or listed in a ``*.trans.txt`` of its folder, a line ``NAME TEXT`` each (LibriSpeech) — the speaker:
  the name's first dash-separated field (``103-1240-0000``: 103).

A recording that cannot be read, is longer than ``max_seconds``, has no words, or whose transcript the audio cannot
hold (or, with ``max_score``, does not match well enough) goes to ``failed.jsonl`` with the reason.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..codec.audio import SAMPLE_RATE, load_audio
from ..codec.errors import SpeechLMError
from .synth import Job, SynthSummary, run_shards, write_row
from .textnorm import normalize_text, spoken_words

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")
TRANSCRIPT_SUFFIXES = (".txt", ".lab", ".normalized.txt")
MAX_TEXT_CHARS = 2000
_ID_RE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class ImportConfig:
    checker: str = "checker-en"  # the pronunciation checker that aligns (a directory or shipped name)
    shard_size: int = 50
    max_seconds: float = 60.0  # a longer recording is failed (cut it first: alignment holds the whole in memory)
    # an alignment scoring above this (nats per phoneme over the checker's own reading) is failed: the transcript does not
    # match its audio (16 held-out LibriSpeech recordings: 3.9-6.2 with their transcripts, 7.4-21 with another's; synthetic
    # voices score lower); None keeps every alignment
    max_score: float | None = 7.0

    def to_json(self) -> dict:
        return {"importer": "speechlm.training.recordings", **asdict(self)}


def recording_items(source: str | Path, path_column: str = "path", text_column: str = "text",
                    speaker_column: str | None = None) -> list[dict]:
    """The recordings of ``source`` (a table or a folder, module doc): dicts with ``id``, ``text``, ``source`` (the
    audio's absolute path) and ``speaker``. Raises SpeechLMError (one line) for a missing source, a table without the
    columns, or two recordings with one id."""
    source = Path(source)
    if source.is_dir():
        items = _folder_items(source)
    elif source.is_file():
        items = _table_items(source, path_column, text_column, speaker_column)
    else:
        raise SpeechLMError(f"no recordings at {source} (a table of paths and transcripts, or a folder of audio with .txt files)")
    if not items:
        raise SpeechLMError(f"no recordings with transcripts in {source}")
    seen: set[str] = set()
    for item in items:
        if item["id"] in seen:
            raise SpeechLMError(f"two recordings have the id {item['id']!r} (ids are the files' names): rename one")
        seen.add(item["id"])
    return items


def _recording_id(path: Path) -> str:
    return _ID_RE.sub("-", path.stem).strip("-") or "recording"


def _folder_items(folder: Path) -> list[dict]:
    items = []
    listed: dict[Path, dict[str, str]] = {}  # a folder's *.trans.txt lines: name -> text
    for audio in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        transcript = next((audio.with_suffix(s) for s in TRANSCRIPT_SUFFIXES if audio.with_suffix(s).is_file()), None)
        if transcript is not None:
            libritts = transcript.name.endswith(".normalized.txt")
            text, speaker = _read_text(transcript).strip(), audio.stem.split("_")[0] if libritts else audio.parent.name
        else:
            if audio.parent not in listed:
                listed[audio.parent] = _listed_texts(audio.parent)
            if audio.stem not in listed[audio.parent]:
                continue
            text, speaker = listed[audio.parent][audio.stem], audio.stem.split("-")[0]
        items.append({"id": _recording_id(audio), "text": text, "source": str(audio.resolve()), "speaker": speaker})
    return items


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpeechLMError(f"transcript is not UTF-8 text: {path}") from None


def _listed_texts(folder: Path) -> dict[str, str]:
    """The lines ``NAME TEXT`` of the folder's ``*.trans.txt`` files (LibriSpeech's layout)."""
    texts = {}
    for listing in sorted(folder.glob("*.trans.txt")):
        for line in _read_text(listing).splitlines():
            name, _, text = line.strip().partition(" ")
            if name and text.strip():
                texts[name] = text.strip()
    return texts


def _table_items(table: Path, path_column: str, text_column: str, speaker_column: str | None) -> list[dict]:
    delimiter = "," if table.suffix.lower() == ".csv" else "\t"
    try:
        with table.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
    except UnicodeDecodeError:
        raise SpeechLMError(f"table is not UTF-8 text: {table}") from None
    columns = list(rows[0]) if rows else []
    for name in [path_column, text_column, *([speaker_column] if speaker_column else [])]:
        if rows and name not in rows[0]:
            raise SpeechLMError(f"{table} has no column {name!r} (its columns: {', '.join(columns)}); "
                                "choose with --path-column / --text-column / --speaker-column")
    items = []
    for row in rows:
        path = Path(row[path_column] or "")
        path = path if path.is_absolute() else table.parent / path
        speaker = (row[speaker_column] or "") if speaker_column else table.stem
        items.append({"id": _recording_id(path), "text": (row[text_column] or "").strip(), "source": str(path.resolve()),
                      "speaker": speaker or "unknown"})
    return items


def speaker_voice(speaker: str) -> str:
    return "import:" + (_ID_RE.sub("-", speaker).strip("-") or "unknown")


def import_recordings(items: list[dict], out_dir: str | Path, config: ImportConfig, workers: int = 1,
                      progress: bool = True) -> SynthSummary:
    """Align and copy ``items`` (:func:`recording_items`) into the corpus ``out_dir``; resumable (a re-run with other
    settings is refused)."""
    from ..speech import resolve_model

    resolve_model(config.checker)  # a missing checker: one line, before any work
    jobs = [Job(i, item["id"], item["text"], speaker_voice(item["speaker"]), {"source": item["source"]}) for i, item in enumerate(items)]
    maker = functools.partial(import_row, config=config)
    return run_shards(out_dir, config.to_json(), jobs, config.shard_size, 0, maker, [], workers, progress, desc="import")


@functools.lru_cache(maxsize=2)
def _checker(name: str):
    from ..checker import PronunciationChecker

    return PronunciationChecker.from_pretrained(name).eval()


def import_row(job: Job, shard: str, out: Path, seed: int, config: ImportConfig) -> dict:
    """Align one recording, write its audio, return its manifest row (an AlignmentError, for failed.jsonl, when it cannot)."""
    from ..align import align_words
    from .teachers import AlignmentError

    source = job.extra["source"]
    try:
        if not job.text or len(job.text) > MAX_TEXT_CHARS:
            raise SpeechLMError(f"the transcript is {'empty' if not job.text else f'over {MAX_TEXT_CHARS} characters'}")
        if not spoken_words(normalize_text(job.text)):
            raise SpeechLMError(f"the transcript has no words: {job.text!r}")
        audio = load_audio(source)
        seconds = len(audio) / SAMPLE_RATE
        if seconds > config.max_seconds:
            raise SpeechLMError(f"{seconds:.1f} s is longer than {config.max_seconds:g} s (cut it first)")
        alignment = align_words(audio, job.text, _checker(config.checker))
        if config.max_score is not None and alignment.score > config.max_score:
            raise SpeechLMError(f"the transcript does not match the audio well enough (score {alignment.score:.2f} > {config.max_score:g})")
    except SpeechLMError as e:
        raise AlignmentError(f"{source}: {e}") from None
    return write_row(job, shard, out, audio, alignment.words, {"aligner": config.checker, "align_score": round(alignment.score, 4)},
                     {"source": source})
