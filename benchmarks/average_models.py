"""Average two speech LMs' weights (WiSE-FT, Wortsman et al. 2022): a fine-tuned model and the one it started from.

    python benchmarks/average_models.py speechlm-default runs/lm-rooms/model --weight 0.5 --out runs/soup50/model

Every floating-point tensor becomes (1 - weight) * A + weight * B (tied tensors once); the result is saved in
float32 with A's config and tokenizer (no codec: benchmark it with --codec codec-16k). Same architecture needed.
"""

from __future__ import annotations

import argparse

import torch

from speechlm.lm.model import SpeechLM
from speechlm.speech import resolve_model


def average(a: SpeechLM, b: SpeechLM, weight: float) -> SpeechLM:
    """a <- (1 - weight) * a + weight * b, in place; returns a."""
    theirs = b.state_dict()
    ours = a.state_dict()
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        raise SystemExit("the two models differ in architecture")
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in ours.items():
            if tensor.is_floating_point() and tensor.data_ptr() not in seen:  # a tied tensor appears under two names
                seen.add(tensor.data_ptr())
                tensor.mul_(1 - weight).add_(theirs[name].float(), alpha=weight)
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="model directory or shipped name")
    ap.add_argument("b", help="model directory or shipped name")
    ap.add_argument("--weight", type=float, default=0.5, help="B's share (default 0.5)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not 0.0 <= args.weight <= 1.0:
        raise SystemExit(f"--weight must be in [0, 1], got {args.weight}")
    a = SpeechLM.from_pretrained(resolve_model(args.a)).float()
    b = SpeechLM.from_pretrained(resolve_model(args.b)).float()
    print(f"wrote {average(a, b, args.weight).save_pretrained(args.out)}")


if __name__ == "__main__":
    main()
