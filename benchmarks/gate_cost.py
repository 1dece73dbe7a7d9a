"""What the noise gate's speech detector costs a duplex tick, side by side in one process.

Two duplex models share the shipped LM and codec; one's noise gate asks the speech detector frame by frame
(``speechlm serve --gate-detector vad-en``, the default), the other's decides by level alone (``none``). Their ticks
alternate on the same batch of random audio for ``--ticks`` ticks per batch size; medians per tick and the ratio,
plus the detector's own frame-by-frame step (``SpeechDetector.stream``) timed alone on the same batch.

    python benchmarks/gate_cost.py --batches 1,4,8,16 --out docs/results/gate_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from speechlm.streaming.duplex_model import DuplexSpeechModel
from speechlm.vad import SpeechDetector


def measure(plain: DuplexSpeechModel, gated: DuplexSpeechModel, detector: SpeechDetector, batch: int, ticks: int) -> dict:
    """Median milliseconds of a tick of each model, alternating, and of the detector's step alone, on one batch."""
    x = 0.1 * torch.randn(batch, plain.frame_length, generator=torch.Generator().manual_seed(0))
    states = {"plain": plain.init_state(batch), "gated": gated.init_state(batch), "detector": detector.init_stream(batch)}
    times: dict[str, list[float]] = {"plain": [], "gated": [], "detector": []}
    steps = {
        "plain": lambda state: plain.step(x, state)[2],
        "gated": lambda state: gated.step(x, state)[2],
        "detector": lambda state: detector.stream(x, state)[1],
    }
    with torch.inference_mode():
        for i in range(ticks + 5):
            for name, step in steps.items():
                start = time.perf_counter()
                states[name] = step(states[name])
                if i >= 5:  # warm-up
                    times[name].append(time.perf_counter() - start)
    med = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {"batch": batch, "tick_ms_level_gate": round(med["plain"], 2), "tick_ms_with_detector": round(med["gated"], 2),
            "ratio": round(med["gated"] / med["plain"], 3), "detector_stream_ms": round(med["detector"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="duplex-default")
    ap.add_argument("--codec", default="codec-16k")
    ap.add_argument("--detector", default="vad-en")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--ticks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain = DuplexSpeechModel.from_pretrained(args.lm, args.codec)
    detector = SpeechDetector.from_pretrained(args.detector)
    gated = DuplexSpeechModel(plain.lm, plain.codec, speech_detector=detector)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        rows.append(measure(plain, gated, detector, batch, args.ticks))
        print(rows[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"command": "python benchmarks/gate_cost.py " + f"--batches {args.batches} --ticks {args.ticks} --threads {args.threads}",
                  "lm": args.lm, "detector": args.detector, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
