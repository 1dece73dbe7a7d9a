"""Load test: how many sessions one server holds in real time.

The server runs in this process; N clients run in a child process (one event loop, one
task per session), each sending one 40 ms frame per frame period at absolute deadlines
and counting what comes back. A load is *held* when over the measured window the frame
clock had no late and no skipped tick (every output frame was ready before the next
frame was due) and the clients got back (almost) every frame.

    python -m speechlm.streaming.loadtest --sessions 8,16,32,64 --seconds 5
    python -m speechlm.streaming.loadtest --model echo --codec path/to/codec --threads 1

Functions for ``benchmarks/``: :func:`measure_load` (one load) and :func:`step_times`
(the model step alone, per batch size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import threading
import time
from typing import Any

import numpy as np

from . import protocol
from .models import DuplexModel
from .server import DuplexServer, ServerConfig


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# The server process's threads by what they do (Python thread names): the model step runs in the event loop's
# default executor ("asyncio_N"), the answer assist's speech LM on its own thread.
THREAD_ROLES = (("asyncio", "step"), ("speechlm-assist", "assist"), ("MainThread", "loop"))


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) this process's threads have used, summed by role (``THREAD_ROLES``; "other"
    for the rest) and in all ("all", exited threads included); {} where /proc has no per-thread figures."""
    everything = _cpu_seconds("/proc/self/stat")
    if everything is None:
        return {}
    totals = {"all": everything}
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        seconds = _cpu_seconds(f"/proc/self/task/{tid}/stat")
        if seconds is None:
            continue  # the thread ended meanwhile
        name = names.get(int(tid), "")
        role = next((r for prefix, r in THREAD_ROLES if name.startswith(prefix)), "other")
        totals[role] = totals.get(role, 0.0) + seconds
    return totals


def _cpu_seconds(stat_path: str) -> float | None:
    """User + system CPU seconds in a /proc ``stat`` file (None: unreadable)."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_tick(before: dict[str, float], after: dict[str, float], ticks: int) -> dict[str, float]:
    """CPU milliseconds per tick by role between two :func:`_thread_cpu` readings."""
    return {role: round(1000 * (after[role] - before.get(role, 0.0)) / max(1, ticks), 2) for role in after}


# -- load generator (child process) -------------------------------------------------------


# what the clients count (summed over clients and processes; LISTS are lists of per-event values)
STAT_KEYS = ("sent", "received", "client_late_sends", "first_audio_ms", "failed", "refused", "reply_onset_ms", "no_reply")
LISTS = ("first_audio_ms", "reply_onset_ms")


async def _one_client(
    url: str, seconds: float, frame_seconds: float, payloads: list[bytes], stats: dict, offset: int = 0, question_end: int | None = None,
    handshake: dict | None = None,
) -> None:
    """One session: send ``payloads`` on a loop at real-time pace from ``offset``. With ``question_end``
    (the loop index of the first frame after the spoken question), time each reply: from sending
    that frame to the first audible frame back (``reply_onset_ms``; none before the next question
    starts = ``no_reply``). ``handshake``: more HANDSHAKE fields (e.g. ``catch_up``)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    hello = protocol.encode(protocol.Handshake({"version": protocol.VERSION, "client": "loadtest", "metadata_interval": 0, **(handshake or {})}))
    async with connect(url, compression=None, max_queue=64) as ws:
        try:
            await ws.send(hello)
        except ConnectionClosed:
            pass  # a server that refuses a session says why first, and closes: its ERROR is still to be read
        reply = protocol.decode(await ws.recv())
        if isinstance(reply, protocol.Error) and reply.code == protocol.ErrorCode.SERVER_FULL:
            stats["refused"] += 1  # the server is full or at its real-time capacity (load-based admission)
            return
        received = 0
        first_audio: float | None = None
        asked: float | None = None  # when the last question ended, until its reply is heard
        start = time.perf_counter()

        async def reader() -> None:
            nonlocal received, first_audio, asked
            async for data in ws:
                if data[:1] == b"\x01":
                    received += 1
                    now = time.perf_counter()
                    if first_audio is None:
                        first_audio = now - start
                    if asked is not None and len(data) > 1:
                        pcm = protocol.Audio(data[1:]).pcm16()
                        if float(np.sqrt(np.mean(pcm**2))) > 1e-3:
                            stats["reply_onset_ms"].append(1000 * (now - asked))
                            asked = None

        task = asyncio.create_task(reader())
        frames = round(seconds / frame_seconds)
        late = 0
        for i in range(frames):
            delay = start + i * frame_seconds - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -frame_seconds:
                late += 1
            k = (offset + i) % len(payloads)
            if question_end is not None and k == 0 and asked is not None:
                stats["no_reply"] += 1  # the next question starts: the last one got no reply
                asked = None
            await ws.send(payloads[k])
            if question_end is not None and k == question_end and i > 0:
                asked = time.perf_counter()
        await asyncio.sleep(0.3)  # the last replies
        task.cancel()
        stats["sent"] += frames
        stats["received"] += min(received, frames)  # the server keeps talking after we stop: count what answers us
        stats["client_late_sends"] += late
        if first_audio is not None:
            stats["first_audio_ms"].append(1000 * first_audio)


