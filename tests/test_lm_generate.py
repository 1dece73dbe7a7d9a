"""SpeechLM decoding: KV-cached equals uncached, batched equals one by one, MCTP emits N+1 frames
from the first backbone forward, schedules, sampling, limits and errors on bad input."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.utils import logging as hf_logging

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import (
    GREEDY,
    PromptBatch,
    Sampling,
    SpeechLM,
    iter_audio,
    load_tokenizer,
    sample_codebooks,
    sample_logits,
    speech_segment,
    text_generate,
    train_bpe_tokenizer,
    tts_frames,
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


def make_model(tokenizer_dir, kind="llama", head="depth", mctp=3, seed=0) -> SpeechLM:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config = LlamaConfig(**common, max_position_embeddings=128) if kind == "llama" else Qwen2Config(**common, max_position_embeddings=128)
    model = SpeechLM.from_backbone(
        config, tokenizer, num_codebooks=Q, codebook_size=C, output_head=head, depth_dim=32, depth_heads=2, mctp_modules=mctp
    )
    # Random audio embeddings/heads this small barely depend on their input; make them matter.
    with torch.no_grad():
        for p in (*model.audio_embedding.parameters(), *model.audio_head.parameters(), *model.mctp.parameters()):
            if p.ndim > 1:
                p.mul_(20)
    return model.eval()


def prompts(model: SpeechLM) -> list[list[int]]:
    tts = model.vocab.tasks["<|tts|>"]
    return [[tts, *model.tokenizer.encode("the quick brown fox")], [tts, *model.tokenizer.encode("hello")]]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_text_generation_cached_equals_uncached_and_batched_equals_single(tokenizer_dir, kind):
    model = make_model(tokenizer_dir, kind)
    rows = prompts(model)
    kwargs = dict(max_new_tokens=8, sampling=GREEDY, stop_tokens=[])
    cached = text_generate(model, rows, **kwargs)
    assert cached == text_generate(model, rows, use_cache=False, **kwargs)
    assert cached == [text_generate(model, [row], **kwargs)[0] for row in rows]
    assert all(len(out) == 8 for out in cached)


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
@pytest.mark.parametrize("schedule", [[3], [0], [1, 3, 0, 2]])
def test_audio_generation_cached_equals_uncached(tokenizer_dir, head, schedule):
    model = make_model(tokenizer_dir, "qwen2", head)
    kwargs = dict(max_frames=12, min_frames=12, sampling=GREEDY, schedule=schedule)
    cached = tts_frames(model, prompts(model), **kwargs)
    uncached = tts_frames(model, prompts(model), use_cache=False, **kwargs)
    for a, b in zip(cached.frames, uncached.frames):
        assert a.shape == (12, Q)
        assert torch.equal(a, b)
    single = tts_frames(model, prompts(model)[1:], **kwargs)
    assert torch.equal(single.frames[0], cached.frames[1])
    assert len(set(map(tuple, cached.frames[0].tolist()))) > 1  # not one frame repeated


def test_mctp_emits_n_plus_one_frames_from_the_first_forward(tokenizer_dir):
    model = make_model(tokenizer_dir, "llama", "depth", mctp=3)
    steps = list(iter_audio(model, [[*prompts(model)[0], model.vocab.speech_start]], max_frames=20, min_frames=20, sampling=GREEDY))
    first = steps[0]
    assert first.backbone_forwards == 1  # the forward over the prompt ...
    assert first.positions == 4 and first.frames[0].shape == (4, Q)  # ... already yields N + 1 = 4 frames
    assert [s.positions for s in steps] == [4] * 5 and steps[-1].finished.all()

    plain = tts_frames(model, prompts(model)[:1], max_frames=6, min_frames=6, sampling=GREEDY, schedule=[0])
    assert plain.positions_per_forward == [1] * 6 and plain.first_frame_forward == 1
    mixed = tts_frames(model, prompts(model)[:1], max_frames=10, min_frames=10, sampling=GREEDY, schedule=[2, 0])
    assert mixed.positions_per_forward == [3, 1, 1, 1, 1, 1, 1, 1]


def test_delay_pattern_completes_frames_after_the_delay(tokenizer_dir):
    model = make_model(tokenizer_dir, "llama", "parallel_delay", mctp=3)  # delays 0..3
    result = tts_frames(model, prompts(model)[:1], max_frames=8, min_frames=8, sampling=GREEDY)
    # 4 positions per forward; a frame is complete max_delay = 3 positions after it starts.
    assert result.positions_per_forward == [4, 4, 3]
    assert result.first_frame_forward == 1
    assert result.frames[0].shape == (8, Q) and (result.frames[0] < C).all()


def test_segment_ends_and_limits(tokenizer_dir):
    model = make_model(tokenizer_dir, "llama", "depth", mctp=2)
    # Bias codebook 0 towards "empty": the segment ends as soon as min_frames allows.
    with torch.no_grad():
        model.audio_head.out_bias[0, C] += 1000.0
    assert tts_frames(model, prompts(model), max_frames=10, min_frames=3, sampling=GREEDY).frames[0].shape == (3, Q)
    assert tts_frames(model, prompts(model), max_frames=5, min_frames=0, sampling=GREEDY).frames[1].shape == (0, Q)
    with torch.no_grad():
        model.audio_head.out_bias[0, C] -= 2000.0
    assert tts_frames(model, prompts(model), max_frames=5, sampling=GREEDY).frames[0].shape == (5, Q)


def test_seeded_sampling_is_repeatable(tokenizer_dir):
    model = make_model(tokenizer_dir, "llama", "depth")
    sampling = Sampling(temperature=1.0, top_k=8, top_p=0.9, repetition_penalty=1.3)
    a = text_generate(model, prompts(model), max_new_tokens=10, sampling=sampling, seed=1, stop_tokens=[])
    assert a == text_generate(model, prompts(model), max_new_tokens=10, sampling=sampling, seed=1, stop_tokens=[])
    x = tts_frames(model, prompts(model), max_frames=8, min_frames=8, sampling=sampling, seed=3).frames
    y = tts_frames(model, prompts(model), max_frames=8, min_frames=8, sampling=sampling, seed=3).frames
    z = tts_frames(model, prompts(model), max_frames=8, min_frames=8, sampling=sampling, seed=4).frames
    assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert not all(torch.equal(p, q) for p, q in zip(x, z))


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample_logits(logits, GREEDY).item() == 1
    assert all(sample_logits(logits, Sampling(top_k=1)).item() == 1 for _ in range(10))
    assert all(sample_logits(logits, Sampling(top_p=0.01)).item() == 1 for _ in range(10))
    assert {sample_logits(logits, Sampling(top_k=2), torch.Generator().manual_seed(i)).item() for i in range(40)} == {1, 3}
    with pytest.raises(SpeechLMError, match="sampling"):
        Sampling(top_p=0)


def test_codebook_temperatures():
    """Per-codebook temperatures: 0 = greedy for that codebook, others sample; the offset picks the codebooks."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]]).repeat(1, 3, 1)  # (B=1, n=3, V=4)
    mixed = Sampling(temperature=1.0, codebook_temperatures=(5.0, 0.0, 5.0, 0.0))
    draws = torch.stack([sample_codebooks(logits, 0, mixed, torch.Generator().manual_seed(i)) for i in range(60)])  # (60, 1, 3)
    assert (draws[:, 0, 1] == 1).all()  # codebook 1 greedy
    assert len(set(draws[:, 0, 0].tolist())) > 2 and len(set(draws[:, 0, 2].tolist())) > 2  # hot codebooks spread
    shifted = torch.stack([sample_codebooks(logits[:, :2], 2, mixed, torch.Generator().manual_seed(i)) for i in range(30)])
    assert (shifted[:, 0, 1] == 1).all() and len(set(shifted[:, 0, 0].tolist())) > 2  # codebooks 2 (hot) and 3 (greedy)
    # Equal to plain sampling when unset; the same draws as sample_logits at one shared temperature.
    plain = Sampling(temperature=0.7, top_k=3)
    same = Sampling(temperature=0.3, top_k=3, codebook_temperatures=(0.7,) * 4)
    for i in range(5):
        a = sample_codebooks(logits, 0, plain, torch.Generator().manual_seed(i))
        assert torch.equal(a, sample_codebooks(logits, 0, same, torch.Generator().manual_seed(i)))
        assert torch.equal(a[0], sample_logits(logits[0], plain, torch.Generator().manual_seed(i)))
    with pytest.raises(SpeechLMError, match="codebook temperatures"):
        sample_codebooks(logits, 2, Sampling(codebook_temperatures=(1.0, 1.0, 1.0)))
    with pytest.raises(SpeechLMError, match="codebook temperatures"):
        Sampling(codebook_temperatures=(1.0, -1.0))


