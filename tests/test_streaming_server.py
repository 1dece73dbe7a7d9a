"""The websocket server end to end on 127.0.0.1 (ephemeral ports), with the codec-loopback model.

Every test is bounded by ``asyncio.wait_for``; the whole file runs in about 20 s on one core.
"""

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.streaming import protocol
from speechlm.streaming.client import ClientError, DuplexClient, ServerBusy, add_client_arguments, client_main, stream_file
from speechlm.streaming.models import EchoCodecModel, SilenceModel
from speechlm.streaming.opus import OpusEncoder
from speechlm.streaming.protocol import Audio, Control, Error, Handshake, Metadata
from speechlm.streaming.server import DuplexServer, ServerConfig, run_server

TINY = {**TINY_ARCHITECTURE, "num_quantizers": 2, "codebook_size": 32}


FRAME = 640
HANDSHAKE = protocol.encode(Handshake({"version": 1, "sample_rate": 16000, "codec": "pcm16", "client": "test"}))


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(0)
    model = Codec(CodecConfig(**TINY)).eval()
    model.quantizer.init_random_codebooks_()
    return model


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def server(model, **config) -> DuplexServer:
    return DuplexServer(model, ServerConfig(port=0, **config))


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonic tone with a wobble plus noise, quantized to PCM16 (what the wire carries)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16_000)) / 16_000
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.5 * t)
    x = (
        0.2 * np.sin(2 * np.pi * np.cumsum(f0) / 16_000)
        + 0.1 * np.sin(4 * np.pi * np.cumsum(f0) / 16_000)
        + 0.01 * rng.standard_normal(len(t))
    )
    return protocol.Pcm16Wire().decode(protocol.pcm_to_bytes(x.astype(np.float32)))


def roundtrip(codec: Codec, audio: np.ndarray) -> np.ndarray:
    return codec.decode(codec.encode(torch.from_numpy(audio)[None]))[0].numpy()


async def wait_until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def handshaken(url: str, **kwargs):
    ws = await connect(url, compression=None, **kwargs)
    await ws.send(HANDSHAKE)
    reply = protocol.decode(await ws.recv())
    assert isinstance(reply, Handshake), reply
    return ws


# -- the main path ------------------------------------------------------------------------


def test_echo_session_returns_the_codec_roundtrip_one_frame_late(codec):
    audio = speech(1.0)

    async def main():
        async with server(EchoCodecModel(codec)) as srv:
            result = await stream_file(srv.url, audio, realtime=False, listen_seconds=0.2)
            await wait_until(lambda: not srv.connections)
            return result, srv.scheduler.live_sessions

    result, live = run(main())
    assert result.complete and not result.errors and live == 0
    assert len(result.audio) == 16_000 + 3200  # input + listen time, whole frames
    expected = roundtrip(codec, audio)
    assert np.abs(result.audio[:FRAME]).max() == 0  # the model's first frame: silence
    np.testing.assert_allclose(result.audio[FRAME : FRAME + 16_000], expected[:16_000], atol=2e-4)  # PCM16 on the wire
    assert np.abs(expected).max() > 1e-3  # the comparison is not between two silences


def test_sessions_share_one_batched_step(codec):
    model = EchoCodecModel(codec)

    async def main():
        async with server(model) as srv:
            clips = [speech(0.8, seed) for seed in range(3)]
            results = await asyncio.gather(*(stream_file(srv.url, clip, realtime=False, listen_seconds=0.1) for clip in clips))
            return clips, results, srv.scheduler.stats.snapshot(0.04)

    clips, results, stats = run(main())
    assert model.max_batch_seen >= 2 and stats["max_batch"] >= 2
    for clip, result in zip(clips, results):  # batching did not mix rows up
        np.testing.assert_allclose(result.audio[FRAME : FRAME + len(clip)], roundtrip(codec, clip)[: len(clip)], atol=2e-4)