def _generator(url: str, sessions: int, seconds: float, frame_length: int, sample_rate: int, out, speech: np.ndarray | None = None, seed: int = 0,
               stagger: float = 0.0, first: int = 0, handshake: dict | None = None) -> None:
    """``sessions`` clients for ``seconds``; with ``stagger``, client k (counted from ``first``, this process's first
    client among all processes') connects k * stagger seconds after the first of all (and all end together)."""
    async def main() -> dict:
        question_end = None
        if speech is None:  # a steady tone: the user never stops talking
            t = np.arange(frame_length) / sample_rate
            payloads = [protocol.encode(protocol.Audio.from_pcm((0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)))]
        else:  # a spoken loop (e.g. a question and a pause), each client from its own point in it
            frames = np.pad(speech, (0, (-len(speech)) % frame_length)).reshape(-1, frame_length)
            payloads = [protocol.encode(protocol.Audio.from_pcm(f.astype(np.float32))) for f in frames]
            voiced = np.nonzero(np.sqrt((frames**2).mean(axis=1)) > 0.01)[0]
            question_end = int(voiced[-1]) + 1 if len(voiced) and voiced[-1] + 1 < len(frames) else None
        rng = np.random.default_rng(seed)
        stats: dict[str, Any] = {key: [] if key in LISTS else 0 for key in STAT_KEYS}

        async def guarded(offset: int, k: int) -> None:
            await asyncio.sleep(k * stagger)
            try:
                await _one_client(url, seconds - k * stagger, frame_length / sample_rate, payloads, stats, offset, question_end, handshake)
            except Exception:
                stats["failed"] += 1

        await asyncio.gather(*(guarded(int(rng.integers(len(payloads))), first + k) for k in range(sessions)))
        return stats

    out.put(asyncio.run(main()))


def _merge(parts: list[dict]) -> dict:
    merged: dict[str, Any] = {key: [] if key in LISTS else 0 for key in STAT_KEYS}
    for part in parts:
        for key, value in part.items():
            merged[key] = merged[key] + value
    return merged


# -- measurements -------------------------------------------------------------------------


