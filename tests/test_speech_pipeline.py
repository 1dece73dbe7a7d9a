"""SpeechPipeline (LM + codec): tts / streaming tts / asr / chat end to end on tiny random
models, save/load with the codec, and bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.lm import SpeechLM, load_tokenizer, train_bpe_tokenizer
from speechlm.lm.prompts import tts_prompt
from speechlm.speech import Generation, SpeechPipeline

from .conftest import hear_any_sound

torch.set_num_threads(1)
hf_logging.set_verbosity_error()
TINY_CODEC = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 16}


SHORT = Generation(temperature=0.8, max_seconds=0.4, max_text_tokens=5, seed=0)  # sampled: a random model's greedy speech may end at once


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    torch.manual_seed(0)
    tok_dir = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(["hello world", "what is two plus three", "the answer is five"] * 5, vocab_size=300, min_frequency=1, save_dir=tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    codec = Codec(CodecConfig(**TINY_CODEC)).eval()
    backbone = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512)
    lm = SpeechLM.from_backbone(backbone, tokenizer, num_codebooks=4, codebook_size=16, depth_dim=32, depth_heads=2, mctp_modules=2,
                                codec_id=codec.codec_id)
    return hear_any_sound(SpeechPipeline(lm, codec))


def test_tts_offline_and_streaming(pipeline):
    audio = pipeline.tts("hello world", generation=SHORT)
    assert audio.dtype == np.float32 and len(audio) % 640 == 0 and 0 < len(audio) <= 10 * 640
    chunks = list(pipeline.tts("hello world", stream=True, generation=SHORT))
    assert all(len(c) == 640 for c in chunks)
    assert np.allclose(np.concatenate(chunks), audio), "same seed: streaming equals offline"


def test_asr_and_chat(pipeline):
    speech = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32)
    assert isinstance(pipeline.asr(speech, generation=SHORT), str)
    text, audio = pipeline.chat(speech, generation=SHORT)
    assert isinstance(text, str) and audio.dtype == np.float32
    text, audio = pipeline.chat("what is two plus three", generation=SHORT)
    assert isinstance(text, str)


def test_chat_transcribes_first_by_default(pipeline, monkeypatch):
    """Spoken chat = the model's own transcript answered as typed text (transcribe_first, the default);
    transcribe_first=False answers the speech itself."""
    speech = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32)
    monkeypatch.setattr(pipeline, "asr", lambda audio, sample_rate=16000, generation=None: "what is two plus three")
    text, audio = pipeline.chat(speech, generation=SHORT)
    typed_text, typed_audio = pipeline.chat("what is two plus three", generation=SHORT)
    assert text == typed_text and np.array_equal(audio, typed_audio)
    monkeypatch.setattr(pipeline, "asr", lambda *a, **k: "")
    text, audio = pipeline.chat(speech, generation=SHORT)
    assert text == "" and audio.size == 0  # nothing heard: no reply
    direct = pipeline.chat(speech, generation=dataclasses.replace(SHORT, transcribe_first=False))  # asr not called
    assert isinstance(direct[0], str)


def test_asr_and_chat_skip_what_the_speech_detector_hears_no_speech_in(pipeline, monkeypatch):
    """Audio the speech detector (Generation.speech_detector) hears no speech in gets no transcript and no reply,
    as silence does; speech_detector=None does not ask it."""
    speech = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32)
    asked = []

    class NoSpeech:
        def has_speech(self, audios, level=None):
            asked.append(len(audios))
            return [False] * len(audios)

    monkeypatch.setitem(pipeline._detectors, Generation.speech_detector, NoSpeech())
    assert pipeline.asr(speech) == "" and pipeline.asr_segments(speech) == [] and pipeline.asr_many([speech, speech]) == ["", ""]
    text, reply = pipeline.chat(speech, generation=SHORT)
    assert text == "" and reply.size == 0
    assert asked == [1, 1, 2, 1]
    pipeline.asr(speech, generation=dataclasses.replace(SHORT, speech_detector=None))
    assert asked == [1, 1, 2, 1]


def test_chat_can_speak_its_reply_by_the_tts_task(pipeline):
    """reply_speech="tts": the reply's text, once written, is spoken by the TTS task (what tts() says for it)."""
    g = dataclasses.replace(SHORT, max_text_tokens=8)
    text, audio = pipeline.chat("what is two plus three", generation=dataclasses.replace(g, reply_speech="tts"))
    same_text, chat_audio = pipeline.chat("what is two plus three", generation=g)
    assert text == same_text
    if text.strip(".,!? "):
        assert np.array_equal(audio, pipeline.tts(text, generation=g))
    with pytest.raises(SpeechLMError, match="reply_speech"):
        pipeline.chat("what is two plus three", generation=dataclasses.replace(g, reply_speech="sing"))



