"""A lean inference forward for Llama-class backbones (Llama, Qwen2): the same arithmetic as the
transformers modules, written as one loop of plain tensor calls.

At the shipped model's size a decoding step is a chain of small products, and on a CPU the
transformers layers' Python (module calls, output capturing, mask building, per-layer rotary
tables) costs about as much as the arithmetic. :func:`lean_backbone` does the step with the same
operations in the same dtypes — RMS norms in float32, rotary tables in float32 rounded to the
compute dtype, scaled-dot-product attention with grouped KV heads — so its output equals the
transformers forward's (bit for bit on the shipped models; tests compare the two), and it reads and
updates the same caches (``update(keys, values, layer)``: transformers' ``DynamicCache`` and the
duplex model's KV ring).

Used by :meth:`SpeechLM.run_backbone` for forwards without gradients that do not ask for hidden
states, when :func:`supports` the backbone; anything else runs the transformers forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import rotate_half

SUPPORTED_TYPES = ("llama", "qwen2")


class LeanOutput(NamedTuple):
    last_hidden_state: Tensor  # (B, L, D), after the final norm (the field transformers' outputs name so)


def supports(backbone: nn.Module) -> bool:
    """Whether :func:`lean_backbone` computes ``backbone`` (a transformers causal LM) exactly: a Llama or
    Qwen2 decoder with plain rotary embeddings, SiLU MLPs and no sliding window."""
    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return False
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    base = backbone.base_model
    return (
        rope.get("rope_type", "default") == "default"
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
        and not getattr(config, "use_sliding_window", False)
        and all(hasattr(base, name) for name in ("layers", "norm", "rotary_emb"))
        and float(getattr(base.rotary_emb, "attention_scaling", 1.0)) == 1.0
    )


def _rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """transformers' RMSNorm: normalized in float32, rounded to the input's dtype, then scaled."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _mask(attention_mask: Tensor | None, B: int, L: int, past: int, device: torch.device) -> Tensor | None:
    """(B, 1, L, past + L) boolean: causal over the cache's order, and the (B, past + L) padding mask; a
    ready 4-D mask as it is. None where transformers leaves the mask out for SDPA (no padding, and one
    new position or no cache: plain causal attention)."""
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask.bool()
    if (L == 1 or past == 0) and (attention_mask is None or bool(attention_mask.all())):
        return None
    keys = torch.arange(past + L, device=device)
    mask = (keys[None, :] <= past + torch.arange(L, device=device)[:, None])[None, None]  # (1, 1, L, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask.expand(B, 1, L, past + L)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """q (B, H, L, d), k and v (B, H_kv, S, d) -> (B, H, L, d), grouped as transformers' SDPA integration
    groups them on this device (so that the rounding is the same): without a mask SDPA's own grouping
    (causal for a prompt); with one, one query position's heads packed onto their KV heads, more
    positions with the KV heads repeated."""
    B, H, L, d = q.shape
    groups = H // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=L > 1, enable_gqa=groups > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if L == 1:
        out = F.scaled_dot_product_attention(q.reshape(B, H // groups, groups, d), k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, H, 1, d)
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def lean_backbone(backbone: nn.Module, embeds: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache,
                  weight=None, products=None) -> Tensor:
    """embeds (B, L, D) -> the last hidden state (B, L, D), after the final norm, as the transformers
    backbone computes it. ``attention_mask``: (B, past + L) padding mask or a ready (B, 1, L, S) mask;
    ``position_ids``: (B, L) rotary positions (default: past, past + 1, ...); ``cache``: updated in place
    (or None). ``weight(module)``: the weight a projection computes with (an adapter's merged weight;
    default: its own). ``products``: computes the projections (``products.linear(x, weight, bias)``,
    e.g. :class:`speechlm.lm.int8.Int8Products`); default ``F.linear``."""
    base, config = backbone.base_model, backbone.config
    B, L, _ = embeds.shape
    if attention_mask is not None and attention_mask.ndim == 2:
        past = attention_mask.shape[1] - L
    else:
        past = cache.get_seq_length() if cache is not None and attention_mask is None else 0
    if position_ids is None:
        position_ids = (torch.arange(L, device=embeds.device) + past)[None].expand(B, L)
    mask = _mask(attention_mask, B, L, past, embeds.device)
    freqs = position_ids[..., None].float() * base.rotary_emb.inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(embeds.dtype)[:, None], angles.sin().to(embeds.dtype)[:, None]  # (B, 1, L, d)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weight = weight or (lambda module: module.weight)

    product = products.linear if products is not None else F.linear

    def linear(x: Tensor, module: nn.Linear) -> Tensor:
        return product(x, weight(module), module.bias)

    x = embeds
    for index, layer in enumerate(base.layers[: config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms_norm(x, layer.input_layernorm)
        q = linear(h, attn.q_proj).view(B, L, heads, head_dim).transpose(1, 2)
        k = linear(h, attn.k_proj).view(B, L, kv_heads, head_dim).transpose(1, 2)
        v = linear(h, attn.v_proj).view(B, L, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, index)
        out = _attention(q, k, v, mask, attn.scaling)
        x = x + linear(out.transpose(1, 2).reshape(B, L, heads * head_dim), attn.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm)
        x = x + linear(F.silu(linear(h, mlp.gate_proj)) * linear(h, mlp.up_proj), mlp.down_proj)
    return _rms_norm(x, base.norm)
