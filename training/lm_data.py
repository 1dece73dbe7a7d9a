"""Speech-LM training data: segments -> tensors, task mixtures, batches, and the text corpus.

Reads top to bottom: how segments become an :class:`Example` (``render``), the task formats,
the :class:`TaskMixture` that draws examples from tokenized corpora, batch collation, and the
text corpus (plus its BPE tokenizer) for ``--stage text``.

Formats (each sequence is ``<|bos|> ... <|eos|>``; ``A`` = one audio position; "trained" =
the positions that carry a loss, everything else is context)::

    task        sequence                                                           trained
    tts         <|tts|> text <|speech_start|> A..A <|speech_end|>                   audio frames, end of speech, <|speech_end|>, <|eos|>
                (``text_dropout`` of them: <|tts|> <|speech_start|> A..A <|speech_end|>, guidance's unconditional twin)
    asr         <|asr|> <|speech_start|> A..A <|speech_end|> transcript              transcript, <|eos|>
    interleave  text and speech spans switching at word boundaries (SpiRit-LM)    everything
    spoken_qa   <|user|> <|speech_start|> A..A <|speech_end|> <|assistant|>          the assistant's turn:
                    t A..A t A..A .. <|speech_end|> <|end|>   (fixed-ratio chunks)    answer text, answer speech, <|end|>, <|eos|>
                or  ... <|assistant|> answer text <|end|>  (no answer speech found)
    text        a plain line, or chat turns <|user|> q <|assistant|> a <|end|> ...   plain: everything; chat: assistant turns

With ``speech_layout="word_aligned"`` (the model's config) the model's own speech in ``tts`` and
``spoken_qa`` is cut at word boundaries, each word's text chunk (context, forced at inference)
before its frames: ``<|speech_start|> c1 A..A c2 A..A .. <|speech_end|>`` (rows whose timestamps
do not match their text keep the plain layout).

Why: TTS learns to speak the prompt, not to predict the prompt text; ASR learns the
transcript, not to continue the user's speech; the assistant never learns to produce the
user's turn; word-level interleaving is a modelling objective in itself (every position).
The audio loss includes the "speech ends" target at the first position after a trained
speech run (see ``speechlm.lm.layout``), and with the delay pattern the run's tail positions.

Audio positions carry no text target (-100): inside speech the audio head predicts, the
text head does not. A trained ``<|speech_end|>`` is a text target of the last audio position.
Adjacent ``Audio`` segments form one speech run (laid out together with ``speech_segment``).

Packing: ``SpeechLM.forward`` has no per-document attention mask, so packed documents would
attend to each other. That is the usual compromise for text pretraining, so only the
``text`` task packs (``pack_text``: documents ``<|bos|> .. <|eos|>`` concatenated and cut to
``max_length``); speech tasks are one example per row, right-padded.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechlm.lm import SpeechLMConfig, SpeechVocab, delay_frames, load_tokenizer, speech_segment, train_bpe_tokenizer
from speechlm.lm.layout import IGNORE
from speechlm.lm.prompts import chunk_ids, word_chunks

from ..codec.errors import SpeechLMError
from .interleave import (
    Audio,
    Segment,
    Tag,
    Text,
    TextIds,
    asr_example,
    spoken_qa_example,
    tts_example,
    word_aligned_speech,
    word_level_interleave,
)
from .textgen import SOURCES, generate, iter_text_file
from .textnorm import normalize_text, word_spans
from .tokenize import TokenCorpus

TASKS = ("tts", "asr", "interleave", "spoken_qa", "text")


# -- what the renderer needs of a model ----------------------------------------------------------


@dataclass
class LMFormat:
    """The parts of a :class:`SpeechLM` that data preparation needs: config, tokenizer, special ids.

    ``render`` takes a ``SpeechLM`` or an ``LMFormat`` (same attributes), so data can be
    prepared without building the network.
    """

    config: SpeechLMConfig
    tokenizer: Any
    vocab: SpeechVocab = field(init=False)

    def __post_init__(self) -> None:
        self.vocab = SpeechVocab.from_tokenizer(self.tokenizer, self.config)

    @classmethod
    def from_model(cls, model) -> LMFormat:
        return cls(model.config, model.tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LMFormat:
        """From a directory written by ``SpeechLM.save_pretrained`` (reads only the config and tokenizer)."""
        from speechlm.lm.model import TOKENIZER_DIR

        return cls(SpeechLMConfig.load(directory), load_tokenizer(Path(directory) / TOKENIZER_DIR))

    def audio_layout(self, frames: Tensor) -> Tensor:
        """Frames (F, Q) -> codes of the segment's positions (as ``SpeechLM.audio_layout``)."""
        if self.config.output_head == "depth":
            return frames
        return delay_frames(frames, self.config.audio_delays, self.config.empty_code)


