"""The causal GRVQ codec: 16 kHz speech <-> G*R integer codes per 40 ms frame.

    audio ──causal STFT (100 Hz)──► log|X| ──Linear, ConvNeXt x N──► ──Downsample x4──►
    ConvNeXt x N (25 Hz) ──► latent (D) ──GRVQ──► codes (G*R per frame)
    codes ──lookup──► latent ──ConvNeXt x N (25 Hz)──► ──Upsample x4──► ConvNeXt x N (100 Hz)
    ──► log-magnitude + phase ──causal iSTFT overlap-add──► audio

Every layer looks back only, and the iSTFT writes each frame at or after its own hop,
so encoding frame t needs samples up to the end of frame t and decoding frame t emits
exactly its 640 samples: the algorithmic latency is one frame (40 ms), nothing more.

Usage::

    codec = Codec.from_pretrained("path/or/name")
    codes = codec.encode(wav)                        # (B, T) -> (B, F, G*R) int64
    wav = codec.decode(codes)                        # -> (B, F*640)

    state = codec.init_state(batch_size)             # streaming, one frame per call
    codes_t, state = codec.encode_step(pcm_t, state)     # (B, 640) -> (B, G*R)
    pcm_t, state = codec.decode_step(codes_t, state)     # (B, G*R) -> (B, 640)
    state.reset_rows([2])                            # row 2 starts a new session
"""

from __future__ import annotations

import importlib.resources
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import CodecConfig
from .entropy import CodePrior
from .errors import SpeechLMError
from .modules import CausalISTFT, CausalSTFT, ConvNeXtStack, Downsample, Upsample, he_init_
from .quantizer import GroupResidualQuantizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class CodecState:
    """Streaming state of a batch of independent sessions, one row each.

    The encoder half (``analysis``, ``encoder_*``) and the decoder half (``decoder_*``,
    ``synthesis``) are independent: a session may only encode, only decode, or both.
    ``encode_step``/``decode_step`` return a new state and leave the old one untouched.
    """

    analysis: Tensor  # (B, n_fft - hop): last input samples
    encoder_stft: list[Tensor]  # per block (B, K-1, C): depthwise-conv context at the STFT rate
    encoder_frame: list[Tensor]  # per block (B, K-1, C) at the frame rate
    decoder_frame: list[Tensor]
    decoder_stft: list[Tensor]
    synthesis: Tensor  # (B, n_fft/hop - 1, hop): overlap-add tail not yet emitted

    @property
    def batch_size(self) -> int:
        return self.analysis.shape[0]

    def reset_rows(self, rows) -> CodecState:
        """Return the given rows to the start-of-stream state (zeros); other rows keep going.

        ``rows``: a bool mask of length B, or row indices (int, list or tensor).
        Modifies this state in place (by rebinding its tensors) and returns it.
        """
        mask = row_mask(rows, self.batch_size, self.analysis.device)

        def reset(t: Tensor) -> Tensor:
            return t.masked_fill(mask.view(-1, *([1] * (t.ndim - 1))), 0.0)

        self.analysis = reset(self.analysis)
        self.synthesis = reset(self.synthesis)
        for name in ("encoder_stft", "encoder_frame", "decoder_frame", "decoder_stft"):
            setattr(self, name, [reset(t) for t in getattr(self, name)])
        return self


def row_mask(rows, batch_size: int, device) -> Tensor:
    """Rows to reset (indices, or a (B,) bool mask) -> a (B,) bool mask; SpeechLMError when out of range."""
    rows = torch.as_tensor(rows, device=device)
    if rows.dtype == torch.bool:
        if rows.shape != (batch_size,):
            raise SpeechLMError(f"reset mask must have shape ({batch_size},), got {tuple(rows.shape)}")
        return rows
    rows = rows.reshape(-1).long()
    if rows.numel() and (int(rows.min()) < -batch_size or int(rows.max()) >= batch_size):
        raise SpeechLMError(f"reset rows {rows.tolist()} out of range for a batch of {batch_size}")
    mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    mask[rows] = True
    return mask


