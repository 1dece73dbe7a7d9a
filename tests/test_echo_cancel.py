"""The microphone client's echo canceller (speechlm.streaming.echo, WebRTC's AEC3 through livekit): the model's own
voice coming back from the speakers is cleaned out of the microphone's audio, so the server's speech detector no
longer hears it as the user, while the user's own voice passes."""

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("livekit.rtc")

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: reach the client tests' fixtures
from test_streaming_clients import echo, fake_sounddevice  # noqa: E402, F401  (fixtures)

from speechlm.streaming import echo as echo_module  # noqa: E402
from speechlm.streaming.client import ClientError, DuplexClient, stream_microphone  # noqa: E402
from speechlm.streaming.echo import EchoCanceller  # noqa: E402
from speechlm.streaming.server import DuplexServer, ServerConfig  # noqa: E402
from speechlm.training.espeak import Espeak  # noqa: E402
from speechlm.vad import SpeechDetector  # noqa: E402

RATE, BLOCK = 16_000, 640  # the client's sound card blocks: one 40 ms frame


def said(text: str, voice: str, seconds: float) -> np.ndarray:
    audio = Espeak.instance().synthesize(text, voice).audio
    audio = audio * (0.5 / np.abs(audio).max())
    return np.pad(audio, (0, max(0, int(seconds * RATE) - len(audio))))[: int(seconds * RATE)].astype(np.float32)


def through_a_room(played: np.ndarray, delay_s: float = 0.03, gain: float = 0.6) -> np.ndarray:
    """What a microphone hears of the speakers: delayed, through a small room's decaying reflections."""
    rng = np.random.default_rng(0)
    room = rng.standard_normal(1600) * np.exp(-np.arange(1600) / 250.0)
    room *= gain / np.sqrt((room**2).sum())
    heard = np.convolve(played, room)[: len(played)]
    return np.concatenate([np.zeros(int(delay_s * RATE)), heard])[: len(played)].astype(np.float32)


def cancel(canceller: EchoCanceller, played: np.ndarray, mic: np.ndarray) -> np.ndarray:
    """Block by block as the sound card runs: the block played, then the block heard, cleaned."""
    out = []
    for start in range(0, len(mic), BLOCK):
        canceller.played(played[start : start + BLOCK])
        out.append(canceller.clean(mic[start : start + BLOCK]))
    return np.concatenate(out)


def envelope(audio: np.ndarray) -> np.ndarray:
    """Level per 20 ms (dB): WebRTC's band split shifts the phase (the waveforms do not line up) and delays ~10 ms."""
    frames = audio[: len(audio) // 320 * 320].reshape(-1, 320)
    return 10 * np.log10((frames**2).mean(axis=1) + 1e-8)


def speech_share(detector: SpeechDetector, audio: np.ndarray) -> float:
    return float((detector.probabilities([audio])[0] > 0.5).mean())


def test_the_models_voice_is_cleaned_out_and_the_users_passes():
    model = np.concatenate([said("The capital of France is Paris. It is a big city.", "en-us", 4.0), np.zeros(3 * RATE, np.float32)])
    user = np.concatenate([np.zeros(4 * RATE, np.float32), said("What is two plus three?", "en-gb+f3", 3.0)])
    echo_of_model = through_a_room(model)
    cleaned = cancel(EchoCanceller(delay_ms=30), model, echo_of_model + user)
    converged, talking = slice(2 * RATE, 4 * RATE), slice(4 * RATE, 7 * RATE)
    erle = 10 * np.log10((echo_of_model[converged] ** 2).mean() / (cleaned[converged] ** 2).mean())
    assert erle > 20  # dB of the echo taken out once the canceller has learned the room (~30 dB here)
    detector = SpeechDetector.from_pretrained("vad-en")
    assert speech_share(detector, echo_of_model[converged]) > 0.5  # the raw echo is speech to the server
    assert speech_share(detector, cleaned[converged]) < 0.05  # cleaned, it is not
    kept = (cleaned[talking] ** 2).mean() / (user[talking] ** 2).mean()
    assert 0.5 < kept < 2.0 and np.corrcoef(envelope(cleaned[talking]), envelope(user[talking]))[0, 1] > 0.9  # the user passes
    assert speech_share(detector, cleaned[talking]) >= 0.9 * speech_share(detector, user[talking])


def test_echo_cancellation_takes_whole_10_ms_blocks_and_buffers_what_is_played():
    canceller = EchoCanceller()
    canceller.played(np.zeros(250, np.float32))  # 2.5 frames: the half waits for the next call
    assert len(canceller._far) == 90
    assert canceller.clean(np.zeros(320, np.float32)).shape == (320,)
    with pytest.raises(ClientError, match="10 ms"):
        canceller.clean(np.zeros(100, np.float32))


def test_without_livekit_echo_cancellation_is_a_clear_error_or_a_warning(monkeypatch, echo, fake_sounddevice, caplog):  # noqa: F811
    monkeypatch.setitem(sys.modules, "livekit", None)  # import fails
    with pytest.raises(ClientError, match="speechlm\\[mic\\]"):
        EchoCanceller()

    async def main(echo_cancel):
        async with DuplexServer(echo, ServerConfig(port=0)) as server:
            return await stream_microphone(server.url, seconds=0.5, echo_cancel=echo_cancel)

    with pytest.raises(ClientError, match="speechlm\\[mic\\]"):
        asyncio.run(asyncio.wait_for(main(True), 15))
    result = asyncio.run(asyncio.wait_for(main(None), 15))  # by default: a warning, and the session goes on
    assert len(result.audio) > 0 and "no echo cancellation" in caplog.text


def test_the_microphone_client_cleans_what_it_sends(monkeypatch, echo, fake_sounddevice):  # noqa: F811
    """stream_microphone hands the canceller every block it plays and every block it hears, and sends the cleaned one."""
    calls = {"played": 0, "clean": 0}

    class Spy(EchoCanceller):
        def played(self, pcm):
            calls["played"] += 1
            super().played(pcm)

        def clean(self, pcm):
            calls["clean"] += 1
            return np.zeros_like(super().clean(pcm))  # the server hears nothing of the fake microphone's tone

    monkeypatch.setattr(echo_module, "EchoCanceller", Spy)
    sent = []
    send_audio = DuplexClient.send_audio

    async def spy_send(self, pcm):
        sent.append(np.asarray(pcm).copy())
        await send_audio(self, pcm)

    monkeypatch.setattr(DuplexClient, "send_audio", spy_send)

    async def main(echo_cancel):
        sent.clear()
        async with DuplexServer(echo, ServerConfig(port=0)) as server:
            await stream_microphone(server.url, seconds=1.0, echo_cancel=echo_cancel)
        return np.concatenate(sent)

    assert np.abs(asyncio.run(asyncio.wait_for(main(False), 15))).max() > 0.2  # the fake microphone's tone
    assert calls == {"played": 0, "clean": 0}
    cleaned = asyncio.run(asyncio.wait_for(main(True), 15))
    assert calls["played"] >= 15 and calls["clean"] >= 15
    assert len(cleaned) >= 15 * BLOCK and not cleaned.any()  # what the canceller returned
