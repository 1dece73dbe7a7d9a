"""The browser page end to end in headless Chromium with a fake microphone fed from a WAV file.

Chromium (Debian package ``chromium``) is driven over the DevTools protocol with our own
websockets client: the page autoconnects, captures the fake mic in its AudioWorklet, streams
16 kHz PCM16 frames to the server (codec loopback model) and plays what comes back. The server holds one
session, taken by a Python client when the page loads: the page is refused (server_full), says so, and gets in
by itself once the place is free. The test
reads ``window.speechlm`` (the page's live numbers) and takes a screenshot.
Skipped when Chromium is not installed.
"""

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from websockets.asyncio.client import connect

from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.model import Codec
from speechlm.streaming import protocol
from speechlm.streaming.client import DuplexClient
from speechlm.streaming.models import EchoCodecModel, LoopbackModel
from speechlm.streaming.opus import ogg_crc
from speechlm.streaming.server import DuplexServer, ServerConfig

from .test_streaming_server import Saying, Voiced

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TINY = {**TINY_ARCHITECTURE, "groups": 2, "num_quantizers": 2, "codebook_size": 32}

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         "--autoplay-policy=no-user-gesture-required", "--window-size=1100,800", "--remote-debugging-port=0"]


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(reply["error"])
                return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def _devtools_port(process: subprocess.Popen, timeout: float = 30) -> int:
    end = time.time() + timeout
    while time.time() < end:
        line = process.stderr.readline()
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            return int(m.group(1))
    raise RuntimeError("chromium did not start its DevTools server")


class Hearing:
    """A model mixin that says when a row's user starts talking (METADATA user events): a loud frame after quiet ones."""

    def __init__(self, *args):
        super().__init__(*args)
        self._loud: dict[int, bool] = {}

    def step(self, user_pcm, state):
        pcm, texts, state = super().step(user_pcm, state)
        texts = list(texts)
        for row, frame in enumerate(user_pcm):
            loud = float(frame.abs().max()) > 0.05
            if loud and not self._loud.get(row):
                piece = texts[row] if isinstance(texts[row], dict) else {"model": texts[row] or ""}
                texts[row] = {**piece, "events": [*piece.get("events", []), {"user": "started"}]}
            self._loud[row] = loud
        return pcm, texts, state


class VoicedEcho(Hearing, Saying, Voiced, EchoCodecModel):
    """The codec loopback with two voices, that says texts and hears the user start talking."""


@contextlib.asynccontextmanager
async def chromium_page(url: str, microphone: Path):
    """Headless Chromium on ``url`` with a fake microphone playing ``microphone`` -> a DevTools client of the page."""
    process = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--use-file-for-fake-audio-capture={microphone}", f"--user-data-dir={tempfile.mkdtemp()}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = await asyncio.to_thread(_devtools_port, process)
        targets = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read()))
        page = next(t for t in targets if t["type"] == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            yield DevTools(ws)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def frames_both_ways(tools: DevTools, frames: int, tries: int) -> dict:
    """The page's live numbers (``window.speechlm``) once it has sent and received ``frames`` frames (or after ``tries`` looks)."""
    stats = {}
    for _ in range(tries):
        await asyncio.sleep(0.25)
        stats = json.loads(await tools.evaluate("JSON.stringify(window.speechlm || {})") or "{}")
        if stats.get("framesReceived", 0) >= frames and stats.get("framesSent", 0) >= frames:
            break
    return stats


def _sine_wav(path: Path, seconds: float = 6.0, hz: float = 220.0) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000, subtype="PCM_16")
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_streams_fake_microphone_and_plays_the_reply(tmp_path):
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY)).eval()
    codec.quantizer.init_random_codebooks_()
    wav = _sine_wav(tmp_path / "mic.wav")
    screenshot = Path(os.environ.get("SPEECHLM_SCREENSHOT", tmp_path / "page.png"))

    async def scenario():
        model = VoicedEcho(codec)
        async with DuplexServer(model, ServerConfig(port=0, max_sessions=1)) as server:
            holder = await DuplexClient.connect(f"ws://127.0.0.1:{server.port}/ws")  # the only place: the page is refused first
            async with chromium_page(f"http://127.0.0.1:{server.port}/?autoconnect=1", wav) as tools:
                refused = 0
                for _ in range(60):  # the page is told the server is full, and keeps trying
                    await asyncio.sleep(0.25)
                    refused = await tools.evaluate("window.speechlm ? window.speechlm.busyRefusals : 0") or 0
                    if refused >= 1:
                        break
                busy_status = await tools.evaluate("document.getElementById('status').textContent")
                await holder.close()  # the place is free: the page's next try gets it
                stats = await frames_both_ways(tools, 25, tries=60)  # up to ~15 s
                live = server.stats()
                # the voice list from the handshake; choosing another sends CONTROL config, acknowledged
                voices = await tools.evaluate("Array.from(document.getElementById('voice').options, (o) => o.value).join(',')")
                await tools.evaluate("(() => { const s = document.getElementById('voice'); s.value = 'joe'; s.dispatchEvent(new Event('change')); })()")
                for _ in range(40):
                    await asyncio.sleep(0.25)
                    if await tools.evaluate("window.speechlm.voice") == "joe" and model.configured:
                        break
                chosen = await tools.evaluate("window.speechlm.voice")
                # the say box: CONTROL say, and the say's events back
                await tools.evaluate("(() => { document.getElementById('say-text').value = 'Hello there.'; document.getElementById('say').click(); })()")
                for _ in range(40):
                    await asyncio.sleep(0.25)
                    if len(await tools.evaluate("window.speechlm.says") or []) >= 3:
                        break
                says = await tools.evaluate("window.speechlm.says")
                talking = await tools.evaluate("[window.speechlm.userTalking, document.getElementById('user-state').textContent]")
                shot = await tools.call("Page.captureScreenshot", format="png")
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                return stats, live, voices, chosen, model.configured, refused, busy_status, says, model.said, talking

    stats, live, voices, chosen, configured, refused, busy_status, says, said, talking = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert talking == [True, "· talking"]  # METADATA user "started": the page shows the user is heard
    assert refused >= 1 and busy_status.startswith("server busy"), (refused, busy_status)  # refused, and said so
    assert stats.get("connected") and stats.get("session"), stats
    assert stats["framesSent"] >= 25, stats  # one second of fake-mic audio went up
    assert stats["framesReceived"] >= 25, stats  # and came back through the codec
    assert not stats.get("errors"), stats["errors"]
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    assert voices == "default,joe" and chosen == "joe" and [list(c.values()) for c in configured] == [[{"voice": "joe"}]]
    assert stats["canSay"] and [text for _, text in said] == ["Hello there."]
    assert [(s["id"], s["event"]) for s in says] == [(1, "queued"), (1, "started"), (1, "done")], says


