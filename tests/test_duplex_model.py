"""DuplexLM: losses and training on aligned streams, incremental decoding equal to the training
forward, per-row resets / joins / leaves equal to fresh runs, the KV window, silence rules,
save/load, and the server adapter (codec + LM step) under the scheduler."""

import asyncio

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.lm import GREEDY, SpeechLM, load_tokenizer, train_bpe_tokenizer
from speechlm.lm.duplex import DuplexConfig, DuplexLM
from speechlm.streaming.duplex_model import DuplexSpeechModel
from speechlm.streaming.models import DuplexModel
from speechlm.streaming.scheduler import Scheduler
from speechlm.streaming.server import ServerConfig, build_model

torch.set_num_threads(1)
hf_logging.set_verbosity_error()

Q, C = 4, 16
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a speech language model speaks and listens"] * 4
TINY_CODEC = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": C}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(TEXTS, vocab_size=400, min_frequency=1, save_dir=path)
    return path


def make_duplex(tokenizer_dir, head="depth", seed=0, **duplex) -> DuplexLM:
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    lm = SpeechLM.from_backbone(
        backbone, tokenizer, num_codebooks=Q, codebook_size=C, output_head=head, depth_dim=32, depth_heads=2, mctp_modules=1
    )
    model = DuplexLM(lm, DuplexConfig(**duplex))
    with torch.no_grad():  # a trained text condition is not zero: exercise that path
        model.text_condition.proj.weight.normal_(0, 0.1)
    return model.eval()


