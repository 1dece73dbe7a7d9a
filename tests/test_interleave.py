import random

import numpy as np

from speechlm.training.interleave import Audio, Tag, Text, TextIds, fixed_ratio_chunks, pack, spoken_qa_example, word_level_interleave

WORDS = [{"word": w, "start_frame": s, "end_frame": e} for w, s, e in [("the", 0, 3), ("cat", 3, 8), ("sat", 9, 14), ("on", 15, 17), ("mats", 17, 25)]]
CODES = np.arange(26 * 2).reshape(26, 2)


def test_word_level_spans_cover_all_audio_once():
    for seed in range(30):
        segs = word_level_interleave(WORDS, CODES, random.Random(seed), p_switch=0.5)
        text_words = [w for s in segs if isinstance(s, Text) for w in s.text.split()]
        audio = [s for s in segs if isinstance(s, Audio)]
        # every word appears exactly once, as text or inside an audio span, in order
        spoken = []
        for s in segs:
            if isinstance(s, Text):
                spoken += s.text.split()
            elif isinstance(s, Audio):
                spoken += [w["word"] for w in WORDS if s.codes[0, 0] // 2 <= w["start_frame"] < s.codes[-1, 0] // 2 + 1]
        assert spoken == [w["word"] for w in WORDS]
        for a in audio:  # audio spans are contiguous slices of the utterance
            assert np.array_equal(a.codes, CODES[a.codes[0, 0] // 2 : a.codes[-1, 0] // 2 + 1])
        assert len(text_words) + sum(1 for s in segs if isinstance(s, Tag) and s.name == "speech_start") >= 1


def test_word_level_all_text_or_all_audio():
    segs = word_level_interleave(WORDS, CODES, random.Random(0), p_switch=0.0, start="audio")
    assert [type(s) for s in segs] == [Tag, Audio, Tag] and np.array_equal(segs[1].codes, CODES)
    segs = word_level_interleave(WORDS, CODES, random.Random(0), p_switch=0.0, start="text")
    assert segs == [Text("the cat sat on mats")]


def test_fixed_ratio():
    segs = fixed_ratio_chunks(list(range(10)), CODES[:20], text_per_chunk=4, audio_per_chunk=8, first_text=1)
    kinds = [(type(s).__name__, len(s.ids) if isinstance(s, TextIds) else len(s)) for s in segs]
    assert kinds == [("TextIds", 1), ("Audio", 8), ("TextIds", 4), ("Audio", 8), ("TextIds", 4), ("Audio", 4), ("TextIds", 1)]
    qa = spoken_qa_example(CODES[:5], [1, 2], CODES[:3])
    assert qa[0] == Tag("user") and qa[-1] == Tag("speech_end")


def test_pack():
    rows = pack([[1] * 5, [2] * 3, [3] * 4, [4] * 9], 9)
    assert sorted(len(r) for r in rows) == [3, 9, 9]  # first fit, longest first: [9], [5, 4], [3]
