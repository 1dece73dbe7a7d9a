"""A pronunciation checker: how well does a piece of speech say the phonemes of a text?

The speech LM hears its own speech as it meant it (its ASR, or its likelihood of the text
given its speech, scores nearly every candidate of a sentence as perfect), so it cannot tell
which of several renderings of a sentence a listener will understand.  This small model can:
a CTC phoneme recognizer over log-mel features, trained on the TTS teacher's speech (plain
and through the codec, ``speechlm train checker``), with no language model in it, so it
hears sounds, not the words it expects.  ``PronunciationChecker.score`` gives how far the
text's phonemes (espeak-ng's IPA, the teacher's own pronunciation) fall short of what it hears
best in each audio, in CTC nats per phoneme; TTS with ``Generation.candidates > 1`` keeps the
candidate with the lowest score.

Shapes: audio (B, T) at 16 kHz -> log-mel (B, n_mels, F) at 100 Hz -> encoder (B, C, F/2)
-> log-probabilities (B, F/2, V) over the phoneme vocabulary (index 0 = the CTC blank).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec.errors import SpeechLMError
from .codec.losses import mel_filterbank
from .ctc_edits import edit_nlls
from .lm.model import ctc_greedy
from .model_files import load_model_files, save_model_files

CONFIG_FILE = "checker_config.json"
WEIGHTS_FILE = "checker.safetensors"
BLANK = "<blank>"
UNKNOWN = "<unk>"


@dataclass
class CheckerConfig:
    sample_rate: int = 16_000
    n_fft: int = 400
    hop_length: int = 160  # 100 feature frames a second; the encoder halves it
    n_mels: int = 80
    channels: int = 192
    blocks: int = 6
    kernel_size: int = 9
    expansion: int = 2
    voice: str = "en-us"  # espeak-ng voice whose phonemes the checker hears (the TTS teacher's)
    phonemes: list[str] = field(default_factory=lambda: [BLANK, UNKNOWN])  # vocabulary; 0 = blank

    def to_json(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    """ConvNeXt-style 1-D block: depthwise conv, LayerNorm, pointwise MLP, residual. (B, C, F) -> (B, C, F)."""

    def __init__(self, channels: int, kernel_size: int, expansion: int):
        super().__init__()
        self.depthwise = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, channels * expansion)
        self.down = nn.Linear(channels * expansion, channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.depthwise(x * mask).transpose(1, 2)
        h = self.down(F.gelu(self.up(self.norm(h)))).transpose(1, 2)
        return x + h * mask


class PronunciationChecker(nn.Module):
    def __init__(self, config: CheckerConfig):
        super().__init__()
        self.config = config
        self.index = {p: i for i, p in enumerate(config.phonemes)}
        self.register_buffer("mel", mel_filterbank(config.sample_rate, config.n_fft, config.n_mels), persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        c = config.channels
        self.stem = nn.Conv1d(config.n_mels, c, 5, stride=2, padding=2)
        self.blocks = nn.ModuleList(_Block(c, config.kernel_size, config.expansion) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, len(config.phonemes))

    # -- features ------------------------------------------------------------------------------

    def features(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """audio (B, T) float, lengths (B,) samples -> log-mel (B, n_mels, F), normalized per utterance
        over its own frames (so the level does not matter), and frame counts (B,)."""
        c = self.config
        spec = torch.stft(audio.float(), c.n_fft, c.hop_length, window=self.window, center=True, return_complex=True).abs()
        feats = torch.log(torch.matmul(self.mel, spec) + 1e-5)
        frames = (lengths // c.hop_length + 1).clamp(max=feats.shape[-1])
        mask = (torch.arange(feats.shape[-1], device=audio.device)[None] < frames[:, None]).to(feats.dtype)[:, None]
        count = mask.sum(-1, keepdim=True).clamp(min=1)
        mean = (feats * mask).sum(-1, keepdim=True) / count
        std = (((feats - mean) ** 2 * mask).sum(-1, keepdim=True) / count).sqrt().clamp(min=1e-3)
        return (feats - mean) / std * mask, frames

    def forward(self, feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """log-mel (B, n_mels, F), frames (B,) -> log-probabilities (B, F', V), output lengths (B,)."""
        x = self.stem(feats)
        out = (frames + 1) // 2
        mask = (torch.arange(x.shape[-1], device=x.device)[None] < out[:, None]).to(x.dtype)[:, None]
        x = x * mask
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x.transpose(1, 2))).log_softmax(-1), out

    # -- phonemes ------------------------------------------------------------------------------

    def phoneme_ids(self, phonemes: list[str]) -> list[int]:
        unknown = self.index[UNKNOWN]
        return [self.index.get(p, unknown) for p in phonemes]

    def text_phonemes(self, text: str) -> list[str]:
        """The phonemes espeak-ng's ``config.voice`` says for ``text`` (needs espeak-ng)."""
        return text_phonemes(text, self.config.voice)

    # -- use -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, audios: list[np.ndarray], phonemes: list[str]) -> list[float]:
        """How far each audio (T_k,) at 16 kHz falls short of saying ``phonemes``: the CTC negative
        log-likelihood of ``phonemes`` less that of the checker's own best path through the audio, in
        nats per phoneme (0 = it hears exactly them; lower = clearer). Audio too short to hold them
        scores ``inf``."""
        if not phonemes:
            raise SpeechLMError("nothing to check: the text has no phonemes")
        audio, lengths = _pad(audios, self.config.n_fft)
        logp, out = self(*self.features(audio, lengths))
        target = torch.tensor(self.phoneme_ids(phonemes))
        targets = target[None].expand(len(audios), -1)
        nll = F.ctc_loss(logp.transpose(0, 1), targets, out, torch.full((len(audios),), len(target)), reduction="none", zero_infinity=False)
        valid = torch.arange(logp.shape[1])[None] < out[:, None]
        best = (logp.max(-1).values * valid).sum(-1)  # log p of each row's best path
        return [float(x) / len(target) for x in nll + best]

    @torch.inference_mode()
    def log_probs(self, audio: np.ndarray) -> Tensor:
        """audio (T,) at 16 kHz -> log-probabilities (F', V) over the phonemes (50 a second)."""
        batch, lengths = _pad([audio], self.config.n_fft)
        logp, out = self(*self.features(batch, lengths))
        return logp[0, : int(out[0])]

    @torch.inference_mode()
    def sequence_nll(self, log_probs: Tensor, phoneme_lists: list[list[str]]) -> list[float]:
        """The CTC negative log-likelihood (nats, whole utterance) of each phoneme list given the
        checker's ``log_probs`` (F', V) of one audio (:meth:`log_probs`); one batched CTC."""
        if not phoneme_lists:
            return []
        if any(not p for p in phoneme_lists):
            raise SpeechLMError("sequence_nll: an empty phoneme list")
        targets = [torch.tensor(self.phoneme_ids(p)) for p in phoneme_lists]
        n = len(targets)
        return F.ctc_loss(log_probs[:, None].expand(-1, n, -1), torch.cat(targets), torch.full((n,), log_probs.shape[0]),
                          torch.tensor([len(t) for t in targets]), reduction="none", zero_infinity=False).tolist()

    @torch.inference_mode()
    def edit_nlls(self, log_probs: Tensor, reference: list[str], edits: list[tuple[int, Sequence[str], int]]) -> list[float]:
        """:meth:`sequence_nll` of each phoneme list ``reference[:a] + middle + reference[len - b:]`` for
        (a, middle, b) in ``edits``, spliced from one pass over ``reference`` (:mod:`speechlm.ctc_edits`)."""
        if not edits:
            return []
        if any(a + b + len(m) == 0 for a, m, b in edits):
            raise SpeechLMError("edit_nlls: an empty phoneme list")
        ids: dict[tuple[str, ...], tuple[int, ...]] = {}  # each middle converted once (edits share them)
        for _, m, _ in edits:
            m = tuple(m)
            if m not in ids:
                ids[m] = tuple(self.phoneme_ids(list(m)))
        return edit_nlls(log_probs, self.phoneme_ids(reference), [(a, ids[tuple(m)], b) for a, m, b in edits], blank=self.index[BLANK])

    def count_heard(self, log_probs: Tensor) -> int:
        """How many phonemes the checker's greedy reading of ``log_probs`` (F', V) holds."""
        return len(ctc_greedy(log_probs.argmax(-1).tolist(), blank=self.index[BLANK]))

    @staticmethod
    def best_path_nll(log_probs: Tensor) -> float:
        """-log p of the checker's own best path through ``log_probs`` (F', V)."""
        return -float(log_probs.max(-1).values.sum())

    @torch.inference_mode()
    def recognize(self, audio: np.ndarray) -> list[str]:
        """Greedy CTC phonemes heard in ``audio`` (T,) at 16 kHz."""
        batch, lengths = _pad([audio], self.config.n_fft)
        logp, out = self(*self.features(batch, lengths))
        labels = ctc_greedy(logp[0, : int(out[0])].argmax(-1).tolist(), blank=self.index[BLANK])
        return [self.config.phonemes[i] for i in labels]

    # -- files ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        # float16 on disk (half the size; scoring in float32 from them differs by ~1e-3 nats)
        return save_model_files(self, self.config.to_json(), directory, CONFIG_FILE, WEIGHTS_FILE, torch.float16)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike) -> PronunciationChecker:
        return load_model_files(path_or_name, CONFIG_FILE, WEIGHTS_FILE, "pronunciation checker", lambda c: cls(CheckerConfig(**c)))


def text_phonemes(text: str, voice: str = "en-us") -> list[str]:
    """espeak-ng's IPA phonemes (pauses left out) for ``text`` in ``voice``."""
    from .training.espeak import Espeak

    return Espeak.instance().synthesize(text, voice).phonemes


def _pad(audios: list[np.ndarray], min_length: int = 1) -> tuple[Tensor, Tensor]:
    """list of (T_k,) -> (B, max(max T, min_length)) zero-padded float32, lengths (B,) (the true ones)."""
    if not audios:
        raise SpeechLMError("no audio to check")
    lengths = torch.tensor([len(a) for a in audios])
    batch = torch.zeros(len(audios), max(min_length, int(lengths.max())))
    for i, a in enumerate(audios):
        batch[i, : len(a)] = torch.from_numpy(np.asarray(a, np.float32))
    return batch, lengths
