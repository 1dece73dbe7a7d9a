"""Speech-LM training data: rendering (audio positions, labels, both heads), the task mixture
(determinism, held-out rows, answer speech), collation, packing, the text corpus and tokenizer."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import PromptBatch, SpeechLM, load_tokenizer, train_bpe_tokenizer
from speechlm.lm.layout import IGNORE
from speechlm.training.interleave import Audio, Tag, Text, fixed_ratio_chunks
from speechlm.training.lm_data import (
    LMFormat,
    TaskMixture,
    TextCorpus,
    asr_task,
    build_text_corpus,
    chat_task,
    collate,
    interleave_task,
    render,
    spoken_qa_task,
    task_prompt,
    train_tokenizer,
    tts_task,
)

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

Q, C = 4, 16
HELDOUT_CODE = C - 1  # only held-out rows of the fake corpus use it
TEXTS = ["hello world", "the cat sat on the mat", "what is two plus two", "it is four", "the capital of france is paris"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(TEXTS * 4, vocab_size=400, min_frequency=1, save_dir=path)
    return path


def make_model(tokenizer_dir, head="depth") -> SpeechLM:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512,
    )  # fmt: skip
    return SpeechLM.from_backbone(
        backbone, tokenizer, num_codebooks=Q, codebook_size=C, output_head=head, depth_dim=32, depth_heads=2, mctp_modules=2
    )


def frames(n, seed=0, high=HELDOUT_CODE):
    return np.random.default_rng(seed).integers(0, high, size=(n, Q))


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    out, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_tts_and_asr_alignment(tokenizer_dir, head):
    model = make_model(tokenizer_dir, head)
    v, tok = model.vocab, model.tokenizer
    codes = frames(7)
    tail = model.config.max_delay

    tts = tts_task("hello world", codes)
    ex = render(tts.segments, model, trained=tts.trained)
    text_ids = tok.encode("hello world", add_special_tokens=False)
    P = 7 + tail
    assert ex.input_ids.tolist() == [v.bos, v.tasks["<|tts|>"], *text_ids, v.speech_start, *[v.audio] * P, v.speech_end, v.eos]
    ((a, b),) = runs(ex.audio_mask)
    assert (a, b) == (len(text_ids) + 3, len(text_ids) + 3 + P)
    # audio positions carry the frames in the model's layout; no codes elsewhere
    assert torch.equal(model.frames_from_layout(ex.audio_codes[a:b]), torch.from_numpy(codes))
    assert (ex.audio_codes[~ex.audio_mask] == C).all()
    # TTS: loss on the speech, its end and <|eos|>; not on the prompt text
    assert torch.equal(ex.audio_loss_mask, ex.audio_mask)
    assert [(i, t) for i, t in enumerate(ex.labels.tolist()) if t != IGNORE] == [(b, v.speech_end), (b + 1, v.eos)]

    asr = asr_task(codes, "the cat sat")
    ex = render(asr.segments, model, trained=asr.trained)
    transcript = tok.encode("the cat sat", add_special_tokens=False)
    assert not ex.audio_loss_mask.any() and ex.audio_mask.sum() == P
    trained = ex.labels[ex.labels != IGNORE].tolist()
    assert trained == [*transcript, v.eos]
    assert ex.labels[: -len(trained)].eq(IGNORE).all()  # the transcript is the end of the sequence

    # the model's own targets agree: TTS has F frames (+ delay tail) and one "speech ends" target; ASR none
    batch = collate([render(tts.segments, model, trained=tts.trained), ex], v.pad, C)
    out = model(**batch)
    assert out.audio_targets.shape[0] == P + 1
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_spoken_qa_and_interleave_alignment(tokenizer_dir, head):
    model = make_model(tokenizer_dir, head)
    v, tok = model.vocab, model.tokenizer
    question, answer_codes = frames(6, 1), frames(20, 2)
    answer_ids = tok.encode("it is four", add_special_tokens=False)
    qa = spoken_qa_task(question, "it is four", answer_codes, tok)  # text first, then its speech
    ex = render(qa.segments, model, trained=qa.trained)
    (q0, q1), (a0, a1) = runs(ex.audio_mask)
    assert torch.equal(model.frames_from_layout(ex.audio_codes[q0:q1]), torch.from_numpy(question))
    assert torch.equal(model.frames_from_layout(ex.audio_codes[a0:a1]), torch.from_numpy(answer_codes))
    assert not ex.audio_loss_mask[q0:q1].any() and ex.audio_loss_mask[a0:a1].all()
    assert ex.labels[ex.labels != IGNORE].tolist() == [*answer_ids, v.speech_start, v.speech_end, v.end_of_turn, v.eos]
    ids, _ = task_prompt("spoken_qa", model, codes=question)
    assert ex.input_ids[: len(ids)].tolist() == ids  # the inference prompt is the training prefix

    qa = spoken_qa_task(question, "it is four", answer_codes, tok, text_per_chunk=2, audio_per_chunk=8, first_text=1, layout="fixed_ratio")
    ex = render(qa.segments, model, trained=qa.trained)
    speech = runs(ex.audio_mask)
    assert len(speech) >= 3  # the question, then the answer in chunks (chunks left after the text runs out form one run)
    q0, q1 = speech[0]
    assert torch.equal(model.frames_from_layout(ex.audio_codes[q0:q1]), torch.from_numpy(question))
    answer = torch.cat([model.frames_from_layout(ex.audio_codes[a:b]) for a, b in speech[1:]])
    assert torch.equal(answer, torch.from_numpy(answer_codes))
    assert not ex.audio_loss_mask[q0:q1].any() and all(ex.audio_loss_mask[a:b].all() for a, b in speech[1:])
    assistant = ex.input_ids.tolist().index(v.roles["<|assistant|>"])
    assert ex.labels[: assistant + 1].eq(IGNORE).all()  # the user's turn and the role tag are context
    assert ex.labels[ex.labels != IGNORE].tolist() == [*answer_ids, v.speech_end, v.end_of_turn, v.eos]

    text_only = spoken_qa_task(question, "it is four", None, tok)
    ex = render(text_only.segments, model, trained=text_only.trained)
    assert len(runs(ex.audio_mask)) == 1 and not ex.audio_loss_mask.any()
    assert ex.labels[ex.labels != IGNORE].tolist() == [*answer_ids, v.end_of_turn, v.eos]

    words = [{"word": w, "start_frame": 3 * i, "end_frame": 3 * i + 3} for i, w in enumerate("the cat sat on the mat".split())]
    codes = frames(18, 3)
    for seed in range(5):
        item = interleave_task(words, codes, random.Random(seed), p_switch=0.5)
        ex = render(item.segments, model, trained=item.trained)
        # interleaved: every text token (but <|bos|>) and every audio position is trained
        text = ~ex.audio_mask
        assert torch.equal(ex.labels[1:][text[1:]], ex.input_ids[1:][text[1:]])
        assert torch.equal(ex.audio_loss_mask, ex.audio_mask)
        spans = [s.codes for s in item.segments if isinstance(s, Audio)]
        for (a, b), span in zip(runs(ex.audio_mask), spans):
            assert torch.equal(model.frames_from_layout(ex.audio_codes[a:b]), torch.from_numpy(span))


def test_adjacent_audio_is_one_run_and_chat_labels(tokenizer_dir):
    model = make_model(tokenizer_dir, "parallel_delay")
    codes = frames(20)
    segments = fixed_ratio_chunks([5, 6], codes, text_per_chunk=1, audio_per_chunk=4)  # text runs out: audio chunks follow each other
    ex = render(segments, model)
    spans = runs(ex.audio_mask)
    assert [b - a for a, b in spans] == [4 + 3, 16 + 3]  # the last four chunks form one delayed run
    assert torch.equal(model.frames_from_layout(ex.audio_codes[spans[-1][0] : spans[-1][1]]), torch.from_numpy(codes[4:]))
    with pytest.raises(SpeechLMError, match="adjacent audio"):
        render([Audio(codes[:2]), Audio(codes[2:4])], model, trained=[True, False])
    with pytest.raises(SpeechLMError, match="unknown tag"):
        render([Tag("nonsense")], model)

    v, tok = model.vocab, model.tokenizer
    chat = chat_task([("user", "hello"), ("assistant", "hello world"), ("user", "the cat"), ("assistant", "it is four")])
    ex = render(chat.segments, model, trained=chat.trained)
    expected = [*tok.encode("hello world", add_special_tokens=False), v.end_of_turn, *tok.encode("it is four", add_special_tokens=False)]
    assert ex.labels[ex.labels != IGNORE].tolist() == [*expected, v.end_of_turn, v.eos]


def test_task_prompts_are_the_training_prefix(tokenizer_dir):
    model = make_model(tokenizer_dir, "parallel_delay")
    codes = frames(5)
    ids, prompt_codes = task_prompt("tts", model, text="hello world")
    full = render(tts_task("hello world", codes).segments, model)
    assert full.input_ids[: len(ids)].tolist() == ids and ids[-1] == model.vocab.speech_start and prompt_codes.shape == (0, Q)
    ids, prompt_codes = task_prompt("asr", model, codes=codes)
    full = render(asr_task(codes, "hello").segments, model)
    assert full.input_ids[: len(ids)].tolist() == ids
    assert torch.equal(prompt_codes, full.audio_codes[full.audio_mask])
    PromptBatch.build(model, [ids], [prompt_codes])  # usable as a generation prompt
    with pytest.raises(SpeechLMError, match="needs codes"):
        task_prompt("spoken_qa", model, text="hi")


# -- the mixture ------------------------------------------------------------------------------------


def write_token_corpus(directory, rows_and_codes, codes_per_frame=Q, codebook_size=C):
    """A tokenized corpus as `speechlm data tokenize` writes it (one chunk)."""
    directory.mkdir(parents=True)
    settings = {"corpus": "fake", "codec": "fake", "codec_id": "fake-codec", "frame_rate": 25.0, "codes_per_frame": codes_per_frame,
                "codebook_size": codebook_size, "chunk_size": 1000}  # fmt: skip
    (directory / "tokenize_config.json").write_text(json.dumps(settings))
    arrays, index, offset = [], [], 0
    for row, codes in rows_and_codes:
        index.append({**row, "chunk": 0, "offsets": [offset], "num_frames": len(codes)})
        arrays.append(codes)
        offset += len(codes)
    np.save(directory / "codes-00000.npy", np.concatenate(arrays).astype(np.int16))
    (directory / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    return directory


def utterance(i, text, voice="espeak:en-us", split="train", voice_split="train", **extra):
    words = [{"word": w, "start_frame": 3 * k, "end_frame": 3 * k + 3} for k, w in enumerate(text.rstrip("?.").split())]
    held_out = split != "train" or voice_split != "train"
    codes = np.full((3 * len(words) + 2, Q), HELDOUT_CODE) if held_out else frames(3 * len(words) + 2, seed=i)
    row = {"id": f"u{i}", "text": text, "voice": voice, "voice_split": voice_split, "split": split, "words": words, **extra}
    return row, codes


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    rows = [
        utterance(0, "hello world"),
        utterance(1, "the cat sat on the mat", voice="piper:joe"),
        utterance(2, "what is two plus two?", answer="It is four."),
        utterance(3, "It is four.", voice="piper:joe"),  # the answer's speech, matched by its text
        utterance(4, "what is the capital of France?", answer="The capital of France is Paris."),  # no answer speech
        utterance(5, "a held out sentence", split="test"),
        utterance(6, "a held out voice", voice="espeak:en-us+f4", voice_split="test", answer="It is four."),
    ]
    return write_token_corpus(tmp_path_factory.mktemp("tok") / "corpus", rows)


def test_mixture_is_a_pure_function_of_seed_step_index(tokenizer_dir, corpus_dir):
    model = make_model(tokenizer_dir, "parallel_delay")
    lm = LMFormat.from_model(model)
    text = build_text_corpus(10, sources=["arithmetic", "everyday"])
    weights = {"tts": 1, "asr": 1, "interleave": 1, "spoken_qa": 1, "text": 1}
    mix = TaskMixture(lm, [corpus_dir], weights, text=text, seed=3, max_length=256, assistant_voices=["piper:joe"])
    again = TaskMixture(lm, [corpus_dir], weights, text=text, seed=3, max_length=256, assistant_voices=["piper:joe"])
    other = TaskMixture(lm, [corpus_dir], weights, text=text, seed=4, max_length=256, assistant_voices=["piper:joe"])
    assert mix.pools["tts"] == [(0, 1), (0, 3)]  # assistant voice only
    keys = [(s, i) for s in range(12) for i in range(4)]
    first = [mix.example(s, i) for s, i in keys]
    reversed_order = [again.example(s, i) for s, i in reversed(keys)][::-1]
    for a, b in zip(first, reversed_order):
        assert a.task == b.task and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.audio_codes, b.audio_codes)
    assert any(not torch.equal(a.input_ids, other.example(s, i).input_ids) for a, (s, i) in zip(first, keys))
    counts = Counter(e.task for e in first)
    assert set(counts) == set(weights)
    for e in first:
        assert len(e) <= 256
        assert not (e.audio_codes == HELDOUT_CODE).any(), "held-out text and voices never reach training"
        if e.task == "spoken_qa" and e.audio_loss_mask.any():
            # the only answer with speech is "It is four." (row 3, assistant voice)
            assert torch.equal(
                e.audio_codes[e.audio_loss_mask][:1], model.audio_layout(torch.from_numpy(utterance(3, "It is four.")[1]))[:1]
            )
    assert any(e.task == "spoken_qa" and e.audio_loss_mask.any() for e in first)

    batch = mix.batch(5, range(4))
    lengths = [len(mix.example(5, i)) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths))
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][b, :n].all()  # right padding
        assert (batch["labels"][b, n:] == IGNORE).all() and not batch["audio_mask"][b, n:].any()
    assert torch.isfinite(model(**batch).loss)


def test_rows_in_a_room_are_heard_never_spoken(tokenizer_dir, tmp_path):
    """`speechlm data rooms` rows (noise, quiet edges): ASR and spoken questions hear them; TTS, spoken answers and
    interleaving never learn to say them, even in the assistant's voice or with any voice allowed."""
    room = {"lead": 0.5, "tail": 0.1, "noise": "pink", "snr_db": 12.0}
    rows = [
        utterance(0, "hello world"),
        utterance(1, "hello world", voice="espeak:en-us@room", room={**room, "source": "u0"}),
        utterance(2, "what is two plus two?", voice="espeak:en-gb@room", answer="It is four.", room={**room, "source": "q"}),
        utterance(3, "It is four.", voice="espeak:en-us@room", room={**room, "source": "a"}),
    ]
    corpus = write_token_corpus(tmp_path / "rooms", rows)
    model = make_model(tokenizer_dir, "parallel_delay")
    for voices in (["espeak:en-us", "espeak:en-us@room"], None):
        mix = TaskMixture(model, [corpus], {"tts": 1, "asr": 1, "interleave": 1, "spoken_qa": 1}, assistant_voices=voices)
        assert mix.pools["tts"] == [(0, 0)] and mix.pools["interleave"] == [(0, 0)]
        assert mix.pools["asr"] == [(0, 0), (0, 1), (0, 2), (0, 3)] and mix.pools["spoken_qa"] == [(0, 2)]
        assert not mix.answers_by_id and all(r == 0 for _, r in sum(mix.answers_by_text.values(), []))
        for e in (mix.example(s, i) for s in range(8) for i in range(4)):
            if e.task == "spoken_qa":
                assert not e.audio_loss_mask.any()  # the question is heard; its answer has no speech but in a room


