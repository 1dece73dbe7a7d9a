"""Clients beyond the file path: the microphone client and the example (with a fake sound card),
the browser page's AudioWorklet resamplers (under node), and ``serve_main`` as the CLI runs it."""

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from speechlm.codec.audio import save_audio
from speechlm.codec.config import TINY_ARCHITECTURE, CodecConfig
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.model import Codec
from speechlm.streaming.client import ClientError, DuplexClient, import_sounddevice, stream_microphone
from speechlm.streaming.models import EchoCodecModel, SilenceModel
from speechlm.streaming.server import DuplexServer, ServerConfig, add_serve_arguments, serve_main

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "streaming" / "web"
TINY = {**TINY_ARCHITECTURE, "num_quantizers": 2, "codebook_size": 32}


@pytest.fixture(scope="module")
def echo() -> EchoCodecModel:
    torch.manual_seed(0)
    codec = Codec(CodecConfig(**TINY)).eval()
    codec.quantizer.init_random_codebooks_()
    return EchoCodecModel(codec)


class FakeStream:
    """A sound card stream: calls ``callback`` every block in real time from its own thread."""

    def __init__(self, *, samplerate, blocksize, channels, dtype, callback, is_input, played):
        self.rate, self.block, self.channels, self.callback = samplerate, blocksize, channels, callback
        self.is_input, self.played = is_input, played
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)

    def _run(self):
        period, n, start = self.block / self.rate, 0, time.perf_counter()
        while not self._stop.is_set() and n < 500:
            if self.is_input:
                t = (n * self.block + np.arange(self.block)) / self.rate
                self.callback((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)[:, None], self.block, None, None)
            else:
                out = np.zeros((self.block, self.channels), np.float32)
                self.callback(out, self.block, None, None)
                self.played.append(out[:, 0].copy())
            n += 1
            time.sleep(max(0.0, start + n * period - time.perf_counter()))


@pytest.fixture
def fake_sounddevice(monkeypatch):
    module = types.ModuleType("sounddevice")
    module.played = []
    module.InputStream = partial(FakeStream, is_input=True, played=module.played)
    module.OutputStream = partial(FakeStream, is_input=False, played=module.played)
    monkeypatch.setitem(sys.modules, "sounddevice", module)
    return module


def test_microphone_client_talks_and_plays(echo, fake_sounddevice):
    async def main():
        async with DuplexServer(echo, ServerConfig(port=0)) as server:
            return await stream_microphone(server.url, seconds=1.0)

    result = asyncio.run(asyncio.wait_for(main(), 15))
    assert 18 * 640 <= len(result.audio) <= 27 * 640  # about a second of replies
    played = np.concatenate(fake_sounddevice.played)
    assert np.abs(played).max() > 1e-3  # the echo reached the speakers


