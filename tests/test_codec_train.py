"""Codec training: exact resume, DDP == single process, plots; codec CLI and codes-file errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from speechlm.codec.audio import save_audio
from speechlm.codec.config import TINY_ARCHITECTURE
from speechlm.codec.entropy import CodePrior
from speechlm.codec.model import Codec
from speechlm.training.codec_train import CodecTrainConfig, CodecTrainer

TINY = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 16, "kmeans_init": False, "dead_code_threshold_ratio": 0.0}


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    for i in range(4):
        f0 = 100 + 40 * i
        x = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * np.sin(2 * np.pi * 0.5 * t))) + 0.02 * rng.standard_normal(len(t))
        save_audio(d / f"clip{i}.wav", x.astype(np.float32))
    return d


def _config(audio_dir, out, **kw):
    base = dict(data=[f"dir:{audio_dir}"], out=str(out), steps=6, batch_size=4, crop_seconds=0.32, unquantized_steps=2, disc_start=3,
                checkpoint_every=3, log_every=1, codec=TINY, seed=0)
    base.update(kw)
    return CodecTrainConfig(**base)


def test_resume_gives_the_same_next_losses(audio_dir, tmp_path):
    straight = CodecTrainer(_config(audio_dir, tmp_path / "a"))
    losses_a = [straight.train_step()["loss"] for _ in range(6)]

    first = CodecTrainer(_config(audio_dir, tmp_path / "b", steps=3))
    first.train(progress=False)  # saves a checkpoint at step 3, as a killed run would have left it
    resumed = CodecTrainer(_config(audio_dir, tmp_path / "b", steps=6))
    assert resumed.step == 3
    losses_b = [resumed.train_step()["loss"] for _ in range(3)]
    assert losses_b == pytest.approx(losses_a[3:], rel=1e-5, abs=1e-6)
    # the exported model loads and the log can be plotted
    Codec.from_pretrained(tmp_path / "b" / "model")
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    from speechlm.plotting import plot_log

    png = plot_log(tmp_path / "b" / "log.jsonl", tmp_path / "log.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_other_settings(audio_dir, tmp_path):
    CodecTrainer(_config(audio_dir, tmp_path / "c", steps=3)).train(progress=False)
    with pytest.raises(Exception, match="other settings"):
        CodecTrainer(_config(audio_dir, tmp_path / "c", steps=6, lr=5e-4))


def test_torchrun_two_processes_equal_one_process(audio_dir, tmp_path):
    """`torchrun --nproc_per_node 2 ... train codec` (DDP, gloo) takes the same step as one process on the same global batch."""
    common = ["train", "codec", "--data", f"dir:{audio_dir}", "--steps", "1", "--batch-size", "4", "--crop-seconds", "0.32",
              "--unquantized-steps", "0", "--disc-start", "0", "--codec-config", json.dumps(TINY), "--quiet"]
    single = subprocess.run([sys.executable, "-m", "speechlm", *common, "--out", str(tmp_path / "single")], capture_output=True, text=True, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "speechlm", *common, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 1
    for part in ("codec", "disc"):
        for name, value in a[part].items():
            assert torch.allclose(value.float(), b[part][name].float(), atol=1e-5, rtol=1e-4), (part, name)


def test_init_from_exported_weights(audio_dir, tmp_path):
    first = CodecTrainer(_config(audio_dir, tmp_path / "a", steps=3))
    first.train(progress=False)
    second = CodecTrainer(_config(audio_dir, tmp_path / "b", steps=3, init_from=str(tmp_path / "a" / "model")))
    assert second.step == 0
    for name, value in first.codec.state_dict().items():
        if name.endswith("embed_avg"):  # left out of exported files, recomputed at load: the EMA invariant holds to
            # the library's eps (1e-5) times the entry's last step (~2 at the first update from random entries)
            torch.testing.assert_close(second.codec.state_dict()[name], value, rtol=1e-5, atol=1e-4, msg=name)
        else:
            assert torch.equal(value, second.codec.state_dict()[name]), name


def test_decoder_only_keeps_the_codes(audio_dir, tmp_path):
    """--decoder-only: encoder and codebooks frozen (the codes, and the LMs trained on them, stay valid), decoder trained."""
    CodecTrainer(_config(audio_dir, tmp_path / "a", steps=3)).train(progress=False)
    start = Codec.from_pretrained(tmp_path / "a" / "model")
    assert start.code_prior is None  # (a codec trained from scratch has none until fitted)
    start.code_prior = CodePrior(np.arange(start.config.codes_per_frame * start.config.codebook_size).reshape(start.config.codes_per_frame, -1) % 7,
                                 start.codec_id, start.config.groups)
    start.save_pretrained(tmp_path / "a" / "model")
    trainer = CodecTrainer(_config(audio_dir, tmp_path / "b", steps=4, disc_start=2, init_from=str(tmp_path / "a" / "model"), decoder_only=True,
                                   envelope_weight=1.0))
    trainer.train(progress=False)
    tuned = Codec.from_pretrained(tmp_path / "b" / "model")
    assert tuned.codec_id == start.codec_id
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [k for k in before if not k.startswith("decoder.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "encoder and codebooks must not move"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder.")), "the decoder trains"
    wav = torch.from_numpy(np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1)[None]
    assert torch.equal(start.encode(wav), tuned.encode(wav))
    assert tuned.code_prior.fingerprint == start.code_prior.fingerprint  # the same codes: the code prior (.slc) carried over
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "adv" in rows[-1] and 0 < rows[-1]["envelope"] < 2


def test_decoder_only_needs_a_codec_to_start_from(audio_dir, tmp_path):
    with pytest.raises(Exception, match="--init-from"):
        CodecTrainer(_config(audio_dir, tmp_path / "c", decoder_only=True))


def test_ship_codec_run_from_a_shipped_codec_keeps_its_history(tmp_path):
    """A decoder-only run started from a shipped codec ships with the shipped codec's run before its own."""
    import json

    from speechlm.training.ship import ship

    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    (models / "base" / "provenance.json").write_text(json.dumps({"name": "base", "run": "runs/base", "step": 5, "train_config": {"steps": 9}}))
    run = tmp_path / "runs" / "dec"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "train_config.json").write_text(json.dumps({"init_from": str(models / "base"), "decoder_only": True}))
    dst = ship(run, "base", models)  # replaces the codec it started from
    provenance = json.loads((dst / "provenance.json").read_text())
    assert [s["run"] for s in provenance["stages"]] == ["runs/base", str(run)]
    assert provenance["stages"][0]["step"] == 5 and provenance["train_config"]["decoder_only"] is True
    assert (dst / "config.json").is_file()


