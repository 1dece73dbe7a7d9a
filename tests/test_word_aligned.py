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
from speechlm.lm.aligned_batch import AlignedSpeechBatch, iter_aligned_audio_batch
from speechlm.lm.generate import Sampling, iter_aligned_audio
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
    # each frame says the word it belongs to: every word in order, at least one frame each, at most the cap
    words = [s.words[0] for s in cached for _ in s.frames[0]]
    assert words == sorted(words) and sorted(set(words)) == list(range(len(chunks)))
    assert all(1 <= words.count(k) <= 6 for k in range(len(chunks)))
    assert all(((f >= 0) & (f < C)).all() for f in a)
    # MCTP: fewer backbone forwards than frames; the whole utterance cap holds
    assert cached[-1].backbone_forwards < len(a)
    assert len(frames_of(iter_aligned_audio(model, prompt, chunks, sampling=GREEDY, max_frames=4))) <= 4
    with pytest.raises(SpeechLMError, match="at least one text chunk"):
        list(iter_aligned_audio(model, prompt, []))



def rows_of(steps, B):
    """Per row, the frames a batched decoding completed, and the step at which each row finished."""
    frames, finished_at = [[] for _ in range(B)], [None] * B
    for k, step in enumerate(steps):
        for b in range(B):
            frames[b] += list(step.frames[b])
            if finished_at[b] is None and bool(step.finished[b]):
                finished_at[b] = k
    return frames, finished_at


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("schedule", [[0], None, [1, 2]])
def test_batched_rows_speak_as_each_alone(model, guided, schedule):
    """Rows of one batch (other texts, other lengths, other sampling) each speak what decoding that row
    alone speaks, with MCTP too: words end at different positions, a row whose word has ended waits with
    placeholders while the others run their MCTP modules, and gets its next chunk beside their frames."""
    v = model.vocab
    kw = dict(max_frames_per_chunk=5, schedule=schedule, guidance=2.0 if guided else 0.0,
              unconditional_prompt=[v.bos, v.tasks["<|tts|>"], v.speech_start])  # fmt: skip
    prompts = [aligned_tts_prompt(model, t) for t in ["set a timer for ten minutes", "hello world", "it is four"]]
    samplings = [GREEDY, Sampling(temperature=0.9, top_k=0, top_p=1.0), GREEDY]
    seeds = [0, 7, 0]
    args = ([p for p, _ in prompts], [c for _, c in prompts])
    batch = list(iter_aligned_audio_batch(model, *args, sampling=samplings, seed=seeds, **kw))
    frames, finished_at = rows_of(batch, 3)
    forwards = 0
    for b, (prompt, chunks) in enumerate(prompts):
        alone = list(iter_aligned_audio(model, prompt, chunks, sampling=samplings[b], seed=seeds[b], **kw))
        assert same(frames[b], frames_of(alone)), f"row {b}"
        assert len(chunks) <= len(frames[b]) <= 5 * len(chunks)
        forwards = max(forwards, alone[-1].backbone_forwards)
    assert finished_at[2] < finished_at[0] == len(batch) - 1, "a short row finishes first; the batch ends with the last row"
    assert forwards <= batch[-1].backbone_forwards < sum(len(f) for f in frames)
    if schedule != [0]:
        assert batch[-1].backbone_forwards < max(len(f) for f in frames), "MCTP runs in the batch"
    uncached, _ = rows_of(iter_aligned_audio_batch(model, *args, sampling=samplings, seed=seeds, use_cache=False, **kw), 3)
    assert all(same(a, b) for a, b in zip(frames, uncached)), "cached == recomputed from scratch"


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("schedule", [[0], None, [1, 2]])
def test_rows_joining_a_running_batch_speak_as_each_alone(model, guided, schedule):
    """Continuous batching: rows join a batch that is already speaking (after 1, 4 and 9 positions, one
    of them with its prompt's audio, one of them as the batch's only other row ends), a row is removed
    mid-word, and every row that runs to its end speaks what decoding it alone speaks; the columns of rows
    that left are dropped (the batch's width stays bounded)."""
    v = model.vocab
    kw = dict(max_frames_per_chunk=5, schedule=schedule, guidance=2.0 if guided else 0.0,
              unconditional_prompt=[v.bos, v.tasks["<|tts|>"], v.speech_start])  # fmt: skip
    texts = ["set a timer for ten minutes", "hello world", "it is four", "what is two plus two", "the cat sat on the mat"]
    prompts = [aligned_tts_prompt(model, t) for t in texts]
    samplings = [GREEDY, Sampling(temperature=0.9, top_k=0, top_p=1.0), GREEDY, GREEDY, Sampling(temperature=0.8, top_k=0, top_p=1.0)]
    seeds = [0, 7, 0, 3, 5]
    batch = AlignedSpeechBatch(model, max_frames_per_chunk=5, schedule=schedule, guidance=kw["guidance"], unconditional_prompt=kw["unconditional_prompt"])
    join_at = {0: 0, 1: 1, 2: 4, 3: 9}  # row -> the position after which it is added
    keys, frames, widths = {}, {}, []
    keys[0] = batch.add(prompts[0][0], prompts[0][1], sampling=samplings[0], seed=seeds[0])
    removed = None
    for n, position in enumerate(batch.run()):
        for key, f in position.frames.items():
            frames.setdefault(key, []).extend(list(f))
        widths.append(batch.decoder.known)
        for b, at in join_at.items():
            if at == n + 1 and b not in keys:
                keys[b] = batch.add(prompts[b][0], prompts[b][1], sampling=samplings[b], seed=seeds[b])
        if n == 6:  # one more row, soon removed
            removed = batch.add(prompts[4][0], prompts[4][1], sampling=samplings[4], seed=seeds[4])
        if n == 14 and removed is not None:
            batch.remove(removed)
        if any(position.finished.values()) and 4 not in keys:  # a row joins as another leaves
            keys[4] = batch.add(prompts[4][0], prompts[4][1], sampling=samplings[4], seed=seeds[4])
    assert len(batch) == 0 and batch.decoder is None
    again = batch.add(prompts[1][0], prompts[1][1], sampling=samplings[1], seed=seeds[1])  # a fresh start, the batch empty
    assert same([f for p in batch.run() for f in p.frames[again]], frames[keys[1]])
    for b, key in keys.items():
        alone = frames_of(iter_aligned_audio(model, prompts[b][0], prompts[b][1], sampling=samplings[b], seed=seeds[b], **kw))
        assert same(frames[key], alone), f"row {b}"
    assert 0 < len(frames.get(removed, [])) < len(frames[keys[4]]), "the removed row stopped"
    assert max(widths) < sum(len(p) for p, _ in prompts) + sum(len(f) for f in frames.values()), "columns of rows gone are dropped"


