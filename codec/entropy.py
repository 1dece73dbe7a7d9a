"""Lossless entropy coding of codec codes: a static prior per codebook and an arithmetic coder.

The quantizer's codebooks are not used evenly (the shipped codec's codes carry ~7.7 of their 10 bits), so a file
that spends 10 bits on every code wastes a quarter of its size. :class:`CodePrior` holds how often each codebook
used each code on a training corpus (``speechlm codec fit-prior``; saved beside the codec as
``code_prior.safetensors``); :func:`compress_codes` arithmetic-codes a (frames, codebooks) array with it, frame by
frame, and :func:`decompress_codes` gives the same array back, bit for bit. This is EnCodec's ``.ecdc`` idea with a
static model instead of its small LM: no float arithmetic in the model, so a file decodes the same on any machine.

The coder is the classic integer arithmetic coder (Witten, Neal and Cleary 1987) with 32-bit registers and
frequencies summing to 2^16 per codebook (every code at least 1, so codes never seen in training still code).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpeechLMError

PRIOR_NAME = "code_prior.safetensors"
TOTAL_BITS = 16
TOTAL = 1 << TOTAL_BITS  # each codebook's quantized frequencies sum to this

_BITS = 32
_TOP = (1 << _BITS) - 1
_HALF = 1 << (_BITS - 1)
_QUARTER = 1 << (_BITS - 2)


@dataclass
class CodePrior:
    """How often each codebook used each code: ``counts`` (codebooks, codebook_size) int64, full width (G*R)."""

    counts: np.ndarray
    codec_id: str
    groups: int

    def __post_init__(self):
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.ndim != 2 or self.counts.shape[0] % self.groups or (self.counts < 0).any():
            raise SpeechLMError(f"a code prior needs non-negative counts (G*R, C) with G = {self.groups}, got {self.counts.shape}")
        self._table = self._quantized()  # the counts are fixed from here on: the table, its sums and fingerprint with them
        self._cumulative = np.concatenate([np.zeros((len(self.counts), 1), np.int64), np.cumsum(self._table, axis=1)], axis=1)
        self._fingerprint = hashlib.sha256(self._table.astype("<u4").tobytes()).hexdigest()[:12]

    @property
    def codebook_size(self) -> int:
        return self.counts.shape[1]

    @property
    def levels(self) -> int:
        return self.counts.shape[0] // self.groups

    @classmethod
    def fit(cls, codes: Iterable[np.ndarray], codec_id: str, groups: int, codebooks: int, codebook_size: int) -> CodePrior:
        """Count the codes of each (frames, codebooks) array (full width)."""
        counts = np.zeros((codebooks, codebook_size), np.int64)
        for array in codes:
            array = np.asarray(array)
            if array.ndim != 2 or array.shape[1] != codebooks:
                raise SpeechLMError(f"expected codes (frames, {codebooks}), got {array.shape}")
            for k in range(codebooks):
                counts[k] += np.bincount(array[:, k], minlength=codebook_size)
        return cls(counts, codec_id, groups)

    def frequencies(self) -> np.ndarray:
        """(codebooks, C) integers >= 1 summing to TOTAL per row, proportional to the counts (add-one smoothed)."""
        return self._table.copy()

    def _quantized(self) -> np.ndarray:
        smoothed = self.counts.astype(np.float64) + 1.0
        spare = TOTAL - self.codebook_size  # every code gets 1, the rest is shared by count
        if spare < 0:
            raise SpeechLMError(f"codebooks of {self.codebook_size} codes do not fit a {TOTAL_BITS}-bit frequency table")
        extra = np.floor(smoothed / smoothed.sum(axis=1, keepdims=True) * spare).astype(np.int64)
        frequencies = 1 + extra
        short = TOTAL - frequencies.sum(axis=1)  # rounding: give the remainder to each row's most frequent codes
        for k, missing in enumerate(short):
            frequencies[k, np.argsort(-self.counts[k], kind="stable")[:missing]] += 1
        return frequencies

    def bits_per_code(self) -> np.ndarray:
        """(codebooks,) the prior's cross-entropy on its own counts: about what a code of each codebook costs."""
        f = self._table
        p = self.counts / np.maximum(self.counts.sum(axis=1, keepdims=True), 1)
        return -(p * np.log2(f / TOTAL)).sum(axis=1)

    @property
    def fingerprint(self) -> str:
        """12 hex digits of the frequency table: a file names the table it was coded with."""
        return self._fingerprint

    def columns(self, width: int) -> np.ndarray:
        """The full-width codebook of each of ``width`` columns: all G*R, or the first k levels of each group (G*k)."""
        full = self.counts.shape[0]
        if width == full:
            return np.arange(full)
        if width % self.groups or not 0 < width < full:
            raise SpeechLMError(f"codes of {width} codebooks a frame do not fit this prior ({full}, or a multiple of {self.groups} below)")
        k = width // self.groups
        return np.array([g * self.levels + r for g in range(self.groups) for r in range(k)])

    # -- files ------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(directory) / PRIOR_NAME
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"counts": self.counts}, str(tmp), metadata={"codec_id": self.codec_id, "groups": str(self.groups)})
        tmp.chmod(0o644)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CodePrior | None:
        """The prior saved beside a codec, or None if it has none."""
        from safetensors import safe_open

        path = Path(directory) / PRIOR_NAME
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                return cls(f.get_tensor("counts"), meta.get("codec_id", ""), int(meta.get("groups", 1)))
        except Exception as e:  # corrupt file: one line
            raise SpeechLMError(f"cannot read the code prior {path}: {str(e)[:120]}") from None


