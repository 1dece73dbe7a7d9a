"""``speechlm data tokenize``: a synth corpus -> codec tokens, once, for LM training.

Output directory::

    OUT/tokenize_config.json       codec name/id, frame rate, source corpus
    OUT/codes-00000.npy            (frames, Q) int16: the codes of a chunk of utterances, end to end
    OUT/index-00000.jsonl          one row per utterance of that chunk (written last: marks it done)
    OUT/index.jsonl                all rows (rebuilt at the end)

Each index row is the manifest row plus ``chunk``, ``offsets`` (start frame of each audio
channel in the chunk's array), ``num_frames``, and word times converted to frames
(``words[i]["start_frame"]``, ``["end_frame"]``: the frames that overlap the word).
Stereo dialogue rows are encoded channel by channel.  Utterances are encoded in padded
batches: the codec is causal, so padding at the end does not change earlier codes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..codec.audio import load_audio
from ..codec.errors import SpeechLMError
from ..codec.model import Codec
from .synth import read_manifest


@dataclass
class TokenizeSummary:
    utterances: int
    frames: int
    chunks_done_before: int


def _frames_for_words(words: list[dict], frame_rate: float, num_frames: int) -> list[dict]:
    out = []
    for w in words:
        start = min(num_frames - 1, int(math.floor(w["start"] * frame_rate)))
        end = min(num_frames, max(start + 1, int(math.ceil(w["end"] * frame_rate))))
        out.append({**w, "start_frame": start, "end_frame": end})
    return out


def tokenize_corpus(corpus: str | Path, out_dir: str | Path, codec: Codec, codec_name: str, chunk_size: int = 500,
                    batch_size: int = 8, progress: bool = True) -> TokenizeSummary:
    corpus, out = Path(corpus), Path(out_dir)
    rows = read_manifest(corpus)
    if not rows:
        raise SpeechLMError(f"{corpus} has an empty manifest")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"corpus": str(corpus.resolve()), "codec": codec_name, "codec_id": codec.codec_id, "frame_rate": codec.config.frame_rate,
                "codes_per_frame": codec.config.codes_per_frame, "codebook_size": codec.config.codebook_size, "chunk_size": chunk_size}
    cfg = out / "tokenize_config.json"
    if cfg.exists() and json.loads(cfg.read_text()) != settings:
        raise SpeechLMError(f"{out} was tokenized with other settings; use a new directory")
    cfg.write_text(json.dumps(settings, indent=2))
    chunks = [rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)]
    done_before = 0
    bar = tqdm(total=len(rows), disable=not progress, desc="tokenize", unit="utt")
    for k, chunk in enumerate(chunks):
        if (out / f"index-{k:05d}.jsonl").exists():
            done_before += 1
            bar.update(len(chunk))
            continue
        _tokenize_chunk(corpus, out, k, chunk, codec, batch_size)
        bar.update(len(chunk))
    bar.close()
    index = []
    for k in range(len(chunks)):
        index += read_manifest(out / f"index-{k:05d}.jsonl")
    _write_jsonl(out / "index.jsonl", index)
    return TokenizeSummary(utterances=len(index), frames=sum(r["num_frames"] * len(r["offsets"]) for r in index), chunks_done_before=done_before)


@torch.inference_mode()
def _tokenize_chunk(corpus: Path, out: Path, k: int, rows: list[dict], codec: Codec, batch_size: int) -> None:
    # (row index, channel, audio) for every channel of every row, longest first for tight batches
    items = []
    for i, row in enumerate(rows):
        audio = load_audio(corpus / row["audio"], sample_rate=codec.sample_rate, mono=False)
        for ch in range(audio.shape[1]):
            items.append((i, ch, audio[:, ch]))
    order = sorted(range(len(items)), key=lambda j: -len(items[j][2]))
    codes_of: dict[tuple[int, int], np.ndarray] = {}
    for b in range(0, len(order), batch_size):
        batch = [items[j] for j in order[b : b + batch_size]]
        longest = max(len(a) for _, _, a in batch)
        wav = torch.zeros(len(batch), longest)
        for r, (_, _, a) in enumerate(batch):
            wav[r, : len(a)] = torch.from_numpy(a)
        codes = codec.encode(wav).numpy()
        for r, (i, ch, a) in enumerate(batch):
            codes_of[(i, ch)] = codes[r, : math.ceil(len(a) / codec.frame_length)]
    arrays, index, offset = [], [], 0
    for i, row in enumerate(rows):
        offsets = []
        channels = sorted(ch for (j, ch) in codes_of if j == i)
        for ch in channels:
            offsets.append(offset)
            arrays.append(codes_of[(i, ch)])
            offset += len(codes_of[(i, ch)])
        n = len(codes_of[(i, 0)])
        new = {**row, "chunk": k, "offsets": offsets, "num_frames": n}
        if "words" in row:
            new["words"] = _frames_for_words(row["words"], codec.config.frame_rate, n)
        if "channels" in row:
            new["channels"] = [{**c, "words": _frames_for_words(c["words"], codec.config.frame_rate, n)} for c in row["channels"]]
        index.append(new)
    tmp = out / f".codes-{k:05d}.tmp{os.getpid()}.npy"
    np.save(tmp, np.concatenate(arrays).astype(np.int16))
    os.replace(tmp, out / f"codes-{k:05d}.npy")
    _write_jsonl(out / f"index-{k:05d}.jsonl", index)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class TokenCorpus:
    """Read a tokenized corpus: ``corpus[i] -> (row, [codes (F, Q) int64 per channel])``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "index.jsonl").exists():
            raise SpeechLMError(f"no index.jsonl in {self.dir} (make it with speechlm data tokenize)")
        self.settings = json.loads((self.dir / "tokenize_config.json").read_text())
        self.rows = read_manifest(self.dir / "index.jsonl")
        self._chunks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _chunk(self, k: int) -> np.ndarray:
        if k not in self._chunks:
            self._chunks[k] = np.load(self.dir / f"codes-{k:05d}.npy", mmap_mode="r")
        return self._chunks[k]

    def __getitem__(self, i: int) -> tuple[dict, list[np.ndarray]]:
        row = self.rows[i]
        arr = self._chunk(row["chunk"])
        return row, [np.asarray(arr[o : o + row["num_frames"]], dtype=np.int64) for o in row["offsets"]]
