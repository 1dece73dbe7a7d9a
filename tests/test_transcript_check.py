"""Checking a transcript against the sounds (speechlm.transcript_check): the lexicon, the one-word edits,
the search (with a stand-in ear and with the shipped checker hearing espeak-ng), the LM's transcript
score, and the pipeline's ASR with and without the check."""

import copy
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from speechlm.checker import PronunciationChecker
from speechlm.codec.errors import SpeechLMError
from speechlm.lm.ensemble import _forward, _log_probs, _new_cache, transcript_log_probs
from speechlm.lm.generate import PromptBatch
from speechlm.lm.prompts import asr_prompt
from speechlm.speech import Generation
from speechlm.training.checker_train import _edit_distance
from speechlm.training.espeak import Espeak
from speechlm.training.textgen import voice_split
from speechlm.transcript_check import Lexicon, _tokens, build_lexicon, check_transcript, edits, lexicon_words, text_of

from .test_speech_pipeline import SHORT, pipeline  # noqa: F401  (the tiny LM + codec fixture)

torch.set_num_threads(1)
WORDS = ["what", "does", "a", "snake", "duck", "say", "the", "sky", "is", "blue"]


def _phonemes(word: str) -> list[str]:
    return list(word.lower())  # a stand-in: letters as phonemes


def test_lexicon_words_keep_names_and_lower_a_sentences_first_word():
    words = lexicon_words(["Which city is the capital of Sweden?", "Sweden is cold. Which one?", "I think Ben saw 3 cats.", "The sky."])
    assert "which" in words and "Which" not in words  # only ever first in a sentence
    assert "Sweden" in words and "sweden" not in words  # a name, written as mid-sentence
    assert "I" in words and "Ben" in words and "three" in words  # numbers spelled out
    assert "the" in words and "The" not in words
    assert len(words) == len({w.lower() for w in words})


def test_lexicon_round_trips(tmp_path):
    lexicon = build_lexicon(["What does a snake say?"], phonemize=_phonemes)
    assert lexicon.words == ["what", "does", "a", "snake", "say"] and lexicon.phonemes["snake"] == list("snake")
    again = Lexicon.load(lexicon.save(tmp_path / "lexicon.json"))
    assert again == lexicon
    with pytest.raises(SpeechLMError, match="no lexicon"):
        Lexicon.load(tmp_path / "missing.json")
    for bad in ("{not json", '{"voice": "en-us"}', '{"phonemes": [1, 2]}', b"\xff\xfe"):
        (tmp_path / "bad.json").write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(SpeechLMError, match="not a lexicon file"):
            Lexicon.load(tmp_path / "bad.json")


def test_edits_substitute_drop_and_insert_keeping_case_and_punctuation():
    lexicon = Lexicon({w: _phonemes(w) for w in ["snake", "what", "Ben"]})
    tokens = _tokens("What does a duck say?")
    made = edits(tokens, lexicon)
    texts = {text_of(t) for t in made}
    assert len(texts) == len(made)  # each text once
    assert "What does a snake say?" in texts  # substituted
    assert "Snake does a duck say?" in texts  # a sentence's first word is capitalized
    assert "What does a duck?" in texts and "Does a duck say?" in texts  # dropped, punctuation and case kept
    assert "What does a duck say snake?" in texts and "Ben what does a duck say?" in texts  # inserted
    assert "What does a duck say?" not in texts  # an edit changes something
    # substitutions (not by the word itself), drops, insertions ("what" before or after "What" is one text)
    assert len(texts) == 5 * 3 - 1 + 5 + 6 * 3 - 1
    assert _tokens("It costs $3.") is None  # a token that is not a word: left alone


def _fake_ear(truth: str):
    """An 'acoustic' NLL: 3 nats per phoneme edit away from the truth's phonemes."""
    target = [p for w in truth.lower().strip("?.").split() for p in _phonemes(w)]
    return lambda phs: [3.0 * _edit_distance(p, target) for p in phs]


