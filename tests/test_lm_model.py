"""SpeechLM model: shapes and losses for both heads and both backbone classes, training steps,
stages, exact save/load, the delay layout, the tokenizer, and errors on bad input."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.utils import logging as hf_logging

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import (
    SpeechLM,
    SpeechLMConfig,
    audio_targets,
    delay_frames,
    load_tokenizer,
    speech_segment,
    train_bpe_tokenizer,
    undelay_frames,
)

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

Q, C = 4, 16
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a speech language model speaks and listens"] * 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(TEXTS, vocab_size=400, min_frequency=1, save_dir=path)
    return path


def backbone_config(kind: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    if kind == "llama":
        return LlamaConfig(**common, max_position_embeddings=256)
    return Qwen2Config(**common, max_position_embeddings=256, tie_word_embeddings=True)


def make_model(tokenizer_dir, kind="llama", head="depth", mctp=2, seed=0) -> SpeechLM:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    return SpeechLM.from_backbone(
        backbone_config(kind, len(tokenizer)),
        tokenizer,
        num_codebooks=Q,
        codebook_size=C,
        output_head=head,
        depth_dim=32,
        depth_heads=2,
        mctp_modules=mctp,
    )


def make_batch(model: SpeechLM, seed=0):
    """Two rows: '<|tts|> text <|speech_start|> audio... <|speech_end|> <|eos|>', the second left-padded."""
    g = torch.Generator().manual_seed(seed)
    v, tok = model.vocab, model.tokenizer
    rows = []
    for text, frames in (("hello world", 6), ("the quick fox", 4)):
        ids, codes = speech_segment(model, torch.randint(0, C, (frames, Q), generator=g))
        rows.append(([v.tasks["<|tts|>"], *tok.encode(text), *ids, v.eos], codes))
    L = max(len(r) for r, _ in rows)
    input_ids = torch.full((2, L), v.pad)
    audio_codes = torch.full((2, L, Q), C)
    attention = torch.zeros(2, L, dtype=torch.bool)
    for b, (ids, codes) in enumerate(rows):
        input_ids[b, L - len(ids) :] = torch.tensor(ids)
        attention[b, L - len(ids) :] = True
        audio_codes[b, input_ids[b] == v.audio] = codes
    return dict(input_ids=input_ids, audio_codes=audio_codes, audio_mask=input_ids == v.audio, attention_mask=attention)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_forward_shapes_and_finite_losses(tokenizer_dir, kind, head):
    model = make_model(tokenizer_dir, kind, head)
    batch = make_batch(model)
    out = model(**batch)
    B, L = batch["input_ids"].shape
    assert out.text_logits.shape == (B, L, model.backbone.get_output_embeddings().weight.shape[0])
    assert out.hidden.shape == (B, L, 32)
    assert out.codebook_losses.shape == (Q,)
    assert len(out.mctp_losses) == 2
    # Targets: frames 6 + 4 (plus delay tail) and one "speech ends" target per segment.
    tail = model.config.max_delay
    assert out.audio_targets.shape == (6 + 4 + 2 * tail + 2, Q)
    assert out.audio_logits.shape == (out.audio_targets.shape[0], Q, C + 1)
    for loss in (out.loss, out.text_loss, out.audio_loss, *out.mctp_losses):
        assert torch.isfinite(loss)
    out.loss.backward()
    assert model.audio_embedding.table.weight.grad is not None


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_training_steps_reduce_losses(tokenizer_dir, head):
    model = make_model(tokenizer_dir, "qwen2", head)
    batch = make_batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = model(**batch)
    for _ in range(15):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    last = model(**batch)
    assert last.loss < 0.7 * first.loss
    assert last.audio_loss < first.audio_loss and last.text_loss < first.text_loss
    assert all(b < a for a, b in zip(first.mctp_losses, last.mctp_losses))


def test_stages_freeze_the_right_parameters(tokenizer_dir):
    model = make_model(tokenizer_dir, "llama", "depth", mctp=3)
    batch = make_batch(model)

    def trainable_prefixes():
        return {
            name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("mctp.") else "")
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    model.set_stage("text")
    assert trainable_prefixes() == {"backbone"}
    model.set_stage("align")
    assert trainable_prefixes() == {"backbone", "audio_embedding", "audio_head"}
    assert model(**batch).mctp_losses == []
    model.set_stage("mctp")
    assert trainable_prefixes() == {"mctp.0", "mctp.1", "mctp.2"}
    model.set_stage("sft")
    assert trainable_prefixes() == {"backbone", "audio_embedding", "audio_head", "mctp.0", "mctp.1", "mctp.2"}

    model.set_stage("mctp1")
    assert trainable_prefixes() == {"mctp.0"}
    out = model(**batch)
    assert out.text_loss is None and out.audio_loss is None and len(out.mctp_losses) == 1
    assert torch.equal(out.loss, model.config.mctp_loss_weight * out.mctp_losses[0])
    assert not out.hidden.requires_grad  # the frozen backbone runs without building a graph
    out.loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(name.startswith("mctp.0.") for name in grads)
    assert len(model(**batch, all_losses=True).mctp_losses) == 3
    with pytest.raises(SpeechLMError, match="unknown training stage"):
        model.set_stage("pretrain")


@pytest.mark.parametrize("kind,head", [("llama", "depth"), ("qwen2", "parallel_delay")])
def test_save_load_round_trip_is_exact(tokenizer_dir, tmp_path, kind, head):
    model = make_model(tokenizer_dir, kind, head).eval()
    batch = make_batch(model)
    model.save_pretrained(tmp_path / "lm")
    loaded = SpeechLM.from_pretrained(tmp_path / "lm")
    assert loaded.config == model.config and loaded.vocab == model.vocab
    with torch.no_grad():
        a, b = model(**batch, all_losses=True), loaded(**batch, all_losses=True)
    assert torch.equal(a.text_logits, b.text_logits)
    assert torch.equal(a.audio_logits, b.audio_logits)
    assert all(torch.equal(x, y) for x, y in zip(a.mctp_losses, b.mctp_losses))
    assert loaded.tokenizer.encode("hello <|speech_start|>") == model.tokenizer.encode("hello <|speech_start|>")


def test_from_pretrained_errors(tokenizer_dir, tmp_path):
    with pytest.raises(SpeechLMError, match="not found"):
        SpeechLM.from_pretrained(tmp_path / "missing")
    model = make_model(tokenizer_dir)
    model.save_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "speech.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpeechLMError, match="corrupt"):
        SpeechLM.from_pretrained(tmp_path / "lm")


def test_bad_inputs_raise_clear_errors(tokenizer_dir):
    model = make_model(tokenizer_dir)
    batch = make_batch(model)
    with pytest.raises(SpeechLMError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(SpeechLMError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(SpeechLMError, match="token ids"):
        model(torch.full((1, 4), 10_000))
    bad = batch["audio_codes"].clone()
    bad[batch["audio_mask"]] = C + 1
    with pytest.raises(SpeechLMError, match="must lie in"):
        model(**{**batch, "audio_codes": bad})
    with pytest.raises(SpeechLMError, match="codebooks per frame"):
        model(**{**batch, "audio_codes": batch["audio_codes"][..., :3]})
    with pytest.raises(SpeechLMError, match="no audio_codes"):
        model(batch["input_ids"], audio_mask=batch["audio_mask"])
    with pytest.raises(SpeechLMError, match="output_head"):
        SpeechLMConfig(output_head="mlp")
    with pytest.raises(SpeechLMError, match="delays"):
        SpeechLMConfig(output_head="parallel_delay", num_codebooks=2, delays=[0, 1, 2])


def test_delay_layout_round_trip_and_targets():
    frames = torch.arange(12).view(4, 3)  # F = 4 frames, Q = 3
    layout = delay_frames(frames, [0, 1, 2], empty=99)
    assert layout.shape == (6, 3)
    assert layout[:, 1].tolist() == [99, 1, 4, 7, 10, 99]
    assert torch.equal(undelay_frames(layout, [0, 1, 2]), frames)

    # Sequence: text, 6 audio positions, text. Targets at offset 1 for positions 0..6.
    mask = torch.tensor([[False, True, True, True, True, True, True, False]])
    codes = torch.full((1, 8, 3), 99)
    codes[0, 1:7] = layout
    targets = audio_targets(codes, mask, offset=1, delays=[0, 1, 2], empty=99)
    assert targets.shape == (1, 7, 3)
    assert targets[0, 0].tolist() == [0, -100, -100]  # first position: codebooks 1, 2 not started
    assert targets[0, 1].tolist() == [3, 1, -100]
    assert targets[0, 4].tolist() == [99, 10, 8]  # codebook 0 has ended: learned as empty
    assert targets[0, 6].tolist() == [99, 99, 99]  # after the segment: "speech ends"
    # Offset 2 (MCTP module 1): position t learns position t + 2.
    assert audio_targets(codes, mask, offset=2, delays=[0, 1, 2], empty=99)[0, 0].tolist() == [3, 1, -100]


def test_tokenizer_has_special_tokens(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    config = SpeechLMConfig()
    vocab = tokenizer.get_vocab()
    for token in config.special_tokens:
        ids = tokenizer.encode(f"hi {token} there")
        assert vocab[token] in ids  # never split
    text = "hello <|speech_start|><|audio|><|speech_end|> world"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "hello  world"
    assert tokenizer.decode(tokenizer.encode("the quick brown fox")) == "the quick brown fox"
    with pytest.raises(SpeechLMError):
        train_bpe_tokenizer(["", "  "], vocab_size=400)


def test_bfloat16_model_trains_and_round_trips(tokenizer_dir, tmp_path):
    model = make_model(tokenizer_dir, "qwen2", "parallel_delay").to(torch.bfloat16)
    batch = make_batch(model)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval().save_pretrained(tmp_path / "lm")
    loaded = SpeechLM.from_pretrained(tmp_path / "lm")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(**batch).text_logits, loaded(**batch).text_logits)


def test_adapter_starts_as_a_no_op_trains_alone_and_round_trips(tokenizer_dir, tmp_path):
    from speechlm.lm.adapters import AdapterConfig

    model = make_model(tokenizer_dir, "llama", "parallel_delay")
    batch = make_batch(model)
    model.eval()
    with torch.no_grad():
        base = model(**batch).loss
    lora = model.add_adapter(AdapterConfig("asr", rank=4))
    assert {"backbone__model__layers__0__self_attn__q_proj", "audio_embedding__table"} <= set(lora.A)
    with torch.no_grad(), model.adapter("asr"):
        assert torch.equal(model(**batch).loss, base)  # B starts at zero
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("adapters.")}
    trainable = model.train_adapter("asr")
    assert trainable and all(n.startswith("adapters.asr.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # base weights untouched
    model.eval()
    model.active_adapter = None
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, base)  # off: the base model, exactly
        with model.adapter("asr"):
            adapted = model(**batch).loss
    assert adapted < base
    model.save_pretrained(tmp_path / "lm")
    assert sorted(p.name for p in (tmp_path / "lm" / "adapters").iterdir()) == ["asr.json", "asr.safetensors"]
    loaded = SpeechLM.from_pretrained(tmp_path / "lm")
    assert list(loaded.adapters) == ["asr"] and loaded.active_adapter is None
    with torch.no_grad():
        assert torch.equal(loaded(**batch).loss, base)
        with loaded.adapter("asr"):
            assert torch.equal(loaded(**batch).loss, adapted)
    with pytest.raises(SpeechLMError, match="no adapter 'tts'"), loaded.adapter("tts"):
        pass
    with pytest.raises(SpeechLMError, match="already has an adapter"):
        loaded.add_adapter(AdapterConfig("asr"))
    with pytest.raises(SpeechLMError, match="no linear or embedding layer"):
        loaded.add_adapter(AdapterConfig("x", targets=("nothing_here",)))
    (tmp_path / "lm" / "adapters" / "asr.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpeechLMError, match="cannot read adapter weights"):
        SpeechLM.from_pretrained(tmp_path / "lm")


def test_the_active_adapter_is_per_thread(tokenizer_dir):
    import threading

    from speechlm.lm.adapters import AdapterConfig

    model = make_model(tokenizer_dir, "llama", "parallel_delay").eval()
    lora = model.add_adapter(AdapterConfig("asr", rank=2))
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.5)
    batch = make_batch(model)
    with torch.no_grad():
        base = model(**batch).loss
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def other():  # runs while the main thread is inside model.adapter("asr")
        inside.wait()
        with torch.no_grad():
            seen["loss"], seen["active"] = model(**batch).loss, model.active_adapter
        outside.set()

    worker = threading.Thread(target=other)
    worker.start()
    with model.adapter("asr"), torch.no_grad():
        adapted = model(**batch).loss
        inside.set()
        outside.wait(30)
    worker.join()
    assert seen["active"] is None and torch.equal(seen["loss"], base) and not torch.equal(adapted, base)


def test_an_adapter_merged_at_inference_computes_what_its_update_adds(tokenizer_dir):
    """Without gradients an adapted layer runs on its weight with the update merged in (one product);
    with them, base output + update (training's path). The two agree, and the merged weights follow
    an in-place change of the factors (an optimizer step, a load) and a change of dtype."""
    from speechlm.lm.adapters import AdapterConfig

    model = make_model(tokenizer_dir, "llama", "parallel_delay").eval()
    lora = model.add_adapter(AdapterConfig("asr", rank=2))
    batch = make_batch(model)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with model.adapter("asr"):
            with torch.no_grad():
                merged = model(**batch).text_logits
            training_path = model(**batch).text_logits.detach()
        return merged, training_path

    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.5)
    merged, training_path = both()
    torch.testing.assert_close(merged, training_path, rtol=1e-3, atol=1e-3)
    assert lora._merged  # made once, kept
    with torch.no_grad():
        for b in lora.B.values():
            b.mul_(-1.0)
    flipped, training_path = both()
    torch.testing.assert_close(flipped, training_path, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(flipped, merged)
    model.to(torch.bfloat16)
    with torch.no_grad(), model.adapter("asr"):
        assert model(**batch).text_logits.dtype == torch.bfloat16
    assert all(entry[1].dtype == torch.bfloat16 for entry in lora._merged.values())


def test_an_adapter_reduced_in_rank_keeps_the_best_approximation_of_its_updates(tokenizer_dir, tmp_path):
    """reduce_adapter_rank: at a lower rank each layer's update is its truncated SVD (linear layers and the audio embedding), the adapter is smaller, and it saves and loads."""
    from speechlm.lm.adapters import SPEECH_TARGETS, AdapterConfig, low_rank_factors

    model = make_model(tokenizer_dir, "llama", "parallel_delay").eval()
    torch.manual_seed(4)
    lora = model.add_adapter(AdapterConfig("voice-x", rank=4, targets=SPEECH_TARGETS, description="d"))
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.5)
    layers = {path: layer for layer, path in model._adapted.items() if lora.covers(path)}
    assert "audio_embedding.table" in layers and any(p.startswith("mctp.") for p in layers)
    updates = {p: (lora.merged_weight(p, layer) - layer.weight).detach() for p, layer in layers.items()}
    assert model.reduce_adapter_rank("voice-x", 4) is lora
    three = low_rank_factors(lora, 3)
    assert three["A.mctp__0__fuse"].shape == (3, lora.A["mctp__0__fuse"].shape[1]) and three["A.audio_embedding__table"].shape[1] == 3
    one = model.reduce_adapter_rank("voice-x", 1)
    assert one.config.rank == 1 and one.config.scale == 1.0 and one.config.description == "d; rank 4 reduced to 1 (SVD)"
    assert sum(t.numel() for t in one.parameters()) * 4 == sum(t.numel() for t in lora.parameters())
    for p, layer in layers.items():
        u, s, vh = torch.linalg.svd(updates[p])
        torch.testing.assert_close(one.merged_weight(p, layer) - layer.weight, s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-3, atol=1e-5)
    model.save_pretrained(tmp_path / "lm")
    loaded = SpeechLM.from_pretrained(tmp_path / "lm")
    assert loaded.adapters["voice-x"].config == one.config
    with pytest.raises(SpeechLMError, match="a lower rank is 1 .. 1"):
        model.reduce_adapter_rank("voice-x", 2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_lean_forward_computes_what_transformers_computes(tokenizer_dir, kind):
    """Inference forwards run through speechlm.lm.lean: left-padded prompts, cached steps, a ready 4-D
    mask and an active adapter give the transformers backbone's hidden states and caches."""
    from transformers import DynamicCache

    from speechlm.lm.adapters import AdapterConfig
    from speechlm.lm.lean import supports

    model = make_model(tokenizer_dir, kind, "parallel_delay").eval()
    assert model._lean and supports(model.backbone)
    lora = model.add_adapter(AdapterConfig("asr", rank=2))
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(std=0.5)
    torch.manual_seed(1)
    D = model.backbone.config.hidden_size
    prompt = torch.randn(3, 7, D)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, :2], valid[2, :5] = False, False
    steps = [torch.randn(3, 2, D) for _ in range(3)]

    def run(lean: bool, adapter: str | None) -> list[torch.Tensor]:
        model._lean = lean
        cache, mask, outs = DynamicCache(config=model.backbone.config), valid, []
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        with torch.no_grad(), model.adapter(adapter):
            outs.append(model.run_backbone(prompt, attention_mask=mask, position_ids=positions, past_key_values=cache).last_hidden_state)
            for x in steps:
                mask = torch.cat((mask, torch.ones(3, 2, dtype=torch.bool)), dim=1)
                positions = positions[:, -1:] + torch.arange(1, 3)
                outs.append(model.run_backbone(x, attention_mask=mask, position_ids=positions, past_key_values=cache).last_hidden_state)
            # a ready 4-D mask (the duplex model's KV ring passes one): the last step again, without the cache
            full = torch.cat((prompt, *steps), dim=1)
            causal = torch.ones(full.shape[1], full.shape[1], dtype=torch.bool).tril()
            ready = causal[None, None] & mask[:, None, None, :]
            outs.append(model.run_backbone(full, attention_mask=ready, position_ids=(mask.long().cumsum(1) - 1).clamp(min=0)).last_hidden_state)
        outs += [layer.keys for layer in cache.layers]
        model._lean = True
        return outs

    for adapter in (None, "asr"):
        lean, reference = run(True, adapter), run(False, adapter)
        for a, b in zip(lean, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(True, "asr")[0], run(True, None)[0])  # the adapter is on in the lean forward
    model.backbone.config.hidden_act = "gelu"
    assert not supports(model.backbone)  # not the arithmetic lean_backbone does: transformers' forward runs it


