"""A small pre-norm causal transformer block with its own KV cache.

Used by the MCTP modules (over the sequence of LM positions) and by the depth head
(over the Q codebooks of one frame). It is written here rather than borrowed from the
backbone so that it works the same under any backbone class and its cache is a plain
pair of tensors.

    x ──RMSNorm──► causal self-attention (RoPE) ──+──RMSNorm──► SwiGLU MLP ──+──►
    └──────────────────────────────────────────────┘└─────────────────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class KVCache:
    """Keys and values of the positions a block has seen, (B, H, S, head_dim) each, plus
    ``valid`` (B, S): False at left-padding positions, which no query may attend to."""

    keys: Tensor | None = None
    values: Tensor | None = None
    valid: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10_000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, H, T, head_dim), positions: (B, T) -> x rotated by its positions."""
        angles = positions[:, None, :, None].float() * self.inv_freq  # (B, 1, T, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)
        return (x.float() * angles.cos() + rotate_half(x.float()) * angles.sin()).to(x.dtype)


class CausalBlock(nn.Module):
    """One pre-norm transformer block (RMSNorm, RoPE self-attention, SwiGLU), causal in sequence order."""

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, rope_theta: float = 10_000.0, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = nn.RMSNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rotary = RotaryEmbedding(dim // num_heads, rope_theta)
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.gate_up = nn.Linear(dim, 2 * mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: Tensor, positions: Tensor, *, valid: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """x: (B, T, D) new positions; positions: (B, T) rotary positions; valid: (B, T) False at
        padding (None = no padding); cache: extended in place. -> (B, T, D)."""
        B, T, _ = x.shape
        q, k, v = rearrange(self.qkv(self.attn_norm(x)), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        key_valid = valid
        if cache is not None:
            if cache.keys is not None:
                k = torch.cat((cache.keys, k), dim=2)
                v = torch.cat((cache.values, v), dim=2)
                if cache.valid is not None or valid is not None:
                    past_valid = cache.valid if cache.valid is not None else x.new_ones(B, cache.length, dtype=torch.bool)
                    key_valid = torch.cat((past_valid, valid if valid is not None else x.new_ones(B, T, dtype=torch.bool)), dim=1)
            cache.keys, cache.values, cache.valid = k, v, key_valid
        past = k.shape[2] - T
        if key_valid is None and T == 1:
            attended = F.scaled_dot_product_attention(q, k, v)  # one query sees every key so far
        elif key_valid is None and past == 0:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Query i (sequence index past + i) sees keys 0 .. past + i that are not padding, and always
            # itself: a padding query with nothing to see would give NaN that leaks into later layers.
            query_index = torch.arange(T, device=x.device)[:, None] + past
            key_index = torch.arange(k.shape[2], device=x.device)[None, :]
            mask = (key_index <= query_index)[None]
            if key_valid is not None:
                mask = (mask & key_valid[:, None, :]) | (key_index == query_index)[None]
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        x = x + self.out(rearrange(attended, "b h t d -> b t (h d)"))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)