def test_the_search_finds_the_word_the_ear_hears():
    lexicon = Lexicon({w: _phonemes(w) for w in WORDS})
    flat = lambda texts: [0.0] * len(texts)  # noqa: E731
    kw = dict(best_path_nll=0.0, skip_gap=0.0)
    assert check_transcript("What does a duck say?", lexicon, _fake_ear("what does a snake say"), flat, _phonemes, **kw) == "What does a snake say?"
    # two words wrong: two rounds
    assert check_transcript("What does the duck say?", lexicon, _fake_ear("what does a snake say"), flat, _phonemes, **kw) == "What does a snake say?"
    one = check_transcript("What does the duck say?", lexicon, _fake_ear("what does a snake say"), flat, _phonemes, rounds=1, **kw)
    assert one in ("What does a duck say?", "What does the snake say?")  # one edit a round
    assert check_transcript("What does a duck say?", lexicon, _fake_ear("what does a snake say"), flat, _phonemes, rounds=0, **kw) == "What does a duck say?"
    # the LM term can veto an edit the ear wants
    veto = lambda texts: [0.0 if t == "What does a duck say?" else -100.0 for t in texts]  # noqa: E731
    assert check_transcript("What does a duck say?", lexicon, _fake_ear("what does a snake say"), veto, _phonemes, **kw) == "What does a duck say?"
    # already heard as said (within skip_gap of the best path): no search
    calls = []
    ear = _fake_ear("what does a snake say")
    counting = lambda phs: calls.append(len(phs)) or ear(phs)  # noqa: E731
    assert check_transcript("What does a duck say?", lexicon, counting, flat, _phonemes, best_path_nll=12.0, skip_gap=1.0) == "What does a duck say?"
    assert calls == [1]
    # a transcript with far fewer (or more) phonemes than the checker reads: left alone
    n = len("whatdoesaducksay")
    assert check_transcript("What does a duck say?", lexicon, ear, flat, _phonemes, heard_phonemes=3 * n, **kw) == "What does a duck say?"
    assert check_transcript("What does a duck say?", lexicon, ear, flat, _phonemes, heard_phonemes=n // 3, **kw) == "What does a duck say?"
    assert check_transcript("What does a duck say?", lexicon, ear, flat, _phonemes, heard_phonemes=n + 2, **kw) == "What does a snake say?"
    # too long a transcript: left alone
    assert check_transcript("What does a duck say?", lexicon, ear, flat, _phonemes, max_words=4, **kw) == "What does a duck say?"
    # not words (digits): left alone
    assert check_transcript("It is 5.", lexicon, ear, flat, _phonemes, **kw) == "It is 5."


def test_the_shipped_checker_hears_the_right_word_in_espeak_speech():
    checker = PronunciationChecker.from_pretrained("checker-en")
    lexicon = build_lexicon(["What does a snake say?", "What does a duck say?", "Which color is the sky?", "A cow moos."], voice="en-us")
    voice = "en-us+f4"  # a held-out voice variant
    assert voice_split(f"espeak:{voice}") == "test"
    audio = Espeak.instance().synthesize("What does a snake say?", voice).audio
    log_probs = checker.log_probs(audio)
    flat = lambda texts: [0.0] * len(texts)  # noqa: E731
    out = check_transcript("What does a duck say?", lexicon, lambda phs: checker.sequence_nll(log_probs, phs), flat,
                           lambda w: [], best_path_nll=checker.best_path_nll(log_probs))
    assert out == "What does a snake say?"
    said, other = (out.lower().strip("?").split(), "what does a duck say".split())
    texts = [[p for w in t for p in lexicon.phonemes[w]] for t in (said, other)]
    nll = checker.sequence_nll(log_probs, texts)
    assert len(nll) == 2 and all(np.isfinite(nll)) and nll[0] < nll[1]
    # the spliced scores the check uses are the same CTC likelihoods
    ref = texts[1]
    spliced = checker.edit_nlls(log_probs, ref, [(len(ref), [], 0), (0, texts[0], 0)])  # itself, and all replaced
    assert spliced == pytest.approx([nll[1], nll[0]], rel=1e-5)
    assert check_transcript("What does a duck say?", lexicon, lambda phs: checker.sequence_nll(log_probs, phs), flat, lambda w: [],
                            best_path_nll=checker.best_path_nll(log_probs),
                            acoustic_edits=lambda r, e: checker.edit_nlls(log_probs, r, e)) == "What does a snake say?"
    assert checker.count_heard(log_probs) > 0
    with pytest.raises(SpeechLMError):
        checker.sequence_nll(log_probs, [[]])


def test_transcript_log_probs_equal_one_teacher_forced_forward(pipeline):  # noqa: F811
    lm = pipeline.lm
    frames = torch.randint(0, pipeline.codec.config.codebook_size, (12, lm.config.num_codebooks))
    ids, codes = asr_prompt(lm, frames)
    prompt = PromptBatch.build(lm, [ids], [codes])
    candidates = [lm.tokenizer.encode("hello world", add_special_tokens=False), lm.tokenizer.encode("five", add_special_tokens=False)]
    got = transcript_log_probs(lm, prompt)(candidates)
    for c, score in zip(candidates, got.tolist()):
        seq = [*c, lm.vocab.eos]
        full = PromptBatch.build(lm, [ids + seq[:-1]], [codes])
        valid = full.attention_mask
        hidden = _forward(lm, lm.embed(full.input_ids, full.audio_codes, full.audio_mask), valid, (valid.long().cumsum(1) - 1), _new_cache(lm))
        log_probs = _log_probs(lm, hidden[0, len(ids) - 1 :])
        expected = sum(float(log_probs[i, t]) for i, t in enumerate(seq))
        assert score == pytest.approx(expected, abs=1e-3)
    assert got.shape == (2,) and transcript_log_probs(lm, prompt)([]).numel() == 0


def test_the_pipeline_checks_transcripts_unless_off_or_without_a_lexicon(pipeline, tmp_path, monkeypatch, caplog):  # noqa: F811
    speech = Espeak.instance().synthesize("hello world", "en-us").audio
    seen = []
    real = type(pipeline).check_transcript

    def spy(self, transcript, audio, prompt, g, prefilled=None):
        seen.append((transcript, prefilled is not None))
        return real(self, transcript, audio, prompt, g, prefilled)

    monkeypatch.setattr(type(pipeline), "check_transcript", spy)
    off = pipeline.asr(speech, generation=dataclasses.replace(SHORT, asr_views=1, asr_check_rounds=0))
    assert seen == []
    on = pipeline.asr(speech, generation=dataclasses.replace(SHORT, asr_views=1))
    # the LM's transcript went through the check, with the views' prompts run once for both
    assert (seen == [(off, True)]) == bool(off.strip())
    assert isinstance(on, str)
    with pytest.raises(SpeechLMError, match="asr_check_rounds"):
        pipeline.asr(speech, generation=dataclasses.replace(SHORT, asr_check_rounds=-1))
    with pytest.raises(SpeechLMError, match="asr_check_shortlist"):
        pipeline.asr(speech, generation=dataclasses.replace(SHORT, asr_check_shortlist=0))
    # a checker directory without a lexicon: unchecked, with a warning
    bare = tmp_path / "checker"
    PronunciationChecker.from_pretrained("checker-en").save_pretrained(bare)
    own = copy.copy(pipeline)
    own._lexicons = {}
    with caplog.at_level(logging.WARNING):
        assert own.check_transcript("hello world", speech, None, dataclasses.replace(SHORT, checker=str(bare))) == "hello world"
    assert "no lexicon.json" in caplog.text


def test_shipped_default_hears_a_held_out_question_through_the_check():
    from speechlm.speech import SpeechPipeline

    sp = SpeechPipeline.from_pretrained("speechlm-default")
    audio = Espeak.instance().synthesize("What does a snake say?", "en-us+f4").audio  # a held-out voice
    assert sp.asr(audio, generation=Generation(asr_check_rounds=0)) == "What does a duck say?"  # a training question's word
    assert sp.asr(audio) == "What does a snake say?"  # the check (on by default) hears the word said
    assert sp.lexicon("checker-en") is not None and "Sweden" in sp.lexicon("checker-en").phonemes


def test_the_checker_tells_which_transcript_sounds_more_like_the_audio():
    from speechlm.speech import SpeechPipeline

    sp = SpeechPipeline.from_pretrained("speechlm-default")
    audio = Espeak.instance().synthesize("Have you seen my yellow ticket? I left it in the beach.", "en-us+f4").audio
    right, wrong = "Have you seen my yellow ticket? I left it in the beach.", "She was you in my ticket. Isla are ticket beach."
    g = Generation()
    assert sp._sounds_more_like(audio, right, wrong, g) and not sp._sounds_more_like(audio, wrong, right, g)
    assert not sp._sounds_more_like(audio, "", right, g) and sp._sounds_more_like(audio, right, "", g)


def test_cli_data_lexicon(cli, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("What does a snake say?\nThe capital of Sweden is Stockholm.\n")
    r = cli("data", "lexicon", "--texts", str(texts), "-o", str(tmp_path / "lexicon.json"))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "lexicon.json").read_text())
    assert data["voice"] == "en-us" and "Sweden" in data["phonemes"] and data["phonemes"]["snake"]
    r = cli("data", "lexicon", "--texts", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not found" in r.stderr


def test_cli_asr_check_rounds(cli_here, tmp_path):
    from speechlm.codec.audio import save_audio

    save_audio(tmp_path / "q.wav", Espeak.instance().synthesize("What does a snake say?", "en-us+f4").audio)
    model = ["--threads", "1", "--dtype", "float32"]
    checked = cli_here("asr", str(tmp_path / "q.wav"), *model)
    unchecked = cli_here("asr", str(tmp_path / "q.wav"), *model, "--check-rounds", "0")
    assert checked.returncode == unchecked.returncode == 0, checked.stderr + unchecked.stderr
    assert checked.stdout.strip() == "What does a snake say?" and unchecked.stdout.strip() == "What does a duck say?"
    bad = cli_here("asr", str(tmp_path / "q.wav"), *model, "--check-rounds", "-1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "asr_check_rounds" in bad.stderr


def test_the_shipped_lexicon_is_what_its_command_builds():
    """checker-en/lexicon.json is rebuilt exactly by the command in its provenance (docs/lm.md step 12)."""
    from speechlm.speech import resolve_model
    from speechlm.training import textgen

    directory = resolve_model("checker-en")
    command = json.loads((directory / "provenance.json").read_text())["lexicon"]["command"].split()
    sources = command[command.index("--builtin") + 1].split(",")
    count = int(command[command.index("--count") + 1])
    texts = [item["text"] for s in sources for item in textgen.generate(s, count, split="train", seed=0)]
    assert build_lexicon(texts) == Lexicon.load(directory / "lexicon.json")
