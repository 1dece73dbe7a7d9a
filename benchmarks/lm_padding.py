"""Padding in speech-LM training batches and what shorter packed text rows save (one CPU thread).

For each packed-text row length, the same steps of the same mixture: the share of computed positions that
are padding, and the seconds of one forward + backward of a micro-batch, the lengths alternating step by step
in one process (a ratio measured side by side; absolute seconds move with the machine's load).

    python benchmarks/lm_padding.py --model runs/lm-hear/model --data data/tok-synth-espeak ... --row-lengths 256,128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a speech LM directory (its weights only set the compute, not the result)")
    ap.add_argument("--data", nargs="+", required=True, help="tokenized corpora (speechlm data tokenize)")
    ap.add_argument("--weights", default="tts=2,asr=2,interleave=0.3,spoken_qa=1.5,text=1.0")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--row-lengths", default="256,128", help="packed text row lengths to compare")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--count-steps", type=int, default=60, help="steps over which padding is counted")
    ap.add_argument("--timed-steps", type=int, default=6, help="steps timed (forward + backward) per row length")
    ap.add_argument("--out")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    from speechlm.lm import SpeechLM
    from speechlm.training.lm_data import TaskMixture, build_text_corpus
    from speechlm.training.lm_train_config import parse_weights

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    model = SpeechLM.from_pretrained(args.model).float().train()
    model.set_stage("sft")
    text = build_text_corpus(3000)
    lengths = [int(n) for n in args.row_lengths.split(",")]
    mixes = {
        n: TaskMixture(model, args.data, parse_weights(args.weights), text=text, max_length=args.max_length, pack_text=True,
                       text_row_length=n, assistant_voices=["espeak:en-us"])
        for n in lengths
    }  # fmt: skip
    result = {
        "command": "python benchmarks/lm_padding.py "
        + " ".join(f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items() if v)
    }
    for n, mix in mixes.items():
        real = computed = 0
        for step in range(args.count_steps):
            batch = mix.batch(step, range(args.micro_batch))
            real += int(batch["attention_mask"].sum())
            computed += batch["attention_mask"].numel()
        result[str(n)] = {"positions_computed": computed, "tokens": real, "padding_share": 1 - real / computed}
    seconds = dict.fromkeys(lengths, 0.0)
    for step in range(args.timed_steps):
        for n, mix in mixes.items():
            batch = mix.batch(step, range(args.micro_batch))
            t = time.perf_counter()
            model(**batch).loss.backward()
            seconds[n] += time.perf_counter() - t
            model.zero_grad(set_to_none=True)
    for n in lengths:
        result[str(n)]["seconds_per_micro_batch"] = seconds[n] / args.timed_steps
    result["speedup_vs_first"] = {str(n): seconds[lengths[0]] / seconds[n] for n in lengths}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
