"""The shipped defaults load by name, offline, and do their job end to end (README's first command)."""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from speechlm.codec.audio import SAMPLE_RATE, load_audio, save_audio
from speechlm.codec.model import Codec
from speechlm.lm.generate import GREEDY
from speechlm.speech import CODEC_REF, Generation, SpeechPipeline, resolve_model
from speechlm.streaming.duplex_model import DuplexSpeechModel
from speechlm.training.teachers import get_teacher
from speechlm.training.textnorm import words_for_scoring

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def default_pipeline():
    return SpeechPipeline.from_pretrained("speechlm-default")


def test_default_lm_names_the_shipped_codec(default_pipeline):
    directory = resolve_model("speechlm-default")
    ref = json.loads((directory / CODEC_REF).read_text())
    assert ref["codec_id"] == Codec.from_pretrained(ref["codec"]).codec_id == default_pipeline.codec.codec_id
    provenance = json.loads((directory / "provenance.json").read_text())
    base = [s["train_config"] for s in provenance["stages"] if not s["train_config"].get("adapter")]
    adapter_runs = [s["train_config"] for s in provenance["stages"] if s["train_config"].get("adapter")]
    assert [c["stage"] for c in base] == ["text", "align", "mctp", "sft", "sft", "sft", "sft", "sft"]
    assert base[4]["speech"] == {"speech_layout": "word_aligned"}  # the layout switch; later stages inherit it
    assert base[-1]["init_from"] == "speechlm-default"  # the fifth version: a GPU fine-tune of the fourth
    # the ASR adapter: trained alone, in three rounds, on the fifth version's frozen base (after every base stage); the
    # third in loud rooms of many kinds of noise
    assert len(adapter_runs) == 3 and all(c["adapter"] == "asr" and c["weights"] == {"asr": 1.0} for c in adapter_runs)
    assert "data/tok-rooms-loud-espeak4" in adapter_runs[-1]["data"]
    assert provenance["stages"][-len(adapter_runs):] == [s for s in provenance["stages"] if s["train_config"].get("adapter")]
    assert list(default_pipeline.lm.adapters) == ["asr"] and default_pipeline.asr_adapter() == "asr"
    assert default_pipeline.lm.config.speech_layout == "word_aligned"
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    codec_size = sum(f.stat().st_size for f in resolve_model(ref["codec"]).rglob("*") if f.is_file())
    assert size + codec_size <= 60 * 2**20, (size, codec_size)  # the budget for codec + LM (its adapter too): 60 MiB (what du -sh shows)


def test_default_tts_streams_what_it_speaks_offline(default_pipeline):
    g = Generation(temperature=0.0, max_seconds=4.0)
    offline = default_pipeline.tts("Two plus three is five.", generation=g)
    chunks = list(default_pipeline.tts("Two plus three is five.", stream=True, generation=g))
    assert 0.2 * SAMPLE_RATE <= len(offline) <= 4.0 * SAMPLE_RATE
    np.testing.assert_allclose(np.concatenate(chunks), offline, atol=1e-4)
    assert np.sqrt(np.mean(offline**2)) > 1e-3  # it speaks, it is not silence


def test_default_asr_and_chat_on_silence_give_sensible_results(default_pipeline):
    silence = np.zeros(SAMPLE_RATE, np.float32)
    assert isinstance(default_pipeline.asr(silence, generation=Generation(temperature=0.0, max_seconds=2.0)), str)
    text, reply = default_pipeline.chat(silence, generation=Generation(temperature=0.0, max_seconds=2.0))
    assert isinstance(text, str) and reply.dtype == np.float32


def test_default_asr_and_chat_give_nothing_for_noise(default_pipeline, cli_here, tmp_path):
    """The LM alone transcribes noise as a training sentence; the shipped speech detector keeps it out."""
    from speechlm.training.vad_train import noise

    rng = np.random.default_rng(0)
    fan, beeps = noise("modulated", 2 * SAMPLE_RATE, rng) * 0.05, noise("tone", 2 * SAMPLE_RATE, rng) * 0.05
    assert default_pipeline.asr(fan, generation=Generation(speech_detector=None, asr_check_rounds=0, asr_views=1)) != ""
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    sine = (np.round(0.1 * np.sin(2 * np.pi * 440 * t) * 32767) / 32767).astype(np.float32)  # from the first sample, as PCM16
    assert default_pipeline.asr_many([fan, beeps, sine]) == ["", "", ""]
    text, reply = default_pipeline.chat(fan)
    assert text == "" and len(reply) == 0
    from speechlm.codec.audio import save_audio

    save_audio(tmp_path / "fan.wav", fan)
    r = cli_here("asr", str(tmp_path / "fan.wav"), "--threads", "1")
    assert r.returncode == 0 and r.stdout.strip() == "" and "no speech heard in" in r.stderr, (r.stdout, r.stderr)


