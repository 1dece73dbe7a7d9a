"""Duplex training data on real synthesized dialogues (espeak voices, a tiny random codec): the
streams' alignment (text at word starts, the empty code where the assistant is silent, the user
heard everywhere), crops as a pure function of (seed, step), and ``speechlm train lm --stage duplex``
from a SpeechLM export to a DuplexLM export and on from there."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.lm import SpeechLM, train_bpe_tokenizer
from speechlm.lm.duplex import DuplexLM
from speechlm.training.dialogues import DialogueConfig, synthesize_dialogues
from speechlm.training.duplex_data import DuplexMixture, dialogue_streams, text_stream
from speechlm.training.lm_data import LMFormat
from speechlm.training.lm_train import LMTrainConfig, LMTrainer, read_stage
from speechlm.training.tokenize import TokenCorpus, tokenize_corpus

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

Q, C = 4, 16
TINY_CODEC = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C}


ITEMS = [
    {"id": "d0", "text": "", "turns": [
        ["A", "Hello there, can you help me with this please?"],
        ["B", "Of course, I would be very happy to help you with that today."],
        ["A", "What time is it now?"],
        ["B", "It is three in the afternoon."],
    ]},
    {"id": "d1", "text": "", "turns": [["A", "Good morning."], ["B", "Good morning to you too."]]},
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two dialogues (the user interrupts a long answer; backchannels in long turns), tokenized; a tiny SpeechLM."""
    root = tmp_path_factory.mktemp("duplex")
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY_CODEC)).eval()
    codec.quantizer.init_random_codebooks_()
    config = DialogueConfig(user_voices=["espeak:en-us"], assistant_voices=["espeak:en-gb+f3"], p_interrupt=1.0, p_backchannel=1.0)
    synthesize_dialogues(ITEMS, root / "dialogues", config, progress=False)
    tokenize_corpus(root / "dialogues", root / "tok", codec, "tiny", progress=False)
    texts = [text for item in ITEMS for _, text in item["turns"]] + ["mm-hm yeah right okay uh-huh I see sure"]
    tokenizer = train_bpe_tokenizer(texts * 3, vocab_size=300, min_frequency=1)
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    lm = SpeechLM.from_backbone(backbone, tokenizer, num_codebooks=Q, codebook_size=C, depth_dim=16, depth_heads=2, mctp_modules=1)
    lm.save_pretrained(root / "base")
    return root


def test_streams_are_aligned(workdir):
    fmt = LMFormat.from_pretrained(workdir / "base")
    corpus = TokenCorpus(workdir / "tok")
    assert len(corpus) == 2
    saw_interrupt = saw_backchannel = False
    for i in range(len(corpus)):
        row, channels = corpus[i]
        s = dialogue_streams(row, channels, fmt)
        F = row["num_frames"]
        assert len(s) == F and np.array_equal(s.user, channels[0]), "the user is heard in every frame"
        # the model stream: the assistant's codes where it speaks, the empty code elsewhere
        assert np.array_equal(s.model[s.speaking], channels[1][s.speaking]) and (s.model[~s.speaking] == C).all()
        assert not s.speaking[: math.floor(0.3 * 25)].any(), "silent during the lead-in"
        words = row["channels"][1]["words"]
        for w in words:
            assert s.speaking[w["start_frame"] : w["end_frame"]].all(), w
        user_words = row["channels"][0]["words"]
        assert not s.speaking[user_words[0]["start_frame"]], "silent while the user starts talking"
        assert 0 < s.speaking.sum() < F

        # text: each word's pieces at its start frame (or right after the previous word's pieces)
        _, placed = text_stream(words, fmt.tokenizer, F, fmt.vocab.text_pad)
        assert len(placed) == len(words)
        previous_end, exact = 0, 0
        for w, (frame, ids) in zip(words, placed):
            assert frame == max(w["start_frame"], previous_end), (w, frame)
            assert s.text[frame : frame + len(ids)].tolist() == ids
            assert ids == fmt.tokenizer.encode(" " + w["word"], add_special_tokens=False)
            exact += frame == w["start_frame"]
            previous_end = frame + len(ids)
        assert exact >= len(words) // 2
        pieces = s.text[s.text != fmt.vocab.text_pad]
        assert len(pieces) == sum(len(ids) for _, ids in placed)
        assert fmt.tokenizer.decode(pieces.tolist()) == "".join(" " + w["word"] for w in words)

        for turn in row["turns"]:
            if turn["channel"] == 1 and turn["interrupted"]:
                saw_interrupt = True  # speaks up to the (faded) end of its audio, then stops
                end = math.ceil(turn["end"] * 25)
                assert s.speaking[end - 1] and not s.speaking[end : end + 3].any()
            if turn["channel"] == 1 and turn["kind"] == "backchannel":
                saw_backchannel = True
                assert s.speaking[math.floor(turn["start"] * 25) + 1]
    assert saw_interrupt and saw_backchannel

    shifted = dialogue_streams(row, channels, fmt, text_lead=2)  # text may run ahead of the speech
    first = np.flatnonzero(s.text != fmt.vocab.text_pad)[0]
    assert shifted.text[first - 2] == s.text[first]