def test_bad_batches(model):
    prompt, chunks = aligned_tts_prompt(model, "hello world")
    with pytest.raises(SpeechLMError, match="one chunk list per prefix"):
        list(iter_aligned_audio_batch(model, [prompt, prompt], [chunks]))
    with pytest.raises(SpeechLMError, match="values of seed"):
        list(iter_aligned_audio_batch(model, [prompt, prompt], [chunks, chunks], seed=[1, 2, 3]))
    with pytest.raises(SpeechLMError, match="at least one text chunk"):
        list(iter_aligned_audio_batch(model, [prompt, prompt], [chunks, []]))

@pytest.fixture(scope="module")
def aligned_pipeline(model):
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    lm = SpeechLM(dataclasses.replace(model.config, codec_id=codec.codec_id), model.backbone, model.tokenizer)
    lm.load_state_dict(model.state_dict())
    return SpeechPipeline(lm.eval(), codec)


def test_pipeline_speaks_word_by_word(aligned_pipeline):
    sp = aligned_pipeline
    g = Generation(max_seconds=2.0, max_seconds_per_word=0.2, seed=0)
    audio = sp.tts("Set a timer for 10 minutes.", generation=g)  # digits are spelled out first
    assert audio.dtype == np.float32 and 6 * 640 <= len(audio) <= 6 * 5 * 640
    assert np.allclose(np.concatenate(list(sp.tts("Set a timer for 10 minutes.", stream=True, generation=g))), audio, atol=1e-6)
    text, reply = sp.chat("what is two plus two", generation=Generation(max_seconds=1.0, max_seconds_per_word=0.2, max_text_tokens=4, seed=0))
    assert isinstance(text, str) and reply.dtype == np.float32
    for bad in ("", "...", "x" * 5000):
        with pytest.raises(SpeechLMError):
            sp.tts(bad, generation=g)
        with pytest.raises(SpeechLMError):
            sp.tts_batch(["hello world", bad], g)
    # several texts in one batch: without MCTP each is what speaking it alone gives
    plain = dataclasses.replace(g, mctp_schedule=[0])
    texts = ["Set a timer for 10 minutes.", "hello world", "it is four"]
    batch = sp.tts_batch(texts, plain)
    assert all(np.allclose(a, sp.tts(t, generation=plain), atol=1e-5) for a, t in zip(batch, texts))
    # TTS candidates are rows of one batch (candidate 1 the configured decoding)
    gens = sp.candidate_generations(dataclasses.replace(plain, candidates=3))
    assert np.allclose(sp.tts_batch(["hello world"] * 3, gens)[0], sp.tts("hello world", generation=plain), atol=1e-5)
    with pytest.raises(SpeechLMError, match="must share"):
        sp.tts_batch(["hello world"] * 2, [g, plain])
    with pytest.raises(SpeechLMError, match="2 generations given for 1 texts"):
        sp.tts_batch(["hello world"], [g, g])


