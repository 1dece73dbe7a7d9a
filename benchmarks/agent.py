"""Replies written by the client (a voice agent's own LLM) beside the server's own, through the real server.

``speechlm serve`` (the shipped duplex model with its answer assist) runs as a child process; for each held-out
spoken question (test-split arithmetic and facts, held-out espeak voices) this process opens two sessions one after
the other, in alternating order: one where the server's speech LM writes the reply (``replies: model``, the default)
and one where the client does (``replies: client``): on the user's transcript the client at once says a reply
(CONTROL ``say``; here an instant agent that says back what it heard, so that what is timed is the server's part).
Each question is sent in real time after a short lead of silence, then silence while the reply comes.

Timed on the client's clock, from the moment the frame after the question's last voiced frame was sent:

* ``heard_ms``: the user's transcript (TEXT ``user``) arrives: when a client's LLM can start;
* ``user_stopped_ms``: METADATA ``user`` ``stopped`` arrives (the server's end of the user's talking, before the
  transcript); ``user_started_ms``: ``started``, from the question's first voiced frame being sent;
* ``onset_ms``: the first audible frame of the reply arrives;
* ``say_to_audio_ms`` (client replies): from sending the say to its first audible frame: what the server adds to the
  agent's own time.

    python benchmarks/agent.py --count 20 --out docs/results/agent_replies.json
    python benchmarks/agent.py --count 20 --client-check-rounds 3 --out docs/results/agent_replies_client_checked.json
    python benchmarks/agent.py --count 10 --second-after 0.5 --out docs/results/agent_replies_parts.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from speechlm.streaming.client import DuplexClient
from speechlm.streaming.protocol import Audio, Metadata, Text
from speechlm.training import textgen
from speechlm.training.teachers import get_teacher
from speechlm.training.textnorm import words_for_scoring

FRAME = 640
RATE = 16_000


def start_server(args) -> tuple[subprocess.Popen, str]:
    """``speechlm serve`` on a free port; its websocket URL once it listens."""
    # sessions come one at a time, the next as the last closes: the load-based admission is off (it would judge the next
    # on the load of the one still closing)
    return serve_child(["--threads", str(args.threads), "--dtype", args.dtype, *args.serve_args])


def serve_child(options: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``speechlm serve --port 0 --admit-load off OPTIONS`` as a child process -> (it, its base URL ws://HOST:PORT)."""
    command = [sys.executable, "-m", "speechlm", "serve", "--port", "0", "--admit-load", "off", *options]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            raise SystemExit("the server exited before it listened")
        found = re.search(r" at (ws://\S+)/ws", line)
        if found:
            return server, found.group(1)
    raise SystemExit("the server never said where it listens")


