"""ASR from several views of the audio (speechlm.lm.ensemble): one view is plain greedy decoding,
identical views change nothing, the cached sequence scores equal a teacher-forced forward without a
cache (left padding included), the choice is the candidate the views like best, and the views are
the audio at the training level (a quiet microphone is heard as a loud one)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.audio import PEAK_LEVEL
from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import AudioError, SpeechLMError
from speechlm.codec.model import Codec
from speechlm.lm import GREEDY, PromptBatch, SpeechLM, load_tokenizer, text_generate, train_bpe_tokenizer
from speechlm.lm.ensemble import _sequence_scores, ensemble_transcribe
from speechlm.lm.prompts import asr_prompt
from speechlm.speech import VIEW_GAINS, Generation, SpeechPipeline, listening_views

torch.set_num_threads(1)
hf_logging.set_verbosity_error()
Q, C = 4, 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(
        ["hello world", "set a timer for two minutes", "call anna back"] * 4, vocab_size=300, min_frequency=1, save_dir=path
    )
    tokenizer = load_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    lm = SpeechLM.from_backbone(config, tokenizer, num_codebooks=Q, codebook_size=C, depth_dim=32, depth_heads=2, mctp_modules=1)
    with torch.no_grad():  # make the (random) audio embeddings matter, so that views differ
        for p in lm.audio_embedding.parameters():
            p.mul_(20)
    return lm.eval()


def views(model, lengths=(12, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [asr_prompt(model, torch.randint(0, C, (n, Q), generator=g)) for n in lengths]
    return [ids for ids, _ in rows], [codes for _, codes in rows]


def teacher_forced(model, ids, codes, continuation) -> float:
    """log p(continuation | prompt) from one forward over the whole sequence, no cache."""
    batch = PromptBatch.build(model, [[*ids, *continuation]], [codes])
    with torch.no_grad():
        hidden = model.run_backbone(model.embed(batch.input_ids, batch.audio_codes, batch.audio_mask)).last_hidden_state
        logits = model.text_logits(hidden[0, len(ids) - 1 : -1]).float()
    logits[:, model.vocab.size :] = float("-inf")
    return float(logits.log_softmax(-1)[torch.arange(len(continuation)), torch.tensor(continuation)].sum())


def test_one_view_is_greedy_decoding(model):
    ids, codes = views(model, (12,))
    greedy = text_generate(model, ids, audio_codes=codes, max_new_tokens=8, sampling=GREEDY, stop_tokens=[])[0]
    assert ensemble_transcribe(model, PromptBatch.build(model, ids, codes), max_new_tokens=8, stop_tokens=[]) == greedy
    assert len(greedy) == 8


def test_identical_views_change_nothing(model):
    ids, codes = views(model, (12,))
    greedy = text_generate(model, ids, audio_codes=codes, max_new_tokens=8, sampling=GREEDY, stop_tokens=[])[0]
    same = PromptBatch.build(model, ids * 3, codes * 3)
    assert ensemble_transcribe(model, same, max_new_tokens=8, stop_tokens=[]) == greedy


def test_candidates_are_each_views_greedy_transcript_and_the_joint_one(model):
    """Rows shared until a view parts from the joint transcript, then forked: each view's own
    candidate is still exactly its greedy transcript, and the joint one is greedy on the mean."""
    from speechlm.lm.ensemble import _candidates, _forward, _log_probs, _new_cache

    ids, codes = views(model, (12, 12, 12), seed=5)
    stops = {model.vocab.eos}
    batch = PromptBatch.build(model, ids, codes)
    cache, valid = _new_cache(model), batch.attention_mask
    with torch.no_grad():
        hidden = _forward(model, model.embed(batch.input_ids, batch.audio_codes, batch.audio_mask), valid, (valid.long().cumsum(1) - 1), cache)
        found = _candidates(model, _log_probs(model, hidden[:, -1]), cache, valid, (valid.long().sum(1) - 1)[:, None], 10, stops, [[0, 1, 2]])[0]
    own = [text_generate(model, i, audio_codes=[c], max_new_tokens=10, sampling=GREEDY, stop_tokens=list(stops))[0] for i, c in zip(ids, codes)]
    assert found[:3] == own and len({tuple(o) for o in own}) > 1, "the views part ways (else nothing forks)"
    joint = []  # greedy on the views' mean, without a cache (the prompts have one length: no padding)
    prompt = model.embed(batch.input_ids, batch.audio_codes, batch.audio_mask)
    for _ in range(10):
        text = model.embed(torch.tensor([joint] * 3, dtype=torch.long))
        with torch.no_grad():
            h = model.run_backbone(torch.cat((prompt, text), dim=1)).last_hidden_state[:, -1]
        token = int(_log_probs(model, h).mean(0).argmax())
        if token in stops:
            break
        joint.append(token)
    assert found[3] == joint


@pytest.mark.parametrize("rescore", [True, False])
def test_several_utterances_in_one_batch_each_get_what_they_get_alone(model, rescore):
    """ensemble_transcribe_groups: three utterances (3, 1 and 2 views, prompts of other lengths, rows given in
    mixed order) decoded as one batch; each transcript is ensemble_transcribe's of its views alone."""
    from speechlm.lm.ensemble import ensemble_transcribe_groups

    ids, codes = views(model, (12, 12, 12, 9, 14, 14), seed=5)
    groups = [[0, 2, 4], [1], [3, 5]]
    kw = dict(max_new_tokens=10, stop_tokens=[model.vocab.eos], rescore=rescore)
    together = ensemble_transcribe_groups(model, PromptBatch.build(model, ids, codes), groups, **kw)
    for group, found in zip(groups, together):
        alone = ensemble_transcribe(model, PromptBatch.build(model, [ids[r] for r in group], [codes[r] for r in group]), **kw)
        assert found == alone, group
    with pytest.raises(SpeechLMError, match="must split"):
        ensemble_transcribe_groups(model, PromptBatch.build(model, ids, codes), [[0, 1], [2]], **kw)