def test_several_sentences_are_spoken_one_by_one(aligned_pipeline):
    sp = aligned_pipeline
    g = Generation(max_seconds=2.0, max_seconds_per_word=0.2, seed=0, mctp_schedule=[0])
    two = "Set a timer for 10 minutes. It is four."
    alone = [sp.tts(s, generation=g) for s in ("Set a timer for 10 minutes.", "It is four.")]
    pause = np.zeros(8 * 640, np.float32)  # 0.3 s, rounded to whole 40 ms frames
    audio = sp.tts(two, generation=g)
    assert np.allclose(audio, np.concatenate([alone[0], pause, alone[1]]), atol=1e-5)
    assert np.allclose(np.concatenate(list(sp.tts(two, stream=True, generation=g))), audio, atol=1e-5)
    # the sentences of several texts are rows of batches of at most max_rows
    batch = sp.tts_batch([two, "hello world"], g, max_rows=2)
    assert np.allclose(batch[0], audio, atol=1e-5) and np.allclose(batch[1], sp.tts("hello world", generation=g), atol=1e-5)
    one_go = sp.tts(two, generation=dataclasses.replace(g, tts_by_sentence=False))
    assert not (len(one_go) == len(audio) and np.allclose(one_go, audio))
    with pytest.raises(SpeechLMError, match="sentence_pause_seconds"):
        sp.tts(two, generation=dataclasses.replace(g, sentence_pause_seconds=-1))
    # a sentence longer than tts_max_words: its clauses spoken alone, clause_pause_seconds apart (0.12 s: 3 frames)
    long = "Set a timer for 10 minutes, it is four."
    clauses = dataclasses.replace(g, tts_max_words=6)
    assert [text for _, text in sp.speech_parts(long, clauses)] == ["Set a timer for 10 minutes.", "It is four."]
    audio = sp.tts(long, generation=clauses)
    assert np.allclose(audio, np.concatenate([alone[0], np.zeros(3 * 640, np.float32), alone[1]]), atol=1e-5)
    assert np.allclose(np.concatenate(list(sp.tts(long, stream=True, generation=clauses))), audio, atol=1e-5)
    assert [p for p, _ in sp.speech_parts(f"{long} {long}", clauses)] == [0, 3, 8, 3]  # clause, sentence, clause pauses
    assert len(sp.speech_parts(long, dataclasses.replace(clauses, tts_max_words=0))) == 1  # 0: each sentence whole
    for name in ("clause_pause_seconds", "tts_max_words"):
        with pytest.raises(SpeechLMError, match=name):
            sp.tts(long, generation=dataclasses.replace(clauses, **{name: -1}))
    with pytest.raises(SpeechLMError, match="at most 50000"):  # a huge text: a clear error, not an hour of speech
        sp.tts("It is four. " * 5000, generation=g)


