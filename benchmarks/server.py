"""Server capacity: the most sessions held in real time at once, step times per batch, memory per session.

Runs the real server (websockets, scheduler, batched model step) in this process and N
clients in a child process on loopback; a load is *held* when no frame-clock tick was late or
skipped and the clients got back (almost) every frame.  Models: the duplex speech LM
(``--model duplex --lm duplex-default``), or the codec loopback (``echo``: encode + decode every
session's frame, batched), which bounds what the server machinery itself costs.

    python benchmarks/server.py --codec codec-16k --sessions 8,16,32,48 --out docs/results/server.json
    python benchmarks/server.py --model duplex --lm duplex-default --sessions 1,2,4,8 --out docs/results/server_duplex.json
    # load-based admission: 6 clients, one every 4 s, each admitted or refused on the load before it
    python benchmarks/server.py --model duplex --lm duplex-default --assist speechlm-default --speech --sessions 6 --stagger 4 --admit-load 0.9
    # on a GPU; random:qwen2-0.5b is an untrained duplex LM on Qwen2-0.5B's backbone shape
    python benchmarks/server.py --model duplex --device cuda --sessions 64,128,256 --batches 1,64,256,512 --out server_gpu.json
    python benchmarks/server.py --model duplex --lm random:qwen2-0.5b --dtype bfloat16 --device cuda --sessions 32,64,128

Memory per session: host RSS growth over a load, and the model state's bytes per session (the
LM's KV ring at its full window, codec states). CPU per tick: the server process's CPU milliseconds per
tick over a load, by thread (``step``: the model step; ``assist``: the answer assist's speech LM; ``loop``: the event
loop's websocket work), and the cores it kept busy: on a CPU a steadier measure of what a load costs than its late
ticks, which also count what else the machine ran.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
from pathlib import Path

import torch

from speechlm.streaming.loadtest import build_model, measure_load, step_times
from speechlm.streaming.settings import none_or


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="echo", choices=["echo", "silence", "duplex"])
    ap.add_argument("--codec", default="codec-16k")
    ap.add_argument("--lm", default="duplex-default", help="--model duplex: the duplex LM (directory or shipped name)")
    ap.add_argument("--sessions", default="8,16,32,48")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--model duplex: the LM's dtype")
    ap.add_argument("--batches", default="1,8,32,64,128", help="batch sizes for the step timings")
    ap.add_argument("--clients-per-process", type=int, default=64)
    ap.add_argument("--cuda-graphs", action="store_true", help="--model duplex: the LM backbone's forward from CUDA graphs")
    ap.add_argument("--compile-codec", action="store_true", help="the codec's steps compiled with AOTInductor (speechlm.codec.compiled)")
    ap.add_argument("--assist", help="--model duplex: answer assist by this speech LM (speechlm serve --assist)")
    ap.add_argument("--assist-voice", default="speech_lm", choices=["speech_lm", "duplex"])
    ap.add_argument("--assist-views", type=int, help="--assist: views of each question's audio its ASR hears (default: AssistConfig's; 1 = plain greedy)")
    ap.add_argument("--assist-options", type=json.loads, default=None, help='--assist: more AssistConfig fields as JSON, e.g. \'{"plan_quiet_frames": 1}\'')
    ap.add_argument("--speech", action="store_true", help="clients loop a spoken question and a pause (espeak-ng) instead of a steady tone")
    ap.add_argument("--pause", type=float, default=3.0, help="--speech: seconds of silence after the question")
    ap.add_argument("--speech-wav", default=None, help="--speech: the question from this 16 kHz mono file instead of espeak-ng "
                    "(benchmarks/data/two_plus_three.wav: espeak-ng's, for machines without it)")
    ap.add_argument("--admit-load", type=float, default=None,
                    help="the server's load-based admission (speechlm serve --admit-load; default off: each load is forced on it)")
    ap.add_argument("--stagger", type=float, default=0.0,
                    help="clients connect one every this many seconds (with --admit-load: each admitted or refused on the load before it)")
    ap.add_argument("--gate-detector", default="vad-en",
                    help="--model duplex: the noise gate's speech detector (speechlm serve --gate-detector; 'none' = the level alone, as before 2026-12-07)")
    ap.add_argument("--no-catch-up", action="store_true", help="the clients' HANDSHAKE turns the input backlog's catch-up off")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = build_model(args.model, args.codec, device=device, lm=args.lm, compile_codec=args.compile_codec, dtype=args.dtype, graphs=args.cuda_graphs,
                        assist=args.assist, assist_voice=args.assist_voice,
                        gate_detector=none_or(args.gate_detector),
                        assist_options={**({"asr_views": args.assist_views} if args.assist_views is not None else {}), **(args.assist_options or {})})  # fmt: skip
    speech = None
    if args.speech:
        import random

        import numpy as np

        if args.speech_wav:
            from speechlm.codec.audio import load_audio

            question = load_audio(args.speech_wav, 16000)
        else:
            from speechlm.training.teachers import get_teacher

            question = get_teacher("espeak:en-us").synthesize("What is two plus three?", random.Random(0)).audio
        speech = np.concatenate([question, np.zeros(int(args.pause * 16000), np.float32)])
    batches = [int(x) for x in args.batches.split(",")]
    steps = step_times(model, batches)
    for row in steps:
        print("step", row, flush=True)
    memory = state_memory(model, max(batches))
    print("memory", memory, flush=True)
    loads = []
    for n in [int(x) for x in args.sessions.split(",")]:
        result = asyncio.run(measure_load(model, n, seconds=args.seconds, clients_per_process=args.clients_per_process, speech=speech,
                                          stagger=args.stagger, admit_load=args.admit_load,
                                          handshake={"catch_up": False} if args.no_catch_up else None))
        print("load", result, flush=True)
        loads.append(result)
    held = [r["sessions"] for r in loads if r["held"]]
    report = {"model": args.model, "lm": args.lm if args.model == "duplex" else None, "assist": args.assist, "assist_views": args.assist_views if args.assist else None, "assist_options": args.assist_options, "gate_detector": args.gate_detector, "speech": args.speech, "admit_load": args.admit_load, "stagger": args.stagger, "codec": args.codec, "compile_codec": args.compile_codec, "threads": args.threads,
              "cuda_graphs": args.cuda_graphs, "device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else None, "dtype": args.dtype,
              "parameters_m": parameters_m(model), "step_times": steps, "memory": memory, "loads": loads, "most_sessions_held": max(held) if held else 0}
    print(json.dumps({"most_sessions_held": report["most_sessions_held"]}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


def parameters_m(model) -> float | None:
    """Millions of parameters of the model's LM and codec (None for models without)."""
    parts = [model, getattr(model, "duplex", None), getattr(model, "speech", None)]  # the assisted model: the duplex model and the speech LM
    modules = [m for part in parts if part is not None for m in (getattr(part, "lm", None), getattr(part, "codec", None)) if isinstance(m, torch.nn.Module)]
    return round(sum(p.numel() for m in modules for p in m.parameters()) / 1e6, 2) if modules else None


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors and arrays in a state (the answer assist's rows keep numpy audio)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if type(obj).__module__ == "numpy" and hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple, collections.deque)):
        return sum(_tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x) for x in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(x) for x in vars(obj).values())
    return 0


def state_memory(model, batch: int, frames: int = 50) -> dict:
    """The model state's bytes per session after ``frames`` frames (the duplex LM's KV ring is
    allocated at its full window from the start, so this is also its size at minute 10)."""
    state = model.init_state(batch)
    x = 0.1 * torch.randn(batch, model.frame_length)
    for _ in range(frames):
        _, _, state = model.step(x, state)
    row = {"batch": batch, "frames": frames, "state_mb_per_session": round(_tensor_bytes(state) / batch / 2**20, 3)}
    lm_state = getattr(getattr(state, "inner", state), "lm", None)
    if lm_state is not None and hasattr(lm_state, "window"):
        row["window"] = lm_state.window
    if torch.cuda.is_available() and str(getattr(model, "device", "cpu")).startswith("cuda"):
        row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


if __name__ == "__main__":
    main()
