"""The GRVQ codec model: streaming equals offline, causality, per-row reset, save/load, errors.

Uses a tiny random-weight config so the whole file runs in seconds on one thread.
"""

import json

import pytest
import torch

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.losses import (
    EnvelopeCorrelationLoss,
    MultiResolutionMelLoss,
    MultiResolutionSTFTLoss,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
)
from speechlm.codec.model import Codec
from speechlm.codec.quantizer import codebook_usage

torch.set_num_threads(1)

TINY = {**TINY_ARCHITECTURE, "num_quantizers": 2, "codebook_size": 32}


ATOL = 1e-5


@pytest.fixture
def codec() -> Codec:
    torch.manual_seed(0)
    model = Codec(CodecConfig(**TINY)).eval()
    model.quantizer.init_random_codebooks_()
    return model


def speechlike(batch: int, frames: int, seed: int = 0, frame_length: int = 640) -> torch.Tensor:
    """Harmonic tones with a wobbling pitch plus a little noise: (batch, frames * frame_length)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * frame_length) / 16_000
    f0 = 100 + 150 * torch.rand(batch, 1, generator=g)
    phase = 2 * torch.pi * torch.cumsum(f0 * (1 + 0.1 * torch.sin(2 * torch.pi * 3 * t)), dim=1) / 16_000
    wav = sum(torch.sin(k * phase) / k for k in range(1, 6)) * 0.2
    return wav + 0.01 * torch.randn(batch, t.numel(), generator=g)


def stream(codec: Codec, wav: torch.Tensor, state=None):
    """Encode and decode ``wav`` frame by frame; returns codes (B, F, Q), audio (B, F*640), state."""
    state = state or codec.init_state(wav.shape[0])
    codes, audio = [], []
    for chunk in wav.split(codec.frame_length, dim=1):
        frame_codes, state = codec.encode_step(chunk, state)
        pcm, state = codec.decode_step(frame_codes, state)
        codes.append(frame_codes)
        audio.append(pcm)
    return torch.stack(codes, dim=1), torch.cat(audio, dim=1), state


def test_config_sizes_and_round_trip():
    config = CodecConfig()
    assert config.frame_length == 640 and config.stft_frames_per_frame == 4
    assert config.codes_per_frame == 8 and config.bitrate == 2000.0
    again = CodecConfig.from_dict(json.loads(json.dumps({**config.to_dict(), "codec_id": config.codec_id})))
    assert again == config and again.codec_id == config.codec_id
    assert CodecConfig(codebook_decay=0.5).codec_id == config.codec_id  # training knobs do not change the id
    assert CodecConfig(latent_dim=32).codec_id != config.codec_id
    with pytest.raises(SpeechLMError, match="unknown codec config"):
        CodecConfig.from_dict({"no_such_field": 1})
    with pytest.raises(SpeechLMError, match="multiple of hop_length"):
        CodecConfig(hop_length=150)
    with pytest.raises(SpeechLMError, match="dead_code_threshold_ratio"):
        CodecConfig(dead_code_threshold_ratio=1.0)


def test_configs_written_before_the_dead_code_ratio_still_load():
    """vector-quantize-pytorch 1.34 replaced the absolute dead-code count by a share of the mean cluster size;
    a saved config with the old field maps it the library's way and keeps its codec_id."""
    saved = {**CodecConfig().to_dict(), "codec_id": CodecConfig().codec_id}
    del saved["dead_code_threshold_ratio"]
    old = CodecConfig.from_dict({**saved, "threshold_ema_dead_code": 2.0})
    assert old.dead_code_threshold_ratio == 2.0 / 1024 and old.codec_id == CodecConfig().codec_id
    assert CodecConfig.from_dict({**saved, "threshold_ema_dead_code": 0.0}).dead_code_threshold_ratio == 0.0


def test_encode_decode_shapes_and_dtypes(codec):
    q = codec.config.codes_per_frame
    wav = speechlike(2, 5)[:, :-100]  # not a whole number of frames: the end is padded
    codes = codec.encode(wav)
    assert codes.shape == (2, 5, q) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < codec.config.codebook_size
    assert len(codes.unique()) > 5  # random codebooks still spread the codes
    audio = codec.decode(codes)
    assert audio.shape == (2, 5 * 640) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()


def test_streaming_equals_offline(codec):
    wav = speechlike(2, 12)
    codes, audio, _ = stream(codec, wav)
    assert torch.equal(codes, codec.encode(wav))
    torch.testing.assert_close(audio, codec.decode(codes), atol=ATOL, rtol=0)


