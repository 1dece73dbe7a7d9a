"""AOTInductor-compiled streaming steps (speechlm.codec.compiled): they match the eager steps and
the offline codec, batch size is free, rows reset, the package is cached and keyed by the weights.

One compile of a tiny codec (two programs) for the whole file; skipped where no C++ compiler is found.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from speechlm.codec.compiled import CompiledSteps, cache_key
from speechlm.codec.config import CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: reach the codec tests' helpers
from test_codec_model import ATOL, TINY, speechlike, stream  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


def _tiny(seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    model = Codec(CodecConfig(**TINY)).eval()
    model.quantizer.init_random_codebooks_()
    return model


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("aoti")
    return CompiledSteps.load_or_build(_tiny(), cache), cache


def test_compiled_steps_match_eager_and_offline_at_any_batch_size(compiled):
    steps, _ = compiled
    codec = steps.codec
    for batch in (1, 3):
        wav = speechlike(batch, 12, seed=batch)
        codes, audio, _ = stream(steps, wav)
        eager_codes, eager_audio, _ = stream(codec, wav)
        assert codes.shape == eager_codes.shape and codes.dtype == torch.long
        # Fused kernels reorder float sums: a code may differ only at a near tie.
        assert (codes == eager_codes).float().mean() >= 0.99
        assert (codes == codec.encode(wav)).float().mean() >= 0.99
        # The decoder half on the same codes: offline audio within float tolerance.
        state, pcm = steps.init_state(batch), []
        for t in range(eager_codes.shape[1]):
            frame, state = steps.decode_step(eager_codes[:, t], state)
            pcm.append(frame)
        torch.testing.assert_close(torch.cat(pcm, 1), codec.decode(eager_codes), atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.cat(pcm, 1), eager_audio, atol=ATOL, rtol=0)


def test_compiled_steps_reset_rows_like_eager(compiled):
    steps, _ = compiled
    wav = speechlike(2, 8, seed=5)
    _, _, state = stream(steps, wav[:, : 4 * 640])
    state.reset_rows([0])
    codes, audio, _ = stream(steps, wav[:, 4 * 640 :], state)
    fresh_codes, fresh_audio, _ = stream(steps, wav[:1, 4 * 640 :])
    assert torch.equal(codes[:1], fresh_codes)
    torch.testing.assert_close(audio[:1], fresh_audio, atol=ATOL, rtol=0)


def test_package_is_cached_and_keyed_by_the_weights(compiled):
    steps, cache = compiled
    files = sorted(cache.glob("*.pt2"))
    assert len(files) == 2 and all(cache_key(steps.codec) in f.name for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = CompiledSteps.load_or_build(steps.codec, cache)  # loads, does not compile
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    wav = speechlike(1, 3)
    assert torch.equal(stream(again, wav)[0], stream(steps, wav)[0])
    assert cache_key(_tiny(seed=1)) != cache_key(steps.codec), "other weights, other package"
    assert steps.frame_length == steps.codec.frame_length and steps.codec_id == steps.codec.codec_id


def test_compiled_steps_check_their_inputs(compiled):
    steps, _ = compiled
    state = steps.init_state(2)
    with pytest.raises(SpeechLMError, match="encode_step expects"):
        steps.encode_step(torch.zeros(2, 100), state)
    with pytest.raises(SpeechLMError, match="codes must"):
        steps.decode_step(torch.full((2, 4), 10_000), state)
    with pytest.raises(SpeechLMError, match="rows"):
        steps.decode_step(torch.zeros(3, steps.codec.config.groups * steps.codec.config.num_quantizers, dtype=torch.long), state)


def test_server_models_take_the_compiled_steps(compiled):
    """``speechlm serve --compile-codec``: the model's codec becomes the compiled steps, same output."""
    from speechlm.streaming.models import EchoCodecModel, SilenceModel, with_compiled_codec

    steps, cache = compiled
    eager, fast = EchoCodecModel(steps.codec), with_compiled_codec(EchoCodecModel(steps.codec), cache)
    assert isinstance(fast.codec, CompiledSteps) and not isinstance(eager.codec, CompiledSteps)
    wav = speechlike(2, 4, seed=7)
    se, sf = eager.init_state(2), fast.init_state(2)
    for chunk in wav.split(640, dim=1):
        pe, _, se = eager.step(chunk, se)
        pf, _, sf = fast.step(chunk, sf)
        torch.testing.assert_close(pf, pe, atol=ATOL, rtol=0)
    silence = SilenceModel()
    assert with_compiled_codec(silence, cache) is silence
