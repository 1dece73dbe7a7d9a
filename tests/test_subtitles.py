"""Subtitles from a transcript's segments: SubRip and WebVTT cues, timestamps, segments heard as nothing."""

import pytest

from speechlm.codec.errors import SpeechLMError
from speechlm.speech import Segment
from speechlm.subtitles import to_subtitles

SEGMENTS = [Segment(0.0, 1.2344, "What is two plus three?"), Segment(1.5, 2.0, " "), Segment(3723.0005, 3725.5, "It is  five.")]


def test_srt_numbers_its_cues_and_skips_segments_heard_as_nothing():
    assert to_subtitles(SEGMENTS, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,234\nWhat is two plus three?\n\n"
        "2\n01:02:03,000 --> 01:02:05,500\nIt is five.\n"
    )


def test_vtt_has_its_header_and_dotted_milliseconds():
    assert to_subtitles(SEGMENTS, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.234\nWhat is two plus three?\n\n01:02:03.000 --> 01:02:05.500\nIt is five.\n"
    )
    assert to_subtitles([], "vtt") == "WEBVTT\n" and to_subtitles([], "srt") == ""
    with pytest.raises(SpeechLMError, match="unknown subtitle format"):
        to_subtitles(SEGMENTS, "ass")
