"""Group-residual vector quantization (GRVQ, as in HiFi-Codec) over ``vector_quantize_pytorch``.

The latent ``(B, D, T)`` is split into G groups of D/G channels; each group is
quantized by R residual codebooks of C entries. Codes are laid out per frame as
``(B, T, G*R)`` with index ``g*R + r`` (group-major).

Training goes through ``vector_quantize_pytorch.GroupedResidualVQ`` (EMA codebooks,
k-means init on the first training batch, dead-code replacement, commitment loss).
Inference (``quantize_codes`` / ``decode_codes``) uses the same codebooks through a
few batched tensor ops of our own: the library's per-layer Python costs ~3 ms per
call, more than the whole rest of a streaming codec step. Both pick the nearest
codebook entry per residual stage, so they give the same codes (tests check it).
"""

from __future__ import annotations

import warnings

import torch
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import GroupedResidualVQ

from .errors import SpeechLMError


class GroupResidualQuantizer(nn.Module):
    """G groups x R residual quantizers x C codes over a ``dim``-channel latent."""

    def __init__(
        self,
        *,
        dim: int,
        groups: int,
        num_quantizers: int,
        codebook_size: int,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        commitment_weight: float = 1.0,
    ):
        super().__init__()
        self.dim, self.groups, self.num_quantizers, self.codebook_size = dim, groups, num_quantizers, codebook_size
        self.vq = GroupedResidualVQ(
            dim=dim,
            groups=groups,
            num_quantizers=num_quantizers,
            codebook_size=codebook_size,
            decay=decay,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=commitment_weight,
        )
        self._inference_cache: tuple[Tensor, Tensor] | None = None

    # -- training --------------------------------------------------------------------

    def forward(self, latent: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Quantize with the library (EMA updates and k-means init happen in training mode).

        latent: (B, D, T) -> quantized (B, D, T) with straight-through gradients,
        codes (B, T, G*R) int64, {"commitment": scalar}.
        """
        quantized, indices, commit_losses = self.vq(rearrange(latent, "b d t -> b t d"))
        codes = rearrange(indices, "g b t r -> b t (g r)")
        return rearrange(quantized, "b t d -> b d t"), codes, {"commitment": commit_losses.sum()}

    # -- inference ---------------------------------------------------------------------

    @property
    def codebooks_initialized(self) -> bool:
        return all(bool(layer._codebook.initted) for rvq in self.vq.rvqs for layer in rvq.layers)

    def init_random_codebooks_(self, seed: int = 0) -> None:
        """Fill never-initialised (k-means pending) codebooks with seeded random vectors.

        A freshly built codec with ``kmeans_init`` has all-zero codebooks until its first
        training batch; inference on such a model (speed tests, unit tests) would give
        code 0 everywhere. Trained or loaded codebooks are left alone.
        """
        generator = torch.Generator().manual_seed(seed)
        for rvq in self.vq.rvqs:
            for layer in rvq.layers:
                book = layer._codebook
                if bool(book.initted):
                    continue
                embed = torch.randn(book.embed.shape, generator=generator) / book.embed.shape[-1] ** 0.5
                book.embed.data.copy_(embed)
                book.embed_avg.data.copy_(embed)
                book.cluster_size.data.fill_(1.0)
                book.initted.data.fill_(True)
        self._inference_cache = None

    def _codebooks(self) -> tuple[Tensor, Tensor]:
        """(G, R, C, d) codebooks and their squared norms (G, R, 1, C); cached in eval mode."""
        if self._inference_cache is not None and not self.training:
            return self._inference_cache
        if not self.codebooks_initialized:
            warnings.warn("codec codebooks were never trained (k-means init pending): using random codebooks", stacklevel=3)
            self.init_random_codebooks_()
        books = torch.stack([torch.stack([layer._codebook.embed[0] for layer in rvq.layers]) for rvq in self.vq.rvqs]).detach()
        cache = (books, rearrange(books.square().sum(-1), "g r c -> g r 1 c"))
        if not self.training:
            self._inference_cache = cache
        return cache

    def train(self, mode: bool = True):
        self._inference_cache = None  # codebooks change in training (EMA, dead-code replacement)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._inference_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._inference_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def quantize_codes(self, latent: Tensor) -> Tensor:
        """Nearest-entry residual quantization, no training side effects.

        latent: (B, T, D) channels-last -> codes (B, T, G*R) int64.
        """
        books, norms = self._codebooks()
        batch = latent.shape[0]
        residual = rearrange(latent, "b t (g d) -> g (b t) d", g=self.groups)
        codes = []
        for r in range(self.num_quantizers):
            # argmin_c |x - e_c|^2 = argmin_c (|e_c|^2 - 2 x.e_c)
            distance = torch.baddbmm(norms[:, r], residual, books[:, r].mT, alpha=-2.0)  # (G, N, C)
            index = distance.argmin(dim=-1)  # (G, N)
            codes.append(index)
            residual = residual - torch.gather(books[:, r], 1, index.unsqueeze(-1).expand(-1, -1, residual.shape[-1]))
        return rearrange(torch.stack(codes, dim=-1), "g (b t) r -> b t (g r)", b=batch)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (B, T, G*R) -> latent (B, T, D) channels-last: sum of the chosen entries per group."""
        books, _ = self._codebooks()
        g, r, c, d = books.shape
        offsets = torch.arange(g * r, device=codes.device).view(g, r) * c  # flat index of each codebook's first entry
        flat = rearrange(codes, "b t (g r) -> r b t g", g=g) + rearrange(offsets, "g r -> r 1 1 g")
        vectors = nn.functional.embedding(flat, books.reshape(g * r * c, d))  # (R, B, T, G, d)
        return rearrange(vectors.sum(dim=0), "b t g d -> b t (g d)")

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, T, G*R) int64 -> latent (B, D, T), equal to the library's ``get_output_from_indices``."""
        self.check_codes(codes, frames_axis=True)
        return rearrange(self.lookup(codes), "b t d -> b d t")

    def check_codes(self, codes: Tensor, frames_axis: bool) -> None:
        """Raise SpeechLMError unless ``codes`` is (B, T, G*R) (or (B, G*R)) of ints in [0, C)."""
        expected = f"(batch, frames, {self.groups * self.num_quantizers})" if frames_axis else f"(batch, {self.groups * self.num_quantizers})"
        if not isinstance(codes, Tensor):
            raise SpeechLMError(f"codes must be a torch tensor of shape {expected}, got {type(codes).__name__}")
        if codes.ndim != (3 if frames_axis else 2) or codes.shape[-1] != self.groups * self.num_quantizers:
            raise SpeechLMError(
                f"codes must have shape {expected} ({self.groups} groups x {self.num_quantizers} quantizers), got {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise SpeechLMError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise SpeechLMError(f"codes must lie in [0, {self.codebook_size}), got values in [{int(codes.min())}, {int(codes.max())}]")

    # -- codebook health ----------------------------------------------------------------

    def dead_code_fraction(self) -> float:
        """Fraction of codebook entries whose EMA cluster size is below the dead-code threshold."""
        sizes = torch.stack([layer._codebook.cluster_size for rvq in self.vq.rvqs for layer in rvq.layers])
        threshold = self.vq.rvqs[0].layers[0]._codebook.threshold_ema_dead_code
        return float((sizes < max(threshold, 1e-3)).float().mean())


def codebook_usage(codes: Tensor, codebook_size: int) -> dict[str, float]:
    """Codebook health of one batch of codes (B, T, Q), averaged over the Q codebooks.

    Returns ``used_fraction`` (distinct codes seen / C) and ``perplexity``
    (exp of the code entropy; C means perfectly uniform use, 1 means one code).
    """
    flat = rearrange(codes, "b t q -> q (b t)")
    counts = torch.zeros(flat.shape[0], codebook_size, device=codes.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    probs = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1)
    return {
        "used_fraction": float((counts > 0).float().mean()),
        "perplexity": float(entropy.exp().mean()),
    }