# -- rendering -------------------------------------------------------------------------------------


@dataclass
class Example:
    """One rendered sequence, ready for ``SpeechLM.forward`` after :func:`collate`."""

    input_ids: Tensor  # (L,) long; <|audio|> at audio positions
    audio_codes: Tensor  # (L, Q) long in the model's layout; the empty code C where no audio
    audio_mask: Tensor  # (L,) bool: audio positions
    labels: Tensor  # (L,) long: text targets (the token itself), IGNORE (-100) where not trained
    audio_loss_mask: Tensor  # (L,) bool: audio positions whose codes are trained
    task: str = ""
    hearing_mask: Tensor | None = None  # (L,) bool: heard speech the hearing head transcribes (None = none)
    hearing_targets: Tensor | None = None  # (S,) long: the transcript of that speech (text token ids)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def cut(self, max_length: int) -> Example:
        """The first ``max_length`` positions; heard speech cut short loses its transcript target."""
        if len(self) <= max_length:
            return self
        s = slice(0, max_length)
        hearing = self.hearing_mask is not None and not bool(self.hearing_mask[max_length:].any())
        return Example(
            self.input_ids[s],
            self.audio_codes[s],
            self.audio_mask[s],
            self.labels[s],
            self.audio_loss_mask[s],
            self.task,
            self.hearing_mask[s] if hearing else None,
            self.hearing_targets if hearing else None,
        )


def tag_id(vocab: SpeechVocab, name: str) -> int:
    """Token id of ``Tag(name)``: speech_start, speech_end, text_pad, end, bos, eos, pad, or a role/task
    name (``user``, ``assistant``, ``system``, ``tts``, ``asr``, ``chat``, ``duplex``)."""
    fixed = {
        "speech_start": vocab.speech_start,
        "speech_end": vocab.speech_end,
        "text_pad": vocab.text_pad,
        "end": vocab.end_of_turn,
        "bos": vocab.bos,
        "eos": vocab.eos,
        "pad": vocab.pad,
    }
    if name in fixed:
        return fixed[name]
    for table in (vocab.roles, vocab.tasks):
        for token, token_id in table.items():
            if token.removeprefix("<|").removesuffix("|>") == name:
                return token_id
    raise SpeechLMError(f"unknown tag {name!r}: not a special token of this speech LM")