def test_sequence_scores_equal_a_teacher_forced_forward(model):
    """Scores on the prompt cache repeated per candidate (right-padded candidates, left-padded prompts
    of different lengths) equal one uncached forward per (view, candidate)."""
    ids, codes = views(model, (10, 14, 12))
    batch = PromptBatch.build(model, ids, codes)
    end = model.vocab.eos
    words = [model.tokenizer.encode(w, add_special_tokens=False) for w in ("set a timer", "call", "hello hello world")]
    candidates = [words[0], words[1][:1], words[2]]
    from speechlm.lm.ensemble import _forward, _log_probs, _new_cache

    cache = _new_cache(model)
    valid = batch.attention_mask
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = _forward(model, model.embed(batch.input_ids, batch.audio_codes, batch.audio_mask), valid, positions, cache)
        first = _log_probs(model, hidden[:, -1])
        scores = _sequence_scores(model, first, cache, valid, (valid.long().sum(1) - 1)[:, None], candidates, end)
    expected = torch.tensor([[teacher_forced(model, i, c, [*cand, end]) for cand in candidates] for i, c in zip(ids, codes)])
    assert scores.shape == (3, 3)
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=1e-4)


def test_the_choice_is_the_candidate_the_views_like_best(model):
    ids, codes = views(model, (12, 12, 12, 12), seed=3)
    stops = [model.vocab.eos]
    chosen = ensemble_transcribe(model, PromptBatch.build(model, ids, codes), max_new_tokens=6, stop_tokens=stops)
    own = [text_generate(model, i, audio_codes=[c], max_new_tokens=6, sampling=GREEDY, stop_tokens=stops)[0] for i, c in zip(ids, codes)]
    joint = ensemble_transcribe(model, PromptBatch.build(model, ids, codes), max_new_tokens=6, stop_tokens=stops, rescore=False)

    def total(cand):
        # a candidate cut at max_new_tokens is scored as if it ended there
        return sum(teacher_forced(model, i, c, [*cand, model.vocab.eos]) for i, c in zip(ids, codes))

    assert chosen in [*own, joint]
    assert all(total(chosen) >= total(c) - 1e-3 for c in [*own, joint])


