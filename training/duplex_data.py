"""Full-duplex training data: tokenized two-channel dialogues -> aligned streams -> batches.

A dialogue row of a tokenized corpus (``speechlm data dialogues`` then ``data tokenize``) holds
two channels of codes (F, Q) — channel 0 the user (speaker A), channel 1 the assistant
(speaker B) — per-channel words with ``start_frame`` / ``end_frame``, and the ``turns``. For
:class:`speechlm.lm.duplex.DuplexLM` it becomes three streams of F frames::

    user   channel 0 codes, every frame (silence included: the model must hear it)
    model  channel 1 codes where the assistant speaks; the empty code C where it is silent
    text   the assistant's words, tokenized (" word", byte-level BPE) and laid at their start
           frames (minus ``text_lead``), one piece per frame (a word's pieces fill the following
           frames; a piece whose frame is taken moves to the next free one); <|text_pad|> elsewhere

Where the assistant speaks: per assistant turn (and backchannel), from its first word's start
frame to its last word's end frame — or, for a turn cut by an interruption, to the end of its
(faded) audio, so the model learns to stop a reaction time after the user barges in. A turn
with no aligned word falls back to its start/end times.

:class:`DuplexMixture` draws random crops of ``frames`` frames (right-padded when a dialogue is
shorter; a share ``p_from_start`` of crops starts at frame 0, like a live session) as a pure
function of ``(seed, step, index)``, like ``TaskMixture``. ``speechlm train lm --stage duplex``
trains on it (see :func:`build_duplex_model`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..codec.errors import SpeechLMError
from .lm_data import LMFormat, check_corpus_codes
from .tokenize import TokenCorpus

USER, ASSISTANT = 0, 1


@dataclass
class DuplexStreams:
    """One whole dialogue as aligned streams of F frames (numpy)."""

    user: np.ndarray  # (F, Q) int64
    model: np.ndarray  # (F, Q) int64, empty code where the assistant is silent
    text: np.ndarray  # (F,) int64 token ids, text_pad where none
    speaking: np.ndarray  # (F,) bool: frames where the assistant speaks

    def __len__(self) -> int:
        return int(self.text.shape[0])


def is_dialogue_row(row: dict) -> bool:
    """A two-channel training dialogue with per-channel words."""
    channels = row.get("channels") or []
    return len(row.get("offsets", ())) == 2 and len(channels) == 2 and row.get("split", "train") == "train"


def assistant_speaking(row: dict, num_frames: int, frame_rate: float, channel: int = ASSISTANT) -> np.ndarray:
    """(F,) bool: frames where ``channel`` speaks (see the module docstring)."""
    speaking = np.zeros(num_frames, dtype=bool)
    words = row["channels"][channel].get("words", [])
    turns = [t for t in row.get("turns", []) if t.get("channel") == channel]
    if not turns:  # no turn boundaries: the words alone
        for w in words:
            speaking[max(0, w["start_frame"]) : max(0, min(num_frames, w["end_frame"]))] = True
        return speaking
    for turn in turns:
        inside = [w for w in words if turn["start"] - 1e-3 <= w["start"] <= turn["end"] + 1e-3]
        if inside:
            start = min(w["start_frame"] for w in inside)
            end = max(w["end_frame"] for w in inside)
            if turn.get("interrupted"):
                end = max(end, math.ceil(turn["end"] * frame_rate))
        else:
            start, end = math.floor(turn["start"] * frame_rate), math.ceil(turn["end"] * frame_rate)
        speaking[max(0, start) : max(0, min(num_frames, end))] = True
    return speaking


def text_stream(
    words: Sequence[dict], tokenizer, num_frames: int, pad_id: int, lead: int = 0
) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """The text stream (F,) and, per word, ``(frame of its first piece, its piece ids)``.

    Word w's pieces start at ``max(w.start_frame - lead, first free frame)`` and fill consecutive
    frames; pieces that would fall past the end are dropped.
    """
    text = np.full(num_frames, pad_id, dtype=np.int64)
    placed: list[tuple[int, list[int]]] = []
    free = 0
    for w in sorted(words, key=lambda w: (w["start_frame"], w["end_frame"])):
        ids = tokenizer.encode(" " + w["word"].strip(), add_special_tokens=False)
        if not ids:
            continue
        first = max(w["start_frame"] - lead, free, 0)
        if first >= num_frames:
            break
        n = min(len(ids), num_frames - first)
        text[first : first + n] = ids[:n]
        placed.append((first, ids[:n]))
        free = first + n
    return text, placed


def dialogue_streams(row: dict, channels: Sequence[np.ndarray], lm, *, text_lead: int = 0) -> DuplexStreams:
    """Row + its two channels of codes -> :class:`DuplexStreams` (``lm``: a model or an LMFormat)."""
    fmt = _format(lm)
    if len(channels) != 2:
        raise SpeechLMError(f"dialogue {row.get('id')!r} has {len(channels)} channels of codes; duplex data needs 2 (user, assistant)")
    user, assistant = (np.asarray(c, dtype=np.int64) for c in channels)
    F_ = min(len(user), len(assistant))
    user, assistant = user[:F_], assistant[:F_]
    frame_rate = float(fmt.config.frame_rate)
    speaking = assistant_speaking(row, F_, frame_rate)
    model = np.where(speaking[:, None], assistant, fmt.config.empty_code)
    words = row["channels"][ASSISTANT].get("words", [])
    text, _ = text_stream(words, fmt.tokenizer, F_, fmt.vocab.text_pad, text_lead)
    return DuplexStreams(user=user, model=model, text=text, speaking=speaking)


def _format(lm) -> LMFormat:
    if isinstance(lm, LMFormat):
        return lm
    inner = getattr(lm, "lm", lm)  # a DuplexLM wraps a SpeechLM
    return LMFormat.from_model(inner)


class DuplexMixture:
    """Random crops of aligned dialogue streams, as a pure function of ``(seed, step, index)``.

    ``lm``: a DuplexLM (its ``config.text_lead`` is used unless ``text_lead`` is given), a
    SpeechLM or an LMFormat. ``corpora``: tokenized corpora (objects or directories); their
    training dialogue rows are used, other rows ignored.
    """

    def __init__(
        self,
        lm,
        corpora: Sequence[str | Path | TokenCorpus],
        *,
        seed: int = 0,
        frames: int = 512,
        p_from_start: float = 0.25,
        text_lead: int | None = None,
    ):
        self.lm = _format(lm)
        if text_lead is None:
            text_lead = int(getattr(getattr(lm, "config", None), "text_lead", 0) or 0)
        self.text_lead = text_lead
        self.corpora = [c if isinstance(c, TokenCorpus) else TokenCorpus(c) for c in corpora]
        self.seed, self.frames, self.p_from_start = seed, frames, p_from_start
        if frames < 2:
            raise SpeechLMError(f"duplex crops need at least 2 frames, got {frames}")
        if not 0.0 <= p_from_start <= 1.0:
            raise SpeechLMError(f"p_from_start must lie in [0, 1], got {p_from_start}")
        check_corpus_codes(self.corpora, self.lm.config)
        self.pool = [(c, r) for c, corpus in enumerate(self.corpora) for r, row in enumerate(corpus.rows) if is_dialogue_row(row)]
        if not self.pool:
            raise SpeechLMError(
                "no two-channel training dialogues in the corpora: make them with `speechlm data dialogues` and tokenize them"
            )
        # The mixture interface the LM trainer logs.
        self.weights = {"duplex": 1.0}

    def describe(self) -> str:
        seconds = sum(self.corpora[c].rows[r]["num_frames"] for c, r in self.pool) / float(self.lm.config.frame_rate)
        return f"duplex 100% ({len(self.pool)} dialogues, {seconds / 3600:.2f} h), crops of {self.frames} frames"

    def streams(self, i: int) -> DuplexStreams:
        c, r = self.pool[i]
        row, channels = self.corpora[c][r]
        return dialogue_streams(row, channels, self.lm, text_lead=self.text_lead)

    def example(self, step: int, index: int) -> dict[str, Tensor]:
        """One crop: user_codes (T, Q), model_codes (T, Q), text (T,), attention_mask (T,)."""
        rng = random.Random(f"{self.seed}:duplex:{step}:{index}")
        streams = self.streams(rng.randrange(len(self.pool)))
        F_, T = len(streams), self.frames
        start = 0 if F_ <= T or rng.random() < self.p_from_start else rng.randrange(F_ - T + 1)
        n = min(T, F_ - start)
        Q, empty = self.lm.config.num_codebooks, self.lm.config.empty_code
        out = {
            "user_codes": torch.full((T, Q), empty, dtype=torch.long),
            "model_codes": torch.full((T, Q), empty, dtype=torch.long),
            "text": torch.full((T,), self.lm.vocab.text_pad, dtype=torch.long),
            "attention_mask": torch.zeros(T, dtype=torch.bool),
        }
        out["user_codes"][:n] = torch.from_numpy(streams.user[start : start + n])
        out["model_codes"][:n] = torch.from_numpy(streams.model[start : start + n])
        out["text"][:n] = torch.from_numpy(streams.text[start : start + n])
        out["attention_mask"][:n] = True
        return out

    def batch(self, step: int, indices: Iterable[int]) -> dict[str, Tensor]:
        """Crops ``indices`` of batch ``step`` stacked: the keyword arguments of ``DuplexLM.forward``."""
        examples = [self.example(step, i) for i in indices]
        if not examples:
            raise SpeechLMError("cannot collate an empty batch")
        return {name: torch.stack([e[name] for e in examples]) for name in examples[0]}


# -- the training run (speechlm train lm --stage duplex) ------------------------------------------


def build_duplex_model(config, audio: dict, tokenizer_texts, *, rank: int = 0):
    """The DuplexLM a ``--stage duplex`` run starts from.

    ``--init-from`` a SpeechLM export (usually the ``sft`` stage's ``RUN/model``): a fresh user
    embedding (a copy of the model's audio embedding) and text condition; or a duplex export:
    continue it. ``--backbone`` (no init): a fresh SpeechLM first, as in the other stages.
    ``config.duplex`` overrides fields of the DuplexConfig.
    """
    from speechlm.lm.duplex import DuplexConfig, DuplexLM, is_duplex_dir

    from .lm_train import build_model

    lm = build_model(config, audio, tokenizer_texts, rank=rank)
    previous = config.init_from if config.init_from and is_duplex_dir(config.init_from) else None
    base = DuplexConfig.load(previous).to_dict() if previous else {}
    duplex_config = DuplexConfig.from_dict({**base, **(config.duplex or {})})
    model = DuplexLM(lm, duplex_config)
    if previous:
        model.load_duplex_weights(previous)
    return model.float()
