"""Entropy-coded codes (.slc): lossless, as small as the codes' information, bound to the codec and its prior."""

import json

import numpy as np
import pytest

from speechlm.codec.audio import save_audio
from speechlm.codec.codes_file import CodesFile
from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.entropy import TOTAL, CodePrior, compress_codes, decompress_codes
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec

from .test_codec_cli import _one_line_error

TINY = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 64}


def _skewed_codes(frames: int, width: int = 8, size: int = 1024, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codes drawn from sparse, uneven distributions (as a trained codec uses its codebooks), and those distributions."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(size, 0.05), size=width)
    return np.stack([rng.choice(size, size=frames, p=p[k]) for k in range(width)], axis=1), p


def test_arithmetic_coding_is_lossless_and_near_the_entropy():
    codes, p = _skewed_codes(3000)
    prior = CodePrior.fit([codes[:2000]], "c", groups=2, codebooks=8, codebook_size=1024)
    table = prior.frequencies()
    assert (table >= 1).all() and (table.sum(axis=1) == TOTAL).all()
    held_out = codes[2000:]
    data = compress_codes(held_out, prior)
    np.testing.assert_array_equal(decompress_codes(data, len(held_out), 8, prior), held_out)
    entropy = float(np.mean([-(q[q > 0] * np.log2(q[q > 0])).sum() for q in p]))
    bits = 8 * len(data) / held_out.size
    assert bits < 10 * 0.8 and bits < entropy + 0.6, (bits, entropy)  # well under 10 bits; near what the codes hold
    # codes never seen while fitting still code (every code has frequency >= 1), and so do the first levels alone
    unseen = np.full((5, 8), 1023)
    np.testing.assert_array_equal(decompress_codes(compress_codes(unseen, prior), 5, 8, prior), unseen)
    first_levels = held_out[:, [0, 1, 4, 5]]  # 2 groups x 4 levels -> 2 levels each
    np.testing.assert_array_equal(decompress_codes(compress_codes(first_levels, prior), len(first_levels), 4, prior), first_levels)
    assert decompress_codes(compress_codes(np.zeros((0, 8), int), prior), 0, 8, prior).shape == (0, 8)
    with pytest.raises(SpeechLMError, match="do not fit this prior"):
        compress_codes(held_out[:, :3], prior)
    with pytest.raises(SpeechLMError, match="outside"):
        compress_codes(held_out + 1024, prior)


def test_codec_keeps_its_prior_and_slc_round_trips(tmp_path):
    """save_pretrained / from_pretrained carry the prior; a .slc file decodes to the .npz's codes exactly, at a
    fraction of its size; another prior or another codec is refused; a flipped byte is caught."""
    codec = Codec(CodecConfig(**TINY)).eval()
    codes, _ = _skewed_codes(400, width=4, size=64, seed=1)
    codec.code_prior = CodePrior.fit([codes], codec.codec_id, 2, 4, 64)
    codec.save_pretrained(tmp_path / "m")
    loaded = Codec.from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(loaded.code_prior.counts, codec.code_prior.counts)
    f = CodesFile(codes=codes, sample_rate=16000, frame_rate=25, codebook_size=64, num_samples=400 * 640, codec_id=codec.codec_id)
    f.save(tmp_path / "c.slc", prior=loaded.code_prior)
    f.save(tmp_path / "c.npz")
    back = CodesFile.load(tmp_path / "c.slc", prior=loaded.code_prior)
    np.testing.assert_array_equal(back.codes, codes)
    assert (back.num_samples, back.codec_id, back.frame_rate) == (400 * 640, codec.codec_id, 25)
    assert (tmp_path / "c.slc").stat().st_size < 0.5 * (tmp_path / "c.npz").stat().st_size
    other = CodePrior.fit([codes[:10]], codec.codec_id, 2, 4, 64)
    with pytest.raises(SpeechLMError, match="coded with code prior"):
        CodesFile.load(tmp_path / "c.slc", prior=other)
    with pytest.raises(SpeechLMError, match="made by codec"):
        CodesFile.load(tmp_path / "c.slc", prior=None)
    data = bytearray((tmp_path / "c.slc").read_bytes())
    data[-20] ^= 0x40
    (tmp_path / "bad.slc").write_bytes(bytes(data))
    with pytest.raises(SpeechLMError, match="corrupt"):
        CodesFile.load(tmp_path / "bad.slc", prior=loaded.code_prior)
    with pytest.raises(SpeechLMError, match="no code prior"):
        f.save(tmp_path / "x.slc", prior=None)
    # a header that claims far more frames than its bytes can hold is refused at once (no endless decoding)
    good = (tmp_path / "c.slc").read_bytes()
    size = good[4]
    fields = good[5 + size :]
    lying = good[: 5 + size] + fields[:8] + (4_000_000_000).to_bytes(4, "little") + fields[12:]
    with pytest.raises(SpeechLMError, match="corrupt header"):
        CodesFile.from_slc(lying, loaded.code_prior)
    for cut in (3, 10, 5 + size + 5):
        with pytest.raises(SpeechLMError):
            CodesFile.from_slc(good[:cut], loaded.code_prior)


def test_cli_fit_prior_then_encode_slc(cli_here, tmp_path):
    """speechlm codec fit-prior writes the prior into the codec directory; encode -o X.slc says what the file spends;
    decode gives the audio the .npz gives; a codec without a prior says how to get one."""
    Codec(CodecConfig(**TINY)).eval().save_pretrained(tmp_path / "tiny")
    model = str(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    for i in range(3):
        t = np.arange(16000) / 16000
        save_audio(tmp_path / "audio" / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t) + 0.01 * rng.standard_normal(16000)).astype(np.float32))
    speech = tmp_path / "audio" / "0.wav"
    _one_line_error(cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "c.slc"), "--model", model), "speechlm codec fit-prior")
    r = cli_here("codec", "fit-prior", "--data", f"dir:{tmp_path / 'audio'}", "--model", model, "--quiet")
    assert r.returncode == 0 and "3 files, 75 frames" in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "tiny" / "code_prior.safetensors").is_file()
    r = cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "c.slc"), "--model", model)
    assert r.returncode == 0 and "bit/s in the file" in r.stdout, r.stdout + r.stderr
    assert cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "c.npz"), "--model", model).returncode == 0
    for name in ("c.slc", "c.npz"):
        assert cli_here("codec", "decode", str(tmp_path / name), "-o", str(tmp_path / f"{name}.wav"), "--model", model).returncode == 0
    from speechlm.codec.audio import load_audio

    np.testing.assert_array_equal(load_audio(tmp_path / "c.slc.wav"), load_audio(tmp_path / "c.npz.wav"))
    _one_line_error(cli_here("codec", "fit-prior", "--data", f"dir:{tmp_path / 'audio'}", "--quiet"), "--out is needed")
    r = cli_here("codec", "eval", str(tmp_path / "audio"), "--model", model)  # eval says what .slc files of the codes spend
    summary = json.loads(r.stdout)
    assert r.returncode == 0 and summary["files"] == 3 and 0 < summary["slc_bitrate"] < 2 * summary["bitrate"], r.stdout + r.stderr