def test_chat_speaks_a_reply_of_several_sentences_as_tts_does(pipeline, monkeypatch):
    """A reply of several sentences is spoken one sentence at a time (what tts() says for it), not in one go."""
    g = dataclasses.replace(SHORT, max_text_tokens=8)
    reply = "Hello world. It is four."
    monkeypatch.setattr(pipeline, "_reply_ids", lambda prompts, g: [pipeline.lm.tokenizer.encode(reply, add_special_tokens=False)] * len(prompts))
    text, audio = pipeline.chat("what is two plus three", generation=g)
    assert text == reply and np.array_equal(audio, pipeline.tts(reply, generation=g))


def test_mctp_schedule(pipeline):
    """MCTP gives several frames per backbone forward; schedule [0] is plain decoding."""
    g = Generation(temperature=0.8, max_seconds=0.4, seed=0)
    steps = [step.backbone_forwards for step, _ in pipeline.speak_steps(tts_prompt(pipeline.lm, "hello world"), None, g)]
    plain = [step.backbone_forwards for step, _ in pipeline.speak_steps(tts_prompt(pipeline.lm, "hello world"), None, Generation(temperature=0.8, max_seconds=0.4, seed=0, mctp_schedule=[0]))]
    assert steps[0] == 1, "the first frame comes from the first backbone forward"
    if len(steps) > 1:
        assert len(set(steps)) < len(steps), "some forward yields more than one frame"
    assert plain == sorted(set(plain)), "plain decoding: one frame per forward"


def test_ship_speech_lm_in_bfloat16(pipeline, tmp_path):
    from speechlm.training.ship import ship

    run = tmp_path / "run"
    pipeline.lm.save_pretrained(run / "model")
    (run / "train_config.json").write_text('{"stage": "mctp", "init_from": null}')
    pipeline.codec.save_pretrained(tmp_path / "codec")
    dst = ship(run, "tiny", models_dir=tmp_path / "models", codec=str(tmp_path / "codec"), dtype="bfloat16")
    assert (dst / "codec.json").is_file() and (dst / "provenance.json").is_file()
    assert not (dst / "codec").exists(), "the codec is referenced by name, not copied"
    shipped = SpeechPipeline.from_pretrained(dst)
    ours = dict(pipeline.lm.named_parameters())
    for name, p in shipped.lm.named_parameters():
        assert p.dtype == torch.float32, "computed in float32 on CPU"
        assert torch.equal(p, ours[name].to(torch.bfloat16).float()), name
    assert isinstance(shipped.tts("hello world", generation=SHORT), np.ndarray)


def test_save_load_roundtrip(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path / "m")
    again = SpeechPipeline.from_pretrained(tmp_path / "m")
    assert np.array_equal(again.tts("hello world", generation=SHORT), pipeline.tts("hello world", generation=SHORT))


def test_bad_input(pipeline):
    speech = np.zeros(8000, np.float32)
    assert pipeline.asr(speech) == "", "silence transcribes to nothing"
    assert pipeline.chat(speech) == ("", pytest.approx(np.zeros(0, np.float32)))
    with pytest.raises(SpeechLMError, match="empty text"):
        pipeline.tts("   ")
    with pytest.raises(SpeechLMError, match="at most 50000"):  # a huge text: a clear error, not hours of speech
        pipeline.tts("word " * 12000)
    with pytest.raises(SpeechLMError, match="16000 Hz"):
        pipeline.asr(speech, sample_rate=8000)
    with pytest.raises(SpeechLMError, match="too short"):
        pipeline.asr(speech[:100])
    with pytest.raises(SpeechLMError, match="mono"):
        pipeline.asr(np.zeros((8000, 2), np.float32))
    with pytest.raises(SpeechLMError, match="NaN"):
        pipeline.asr(np.full(8000, np.nan, np.float32))
    with pytest.raises(SpeechLMError, match="not found"):
        SpeechPipeline.from_pretrained("no-such-model")


