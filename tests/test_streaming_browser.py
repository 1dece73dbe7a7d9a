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
from speechlm.streaming.client import DuplexClient
from speechlm.streaming.models import EchoCodecModel
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


class VoicedEcho(Saying, Voiced, EchoCodecModel):
    """The codec loopback with two voices, that says texts."""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_streams_fake_microphone_and_plays_the_reply(tmp_path):
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY)).eval()
    codec.quantizer.init_random_codebooks_()
    t = np.arange(16000 * 6) / 16000
    wav = tmp_path / "mic.wav"
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="PCM_16")
    screenshot = Path(os.environ.get("SPEECHLM_SCREENSHOT", tmp_path / "page.png"))

    async def scenario():
        model = VoicedEcho(codec)
        async with DuplexServer(model, ServerConfig(port=0, max_sessions=1)) as server:
            holder = await DuplexClient.connect(f"ws://127.0.0.1:{server.port}/ws")  # the only place: the page is refused first
            page_url = f"http://127.0.0.1:{server.port}/?autoconnect=1"
            process = subprocess.Popen(
                [CHROMIUM, *FLAGS, f"--use-file-for-fake-audio-capture={wav}", f"--user-data-dir={tempfile.mkdtemp()}", page_url],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            try:
                port = await asyncio.to_thread(_devtools_port, process)
                targets = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10).read()))
                page = next(t for t in targets if t["type"] == "page")
                async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                    tools = DevTools(ws)
                    refused = 0
                    for _ in range(60):  # the page is told the server is full, and keeps trying
                        await asyncio.sleep(0.25)
                        refused = await tools.evaluate("window.speechlm ? window.speechlm.busyRefusals : 0") or 0
                        if refused >= 1:
                            break
                    busy_status = await tools.evaluate("document.getElementById('status').textContent")
                    await holder.close()  # the place is free: the page's next try gets it
                    stats = {}
                    for _ in range(60):  # up to ~15 s
                        await asyncio.sleep(0.25)
                        stats = json.loads(await tools.evaluate("JSON.stringify(window.speechlm || {})") or "{}")
                        if stats.get("framesReceived", 0) >= 25 and stats.get("framesSent", 0) >= 25:
                            break
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
                    shot = await tools.call("Page.captureScreenshot", format="png")
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                    return stats, live, voices, chosen, model.configured, refused, busy_status, says, model.said
            finally:
                process.terminate()
                process.wait(timeout=10)

    stats, live, voices, chosen, configured, refused, busy_status, says, said = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert refused >= 1 and busy_status.startswith("server busy"), (refused, busy_status)  # refused, and said so
    assert stats.get("connected") and stats.get("session"), stats
    assert stats["framesSent"] >= 25, stats  # one second of fake-mic audio went up
    assert stats["framesReceived"] >= 25, stats  # and came back through the codec
    assert not stats.get("errors"), stats["errors"]
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    assert voices == "default,joe" and chosen == "joe" and [list(c.values()) for c in configured] == [[{"voice": "joe"}]]
    assert stats["canSay"] and [text for _, text in said] == ["Hello there."]
    assert [(s["id"], s["event"]) for s in says] == [(1, "queued"), (1, "started"), (1, "done")], says
