"""Subtitles of a transcribed recording: SubRip (``.srt``) and WebVTT (``.vtt``) from its segments.

``speechlm asr FILE --subtitles srt`` prints them; :meth:`SpeechPipeline.asr_segments` gives the segments (the pieces
of the recording cut at its pauses, each with its span in seconds and the text heard there). A segment heard as
nothing gets no cue.

    print(to_subtitles(pipeline.asr_segments(audio), "vtt"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .codec.errors import SpeechLMError

FORMATS = ("srt", "vtt")


class Timed(Protocol):
    start: float  # seconds
    end: float
    text: str


def to_subtitles(segments: Sequence[Timed], kind: str) -> str:
    """The cues of ``segments`` (those with text) as SubRip (``kind="srt"``) or WebVTT (``"vtt"``) text."""
    if kind not in FORMATS:
        raise SpeechLMError(f"unknown subtitle format {kind!r}; choose from {', '.join(FORMATS)}")
    separator = "," if kind == "srt" else "."
    blocks = ["WEBVTT\n"] if kind == "vtt" else []
    cues = [s for s in segments if s.text.strip()]
    for n, s in enumerate(cues, 1):
        number = f"{n}\n" if kind == "srt" else ""
        blocks.append(f"{number}{_timestamp(s.start, separator)} --> {_timestamp(max(s.end, s.start), separator)}\n{' '.join(s.text.split())}\n")
    return "\n".join(blocks)


def _timestamp(seconds: float, separator: str) -> str:
    """Seconds -> ``HH:MM:SS,mmm`` (SubRip) or ``HH:MM:SS.mmm`` (WebVTT), rounded to the millisecond."""
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"
