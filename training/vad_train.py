"""Train the speech detector (``speechlm.vad``): each 20 ms frame, speech or not, from its sound alone.

    speechlm train vad --data data/synth-vad --librispeech ../shared/data/librispeech-251 --out runs/vad

Every example is a crop of ``crop_seconds``, drawn fresh from the seeded generator of its step (so a
resumed run takes the same batches):

* ``noise_only_share`` of them hold no speech: one or two of :data:`TRAIN_NOISES` (colored noise, mains
  hum, tones, harmonic buzzes, clicks, slowly modulated and band-limited noise, music-like notes, frequency
  sweeps), or digital silence, at
  an RMS level drawn in ``noise_level_db`` dBFS, sometimes switched on or off part way; every frame is 0.
* the rest hold one speech clip (a synth corpus's clips, and the real read speech of the LibriSpeech
  speakers below 7000: the benchmark's held-out speakers are 7000 and up) at an active level drawn in
  ``speech_level_db``, placed anywhere in the crop (a lead of silence, a cut end), with noise under it
  at a signal-to-noise ratio drawn in ``snr_db`` (``noisy_share`` of them) or nothing. A frame is speech
  where the clean clip's 20 ms RMS is within 30 dB of its loud frames (gaps under 160 ms closed, a frame
  added at each end): the label comes from the clean clip, so speech under noise is still speech.

The loss is the frames' binary cross-entropy. Every ``eval_every`` steps OUT/log.jsonl gets the frame
accuracy on a fixed held-out batch (held-out clips, the same draws each time) and how often a crop
without speech is heard as holding some (``false_speech``) and a crop with speech as holding none
(``missed_speech``). OUT/checkpoint.pt is written atomically every ``checkpoint_minutes``; the final model
goes to OUT/model (``SpeechDetector.save_pretrained``).

:data:`HELD_OUT_NOISES` (a siren, rain, a revving engine) are never trained on: benchmarks/vad.py
measures the detector on them as noise it has not met.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..codec.audio import SAMPLE_RATE, load_audio
from ..codec.errors import SpeechLMError
from ..vad import DetectorConfig, SpeechDetector
from .noises import HELD_OUT_NOISES, TRAIN_NOISES, noise, noise_mix  # noqa: F401  (HELD_OUT_NOISES, noise: the benchmarks')
from .rooms import active_rms
from .small_trainer import SmallTrainer

FRAME = 320  # samples per detector frame (20 ms)


@dataclass
class VadTrainConfig:
    data: list[str]  # synth corpus directories (manifest.jsonl)
    out: str
    librispeech: str | None = None  # a folder of LibriSpeech .flac files (SPEAKER-CHAPTER-UTT); speakers < 7000 train
    max_clips: int | None = None  # at most this many clips of each source (None = all)
    held_out: int = 64  # clips kept for the held-out batch
    crop_seconds: float = 4.0
    noise_only_share: float = 0.35
    noisy_share: float = 0.7
    snr_db: tuple[float, float] = (-5.0, 30.0)
    speech_level_db: tuple[float, float] = (-45.0, -6.0)
    noise_level_db: tuple[float, float] = (-70.0, -5.0)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    eval_every: int = 250
    checkpoint_minutes: float = 3.0
    seed: int = 0
    threads: int = 1
    model: dict = field(default_factory=dict)  # DetectorConfig fields

    def to_json(self) -> dict:
        return asdict(self)


# -- labels and examples -----------------------------------------------------------------------


def speech_frames(clean: np.ndarray, floor_db: float = -30.0, close_frames: int = 8) -> np.ndarray:
    """(T,) clean speech -> (T // FRAME,) bool: frames within ``floor_db`` of its loud frames (the 95th
    percentile of the 20 ms RMS) and 6 dB above its quiet ones (the 5th: a real recording's room), gaps
    shorter than ``close_frames`` closed, one frame added at each end."""
    frames = clean[: len(clean) // FRAME * FRAME].reshape(-1, FRAME)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    if not len(rms) or rms.max() <= 0:
        return np.zeros(len(rms), bool)
    loud, quiet = np.percentile(rms, [95, 5])
    active = rms > max(loud * 10 ** (floor_db / 20), 2 * quiet, 1e-5)
    idx = np.flatnonzero(active)
    for a, b in zip(idx[:-1], idx[1:]):
        if 1 < b - a <= close_frames:
            active[a:b] = True
    grown = active.copy()
    grown[1:] |= active[:-1]
    grown[:-1] |= active[1:]
    return grown


def example(clip: np.ndarray | None, c: VadTrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One crop: (crop samples,) audio and (crop frames,) float labels; ``clip`` None = no speech (see the module doc)."""
    n = int(round(c.crop_seconds * SAMPLE_RATE)) // FRAME * FRAME
    speech = np.zeros(n, np.float32)
    if clip is not None:
        overlap = min(len(clip), n, int(0.5 * SAMPLE_RATE))
        at = int(rng.integers(overlap - len(clip), n - overlap + 1))  # where the clip starts in the crop (may be before it)
        piece = clip[max(0, -at): max(0, -at) + n - max(0, at)]
        speech[max(0, at): max(0, at) + len(piece)] = piece
        level = active_rms(speech)
        speech *= 10 ** (rng.uniform(*c.speech_level_db) / 20) / max(level, 1e-9)
    labels = speech_frames(speech).astype(np.float32)
    if clip is None or rng.random() < c.noisy_share:
        if clip is None:
            level = 10 ** (rng.uniform(*c.noise_level_db) / 20)
        else:
            level = active_rms(speech) * 10 ** (-rng.uniform(*c.snr_db) / 20)
        background = noise_mix(TRAIN_NOISES, n, rng) * level
        if clip is None and rng.random() < 0.3:  # the noise starts or stops part way
            cut = int(rng.integers(0, n))
            background[slice(cut, None) if rng.random() < 0.5 else slice(0, cut)] = 0
        if clip is None and rng.random() < 0.1:
            background[:] = 0  # digital silence
        speech = speech + background
    peak = float(np.abs(speech).max())
    return (speech / peak if peak > 1 else speech).astype(np.float32), labels


# -- clips -------------------------------------------------------------------------------------


def load_clips(c: VadTrainConfig) -> list[np.ndarray]:
    """Every training clip as int16: the synth corpora's, then LibriSpeech speakers < 7000 (``max_clips`` of each source)."""
    clips: list[np.ndarray] = []
    for corpus in c.data:
        manifest = Path(corpus) / "manifest.jsonl"
        if not manifest.is_file():
            raise SpeechLMError(f"{corpus} is not a synth corpus (no manifest.jsonl)")
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        clips += [_int16(load_audio(Path(corpus) / r["audio"])) for r in rows[: c.max_clips]]
    if c.librispeech:
        files = sorted(p for p in Path(c.librispeech).glob("*.flac") if int(p.name.split("-")[0]) < 7000)
        if not files:
            raise SpeechLMError(f"no LibriSpeech .flac files of speakers below 7000 in {c.librispeech}")
        clips += [_int16(load_audio(p)) for p in files[: c.max_clips]]
    if c.held_out < 1:
        raise SpeechLMError(f"held_out must be >= 1 (the held-out batch), got {c.held_out}")
    if len(clips) <= c.held_out:
        raise SpeechLMError(f"{len(clips)} clips: need more than held_out={c.held_out}")
    return clips


def _int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


def batch(clips: list[np.ndarray], c: VadTrainConfig, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` examples -> audio (B, T), labels (B, T // FRAME)."""
    audio, labels = zip(*(example(None if rng.random() < c.noise_only_share else clips[rng.integers(len(clips))].astype(np.float32) / 32767, c, rng)
                          for _ in range(size)))
    return torch.from_numpy(np.stack(audio)), torch.from_numpy(np.stack(labels))


class VadTrainer(SmallTrainer):
    def __init__(self, config: VadTrainConfig):
        self.config = c = config
        self.out = Path(c.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(c.to_json(), indent=2))
        torch.set_num_threads(c.threads)
        clips = load_clips(c)
        order = np.random.default_rng(c.seed).permutation(len(clips))
        self.held_clips = [clips[i] for i in order[: c.held_out]]
        self.train_clips = [clips[i] for i in order[c.held_out:]]
        self.held = batch(self.held_clips, c, np.random.default_rng([c.seed, 10**9]), 4 * c.held_out)
        torch.manual_seed(c.seed)  # the initial weights too: a run is a function of its config
        self.model = SpeechDetector(DetectorConfig(**c.model))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.step = 0
        self.resume()

    def loss(self, audio: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(audio)[:, : labels.shape[1]]
        return F.binary_cross_entropy_with_logits(logits, labels)

    def train_step(self) -> float:
        """One step on batch ``self.step``; returns its loss."""
        c = self.config
        audio, labels = batch(self.train_clips, c, np.random.default_rng([c.seed, self.step]), c.batch_size)
        self.model.train()
        return self.optimize(self.loss(audio, labels))

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Frame accuracy, and the crops heard wrongly as a whole, on the held-out batch."""
        self.model.eval()
        audio, labels = self.held
        probs = torch.sigmoid(self.model(audio)[:, : labels.shape[1]])
        d = self.model.config
        said = (probs > d.threshold).sum(1) * d.frame_seconds >= d.min_speech_seconds
        truth = labels.sum(1) * d.frame_seconds >= d.min_speech_seconds
        return {"held_loss": float(F.binary_cross_entropy(probs, labels)),
                "frame_accuracy": float(((probs > d.threshold) == (labels > 0.5)).float().mean()),
                "false_speech": float((said & ~truth).sum() / max(1, int((~truth).sum()))),
                "missed_speech": float((~said & truth).sum() / max(1, int(truth.sum())))}