def test_mixture_drops_tasks_without_data_and_checks_the_codec(tokenizer_dir, corpus_dir, tmp_path):
    model = make_model(tokenizer_dir)
    mix = TaskMixture(model, [corpus_dir], {"tts": 1, "asr": 2, "text": 1}, assistant_voices=["nobody"])
    assert set(mix.dropped) == {"tts", "text"} and mix.weights == {"asr": 2.0}
    assert {mix.example(0, i).task for i in range(5)} == {"asr"}
    with pytest.raises(SpeechLMError, match="no task has data"):
        TaskMixture(model, [corpus_dir], {"tts": 1}, assistant_voices=["nobody"])
    with pytest.raises(SpeechLMError, match="unknown task"):
        TaskMixture(model, [corpus_dir], {"duplex": 1})
    other = write_token_corpus(tmp_path / "other", [utterance(0, "hello")], codes_per_frame=8, codebook_size=64)
    with pytest.raises(SpeechLMError, match="model reads 4 x 16"):
        TaskMixture(model, [other], {"asr": 1})


def test_text_corpus_packing_and_tokenizer(tokenizer_dir, tmp_path):
    user_file = tmp_path / "extra.jsonl"
    user_file.write_text(json.dumps({"text": "Who wrote this test?", "answer": "A session did."}) + "\n")
    corpus = build_text_corpus(15, files=[user_file])
    assert len(corpus.lines) >= 15 * 5 and corpus.chats
    assert [("user", "Who wrote this test?"), ("assistant", "A session did.")] in corpus.chats  # a train-split user item
    assert all(len(chat) >= 2 for chat in corpus.chats)

    tokenizer = train_tokenizer(corpus, tmp_path / "bpe", vocab_size=400)
    assert load_tokenizer(tmp_path / "bpe").encode("the capital of France") == tokenizer.encode("the capital of France")

    model = make_model(tokenizer_dir)
    small = TextCorpus(lines=["hello world", "it is four"], chats=[[("user", "what is two plus two"), ("assistant", "it is four")]])
    mix = TaskMixture(model, [], {"text": 1}, text=small, max_length=40, pack_text=True)
    v = model.vocab
    for i in range(4):
        row = mix.example(0, i)
        assert len(row) == 40 and not row.audio_mask.any()
        bos = row.input_ids == v.bos
        assert bos.sum() >= 3 and (row.labels[bos] == IGNORE).all()  # documents start with <|bos|>, never a target
        user = (row.input_ids == v.roles["<|user|>"]).nonzero().flatten().tolist()
        for u in user:  # a chat's user turn is context
            assert row.labels[u] == IGNORE
    # shorter packed text rows (text_row_length), other rows still up to max_length
    short = TaskMixture(model, [], {"text": 1}, text=small, max_length=40, pack_text=True, text_row_length=24)
    assert {len(short.example(0, i)) for i in range(4)} == {24}
    with pytest.raises(SpeechLMError, match="at least 8"):
        TaskMixture(model, [], {"text": 1}, text=small, max_length=40, pack_text=True, text_row_length=4)
    with pytest.raises(SpeechLMError, match="not found"):
        build_text_corpus(1, files=[tmp_path / "missing.txt"])