def test_reset_row_mid_stream_matches_a_fresh_session(codec):
    """Row 1 starts a new session at frame 4 while rows 0 and 2 keep going."""
    first, second, switch = speechlike(3, 10, seed=1), speechlike(1, 6, seed=2), 4
    wav = first.clone()
    wav[1, switch * 640 :] = second[0]
    codes_a, audio_a, state = stream(codec, wav[:, : switch * 640])
    state.reset_rows([1])
    codes_b, audio_b, _ = stream(codec, wav[:, switch * 640 :], state)
    codes, audio = torch.cat([codes_a, codes_b], 1), torch.cat([audio_a, audio_b], 1)

    kept = [0, 2]
    assert torch.equal(codes[kept], codec.encode(wav[kept]))
    torch.testing.assert_close(audio[kept], codec.decode(codes[kept]), atol=ATOL, rtol=0)
    fresh_codes, fresh_audio, _ = stream(codec, second)
    assert torch.equal(codes[1:2, switch:], fresh_codes)
    torch.testing.assert_close(audio[1:2, switch * 640 :], fresh_audio, atol=ATOL, rtol=0)
    # A bool mask works too, and resetting every row gives the start-of-stream state.
    state.reset_rows(torch.tensor([True, True, True]))
    assert all(float(t.abs().sum()) == 0 for t in [state.analysis, state.synthesis, *state.encoder_stft, *state.decoder_stft])
    with pytest.raises(SpeechLMError):
        state.reset_rows([3])


def test_encoder_and_decoder_are_causal(codec):
    wav = speechlike(1, 8)
    changed = wav.clone()
    changed[:, 5 * 640 :] = torch.randn(1, 3 * 640)  # frames 5.. change
    codes, codes_changed = codec.encode(wav), codec.encode(changed)
    assert torch.equal(codes[:, :5], codes_changed[:, :5])
    assert not torch.equal(codes[:, 5:], codes_changed[:, 5:])
    # Decoding: audio of frames 0..4 depends on codes 0..4 only.
    audio, audio_changed = codec.decode(codes), codec.decode(codes_changed)
    assert torch.equal(audio[:, : 5 * 640], audio_changed[:, : 5 * 640])
    assert not torch.equal(audio[:, 5 * 640 :], audio_changed[:, 5 * 640 :])


def test_save_load_round_trip(codec, tmp_path):
    codec.save_pretrained(tmp_path / "codec")
    config = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert config["codec_id"] == codec.codec_id
    loaded = Codec.from_pretrained(tmp_path / "codec")
    assert not loaded.training and loaded.config == codec.config
    wav = speechlike(2, 6)
    codes = codec.encode(wav)
    assert torch.equal(loaded.encode(wav), codes)
    assert torch.equal(loaded.decode(codes), codec.decode(codes))
    assert torch.equal(stream(loaded, wav)[1], stream(codec, wav)[1])


