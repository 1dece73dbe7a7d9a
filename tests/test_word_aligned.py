"""Word-aligned speech (``speech_layout="word_aligned"``): word chunks, the training layout
(each word's chunk before its frames; frames partitioned in order), the inference prompt is the
training prefix, decoding (cached == uncached, one run per word, limits), and the pipeline."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.lm import GREEDY, SpeechLM, SpeechLMConfig, load_tokenizer, train_bpe_tokenizer
from speechlm.lm.generate import iter_aligned_audio
from speechlm.lm.layout import IGNORE
from speechlm.lm.prompts import aligned_tts_prompt, chunk_ids, word_chunks
from speechlm.speech import Generation, SpeechPipeline
from speechlm.training.interleave import Audio, TextIds, word_aligned_speech
from speechlm.training.lm_data import render, spoken_qa_task, tts_task

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

Q, C = 4, 16
TEXTS = ["hello world", "the cat sat on the mat", "what is two plus two", "it is four", "set a timer for ten minutes"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(TEXTS * 4, vocab_size=400, min_frequency=1, save_dir=path)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(path)
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024,
    )  # fmt: skip
    lm = SpeechLM.from_backbone(
        backbone, tokenizer, num_codebooks=Q, codebook_size=C, output_head="parallel_delay", delays=[0, 1, 1, 1], mctp_modules=2,
        speech_layout="word_aligned",
    )  # fmt: skip
    with torch.no_grad():  # random heads this small barely depend on their input; make them matter
        for p in (*lm.audio_embedding.parameters(), *lm.audio_head.parameters(), *lm.mctp.parameters()):
            if p.ndim > 1:
                p.mul_(20)
    return lm.eval()


def words_of(text, frames_per_word=3):
    return [{"word": w, "start_frame": frames_per_word * k} for k, w in enumerate(text.rstrip("?.").split())]


def test_word_chunks_cover_the_text():
    for text in ["Hi, Ann.", '"Well" -- he said: no!', "set a timer for ten minutes", "  two  spaces "]:
        chunks = word_chunks(text)
        assert "".join(chunks) == text
        assert len(chunks) == len(text.split()) or text.startswith('"')
    assert word_chunks("Hi, Ann.") == ["Hi", ", Ann."]
    assert word_chunks("...") == []


def test_word_aligned_speech_partitions_the_frames():
    codes = np.arange(20)[:, None].repeat(Q, 1)
    segments = word_aligned_speech([[1], [2], [3]], [{"start_frame": s} for s in (0, 5, 12)], codes)
    assert [type(s) for s in segments] == [TextIds, Audio] * 3
    assert [len(s) for s in segments if isinstance(s, Audio)] == [5, 7, 8]
    assert np.array_equal(np.concatenate([s.codes for s in segments if isinstance(s, Audio)]), codes), "every frame, in order"
    # a word with no frames of its own is spoken with the next; the last with the one before
    merged = word_aligned_speech([[1], [2], [3]], [{"start_frame": s} for s in (0, 5, 5)], codes)
    assert [s.ids for s in merged if isinstance(s, TextIds)] == [[1], [2, 3]]
    last = word_aligned_speech([[1], [2], [3]], [{"start_frame": s} for s in (0, 5, 20)], codes)
    assert [s.ids for s in last if isinstance(s, TextIds)] == [[1], [2, 3]]
    assert word_aligned_speech([[1], [2]], [{"start_frame": 0}], codes) is None, "chunks and words must match"


def test_tts_training_layout_and_prompt_prefix(model):
    v, tok = model.vocab, model.tokenizer
    text = "set a timer for ten minutes."
    codes = np.random.default_rng(0).integers(0, C, size=(18, Q))
    item = tts_task(text, codes, words=words_of(text), tokenizer=tok)
    ex = render(item.segments, model, trained=item.trained)
    prompt, chunks = aligned_tts_prompt(model, text)
    ids = ex.input_ids.tolist()
    # inference prompt + each chunk then its word's 3 frames (+ 1 delay position) ... <|speech_end|> <|eos|>
    expected = list(prompt)
    for chunk in chunks:
        expected += [*chunk, *[v.audio] * 4]
    assert ids == [*expected, v.speech_end, v.eos]
    assert chunks == chunk_ids(tok, ["set", " a", " timer", " for", " ten", " minutes."])
    # loss: every audio position, the end of speech and <|eos|>; not the prompt or the forced chunks
    assert torch.equal(ex.audio_loss_mask, ex.audio_mask)
    assert [t for t in ex.labels.tolist() if t != IGNORE] == [v.speech_end, v.eos]
    assert torch.equal(model.frames_from_layout(ex.audio_codes[ex.audio_mask][:4]), torch.from_numpy(codes[:3]))
    # words that are not the text's: plain layout
    plain = tts_task(text, codes, words=words_of("something else entirely"), tokenizer=tok)
    assert [type(s).__name__ for s in plain.segments] == ["Tag", "Text", "Tag", "Audio", "Tag"]


def test_spoken_qa_word_aligned(model):
    v, tok = model.vocab, model.tokenizer
    question, answer_codes = np.ones((6, Q), int), np.random.default_rng(1).integers(0, C, size=(9, Q))
    item = spoken_qa_task(question, "It is four.", answer_codes, tok, layout="word_aligned", answer_words=words_of("It is four."), answer_spoken="It is four.")
    ex = render(item.segments, model, trained=item.trained)
    answer = tok.encode("It is four.", add_special_tokens=False)
    trained_text = [t for t in ex.labels.tolist() if t != IGNORE]
    # the answer text then <|speech_start|> (where chat's text generation stops), the speech's end, <|end|>, <|eos|>
    assert trained_text == [*answer, v.speech_start, v.speech_end, v.end_of_turn, v.eos]
    assert int(ex.audio_loss_mask.sum()) == 9 + 3  # 3 words x (3 frames + 1 delay position)
    fallback = spoken_qa_task(question, "It is four.", answer_codes, tok, layout="word_aligned", answer_words=None)
    assert [type(s).__name__ for s in fallback.segments][-4:] == ["Tag", "Audio", "Tag", "Tag"], "no timestamps: text first"


def frames_of(steps):
    return [f for s in steps for f in s.frames[0]]


def test_aligned_decoding_cached_equals_uncached_and_limits(model):
    prompt, chunks = aligned_tts_prompt(model, "set a timer for ten minutes")
    cached = list(iter_aligned_audio(model, prompt, chunks, sampling=GREEDY, max_frames_per_chunk=6))
    uncached = list(iter_aligned_audio(model, prompt, chunks, sampling=GREEDY, max_frames_per_chunk=6, use_cache=False))
    a, b = frames_of(cached), frames_of(uncached)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(chunks) <= len(a) <= 6 * len(chunks), "at least one frame per word, at most the cap"
    assert [bool(s.finished[0]) for s in cached].count(True) >= 1 and bool(cached[-1].finished[0])
    assert not any(bool(s.finished[0]) for s in cached[: -model.config.max_delay - 1]), "finished only at the last word's end"
    assert cached[0].backbone_forwards == 1, "audio from the first backbone forward"
    assert all(((f >= 0) & (f < C)).all() for f in a)
    # MCTP: fewer backbone forwards than frames; the whole utterance cap holds
    assert cached[-1].backbone_forwards < len(a)
    assert len(frames_of(iter_aligned_audio(model, prompt, chunks, sampling=GREEDY, max_frames=4))) <= 4
    with pytest.raises(SpeechLMError, match="at least one text chunk"):
        list(iter_aligned_audio(model, prompt, []))


def test_pipeline_speaks_word_by_word(model):
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    lm = SpeechLM(dataclasses.replace(model.config, codec_id=codec.codec_id), model.backbone, model.tokenizer)
    lm.load_state_dict(model.state_dict())
    sp = SpeechPipeline(lm.eval(), codec)
    g = Generation(max_seconds=2.0, max_seconds_per_word=0.2, seed=0)
    audio = sp.tts("Set a timer for 10 minutes.", generation=g)  # digits are spelled out first
    assert audio.dtype == np.float32 and 6 * 640 <= len(audio) <= 6 * 5 * 640
    assert np.allclose(np.concatenate(list(sp.tts("Set a timer for 10 minutes.", stream=True, generation=g))), audio)
    text, reply = sp.chat("what is two plus two", generation=Generation(max_seconds=1.0, max_seconds_per_word=0.2, max_text_tokens=4, seed=0))
    assert isinstance(text, str) and reply.dtype == np.float32
    for bad in ("", "...", "x" * 5000):
        with pytest.raises(SpeechLMError):
            sp.tts(bad, generation=g)


def test_config_rejects_unknown_layout():
    with pytest.raises(SpeechLMError, match="speech_layout"):
        SpeechLMConfig(speech_layout="diagonal")
    assert SpeechLMConfig().speech_layout == "plain"