def test_client_command_writes_the_reply_and_prints_transcripts(codec, tmp_path, capsys):
    wav = tmp_path / "in.wav"
    sf.write(wav, speech(0.5), 16_000)
    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    ready, done = threading.Event(), threading.Event()
    holder = {}

    def serve_in_thread():
        async def main():
            async with server(EchoCodecModel(codec)) as srv:
                holder["url"] = srv.url
                ready.set()
                while not done.is_set():
                    await asyncio.sleep(0.02)

        run(main(), timeout=30)

    thread = threading.Thread(target=serve_in_thread, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        url = holder["url"].removesuffix("/ws")  # the client adds /ws
        args = parser.parse_args([url, "--input", str(wav), "-o", str(tmp_path / "reply.wav"), "--fast", "--listen-seconds", "0.3", "--wait", "5"])
        assert args.wait == 5 and client_main(args) == 0
        with pytest.raises(ClientError, match="--wait"):
            client_main(parser.parse_args([url, "--input", str(wav), "--wait", "-1"]))
    finally:
        done.set()
        thread.join(10)
    out = capsys.readouterr().out
    assert "user:" in out and "model:" in out and "s of model audio" in out
    reply, rate = sf.read(tmp_path / "reply.wav")
    assert rate == 16_000 and len(reply) == 8000 + 4800


# -- malformed input ------------------------------------------------------------------------


def expect_error(raw) -> bool:
    """Whether the server must answer ``raw`` (sent after the handshake) with ERROR bad_message."""
    try:
        message = protocol.decode(raw)
    except protocol.ProtocolError:
        return True
    return isinstance(message, Handshake) or (isinstance(message, Audio) and len(message.payload) % 2 == 1)


def junk(rng: np.random.Generator, n: int) -> list:
    valid_text = protocol.encode(protocol.Text("hello", 0.0, 0.5, "user"))
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # random bytes, first byte a known kind
            out.append(bytes([rng.integers(0, 6)]) + rng.bytes(int(rng.integers(0, 200))))
        elif kind == 1:  # unknown kinds: ignored
            out.append(bytes([rng.integers(6, 256)]) + rng.bytes(int(rng.integers(0, 50))))
        elif kind == 2:  # truncated messages
            out.append(valid_text[: int(rng.integers(1, len(valid_text) - 1))])
        elif kind == 3:  # over the protocol's size cap, under the websocket frame cap
            out.append(b"\x01" + rng.bytes(protocol.MAX_MESSAGE_BYTES + 100))
        elif kind == 4:  # text frames
            out.append("not binary " + str(i))
        else:  # bad JSON in every JSON kind
            out.append(bytes([rng.integers(2, 6)]) + b'{"action": "ping", "id": ' + rng.bytes(5))
    return out


def test_fuzz_does_not_disturb_a_streaming_session(codec):
    rng = np.random.default_rng(1)
    audio = speech(2.0, seed=5)

    async def fuzz(url: str, messages: list) -> tuple[int, int]:
        ws = await handshaken(url)
        for message in messages:
            await ws.send(message)
        await ws.send(protocol.encode(Control("ping", {"id": "after-junk"})))
        errors = 0
        async for data in ws:
            message = protocol.decode(data, max_bytes=2**20)
            if isinstance(message, Error):
                assert message.code == protocol.ErrorCode.BAD_MESSAGE, message
                errors += 1
            if isinstance(message, Control) and message.action == "pong":
                break  # the session lived through all of it
        await ws.close()
        return errors, sum(map(expect_error, messages))

    async def too_many(url: str) -> Error:
        ws = await handshaken(url)
        for _ in range(120):
            await ws.send(b"\x03not json")
        last = None
        with pytest.raises(ConnectionClosed) as info:
            async for data in ws:
                last = protocol.decode(data, max_bytes=2**20)
        assert info.value.rcvd.code == 1008
        return last

    async def no_handshake(url: str) -> Error:
        async with connect(url) as ws:
            await ws.send(b"\x01\x00\x00")
            reply = protocol.decode(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return reply

    async def huge_frame(url: str) -> int:
        ws = await handshaken(url, max_size=None)
        await ws.send(b"\x01" + bytes(300 * 1024))  # over the websocket frame cap: the connection is closed
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.recv()
        return info.value.rcvd.code if info.value.rcvd else None

    async def main():
        async with server(EchoCodecModel(codec), max_sessions=16) as srv:
            normal = asyncio.create_task(stream_file(srv.url, audio, realtime=False, listen_seconds=0.2))
            await asyncio.sleep(0.2)
            fuzzers = [fuzz(srv.url, junk(rng, 80)) for _ in range(4)]
            outcomes = await asyncio.gather(*fuzzers, too_many(srv.url), no_handshake(srv.url), huge_frame(srv.url))
            result = await normal
            await wait_until(lambda: not srv.connections)
            return outcomes, result, srv.stats()

    (*fuzzed, last, first_reply, huge_code), result, stats = run(main(), timeout=40)
    for errors, expected in fuzzed:
        assert errors == expected and expected > 30
    assert isinstance(last, Error) and last.code == protocol.ErrorCode.TOO_MANY_ERRORS
    assert isinstance(first_reply, Error) and first_reply.code == protocol.ErrorCode.HANDSHAKE_REQUIRED
    assert huge_code == 1009
    # The normal session noticed nothing: exact content, no errors, no underruns, nothing dropped.
    assert result.complete and not result.errors
    assert result.stats["underruns"] == 0 and result.stats["dropped_frames"] == 0
    np.testing.assert_allclose(result.audio[FRAME : FRAME + len(audio)], roundtrip(codec, audio)[: len(audio)], atol=2e-4)
    assert stats["bad_messages"] >= sum(e for e, _ in fuzzed) + 100
    assert stats["live_sessions"] == 0 and stats["errors"] == 0


# -- limits and faults --------------------------------------------------------------------


def test_max_sessions_answers_with_an_error_not_a_hang():
    async def main():
        async with server(SilenceModel(), max_sessions=2) as srv:
            first = await DuplexClient.connect(srv.url)
            second = await DuplexClient.connect(srv.url)
            with pytest.raises(ServerBusy, match="server_full"):
                await DuplexClient.connect(srv.url)
            await first.close()
            await wait_until(lambda: len(srv.connections) == 1)
            third = await DuplexClient.connect(srv.url)  # a freed place can be taken again
            # a client that waits: refused while full, tries again, and gets the place the second leaves
            waiting = asyncio.create_task(DuplexClient.connect(srv.url, wait_seconds=10))
            await wait_until(lambda: srv.counters["rejected_full"] >= 2)
            await second.close()
            fourth = await asyncio.wait_for(waiting, 10)
            await third.close()
            await fourth.close()
            return srv.counters["rejected_full"]

    assert run(main(), timeout=30) >= 2


class SlowStep(SilenceModel):
    """A model whose step takes at least 30 ms of a 40 ms frame (it sleeps)."""

    def step(self, user_pcm, state):
        time.sleep(0.03)
        return super().step(user_pcm, state)


def test_a_server_at_its_real_time_capacity_refuses_new_sessions_until_the_load_is_gone():
    """Load-based admission: once the step's p90 has been above admit_load of a frame for ADMIT_MIN_TICKS ticks, a new
    client gets server_full (busy) while the live session goes on; /health says so; with the load gone, admitted."""
    from speechlm.streaming.server import ADMIT_MIN_TICKS

    async def main():
        async with server(SlowStep(), admit_load=0.5, admit_window=2.5) as srv:
            first = await DuplexClient.connect(srv.url)  # nothing measured yet: admitted
            await first.send_audio(np.zeros(640, np.float32))
            await wait_until(lambda: (srv.scheduler.load(2.5) or {"ticks": 0})["ticks"] >= ADMIT_MIN_TICKS, timeout=15)
            health = srv.stats()
            with pytest.raises(ClientError, match="server_full.*busy"):
                await DuplexClient.connect(srv.url)
            live = srv.scheduler.live_sessions
            await first.close()
            await wait_until(lambda: not srv.connections)
            loaded = srv.scheduler.load(2.5)  # the window still holds the load of the session gone ...
            again = await DuplexClient.connect(srv.url)  # ... but with no session open, the first is always let in
            await again.close()
            return health, live, srv.counters["rejected_busy_step"], loaded

    health, live, busy, loaded = run(main(), timeout=40)
    assert busy == 1 and live == 1 and loaded["step_p90_share"] >= 0.7
    assert not health["admitting"] and health["load"]["step_p90_share"] >= 0.7 and health["load"]["ticks"] >= 50


class StarvedAssist(SilenceModel):
    """A model whose answer assist says its replies' speech keeps falling behind."""

    def assist_load(self, window_seconds):
        return {"ticks": 100, "starved_share": 0.3}


def test_an_assist_whose_speech_falls_behind_makes_the_server_refuse_new_sessions():
    async def main():
        async with server(StarvedAssist()) as srv:
            first = await DuplexClient.connect(srv.url)  # no session open: let in whatever the reading
            with pytest.raises(ClientError, match="server_full.*speech falls behind"):
                await DuplexClient.connect(srv.url)
            health = srv.stats()
            assert srv.counters["rejected_busy_speech"] == 1 and srv.counters["rejected_busy_step"] == 0
            await first.close()
        async with server(StarvedAssist(), admit_load=None) as srv:  # admission off: admitted
            await (await DuplexClient.connect(srv.url)).close()
        return health

    health = run(main(), timeout=20)
    assert not health["admitting"] and health["assist_load"]["starved_share"] == 0.3


def test_serve_admit_load_option():
    from speechlm.streaming.settings import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args([])).admit_load == ServerConfig.admit_load == 0.8
    assert config_from_args(parser.parse_args(["--admit-load", "0.75"])).admit_load == 0.75
    assert config_from_args(parser.parse_args(["--admit-load", "off"])).admit_load is None
    for bad in ("0", "-1", "most"):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(["--admit-load", bad])
    with pytest.raises(SpeechLMError, match="admit_load"):
        ServerConfig(admit_load=0).check()


def test_load_test_staggers_clients_so_that_admission_judges_each_on_the_load_before_it():
    from speechlm.streaming.loadtest import measure_load

    result = asyncio.run(measure_load(SlowStep(), 2, seconds=0.5, warmup=0.3, stagger=2.8, admit_load=0.5))
    assert (result["admitted"], result["refused"]) == (1, 1) and result["client_failed"] == 0 and result["ticks"] > 0


def test_abrupt_disconnect_frees_the_session(codec):
    async def main():
        async with server(EchoCodecModel(codec)) as srv:
            ws = await handshaken(srv.url)
            for i in range(10):
                await ws.send(protocol.encode(Audio.from_pcm(speech(0.04, i))))
            await wait_until(lambda: srv.scheduler.live_sessions == 1 and srv.scheduler.stats.steps > 3)
            ws.transport.abort()  # no close frame, mid-stream
            await wait_until(lambda: srv.scheduler.live_sessions == 0 and not srv.connections and not srv.scheduler.sessions)
            return srv.scheduler.capacity

    assert run(main(), timeout=15) <= 1


def test_a_reader_that_stops_reading_cannot_grow_server_memory():
    async def main():
        async with server(SilenceModel(), output_seconds=0.4) as srv:  # 10 frames per session
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
            ws = await connect(srv.url, sock=sock, max_queue=1, compression=None)
            await ws.send(HANDSHAKE)
            await ws.send(protocol.encode(Audio.from_pcm(np.zeros(FRAME, np.float32))))  # joins; then silence forever
            await wait_until(lambda: srv.connections and next(iter(srv.connections)).session is not None)
            (connection,) = srv.connections
            connection.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            session = connection.session
            peak = 0
            for _ in range(200):  # never read; watch the queue for up to 4 s
                await asyncio.sleep(0.02)
                peak = max(peak, len(session.output))
                if session.output.dropped > 10:
                    break
            frames, dropped = session.frames, session.output.dropped
            ws.transport.abort()
            return peak, frames, dropped

    peak, frames, dropped = run(main(), timeout=20)
    assert peak <= 10  # the bound, whatever the reader does
    assert dropped > 10 and frames > dropped  # the oldest frames went; the clock never waited for the reader


def test_refuses_to_bind_beyond_loopback_without_a_token():
    for host in ("0.0.0.0", "", "::", "192.168.1.10", "example.com"):
        with pytest.raises(SpeechLMError, match="without --token"):
            ServerConfig(host=host).check()
        with pytest.raises(SpeechLMError, match="without --token"):
            DuplexServer(SilenceModel(), ServerConfig(host=host, port=0))
    ServerConfig(host="0.0.0.0", token="secret").check()  # allowed (not bound here)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServerConfig(host=host).check()


def test_dtype_auto_follows_the_device_and_bad_names_are_refused(monkeypatch):
    import speechlm.speech as speech
    from speechlm.streaming.server import model_dtype

    assert ServerConfig().dtype == "auto"
    assert model_dtype("float32", "cuda") is torch.float32 and model_dtype("bfloat16", "cpu") is torch.bfloat16
    assert model_dtype("auto", "cuda:0") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert speech.fast_dtype("cpu") is torch.float32 and model_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert model_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(SpeechLMError, match="dtype must be auto, float32 or bfloat16"):
        ServerConfig(dtype="float16").check()


def test_stopped_server_gives_clients_a_clear_error():
    async def main():
        started = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(run_server(ServerConfig(port=0), SilenceModel(), on_ready=started.set_result))
        port = (await started).port
        client = await DuplexClient.connect(f"ws://127.0.0.1:{port}")
        await client.send_audio(np.zeros(FRAME * 2, np.float32))
        task.cancel()  # like Ctrl-C: the server closes every session with a reason
        with pytest.raises(ClientError, match="shutting_down"):
            async for _ in client.messages():
                pass
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with pytest.raises(ClientError, match="cannot connect"):
            await stream_file(f"ws://127.0.0.1:{port}", np.zeros(FRAME, np.float32))

    run(main(), timeout=20)


def test_idle_sessions_time_out():
    async def main():
        async with server(SilenceModel(), idle_timeout=0.3) as srv:
            client = await DuplexClient.connect(srv.url, metadata_interval=0)
            with pytest.raises(ClientError, match="idle_timeout"):
                async for _ in client.messages():
                    pass
            await wait_until(lambda: not srv.connections)

    run(main(), timeout=10)


def test_controls_ping_interrupt_config_stop_start(codec):
    async def main():
        async with server(EchoCodecModel(codec)) as srv:
            client = await DuplexClient.connect(srv.url, metadata_interval=0)
            replies = []

            async def read_until(predicate):
                async for message in client.messages():
                    replies.append(message)
                    if predicate(message):
                        return message

            await client.ping()
            await client.send_control("config", metadata_interval=0.2, send_text=False)
            config = await read_until(lambda m: isinstance(m, Metadata) and m.data.get("type") == "config")
            stats = await read_until(lambda m: isinstance(m, Metadata) and m.data.get("type") == "stats")
            await client.send_audio(speech(0.4))
            await read_until(lambda m: isinstance(m, Audio))
            await client.send_control("interrupt")
            interrupted = await read_until(lambda m: isinstance(m, Metadata) and m.data.get("type") == "interrupted")
            await client.send_control("stop")
            await wait_until(lambda: srv.scheduler.live_sessions == 0)
            await client.send_audio(speech(0.2))  # ignored while stopped
            await client.send_control("start")
            await wait_until(lambda: srv.scheduler.live_sessions == 1)
            await client.send_control("config", volume=11)
            bad = await read_until(lambda m: isinstance(m, Error))
            await client.close()
            return client.round_trips, config, stats, interrupted, bad

    round_trips, config, stats, interrupted, bad = run(main(), timeout=15)
    assert len(round_trips) == 1 and 0 < round_trips[0] < 1.0
    assert config.data == {"type": "config", "metadata_interval": 0.2, "send_text": False}
    assert {"underruns", "input_skipped", "dropped_frames", "output_queue_frames", "server_step_ms_p50"} <= set(stats.data)
    assert interrupted.data["flushed_frames"] >= 0
    assert bad.code == "bad_message" and "unknown config option" in bad.message


# -- HTTP side, origins, tokens -----------------------------------------------------------


async def http_get(port: int, path: str, host: str = "127.0.0.1", extra: str = "") -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").strip().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    body = await reader.readexactly(int(headers.get("Content-Length", 0)))
    writer.close()
    return int(lines[0].split()[1]), headers, body


UPGRADE = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


def test_page_health_and_origin_checks():
    async def main():
        async with server(SilenceModel(), allowed_origins=("https://app.example",)) as srv:
            port = srv.port
            page = await http_get(port, "/")
            worklet = await http_get(port, "/audio-worklet.js")
            health = await http_get(port, "/health")
            missing = await http_get(port, "/etc/passwd")
            foreign_origin = await http_get(port, "/ws", extra=UPGRADE + "Origin: http://evil.example\r\n")
            same_origin = await http_get(port, "/ws", extra=UPGRADE + f"Origin: http://127.0.0.1:{port}\r\n")
            listed_origin = await http_get(port, "/ws", extra=UPGRADE + "Origin: https://app.example\r\n")
            rebinding = await http_get(port, "/ws", host="evil.example", extra=UPGRADE)
            return page, worklet, health, missing, foreign_origin, same_origin, listed_origin, rebinding

    page, worklet, health, missing, foreign_origin, same_origin, listed_origin, rebinding = run(main(), timeout=10)
    assert page[0] == 200 and page[1]["Content-Type"].startswith("text/html")
    assert b'<script src="app.js"></script>' in page[2]
    assert worklet[0] == 200 and "javascript" in worklet[1]["Content-Type"] and b"registerProcessor" in worklet[2]
    assert health[0] == 200 and json.loads(health[2])["live_sessions"] == 0
    assert missing[0] == 404
    assert foreign_origin[0] == 403 and b"not allowed" in foreign_origin[2]
    assert same_origin[0] == 101 and listed_origin[0] == 101
    assert rebinding[0] == 403 and b"not a loopback name" in rebinding[2]


def test_token_in_query_or_handshake():
    async def main():
        async with server(SilenceModel(), token="s3cret") as srv:
            with pytest.raises(ClientError, match="unauthorized"):
                await DuplexClient.connect(srv.url)
            with pytest.raises(ClientError, match="unauthorized"):
                await DuplexClient.connect(srv.url, token="wrong")
            with pytest.raises(ClientError, match="HTTP 401"):
                await DuplexClient.connect(srv.url + "?token=wrong")
            by_handshake = await DuplexClient.connect(srv.url, token="s3cret")
            by_query = await DuplexClient.connect(srv.url + "?token=s3cret")
            health = await http_get(srv.port, "/health")
            await by_handshake.close()
            await by_query.close()
            return health[0], srv.counters["rejected_token"]

    health_status, rejected = run(main(), timeout=10)
    assert health_status == 401 and rejected == 3


@pytest.mark.skipif(not protocol.opus_available(), reason="sphn (Opus) is not installed")
def test_opus_session(codec):
    audio = speech(1.0)

    async def main():
        async with server(EchoCodecModel(codec)) as srv:
            return await stream_file(srv.url, audio, realtime=False, listen_seconds=0.3, codec="opus")

    result = run(main())
    assert result.complete and not result.errors and result.server["codec"] == "opus"
    assert result.server["opus_packet_ms"] == (40 if protocol.opus_backend() == "libopus" else 60)
    assert len(result.audio) >= 16_000 + 4800 - 3 * 960
    assert np.abs(result.audio).max() > 1e-3


def test_loopback_model_returns_the_audio_a_frame_later():
    """``--model loopback``: PCM16 comes back bit for bit, one frame late; through Opus both ways, the same sound
    (after the two coders' delay)."""
    from speechlm.streaming.models import LoopbackModel
    from speechlm.streaming.server import build_model

    assert isinstance(build_model(ServerConfig(model="loopback")), LoopbackModel)
    audio = speech(1.0)

    async def main(codec_name):
        async with server(LoopbackModel()) as srv:
            return await stream_file(srv.url, audio, realtime=False, listen_seconds=0.3, codec=codec_name)

    plain = run(main("pcm16"))
    assert plain.complete and not plain.errors
    np.testing.assert_array_equal(plain.audio[FRAME : FRAME + len(audio)], audio)
    assert not plain.audio[:FRAME].any()
    if protocol.opus_available():
        opus = run(main("opus"))
        assert opus.complete and not opus.errors and opus.server["codec"] == "opus"
        got, want = opus.audio[: len(audio) + 2 * FRAME], np.concatenate([np.zeros(FRAME), audio])
        lags = range(0, 2 * FRAME)  # the encoder's and decoder's delays
        scores = [np.dot(got[lag : lag + 12_000], want[:12_000]) for lag in lags]
        lag = lags[int(np.argmax(scores))]
        match = got[lag : lag + 12_000]  # coded twice (up and down): the waveform near, not equal
        assert np.corrcoef(match, want[:12_000])[0, 1] > 0.6 and 0 < lag < FRAME, lag  # (at a wrong lag: |r| < 0.2)
        if protocol.opus_backend() == "libopus":  # each way only the coder's look-ahead (kept, not dropped as pre-skip)
            assert abs(lag - 2 * OpusEncoder().lookahead) <= 24, lag  # (within 1.5 ms: a lossy coder's peak)
        assert abs(20 * np.log10(np.std(match) / np.std(want[:12_000]))) < 2


def test_load_test_spreads_clients_over_processes_and_adds_their_counts():
    """benchmarks/server.py's measure_load with several client processes: every session joins,
    the counts of all processes are added up, and the load is held by a trivial model."""
    from speechlm.streaming.loadtest import measure_load

    result = asyncio.run(measure_load(SilenceModel(), 3, seconds=0.6, warmup=0.3, clients_per_process=2))
    assert result["client_processes"] == 2 and result["client_failed"] == 0
    assert result["ticks"] > 0 and result["received_ratio"] > 0.9


class BusyStep(SilenceModel):
    """A model whose step spends 12 ms of its thread's CPU time (whatever the machine's speed)."""

    def step(self, user_pcm, state):
        start = time.thread_time()
        while time.thread_time() - start < 0.012:
            pass
        return super().step(user_pcm, state)


def test_load_test_counts_the_servers_cpu_time_by_thread():
    """The load's CPU time per tick: the model step's thread has at least what the step spends, all threads more."""
    from speechlm.streaming.loadtest import measure_load

    result = asyncio.run(measure_load(BusyStep(), 1, seconds=1.0, warmup=0.3))
    cpu = result["cpu_ms_per_tick"]
    assert set(cpu) >= {"all", "step", "loop"} and cpu["step"] >= 8 and cpu["all"] >= cpu["step"] + cpu["loop"] - 1
    assert result["server_cores_used"] > 0.15


class ReplyAfterQuiet(SilenceModel):
    """Says a tone once the user has been quiet for 3 frames (a stand-in for a model that answers)."""

    def init_state(self, batch_size):
        return torch.zeros(batch_size, dtype=torch.long)  # quiet frames in a row, per row

    def step(self, user_pcm, state):
        quiet = user_pcm.abs().amax(dim=1) < 1e-3
        state = torch.where(quiet, state + 1, torch.zeros_like(state))
        tone = 0.2 * torch.sin(torch.arange(self.frame_length) * 0.3)
        return torch.where((state >= 3)[:, None], tone, torch.zeros(1)), [None] * user_pcm.shape[0], state


def test_load_test_clients_can_loop_a_question_and_time_the_replies():
    from speechlm.streaming.loadtest import measure_load

    rng = np.random.default_rng(0)
    speech = np.concatenate([0.3 * rng.standard_normal(8 * 640), np.zeros(12 * 640)]).astype(np.float32)  # 0.8 s loop
    answers = asyncio.run(measure_load(ReplyAfterQuiet(), 2, seconds=2.0, warmup=0.3, speech=speech))
    assert answers["client_failed"] == 0 and answers["replies"] >= 2 and answers["reply_onset_ms_p50"] is not None
    silent = asyncio.run(measure_load(SilenceModel(), 2, seconds=2.0, warmup=0.3, speech=speech))
    assert silent["replies"] == 0 and silent["no_reply"] >= 2


class Voiced:
    """A model mixin with two voices: records the per-row settings the scheduler hands it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.configured: list[dict] = []

    def voices(self):
        return ["default", "joe"]

    def configure_rows(self, state, options):
        self.configured.append(dict(options))
        return state


class VoicedSilence(Voiced, SilenceModel):
    """Silence, with voices."""


def test_a_session_asks_for_a_voice_in_its_handshake():
    async def main():
        model = VoicedSilence()
        async with server(model) as srv:
            client = await DuplexClient.connect(srv.url, voice="joe")
            assert client.server_config["voice"] == "joe" and client.server_config["voices"] == ["default", "joe"]
            await client.send_audio(np.zeros(FRAME, np.float32))  # joins the batch: its row gets the voice
            await wait_until(lambda: model.configured)
            plain = await DuplexClient.connect(srv.url)
            assert plain.server_config["voice"] == "default"
            with pytest.raises(ClientError, match="no voice 'anna'; it speaks: default, joe"):
                await DuplexClient.connect(srv.url, voice="anna")
            with pytest.raises(ClientError, match="'voice' must be"):
                await DuplexClient.connect(srv.url, voice=7)
            await client.close()
            await plain.close()
        async with server(SilenceModel()) as srv:  # a model without voices: only "default"
            assert (await DuplexClient.connect(srv.url, voice="default")).server_config["voices"] == ["default"]
            with pytest.raises(ClientError, match="no voice 'joe'"):
                await DuplexClient.connect(srv.url, voice="joe")
        return model.configured

    configured = run(main(), timeout=20)
    assert len(configured) == 1 and list(configured[0].values()) == [{"voice": "joe"}]


def test_a_live_session_changes_its_voice_with_a_config_control():
    async def main():
        model = VoicedSilence()
        async with server(model) as srv:
            client = await DuplexClient.connect(srv.url, metadata_interval=0)
            await client.set_voice("joe")  # before joining: its row gets the voice when it joins
            messages = client.messages()

            async def next_of(kind):
                async for message in messages:
                    if isinstance(message, kind):
                        return message

            ack = await next_of(Metadata)
            await client.send_audio(np.zeros(FRAME, np.float32))
            await wait_until(lambda: len(model.configured) == 1)
            await client.set_voice("default")  # live: handed to its row at the next tick
            await wait_until(lambda: len(model.configured) == 2)
            await client.set_voice("anna")  # one the server lacks: bad_message, the session lives on
            bad = await next_of(Error)
            await client.send_control("stop")
            await wait_until(lambda: srv.scheduler.live_sessions == 0)
            await client.send_control("start")  # a fresh row keeps the voice the session chose last
            await wait_until(lambda: len(model.configured) == 3)
            live = srv.scheduler.live_sessions
            await client.close()
            return ack, bad, live, model.configured

    ack, bad, live, configured = run(main(), timeout=20)
    assert ack.data == {"type": "config", "voice": "joe"}
    assert bad.code == "bad_message" and "no voice 'anna'; it speaks: default, joe" in bad.message and live == 1
    assert [list(c.values()) for c in configured] == [[{"voice": "joe"}], [{"voice": "default"}], [{"voice": "default"}]]


class Saying:
    """A model mixin that says texts: a say handed to a row sounds at 0.25 the next frame, with its "started" event, and
    the frame after is silent again with its "done"."""

    def __init__(self, *args):
        super().__init__(*args)
        self.said: list[tuple[int, str]] = []
        self._due: dict[int, list] = {}

    def can_say(self):
        return True

    def say_rows(self, state, says):
        for row, items in says.items():
            self.said.extend((row, text) for text, _ in items)
            self._due.setdefault(row, []).extend(("started", say_id) for _, say_id in items)
        return state

    def hush_rows(self, state, rows):
        self.hushed = [*getattr(self, "hushed", []), *rows]
        return state

    def step(self, user_pcm, state):
        pcm, texts, state = super().step(user_pcm, state)
        pcm, texts = pcm.clone(), list(texts)  # (an inference tensor from the codec's step)
        for row in list(self._due):
            events = self._due.pop(row)
            pcm[row] = 0.25 if events[0][0] == "started" else 0.0
            texts[row] = {"model": " hi" if events[0][0] == "started" else "", "events": [{"id": i, "event": e} for e, i in events]}
            if events[0][0] == "started":
                self._due[row] = [("done", i) for _, i in events]
        return pcm, texts, state


class Sayer(Saying, Voiced, SilenceModel):
    """Silence, with voices, that says texts."""


def test_a_client_asks_the_model_to_say_texts_and_hears_what_became_of_them():
    async def main():
        model = Sayer()
        async with server(model) as srv:
            client = await DuplexClient.connect(srv.url, metadata_interval=0, send_text=False, check_rounds=2)
            assert client.server_config["say"] is True and client.server_config["replies"] == "model"
            assert client.server_config["check_rounds"] == 2
            await client.say("Hello! How can I help?", say_id="greet")  # before its first AUDIO: said once it joins
            await client.send_control("say", text="  ")  # malformed ones: bad_message, the session lives on
            await client.send_control("say", text="x" * (protocol.MAX_SAY_CHARS + 1))
            await client.send_control("say", text="hi", voice="joe")
            await client.send_control("config", replies="everyone")
            await client.send_control("config", replies="client")  # from now on the client writes the replies
            await client.send_audio(np.zeros(4 * FRAME, np.float32))
            says, errors, config, audio = [], [], [], []
            async for message in client.messages():
                if isinstance(message, Metadata) and message.data["type"] == "say":
                    says.append((message.data["id"], message.data["event"]))
                elif isinstance(message, Metadata) and message.data["type"] == "config":
                    config.append(message.data)
                elif isinstance(message, Error):
                    errors.append(message.message)
                elif isinstance(message, Audio):
                    audio.append(client.pcm(message))
                if len(says) == 3 and len(audio) >= 4:
                    break
            await client.close()
            # a server whose model cannot say: a say is a bad_message, and a session cannot ask to write the replies
            async with server(SilenceModel()) as plain:
                other = await DuplexClient.connect(plain.url, metadata_interval=0)
                assert other.server_config["say"] is False
                await other.say("hello")
                cannot = await anext(errors_of(other))
                await other.close()
                with pytest.raises(ClientError, match="cannot say texts or take replies from the client"):
                    await DuplexClient.connect(plain.url, replies="client")
            with pytest.raises(ClientError, match="'replies' must be one of model, client"):
                async with server(model) as srv2:
                    await DuplexClient.connect(srv2.url, replies="robot")
            return model, says, errors, config, audio, cannot

    model, says, errors, config, audio, cannot = run(main(), timeout=30)
    assert model.said == [(0, "Hello! How can I help?")]  # trimmed of nothing, handed to the session's row at its join
    assert says == [("greet", "queued"), ("greet", "started"), ("greet", "done")]
    assert any(np.allclose(a, 0.25, atol=1e-4) for a in audio)  # the say's frame (PCM16 on the wire)
    assert len(errors) == 4 and "say needs a non-empty string 'text'" in errors[0] and "longer than 2000 characters" in errors[1]
    assert "unknown say field 'voice'" in errors[2] and "'replies' must be one of model, client" in errors[3]
    assert config == [{"type": "config", "replies": "client"}] and {"check_rounds": 2, "replies": "client"} in [o for c in model.configured for o in c.values()]
    assert isinstance(cannot, Error) and cannot.code == "bad_message" and "cannot say texts" in cannot.message


async def errors_of(client):
    async for message in client.messages():
        if isinstance(message, Error):
            yield message


class Mute(Saying, SilenceModel):
    """Takes says and never gets to them (a user who never stops talking)."""

    def say_rows(self, state, says):
        self.said.extend((row, text) for row, items in says.items() for text, _ in items)
        return state


def test_a_session_cannot_pile_up_says_the_model_has_not_said():
    async def main():
        model = Mute()
        async with server(model) as srv:
            client = await DuplexClient.connect(srv.url, metadata_interval=0)
            await client.send_audio(np.zeros(FRAME, np.float32))
            for i in range(protocol.MAX_OPEN_SAYS + 2):
                await client.say(f"number {i}", say_id=i)
            errors, queued = [], 0
            async for message in client.messages():
                if isinstance(message, Error):
                    errors.append(message.message)
                elif isinstance(message, Metadata) and message.data.get("type") == "say":
                    queued += 1
                if len(errors) + queued == protocol.MAX_OPEN_SAYS + 2:
                    break
            await client.send_control("stop")  # the model forgets the session's says, each one "dropped": it may ask again
            await wait_until(lambda: srv.scheduler.live_sessions == 0)
            await client.say("while stopped", say_id="held")  # not handed to the model (no row): dropped by the next stop
            await client.send_control("stop")
            await client.send_control("start")
            await client.say("again")
            events = []
            async for message in client.messages():
                if isinstance(message, (Error, Metadata)):
                    events.append(message.data if isinstance(message, Metadata) else message.message)
                if events[-1:] == [{"type": "say", "id": None, "event": "queued"}]:
                    break
            await client.close()
            return errors, queued, events

    errors, queued, events = run(main(), timeout=20)
    assert queued == protocol.MAX_OPEN_SAYS and len(errors) == 2 and "64 says are not yet said" in errors[0]
    assert events == [*({"type": "say", "id": i, "event": "dropped"} for i in range(protocol.MAX_OPEN_SAYS)),
                      {"type": "say", "id": "held", "event": "queued"}, {"type": "say", "id": "held", "event": "dropped"},
                      {"type": "say", "id": None, "event": "queued"}], events


def test_interrupt_with_reply_stops_the_models_reply():
    async def main():
        model = Sayer()
        async with server(model) as srv:
            client = await DuplexClient.connect(srv.url, metadata_interval=0, autostart=False)
            await client.say("Not yet said.", say_id=1)  # waits for the session's first start
            await client.interrupt(reply=True)  # the model never got it: dropped here
            await client.send_control("interrupt", reply="yes")
            await client.send_control("start")
            await wait_until(lambda: srv.scheduler.live_sessions == 1)
            await client.interrupt(reply=True)
            await wait_until(lambda: getattr(model, "hushed", None))
            got = []
            async for message in client.messages():
                if isinstance(message, (Metadata, Error)):
                    got.append(message.data if isinstance(message, Metadata) else message.message)
                if len(got) == 5:
                    break
            await client.close()
            async with server(SilenceModel()) as plain:  # a model that cannot: the queue is flushed, the reply goes on
                other = await DuplexClient.connect(plain.url, metadata_interval=0)
                await other.interrupt(reply=True)
                plain_ack = await anext(m.data async for m in other.messages() if isinstance(m, Metadata))
                await other.close()
            return got, model.hushed, model.said, plain_ack

    got, hushed, said, plain_ack = run(main(), timeout=20)
    assert got[:3] == [{"type": "say", "id": 1, "event": "queued"}, {"type": "say", "id": 1, "event": "dropped"},
                       {"type": "interrupted", "flushed_frames": 0, "reply": True}]
    assert got[3] == "interrupt's 'reply' must be true or false" and got[4]["type"] == "interrupted" and got[4]["reply"] is True
    assert hushed == [0] and said == [] and plain_ack == {"type": "interrupted", "flushed_frames": 0, "reply": False}


def random_control(rng: np.random.Generator) -> bytes:
    """A well-formed CONTROL with an action (some unknown) and fields of random names, types and sizes."""
    values = [None, True, 7, -1, 2.5, "", "x" * int(rng.integers(0, 2500)), "Hello there.", ["a"], {"deep": [1, {"x": 2}]},
              "model", "client", "joe", 3]
    action = str(rng.choice(["say", "say", "say", "interrupt", "config", "start", "stop", "ping", "bogus"]))
    names = ["text", "id", "reply", "replies", "check_rounds", "voice", "send_text", "metadata_interval", "volume"]
    fields = {str(rng.choice(names)): values[int(rng.integers(0, len(values)))] for _ in range(int(rng.integers(0, 4)))}
    if action == "say" and rng.random() < 0.7:  # mostly a text (of any type or size) and an id
        fields = {"text": values[int(rng.integers(0, len(values)))], "id": int(rng.integers(0, 1000))}
    return b"\x03" + json.dumps({**fields, "action": action}).encode()


def test_random_controls_to_a_model_that_says_texts_leave_every_session_alive_and_bounded():
    rng = np.random.default_rng(7)

    async def fuzz(url: str) -> tuple[int, int]:
        ws = await handshaken(url)
        await ws.send(protocol.encode(Audio(bytes(2 * FRAME))))  # in the batch: its says reach the model
        for _ in range(150):
            await ws.send(random_control(rng))
        # then a stop (whatever the controls left), a start and a say, which the model must get
        for action, fields in (("stop", {}), ("start", {}), ("say", {"text": "Last.", "id": "last"}), ("ping", {"id": "after"})):
            await ws.send(protocol.encode(Control(action, fields)))
        errors = other = 0
        ponged = last_said = False
        async for data in ws:
            message = protocol.decode(data, max_bytes=2**20)
            if isinstance(message, Error):
                assert message.code == protocol.ErrorCode.BAD_MESSAGE, message
                errors += 1
            elif isinstance(message, Control) and message.action == "pong" and message.fields.get("id") == "after":
                ponged = True
            else:
                other += 1
                last_said |= isinstance(message, Metadata) and message.data.get("id") == "last" and message.data.get("event") == "started"
            if ponged and last_said:
                break
        await ws.close()
        return errors, other

    async def main():
        model = Sayer()
        async with server(model, max_sessions=8) as srv:
            outcomes = await asyncio.gather(*(fuzz(srv.url) for _ in range(3)))
            bounded = all(s.says_open <= protocol.MAX_OPEN_SAYS and len(s.says) <= protocol.MAX_OPEN_SAYS for s in srv.scheduler.sessions.values())
            await wait_until(lambda: not srv.connections)
            return outcomes, bounded, srv.stats(), len(model.said)

    outcomes, bounded, stats, said = run(main(), timeout=40)
    assert all(errors > 20 and other > 20 for errors, other in outcomes), outcomes  # refused and taken, both
    assert bounded and said > 0 and stats["errors"] == 0 and stats["live_sessions"] == 0
