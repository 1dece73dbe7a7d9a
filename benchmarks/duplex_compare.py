"""Pool the barge-in trials of several ``benchmarks/duplex.py`` runs per model and compare two models.

A single run's barge-in median moves by a frame or two (20 questions, a handful of barge times),
so versions are compared on the trials of several runs pooled: median, p90, mean, the share
stopped within the target, the median by barge time, and a one-sided Mann–Whitney test that the
first model stops sooner, with a bootstrap interval for the difference of the medians.

    python benchmarks/duplex_compare.py --a docs/results/duplex_v6_barge_pooled.json docs/results/duplex_v6_barge_pooled2.json \\
        --b docs/results/duplex_v5_barge_pooled3.json docs/results/duplex_v5_barge_pooled4.json --out docs/results/duplex_v6_vs_v5.json

Needs scipy (the [eval] extra brings it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def trials(paths: list[str]) -> list[dict]:
    """Every barge-in trial of the runs in ``paths`` in which the model was talking when the user started."""
    out = []
    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        out += [b for r in rows for b in r["barge"] if b["speaking_at_barge"]]
    return out


def summarize(ts: list[dict], target_ms: float) -> dict:
    ms = np.array([t["barge_in_ms"] for t in ts if t["barge_in_ms"] is not None], dtype=float)
    by: dict[float, list[float]] = {}
    for t in ts:
        if t["barge_in_ms"] is not None:
            by.setdefault(float(t["after_s"]), []).append(t["barge_in_ms"])
    return {
        "trials": len(ts),
        "stopped": len(ms),
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        f"share_within_{target_ms:g}_ms": float((ms <= target_ms).mean()),
        "median_ms_by_barge_after_s": {f"{k:g}": float(np.median(v)) for k, v in sorted(by.items())},
    }


def compare(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    diffs = [np.median(rng.choice(a, len(a))) - np.median(rng.choice(b, len(b))) for _ in range(resamples)]
    return {
        "median_diff_ms": float(np.median(a) - np.median(b)),
        "median_diff_ci95_ms": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
        "mannwhitney_p_a_sooner": float(mannwhitneyu(a, b, alternative="less").pvalue),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", required=True, help="duplex.py result files of the first model")
    ap.add_argument("--b", nargs="+", required=True, help="duplex.py result files of the second model")
    ap.add_argument("--target-ms", type=float, default=200.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    ta, tb = trials(args.a), trials(args.b)
    ms = [np.array([t["barge_in_ms"] for t in ts if t["barge_in_ms"] is not None], dtype=float) for ts in (ta, tb)]
    if not len(ms[0]) or not len(ms[1]):
        raise SystemExit("no barge-in trials in one of the two sets of files (run benchmarks/duplex.py with --barge-after)")
    result = {
        "a": {"files": args.a, **summarize(ta, args.target_ms)},
        "b": {"files": args.b, **summarize(tb, args.target_ms)},
        "a_vs_b": compare(*ms),
        "command": "python benchmarks/duplex_compare.py --a " + " ".join(args.a) + " --b " + " ".join(args.b),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
