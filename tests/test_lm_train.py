"""Speech-LM training: the loss falls, exact resume, text -> align -> mctp1 stage switches from
exported models, and 2 DDP processes (torchrun, gloo) take the same step as one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.lm import SpeechLM, train_bpe_tokenizer
from speechlm.training.lm_train import LMTrainConfig, LMTrainer, read_stage
from speechlm.training.synth import SynthConfig, synthesize_corpus
from speechlm.training.textgen import generate
from speechlm.training.tokenize import TokenCorpus, tokenize_corpus

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

TINY_CODEC = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 16}


TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)  # fmt: skip
SPEECH = dict(output_head="depth", depth_dim=16, depth_heads=2, mctp_modules=2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tokenized espeak corpus (statements and spoken questions with their spoken answers) and a tiny speech LM."""
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY_CODEC)).eval()
    qa = generate("arithmetic", 3, seed=1)
    items = [{"id": f"s{i}", "text": t} for i, t in enumerate(["Hello there.", "The cat sat on the mat.", "Turn on the lights."])]
    items += [{"id": f"q{i}", "text": q["text"], "answer": q["answer"]} for i, q in enumerate(qa)]
    items += [{"id": f"a{i}", "text": q["answer"]} for i, q in enumerate(qa)]
    synthesize_corpus(items, root / "corpus", SynthConfig(voices=["espeak:en-us"]), progress=False)
    tokenize_corpus(root / "corpus", root / "tok", codec, "tiny", progress=False)
    texts = [row["text"] for row in TokenCorpus(root / "tok").rows]
    tokenizer = train_bpe_tokenizer(texts * 3, vocab_size=300, min_frequency=1, save_dir=root / "tokenizer")
    model = SpeechLM.from_backbone(
        LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA), tokenizer, num_codebooks=4, codebook_size=16, **SPEECH
    )
    model.save_pretrained(root / "base")
    return root


def config(workdir, out, **overrides) -> LMTrainConfig:
    base = dict(out=str(out), stage="align", data=[str(workdir / "tok")], init_from=str(workdir / "base"), steps=6, batch_size=4,
                micro_batch_size=2, lr=3e-3, warmup_steps=2, max_length=200, checkpoint_every=1000, log_every=1, seed=0,
                weights={"tts": 1, "asr": 1, "interleave": 1, "spoken_qa": 1})  # fmt: skip
    base.update(overrides)
    return LMTrainConfig(**base)


