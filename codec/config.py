"""The codec's configuration: one dataclass, saved as ``config.json`` beside the weights.

Two clocks run through the codec:

* the **STFT rate** (100 Hz by default, ``hop_length`` = 160 samples): the causal
  STFT front end, the ConvNeXt blocks next to it, and the iSTFT synthesis;
* the **frame rate** (25 Hz by default, ``frame_length`` = 640 samples): one latent
  vector per frame, quantized by G groups x R residual codebooks of C entries.

Field names ending in ``_stft_*`` describe layers at the STFT rate, ``_frame_*``
layers at the frame rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import SpeechLMError

# Fields that change what the weights and codes mean. Training-only knobs
# (EMA decay, k-means iterations, dead-code threshold, commitment weight) are left out.
ARCHITECTURE_FIELDS = (
    "sample_rate",
    "frame_rate",
    "hop_length",
    "n_fft",
    "kernel_size",
    "mlp_ratio",
    "encoder_stft_dim",
    "encoder_stft_blocks",
    "encoder_frame_dim",
    "encoder_frame_blocks",
    "latent_dim",
    "decoder_frame_dim",
    "decoder_frame_blocks",
    "decoder_stft_dim",
    "decoder_stft_blocks",
    "groups",
    "num_quantizers",
    "codebook_size",
)


# The smallest sensible architecture: for tests, examples and measuring per-call overhead.
# Combine with quantizer settings, e.g. ``CodecConfig(**TINY_ARCHITECTURE, num_quantizers=2, codebook_size=32)``.
TINY_ARCHITECTURE = dict(
    encoder_stft_dim=16, encoder_stft_blocks=1, encoder_frame_dim=32, encoder_frame_blocks=1, latent_dim=16,
    decoder_frame_dim=32, decoder_frame_blocks=1, decoder_stft_dim=16, decoder_stft_blocks=1,
)


@dataclass
class CodecConfig:
    """Architecture and quantizer settings of :class:`speechlm.codec.model.Codec`.

    Defaults: 16 kHz, 25 frames/s, 2 groups x 4 residual quantizers x 1024 codes
    = 25 * 2 * 4 * 10 = 2000 bits/s.
    """

    sample_rate: int = 16_000
    frame_rate: int = 25
    # STFT front end and iSTFT synthesis (window length = n_fft, periodic Hann).
    hop_length: int = 160
    n_fft: int = 320
    # ConvNeXt blocks: depthwise causal conv kernel and MLP expansion.
    kernel_size: int = 7
    mlp_ratio: int = 3
    layer_scale_init: float = 0.1
    # Encoder: STFT-rate blocks -> downsample to frame rate -> frame-rate blocks -> latent.
    encoder_stft_dim: int = 128
    encoder_stft_blocks: int = 2
    encoder_frame_dim: int = 256
    encoder_frame_blocks: int = 1
    latent_dim: int = 64  # 32 per group: small codebook vectors keep the per-frame search cheap
    # Decoder: frame-rate blocks -> upsample to STFT rate -> STFT-rate blocks -> log-magnitude + phase.
    decoder_frame_dim: int = 256
    decoder_frame_blocks: int = 2
    decoder_stft_dim: int = 128
    decoder_stft_blocks: int = 2
    # Group-residual VQ.
    groups: int = 2
    num_quantizers: int = 4
    codebook_size: int = 1024
    # Quantizer training (vector_quantize_pytorch EMA codebooks).
    codebook_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    # An entry whose EMA cluster size falls below this share of its codebook's mean is replaced by a
    # vector of the batch (0 turns replacement off).
    dead_code_threshold_ratio: float = 0.1
    commitment_weight: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate % self.frame_rate:
            problems.append(f"sample_rate {self.sample_rate} is not a multiple of frame_rate {self.frame_rate}")
        elif self.frame_length % self.hop_length:
            problems.append(f"frame_length {self.frame_length} is not a multiple of hop_length {self.hop_length}")
        if self.n_fft % self.hop_length:
            problems.append(f"n_fft {self.n_fft} is not a multiple of hop_length {self.hop_length}")
        if self.latent_dim % self.groups:
            problems.append(f"latent_dim {self.latent_dim} is not divisible by groups {self.groups}")
        if self.kernel_size < 1 or self.codebook_size < 2 or self.num_quantizers < 1 or self.groups < 1:
            problems.append("kernel_size, groups and num_quantizers must be >= 1 and codebook_size >= 2")
        if not 0 <= self.dead_code_threshold_ratio < 1:
            problems.append(f"dead_code_threshold_ratio must lie in [0, 1), got {self.dead_code_threshold_ratio}")
        if problems:
            raise SpeechLMError("invalid codec config: " + "; ".join(problems))

    # -- derived sizes -------------------------------------------------------------

    @property
    def frame_length(self) -> int:
        """Samples per codec frame (640 at 16 kHz / 25 Hz)."""
        return self.sample_rate // self.frame_rate

    @property
    def stft_frames_per_frame(self) -> int:
        """STFT hops per codec frame (4 by default)."""
        return self.frame_length // self.hop_length

    @property
    def n_bins(self) -> int:
        """Frequency bins of the one-sided STFT."""
        return self.n_fft // 2 + 1

    @property
    def codes_per_frame(self) -> int:
        """G * R integer codes per frame."""
        return self.groups * self.num_quantizers

    @property
    def bitrate(self) -> float:
        """Bits per second: frame_rate * G * R * log2(C)."""
        return self.frame_rate * self.codes_per_frame * math.log2(self.codebook_size)

    def bitrate_at(self, levels: int) -> float:
        """Bits per second with the first ``levels`` residual levels of each group (of R)."""
        return self.bitrate * levels / self.num_quantizers

    def levels_for(self, kbps: float) -> int:
        """The residual levels per group that make ``kbps`` kbit/s (a whole number of levels, 1 to R), else an error
        that lists the bitrates this codec has."""
        rates = [self.bitrate_at(k) / 1000 for k in range(1, self.num_quantizers + 1)]
        for k, rate in enumerate(rates, 1):
            if abs(rate - kbps) < 1e-6:
                return k
        raise SpeechLMError(f"this codec codes {', '.join(f'{r:g}' for r in rates)} kbit/s (residual levels 1-{self.num_quantizers}), not {kbps:g}")

    @property
    def codec_id(self) -> str:
        """Short, stable name of the architecture, e.g. ``grvq2x4x1024-25hz-3f9c0a1b``.

        Two configs with the same id build the same network and code layout
        (the trained weights may still differ).
        """
        arch = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:8]
        return f"grvq{self.groups}x{self.num_quantizers}x{self.codebook_size}-{self.frame_rate}hz-{digest}"

    # -- (de)serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodecConfig:
        """Build from :meth:`to_dict` output; ``codec_id`` (written by ``save_pretrained``) is checked, not stored."""
        data = dict(data)
        saved_id = data.pop("codec_id", None)
        if "threshold_ema_dead_code" in data:  # configs written before vector-quantize-pytorch 1.34's rename
            legacy = data.pop("threshold_ema_dead_code")  # an absolute EMA count; the library maps it like this
            data.setdefault("dead_code_threshold_ratio", legacy / data.get("codebook_size", cls.codebook_size) if legacy >= 1 else legacy)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpeechLMError(f"unknown codec config field(s): {', '.join(unknown)}")
        config = cls(**data)
        if saved_id is not None and saved_id != config.codec_id:
            warnings.warn(f"codec config says codec_id {saved_id!r} but its fields give {config.codec_id!r}", stacklevel=2)
        return config