def _narrow(low: int, high: int, cumulative: np.ndarray, code: int) -> tuple[int, int]:
    """The coder's interval [low, high] narrowed to ``code``'s share (``cumulative``: one codebook's, TOTAL at the end)."""
    span = high - low + 1
    return low + (span * int(cumulative[code]) >> TOTAL_BITS), low + (span * int(cumulative[code + 1]) >> TOTAL_BITS) - 1


def _rescaling(low: int, high: int) -> tuple[int | None, int] | None:
    """The next doubling of the interval, if one is due: (the bit it settles — None where the interval straddles
    the middle — and the offset to take off first), or None."""
    if high < _HALF:
        return 0, 0
    if low >= _HALF:
        return 1, _HALF
    if low >= _QUARTER and high < _HALF + _QUARTER:
        return None, _QUARTER
    return None


class _BitWriter:
    def __init__(self):
        self.bits: list[int] = []
        self.pending = 0

    def emit(self, bit: int) -> None:
        self.bits.append(bit)
        if self.pending:
            self.bits.extend([1 - bit] * self.pending)
            self.pending = 0


def compress_codes(codes: np.ndarray, prior: CodePrior) -> bytes:
    """(frames, width) codes -> arithmetic-coded bytes (frame by frame, each frame's codebooks in order)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise SpeechLMError(f"codes must be (frames, codebooks), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= prior.codebook_size):
        raise SpeechLMError(f"codes outside [0, {prior.codebook_size})")
    columns = prior.columns(codes.shape[1])
    cumulative = prior._cumulative
    low, high, out = 0, _TOP, _BitWriter()
    for row in codes.tolist():
        for column, code in zip(columns.tolist(), row):
            low, high = _narrow(low, high, cumulative[column], code)
            while (step := _rescaling(low, high)) is not None:
                bit, offset = step
                if bit is None:
                    out.pending += 1  # the interval straddles the middle: the bit is not known yet
                else:
                    out.emit(bit)
                low, high = (low - offset) << 1, ((high - offset) << 1) | 1
    out.pending += 1
    out.emit(0 if low < _QUARTER else 1)
    return np.packbits(np.array(out.bits, dtype=np.uint8)).tobytes()


def decompress_codes(data: bytes, frames: int, width: int, prior: CodePrior) -> np.ndarray:
    """The inverse of :func:`compress_codes`: bytes -> (frames, width) int64 codes."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    if frames and not bits:
        raise SpeechLMError("the coded codes are empty")
    bits.extend([0] * _BITS)
    end = len(bits)
    position = _BITS
    value = int("".join(map(str, bits[:_BITS])), 2)
    columns = prior.columns(width).tolist()
    cumulative = prior._cumulative
    out = np.zeros((frames, width), np.int64)
    low, high = 0, _TOP
    for f in range(frames):
        for j, column in enumerate(columns):
            span = high - low + 1
            table = cumulative[column]
            target = ((value - low + 1) * TOTAL - 1) // span
            code = int(np.searchsorted(table, target, side="right")) - 1
            if not 0 <= code < prior.codebook_size:
                raise SpeechLMError("the coded codes are corrupt")
            out[f, j] = code
            low, high = _narrow(low, high, table, code)
            while (step := _rescaling(low, high)) is not None:
                offset = step[1]
                low, high = (low - offset) << 1, ((high - offset) << 1) | 1
                value = ((value - offset) << 1) | (bits[position] if position < end else 0)  # zeros past the end
                position += 1
    return out
