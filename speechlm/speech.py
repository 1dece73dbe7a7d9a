"""The speech LM as a user meets it: text or 16 kHz audio in, text and audio out.

    from speechlm.speech import SpeechPipeline
    sp = SpeechPipeline.from_pretrained("path/to/model")       # a speech LM dir (+ its codec)
    audio = sp.tts("Hello there.")                              # float32 (T,) at 16 kHz
    for chunk in sp.tts("Hello there.", stream=True): ...       # PCM chunks as frames decode
    text = sp.asr(audio)
    reply_text, reply_audio = sp.chat(audio)                    # one spoken turn

A model directory holds the speech LM (``SpeechLM.save_pretrained``) and, in ``codec/``,
the codec whose codes it reads and writes (or ``codec.json`` naming a shipped codec).
Streaming TTS decodes each frame with the streaming codec as soon as the LM completes it,
so the first PCM chunk leaves after the first backbone forward (MCTP gives several frames
per forward).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .checker import PronunciationChecker, text_phonemes
from .codec.audio import PEAK_LEVEL, SAMPLE_RATE, is_silent, sound_span, split_at_pauses, trim_quiet_edges
from .codec.errors import AudioError, DependencyError, SpeechLMError
from .codec.model import Codec
from .denoise import spectral_denoise
from .lm.adapters import VOICE_PREFIX
from .lm.aligned_batch import iter_aligned_audio_batch
from .lm.ensemble import Prefilled, ensemble_transcribe_groups, prefill, prefilled_rows, transcript_log_probs
from .lm.generate import AudioStep, PromptBatch, Sampling, iter_aligned_audio, iter_audio, text_generate
from .lm.model import SpeechLM
from .lm.prompts import aligned_tts_prompt, asr_prompt, chat_prompt, chunk_ids, tts_prompt, word_chunks
from .speech_streams import BatchedSpeechStreams, SpeechStreams
from .training.textnorm import normalize_text, split_clauses, split_sentences, spoken_words
from .transcript_check import LEXICON_FILE, Lexicon, check_transcript
from .vad import SpeechDetector

log = logging.getLogger(__name__)

CODEC_DIR = "codec"
CODEC_REF = "codec.json"
MIN_AUDIO_SECONDS = 0.2
# ASR hears a piece in two at its longest pause, each half likewise, at most this many times over (up to 16 parts of
# a piece of at most 6 s; the hearings of a piece at most 5x its length)
MAX_SPLIT_DEPTH = 4
DEFAULT_VOICE = "default"  # Generation.voice: the model's own voice (no voice adapter)
MAX_TTS_CHARS = 50_000  # one TTS call's text, sentence by sentence (each sentence: speechlm.lm.prompts.MAX_TEXT_CHARS)


@dataclass
class Generation:
    # Speech: greedy by default. On 100 held-out sentences (benchmarks/speech_lm.py, docs/benchmarks.md)
    # the judge heard greedy speech at 53 % WER and temperature 0.8 / top-k 50 at 75 %: this model's
    # residual codebooks are uncertain, and sampling them adds noise that costs words.
    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = 0
    max_seconds: float = 30.0  # of speech per reply
    max_text_tokens: int = 200
    mctp_schedule: list[int] | None = None  # MCTP frames after each backbone forward; None = the model's; [0] = off
    max_seconds_per_word: float = 3.0  # word-aligned models: a word's speech ends here at the latest
    codebook_temperatures: tuple[float, ...] | None = None  # speech: one temperature per codebook (overrides temperature)
    # speech: classifier-free guidance on the text (speechlm.lm.generate): each frame's logits pushed away
    # from those of the same audio without the text, by this much (0 = off). On 40 held-out sentences the
    # judge heard 0.2 at 39.7 % WER, none at 46.9 % (80 sentences: 40.2 vs 45.7 %), at ~1.3x the time
    # (the unconditional rows ride in the same batch; docs/benchmarks.md)
    guidance: float = 0.2
    # chat on speech: transcribe the question first (the model's own ASR), then answer the transcript as
    # a typed question (SpeechGPT's chain of modality); False = answer the speech directly. The default:
    # on 40 held-out spoken questions the shipped model's reply text held the answer 6-7 times this way,
    # 2 times answering the speech directly (docs/benchmarks.md).
    transcribe_first: bool = True
    # chat: how the reply is spoken once its text is written: "chat" = the speech continues the chat turn
    # (the reply's text in its context, as trained for spoken answers); "tts" = the reply's text spoken by the
    # TTS task alone (a fresh TTS prompt, as the server's answer assist does). On 40 held-out spoken questions
    # the judge heard the answer in 6 vs 7 spoken replies (of 20 right texts; 14 when the teacher speaks them). A reply
    # of several sentences (or one long enough to be cut in clauses, ``tts_max_words``) is spoken as TTS speaks it.
    reply_speech: str = "chat"
    # How ``asr`` (and transcribe-first chat) transcribes: "lm" = the LM writes the transcript after the
    # speech (autoregressive, greedy); "ctc" = the hearing head, one forward, greedy CTC (models with a
    # hearing head only); "auto" = "ctc" when the model has a hearing head, else "lm".
    asr_decoder: str = "lm"
    # The LM decoder listens to ``asr_views`` views of the audio (the same utterance at other levels,
    # see ``listening_views``) and decodes one transcript from them (speechlm.lm.ensemble): on 80
    # held-out-voice utterances 4 views gave 15 % WER where one gave 23 % (docs/benchmarks.md), at
    # about 1.8x the time. 1 = plain greedy decoding. ``asr_rescore``: choose among the views'
    # transcripts by their total likelihood (else the ensemble's greedy transcript).
    asr_views: int = 4
    asr_rescore: bool = True
    # what tells the views apart (``listening_views``): "level" = the audio at other levels; "lead" = the audio
    # after 0, 1/K, 2/K, ... of a codec frame of silence (the frame grid falls elsewhere in the sound)
    asr_view_kind: str = "level"
    # ASR hears the audio peak-normalized to this level (the training corpus's); None = as given
    asr_level: float | None = PEAK_LEVEL
    # ASR hears a long quiet start or end cut short, and the room's steady noise suppressed when the
    # recording starts with a stretch of it (``hearing_audio``): the shipped model learned to hear from
    # synthetic speech that starts at once, and 80 ms of silence before a question took its WER on 80
    # held-out utterances from 15 % to 65 %, half a second to 107 % (27 % cut short; docs/benchmarks.md)
    asr_edges: bool = True
    # ASR gives no transcript for audio in which this speech detector (speechlm.vad: a directory or shipped name)
    # hears less than its min_speech_seconds of speech: the LM heard only speech in training and transcribes a
    # fan's noise, a tone or clicks as a training sentence (docs/benchmarks.md); None = only digital silence is
    # nothing
    speech_detector: str | None = "vad-en"
    # ASR (and transcribe-first chat) hears through the model's task adapter of this name when it has one
    # (speechlm.lm.adapters: trained on ASR alone, base weights frozen, so TTS is the base model's); None or
    # a model without it = the base model
    asr_adapter: str | None = "asr"
    # ASR (and transcribe-first chat): check the LM's transcript against the sounds with the pronunciation
    # checker (``checker``) and its lexicon (speechlm.transcript_check): up to ``asr_check_rounds`` one-word
    # edits over the words of the training texts, each kept when it lowers the checker's CTC NLL minus
    # ``asr_check_weight`` x the LM's log-likelihood of the transcript. 0 rounds = off. The LM alone hears a
    # held-out question of a familiar shape as a training question ("What does a snake say?" -> "... a duck
    # say?"). Needs espeak-ng for words outside the lexicon.
    # Chosen on the validation split (40 sentences, 30 questions, held-out voices): WER 6.5 -> 2.6 %, replies
    # holding the answer 17 -> 24 of 30; on the test split held-out voices 8.9 -> 6.8 %, spoken questions answered
    # in the reply text 20 -> 31 of 40 (docs/benchmarks.md). About 0.4-0.55 s more an utterance on one CPU thread.
    asr_check_rounds: int = 3
    asr_check_weight: float = 2.0
    # each round the LM scores this many of the checker's best edits (one batch; the rest of a round's cost is the
    # checker's). On the validation split (55 sentences and questions, held-out voices, 4 views) 16, 8, 4 and 2 give
    # the same transcripts (1: one word better), and 8 takes the ASR from 1.12 to 0.94 s an utterance on one thread
    # (4: 0.84 s); 8, not 4: "What does a snake say?" (tests) needs the checker's 6th best edit
    asr_check_shortlist: int = 8
    # ASR of a recording that pauses: the model was trained to transcribe one sentence, and two sentences in one
    # piece of audio come out as one invented sentence; so the audio is cut at every pause of at least
    # ``asr_pause_seconds`` (and a piece longer than ``asr_piece_seconds`` again at its longest pause), each piece
    # heard alone from its first sound (speechlm.codec.audio.split_at_pauses), the transcripts joined; audio no
    # longer than ``asr_piece_seconds`` is heard whole too (a few training items hold two short sentences), and the
    # transcript the pronunciation checker hears better is kept. 0 = one piece, as given. Chosen on validation-split recordings of 5 sentences by held-out voices (espeak's own pauses
    # between them, 0.26-0.48 s): 15 of 16 cut into their 5 sentences (0.3 s: 10, or 12 with 6 s pieces); no single
    # held-out sentence (160 validation, 160 test) has a quiet run of more than 0.23 s inside, nor lasts 6 s.
    asr_pause_seconds: float = 0.25
    asr_piece_seconds: float = 6.0
    # Some voices pause less than ``asr_pause_seconds`` between sentences (espeak's en-us+f4: 0.18-0.23 s), as
    # long as some pauses inside a sentence (a comma, a long number); so a piece (or audio no longer than
    # ``asr_piece_seconds``) is heard whole and in two at its longest pause of at least ``asr_short_pause_seconds``,
    # each half likewise, and the pronunciation checker keeps what it hears better. 0 = only the pauses of
    # ``asr_pause_seconds``. Validation split, held-out voices: recordings of 5 sentences 12.1 -> 8.7 % WER at 1.6x the
    # time, single sentences 4.0 % both (0.12 s and 0.15 s alike); test split 14.8 -> 10.9 % (docs/benchmarks.md).
    asr_short_pause_seconds: float = 0.15
    # TTS of several sentences: each spoken alone (the model learned to speak one sentence an utterance: five
    # held-out sentences in one go were heard at 98 % WER, one by one at 30 %, docs/benchmarks.md), with
    # ``sentence_pause_seconds`` of silence between them (rounded to whole codec frames); False = in one go
    tts_by_sentence: bool = True
    sentence_pause_seconds: float = 0.3
    # ... and a sentence longer than ``tts_max_words`` spoken words (the training texts have at most 13) in parts:
    # cut after its clause marks, else after a conjunction, else into even runs of words
    # (speechlm.training.textnorm.split_clauses), ``clause_pause_seconds`` apart. 0 = each sentence whole.
    # A conjunction after a clause mark ends its part ("..., and turn" -> "... and." / "Turn"). Long sentences (three
    # held-out ones joined by ", and ", 15-35 words), judge WER whole -> by clause: validation 203 -> 37 %, test
    # 96 -> 45 % (teacher 14 %; docs/benchmarks.md).
    tts_max_words: int = 14
    clause_pause_seconds: float = 0.12
    # TTS (``tts``, the speech of ``chat`` replies, the server's answer assist) speaks through the model's task
    # adapter of this name when it has one (trained on TTS alone, base frozen); None = the base model. The
    # shipped model has none: one trained on this CPU spoke worse (docs/benchmarks.md, "A TTS adapter")
    tts_adapter: str | None = "tts"
    # TTS (and the speech of chat replies) in this voice: "default" = the model's own (through its ``tts`` adapter when
    # it has one); another name = the model's voice adapter ``voice-NAME`` (LoRA trained on TTS alone in that voice,
    # base frozen; :meth:`SpeechPipeline.voices` lists them; docs/lm.md, "Voices")
    voice: str = DEFAULT_VOICE
    # TTS (and the speech of chat replies): speak the text this many times and keep the rendering the
    # pronunciation checker (speechlm.checker, ``checker``) hears as saying the text's phonemes most
    # clearly; candidate 1 is the speech as configured above, the others sample the group-first codebooks
    # (one per codec group) at ``candidate_temperature`` with seeds seed+1, seed+2, ..., all decoded as the
    # rows of one batch. Candidate 1 is kept unless another scores lower by more than ``candidate_margin``
    # (nats per phoneme): the checker hears most renderings as near perfect, and choosing among near ties
    # by its score alone made the judge's WER worse as often as better (docs/benchmarks.md). 1 = off (the
    # default). Needs the whole utterance before it can choose (no streaming) and espeak-ng for the text's phonemes.
    candidates: int = 1
    candidate_temperature: float = 0.4
    candidate_margin: float = 0.1
    checker: str = "checker-en"  # a checker directory or shipped name

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                        codebook_temperatures=self.codebook_temperatures)

    def text_sampling(self) -> Sampling:
        # Transcripts and answers: greedy (temperature 0) unless asked otherwise.
        return Sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=self.repetition_penalty)


class SpeechPipeline:
    def __init__(self, lm: SpeechLM, codec: Codec):
        if lm.config.num_codebooks != codec.config.codes_per_frame or lm.config.codebook_size != codec.config.codebook_size:
            raise SpeechLMError(
                f"the speech LM reads {lm.config.num_codebooks} x {lm.config.codebook_size} codes but the codec makes "
                f"{codec.config.codes_per_frame} x {codec.config.codebook_size}"
            )
        if lm.config.codec_id and lm.config.codec_id != codec.codec_id:
            raise SpeechLMError(f"the speech LM was trained on codec {lm.config.codec_id!r}, not {codec.codec_id!r}")
        self.lm, self.codec = lm.eval(), codec.eval()
        self.sample_rate = codec.sample_rate
        self._checkers: dict[str, PronunciationChecker] = {}
        self._detectors: dict[str, SpeechDetector] = {}
        self._lexicons: dict[str, Lexicon | None] = {}

    # -- files -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | os.PathLike, codec: str | os.PathLike | None = None, *, dtype: torch.dtype | None = torch.float32
    ) -> SpeechPipeline:
        """``dtype``: compute dtype of the LM (weights may be stored in bfloat16 to keep the package
        small); float32 (the default) is exact; bfloat16 is faster on CPUs with native bfloat16
        (AVX512-BF16, AMX: see :func:`fast_dtype`); None keeps the stored dtype."""
        path = resolve_model(path_or_name)
        lm = SpeechLM.from_pretrained(path, dtype=dtype)
        if codec is None:
            if (path / CODEC_DIR).is_dir():
                codec = path / CODEC_DIR
            elif (path / CODEC_REF).is_file():
                codec = json.loads((path / CODEC_REF).read_text())["codec"]
            else:
                raise SpeechLMError(f"{path} names no codec: add {CODEC_DIR}/ or {CODEC_REF}, or pass codec=")
        return cls(lm, Codec.from_pretrained(codec))

    def save_pretrained(self, directory: str | os.PathLike, codec_name: str | None = None) -> Path:
        """Save the LM and its codec (a copy in ``codec/``, or just its shipped name)."""
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        if codec_name:
            (directory / CODEC_REF).write_text(json.dumps({"codec": codec_name, "codec_id": self.codec.codec_id}))
        else:
            self.codec.save_pretrained(directory / CODEC_DIR)
        return directory

    # -- audio in ------------------------------------------------------------------------------

    def _frames(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Checked 16 kHz mono audio (T,) -> its codec frames (F, Q)."""
        return self.codec.encode(torch.from_numpy(self._checked(audio, sample_rate))[None])[0]

    def _checked(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if sample_rate != self.sample_rate:
            raise AudioError(f"audio must be {self.sample_rate} Hz, got {sample_rate} Hz (resample it, e.g. with speechlm.codec.audio.load_audio)")
        if audio.ndim != 1:
            raise AudioError(f"audio must be mono (T,), got shape {audio.shape}")
        if len(audio) < MIN_AUDIO_SECONDS * self.sample_rate:
            raise AudioError(f"audio too short: {len(audio) / self.sample_rate:.2f} s (at least {MIN_AUDIO_SECONDS} s)")
        if not np.all(np.isfinite(audio)):
            raise AudioError("audio holds NaN or infinite samples")
        return audio

    # -- tasks ---------------------------------------------------------------------------------

    def tts(self, text: str, *, stream: bool = False, generation: Generation | None = None) -> np.ndarray | Iterator[np.ndarray]:
        """Speak ``text``. ``stream=True`` returns an iterator of PCM chunks (float32, 16 kHz). Several
        sentences (and the clauses of a long one) are spoken one by one (:meth:`speech_parts`), silence between them."""
        g = generation or Generation()
        parts = self.speech_parts(text, g)
        if g.candidates > 1:
            if stream:
                raise SpeechLMError("choosing among TTS candidates needs each whole utterance: use stream=False (or candidates=1)")
            spoken = [self.best_speech(p, lambda gs, p=p: self.tts_batch([p] * len(gs), gs), g) for _, p in parts]
            return self._with_pauses(spoken, [pause for pause, _ in parts])
        if not stream:
            return self.tts_batch([text], g)[0]  # word-aligned: the codec decodes each part at once
        return self._stream_parts(parts, g)

    def speech_streams(self, generation: Generation | None = None) -> SpeechStreams:
        """Streaming TTS of many texts at once, each added whenever it comes (:mod:`speechlm.speech_streams`): a
        word-aligned model speaks them as rows of one running batch, others one stream per text in turn."""
        g = generation or Generation()
        return BatchedSpeechStreams(self, g) if self.lm.config.speech_layout == "word_aligned" else SpeechStreams(self, g)

    def speech_parts(self, text: str, g: Generation) -> list[tuple[int, str]]:
        """What TTS speaks alone, each part with the codec frames of silence before it: ``text``'s sentences
        (``Generation.tts_by_sentence``; ``sentence_pause_seconds`` apart), a sentence longer than
        ``tts_max_words`` spoken words in its clauses (``clause_pause_seconds`` apart); else (or with no
        sentence) the text, whole."""
        if len(text) > MAX_TTS_CHARS:
            raise SpeechLMError(f"text is {len(text)} characters long; TTS speaks at most {MAX_TTS_CHARS} at once "
                                "(about an hour of speech): give it in parts, e.g. one a line with speechlm tts --lines FILE")
        if g.tts_max_words < 0:
            raise SpeechLMError(f"tts_max_words must be >= 0, got {g.tts_max_words}")
        between = (self._pause_frames(g.sentence_pause_seconds, "sentence_pause_seconds"),
                   self._pause_frames(g.clause_pause_seconds, "clause_pause_seconds"))
        parts: list[tuple[int, str]] = []
        for sentence in (split_sentences(text) if g.tts_by_sentence else []) or [text]:
            clauses = split_clauses(sentence, g.tts_max_words) if g.tts_by_sentence else [sentence]
            for k, clause in enumerate(clauses):
                parts.append((between[k > 0] if parts else 0, clause))
        return parts

    def _pause_frames(self, seconds: float, name: str) -> int:
        """Codec frames of silence for a pause of ``seconds`` (the Generation field ``name``), rounded."""
        if seconds < 0:
            raise SpeechLMError(f"{name} must be >= 0, got {seconds}")
        return round(seconds * self.sample_rate / self.codec.config.frame_length)

    def _stream_parts(self, parts: list[tuple[int, str]], g: Generation) -> Iterator[np.ndarray]:
        pause = np.zeros(self.codec.config.frame_length, np.float32)
        for frames, text in parts:
            yield from (pause for _ in range(frames))
            yield from (pcm for _, pcm in self.tts_steps(text, g))

    def _with_pauses(self, audios: list[np.ndarray], pauses: list[int]) -> np.ndarray:
        """The parts' audio (T_k,) joined, ``pauses[k]`` codec frames of silence before part k."""
        frame = self.codec.config.frame_length
        return _join(x for a, frames in zip(audios, pauses) for x in (np.zeros(frames * frame, np.float32), a))

    def tts_batch(self, texts: list[str], generations: Generation | list[Generation] | None = None, max_rows: int = 16) -> list[np.ndarray]:
        """Speak several texts (or one text several ways: one generation per text) in one batch:
        a word-aligned model decodes their sentences as rows of batches of at most ``max_rows``
        (:meth:`speak_batch`); the audio (T_i,) of each, float32 at 16 kHz. The generations may differ
        in sampling and seed only."""
        gs = generations if isinstance(generations, list) else [generations or Generation()] * len(texts)
        if len(gs) != len(texts):
            raise SpeechLMError(f"{len(gs)} generations given for {len(texts)} texts")
        if not texts:
            return []
        if self.lm.config.speech_layout != "word_aligned":
            return [_join(self._stream_parts(self.speech_parts(t, gk), gk)) for t, gk in zip(texts, gs)]
        rows = [(i, pause, part) for i, (t, gk) in enumerate(zip(texts, gs)) for pause, part in self.speech_parts(t, gk)]
        spoken: list[np.ndarray] = []
        for k in range(0, len(rows), max_rows):
            part = rows[k : k + max_rows]
            prompts = [aligned_tts_prompt(self.lm, text) for _, _, text in part]
            spoken += self.speak_batch([ids for ids, _ in prompts], [None] * len(part), [chunks for _, chunks in prompts],
                                       [gs[i] for i, _, _ in part], adapter=self.tts_adapter(gs[0]))
        return [self._with_pauses([a for (j, _, _), a in zip(rows, spoken) if j == i], [p for j, p, _ in rows if j == i])
                for i in range(len(texts))]

    def speak_batch(
        self,
        prompts: list[list[int]],
        codes: list[torch.Tensor | None],
        chunks: list[list[list[int]]],
        generations: list[Generation],
        adapter: str | None = None,
    ) -> list[np.ndarray]:
        """Word-aligned speech of several rows in one batch (:func:`iter_aligned_audio_batch`): row i speaks
        the word chunks ``chunks[i]`` after ``prompts[i]`` (ending with ``<|speech_start|>``, its audio
        positions' codes ``codes[i]``) as ``generations[i]`` samples and seeds it; the rest of the
        decoding (guidance, MCTP schedule, length limits) is the first generation's, for every row.
        Returns each row's audio (T_i,), its frames decoded by the codec at the end."""
        g = generations[0]
        shared = ("guidance", "mctp_schedule", "max_seconds", "max_seconds_per_word")
        if any(getattr(gk, name) != getattr(g, name) for gk in generations for name in shared):
            raise SpeechLMError(f"the rows of one speech batch must share {', '.join(shared)}")
        frames: list[list[torch.Tensor]] = [[] for _ in prompts]
        with torch.inference_mode(), self.lm.adapter(adapter):
            steps = iter_aligned_audio_batch(
                self.lm, prompts, chunks, audio_codes=codes, sampling=[gk.sampling() for gk in generations],
                seed=[gk.seed for gk in generations], **self._speech_settings(g),
            )  # fmt: skip
            for step in steps:
                for row, new in zip(frames, step.frames):
                    row.append(new)
            size = self.codec.config.codebook_size - 1
            return [self.codec.decode(torch.cat(row)[None].clamp(max=size))[0].cpu().numpy() for row in frames]

    # -- choosing among renderings -------------------------------------------------------------

    def candidate_generations(self, g: Generation) -> list[Generation]:
        """The ``g.candidates`` ways of speaking one text (``Generation.candidates``): ``g`` itself, then
        the group-first codebooks sampled at ``g.candidate_temperature`` (seeds seed+1, seed+2, ...)."""
        if g.candidates < 1:
            raise SpeechLMError(f"candidates must be >= 1, got {g.candidates}")
        per_group = self.codec.config.num_quantizers
        temperatures = tuple(g.candidate_temperature if q % per_group == 0 else 0.0 for q in range(self.lm.config.num_codebooks))
        first = replace(g, candidates=1)
        seed = g.seed or 0
        return [first] + [replace(first, codebook_temperatures=temperatures, seed=seed + k) for k in range(1, g.candidates)]

    def speech_candidates(
        self, text: str, speak: Callable[[list[Generation]], list[np.ndarray]], g: Generation
    ) -> list[tuple[np.ndarray, float]]:
        """(audio (T,), checker score) for each candidate generation of ``text`` (``speak(generations)``
        makes their audio, e.g. as rows of one batch, :meth:`tts_batch`): :meth:`PronunciationChecker.score`,
        how far the text's phonemes fall short of what the checker hears best in that audio, in nats per
        phoneme (lower = clearer; ``inf`` = too short)."""
        audios = speak(self.candidate_generations(g))
        checker = self.checker(g.checker)
        phonemes = checker.text_phonemes(normalize_text(text.strip()))
        if not phonemes:
            return [(a, 0.0) for a in audios]
        scores = checker.score([a if len(a) else np.zeros(1, np.float32) for a in audios], phonemes)
        return list(zip(audios, scores))

    def best_speech(self, text: str, speak: Callable[[list[Generation]], list[np.ndarray]], g: Generation) -> np.ndarray:
        """The candidate of :meth:`speech_candidates` that :func:`choose_candidate` keeps."""
        candidates = self.speech_candidates(text, speak, g)
        return candidates[choose_candidate([score for _, score in candidates], g.candidate_margin)][0]

    def detector(self, name: str) -> SpeechDetector:
        """The speech detector ``name`` (a directory or shipped name), loaded once."""
        if name not in self._detectors:
            self._detectors[name] = SpeechDetector.from_pretrained(name)
        return self._detectors[name]

    def heard_speech(self, audios: list[np.ndarray], g: Generation) -> list[bool]:
        """Whether each checked 16 kHz audio (T_k,) holds speech to transcribe: not digital silence, and (with
        ``g.speech_detector``) speech for the detector, which hears it at the level the ASR does (peak-normalized
        to ``g.asr_level``): a quiet microphone's short word is speech too (at -50 dBFS as given, 33 of 40 held-out
        short words were heard, all 40 normalized; docs/benchmarks.md)."""
        sounding = [not is_silent(a) for a in audios]
        if g.speech_detector is None or not any(sounding):
            return sounding
        heard = [a for a, s in zip(audios, sounding) if s]
        found = iter(self.detector(g.speech_detector).has_speech(heard, level=g.asr_level or PEAK_LEVEL))
        return [s and next(found) for s in sounding]

    def asr_words(self, audio: np.ndarray, segments: list[Segment], sample_rate: int = SAMPLE_RATE,
                  generation: Generation | None = None) -> list[Word]:
        """Word timestamps of a transcript: each segment's text (:meth:`asr_segments`) aligned to its span of ``audio``
        (T,) by the pronunciation checker ``generation.checker`` (CTC forced alignment, :func:`speechlm.align.align_words`;
        needs espeak-ng for the words' phonemes). The words are the normalized transcript's (numbers spelled out); a
        segment that cannot be aligned (its text holds more phonemes than its audio can) gives its words its own span,
        shared out by their letters, ``aligned`` False."""
        from .align import AlignError, align_words

        audio = self._checked(audio, sample_rate)
        checker = self.checker((generation or Generation()).checker)
        words: list[Word] = []
        for seg in segments:
            if not seg.text.strip():
                continue
            a, b = int(seg.start * sample_rate), int(seg.end * sample_rate)
            try:
                aligned = align_words(audio[a:b], seg.text, checker).words
                words += [Word(w.word, round(seg.start + w.start, 3), round(seg.start + w.end, 3), True) for w in aligned]
            except AlignError as e:
                log.warning("segment %.2f-%.2f s not aligned (%s): its words share its span", seg.start, seg.end, e)
                tokens = spoken_words(normalize_text(seg.text))
                edges = np.cumsum([0, *(len(t) for t in tokens)]) / max(1, sum(len(t) for t in tokens))
                span = seg.end - seg.start
                words += [Word(t, round(seg.start + span * x, 3), round(seg.start + span * y, 3), False)
                          for t, x, y in zip(tokens, edges[:-1], edges[1:])]
        return words

    def tts_words(self, audio: np.ndarray, text: str, generation: Generation | None = None) -> list[Word]:
        """Where each word of ``text`` was said in ``audio``, the speech :meth:`tts` made of it (its pauses between
        sentences included): :meth:`asr_words` of the whole as one segment (for captions, or a face's lips)."""
        return self.asr_words(audio, [Segment(0.0, len(audio) / SAMPLE_RATE, text)], generation=generation)

    def checker(self, name: str) -> PronunciationChecker:
        """The pronunciation checker ``name`` (a directory or shipped name), loaded once."""
        if name not in self._checkers:
            self._checkers[name] = PronunciationChecker.from_pretrained(name)
        return self._checkers[name]

    def tts_steps(self, text: str, g: Generation) -> Iterator[tuple[AudioStep, np.ndarray]]:
        """``speak_steps`` for the TTS prompt of ``text`` (in the model's speech layout)."""
        adapter = self.tts_adapter(g)
        if self.lm.config.speech_layout == "word_aligned":
            ids, chunks = aligned_tts_prompt(self.lm, text)
            return self.speak_steps(ids, None, g, chunks, adapter=adapter)
        return self.speak_steps(tts_prompt(self.lm, text), None, g, adapter=adapter)

    def asr(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE, generation: Generation | None = None) -> str:
        """Transcribe 16 kHz mono audio; silence gives an empty transcript. A recording that pauses is heard
        piece by piece (:meth:`asr_segments`), the pieces' transcripts joined."""
        return " ".join(s.text for s in self.asr_segments(audio, sample_rate, generation) if s.text)

    def asr_segments(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE, generation: Generation | None = None,
                     progress: bool = False) -> list[Segment]:
        """Transcribe 16 kHz mono audio in segments: the pieces it is cut into at its pauses (the model
        transcribes one sentence at a time), each heard alone, with its time span in the audio. A recording
        longer than ``Generation.asr_piece_seconds`` is cut at every pause of ``asr_pause_seconds``; each such
        piece, or shorter audio as a whole, is heard whole and in two at its longest pause of
        ``asr_short_pause_seconds`` (each half likewise), and the pronunciation checker keeps what it hears
        better (:meth:`_heard_in_pieces`). Audio with no pause is one segment, the whole of it; silence, none.
        ``progress``: a progress bar over the pieces on stderr (a long recording)."""
        audio = self._checked(audio, sample_rate)
        g = generation or Generation()
        decoder = self._asr_decoder(g)
        if not self.heard_speech([audio], g)[0]:
            return []
        return self._segments(audio, sample_rate, decoder, g, progress)

    def _segments(self, audio: np.ndarray, sample_rate: int, decoder: str, g: Generation, progress: bool = False) -> list[Segment]:
        """:meth:`asr_segments` of checked audio in which speech was heard."""
        if g.asr_pause_seconds == 0:
            return [self._heard(audio, sample_rate, (0, len(audio)), decoder, g)]
        spans = [(0, len(audio))]
        if len(audio) > g.asr_piece_seconds * sample_rate:
            spans = self._sounding_pieces(audio, sample_rate, g.asr_pause_seconds, g.asr_piece_seconds) or spans
            spans = [span for span, speech in zip(spans, self.heard_speech([audio[a:b] for a, b in spans], g)) if speech]
        from tqdm import tqdm

        return [s for span in tqdm(spans, desc="asr", unit="piece", disable=not progress or len(spans) < 2, leave=False)
                for s in self._heard_in_pieces(audio, sample_rate, span, decoder, g)]

    def _sounding_pieces(self, audio: np.ndarray, sample_rate: int, pause_s: float, max_seconds: float | None = None) -> list[tuple[int, int]]:
        """:func:`split_at_pauses` of ``audio`` (T,), pieces too short to hear left out; ``max_seconds`` None:
        cut at the pauses only."""
        max_seconds = max_seconds or len(audio) / sample_rate + 1.0
        pieces = split_at_pauses(audio, sample_rate, pause_s=pause_s, max_seconds=max_seconds)
        return [(a, b) for a, b in pieces if b - a >= MIN_AUDIO_SECONDS * sample_rate]

    def _heard(self, audio: np.ndarray, sample_rate: int, span: tuple[int, int], decoder: str, g: Generation) -> Segment:
        a, b = span
        return Segment(round(a / sample_rate, 3), round(b / sample_rate, 3), self._asr_piece(audio[a:b], sample_rate, decoder, g))

    def _heard_in_pieces(self, audio: np.ndarray, sample_rate: int, span: tuple[int, int], decoder: str, g: Generation,
                         pieces: list[tuple[int, int]] | None = None, depth: int = 0) -> list[Segment]:
        """``audio[span]`` heard whole, and (when it pauses) in two at its longest pause, each half heard the same
        way (at most ``MAX_SPLIT_DEPTH`` times over: a bound on the hearings); the checker keeps the whole
        transcript or the halves' (a sentence that pauses inside may be heard worse in fragments, two sentences
        in one piece come out as one invented sentence). ``pieces``: the span's :func:`split_at_pauses` pieces
        at ``asr_short_pause_seconds`` (absolute sample positions)."""
        whole = self._heard(audio, sample_rate, span, decoder, g)
        if pieces is None:
            a = span[0]
            pause = g.asr_short_pause_seconds or g.asr_pause_seconds
            pieces = [(a + x, a + y) for x, y in self._sounding_pieces(audio[span[0] : span[1]], sample_rate, pause)]
        if len(pieces) < 2 or depth >= MAX_SPLIT_DEPTH:
            return [whole]
        cut = 1 + int(np.argmax([b[0] - a[1] for a, b in zip(pieces, pieces[1:])]))
        halves = [pieces[:cut], pieces[cut:]]
        parts = [s for half in halves
                 for s in self._heard_in_pieces(audio, sample_rate, (half[0][0], half[-1][1]), decoder, g, half, depth + 1)]
        clip = audio[span[0] : span[1]]
        return [whole] if self._sounds_more_like(clip, whole.text, " ".join(s.text for s in parts), g) else parts

    def _asr_decoder(self, g: Generation) -> str:
        """``g``'s ASR decoder ("lm" or "ctc"; "auto" resolved), its settings checked."""
        decoder = g.asr_decoder
        if decoder == "auto":
            decoder = "ctc" if self.lm.hearing is not None else "lm"
        if decoder not in ("lm", "ctc"):
            raise SpeechLMError(f"unknown asr decoder {decoder!r}; choose from lm, ctc, auto")
        if decoder == "ctc":
            self.lm._hearing_head()  # a model without one: its one-line error before any audio is heard
        if decoder == "lm" and g.asr_views < 1:
            raise SpeechLMError(f"asr_views must be >= 1, got {g.asr_views}")
        if g.asr_check_rounds < 0:
            raise SpeechLMError(f"asr_check_rounds must be >= 0, got {g.asr_check_rounds}")
        if g.asr_check_shortlist < 1:
            raise SpeechLMError(f"asr_check_shortlist must be >= 1, got {g.asr_check_shortlist}")
        if g.asr_pause_seconds < 0 or g.asr_short_pause_seconds < 0 or g.asr_piece_seconds <= 0:
            raise SpeechLMError("asr_pause_seconds and asr_short_pause_seconds must be >= 0 and asr_piece_seconds > 0, got "
                                f"{g.asr_pause_seconds}, {g.asr_short_pause_seconds}, {g.asr_piece_seconds}")
        return decoder

    def _sounds_more_like(self, audio: np.ndarray, first: str, second: str, g: Generation) -> bool:
        """Whether the pronunciation checker ``g.checker`` hears ``first`` in ``audio`` (T,) at least as well as
        ``second`` (CTC NLL of their phonemes); without espeak-ng to say them, False."""
        checker = self.checker(g.checker)
        try:
            phonemes = [checker.text_phonemes(normalize_text(t)) if t.strip() else [] for t in (first, second)]
        except DependencyError as e:
            log.warning("whole or in pieces not compared: %s", e)
            return False
        if not phonemes[0]:
            return False
        if not phonemes[1]:
            return True
        nll = checker.sequence_nll(checker.log_probs(audio), phonemes)
        return nll[0] <= nll[1]

    def _asr_piece(self, audio: np.ndarray, sample_rate: int, decoder: str, g: Generation) -> str:
        """One piece of audio (checked by :meth:`asr`) -> its transcript."""
        with self.lm.adapter(self.asr_adapter(g)):
            if decoder == "ctc":
                return self.lm.tokenizer.decode(self.lm.hear(self._frames(audio, sample_rate)), skip_special_tokens=True).strip()
            return self.transcribe_views(self._views(audio, sample_rate, g), g)

    def _views(self, audio: np.ndarray, sample_rate: int, g: Generation) -> list[np.ndarray]:
        """The views the LM decoder hears of one piece of audio (its quiet edges trimmed first with ``asr_edges``)."""
        if g.asr_edges:
            audio = hearing_audio(audio, sample_rate)
        return listening_views(audio, g.asr_views, g.asr_level, g.asr_view_kind, self.codec.config.frame_length)

    def asr_adapter(self, generation: Generation | None = None) -> str | None:
        """The task adapter ASR hears through: ``generation.asr_adapter`` if this model has it, else None."""
        return self._own_adapter((generation or Generation()).asr_adapter)

    def tts_adapter(self, generation: Generation | None = None) -> str | None:
        """The adapter TTS speaks through: the voice's for a voice other than the default (an error when this
        model has no such voice), else ``generation.tts_adapter`` if this model has it, else None."""
        g = generation or Generation()
        return self._own_adapter(g.tts_adapter) if g.voice == DEFAULT_VOICE else self.voice_adapter(g.voice)

    def voices(self) -> dict[str, str]:
        """The voices this model speaks (``Generation.voice``): name -> what its adapter was trained on."""
        own = {name[len(VOICE_PREFIX) :]: lora.config.description for name, lora in self.lm.adapters.items() if name.startswith(VOICE_PREFIX)}
        return {DEFAULT_VOICE: "the model's own voice", **own}

    def voice_adapter(self, voice: str) -> str:
        """The adapter of ``voice`` (not the default), or a one-line error naming the voices there are."""
        if VOICE_PREFIX + voice not in self.lm.adapters:
            raise SpeechLMError(f"this model has no voice {voice!r}; it speaks: {', '.join(self.voices())}")
        return VOICE_PREFIX + voice

    def _own_adapter(self, name: str | None) -> str | None:
        return name if name in self.lm.adapters else None

    def transcribe_views(self, views: list[np.ndarray], generation: Generation | None = None) -> str:
        """One transcript from views (T_k,) of one utterance (16 kHz, checked by :meth:`asr`), by the
        LM decoder: one view = greedy decoding, several = :func:`speechlm.lm.ensemble.ensemble_transcribe_groups`."""
        return self._transcribe_groups([views], generation or Generation())[0]

    def _transcribe_groups(self, groups: list[list[np.ndarray]], g: Generation) -> list[str]:
        """The transcripts of several utterances, ``groups[u]`` the views of utterance u, as the rows of one
        batch (each what it gets alone, up to the float rounding of batched arithmetic); with ``asr_check_rounds``
        each is then checked against its first view's sounds (:meth:`check_transcript`, on its rows of the batch's
        prefill)."""
        v = self.lm.vocab
        # A transcript is text only: a speech token (the model starting to speak) ends it.
        stops = [v.eos, v.end_of_turn, v.speech_start, v.speech_end, v.audio]
        prompts = [asr_prompt(self.lm, self.codec.encode(torch.from_numpy(np.asarray(view, np.float32))[None])[0]) for views in groups for view in views]
        batch = PromptBatch.build(self.lm, [ids for ids, _ in prompts], [codes for _, codes in prompts])
        starts = np.cumsum([0] + [len(views) for views in groups])
        rows = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
        single = all(len(r) == 1 for r in rows)
        prefilled = prefill(self.lm, batch) if not single or g.asr_check_rounds > 0 else None  # run once: for the ensemble and the check
        if single:  # one view each: greedy decoding
            outs = text_generate(self.lm, batch, max_new_tokens=g.max_text_tokens, sampling=g.text_sampling(), stop_tokens=stops, seed=g.seed)
        else:
            outs = ensemble_transcribe_groups(self.lm, batch, rows, max_new_tokens=g.max_text_tokens, stop_tokens=stops, rescore=g.asr_rescore,
                                              prefilled=prefilled)  # fmt: skip
        texts = [self.lm.tokenizer.decode(out, skip_special_tokens=True).strip() for out in outs]
        if g.asr_check_rounds > 0:
            for u, (views, r) in enumerate(zip(groups, rows)):
                if texts[u]:
                    prompt, ran = (batch, prefilled) if len(groups) == 1 else _batch_rows(batch, prefilled, r)
                    texts[u] = self.check_transcript(texts[u], views[0], prompt, g, ran)
        return texts

    def asr_many(self, audios: list[np.ndarray], sample_rate: int = SAMPLE_RATE, generation: Generation | None = None) -> list[str]:
        """:meth:`asr` of several recordings (a server's questions, a folder of files): each transcript is what
        ``asr`` gives it, the recordings heard together where they can be (:meth:`asr_segments_many`)."""
        return [" ".join(s.text for s in segments if s.text) for segments in self.asr_segments_many(audios, sample_rate, generation)]

    def asr_segments_many(self, audios: list[np.ndarray], sample_rate: int = SAMPLE_RATE, generation: Generation | None = None) -> list[list[Segment]]:
        """:meth:`asr_segments` of several recordings. Those heard in one piece by the LM decoder (a question, a
        sentence) are heard as the rows of one batch — their views prefilled together, one forward per decoding
        step for all, then each transcript checked on its own; the others one by one."""
        g = generation or Generation()
        decoder = self._asr_decoder(g)
        out: list[list[Segment]] = [[] for _ in audios]
        together: list[tuple[int, np.ndarray]] = []
        audios = [self._checked(audio, sample_rate) for audio in audios]
        for i, (audio, speech) in enumerate(zip(audios, self.heard_speech(audios, g))):
            if not speech:
                continue
            if decoder == "lm" and self._one_piece(audio, sample_rate, g):
                together.append((i, audio))
            else:
                out[i] = self._segments(audio, sample_rate, decoder, g)
        if together:
            with self.lm.adapter(self.asr_adapter(g)):
                texts = self._transcribe_groups([self._views(audio, sample_rate, g) for _, audio in together], g)
            for (i, audio), text in zip(together, texts):
                out[i] = [Segment(0.0, round(len(audio) / sample_rate, 3), text)]
        return out

    def _one_piece(self, audio: np.ndarray, sample_rate: int, g: Generation) -> bool:
        """Whether :meth:`asr_segments` hears ``audio`` (checked, not silent) whole and only whole: no pause
        to cut it at (or ``asr_pause_seconds`` 0), and no longer than a piece."""
        if g.asr_pause_seconds == 0:
            return True
        if len(audio) > g.asr_piece_seconds * sample_rate:
            return False
        return len(self._sounding_pieces(audio, sample_rate, g.asr_short_pause_seconds or g.asr_pause_seconds)) < 2

    def check_transcript(self, transcript: str, audio: np.ndarray, prompt: PromptBatch, g: Generation,
                         prefilled: Prefilled | None = None) -> str:
        """``transcript`` after :func:`speechlm.transcript_check.check_transcript` against ``audio`` (T,)
        (16 kHz) with the checker ``g.checker`` and its lexicon; the LM term from the ASR ``prompt``'s views
        (``prefilled``: :func:`speechlm.lm.ensemble.prefill` of it, if run already).
        Unchecked (a warning logged) when the checker has no lexicon, or a word needs espeak-ng and it is missing."""
        lexicon = self.lexicon(g.checker)
        if lexicon is None:
            return transcript
        checker = self.checker(g.checker)
        log_probs = checker.log_probs(audio)
        score = transcript_log_probs(self.lm, prompt, prefilled)

        def lm_log_prob(texts: list[str]) -> list[float]:
            return score([self.lm.tokenizer.encode(t, add_special_tokens=False) for t in texts]).tolist()

        try:
            return check_transcript(
                transcript, lexicon, lambda phs: checker.sequence_nll(log_probs, phs), lm_log_prob,
                lambda word: text_phonemes(word, lexicon.voice), best_path_nll=checker.best_path_nll(log_probs),
                heard_phonemes=checker.count_heard(log_probs), lm_weight=g.asr_check_weight, rounds=g.asr_check_rounds,
                shortlist=g.asr_check_shortlist,
                acoustic_edits=lambda ref, splices: checker.edit_nlls(log_probs, ref, splices))
        except DependencyError as e:  # a word outside the lexicon and no espeak-ng to say its phonemes
            log.warning("transcript not checked: %s", e)
            return transcript

    def lexicon(self, checker: str) -> Lexicon | None:
        """The lexicon beside the checker ``checker`` (its directory's ``lexicon.json``), loaded once; None
        (a warning logged once) if it has none."""
        if checker not in self._lexicons:
            path = resolve_model(checker) / LEXICON_FILE
            self._lexicons[checker] = Lexicon.load(path) if path.is_file() else None
            if self._lexicons[checker] is None:
                log.warning("the checker %s has no %s: transcripts are not checked (speechlm data lexicon)", checker, LEXICON_FILE)
        return self._lexicons[checker]

    def chat(self, question: np.ndarray | str, sample_rate: int = SAMPLE_RATE, generation: Generation | None = None) -> tuple[str, np.ndarray]:
        """One turn: a spoken (16 kHz audio) or typed question -> (reply text, reply speech)."""
        g = generation or Generation()
        if g.reply_speech not in ("chat", "tts"):
            raise SpeechLMError(f"unknown reply_speech {g.reply_speech!r}; choose chat or tts")
        if isinstance(question, str):
            ids, codes = chat_prompt(self.lm, question)
        else:
            frames = self._frames(question, sample_rate)
            if g.transcribe_first:  # asr hears nothing in silence, or noise without speech
                heard = self.asr(question, sample_rate, g)
                return self.chat(heard, generation=g) if heard else ("", np.zeros(0, np.float32))
            if not self.heard_speech([self._checked(question, sample_rate)], g)[0]:
                return "", np.zeros(0, np.float32)
            ids, codes = chat_prompt(self.lm, frames)
        reply = self._reply_ids([(ids, codes)], g)[0]
        text = self.lm.tokenizer.decode(reply, skip_special_tokens=True).strip()
        if not text:
            return "", np.zeros(0, np.float32)
        if g.reply_speech == "tts" or len(self.speech_parts(text, g)) > 1:  # several sentences: spoken one by one, as TTS
            return text, (self.tts(text, generation=g) if word_chunks(text) else np.zeros(0, np.float32))  # nothing speakable: silence
        chunks = None
        if self.lm.config.speech_layout == "word_aligned":
            chunks = chunk_ids(self.lm.tokenizer, word_chunks(text))
            if not chunks:  # nothing speakable (e.g. only punctuation)
                return text, np.zeros(0, np.float32)
        prefix = [*ids, *reply, self.lm.vocab.speech_start]

        def speak(gs: list[Generation]) -> list[np.ndarray]:
            if chunks is not None:  # word-aligned: the renderings are rows of one batch
                return self.speak_batch([prefix] * len(gs), [codes] * len(gs), [chunks] * len(gs), gs, adapter=self.tts_adapter(g))
            return [_join(pcm for _, pcm in self.speak_steps(prefix, codes, gk, None, adapter=self.tts_adapter(gk))) for gk in gs]

        return text, (self.best_speech(text, speak, g) if g.candidates > 1 else speak([g])[0])

    def reply_text(self, question: str, generation: Generation | None = None) -> str:
        """The text of the model's reply to a typed question (what :meth:`chat` would say, unspoken)."""
        return self.reply_texts([question], generation)[0]

    def reply_texts(self, questions: list[str], generation: Generation | None = None) -> list[str]:
        """:meth:`reply_text` of several questions as the rows of one batch (greedy: each what it gets alone,
        up to the float rounding of batched arithmetic); an empty question gets an empty reply."""
        g = generation or Generation()
        asked = [i for i, q in enumerate(questions) if q.strip()]
        replies = self._reply_ids([chat_prompt(self.lm, questions[i]) for i in asked], g) if asked else []
        out = [""] * len(questions)
        for i, ids in zip(asked, replies):
            out[i] = self.lm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return out

    def _reply_ids(self, prompts: list[tuple[list[int], torch.Tensor | None]], g: Generation) -> list[list[int]]:
        """The reply's text ids after each chat prompt (ids, codes of its audio positions), as rows of one batch."""
        v = self.lm.vocab
        return text_generate(self.lm, [ids for ids, _ in prompts], audio_codes=[codes for _, codes in prompts], max_new_tokens=g.max_text_tokens,
                             sampling=g.text_sampling(), stop_tokens=[v.speech_start, v.end_of_turn, v.eos], seed=g.seed)  # fmt: skip

    def _speech_settings(self, g: Generation) -> dict:
        """The decoding settings every row of a speech decoding shares: length limits in frames, the MCTP
        schedule, and guidance against the speech without its text."""
        frame_rate, v = self.lm.config.frame_rate, self.lm.vocab
        return dict(
            max_frames=max(1, int(g.max_seconds * frame_rate)), max_frames_per_chunk=max(1, int(g.max_seconds_per_word * frame_rate)),
            schedule=g.mctp_schedule, guidance=g.guidance, unconditional_prompt=[v.bos, v.tasks["<|tts|>"], v.speech_start],
        )  # fmt: skip

    def speak_steps(
        self, ids: list[int], codes: torch.Tensor | None, g: Generation, chunks: list[list[int]] | None = None,
        adapter: str | None = None,
    ) -> Iterator[tuple[AudioStep, np.ndarray]]:
        """Generate the speech after ``ids`` (ending with ``<|speech_start|>``) and decode it frame by
        frame: yields (the LM's step, that frame's PCM (T,)), one per audio frame, so a caller can
        see how many backbone forwards each frame took. ``chunks``: the word chunks' ids to speak
        one by one (word-aligned models); None = one plain speech segment. ``adapter``: the task
        adapter the LM's forwards add (None: the base model); it is on only while a step computes,
        never while this generator waits between yields (the caller's own forwards stay its own)."""
        state = self.codec.init_state(1)
        settings = self._speech_settings(g)
        with torch.inference_mode():
            if chunks is None:
                settings.pop("max_frames_per_chunk")
                steps = iter_audio(self.lm, ids, audio_codes=[codes], sampling=g.sampling(), seed=g.seed, per_position=True, **settings)
            else:
                steps = iter_aligned_audio(self.lm, ids, chunks, audio_codes=codes, sampling=g.sampling(), seed=g.seed, **settings)
            while True:
                with self.lm.adapter(adapter):
                    step = next(steps, None)
                if step is None:
                    break
                for frame in step.frames[0]:
                    pcm, state = self.codec.decode_step(frame[None].clamp(max=self.codec.config.codebook_size - 1), state)
                    yield step, pcm[0].cpu().numpy()


def _batch_rows(batch: PromptBatch, prefilled: Prefilled, rows: list[int]) -> tuple[PromptBatch, Prefilled]:
    """Rows ``rows`` of a prompt batch and of its prefill (first-token log-probabilities, cache, mask, last positions)."""
    index = torch.tensor(rows, device=batch.input_ids.device)
    own = PromptBatch(batch.input_ids[index], batch.audio_codes[index], batch.audio_mask[index], batch.attention_mask[index])
    return own, prefilled_rows(prefilled, rows)


def choose_candidate(scores: list[float], margin: float = 0.0) -> int:
    """The index of the candidate to keep, given the checker's scores (lower = clearer): the first (the
    configured decoding) unless another scores lower by more than ``margin``; then the lowest (the
    earliest on ties)."""
    if not scores:
        raise SpeechLMError("no candidates to choose from")
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best if scores[best] < scores[0] - margin else 0


@dataclass
class Segment:
    """A piece of a transcribed recording: its span in the audio (seconds) and what was heard there."""

    start: float
    end: float
    text: str


@dataclass
class Word:
    """A word of a transcript and its span in the audio (seconds; :meth:`SpeechPipeline.asr_words`)."""

    word: str
    start: float
    end: float
    aligned: bool = True  # False: its segment could not be aligned, the span is its share of the segment's


# The levels of the views ASR listens to, relative to the training level (the first is the audio
# itself at that level); a view's level changes the codec's codes, not the words.
VIEW_GAINS = (1.0, 0.5, 1.4, 0.7, 2.0, 0.35, 1.2, 0.85)


VIEW_KINDS = ("level", "lead")


def listening_views(audio: np.ndarray, count: int, level: float | None = PEAK_LEVEL, kind: str = "level",
                    frame_length: int = 640) -> list[np.ndarray]:
    """``count`` views (T_k,) of ``audio`` (T,) for ASR: the audio peak-normalized to ``level``, the level
    the speech LM was trained on (its teachers' speech is peak-normalized to ``PEAK_LEVEL``: a quiet
    microphone is then heard as well as a loud one; None = as given), then (``kind="level"``) at the other
    ``VIEW_GAINS``, cycled, or (``kind="lead"``) after k * frame_length / count samples of silence, k = 1 ..
    count - 1: the codec's frame grid (``frame_length`` samples) falls at ``count`` places in the sound."""
    if kind not in VIEW_KINDS:
        raise SpeechLMError(f"unknown asr view kind {kind!r}; choose from {', '.join(VIEW_KINDS)}")
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    leveled = (audio * (level / peak) if level is not None and peak > 1e-6 else audio).astype(np.float32)
    if kind == "lead":
        return [np.concatenate([np.zeros(k * frame_length // count, np.float32), leveled]) for k in range(count)]
    return [(leveled * VIEW_GAINS[i % len(VIEW_GAINS)]).astype(np.float32) for i in range(count)]


def hearing_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, *, max_lead_s: float = 0.06) -> np.ndarray:
    """What ASR hears of ``audio`` (T,): a recording that starts with more than ``max_lead_s`` of quiet
    (silence, or a room's steady noise) has that noise suppressed (:func:`speechlm.denoise.spectral_denoise`,
    the room heard in the quiet before and after the speech) and its quiet edges cut short
    (:func:`speechlm.codec.audio.trim_quiet_edges`); audio that starts at once comes back as it was."""
    span = sound_span(audio, sample_rate)
    if span is None:
        return audio
    if span[0] <= max_lead_s * sample_rate:
        return trim_quiet_edges(audio, sample_rate, max_lead_s=max_lead_s, span=span)
    start, end = span
    audio = spectral_denoise(audio, np.concatenate([audio[:start], audio[end:]]))
    return trim_quiet_edges(audio, sample_rate, max_lead_s=max_lead_s)


def _join(chunks: Iterator[np.ndarray]) -> np.ndarray:
    parts = list(chunks)
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def fast_dtype(device: str = "cpu") -> torch.dtype:
    """The faster compute dtype for the speech LM here: bfloat16 on a CPU with native bfloat16 (the
    decoding reads its weights once per frame, so halving them pays: TTS 1.4x faster with the same
    judge WER and ASR on this project's AVX512-BF16 CPU, docs/benchmarks.md) and on CUDA; else float32."""
    if device.startswith("cuda"):
        return torch.bfloat16
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    native = any(bool(f()) for f in (check, amx) if f is not None)
    return torch.bfloat16 if native else torch.float32


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``--dtype NAME`` on ``device``: ``auto`` = :func:`fast_dtype`, else that torch dtype (float32, bfloat16)."""
    return fast_dtype(device) if name == "auto" else getattr(torch, name)


def resolve_model(path_or_name: str | os.PathLike) -> Path:
    """A model directory, or the directory of a model shipped in ``speechlm/models`` by that name."""
    p = Path(path_or_name)
    if p.is_dir():
        return p
    import importlib.resources

    shipped = Path(str(importlib.resources.files("speechlm") / "models" / str(path_or_name)))
    if shipped.is_dir():
        return shipped
    raise SpeechLMError(f"speech model not found: {path_or_name} (a directory, or a model shipped in speechlm/models)")
