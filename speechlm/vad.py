"""A speech detector (voice activity detection): is anyone speaking in this audio, and when?

The speech LM heard only speech in training, so whatever it is given it transcribes as a sentence:
a fan's noise, a tone or a click train comes out as "Set a timer for two." (and the server's answer
assist would answer it). The level does not tell speech from noise (a loud fan passes any energy
gate), so this small model decides from the sound's shape: a causal convolutional network over
log-mel features that gives each 20 ms frame a probability of speech. It was trained
(``speechlm train vad``, :mod:`speechlm.training.vad_train`) on synthetic voices and real read speech,
clean and under noise, against noise alone (colored noise, hum, tones, buzzes, clicks, modulated and
band-limited noise, music-like notes, frequency sweeps) at any level. ``SpeechPipeline.asr`` gives no transcript for audio in which it
hears less than ``min_speech_seconds`` of speech (``Generation.speech_detector``).

Shapes: audio (B, T) at 16 kHz -> log-mel (B, n_mels, F) at 100 Hz -> encoder (B, C, F/2) -> speech
logits (B, F/2), one per 20 ms frame. Every layer is causal (a frame's probability depends on the audio
up to its end, plus the STFT window's half), so the same network can run frame by frame.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec.losses import mel_filterbank
from .model_files import load_model_files, save_model_files

CONFIG_FILE = "vad_config.json"
WEIGHTS_FILE = "vad.safetensors"


@dataclass
class DetectorConfig:
    sample_rate: int = 16_000
    n_fft: int = 400
    hop_length: int = 160  # 100 feature frames a second; the stem halves it (a frame = 20 ms)
    n_mels: int = 40
    channels: int = 64
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 1, 2, 4, 8])  # one block each
    kernel_size: int = 5
    expansion: int = 2
    threshold: float = 0.5  # a frame is speech when its probability passes this
    min_speech_seconds: float = 0.1  # audio with less speech than this holds none (a short word: "Two." is 0.1-0.2 s)
    # the first frames are not counted: with no sound before them to compare with (and the STFT's edge), a steady
    # tone from the file's first sample looked like a word's onset there (0.12 s of speech in a 440 Hz sine)
    skip_frames: int = 3

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def frame_seconds(self) -> float:
        return 2 * self.hop_length / self.sample_rate


class _CausalBlock(nn.Module):
    """Depthwise causal dilated conv, LayerNorm, pointwise MLP, residual. (B, C, F) -> (B, C, F)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, expansion: int):
        super().__init__()
        self.pad = (kernel_size - 1) * dilation
        self.depthwise = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, channels * expansion)
        self.down = nn.Linear(channels * expansion, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.depthwise(F.pad(x, (self.pad, 0))).transpose(1, 2)
        return x + self.down(F.gelu(self.up(self.norm(h)))).transpose(1, 2)


class SpeechDetector(nn.Module):
    def __init__(self, config: DetectorConfig | None = None):
        super().__init__()
        self.config = config = config or DetectorConfig()
        self.register_buffer("mel", mel_filterbank(config.sample_rate, config.n_fft, config.n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        c = config.channels
        self.stem = nn.Conv1d(config.n_mels, c, 4, stride=2)
        self.blocks = nn.ModuleList(_CausalBlock(c, config.kernel_size, d, config.expansion) for d in config.dilations)
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 1)

    def features(self, audio: Tensor) -> Tensor:
        """audio (B, T) float -> log-mel (B, n_mels, F), F = T // hop_length + 1, on a fixed scale: the level
        is part of what the model hears (digital silence is no speech), not all of it (training draws every level)."""
        c = self.config
        spec = torch.stft(audio.float(), c.n_fft, c.hop_length, window=self.window, center=True, return_complex=True).abs()
        return (torch.log(torch.matmul(self.mel, spec) + 1e-6) + 6.0) / 4.0

    def forward(self, audio: Tensor) -> Tensor:
        """audio (B, T) at 16 kHz -> speech logits (B, F') per 20 ms frame, F' = (T // hop_length + 1) // 2."""
        x = self.stem(F.pad(self.features(audio), (2, 0)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.transpose(1, 2)))[..., 0]

    @staticmethod
    def frames(samples: int | Tensor, config: DetectorConfig) -> int | Tensor:
        """Output frames for ``samples`` of audio (what :meth:`forward` gives; the true ones of a padded row)."""
        return (samples // config.hop_length + 1) // 2

    @torch.inference_mode()
    def probabilities(self, audios: list[np.ndarray]) -> list[np.ndarray]:
        """Each audio (T_k,) at 16 kHz -> its frames' speech probabilities (F_k,), the audios as one batch."""
        if not audios:
            return []
        longest = max(len(a) for a in audios)
        batch = torch.zeros(len(audios), max(longest, self.config.n_fft))
        for i, a in enumerate(audios):
            batch[i, : len(a)] = torch.from_numpy(np.asarray(a, np.float32))
        probs = torch.sigmoid(self(batch.to(self.window.device))).float().cpu().numpy()
        return [p[: self.frames(len(a), self.config)] for p, a in zip(probs, audios)]

    def speech_seconds(self, audios: list[np.ndarray], level: float | None = None) -> list[float]:
        """Seconds of each audio heard as speech (frames over the threshold, but the first ``skip_frames``); ``level``:
        each audio heard peak-normalized to it (as the ASR hears it), None = as given."""
        c = self.config
        if level is not None:
            audios = [a * (level / max(float(np.abs(a).max()), 1e-9)) for a in audios]
        return [float((p[c.skip_frames:] > c.threshold).sum()) * c.frame_seconds for p in self.probabilities(audios)]

    def has_speech(self, audios: list[np.ndarray], level: float | None = None) -> list[bool]:
        """Whether each audio holds at least ``min_speech_seconds`` of speech (``level``: as in :meth:`speech_seconds`)."""
        return [s >= self.config.min_speech_seconds for s in self.speech_seconds(audios, level)]

    # -- files ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return save_model_files(self, self.config.to_json(), directory, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike) -> SpeechDetector:
        return load_model_files(path_or_name, CONFIG_FILE, WEIGHTS_FILE, "speech detector", lambda c: cls(DetectorConfig(**c)))
