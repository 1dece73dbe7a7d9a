"""EnCodec (24 kHz) as an alternative speech tokenizer, when its package and weights are here.

speechlm never downloads weights: pass the path of a local EnCodec checkpoint
(``encodec_24khz-d7cc33bc.th`` from the EnCodec release, or any ``state_dict`` of
``EncodecModel.encodec_model_24khz()``).  Install the package without its dependencies
(``pip install --no-deps encodec``): its metadata asks for torchaudio, which would pull a
CUDA build of torch; we stub torchaudio for the import when it is not importable (EnCodec
uses it only for file I/O helpers that we do not call).

The API mirrors :class:`speechlm.codec.model.Codec` where it matters to the LM: 16 kHz
audio in and out, ``encode(wav (B, T)) -> codes (B, F, Q)``, ``decode(codes) -> wav``,
``frame_rate``, ``codebook_size``, ``codes_per_frame`` and a ``codec_id``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, resample
from .errors import DependencyError, SpeechLMError

ENCODEC_RATE = 24_000
BANDWIDTHS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # kbps -> codebooks


def _import_encodec():
    """Import EncodecModel; stub torchaudio for the import only when it cannot be imported.

    The stub is removed from ``sys.modules`` right after, so other libraries (transformers
    probes for torchaudio) never see it.
    """
    if importlib.util.find_spec("encodec") is None:
        raise DependencyError("the EnCodec backend needs the encodec package (pip install --no-deps encodec)")
    stubbed = False
    try:
        import torchaudio  # noqa: F401
    except Exception:  # not installed, or a CUDA-only build that fails to import
        for name in ("torchaudio", "torchaudio.transforms"):
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = stub
        sys.modules["torchaudio"].transforms = sys.modules["torchaudio.transforms"]
        stubbed = True
    try:
        from encodec import EncodecModel
    except ImportError as e:
        raise DependencyError(f"the EnCodec backend needs the encodec package (pip install --no-deps encodec): {e}") from None
    finally:
        if stubbed:
            sys.modules.pop("torchaudio", None)
            sys.modules.pop("torchaudio.transforms", None)
    return EncodecModel


def is_available() -> bool:
    try:
        _import_encodec()
    except DependencyError:
        return False
    return True


class EncodecTokenizer:
    """EnCodec 24 kHz at a fixed bandwidth, with 16 kHz audio at its edges."""

    def __init__(self, model, bandwidth: float):
        if bandwidth not in BANDWIDTHS:
            raise SpeechLMError(f"EnCodec bandwidth must be one of {sorted(BANDWIDTHS)} kbps, got {bandwidth}")
        self.model = model.eval()
        self.model.set_target_bandwidth(bandwidth)
        self.bandwidth = bandwidth
        self.sample_rate = SAMPLE_RATE
        self.frame_rate = 75
        self.codebook_size = 1024
        self.codes_per_frame = BANDWIDTHS[bandwidth]
        self.codec_id = f"encodec24khz-{bandwidth:g}kbps"

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike, bandwidth: float = 1.5) -> EncodecTokenizer:
        path = Path(weights)
        if not path.is_file():
            raise SpeechLMError(f"EnCodec weights not found: {path} (speechlm does not download weights; pass a local .th file)")
        EncodecModel = _import_encodec()
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:
            raise SpeechLMError(f"{path} is not an EnCodec 24 kHz checkpoint: {e}") from None
        return cls(model, bandwidth)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (B, T) float at 16 kHz -> codes (B, F, Q) int64 at 75 Hz."""
        x = torch.from_numpy(np.stack([resample(w, SAMPLE_RATE, ENCODEC_RATE) for w in wav.cpu().numpy()]))[:, None]
        frames = self.model.encode(x)
        codes = torch.cat([c for c, _ in frames], dim=-1)  # (B, Q, F)
        return codes.transpose(1, 2).long()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, F, Q) -> wav (B, T) float at 16 kHz."""
        if codes.ndim != 3 or codes.shape[-1] != self.codes_per_frame:
            raise SpeechLMError(f"EnCodec at {self.bandwidth:g} kbps expects codes (B, F, {self.codes_per_frame}), got {tuple(codes.shape)}")
        audio = self.model.decode([(codes.transpose(1, 2), None)])[:, 0].numpy()
        return torch.from_numpy(np.stack([resample(a, ENCODEC_RATE, SAMPLE_RATE) for a in audio]))
