"""Answer assist: the duplex model decides *when* to speak, the speech LM decides *what* (and says it).

The duplex model alone takes its turn about 200 ms after the user stops, stays quiet while the user
talks and stops when interrupted, but it hears questions too poorly to answer them, and its voice
says words the judge cannot make out (docs/benchmarks.md). The speech LM under it hears better in
its ASR task, answers typed questions well and speaks more clearly. This wrapper joins the two,
one session per row, behind the same batched step the server drives::

    every tick      user frame -> the row's "heard" buffer (the user's audio since the last plan)
    the user quiet for plan_quiet_frames -> the plan: speech LM ASR of the heard audio (trimmed to its
                    voiced part) -> its text reply -> the reply's words (numbers spelled out); dropped
                    if the user goes on talking (with the gate's speech detector: once it hears speech in the
                    new sound; a sound it rules out, a key click, leaves the plan and the question as they were)
    the duplex model samples its text token; before its audio is chosen (DuplexLM.step's text_filter):
      · no turn yet         -> pad; but a word (now, or since the user's last sound) with the user quiet
                               for talk_frames and the plan ready: the turn starts with the plan's first word
      · mid-word            -> the planned word's next piece (a word's pieces fill consecutive frames)
      · pad                 -> pad (the model decides when words start); but with words of the plan
                               left, the user quiet and the model fallen silent -> the next planned word
                               (its own sense of a reply's length is not the plan's)
      · a word, in a turn   -> the plan's next word; pad once the plan is said

Whose voice says the plan (``AssistConfig.voice``):

* ``"speech_lm"`` (default): the speech LM's streaming TTS of the reply, frame by frame from the
  turn's first frame; the duplex model's own audio is not played. It yields like the duplex model:
  the rest of the reply is dropped when the duplex model falls silent while the user talks. With
  nothing to answer (nothing voiced, or the ASR hears nothing) there is no turn and no sound, and
  the duplex model's words over the user (backchannels) are not said.
* ``"duplex"``: the duplex model's audio head reads the plan as its inner monologue (one voice,
  one model speaking); with nothing to answer the model says its own words.

The turn ends when the output has been silent for ``end_frames`` frames (the reply is said, or the
model yielded): what is left of the plan is dropped and the next heard audio is the next question.
The user's transcript goes out with the turn's first piece of model text (``{"model": ..., "user": ...}``).

Cost: per turn, one speech LM prefill of the question and ~10-20 decode steps for the transcript and
the reply (~0.13 s on one CPU thread), and with the ``speech_lm`` voice the reply's TTS (MCTP: about a
fifth of real time on one CPU thread). ``background=True`` (the server) runs it on one thread of its
own, batched across sessions: the questions waiting at once are heard and answered as the rows of one
batch (``SpeechPipeline.asr_many``, ``reply_texts``), and the replies' speech, every session's, as the
rows of one running batch that each reply joins when its text is written and leaves when it is said
or dropped (``SpeechPipeline.speech_streams``: one forward per step for all of them); otherwise inside
the tick (the offline benchmark, tests).

    model = AssistedDuplexModel(DuplexSpeechModel.from_pretrained("duplex-default", "codec-16k"),
                                SpeechPipeline.from_pretrained("speechlm-default"))
    pcm, texts, state = model.step(user_pcm, state)      # the DuplexModel contract
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..codec.errors import SpeechLMError
from ..speech import Generation, SpeechPipeline
from ..speech_streams import SpeechStreams
from ..training.textnorm import normalize_text, word_spans
from .duplex_model import DuplexSpeechModel, DuplexSpeechState
from .gate import GateConfig
from .models import TextPiece
from .protocol import MAX_CHECK_ROUNDS
from .window import TimedWindow

log = logging.getLogger(__name__)

# The speech LM's side: greedy (repeatable), short; a reply of several sentences pauses 160 ms between them
# (4 frames: well inside AssistConfig.end_frames, the silence that ends the turn). A question is heard in pieces
# at its long pauses only: hearing it whole and in two at a short one (a comma) would delay the reply's onset.
ASSIST_GENERATION = Generation(max_text_tokens=48, sentence_pause_seconds=0.16, asr_short_pause_seconds=0.0)
VOICES = ("speech_lm", "duplex")
REPLIES = ("model", "client")  # who writes a session's replies: the speech LM, or the session's client (``say``)


@dataclass
class AssistConfig:
    max_question_seconds: float = 15.0  # the heard buffer keeps the user's last this many seconds
    end_frames: int = 10  # silent frames after speech that end the model's turn (10 = 0.4 s at 25 Hz)
    # A heard frame is speech when its RMS passes the row's speech gate (used for the user talking, the
    # pause of a reply talked over, the question's trimming; speechlm.streaming.gate, these are its
    # GateConfig's fields): voiced_rms (about -40 dBFS), or lower for a quiet microphone in a quiet
    # room: voiced_share of the user's speech level (a decaying maximum of their frames' RMS, halving in
    # level_half_life_s), but at least noise_margin times the noise floor (a minimum of the frames' RMS
    # that doubles at most every noise_rise_s; digital silence aside) and min_voiced_rms (about -50 dBFS).
    voiced_rms: float = GateConfig.voiced_rms
    voiced_share: float = GateConfig.voiced_share
    noise_margin: float = GateConfig.noise_margin
    min_voiced_rms: float = GateConfig.min_voiced_rms
    level_half_life_s: float = GateConfig.level_half_life_s
    noise_rise_s: float = GateConfig.noise_rise_s
    # the duplex model hears the user through a noise gate: once the user has been quiet talk_frames
    # frames (by the gate above), their frames reach it as digital silence until they speak again (it
    # was trained on dialogues whose pauses are digital silence: with a -60 dBFS room under them it
    # took 1 turn in 20, docs/benchmarks.md); the speech LM hears the question as it was
    noise_gate: bool = True
    margin_frames: int = 3  # frames of context kept around the voiced part of the question
    talk_frames: int = GateConfig.talk_frames  # the user is talking if one of their last this many frames is speech
    # with the duplex model's speech detector (DuplexSpeechModel.speech_detector): a sound over the gate is speech for
    # its first onset_frames (none within doubt_frames of a sound the detector ruled out: typing), then only while
    # the detector hears speech in it (and the question is trimmed to those)
    onset_frames: int = GateConfig.onset_frames
    doubt_frames: int = GateConfig.doubt_frames
    mute_ruled_out: bool = GateConfig.mute_ruled_out  # such a frame reaches the duplex model as digital silence
    # whose voice says the plan: "speech_lm" = the speech LM's streaming TTS (the duplex model's own
    # audio is not played; it still decides when the turn starts and when it yields to the user);
    # "duplex" = the duplex model's audio head, reading the plan as its inner monologue
    voice: str = "speech_lm"
    # voice "speech_lm": its TTS speaks in this of the speech LM's voices (``Generation.voice``: "default" = its own,
    # another = its voice adapter ``voice-NAME``)
    tts_voice: str = "default"
    # voice "speech_lm", talking over the reply: the reply pauses when the duplex model falls silent
    # while the user talks, or once the user has talked barge_frames frames in a row (0 = only the
    # former). A sound over the reply no longer than backchannel_frames, then quiet, resumes it
    # ("mm-hm"); a longer one is an interruption: the rest of the reply is dropped (if it holds speech: see
    # speech_detector).
    barge_frames: int = 5
    backchannel_frames: int = 15
    # plan the reply as soon as the user has been quiet for plan_quiet_frames (the duplex model
    # takes its turn a few frames later, after talk_frames of quiet at the earliest: the plan is
    # ready sooner); False = once the duplex model wants to speak. A plan made during a pause in
    # mid-question is dropped when the user goes on.
    plan_early: bool = True
    plan_quiet_frames: int = 1
    # the speech LM works on its own thread (the server: ticks stay on time while a turn is planned
    # and spoken); False = inside the tick (repeatable: the offline benchmark and tests)
    background: bool = False
    # on that thread a question waiting to be heard goes before the rest of the replies' speech once every
    # reply being spoken is this many frames ahead of its playback (their speech then continues after the
    # plan: the reply starts sooner, and the others go on from their buffers; 0 = the replies' speech is made
    # whole first)
    ahead_frames: int = 8
    # the replies' speech on that thread: every session's as rows of one running batch (``SpeechPipeline.speech_streams``;
    # a reply joins at the batch's next step); False = one TTS stream per reply, each making a frame in turn
    batched_speech: bool = True
    # the speech LM hears the question from this many views of its audio (``Generation.asr_views``,
    # speechlm.lm.ensemble): on 80 held-out-voice utterances 1 view 23 % WER, 2 views 19 %, 4 views 15 %;
    # 2 (with plan_quiet_frames 1) keep the reply's onset through the server about where 1 view had it
    # (docs/benchmarks.md), 4 cost ~40 ms more on this CPU
    asr_views: int = 2
    # the reply's speech: classifier-free guidance on its text (``Generation.guidance``); None = the Generation's
    guidance: float | None = None
    # the speech LM hears the question through its task adapter of this name when it has one
    # (``Generation.asr_adapter``: speechlm-default's ASR adapter); None = the base model
    asr_adapter: str | None = "asr"
    # one-word edits of the question's transcript checked against its sounds (``Generation.asr_check_rounds``,
    # speechlm.transcript_check); 0 (off) by default here: on 40 held-out spoken questions 3 rounds got 34 transcripts
    # exactly right instead of 20 but took the ASR from 0.14 to 0.40 s on one CPU thread (p90 0.20 -> 0.84 s; 1 round:
    # 29, 0.27 s), past the reply's onset budget (``speechlm serve --assist-check-rounds 3`` turns it on)
    asr_check_rounds: int = 0
    # a question in which this speech detector (speechlm.vad; ``Generation.speech_detector``) hears no speech is not
    # heard: no transcript, no turn (the speech LM transcribed a fan's noise as a sentence, and the reply answered it;
    # docs/benchmarks.md); and a sound over the reply longer than backchannel_frames without speech holds the reply
    # (paused) instead of dropping it. None = any sound over the gate is a question, and an interruption
    speech_detector: str | None = "vad-en"
    # the question's ASR and the reply's text read the speech LM's backbone weights as int8 in products of at
    # most this many rows (speechlm.lm.int8, bfloat16 on a CPU; ``SpeechLM.int8_products``): on 80 held-out-voice
    # utterances the same transcripts' WER with 2 or 4 views, 2 views 1.27x faster, and the same reply texts to 40
    # spoken questions (docs/benchmarks.md); the reply's speech stays bfloat16. None = off
    int8_rows: int | None = 4

    def __post_init__(self) -> None:
        if self.voice not in VOICES:
            raise SpeechLMError(f"unknown assist voice {self.voice!r}; choose from {', '.join(VOICES)}")
        if self.voice != "speech_lm" and self.tts_voice != "default":
            raise SpeechLMError(f"voice {self.tts_voice!r} is the speech LM's: the assisted reply must be said by it (assist voice speech_lm)")
        if self.asr_views < 1:
            raise SpeechLMError(f"the assist's asr_views must be >= 1, got {self.asr_views}")
        if self.int8_rows is not None and self.int8_rows < 1:
            raise SpeechLMError(f"the assist's int8_rows must be >= 1 or None, got {self.int8_rows}")
        if self.asr_check_rounds < 0:
            raise SpeechLMError(f"the assist's asr_check_rounds must be >= 0, got {self.asr_check_rounds}")
        if self.ahead_frames < 0:
            raise SpeechLMError(f"the assist's ahead_frames must be >= 0, got {self.ahead_frames}")


@dataclass
class _Say:
    """A text a session asked the model to say (CONTROL ``say``) and how far it got: ``waiting`` -> ``started`` (its
    first frame is being played) -> ``done`` (every frame played) or ``interrupted`` (the user talked over it); or
    ``dropped`` (never started: the turn ended first, or it holds no word to say)."""

    text: str
    id: Any = None
    state: str = "waiting"


class _Mark:
    """In a job's frames, where what became of say ``index`` is known once the frames before it are played:
    ``started`` (its first frame is next), ``done`` (its last was the one before) or ``dropped`` (not said: nothing
    in it to say, or its speech failed to start)."""

    __slots__ = ("index", "event")

    def __init__(self, index: int, event: str):
        self.index, self.event = index, event


class _Job:
    """One turn's work for the speech LM: hear the question, write the reply, speak it (voice
    "speech_lm"); or speak the texts a session asked to be said (``says``), one after another, more of them
    joining while it speaks. Runs inline or on the assist thread; the tick reads it without waiting."""

    def __init__(self, question: np.ndarray | None, heard_at: int, voice: str | None = None, *,
                 says: list[_Say] | None = None, client_reply: bool = False, check_rounds: int | None = None):  # fmt: skip
        self.question = question
        self.heard_at = heard_at  # the row's count of heard frames when the question was taken
        self.voice = voice  # the speech LM voice the reply is said in (None: the assist's tts_voice)
        self.client_reply = client_reply  # hear the question only: the session's client writes the reply
        self.check_rounds = check_rounds  # the transcript check's rounds for this question (None: the assist's)
        self.transcript = ""
        self.reply = ""
        self.planned = threading.Event()  # transcript and reply are set
        self.done = threading.Event()  # every frame of the reply's speech is made (or it stopped)
        self.frames: deque = deque()  # the reply's speech (PCM frames), made ahead of playback; _Marks between says
        self.cancelled = False
        self.says: list[_Say] = list(says or [])  # a say job: the texts, in order (part i is says[i])
        self.parts: deque[str] = deque(s.text for s in self.says)  # texts still to speak, in order
        self.started_parts = 0  # texts taken from parts
        self.said_parts = 0  # texts whose speech began
        self.speaking_part = -1  # the index of the text being spoken
        self.lock = threading.Lock()  # parts and done, between the tick (extend) and the speech (next_part)
        if self.says:
            self.planned.set()  # nothing to hear or write: its texts are the reply

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            self.parts.clear()
        self.frames.clear()

    def next_part(self) -> tuple[int, str] | None:
        """The next text to speak and its index; None (and the job is done) when none is left."""
        with self.lock:
            if self.cancelled or not self.parts:
                self.done.set()
                return None
            self.started_parts += 1
            return self.started_parts - 1, self.parts.popleft()

    def extend(self, say: _Say) -> bool | None:
        """A say joins the job's texts (the tick's side). True: its speech had ended, and must be started again;
        None: the job is cancelled (the say is not taken)."""
        with self.lock:
            if self.cancelled:
                return None
            self.says.append(say)
            self.parts.append(say.text)
            restart = self.done.is_set()
            self.done.clear()
            return restart


@dataclass
class _Row:
    """One session's bookkeeping (Python side; rows move with the scheduler's surgery)."""

    heard: deque = field(default_factory=deque)  # user frames (frame_length,), the last max_question_seconds
    spoken: deque = field(default_factory=deque)  # per heard frame: not ruled out as speech by the gate's speech detector
    heard_total: int = 0  # frames ever heard
    job: _Job | None = None  # the speech LM's work for the coming or current turn
    plan: list[list[int]] | None = None  # the turn's words still to say (piece ids); None = no turn
    free: bool = False  # this turn the model says its own words (duplex voice, the ASR heard nothing)
    word: list[int] = field(default_factory=list)  # pieces of the word in progress
    spoke: bool = False  # the model has made a sound this turn
    silent_run: int = 0
    user_text: str | None = None  # the question's transcript, sent with the turn's first piece
    voiced_run: int = 0  # the user's consecutive voiced frames up to now
    turn_wanted: bool = False  # the duplex model wanted to speak since the user's last sound
    unasked: bool = False  # the user has made a sound that no plan has heard yet
    sound_run: int = 0  # the user's consecutive frames over the gate's threshold up to now (the current sound)
    sound_speech: bool = False  # the gate's speech detector heard speech in the current sound (always, without one)
    unasked_before: bool = False  # ``unasked`` when the current sound began
    quiet_before: int = 0  # ``quiet_run`` when the current sound began
    quiet_run: int = 0  # the user's consecutive quiet frames up to now
    duplex_sounding: bool = False  # the duplex model's own audio was not silent last tick
    paused: bool = False  # the reply is held while the user talks over it
    overlap: int = 0  # frames of the user's sound over the paused reply
    gate: float = 0.01  # a frame with an RMS above this is speech (the speech gate's threshold, speechlm.streaming.gate)
    voice: str | None = None  # the session's voice for the replies (``configure_rows``); None: the config's tts_voice
    replies: str = "model"  # who writes the replies: "model" (the speech LM) or "client" (the session's, by ``say``)
    check_rounds: int | None = None  # the session's transcript check (``Generation.asr_check_rounds``); None: the assist's
    says: deque = field(default_factory=deque)  # texts to say (_Say) waiting for the model's next turn
    events: list = field(default_factory=list)  # what became of the says since the last tick's output, and the user's talking
    talking: bool = False  # the user's talking as last told (a {"user": "started"/"stopped"} event at each change)

    @property
    def in_turn(self) -> bool:
        return self.plan is not None or self.free

    def hear(self, frame: np.ndarray, voiced: bool, loud: bool = False, speech: bool = True, ruled_out: bool = False) -> None:
        """One frame of the user's audio. By the speech gate (:mod:`speechlm.streaming.gate`): ``voiced``, speech;
        ``loud``, over its threshold; ``speech``, its detector heard speech in the frame (True without one);
        ``ruled_out``, the sound that ended before this frame was ruled out by the detector."""
        if ruled_out and not self.sound_speech:
            # a sound the detector never heard as speech (a click): its frames leave the question, it asked nothing,
            # and the user was quiet through it
            for i in range(1, min(self.sound_run, len(self.spoken)) + 1):
                self.spoken[-i] = False
            self.unasked, self.quiet_run = self.unasked_before, self.quiet_before + self.sound_run
        if loud and self.sound_run == 0:
            self.unasked_before, self.quiet_before, self.sound_speech = self.unasked, self.quiet_run, False
        self.sound_run = self.sound_run + 1 if loud else 0
        self.sound_speech = loud and (self.sound_speech or speech)
        self.heard.append(frame)
        self.spoken.append(voiced or not loud)
        self.heard_total += 1
        self.voiced_run = self.voiced_run + 1 if voiced else 0
        self.quiet_run = 0 if voiced else self.quiet_run + 1
        self.unasked = self.unasked or voiced

    def drop_job(self) -> None:
        """The turn's job stops. A say job's says that were being said are ``interrupted``, those not begun ``dropped``."""
        self.paused = False
        if self.job is not None:
            for say in self.job.says:
                if say.state == "started":
                    self.say_event(say, "interrupted")
                elif say.state == "waiting":
                    self.say_event(say, "dropped")
            self.job.cancel()
            self.job = None

    def say_event(self, say: _Say, event: str) -> None:
        say.state = event
        self.events.append({"id": say.id, "event": event})

    def next_frame(self) -> np.ndarray | None:
        """The job's next frame of speech (None: not made yet, or none left), past the marks of its says."""
        frames = self.job.frames
        while frames:
            item = frames.popleft()
            if not isinstance(item, _Mark):
                return item
            self.say_event(self.job.says[item.index], item.event)
        return None


