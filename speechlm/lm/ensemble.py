"""Listening several times: one transcript from several *views* of the same audio.

A view is the same utterance encoded once more after a change the words do not depend on (its
level, see ``speechlm.speech.listening_views``): the codec's codes differ from view to view, and so
do the LM's mistakes. Decoding (all rows of one batch, one prompt per view)::

    prefill      the K prompts (``<|asr|> <|speech_start|> AUDIO <|speech_end|>``, one per view)
    candidates   each view's own greedy transcript (K), and the ensemble's: greedy on the mean of
                 the K views' log-probabilities, one token for all rows per step (1); the 2K rows
                 run as one batch from copies of the prompt cache
    choice       (``rescore=True``) the candidate with the highest total log-probability over the
                 K views, end token included (a product of experts, scored exactly per sequence,
                 on the prompt cache repeated once per candidate); else the ensemble's

On the shipped model, 80 held-out-voice utterances (docs/benchmarks.md): greedy 23 % WER, 4 views
rescored 15 %, at about 1.8x the time. One view is plain greedy decoding (:func:`speechlm.lm.generate.text_generate`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

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
) -> list[int]:
    """One transcript (token ids, stop token excluded) from the K rows of ``prompt``, each the same
    utterance's ASR prompt from another view. Greedy throughout (repeatable); see the module doc.
    A row of K = 1 gives plain greedy decoding's transcript."""
    if max_new_tokens < 1:
        raise SpeechLMError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    v = model.vocab
    stops = set(stop_tokens if stop_tokens is not None else (v.eos, v.end_of_turn))
    end = v.eos  # a transcript's end in training (``... <|speech_end|> TEXT <|eos|>``)
    valid = prompt.attention_mask
    last_position = (valid.long().sum(1) - 1)[:, None]  # (K, 1)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)

    prompt_cache = _new_cache(model)
    embeds = model.embed(prompt.input_ids, prompt.audio_codes, prompt.audio_mask)
    first = _log_probs(model, _forward(model, embeds, valid, positions, prompt_cache)[:, -1])  # (K, V)

    candidates = _candidates(model, first, copy.deepcopy(prompt_cache), valid, last_position, max_new_tokens, stops)
    ensemble = candidates[-1]
    unique = list(dict.fromkeys(tuple(c) for c in candidates))
    if not rescore or len(unique) == 1:
        return list(ensemble)
    scores = _sequence_scores(model, first, prompt_cache, valid, last_position, [list(c) for c in unique], end)  # (K, C)
    return list(unique[int(scores.sum(0).argmax())])


def _candidates(model, first: Tensor, cache, valid: Tensor, last_position: Tensor, max_new: int, stops: set[int]) -> list[list[int]]:
    """K views' own greedy transcripts and the ensemble's (last), decoded together as 2K rows."""
    K = first.shape[0]
    cache.batch_repeat_interleave(2)  # rows 2k: view k alone; rows 2k + 1: view k in the ensemble
    valid = valid.repeat_interleave(2, dim=0)
    position = last_position.repeat_interleave(2, dim=0)
    own, done = [[] for _ in range(K)], [False] * K
    joint, joint_done = [], False
    log_probs = first.repeat_interleave(2, dim=0)  # (2K, V)
    for _ in range(max_new):
        alone = log_probs[0::2].argmax(dim=-1).tolist()
        together = int(log_probs[1::2].mean(dim=0).argmax())
        for k, token in enumerate(alone):
            if not done[k]:
                done[k] = token in stops
                if not done[k]:
                    own[k].append(token)
        if not joint_done:
            joint_done = together in stops
            if not joint_done:
                joint.append(together)
        if joint_done and all(done):
            break
        tokens = torch.tensor([t for own_token in alone for t in (own_token, together)], device=first.device)
        position = position + 1
        valid = torch.cat((valid, torch.ones(2 * K, 1, dtype=torch.bool, device=valid.device)), dim=1)
        log_probs = _log_probs(model, _forward(model, model.embed(tokens[:, None]), valid, position, cache)[:, -1])
    return [*own, joint]


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