def render(
    segments: Sequence[Segment],
    lm,
    tokenizer=None,
    *,
    trained: Sequence[bool] | None = None,
    bos: bool = True,
    eos: bool = True,
    task: str = "",
    heard: str | None = None,
) -> Example:
    """Segments -> an :class:`Example`, using the LM's special tokens and ``speech_segment`` layout.

    ``lm``: a ``SpeechLM`` or an :class:`LMFormat`; ``tokenizer`` defaults to ``lm.tokenizer``.
    ``trained``: one flag per segment (default all True): a trained text segment's tokens are
    text targets, a trained audio segment's codes are audio targets. ``<|bos|>`` (if ``bos``)
    is never a target; ``<|eos|>`` (if ``eos``) is trained when the last segment is.
    Text is tokenized without the tokenizer's own special tokens. ``heard``: the transcript of the
    first context (untrained) speech run, the hearing head's CTC target (``hearing_mask`` /
    ``hearing_targets``); ignored when there is no such run or the transcript has no tokens.
    """
    tokenizer = tokenizer if tokenizer is not None else lm.tokenizer
    vocab, cfg = lm.vocab, lm.config
    flags = [True] * len(segments) if trained is None else [bool(t) for t in trained]
    if len(flags) != len(segments):
        raise SpeechLMError(f"got {len(segments)} segments but {len(flags)} trained flags")
    ids: list[int] = []
    labels: list[int] = []
    runs: list[tuple[int, Tensor, bool]] = []  # (first position, layout (P, Q), trained)
    if bos:
        ids.append(vocab.bos)
        labels.append(IGNORE)
    i = 0
    while i < len(segments):
        segment, flag = segments[i], flags[i]
        if isinstance(segment, Audio):
            # Adjacent audio segments are one speech run: lay them out together.
            frames = [np.asarray(segment.codes)]
            while i + 1 < len(segments) and isinstance(segments[i + 1], Audio):
                i += 1
                if flags[i] != flag:
                    raise SpeechLMError("adjacent audio segments must be all trained or all context")
                frames.append(np.asarray(segments[i].codes))
            codes = torch.from_numpy(np.concatenate(frames).astype(np.int64, copy=False))
            if codes.ndim != 2:
                raise SpeechLMError(f"audio segment codes must be (frames, codebooks), got shape {tuple(codes.shape)}")
            if len(codes):
                run_ids, layout = speech_segment(lm, codes)
                run_ids = run_ids[1:-1]  # speech_segment adds <|speech_start|> / <|speech_end|>; the segments carry their own tags
                runs.append((len(ids), layout, flag))
                ids += run_ids
                labels += [IGNORE] * len(run_ids)
        else:
            if isinstance(segment, Tag):
                new = [tag_id(vocab, segment.name)]
            elif isinstance(segment, Text):
                new = tokenizer.encode(segment.text, add_special_tokens=False)
            elif isinstance(segment, TextIds):
                new = [int(t) for t in segment.ids]
            else:
                raise SpeechLMError(f"not a segment: {segment!r}")
            ids += new
            labels += new if flag else [IGNORE] * len(new)
        i += 1
    if eos:
        ids.append(vocab.eos)
        labels.append(vocab.eos if flags and flags[-1] else IGNORE)

    L, Q = len(ids), cfg.num_codebooks
    hearing_mask = hearing_targets = None
    heard_runs = [(start, len(layout)) for start, layout, flag in runs if not flag]
    heard_ids = tokenizer.encode(heard, add_special_tokens=False) if heard and heard_runs else []
    if heard_ids:
        start, length = heard_runs[0]
        hearing_mask = torch.zeros(L, dtype=torch.bool)
        hearing_mask[start : start + length] = True
        hearing_targets = torch.tensor(heard_ids, dtype=torch.long)
    audio_codes = torch.full((L, Q), cfg.empty_code, dtype=torch.long)
    audio_mask = torch.zeros(L, dtype=torch.bool)
    audio_loss_mask = torch.zeros(L, dtype=torch.bool)
    for start, layout, flag in runs:
        audio_codes[start : start + len(layout)] = layout
        audio_mask[start : start + len(layout)] = True
        audio_loss_mask[start : start + len(layout)] = flag
    return Example(
        torch.tensor(ids, dtype=torch.long),
        audio_codes,
        audio_mask,
        torch.tensor(labels, dtype=torch.long),
        audio_loss_mask,
        task,
        hearing_mask,
        hearing_targets,
    )


# -- task formats (segments + which of them are trained) -------------------------------------------


@dataclass
class TaskSegments:
    task: str
    segments: list[Segment]
    trained: list[bool]
    heard: str | None = None  # transcript of the heard (context) speech: the hearing head's target


def _prompt_then_answer(task: str, segments: list[Segment], prompt: int) -> TaskSegments:
    return TaskSegments(task, segments, [False] * prompt + [True] * (len(segments) - prompt))


def aligned_speech(text: str, words: list[dict] | None, codes: np.ndarray, tokenizer) -> list[Segment] | None:
    """Word-aligned segments of an utterance (``text`` as spoken, ``words`` its timestamps from
    ``speechlm data tokenize``): ``TextIds(chunk) Audio(frames)`` per word; None when the
    timestamps' words are not the text's words."""
    if not words or [w.get("word") for w in words] != [w for w, _, _ in word_spans(text)]:
        return None
    return word_aligned_speech(chunk_ids(tokenizer, word_chunks(text)), words, codes)


def _speech_run(segments: list[Segment]) -> tuple[list[Segment], list[bool]]:
    """``<|speech_start|>`` + word-aligned segments + ``<|speech_end|>``, trained on the audio and the end."""
    return [Tag("speech_start"), *segments, Tag("speech_end")], [True, *(isinstance(x, Audio) for x in segments), True]


