"""The ``.npz`` codes file written by ``speechlm codec encode``.

Arrays: ``codes`` (F, G*R) integers, one row per frame (or (F, G*k): the first k residual levels of each
group, a lower bitrate); ``sample_rate``, ``frame_rate``,
``codebook_size``, ``num_samples`` (length of the original audio, to trim the padded
last frame) and ``codec_id`` (the architecture that made the codes).  Decoding codes
made by another codec architecture is refused with a clear error.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpeechLMError

FORMAT_VERSION = 1


@dataclass
class CodesFile:
    codes: np.ndarray  # (F, G*R) int
    sample_rate: int
    frame_rate: int
    codebook_size: int
    num_samples: int
    codec_id: str

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.suffix != ".npz":
            raise SpeechLMError(f"codes files end in .npz, got {p}")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.stem}.tmp{os.getpid()}.npz")
        dtype = np.int16 if self.codebook_size <= 32768 else np.int32
        np.savez(
            tmp, codes=self.codes.astype(dtype), sample_rate=self.sample_rate, frame_rate=self.frame_rate,
            codebook_size=self.codebook_size, num_samples=self.num_samples, codec_id=self.codec_id, format_version=FORMAT_VERSION,
        )
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodesFile:
        p = Path(path)
        if not p.is_file():
            raise SpeechLMError(f"codes file not found: {p}")
        if not zipfile.is_zipfile(p):  # np.load would try it as a pickle and say so
            raise SpeechLMError(f"{p} is not a codes file (.npz from speechlm codec encode)")
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise SpeechLMError(f"{p} is not a codes file (.npz from speechlm codec encode): {e}") from None
        missing = {"codes", "sample_rate", "frame_rate", "codebook_size", "codec_id"} - set(data)
        if missing:
            raise SpeechLMError(f"{p} is not a speechlm codes file: missing {', '.join(sorted(missing))}")
        codes = data["codes"]
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise SpeechLMError(f"{p}: 'codes' must be a 2-D integer array (frames, codebooks), got {codes.dtype} {codes.shape}")
        f = cls(
            codes=codes.astype(np.int64), sample_rate=int(data["sample_rate"]), frame_rate=int(data["frame_rate"]),
            codebook_size=int(data["codebook_size"]), num_samples=int(data.get("num_samples", -1)), codec_id=str(data["codec_id"]),
        )
        if codes.size and (codes.min() < 0 or codes.max() >= f.codebook_size):
            raise SpeechLMError(f"{p}: codes outside [0, {f.codebook_size})")
        return f

    def check_compatible(self, codec_id: str, codes_per_frame: int, groups: int = 1) -> None:
        """Codes this codec can decode: its id, and ``codes_per_frame`` (G*R) codes a frame or the first levels of each
        of its ``groups`` (a multiple of G below G*R)."""
        if self.codec_id != codec_id:
            raise SpeechLMError(f"these codes were made by codec {self.codec_id!r}; this model is {codec_id!r}: decode with the codec that encoded them")
        width = self.codes.shape[1]
        if width != codes_per_frame and (width % groups or not 0 < width < codes_per_frame):
            raise SpeechLMError(f"codes have {width} codebooks per frame; this codec uses {codes_per_frame} (or a multiple of {groups} below)")
