"""Codec speed on one CPU thread, side by side in one process: ours, EnCodec 24 kHz, Mimi.

EnCodec and Mimi are built with random weights (speed does not depend on the weights).
They need packages that are never dependencies of speechlm, so run this in a separate
environment that sees the installed speechlm:

    python -m venv --system-site-packages /tmp/anchors
    /tmp/anchors/bin/pip install --no-deps moshi sentencepiece encodec
    /tmp/anchors/bin/python benchmarks/codec_speed_anchors.py --model codec-16k --out docs/results/codec_speed.json

(`encodec` imports torchaudio at module level only for file I/O we do not use; it is stubbed
here when torchaudio cannot be imported.)  EnCodec's and Mimi's figures are the best of 3 runs over 10 s of audio; ours are medians
of 5 alternating rounds (eager and compiled frame steps side by side, see benchmarks/codec.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

SECONDS = 10.0


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.inference_mode()
def ours(name: str) -> dict:
    """Our codec through benchmarks/codec.py's speed(): offline, frame by frame eager and compiled."""
    import importlib.util

    from speechlm.codec.model import Codec

    spec = importlib.util.spec_from_file_location("codec_benchmark", Path(__file__).resolve().parent / "codec.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    codec = Codec.from_pretrained(name).eval()
    return {"frame_ms": 1000 * codec.frame_length / codec.sample_rate, **bench.speed(codec, SECONDS)}


@torch.inference_mode()
def encodec24() -> dict:
    try:
        import torchaudio  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchaudio")
        stub.transforms = types.ModuleType("torchaudio.transforms")
        sys.modules["torchaudio"], sys.modules["torchaudio.transforms"] = stub, stub.transforms
    from encodec import EncodecModel

    model = EncodecModel.encodec_model_24khz(pretrained=False).eval()
    model.set_target_bandwidth(1.5)
    audio = torch.randn(1, 1, int(SECONDS * 24000)) * 0.1
    return {"frame_ms": 1000 / 75, "offline_x_realtime": SECONDS / best_of(lambda: model.decode(model.encode(audio))), "frame_by_frame_x_realtime": None}


@torch.inference_mode()
def mimi() -> dict:
    from moshi.models import loaders

    model = loaders.get_mimi(None, device="cpu").eval()
    model.set_num_codebooks(8)
    frame = int(model.sample_rate / model.frame_rate)
    n = int(SECONDS * model.frame_rate)
    audio = torch.randn(1, 1, n * frame) * 0.1

    def streaming():
        with model.streaming(1):
            for t in range(n):
                model.decode(model.encode(audio[:, :, t * frame : (t + 1) * frame]))

    return {"frame_ms": 1000 / model.frame_rate, "offline_x_realtime": SECONDS / best_of(lambda: model.decode(model.encode(audio))),
            "frame_by_frame_x_realtime": SECONDS / best_of(streaming)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="codec-16k")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, fn in (("speechlm " + args.model, lambda: ours(args.model)), ("EnCodec 24 kHz (random weights)", encodec24), ("Mimi (random weights)", mimi)):
        try:
            results[name] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in fn().items()}
        except ImportError as e:
            results[name] = {"skipped": str(e)}
        print(f"{name}: {results[name]}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