def test_cli_tts_asr_chat(pipeline, tmp_path, cli_here, cli):
    from speechlm.codec.audio import load_audio

    pipeline.save_pretrained(tmp_path / "m")
    model = ["--model", str(tmp_path / "m"), "--max-seconds", "0.4", "--threads", "1", "--dtype", "float32"]  # exact: compared below
    hear = ["--speech-detector", "none"]  # a tone is its speech (in process: tests.conftest.hear_any_sound)
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "t.wav"), "--stream", "--temperature", "0.8", *model)
    assert r.returncode == 0, r.stderr
    assert "first audio after" in r.stdout and (tmp_path / "t.wav").stat().st_size > 44
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "g.wav"), *model)  # greedy (the default): this random model may say nothing
    assert r.returncode == 0 and ("first audio after" in r.stdout or "no speech" in r.stdout), r.stderr
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "t.opus"), "--stream", "--temperature", "0.8", *model)  # lossy, streamed
    assert r.returncode == 0 and len(load_audio(tmp_path / "t.opus")) == len(load_audio(tmp_path / "t.wav")), r.stderr
    r = cli("tts", "hello world", "-o", "-", "--stream", "--temperature", "0.8", *model, binary=True)  # raw PCM16 on stdout
    pcm = np.frombuffer(r.stdout, "<i2") / 32767.0
    assert r.returncode == 0 and b"-> stdout" in r.stderr and np.abs(pcm - load_audio(tmp_path / "t.wav")).max() < 3 / 32767, r.stderr
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "t.aac"), *model)
    assert r.returncode == 2 and "use one of .wav, .flac, .ogg, .opus, .mp3" in r.stderr, r.stderr
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "new" / "dir" / "t.wav"), "--stream", "--temperature", "0.8", *model)
    assert r.returncode == 0 and (tmp_path / "new" / "dir" / "t.wav").stat().st_size > 44, r.stderr  # its folders made
    (tmp_path / "file").write_text("")
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "file" / "t.wav"), *model)  # a folder that is a file
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = cli_here("tts", " ", "-o", str(tmp_path / "empty.wav"), *model)
    assert r.returncode == 2 and "empty text" in r.stderr and not (tmp_path / "empty.wav").exists(), r.stderr
    speech = tmp_path / "q.wav"
    from speechlm.codec.audio import save_audio

    save_audio(speech, (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32))
    r = cli_here("asr", *hear, str(speech), "--json", *model)
    assert r.returncode == 0 and '"text"' in r.stdout, r.stderr
    import json

    from speechlm.speech import Segment
    from speechlm.subtitles import to_subtitles

    # --subtitles: the JSON's segments as cues, printed (one file) or written to --output-dir (several)
    segments = [Segment(**s) for s in json.loads(r.stdout)["segments"]]
    srt = cli_here("asr", *hear, str(speech), "--subtitles", "srt", *model)
    assert srt.returncode == 0 and srt.stdout == to_subtitles(segments, "srt"), srt.stderr
    many = cli_here("asr", *hear, str(speech), str(speech), "--subtitles", "vtt", "--output-dir", str(tmp_path / "subs"), *model)
    assert many.returncode == 0 and (tmp_path / "subs" / f"{speech.stem}.vtt").read_text() == to_subtitles(segments, "vtt")
    for bad, message in (([str(speech), "--subtitles", "srt", "--json"], "do not go together"), ([str(speech), str(speech), "--subtitles", "srt"], "--output-dir")):
        r = cli_here("asr", *hear, *bad, *model)
        assert r.returncode == 2 and message in r.stderr, r.stderr

    views = {n: json.loads(cli_here("asr", *hear, str(speech), "--json", "--views", n, *model).stdout)["text"] for n in ("1", "3")}
    assert views["1"] == pipeline.asr(load_audio(speech), generation=Generation(asr_views=1))
    fast = cli_here("asr", *hear, str(speech), "--json", "--model", str(tmp_path / "m"), "--threads", "1", "--dtype", "bfloat16")
    assert fast.returncode == 0 and '"text"' in fast.stdout, fast.stderr
    late = tmp_path / "late.wav"  # half a second of silence first: --keep-edges hears it, the default cuts it short
    save_audio(late, np.concatenate([np.zeros(8000, np.float32), load_audio(speech)]))
    kept = json.loads(cli_here("asr", *hear, str(late), "--json", "--views", "1", "--keep-edges", *model).stdout)["text"]
    assert kept == pipeline.asr(load_audio(late), generation=Generation(asr_views=1, asr_edges=False))
    assert cli_here("asr", *hear, str(speech), "--views", "0", *model).returncode == 2
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    r = cli_here("asr", *hear, str(speech), str(tmp_path / "bad.wav"), str(speech), *model)
    assert r.returncode == 1 and len(r.stdout.splitlines()) == 2 and "bad.wav" in r.stderr and "Traceback" not in r.stderr
    # several files heard in batches (those in one piece as rows of one batch) print what one by one prints; a file
    # too short to hear fails alone
    short = tmp_path / "short.wav"
    save_audio(short, np.full(800, 0.1, np.float32))
    files = [str(speech), str(late), str(short), str(speech)]
    batched = cli_here("asr", *hear, *files, "--views", "1", "--batch-size", "3", *model)
    alone = cli_here("asr", *hear, *files, "--views", "1", "--batch-size", "1", *model)
    assert batched.returncode == alone.returncode == 1 and batched.stdout == alone.stdout and "short.wav" in batched.stderr, batched.stderr
    assert batched.stdout.splitlines()[0] == f"{speech}\t{' '.join(views['1'].split())}" and len(batched.stdout.splitlines()) == 3
    r = cli_here("chat", str(speech), "-o", str(tmp_path / "reply.wav"), *model)
    assert r.returncode == 0, r.stderr
    # a typed question: the reply's text (what the Python API writes), and with -o its speech too
    typed = cli_here("chat", "--text", "hello world", *model)
    assert typed.returncode == 0 and typed.stdout.strip() == pipeline.reply_text("hello world"), typed.stderr
    r = cli_here("chat", "--text", "hello world", "-o", str(tmp_path / "typed.wav"), *model)
    assert r.returncode == 0 and r.stdout == typed.stdout and (tmp_path / "typed.wav").exists(), r.stderr
    for bad, message in ((["--text", " "], "empty question"), (["--text", "hi", str(speech)], "not both"), ([], "--text QUESTION")):
        r = cli_here("chat", *bad, *model)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli_here("tts", "", "-o", str(tmp_path / "e.wav"), *model)
    assert r.returncode == 2 and "empty text" in r.stderr and "Traceback" not in r.stderr
    r = cli_here("tts", "hello", "-o", str(tmp_path / "e.wav"), "--model", str(tmp_path / "no-such-model"))
    assert r.returncode == 2 and "no-such-model" in r.stderr and "Traceback" not in r.stderr