def test_crops_are_a_pure_function_of_seed_and_step(workdir):
    fmt = LMFormat.from_pretrained(workdir / "base")
    a = DuplexMixture(fmt, [workdir / "tok"], seed=0, frames=40)
    b = DuplexMixture(fmt, [TokenCorpus(workdir / "tok")], seed=0, frames=40)
    batch = a.batch(3, [0, 1, 2])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "user_codes": (3, 40, Q), "model_codes": (3, 40, Q), "text": (3, 40), "attention_mask": (3, 40)
    }  # fmt: skip
    assert all(torch.equal(batch[k], b.batch(3, [0, 1, 2])[k]) for k in batch)
    assert not torch.equal(batch["user_codes"], a.batch(4, [0, 1, 2])["user_codes"])
    assert a.batch(3, [1])["text"].equal(batch["text"][1:2]), "an example does not depend on its batch"

    long = DuplexMixture(fmt, [workdir / "tok"], seed=0, frames=2000).example(0, 0)  # longer than any dialogue: padded
    n = int(long["attention_mask"].sum())
    assert 0 < n < 2000 and not long["attention_mask"][n:].any()
    assert (long["model_codes"][n:] == C).all() and (long["text"][n:] == fmt.vocab.text_pad).all()
    streams = [a.streams(i) for i in range(len(a.pool))]
    assert any(np.array_equal(long["user_codes"][:n].numpy(), s.user) for s in streams), "a short dialogue starts at frame 0"

    wrong = LMFormat(SpeechLM.from_pretrained(workdir / "base").config, fmt.tokenizer)
    wrong.config.codebook_size = 32
    with pytest.raises(SpeechLMError, match="reads 4 x 32"):
        DuplexMixture(wrong, [workdir / "tok"])


def test_train_lm_stage_duplex(workdir, tmp_path, cli):
    run = tmp_path / "run"
    args = ["train", "lm", "--stage", "duplex", "--data", str(workdir / "tok"), "--init-from", str(workdir / "base"), "--out", str(run),
            "--steps", "3", "--batch-size", "2", "--max-length", "48", "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--quiet"]  # fmt: skip
    result = cli(*args, '--duplex-config={"text_pad_weight": 0.3}')
    assert result.returncode == 0, result.stderr[-2000:]
    assert "duplex 100% (2 dialogues" in result.stdout
    model = DuplexLM.from_pretrained(run / "model")
    assert model.config.text_pad_weight == 0.3 and read_stage(run / "model")["stage"] == "duplex"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log) and log[0]["audio_positions"] > 0

    # continue from the duplex export: its duplex weights and config come along; the loss falls
    config = LMTrainConfig(out=str(tmp_path / "more"), stage="duplex", data=[str(workdir / "tok")], init_from=str(run / "model"),
                           steps=25, batch_size=2, max_length=48, lr=3e-3, warmup_steps=2, log_every=1)  # fmt: skip
    trainer = LMTrainer(config)
    assert isinstance(trainer.model, DuplexLM) and trainer.model.config.text_pad_weight == 0.3
    assert torch.equal(trainer.model.user_embedding.table.weight, model.user_embedding.table.weight)
    assert not any(p.requires_grad for p in trainer.model.lm.mctp.parameters())
    losses = [trainer.train_step()["loss"] for _ in range(25)]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    with pytest.raises(SpeechLMError, match="no --weights"):
        LMTrainConfig(out=str(tmp_path / "x"), stage="duplex", data=["d"], init_from="m", weights={"tts": 1.0})