def test_example_voice_client_runs(echo, fake_sounddevice):
    spec = importlib.util.spec_from_file_location("voice_client", ROOT / "examples" / "voice_client.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    async def main():
        async with DuplexServer(echo, ServerConfig(port=0)) as server:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(example.chat(server.url), 1.0)  # a chat runs until closed

    asyncio.run(asyncio.wait_for(main(), 15))
    assert np.abs(np.concatenate(fake_sounddevice.played)).max() > 1e-3


def test_mic_without_sounddevice_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails
    with pytest.raises(ClientError, match="needs the sounddevice package"):
        import_sounddevice()


WORKLET_HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const posted = [];
class AudioWorkletProcessor { constructor() { this.port = { postMessage: (m) => posted.push(m), onmessage: null }; } }
const registry = {};
const context = { AudioWorkletProcessor, registerProcessor: (n, c) => (registry[n] = c), sampleRate: 48000, currentTime: 0, Math, Float32Array, Int16Array };
vm.createContext(context);
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), context);
// capture: 1 s of a 440 Hz tone at 48 kHz in 128-sample render quanta
const capture = new registry["capture-processor"]({ processorOptions: { frameLength: 640 } });
const block = new Float32Array(128);
for (let q = 0; q < 48000 / 128; q++) {
  for (let i = 0; i < 128; i++) block[i] = 0.5 * Math.sin((2 * Math.PI * 440 * (q * 128 + i)) / 48000);
  capture.process([[block]]);
}
const frames = posted.filter((m) => m instanceof ArrayBuffer).map((b) => Array.from(new Int16Array(b)));
const pcm = [].concat(...frames.slice(1, 24));
let crossings = 0, peak = 0;
for (let i = 1; i < pcm.length; i++) { if (pcm[i - 1] < 0 && pcm[i] >= 0) crossings++; peak = Math.max(peak, Math.abs(pcm[i])); }
// playback: 0.5 s of a 16 kHz 300 Hz tone in 640-sample chunks, rendered at 48 kHz
const playback = new registry["playback-processor"]({ processorOptions: { prebufferMs: 80, maxBufferMs: 1000 } });
for (let c = 0; c < 12; c++) {
  const chunk = new Float32Array(640);
  for (let i = 0; i < 640; i++) chunk[i] = 0.25 * Math.sin((2 * Math.PI * 300 * (c * 640 + i)) / 16000);
  playback.port.onmessage({ data: { type: "audio", pcm: chunk } });
}
const out = [];
for (let q = 0; q < 48000 / 128; q++) { const o = new Float32Array(128); playback.process([], [[o]]); out.push(...o); }
let playedPeak = 0, playedCrossings = 0, nonzero = 0;
for (let i = 1; i < out.length; i++) { if (out[i - 1] < 0 && out[i] >= 0) playedCrossings++; playedPeak = Math.max(playedPeak, Math.abs(out[i])); if (out[i] !== 0) nonzero++; }
// a stall: 12 s of talk (0.2, 12 frames) and room noise (13 frames) in real time, frames 100-109 held back and
// delivered with frame 110; with the catch-up on and off
function stalled(catchUp) {
  const p = new registry["playback-processor"]({ processorOptions: { prebufferMs: 80, maxBufferMs: 2000, catchUp } });
  const skippedLevels = [];
  if (p.catchUp) {
    const skip = p.catchUp.skip.bind(p.catchUp);
    p.catchUp.skip = (level, backlog) => { const s = skip(level, backlog); if (s) skippedLevels.push(level); return s; };
  }
  let seed = 1;
  const rand = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5;
  const deliver = (pcm) => p.port.onmessage({ data: { type: "audio", pcm } });
  const held = [], backlogMs = [];
  for (let k = 0; k < 300; k++) {
    const chunk = new Float32Array(640);
    for (let i = 0; i < 640; i++) chunk[i] = 0.004 * rand() + (k % 25 < 12 ? 0.2 * Math.sin((2 * Math.PI * 180 * (k * 640 + i)) / 16000) : 0);
    if (k >= 100 && k < 110) held.push(chunk);
    else { held.splice(0).forEach(deliver); deliver(chunk); }
    for (let q = 0; q < 15; q++) p.process([], [[new Float32Array(128)]]); // 40 ms at 48 kHz
    backlogMs.push((1000 * p.size) / 16000);
  }
  return { before: backlogMs[99], after: backlogMs[111], end: backlogMs[299], skipped: skippedLevels.length,
           loudestSkipped: Math.max(0, ...skippedLevels), underruns: p.underruns };
}
console.log(JSON.stringify({ frames: frames.length, frameLength: frames[0].length, crossingsPerSecond: crossings / (pcm.length / 16000), peak,
  playedPeak, playedCrossings, playedSeconds: nonzero / 48000, underruns: playback.underruns,
  stall: stalled(true), stallOff: stalled(false) }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_scripts_parse_and_worklets_resample(tmp_path):
    for script in ("app.js", "audio-worklet.js"):
        subprocess.run(["node", "--check", str(WEB / script)], check=True, timeout=30)
    harness = tmp_path / "harness.js"
    harness.write_text(WORKLET_HARNESS)
    out = subprocess.run(["node", str(harness), str(WEB / "audio-worklet.js")], capture_output=True, text=True, timeout=30, check=True)
    r = json.loads(out.stdout)
    assert r["frameLength"] == 640 and 24 <= r["frames"] <= 25  # 48 kHz -> 16 kHz, 40 ms frames
    assert abs(r["crossingsPerSecond"] - 440) < 5 and 0.45 * 32767 < r["peak"] < 0.52 * 32767
    assert 0.45 < r["playedSeconds"] < 0.5 and r["underruns"] == 1  # 0.48 s played, then it ran dry once
    assert 140 <= r["playedCrossings"] <= 146 and 0.23 < r["playedPeak"] <= 0.25  # 300 Hz at 48 kHz
    # a 0.4 s stall's backlog: drained in the room noise between the talk down to the prebuffer (the
    # server's rule, streaming/catchup.py), no loud frame dropped; without the catch-up it stays
    stall, off = r["stall"], r["stallOff"]
    assert stall["before"] <= 80 and stall["after"] >= 400 and stall["end"] <= 80 + 40, stall
    assert stall["skipped"] == round((stall["after"] - stall["end"]) / 40) and stall["loudestSkipped"] < 0.01, stall
    assert off["end"] >= 400 and off["skipped"] == 0 and stall["underruns"] == off["underruns"], off


@pytest.mark.parametrize("catch_up", [True, False])
def test_playback_buffer_drains_a_stalls_backlog_in_the_quiet(catch_up):
    """The Python client's playback (``--mic``): the model's audio held back 0.4 s by a stall, then delivered at once,
    is drained in its quiet frames down to the prebuffer (the server's rule), no loud frame dropped; off, it stays."""
    from speechlm.streaming.client import PlaybackBuffer

    rng = np.random.default_rng(0)
    t = np.arange(640) / 16_000
    buffer = PlaybackBuffer(prebuffer=1280, max_samples=32_000, catch_up=catch_up)
    held, backlog_ms, played = [], [], []
    for k in range(300):
        chunk = (0.004 * rng.standard_normal(640) + (0.2 * np.sin(2 * np.pi * 180 * (t + k * 0.04)) if k % 25 < 12 else 0)).astype(np.float32)
        if 100 <= k < 110:
            held.append(chunk)
        else:
            for c in [*held, chunk]:
                buffer.push(c)
            held.clear()
        played.append(buffer.pull(640))
        backlog_ms.append(1000 * len(buffer) / 16_000)
    loud_played = sum(float(np.sqrt(np.mean(p**2))) > 0.05 for p in played)
    assert backlog_ms[99] <= 40 and backlog_ms[111] >= 400
    assert loud_played == sum(k % 25 < 12 for k in range(300))  # every loud frame played (those still queued are quiet)
    if catch_up:
        assert backlog_ms[-1] == 80 and buffer.skipped == 8
    else:
        assert backlog_ms[-1] >= 400 and buffer.skipped == 0


def test_serve_main_refuses_an_open_bind_without_token():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(SpeechLMError, match="without --token"):
        serve_main(parser.parse_args(["--host", "0.0.0.0", "--model", "silence"]))


def test_serve_main_serves_until_sigint_and_says_goodbye():
    code = (
        "import argparse, sys\n"
        "from speechlm.streaming.server import add_serve_arguments, serve_main\n"
        "p = argparse.ArgumentParser(); add_serve_arguments(p)\n"
        "sys.exit(serve_main(p.parse_args(sys.argv[1:])))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--model", "silence"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # outside the checkout: import the installed package
    )
    try:
        line = process.stdout.readline()  # "speechlm serve: SilenceModel at ws://127.0.0.1:PORT/ws  page: ..."
        url = next(word for word in line.split() if word.startswith("ws://"))

        async def main():
            client = await DuplexClient.connect(url)
            await client.send_audio(np.zeros(1280, np.float32))
            process.send_signal(signal.SIGINT)
            with pytest.raises(ClientError, match="shutting_down"):
                async for _ in client.messages():
                    pass

        asyncio.run(asyncio.wait_for(main(), 20))
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


class Listener(SilenceModel):
    """A model that hears every session ask "What is two plus three?" once it has sent 10 frames, and says the texts
    it is asked to (recorded; each "started", then "done" the frame after)."""

    def __init__(self):
        super().__init__()
        self.said: list[str] = []
        self._due: dict[int, list] = {}

    def can_say(self):
        return True

    def configure_rows(self, state, options):
        return state

    def hush_rows(self, state, rows):
        return state

    def say_rows(self, state, says):
        for row, items in says.items():
            self.said.extend(text for text, _ in items)
            self._due.setdefault(row, []).extend(("started", i) for _, i in items)
        return state

    def step(self, user_pcm, state):
        pcm, texts, state = super().step(user_pcm, state)
        for row in range(len(texts)):
            events = self._due.pop(row, [])
            if events and events[0][0] == "started":
                self._due[row] = [("done", i) for _, i in events]
            texts[row] = {"model": "", **({"user": "What is two plus three?"} if int(state[row]) == 10 else {}),
                          **({"events": [{"id": i, "event": e} for e, i in events]} if events else {})}  # fmt: skip
        return pcm, texts, state


class TwoQuestions(Listener):
    """Asks at frames 10 and 40; with ``slow``, a say starts only once asked 3 times (it stays open: waiting at the server)."""

    def __init__(self, slow: bool = False):
        super().__init__()
        self.slow, self.hushed = slow, []

    def hush_rows(self, state, rows):
        self.hushed.extend(rows)
        self._due.clear()
        return state

    def say_rows(self, state, says):
        if self.slow:
            self.said.extend(text for items in says.values() for text, _ in items)
            return state  # never said: its end never comes
        return super().say_rows(state, says)

    def step(self, user_pcm, state):
        pcm, texts, state = super().step(user_pcm, state)
        for row in range(len(texts)):
            if int(state[row]) == 40:
                texts[row] = {**texts[row], "user": "And what is four plus four?"}
        return pcm, texts, state


@pytest.mark.parametrize("slow", [False, True])
def test_a_new_question_supersedes_the_reply_to_the_one_before(slow):
    """The reply to the first question is written slowly: its part after the second question is not said; with says
    still waiting at the server when the second question comes, CONTROL interrupt (reply) drops them first."""
    from speechlm.streaming.client import stream_file

    second = threading.Event()

    def first(question):
        yield "Five."
        second.wait(10)
        time.sleep(0.2)  # written after the next question came
        yield "And that is all."

    def reply(question):
        if "four" in question:
            second.set()
            return "Eight."
        return first(question)

    async def main():
        model = TwoQuestions(slow)
        async with DuplexServer(model, ServerConfig(port=0)) as server:
            # (at real-time pace: a flood of audio would hold the says behind it, in the socket)
            result = await stream_file(server.url, np.zeros(16_000 * 2, np.float32), reply=reply, listen_seconds=1)
        return model.said, model.hushed, result.says

    said, hushed, says = asyncio.run(asyncio.wait_for(main(), 30))
    assert said == ["Five.", "Eight."], said
    assert hushed == ([0] if slow else []), hushed  # the first reply's say was still waiting: dropped before "Eight."
    assert [e["id"] for e in says if e["event"] == "queued"] == ["reply-1-1", "reply-2-1"]


def test_example_voice_agent_writes_the_replies(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("voice_agent", ROOT / "examples" / "voice_agent.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = Listener()
    save_audio(tmp_path / "q.wav", np.zeros(16_000, np.float32))
    ready, done = threading.Event(), threading.Event()
    url = {}

    def serve():
        async def main():
            async with DuplexServer(model, ServerConfig(port=0)) as server:
                url["url"] = server.url
                ready.set()
                while not done.is_set():
                    await asyncio.sleep(0.05)

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert ready.wait(10)
        example.main(url["url"], str(tmp_path / "q.wav"), str(tmp_path / "reply.wav"))
    finally:
        done.set()
        thread.join(10)
    assert model.said == ["Hello!", "Two plus three is five."]  # the greeting, then the reply the example wrote
    assert "user:  What is two plus three?" in capsys.readouterr().out and (tmp_path / "reply.wav").exists()


def test_a_reply_written_in_parts_is_said_as_they_come(tmp_path):
    """A reply function that yields texts (an LLM streamed sentence by sentence) has each said as it is written; so does
    a --reply-command line by line as the command prints."""
    from speechlm.streaming.client import command_reply, stream_file

    written: list[float] = []

    def reply(question):
        yield "One."
        written.append(time.monotonic())
        time.sleep(0.3)
        yield "Two."

    async def main():
        model = Listener()
        async with DuplexServer(model, ServerConfig(port=0)) as server:
            result = await stream_file(server.url, np.zeros(16_000, np.float32), reply=reply, realtime=False, listen_seconds=2)
        return model.said, result.says

    said, says = asyncio.run(asyncio.wait_for(main(), 20))
    assert said == ["One.", "Two."] and [e["event"] for e in says].count("queued") == 2
    # the command's lines, as it prints them: the first comes before the command has written the second
    script = tmp_path / "agent.py"
    script.write_text("import sys, time\nq = sys.stdin.read()\nprint('You asked: ' + q.strip(), flush=True)\ntime.sleep(0.5)\nprint('Bye.')\n")
    start, got = time.monotonic(), []
    for line in command_reply(f"{sys.executable} {script}")("what is two plus three"):
        got.append((line.strip(), time.monotonic() - start))
    assert [g for g, _ in got] == ["You asked: what is two plus three", "Bye."] and got[1][1] - got[0][1] > 0.3
    with pytest.raises(ClientError, match="no such program"):
        command_reply("no-such-program-here --x")
    failing = tmp_path / "fails.py"
    failing.write_text("print('Partly.', flush=True)\nraise SystemExit(3)\n")
    assert [line.strip() for line in command_reply(f"{sys.executable} {failing}")("q")] == ["Partly."]
