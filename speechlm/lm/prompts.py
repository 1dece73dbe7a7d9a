"""The sequence formats of the speech LM's tasks, in one place.

Training data (``speechlm.training.lm_data``) and inference (``speechlm.speech``) both build
their sequences with these functions, so what the model learns is what it is asked::

    TTS   <|bos|> <|tts|> TEXT <|speech_start|> AUDIO... <|speech_end|> <|eos|>
    ASR   <|bos|> <|asr|> <|speech_start|> AUDIO... <|speech_end|> TEXT <|eos|>
    CHAT  <|bos|> <|user|> <|speech_start|> AUDIO... <|speech_end|> <|assistant|>
              TEXT <|speech_start|> AUDIO... <|speech_end|> <|end|> <|eos|>
          (or <|user|> TEXT <|assistant|> ... for a typed question)

With ``speech_layout="word_aligned"`` the model's own speech (TTS, the spoken reply) is cut
at word boundaries, each word's text chunk forced before its audio (see :func:`word_chunks`)::

    <|speech_start|> CHUNK_1 AUDIO... CHUNK_2 AUDIO... <|speech_end|>

``speechlm.training.lm_data.task_prompt`` returns these prompts and its test checks that each
is the prefix of the rendered training sequence.

In a spoken reply the text comes first and the speech follows it in the same turn
(chain of modality): the speech is conditioned on words already chosen, and the text of
a short answer costs only a few forwards before the first audio frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from speechlm.codec.errors import SpeechLMError
from speechlm.training.textnorm import normalize_text, word_spans

from .generate import speech_segment
from .model import SpeechLM

MAX_TEXT_CHARS = 2000


def text_ids(model: SpeechLM, text: str) -> list[int]:
    text = text.strip()
    if not text:
        raise SpeechLMError("empty text: nothing to say")
    if len(text) > MAX_TEXT_CHARS:
        raise SpeechLMError(f"text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS} (split it into sentences)")
    return model.tokenizer.encode(text, add_special_tokens=False)


def tts_prompt(model: SpeechLM, text: str) -> list[int]:
    """``<|tts|> TEXT <|speech_start|>``: the model continues with the speech."""
    v = model.vocab
    return [v.bos, v.tasks["<|tts|>"], *text_ids(model, text), v.speech_start]


def word_chunks(text: str) -> list[str]:
    """``text`` cut after each word: chunk i runs from the end of word i-1 to the end of word i,
    so it holds the space and punctuation before its word; the last chunk also takes what
    follows the last word. ``"Hi, Ann."`` -> ``["Hi", ", Ann."]``. No words -> ``[]``."""
    ends = [end for _, _, end in word_spans(text)]
    if not ends:
        return []
    ends[-1] = len(text)
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def chunk_ids(tokenizer, chunks: list[str]) -> list[list[int]]:
    """Token ids of each chunk, tokenized on its own (as training and inference both do)."""
    return [tokenizer.encode(c, add_special_tokens=False) for c in chunks]


def aligned_tts_prompt(model: SpeechLM, text: str) -> tuple[list[int], list[list[int]]]:
    """Word-aligned TTS: (``<|tts|> TEXT <|speech_start|>``, the chunk ids of TEXT's words).
    TEXT is normalized first (numbers spelled out), as the training data is."""
    text = normalize_text(text.strip())
    prompt = tts_prompt(model, text)
    chunks = chunk_ids(model.tokenizer, word_chunks(text))
    if not chunks or any(not c for c in chunks):
        raise SpeechLMError(f"nothing to say: no words in {text[:80]!r}")
    return prompt, chunks


def asr_prompt(model: SpeechLM, frames: Tensor) -> tuple[list[int], Tensor]:
    """``<|asr|> <|speech_start|> AUDIO <|speech_end|>``: the model continues with the transcript."""
    ids, codes = speech_segment(model, frames)
    return [model.vocab.bos, model.vocab.tasks["<|asr|>"], *ids], codes


def chat_prompt(model: SpeechLM, question: Tensor | str) -> tuple[list[int], Tensor | None]:
    """A user turn (speech frames (F, Q) or text) and ``<|assistant|>``: the model continues
    with the reply's text, then ``<|speech_start|>`` and its speech."""
    v = model.vocab
    if isinstance(question, str):
        return [v.bos, v.roles["<|user|>"], *text_ids(model, question), v.roles["<|assistant|>"]], None
    ids, codes = speech_segment(model, question)
    return [v.bos, v.roles["<|user|>"], *ids, v.roles["<|assistant|>"]], codes


def empty_frames(model: SpeechLM) -> Tensor:
    return torch.zeros(0, model.config.num_codebooks, dtype=torch.long)
