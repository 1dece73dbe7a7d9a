"""The optional EnCodec tokenizer: skipped cleanly when the package is not installed."""

import pytest
import torch

from speechlm.codec import encodec_backend
from speechlm.codec.errors import SpeechLMError


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(SpeechLMError, match="weights not found"):
        encodec_backend.EncodecTokenizer.from_pretrained(tmp_path / "nope.th")


@pytest.mark.skipif(not encodec_backend.is_available(), reason="encodec not installed (pip install --no-deps encodec)")
def test_roundtrip_with_local_weights(tmp_path):
    EncodecModel = encodec_backend._import_encodec()
    torch.manual_seed(0)
    torch.save(EncodecModel.encodec_model_24khz(pretrained=False).state_dict(), tmp_path / "encodec.th")
    tok = encodec_backend.EncodecTokenizer.from_pretrained(tmp_path / "encodec.th", bandwidth=1.5)
    codes = tok.encode(torch.randn(2, 16000) * 0.1)
    assert codes.shape == (2, 75, 2) and codes.dtype == torch.int64
    audio = tok.decode(codes)
    assert audio.shape[0] == 2 and abs(audio.shape[1] - 16000) < 400
    (tmp_path / "bad.th").write_bytes(b"junk")
    with pytest.raises(SpeechLMError, match="not an EnCodec"):
        encodec_backend.EncodecTokenizer.from_pretrained(tmp_path / "bad.th")
