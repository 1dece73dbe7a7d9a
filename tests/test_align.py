"""Word timestamps by forced alignment (speechlm.align) and ``speechlm data import`` (training/recordings.py):
the Viterbi path, words found where the teacher said them, and recordings with transcripts turned into a corpus that
``speechlm data tokenize`` reads, with bad recordings failed one by one."""

import json
import random

import numpy as np
import pytest
import soundfile as sf

from speechlm.align import AlignError, align_words, ctc_viterbi
from speechlm.checker import PronunciationChecker
from speechlm.cli import main as cli_main
from speechlm.codec.errors import SpeechLMError
from speechlm.training.recordings import ImportConfig, import_recordings, recording_items
from speechlm.training.synth import read_manifest
from speechlm.training.teachers import get_teacher


@pytest.fixture(scope="module")
def checker():
    return PronunciationChecker.from_pretrained("checker-en").eval()


def test_viterbi_finds_the_path_it_was_given():
    rng = np.random.default_rng(0)
    labels = [3, 1, 1, 2]  # a repeat needs a blank between
    truth = [-1, 0, 0, -1, 1, -1, 2, 2, -1, 3, -1]  # each frame's label index, -1 a blank
    log_probs = np.log(np.full((len(truth), 4), 0.02) + rng.random((len(truth), 4)) * 0.01)
    for t, k in enumerate(truth):
        log_probs[t, 0 if k < 0 else labels[k]] = np.log(0.9)
    path, log_p = ctc_viterbi(log_probs, labels)
    assert path.tolist() == truth and log_p == pytest.approx(sum(log_probs[t, 0 if k < 0 else labels[k]] for t, k in enumerate(truth)))
    with pytest.raises(AlignError, match="4 phonemes do not fit in 4 frames"):
        ctc_viterbi(log_probs[:4], labels)  # the repeat takes a fifth


def test_words_are_found_where_the_teacher_said_them(checker):
    text = "Turn off the kitchen lights at eleven, then lock the door."
    syn = get_teacher("espeak:en-us+m7").synthesize(text, random.Random(0))  # a held-out voice
    alignment = align_words(syn.audio, text, checker)
    assert [w.word for w in alignment.words] == [w.word for w in syn.words]
    starts = np.array([w.start for w in alignment.words]) - [w.start for w in syn.words]
    ends = np.array([w.end for w in alignment.words]) - [w.end for w in syn.words]
    assert np.mean(np.abs(starts) <= 0.06) >= 0.8 and np.mean(np.abs(ends) <= 0.06) >= 0.8, (starts, ends)
    assert all(a.end <= b.start + 1e-9 for a, b in zip(alignment.words, alignment.words[1:]))  # in order, no overlap
    assert alignment.score < 3
    wrong = align_words(syn.audio, "Seven plus nine equals sixteen, said the old man.", checker)
    assert wrong.score > alignment.score + 2  # a transcript of other words scores far worse
    with pytest.raises(AlignError, match="do not fit"):
        align_words(syn.audio[:4000], text, checker)  # a quarter second cannot hold the sentence
    with pytest.raises(AlignError, match="no words"):
        align_words(syn.audio, "...", checker)


