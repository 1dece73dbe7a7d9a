"""Weight-only int8 products for decoding few rows on a CPU.

A decoding step of a small model multiplies one to a few rows by every weight matrix: the CPU's
time goes into reading the weights, not into arithmetic. Reading them as int8 (one scale per output
channel, symmetric, rounded to nearest) halves the bytes of bfloat16 weights; torch's
``_weight_int8pack_mm`` multiplies bfloat16 rows by them directly. On this project's CPU the shipped
backbone's 56 products of a step take 2.3x / 2.0x / 1.8x less time over 1 / 2 / 4 rows, 1.3x over 8,
and longer from 16 rows on (``benchmarks/int8_products.py``), so wider products stay in bfloat16.

The int8 copy is made from whatever weight a product uses (a layer's own, or an adapter's merged
one), on first use, and kept until that weight changes (its storage or version counter). The
rounding changes outputs slightly: :class:`Int8Products` is opt-in (``SpeechLM.use_int8``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from speechlm.codec.errors import SpeechLMError


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (N, K) -> (int8 (N, K), scales (N,) in the weight's dtype): ``weight ≈ q * scale[:, None]``,
    one symmetric scale per output channel (its largest magnitude maps to 127)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


class Int8Products:
    """``linear(x, weight, bias)``: ``F.linear``, with the weight read as int8 when ``x`` is bfloat16 on a
    CPU and has at most ``max_rows`` rows (positions times batch; see :meth:`applies`)."""

    def __init__(self, max_rows: int = 4):
        if max_rows < 1:
            raise SpeechLMError(f"int8 products need max_rows >= 1, got {max_rows}")
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            raise SpeechLMError(f"this torch ({torch.__version__}) has no int8 weight-only product (_weight_int8pack_mm)")
        self.max_rows = max_rows
        self._copies: dict[int, tuple] = {}  # id(weight) -> (weakref to it, made from, int8, scales); gone with the weight

    def applies(self, x: Tensor) -> bool:
        """Whether ``x``'s product reads int8: bfloat16 on a CPU, at most ``max_rows`` rows, and an inner size the
        kernel computes right (a multiple of 16: torch 2.13's kernel returns garbage, or crashes, for others)."""
        K = x.shape[-1]
        return x.dtype == torch.bfloat16 and x.device.type == "cpu" and K % 16 == 0 and x.numel() <= self.max_rows * K

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (..., K), weight (N, K) -> (..., N)."""
        if not self.applies(x):
            return F.linear(x, weight, bias)
        q, scale = self.int8(weight)
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), q, scale).view(*x.shape[:-1], -1)
        return out if bias is None else out + bias

    def int8(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The int8 copy of ``weight`` and its scales, made once per weight (and again after it changes)."""
        made_from = (weight.data_ptr(), weight._version, weight.dtype)
        key = id(weight)
        entry = self._copies.get(key)
        if entry is None or entry[0]() is not weight or entry[1] != made_from:
            copies = self._copies
            entry = (weakref.ref(weight, lambda _, key=key: copies.pop(key, None)), made_from, *quantize_int8(weight))
            copies[key] = entry
        return entry[2], entry[3]
