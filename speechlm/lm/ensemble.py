"""Listening several times: one transcript from several *views* of the same audio.

A view is the same utterance encoded once more after a change the words do not depend on (its
level, see ``speechlm.speech.listening_views``): the codec's codes differ from view to view, and so
do the LM's mistakes. Decoding (all rows of one batch, one prompt per view)::

    prefill      the K prompts (``<|asr|> <|speech_start|> AUDIO <|speech_end|>``, one per view)
    candidates   each view's own greedy transcript (K), and the ensemble's: greedy on the mean of
                 the K views' log-probabilities, one token for all rows per step (1); one batch from
                 a copy of the prompt cache, a view's own transcript sharing its row with the joint
                 one until the two part (then the row forks)
    choice       (``rescore=True``) the candidate with the highest total log-probability over the
                 K views, end token included (a product of experts, scored exactly per sequence,
                 on the prompt cache repeated once per candidate); else the ensemble's

On the shipped model, 80 held-out-voice utterances (docs/benchmarks.md): greedy 23 % WER, 4 views
rescored 15 %, at about 1.8x the time. One view is plain greedy decoding (:func:`speechlm.lm.generate.text_generate`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from speechlm.codec.errors import SpeechLMError

from .generate import PromptBatch
from .model import SpeechLM


def _log_probs(model: SpeechLM, hidden: Tensor) -> Tensor:
    """hidden (..., D) -> text log-probabilities (..., V) over the tokenizer's ids."""
    logits = model.text_logits(hidden).float()
    logits[..., model.vocab.size :] = float("-inf")  # embedding rows past the tokenizer
    return logits.log_softmax(dim=-1)


def _new_cache(model: SpeechLM):
    from transformers import DynamicCache

    return DynamicCache(config=model.backbone.config)


def _forward(model: SpeechLM, embeds: Tensor, valid: Tensor, positions: Tensor, cache) -> Tensor:
    """Feed ``embeds`` (B, n, D) after what ``cache`` holds; ``valid`` (B, cached + n) -> hidden (B, n, D)."""
    return model.run_backbone(embeds, attention_mask=valid, position_ids=positions, past_key_values=cache).last_hidden_state


@torch.no_grad()
def ensemble_transcribe(
    model: SpeechLM,
    prompt: PromptBatch,
    *,
    max_new_tokens: int = 64,
    stop_tokens: Sequence[int] | None = None,
    rescore: bool = True,
    prefilled: Prefilled | None = None,
) -> list[int]:
    """One transcript (token ids, stop token excluded) from the K rows of ``prompt``, each the same
    utterance's ASR prompt from another view. Greedy throughout (repeatable); see the module doc.
    A row of K = 1 gives plain greedy decoding's transcript. ``prefilled``: :func:`prefill` of
    ``prompt`` already run (left as it is, for another use)."""
    K = prompt.input_ids.shape[0]
    return ensemble_transcribe_groups(model, prompt, [list(range(K))], max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                                      rescore=rescore, prefilled=prefilled)[0]  # fmt: skip


@torch.no_grad()
def ensemble_transcribe_groups(
    model: SpeechLM,
    prompt: PromptBatch,
    groups: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    stop_tokens: Sequence[int] | None = None,
    rescore: bool = True,
    prefilled: Prefilled | None = None,
) -> list[list[int]]:
    """:func:`ensemble_transcribe` of several utterances at once: ``groups[u]`` are the rows of ``prompt``
    holding utterance u's views. One prefill and one batched forward per decoding step for all of them;
    each utterance's transcript is what it gets alone (up to the float rounding of batched arithmetic)."""
    if max_new_tokens < 1:
        raise SpeechLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = [r for group in groups for r in group]
    if not groups or any(not group for group in groups) or sorted(rows) != list(range(prompt.input_ids.shape[0])):
        raise SpeechLMError(f"the groups must split the prompt's {prompt.input_ids.shape[0]} rows, got {[list(g) for g in groups]}")
    v = model.vocab
    stops = set(stop_tokens if stop_tokens is not None else (v.eos, v.end_of_turn))
    end = v.eos  # a transcript's end in training (``... <|speech_end|> TEXT <|eos|>``)
    first, prompt_cache, valid, last_position = prefilled if prefilled is not None else prefill(model, prompt)
    candidates = _candidates(model, first, copy.deepcopy(prompt_cache), valid, last_position, max_new_tokens, stops, groups)
    out = []
    for group, found in zip(groups, candidates):
        unique = list(dict.fromkeys(tuple(c) for c in found))
        if not rescore or len(unique) == 1:
            out.append(list(found[-1]))  # the ensemble's
            continue
        own = prefilled_rows((first, prompt_cache, valid, last_position), group)  # a copy: the scoring grows its cache
        scores = _sequence_scores(model, *own, [list(c) for c in unique], end)  # (K, C)
        out.append(list(unique[int(scores.sum(0).argmax())]))
    return out


Prefilled = tuple  # (first-token log-probabilities (K, V), the prompts' cache, attention mask (K, L), last positions (K, 1))


def prefilled_rows(prefilled: Prefilled, rows: Sequence[int]) -> Prefilled:
    """Rows ``rows`` of a :func:`prefill` (its cache copied: the original stays as it was)."""
    first, cache, valid, last = prefilled
    index = torch.tensor(list(rows), device=first.device)
    cache = copy.deepcopy(cache)
    cache.batch_select_indices(index)
    return first[index], cache, valid[index], last[index]


