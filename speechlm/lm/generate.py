"""Decoding: batched, KV-cached generation of text tokens and audio frames, with MCTP.

The pieces, bottom up:

``Sampling`` / ``sample_logits``
    temperature (0 = greedy), top-k, top-p, repetition penalty (text only); a seed makes a
    run repeatable (one ``torch.Generator`` per call).
``PromptBatch``
    left-padded prompts: token ids, and the codes of the prompt's audio positions (the
    positions holding ``<|audio|>``).
``Decoder``
    the incremental state of one batch: every *known* position's input embedding (fed to the
    backbone, or predicted and waiting to be fed), the backbone's ``DynamicCache``, and per
    MCTP module its KV caches and the hidden states of the level below that it has not read
    yet (or must read again: positions of a row waiting in a batch, see ``Decoder.mctp_step``).
    ``backbone_step`` feeds all waiting positions in one forward; ``mctp_step(j)`` runs
    module j. ``use_cache=False`` recomputes everything from scratch at every step (the
    reference that cached decoding must equal).
``iter_audio`` / ``tts_frames``
    one speech segment after the prompt (which should end with ``<|speech_start|>``). Each
    *step* = one backbone forward over the frames of the previous step, which predicts the
    frame at offset 1, then ``schedule[step]`` MCTP modules, module j predicting offset j + 1.
    So with N modules the very first backbone forward after the prompt already yields N + 1
    frames (positions). A row ends when codebook 0 predicts the empty code (or at
    ``max_frames``); with the delay pattern its remaining delayed codebooks are flushed first.
``iter_aligned_audio`` (``iter_aligned_audio_batch``, ``AlignedSpeechBatch`` in :mod:`speechlm.lm.aligned_batch`)
    word-aligned speech: each forced text chunk (a word) is followed by its own run of
    audio positions, which the model ends when the word is spoken; several rows (texts, or
    renderings of one text) in one batch, each through its own words
    (:meth:`Decoder.append_rows` lays a row's next chunk beside the others' frames), rows
    joining and leaving a running batch (:meth:`Decoder.select_rows`).
``iter_text`` / ``text_generate``
    text tokens until a stop token or ``max_new_tokens``.

Guidance (``guidance`` > 0, audio): classifier-free guidance on the speech's text. Each row gets
an unconditional twin in the same batch (rows B..2B-1) that hears the same audio without the text
(``unconditional_prompt``, e.g. ``<|tts|> <|speech_start|>``, and no word chunks: where its twin
is fed a chunk, it holds masked placeholders, see :meth:`Decoder.append_where`); each audio
position's logits become ``cond + guidance * (cond - uncond)``, except codebook 0's empty code (a
word's or segment's end), which stays the conditional model's call. Twice the rows per forward.

All rows of a batch advance in lock-step; finished rows keep computing (their outputs
forced to padding / empty codes) until every row is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from speechlm.codec.errors import SpeechLMError

from .layers import KVCache
from .model import SpeechLM, check_codes, check_token_ids

# -- sampling -------------------------------------------------------------------------------


@dataclass
class Sampling:
    """How logits become tokens. ``temperature=0`` is greedy (top-k/top-p then do nothing)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (text only)
    # Audio only: one temperature per codebook (0 = greedy for that codebook), replacing ``temperature``
    # there; e.g. the residual levels cooler than the first level of each group. None = ``temperature``.
    codebook_temperatures: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise SpeechLMError(
                f"bad sampling parameters: temperature {self.temperature} (>= 0), top_k {self.top_k} (>= 0), "
                f"top_p {self.top_p} (in (0, 1]), repetition_penalty {self.repetition_penalty} (> 0)"
            )
        if self.codebook_temperatures is not None:
            self.codebook_temperatures = tuple(float(t) for t in self.codebook_temperatures)
            if not self.codebook_temperatures or min(self.codebook_temperatures) < 0:
                raise SpeechLMError(f"bad codebook temperatures {self.codebook_temperatures}: one value >= 0 per codebook")


GREEDY = Sampling(temperature=0.0)


def parse_codebook_temperatures(text: str | None) -> tuple[float, ...] | None:
    """``"0.8,0,0,0"`` (a command-line value) -> (0.8, 0.0, 0.0, 0.0); None or "" -> None."""
    if not text:
        return None
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise SpeechLMError(f"bad codebook temperatures {text!r}: comma-separated numbers, one per codebook") from None