async def measure_load(
    model: DuplexModel, sessions: int, seconds: float = 5.0, warmup: float = 1.0, clients_per_process: int = 64,
    speech: np.ndarray | None = None, stagger: float = 0.0, admit_load: float | None = None, handshake: dict | None = None,
) -> dict[str, Any]:
    """Hold ``sessions`` clients for ``warmup + seconds``; the numbers cover the last ``seconds``.

    The clients run in ``ceil(sessions / clients_per_process)`` child processes, so that at large
    loads the load generator is not what falls behind. They send a steady tone, or ``speech``
    (16 kHz float32) on a loop, each client from a random point in it. ``admit_load``: the server's load-based
    admission (``ServerConfig.admit_load``; default off: a load test overloads on purpose); with ``stagger`` the
    clients connect one every ``stagger`` seconds, so that each is admitted or refused on the load of those
    before it (``admitted``, ``refused``), and the window starts ``warmup`` after the last. ``handshake``: more
    HANDSHAKE fields for every client (e.g. ``{"catch_up": False}``)."""
    config = ServerConfig(port=0, max_sessions=sessions, idle_timeout=60, admit_load=admit_load)
    async with DuplexServer(model, config) as server:
        rss_before = _rss_mb()
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        counts = [len(c) for c in np.array_split(np.arange(sessions), -(-sessions // clients_per_process))]
        ramp = stagger * (sessions - 1)
        processes = [
            context.Process(
                target=_generator,
                args=(server.url, n, ramp + warmup + seconds, model.frame_length, model.sample_rate, queue, speech, k, stagger, sum(counts[:k]),
                      handshake),
                daemon=True,
            )
            for k, n in enumerate(counts)
        ]
        for process in processes:
            process.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60 + ramp
        while server.scheduler.live_sessions < sessions and loop.time() < deadline and any(p.is_alive() for p in processes):
            if stagger and server.counters["rejected_busy"] + server.counters["rejected_full"] + server.scheduler.live_sessions >= sessions:
                break  # every client has been admitted or refused
            await asyncio.sleep(0.05)
        await asyncio.sleep(warmup)
        stats = server.scheduler.stats
        before = (stats.ticks, stats.late_ticks, stats.skipped_ticks)
        stats.step_seconds.clear()
        turns_before = getattr(model, "turns", 0)
        cpu_before, wall_before = _thread_cpu(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu_after, wall = _thread_cpu(), time.perf_counter() - wall_before
        turns = getattr(model, "turns", 0) - turns_before
        ticks, late, skipped = (stats.ticks - before[0], stats.late_ticks - before[1], stats.skipped_ticks - before[2])
        steps_ms = np.asarray(stats.step_seconds) * 1000
        sessions_now = [c.session for c in server.connections if c.session is not None]
        underruns = sum(s.underruns for s in sessions_now)
        input_skipped = sum(s.input_skipped for s in sessions_now)
        dropped = sum(s.output.dropped for s in sessions_now)
        rss_after = _rss_mb()
        refusals = {key: n for key, n in server.counters.items() if key.startswith("rejected")}
        clients = _merge([await asyncio.to_thread(queue.get, True, 120) for _ in processes])
        for process in processes:
            await asyncio.to_thread(process.join, 10)
    frame_ms = 1000 * model.frame_length / model.sample_rate
    received_ratio = clients["received"] / max(1, clients["sent"])
    return {
        "sessions": sessions,
        "ticks": ticks,
        "late_ticks": late,
        "skipped_ticks": skipped,
        "step_ms_p50": round(float(np.percentile(steps_ms, 50)), 2) if len(steps_ms) else None,
        "step_ms_p99": round(float(np.percentile(steps_ms, 99)), 2) if len(steps_ms) else None,
        "step_budget_used_p50": round(float(np.percentile(steps_ms, 50)) / frame_ms, 3) if len(steps_ms) else None,
        "server_underruns": underruns,
        "server_input_skipped": input_skipped,  # quiet frames skipped to drain backlogs (the sessions' catch-up)
        "server_dropped": dropped,
        "client_late_sends": clients["client_late_sends"],
        "client_failed": clients["failed"],
        **({"admitted": sessions - clients["refused"], "refused": clients["refused"], "refusals": refusals}
           if admit_load is not None or clients["refused"] else {}),
        "received_ratio": round(received_ratio, 4),
        "first_audio_ms_p50": round(float(np.median(clients["first_audio_ms"])), 1) if clients["first_audio_ms"] else None,
        "rss_mb_per_session": round((rss_after - rss_before) / sessions, 3),
        # the server process's CPU time per tick, by thread (the clients run in other processes), and the cores it kept busy
        **({"cpu_ms_per_tick": _cpu_per_tick(cpu_before, cpu_after, ticks),
            "server_cores_used": round((cpu_after["all"] - cpu_before["all"]) / wall, 3)} if cpu_after else {}),
        **({"assisted_turns": turns} if hasattr(model, "turns") else {}),
        **(_onsets(clients) if speech is not None else {}),
        "client_processes": len(processes),
        "held": late == 0 and skipped == 0 and clients["failed"] == 0 and received_ratio > 0.97,
    }


def _onsets(clients: dict) -> dict[str, Any]:
    """Reply onsets the clients timed (end of their question -> first audible frame back)."""
    onsets = np.asarray(clients["reply_onset_ms"])
    return {
        "replies": len(onsets),
        "no_reply": clients["no_reply"],
        "reply_onset_ms_p50": round(float(np.percentile(onsets, 50)), 1) if len(onsets) else None,
        "reply_onset_ms_p90": round(float(np.percentile(onsets, 90)), 1) if len(onsets) else None,
    }


def step_times(model: DuplexModel, batch_sizes: list[int], steps: int = 30) -> list[dict[str, float]]:
    """Median and p90 of one batched ``model.step`` per batch size (silence-free random input)."""
    import torch

    rows = []
    for batch in batch_sizes:
        state = model.init_state(batch)
        x = 0.1 * torch.randn(batch, model.frame_length)
        for _ in range(3):
            _, _, state = model.step(x, state)
        times = []
        cuda = torch.cuda.is_available() and str(getattr(model, "device", "cpu")).startswith("cuda")
        for _ in range(steps):
            start = time.perf_counter()
            _, _, state = model.step(x, state)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        rows.append(
            {
                "batch": batch,
                "step_ms_p50": round(1000 * median, 3),
                "step_ms_p90": round(1000 * float(np.percentile(times, 90)), 3),
                "ms_per_session": round(1000 * median / batch, 4),
            }
        )
    return rows


def build_model(
    name: str, codec: str, device: str = "cpu", lm: str | None = None, compile_codec: bool = False, dtype: str = "float32",
    graphs: bool = False, assist: str | None = None, assist_voice: str = "speech_lm",
    assist_options: dict | None = None, gate_detector: str | None = "vad-en",
) -> DuplexModel:
    """``echo`` with ``codec`` = a codec name/dir, or ``random`` (the default config, random weights);
    ``duplex`` with ``lm`` = a duplex LM directory (or ``random:PRESET``, see
    :func:`speechlm.streaming.duplex_model.build_duplex_model`) and ``codec`` its codec name/dir.
    ``compile_codec``: the codec's steps compiled with AOTInductor (``speechlm.codec.compiled``).
    ``dtype``: the duplex LM's and the assist's speech LM's (float32 or bfloat16); ``graphs``: its backbone from CUDA graphs.
    ``assist``: a speech LM that answers through the duplex model (``speechlm serve --assist``);
    ``assist_options``: more :class:`AssistConfig` fields (e.g. ``asr_views``). ``gate_detector``: the duplex
    model's noise gate's speech detector (``speechlm serve --gate-detector``; None = the level alone)."""
    from .models import with_compiled_codec

    model = _build_model(name, codec, device, lm, dtype, graphs, gate_detector)
    model = with_compiled_codec(model) if compile_codec else model
    if name == "duplex" and assist:
        import torch

        from .assist import AssistConfig, build_assisted_model

        model = build_assisted_model(model, assist, dtype=getattr(torch, dtype), config=AssistConfig(**{
            "voice": assist_voice, "background": True, **(assist_options or {})}))
    return model


def _build_model(
    name: str, codec: str, device: str, lm: str | None, dtype: str = "float32", graphs: bool = False, gate_detector: str | None = None
) -> DuplexModel:
    import torch

    from .models import EchoCodecModel, SilenceModel

    if name == "silence":
        return SilenceModel()
    if name == "duplex":
        from .duplex_model import build_duplex_model

        return build_duplex_model(lm, codec, device=device, dtype=getattr(torch, dtype), graphs=graphs, speech_detector=gate_detector)
    from ..codec.config import CodecConfig
    from ..codec.model import Codec

    if codec == "random":
        torch.manual_seed(0)
        model = Codec(CodecConfig()).eval()
        model.quantizer.init_random_codebooks_()
        return EchoCodecModel(model.to(device))
    return EchoCodecModel(Codec.from_pretrained(codec, device=device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speechlm.streaming.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="4,16,64", help="comma-separated loads (default 4,16,64)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--model", choices=("echo", "silence", "duplex"), default="echo")
    parser.add_argument("--codec", default="random", help="codec name or directory, or 'random' (default; echo only)")
    parser.add_argument("--lm", help="--model duplex: the duplex LM directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps-only", action="store_true", help="time the batched step alone, no sockets")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.codec, lm=args.lm)
    loads = [int(n) for n in args.sessions.split(",")]
    if args.steps_only:
        for row in step_times(model, loads):
            print(json.dumps(row), flush=True)
        return 0
    for sessions in loads:
        print(json.dumps(asyncio.run(measure_load(model, sessions, args.seconds))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
