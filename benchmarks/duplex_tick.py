"""Duplex model tick time against conversation age: does a tick cost more after 30 s of talk?

Runs the shipped duplex model (codec encode + LM step + codec decode) for ``--frames`` ticks on a
batch of ``--batch`` sessions fed random audio, and prints the median tick time over windows of
the conversation (frames 10-60, 100-150, ...; the LM's window is 750 frames = 30 s).

    python benchmarks/duplex_tick.py --batch 8 --out docs/results/duplex_tick.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speechlm.streaming.duplex_model import DuplexSpeechModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="duplex-default")
    ap.add_argument("--codec", default="codec-16k")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = DuplexSpeechModel.from_pretrained(args.lm, args.codec)
    state = model.init_state(args.batch)
    x = 0.1 * torch.randn(args.batch, model.frame_length, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(args.frames):
        start = time.perf_counter()
        _, _, state = model.step(x, state)
        times.append(time.perf_counter() - start)
    windows = [(a, a + 50) for a in (10, 100, 350, 700, 750) if a + 50 <= args.frames]
    rows = [{"frames": f"{a}-{b}", "tick_ms_p50": round(1000 * statistics.median(times[a:b]), 2)} for a, b in windows]
    for row in rows:
        print(row, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"lm": args.lm, "batch": args.batch, "threads": args.threads, "ticks": rows}, indent=2))


if __name__ == "__main__":
    main()
