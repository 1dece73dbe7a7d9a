"""Interleaved speech-text sequences, as lists of segments (independent of any tokenizer).

A training example is a list of segments:

* ``Tag(name)`` - a special token such as ``tts``, ``asr``, ``user``, ``assistant``,
  ``speech_start``, ``speech_end``;
* ``Text(text)`` - text, tokenized later by the LM's tokenizer;
* ``TextIds(ids)`` - already tokenized text (fixed-ratio chunks need token counts);
* ``Audio(codes)`` - codec frames, (F, Q) int.

The LM side renders segments to ids and audio masks.  Formats built here:

* **word-level switching** (SpiRit-LM): walk the words of an utterance and switch
  modality at word boundaries with probability ``p_switch``, using the word timestamps
  (frames) from ``speechlm data tokenize``;
* **fixed-ratio chunks** (IST-LM, VITA-Audio's 1:8 then 4:8, GLM-4-Voice's 13:26): n text
  tokens, then m audio frames, repeated, so text leads audio by a bounded amount and audio
  can stream out while the text is still being written;
* **word-aligned speech** (ELLA-V's idea at the word level): each word's text chunk, then
  that word's frames, so the model never has to find its place in the text;
* task formats: TTS, ASR, spoken QA (spoken question -> fixed-ratio text+speech answer),
  text chat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tag:
    name: str


@dataclass
class Text:
    text: str


@dataclass
class TextIds:
    ids: list[int]


@dataclass
class Audio:
    codes: np.ndarray  # (F, Q) int

    def __len__(self) -> int:
        return len(self.codes)


Segment = Tag | Text | TextIds | Audio


def word_level_interleave(words: list[dict], codes: np.ndarray, rng: random.Random, p_switch: float = 0.3, start: str | None = None) -> list[Segment]:
    """SpiRit-LM style: alternate text and speech spans at word boundaries.

    ``words``: ``{"word", "start_frame", "end_frame"}`` in spoken order; ``codes``: (F, Q).
    A speech span covers frames from its first word's start to the next span's first word's
    start (the last span runs to the end), so no audio is lost between words.
    Returns segments with ``speech_start`` / ``speech_end`` tags around audio spans.
    """
    if not words:
        return [Audio(codes)]
    modality = start or rng.choice(["text", "audio"])
    spans: list[tuple[str, int, int]] = []  # (modality, first word, last word + 1)
    first = 0
    for i in range(1, len(words)):
        if rng.random() < p_switch:
            spans.append((modality, first, i))
            modality = "audio" if modality == "text" else "text"
            first = i
    spans.append((modality, first, len(words)))
    out: list[Segment] = []
    for k, (mod, a, b) in enumerate(spans):
        if mod == "text":
            out.append(Text(" ".join(w["word"] for w in words[a:b])))
        else:
            f0 = 0 if a == 0 else words[a]["start_frame"]
            f1 = len(codes) if k == len(spans) - 1 else words[b]["start_frame"]
            out += [Tag("speech_start"), Audio(codes[f0:max(f1, f0 + 1)]), Tag("speech_end")]
    return out


def fixed_ratio_chunks(text_ids: list[int], codes: np.ndarray, text_per_chunk: int = 4, audio_per_chunk: int = 8,
                       first_text: int | None = None) -> list[Segment]:
    """``text_per_chunk`` text tokens, then ``audio_per_chunk`` frames, repeated.

    ``first_text`` lets the first chunk carry a different number of text tokens (VITA-Audio
    starts 1:8 for a fast first frame). When one stream runs out the rest of the other follows.
    """
    out: list[Segment] = []
    t = a = 0
    n_text = first_text if first_text is not None else text_per_chunk
    while t < len(text_ids) or a < len(codes):
        if t < len(text_ids):
            out.append(TextIds(text_ids[t : t + n_text]))
            t += n_text
        if a < len(codes):
            out.append(Audio(codes[a : a + audio_per_chunk]))
            a += audio_per_chunk
        n_text = text_per_chunk
    return out


def word_aligned_speech(chunk_ids: list[list[int]], words: list[dict], codes: np.ndarray) -> list[Segment] | None:
    """Each word's chunk ids, then its frames: ``TextIds(c_1) Audio(w_1) TextIds(c_2) Audio(w_2) ...``.

    ``chunk_ids``: one id list per word (``speechlm.lm.prompts.word_chunks`` + ``chunk_ids``);
    ``words``: ``{"start_frame"}`` per word in spoken order; ``codes``: (F, Q). Word i's
    speech runs from its start frame to the next word's (the first from frame 0, the last to
    the end), so pauses go with the word before them. A word that starts no later than the
    one before it (the synthesizer ran them together) joins that one's chunk. None when the
    chunks and words do not match one to one.
    """
    if not words or len(words) != len(chunk_ids) or not len(codes):
        return None
    starts = [0] + [min(int(w["start_frame"]), len(codes)) for w in words[1:]] + [len(codes)]
    out: list[Segment] = []
    pending: list[int] = []
    begin = 0
    for i, ids in enumerate(chunk_ids):
        pending = pending + list(ids)
        end = starts[i + 1]
        if end > begin:
            out += [TextIds(pending), Audio(codes[begin:end])]
            pending, begin = [], end
    if pending:  # the last word(s) had no frames of their own: they go with the word before
        if not out:
            return None
        out[-2] = TextIds(out[-2].ids + pending)
    return out


def tts_example(text: str, codes: np.ndarray) -> list[Segment]:
    return [Tag("tts"), Text(text), Tag("speech_start"), Audio(codes), Tag("speech_end")]


def asr_example(codes: np.ndarray, text: str) -> list[Segment]:
    return [Tag("asr"), Tag("speech_start"), Audio(codes), Tag("speech_end"), Text(text)]


def spoken_qa_example(question_codes: np.ndarray, answer_ids: list[int], answer_codes: np.ndarray, text_per_chunk: int = 4,
                      audio_per_chunk: int = 8, first_text: int | None = 1, layout: str = "text_first") -> list[Segment]:
    """User speaks; the assistant answers in text and speech.

    ``layout="text_first"`` (what ``SpeechPipeline.chat`` generates): the whole answer text, then
    ``<|speech_start|>`` and its speech.  ``"fixed_ratio"``: text and speech in fixed-ratio chunks
    (streams audio before the text is finished; needs a mixed text/audio decoding loop).
    """
    head = [Tag("user"), Tag("speech_start"), Audio(question_codes), Tag("speech_end"), Tag("assistant")]
    if layout == "text_first":
        return [*head, TextIds(list(answer_ids)), Tag("speech_start"), Audio(answer_codes), Tag("speech_end")]
    if layout == "fixed_ratio":
        return [*head, *fixed_ratio_chunks(answer_ids, answer_codes, text_per_chunk, audio_per_chunk, first_text), Tag("speech_end")]
    raise ValueError(f"unknown spoken QA layout {layout!r}: text_first or fixed_ratio")


def text_chat_example(question: str, answer: str) -> list[Segment]:
    return [Tag("user"), Text(question), Tag("assistant"), Text(answer)]


def pack(sequences: list[list[int]], max_length: int) -> list[list[int]]:
    """Greedy first-fit packing of id sequences into rows of at most ``max_length`` (longer ones are cut)."""
    rows: list[list[int]] = []
    for seq in sorted(sequences, key=len, reverse=True):
        seq = seq[:max_length]
        for row in rows:
            if len(row) + len(seq) <= max_length:
                row.extend(seq)
                break
        else:
            rows.append(list(seq))
    return rows