@torch.no_grad()
def prefill(model: SpeechLM, prompt: PromptBatch) -> Prefilled:
    """Run the K prompts: (first-token log-probabilities (K, V), their cache, the attention mask (K, L),
    each row's last position (K, 1))."""
    valid = prompt.attention_mask
    last_position = (valid.long().sum(1) - 1)[:, None]
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cache = _new_cache(model)
    embeds = model.embed(prompt.input_ids, prompt.audio_codes, prompt.audio_mask)
    first = _log_probs(model, _forward(model, embeds, valid, positions, cache)[:, -1])
    return first, cache, valid, last_position


@torch.no_grad()
def transcript_log_probs(model: SpeechLM, prompt: PromptBatch, prefilled: Prefilled | None = None) -> Callable[[list[list[int]]], Tensor]:
    """A scorer of transcripts for the K views of ``prompt`` (as :func:`ensemble_transcribe`'s): token id
    lists (C of them) -> (C,) the mean over the views of log p(transcript, then ``<|eos|>`` | view).
    The prompts are run once (or ``prefilled``: :func:`prefill` of them); each call scores on a copy of their cache."""
    first, cache, valid, last_position = prefilled if prefilled is not None else prefill(model, prompt)

    @torch.no_grad()
    def score(candidates: list[list[int]]) -> Tensor:
        if not candidates:
            return torch.zeros(0)
        scores = _sequence_scores(model, first, copy.deepcopy(cache), valid, last_position, candidates, model.vocab.eos)
        return scores.mean(0).float()

    return score


def _candidates(model, first: Tensor, cache, valid: Tensor, last_position: Tensor, max_new: int, stops: set[int],
                groups: Sequence[Sequence[int]]) -> list[list[list[int]]]:  # fmt: skip
    """Per group of rows (one utterance's K views): the K views' own greedy transcripts and the views'
    joint one (last).

    One batch row per view follows the joint transcript; a view's own transcript shares that row
    until it first picks another token, and then forks (the row's cache copied). Views mostly agree,
    so this decodes about K rows instead of 2K; rows leave the batch when their transcript ends.
    Every group's rows are in the one batch (one forward per step for all)."""
    own = [[[] for _ in group] for group in groups]
    own_done = [[False] * len(group) for group in groups]
    forked = [[False] * len(group) for group in groups]
    joint, joint_done = [[] for _ in groups], [False] * len(groups)
    index_of = {r: (u, k) for u, group in enumerate(groups) for k, r in enumerate(group)}
    rows = [("joint", *index_of[r]) for r in range(first.shape[0])]  # what each batch row decodes: (kind, group, view)
    log_probs, position = first, last_position  # (R, V), (R, 1)
    for _ in range(max_new):
        where = {row: i for i, row in enumerate(rows)}
        best = log_probs.argmax(dim=-1).tolist()
        feed: dict[tuple[str, int, int], tuple[int, int]] = {}  # next row -> (its source row now, the token it is fed)
        for u, group in enumerate(groups):
            K = len(group)
            together = None if joint_done[u] else int(log_probs[[where[("joint", u, k)] for k in range(K)]].mean(dim=0).argmax())
            if together is not None:
                joint_done[u] = together in stops
                if not joint_done[u]:
                    joint[u].append(together)
                    feed.update({("joint", u, k): (where[("joint", u, k)], together) for k in range(K)})
            for k in range(K):
                if own_done[u][k]:
                    continue
                source = where[("own", u, k)] if forked[u][k] else where[("joint", u, k)]
                token = best[source]
                forked[u][k] = forked[u][k] or token != together
                own_done[u][k] = token in stops
                if not own_done[u][k]:
                    own[u][k].append(token)
                    if forked[u][k]:
                        feed[("own", u, k)] = (source, token)
        if not feed:
            break
        rows = list(feed)
        index = torch.tensor([feed[row][0] for row in rows], device=first.device)
        cache.batch_select_indices(index)  # keep, copy (a fork) or drop rows
        valid = torch.cat((valid[index], torch.ones(len(rows), 1, dtype=torch.bool, device=valid.device)), dim=1)
        position = position[index] + 1
        tokens = torch.tensor([[feed[row][1]] for row in rows], device=first.device)
        log_probs = _log_probs(model, _forward(model, model.embed(tokens), valid, position, cache)[:, -1])
    return [[*own[u], joint[u]] for u in range(len(groups))]


def _sequence_scores(model, first: Tensor, cache, valid: Tensor, last_position: Tensor, candidates: list[list[int]], end: int) -> Tensor:
    """(K, C): log p(candidate c, then ``end`` | view k's prompt), on the prompt cache repeated C times."""
    K, C = first.shape[0], len(candidates)
    seqs = [[*c, end] for c in candidates]
    n = max(len(s) for s in seqs)
    tokens = torch.full((C, n), end, dtype=torch.long, device=first.device)  # right padding: never scored
    for c, s in enumerate(seqs):
        tokens[c, : len(s)] = torch.tensor(s, device=first.device)
    score = first[:, tokens[:, 0]]  # (K, C): the first token, from the prompt's last position
    if n > 1:
        cache.batch_repeat_interleave(C)  # row k * C + c
        rows = tokens.repeat(K, 1)  # (K*C, n)
        fed = rows[:, :-1]
        mask = torch.cat((valid.repeat_interleave(C, dim=0), torch.ones(K * C, n - 1, dtype=torch.bool, device=valid.device)), dim=1)
        positions = last_position.repeat_interleave(C, dim=0) + torch.arange(1, n, device=valid.device)
        log_probs = _log_probs(model, _forward(model, model.embed(fed), mask, positions, cache))  # (K*C, n-1, V)
        picked = log_probs.gather(-1, rows[:, 1:, None])[..., 0]  # (K*C, n-1)
        length = torch.tensor([len(s) for s in seqs], device=first.device).repeat(K)  # tokens of each row's sequence
        keep = torch.arange(1, n, device=first.device)[None] < length[:, None]
        score = score + (picked * keep).sum(1).view(K, C)
    return score
