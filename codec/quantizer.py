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
        dead_code_threshold_ratio: float = 0.1,
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
            dead_code_threshold_ratio=dead_code_threshold_ratio,
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
        return all(bool(book.initted) for book in self._layers())

    def _layers(self):
        return [layer._codebook for rvq in self.vq.rvqs for layer in rvq.layers]  # group-major, like the codes

    @staticmethod
    def _seeded_codebook(index: int, like: Tensor) -> Tensor:
        """Deterministic stand-in for codebook ``index`` (of shape ``like``: (1, C, d)) that was never initialised."""
        generator = torch.Generator().manual_seed(index)
        return (torch.randn(like.shape, generator=generator) / like.shape[-1] ** 0.5).to(like)

    def init_random_codebooks_(self) -> None:
        """Fill never-initialised (k-means pending) codebooks with seeded random vectors, for good.

        A freshly built codec with ``kmeans_init`` has all-zero codebooks until its first
        training batch. Use this only for models that will never train (speed tests, unit
        tests): it cancels the k-means init. Trained or loaded codebooks are left alone.
        """
        for index, book in enumerate(self._layers()):
            if not bool(book.initted):
                embed = self._seeded_codebook(index, book.embed)
                book.embed.data.copy_(embed)
                book.embed_avg.data.copy_(embed)
                book.cluster_size.data.fill_(1.0)
                book.initted.data.fill_(True)
        self._inference_cache = None

    def _codebooks(self) -> dict[str, Tensor]:
        """The codebooks laid out for :meth:`quantize_codes` and :meth:`lookup`; cached in eval mode.

        Per stage r: ``stage_flat[r]``: (G*C, d) with entry (g, c) at row g*C + c, ``books_t[r]``: (G, d, C),
        ``norms[r]``: (G, 1, C) squared norms; ``group_offsets``: (G, 1) = g*C. For lookup:
        ``flat``: (G*R*C, d) with entry (g, r, c) at row (g*R + r)*C + c, ``offsets``: (G*R,) = (g*R + r)*C.

        Codebooks still waiting for their k-means init are replaced by seeded random ones here,
        without touching the module, so that inference on an untrained codec (or validation
        during an unquantized warm-up) neither gives code 0 everywhere nor cancels the init.
        """
        if self._inference_cache is not None and not self.training:
            return self._inference_cache
        layers = self._layers()
        if not all(bool(book.initted) for book in layers):
            warnings.warn("codec codebooks are not initialised yet (k-means pending): inference uses seeded random codebooks", stacklevel=3)
        embeds = [book.embed[0] if bool(book.initted) else self._seeded_codebook(i, book.embed)[0] for i, book in enumerate(layers)]
        books = torch.stack(embeds).detach().view(self.groups, self.num_quantizers, *embeds[0].shape)
        g, r, c, d = books.shape  # (G, R, C, d)
        cache = {
            "stage_flat": [books[:, i].reshape(g * c, d) for i in range(r)],
            "group_offsets": (torch.arange(g, device=books.device) * c).view(g, 1),
            "books_t": [books[:, i].mT.contiguous() for i in range(r)],
            "norms": [books[:, i].square().sum(-1, keepdim=True).mT.contiguous() for i in range(r)],
            "flat": books.reshape(g * r * c, d),
            "offsets": torch.arange(g * r, device=books.device) * c,
        }
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
        cache = self._codebooks()
        batch, steps, _ = latent.shape
        residual = latent.reshape(batch * steps, self.groups, -1).transpose(0, 1)  # b t (g d) -> g (b t) d
        codes = []
        for stage_flat, books_t, norms in zip(cache["stage_flat"], cache["books_t"], cache["norms"]):
            # argmin_c |x - e_c|^2 = argmin_c (|e_c|^2 - 2 x.e_c)
            index = torch.baddbmm(norms, residual, books_t, alpha=-2.0).argmin(dim=-1)  # (G, N)
            codes.append(index)
            residual = residual - nn.functional.embedding(index + cache["group_offsets"], stage_flat)  # (G, N, d)
        return torch.stack(codes, dim=-1).permute(1, 0, 2).reshape(batch, steps, -1)  # g (b t) r -> b t (g r)

    def lookup(self, codes: Tensor, row_levels: Tensor | None = None) -> Tensor:
        """codes (B, T, G*k) -> latent (B, T, D) channels-last: per group, the sum of its chosen entries. k = R, or
        fewer: the first k residual levels of each group (a lower bitrate, :meth:`keep_levels`; the rest count 0).
        ``row_levels`` (B,): row b sums only its first ``row_levels[b]`` levels (training the decoder for every rate)."""
        cache = self._codebooks()
        batch, steps, width = codes.shape
        levels = width // self.groups
        offsets = cache["offsets"]
        if levels < self.num_quantizers:  # (the full width, every frame of the streaming decode, as it was)
            offsets = offsets.view(self.groups, self.num_quantizers)[:, :levels].reshape(-1)
        vectors = nn.functional.embedding(codes + offsets, cache["flat"])  # (B, T, G*k, d)
        vectors = vectors.view(batch, steps, self.groups, levels, self.dim // self.groups)
        if row_levels is not None:
            keep = torch.arange(levels, device=codes.device) < row_levels.to(codes.device)[:, None]  # (B, k)
            vectors = vectors * keep[:, None, None, :, None].to(vectors.dtype)
        return vectors.sum(dim=3).view(batch, steps, self.dim)

    def keep_levels(self, codes: Tensor, levels: int) -> Tensor:
        """codes (..., G*R) -> (..., G*levels): the first ``levels`` residual levels of each group (coarse to fine)."""
        if not 1 <= levels <= self.num_quantizers:
            raise SpeechLMError(f"levels must be 1 to {self.num_quantizers}, got {levels}")
        return codes.unflatten(-1, (self.groups, self.num_quantizers))[..., :levels].flatten(-2)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (B, T, G*R) int64 -> latent (B, D, T), equal to the library's ``get_output_from_indices``."""
        self.check_codes(codes, frames_axis=True)
        return rearrange(self.lookup(codes), "b t d -> b d t")

    def check_codes(self, codes: Tensor, frames_axis: bool) -> None:
        """Raise SpeechLMError unless ``codes`` is (B, T, G*k) (or (B, G*k)) of ints in [0, C), k = 1 .. R (fewer than
        R: the first k residual levels of each group)."""
        expected = (
            f"(batch, frames, {self.groups * self.num_quantizers})" if frames_axis else f"(batch, {self.groups * self.num_quantizers})"
        )
        if not isinstance(codes, Tensor):
            raise SpeechLMError(f"codes must be a torch tensor of shape {expected}, got {type(codes).__name__}")
        width = codes.shape[-1] if codes.ndim else 0
        if codes.ndim != (3 if frames_axis else 2) or width % self.groups or not 1 <= width // self.groups <= self.num_quantizers:
            raise SpeechLMError(
                f"codes must have shape {expected} ({self.groups} groups x {self.num_quantizers} quantizers; or fewer levels a group), "
                f"got {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise SpeechLMError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel():
            low, high = torch.aminmax(codes)
            if low < 0 or high >= self.codebook_size:
                raise SpeechLMError(f"codes must lie in [0, {self.codebook_size}), got values in [{int(low)}, {int(high)}]")

    # -- codebook health ----------------------------------------------------------------

    # The EMA codebooks keep a running sum of the vectors each entry was assigned (``embed_avg``) beside the
    # entries themselves: entry = (sum + eps * old entry) / (count + eps) after every update (and after dead-code
    # expiry), so sum = entry * count to within eps (1e-5) times the entry's last step: derived data. Files
    # written by ``Codec.save_pretrained`` leave it out (a quarter of the quantizer's bytes, 1 MB for the
    # shipped codec); loading puts it back.
    DERIVED_SUFFIX = "._codebook.embed_avg"

    def restore_derived(self) -> None:
        """Recompute each codebook's ``embed_avg`` from its entries and cluster sizes (the EMA invariant)."""
        with torch.no_grad():
            for book in self._layers():
                book.embed_avg.copy_(book.embed * book.cluster_size.unsqueeze(-1))

    def dead_code_fraction(self) -> float:
        """Fraction of codebook entries the next training step would replace as dead.

        An entry is dead when its EMA cluster size is below ``dead_code_threshold_ratio`` times its
        codebook's mean cluster size (the library's rule; no entry is dead before the first update).
        """
        books = self._layers()
        sizes = torch.cat([book.cluster_size for book in books])  # (G*R, C): one codebook per layer here
        ratio = books[0].dead_code_threshold_ratio
        return float((sizes < sizes.mean(dim=-1, keepdim=True) * ratio).float().mean())


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
