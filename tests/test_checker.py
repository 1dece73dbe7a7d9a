"""The pronunciation checker (speechlm.checker): espeak's phonemes, training (exact resume,
save/load), that it hears which text was said, and TTS keeping the candidate it prefers."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.checker import CheckerConfig, PronunciationChecker
from speechlm.codec.errors import SpeechLMError
from speechlm.training.checker_train import CheckerTrainConfig, CheckerTrainer, _edit_distance
from speechlm.training.espeak import Espeak

from .test_speech_pipeline import SHORT, pipeline  # noqa: F401  (the tiny LM + codec fixture)

torch.set_num_threads(1)
SENTENCES = ["Hello world.", "Set a timer for ten minutes.", "The cat sat on the mat.", "Please call my sister."]
TINY = {"channels": 48, "blocks": 2, "kernel_size": 5}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A synth-style corpus (manifest.jsonl + audio) of the teacher voice speaking SENTENCES."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    rows = []
    for i, text in enumerate(SENTENCES):
        result = Espeak.instance().synthesize(text, "en-us")
        sf.write(root / "audio" / f"{i}.flac", result.audio, result.sample_rate)
        rows.append({"id": str(i), "text": text, "audio": f"audio/{i}.flac", "duration": len(result.audio) / result.sample_rate,
                     "voice": "espeak:en-us"})
    rows.append({**rows[0], "id": "gb", "voice": "espeak:en-gb"})  # another voice: left out by the voice prefix
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(corpus, out, **kw) -> CheckerTrainConfig:
    base = dict(data=[str(corpus)], out=str(out), codec=None, held_out=1, steps=200, batch_size=4, lr=3e-3, warmup_steps=10,
                eval_every=1000, threads=1, model=TINY)
    return CheckerTrainConfig(**{**base, **kw})


def test_espeak_reports_the_phonemes_it_speaks():
    world = Espeak.instance().synthesize("Hello world.", "en-us").phonemes
    word = Espeak.instance().synthesize("Hello word.", "en-us").phonemes
    assert 6 <= len(world) <= 10 and world[0] == "h" and world[-1] == "d"
    assert world != word and world == Espeak.instance().synthesize("Hello world.", "en-us").phonemes


def test_edit_distance():
    assert _edit_distance(list("kitten"), list("sitting")) == 3 and _edit_distance([], ["a"]) == 1


def test_checker_training_resumes_exactly_and_saves_what_it_scores(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run", steps=10)
    first = CheckerTrainer(config)
    assert len(first.train_clips) == 3 and len(first.held_clips) == 1  # the en-gb record left out
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    expected = first.train_step()
    resumed = CheckerTrainer(config)  # its clips from the cache the first run wrote
    assert (tmp_path / "run" / "data" / "clips.json").is_file()
    assert all(np.array_equal(a.audio, b.audio) and a.phonemes == b.phonemes for a, b in zip(first.train_clips, resumed.train_clips))
    assert resumed.step == 3
    assert resumed.train_step() == pytest.approx(expected, rel=1e-6)

    model = first.model.eval()
    model.save_pretrained(tmp_path / "checker")
    loaded = PronunciationChecker.from_pretrained(tmp_path / "checker")
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())  # the files hold float16
    audio = [c.audio.astype(np.float32) / 32767 for c in first.train_clips]
    phonemes = first.train_clips[0].phonemes
    assert loaded.score(audio, phonemes) == rounded.score(audio, phonemes)
    assert loaded.config == model.config
    with pytest.raises(SpeechLMError, match="no pronunciation checker"):
        PronunciationChecker.from_pretrained(tmp_path)


def test_checker_hears_which_text_was_said(corpus, tmp_path):
    trainer = CheckerTrainer(_config(corpus, tmp_path / "run", held_out=0, time_masks=0, freq_masks=0))
    for _ in range(trainer.config.steps):
        trainer.train_step()
    model = trainer.model.eval()
    clips = trainer.train_clips
    for i, clip in enumerate(clips):
        audio = clip.audio.astype(np.float32) / 32767
        own = model.score([audio], clip.phonemes)[0]
        others = [model.score([audio], other.phonemes)[0] for j, other in enumerate(clips) if j != i]
        assert own < min(others), (i, own, others)
    assert model.score([np.zeros(100, np.float32)], clips[0].phonemes) == [float("inf")]  # too short to say them


class _FakeChecker:
    def __init__(self, scores):
        self.scores, self.heard = scores, []

    def text_phonemes(self, text):
        return ["h", "ə"]

    def score(self, audios, phonemes):
        self.heard.append(audios)
        return list(self.scores)


def test_tts_keeps_the_candidate_the_checker_prefers(pipeline):  # noqa: F811
    g = dataclasses.replace(SHORT, temperature=0.0, codebook_temperatures=None, candidates=3, checker="fake")
    checker = pipeline._checkers["fake"] = _FakeChecker([2.0, 0.5, 1.0])
    candidates = pipeline.speech_candidates("hello world", lambda gs: pipeline.tts_batch(["hello world"] * len(gs), gs), g)
    assert [s for _, s in candidates] == [2.0, 0.5, 1.0]
    first = pipeline.tts("hello world", generation=dataclasses.replace(g, candidates=1))
    assert np.array_equal(candidates[0][0], first)  # candidate 1 = the configured decoding
    gens = pipeline.candidate_generations(g)
    assert gens[0].codebook_temperatures is None and gens[1].codebook_temperatures == (g.candidate_temperature, 0.0) * 2
    assert [x.seed for x in gens] == [0, 1, 2]
    chosen = pipeline.tts("hello world", generation=g)
    assert np.array_equal(chosen, candidates[1][0]) and len(checker.heard[-1]) == 3
    with pytest.raises(SpeechLMError, match="stream=False"):
        pipeline.tts("hello world", stream=True, generation=g)
    with pytest.raises(SpeechLMError, match="candidates must be"):
        pipeline.candidate_generations(dataclasses.replace(g, candidates=0))
    text, audio = pipeline.chat("what is two plus three", generation=dataclasses.replace(g, max_text_tokens=3))
    assert isinstance(text, str) and (not text or len(checker.heard[-1]) == 3)


def test_cli_tts_with_candidates(pipeline, corpus, tmp_path, cli_here):  # noqa: F811
    trainer = CheckerTrainer(_config(corpus, tmp_path / "run", steps=2))
    trainer.model.save_pretrained(tmp_path / "checker")
    pipeline.save_pretrained(tmp_path / "sp")
    model = ["--model", str(tmp_path / "sp"), "--threads", "1", "--dtype", "float32", "--temperature", "0.8", "--max-seconds", "0.4"]
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "out.wav"), *model, "--candidates", "2", "--checker", str(tmp_path / "checker"))
    assert r.returncode == 0, r.stderr
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "out.wav"), *model, "--candidates", "2", "--stream")
    assert r.returncode == 2 and "do not go together" in r.stderr
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "out.wav"), *model, "--candidates", "2", "--checker", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_checker_config_defaults_are_json_round_trippable():
    config = CheckerConfig(phonemes=["<blank>", "<unk>", "a"])
    assert CheckerConfig(**json.loads(json.dumps(config.to_json()))) == config


def test_the_clip_cache_round_trips_and_an_unfinished_one_is_not_read(tmp_path):
    from speechlm.training.checker_train import CACHE_META, Clip, load_clips, save_clips

    clips = [Clip(np.arange(5, dtype=np.int16), ["h", "a"], False), Clip(np.zeros(0, np.int16), ["b"], True),
             Clip(-np.arange(3, dtype=np.int16), ["a"], True)]  # fmt: skip
    save_clips(clips, ["<blank>", "<unk>", "a", "h", "b"], tmp_path / "data")
    back = load_clips(tmp_path / "data")
    assert back["vocabulary"] == ["<blank>", "<unk>", "a", "h", "b"]
    assert [(c.audio.tolist(), c.phonemes, c.codec) for c in back["clips"]] == [(c.audio.tolist(), c.phonemes, c.codec) for c in clips]
    (tmp_path / "data" / CACHE_META).unlink()  # as if the run stopped while writing the audio
    with pytest.raises(FileNotFoundError):
        load_clips(tmp_path / "data")


def test_the_first_candidate_is_kept_unless_another_is_clearly_better():
    from speechlm.speech import choose_candidate

    assert choose_candidate([0.3, 0.25, 0.28], margin=0.1) == 0, "near ties keep the configured decoding"
    assert choose_candidate([0.3, 0.25, 0.1], margin=0.1) == 2
    assert choose_candidate([0.3, 0.1, 0.1], margin=0.1) == 1, "the earliest of the lowest"
    assert choose_candidate([0.3, 0.25], margin=0.0) == 1 and choose_candidate([float("inf"), 2.0], margin=0.1) == 1
    with pytest.raises(SpeechLMError):
        choose_candidate([])


def test_voice_languages_and_prefixes():
    from speechlm.training.checker_train import _prefixes
    from speechlm.training.teachers import espeak_language

    assert espeak_language("espeak:en-gb+f3") == "en-gb" and espeak_language("piper:joe") == "en-us"
    with pytest.raises(SpeechLMError, match="no espeak-ng language"):
        espeak_language("piper:nobody")
    assert _prefixes("espeak:, piper:") == ("espeak:", "piper:") and "piper:joe".startswith(_prefixes("espeak:,piper:"))
