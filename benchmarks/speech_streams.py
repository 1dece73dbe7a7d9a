"""Speaking many replies at once, each started at its own time: rows of one running batch
(``SpeechPipeline.speech_streams``, continuous batching) vs one TTS stream per reply in turn (what the
server's answer assist did before).

For each number K of replies in flight: the first K held-out sentences start a few steps apart (so
that they join a running batch), and each time one is said the next sentence starts, until 2K are
said — as K sessions would, each asking again once answered. Both ways side by side in one run
(alternating), each frame decoded by the codec as it is made. Reports, per way: seconds of speech
made per wall second (``x_real_time``: K replies in flight play without a gap only if this is at least
K), wall seconds per second of speech, the first frame's delay after a reply starts (median and p90),
and for the batch the backbone forwards. No judge needed.

    python benchmarks/speech_streams.py --model speechlm-default --sizes 1,2,4,8,16 --out docs/results/speech_streams.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from speechlm.codec.audio import SAMPLE_RATE
from speechlm.speech import Generation, SpeechPipeline, resolve_dtype
from speechlm.speech_streams import SpeechStreams
from speechlm.training import textgen

TTS_SOURCES = ("everyday", "commands", "numbers", "dates_times")  # benchmarks/speech_lm.py's held-out TTS sentences


def held_out_texts(count: int) -> list[str]:
    """The first ``count`` of benchmarks/speech_lm.py's held-out TTS sentences (imported without its judge)."""
    per = -(-count // len(TTS_SOURCES))
    items = [item for s in TTS_SOURCES for item in textgen.generate(s, per, split="test", seed=1)]
    random.Random(0).shuffle(items)
    return [item["text"] for item in items[:count]]

WAYS = ("in_turn", "batched")


def speak(sp: SpeechPipeline, texts: list[str], k: int, way: str, g: Generation, stagger: int = 3) -> dict:
    """Say ``texts`` with ``k`` in flight (the first k ``stagger`` steps apart); timings."""
    streams = sp.speech_streams(g) if way == "batched" else SpeechStreams(sp, g)
    queue = list(texts)
    started: dict[int, float] = {}
    first: dict[int, float] = {}
    samples, steps = 0, 0
    begin = time.perf_counter()

    def start() -> None:
        started[streams.add(queue.pop(0))] = time.perf_counter()

    while streams or queue:
        if queue and len(started) < k and steps % stagger == 0:  # the first k, a few steps apart
            start()
        for key, frames in streams.step().items():
            if frames and key not in first:
                first[key] = time.perf_counter() - started[key]
            samples += sum(len(f) for f in frames)
            if streams.finished(key) and queue and len(started) >= k:  # one said: the next starts
                start()
        steps += 1
    wall = time.perf_counter() - begin
    speech = samples / SAMPLE_RATE
    delays = sorted(first.values())
    out = {"wall_s": wall, "speech_s": speech, "x_real_time": speech / wall, "rtf": wall / speech,
           "first_frame_ms_p50": 1000 * statistics.median(delays), "first_frame_ms_p90": 1000 * float(np.percentile(delays, 90))}  # fmt: skip
    if way == "batched":
        out["backbone_forwards"] = streams.batch.backbone_forwards
    return out


def add_pipeline_arguments(ap: argparse.ArgumentParser) -> None:
    """--model, --dtype, --threads, --device, --out (this benchmark's and hearing_batch.py's)."""
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a CPU with native bfloat16, else float32 (as speechlm serve)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)


def load_pipeline(args: argparse.Namespace, codec: str | None = None) -> tuple[SpeechPipeline, torch.dtype]:
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    sp = SpeechPipeline.from_pretrained(args.model, codec, dtype=dtype)
    sp.lm.to(args.device)
    sp.codec.to(args.device)
    return sp, dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pipeline_arguments(ap)
    ap.add_argument("--codec", default=None)
    ap.add_argument("--sizes", default="1,2,4,8,16", help="replies in flight")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way per size (alternating)")
    args = ap.parse_args()
    sp, dtype = load_pipeline(args, args.codec)
    g = Generation()
    sizes = [int(x) for x in args.sizes.split(",")]
    texts = held_out_texts(2 * max(sizes))
    speak(sp, texts[:2], 1, "batched", g)  # warm-up
    rows = []
    for k in sizes:
        runs = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                runs[way].append(speak(sp, texts[: 2 * k], k, way, g))
        row = {"in_flight": k, "texts": 2 * k}
        for way in WAYS:
            row[way] = {name: statistics.median(r[name] for r in runs[way]) for name in runs[way][0]}
        row["speed_up"] = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs["in_turn"], runs["batched"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": args.model, "device": args.device, "dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "repeats": args.repeats,
              "generation": "Generation() defaults", "sizes": rows}  # fmt: skip
    write_report(result, args.out)


def write_report(result: dict, out: str | None, show: bool = True) -> None:
    """Print ``result`` as JSON (``show``) and write it to ``out`` (if given)."""
    text = json.dumps(result, indent=1)
    if show:
        print(text)
    if out:
        Path(out).write_text(text + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