def tts_task(text: str, codes: np.ndarray, *, words: list[dict] | None = None, tokenizer=None) -> TaskSegments:
    """Loss on the speech (and its end), not on the prompt text. With ``words`` and ``tokenizer``
    the speech is word-aligned (``speech_layout="word_aligned"``; the chunks are context), else
    plain (also when the words do not match the text)."""
    aligned = aligned_speech(text, words, codes, tokenizer) if words and tokenizer is not None else None
    if aligned is None:
        return _prompt_then_answer("tts", tts_example(text, codes), 3)
    run, trained = _speech_run(aligned)
    return TaskSegments("tts", [Tag("tts"), Text(text), *run], [False, False, False, *trained[1:]])


def unconditional_tts_task(codes: np.ndarray) -> TaskSegments:
    """TTS without its text, ``<|tts|> <|speech_start|> AUDIO <|speech_end|>`` (loss on the speech and its
    end): the unconditional twin that classifier-free guidance decodes against (``Generation.guidance``)."""
    return _prompt_then_answer("tts", [Tag("tts"), Tag("speech_start"), Audio(codes), Tag("speech_end")], 2)


def asr_task(codes: np.ndarray, text: str) -> TaskSegments:
    """Loss on the transcript, not on the input speech (the transcript is also what the speech says: ``heard``)."""
    item = _prompt_then_answer("asr", asr_example(codes, text), 4)
    item.heard = text
    return item


def interleave_task(words: list[dict], codes: np.ndarray, rng: random.Random, p_switch: float = 0.3) -> TaskSegments:
    """SpiRit-LM word-level switching; loss everywhere."""
    segments = word_level_interleave(words, codes, rng, p_switch)
    return TaskSegments("interleave", segments, [True] * len(segments))


def spoken_qa_task(
    question_codes: np.ndarray,
    answer: str,
    answer_codes: np.ndarray | None,
    tokenizer,
    *,
    text_per_chunk: int = 4,
    audio_per_chunk: int = 8,
    first_text: int | None = 1,
    layout: str = "text_first",
    answer_words: list[dict] | None = None,
    answer_spoken: str | None = None,
) -> TaskSegments:
    """Spoken question -> answer text then its speech (``layout="text_first"``, what ``SpeechPipeline.chat``
    generates), the same with word-aligned speech (``"word_aligned"``: needs ``answer_words``, the
    timestamps of the answer speech, and ``answer_spoken``, its text; falls back to text_first when
    they do not match), or fixed-ratio text+speech chunks (``"fixed_ratio"``); text only when
    ``answer_codes`` is None. Loss on the answer (not on the forced word chunks)."""
    if answer_codes is not None and layout == "word_aligned":
        aligned = aligned_speech(answer_spoken or answer, answer_words, answer_codes, tokenizer)
        if aligned is not None:
            run, trained = _speech_run(aligned)
            head = [Tag("user"), Tag("speech_start"), Audio(question_codes), Tag("speech_end"), Tag("assistant")]
            answer_ids = tokenizer.encode(answer, add_special_tokens=False)
            return TaskSegments("spoken_qa", [*head, TextIds(answer_ids), *run, Tag("end")], [False] * 5 + [True, *trained, True])
        layout = "text_first"
    if answer_codes is None:
        segments = [Tag("user"), Tag("speech_start"), Audio(question_codes), Tag("speech_end"), Tag("assistant"), Text(answer)]
    else:
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        segments = spoken_qa_example(question_codes, answer_ids, answer_codes, text_per_chunk, audio_per_chunk, first_text, layout=layout)
    return _prompt_then_answer("spoken_qa", [*segments, Tag("end")], 5)


def chat_task(turns: Sequence[tuple[str, str]]) -> TaskSegments:
    """Text chat: ``(role, text)`` turns, roles ``user`` / ``assistant``; loss on assistant turns and their ``<|end|>``."""
    segments: list[Segment] = []
    trained: list[bool] = []
    for role, text in turns:
        if role == "assistant":
            segments += [Tag("assistant"), Text(text), Tag("end")]
            trained += [False, True, True]
        elif role == "user":
            segments += [Tag("user"), Text(text)]
            trained += [False, False]
        else:
            raise SpeechLMError(f"chat roles are 'user' and 'assistant', got {role!r}")
    return TaskSegments("text", segments, trained)


