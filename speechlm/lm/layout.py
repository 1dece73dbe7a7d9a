"""Where audio codes sit in the LM sequence: the delay pattern and the audio training targets.

A *speech segment* is a run of consecutive audio positions. With the depth head, position p
of a segment holds frame p (F frames -> F positions). With the parallel head and delays d_q,
it holds frame p - d_q in codebook q, or the empty code C where that frame does not exist
(F frames -> F + max(d) positions)::

    delays 0,1,2    position:   0    1    2    3    4       (F = 3 frames a, b, c)
    codebook 0                  a0   b0   c0   C    C
    codebook 1                  C    a1   b1   c1   C
    codebook 2                  C    C    a2   b2   c2

Audio targets at offset k (k = 1 for the backbone, i + 1 for MCTP module i): position t
learns the codes of position t + k when that is an audio position, except codes that are
empty because their codebook has not started yet (deterministic, not learned); and all-empty
("speech ends") when t + k is the first non-audio position after a segment. Empty codes at a
segment's tail are learned: codebook 0 turning empty is how generation knows speech ends.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100


def delay_frames(frames: Tensor, delays: list[int], empty: int) -> Tensor:
    """Frames (F, Q) -> delayed layout (F + max(delays), Q), empty code where no frame exists."""
    F_, Q = frames.shape
    layout = torch.full((F_ + max(delays), Q), empty, dtype=frames.dtype, device=frames.device)
    for q, d in enumerate(delays):
        layout[d : d + F_, q] = frames[:, q]
    return layout


def undelay_frames(layout: Tensor, delays: list[int]) -> Tensor:
    """Delayed layout (P, Q) -> frames (P - max(delays), Q): the inverse of :func:`delay_frames`."""
    num_frames = layout.shape[0] - max(delays)
    if num_frames <= 0:
        return layout[:0]
    return torch.stack([layout[d : d + num_frames, q] for q, d in enumerate(delays)], dim=1)


def segment_positions(audio_mask: Tensor) -> Tensor:
    """(B, L) bool -> (B, L) long: index of each audio position inside its segment (0 at text)."""
    L = audio_mask.shape[1]
    index = torch.arange(L, device=audio_mask.device).expand_as(audio_mask)
    previous = torch.cat((torch.zeros_like(audio_mask[:, :1]), audio_mask[:, :-1]), dim=1)
    starts = torch.where(audio_mask & ~previous, index, torch.zeros_like(index))
    start_of_segment = torch.cummax(starts, dim=1).values
    return torch.where(audio_mask, index - start_of_segment, torch.zeros_like(index))


def audio_targets(
    audio_codes: Tensor, audio_mask: Tensor, *, offset: int, delays: list[int], empty: int, loss_mask: Tensor | None = None
) -> Tensor:
    """Targets (B, L - offset, Q) for positions 0 .. L - offset - 1 at ``offset``; IGNORE where none.

    audio_codes (B, L, Q) in delayed layout; audio_mask (B, L) bool; ``loss_mask`` (B, L) bool
    marks the target positions to learn (e.g. not the user's speech), default = audio_mask.
    """
    loss_mask = audio_mask if loss_mask is None else loss_mask & audio_mask
    target_is_audio = audio_mask[:, offset:]
    codes = audio_codes[:, offset:]
    # Codebook q has not started at segment positions < d_q: its empty code there is not a target.
    started = segment_positions(audio_mask)[:, offset:, None] >= torch.tensor(delays, device=codes.device)
    targets = torch.where(target_is_audio[..., None] & loss_mask[:, offset:, None] & started, codes, IGNORE)
    # First non-audio position after a learned segment: every codebook says "ended".
    segment_ends = ~target_is_audio & audio_mask[:, offset - 1 : -1] & loss_mask[:, offset - 1 : -1]
    return torch.where(segment_ends[..., None], torch.full_like(targets, empty), targets)