def test_asr_transcript_ends_at_a_speech_token(pipeline, monkeypatch):
    """A transcript is text only: if the model starts to speak (<|speech_start|>), the transcript ends there."""
    lm, v = pipeline.lm, pipeline.lm.vocab
    word = lm.tokenizer.encode("hello", add_special_tokens=False)[0]
    calls = []

    def scripted(hidden):  # a word, then <|speech_start|>, then the word forever
        logits = torch.zeros(hidden.shape[0], lm.backbone.get_output_embeddings().weight.shape[0])
        logits[:, v.speech_start if len(calls) == 1 else word] = 10.0
        calls.append(1)
        return logits

    monkeypatch.setattr(lm, "text_logits", scripted)
    speech = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32)
    g = Generation(max_text_tokens=8, seed=0, asr_check_rounds=0)  # the decoder alone (the check scores with the LM too)
    assert pipeline.asr(speech, generation=g) == lm.tokenizer.decode([word]).strip()
    assert len(calls) == 2


def test_fast_dtype_is_bfloat16_only_where_it_is_native(monkeypatch):
    from speechlm.speech import fast_dtype

    assert fast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert fast_dtype() == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert fast_dtype() == torch.bfloat16


def test_tts_speaks_through_the_tts_adapter_only_while_a_step_computes(pipeline, tmp_path, cli_here):
    from speechlm.codec.audio import load_audio
    from speechlm.lm.adapters import AdapterConfig

    pipeline.save_pretrained(tmp_path / "sp")
    own = SpeechPipeline.from_pretrained(tmp_path / "sp")
    g = SHORT  # sampled (seeded): a random model's greedy speech may end at once
    base = own.tts("hello world", generation=g)
    assert len(base)
    torch.manual_seed(2)
    for name in ("asr", "tts"):
        with torch.no_grad():
            for b in own.lm.add_adapter(AdapterConfig(name, rank=2)).B.values():
                b.normal_(std=0.5)
    seen, run_backbone = set(), own.lm.run_backbone

    def watched(*args, **kwargs):  # every backbone forward (the lean one calls no layer module)
        seen.add(own.lm.active_adapter)
        return run_backbone(*args, **kwargs)

    own.lm.run_backbone = watched
    between = [own.lm.active_adapter for _ in own.tts("hello world", stream=True, generation=g)]
    assert seen == {"tts"} and set(between) == {None}  # on while the LM computes, off whenever the caller runs
    spoken = own.tts("hello world", generation=g)
    assert not np.array_equal(spoken, base)
    assert np.array_equal(own.tts("hello world", generation=dataclasses.replace(g, tts_adapter=None)), base)
    assert own.tts_adapter(g) == "tts" and own.tts_adapter(dataclasses.replace(g, tts_adapter="nope")) is None
    own.save_pretrained(tmp_path / "two")
    model = ["--model", str(tmp_path / "two"), "--threads", "1", "--dtype", "float32", "--temperature", "0.8", "--max-seconds", "0.4"]
    for flags, expected in (([], spoken), (["--no-adapter"], base)):
        r = cli_here("tts", "hello world", "-o", str(tmp_path / "out.wav"), *model, *flags)
        assert r.returncode == 0, r.stderr
        heard = load_audio(tmp_path / "out.wav")
        assert len(heard) == len(expected) and np.abs(heard - expected).max() < 2e-3


