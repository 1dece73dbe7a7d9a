"""Classifier-free guidance on the speech's text (speechlm.lm.generate): every generated code is the
argmax of cond + w * (cond - uncond) from teacher-forced forwards of the prompt with and without its
text (backbone and MCTP positions, both output heads); cached decoding equals uncached; errors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: reach the generation tests' helpers
from test_lm_generate import C, Q, make_model, prompts, tokenizer_dir  # noqa: E402, F401  (fixture)

from speechlm.codec.errors import SpeechLMError
from speechlm.lm import GREEDY
from speechlm.lm.generate import iter_aligned_audio, speech_segment, tts_frames
from speechlm.lm.prompts import aligned_tts_prompt

W = 1.5


def teacher_forced(model, prompt, layout):
    """Per offset (backbone, then MCTP modules): (logits (S, Q, C+1), targets (S, Q)) of ``prompt`` then the segment."""
    ids, _ = speech_segment(model, torch.zeros(0, Q, dtype=torch.long))
    sequence = torch.tensor([prompt + [model.vocab.audio] * layout.shape[0] + ids[-1:]])
    codes = torch.full((1, sequence.shape[1], Q), C)
    codes[sequence == model.vocab.audio] = layout
    with torch.no_grad():
        out = model(sequence, codes, all_losses=True)
    return [out.audio_logits, *out.mctp_logits], [out.audio_targets, *out.mctp_targets]


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
@pytest.mark.parametrize("schedule", [[0], [3]])
def test_each_code_is_the_guided_argmax(tokenizer_dir, head, schedule):  # noqa: F811
    N = 3
    model = make_model(tokenizer_dir, "llama", head, mctp=N)
    v = model.vocab
    prompt = [*prompts(model)[0], v.speech_start]
    # any prompt without the text will do; at least N + 1 tokens long, so that (as in the prompt) every
    # segment position has its predicting position inside the teacher-forced sequence for every offset
    unconditional = [v.bos, v.bos, v.bos, v.tasks["<|tts|>"], v.speech_start]
    kwargs = dict(max_frames=10, min_frames=10, sampling=GREEDY, schedule=schedule)
    frames = tts_frames(model, [prompt], guidance=W, unconditional_prompt=unconditional, **kwargs).frames[0]
    assert not torch.equal(frames, tts_frames(model, [prompt], **kwargs).frames[0])  # guidance changes the speech
    _, layout = speech_segment(model, frames)
    layout = layout[:-1] if layout.shape[0] > frames.shape[0] + model.config.max_delay else layout
    cond, targets = teacher_forced(model, prompt, layout)
    uncond, _ = teacher_forced(model, unconditional, layout)
    checked = 0
    for s in range(layout.shape[0]):
        m = 0 if schedule == [0] else s % (N + 1)  # the backbone or MCTP module m made position s
        target = targets[m][s]
        real = (target >= 0) & (target < C)
        mixed = cond[m][s][:, :C] + W * (cond[m][s][:, :C] - uncond[m][s][:, :C])
        assert torch.equal(mixed.argmax(-1)[real], target[real])
        checked += int(real.sum())
    assert checked == 10 * Q


def test_guided_word_aligned_decoding_cached_equals_uncached(tokenizer_dir):  # noqa: F811
    model = make_model(tokenizer_dir, "llama", "parallel_delay", mctp=2)
    v = model.vocab
    prompt, chunks = aligned_tts_prompt(model, "the quick brown fox")
    guide = dict(guidance=W, unconditional_prompt=[v.bos, v.tasks["<|tts|>"], v.speech_start], sampling=GREEDY, max_frames_per_chunk=5)

    def frames(**kw):
        return [f for step in iter_aligned_audio(model, prompt, chunks, **kw) for f in step.frames[0]]

    cached, uncached = frames(**guide), frames(**guide, use_cache=False)
    assert len(cached) == len(uncached) >= len(chunks) and all(torch.equal(a, b) for a, b in zip(cached, uncached))
    plain = frames(sampling=GREEDY, max_frames_per_chunk=5)
    assert len(plain) != len(cached) or any(not torch.equal(a, b) for a, b in zip(plain, cached))


def test_bad_guidance(tokenizer_dir):  # noqa: F811
    model = make_model(tokenizer_dir, "llama", "parallel_delay", mctp=1)
    with pytest.raises(SpeechLMError, match="guidance must be"):
        tts_frames(model, prompts(model)[:1], max_frames=2, guidance=-1.0, unconditional_prompt=[model.vocab.speech_start])
    with pytest.raises(SpeechLMError, match="unconditional prompt"):
        tts_frames(model, prompts(model)[:1], max_frames=2, guidance=1.0)


def test_a_twin_row_that_skips_the_chunks_equals_a_decoder_of_its_own(tokenizer_dir):  # noqa: F811
    """Decoder.append_where: the unconditional row of a guided batch, with masked placeholders where its
    twin is fed a word chunk, computes what a decoder of its own sequence (no chunks) does, backbone and
    every MCTP module (their offsets skip the placeholders); the conditional row what a decoder of its own does."""
    from speechlm.lm.generate import Decoder, PromptBatch

    N = 3
    model = make_model(tokenizer_dir, "llama", "parallel_delay", mctp=N)
    v = model.vocab
    tok = model.tokenizer
    cond_prompt = [v.bos, v.tasks["<|tts|>"], *tok.encode("the quick"), v.speech_start, *tok.encode(" the")]
    uncond_prompt = [v.bos, v.tasks["<|tts|>"], v.speech_start]
    both = Decoder.start(model, PromptBatch.build(model, [cond_prompt, uncond_prompt]))
    cond, uncond = (Decoder.start(model, PromptBatch.build(model, [p])) for p in (cond_prompt, uncond_prompt))
    audio, here = torch.full((2, 1), v.audio), torch.ones(2, 1, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)

    def frame():
        codes = torch.randint(0, C, (1, Q), generator=generator).repeat(2, 1)
        embeds = model.embed(audio, codes[:, None], here)
        both.append(embeds)
        cond.append(embeds[:1])
        uncond.append(embeds[1:])

    def check(j):
        b = both.backbone_step() if j == 0 else both.mctp_step(j)
        c = cond.backbone_step() if j == 0 else cond.mctp_step(j)
        u = uncond.backbone_step() if j == 0 else uncond.mctp_step(j)
        torch.testing.assert_close(b[0], c[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b[1], u[0], atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        for word in (" quick", " brown fox"):
            for _ in range(2):  # two backbone steps of 1 + N positions each
                for j in range(N + 1):
                    check(j)
                    frame()
            chunk = torch.tensor([tok.encode(word)] * 2)
            both.append_where(model.embed(chunk), torch.tensor([True, False]))
            cond.append(model.embed(chunk[:1]))
        check(0)
        for j in range(1, N + 1):
            frame()
            check(j)
