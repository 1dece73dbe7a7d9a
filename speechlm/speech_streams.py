"""Streaming TTS of many texts at once, texts joining and leaving while it runs.

A server speaks many replies at the same time, each started whenever its question was answered.
:class:`BatchedSpeechStreams` speaks them as the rows of one running batch of a word-aligned speech
LM (:class:`speechlm.lm.aligned_batch.AlignedSpeechBatch`): one backbone forward per step for every
reply, a new reply joining at the next step. Each text is cut into the parts TTS speaks alone
(sentences, the clauses of a long one: :meth:`SpeechPipeline.speech_parts`); its parts run as rows
side by side, and their frames come out in order with the pauses between them. Each row's frames are
decoded by the codec frame by frame as they are made, so a text's PCM is what
``SpeechPipeline.tts(text, stream=True)`` streams (up to the float rounding of batched arithmetic).
:class:`SpeechStreams` does the same with one TTS stream per text, stepped in turn (any object with
``tts(text, stream=True, generation=...)``; models of other layouts).

    streams = pipeline.speech_streams(generation)
    key = streams.add("Two plus three is five.")
    while streams:
        for key, frames in streams.step().items(): ...   # PCM frames (frame_length,), in order
        streams.finished(key)                              # every frame of it is out
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .lm.aligned_batch import AlignedSpeechBatch
from .lm.prompts import aligned_tts_prompt

if TYPE_CHECKING:
    from .speech import Generation, SpeechPipeline


class SpeechStreams:
    """One streaming TTS per text (``speech.tts(text, stream=True, generation=generation)``), stepped in
    turn: each :meth:`step` takes the next frame of every text."""

    def __init__(self, speech: Any, generation: Generation):
        self.speech, self.generation = speech, generation
        self._streams: dict[int, Iterator[np.ndarray]] = {}
        self._keys = 0  # keys given so far (1 .. _keys)

    def add(self, text: str) -> int:
        """Start speaking ``text``; its key. Errors in the text (e.g. too long) are raised here."""
        stream = iter(self.speech.tts(text, stream=True, generation=self.generation))
        self._keys += 1
        self._streams[self._keys] = stream
        return self._keys

    def cancel(self, key: int) -> None:
        """Stop speaking ``key`` (nothing more of it comes out)."""
        self._streams.pop(key, None)

    def _active(self) -> dict:
        """The texts still being spoken, by key."""
        return self._streams

    def finished(self, key: int) -> bool:
        """Every frame of ``key`` is out (or it was cancelled): a key given and no longer active."""
        return 0 < key <= self._keys and key not in self._active()

    def __len__(self) -> int:
        """Texts still being spoken."""
        return len(self._streams)

    def step(self) -> dict[int, list[np.ndarray]]:
        """The frames each text made in this step (float32, 16 kHz), in order; a text whose frames are all
        out is :meth:`finished` (it may come with none)."""
        out = {}
        for key, stream in list(self._streams.items()):
            with torch.inference_mode():
                frame = next(stream, None)
            if frame is None:
                self.cancel(key)
                out[key] = []
            else:
                out[key] = [np.asarray(frame, dtype=np.float32)]
        return out


@dataclass
class _Part:
    """One part of a text (a sentence or clause): its row in the batch, its codec state, its frames."""

    row: int
    pause: int  # frames of silence before it
    state: Any
    frames: deque = field(default_factory=deque)  # PCM made, not yet handed out
    done: bool = False


@dataclass
class _Text:
    parts: list[_Part]
    next: int = 0  # the part whose frames come out now
    paused: bool = False  # its pause is out


class BatchedSpeechStreams(SpeechStreams):
    """The texts as rows of one running word-aligned batch (see the module doc). Each :meth:`step` is one
    audio position of the batch: every text gets the frames its rows completed there."""

    def __init__(self, pipeline: SpeechPipeline, generation: Generation):
        super().__init__(pipeline, generation)
        g = generation
        self.adapter = pipeline.tts_adapter(g)
        self.batch = AlignedSpeechBatch(pipeline.lm, **pipeline._speech_settings(g))
        self._texts: dict[int, _Text] = {}
        self._rows: dict[int, tuple[int, _Part]] = {}  # batch row key -> (text key, part)
        self._positions: Iterator | None = None

    def add(self, text: str) -> int:
        p, g = self.speech, self.generation
        parts = [(pause, *aligned_tts_prompt(p.lm, part)) for pause, part in p.speech_parts(text, g)]  # errors here, before any row joins
        self._keys += 1
        rows = [self.batch.add(prefix, chunks, sampling=g.sampling(), seed=g.seed) for _, prefix, chunks in parts]
        entry = _Text([_Part(row, pause if k else 0, p.codec.init_state(1)) for k, (row, (pause, _, _)) in enumerate(zip(rows, parts))])
        self._texts[self._keys] = entry
        for part in entry.parts:
            self._rows[part.row] = (self._keys, part)
        return self._keys

    def cancel(self, key: int) -> None:
        entry = self._texts.pop(key, None)
        for part in entry.parts if entry else []:
            self.batch.remove(part.row)
            self._rows.pop(part.row, None)

    def _active(self) -> dict:
        return self._texts

    def __len__(self) -> int:
        return len(self._texts)

    def step(self) -> dict[int, list[np.ndarray]]:
        if not self._texts:
            return {}
        p = self.speech
        size = p.codec.config.codebook_size - 1
        with torch.inference_mode():
            if self._positions is None:
                self._positions = self.batch.run()
            with p.lm.adapter(self.adapter):
                position = next(self._positions, None)
            if position is None:
                self._positions = None
            else:
                for row, frames in position.frames.items():
                    if row not in self._rows:
                        continue
                    _, part = self._rows[row]
                    for frame in frames:
                        pcm, part.state = p.codec.decode_step(frame[None].clamp(max=size), part.state)
                        part.frames.append(pcm[0].cpu().numpy())
                    part.done = position.finished.get(row, False)
        return {key: self._hand_out(key) for key in list(self._texts)}

    def _hand_out(self, key: int) -> list[np.ndarray]:
        """The text's frames ready in order: its current part's, then (once that part is done) the pause and the next part's."""
        entry, out = self._texts[key], []
        silence = np.zeros(self.speech.codec.config.frame_length, np.float32)
        while entry.next < len(entry.parts):
            part = entry.parts[entry.next]
            if not entry.paused:
                out += [silence] * part.pause
                entry.paused = True
            while part.frames:
                out.append(part.frames.popleft())
            if not part.done:
                break
            self._rows.pop(part.row, None)
            entry.next, entry.paused = entry.next + 1, False
        if entry.next == len(entry.parts):
            del self._texts[key]
        return out