def test_a_voice_is_a_voice_adapter_chosen_by_name(pipeline, tmp_path, cli_here):
    """Generation.voice / --voice NAME speaks through the model's adapter voice-NAME (on the MCTP modules and the
    audio head too); the default voice is the model's own; an unknown voice is a one-line error naming the voices."""
    from speechlm.codec.audio import load_audio
    from speechlm.lm.adapters import SPEECH_TARGETS, AdapterConfig

    pipeline.save_pretrained(tmp_path / "sp")
    own = SpeechPipeline.from_pretrained(tmp_path / "sp")
    base = own.tts("hello world", generation=SHORT)
    assert list(own.voices()) == ["default"]
    torch.manual_seed(3)
    lora = own.lm.add_adapter(AdapterConfig("voice-two", rank=2, targets=SPEECH_TARGETS, description="TTS by a second voice"))
    assert lora.covers("mctp.0.blocks.0.qkv") and lora.covers("mctp.1.fuse") and lora.covers("audio_head.in_proj")
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.5)
    assert own.voices() == {"default": "the model's own voice", "two": "TTS by a second voice"}
    two = dataclasses.replace(SHORT, voice="two")
    spoken = own.tts("hello world", generation=two)
    assert not np.array_equal(spoken, base) and np.array_equal(own.tts("hello world", generation=SHORT), base)
    assert np.array_equal(np.concatenate(list(own.tts("hello world", stream=True, generation=two))), spoken)
    assert own.tts_adapter(two) == "voice-two" and own.tts_adapter(SHORT) is None
    with pytest.raises(SpeechLMError, match="no voice 'nope'; it speaks: default, two"):
        own.tts("hello world", generation=dataclasses.replace(SHORT, voice="nope"))
    own.save_pretrained(tmp_path / "voiced")
    model = ["--model", str(tmp_path / "voiced"), "--threads", "1", "--dtype", "float32", "--temperature", "0.8", "--max-seconds", "0.4"]
    r = cli_here("tts", "hello world", "-o", str(tmp_path / "two.wav"), "--voice", "two", *model)
    assert r.returncode == 0, r.stderr
    heard = load_audio(tmp_path / "two.wav")
    assert len(heard) == len(spoken) and np.abs(heard - spoken).max() < 2e-3
    r = cli_here("tts", "--list-voices", *model)
    assert r.returncode == 0 and r.stdout.splitlines() == ["default\tthe model's own voice", "two\tTTS by a second voice"], r.stdout
    for flags, message in ((["--voice", "nope"], "no voice 'nope'"), (["--voice", "two", "--no-adapter"], "does not go with --no-adapter")):
        r = cli_here("tts", "hello world", "-o", str(tmp_path / "x.wav"), *flags, *model)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "x.wav").exists()
    from speechlm.training.ship import ship  # shipped at a lower rank: smaller, still the voice

    own.lm.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "train_config.json").write_text('{"stage": "sft", "init_from": null}')
    own.codec.save_pretrained(tmp_path / "codec")
    dst = ship(tmp_path / "run", "voiced", models_dir=tmp_path / "models", codec=str(tmp_path / "codec"), adapter_ranks={"voice-two": 1})
    shipped = SpeechPipeline.from_pretrained(dst)
    assert shipped.lm.adapters["voice-two"].config.rank == 1 and list(shipped.voices()) == ["default", "two"]


