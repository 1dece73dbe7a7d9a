"""Server capacity: the most sessions held in real time at once, step times per batch, memory per session.

Runs the real server (websockets, scheduler, batched model step) in this process and N
clients in a child process on loopback; a load is *held* when no frame-clock tick was late or
skipped and the clients got back (almost) every frame.  Models: the duplex speech LM
(``--model duplex --lm duplex-default``), or the codec loopback (``echo``: encode + decode every
session's frame, batched), which bounds what the server machinery itself costs.

    python benchmarks/server.py --codec codec-16k --sessions 8,16,32,48 --out docs/results/server.json
    python benchmarks/server.py --model duplex --lm duplex-default --sessions 1,2,4,8 --out docs/results/server_duplex.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import torch

from speechlm.streaming.loadtest import build_model, measure_load, step_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="echo", choices=["echo", "silence", "duplex"])
    ap.add_argument("--codec", default="codec-16k")
    ap.add_argument("--lm", default="duplex-default", help="--model duplex: the duplex LM (directory or shipped name)")
    ap.add_argument("--sessions", default="8,16,32,48")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile-codec", action="store_true", help="the codec's steps compiled with AOTInductor (speechlm.codec.compiled)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.codec, lm=args.lm, compile_codec=args.compile_codec)
    steps = step_times(model, [1, 8, 32, 64, 128])
    for row in steps:
        print("step", row, flush=True)
    loads = []
    for n in [int(x) for x in args.sessions.split(",")]:
        result = asyncio.run(measure_load(model, n, seconds=args.seconds))
        print("load", result, flush=True)
        loads.append(result)
    held = [r["sessions"] for r in loads if r["held"]]
    report = {"model": args.model, "lm": args.lm if args.model == "duplex" else None, "codec": args.codec, "compile_codec": args.compile_codec, "threads": args.threads, "step_times": steps, "loads": loads,
              "most_sessions_held": max(held) if held else 0}
    print(json.dumps({"most_sessions_held": report["most_sessions_held"]}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