def test_readme_main_job_runs_without_a_model_argument(cli, tmp_path):
    out = tmp_path / "hello.wav"
    r = cli("tts", "The capital of France is Paris.", "-o", str(out), "--stream", "--max-seconds", "4", "--words")
    assert r.returncode == 0, r.stderr
    assert len(load_audio(out)) > 0.2 * SAMPLE_RATE
    # --words: where each word was said, in order, inside the speech
    timed = [line.split("\t") for line in r.stdout.splitlines()[1:]]
    assert [w for _, _, w in timed] == ["The", "capital", "of", "France", "is", "Paris"], r.stdout
    times = [(float(a), float(b)) for a, b, _ in timed]
    assert all(0 <= a < b <= c < d for (a, b), (c, d) in zip(times, times[1:])) and times[-1][1] <= len(load_audio(out)) / SAMPLE_RATE + 0.02
    r = cli("asr", str(out))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_default_duplex_model_steps_a_batch():
    model = DuplexSpeechModel.from_pretrained("duplex-default", "codec-16k", text_sampling=GREEDY, audio_sampling=GREEDY)
    state = model.init_state(2)
    user = torch.zeros(2, model.frame_length)
    for _ in range(5):
        pcm, texts, state = model.step(user, state)
    assert pcm.shape == (2, model.frame_length) and len(texts) == 2