class Encoder(nn.Module):
    """audio (B, F*frame_length) -> latent (B, F, D), causal, with explicit state."""

    def __init__(self, c: CodecConfig):
        super().__init__()
        self.stft = CausalSTFT(c.n_fft, c.hop_length)
        self.proj_in = nn.Linear(c.n_bins, c.encoder_stft_dim)
        self.norm_in = nn.LayerNorm(c.encoder_stft_dim)  # log-magnitudes are far from unit scale
        self.stft_blocks = ConvNeXtStack(c.encoder_stft_dim, c.encoder_stft_blocks, c.kernel_size, c.mlp_ratio, c.layer_scale_init)
        self.down = Downsample(c.encoder_stft_dim, c.encoder_frame_dim, c.stft_frames_per_frame)
        self.frame_blocks = ConvNeXtStack(c.encoder_frame_dim, c.encoder_frame_blocks, c.kernel_size, c.mlp_ratio, c.layer_scale_init)
        self.norm_out = nn.LayerNorm(c.encoder_frame_dim)
        self.proj_out = nn.Linear(c.encoder_frame_dim, c.latent_dim)
        he_init_(self.proj_in)
        he_init_(self.proj_out)

    def forward(self, audio: Tensor, state: CodecState | None = None) -> tuple[Tensor, tuple]:
        """audio: (B, F*frame_length) -> latent (B, F, D), (analysis, stft-block, frame-block) states."""
        spec, analysis = self.stft(audio, None if state is None else state.analysis)  # (B, 4F, bins)
        x = self.norm_in(self.proj_in(spec))
        x, stft_state = self.stft_blocks(x, None if state is None else state.encoder_stft)  # (B, 4F, C)
        x, frame_state = self.frame_blocks(self.down(x), None if state is None else state.encoder_frame)  # (B, F, C')
        return self.proj_out(self.norm_out(x)), (analysis, stft_state, frame_state)


class Decoder(nn.Module):
    """latent (B, F, D) -> audio (B, F*frame_length), causal, with explicit state."""

    def __init__(self, c: CodecConfig):
        super().__init__()
        self.n_bins = c.n_bins
        self.proj_in = nn.Linear(c.latent_dim, c.decoder_frame_dim)
        self.frame_blocks = ConvNeXtStack(c.decoder_frame_dim, c.decoder_frame_blocks, c.kernel_size, c.mlp_ratio, c.layer_scale_init)
        self.up = Upsample(c.decoder_frame_dim, c.decoder_stft_dim, c.stft_frames_per_frame)
        self.stft_blocks = ConvNeXtStack(c.decoder_stft_dim, c.decoder_stft_blocks, c.kernel_size, c.mlp_ratio, c.layer_scale_init)
        self.norm_out = nn.LayerNorm(c.decoder_stft_dim)
        self.head = nn.Linear(c.decoder_stft_dim, 2 * c.n_bins)  # log-magnitude and phase per bin
        self.istft = CausalISTFT(c.n_fft, c.hop_length)
        he_init_(self.proj_in)
        # Small output layer: the first outputs are quiet noise (|X| ~ 1), not blow-ups of exp().
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, latent: Tensor, state: CodecState | None = None) -> tuple[Tensor, tuple]:
        """latent: (B, F, D) -> audio (B, F*frame_length), (frame-block, stft-block, synthesis) states."""
        x, frame_state = self.frame_blocks(self.proj_in(latent), None if state is None else state.decoder_frame)
        x, stft_state = self.stft_blocks(self.up(x), None if state is None else state.decoder_stft)  # (B, 4F, C)
        log_magnitude, phase = self.head(self.norm_out(x)).split(self.n_bins, dim=-1)
        audio, synthesis = self.istft(log_magnitude, phase, None if state is None else state.synthesis)
        return audio, (frame_state, stft_state, synthesis)