def test_asr_hears_through_the_asr_adapter_and_tts_never_does(pipeline, tmp_path, monkeypatch, cli):
    from speechlm.lm.adapters import AdapterConfig

    pipeline.save_pretrained(tmp_path / "sp")
    own = hear_any_sound(SpeechPipeline.from_pretrained(tmp_path / "sp"))
    speech = (0.1 * np.sin(2 * np.pi * 200 * np.arange(8000) / 16000)).astype(np.float32)
    before_tts, before_asr = own.tts("hello world", generation=SHORT), own.asr(speech, generation=SHORT)
    lora = own.lm.add_adapter(AdapterConfig("asr", rank=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.5)  # a trained-looking adapter: it changes what the model computes
    assert own.asr_adapter(SHORT) == "asr" and own.asr_adapter(dataclasses.replace(SHORT, asr_adapter=None)) is None
    assert np.array_equal(own.tts("hello world", generation=SHORT), before_tts)  # speech: the base model, bit for bit
    seen = []
    real = own.transcribe_views

    def spy(views, generation=None):
        seen.append(own.lm.active_adapter)
        return real(views, generation)

    monkeypatch.setattr(own, "transcribe_views", spy)
    own.asr(speech, generation=SHORT)
    assert own.asr(speech, generation=dataclasses.replace(SHORT, asr_adapter=None)) == before_asr  # off: as before
    own.chat(speech, generation=SHORT)  # transcribe-first chat hears through it too
    assert seen == ["asr", None, "asr"] and own.lm.active_adapter is None
    own.save_pretrained(tmp_path / "with-adapter")
    assert list(SpeechPipeline.from_pretrained(tmp_path / "with-adapter").lm.adapters) == ["asr"]
    import json

    from speechlm.codec.audio import load_audio, save_audio

    save_audio(tmp_path / "q.wav", speech)
    model = ["--json", "--views", "1", "--model", str(tmp_path / "with-adapter"), "--threads", "1", "--dtype", "float32", "--speech-detector", "none"]
    for flags, adapter in (([], "asr"), (["--no-adapter"], None)):
        r = cli("asr", str(tmp_path / "q.wav"), *model, *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["text"] == own.asr(load_audio(tmp_path / "q.wav"), generation=Generation(asr_views=1, asr_adapter=adapter))
    assert seen[-2:] == ["asr", None]