class HearingLoopback(LoopbackModel):
    """The loopback (the user's frame back a frame later, as it came) that keeps what it heard."""

    def __init__(self):
        super().__init__()
        self.heard: list[np.ndarray] = []

    def step(self, user_pcm, state):
        self.heard.append(user_pcm[0].numpy().copy())
        return super().step(user_pcm, state)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_speaks_opus_both_ways(tmp_path):
    """?codec=opus: the page's WebCodecs Opus in its own Ogg pages up (the server hears the microphone's 220 Hz
    tone), the server's Ogg/Opus stream decoded down (the page hears the echo at the level it was sent), at a
    tenth of PCM16's bytes."""
    wav = _sine_wav(tmp_path / "mic.wav")

    async def scenario():
        model = HearingLoopback()
        async with DuplexServer(model, ServerConfig(port=0)) as server:
            async with chromium_page(f"http://127.0.0.1:{server.port}/?autoconnect=1&codec=opus", wav) as tools:
                stats = await frames_both_ways(tools, 75, tries=80)  # up to ~20 s
                heard = np.concatenate(model.heard[-25:])  # the last second the model heard, and sent back
                wire = await tools.evaluate("document.getElementById('wire').textContent")
                # the page's Ogg framing read back by its reader, the stream cut into 7-byte pieces: packets of 0, 255
                # (two lacing values) and 600 bytes come out whole, and bytes that are not Ogg are an error
                framing = await tools.evaluate("""(() => {
                  const packets = [new Uint8Array(0), new Uint8Array(255).fill(7), Uint8Array.from({length: 600}, (_, i) => i % 251)];
                  const stream = concatBytes(packets.map((p, i) => oggPage([p], {serial: 5, sequence: i, granule: 960 * i})));
                  const reader = new OggReader();
                  const out = [];
                  for (let at = 0; at < stream.length; at += 7) out.push(...reader.push(stream.slice(at, at + 7)));
                  let refused = false;
                  try { new OggReader().push(asciiBytes("RIFF0000WAVEfmt 0000000000000000000000")); } catch (e) { refused = true; }
                  return {lengths: out.map((p) => p.length), same: out.every((p, i) => p.every((x, j) => x === packets[i][j])), refused,
                          page: Array.from(oggPage([packets[2]], {serial: 5, sequence: 2, granule: 1920}))};
                })()""")
                return stats, heard, wire, framing

    stats, heard, wire, framing = asyncio.run(asyncio.wait_for(scenario(), 90))
    server_packet_ms = protocol.OpusWire().packet_ms
    page = bytes(framing.pop("page"))
    assert framing == {"lengths": [0, 255, 600], "same": True, "refused": True}, framing
    assert page[:4] == b"OggS" and page[26] == 3 and list(page[27:30]) == [255, 255, 90]  # 600 = 255 + 255 + 90
    assert int.from_bytes(page[22:26], "little") == ogg_crc(page[:22] + bytes(4) + page[26:])  # RFC 3533's checksum
    assert not stats.get("errors"), stats["errors"]
    assert stats["codec"] == "opus" and wire.startswith("opus:"), (stats, wire)
    assert stats["opusPacketMs"] == server_packet_ms, stats  # the readout knows the server's packets
    assert stats["framesSent"] >= 75 and stats["framesReceived"] >= 75, stats
    assert stats["bytesSent"] < 250 * stats["framesSent"], stats  # PCM16 is 1280 bytes a frame
    assert stats["bytesReceived"] < 250 * stats["framesReceived"], stats
    spectrum = np.abs(np.fft.rfft(heard * np.hanning(len(heard))))
    assert abs(np.argmax(spectrum) * 16000 / len(heard) - 220) < 5  # the server decoded the page's Opus
    sent_db = 10 * np.log10(np.mean(heard**2))
    assert sent_db > -45, sent_db  # (the page asks for noise suppression: a steady tone comes through lower)
    assert abs(stats["receivedLevelDb"] - sent_db) < 3, (stats["receivedLevelDb"], sent_db)  # and the page decoded the server's
