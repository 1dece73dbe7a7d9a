"""Exact CTC likelihoods of many small edits of one label sequence, by splicing.

The transcript check (:mod:`speechlm.transcript_check`) scores thousands of transcripts that differ
from the current one by one word: a CTC loss over each whole sequence repeats the same work for
the words they share.  Every such candidate is ``reference[:a] + middle + reference[len - b:]``: its
CTC forward variables over the kept prefix are the reference's own, and its backward variables over
the kept suffix are the reference's own too.  So one forward and one backward pass over the
reference, then a forward pass over each distinct (a, middle) only — a word's few labels instead of
the sentence's — give every candidate's exact CTC negative log-likelihood (equal to
``torch.nn.functional.ctc_loss`` up to float rounding; tests/test_ctc_edits.py).

Notation: log_probs (T, V) per-frame log-probabilities (blank at index ``blank``); a label sequence
of length L has the extended states [blank, l1, blank, l2, ..., lL, blank] (S = 2L + 1).  Forward
variables are kept for a virtual time 0 (alpha[0] = log 1 on the first blank), so that a path may
start in any state the recursion allows without special cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NEG_INF = float("-inf")
GROUP_LENGTHS = (5,)  # the middles' pass runs rows of up to 5 labels and longer ones apart


def _extended(labels: Sequence[int], blank: int) -> tuple[Tensor, Tensor]:
    """labels (L,) -> extended states (2L+1,), and whether each state may be entered by skipping the
    blank before it (a label different from the label two states back)."""
    ext = torch.full((2 * len(labels) + 1,), blank, dtype=torch.long)
    ext[1::2] = torch.as_tensor(list(labels), dtype=torch.long)
    skip = torch.zeros(len(ext), dtype=torch.bool)
    skip[3::2] = ext[3::2] != ext[1:-2:2]
    return ext, skip


def _lse3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.logsumexp(torch.stack([a, b, c]), 0)


def ctc_forward(log_probs: Tensor, labels: Sequence[int], blank: int = 0) -> Tensor:
    """log alpha (T+1, 2L+1): alpha[t, s] = log p(frames 1..t, the path at state s at frame t);
    alpha[0] is the virtual start (log 1 on state 0)."""
    ext, skip = _extended(labels, blank)
    T, S = log_probs.shape[0], len(ext)
    emit = log_probs[:, ext]  # (T, S)
    alpha = torch.full((T + 1, S), NEG_INF, dtype=log_probs.dtype)
    alpha[0, 0] = 0.0
    ninf = torch.full((2,), NEG_INF, dtype=log_probs.dtype)
    for t in range(1, T + 1):
        prev = alpha[t - 1]
        one = torch.cat([ninf[:1], prev[:-1]])
        two = torch.cat([ninf, prev[:-2]]).masked_fill(~skip, NEG_INF)
        alpha[t] = _lse3(prev, one, two) + emit[t - 1]
    return alpha


def ctc_backward(log_probs: Tensor, labels: Sequence[int], blank: int = 0) -> Tensor:
    """log beta (T+1, 2L+1): beta[t, s] = log p(frames t+1..T | the path at state s at frame t),
    ending in one of the last two states; beta[T] = log 1 there.  (Row 0 is unused.)"""
    ext, skip = _extended(labels, blank)
    T, S = log_probs.shape[0], len(ext)
    emit = log_probs[:, ext]
    beta = torch.full((T + 1, S), NEG_INF, dtype=log_probs.dtype)
    beta[T, S - 1] = 0.0
    if S > 1:
        beta[T, S - 2] = 0.0
    ninf = torch.full((2,), NEG_INF, dtype=log_probs.dtype)
    skip_from = torch.cat([skip[2:], torch.zeros(2, dtype=torch.bool)])  # may s jump to s + 2?
    for t in range(T - 1, 0, -1):
        nxt = beta[t + 1] + emit[t]  # frame t + 1 emitted in each next state
        one = torch.cat([nxt[1:], ninf[:1]])
        two = torch.cat([nxt[2:], ninf]).masked_fill(~skip_from, NEG_INF)
        beta[t] = _lse3(nxt, one, two)
    return beta


def edit_nlls(log_probs: Tensor, reference: Sequence[int], edits: Sequence[tuple[int, Sequence[int], int]],
              blank: int = 0) -> list[float]:
    """The CTC negative log-likelihood (nats) of each edited sequence ``reference[:a] + middle +
    reference[len(reference) - b:]``, given log_probs (T, V) of one utterance.

    ``edits``: (a, middle, b) with a + b <= len(reference); an empty result is an error, a sequence the
    frames cannot hold scores ``inf`` (as ``ctc_loss`` without ``zero_infinity``)."""
    L = len(reference)
    if not edits:
        return []
    for a, middle, b in edits:
        if a < 0 or b < 0 or a + b > L:
            raise ValueError(f"edit ({a}, ..., {b}) does not fit a reference of {L} labels")
        if a + b + len(middle) == 0:
            raise ValueError("an edit leaves an empty label sequence")
    lp = log_probs.detach().to(torch.float32)
    T = lp.shape[0]
    ref = torch.as_tensor(list(reference), dtype=torch.long)
    alpha = ctc_forward(lp, reference, blank)  # (T+1, 2L+1)
    beta = ctc_backward(lp, reference, blank)

    # Each distinct (a, middle): the forward pass over the middle's states, fed by the prefix's last
    # blank (state 2a) and last label (state 2a - 1); read out at its last label X and the blank B after it.
    keys = list(dict.fromkeys((a, tuple(m)) for a, m, _ in edits))
    row = {k: i for i, k in enumerate(keys)}
    U = len(keys)
    end_b = torch.full((T + 1, U), NEG_INF)  # log alpha of the state before the suffix (a blank)
    end_x = torch.full((T + 1, U), NEG_INF)  # ... of the label before that blank
    last_label = torch.full((U,), -1, dtype=torch.long)  # X's label (-1: none, the candidate starts there)
    with_middle = [i for i, (_, m) in enumerate(keys) if m]
    for i, (a, m) in enumerate(keys):
        if not m:
            end_b[:, i] = alpha[:, 2 * a]
            if a > 0:
                end_x[:, i] = alpha[:, 2 * a - 1]
                last_label[i] = int(ref[a - 1])
    # The pass costs rows x states per frame, and a row's states are its middle's longest: rows are run in
    # groups of similar length (most words have 2-5 phonemes, a few 10), not all padded to the longest.
    by_length = sorted(with_middle, key=lambda i: len(keys[i][1]))
    for group in _length_groups([len(keys[i][1]) for i in by_length], GROUP_LENGTHS):
        members = [by_length[j] for j in group]
        idx = torch.tensor(members)
        mids = [keys[i][1] for i in members]
        starts = torch.tensor([keys[i][0] for i in members])
        lengths = torch.tensor([len(m) for m in mids])
        M = int(lengths.max())
        ext = torch.full((len(mids), 2 * M), blank, dtype=torch.long)  # [m1, blank, m2, blank, ...]
        ext[:, 0::2] = torch.tensor([list(m) + [blank] * (M - len(m)) for m in mids], dtype=torch.long)
        rows = torch.arange(len(mids))
        out_b, out_x = 2 * lengths - 1, 2 * lengths - 2
        mb, mx = _middle_forward(lp, alpha, ref, starts, ext, out_b, out_x)
        end_b[:, idx] = mb
        end_x[:, idx] = mx
        last_label[idx] = ext[rows, out_x]

    # Join each candidate's (a, middle) to its suffix: the path enters the suffix's first label S1 at
    # exactly one frame t, from B or (if X differs from S1) from X at frame t - 1.
    out = torch.empty(len(edits))
    cand_rows = torch.tensor([row[(a, tuple(m))] for a, m, _ in edits])
    bs = torch.tensor([b for _, _, b in edits])
    ends = bs == 0
    if ends.any():
        r = cand_rows[ends]
        out[ends] = -torch.logaddexp(end_b[T, r], end_x[T, r])
    if (~ends).any():
        r, b = cand_rows[~ends], bs[~ends]
        s1 = ref[L - b]  # (N',)
        state = 2 * (L - b) + 1  # S1's state in the reference
        from_x = end_x[:-1, r].masked_fill((last_label[r] == s1)[None], NEG_INF)
        enter = torch.logaddexp(end_b[:-1, r], from_x) + lp[:, s1] + beta[1:, state]  # (T, N')
        out[~ends] = -torch.logsumexp(enter, 0)
    return out.tolist()


def _length_groups(lengths: Sequence[int], bounds: Sequence[int]) -> list[range]:
    """Index ranges of ``lengths`` (sorted ascending) with lengths <= each bound in turn, the rest last."""
    groups, start = [], 0
    for bound in [*bounds, max(lengths, default=0)]:
        end = start
        while end < len(lengths) and lengths[end] <= bound:
            end += 1
        if end > start:
            groups.append(range(start, end))
        start = end
    return groups


def _middle_forward(lp: Tensor, alpha: Tensor, ref: Tensor, starts: Tensor, ext: Tensor, out_b: Tensor,
                    out_x: Tensor) -> tuple[Tensor, Tensor]:
    """The forward pass over R middles at once: ext (R, 2M) their states [m1, blank, m2, blank, ...] (padded
    past each row's end: the pass only looks back, so a row's own states are exact), fed at each frame by
    the reference's prefix states (alpha (T+1, 2L+1)) at each row's start a.  -> log alpha (T+1, R) at
    each row's states out_b and out_x (the blank after its last label, and its last label).

    Computed in probabilities (float64), each row rescaled at each frame by its largest state (its log
    scale kept apart): about twice as fast as the same pass in log space here.  A state more than ~700
    nats below its row's largest at some frame rounds to 0: a candidate whose every path is that
    unlikely at some point scores inf instead of a number above ~700 nats."""
    R = ext.shape[0]
    skip = torch.zeros_like(ext, dtype=torch.float64)
    skip[:, 2::2] = (ext[:, 2::2] != ext[:, :-2:2]).to(torch.float64)
    first = ext[:, 0]
    feed_blank = alpha[:, 2 * starts].to(torch.float64)  # (T+1, R) log
    feed_label = alpha[:, (2 * starts - 1).clamp(min=0)].to(torch.float64)
    enter_from_label = (starts > 0) & (first != ref[(starts - 1).clamp(min=0)])
    feed_label[:, ~enter_from_label] = NEG_INF
    feed = torch.logaddexp(feed_blank, feed_label)  # (T+1, R): what enters m1 from the prefix, log
    emit = lp.to(torch.float64).exp()
    rows = torch.arange(R)
    state = torch.zeros(ext.shape, dtype=torch.float64)
    scale = torch.full((R,), NEG_INF, dtype=torch.float64)  # log of each row's scale
    T = lp.shape[0]
    mb = torch.full((T + 1, R), NEG_INF, dtype=torch.float64)
    mx = torch.full((T + 1, R), NEG_INF, dtype=torch.float64)
    for t in range(1, T + 1):
        new_scale = torch.maximum(scale, feed[t - 1])
        live = torch.isfinite(new_scale)
        base = torch.where(live, new_scale, 0.0)
        state = state * torch.where(torch.isfinite(scale), (scale - base).exp(), 0.0)[:, None]
        total = state.clone()
        total[:, 0] += torch.where(live, (feed[t - 1] - base).exp(), 0.0)
        total[:, 1:] += state[:, :-1]
        total[:, 2:] += state[:, :-2] * skip[:, 2:]
        state = total * emit[t - 1][ext]
        top = state.max(1).values
        alive = top > 0
        state = state / torch.where(alive, top, 1.0)[:, None]
        scale = torch.where(alive, base + top.log(), NEG_INF)
        mb[t] = state[rows, out_b].log() + scale
        mx[t] = state[rows, out_x].log() + scale
    return mb.to(torch.float32), mx.to(torch.float32)
