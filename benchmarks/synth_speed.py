"""Synthesis speed per teacher: hours of speech made per wall-clock minute.

Runs `synthesize_corpus` (the code behind `speechlm data synth`, shards, fresh worker
processes and FLAC writing included) on built-in everyday sentences, per teacher and
worker count, in one run.

    python benchmarks/synth_speed.py --count 200 --out docs/results/synth_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

from speechlm.training.synth import SynthConfig, synthesize_corpus
from speechlm.training.textgen import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="sentences per teacher")
    ap.add_argument("--voices", default="espeak:en-us,espeak:en-gb+f3,piper:joe")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", help="write results as JSON here")
    args = ap.parse_args()
    items = generate("everyday", args.count, seed=123)
    results = []
    for voice in args.voices.split(","):
        for workers in [int(w) for w in args.workers.split(",")]:
            tmp = Path(tempfile.mkdtemp())
            try:
                s = synthesize_corpus(items, tmp, SynthConfig(voices=[voice], shard_size=50), workers=workers, progress=False)
            finally:
                shutil.rmtree(tmp)
            row = {"voice": voice, "workers": workers, "utterances": s.utterances, "hours": round(s.hours, 4),
                   "wall_s": round(s.wall_seconds, 1), "hours_per_min": round(s.hours_per_minute, 3),
                   "x_realtime": round(s.hours * 3600 / s.wall_seconds, 1)}
            print(json.dumps(row))
            results.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
