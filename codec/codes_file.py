"""The codes files written by ``speechlm codec encode``: ``.npz`` (arrays) or ``.slc`` (entropy-coded).

``.npz`` arrays: ``codes`` (F, G*R) integers, one row per frame (or (F, G*k): the first k residual levels of each
group, a lower bitrate); ``sample_rate``, ``frame_rate``,
``codebook_size``, ``num_samples`` (length of the original audio, to trim the padded
last frame) and ``codec_id`` (the architecture that made the codes).  Decoding codes
made by another codec architecture is refused with a clear error.

``.slc`` holds the same, the codes arithmetic-coded with the codec's code prior (``codec.entropy``): ``SLC\x01``,
the codec id (u8 length, UTF-8), then little-endian ``sample_rate`` u32, ``frame_rate`` u16, ``codebook_size`` u16,
frames u32, codes a frame u8, ``num_samples`` u32, the prior's fingerprint (4 bytes) and a CRC-32 of the codes (u32)
— 57 bytes for ``codec-16k`` — then the coded codes: about the codes' information, not 16 bits each.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .entropy import PRIOR_NAME, CodePrior
from .errors import SpeechLMError

FORMAT_VERSION = 1
SLC_MAGIC = b"SLC\x01"
# after the magic and the codec id (u8 length + UTF-8): sample_rate, frame_rate, codebook_size, frames, width,
# num_samples, the prior's fingerprint (4 bytes), CRC-32 of the codes: 26 bytes
_SLC_FIELDS = struct.Struct("<IHHIBI4sI")
SUFFIXES = (".npz", ".slc")


@dataclass
class CodesFile:
    codes: np.ndarray  # (F, G*R) int
    sample_rate: int
    frame_rate: int
    codebook_size: int
    num_samples: int
    codec_id: str

    def save(self, path: str | os.PathLike, prior: CodePrior | None = None) -> Path:
        """Write ``.npz``, or ``.slc`` (needs ``prior``, the codec's :class:`~speechlm.codec.entropy.CodePrior`)."""
        p = Path(path)
        if p.suffix not in SUFFIXES:
            raise SpeechLMError(f"codes files end in .npz or .slc, got {p}")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.stem}.tmp{os.getpid()}{p.suffix}")
        if p.suffix == ".slc":
            tmp.write_bytes(self.to_slc(prior))
        else:
            dtype = np.int16 if self.codebook_size <= 32768 else np.int32
            np.savez(
                tmp, codes=self.codes.astype(dtype), sample_rate=self.sample_rate, frame_rate=self.frame_rate,
                codebook_size=self.codebook_size, num_samples=self.num_samples, codec_id=self.codec_id, format_version=FORMAT_VERSION,
            )
        os.replace(tmp, p)
        return p

    def to_slc(self, prior: CodePrior | None) -> bytes:
        from .entropy import compress_codes

        if prior is None:
            raise SpeechLMError(f"codec {self.codec_id!r} has no code prior ({PRIOR_NAME}) to entropy-code with: write .npz, or fit one (speechlm codec fit-prior)")
        if prior.codec_id != self.codec_id:
            raise SpeechLMError(f"the code prior is codec {prior.codec_id!r}'s, these codes codec {self.codec_id!r}'s")
        codec_id = self.codec_id.encode()
        frames, width = self.codes.shape
        header = SLC_MAGIC + struct.pack("<B", len(codec_id)) + codec_id + _SLC_FIELDS.pack(
            self.sample_rate, self.frame_rate, self.codebook_size, frames, width, max(self.num_samples, 0),
            bytes.fromhex(prior.fingerprint[:8]), _codes_crc(self.codes))
        return header + compress_codes(self.codes, prior)

    @classmethod
    def from_slc(cls, data: bytes, prior: CodePrior | None, name: str = "codes") -> CodesFile:
        from .entropy import decompress_codes

        if data[:4] != SLC_MAGIC or len(data) < 5:
            raise SpeechLMError(f"{name} is not a codes file (.slc from speechlm codec encode)")
        size = data[4]
        start = 5 + size + _SLC_FIELDS.size
        if len(data) < start:
            raise SpeechLMError(f"{name} is cut short: its header is incomplete")
        try:
            codec_id = data[5 : 5 + size].decode()
        except UnicodeDecodeError:
            raise SpeechLMError(f"{name} has a corrupt header") from None
        sample_rate, frame_rate, codebook_size, frames, width, num_samples, fingerprint, crc = _SLC_FIELDS.unpack_from(data, 5 + size)
        if prior is None or prior.codec_id != codec_id:
            raise SpeechLMError(f"these codes were made by codec {codec_id!r}: decode with the codec that encoded them (and its code prior)")
        if prior.fingerprint[:8] != fingerprint.hex():
            raise SpeechLMError(f"{name} was coded with code prior {fingerprint.hex()}; this codec's is {prior.fingerprint[:8]}: decode with the codec that encoded it")
        if width < 1 or codebook_size != prior.codebook_size:
            raise SpeechLMError(f"{name} has a corrupt header: {width} codes a frame of {codebook_size}")
        if frames * width > 64 * (8 * (len(data) - start) + 64):  # no code costs under 1/64 bit with 16-bit tables
            raise SpeechLMError(f"{name} has a corrupt header: {frames} frames in {len(data) - start} bytes")
        codes = decompress_codes(data[start:], frames, width, prior)
        if _codes_crc(codes) != crc:
            raise SpeechLMError(f"{name} is corrupt: its codes do not match their checksum")
        return cls(codes=codes, sample_rate=sample_rate, frame_rate=frame_rate, codebook_size=codebook_size, num_samples=num_samples, codec_id=codec_id)

    @classmethod
    def load(cls, path: str | os.PathLike, prior: CodePrior | None = None) -> CodesFile:
        """Read ``.npz`` or ``.slc`` (by its first bytes; ``.slc`` needs the codec's ``prior``)."""
        p = Path(path)
        if not p.is_file():
            raise SpeechLMError(f"codes file not found: {p}")
        with open(p, "rb") as f:
            if f.read(4) == SLC_MAGIC:
                return cls.from_slc(p.read_bytes(), prior, str(p))
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


def _codes_crc(codes: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(codes, dtype="<i4").tobytes())