def sample_logits(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> ids (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_codebooks(logits: Tensor, first_q: int, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, n, V) of codebooks ``first_q .. first_q + n - 1`` -> codes (B, n), with each
    codebook's own temperature when ``sampling.codebook_temperatures`` is set."""
    B, n, V = logits.shape
    temps = sampling.codebook_temperatures
    if temps is None:
        return sample_logits(logits.flatten(0, 1), sampling, generator).view(B, n)
    if first_q + n > len(temps):
        raise SpeechLMError(f"{len(temps)} codebook temperatures given, the model has more codebooks ({first_q + n})")
    wanted = torch.tensor(temps[first_q : first_q + n], device=logits.device)
    greedy = wanted == 0
    scaled = logits.float() / torch.where(greedy, 1.0, wanted)[None, :, None]
    code = sample_logits(scaled.flatten(0, 1), dataclasses.replace(sampling, temperature=1.0, codebook_temperatures=None), generator)
    return torch.where(greedy[None], logits.argmax(dim=-1), code.view(B, n))


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style: divide positive / multiply negative logits of ``seen`` (B, V) bool tokens by ``penalty``."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


# -- prompts ----------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    """Left-padded prompts. ``audio_codes`` hold the empty code at non-audio positions."""

    input_ids: Tensor  # (B, L)
    audio_codes: Tensor  # (B, L, Q)
    audio_mask: Tensor  # (B, L) bool
    attention_mask: Tensor  # (B, L) bool, False at left padding

    @classmethod
    def build(cls, model: SpeechLM, input_ids, audio_codes: Sequence[Tensor | None] | None = None) -> PromptBatch:
        """``input_ids``: one sequence of ints or a list of them (or a (B, L) tensor without padding).
        ``audio_codes``: per row, the codes of its ``<|audio|>`` positions in order, (A, Q) in the
        model's layout (see ``SpeechLM.audio_layout``), or None for a row without audio."""
        rows = _as_rows(input_ids)
        if not rows:
            raise SpeechLMError("no prompts given")
        if audio_codes is None or isinstance(audio_codes, Tensor) and audio_codes.ndim == 2 and len(rows) == 1:
            audio_codes = [audio_codes] if isinstance(audio_codes, Tensor) else [None] * len(rows)
        if len(audio_codes) != len(rows):
            raise SpeechLMError(f"got {len(rows)} prompts but audio codes for {len(audio_codes)}")
        cfg, device = model.config, model.device
        B, L = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, L), model.vocab.pad, dtype=torch.long)
        codes = torch.full((B, L, cfg.num_codebooks), cfg.empty_code, dtype=torch.long)
        attention = torch.zeros(B, L, dtype=torch.bool)
        for b, (row, row_codes) in enumerate(zip(rows, audio_codes)):
            if not row:
                raise SpeechLMError(f"prompt {b} is empty")
            ids[b, L - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention[b, L - len(row) :] = True
            where_audio = (ids[b] == model.vocab.audio) & attention[b]
            count = int(where_audio.sum())
            if row_codes is None:
                if count:
                    raise SpeechLMError(f"prompt {b} has {count} audio positions but no audio codes")
                continue
            check_codes(row_codes, cfg, leading=(count,))
            codes[b, where_audio] = row_codes.long().cpu()
        check_token_ids(ids, model.backbone.get_input_embeddings().weight.shape[0])
        audio_mask = (ids == model.vocab.audio) & attention
        return cls(ids.to(device), codes.to(device), audio_mask.to(device), attention.to(device))


def _as_rows(input_ids) -> list[list[int]]:
    if isinstance(input_ids, Tensor):
        if input_ids.ndim == 1:
            return [input_ids.tolist()]
        if input_ids.ndim == 2:
            return input_ids.tolist()
        raise SpeechLMError(f"prompt ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
    rows = list(input_ids)
    if rows and all(isinstance(x, int) for x in rows):
        return [rows]
    return [list(r) for r in rows]


def speech_segment(model: SpeechLM, frames: Tensor) -> tuple[list[int], Tensor]:
    """Frames (F, Q) -> (token ids ``<|speech_start|> <|audio|> x P <|speech_end|>``, codes (P, Q)):
    a speech segment to put in a prompt (P = F, or F + max delay for the delay pattern)."""
    check_codes(frames, model.config, leading=(frames.shape[0] if isinstance(frames, Tensor) else 0,))
    layout = model.audio_layout(frames.long())
    v = model.vocab
    return [v.speech_start, *([v.audio] * layout.shape[0]), v.speech_end], layout


# -- incremental state --------------------------------------------------------------------------


@dataclass
class Decoder:
    """Incremental decoding state of one batch (see the module docstring)."""

    model: SpeechLM = field(repr=False)
    known_embeds: Tensor  # (B, K, D)
    known_valid: Tensor  # (B, K) bool, False at left padding
    known_positions: Tensor  # (B, K) rotary positions
    use_cache: bool = True
    padded: bool = True  # some prompt has left padding (else the MCTP blocks skip their padding masks)
    holes: bool = False  # some row has masked positions after its start (append_where): offsets skip them
    backbone_forwards: int = 0
    fed: int = 0
    cache: object = None
    mctp_caches: list[list[KVCache]] = field(default_factory=list)
    mctp_done: list[int] = field(default_factory=list)  # positions each module has processed
    # per module, the first position it must compute again (None: none): a position whose input j
    # positions ahead was not known yet in some row (a row waiting, in a batch, for its next word)
    mctp_stale: list[int | None] = field(default_factory=list)
    # hidden states of level i (0 = the backbone, i = module i) that module i + 1 has not read, or may
    # read again (stale): (first position, (B, n, D))
    levels: list[tuple[int, Tensor] | None] = field(default_factory=list)

    @classmethod
    def start(cls, model: SpeechLM, prompt: PromptBatch, *, use_cache: bool = True) -> Decoder:
        embeds = model.embed(prompt.input_ids, prompt.audio_codes, prompt.audio_mask)
        positions = (prompt.attention_mask.long().cumsum(1) - 1).clamp(min=0)
        padded = not bool(prompt.attention_mask.all())
        decoder = cls(model, embeds, prompt.attention_mask, positions, use_cache=use_cache, padded=padded)
        decoder.reset()
        return decoder

    def reset(self) -> None:
        """Forget every cache: the next backbone step recomputes all known positions."""
        from transformers import DynamicCache

        self.fed = 0
        self.cache = DynamicCache(config=self.model.backbone.config)
        self.mctp_caches = [[KVCache() for _ in module.blocks] for module in self.model.mctp]
        self.mctp_done = [0] * len(self.model.mctp)
        self.mctp_stale = [None] * len(self.model.mctp)
        self.levels = [None] * len(self.model.mctp)

    @property
    def known(self) -> int:
        return self.known_embeds.shape[1]

    def append(self, embeds: Tensor, valid: Tensor | None = None) -> None:
        """Add predicted positions (B, n, D); the next backbone step feeds them. ``valid`` (B, n): False
        where a row gets a masked placeholder instead (a row waiting in a batch); a row whose last
        position is a placeholder needs :meth:`append_rows` before the next backbone step."""
        B, n, _ = embeds.shape
        if valid is None:
            valid = torch.ones(B, n, dtype=torch.bool, device=embeds.device)
        elif not bool(valid.all()):
            self.padded = self.holes = True
        positions = self.known_positions[:, -1:] + valid.long().cumsum(1)  # placeholders take the last position's
        self.known_embeds = torch.cat((self.known_embeds, embeds * valid[..., None]), dim=1)
        self.known_valid = torch.cat((self.known_valid, valid), dim=1)
        self.known_positions = torch.cat((self.known_positions, positions), dim=1)

    def append_where(self, embeds: Tensor, rows: Tensor) -> None:
        """Add positions (B, n, D) to the rows where ``rows`` (B,) is True; the other rows get none
        (:meth:`append_rows`: they hold n masked placeholders instead; a guided decoding's
        unconditional rows skip the word chunks their twins are fed)."""
        keep = rows.tolist()
        self.append_rows([embeds[b] if keep[b] else None for b in range(embeds.shape[0])])

    def append_rows(self, embeds: Sequence[Tensor | None]) -> None:
        """Add n_b positions (n_b, D) to each row b (None: none), rows of one batch taking different
        numbers. The positions not fed yet are laid out again, per row: the row's own unfed positions
        and then its new ones, in order, with masked placeholders (they take no rotary position and
        no query attends to them) in front of the last, so that the rows stay aligned and every
        row's last position is its own (``backbone_step`` returns its hidden state): each row needs
        at least one position to feed."""
        B, K, D = self.known_embeds.shape
        if len(embeds) != B:
            raise SpeechLMError(f"positions for {len(embeds)} rows given, the batch has {B}")
        start = self.fed
        tails = []
        for b, new in enumerate(embeds):
            valid = self.known_valid[b, start:]
            own, positions = self.known_embeds[b, start:][valid], self.known_positions[b, start:][valid]
            n = 0 if new is None else new.shape[0]
            if n:
                own = torch.cat((own, new.to(own.dtype)))
                positions = torch.cat((positions, self.known_positions[b, -1] + torch.arange(1, n + 1, device=positions.device)))
            if not len(own):
                raise RuntimeError(f"row {b} has no position to feed")
            tails.append((own, positions))
        length = max(len(own) for own, _ in tails)
        device = self.known_embeds.device
        embeds_tail = torch.zeros(B, length, D, dtype=self.known_embeds.dtype, device=device)
        valid_tail = torch.zeros(B, length, dtype=torch.bool, device=device)
        positions_tail = torch.zeros(B, length, dtype=self.known_positions.dtype, device=device)
        for b, (own, positions) in enumerate(tails):
            n = len(own) - 1  # own positions before the placeholders; the last comes after them
            embeds_tail[b, :n], embeds_tail[b, -1] = own[:n], own[-1]
            valid_tail[b, :n], valid_tail[b, -1] = True, True
            positions_tail[b] = positions[-1]  # the placeholders' (unused) rotary position
            positions_tail[b, :n] = positions[:n]
        self.known_embeds = torch.cat((self.known_embeds[:, :start], embeds_tail), dim=1)
        self.known_valid = torch.cat((self.known_valid[:, :start], valid_tail), dim=1)
        self.known_positions = torch.cat((self.known_positions[:, :start], positions_tail), dim=1)
        if not bool(valid_tail.all()):
            self.padded = self.holes = True

    def select_rows(self, index: Sequence[int]) -> None:
        """Keep the rows ``index`` names, in that order; -1 adds a row with no position known (every
        column masked; its rotary positions start at 0 when :meth:`append_rows` gives it its prompt). The
        caches and the hidden states the MCTP modules have not read follow (a row that joins or leaves a
        running batch, :class:`speechlm.lm.aligned_batch.AlignedSpeechBatch`); call it where the rows'
        positions fed so far are all their own (between steps)."""
        R = self.known_embeds.shape[0]
        pick = torch.tensor([R if i < 0 else i for i in index], dtype=torch.long, device=self.known_embeds.device)

        def rows(t: Tensor, fill) -> Tensor:  # (R, ...) -> (len(index), ...): row R is the new, empty one
            return torch.cat((t, torch.full_like(t[:1], fill))).index_select(0, pick)

        self.known_embeds, self.known_valid = rows(self.known_embeds, 0), rows(self.known_valid, False)
        self.known_positions = rows(self.known_positions, -1)
        for layer in getattr(self.cache, "layers", ()):
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = rows(layer.keys, 0), rows(layer.values, 0)
        for caches in self.mctp_caches:
            for cache in caches:
                if cache.keys is not None:
                    valid = cache.valid if cache.valid is not None else torch.ones(cache.keys.shape[0], cache.length, dtype=torch.bool, device=cache.keys.device)
                    cache.keys, cache.values, cache.valid = rows(cache.keys, 0), rows(cache.values, 0), rows(valid, False)
        self.levels = [None if level is None else (level[0], rows(level[1], 0)) for level in self.levels]
        if min(index, default=0) < 0:
            self.padded = self.holes = True
        self.drop_masked_columns()

    def drop_masked_columns(self) -> None:
        """Forget the leading positions that every row has masked (those of rows that left the batch), up to
        the positions fed: the caches, levels and counts shift left by as many columns."""
        held = self.known_valid.any(0).nonzero()
        c = min(int(held[0]) if len(held) else self.known, self.fed)
        if c <= 0:
            return

        def shifted(index: int) -> int:
            return max(index, c) - c

        self.known_embeds, self.known_valid, self.known_positions = (t[:, c:] for t in (self.known_embeds, self.known_valid, self.known_positions))
        for layer in getattr(self.cache, "layers", ()):
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[:, :, c:], layer.values[:, :, c:]
        for caches in self.mctp_caches:
            for cache in caches:
                if cache.keys is not None:
                    cache.keys, cache.values = cache.keys[:, :, c:], cache.values[:, :, c:]
                    cache.valid = None if cache.valid is None else cache.valid[:, c:]
                    if cache.keys.shape[2] == 0:
                        cache.keys = cache.values = cache.valid = None
        self.levels = [None if level is None else (shifted(level[0]), level[1][:, max(0, c - level[0]) :]) for level in self.levels]
        self.fed = shifted(self.fed)
        self.mctp_done = [shifted(d) for d in self.mctp_done]
        self.mctp_stale = [None if s is None else shifted(s) for s in self.mctp_stale]

    def backbone_step(self) -> Tensor:
        """One backbone forward over every position not fed yet -> hidden state of the last one (B, D)."""
        if not self.use_cache:
            self.reset()
        start, end = self.fed, self.known
        output = self.model.run_backbone(
            self.known_embeds[:, start:end],
            attention_mask=self.known_valid[:, :end],
            position_ids=self.known_positions[:, start:end],
            past_key_values=self.cache,
        )
        hidden = output.last_hidden_state
        if self.model.mctp:
            self._store(0, start, hidden)
        self.fed = end
        self.backbone_forwards += 1
        return hidden[:, -1]

    def mctp_step(self, j: int) -> Tensor:
        """Run MCTP module j (1-based) up to the last fed position -> its normed hidden there (B, D),
        from which the audio head predicts the frame at offset j + 1. Needs modules 1 .. j-1 to
        have run up to the same position and the frames at offsets 1 .. j to be known.

        In a batch whose rows wait for each other (a row whose word has ended holds masked
        placeholders while the others go on), module j may reach positions of a waiting row whose
        input j positions ahead is not known yet; those positions are computed again at the
        module's next step (``mctp_stale``), once the row has its next word, so that every row gets
        what decoding it alone gives."""
        i = j - 1
        module, end = self.model.mctp[i], self.fed
        start = self.mctp_done[i] if self.mctp_stale[i] is None else self.mctp_stale[i]  # stale < done
        level = self.levels[i]
        if self.known < end + j or level is None or level[0] > start or level[0] + level[1].shape[1] != end:
            raise RuntimeError(f"MCTP module {j} cannot run: modules 1..{j - 1} must run first at this step")
        if start < self.mctp_done[i]:  # forget what it computed from a stale position on
            for cache in self.mctp_caches[i]:
                if cache.keys is not None:
                    cache.keys, cache.values = cache.keys[:, :, :start], cache.values[:, :, :start]
                    cache.valid = None if cache.valid is None else cache.valid[:, :start]
        below = level[1][:, start - level[0] :]
        ahead, unknown = self._ahead(start, end, j)
        hidden, normed = module(
            below,
            ahead,
            self.known_positions[:, start:end],
            valid=self.known_valid[:, start:end] if self.padded else None,
            caches=self.mctp_caches[i],
        )
        if j < len(self.model.mctp):
            self._store(j, start, hidden)
        self.mctp_done[i] = end
        stale = None if unknown is None else unknown.any(0).nonzero()
        self.mctp_stale[i] = start + int(stale[0]) if stale is not None and len(stale) else None
        keep = end if self.mctp_stale[i] is None else self.mctp_stale[i]  # what module j may read again
        self.levels[i] = (keep, level[1][:, keep - level[0] :])
        return normed[:, -1]

    def _ahead(self, start: int, end: int, j: int) -> tuple[Tensor, Tensor | None]:
        """The embeddings (B, end - start, D) j positions after each of positions start .. end-1: in a
        row with masked placeholders (``holes``), j *unmasked* positions after it, so that module j
        reads what follows in the row's own sequence (a guided decoding's unconditional row has no
        word chunks between its audio frames). Also (B, end - start) bool: True where that position
        is not known yet (a row waiting in a batch; the embedding there is a stand-in); None without
        placeholders (every position ahead is known)."""
        if not self.holes:
            return self.known_embeds[:, start + j : end + j], None
        valid = self.known_valid
        rank = valid.long().cumsum(1) - 1  # (B, K): the rank of each unmasked position among them
        at_rank = torch.zeros_like(rank).scatter_(1, torch.where(valid, rank, rank.shape[1] - 1), torch.arange(rank.shape[1], device=rank.device).expand_as(rank))
        count = valid.long().sum(1, keepdim=True)
        unknown = valid[:, start:end] & (rank[:, start:end] + j > count - 1)
        wanted = (rank[:, start:end] + j).clamp(max=count - 1).clamp(min=0)
        index = torch.where(valid[:, start:end], at_rank.gather(1, wanted), (torch.arange(start, end, device=rank.device) + j).clamp(max=rank.shape[1] - 1))
        return self.known_embeds.gather(1, index[..., None].expand(-1, -1, self.known_embeds.shape[-1])), unknown

    def _store(self, index: int, start: int, hidden: Tensor) -> None:
        """Level ``index``'s hidden states (B, n, D) at positions start .. start + n - 1 (replacing any there)."""
        level = self.levels[index]
        if level is None:
            self.levels[index] = (start, hidden)
            return
        first, old = level
        if start < first or start > first + old.shape[1]:
            raise RuntimeError(f"level {index}: positions from {start} do not continue those from {first}")
        self.levels[index] = (first, torch.cat((old[:, : start - first], hidden), dim=1))


def _check_length(model: SpeechLM, prompt: PromptBatch, new_positions: int) -> None:
    limit = getattr(model.backbone.config, "max_position_embeddings", None)
    total = prompt.input_ids.shape[1] + new_positions
    if limit is not None and total > limit:
        raise SpeechLMError(
            f"prompt ({prompt.input_ids.shape[1]} positions) plus {new_positions} new ones exceeds the model's limit of {limit}"
        )


def _prompt(model: SpeechLM, prompt, audio_codes=None) -> PromptBatch:
    return prompt if isinstance(prompt, PromptBatch) else PromptBatch.build(model, prompt, audio_codes)


# -- text -------------------------------------------------------------------------------------


@torch.no_grad()
def iter_text(
    model: SpeechLM,
    prompt,
    *,
    audio_codes: Sequence[Tensor | None] | None = None,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(tokens (B,), finished (B,))`` per step; a row's stop token is yielded, after it the pad id.

    ``prompt``: a PromptBatch, or token ids (one list or a list of lists) with ``audio_codes``
    for their ``<|audio|>`` positions. Default stop tokens: eos and ``<|end|>``.
    """
    prompt = _prompt(model, prompt, audio_codes)
    sampling = sampling or Sampling()
    if max_new_tokens < 1:
        raise SpeechLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_length(model, prompt, max_new_tokens)
    v = model.vocab
    stops = torch.tensor(sorted(set(stop_tokens if stop_tokens is not None else (v.eos, v.end_of_turn))), device=model.device)
    generator = _generator(seed, model.device)
    decoder = Decoder.start(model, prompt, use_cache=use_cache)
    B = prompt.input_ids.shape[0]
    rows = model.backbone.get_output_embeddings().weight.shape[0]
    seen = torch.zeros(B, rows, dtype=torch.bool, device=model.device)
    seen.scatter_(1, torch.where(prompt.attention_mask, prompt.input_ids, v.pad), True)
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)
    for _ in range(max_new_tokens):
        logits = model.text_logits(decoder.backbone_step()).float()
        logits[:, v.size :] = float("-inf")  # embedding rows past the tokenizer (padding to a multiple of 64)
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
        tokens = torch.where(finished, v.pad, sample_logits(logits, sampling, generator))
        seen.scatter_(1, tokens[:, None], True)
        finished = finished | torch.isin(tokens, stops)
        yield tokens, finished.clone()
        if bool(finished.all()):
            return
        decoder.append(model.embed(tokens[:, None]))


def text_generate(model: SpeechLM, prompt, **kwargs) -> list[list[int]]:
    """Generate text for each prompt; returns the new token ids per row, stop token excluded.
    Takes the arguments of :func:`iter_text`."""
    prompt = _prompt(model, prompt, kwargs.pop("audio_codes", None))
    out: list[list[int]] = [[] for _ in range(prompt.input_ids.shape[0])]
    done = [False] * len(out)
    for tokens, finished in iter_text(model, prompt, **kwargs):
        for b, (token, stop) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if not done[b] and not stop:
                out[b].append(token)
            done[b] = stop
    return out


# -- audio ------------------------------------------------------------------------------------


@dataclass
class AudioStep:
    """What one backbone forward (plus its MCTP modules) produced."""

    frames: list[Tensor]  # per row: frames completed in this step, (n, Q) (delayed codebooks undone)
    positions: int  # audio positions predicted in this step: 1 (backbone) + MCTP modules run
    backbone_forwards: int  # backbone forwards so far, this one included (the prompt's is the first)
    finished: Tensor  # (B,) bool
    words: list[int | None] | None = None  # word-aligned speech: per row, the chunk (word) its frames here belong to


class _Segment:
    """The codes of one speech segment per row as they are generated (see :func:`iter_audio`).

    Segment position p holds, in codebook q, frame p - delays[q]; codebook 0 picking the empty
    code ends the row's segment (not before ``min_frames``, at ``max_frames`` at the latest).
    """

    def __init__(self, model: SpeechLM, batch: int, max_frames: int, min_frames: int, sampling: Sampling, generator):
        cfg, device = model.config, model.device
        self.model, self.sampling, self.generator = model, sampling, generator
        self.min_frames, self.max_delay = min_frames, cfg.max_delay
        self.empty = cfg.empty_code
        self.delay_offsets = torch.tensor(cfg.audio_delays, device=device)[None, :]  # (1, Q)
        self.first_delay = cfg.audio_delays[0]  # codebook 0's delay, as a Python int (no device sync per position)
        self.is_empty_class = torch.arange(self.empty + 1, device=device) == self.empty  # (C+1,)
        self.layout = torch.empty(batch, 0, cfg.num_codebooks, dtype=torch.long, device=device)  # codes of the positions so far
        self.end_frame = torch.full((batch,), max_frames, dtype=torch.long, device=device)  # frames in each row's segment
        self.emitted = [0] * batch

    def _chooser(self, p: int):
        """Codes for segment position p: codebook q there holds frame p - delays[q]."""
        device, first_delay = self.layout.device, self.first_delay

        def choose(first_q: int, logits: Tensor) -> Tensor:
            n = logits.shape[1]
            frame = p - self.delay_offsets[0, first_q : first_q + n]  # (n,)
            # Only codebook 0 may end the segment (pick the empty code), and not before min_frames.
            no_end = (torch.arange(first_q, first_q + n, device=device) > 0) | (frame < self.min_frames)
            logits = logits.float().masked_fill(no_end[None, :, None] & self.is_empty_class, float("-inf"))
            code = sample_codebooks(logits, first_q, self.sampling, self.generator)
            if first_q == 0 and p >= first_delay:
                ends_here = code[:, 0] == self.empty
                self.end_frame = torch.where(ends_here, torch.clamp(self.end_frame, max=p - first_delay), self.end_frame)
            # Not started yet, or ended already (this row's segment is complete, or ends at this frame).
            forced = (frame[None] < 0) | (frame[None] >= self.end_frame[:, None])
            return torch.where(forced, self.empty, code)

        return choose

    def next_position(self, hidden: Tensor, guidance: float = 0.0) -> Tensor:
        """hidden (B, D) at the position before -> the codes (B, Q) of the segment's next position.
        With ``guidance`` > 0, hidden is (2B, D): the B rows, then their unconditional twins (rows
        without the text, see the module doc); the codes are the B rows', (B, Q)."""
        choose = self._chooser(self.layout.shape[1])
        if not guidance:
            codes = self.model.audio_head.generate(hidden, choose)
        else:
            B, empty = self.layout.shape[0], self.empty
            codes = self.model.audio_head.generate(hidden, lambda q, logits: choose(q, _guided_logits(logits, q, guidance, B, empty)).repeat(2, 1))[:B]
        self.push(codes)
        return codes

    def push(self, codes: Tensor) -> None:
        """Append the codes (B, Q) chosen for the segment's next position."""
        self.layout = torch.cat((self.layout, codes[:, None]), dim=1)

    @property
    def finished(self) -> Tensor:
        return self.layout.shape[1] - self.max_delay >= self.end_frame  # (B,) bool

    def new_frames(self) -> list[Tensor]:
        """Per row, the frames (n, Q) completed since the last call (delayed codebooks undone)."""
        complete = torch.clamp(self.end_frame, max=max(self.layout.shape[1] - self.max_delay, 0)).tolist()
        frames = []
        for b in range(len(self.emitted)):
            # Frame f's codebook q sits at segment position f + delays[q].
            where = torch.arange(self.emitted[b], max(complete[b], self.emitted[b]), device=self.layout.device)[:, None] + self.delay_offsets
            frames.append(self.layout[b].gather(0, where))
            self.emitted[b] = max(self.emitted[b], complete[b])
        return frames


def _guided_logits(logits: Tensor, first_q: int, guidance: float, B: int, empty: int) -> Tensor:
    """logits (2B, n, C+1) of B rows, then their unconditional twins -> the guided logits (B, n, C+1):
    ``cond + guidance * (cond - uncond)``, except codebook 0's empty code (a segment's end), which
    stays the conditional model's call."""
    cond, uncond = logits[:B].float(), logits[B:].float()
    mixed = cond + guidance * (cond - uncond)
    if first_q == 0:
        mixed[:, 0, empty] = cond[:, 0, empty]
    return mixed


@torch.no_grad()
def iter_audio(
    model: SpeechLM,
    prompt,
    *,
    audio_codes: Sequence[Tensor | None] | None = None,
    max_frames: int = 750,
    min_frames: int = 0,
    sampling: Sampling | None = None,
    schedule: Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    per_position: bool = False,
    guidance: float = 0.0,
    unconditional_prompt: Sequence[int] | None = None,
) -> Iterator[AudioStep]:
    """Generate one speech segment per row after ``prompt`` (which should end with
    ``<|speech_start|>``); yield an :class:`AudioStep` per backbone forward, or with
    ``per_position=True`` one per audio position (so a streaming consumer gets the backbone's
    frame before the MCTP modules run; ``positions`` is then 1 and the forward count repeats).

    ``schedule``: MCTP frames after each backbone forward (entry s for forward s, the last
    repeating; default the config's); ``[0]`` is plain autoregressive decoding. ``min_frames``:
    the segment may not end earlier; ``max_frames``: it ends there at the latest. ``guidance``:
    classifier-free guidance against ``unconditional_prompt`` (one prompt for every row, see the module doc).
    """
    prompt = _prompt(model, prompt, audio_codes)
    B = prompt.input_ids.shape[0]
    if _guided(guidance, unconditional_prompt):
        rows = [row[valid].tolist() for row, valid in zip(prompt.input_ids, prompt.attention_mask)]
        codes = [c[m] if bool(m.any()) else None for c, m in zip(prompt.audio_codes, prompt.audio_mask)]
        prompt = PromptBatch.build(model, rows + [list(unconditional_prompt)] * B, codes + [None] * B)
    cfg = model.config
    sampling = sampling or Sampling()
    if max_frames < 1 or min_frames < 0:
        raise SpeechLMError(f"need max_frames >= 1 and min_frames >= 0, got {max_frames} and {min_frames}")
    steps = cfg.schedule(list(schedule) if schedule is not None else None)
    _check_length(model, prompt, max_frames + cfg.max_delay + cfg.mctp_modules + 1)
    decoder = Decoder.start(model, prompt, use_cache=use_cache)
    segment = _Segment(model, B, max_frames, min_frames, sampling, _generator(seed, model.device))
    yield from _segment_steps(model, decoder, segment, steps, per_position, guidance)


def _guided(guidance: float, unconditional_prompt: Sequence[int] | None) -> bool:
    """Whether to decode with classifier-free guidance (checked arguments)."""
    if guidance < 0:
        raise SpeechLMError(f"guidance must be >= 0, got {guidance}")
    if guidance and not unconditional_prompt:
        raise SpeechLMError("guidance needs an unconditional prompt (e.g. <|tts|> <|speech_start|>)")
    return guidance > 0


def _segment_steps(model: SpeechLM, decoder: Decoder, segment: _Segment, steps: list[int], per_position: bool,
                   guidance: float = 0.0) -> Iterator[AudioStep]:
    """Run ``decoder`` until every row's ``segment`` is complete (its positions all appended);
    with ``guidance`` the decoder's second half of rows are the unconditional twins, fed the same audio."""
    rows = decoder.known_embeds.shape[0]
    audio_ids = torch.full((rows, 1), model.vocab.audio, dtype=torch.long, device=model.device)
    audio_here = torch.ones(rows, 1, dtype=torch.bool, device=model.device)

    def completed(positions: int) -> AudioStep:
        frames = segment.new_frames()
        return AudioStep(frames=frames, positions=positions, backbone_forwards=decoder.backbone_forwards, finished=segment.finished)

    step = 0
    while True:
        positions = 0
        for j in range(steps[min(step, len(steps) - 1)] + 1):
            hidden = decoder.backbone_step() if j == 0 else decoder.mctp_step(j)
            codes = segment.next_position(hidden, guidance)
            decoder.append(model.embed(audio_ids, codes.repeat(rows // codes.shape[0], 1)[:, None], audio_here))
            positions += 1
            done = bool(segment.finished.all())
            if per_position:
                yield completed(1)
                if done:
                    return
            if done:
                break
        if not per_position:
            result = completed(positions)
            yield result
            if bool(result.finished.all()):
                return
        step += 1


def iter_aligned_audio(
    model: SpeechLM,
    prefix: Sequence[int],
    chunks: Sequence[Sequence[int]],
    *,
    audio_codes: Tensor | None = None,
    **kwargs,
) -> Iterator[AudioStep]:
    """Word-aligned speech (``speech_layout="word_aligned"``, one row): ``prefix`` ends with
    ``<|speech_start|>``; then the model speaks each text chunk (a word with the punctuation
    before it) in its own run of audio positions::

        PREFIX (... <|speech_start|>) CHUNK_1 A..A CHUNK_2 A..A ... CHUNK_n A..A

    The chunks are forced (they are the text being spoken); the model decides where each
    chunk's speech ends (codebook 0's empty code), so speech cannot drift from the text.
    Yields an :class:`AudioStep` per audio position (as ``iter_audio(per_position=True)``);
    ``finished`` turns True at the last chunk's end. The keyword arguments are those of
    :func:`iter_aligned_audio_batch` (``max_frames`` caps the utterance, ``max_frames_per_chunk``
    each chunk's speech; ``schedule``, ``sampling``, ``seed`` as in :func:`iter_audio`;
    ``guidance``: classifier-free guidance against ``unconditional_prompt`` followed by the same
    audio without the chunks, see the module doc).
    """
    from .aligned_batch import iter_aligned_audio_batch

    return iter_aligned_audio_batch(model, [prefix], [chunks], audio_codes=[audio_codes], **kwargs)


@dataclass
class TTSResult:
    frames: list[Tensor]  # per row (F, Q)
    positions_per_forward: list[int]  # audio positions each backbone forward produced
    first_frame_forward: int | None  # backbone forward (1 = the prompt's) that completed the first frame of row 0

    @property
    def backbone_forwards(self) -> int:
        return len(self.positions_per_forward)

    @property
    def frames_per_forward(self) -> float:
        return sum(self.positions_per_forward) / max(len(self.positions_per_forward), 1)


def tts_frames(model: SpeechLM, prompt_ids, **kwargs) -> TTSResult:
    """Generate the speech segment that follows ``prompt_ids`` (one list or a list of lists; a
    ``<|speech_start|>`` is appended where missing). Takes the arguments of :func:`iter_audio`."""
    rows = _as_rows(prompt_ids)
    if not rows or any(not r for r in rows):
        raise SpeechLMError("empty prompt: give at least one token (e.g. the task tag and the text)")
    start = model.vocab.speech_start
    rows = [r if r and r[-1] == start else [*r, start] for r in rows]
    prompt = PromptBatch.build(model, rows, kwargs.pop("audio_codes", None))
    frames: list[list[Tensor]] = [[] for _ in rows]
    per_forward, first = [], None
    for step in iter_audio(model, prompt, **kwargs):
        per_forward.append(step.positions)
        for b, f in enumerate(step.frames):
            frames[b].append(f)
        if first is None and len(step.frames[0]):
            first = step.backbone_forwards
    return TTSResult([torch.cat(f) for f in frames], per_forward, first)
