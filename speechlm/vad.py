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
up to its end, plus the STFT window's half), so the same network runs chunk by chunk
(:meth:`SpeechDetector.stream`, the server's speech gate): each chunk of ``L`` samples (a multiple of 320)
gives the ``L / 320`` frames whose audio has all arrived, the newest ending 20 ms before the chunk's end
(its STFT window reaches 12.5 ms past its end), equal to the offline frames; the state per row is the
last 520 samples, two feature frames and each block's last ``(kernel_size - 1) * dilation`` inputs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec.errors import SpeechLMError
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
        self.dilation = dilation
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, channels * expansion)
        self.down = nn.Linear(channels * expansion, channels)

    def forward(self, x: Tensor, past: Tensor | None = None) -> Tensor:
        """``past`` (B, C, pad): the inputs before ``x`` (None: zeros, the start of the audio)."""
        if past is None:
            h = self.depthwise(F.pad(x, (self.pad, 0)))
        else:  # a few frames: the taps by hand (oneDNN's convolution costs ~0.1 ms a call at this size)
            inputs = torch.cat([past, x], dim=2)  # (B, C, pad + n)
            taps = inputs.unfold(2, self.pad + 1, 1)[..., :: self.dilation]  # (B, C, n, K): each output's inputs (a view)
            h = (taps * self.depthwise.weight[None, :, None, 0]).sum(-1) + self.depthwise.bias[None, :, None]
        return x + self.down(F.gelu(self.up(self.norm(h.transpose(1, 2))))).transpose(1, 2)


@dataclass
class DetectorState:
    """Per row (B, ...): what :meth:`SpeechDetector.stream` keeps between chunks."""

    audio: Tensor  # (B, HISTORY) the last samples before the chunk
    features: Tensor  # (B, n_mels, 2) the last two feature frames (the stem's stride-2 window reaches back to them)
    blocks: list[Tensor]  # per block (B, C, (kernel_size - 1) * dilation): its last inputs
    fresh: Tensor  # (B,) bool: the row's next chunk is its first (its stream starts there)

    @property
    def batch_size(self) -> int:
        return int(self.fresh.shape[0])

    def reset_rows(self, rows: list[int] | Tensor) -> None:
        """Rows back to the start of a stream (new tensors: a tick's are inference tensors)."""
        chosen = torch.zeros(self.batch_size, dtype=torch.bool, device=self.fresh.device)
        chosen[torch.as_tensor(rows, dtype=torch.long, device=chosen.device)] = True
        keep = ~chosen

        def clear(t: Tensor) -> Tensor:
            return t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype)

        self.audio, self.features = clear(self.audio), clear(self.features)
        self.blocks = [clear(b) for b in self.blocks]
        self.fresh = self.fresh | chosen