@pytest.mark.parametrize("schedule", [[0], None])
def test_speech_streams_of_texts_added_while_others_speak(aligned_pipeline, schedule):
    """Texts added to the running streams at different times (one of two sentences, one cancelled) each
    stream, frame by frame, what tts(stream=True) streams for them alone: its sentences' frames in order,
    the pause between them; a cancelled text stops; each frame is out as soon as it is decoded."""
    sp = aligned_pipeline
    g = Generation(max_seconds=2.0, max_seconds_per_word=0.2, seed=0, mctp_schedule=schedule, guidance=1.0)
    texts = ["Set a timer for 10 minutes. It is four.", "hello world", "what is two plus two", "the cat sat on the mat"]
    streams = sp.speech_streams(g)
    keys = {0: streams.add(texts[0])}
    out: dict[int, list[np.ndarray]] = {}
    n = 0
    while streams:
        for key, frames in streams.step().items():
            out.setdefault(key, []).extend(frames)
        n += 1
        if n == 3:
            keys[1] = streams.add(texts[1])
            keys[3] = streams.add(texts[3])
        if n == 7:
            keys[2] = streams.add(texts[2])
        if n == 9:
            streams.cancel(keys[3])
    assert all(streams.finished(k) for k in keys.values())
    for b, key in keys.items():
        if b == 3:
            continue
        alone = list(sp.tts(texts[b], stream=True, generation=g))
        assert len(out[key]) == len(alone) and np.allclose(np.concatenate(out[key]), np.concatenate(alone), atol=1e-5), f"text {b}"
    assert len(out.get(keys[3], [])) < len(list(sp.tts(texts[3], stream=True, generation=g)))
    with pytest.raises(SpeechLMError, match="nothing to say"):  # as tts says it
        streams.add("?")
    assert not streams


def test_cli_speaks_lines_in_batches(aligned_pipeline, tmp_path, cli_here):
    from speechlm.codec.audio import load_audio

    aligned_pipeline.save_pretrained(tmp_path / "m")
    model = ["--model", str(tmp_path / "m"), "--max-seconds", "2", "--threads", "1", "--dtype", "float32"]
    lines = ["hello world", "", "it is four", "...", "set a timer for ten minutes"]  # a blank line, and one with nothing to say
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    r = cli_here("tts", "--lines", str(tmp_path / "lines.txt"), "-o", str(tmp_path / "out"), "--batch-size", "2", *model)
    assert r.returncode == 1 and "line 4" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001.wav", "00003.wav", "00005.wav"]
    # shortest first: lines 4 and 3 were a batch (line 4 failed it, so each was spoken alone), then lines 1 and 5
    assert [line.split("\t")[1] for line in r.stdout.splitlines()] == ["it is four", "hello world", "set a timer for ten minutes"]
    g = Generation(max_seconds=2.0, seed=0)
    expected = {"00003.wav": aligned_pipeline.tts("it is four", generation=g),
                "00005.wav": aligned_pipeline.tts_batch(["hello world", "set a timer for ten minutes"], g)[1]}  # fmt: skip
    for name, audio in expected.items():
        assert np.abs(load_audio(tmp_path / "out" / name) - audio).max() < 1e-3
    assert cli_here("tts", "hello", "--lines", str(tmp_path / "lines.txt"), "-o", str(tmp_path / "o"), *model).returncode == 2
    # two sentences: spoken one by one, --sentence-pause seconds apart
    r = cli_here("tts", "Hello world. It is four.", "-o", str(tmp_path / "two.wav"), "--sentence-pause", "0.8", *model)
    assert r.returncode == 0, r.stderr
    two = [aligned_pipeline.tts(t, generation=g) for t in ("Hello world.", "It is four.")]
    assert np.abs(load_audio(tmp_path / "two.wav") - np.concatenate([two[0], np.zeros(20 * 640, np.float32), two[1]])).max() < 1e-3
    # a long sentence: spoken clause by clause past --max-words words, 0.12 s (3 frames) apart
    r = cli_here("tts", "Set a timer for ten minutes, it is four.", "-o", str(tmp_path / "clauses.wav"), "--max-words", "6", *model)
    assert r.returncode == 0, r.stderr
    clauses = [aligned_pipeline.tts("Set a timer for ten minutes.", generation=g), two[1]]
    assert np.abs(load_audio(tmp_path / "clauses.wav") - np.concatenate([clauses[0], np.zeros(3 * 640, np.float32), clauses[1]])).max() < 1e-3
    r = cli_here("tts", "--lines", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o"), *model)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    r = cli_here("tts", "--lines", str(tmp_path / "binary.txt"), "-o", str(tmp_path / "o"), *model)
    assert r.returncode == 2 and "not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


def test_config_rejects_unknown_layout():
    with pytest.raises(SpeechLMError, match="speech_layout"):
        SpeechLMConfig(speech_layout="diagonal")
    assert SpeechLMConfig().speech_layout == "plain"