def test_int8_products_read_the_weight_as_int8_for_few_rows_only():
    from speechlm.lm.int8 import Int8Products, quantize_int8

    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-6).all()  # rounded to nearest
    products = Int8Products(max_rows=4)
    w16 = weight.to(torch.bfloat16)
    x = torch.randn(2, 2, 32, dtype=torch.bfloat16)  # 4 rows: int8
    expected = torch.nn.functional.linear(x.float(), (products.int8(w16)[0].float() * products.int8(w16)[1].float()[:, None]))
    torch.testing.assert_close(products.linear(x, w16).float(), expected, rtol=2e-2, atol=2e-2)
    wide = torch.randn(5, 32, dtype=torch.bfloat16)  # 5 rows, and float32: the plain product, exactly
    assert torch.equal(products.linear(wide, w16), torch.nn.functional.linear(wide, w16))
    assert torch.equal(products.linear(x.float(), weight), torch.nn.functional.linear(x.float(), weight))
    odd, x_odd = torch.randn(8, 24, dtype=torch.bfloat16), torch.randn(1, 24, dtype=torch.bfloat16)  # inner size not a multiple of 16
    assert torch.equal(products.linear(x_odd, odd), torch.nn.functional.linear(x_odd, odd))
    first = products.int8(w16)[0]
    with torch.no_grad():
        w16.mul_(-1)  # changed in place: a new int8 copy
    assert torch.equal(products.int8(w16)[0], -first)
    with pytest.raises(SpeechLMError, match="max_rows"):
        Int8Products(max_rows=0)


def test_use_int8_computes_few_row_steps_near_the_bfloat16_ones(tokenizer_dir):
    model = make_model(tokenizer_dir, "llama", "parallel_delay").eval().to(torch.bfloat16)
    torch.manual_seed(2)
    x = torch.randn(2, 1, model.backbone.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = model.run_backbone(x).last_hidden_state.float()
        model.use_int8(4)
        rounded = model.run_backbone(x).last_hidden_state.float()
        assert not torch.equal(rounded, plain)
        assert (rounded - plain).norm() < 0.05 * plain.norm()
        model.use_int8(None)
        assert torch.equal(model.run_backbone(x).last_hidden_state.float(), plain)
    model._lean = False
    with pytest.raises(SpeechLMError, match="Llama or Qwen2"):
        model.use_int8(4)
