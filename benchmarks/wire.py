"""Audio on the wire: PCM16 against Opus through the real server, what each costs in bytes and in delay.

``speechlm serve --model loopback`` (the user's audio back as it came, one frame later: no model time) runs as a
child process; clients stream at real-time pace, one session at a time, the codecs alternating. Each session sends
0.2 s tone bursts (440 Hz at 0.3) one second apart over silence, and times every burst: from sending the frame
it starts in to the earliest moment its first sample could be played at the client (the arrival of the AUDIO
message holding it, plus its place in that message's samples). The server's path alone (PCM16) is the input
buffer's wait for the next tick, the loopback's one frame and the write; Opus adds its coders' delay both ways.
``opus`` codes with libopus (streaming/opus.py: one page per 40 ms packet, sent at once), ``opus-sphn`` with ``sphn``'s
stream writer (60 ms packets, pages when full) on both sides: a second server child runs with
SPEECHLM_OPUS_BACKEND=sphn. Bytes are the AUDIO messages' payloads each way, per second of audio.

    python benchmarks/wire.py --sessions 20 --seconds 6 --out docs/results/wire.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np
from agent import serve_child

from speechlm.streaming.client import DuplexClient
from speechlm.streaming.protocol import OPUS_BACKEND_ENV, Audio

FRAME = 640
RATE = 16_000
BURST_FRAMES = 5  # 0.2 s
PERIOD_FRAMES = 25  # a burst a second
WINDOW = 4 * RATE  # STOI of the speech back, 4 s at a time
PHASES = np.random.default_rng(0)  # each session's start against the server's clock


def bursts(seconds: float) -> np.ndarray:
    """(frames, FRAME) float32: silence with a 440 Hz burst at the start of every PERIOD_FRAMES frames (the first after 1 s)."""
    frames = int(seconds * RATE / FRAME)
    t = np.arange(BURST_FRAMES * FRAME) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(BURST_FRAMES, FRAME)
    out = np.zeros((frames, FRAME), np.float32)
    for start in range(PERIOD_FRAMES, frames - BURST_FRAMES, PERIOD_FRAMES):
        out[start : start + BURST_FRAMES] = tone
    return out


async def session(url: str, codec: str, frames: np.ndarray, threshold: float = 0.05, stall: tuple[float, float] | None = None,
                  catch_up: bool | None = None) -> tuple[dict, np.ndarray]:
    """Stream ``frames`` (n, FRAME) at real-time pace -> (the figures, the audio that came back). ``stall``: (at, for)
    seconds: the sending stops once, as on a network stall, and the frames it held back go at once when it ends.
    ``catch_up``: the HANDSHAKE's (None: the server's default)."""
    starts = [i for i in range(len(frames)) if frames[i].any() and not frames[i - 1].any()]
    sent_at: dict[int, float] = {}
    delays: list[float] = []
    counts = {"up": 0, "down": 0}
    received: list[np.ndarray] = []
    wire, _, backend = codec.partition("-")  # "opus-sphn": Opus through sphn on both sides
    os.environ[OPUS_BACKEND_ENV] = backend
    async with await DuplexClient.connect(url, codec=wire, metadata_interval=0, send_text=False, catch_up=catch_up) as client:
        original_send = client.ws.send

        async def counted_send(data):
            if data[:1] == b"\x01":  # AUDIO
                counts["up"] += len(data) - 1
            await original_send(data)

        client.ws.send = counted_send
        # a random phase against the server's 40 ms clock: a frame sent just before a tick waits less than one sent
        # just after it, and sessions started one after another would otherwise keep one phase per codec
        await asyncio.sleep(float(PHASES.uniform(0, FRAME / RATE)))
        begin = time.perf_counter()

        async def send() -> None:
            for i, frame in enumerate(frames):
                if stall is not None and i == round(stall[0] * RATE / FRAME):
                    await asyncio.sleep(stall[1])
                delay = begin + i * FRAME / RATE - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if i in starts:
                    sent_at[i] = time.perf_counter()
                await client.send_audio(frame)
            await client.send_audio(np.zeros(FRAME * 10, np.float32))  # flush the coders
            await asyncio.sleep(0.5)
            await client.close()

        async def receive() -> None:
            quiet = 10 * RATE  # quiet samples since the last loud one: a burst starts after 0.4 s of them
            async for message in client.messages():
                if not isinstance(message, Audio):
                    continue
                arrived = time.perf_counter()
                counts["down"] += len(message.payload)
                pcm = client.pcm(message)
                received.append(pcm)
                above = np.flatnonzero(np.abs(pcm) > threshold)
                if not len(above):
                    quiet += len(pcm)
                    continue
                burst = len(delays)
                if quiet + above[0] >= 0.4 * RATE and burst < len(starts) and starts[burst] in sent_at:
                    delays.append(arrived + above[0] / RATE - sent_at[starts[burst]])
                quiet = len(pcm) - 1 - above[-1]

        await asyncio.gather(send(), receive())
    audio_seconds = (len(frames) + 10) * FRAME / RATE  # with the flush
    figures = {"codec": codec, "bursts": len(starts), "timed": len(delays), "delay_ms": [round(1000 * d, 1) for d in delays],
               "up_kbps": round(8 * counts["up"] / audio_seconds / 1000, 2), "down_kbps": round(8 * counts["down"] / audio_seconds / 1000, 2)}
    return figures, np.concatenate(received) if received else np.zeros(0, np.float32)


def speech_figures(url: str, codec: str, audio: np.ndarray) -> dict:
    """Real speech through the loopback: the bytes each way, and STOI of what came back (coded twice with Opus)."""
    frames = np.pad(audio, (0, -len(audio) % FRAME)).reshape(-1, FRAME)
    figures, back = asyncio.run(session(url, codec, frames))
    out = {"codec": codec, "seconds": round(len(audio) / RATE, 1), "up_kbps": figures["up_kbps"], "down_kbps": figures["down_kbps"]}
    try:
        from pystoi import stoi

        from speechlm.codec.metrics import align
    except ImportError:
        return out  # (STOI needs the [eval] extra)
    # STOI window by window, each aligned on its own: a frame that arrives after its tick is heard as silence and
    # every later sample comes back a frame later (the server keeps late audio), which one global lag would count
    # against the codec
    scores, lags = [], []
    for start in range(0, len(audio) - WINDOW // 2, WINDOW):
        piece = audio[start : start + WINDOW]
        ref, deg, lag = align(piece, back[start : start + len(piece) + 6 * FRAME], max_lag=6 * FRAME)
        scores.append(float(stoi(ref, deg, RATE, extended=False)) * len(piece))
        lags.append(lag)
    out["stoi"] = round(sum(scores) / len(audio), 4)
    out["stoi_windows"] = [round(score / min(WINDOW, len(audio) - i * WINDOW), 3) for i, score in enumerate(scores)]
    out["lag_ms_windows"] = [round(1000 * lag / RATE, 1) for lag in lags]
    out["lag_ms"] = round(1000 * float(np.median(lags)) / RATE, 1)  # one frame is the loopback's; the rest, the coders'
    out["lag_ms_max"] = round(1000 * max(lags) / RATE, 1)  # above the median: frames late at the server
    return out


def coder_cpu(audio: np.ndarray, codecs: list[str]) -> dict:
    """CPU ms per 40 ms frame of each Opus coder, in this process (no server): encoding (the server's side of the
    downlink) and decoding (of the uplink), per session."""
    from speechlm.streaming import protocol

    frames = np.pad(audio, (0, -len(audio) % FRAME)).reshape(-1, FRAME)
    out = {}
    for codec in codecs:
        wire, _, backend = codec.partition("-")
        if wire != "opus":
            continue
        os.environ[OPUS_BACKEND_ENV] = backend
        sender, receiver = protocol.OpusWire(), protocol.OpusWire()
        start = time.process_time()
        payloads = [sender.encode(frame) for frame in frames]
        middle = time.process_time()
        for payload in payloads:
            if payload:
                receiver.decode(payload)
        end = time.process_time()
        out[codec] = {"encode_ms": round(1000 * (middle - start) / len(frames), 3), "decode_ms": round(1000 * (end - middle) / len(frames), 3)}
    return out


def summarize(rows: list[dict]) -> dict:
    out = {}
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == codec]
        delays = np.array([d for r in mine for d in r["delay_ms"]])
        out[codec] = {
            "sessions": len(mine), "bursts": sum(r["bursts"] for r in mine), "timed": len(delays),
            "delay_ms_p50": round(float(np.median(delays)), 1) if len(delays) else None,
            "delay_ms_p90": round(float(np.percentile(delays, 90)), 1) if len(delays) else None,
            "up_kbps": round(float(np.mean([r["up_kbps"] for r in mine])), 2),
            "down_kbps": round(float(np.mean([r["down_kbps"] for r in mine])), 2),
        }
    return out


def stall_runs(url: str, sessions: int, seconds: float, stall: tuple[float, float]) -> dict:
    """PCM16 sessions with one stall each, the server's catch-up on and off alternating: each burst's delay by its
    place (bursts a second apart from 1 s on; the stall between two of them)."""
    out = {}
    for catch_up in (True, False) * sessions:
        row, _ = asyncio.run(session(url, "pcm16", bursts(seconds), stall=stall, catch_up=catch_up))
        out.setdefault(str(catch_up), []).append(row["delay_ms"])
        print(json.dumps({"catch_up": catch_up, "delay_ms": row["delay_ms"]}), flush=True)
    summary = {}
    for key, runs in out.items():
        width = min(len(r) for r in runs)
        summary[key] = {"delay_ms_by_burst_mean": [round(float(np.mean([r[k] for r in runs])), 1) for k in range(width)]}
    return {"stall": {"at_s": stall[0], "for_s": stall[1]}, "bursts_at_s": list(range(1, 1 + width)), "summary": summary, "runs": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4, help="sessions per codec, alternating (default 4)")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per session (default 10)")
    ap.add_argument("--codecs", default="pcm16,opus,opus-sphn", help="pcm16, opus (libopus), opus-sphn (default all three)")
    ap.add_argument("--speech", nargs="*", default=[], help="speech files: streamed once per codec for its bytes and STOI")
    ap.add_argument("--stall", metavar="AT,FOR", help="instead: PCM16 sessions whose sending stalls once (seconds), "
                    "the server's catch-up on and off alternating (--sessions pairs, --seconds each)")
    ap.add_argument("--out", help="write the results here (JSON)")
    args = ap.parse_args()
    if args.stall:
        at, length = (float(x) for x in args.stall.split(","))
        server, url = serve_child(["--model", "loopback"], timeout=120)
        try:
            result = {"command": " ".join(sys.argv), **stall_runs(url + "/ws", args.sessions, args.seconds, (at, length))}
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(json.dumps(result["summary"], indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    codecs = args.codecs.split(",")
    servers = {}  # Opus backend ("" = the default) -> (child process, /ws URL)
    for backend in dict.fromkeys(codec.partition("-")[2] for codec in codecs):
        os.environ[OPUS_BACKEND_ENV] = backend
        server, url = serve_child(["--model", "loopback"], timeout=120)
        servers[backend] = (server, url + "/ws")

    def url_for(codec: str) -> str:
        return servers[codec.partition("-")[2]][1]

    rows = []
    try:
        for i in range(args.sessions):
            for codec in codecs:
                row, _ = asyncio.run(session(url_for(codec), codec, bursts(args.seconds)))
                print(json.dumps({"round": i, **{k: v for k, v in row.items() if k != "delay_ms"},
                                  "delay_ms_p50": float(np.median(row["delay_ms"])) if row["delay_ms"] else None}), flush=True)
                rows.append(row)
        speech, cpu = [], {}
        if args.speech:
            from speechlm.codec.audio import load_audio

            audio = np.concatenate([load_audio(path) for path in args.speech])
            for codec in codecs:
                speech.append(speech_figures(url_for(codec), codec, audio))
                print(json.dumps(speech[-1]), flush=True)
            cpu = coder_cpu(audio, codecs)
            print(json.dumps({"coder_cpu_ms_per_frame": cpu}), flush=True)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)
    result = {"command": " ".join(sys.argv), "sessions": args.sessions, "seconds": args.seconds, "summary": summarize(rows), "speech": speech,
              "coder_cpu_ms_per_frame": cpu,
              "rows": rows}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