def test_loss_falls(workdir, tmp_path):
    trainer = LMTrainer(config(workdir, tmp_path / "run", steps=30))
    assert {"tts", "asr", "interleave", "spoken_qa"} == set(trainer.mixture.weights)
    losses = [trainer.train_step(all_losses=False)["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_resume_gives_the_same_next_losses(workdir, tmp_path):
    straight = LMTrainer(config(workdir, tmp_path / "a"))
    logs = [straight.train_step() for _ in range(4)]
    assert {"loss", "text_loss", "audio_loss", "mctp_1", "mctp_2", "lr", "grad_norm", "tokens_per_s"} <= set(logs[0])

    killed = LMTrainer(config(workdir, tmp_path / "b"))
    for _ in range(2):
        killed.train_step()
    killed.save_checkpoint()  # the last checkpoint a killed run left behind
    resumed = LMTrainer(config(workdir, tmp_path / "b"))
    assert resumed.step == 2
    again = [resumed.train_step()["loss"] for _ in range(2)]
    assert again == pytest.approx([log["loss"] for log in logs[2:]], rel=1e-5, abs=1e-6)

    resumed.train(progress=False)  # on to step 6, logging every step, a checkpoint at the end
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 6] and rows[0]["stage"] == "align"
    from speechlm.plotting import plot_log

    assert plot_log(tmp_path / "b" / "log.jsonl", tmp_path / "log.png").read_bytes()[:4] == b"\x89PNG"
    assert read_stage(tmp_path / "b" / "model")["step"] == 6
    SpeechLM.from_pretrained(tmp_path / "b" / "model")
    with pytest.raises(SpeechLMError, match="other settings"):
        LMTrainer(config(workdir, tmp_path / "b", lr=1e-4))


def test_stop_at_keeps_the_schedule(workdir, tmp_path):
    """--stop-at ends a run early (checkpoint + export) without changing the schedule of --steps."""
    straight = LMTrainer(config(workdir, tmp_path / "a"))
    logs = [straight.train_step() for _ in range(4)]
    stopped = LMTrainer(config(workdir, tmp_path / "b", stop_at=2))
    stopped.train(progress=False)
    assert stopped.step == 2 and read_stage(tmp_path / "b" / "model")["step"] == 2
    go_on = LMTrainer(config(workdir, tmp_path / "b"))
    again = [go_on.train_step() for _ in range(2)]
    assert [a["lr"] for a in again] == pytest.approx([log["lr"] for log in logs[2:]])
    assert [a["loss"] for a in again] == pytest.approx([log["loss"] for log in logs[2:]], rel=1e-5, abs=1e-6)


def test_text_stage_then_align_then_mctp1(workdir, tmp_path):
    backbone = json.dumps({"model_type": "llama", **TINY_LLAMA})
    text = LMTrainer(LMTrainConfig(out=str(tmp_path / "text"), stage="text", backbone=backbone, tokenizer="train-bpe", bpe_vocab_size=400,
                                   text_count=20, steps=3, batch_size=2, max_length=64, warmup_steps=1, log_every=1))  # fmt: skip
    assert (tmp_path / "text" / "tokenizer" / "tokenizer.json").is_file()
    assert text.mixture.weights == {"text": 1.0} and text.mixture.pack_text
    first = text.train_step()
    assert first["tokens"] == 2 * 64 and first["text_loss"] == first["loss"]
    text.train(progress=False)
    exported = SpeechLM.from_pretrained(tmp_path / "text" / "model")
    assert read_stage(tmp_path / "text" / "model")["stage"] == "text"

    # align from the text model: its never-trained speech modules are rebuilt for the data's codec
    align = LMTrainer(config(workdir, tmp_path / "align", init_from=str(tmp_path / "text" / "model"), speech=SPEECH, steps=2))
    assert (align.model.config.num_codebooks, align.model.config.codebook_size) == (4, 16)
    for name, value in exported.backbone.state_dict().items():
        assert torch.equal(align.model.backbone.state_dict()[name], value), name
    align.train(progress=False)

    # mctp1 from the align model trains only the first MCTP module
    mctp1 = LMTrainer(config(workdir, tmp_path / "mctp1", stage="mctp1", init_from=str(tmp_path / "align" / "model"), steps=1))
    before = {k: v.clone() for k, v in mctp1.model.state_dict().items()}
    log = mctp1.train_step()
    assert log["loss"] == pytest.approx(log["mctp_1"])
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("mctp.") else "") for k, v in mctp1.model.state_dict().items()
               if not torch.equal(v, before[k])}  # fmt: skip
    assert changed == {"mctp.0"}
    # a model whose speech modules were trained is not silently rebuilt for another codec
    with pytest.raises(SpeechLMError, match="does not match"):
        LMTrainer(config(workdir, tmp_path / "x", init_from=str(tmp_path / "align" / "model"), speech={"mctp_modules": 3}))