def text_task(text: str) -> TaskSegments:
    return TaskSegments("text", [Text(text)], [True])


def task_prompt(task: str, lm, *, text: str | None = None, codes: np.ndarray | Tensor | None = None) -> tuple[list[int], Tensor]:
    """The inference prompt of a task: ``(ids, codes (A, Q))``, the codes of the prompt's audio
    positions in the model's layout (for ``PromptBatch.build``).

    Built by :mod:`speechlm.lm.prompts` (what ``SpeechPipeline`` uses); the tests check that it is
    exactly the prefix of the rendered training sequence. ``tts`` (text; ends with
    ``<|speech_start|>``), ``asr`` (codes), ``spoken_qa`` (codes) and ``chat`` (text) end where the
    model's answer starts.
    """
    from speechlm.lm import prompts

    needs_text = task in ("tts", "chat")
    if task not in ("tts", "asr", "spoken_qa", "chat") or (needs_text and text is None) or (not needs_text and codes is None):
        raise SpeechLMError(f"task_prompt: {task!r} needs {'text' if needs_text else 'codes'} (tasks: tts, asr, spoken_qa, chat)")
    if task == "tts":
        ids, prompt_codes = prompts.tts_prompt(lm, text), None
    elif task == "chat":
        ids, prompt_codes = prompts.chat_prompt(lm, text)
    else:
        frames = torch.as_tensor(np.asarray(codes), dtype=torch.long)
        ids, prompt_codes = (prompts.asr_prompt if task == "asr" else prompts.chat_prompt)(lm, frames)
    if prompt_codes is None:
        prompt_codes = torch.zeros(0, lm.config.num_codebooks, dtype=torch.long)
    return ids, prompt_codes


# -- the text corpus (text stage, text task) -------------------------------------------------------