# samples kept before a chunk: its first feature frame's window starts this far back (see SpeechDetector.stream)
HISTORY = 520
STREAM_HOP = 320  # samples per output frame


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

    @property
    def logit_threshold(self) -> float:
        """The threshold on logits (:meth:`forward`, :meth:`stream`): probability > threshold <=> logit > this."""
        t = self.config.threshold
        return float(np.log(t / (1 - t)))

    # -- frame by frame ---------------------------------------------------------------------

    def init_stream(self, batch_size: int, device: str | torch.device | None = None) -> DetectorState:
        """The state of ``batch_size`` rows at the start of their streams."""
        c, device = self.config, device or self.window.device
        if (c.hop_length, c.n_fft) != (160, 400):
            raise SpeechLMError(f"frame-by-frame speech detection needs hop_length 160 and n_fft 400, not {c.hop_length} and {c.n_fft}")
        zeros = lambda *shape: torch.zeros(batch_size, *shape, device=device)  # noqa: E731
        return DetectorState(
            audio=zeros(HISTORY), features=zeros(c.n_mels, 2), blocks=[zeros(c.channels, b.pad) for b in self.blocks],
            fresh=torch.ones(batch_size, dtype=torch.bool, device=device),
        )

    def stream(self, chunk: Tensor, state: DetectorState) -> tuple[Tensor, DetectorState]:
        """chunk (B, L) at 16 kHz, L a multiple of 320 (the rows' next audio) -> (speech logits (B, L / 320), state).

        After ``S`` samples of a row's stream it gives that row's frames ``S / 320 - L / 320 - 1`` to ``S / 320 - 2``
        (those whose feature windows have arrived) as :meth:`forward` gives them for the whole stream; a row's first
        chunk starts at frame -1, which does not exist: its logit is -inf (probability 0).

        Why: feature frame ``k`` (STFT centred on sample ``160 k``) reaches sample ``160 k + 200``; the chunk computes
        features ``S/160 - L/160 - 2`` .. ``S/160 - 3``, from sample ``S - L - 520`` on, and output frame ``j`` reads
        features ``2j - 2`` .. ``2j + 1``. A fresh row's samples before its first are the reflection of its first 200
        (the offline STFT's ``center`` padding), and its features -2, -1 and every block's inputs before frame 0 are
        zeros (the offline left padding)."""
        c = self.config
        length = chunk.shape[1]
        if length % STREAM_HOP or length < STREAM_HOP:
            raise SpeechLMError(f"the speech detector takes chunks of a multiple of {STREAM_HOP} samples, not {length}")
        chunk = chunk.to(self.window.device, torch.float32)
        fresh = state.fresh.to(chunk.device)
        starting = bool(fresh.any())  # (a check of a few rows: the work below for fresh rows costs more than it)
        history = state.audio
        if starting:
            mirrored = torch.cat([state.audio[:, : HISTORY - 200], chunk[:, 1:201].flip(1)], dim=1)
            history = torch.where(fresh[:, None], mirrored, state.audio)
        audio = torch.cat([history, chunk], dim=1)  # (B, HISTORY + L)
        n_features = length // c.hop_length
        windows = audio[:, : (n_features - 1) * c.hop_length + c.n_fft].unfold(1, c.n_fft, c.hop_length)  # (B, n, n_fft)
        spec = torch.fft.rfft(windows * self.window, dim=-1).abs().transpose(1, 2)  # (B, n_fft/2 + 1, n)
        features = (torch.log(torch.matmul(self.mel, spec) + 1e-6) + 6.0) / 4.0  # (B, n_mels, n)
        if starting:  # a fresh row's first two features are the offline left padding (zeros), and so are those before them
            first_two = torch.zeros(n_features, dtype=torch.bool, device=chunk.device)
            first_two[:2] = True
            features = features.masked_fill(fresh[:, None, None] & first_two[None, None, :], 0.0)
        stacked = torch.cat([state.features, features], dim=2)  # (B, n_mels, n + 2); a fresh row's state is zeros
        # the stem (kernel 4, stride 2) as one product (oneDNN's convolution costs ~0.2 ms a call at this size)
        pairs = stacked.unfold(2, 4, 2).transpose(1, 2).flatten(2)  # (B, L / 320, n_mels * 4)
        x = F.linear(pairs, self.stem.weight.flatten(1), self.stem.bias).transpose(1, 2)  # (B, C, L / 320): frames S/320 - L/320 - 1 .. S/320 - 2
        not_yet = None
        if starting:  # a fresh row's frame -1 is the padding of every block's input
            first = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            first[0] = True
            not_yet = fresh[:, None, None] & first[None, None, :]
        caches = []
        for block, cache in zip(self.blocks, state.blocks):
            x = x if not_yet is None else x.masked_fill(not_yet, 0.0)
            caches.append(torch.cat([cache, x], dim=2)[:, :, cache.shape[-1] + x.shape[-1] - block.pad :])
            x = block(x, cache)
        logits = self.head(self.norm(x.transpose(1, 2)))[..., 0]
        logits = logits if not_yet is None else logits.masked_fill(not_yet[:, 0], float("-inf"))
        new = DetectorState(audio=audio[:, audio.shape[1] - HISTORY :], features=stacked[:, :, -2:], blocks=caches,
                            fresh=torch.zeros_like(fresh))  # fmt: skip
        return logits, new

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