def test_level_dropout_decodes_rows_from_their_first_levels(audio_dir, tmp_path):
    """--level-dropout (decoder-only): that share of a step's rows is decoded from the first k < R levels of each
    group, drawn from (seed, step) so that a resumed run draws the same; the latent is the sum of those levels."""
    CodecTrainer(_config(audio_dir, tmp_path / "a", steps=3)).train(progress=False)
    trainer = CodecTrainer(_config(audio_dir, tmp_path / "b", steps=2, init_from=str(tmp_path / "a" / "model"), decoder_only=True,
                                   level_dropout=1.0))
    R = trainer.codec.config.num_quantizers
    levels = trainer._levels(8)
    assert levels.shape == (8,) and bool(((levels >= 1) & (levels < R)).all()) and torch.equal(levels, trainer._levels(8))
    codes = trainer.codec.encode(torch.randn(2, 1280) * 0.1)
    one = trainer.codec.quantizer.lookup(codes, torch.tensor([1, R]))
    torch.testing.assert_close(one[0], trainer.codec.quantizer.lookup(trainer.codec.quantizer.keep_levels(codes, 1))[0])
    torch.testing.assert_close(one[1], trainer.codec.quantizer.lookup(codes)[1])
    trainer.train(progress=False)  # trains
    assert CodecTrainer(_config(audio_dir, tmp_path / "c", steps=2, init_from=str(tmp_path / "a" / "model"), decoder_only=True))._levels(8) is None
    with pytest.raises(Exception, match="--level-dropout .* needs --decoder-only"):
        CodecTrainer(_config(audio_dir, tmp_path / "d", level_dropout=0.5))