def test_serve_and_client_end_to_end_on_the_shipped_duplex_model(cli, tmp_path):
    """`speechlm serve` (default model: duplex-default) + `speechlm client` over a real socket: the
    model hears a spoken question and answers with speech and text; Ctrl-C stops the server cleanly."""
    question = tmp_path / "q.wav"
    save_audio(question, get_teacher("espeak:en-us").synthesize("What is two plus three?", random.Random(0)).audio)
    server = subprocess.Popen(
        # float32: the replies' speech, made as rows of one running batch, is each row's own whatever the timing of the
        # rows (bfloat16 rounds a batch's rows otherwise than alone: the rendering, and what the judge hears, would
        # depend on when the greeting and the reply were made)
        [sys.executable, "-m", "speechlm", "serve", "--port", "0", "--threads", "1", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "server exited early"
            found = re.search(r"(?:AssistedDuplexModel|DuplexSpeechModel) at (ws://\S+)/ws", line)
            url = found.group(1) if found else None
        assert url, "the server never said where it listens"
        r = cli("client", url, "--input", str(question), "-o", str(tmp_path / "reply.wav"), "--fast", "--json", "--listen-seconds", "4")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert report["errors"] == [] and report["reply_seconds"] > 0.2 and report["model"].strip()
        reply = load_audio(tmp_path / "reply.wav")
        assert np.sqrt(np.mean(reply**2)) > 1e-3  # it spoke
        # answer assist (the default): the speech LM heard the question and wrote the reply
        assert "two plus three" in report["user"].lower() and "five" in report["model"].lower(), report
        # the server heard the user start and stop talking (METADATA "user"), in that order, once the question was over
        talk = report["user_events"]
        assert [e["event"] for e in talk[:2]] == ["started", "stopped"] and 1.0 < talk[1]["time"] - talk[0]["time"] < 2.5, talk
        if importlib.util.find_spec("faster_whisper") is not None:  # the [eval] extra: the judge hears the answer
            from speechlm.judge import WhisperJudge

            heard = WhisperJudge(threads=1)(reply)
            assert "five" in words_for_scoring(heard), heard
        # the client writes the replies (its own program: here a script that answers every question alike) and has
        # the model greet first; the server's speech LM hears the question and says what the client wrote
        agent = tmp_path / "agent.py"
        agent.write_text("import sys\nquestion = sys.stdin.read().strip()\nprint('The answer is eleven.')\n")
        r = cli("client", url, "--input", str(question), "-o", str(tmp_path / "agent.wav"), "--fast", "--json", "--listen-seconds", "6",
                "--say", "Hello.", "--reply-command", f"{sys.executable} {agent}")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout.strip().splitlines()[-1])
        assert report["errors"] == [] and "two plus three" in report["user"].lower(), report
        assert "eleven" in report["model"].lower() and "five" not in report["model"].lower(), report  # the client's reply
        events = [e["event"] for e in report["says"]]
        assert events.count("queued") == 2 and events.count("started") == 2 and events.count("done") == 2, report["says"]
        said = load_audio(tmp_path / "agent.wav")
        loud = np.sqrt(np.mean(said[: len(said) // 640 * 640].reshape(-1, 640) ** 2, axis=1)) > 0.01
        assert np.count_nonzero(loud[1:] & ~loud[:-1]) >= 2  # two utterances: the greeting (once the user was quiet), the reply
        if importlib.util.find_spec("faster_whisper") is not None:
            heard = words_for_scoring(WhisperJudge(threads=1)(said))
            assert "eleven" in heard, heard
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_shipped_checker_hears_the_teacher_say_its_own_text_best():
    from speechlm.checker import PronunciationChecker

    checker = PronunciationChecker.from_pretrained("checker-en")
    texts = ["Set a timer for seventeen minutes.", "Turn off the heater in the bedroom.", "It costs three dollars."]
    audio = [get_teacher("espeak:en-us").synthesize(t, random.Random(0)).audio for t in texts]  # 16 kHz
    for i, text in enumerate(texts):
        phonemes = checker.text_phonemes(text)
        assert "<unk>" not in [checker.config.phonemes[k] for k in checker.phoneme_ids(phonemes)]
        scores = checker.score(audio, phonemes)
        assert min(range(len(texts)), key=scores.__getitem__) == i and scores[i] < 0.5, scores
        assert checker.recognize(audio[i])[:3] == phonemes[:3]


def test_default_asr_hears_a_recording_of_several_sentences_piece_by_piece(cli, tmp_path):
    """The model was trained on one sentence an utterance: a recording of three, with the speaker's pauses
    between them, is cut at the pauses and each sentence heard alone."""
    from speechlm.training.espeak import Espeak

    espeak, pause = Espeak.instance(), np.zeros(int(0.5 * SAMPLE_RATE), np.float32)
    said = ["What does a snake say?", "It costs three dollars.", "Which city is the capital of Sweden?"]  # each heard right alone
    parts = [espeak.synthesize(text, "en-us+f4").audio for text in said]  # a held-out voice
    save_audio(tmp_path / "three.wav", np.concatenate([parts[0], pause, parts[1], pause, parts[2]]))
    r = cli("asr", str(tmp_path / "three.wav"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    heard = words_for_scoring(out["text"])
    for word in ("snake", "dollars", "sweden"):
        assert word in heard, out
    # a segment a sentence, in order, each within the audio and between the pauses
    (first, second, third) = out["segments"]
    assert "snake" in words_for_scoring(first["text"]) and "dollars" in words_for_scoring(second["text"])
    assert 0 <= first["start"] < first["end"] < second["start"] < second["end"] < third["start"] < third["end"] <= out["duration"]
    assert abs(second["start"] - (len(parts[0]) + len(pause)) / SAMPLE_RATE) < 0.05
    # word timestamps (--words: the transcript aligned by the pronunciation checker): "dollars" where espeak said it
    timed = cli("asr", str(tmp_path / "three.wav"), "--json", "--words")
    assert timed.returncode == 0, timed.stderr
    words = json.loads(timed.stdout)["words"]
    assert [w["word"].lower() for w in words] == heard and all(w["aligned"] for w in words)
    assert all(0 <= a["start"] < a["end"] <= b["start"] < b["end"] <= out["duration"] for a, b in zip(words, words[1:])), words
    truth = (len(parts[0]) + len(pause) + espeak.synthesize(said[1], "en-us+f4").words[3].start) / SAMPLE_RATE
    assert abs(next(w["start"] for w in words if w["word"] == "dollars") - truth) < 0.06, (words, truth)
    # two sentences (4 s: short enough to be heard whole too): the checker keeps the pieces' transcript
    save_audio(tmp_path / "two.wav", np.concatenate([parts[0], pause, parts[1]]))
    two = cli("asr", str(tmp_path / "two.wav"))
    assert two.returncode == 0 and {"snake", "dollars"} <= set(words_for_scoring(two.stdout)), two.stdout + two.stderr
    whole = cli("asr", str(tmp_path / "three.wav"), "--pause-seconds", "0")  # one piece: the model invents one sentence
    assert whole.returncode == 0 and len(words_for_scoring(whole.stdout)) < len(heard), whole.stdout
    for flag in ("--pause-seconds", "--short-pause-seconds"):
        bad = cli("asr", str(tmp_path / "three.wav"), flag, "-1")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "asr_pause_seconds" in bad.stderr, bad.stderr