def test_import_makes_a_corpus_that_tokenizes_and_fails_bad_recordings_one_by_one(tmp_path, checker):
    folder = tmp_path / "recordings" / "anna"
    folder.mkdir(parents=True)
    teacher = get_teacher("espeak:en-us")
    texts = {"one": "Please open the window.", "two": "It is 3 o'clock."}
    for name, text in texts.items():
        sf.write(folder / f"{name}.wav", teacher.synthesize(text, random.Random(1)).audio, 16000)
        (folder / f"{name}.txt").write_text(text + "\n")
    sf.write(folder / "mismatch.wav", teacher.synthesize("Good morning.", random.Random(1)).audio, 16000)
    (folder / "mismatch.txt").write_text("Which city is the capital of Portugal and Spain?")
    (folder / "broken.wav").write_bytes(b"RIFF....not audio")
    (folder / "broken.txt").write_text("Hello.")
    (folder / "silent.wav").write_bytes(b"")  # no transcript beside it: not a recording of the source
    items = recording_items(tmp_path / "recordings")
    assert [i["id"] for i in items] == ["broken", "mismatch", "one", "two"] and {i["speaker"] for i in items} == {"anna"}

    out = tmp_path / "corpus"
    summary = import_recordings(items, out, ImportConfig(shard_size=2), progress=False)
    rows, failed = read_manifest(out), read_manifest(out / "failed.jsonl")
    assert summary.utterances == 2 and [r["id"] for r in rows] == ["one", "two"]
    assert {f["id"] for f in failed} == {"broken", "mismatch"}
    assert "cannot read" in next(f["error"] for f in failed if f["id"] == "broken")
    assert "does not match the audio" in next(f["error"] for f in failed if f["id"] == "mismatch")
    two = rows[1]
    assert two["voice"] == "import:anna" and two["normalized_text"] == "It is three o'clock."
    assert [w["word"] for w in two["words"]] == ["It", "is", "three", "o'clock"] and two["teacher"]["aligner"] == "checker-en"
    assert 0 <= two["words"][0]["start"] < two["words"][-1]["end"] <= two["duration"]

    again = import_recordings(items, out, ImportConfig(shard_size=2), progress=False)  # resumed: nothing to do
    assert again.shards_done_before == 2 and read_manifest(out) == rows
    with pytest.raises(SpeechLMError, match="other settings"):
        import_recordings(items, out, ImportConfig(shard_size=2, max_score=None), progress=False)

    assert cli_main(["data", "tokenize", str(out), "--out", str(tmp_path / "tokens"), "--quiet"]) == 0
    index = [json.loads(line) for line in (tmp_path / "tokens" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 2 and all(r["words"] for r in index)


def test_import_tables_and_their_errors(tmp_path, capsys):
    audio = tmp_path / "clips" / "a.flac"
    audio.parent.mkdir()
    sf.write(audio, get_teacher("espeak:en-us").synthesize("Thank you very much.", random.Random(2)).audio, 16000)
    table = tmp_path / "list.csv"
    table.write_text("file,sentence,who\nclips/a.flac,Thank you very much.,bob\n")
    items = recording_items(table, path_column="file", text_column="sentence", speaker_column="who")
    assert items == [{"id": "a", "text": "Thank you very much.", "source": str(audio.resolve()), "speaker": "bob"}]
    with pytest.raises(SpeechLMError, match="has no column 'text' \\(its columns: file, sentence, who\\)"):
        recording_items(table, path_column="file")
    with pytest.raises(SpeechLMError, match="no recordings at"):
        recording_items(tmp_path / "missing.tsv")
    assert cli_main(["data", "import", str(table), "--out", str(tmp_path / "c"), "--path-column", "file", "--text-column", "sentence",
                     "--quiet"]) == 0
    assert "1 recordings aligned (0 failed" in capsys.readouterr().out
    assert read_manifest(tmp_path / "c")[0]["voice"] == "import:list"  # the table's name, without a speaker column


def test_import_reads_librispeech_and_libritts_layouts(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "103" / "1240"  # speaker / chapter / ID.flac, transcripts in one *.trans.txt
    chapter.mkdir(parents=True)
    for name in ("103-1240-0000", "103-1240-0001", "103-1240-0002"):
        (chapter / f"{name}.flac").write_bytes(b"")
    (chapter / "103-1240.trans.txt").write_text("103-1240-0000 CHAPTER ONE\n103-1240-0001 MISSUS RACHEL LYNDE IS SURPRISED\n")
    libritts = tmp_path / "LibriTTS" / "19" / "198"
    libritts.mkdir(parents=True)
    (libritts / "19_198_000000_000000.wav").write_bytes(b"")
    (libritts / "19_198_000000_000000.normalized.txt").write_text("Northanger Abbey.")
    items = recording_items(tmp_path / "LibriSpeech")
    assert [(i["id"], i["text"], i["speaker"]) for i in items] == [("103-1240-0000", "CHAPTER ONE", "103"),
                                                                   ("103-1240-0001", "MISSUS RACHEL LYNDE IS SURPRISED", "103")]
    assert [(i["id"], i["text"], i["speaker"]) for i in recording_items(tmp_path / "LibriTTS")] == [
        ("19_198_000000_000000", "Northanger Abbey.", "19")]


def test_asr_words_align_each_segment_and_share_out_one_that_cannot_be(checker):
    """``SpeechPipeline.asr_words``: a segment's words where the checker hears them, offset by the segment's start; a
    segment whose text the audio cannot hold gives its words its span by their letters, marked not aligned."""
    from speechlm.speech import Segment, SpeechPipeline

    class Pipeline:  # what asr_words uses of a pipeline
        def _checked(self, audio, sample_rate):
            return audio

        def checker(self, name):
            return checker

    syn = get_teacher("espeak:en-us").synthesize("Good morning.", random.Random(0))
    audio = np.concatenate([np.zeros(16000, np.float32), syn.audio, np.zeros(4000, np.float32)])
    end = 1 + len(syn.audio) / 16000
    segments = [Segment(1.0, end, "Good morning."), Segment(end, end + 0.1, "ten twenty")]
    words = SpeechPipeline.asr_words(Pipeline(), audio, segments)
    assert [(w.word, w.aligned) for w in words] == [("Good", True), ("morning", True), ("ten", False), ("twenty", False)]
    assert abs(words[0].start - (1 + syn.words[0].start)) < 0.04 and abs(words[1].start - (1 + syn.words[1].start)) < 0.06
    assert words[2].start == pytest.approx(end, abs=1e-3) and words[3].end == pytest.approx(end + 0.1, abs=1e-3)
    assert words[2].end == pytest.approx(end + 0.1 * 3 / 9, abs=1e-3)  # "ten" has 3 of the 9 letters
