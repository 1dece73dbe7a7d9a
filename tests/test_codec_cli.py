"""`speechlm codec ...` on a small untrained model saved to disk: formats and bad input."""

import json

import numpy as np
import pytest
import soundfile as sf

from speechlm.codec.audio import save_audio
from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.model import Codec

TINY = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 64}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec")
    Codec(CodecConfig(**TINY)).eval().save_pretrained(d / "tiny")
    Codec(CodecConfig(**{**TINY, "codebook_size": 32})).eval().save_pretrained(d / "other")
    return d


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("wav")
    t = np.arange(16000) / 16000
    save_audio(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    return d / "tone.wav"


def test_encode_decode_roundtrip(cli_here, model_dir, speech, tmp_path):
    model = str(model_dir / "tiny")
    r = cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "c.npz"), "--model", model)
    assert r.returncode == 0, r.stderr
    z = np.load(tmp_path / "c.npz")
    assert z["codes"].shape == (25, 4) and int(z["sample_rate"]) == 16000 and int(z["frame_rate"]) == 25 and int(z["codebook_size"]) == 64
    assert str(z["codec_id"]).startswith("grvq2x2x64")
    r = cli_here("codec", "decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "d.wav"), "--model", model)
    assert r.returncode == 0, r.stderr
    audio, sr = sf.read(tmp_path / "d.wav")
    assert sr == 16000 and len(audio) == 16000
    r = cli_here("codec", "roundtrip", str(speech), "-o", str(tmp_path / "r.flac"), "--model", model)
    assert r.returncode == 0 and np.allclose(sf.read(tmp_path / "r.flac")[0], audio, atol=2e-4)


def test_a_lower_bandwidth(cli_here, model_dir, speech, tmp_path):
    """--bandwidth: the first residual levels of each group (the tiny codec: 2 x 2 x 64 at 25 Hz = 600 bit/s, so
    0.3 kbit/s is one level); decode reads the bitrate from the codes; a rate the codec has not is a one-line error."""
    model = str(model_dir / "tiny")
    r = cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "c.npz"), "--model", model, "--bandwidth", "0.3")
    assert r.returncode == 0 and "(300 bit/s)" in r.stdout, r.stdout + r.stderr
    assert np.load(tmp_path / "c.npz")["codes"].shape == (25, 2)
    r = cli_here("codec", "decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "d.wav"), "--model", model)
    assert r.returncode == 0 and len(sf.read(tmp_path / "d.wav")[0]) == 16000, r.stderr
    r = cli_here("codec", "roundtrip", str(speech), "-o", str(tmp_path / "r.wav"), "--model", model, "--bandwidth", "0.3")
    assert r.returncode == 0 and np.allclose(sf.read(tmp_path / "r.wav")[0], sf.read(tmp_path / "d.wav")[0], atol=2e-4)
    _one_line_error(cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "x.npz"), "--model", model, "--bandwidth", "1"),
                    "this codec codes 0.3, 0.6 kbit/s")


def test_eval_a_folder_at_each_bandwidth(cli_here, model_dir, speech, tmp_path):
    model = str(model_dir / "tiny")
    full = cli_here("codec", "eval", str(speech.parent), "--model", model)
    low = cli_here("codec", "eval", str(speech.parent), "--model", model, "--bandwidth", "0.3")
    assert full.returncode == 0 and low.returncode == 0, full.stderr + low.stderr
    full, low = json.loads(full.stdout), json.loads(low.stdout)
    assert full["files"] == low["files"] == 1 and full["bitrate"] == 600 and low["bitrate"] == 300
    assert full["log_mel"] is not None and full["log_mel"] != low["log_mel"]  # other codes, other audio
    _one_line_error(cli_here("codec", "eval", str(tmp_path), "--model", model), "no audio files")


def _one_line_error(r, message):
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_inputs(cli_here, model_dir, speech, tmp_path):
    model = str(model_dir / "tiny")
    (tmp_path / "junk.wav").write_bytes(b"not audio" * 50)
    (tmp_path / "empty.wav").write_bytes(b"")
    save_audio(tmp_path / "stereo8k.wav", np.zeros((8000, 2), np.float32) + 0.1, sample_rate=8000)
    save_audio(tmp_path / "tiny.wav", np.full(10, 0.1, np.float32))
    _one_line_error(cli_here("codec", "encode", str(tmp_path / "junk.wav"), "-o", str(tmp_path / "x.npz"), "--model", model), "cannot read")
    _one_line_error(cli_here("codec", "encode", str(tmp_path / "empty.wav"), "-o", str(tmp_path / "x.npz"), "--model", model), "empty")
    _one_line_error(cli_here("codec", "encode", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "x.npz"), "--model", model), "not found")
    # stereo 8 kHz is downmixed and resampled; shorter than a frame is padded to one frame
    assert cli_here("codec", "encode", str(tmp_path / "stereo8k.wav"), "-o", str(tmp_path / "s.npz"), "--model", model).returncode == 0
    assert np.load(tmp_path / "s.npz")["codes"].shape == (25, 4)
    assert cli_here("codec", "encode", str(tmp_path / "tiny.wav"), "-o", str(tmp_path / "t.npz"), "--model", model).returncode == 0
    assert np.load(tmp_path / "t.npz")["codes"].shape == (1, 4)
    # codes from another codec, and files that are not codes
    assert cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "o.npz"), "--model", str(model_dir / "other")).returncode == 0
    _one_line_error(cli_here("codec", "decode", str(tmp_path / "o.npz"), "-o", str(tmp_path / "y.wav"), "--model", model), "made by codec")
    np.savez(tmp_path / "wrong.npz", something=np.zeros(3))
    _one_line_error(cli_here("codec", "decode", str(tmp_path / "wrong.npz"), "-o", str(tmp_path / "y.wav"), "--model", model), "not a speechlm codes file")
    _one_line_error(cli_here("codec", "decode", str(speech), "-o", str(tmp_path / "y.wav"), "--model", model), "not a codes file")
    _one_line_error(cli_here("codec", "encode", str(speech), "-o", str(tmp_path / "x.npz"), "--model", str(tmp_path / "nomodel")), "not found")
