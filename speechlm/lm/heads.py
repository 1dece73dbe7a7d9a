"""What the speech LM adds around the backbone: audio embedding, audio output heads, MCTP modules.

Audio embedding (input side)
    One audio frame = one LM position. Its Q codes are looked up in Q tables of C + 1 rows
    (row C = the empty code), summed and scaled by ``1/sqrt(Q)`` so that a frame's
    embedding has the size of a text token's; the sum is added to the embedding of the
    position's text token (``<|audio|>``, or a time-aligned text token in duplex formats).

Audio output heads (output side): from the hidden state h_t of position t, predict all Q
codes of position t + 1. Both return logits over C + 1 classes (class C = empty: "no code
here" / "speech ends"). Two choices, picked by ``SpeechLMConfig.output_head``:

``ParallelHead`` with a delay pattern (MusicGen)
    Q linear heads read h_t at once. The codes are stored *delayed*: at position p of a
    speech segment, codebook q holds frame p - delays[q] (empty before it starts / after it
    ends), so a segment of F frames takes F + max(delays) positions. Predicting position
    t + 1 then means predicting codebook q of frame t + 1 - delays[q], while codebooks < q
    of that frame are already in the input at earlier positions: residual levels are
    conditioned on coarser ones without sequential compute, one matmul per position.
    Cost: the first complete frame appears max(delays) positions late, and a segment's
    tail needs max(delays) extra positions.

``DepthHead`` (Moshi's depformer)
    A tiny causal transformer runs over the Q codebooks of one frame: step q reads
    ``in_proj(h_t)`` plus a step embedding plus the embedding of code q - 1 (teacher-forced
    in training, sampled at generation), and predicts code q. Every frame is complete at
    its own position (no delay), at the price of Q small sequential steps per frame.

Which head (default ``"depth"``; quality still to be measured after training)
    Speed, 1 CPU thread, Q = 8, C = 1024, random weights, Llama backbone d = 64 / 2 layers
    (d = 256 / 12 layers): parallel_delay 2.0 (13.1) ms per frame, depth 6.5 (15.6) ms per
    frame without MCTP; the depth head's Q small steps are dispatch-bound and shrink relative to
    a real backbone and when many sessions share one batch. What decides it: with delays
    0..Q-1 the first complete frame needs Q positions, i.e. 8 backbone forwards without MCTP (2
    with N = 3), and every segment pays Q - 1 tail positions; the depth head completes a frame
    at every position, so audio comes out of the first forward after the prompt.

MCTP modules (VITA-Audio)
    Module i (1-based) reads the hidden states of module i - 1 (the backbone's last hidden
    state for i = 1) and the input embedding of the token at offset i (the frame module
    i - 1 predicted; the ground truth in training), fuses them (``Linear([norm(h); norm(e)])``),
    runs one causal transformer block over the sequence, and its normalised output feeds the
    *shared* audio head to predict the frame at offset i + 1. One backbone forward therefore
    yields frames at offsets 1 (backbone) .. N + 1 (module N).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import CausalBlock, KVCache

# choose(first_q, logits (B, n, C+1)) -> codes (B, n) for codebooks first_q .. first_q + n - 1:
# how generation turns logits into codes (sampling, and the codes it must force).
Chooser = Callable[[int, Tensor], Tensor]


def init_linear_(module: nn.Module, std: float) -> None:
    """Normal(0, std) weights and zero biases for every Linear/Embedding below ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class AudioEmbedding(nn.Module):
    """Q codebook tables of C + 1 rows, summed: codes (..., Q) -> (..., D).

    Stored as one (Q * (C + 1), D) table with per-codebook offsets, so one lookup serves all
    codebooks; row C of each codebook is the empty code and starts at zero.
    """

    def __init__(self, *, num_codebooks: int, codebook_size: int, dim: int, scale: float | None = None, init_std: float = 0.02):
        super().__init__()
        self.num_codebooks, self.rows = num_codebooks, codebook_size + 1
        self.scale = scale if scale is not None else 1.0 / math.sqrt(num_codebooks)
        self.table = nn.Embedding(num_codebooks * self.rows, dim)
        nn.init.normal_(self.table.weight, std=init_std)
        with torch.no_grad():
            self.table.weight.view(num_codebooks, self.rows, dim)[:, -1].zero_()
        self.register_buffer("offsets", torch.arange(num_codebooks) * self.rows, persistent=False)

    def forward(self, codes: Tensor) -> Tensor:
        return self.table(codes + self.offsets).sum(dim=-2) * self.scale


class ParallelHead(nn.Module):
    """Q linear heads at once: hidden (N, D) -> logits (N, Q, C + 1)."""

    def __init__(self, *, hidden_dim: int, num_codebooks: int, codebook_size: int, init_std: float = 0.02):
        super().__init__()
        self.num_codebooks = num_codebooks
        self.proj = nn.Linear(hidden_dim, num_codebooks * (codebook_size + 1))
        init_linear_(self, init_std)

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """``targets`` is ignored (the heads are independent given h; the delay pattern conditions them)."""
        return rearrange(self.proj(hidden), "n (q c) -> n q c", q=self.num_codebooks)

    @torch.no_grad()
    def generate(self, hidden: Tensor, choose: Chooser) -> Tensor:
        """hidden (B, D) -> codes (B, Q): all codebooks in one ``choose`` call."""
        return choose(0, self.forward(hidden))


