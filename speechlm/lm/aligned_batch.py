"""Word-aligned speech of many rows in one running batch, rows joining and leaving as it runs.

A word-aligned model speaks each text chunk in its own run of audio positions
(:func:`speechlm.lm.generate.iter_aligned_audio`). :class:`AlignedSpeechBatch` decodes many such
utterances as the rows of one batch (continuous batching, as LLM servers batch requests): each step is
one backbone forward for every row, then the MCTP modules while some row runs them. Between steps
rows leave (finished, or removed: a reply the user talked over) and new rows join: a joining row's
prompt is fed beside the others' next positions (:meth:`Decoder.append_rows`), its earlier columns
masked (:meth:`Decoder.select_rows`), and columns that no row holds any more are dropped
(:meth:`Decoder.drop_masked_columns`). Every row speaks what decoding it alone speaks (the same
positions, the same MCTP runs; equal up to the float rounding of batched arithmetic), whenever it
joined. A server speaking many replies at once pays one forward per step for all of them, not one each.

    batch = AlignedSpeechBatch(model, guidance=0.2, unconditional_prompt=[...])
    key = batch.add(prefix, chunks, sampling=GREEDY, seed=0)
    for position in batch.run():          # one AudioPosition per audio position of the batch
        position.frames[key]              # (n, Q) frames of row ``key`` completed there
        ... batch.add(...) / batch.remove(key)   # take effect at the next step
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from speechlm.codec.errors import SpeechLMError

from .generate import AudioStep, Decoder, PromptBatch, Sampling, _generator, _guided, _guided_logits, _Segment
from .model import SpeechLM


@dataclass
class AudioPosition:
    """One audio position of the batch: what each row completed there."""

    frames: dict[int, Tensor]  # row key -> frames (n, Q) completed here (often none), for the rows running now
    finished: dict[int, bool]  # row key -> whether it has spoken its last chunk (it leaves after this step)
    backbone_forwards: int  # backbone forwards of the batch so far
    words: dict[int, int] = field(default_factory=dict)  # row key -> the chunk (word) its frames here belong to


@dataclass
class _Row:
    key: int
    prompt: list[int]  # prefix + first chunk
    codes: Tensor | None  # the prompt's audio codes
    chunks: list[list[int]]
    sampling: Sampling
    generator: torch.Generator | None
    left: int  # frames it may still speak
    segment: _Segment | None = None
    word: int = 0  # the chunk it is speaking
    runs: int = 0  # backbone forwards into the current chunk (its MCTP schedule entry)
    done: bool = False
    removed: bool = False
    ended: bool = False  # its current chunk's speech ended this step
    positions: int = 0  # audio positions it takes this step
    next_chunk: Tensor | None = field(default=None, repr=False)  # (n, D) fed at the next step


class AlignedSpeechBatch:
    """Word-aligned speech of rows that join and leave a running batch (see the module doc). The decoding
    settings (length limits, MCTP schedule, guidance) are every row's; sampling and seed are each row's."""

    def __init__(self, model: SpeechLM, *, max_frames: int = 750, max_frames_per_chunk: int = 75, schedule: Sequence[int] | None = None,
                 use_cache: bool = True, guidance: float = 0.0, unconditional_prompt: Sequence[int] | None = None):  # fmt: skip
        if max_frames < 1 or max_frames_per_chunk < 1:
            raise SpeechLMError(f"need max_frames >= 1 and max_frames_per_chunk >= 1, got {max_frames} and {max_frames_per_chunk}")
        self.model, self.max_frames, self.max_frames_per_chunk, self.use_cache = model, max_frames, max_frames_per_chunk, use_cache
        self.steps = model.config.schedule(list(schedule) if schedule is not None else None)
        self.guided = _guided(guidance, unconditional_prompt)
        self.guidance = guidance if self.guided else 0.0
        self.unconditional = list(unconditional_prompt) if self.guided else []
        self.rows: list[_Row] = []  # the batch's rows, in order (their twins follow them when guided)
        self.pending: list[_Row] = []  # joining at the next step
        self.decoder: Decoder | None = None
        self.backbone_forwards = 0
        self._keys = 0
        self._audio_id = torch.full((1, 1), model.vocab.audio, dtype=torch.long, device=model.device)
        self._unconditional_embeds: Tensor | None = None  # the twins' prompt, embedded at the first join

    def add(self, prefix: Sequence[int], chunks: Sequence[Sequence[int]], *, audio_codes: Tensor | None = None,
            sampling: Sampling | None = None, seed: int | None = None) -> int:  # fmt: skip
        """A row to speak ``chunks`` (token ids, one list per word chunk) after ``prefix`` (ending with
        ``<|speech_start|>``; ``audio_codes`` for its ``<|audio|>`` positions); it joins at the next step.
        Returns its key."""
        chunks = [list(c) for c in chunks]
        if not chunks or any(not c for c in chunks):
            raise SpeechLMError("word-aligned speech needs at least one text chunk, none of them empty")
        cfg = self.model.config
        prompt = [*prefix, *chunks[0]]
        tail = sum(len(c) for c in chunks[1:]) + min(self.max_frames, len(chunks) * self.max_frames_per_chunk) + len(chunks) * cfg.max_delay
        limit = getattr(self.model.backbone.config, "max_position_embeddings", None)
        if limit is not None and len(prompt) + tail + cfg.mctp_modules + 1 > limit:
            raise SpeechLMError(f"prompt ({len(prompt)} positions) plus {tail + cfg.mctp_modules + 1} new ones exceeds the model's limit of {limit}")
        self._keys += 1
        row = _Row(self._keys, prompt, audio_codes, chunks, sampling or Sampling(), _generator(seed, self.model.device), self.max_frames)
        row.segment = self._segment(row)
        self.pending.append(row)
        return row.key

    def remove(self, key: int) -> None:
        """Stop row ``key`` (it leaves at the next step; nothing more of it is reported)."""
        for row in (*self.rows, *self.pending):
            if row.key == key:
                row.removed = True
        self.pending = [r for r in self.pending if not r.removed]

    def __len__(self) -> int:
        """Rows running or joining."""
        return sum(not r.removed and not r.done for r in self.rows) + len(self.pending)

    def _segment(self, row: _Row) -> _Segment:
        return _Segment(self.model, 1, min(self.max_frames_per_chunk, row.left), 1, row.sampling, row.generator)

    def _prompt_embeds(self, ids: list[int], codes: Tensor | None) -> Tensor:
        """A joining row's prompt, embedded: (P, D)."""
        prompt = PromptBatch.build(self.model, [ids], [codes])
        return self.model.embed(prompt.input_ids, prompt.audio_codes, prompt.audio_mask)[0]

    def _between_steps(self) -> bool:
        """Rows leave, rows join, the next chunks go in. False when no row is left."""
        keep = [r for r in self.rows if not r.done and not r.removed]
        joining, self.pending = self.pending, []
        if not keep:
            self.rows, self.decoder = [], None
            if not joining:
                return False
            self._start(joining)
            return True
        twins = len(self.rows) if self.guided else None
        old = {id(r): i for i, r in enumerate(self.rows)}
        index = [old[id(r)] for r in keep] + [-1] * len(joining)
        if twins is not None:
            index += [twins + old[id(r)] for r in keep] + [-1] * len(joining)
        new: list[Tensor | None] = [r.next_chunk for r in keep] + [self._prompt_embeds(r.prompt, r.codes) for r in joining]
        if twins is not None:
            if joining and self._unconditional_embeds is None:
                self._unconditional_embeds = self._prompt_embeds(self.unconditional, None)
            new += [None] * len(keep) + [self._unconditional_embeds] * len(joining)
        for r in keep:
            r.next_chunk = None
        if index != list(range(self.decoder.known_embeds.shape[0])):
            self.decoder.select_rows(index)
        self.rows = keep + joining
        if any(n is not None for n in new) or not bool(self.decoder.known_valid[:, -1].all()):
            self.decoder.append_rows(new)  # next chunks and prompts in; every row's last position its own again
        return True

    def _start(self, rows: list[_Row]) -> None:
        ids = [r.prompt for r in rows] + [self.unconditional] * (len(rows) if self.guided else 0)
        codes = [r.codes for r in rows] + [None] * (len(ids) - len(rows))
        self.decoder = Decoder.start(self.model, PromptBatch.build(self.model, ids, codes), use_cache=self.use_cache)
        self.rows = rows

    def run(self) -> Iterator[AudioPosition]:
        """Decode until no row is left: one :class:`AudioPosition` per audio position. Rows added (or
        removed) while it runs join (or leave) at the next step."""
        model, empty = self.model, self.model.config.empty_code
        while self._between_steps():
            decoder, rows = self.decoder, self.rows
            B = len(rows)
            R = decoder.known_embeds.shape[0]
            audio_ids, audio_here = self._audio_id.expand(R, 1), torch.ones(R, 1, dtype=torch.bool, device=model.device)
            hidden = decoder.backbone_step()
            self.backbone_forwards += 1
            for r in rows:
                r.positions, r.ended = self.steps[min(r.runs, len(self.steps) - 1)] + 1, False
            for j in range(max(r.positions for r in rows)):
                if j:
                    hidden = decoder.mctp_step(j)
                live = {b: r for b, r in enumerate(rows) if j < r.positions and not r.ended and not r.removed}  # the others wait
                choosers = {b: r.segment._chooser(r.segment.layout.shape[1]) for b, r in live.items()}
                chosen = model.audio_head.generate(hidden, _rows_chooser(choosers, B, empty, self.guidance))[:B]  # (B, Q)
                real = torch.tensor([b in live for b in range(B)], device=chosen.device)
                decoder.append(model.embed(audio_ids, chosen.repeat(R // B, 1)[:, None], audio_here), real.repeat(R // B)[:, None])
                frames: dict[int, Tensor] = {}
                for b, r in enumerate(rows):
                    if r.removed:
                        continue
                    frames[r.key] = chosen.new_zeros(0, model.config.num_codebooks)
                    if b in live:
                        r.segment.push(chosen[b : b + 1])
                        frames[r.key] = r.segment.new_frames()[0]
                        r.left -= len(frames[r.key])
                        r.ended = bool(r.segment.finished.all())
                finished = {r.key: r.ended and (r.word == len(r.chunks) - 1 or r.left <= 0) for r in rows if not r.removed}
                yield AudioPosition(frames, finished, self.backbone_forwards, {r.key: r.word for r in rows if not r.removed})
                if all(r.ended or r.removed or j + 1 >= r.positions for r in rows):
                    break
            for r in rows:
                if r.removed:
                    continue
                if not r.ended:
                    r.runs += 1
                elif r.word == len(r.chunks) - 1 or r.left <= 0:
                    r.done = True
                else:
                    r.word, r.runs = r.word + 1, 0
                    r.segment = self._segment(r)
                    r.next_chunk = model.embed(torch.tensor([r.chunks[r.word]], dtype=torch.long, device=model.device))[0]


def _rows_chooser(choosers: dict, B: int, empty: int, guidance: float):
    """The audio head's chooser for a batch of B rows (and with ``guidance`` their B twins after them):
    row b's codes from ``choosers[b]`` (its segment's), the empty code for rows without one."""

    def choose(first_q: int, logits: Tensor) -> Tensor:
        mixed = _guided_logits(logits, first_q, guidance, B, empty) if guidance else logits
        out = torch.full(mixed.shape[:2], empty, dtype=torch.long, device=logits.device)
        for b, chooser in choosers.items():
            out[b] = chooser(first_q, mixed[b : b + 1])[0]
        return out.repeat(2, 1) if guidance else out

    return choose


def _per_row(value, B: int, name: str) -> list:
    """One value per row: a list of B values as given, any other value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise SpeechLMError(f"{len(value)} values of {name} given for {B} rows")
        return list(value)
    return [value] * B


@torch.no_grad()
def iter_aligned_audio_batch(
    model: SpeechLM,
    prefixes: Sequence[Sequence[int]],
    chunks: Sequence[Sequence[Sequence[int]]],
    *,
    audio_codes: Sequence[Tensor | None] | None = None,
    max_frames: int = 750,
    max_frames_per_chunk: int = 75,
    sampling: Sampling | Sequence[Sampling] | None = None,
    schedule: Sequence[int] | None = None,
    seed: int | None | Sequence[int | None] = None,
    use_cache: bool = True,
    guidance: float = 0.0,
    unconditional_prompt: Sequence[int] | None = None,
) -> Iterator[AudioStep]:
    """Word-aligned speech of B rows in one batch (see :func:`speechlm.lm.generate.iter_aligned_audio`):
    row b speaks ``chunks[b]`` after ``prefixes[b]`` (with ``audio_codes[b]``), with its own
    ``sampling[b]`` and ``seed[b]`` where lists are given (one value: every row's). Yields an
    :class:`AudioStep` per audio position of the batch: ``frames[b]`` row b's frames completed there
    (often none), ``finished[b]`` whether row b has spoken its last chunk.

    The rows advance in lock-step, each through its own words, and each row speaks what decoding it
    alone speaks (:class:`AlignedSpeechBatch`, all rows joining at once). A step is one backbone
    forward, then the MCTP modules as long as some row still runs them; a row whose word has ended (or
    whose schedule has no more modules) waits for the next step with masked placeholders (positions a
    module computed there with an input not known yet are computed again, :meth:`Decoder.mctp_step`),
    and gets its next chunk at the next backbone forward, laid beside the others' positions
    (:meth:`Decoder.append_rows`). A row that has finished leaves the batch.
    """
    B = len(prefixes)
    if B < 1 or len(chunks) != B:
        raise SpeechLMError(f"need one chunk list per prefix, got {len(chunks)} for {B} prefixes")
    samplings = _per_row(sampling if sampling is not None else Sampling(), B, "sampling")
    seeds = _per_row(seed, B, "seed")
    codes = list(audio_codes) if audio_codes is not None else [None] * B
    if len(codes) != B:
        raise SpeechLMError(f"audio codes for {len(codes)} rows given, {B} prefixes")
    batch = AlignedSpeechBatch(model, max_frames=max_frames, max_frames_per_chunk=max_frames_per_chunk, schedule=schedule,
                               use_cache=use_cache, guidance=guidance, unconditional_prompt=unconditional_prompt)  # fmt: skip
    keys = [batch.add(p, c, audio_codes=a, sampling=s, seed=k) for p, c, a, s, k in zip(prefixes, chunks, codes, samplings, seeds)]
    none = torch.zeros(0, model.config.num_codebooks, dtype=torch.long, device=model.device)
    finished = dict.fromkeys(keys, False)
    for position in batch.run():
        finished.update(position.finished)
        yield AudioStep(frames=[position.frames.get(k, none) for k in keys], positions=1, backbone_forwards=position.backbone_forwards,
                        finished=torch.tensor([finished[k] for k in keys], device=model.device),
                        words=[position.words.get(k) for k in keys])  # fmt: skip