def test_saved_files_leave_out_the_codebooks_running_sums_and_loading_restores_them(tmp_path):
    """``embed_avg`` (the EMA codebooks' running sums) is entry x count: files leave it out, loading recomputes it,
    so a trained codec comes back with the same state (to the library's eps, 1e-5, times the entry's last step);
    files that hold it still load."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    trained = Codec(CodecConfig(**TINY)).train()
    dim = trained.config.latent_dim
    for _ in range(3):  # k-means init, then EMA updates (and dead-code expiry)
        trained.quantizer(torch.randn(4, dim, 300))
    trained.eval().save_pretrained(tmp_path / "new")
    saved = load_file(str(tmp_path / "new" / "model.safetensors"))
    assert saved and not any(name.endswith("embed_avg") for name in saved)
    loaded = Codec.from_pretrained(tmp_path / "new")
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-5, atol=1e-4, msg=name)
    wav = speechlike(1, 4)
    assert torch.equal(loaded.encode(wav), trained.encode(wav))
    (tmp_path / "old").mkdir()  # a file from before: every buffer in it, loaded as it is
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "old" / "model.safetensors"))
    old = Codec.from_pretrained(tmp_path / "old")
    assert all(torch.equal(old.state_dict()[k], v) for k, v in trained.state_dict().items())
    save_file({k: v for k, v in saved.items() if not k.startswith("decoder.")}, str(tmp_path / "new" / "model.safetensors"))
    with pytest.raises(SpeechLMError, match="do not match"):
        Codec.from_pretrained(tmp_path / "new")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(SpeechLMError, match="not found"):
        Codec.from_pretrained("no-such-codec-model")
    with pytest.raises(SpeechLMError, match="no config.json"):
        Codec.from_pretrained(tmp_path)
    Codec(CodecConfig(**TINY)).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**CodecConfig(**TINY).to_dict(), "latent_dim": 32}))
    with pytest.raises(SpeechLMError, match="do not match"):
        Codec.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpeechLMError, match="cannot read codec weights"):
        Codec.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(1, 3, 5, dtype=torch.long),  # wrong number of codes per frame
        torch.zeros(3, 4, dtype=torch.long),  # no frames axis
        torch.zeros(1, 3, 4),  # floats
        torch.full((1, 3, 4), 32),  # out of range
        torch.full((1, 3, 4), -1),
    ],
)
def test_decode_rejects_malformed_codes(codec, bad):
    with pytest.raises(SpeechLMError, match="codes must"):
        codec.decode(bad)


def test_step_input_checks(codec):
    state = codec.init_state(2)
    with pytest.raises(SpeechLMError, match=r"shape \(2, 640\)"):
        codec.encode_step(torch.zeros(2, 320), state)
    with pytest.raises(SpeechLMError, match=r"codes must have shape \(batch, 4\)"):
        codec.decode_step(torch.zeros(2, 1, 4, dtype=torch.long), state)
    with pytest.raises(SpeechLMError, match="3 rows"):
        codec.decode_step(torch.zeros(3, 4, dtype=torch.long), state)
    with pytest.raises(SpeechLMError, match="audio"):
        codec.encode(torch.zeros(640))


def test_training_pass_and_library_agreement():
    """A training pass k-means-initialises the codebooks; our inference search then agrees with the library."""
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY)).train()
    wav = speechlike(4, 25)
    with pytest.warns(UserWarning, match="k-means pending"):
        codec.encode(wav)  # e.g. validation during the unquantized warm-up ...
    assert not codec.quantizer.codebooks_initialized  # ... must not cancel the k-means init
    recon, codes, losses = codec(wav)
    assert recon.shape == wav.shape and codes.shape == (4, 25, 4)
    assert codec.quantizer.codebooks_initialized
    (recon.square().mean() + losses["commitment"]).backward()
    assert codec.encoder.proj_in.weight.grad.abs().sum() > 0
    recon, no_codes, _ = codec(wav, quantize=False)
    assert no_codes is None and recon.shape == wav.shape

    codec.eval()
    with torch.no_grad():
        latent, _ = codec.encoder(wav)
        _, library_codes, _ = codec.quantizer(latent.transpose(1, 2))
        codes = codec.quantizer.quantize_codes(latent)
        # Same nearest-entry rule; codes may only differ between (near-)duplicate entries, which
        # k-means on this tiny batch leaves in the 2nd stage (singleton clusters -> zero residuals).
        assert (codes == library_codes).float().mean() > 0.9
        torch.testing.assert_close(codec.quantizer.decode_codes(codes), codec.quantizer.decode_codes(library_codes), atol=1e-4, rtol=0)
        indices = torch.stack(library_codes.split(codec.config.num_quantizers, dim=-1))  # (G, B, T, R)
        torch.testing.assert_close(
            codec.quantizer.decode_codes(library_codes),
            codec.quantizer.vq.get_output_from_indices(indices).transpose(1, 2),
            atol=1e-6,
            rtol=0,
        )
    usage = codebook_usage(library_codes, codec.config.codebook_size)
    assert 0 < usage["used_fraction"] <= 1 and 1 <= usage["perplexity"] <= codec.config.codebook_size
    assert 0 <= codec.quantizer.dead_code_fraction() <= 1


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_dead_entries_are_replaced_by_batch_vectors_only_when_the_ratio_asks(ratio):
    """Data near one point uses one or two entries; with a ratio the others are dead and the training step moves
    them onto batch vectors (the library's replacement, our ``dead_code_threshold_ratio``); with 0 they stay."""
    from speechlm.codec.quantizer import GroupResidualQuantizer

    torch.manual_seed(0)
    quantizer = GroupResidualQuantizer(dim=8, groups=1, num_quantizers=1, codebook_size=16, kmeans_init=False, dead_code_threshold_ratio=ratio)
    assert quantizer.dead_code_fraction() == 0  # nothing counted yet
    data = 10 + 0.01 * torch.randn(2, 8, 50)  # (B, D, T) far from the random entries
    before = quantizer._layers()[0].embed.clone()
    quantizer.train()(data)
    entries = quantizer._layers()[0].embed[0]  # (C, D)
    near_the_data = (entries - 10).abs().amax(dim=-1) < 0.5
    if ratio:
        assert near_the_data.all() and quantizer.dead_code_fraction() == 15 / 16  # reset below the new mean: again next step
    else:
        assert near_the_data.sum() <= 2 and torch.allclose(entries[~near_the_data], before[0][~near_the_data])


def test_losses():
    assert abs(float(hz_to_mel(8000.0)) - 45.245640471924965) < 1e-9
    assert abs(float(mel_to_hz(hz_to_mel(3000.0))) - 3000.0) < 1e-6
    fb = mel_filterbank(16_000, 512, 80)
    assert fb.shape == (80, 257) and (fb >= 0).all() and (fb.sum(1) > 0).all()
    target = speechlike(2, 3)
    noisy = (target + 0.05 * torch.randn_like(target)).requires_grad_()
    for loss in (MultiResolutionMelLoss(), MultiResolutionSTFTLoss()):
        assert float(loss(target, target)) == 0.0
        value = loss(noisy, target)
        value.backward()
        assert value.item() > 0 and noisy.grad is not None


def test_envelope_correlation_loss():
    """Zero for the original; blurred band envelopes score worse than a phase change; short crops work."""
    loss = EnvelopeCorrelationLoss()
    syllables = torch.sin(2 * torch.pi * 4 * torch.arange(16000) / 16000).clamp(min=0) ** 2  # 4 Hz bursts
    target = speechlike(2, 25) * syllables
    assert loss(target, target).item() < 1e-4
    spec = torch.stft(target, 320, 80, window=torch.hann_window(320), return_complex=True)
    rephased = torch.istft(spec.abs() * torch.exp(1j * 2 * torch.pi * torch.rand(spec.shape)), 320, 80, window=torch.hann_window(320), length=16000)
    smeared = torch.nn.functional.avg_pool1d(target.abs()[:, None], 801, 1, 400)[:, 0] * torch.randn_like(target)  # envelope blurred over 50 ms
    assert loss(rephased, target).item() < loss(smeared, target).item()
    x = smeared.clone().requires_grad_()
    value = loss(x, target)
    value.backward()
    assert value.item() > 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert loss(target[:, :6000], target[:, :6000]).item() < 1e-4  # shorter than one 30-frame segment
    assert loss(target[:, :300], target[:, :300]).item() == 0.0  # not even two frames


def test_a_lower_bitrate_keeps_the_first_residual_levels_of_each_group(codec):
    """encode(levels=k): the first k of each group's R residual codes (coarse to fine) — G*k codes a frame at
    k/R of the bitrate; decode and decode_step take them (the finer levels count 0), frame by frame as offline."""
    config, G, R = codec.config, codec.config.groups, codec.config.num_quantizers
    wav = speechlike(2, 6)
    full = codec.encode(wav)
    coarse = codec.encode(wav, levels=1)
    assert coarse.shape == (2, 6, G) and torch.equal(coarse, full.view(2, 6, G, R)[..., 0])
    assert torch.equal(codec.quantizer.keep_levels(full, R), full)
    # the latent of k levels is the sum of each group's first k entries: the full latent less the finer levels'
    books = codec.quantizer._codebooks()
    entries = torch.nn.functional.embedding(full + books["offsets"], books["flat"]).view(2, 6, G, R, -1)
    expected = entries[:, :, :, :1].sum(dim=3).flatten(2)
    torch.testing.assert_close(codec.quantizer.lookup(coarse), expected)
    audio = codec.decode(coarse)
    state, frames = codec.init_state(2), []
    for f in range(6):
        pcm, state = codec.decode_step(coarse[:, f], state)
        frames.append(pcm)
    torch.testing.assert_close(torch.cat(frames, dim=1), audio, atol=ATOL, rtol=0)
    assert not torch.allclose(audio, codec.decode(full), atol=1e-3)  # coarser codes, other audio
    # bitrates: R levels = the whole rate; a bitrate that is not a whole number of levels is refused with the choices
    assert config.bitrate_at(R) == config.bitrate and config.levels_for(config.bitrate_at(1) / 1000) == 1
    with pytest.raises(SpeechLMError, match="kbit/s"):
        config.levels_for(config.bitrate_at(1) / 1000 * 0.7)
    with pytest.raises(SpeechLMError, match="levels must be 1 to"):
        codec.encode(wav, levels=R + 1)