def test_asr_adapter_trains_alone_resumes_and_leaves_the_base_model(workdir, tmp_path):
    """--adapter asr --weights asr=1: only the adapter changes; a killed run resumes to the same losses;
    the export is the base model plus adapters/asr.*, and a second run from it continues that adapter; a run
    training another adapter keeps it; a run training the base drops it."""
    kw = dict(stage="sft", weights={"asr": 1}, adapter="asr", adapter_rank=4, lr=1e-2)
    straight = LMTrainer(config(workdir, tmp_path / "a", **kw))
    trainable = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.asr.") for n in trainable)
    logs = [straight.train_step()["loss"] for _ in range(4)]
    assert logs[-1] < logs[0]
    killed = LMTrainer(config(workdir, tmp_path / "b", **kw))
    killed.train_step(), killed.train_step()
    killed.save_checkpoint()
    resumed = LMTrainer(config(workdir, tmp_path / "b", **kw))
    assert [resumed.train_step()["loss"] for _ in range(2)] == pytest.approx(logs[2:], rel=1e-5, abs=1e-6)
    resumed.train(progress=False)
    base, exported = SpeechLM.from_pretrained(workdir / "base"), SpeechLM.from_pretrained(tmp_path / "b" / "model")
    assert list(exported.adapters) == ["asr"] and exported.active_adapter is None
    for name, value in base.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    assert any(bool(p.abs().sum()) for n, p in exported.adapters["asr"].named_parameters() if n.startswith("B."))
    more = LMTrainer(config(workdir, tmp_path / "c", **{**kw, "init_from": str(tmp_path / "b" / "model")}))
    for name, value in exported.adapters.state_dict().items():
        assert torch.equal(more.model.adapters.state_dict()[name], value), name
    other = LMTrainer(config(workdir, tmp_path / "f", **{**kw, "adapter": "tts", "weights": {"tts": 1}, "init_from": str(tmp_path / "b" / "model")}))
    assert {n for n, p in other.model.named_parameters() if p.requires_grad} == {n for n, _ in other.model.named_parameters() if n.startswith("adapters.tts.")}
    other.train(progress=False)  # another adapter trains on the same frozen base: the asr adapter stays as it was
    kept = SpeechLM.from_pretrained(tmp_path / "f" / "model")
    assert sorted(kept.adapters) == ["asr", "tts"]
    for name, value in exported.adapters["asr"].state_dict().items():
        assert torch.equal(kept.adapters["asr"].state_dict()[name], value), name
    full = LMTrainer(config(workdir, tmp_path / "e", init_from=str(tmp_path / "b" / "model")))  # the base trains: the adapter goes
    assert not len(full.model.adapters)
    full.train(progress=False)
    assert not (tmp_path / "e" / "model" / "adapters").exists() or not any((tmp_path / "e" / "model" / "adapters").iterdir())
    with pytest.raises(SpeechLMError, match="--adapter trains a task adapter"):
        config(workdir, tmp_path / "d", **{**kw, "stage": "duplex", "weights": None})


def test_a_voice_adapter_trains_the_mctp_modules_and_the_audio_head_too(workdir, tmp_path):
    """--adapter voice-NAME --adapter-targets speech --weights tts=1: a LoRA on everything speech passes through
    (MCTP modules and audio head too), only it trains, and its config says what it learned from."""
    from speechlm.lm.adapters import parse_targets

    kw = dict(stage="sft", weights={"tts": 1}, adapter="voice-us", adapter_rank=4, adapter_targets="speech", lr=1e-2,
              assistant_voices=["espeak:en-us"], steps=3)
    trainer = LMTrainer(config(workdir, tmp_path / "v", **kw))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert all(n.startswith("adapters.voice-us.") for n in trainable)
    assert {"adapters.voice-us.B.mctp__0__fuse", "adapters.voice-us.B.mctp__0__blocks__0__qkv"} <= trainable
    trainer.train(progress=False)
    voiced = SpeechLM.from_pretrained(tmp_path / "v" / "model")
    lora = voiced.adapters["voice-us"]
    assert lora.config.description == "stage sft, tasks tts=1 spoken by espeak:en-us, data tok"
    moved = [k for k, b in lora.B.items() if b.abs().sum() > 0]
    assert any(k.startswith("mctp__") for k in moved) and any(k.startswith("backbone__") for k in moved)
    assert parse_targets("q_proj, fuse") == ("q_proj", "fuse")
    with pytest.raises(SpeechLMError, match="adapter targets"):
        parse_targets(" , ")


