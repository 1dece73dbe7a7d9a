"""The backbone's products of one decoding step, bfloat16 against int8 weights (speechlm.lm.int8), by rows.

Takes the shipped speech LM's backbone projections (every layer's q, k, v, o, gate, up, down) and times one
pass over all of them — what a decoding step multiplies — for 1, 2, 4, ... rows, alternating the two kinds,
one thread. The weights together are larger than the CPU's caches, so each pass reads them from memory,
as a decoding step does.

    python benchmarks/int8_products.py --out docs/results/int8_products.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from speechlm.lm.int8 import Int8Products
from speechlm.lm.model import SpeechLM
from speechlm.speech import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=30, help="passes timed per kind and row count (medians reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = SpeechLM.from_pretrained(resolve_model(args.model), dtype=torch.bfloat16)
    weights = [m.weight.detach() for m in lm.backbone.base_model.layers.modules() if isinstance(m, torch.nn.Linear)]
    products = Int8Products(max_rows=max(int(r) for r in args.rows.split(",")))
    for w in weights:
        products.int8(w)  # the int8 copies made before timing
    rows_out = []
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {w.shape[1] for w in weights}}
        times: dict[str, list[float]] = {"bfloat16": [], "int8": []}
        kinds = {"bfloat16": lambda x, w: F.linear(x, w), "int8": products.linear}
        for _ in range(args.repeats):
            for name, product in kinds.items():
                start = time.perf_counter()
                for w in weights:
                    product(inputs[w.shape[1]], w)
                times[name].append(time.perf_counter() - start)
        bf16, int8 = (statistics.median(times[k]) * 1e3 for k in ("bfloat16", "int8"))
        rows_out.append({"rows": rows, "bfloat16_ms": round(bf16, 3), "int8_ms": round(int8, 3), "int8_speedup": round(bf16 / int8, 2)})
        print(rows_out[-1], flush=True)
    result = {"model": args.model, "products": len(weights), "megabytes_bf16": round(sum(w.numel() * 2 for w in weights) / 1e6, 1),
              "threads": args.threads, "by_rows": rows_out}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
