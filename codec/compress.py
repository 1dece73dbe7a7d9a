"""High-level codec API on files: audio -> codes file -> audio (what the CLI calls)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .audio import load_audio, save_audio
from .codes_file import CodesFile
from .errors import AudioError
from .model import Codec


def encode_audio(codec: Codec, audio: np.ndarray, levels: int | None = None) -> CodesFile:
    """(T,) float32 at the codec's rate -> CodesFile (``levels``: the first residual levels of each group only)."""
    if audio.ndim != 1:
        raise AudioError(f"expected mono audio (T,), got shape {audio.shape}")
    if len(audio) == 0:
        raise AudioError("audio is empty")
    codes = codec.encode(torch.from_numpy(audio)[None], levels=levels)[0].cpu().numpy()
    c = codec.config
    return CodesFile(codes=codes, sample_rate=c.sample_rate, frame_rate=c.frame_rate, codebook_size=c.codebook_size, num_samples=len(audio), codec_id=c.codec_id)


def decode_codes(codec: Codec, codes: CodesFile) -> np.ndarray:
    """CodesFile -> (T,) float32, trimmed to the original length when known."""
    codes.check_compatible(codec.codec_id, codec.config.codes_per_frame, codec.config.groups)
    audio = codec.decode(torch.from_numpy(codes.codes)[None])[0].cpu().numpy()
    return audio[: codes.num_samples] if codes.num_samples > 0 else audio


def encode_file(codec: Codec, wav_path: str | os.PathLike, codes_path: str | os.PathLike, levels: int | None = None) -> CodesFile:
    """Audio file -> ``.npz`` or ``.slc`` (entropy-coded with the codec's code prior) codes file."""
    audio = load_audio(wav_path, sample_rate=codec.sample_rate)
    codes = encode_audio(codec, audio, levels)
    codes.save(codes_path, prior=codec.code_prior)
    return codes


def decode_file(codec: Codec, codes_path: str | os.PathLike, wav_path: str | os.PathLike) -> Path:
    audio = decode_codes(codec, CodesFile.load(codes_path, prior=codec.code_prior))
    return save_audio(wav_path, audio, codec.sample_rate)


def roundtrip_file(codec: Codec, wav_path: str | os.PathLike, out_path: str | os.PathLike, levels: int | None = None) -> Path:
    audio = load_audio(wav_path, sample_rate=codec.sample_rate)
    return save_audio(out_path, decode_codes(codec, encode_audio(codec, audio, levels)), codec.sample_rate)