def test_render_rejects_bad_codes(tokenizer_dir):
    model = make_model(tokenizer_dir)
    with pytest.raises(SpeechLMError, match="codebooks"):
        render([Tag("speech_start"), Audio(np.zeros((3, Q + 1), dtype=np.int64)), Tag("speech_end")], model)
    with pytest.raises(SpeechLMError):
        render([Audio(np.full((3, Q), C + 5))], model)
    assert len(render([Text("")], model)) == 2  # just <|bos|> <|eos|>


def test_cli_constants_match_the_code():
    from speechlm.lm.model import STAGES
    from speechlm.training import lm_data, lm_train_config

    assert lm_train_config.STAGES == STAGES and lm_train_config.TASKS == lm_data.TASKS


def test_text_dropout_trains_the_guidance_twin_and_changes_nothing_else(tokenizer_dir, corpus_dir):
    """--text-dropout: that share of TTS examples is the unconditional twin's sequence (the prefix guidance
    decodes against, then the audio, trained on the speech); with 0 the mixture draws the very same examples."""
    import argparse

    from speechlm.training.lm_train_config import add_train_lm_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_lm_arguments(parser)
    base = ["--stage", "sft", "--out", "runs/x", "--data", "d", "--init-from", "runs/prev/model"]
    assert config_from_args(parser.parse_args(base)).text_dropout == 0.0
    assert config_from_args(parser.parse_args([*base, "--text-dropout", "0.1"])).text_dropout == 0.1
    model = make_model(tokenizer_dir, "parallel_delay")
    v = model.vocab
    lm = LMFormat.from_model(model)
    keys = [(s, i) for s in range(30) for i in range(4)]
    plain = TaskMixture(lm, [corpus_dir], {"tts": 1}, seed=1, max_length=256)
    zero = TaskMixture(lm, [corpus_dir], {"tts": 1}, seed=1, max_length=256, text_dropout=0.0)
    assert all(torch.equal(plain.example(*k).input_ids, zero.example(*k).input_ids) for k in keys)
    half = TaskMixture(lm, [corpus_dir], {"tts": 1}, seed=1, max_length=256, text_dropout=0.5)
    twin_prefix = [v.bos, v.tasks["<|tts|>"], v.speech_start]  # SpeechPipeline's unconditional prompt
    dropped = [e for e in (half.example(*k) for k in keys) if e.input_ids[:3].tolist() == twin_prefix]
    assert 0.3 * len(keys) < len(dropped) < 0.7 * len(keys)
    for e in dropped:
        ids = e.input_ids.tolist()
        assert set(ids[3:-2]) == {v.audio} and ids[-2:] == [v.speech_end, v.eos]  # no text anywhere: audio, its end
        assert e.audio_loss_mask.sum() > 0 and e.audio_loss_mask[:3].sum() == 0
    with pytest.raises(SpeechLMError, match="text_dropout"):
        TaskMixture(lm, [corpus_dir], {"tts": 1}, text_dropout=1.0)
