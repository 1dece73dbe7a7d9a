"""MCTP: audio frames per backbone forward, decode throughput vs plain autoregressive
decoding of the same model, and text-in -> first-audio latency (with and without MCTP).

Speed does not depend on the weights, so this runs on a randomly initialised model of
the given architecture (default: the planned shipped size); quality (the WER cost of MCTP)
needs a trained model: see benchmarks/tts.py.  CPU figures are ratios measured side by side
in one run.

    python benchmarks/mctp.py --threads 1 --out docs/results/mctp.json
    python benchmarks/mctp.py --head parallel_delay --delays 0,1,1,1,1,1,1,1 --device cuda   # absolute times on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.utils import logging as hf_logging

from speechlm.lm import SpeechLM, load_tokenizer, train_bpe_tokenizer
from speechlm.lm.generate import GREEDY, iter_audio
from speechlm.lm.prompts import tts_prompt

hf_logging.set_verbosity_error()


def build(args, tmp: Path) -> SpeechLM:
    train_bpe_tokenizer(["what is two plus three", "the capital of france is paris", "hello there how are you"] * 20,
                        vocab_size=500, min_frequency=1, save_dir=tmp / "tok")
    tokenizer = load_tokenizer(tmp / "tok")
    torch.manual_seed(0)
    backbone = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
                           max_position_embeddings=4096)
    return SpeechLM.from_backbone(backbone, tokenizer, num_codebooks=8, codebook_size=1024, output_head=args.head,
                                  mctp_modules=args.mctp, mctp_intermediate_size=args.mctp_intermediate,
                                  delays=[int(d) for d in args.delays.split(",")] if args.delays else None).eval()


def _sync(model: SpeechLM) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def run(model: SpeechLM, ids: list[int], schedule: list[int], frames: int) -> dict:
    _sync(model)
    t0 = time.perf_counter()
    first = None
    positions, forwards = [], 0
    with torch.inference_mode():
        for step in iter_audio(model, ids, max_frames=frames, min_frames=frames, sampling=GREEDY, schedule=schedule, seed=0, per_position=True):
            if first is None and len(step.frames[0]):
                _sync(model)
                first = time.perf_counter() - t0
                first_forward = step.backbone_forwards
            if step.backbone_forwards != forwards:
                positions.append(0)
            positions[-1] += step.positions
            forwards = step.backbone_forwards
    _sync(model)
    wall = time.perf_counter() - t0
    return {"first_audio_ms": first * 1000, "first_audio_forward": first_forward, "frames_per_forward": sum(positions) / len(positions),
            "frames_per_second": frames / wall, "backbone_forwards": forwards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--head", default="depth", choices=["depth", "parallel_delay"])
    ap.add_argument("--delays", help="parallel_delay head: comma-separated delay per codebook (default 0,1,...,Q-1)")
    ap.add_argument("--mctp", type=int, default=4)
    ap.add_argument("--mctp-intermediate", type=int, default=512)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = build(args, Path(tmp)).to(device=args.device, dtype=getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters())
    ids = tts_prompt(model, "what is two plus three")
    results = {}
    for name, schedule in (("plain autoregressive", [0]), (f"MCTP {args.mctp}", [args.mctp])):
        run(model, ids, schedule, min(args.frames, 10))  # warm-up (CUDA kernels, allocator)
        runs = [run(model, ids, schedule, args.frames) for _ in range(args.repeats)]
        results[name] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        print(name, results[name], flush=True)
    plain, mctp = results["plain autoregressive"], results[f"MCTP {args.mctp}"]
    summary = {
        "architecture": {"hidden": args.hidden, "layers": args.layers, "head": args.head, "mctp_modules": args.mctp,
                         "mctp_intermediate": args.mctp_intermediate, "delays": args.delays, "parameters_M": round(params / 1e6, 2), "threads": args.threads,
                         "device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "dtype": args.dtype},
        "results": results,
        "throughput_ratio": round(mctp["frames_per_second"] / plain["frames_per_second"], 2),
        "first_audio_latency_ratio": round(plain["first_audio_ms"] / mctp["first_audio_ms"], 2),
        "realtime_factor_mctp": round(model.config.frame_rate / mctp["frames_per_second"], 3),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