def test_prompt_with_audio_cached_equals_uncached(tokenizer_dir):
    """ASR-style prompt: a speech segment, then text is generated."""
    model = make_model(tokenizer_dir, "qwen2", "parallel_delay")
    v = model.vocab
    ids, codes = speech_segment(model, torch.randint(0, C, (5, Q), generator=torch.Generator().manual_seed(0)))
    prompt = [v.tasks["<|asr|>"], *ids, v.roles["<|assistant|>"]]
    kwargs = dict(audio_codes=[codes], max_new_tokens=6, sampling=GREEDY, stop_tokens=[])
    out = text_generate(model, [prompt], **kwargs)
    assert out == text_generate(model, [prompt], use_cache=False, **kwargs)
    other = codes.clone()
    other[codes < C] = (codes[codes < C] + 7) % C
    different_audio = text_generate(model, [prompt], **{**kwargs, "audio_codes": [other]})
    assert different_audio != out  # the audio is read


def test_bad_generation_inputs(tokenizer_dir):
    model = make_model(tokenizer_dir)
    v = model.vocab
    with pytest.raises(SpeechLMError, match="empty"):
        tts_frames(model, [])
    with pytest.raises(SpeechLMError, match="empty"):
        text_generate(model, [[]])
    with pytest.raises(SpeechLMError, match="no audio codes"):
        PromptBatch.build(model, [[v.speech_start, v.audio, v.audio]])
    with pytest.raises(SpeechLMError, match="must lie in"):
        PromptBatch.build(model, [[v.audio, v.audio]], [torch.full((2, Q), C + 5)])
    with pytest.raises(SpeechLMError, match="codebooks per frame"):
        PromptBatch.build(model, [[v.audio, v.audio]], [torch.zeros(2, Q + 1, dtype=torch.long)])
    with pytest.raises(SpeechLMError, match="token ids"):
        text_generate(model, [[10_000]])
    with pytest.raises(SpeechLMError, match="exceeds"):
        text_generate(model, [[v.bos] * 100], max_new_tokens=100)
    with pytest.raises(SpeechLMError, match="max_frames"):
        tts_frames(model, [v.bos], max_frames=0)


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_teacher_forced_forward_predicts_what_generation_produced(tokenizer_dir, head):
    """Training and decoding agree: feeding the generated segment back, the backbone head (offset 1)
    and MCTP module m (offset m + 1) predict, by argmax, exactly the positions they produced."""
    N = 3
    model = make_model(tokenizer_dir, "llama", head, mctp=N)
    prompt = [*prompts(model)[0], model.vocab.speech_start]
    frames = tts_frames(model, [prompt], max_frames=10, min_frames=10, sampling=GREEDY).frames[0]
    ids, layout = speech_segment(model, frames)
    sequence = torch.tensor([prompt + ids[1:]])  # the prompt already ends with <|speech_start|>
    codes = torch.full((1, sequence.shape[1], Q), C)
    codes[sequence == model.vocab.audio] = layout
    with torch.no_grad():
        out = model(sequence, codes, all_losses=True)
    predictions = [out.audio_logits, *out.mctp_logits]
    targets = [out.audio_targets, *out.mctp_targets]
    # Row s of each offset's selection predicts segment position s; the schedule [N] made position s
    # with the backbone (s % (N + 1) == 0) or with module s % (N + 1).
    checked = 0
    for s in range(layout.shape[0]):
        m = s % (N + 1)
        target, logits = targets[m][s], predictions[m][s]
        real = (target >= 0) & (target < C)
        assert torch.equal(logits[:, :C].argmax(-1)[real], target[real])
        checked += int(real.sum())
    assert checked == 10 * Q


def test_per_position_yields_the_same_frames_earlier(tokenizer_dir):
    """per_position=True hands out each frame as soon as its position is done: same frames, same order."""
    from speechlm.lm.generate import iter_audio

    model = make_model(tokenizer_dir, head="depth", mctp=2)
    prompt = [model.vocab.tasks["<|tts|>"], *model.tokenizer.encode("hello world", add_special_tokens=False), model.vocab.speech_start]
    grouped = [f for step in iter_audio(model, prompt, max_frames=7, min_frames=7, sampling=GREEDY, seed=0) for f in step.frames[0]]
    steps = list(iter_audio(model, prompt, max_frames=7, min_frames=7, sampling=GREEDY, seed=0, per_position=True))
    single = [f for step in steps for f in step.frames[0]]
    assert torch.equal(torch.stack(grouped), torch.stack(single))
    assert steps[0].positions == 1 and len(steps[0].frames[0]) == 1 and steps[0].backbone_forwards == 1