@dataclass
class TextCorpus:
    """Text documents: plain lines and chats (lists of ``(role, text)`` turns)."""

    lines: list[str] = field(default_factory=list)
    chats: list[list[tuple[str, str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines) + len(self.chats)

    def document(self, i: int) -> TaskSegments:
        if i < len(self.lines):
            return text_task(self.lines[i])
        return chat_task(self.chats[i - len(self.lines)])

    def texts(self) -> list[str]:
        """Every string in the corpus (for tokenizer training)."""
        return self.lines + [text for chat in self.chats for _, text in chat]


def build_text_corpus(
    count: int = 2000, *, seed: int = 0, files: Iterable[str | Path] = (), sources: Iterable[str] | None = None
) -> TextCorpus:
    """Every built-in text source (train split, ``count`` items each) as plain lines, QA items and
    dialogues also as chats; plus the train-split lines of user text files (``.txt``: one text
    per line; ``.jsonl``: objects with ``text`` and optional ``answer``)."""
    corpus = TextCorpus()

    def add(item: dict) -> None:
        if item.get("turns"):
            turns = [("user" if speaker == "A" else "assistant", text) for speaker, text in item["turns"]]
            corpus.lines.append(" ".join(text for _, text in turns))
            corpus.chats.append(turns)
        elif item.get("answer"):
            corpus.lines.append(f"{item['text']} {item['answer']}")
            corpus.chats.append([("user", item["text"]), ("assistant", item["answer"])])
        else:
            corpus.lines.append(item["text"])

    for source in sources if sources is not None else SOURCES:
        for item in generate(source, count, split="train", seed=seed):
            add(item)
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise SpeechLMError(f"text file not found: {path}")
        try:
            for item in iter_text_file(path):
                if item.get("split", "train") == "train":
                    add(item)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpeechLMError(f"cannot read text file {path}: {e}") from None
    if not len(corpus):
        raise SpeechLMError("the text corpus is empty")
    return corpus


def train_tokenizer(
    corpus: TextCorpus,
    save_dir: str | Path | None = None,
    *,
    vocab_size: int = 8192,
    config: SpeechLMConfig | None = None,
    extra_texts: Iterable[str] = (),
):
    """Train the default model's byte-level BPE on the text corpus (and ``extra_texts``, e.g. the
    transcripts of the speech corpora); saved to ``save_dir`` if given."""
    texts = corpus.texts() + [t for t in extra_texts if t]
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=2, config=config, save_dir=save_dir)


# -- the task mixture ------------------------------------------------------------------------------


def check_corpus_codes(corpora: Sequence[TokenCorpus], config) -> None:
    """SpeechLMError when the corpora's codes (Q per frame, C entries) are not what the model reads."""
    if not corpora:
        return
    audio = corpus_audio_settings(corpora)
    if (audio["num_codebooks"], audio["codebook_size"]) != (config.num_codebooks, config.codebook_size):
        raise SpeechLMError(
            f"the corpora hold {audio['num_codebooks']} codes per frame from {audio['codebook_size']}-entry codebooks, "
            f"but the model reads {config.num_codebooks} x {config.codebook_size}"
        )


def corpus_audio_settings(corpora: Sequence[TokenCorpus]) -> dict:
    """The codec settings shared by tokenized corpora: num_codebooks, codebook_size, frame_rate, codec_id."""
    found = {
        (c.settings["codes_per_frame"], c.settings["codebook_size"], float(c.settings["frame_rate"]), c.settings.get("codec_id"))
        for c in corpora
    }
    if len(found) != 1:
        raise SpeechLMError(f"the tokenized corpora use different codecs: {sorted(found, key=str)}; tokenize them with one codec")
    q, c, rate, codec_id = found.pop()
    return {"num_codebooks": int(q), "codebook_size": int(c), "frame_rate": rate, "codec_id": codec_id}


def _trainable_row(row: dict) -> bool:
    """Mono utterances of training texts in training voices (held-out text and voices stay out)."""
    return len(row.get("offsets", ())) == 1 and row.get("split", "train") == "train" and row.get("voice_split", "train") == "train"


def _heard_only(row: dict) -> bool:
    """Rows made for listening only (``speechlm data rooms``: quiet edges and a room's noise): heard in ASR
    and as spoken questions, never a target of speech the model learns to say (TTS, answers, interleaving)."""
    return "room" in row


class TaskMixture:
    """Examples drawn from weighted tasks, as a pure function of ``(seed, step, index)``.

    ``corpora``: ``TokenCorpus`` objects or their directories (``speechlm data tokenize``).
    Tasks (``weights`` keys): ``tts``, ``asr``, ``interleave``, ``spoken_qa`` need corpora;
    ``text`` needs ``text`` (a :class:`TextCorpus`). A task with no data is dropped
    (``dropped`` says why); no task left is an error.

    Voices: TTS targets and spoken answers use rows in ``assistant_voices`` (None = any voice);
    ASR, interleaving and spoken questions use every training voice. Rows made for listening only (rooms:
    ``speechlm data rooms``) are heard in ASR and spoken questions, never spoken (TTS, answers, interleaving).
    A spoken-QA row is a row
    with an ``answer``; its answer speech is a row (assistant voice) whose ``answer_to`` is the
    question row's id, or else whose text is the answer text (after normalisation); with
    neither, the answer is text only.

    Examples longer than ``max_length`` are redrawn (up to 4 times), then cut.
    """

    def __init__(
        self,
        lm,
        corpora: Sequence[str | Path | TokenCorpus] = (),
        weights: dict[str, float] | None = None,
        *,
        text: TextCorpus | None = None,
        seed: int = 0,
        max_length: int = 1024,
        pack_text: bool = False,
        text_row_length: int | None = None,
        p_switch: float = 0.3,
        text_per_chunk: int = 4,
        audio_per_chunk: int = 8,
        first_text: int | None = 1,
        assistant_voices: Sequence[str] | None = None,
        text_dropout: float = 0.0,
    ):
        self.lm = lm if isinstance(lm, LMFormat) else LMFormat.from_model(lm)
        if not 0.0 <= text_dropout < 1.0:
            raise SpeechLMError(f"text_dropout must be in [0, 1), got {text_dropout}")
        self.text_dropout = text_dropout
        self.corpora = [c if isinstance(c, TokenCorpus) else TokenCorpus(c) for c in corpora]
        self.text = text
        self.seed, self.max_length, self.pack_text = seed, max_length, pack_text
        # Packed text rows this long (default max_length): a batch pads to its longest row, so rows near the
        # speech rows' length waste less (with 256-long text rows among ~100-long speech rows, half of a
        # batch's positions were padding).
        self.text_row_length = min(text_row_length or max_length, max_length)
        self.p_switch, self.text_per_chunk, self.audio_per_chunk, self.first_text = p_switch, text_per_chunk, audio_per_chunk, first_text
        if max_length < 8 or (text_row_length is not None and text_row_length < 8):
            raise SpeechLMError(f"max_length and text_row_length must be at least 8, got {max_length} and {text_row_length}")
        check_corpus_codes(self.corpora, self.lm.config)

        voices = set(assistant_voices) if assistant_voices else None
        utterances = [(c, r) for c, corpus in enumerate(self.corpora) for r, row in enumerate(corpus.rows) if _trainable_row(row)]
        said = [(c, r) for c, r in utterances if not _heard_only(self.corpora[c].rows[r])]  # may be learned as speech
        speaker = [(c, r) for c, r in said if voices is None or self.corpora[c].rows[r].get("voice") in voices]
        self.pools: dict[str, list[tuple[int, int]]] = {
            "tts": [(c, r) for c, r in speaker if self.corpora[c].rows[r].get("text", "").strip()],
            "asr": [(c, r) for c, r in utterances if self.corpora[c].rows[r].get("text", "").strip()],
            "interleave": [(c, r) for c, r in said if self.corpora[c].rows[r].get("words")],
            "spoken_qa": [(c, r) for c, r in utterances if self.corpora[c].rows[r].get("answer")],
        }
        self.answers_by_id: dict[str, list[tuple[int, int]]] = {}
        self.answers_by_text: dict[str, list[tuple[int, int]]] = {}
        for c, r in speaker:
            row = self.corpora[c].rows[r]
            if row.get("answer_to"):
                self.answers_by_id.setdefault(row["answer_to"], []).append((c, r))
            self.answers_by_text.setdefault(_text_key(row.get("text", "")), []).append((c, r))

        weights = dict(weights if weights is not None else {"tts": 1.0, "asr": 1.0, "interleave": 1.0})
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise SpeechLMError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        self.dropped: dict[str, str] = {}
        self.weights: dict[str, float] = {}
        for task, w in weights.items():
            if w < 0:
                raise SpeechLMError(f"task weight must be >= 0, got {task}={w}")
            if w == 0:
                continue
            size = len(self.text) if task == "text" and self.text is not None else len(self.pools.get(task, ()))
            if size == 0:
                self.dropped[task] = "no text corpus" if task == "text" else "no suitable rows in the corpora"
                continue
            self.weights[task] = float(w)
        if not self.weights:
            why = "; ".join(f"{t}: {r}" for t, r in self.dropped.items()) or "all weights are 0"
            raise SpeechLMError(f"no task has data ({why})")
        self._names = sorted(self.weights)
        self._cumulative = np.cumsum([self.weights[t] for t in self._names])

    def describe(self) -> str:
        total = self._cumulative[-1]
        parts = [f"{t} {self.weights[t] / total:.0%} ({len(self.text) if t == 'text' else len(self.pools[t])} items)" for t in self._names]
        parts += [f"{t} dropped: {why}" for t, why in self.dropped.items()]
        return ", ".join(parts)

    # -- drawing ---------------------------------------------------------------------------

    def example(self, step: int, index: int) -> Example:
        """Example ``index`` of batch ``step``: the same for the same (seed, step, index), on any process."""
        rng = random.Random(f"{self.seed}:{step}:{index}")
        task = self._names[int(np.searchsorted(self._cumulative, rng.random() * self._cumulative[-1], side="right"))]
        if task == "text" and self.pack_text:
            return self._packed_text(rng)
        example = None
        for _ in range(5):
            example = self._draw(task, rng)
            if len(example) <= self.max_length:
                return example
        return example.cut(self.max_length)

    def batch(self, step: int, indices: Iterable[int]) -> dict[str, Tensor]:
        """Collated examples ``indices`` of batch ``step`` (see :func:`collate`)."""
        return collate([self.example(step, i) for i in indices], self.lm.vocab.pad, self.lm.config.empty_code)

    def _draw(self, task: str, rng: random.Random) -> Example:
        if task == "text":
            return self._render(self.text.document(rng.randrange(len(self.text))))
        c, r = self.pools[task][rng.randrange(len(self.pools[task]))]
        row, (codes,) = self.corpora[c][r]
        aligned = self.lm.config.speech_layout == "word_aligned"
        if task == "tts":
            if self.text_dropout and rng.random() < self.text_dropout:  # (no draw without dropout: the same examples as before)
                return self._render(unconditional_tts_task(codes))
            if aligned:
                return self._render(tts_task(row["text"], codes, words=row.get("words"), tokenizer=self.lm.tokenizer))
            return self._render(tts_task(row["text"], codes))
        if task == "asr":
            return self._render(asr_task(codes, row["text"]))
        if task == "interleave":
            return self._render(interleave_task(row["words"], codes, rng, self.p_switch))
        answer_codes = answer_row = None
        question_text = row.get("text")
        candidates = self.answers_by_id.get(row.get("id", "")) or self.answers_by_text.get(_text_key(row["answer"]))
        if candidates:
            ac, ar = candidates[rng.randrange(len(candidates))]
            answer_row, (answer_codes,) = self.corpora[ac][ar]
        item = spoken_qa_task(
            codes,
            row["answer"],
            answer_codes,
            self.lm.tokenizer,
            text_per_chunk=self.text_per_chunk,
            audio_per_chunk=self.audio_per_chunk,
            first_text=self.first_text,
            layout="word_aligned" if aligned else "text_first",
            answer_words=answer_row.get("words") if answer_row else None,
            answer_spoken=answer_row.get("text") if answer_row else None,
        )
        item.heard = question_text
        return self._render(item)

    def _render(self, item: TaskSegments) -> Example:
        return render(item.segments, self.lm, trained=item.trained, task=item.task, heard=item.heard)

    def _packed_text(self, rng: random.Random) -> Example:
        """Whole text documents end to end, cut to exactly ``text_row_length`` positions."""
        parts: list[Example] = []
        length = 0
        while length < self.text_row_length:
            parts.append(self._render(self.text.document(rng.randrange(len(self.text)))))
            length += len(parts[-1])
        return Example(*(torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS), task="text").cut(self.text_row_length)


_FIELDS = ("input_ids", "audio_codes", "audio_mask", "labels", "audio_loss_mask")


def _text_key(text: str) -> str:
    return " ".join(normalize_text(text).lower().split())


# -- batches ---------------------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int, empty_code: int) -> dict[str, Tensor]:
    """Right-pad examples into a batch: the keyword arguments of ``SpeechLM.forward``.

    Returns input_ids (B, L), audio_codes (B, L, Q), audio_mask (B, L), attention_mask (B, L),
    labels (B, L) and audio_loss_mask (B, L); padding is pad_id / empty code / False / -100. Plus
    hearing_mask (B, L) and hearing_targets (B, S) (-100 after a transcript's end; S >= 1) for the
    hearing head: all False / -100 in rows without heard speech.
    """
    if not examples:
        raise SpeechLMError("cannot collate an empty batch")
    B, L, Q = len(examples), max(len(e) for e in examples), examples[0].audio_codes.shape[1]
    batch = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "audio_codes": torch.full((B, L, Q), empty_code, dtype=torch.long),
        "audio_mask": torch.zeros(B, L, dtype=torch.bool),
        "attention_mask": torch.zeros(B, L, dtype=torch.bool),
        "labels": torch.full((B, L), IGNORE, dtype=torch.long),
        "audio_loss_mask": torch.zeros(B, L, dtype=torch.bool),
    }
    for b, e in enumerate(examples):
        n = len(e)
        for name in _FIELDS:
            batch[name][b, :n] = getattr(e, name)
        batch["attention_mask"][b, :n] = True
    S = max([1, *(len(e.hearing_targets) for e in examples if e.hearing_targets is not None)])
    batch["hearing_mask"] = torch.zeros(B, L, dtype=torch.bool)
    batch["hearing_targets"] = torch.full((B, S), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        if e.hearing_mask is not None and e.hearing_targets is not None:
            batch["hearing_mask"][b, : len(e)] = e.hearing_mask
            batch["hearing_targets"][b, : len(e.hearing_targets)] = e.hearing_targets
    return batch