@dataclass
class AssistedState:
    inner: DuplexSpeechState
    rows: list[_Row]

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size


class AssistedDuplexModel:
    """A :class:`DuplexSpeechModel` whose words come from a :class:`SpeechPipeline` (see the module doc)."""

    def __init__(self, duplex: DuplexSpeechModel, speech: SpeechPipeline, config: AssistConfig | None = None,
                 generation: Generation = ASSIST_GENERATION):  # fmt: skip
        if speech.sample_rate != duplex.sample_rate:
            raise SpeechLMError(f"the speech LM runs at {speech.sample_rate} Hz but the duplex model at {duplex.sample_rate} Hz")
        self.duplex, self.speech = duplex, speech
        self.config = config or AssistConfig()
        generation = dataclasses.replace(generation, asr_views=self.config.asr_views, asr_adapter=self.config.asr_adapter,
                                         asr_check_rounds=self.config.asr_check_rounds, voice=self.config.tts_voice,
                                         speech_detector=self.config.speech_detector,
                                         **({} if self.config.guidance is None else {"guidance": self.config.guidance}))
        # a reply's speech must fit the speech LM's positions (prompt and text take the first ~128)
        limit = getattr(speech.lm.backbone.config, "max_position_embeddings", None) if hasattr(speech, "lm") else None
        if limit:
            generation = dataclasses.replace(generation, max_seconds=min(generation.max_seconds, max(1.0, (limit - 128) / speech.lm.config.frame_rate)))
        if hasattr(speech, "tts_adapter"):
            speech.tts_adapter(generation)  # a voice the speech LM does not have: its one-line error now, not at the first reply
        self.generation = generation
        self.frame_length, self.sample_rate = duplex.frame_length, duplex.sample_rate
        self.pad = duplex.lm.text_pad
        self.max_heard = max(1, int(self.config.max_question_seconds * self.sample_rate / self.frame_length))
        self.gate_config = GateConfig(**{f.name: getattr(self.config, f.name) for f in dataclasses.fields(GateConfig)})
        self.turns = 0  # turns with a plan or free words (for stats and tests)
        self._thread: threading.Thread | None = None  # the assist thread (background), started at the first question
        self._stop = threading.Event()  # the running assist thread's
        self._wake = threading.Condition()
        self._plans: deque[_Job] = deque()  # questions waiting for the assist thread
        self._jobs: weakref.WeakSet[_Job] = weakref.WeakSet()  # jobs not yet garbage (close() stops them)
        # the last ticks with a reply under way in the speech LM's voice: (a reply had no frame ready,)
        self._speech_ticks = TimedWindow()

    def assist_load(self, window_seconds: float) -> dict[str, Any] | None:
        """Whether the speech LM keeps up, over the last ``window_seconds``: of the ticks with a reply under way (its
        first frame played, voice "speech_lm"), how many, and the share where a reply had no frame ready (a gap in
        it: its speech is made slower than it plays). None without such ticks. (The server's load-based admission.)"""
        ticks = [starved for (starved,) in self._speech_ticks.since(window_seconds)]
        return {"ticks": len(ticks), "starved_share": round(sum(ticks) / len(ticks), 3)} if ticks else None

    @property
    def max_batch_seen(self) -> int:
        return self.duplex.max_batch_seen

    def close(self, timeout: float = 30.0) -> None:
        """Stop the assist thread (queued work is dropped; the replies being spoken stop at their next step) and wait
        up to ``timeout`` seconds for it to end: a thread still inside a torch operation when the interpreter exits
        can abort the process (seen once as SIGABRT at a server's Ctrl-C)."""
        for job in list(self._jobs):
            job.cancel()
        with self._wake:
            self._stop.set()
            self._plans.clear()
            thread, self._thread = self._thread, None
            self._wake.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- state (the inner state's surgery plus the rows' bookkeeping) -------------------------

    def _row(self) -> _Row:
        cfg = self.config
        # nothing heard yet: not talking; the gate at voiced_rms until the room is heard
        return _Row(heard=deque(maxlen=self.max_heard), spoken=deque(maxlen=self.max_heard), quiet_run=cfg.talk_frames, gate=cfg.voiced_rms)

    def init_state(self, batch_size: int) -> AssistedState:
        return AssistedState(self.duplex.init_state(batch_size), [self._row() for _ in range(batch_size)])

    def reset_rows(self, state: AssistedState, rows: list[int]) -> AssistedState:
        fresh = list(state.rows)
        for r in rows:
            fresh[r].drop_job()
            fresh[r] = self._row()
        return AssistedState(self.duplex.reset_rows(state.inner, rows), fresh)

    def grow_state(self, state: AssistedState, batch_size: int) -> AssistedState:
        extra = [self._row() for _ in range(batch_size - state.batch_size)]
        return AssistedState(self.duplex.grow_state(state.inner, batch_size), state.rows + extra)

    def voices(self) -> list[str]:
        """The voices a session may ask for (its HANDSHAKE's ``voice``), the assist's own first: the speech LM's
        voices when it says the replies (voice "speech_lm"), else only the duplex model's, "default"."""
        if self.config.voice != "speech_lm" or not hasattr(self.speech, "voices"):
            return ["default"]
        own = self.config.tts_voice
        return [own, *(v for v in self.speech.voices() if v != own)]

    def configure_rows(self, state: AssistedState, options: dict[int, dict]) -> AssistedState:
        """Per-session settings of rows (joining, or live: the scheduler's ``configure``): ``{"voice": NAME}`` says
        that session's replies in NAME from its next reply on (a reply being said goes on in its voice);
        ``{"replies": "client"}``: the speech LM hears the session's questions (their transcripts go out as the user's
        text when the duplex model would take its turn) but writes no reply: the session's client does, with
        :meth:`say_rows` (``"model"``: the speech LM answers, the default); ``{"check_rounds": N}``: the session's
        questions are heard with N rounds of the transcript check (``AssistConfig.asr_check_rounds`` for the others:
        an agent's LLM sees nothing but the transcript, and may trade time for it)."""
        voices = self.voices()
        for opts in options.values():
            voice, replies = opts.get("voice"), opts.get("replies")
            if voice is not None and voice not in voices:
                raise SpeechLMError(f"no voice {voice!r}; the assist speaks: {', '.join(voices)}")
            if replies is not None and replies not in REPLIES:
                raise SpeechLMError(f"replies must be one of {', '.join(REPLIES)}, got {replies!r}")
            if replies == "client" and not self.can_say():
                raise SpeechLMError("replies written by the client need the assist to speak in the speech LM's voice")
            rounds = opts.get("check_rounds")
            if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= MAX_CHECK_ROUNDS):
                raise SpeechLMError(f"check_rounds must be an integer from 0 to {MAX_CHECK_ROUNDS}, got {rounds!r}")
        for r, opts in options.items():
            row = state.rows[r]
            if "voice" in opts:
                voice = opts["voice"]
                row.voice = None if voice in (None, self.config.tts_voice) else voice  # None: the assist's own (one batch)
            if opts.get("replies") is not None:
                row.replies = opts["replies"]
            if "check_rounds" in opts:
                row.check_rounds = opts["check_rounds"]
        return state

    def can_say(self) -> bool:
        """Whether the model can say a session's texts (:meth:`say_rows`): the speech LM speaks the replies."""
        return self.config.voice == "speech_lm"

    def say_rows(self, state: AssistedState, says: dict[int, list[tuple[str, Any]]]) -> AssistedState:
        """Texts for rows to say (the scheduler's ``say``; CONTROL ``say``), each ``(text, id)``: said in the row's
        voice at the model's next turn — once the user is quiet and the model has no turn of its own coming — one
        after another as one reply; a text that comes while the row's says are being said joins them. What became of
        each goes out with the tick's text as ``{"events": [{"id": id, "event": ...}]}`` (``_Say``'s states)."""
        if not self.can_say():
            raise SpeechLMError("the model says texts in the speech LM's voice only (assist voice speech_lm)")
        for r, items in says.items():
            row = state.rows[r]
            for text, say_id in items:
                say = _Say(text, say_id)
                job = row.job
                if job is not None and job.says and row.in_turn:  # this row's says are being said: it joins them
                    restart = job.extend(say)
                    if restart is not None:
                        row.plan = [*(row.plan or []), *self.plan(text)]
                        if restart:
                            self._submit_speech(job)
                        continue
                row.says.append(say)
        return state

    def hush_rows(self, state: AssistedState, rows: list[int]) -> AssistedState:
        """Rows stop what they are saying (CONTROL ``interrupt`` with ``reply``; the scheduler's ``hush``): the turn ends
        (its says ``interrupted`` or ``dropped``), a reply planned to a question is dropped, and so are the says
        waiting; a question heard for the client to answer (``replies: client``) still goes out."""
        for r in rows:
            row = state.rows[r]
            if row.in_turn:
                row.plan, row.free, row.word = None, False, []
            if row.job is not None and not row.job.client_reply:
                row.drop_job()
            for say in row.says:
                row.say_event(say, "dropped")
            row.says.clear()
        return state

    def select_rows(self, state: AssistedState, rows: list[int]) -> AssistedState:
        for i in set(range(len(state.rows))) - set(rows):
            state.rows[i].drop_job()  # a session that left: its speech LM work stops
        return AssistedState(self.duplex.select_rows(state.inner, rows), [state.rows[r] for r in rows])

    # -- the step ---------------------------------------------------------------------------

    def step(self, user_pcm: Tensor, state: AssistedState) -> tuple[Tensor, list[TextPiece], AssistedState]:
        """user_pcm (B, frame_length) -> model pcm (B, frame_length), B text pieces, state."""
        rows = state.rows
        gated = self.hear(state, user_pcm)
        if self.config.noise_gate:
            user_pcm = gated

        def steer(sampled: Tensor) -> Tensor:
            return torch.tensor([self._choose(row, int(t)) for row, t in zip(rows, sampled.tolist())], device=sampled.device)

        own_voice = self.config.voice != "speech_lm"  # else the speech LM's voice replaces the duplex model's audio
        tick = self.duplex.tick(user_pcm, state.inner, text_filter=steer, gate=False, decode=own_voice)
        duplex_silent = [bool(x) for x in tick.silent.tolist()]
        pcm, silences = tick.pcm, duplex_silent
        if not own_voice:
            pcm, silences = torch.zeros_like(tick.pcm), []  # made here, outside the tick's inference mode: frames go in
            speaking = starved = False
            for i, (row, silent) in enumerate(zip(rows, duplex_silent)):
                frame = self._voice_frame(row, silent)
                silences.append(frame is None)
                if frame is not None:
                    pcm[i] = torch.as_tensor(frame, dtype=pcm.dtype, device=pcm.device)
                if row.spoke and row.job is not None:  # a reply under way (its first frame played)
                    speaking = True
                    starved |= frame is None and not row.paused and not row.job.done.is_set()  # a gap: its speech is late
            if speaking:
                self._speech_ticks.append(starved)
        for row, silent in zip(rows, duplex_silent):
            row.duplex_sounding = not silent
        texts: list[TextPiece] = []
        for row, token, silent in zip(rows, tick.text.tolist(), silences):
            self._after(row, silent)
            piece = self.duplex.piece(int(token))
            if row.user_text is not None or row.events:
                out: dict[str, Any] = {"model": piece or ""}
                if row.user_text is not None:
                    out["user"], row.user_text = row.user_text, None
                if row.events:
                    out["events"], row.events = row.events, []
                texts.append(out)
            else:
                texts.append(piece)
        return pcm, texts, AssistedState(tick.state, rows)

    def _choose(self, row: _Row, sampled: int) -> int:
        """The text token the model says this frame, given the one it sampled."""
        if row.word:
            return row.word.pop(0)
        talking = self.user_talking(row)
        wants = sampled != self.pad
        if not row.in_turn:
            # the duplex model wants the turn: it chose a word, or its own (unplayed) audio sounded last tick
            self._prepare_turn(row, wants or row.duplex_sounding, talking)
            if not row.in_turn and row.says and row.job is None and not talking:
                self._begin_says(row)  # texts the session asked for: said once the user is quiet
            if not row.in_turn:  # no turn (yet): quiet; the duplex voice may say its own word (a backchannel)
                return sampled if self.config.voice == "duplex" else self.pad
            if row.plan:
                return self._next_word(row)  # the turn's first frame: its first word
        if row.free:
            return sampled
        if not wants:
            # The model ended its words: with words of the plan left, the user quiet and the model
            # fallen silent, it goes on with the plan (its own sense of a reply's length is not the
            # plan's); if the user talks, it yields, and the turn ends (see _after).
            if row.plan and row.spoke and row.silent_run > 0 and not talking:
                return self._next_word(row)
            return self.pad
        if not row.plan:
            return self.pad  # the plan is said: no new words
        return self._next_word(row)

    def _prepare_turn(self, row: _Row, wants: bool, talking: bool) -> None:
        """Between turns: plan the reply to what the user said (once they are quiet: ``plan_early``,
        or once the duplex model wants to speak) and begin the turn when the plan is ready and the
        duplex model wants to speak (now, or since the user's last sound)."""
        if row.voiced_run > 0:  # the user speaks (again)
            if not row.sound_speech:
                return  # a sound in doubt (the detector has not heard speech in it yet): the plan waits for its verdict
            row.turn_wanted = False  # a wish to speak over them was a backchannel
            if row.job is not None:
                log.debug("assist: the user goes on; the planned turn is dropped")
                row.drop_job()  # the question was not over
            return
        if wants:
            row.turn_wanted = True  # kept while the user stays quiet
        early = self.config.plan_early and row.quiet_run >= self.config.plan_quiet_frames
        if row.job is None and row.unasked and (early or (row.turn_wanted and not talking)):
            row.unasked = False
            question = self.question_audio(row)
            if question is not None:
                log.debug("assist: turn asked (question %.2f s)", len(question) / self.sample_rate)
                row.job = self._submit(question, row.heard_total, row.voice, client_reply=row.replies == "client", check_rounds=row.check_rounds)
        if talking:
            return  # the turn waits for talk_frames of quiet
        if row.job is None and row.turn_wanted and self.config.voice == "duplex":
            row.job = self._submit(None, row.heard_total)  # nothing to answer: a turn in its own words
        if row.job is not None and row.job.planned.is_set() and row.turn_wanted:
            row.turn_wanted = False
            self._begin_turn(row)
        elif row.job is not None and row.job.client_reply and row.job.planned.is_set() and row.quiet_run >= self.config.end_frames:
            self._begin_turn(row)  # the client writes the reply: its question goes out once the user has been quiet a while

    def _next_word(self, row: _Row) -> int:
        word = row.plan.pop(0)
        row.word = word[1:]
        return word[0]

    def _begin_turn(self, row: _Row) -> None:
        """The planned job's reply becomes the turn (or, with nothing to say in the speech LM's voice, no turn)."""
        job = row.job
        keep = row.heard_total - job.heard_at  # the next question starts after this one
        while len(row.heard) > keep:
            row.heard.popleft()
            row.spoken.popleft()
        plan = self.plan(job.reply)
        log.debug("assist: heard %r, reply %r", job.transcript, job.reply)
        if job.client_reply:  # the question goes out now; the reply is the client's to say
            row.user_text, row.job = job.transcript or None, None
            return
        if not plan and self.config.voice == "speech_lm":
            row.job = None
            return
        row.plan, row.free = plan or None, not plan
        row.spoke, row.silent_run = False, 0
        row.user_text = job.transcript or None
        if self.config.voice != "speech_lm":
            row.job = None
        self.turns += 1

    def _begin_says(self, row: _Row) -> None:
        """The row's waiting says become the model's turn: their words the duplex model's inner monologue, their
        speech the speech LM's (spoken in order on the assist thread)."""
        says, plan = list(row.says), []
        row.says.clear()
        for say in says:
            words = self.plan(say.text)
            if words:
                plan.extend(words)
            else:
                row.say_event(say, "dropped")  # nothing in it to say
        says = [say for say in says if say.state == "waiting"]
        if not says:
            return
        row.job = _Job(None, row.heard_total, row.voice, says=says)
        self._jobs.add(row.job)
        row.plan, row.free, row.spoke, row.silent_run = plan, False, False, 0
        self.turns += 1
        self._submit_speech(row.job)

    def _voice_frame(self, row: _Row, duplex_silent: bool) -> np.ndarray | None:
        """The next frame of the reply's speech, or None (silence): not made yet, the reply is over,
        or paused while the user talks over it (see ``AssistConfig.barge_frames``)."""
        if row.job is None or not row.in_turn:
            return None
        talking = self.user_talking(row)
        cfg = self.config
        if row.paused:
            if talking:
                row.overlap += 1
                # an interruption: the rest is dropped; but a long sound without speech (a door, a passing car) only
                # holds the reply, which goes on once it stops
                if row.overlap > cfg.backchannel_frames and self._speech_over_reply(row):
                    log.debug("assist: interrupted; the rest of the reply is dropped")
                    row.paused = False
                    row.drop_job()
                return None
            row.paused = False  # a short sound, then quiet (a backchannel): the reply goes on
            log.debug("assist: a backchannel (%d frames); the reply goes on", row.overlap)
        elif talking and (duplex_silent or 0 < cfg.barge_frames <= row.voiced_run):
            row.paused, row.overlap = True, row.voiced_run
            log.debug("assist: the user talks over the reply; paused")
            return None
        return row.next_frame()

    def _speech_over_reply(self, row: _Row) -> bool:
        """Whether the sound over the paused reply (its last ``row.overlap`` heard frames, at most twice
        ``backchannel_frames``: a tick's check stays ~1-2 ms however long the sound) holds speech for the speech LM's
        speech detector (``AssistConfig.speech_detector``; True without one, or a speech LM that has none)."""
        heard_speech = getattr(self.speech, "heard_speech", None)
        if heard_speech is None or self.generation.speech_detector is None:
            return True
        sound = list(row.heard)[-min(row.overlap, 2 * self.config.backchannel_frames):]
        return heard_speech([np.concatenate(sound)], self.generation)[0]

    def _after(self, row: _Row, silent: bool) -> None:
        if not row.in_turn:
            return
        waiting = row.paused or (row.job is not None and not row.job.frames and not row.job.done.is_set())  # held, or the voice is behind
        if not silent:
            row.spoke, row.silent_run = True, 0
        elif not waiting:
            row.silent_run += 1
        # the turn is over once the model has been quiet a while after speaking (or never began)
        if not row.word and row.silent_run >= (self.config.end_frames if row.spoke else 3 * self.config.end_frames):
            log.debug("assist: turn over")
            row.plan, row.free, row.word = None, False, []
            row.drop_job()

    # -- the speech LM's work -----------------------------------------------------------------

    def _submit(self, question: np.ndarray | None, heard_at: int, voice: str | None = None, client_reply: bool = False,
                check_rounds: int | None = None) -> _Job:  # fmt: skip
        job = _Job(question, heard_at, voice, client_reply=client_reply, check_rounds=check_rounds)
        self._jobs.add(job)
        if question is None:  # nothing to hear: planned at once, with nothing to say
            job.planned.set()
            job.done.set()
        elif self.config.background:
            with self._wake:
                self._plans.append(job)
                if self._thread is None:
                    self._stop = threading.Event()
                    self._thread = threading.Thread(target=self._serve, args=(self._stop,), name="speechlm-assist", daemon=True)
                    self._thread.start()
                self._wake.notify()
        else:  # inline: hear, reply and speak it whole
            self._plan([job])
            self._speak_whole(job)
        return job

    def _submit_speech(self, job: _Job) -> None:
        """Speak a planned job's texts (a say job's): queued for the assist thread (``background``), else whole now."""
        if not self.config.background:
            self._speak_whole(job)
            return
        with self._wake:
            self._plans.append(job)  # planned already: the thread only starts its speech
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._serve, args=(self._stop,), name="speechlm-assist", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _speak_whole(self, job: _Job) -> None:
        streams, speaking = {}, {}
        self._start_speech(job, streams, speaking)
        while speaking:
            self._speak_step(streams, speaking)

    def _serve(self, stop: threading.Event) -> None:
        """The assist thread: the questions waiting are heard and answered together (:meth:`_plan`); in between,
        every reply being spoken advances a step (rows of one batch, :meth:`SpeechPipeline.speech_streams`).
        Waiting questions go first once every reply is ``ahead_frames`` ahead of its playback."""
        _lower_priority()
        streams: dict[str | None, SpeechStreams] = {}  # per voice: the replies said in it, rows of one batch
        speaking: dict[tuple[str | None, int], _Job] = {}  # (voice, stream key) -> job
        while True:
            with self._wake:
                while not stop.is_set() and not self._plans and not speaking:
                    self._wake.wait()
                if stop.is_set():
                    break
                ahead = self.config.ahead_frames
                first = not speaking or ahead > 0 and all(len(j.frames) >= ahead or j.cancelled for j in speaking.values())
                jobs = [self._plans.popleft() for _ in range(len(self._plans))] if first else []  # every waiting question
            if jobs:
                self._plan(jobs)
                for job in jobs:
                    self._start_speech(job, streams, speaking)
            else:
                self._speak_step(streams, speaking)
        for job in speaking.values():
            job.done.set()

    def _streams(self, voice: str | None) -> SpeechStreams:
        g = self.generation if voice is None else dataclasses.replace(self.generation, voice=voice)
        make = getattr(self.speech, "speech_streams", None) if self.config.batched_speech else None
        return make(g) if make is not None else SpeechStreams(self.speech, g)

    def _plan(self, jobs: list[_Job]) -> None:
        """Hear the questions and write the replies, every waiting question at once: as the rows of one batch
        where the speech LM can (``asr_many``, ``reply_texts``). Errors cost the turn, not the session: a batch
        that fails is planned again one question at a time, so that only the question at fault goes unanswered."""
        try:
            with self._int8():
                live = [job for job in jobs if not job.cancelled and not job.planned.is_set()]  # (a say job is planned)
                for job, transcript in zip(live, self._hear(live)):
                    job.transcript = transcript
                asked = [job for job in live if job.transcript and not job.cancelled and not job.client_reply]
                for job, reply in zip(asked, self._replies([job.transcript for job in asked])):
                    job.reply = reply
                    job.parts.append(reply)
        except Exception as e:  # noqa: BLE001 - e.g. a question too long for the speech LM: no answer, the session goes on
            if len(jobs) > 1:
                for job in jobs:
                    self._plan([job])
                return
            log.warning("assist: no answer this turn: %s", e)
            if not jobs[0].planned.is_set():
                jobs[0].transcript = jobs[0].reply = ""
                jobs[0].parts.clear()
        for job in jobs:
            job.planned.set()

    def _hear(self, jobs: list[_Job]) -> list[str]:
        """The jobs' questions heard, those of one transcript check (``_Job.check_rounds``) as one batch."""
        heard: dict[int, str] = {}
        for rounds in dict.fromkeys(job.check_rounds for job in jobs):
            group = [i for i, job in enumerate(jobs) if job.check_rounds == rounds]
            g = self.generation if rounds is None else dataclasses.replace(self.generation, asr_check_rounds=rounds)
            many = getattr(self.speech, "asr_many", None)
            questions = [jobs[i].question for i in group]
            texts = many(questions, self.sample_rate, g) if many is not None else [self.speech.asr(q, self.sample_rate, g) for q in questions]
            heard.update(zip(group, texts))
        return [heard[i] for i in range(len(jobs))]

    def _replies(self, transcripts: list[str]) -> list[str]:
        many = getattr(self.speech, "reply_texts", None)
        if many is not None:
            return many(transcripts, self.generation) if transcripts else []
        return [self.speech.reply_text(t, self.generation) for t in transcripts]

    def _start_speech(self, job: _Job, streams: dict[str | None, SpeechStreams], speaking: dict[tuple[str | None, int], _Job]) -> None:
        """The job's next text (the reply; a say job's says in turn) joins the streams of its voice (voice
        "speech_lm"); with none left, the job is done. A say's frames come between its ``_Mark``s (and, after another
        say's, the generation's sentence pause)."""
        while (part := job.next_part()) is not None:
            index, text = part
            try:
                if self.config.voice == "speech_lm" and self.plan(text):
                    if job.voice not in streams:
                        streams[job.voice] = self._streams(job.voice)
                    key = streams[job.voice].add(text)
                    if job.says:
                        if job.said_parts:
                            job.frames.extend(np.zeros(self.frame_length, np.float32) for _ in range(self._pause_frames()))
                        job.frames.append(_Mark(index, "started"))
                    job.said_parts += 1
                    job.speaking_part = index
                    speaking[(job.voice, key)] = job
                    return
            except Exception as e:  # noqa: BLE001
                log.warning("assist: the reply's speech stopped: %s", e)
            if job.says:
                job.frames.append(_Mark(index, "dropped"))

    def _pause_frames(self) -> int:
        """Frames of silence between two says (the generation's pause between sentences)."""
        return round(self.generation.sentence_pause_seconds * self.sample_rate / self.frame_length)

    def _speak_step(self, streams: dict[str | None, SpeechStreams], speaking: dict[tuple[str | None, int], _Job]) -> None:
        """One step of every reply being spoken (``speaking``: (voice, stream key) -> job), the streams of each voice
        in turn; replies dropped by their session leave. An error stops that voice's replies of the step (their
        sessions go on), and the voice gets fresh streams."""
        for (voice, key), job in list(speaking.items()):
            if job.cancelled:
                streams[voice].cancel(key)
                del speaking[(voice, key)]
                job.done.set()
        for voice in list(dict.fromkeys(v for v, _ in speaking)):
            try:
                made = streams[voice].step()
            except Exception as e:  # noqa: BLE001
                log.warning("assist: the replies' speech stopped: %s", e)
                for (v, key), job in list(speaking.items()):
                    if v == voice:
                        job.done.set()
                        del speaking[(v, key)]
                streams[voice] = self._streams(voice)
                continue
            for key, frames in made.items():
                job = speaking.get((voice, key))
                if job is None:
                    continue
                if not job.cancelled:
                    job.frames.extend(frames)
                if streams[voice].finished(key):
                    del speaking[(voice, key)]
                    if job.says and not job.cancelled:
                        job.frames.append(_Mark(job.speaking_part, "done"))
                    self._start_speech(job, streams, speaking)  # its next text, or done

    def _int8(self):
        """The int8 products of ``config.int8_rows`` for this thread's hearing and reply text, where the
        speech LM computes in bfloat16 on a CPU (elsewhere they would change nothing)."""
        lm, rows = getattr(self.speech, "lm", None), self.config.int8_rows
        usable = rows is not None and getattr(lm, "int8_computes", False)
        return lm.int8_products(rows) if usable else contextlib.nullcontext()

    # -- pieces -----------------------------------------------------------------------------

    def hear(self, state: AssistedState, user_pcm: Tensor) -> Tensor:
        """The user's frames (B, frame_length) into the rows (their heard audio, runs of voiced and
        quiet frames, gate), through the duplex model's speech gate (with this config's settings):
        returns them noise-gated (zeros where the user is not talking)."""
        gated, voiced = self.duplex.listen(user_pcm, state.inner, self.gate_config)
        frames = user_pcm.detach().float().cpu().numpy()
        gate = state.inner.gate
        thresholds = gate.thresholds(self.gate_config).tolist()
        loud = (gate.loud_run > 0).tolist()
        if gate.detector is None:
            speech, ruled_out = [True] * len(frames), [False] * len(frames)
        else:  # (a loud frame's run of frames without speech restarts at 0 when the detector hears speech in it)
            speech, ruled_out = (gate.unheard_run == 0).tolist(), (gate.since_ruled_out == 0).tolist()
        for row, frame, *heard, threshold in zip(state.rows, frames, voiced.tolist(), loud, speech, ruled_out, thresholds):
            row.gate = threshold
            row.hear(frame, *heard)
            if self.user_talking(row) != row.talking:
                row.talking = not row.talking
                row.events.append({"user": "started" if row.talking else "stopped"})
        return gated

    def user_talking(self, row: _Row) -> bool:
        """One of the user's last ``talk_frames`` frames was speech."""
        return row.quiet_run < self.config.talk_frames

    def question_audio(self, row: _Row) -> np.ndarray | None:
        """The heard audio trimmed to its voiced part (plus a margin), without frames of digital
        silence (exact zeros: the server's fill for audio that had not arrived, or a client's padding;
        the speech LM never heard such frames in training, and its ASR gets worse with them: on 40
        held-out questions 13 transcripts exactly right with 3 frames of the recording's own lead-in,
        11 with 1-3 zero frames after, 4 with 8); None if nothing was voiced."""
        if not row.heard:
            return None
        frames = np.stack(list(row.heard))
        voiced = np.nonzero((np.sqrt((frames**2).mean(axis=1)) > row.gate) & np.array(row.spoken, bool))[0]
        if len(voiced) == 0:
            return None
        m = self.config.margin_frames
        frames = frames[max(0, voiced[0] - m) : voiced[-1] + 1 + m]
        audio = frames[np.abs(frames).max(axis=1) > 0].reshape(-1)
        return audio if len(audio) >= 0.3 * self.sample_rate else None

    def plan(self, reply: str) -> list[list[int]]:
        """The reply's words as the duplex text stream lays them: ``" word"`` tokenized, one list per word
        (numbers spelled out, as in training)."""
        tokenizer = self.duplex.lm.tokenizer
        words = [w for w, _, _ in word_spans(normalize_text(reply.strip()))] if reply.strip() else []
        return [ids for ids in (tokenizer.encode(" " + w, add_special_tokens=False) for w in words) if ids]


def _lower_priority() -> None:
    """Run the assist thread at a lower CPU priority than the frame clock's (Linux: a thread is a
    schedulable task with its own nice value), so that a turn's work yields the CPU to the tick."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority
        pass


def build_assisted_model(duplex: DuplexSpeechModel, speech_lm: str, *, dtype: torch.dtype = torch.float32, **kwargs: Any) -> AssistedDuplexModel:
    """``speechlm serve --assist NAME``: ``speech_lm`` is a speech LM directory or shipped name,
    loaded on the duplex model's device in ``dtype`` (the server's ``--dtype``), with its own copy of
    the duplex model's codec (the assist thread decodes while the tick encodes)."""
    from ..lm.model import SpeechLM
    from ..speech import resolve_model

    try:
        lm = SpeechLM.from_pretrained(resolve_model(speech_lm), dtype=dtype).to(duplex.device)
        codec = copy.deepcopy(getattr(duplex.codec, "codec", duplex.codec))  # the plain codec under compiled steps (--compile-codec)
        return AssistedDuplexModel(duplex, SpeechPipeline(lm, codec), **kwargs)
    except SpeechLMError as e:
        raise SpeechLMError(f"answer assist {speech_lm!r}: {e} (--assist none serves the duplex model alone)") from None