def test_torchrun_two_processes_equal_one_process(workdir, tmp_path):
    """`torchrun --nproc_per_node 2` with DDP, and with FSDP2, (gloo) takes the same step as one process on the same global batch."""
    common = ["-m", "speechlm.training.lm_train", "--stage", "align", "--data", str(workdir / "tok"), "--init-from", str(workdir / "base"),
              "--steps", "1", "--batch-size", "4", "--micro-batch-size", "1", "--max-length", "200", "--lr", "1e-3",
              "--weights", "tts=1,asr=1,interleave=1,spoken_qa=1", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for name, command in (("single", [sys.executable]), ("ddp", torchrun), ("fsdp", torchrun)):
        extra = ["--fsdp"] if name == "fsdp" else []
        run = subprocess.run(
            [*command, *common, *extra, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=300
        )
        errors = [line for line in run.stderr.splitlines() if "Error" in line or "error" in line][:5]
        assert run.returncode == 0, (name, errors, run.stderr[-3000:])
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    for name in ("ddp", "fsdp"):
        other = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
        assert single["step"] == other["step"] == 1
        for key, value in single["model"].items():
            assert torch.allclose(value.float(), other["model"][key].float(), atol=1e-6, rtol=1e-4), (name, key)
        logs = [json.loads((tmp_path / run / "log.jsonl").read_text()) for run in ("single", name)]
        assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-5)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    for index, state in single["optimizer"]["state"].items():  # first Adam moment = the averaged gradient
        assert torch.allclose(state["exp_avg"], ddp["optimizer"]["state"][index]["exp_avg"], atol=1e-7, rtol=1e-3), index
    SpeechLM.from_pretrained(tmp_path / "fsdp" / "model")  # exported from the sharded model


def test_bfloat16_autocast_on_cpu_trains_close_to_float32(workdir, tmp_path):
    """--dtype bfloat16 runs the forward under CPU autocast: the weights stay float32, the first loss
    is the float32 loss up to bf16 rounding, and the loss still falls."""
    full = LMTrainer(config(workdir, tmp_path / "f32", steps=20))
    half = LMTrainer(config(workdir, tmp_path / "bf16", steps=20, dtype="bfloat16"))
    first_full, first_half = full.train_step()["loss"], half.train_step()["loss"]
    assert first_half == pytest.approx(first_full, rel=0.03) and first_half != first_full
    losses = [first_half] + [half.train_step()["loss"] for _ in range(19)]
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_loader_workers_build_the_same_batches(workdir, tmp_path):
    """--loader-workers builds the batches ahead in worker processes: the same batches, so the same
    losses as building them in the loop, and a resumed run's loader starts at the resumed step."""
    inline = LMTrainer(config(workdir, tmp_path / "inline", steps=4))
    inline.train(progress=False)
    workers = LMTrainer(config(workdir, tmp_path / "workers", steps=4, loader_workers=2, stop_at=2))
    workers.train(progress=False)
    workers = LMTrainer(config(workdir, tmp_path / "workers", steps=4, loader_workers=2))
    assert workers.step == 2
    ahead = list(workers.step_batches(2, 4))
    assert len(ahead) == 2 and all(len(step) == len(workers.micro_batches) for step in ahead)
    assert torch.equal(ahead[0][0]["input_ids"], workers.mixture.batch(2, workers.micro_batches[0])["input_ids"])
    workers.train(progress=False)
    rows = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()] for name in ("inline", "workers")]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows[1]] == pytest.approx([r["loss"] for r in rows[0]], rel=1e-5, abs=1e-6)


def test_time_budget_fits_the_schedule_in_warm_up(workdir, tmp_path):
    """--time-budget-minutes times warm-up steps and sets --steps (an upper bound) to what fits: a budget
    too small for more ends the run right after the timed steps, with its export; the learning rate of
    those steps is the one of any schedule (warm-up does not depend on --steps)."""
    fitted = LMTrainer(config(workdir, tmp_path / "fit", steps=1000, warmup_steps=12, time_budget_minutes=1e-9))
    fitted.train(progress=False)
    assert fitted.step == fitted.config.steps == 13 and read_stage(tmp_path / "fit" / "model")["step"] == 13
    plain = LMTrainer(config(workdir, tmp_path / "plain", steps=13, warmup_steps=12))
    plain.train(progress=False)
    rows = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()] for name in ("fit", "plain")]
    assert [r["lr"] for r in rows[0][:12]] == pytest.approx([r["lr"] for r in rows[1][:12]])
    again = LMTrainer(config(workdir, tmp_path / "fit", steps=1000, warmup_steps=12, time_budget_minutes=1e-9))
    assert again.step == 13 and again.config.steps == 13  # resumed: the fitted schedule, not the upper bound
    with pytest.raises(SpeechLMError, match="warmup-steps of at least 10"):
        LMTrainer(config(workdir, tmp_path / "short", steps=100, warmup_steps=4, time_budget_minutes=1.0)).train(progress=False)