def test_listening_views_are_the_audio_at_the_training_level():
    audio = (0.05 * np.sin(np.arange(4000) / 7)).astype(np.float32)
    out = listening_views(audio, 3)
    assert len(out) == 3 and all(v.dtype == np.float32 and v.shape == audio.shape for v in out)
    assert np.isclose(np.abs(out[0]).max(), PEAK_LEVEL)
    assert [round(float(np.abs(v).max()) / PEAK_LEVEL, 3) for v in out] == list(VIEW_GAINS[:3])
    assert len(listening_views(audio, 10)) == 10  # the gains cycle
    np.testing.assert_array_equal(listening_views(audio, 1, level=None)[0], audio)
    np.testing.assert_array_equal(listening_views(np.zeros(100, np.float32), 2)[1], np.zeros(100, np.float32))
    # views told apart by where the codec's frame grid falls: 0, 1/4, 2/4, 3/4 of a frame of silence before the audio
    lead = listening_views(audio, 4, kind="lead", frame_length=640)
    assert [len(v) - len(audio) for v in lead] == [0, 160, 320, 480]
    for v in lead:
        np.testing.assert_array_equal(v[len(v) - len(audio) :], out[0])
        assert not v[: len(v) - len(audio)].any()
    with pytest.raises(SpeechLMError, match="view kind"):
        listening_views(audio, 2, kind="speed")


def test_asr_hears_a_quiet_microphone_as_a_loud_one(model, hears_any_sound):
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    pipeline = hears_any_sound(SpeechPipeline(model, codec))
    rng = np.random.default_rng(0)
    speech = (0.3 * np.sin(2 * np.pi * 180 * np.arange(12000) / 16000) * rng.uniform(0.5, 1, 12000)).astype(np.float32)
    g = Generation(max_text_tokens=6)
    loud = pipeline.asr(speech, generation=g)
    assert pipeline.asr(speech * 0.25, generation=g) == loud  # peak-normalized first: the same views
    assert pipeline.asr(speech, generation=Generation(max_text_tokens=6, asr_views=1)) == pipeline.asr(
        speech * 0.25, generation=Generation(max_text_tokens=6, asr_views=1)
    )
    with pytest.raises(SpeechLMError, match="asr_views"):
        pipeline.asr(speech, generation=Generation(asr_views=0))


@pytest.mark.parametrize("asr_views,check", [(1, 0), (2, 0), (2, 3)])
def test_several_recordings_heard_at_once_as_each_alone(model, asr_views, check, hears_any_sound):
    """asr_many (a server's questions): recordings heard in one piece go as rows of one batch, one with a pause
    to cut at, a long one and silence the way asr takes them; each transcript is asr's (checked against its sounds
    too: each on its own rows of the batch). reply_texts likewise."""
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    pipeline = hears_any_sound(SpeechPipeline(model, codec))
    rng = np.random.default_rng(1)

    def tone(seconds, f0):
        n = int(seconds * 16000)
        return (0.3 * np.sin(2 * np.pi * f0 * np.arange(n) / 16000) * rng.uniform(0.5, 1, n)).astype(np.float32)

    paused = np.concatenate([tone(0.6, 150), np.zeros(8000, np.float32), tone(0.6, 220)])  # heard whole and in two
    audios = [tone(0.8, 180), paused, np.zeros(8000, np.float32), tone(1.2, 120), tone(0.5, 260)]
    g = Generation(max_text_tokens=6, asr_views=asr_views, asr_check_rounds=check)
    assert not pipeline._one_piece(paused, 16000, g) and pipeline._one_piece(audios[0], 16000, g)
    assert pipeline.asr_many(audios, generation=g) == [pipeline.asr(a, generation=g) for a in audios]
    assert pipeline.asr_many([], generation=g) == []
    with pytest.raises(AudioError, match="too short"):
        pipeline.asr_many([audios[0], np.zeros(10, np.float32)], generation=g)
    questions = ["hello world", "", "set a timer for two minutes"]
    assert pipeline.reply_texts(questions, g) == [pipeline.reply_text(q, g) for q in questions]