def voiced_frames(audio: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    return np.sqrt((frames**2).mean(axis=1)) > threshold


async def session(url: str, audio: np.ndarray, question_end: int, replies: str, check_rounds: int | None = None,
                  second_after: float | None = None, question_begin: int | None = None) -> dict:  # fmt: skip
    """One session: ``audio`` (whole frames) in real time; the times after frame ``question_end`` was sent.
    ``check_rounds``: the client's sessions ask for this transcript check (HANDSHAKE ``check_rounds``).
    ``second_after``: the client's agent says a second sentence this many seconds after its first (an LLM's reply
    streamed in parts): the gap between the first's last frame and the second's first (their ``done`` and
    ``started`` events) is timed."""
    options = {"replies": "client", "check_rounds": check_rounds} if replies == "client" else {}
    times: dict[str, float | None] = {"end": None, "heard": None, "say": None, "started": None, "audio": None, "done1": None, "started2": None,
                                      "begin": None, "user_started": None, "user_stopped": None}
    later: list[asyncio.Task] = []
    row: dict = {"replies": replies, "transcript": "", "model_text": ""}
    async with await DuplexClient.connect(url, metadata_interval=0, **options) as client:
        frames = audio.reshape(-1, FRAME)

        async def send() -> None:
            start = time.perf_counter()
            for i, frame in enumerate(frames):
                delay = start + i * FRAME / RATE - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await client.send_audio(frame)
                if i == question_begin:
                    times["begin"] = time.perf_counter()
                if i == question_end:
                    times["end"] = time.perf_counter()

        async def receive() -> None:
            async for message in client.messages():
                now = time.perf_counter()
                if isinstance(message, Audio):
                    pcm = client.pcm(message)
                    if times["end"] is not None and times["audio"] is None and float(np.sqrt(np.mean(pcm**2))) > 1e-3:
                        times["audio"] = now
                elif isinstance(message, Text) and message.speaker == "user":
                    row["transcript"] += message.text
                    if times["heard"] is None and times["end"] is not None:
                        times["heard"] = now
                        if replies == "client":  # an instant agent: it says back what it heard
                            times["say"] = time.perf_counter()
                            await client.say(f"You said: {message.text.strip()}", say_id=1)
                            if second_after is not None:
                                later.append(asyncio.create_task(say_later(second_after)))
                elif isinstance(message, Text):
                    row["model_text"] += message.text
                elif isinstance(message, Metadata) and message.data.get("type") == "user":
                    key = "user_" + str(message.data.get("event"))
                    if key == "user_started" and times["begin"] is not None and times[key] is None:
                        times[key] = now
                    elif key == "user_stopped" and times["end"] is not None and times[key] is None:
                        times[key] = now
                elif isinstance(message, Metadata) and message.data.get("type") == "say":
                    event, say_id = message.data.get("event"), message.data.get("id")
                    if event == "started" and say_id == 1:
                        times["started"] = times["started"] or now
                    elif event == "done" and say_id == 1:
                        times["done1"] = now
                    elif event == "started" and say_id == 2:
                        times["started2"] = now
                    if event in ("interrupted", "dropped"):
                        row.setdefault("say_ends", []).append(event)

        async def say_later(seconds: float) -> None:
            await asyncio.sleep(seconds)
            await client.say("That is all I know.", say_id=2)

        receiver = asyncio.create_task(receive())
        await send()
        await asyncio.sleep(0.3)
        receiver.cancel()
        for task in later:
            task.cancel()
        await asyncio.gather(receiver, *later, return_exceptions=True)
    end = times["end"]

    def ms(key: str, since: float | None = end) -> float | None:
        return None if times[key] is None or since is None else round(1000 * (times[key] - since), 1)

    row.update(heard_ms=ms("heard"), onset_ms=ms("audio"), user_stopped_ms=ms("user_stopped"), user_started_ms=ms("user_started", times["begin"]))
    if replies == "client":
        row.update(say_to_audio_ms=ms("audio", times["say"]), say_to_started_ms=ms("started", times["say"]))
        if second_after is not None:
            row.update(part_gap_ms=ms("started2", times["done1"]))
    return row


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r.get(key) is not None]
    pct = (lambda q: round(float(np.percentile(values, q)), 1)) if values else (lambda q: None)
    return {"n": len(values), "p50": pct(50), "p90": pct(90)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--lead-seconds", type=float, default=0.5)
    ap.add_argument("--listen-seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype")
    ap.add_argument("--client-check-rounds", type=int, help="the client's sessions ask for this many rounds of the transcript check")
    ap.add_argument("--second-after", type=float, help="the client's agent says a second sentence this many seconds after its first")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more `speechlm serve` options (last on the line)")
    ap.add_argument("--out")
    args = ap.parse_args()
    per = -(-args.count // 2)
    items = [q for s in ("arithmetic", "facts") for q in textgen.generate(s, per, split="test", seed=1)][: args.count]
    random.Random(0).shuffle(items)
    voices = textgen.voice_catalog("test", ("espeak",))
    rng = random.Random(3)
    server, url = start_server(args)
    rows = []
    try:
        for i, item in enumerate(items):
            speech = get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio
            audio = np.concatenate([np.zeros(int(args.lead_seconds * RATE), np.float32), speech, np.zeros(int(args.listen_seconds * RATE), np.float32)])
            audio = np.pad(audio, (0, -len(audio) % FRAME))
            voiced = np.nonzero(voiced_frames(audio))[0]
            question_begin, question_end = int(voiced[0]), int(voiced[-1]) + 1
            for replies in ("model", "client") if i % 2 == 0 else ("client", "model"):
                row = asyncio.run(session(url, audio, question_end, replies, args.client_check_rounds, args.second_after, question_begin))
                row.update(question=item["text"], exact=words_for_scoring(row["transcript"]) == words_for_scoring(item["text"]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    by = {mode: [r for r in rows if r["replies"] == mode] for mode in ("model", "client")}
    report = {
        "count": args.count, "threads": args.threads, "dtype": args.dtype, "serve_args": args.serve_args, "client_check_rounds": args.client_check_rounds, "second_after": args.second_after,
        "summary": {mode: {"heard_ms": summary(rs, "heard_ms"), "onset_ms": summary(rs, "onset_ms"), "transcripts_exact": sum(r["exact"] for r in rs),
                           "user_started_ms": summary(rs, "user_started_ms"), "user_stopped_ms": summary(rs, "user_stopped_ms"),
                           **({"say_to_audio_ms": summary(rs, "say_to_audio_ms"), "say_to_started_ms": summary(rs, "say_to_started_ms"),
                               "part_gap_ms": summary(rs, "part_gap_ms")} if mode == "client" else {})}
                    for mode, rs in by.items()},
        "rows": rows,
    }  # fmt: skip
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
