"""TTS in batches: several renderings of one text (the candidates of ``Generation.candidates``) or
several texts, decoded as rows of one batch (``SpeechPipeline.tts_batch``) vs one after another.

For each held-out sentence and each batch size N, side by side in one run (alternating, so the
machine's noise hits both alike): N renderings one by one (``tts``, offline: a batch of one whose
frames the codec decodes at the end) and the same N as one batch;
the same for N different sentences. Reports wall seconds per second of speech for each way, the
ratio (one by one / batch), and MCTP's audio frames per backbone forward in the batch (the rows cut
their MCTP runs at each other's word ends). No judge needed.

    python benchmarks/tts_batch.py --model speechlm-default --count 10 --sizes 1,2,4,8,16 --out docs/results/tts_batch.json
    python benchmarks/tts_batch.py --count 1 --sizes 8 --order-count 48 --out docs/results/tts_batch_order.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from speech_lm import TTS_SOURCES, held_out_texts
from speech_streams import write_report

from speechlm.codec.audio import SAMPLE_RATE
from speechlm.speech import Generation, SpeechPipeline, resolve_dtype


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _one_by_one(sp: SpeechPipeline, texts: list[str], gens: list[Generation]) -> list:
    return [sp.tts(t, generation=gk) for t, gk in zip(texts, gens)]


def bench(sp: SpeechPipeline, texts: list[str], sizes: list[int], g: Generation) -> dict:
    rows = []
    for n in sizes:
        same = {"one_by_one_s": 0.0, "batch_s": 0.0, "speech_s": 0.0}
        other = {"one_by_one_s": 0.0, "batch_s": 0.0, "speech_s": 0.0}
        for i, text in enumerate(texts):
            gens = sp.candidate_generations(Generation(**{**g.__dict__, "candidates": n}))
            _, t_alone = _timed(_one_by_one, sp, [text] * n, gens)
            batch, t_batch = _timed(sp.tts_batch, [text] * n, gens)
            same["one_by_one_s"] += t_alone
            same["batch_s"] += t_batch
            same["speech_s"] += sum(len(a) for a in batch) / SAMPLE_RATE
            group = [texts[(i + k) % len(texts)] for k in range(n)]
            _, t_alone = _timed(_one_by_one, sp, group, [g] * n)
            batch, t_batch = _timed(sp.tts_batch, group, g)
            other["one_by_one_s"] += t_alone
            other["batch_s"] += t_batch
            other["speech_s"] += sum(len(a) for a in batch) / SAMPLE_RATE
        row = {"rows": n}
        for name, r in (("renderings_of_one_text", same), ("different_texts", other)):
            row[name] = {
                "rtf_one_by_one": r["one_by_one_s"] / r["speech_s"],
                "rtf_batch": r["batch_s"] / r["speech_s"],
                "speed_up": r["one_by_one_s"] / r["batch_s"],
                # cost of the N renderings per second of the one kept (what a choice among them costs)
                "rtf_per_kept_second_batch": r["batch_s"] / (r["speech_s"] / n),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"sentences": len(texts), "sizes": rows, "mean_text_chars": statistics.mean(len(t) for t in texts)}


def bench_order(sp: SpeechPipeline, texts: list[str], batch: int, repeats: int = 2) -> dict:
    """Batches of ``batch`` texts in the given order vs shortest text first (what ``speechlm tts --lines``
    does: a batch runs as long as its longest row), alternating, ``repeats`` times each."""
    orders = {"given": texts, "shortest_first": sorted(texts, key=len)}
    wall = {name: 0.0 for name in orders}
    speech = {name: 0.0 for name in orders}
    for _ in range(repeats):
        for name, order in orders.items():
            start = time.perf_counter()
            for k in range(0, len(order), batch):
                speech[name] += sum(len(a) for a in sp.tts_batch(order[k : k + batch])) / SAMPLE_RATE
            wall[name] += time.perf_counter() - start
    return {"texts": len(texts), "batch": batch, **{f"rtf_{name}": wall[name] / speech[name] for name in orders},
            "time_saved": 1 - wall["shortest_first"] / wall["given"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--codec", default=None)
    ap.add_argument("--count", type=int, default=10, help="held-out sentences")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="batch sizes (rows)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--order-count", type=int, default=0,
                    help="also: this many held-out texts in batches of 8, given order vs shortest first (speechlm tts --lines)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sp = SpeechPipeline.from_pretrained(args.model, args.codec, dtype=resolve_dtype(args.dtype))
    texts = [item["text"] for item in held_out_texts(TTS_SOURCES, args.count)]
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "generation": "Generation() defaults",
        **bench(sp, texts, [int(x) for x in args.sizes.split(",")], Generation()),
    }
    if args.order_count:
        result["order"] = bench_order(sp, [item["text"] for item in held_out_texts(TTS_SOURCES, args.order_count)], 8)
    write_report(result, args.out)


if __name__ == "__main__":
    main()
