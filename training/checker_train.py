"""Train the pronunciation checker (``speechlm.checker``): CTC phoneme recognition on the TTS
teacher's speech, plain and through the codec (what the speech LM's candidates sound like).

    speechlm train checker --data data/synth-assistant data/synth-assistant2 --codec codec-16k --out runs/checker

1. ``prepare``: reads each synth corpus's manifest (only voices starting with ``voice_prefix``, or
   any of its comma-separated prefixes), loads the audio, asks espeak-ng for the phonemes of its
   text in the record's language (the teacher's own pronunciation, so targets and audio agree;
   Piper voices phonemize with espeak-ng too), and adds a copy of each clip whose
   voice starts with ``codec_voice_prefix`` (the TTS teacher's) encoded and decoded by ``codec``. Cached in OUT/data/ (int16 samples in one ``np.save`` array and
   a JSON index, :func:`save_clips`; built once, a resumed run reuses it).
2. ``train``: AdamW with warm-up and cosine decay, SpecAugment-style masks, CTC loss per phoneme;
   the batch of step s is drawn from a generator seeded by (seed, s), so a resumed run takes the
   same batches; OUT/checkpoint.pt is written atomically every ``checkpoint_minutes``; every
   ``eval_every`` steps the phoneme error rate on the held-out clips (plain and through the codec)
   goes to OUT/log.jsonl. The final model goes to OUT/model (``PronunciationChecker.save_pretrained``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checker import BLANK, UNKNOWN, CheckerConfig, PronunciationChecker, _pad
from ..codec.audio import load_audio
from ..codec.errors import SpeechLMError
from .small_trainer import SmallTrainer
from .teachers import espeak_language


@dataclass
class CheckerTrainConfig:
    data: list[str]  # synth corpus directories (manifest.jsonl)
    out: str
    codec: str | None = "codec-16k"  # add a copy of clips through this codec (None = plain only)
    voice_prefix: str = "espeak:en-us"  # records whose voice starts with this (comma-separated: any of these)
    codec_voice_prefix: str = "espeak:en-us"  # the codec copies: of the records whose voice starts with this (or any of these)
    max_seconds: float = 10.0  # longer clips are left out
    held_out: int = 200  # clips (plain + codec copy) kept for the phoneme error rate
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    time_masks: int = 2
    time_mask_frames: int = 12
    freq_masks: int = 2
    freq_mask_bins: int = 12
    eval_every: int = 250
    checkpoint_minutes: float = 3.0
    seed: int = 0
    threads: int = 2
    limit: int | None = None  # at most this many records per corpus (tests)
    model: dict = field(default_factory=dict)  # CheckerConfig overrides (channels, blocks, ...)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Clip:
    audio: np.ndarray  # (T,) int16 at 16 kHz
    phonemes: list[str]
    codec: bool  # the codec's copy


def prepare(config: CheckerTrainConfig) -> list[Clip]:
    """The clips of ``config.data`` (module doc, step 1)."""
    from .espeak import Espeak

    espeak = Espeak.instance()
    records = []
    for directory in config.data:
        manifest = Path(directory) / "manifest.jsonl"
        if not manifest.is_file():
            raise SpeechLMError(f"no manifest.jsonl in {directory} (a `speechlm data synth` corpus)")
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["voice"].startswith(_prefixes(config.voice_prefix)) and r.get("duration", 0) <= config.max_seconds]
        records += [(Path(directory), r) for r in rows[: config.limit]]
    if not records:
        raise SpeechLMError(f"no records with a voice starting {config.voice_prefix!r} in {config.data}")
    codec = None
    if config.codec:
        from ..codec.model import Codec

        codec = Codec.from_pretrained(config.codec).eval()
    clips = []
    for k, (directory, r) in enumerate(records):
        if k and k % 1000 == 0:
            print(f"prepared {k} of {len(records)} records", flush=True)
        audio = load_audio(directory / r["audio"])
        phonemes = espeak.synthesize(r["text"], espeak_language(r["voice"])).phonemes
        if not phonemes:
            continue
        clips.append(Clip(_int16(audio), phonemes, False))
        if codec is not None and r["voice"].startswith(_prefixes(config.codec_voice_prefix)):
            with torch.inference_mode():
                x = torch.from_numpy(audio)[None]
                decoded = codec.decode(codec.encode(x))[0, : len(audio)].numpy()
            clips.append(Clip(_int16(decoded), phonemes, True))
    return clips


CACHE_META = "clips.json"


def save_clips(clips: list[Clip], phonemes: list[str], directory: Path) -> None:
    """The clip cache: every clip's int16 samples end to end in ``audio.npy`` (written with ``np.save``,
    no pickled copies: 50 k clips are ~5 GB) and ``clips.json`` (offsets, phonemes, codec flags, the
    vocabulary), written last, so a cache without it is incomplete and is built again."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CACHE_META).unlink(missing_ok=True)
    offsets = np.cumsum([0] + [len(c.audio) for c in clips])
    audio = np.lib.format.open_memmap(directory / "audio.npy", mode="w+", dtype=np.int16, shape=(int(offsets[-1]),))
    for c, start in zip(clips, offsets):
        audio[start : start + len(c.audio)] = c.audio
    audio.flush()
    del audio
    meta = {"offsets": offsets.tolist(), "phonemes": [c.phonemes for c in clips], "codec": [c.codec for c in clips], "vocabulary": phonemes}
    tmp = directory / (CACHE_META + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(directory / CACHE_META)


def load_clips(directory: Path) -> dict:
    """{"clips": [Clip], "vocabulary": [...]} from :func:`save_clips`' directory; the audio stays on disk
    (memory-mapped) until a batch reads it."""
    meta = json.loads((directory / CACHE_META).read_text())
    audio = np.load(directory / "audio.npy", mmap_mode="r")
    offsets = meta["offsets"]
    clips = [Clip(audio[a:b], p, c) for a, b, p, c in zip(offsets, offsets[1:], meta["phonemes"], meta["codec"])]
    return {"clips": clips, "vocabulary": meta["vocabulary"]}


def _prefixes(text: str) -> tuple[str, ...]:
    """``"espeak:,piper:"`` -> ``("espeak:", "piper:")`` (what ``str.startswith`` takes)."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


def vocabulary(clips: list[Clip]) -> list[str]:
    """[blank, unk, phonemes by count (most frequent first)]."""
    counts = Counter(p for c in clips for p in c.phonemes)
    return [BLANK, UNKNOWN, *sorted(counts, key=lambda p: (-counts[p], p))]


def phoneme_error_rate(model: PronunciationChecker, clips: list[Clip]) -> float:
    errors = total = 0
    for c in clips:
        heard = model.recognize(c.audio.astype(np.float32) / 32767)
        errors += _edit_distance(heard, c.phonemes)
        total += len(c.phonemes)
    return errors / max(1, total)


def _edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


class CheckerTrainer(SmallTrainer):
    def __init__(self, config: CheckerTrainConfig):
        self.config = config
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(config.to_json(), indent=2))
        torch.set_num_threads(config.threads)
        legacy = self.out / "data.pt"  # runs before the clip cache was a directory
        if legacy.is_file():
            data = torch.load(legacy, weights_only=False)
        else:
            if not (self.out / "data" / CACHE_META).is_file():
                clips = prepare(config)
                save_clips(clips, vocabulary(clips), self.out / "data")
            data = load_clips(self.out / "data")
        clips: list[Clip] = data["clips"]
        order = random.Random(config.seed).sample(range(len(clips)), len(clips))
        held = set([i for i in order if not clips[i].codec][: config.held_out])  # the first plain clips in a seeded order
        held |= {i + 1 for i in held if i + 1 < len(clips) and clips[i + 1].codec}  # each held clip's codec copy too
        self.train_clips = [c for i, c in enumerate(clips) if i not in held]
        self.held_clips = [c for i, c in enumerate(clips) if i in held]
        self.model = PronunciationChecker(CheckerConfig(phonemes=data["vocabulary"], **config.model))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.resume()

    def train_step(self) -> float:
        """One step on batch ``self.step``; returns the loss (mean CTC nats per phoneme)."""
        c = self.config
        rng = np.random.default_rng([c.seed, self.step])
        batch = [self.train_clips[i] for i in rng.integers(len(self.train_clips), size=c.batch_size)]
        audio, lengths = _pad([b.audio.astype(np.float32) / 32767 for b in batch], self.model.config.n_fft)
        self.model.train()
        feats, frames = self.model.features(audio, lengths)
        feats = _mask(feats, frames, rng, c)
        logp, out = self.model(feats, frames)
        targets = [torch.tensor(self.model.phoneme_ids(b.phonemes)) for b in batch]
        target_lengths = torch.tensor([len(t) for t in targets])
        nll = F.ctc_loss(logp.transpose(0, 1), torch.cat(targets), out, target_lengths, reduction="none", zero_infinity=True)
        loss = (nll / target_lengths).mean()
        return self.optimize(loss)

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        plain = [c for c in self.held_clips if not c.codec]
        coded = [c for c in self.held_clips if c.codec]
        result = {"per_plain": phoneme_error_rate(self.model, plain)}
        if coded:
            result["per_codec"] = phoneme_error_rate(self.model, coded)
        return result


def _mask(feats: torch.Tensor, frames: torch.Tensor, rng: np.random.Generator, c: CheckerTrainConfig) -> torch.Tensor:
    """SpecAugment: zero ``time_masks`` spans of frames and ``freq_masks`` bands of mel bins per row."""
    feats = feats.clone()
    for b in range(feats.shape[0]):
        n = int(frames[b])
        for _ in range(c.time_masks):
            w = int(rng.integers(0, c.time_mask_frames + 1))
            s = int(rng.integers(0, max(1, n - w)))
            feats[b, :, s : s + w] = 0
        for _ in range(c.freq_masks):
            w = int(rng.integers(0, c.freq_mask_bins + 1))
            s = int(rng.integers(0, max(1, feats.shape[1] - w)))
            feats[b, s : s + w, :] = 0
    return feats