def streams(model: DuplexLM, B=2, T=12, seed=1):
    """Random aligned streams: the model silent in frames 3..5, text pads at every third frame."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, C, (B, T, Q), generator=g)
    codes = torch.randint(0, C, (B, T, Q), generator=g)
    codes[:, 3:6] = C
    text = torch.randint(20, model.vocab.size, (B, T), generator=g)
    text[:, ::3] = model.text_pad
    return user, codes, text


def test_forward_losses_and_a_few_steps_reduce_them(tokenizer_dir):
    model = make_duplex(tokenizer_dir).train()
    model.set_stage("duplex")
    assert not any(p.requires_grad for p in model.lm.mctp.parameters())
    user, codes, text = streams(model)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    out = model(user, codes, text, mask)
    assert all(torch.isfinite(x) for x in (out.loss, out.text_loss, out.audio_loss))
    assert out.text_logits.shape[:2] == (2, 12) and out.audio_logits.shape == (21, Q, C + 1)
    assert (out.audio_targets[:3] != C).all() and (out.audio_targets[3:6] == C).all()  # silent frames: empty targets
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(user, codes, text, mask)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses

    # the weights do what they say: pad text targets and silent frames count less
    heavy = DuplexLM(model.lm, DuplexConfig(text_pad_weight=1.0, silence_audio_weight=1.0), init_user_from_audio=True)
    with torch.no_grad():
        assert float(heavy(user, codes, text).audio_loss) != pytest.approx(float(model(user, codes, text).audio_loss))
    with pytest.raises(SpeechLMError, match="audio codes"):
        model(user[..., :2], codes, text)


def test_stop_weight_counts_the_first_silent_frames_after_speech(tokenizer_dir):
    model = make_duplex(tokenizer_dir)
    E = C  # the empty code
    first = torch.tensor([[5, 5, E, E, E, E, 7, E, E], [E, E, E, 3, E, 4, 4, E, E]])
    marked = DuplexLM(model.lm, DuplexConfig(stop_weight=4.0, stop_frames=3), init_user_from_audio=True).stop_mask(first)
    assert marked.tolist() == [
        [False, False, True, True, True, False, False, True, True],  # the 4th silent frame is past the window
        [False, False, False, False, True, False, False, True, True],  # silence before any speech is not a stop
    ]
    # only codebook 0 of those frames changes the loss: the same weight as silence gives the old loss
    user, codes, text = streams(model)
    same = DuplexLM(model.lm, DuplexConfig(stop_weight=0.25), init_user_from_audio=True)
    heavy = DuplexLM(model.lm, DuplexConfig(stop_weight=8.0), init_user_from_audio=True)
    for m in (same, heavy):
        m.load_state_dict(model.state_dict())
    with torch.no_grad():
        base = float(model(user, codes, text).audio_loss)
        assert float(same(user, codes, text).audio_loss) == pytest.approx(base)
        assert float(heavy(user, codes, text).audio_loss) != pytest.approx(base)
    with pytest.raises(SpeechLMError, match="stop_frames"):
        DuplexConfig(stop_frames=0)


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_incremental_steps_equal_the_training_forward(tokenizer_dir, head):
    model = make_duplex(tokenizer_dir, head)
    user, codes, text = streams(model, T=10)
    with torch.no_grad():
        full = model(user, codes, text)
    layout = model.layout(codes)
    state = model.init_state(2)
    text_logits, audio_logits = [], []
    for t in range(10):
        step = model.step(user[:, t], state, text=text[:, t], codes=layout[:, t])  # teacher-forced
        state = step.state
        text_logits.append(step.text_logits)
        audio_logits.append(step.audio_logits)
    torch.testing.assert_close(torch.stack(text_logits, 1), full.text_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(audio_logits, 1), full.audio_logits.view(2, 10, Q, C + 1), atol=1e-5, rtol=1e-4)
    assert state.cache_length == 10 and state.positions.tolist() == [10, 10]


def generate(model: DuplexLM, user: torch.Tensor, plan: dict, rows: int):
    """Greedy ticks over user codes (R, T, Q) for a batch; ``plan[t]``: ("reset", rows) / ("grow", n) /
    ("select", rows) before tick t; ``user`` row r feeds batch row ``feed[r]``. Returns per tick (text, frame, logits, state)."""
    state = model.init_state(rows)
    feed = list(range(rows))
    ticks = []
    for t in range(user.shape[1]):
        for action, arg in plan.get(t, []):
            if action == "reset":
                state = model.reset_rows(state, arg)
            elif action == "grow":
                state = model.grow_state(state, arg)
                feed += list(range(len(feed), arg))
            else:
                state = model.select_rows(state, arg)
                feed = [feed[i] for i in arg]
        step = model.step(user[feed, t], state)
        state = step.state
        ticks.append((step.text, step.frame, step.text_logits, state, list(feed)))
    return ticks


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_reset_join_and_leave_equal_fresh_single_row_runs(tokenizer_dir, head):
    model = make_duplex(tokenizer_dir, head)
    T = 12
    user = torch.randint(0, C, (4, T, Q), generator=torch.Generator().manual_seed(3))
    # rows 0..2 start together; row 1 restarts at tick 4; row 3 joins at tick 6; rows 0 and 2 leave at tick 8
    plan = {4: [("reset", [1])], 6: [("grow", 4), ("reset", [3])], 8: [("select", [1, 3])]}
    crowd = generate(model, user, plan, 3)
    for r, start in ((1, 4), (2, 0), (3, 6)):
        alone = generate(model, user[r : r + 1, start:], {}, 1)
        compared = 0
        for t in range(start, T):
            text, frame, logits, _, feed = crowd[t]
            if r not in feed:
                continue
            b = feed.index(r)
            s_text, s_frame, s_logits, _, _ = alone[t - start]
            assert int(text[b]) == int(s_text[0]) and torch.equal(frame[b], s_frame[0]), (r, t)
            torch.testing.assert_close(logits[b], s_logits[0], atol=1e-5, rtol=1e-4)
            compared += 1
        assert compared >= 4
    # the KV ring keeps its size through joins and leaves; the slots of rows that left or restarted are invalid
    assert crowd[7][3].cache_length == 8 and crowd[8][3].cache_length == 9
    assert all(k.shape[2] == model.config.window for k in crowd[-1][3].keys)
    assert not crowd[8][3].valid[0, :4].any() and crowd[8][3].valid[0, 4:9].all()  # row 1 restarted at tick 4



def test_graphed_backbone_steps_equal_eager_steps_through_joins_and_leaves(tokenizer_dir):
    """``use_graphs`` (CUDA graphs on a GPU; here the same static buffers run directly) gives the
    eager step's tokens, frames and logits, through resets, a grown and a cut batch (each a new ring
    storage, so a new entry), with the ring wrapping."""
    eager = make_duplex(tokenizer_dir, "parallel_delay", window=5)
    graphed = make_duplex(tokenizer_dir, "parallel_delay", window=5).use_graphs()
    T = 12
    user = torch.randint(0, C, (4, T, Q), generator=torch.Generator().manual_seed(5))
    plan = {4: [("reset", [1])], 6: [("grow", 4), ("reset", [3])], 8: [("select", [1, 3])]}
    for (text, frame, logits, _, _), (g_text, g_frame, g_logits, _, _) in zip(generate(eager, user, plan, 3), generate(graphed, user, plan, 3)):
        assert torch.equal(text, g_text) and torch.equal(frame, g_frame)
        torch.testing.assert_close(g_logits, logits, atol=1e-5, rtol=1e-4)
    assert len(graphed.graphs.entries) == 3 and graphed.graphs.captures == 0  # three ring storages; no capture on CPU
    graphed.graphs.max_graphs = 1  # evicting the older entries changes nothing
    for (text, _, logits, _, _), (g_text, _, g_logits, _, _) in zip(generate(eager, user, plan, 3), generate(graphed, user, plan, 3)):
        assert torch.equal(text, g_text)
        torch.testing.assert_close(g_logits, logits, atol=1e-5, rtol=1e-4)
    assert len(graphed.graphs.entries) == 1

def test_kv_window_bounds_the_cache(tokenizer_dir):
    model = make_duplex(tokenizer_dir, window=4)
    user = torch.randint(0, C, (2, 10, Q), generator=torch.Generator().manual_seed(4))
    ticks = generate(model, user, {}, 2)
    assert [t[3].cache_length for t in ticks] == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert ticks[-1][3].positions.tolist() == [10, 10]  # rotary positions keep counting
    assert all(torch.isfinite(t[2]).all() for t in ticks)
    assert all(k.shape[2] == 4 for k in ticks[-1][3].keys)  # the ring never grows


def test_kv_ring_wraps_to_exactly_the_last_window_frames(tokenizer_dir):
    """Past the window, step t attends to frames t-3 .. t (window 4) at their own rotary positions:
    the teacher-forced steps equal one backbone pass over the whole stream with a banded causal mask."""
    W, T = 4, 11
    model = make_duplex(tokenizer_dir, "parallel_delay", window=W)
    user, codes, text = streams(model, T=T)
    layout = model.layout(codes)
    state = model.init_state(2)
    logits = []
    for t in range(T):
        step = model.step(user[:, t], state, text=text[:, t], codes=layout[:, t])
        state = step.state
        logits.append(step.text_logits)
    prev_text = torch.cat((torch.full_like(text[:, :1], model.start_token), text[:, :-1]), dim=1)
    prev_codes = torch.cat((torch.full_like(layout[:, :1], model.empty_code), layout[:, :-1]), dim=1)
    i = torch.arange(T)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)  # (T, T): query t sees keys t-W+1 .. t
    with torch.no_grad():
        hidden = model.lm.run_backbone(
            model.embed_inputs(prev_text, prev_codes, user), attention_mask=band.expand(2, 1, T, T), position_ids=i.expand(2, T)
        ).last_hidden_state
    torch.testing.assert_close(torch.stack(logits, 1), model.lm.text_logits(hidden), atol=1e-5, rtol=1e-4)
    with pytest.raises(SpeechLMError, match="KV ring"):
        make_duplex(tokenizer_dir, window=5).step(user[:, 0], state)


@pytest.mark.parametrize("head", ["depth", "parallel_delay"])
def test_a_frame_is_all_empty_or_all_codes(tokenizer_dir, head):
    model = make_duplex(tokenizer_dir, head)
    user = torch.randint(0, C, (3, 8, Q), generator=torch.Generator().manual_seed(5))
    head_module = model.lm.audio_head
    with torch.no_grad():
        if head == "depth":
            head_module.out_bias[0, C] = 50.0  # codebook 0 always says "silent" ...
            head_module.out_bias[1:, C] = -50.0  # ... the others never would on their own
        else:
            head_module.proj.bias.view(Q, C + 1)[0, C] = 50.0
            head_module.proj.bias.view(Q, C + 1)[1:, C] = -50.0
    frames = torch.stack([t[1] for t in generate(model, user, {}, 3)], 1)  # (B, T, Q)
    assert (frames == C).all(), "a silent frame forces its other codebooks empty"
    with torch.no_grad():
        if head == "depth":
            head_module.out_bias[0, C] = -50.0
            head_module.out_bias[1:, C] = 50.0
        else:
            head_module.proj.bias.view(Q, C + 1)[0, C] = -50.0
            head_module.proj.bias.view(Q, C + 1)[1:, C] = 50.0
    frames = torch.stack([t[1] for t in generate(model, user, {}, 3)], 1)
    delay = model.max_delay  # parallel head: the first complete frame appears d_max ticks late
    assert (frames[:, :delay] == C).all() and (frames[:, delay:] != C).all(), "a speaking frame has no empty code"
    text = torch.stack([t[0] for t in generate(model, user, {}, 3)], 1)
    assert model.allowed_text[text].all(), "only word pieces and <|text_pad|> are generated"


def test_save_and_load_round_trip(tokenizer_dir, tmp_path):
    model = make_duplex(tokenizer_dir, "parallel_delay", window=300, text_pad_weight=0.3)
    model.save_pretrained(tmp_path / "duplex")
    again = DuplexLM.from_pretrained(tmp_path / "duplex")
    assert again.config == model.config
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    user, codes, text = streams(model)
    with torch.no_grad():
        assert torch.equal(model(user, codes, text).loss, again(user, codes, text).loss)
    assert isinstance(SpeechLM.from_pretrained(tmp_path / "duplex"), SpeechLM)  # still a SpeechLM directory
    model.lm.save_pretrained(tmp_path / "plain")
    with pytest.raises(SpeechLMError, match="not a duplex model directory"):
        DuplexLM.from_pretrained(tmp_path / "plain")
    (tmp_path / "duplex" / "duplex.safetensors").write_bytes(b"junk")
    with pytest.raises(SpeechLMError, match="cannot read duplex weights"):
        DuplexLM.from_pretrained(tmp_path / "duplex")


# -- the server adapter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    model = Codec(CodecConfig(**TINY_CODEC)).eval()
    model.quantizer.init_random_codebooks_()
    return model


def speech(frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * 640) / 16_000
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def run_ticks(scheduler: Scheduler, plan: dict, sessions: dict, inputs: dict, ticks: int) -> None:
    async def main():
        for t in range(ticks):
            for action, name in plan.get(t, []):
                if action == "join":
                    sessions[name] = scheduler.open_session()
                    scheduler.join(sessions[name])
                else:
                    scheduler.leave(sessions[name])
            for name, session in sessions.items():
                if session.live:
                    frame = inputs[name][session.frames * 640 : (session.frames + 1) * 640]
                    await session.input.put(frame if len(frame) else np.zeros(640, np.float32))
            await scheduler.tick()

    asyncio.run(asyncio.wait_for(main(), 30))


def drain(session):
    frames = [session.output.pop() for _ in range(len(session.output))]
    return np.concatenate([f.pcm for f in frames]), [f.text for f in frames]


def test_server_adapter_sessions_join_and_leave(tokenizer_dir, codec, tmp_path):
    duplex = make_duplex(tokenizer_dir)
    model = DuplexSpeechModel(duplex, codec, text_sampling=GREEDY, audio_sampling=GREEDY)
    assert isinstance(model, DuplexModel) and (model.frame_length, model.sample_rate) == (640, 16_000)
    inputs = {name: speech(10, seed) for seed, name in enumerate("abc")}
    solo: dict = {}
    run_ticks(Scheduler(DuplexSpeechModel(duplex, codec, text_sampling=GREEDY, audio_sampling=GREEDY), use_thread=False, output_seconds=10),
              {0: [("join", "a")]}, solo, inputs, 10)  # fmt: skip
    scheduler = Scheduler(model, use_thread=False, output_seconds=10)
    crowd: dict = {}
    plan = {0: [("join", "a")], 2: [("join", "b"), ("join", "c")], 5: [("leave", "b")], 7: [("leave", "c")]}
    run_ticks(scheduler, plan, crowd, inputs, 10)
    assert model.max_batch_seen == 4 and scheduler.live_sessions == 1
    pcm, texts = drain(crowd["a"])
    solo_pcm, solo_texts = drain(solo["a"])
    np.testing.assert_allclose(pcm, solo_pcm, atol=1e-4)
    assert texts == solo_texts and len(texts) == 10
    plain = [(t["model"] or None) if isinstance(t, dict) else t for t in texts]  # less the user-talking events
    assert all(t is None or isinstance(t, str) for t in plain) and any(isinstance(t, str) for t in plain)
    events = [e for t in texts if isinstance(t, dict) for e in t["events"]]
    assert events[:1] == [{"user": "started"}], texts  # the noise gate heard the user begin (METADATA user)
    assert np.abs(pcm).max() > 0 and np.isfinite(pcm).all()
    b_pcm, _ = drain(crowd["b"])
    assert len(b_pcm) == 3 * 640

    # decode=False: the same words and silences, no audio made, the decoder's state untouched
    with torch.inference_mode():
        user = torch.from_numpy(np.stack([inputs[n][: 4 * 640] for n in "ab"]))
        states = [model.init_state(2)] * 2
        for t in range(4):
            made, unmade = (model.tick(user[:, t * 640 : (t + 1) * 640], s, decode=d) for s, d in zip(states, (True, False)))
            assert torch.equal(made.text, unmade.text) and torch.equal(made.silent, unmade.silent)
            assert unmade.pcm.shape == made.pcm.shape and unmade.pcm.abs().max() == 0
            assert unmade.state.decoder is states[1].decoder
            states = [made.state, unmade.state]

    # a silent frame is silence, and the decoder restarts for the next spoken one
    with torch.no_grad():
        duplex.lm.audio_head.out_bias[0, C] = 50.0
    quiet = DuplexSpeechModel(duplex, codec, text_sampling=GREEDY, audio_sampling=GREEDY)
    pcm, _, state = quiet.step(torch.from_numpy(inputs["a"][:640])[None], quiet.init_state(1))
    assert pcm.abs().max() == 0
    torch.testing.assert_close(state.decoder.synthesis, codec.init_state(1).synthesis)

    # --model duplex --lm DIR through the server's model builder
    with torch.no_grad():
        duplex.lm.audio_head.out_bias[0, C] = 0.0
    duplex.save_pretrained(tmp_path / "duplex")
    codec.save_pretrained(tmp_path / "codec")
    built = build_model(ServerConfig(model="duplex", lm=str(tmp_path / "duplex"), codec=str(tmp_path / "codec"), device="cpu", assist=None))
    assert isinstance(built, DuplexSpeechModel)
    pcm, texts, _ = built.step(torch.zeros(2, 640), built.init_state(2))
    assert pcm.shape == (2, 640) and len(texts) == 2
    half = build_model(ServerConfig(model="duplex", lm=str(tmp_path / "duplex"), codec=str(tmp_path / "codec"), device="cpu", dtype="bfloat16", assist=None))
    assert half.lm.lm.backbone.dtype == torch.bfloat16 and next(half.codec.parameters()).dtype == torch.float32
    pcm, texts, _ = half.step(torch.zeros(2, 640), half.init_state(2))
    assert pcm.shape == (2, 640) and pcm.dtype == torch.float32 and len(texts) == 2
    with pytest.raises(SpeechLMError, match="dtype"):
        ServerConfig(dtype="float16").check()
    with pytest.raises(SpeechLMError, match="--lm"):
        ServerConfig(model="duplex", lm=None).check()
    wrong = Codec(CodecConfig(**{**TINY_CODEC, "codebook_size": 32}))
    with pytest.raises(SpeechLMError, match="reads 4 x 16"):
        DuplexSpeechModel(duplex, wrong)


def test_ship_duplex_without_mctp_in_bfloat16(tokenizer_dir, codec, tmp_path):
    """Shipping drops the MCTP modules (unused by the one-frame step), stores bfloat16, and the
    server adapter loads it by directory in float32 with the same step as the bf16-rounded model."""
    from speechlm.training.ship import ship

    duplex = make_duplex(tokenizer_dir, "parallel_delay")
    duplex.save_pretrained(tmp_path / "run" / "model")
    codec.save_pretrained(tmp_path / "codec")
    dst = ship(tmp_path / "run", "tiny-duplex", models_dir=tmp_path / "models", codec=str(tmp_path / "codec"), dtype="bfloat16")
    loaded = DuplexSpeechModel.from_pretrained(dst, tmp_path / "codec", text_sampling=GREEDY, audio_sampling=GREEDY)
    assert len(loaded.lm.lm.mctp) == 0 and loaded.lm.lm.config.mctp_modules == 0
    assert all(p.dtype == torch.float32 for p in loaded.lm.parameters())
    duplex.lm.keep_mctp_modules(0)
    rounded = DuplexSpeechModel(duplex.to(torch.bfloat16).float(), codec, text_sampling=GREEDY, audio_sampling=GREEDY)
    pcm = torch.from_numpy(speech(1, 0))[None]
    a, ta, _ = loaded.step(pcm, loaded.init_state(1))
    b, tb, _ = rounded.step(pcm, rounded.init_state(1))
    assert torch.allclose(a, b, atol=1e-5) and ta == tb
    with pytest.raises(SpeechLMError, match="not found"):
        DuplexSpeechModel.from_pretrained("no-such-duplex", codec)


def test_random_backbone_preset_builds_a_duplex_model_for_capacity_runs():
    """``--lm random:PRESET`` (benchmarks/server.py on a GPU): an untrained duplex LM of that backbone
    shape with the shipped model's vocabulary and heads, in the asked dtype, stepping like any other."""
    from speechlm.streaming.duplex_model import BACKBONE_PRESETS, build_duplex_model

    model = build_duplex_model("random:tiny", "codec-16k", dtype=torch.bfloat16)
    backbone = model.lm.lm.backbone
    assert backbone.config.num_hidden_layers == BACKBONE_PRESETS["tiny"]["num_hidden_layers"]
    assert backbone.dtype == torch.bfloat16 and next(model.codec.parameters()).dtype == torch.float32
    pcm, texts, state = model.step(torch.zeros(3, 640), model.init_state(3))
    assert pcm.shape == (3, 640) and pcm.dtype == torch.float32 and len(texts) == 3 and state.batch_size == 3
    with pytest.raises(SpeechLMError, match="unknown backbone preset"):
        build_duplex_model("random:nope", "codec-16k")