class DepthHead(nn.Module):
    """Small causal transformer over the Q codebooks of one frame: hidden (N, D) -> logits (N, Q, C + 1)."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_codebooks: int,
        codebook_size: int,
        dim: int = 256,
        num_layers: int = 1,
        num_heads: int = 4,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_codebooks, self.rows = num_codebooks, codebook_size + 1
        self.in_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.step_embed = nn.Embedding(num_codebooks, dim)
        # Step q > 0 reads code q - 1 from its own table: rows (q - 1) * (C + 1) ...
        self.code_embed = nn.Embedding(max(num_codebooks - 1, 1) * self.rows, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim=dim, num_heads=num_heads, mlp_dim=3 * dim) for _ in range(num_layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.out = nn.Parameter(torch.empty(num_codebooks, self.rows, dim))  # per-codebook output matrix ...
        self.out_bias = nn.Parameter(torch.zeros(num_codebooks, self.rows))  # ... and bias (code priors)
        init_linear_(self, init_std)
        nn.init.normal_(self.out, std=init_std)

    def _step_inputs(self, projected: Tensor, steps: Tensor, previous_codes: Tensor) -> Tensor:
        """projected = in_proj(hidden) (N, dim), steps (S,), previous_codes (N, S) -> (N, S, dim)."""
        has_previous = steps > 0
        index = (steps.clamp(min=1) - 1) * self.rows + previous_codes
        return projected[:, None, :] + self.step_embed(steps)[None] + self.code_embed(index) * has_previous[None, :, None]

    def forward(self, hidden: Tensor, targets: Tensor | None = None) -> Tensor:
        """Teacher-forced: step q reads ``targets[:, q-1]`` (-100 read as empty). targets (N, Q)."""
        n, Q = hidden.shape[0], self.num_codebooks
        steps = torch.arange(Q, device=hidden.device)
        if targets is None:
            raise ValueError("DepthHead needs the target codes for teacher forcing")
        teacher = torch.where(targets < 0, self.rows - 1, targets)
        previous = torch.cat((torch.zeros_like(teacher[:, :1]), teacher[:, :-1]), dim=1)
        x = self._step_inputs(self.in_proj(hidden), steps, previous)
        positions = steps[None].expand(n, Q)
        for block in self.blocks:
            x = block(x, positions)
        return torch.einsum("nqd,qcd->nqc", self.norm(x), self.out) + self.out_bias

    @torch.no_grad()
    def generate(self, hidden: Tensor, choose: Chooser) -> Tensor:
        """hidden (B, D) -> codes (B, Q): Q sequential steps, each block keeping a KV cache."""
        B = hidden.shape[0]
        projected = self.in_proj(hidden)
        caches = [KVCache() for _ in self.blocks]
        codes = []
        previous = torch.zeros(B, 1, dtype=torch.long, device=hidden.device)
        for q in range(self.num_codebooks):
            step = torch.full((1,), q, device=hidden.device)
            x = self._step_inputs(projected, step, previous)
            for block, cache in zip(self.blocks, caches):
                x = block(x, step[None].expand(B, 1), cache=cache)
            logits = self.norm(x[:, 0]) @ self.out[q].T + self.out_bias[q]  # (B, C+1)
            previous = choose(q, logits[:, None])  # (B, 1)
            codes.append(previous)
        return torch.cat(codes, dim=1)


class MCTPModule(nn.Module):
    """One MCTP module: (hidden of module i-1, embedding of the token at offset i) -> hidden of module i.

    forward returns ``(hidden, normed)``: ``hidden`` (B, T, D) goes to module i + 1, ``normed``
    to the shared audio head (which predicts the frame at offset i + 1).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        num_layers: int = 1,
        rope_theta: float = 10_000.0,
        eps: float = 1e-6,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(dim, eps=eps)
        self.embed_norm = nn.RMSNorm(dim, eps=eps)
        self.fuse = nn.Linear(2 * dim, dim, bias=False)
        self.blocks = nn.ModuleList(
            CausalBlock(dim=dim, num_heads=num_heads, mlp_dim=mlp_dim, rope_theta=rope_theta, eps=eps) for _ in range(num_layers)
        )
        self.out_norm = nn.RMSNorm(dim, eps=eps)
        init_linear_(self, init_std)

    def forward(
        self, hidden: Tensor, embeds: Tensor, positions: Tensor, *, valid: Tensor | None = None, caches: list[KVCache] | None = None
    ) -> tuple[Tensor, Tensor]:
        """hidden, embeds: (B, T, D); positions, valid: (B, T); caches: one per block, extended in place."""
        x = self.fuse(torch.cat((self.hidden_norm(hidden), self.embed_norm(embeds)), dim=-1))
        for i, block in enumerate(self.blocks):
            x = block(x, positions, valid=valid, cache=None if caches is None else caches[i])
        return x, self.out_norm(x)


class HearingHead(nn.Module):
    """CTC hearing head: a backbone hidden state (..., D) -> a vector (..., D) for the tied text
    output layer, whose logits over the text vocabulary (blank = ``<|text_pad|>``) are the CTC
    distribution of the word pieces heard at that position.

    ``norm -> Linear(D, D) -> norm``: the input is an intermediate layer's un-normalised residual
    stream, the output is scaled like the backbone's final (normalised) hidden state.
    """

    def __init__(self, *, dim: int, eps: float = 1e-6, init_std: float = 0.02):
        super().__init__()
        self.in_norm = nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.out_norm = nn.RMSNorm(dim, eps=eps)
        init_linear_(self, init_std)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.out_norm(self.proj(self.in_norm(hidden)))
