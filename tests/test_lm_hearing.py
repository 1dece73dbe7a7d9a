"""The CTC hearing head: its training targets (heard speech and its transcript), its loss, what it
learns (it transcribes an utterance it was trained on), exact save/load, adding one to a trained
model, and transcribing with it through the pipeline's ``asr``."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import SpeechLM, SpeechLMConfig, load_tokenizer, train_bpe_tokenizer
from speechlm.lm.model import ctc_greedy
from speechlm.training.lm_data import asr_task, collate, render, spoken_qa_task, tts_task

from .conftest import hear_any_sound

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

Q, C = 4, 16
TEXTS = ["hello world", "the cat sat on the mat", "what is two plus two", "it is four"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(TEXTS * 4, vocab_size=400, min_frequency=1, save_dir=path)
    return path


def make_model(tokenizer_dir, hearing_layer=1, head="parallel_delay", seed=0) -> SpeechLM:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512,
    )  # fmt: skip
    return SpeechLM.from_backbone(
        backbone, tokenizer, num_codebooks=Q, codebook_size=C, output_head=head, mctp_modules=1, hearing_layer=hearing_layer
    )


def frames(n, seed=0):
    return np.random.default_rng(seed).integers(0, C, size=(n, Q))


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    assert ctc_greedy([0, 5, 5, 0, 5, 7, 7, 0], blank=0) == [5, 5, 7]
    assert ctc_greedy([], blank=0) == [] and ctc_greedy([0, 0], blank=0) == []


def test_heard_speech_is_marked_with_its_transcript(tokenizer_dir):
    model = make_model(tokenizer_dir)
    tok = model.tokenizer
    asr = asr_task(frames(9), "the cat sat")
    ex = render(asr.segments, model, trained=asr.trained, heard=asr.heard)
    assert torch.equal(ex.hearing_mask, ex.audio_mask)  # the one (context) speech run
    assert ex.hearing_targets.tolist() == tok.encode("the cat sat", add_special_tokens=False)
    # TTS speech is the model's own (trained), never heard; a spoken question is heard, the answer speech is not
    tts = tts_task("hello world", frames(5))
    assert render(tts.segments, model, trained=tts.trained, heard="hello world").hearing_mask is None
    qa = spoken_qa_task(frames(6, 1), "it is four", frames(5, 2), tok, layout="text_first")
    ex_qa = render(qa.segments, model, trained=qa.trained, heard="what is two plus two")
    first_run_end = int(ex_qa.audio_mask.nonzero()[0]) + 6 + model.config.max_delay
    assert ex_qa.hearing_mask.nonzero().flatten().tolist() == list(range(first_run_end - 6 - model.config.max_delay, first_run_end))
    # cutting into the heard speech drops the target; cutting after it keeps it
    assert ex.cut(5).hearing_mask is None and ex.cut(5).hearing_targets is None
    assert ex.cut(len(ex) - 1).hearing_targets is not None
    # collation pads the targets with -100; a row without heard speech has none
    batch = collate([ex, render(tts.segments, model, trained=tts.trained)], model.vocab.pad, C)
    assert batch["hearing_targets"].shape == (2, len(ex.hearing_targets))
    assert (batch["hearing_targets"][1] == -100).all() and not batch["hearing_mask"][1].any()


def test_hearing_head_learns_to_transcribe(tokenizer_dir):
    """Trained on two utterances, the hearing head alone transcribes each of them exactly."""
    model = make_model(tokenizer_dir)
    items = [(frames(12, 3), "the cat sat on the mat"), (frames(10, 4), "hello world")]
    examples = []
    for codes, text in items:
        asr = asr_task(codes, text)
        examples.append(render(asr.segments, model, trained=asr.trained, heard=asr.heard))
    batch = collate(examples, model.vocab.pad, C)
    model.set_stage("sft")
    first = model(**batch).hearing_loss
    assert torch.isfinite(first)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    assert model(**batch).hearing_loss < 0.1 * first
    for codes, text in items:
        heard = model.tokenizer.decode(model.hear(torch.from_numpy(codes)), skip_special_tokens=True)
        assert heard.strip() == text


def test_hearing_loss_only_where_the_backbone_trains(tokenizer_dir):
    model = make_model(tokenizer_dir)
    asr = asr_task(frames(8), "hello world")
    batch = collate([render(asr.segments, model, trained=asr.trained, heard=asr.heard)], model.vocab.pad, C)
    model.set_stage("align")
    assert model.hearing.proj.weight.requires_grad
    assert model(**batch).hearing_loss is not None
    model.set_stage("mctp")
    assert not model.hearing.proj.weight.requires_grad
    assert model(**batch).hearing_loss is None
    assert model(**batch, all_losses=True).hearing_loss is not None  # logged, not trained


def test_save_load_round_trip_and_adding_a_head(tokenizer_dir, tmp_path):
    model = make_model(tokenizer_dir).eval()
    codes = torch.from_numpy(frames(7))
    model.save_pretrained(tmp_path / "m")
    loaded = SpeechLM.from_pretrained(tmp_path / "m")
    assert loaded.config.hearing_layer == 1
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.hear(codes) == model.hear(codes)

    plain = make_model(tokenizer_dir, hearing_layer=None)
    assert plain.hearing is None
    with pytest.raises(SpeechLMError, match="no hearing head"):
        plain.hear(codes)
    with pytest.raises(SpeechLMError, match="hearing_layer must be in"):
        plain.add_hearing_head(3)
    plain.add_hearing_head(2)
    assert plain.config.hearing_layer == 2 and isinstance(plain.hear(codes), list)
    with pytest.raises(SpeechLMError, match="hearing_layer"):
        SpeechLMConfig(hearing_layer=0)


def test_build_model_adds_a_hearing_head_to_a_trained_model(tokenizer_dir, tmp_path):
    from speechlm.training.lm_train import build_model
    from speechlm.training.lm_train_config import LMTrainConfig

    plain = make_model(tokenizer_dir, hearing_layer=None)
    plain.save_pretrained(tmp_path / "plain")
    config = LMTrainConfig(
        stage="sft", out=str(tmp_path / "run"), init_from=str(tmp_path / "plain"), data=[str(tmp_path)], speech={"hearing_layer": 2}
    )
    model = build_model(config, {}, lambda: None)
    assert model.hearing is not None and model.config.hearing_layer == 2
    # everything the plain model had is unchanged
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_pipeline_asr_decoders_and_cli(tokenizer_dir, tmp_path, cli_here):
    """asr: 'ctc' uses the hearing head (one forward), 'lm' the LM, 'auto' the head when there is one;
    a model without a head refuses 'ctc' with a clear error, on the command line too."""
    import dataclasses

    from speechlm.codec.audio import save_audio
    from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
    from speechlm.codec.model import Codec
    from speechlm.speech import Generation, SpeechPipeline

    torch.manual_seed(0)
    codec = Codec(CodecConfig(**{**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C})).eval()
    lm = make_model(tokenizer_dir)
    lm.config.codec_id = codec.codec_id
    sp = hear_any_sound(SpeechPipeline(lm, codec))
    speech = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32)
    g = Generation(max_text_tokens=5)
    frames_ = sp._frames(speech, 16000)
    expected = lm.tokenizer.decode(lm.hear(frames_), skip_special_tokens=True).strip()
    assert sp.asr(speech, generation=dataclasses.replace(g, asr_decoder="ctc")) == expected
    assert sp.asr(speech, generation=dataclasses.replace(g, asr_decoder="auto")) == expected
    assert isinstance(sp.asr(speech, generation=dataclasses.replace(g, asr_decoder="lm")), str)
    with pytest.raises(SpeechLMError, match="unknown asr decoder"):
        sp.asr(speech, generation=dataclasses.replace(g, asr_decoder="beam"))

    sp.save_pretrained(tmp_path / "m")
    wav = tmp_path / "q.wav"
    save_audio(wav, speech)
    r = cli_here("asr", str(wav), "--asr-decoder", "ctc", "--model", str(tmp_path / "m"), "--threads", "1", "--speech-detector", "none")
    assert r.returncode == 0 and r.stdout.strip() == expected, (r.stdout, r.stderr)
    r = cli_here("asr", str(wav), "--model", str(tmp_path / "m"), "--threads", "1", "--int8", "--dtype", "bfloat16")  # int8 products
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    r = cli_here("asr", str(wav), "--model", str(tmp_path / "m"), "--threads", "1", "--int8", "--dtype", "float32")
    assert r.returncode == 2 and "--int8 needs the LM computed in bfloat16" in r.stderr and "Traceback" not in r.stderr

    plain = make_model(tokenizer_dir, hearing_layer=None)
    plain.config.codec_id = codec.codec_id
    SpeechPipeline(plain, codec).save_pretrained(tmp_path / "plain")
    r = cli_here("asr", str(wav), "--asr-decoder", "ctc", "--model", str(tmp_path / "plain"), "--threads", "1")
    assert r.returncode == 2 and "no hearing head" in r.stderr and "Traceback" not in r.stderr