class Codec(nn.Module):
    """Causal streaming GRVQ speech codec (see the module docstring for the picture)."""

    def __init__(self, config: CodecConfig | None = None):
        super().__init__()
        self.config = config = config or CodecConfig()
        self.encoder = Encoder(config)
        self.quantizer = GroupResidualQuantizer(
            dim=config.latent_dim,
            groups=config.groups,
            num_quantizers=config.num_quantizers,
            codebook_size=config.codebook_size,
            decay=config.codebook_decay,
            kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters,
            dead_code_threshold_ratio=config.dead_code_threshold_ratio,
            commitment_weight=config.commitment_weight,
        )
        self.decoder = Decoder(config)
        # how often each codebook uses each code (``code_prior.safetensors`` beside the weights): entropy-coded .slc files
        self.code_prior: CodePrior | None = None

    # -- sizes -------------------------------------------------------------------------

    @property
    def frame_length(self) -> int:
        return self.config.frame_length

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def codec_id(self) -> str:
        return self.config.codec_id

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- training ------------------------------------------------------------------------

    def forward(self, wav: Tensor, quantize: bool = True) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Training pass.

        wav: (B, T) float; the end is zero-padded to whole frames.
        Returns recon (B, F*frame_length), codes (B, F, G*R) (None when ``quantize=False``,
        the unquantized autoencoder warm-up) and losses ``{"commitment": scalar}``.
        ``recon`` is sample-aligned with ``wav`` (no codec delay): compare ``recon[:, :T]`` with it.
        The first quantized call in training mode initialises the codebooks by k-means on
        that batch's latents (give it many frames: 1024-entry codebooks want >> 1024 vectors).
        """
        latent, _ = self.encoder(self._pad_to_frames(wav))  # (B, F, D)
        if not quantize:
            recon, _ = self.decoder(latent)
            return recon, None, {"commitment": latent.new_zeros(())}
        quantized, codes, losses = self.quantizer(rearrange(latent, "b f d -> b d f"))
        recon, _ = self.decoder(rearrange(quantized, "b d f -> b f d"))
        return recon, codes, losses

    # -- offline inference --------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, wav: Tensor, levels: int | None = None) -> Tensor:
        """wav: (B, T) float at ``sample_rate`` -> codes (B, ceil(T/frame_length), G*R) int64.

        The end is zero-padded to a whole frame. ``levels``: keep the first ``levels`` residual levels of each group
        (G*levels codes a frame: a lower bitrate, ``config.bitrate_at(levels)``); :meth:`decode` takes either.
        """
        latent, _ = self.encoder(self._pad_to_frames(wav))
        codes = self.quantizer.quantize_codes(latent)
        return codes if levels is None else self.quantizer.keep_levels(codes, levels)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """codes: (B, F, G*R) int -> wav (B, F*frame_length) float32; or (B, F, G*k): the first k residual levels of
        each group (:meth:`encode` with ``levels``)."""
        self.quantizer.check_codes(codes, frames_axis=True)
        if codes.shape[1] == 0:
            return torch.zeros(codes.shape[0], 0, device=self._device)
        audio, _ = self.decoder(self.quantizer.lookup(codes.to(self._device)))
        return audio

    # -- streaming ------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> CodecState:
        """Start-of-stream state for ``batch_size`` independent sessions."""
        p = next(self.parameters())
        args = (batch_size, p.device, p.dtype)
        return CodecState(
            analysis=self.encoder.stft.initial_state(*args),
            encoder_stft=self.encoder.stft_blocks.initial_state(*args),
            encoder_frame=self.encoder.frame_blocks.initial_state(*args),
            decoder_frame=self.decoder.frame_blocks.initial_state(*args),
            decoder_stft=self.decoder.stft_blocks.initial_state(*args),
            synthesis=self.decoder.istft.initial_state(*args),
        )

    @torch.inference_mode()
    def encode_step(self, pcm: Tensor, state: CodecState) -> tuple[Tensor, CodecState]:
        """One frame of audio per row -> its codes. pcm: (B, frame_length) -> codes (B, G*R) int64.

        Needs no sample after this frame; equal to the matching frame of :meth:`encode`.
        """
        if pcm.ndim != 2 or pcm.shape != (state.batch_size, self.frame_length):
            raise SpeechLMError(f"encode_step expects pcm of shape ({state.batch_size}, {self.frame_length}), got {tuple(pcm.shape)}")
        latent, (analysis, stft_state, frame_state) = self.encoder(pcm.to(state.analysis), state)
        codes = self.quantizer.quantize_codes(latent)[:, 0]
        return codes, replace(state, analysis=analysis, encoder_stft=stft_state, encoder_frame=frame_state)

    @torch.inference_mode()
    def decode_step(self, codes: Tensor, state: CodecState) -> tuple[Tensor, CodecState]:
        """One frame of codes per row -> its audio. codes: (B, G*R) (or (B, G*k): the first k levels) -> pcm (B, frame_length).

        Equal to the matching frame of :meth:`decode`.
        """
        self.quantizer.check_codes(codes, frames_axis=False)
        if codes.shape[0] != state.batch_size:
            raise SpeechLMError(f"decode_step got codes for {codes.shape[0]} rows but the state holds {state.batch_size}")
        latent = self.quantizer.lookup(codes.to(self._device).unsqueeze(1))  # (B, 1, D)
        audio, (frame_state, stft_state, synthesis) = self.decoder(latent, state)
        return audio, replace(state, decoder_frame=frame_state, decoder_stft=stft_state, synthesis=synthesis)

    # -- files -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (with ``codec_id``) and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {**self.config.to_dict(), "codec_id": self.codec_id}
        derived = GroupResidualQuantizer.DERIVED_SUFFIX  # recomputed at load (GroupResidualQuantizer.restore_derived)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items() if not name.endswith(derived)}
        _write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"codec_id": self.codec_id}))
        _write_atomic(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        if self.code_prior is not None and self.code_prior.codec_id == self.codec_id:
            self.code_prior.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, device: str | torch.device = "cpu") -> Codec:
        """Load a codec from a directory written by :meth:`save_pretrained`, or by the name of a
        model shipped in ``speechlm/models/<name>/``. Returns it in eval mode."""
        directory = _resolve_model_dir(path_or_name)
        try:
            config = CodecConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SpeechLMError(f"cannot read codec config {directory / CONFIG_NAME}: {e}") from None
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise SpeechLMError(f"codec weights not found: {weights}")
        try:
            tensors = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError) as e:
            raise SpeechLMError(f"cannot read codec weights {weights} (corrupt or not safetensors): {e}") from None
        model = cls(config)
        state = model.state_dict()
        left_out = [name for name in state if name.endswith(GroupResidualQuantizer.DERIVED_SUFFIX) and name not in tensors]
        tensors = {**tensors, **{name: state[name] for name in left_out}}  # any other missing tensor fails below
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise SpeechLMError(f"codec weights {weights} do not match its config ({config.codec_id}): {str(e).splitlines()[0]}") from None
        if left_out:
            model.quantizer.restore_derived()
        prior = CodePrior.load(directory)
        if prior is not None and prior.codec_id == model.codec_id:  # (a prior of other codes is ignored: fit it again)
            model.code_prior = prior
        return model.to(device).eval()

    # -- helpers ------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _pad_to_frames(self, wav: Tensor) -> Tensor:
        if not isinstance(wav, Tensor) or wav.ndim != 2 or not wav.dtype.is_floating_point:
            shape = tuple(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__
            raise SpeechLMError(f"audio must be a float tensor of shape (batch, samples), got {shape}")
        if wav.shape[1] == 0:
            raise SpeechLMError("audio is empty (0 samples)")
        p = next(self.parameters())
        return F.pad(wav.to(p), (0, -wav.shape[1] % self.frame_length))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _resolve_model_dir(path_or_name: str | os.PathLike) -> Path:
    path = Path(path_or_name)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise SpeechLMError(f"{path} is not a codec directory: it has no {CONFIG_NAME}")
        return path
    name = str(path_or_name)
    shipped = importlib.resources.files("speechlm") / "models"
    if name and "/" not in name and os.sep not in name:
        candidate = shipped / name
        if candidate.is_dir() and (candidate / CONFIG_NAME).is_file():
            return Path(str(candidate))
    available = sorted(p.name for p in shipped.iterdir() if p.is_dir()) if shipped.is_dir() else []
    raise SpeechLMError(
        f"codec {name!r} not found: no such directory, and no shipped model of that name (shipped: {', '.join(available) or 'none'})"
    )
