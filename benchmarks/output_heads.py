"""Parallel-delay head vs depth head (Moshi's depformer): quality and speed of models trained alike.

Quality: teacher-forced negative log-likelihood of held-out speech, per codebook and summed
over the codebooks of a frame (nats per frame), on the same TTS examples for every model —
both heads factorize p(frame | past), so the sums compare directly (the parallel head's
delayed codebooks also score the one empty code at each segment edge, a small extra).
Speed: the LM's own decoding (no codec), frames per second, plain and with the model's MCTP
schedule, on the same held-out sentences, one thread. (Intelligibility to the judge needs a
model trained to the end: benchmarks/speech_lm.py.)

Train the models the same way first (same data, init, steps, seed), e.g. from the text stage,
600 steps of TTS each, side by side on the two cores::

    D="data/tok-synth-espeak data/tok-synth-assistant data/tok-synth-assistant2"
    for head in parallel_delay depth; do
      if [ $head = depth ]; then delays=null; else delays="[0, 1, 1, 1, 1, 1, 1, 1]"; fi
      speechlm train lm --stage align --init-from runs/lm-text/model --data $D --weights tts=1 \
        --assistant-voices espeak:en-us --out runs/head-$head --steps 600 --batch-size 16 --lr 5e-4 \
        --warmup-steps 50 --threads 1 --quiet --speech-config "{\"output_head\": \"$head\", \"delays\": $delays,
        \"speech_layout\": \"word_aligned\", \"mctp_modules\": 0}" &
    done; wait
    python benchmarks/output_heads.py --models runs/head-parallel_delay/model runs/head-depth/model \
        --data data/tok-test-us --items 160 --sentences 10 --out docs/results/output_heads.json

(``data/tok-test-us``: ``speechlm data synth --builtin everyday,commands,numbers,dates_times --split test
--count 40 --voices espeak:en-us --out data/synth-test-us`` then ``speechlm data tokenize``.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from speechlm.lm import SpeechLM
from speechlm.lm.generate import Sampling, iter_aligned_audio, iter_audio
from speechlm.lm.prompts import aligned_tts_prompt, tts_prompt
from speechlm.training import textgen
from speechlm.training.lm_data import LMFormat, collate, render, tts_task
from speechlm.training.tokenize import TokenCorpus

SOURCES = ("everyday", "commands", "numbers", "dates_times")


@torch.inference_mode()
def held_out_nll(model: SpeechLM, data: list[str], items: int, batch_size: int) -> dict:
    """Mean per-codebook CE (nats) of the TTS targets of the first ``items`` rows of ``data``
    (held-out corpora: the training mixture refuses their rows, so they are rendered here)."""
    fmt = LMFormat.from_model(model)
    aligned = model.config.speech_layout == "word_aligned"
    examples = []
    for corpus in (TokenCorpus(d) for d in data):
        for r in range(len(corpus)):
            row, (codes,) = corpus[r]
            if row.get("text", "").strip() and len(examples) < items:
                task = tts_task(row["text"], codes, words=row.get("words"), tokenizer=model.tokenizer) if aligned else tts_task(row["text"], codes)
                examples.append(render(task.segments, fmt, trained=task.trained, task=task.task))
    if not examples:
        raise SystemExit("no held-out rows with text in --data")
    sums, weights = 0.0, 0
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        out = model(**collate(part, model.vocab.pad, model.config.empty_code))
        sums = sums + out.codebook_losses.float() * len(part)
        weights += len(part)
    codebooks = sums / weights
    return {"items": len(examples), "nll_per_codebook": [round(float(x), 4) for x in codebooks], "nll_per_frame": round(float(codebooks.sum()), 4)}


@torch.inference_mode()
def decode_speed(model: SpeechLM, texts: list[str], schedule: list[int] | None, sampling: Sampling) -> dict:
    """LM-only frames per second (and frames per backbone forward) over ``texts``."""
    frames = forwards = 0
    start = time.perf_counter()
    for text in texts:
        if model.config.speech_layout == "word_aligned":
            ids, chunks = aligned_tts_prompt(model, text)
            steps = iter_aligned_audio(model, ids, chunks, sampling=sampling, schedule=schedule, seed=0)
        else:
            steps = iter_audio(model, tts_prompt(model, text), sampling=sampling, schedule=schedule, seed=0, per_position=True)
        for step in steps:
            frames += len(step.frames[0])
            last = step.backbone_forwards
        forwards += last
    wall = time.perf_counter() - start
    return {"frames": frames, "frames_per_s": round(frames / max(wall, 1e-9), 1), "frames_per_backbone_forward": round(frames / max(forwards, 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="exported model directories (RUN/model) to compare")
    ap.add_argument("--data", nargs="+", required=True, help="held-out tokenized corpora (text never trained on)")
    ap.add_argument("--items", type=int, default=100, help="held-out utterances scored")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sentences", type=int, default=10, help="held-out sentences for the speed test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per = -(-args.sentences // len(SOURCES))
    texts = [item["text"] for s in SOURCES for item in textgen.generate(s, per, split="test", seed=3)][: args.sentences]
    sampling = Sampling(temperature=0.8, top_k=50, top_p=0.95)
    rows = []
    for path in args.models:
        model = SpeechLM.from_pretrained(path).eval()
        row = {"model": str(path), "output_head": model.config.output_head, "delays": list(model.config.audio_delays),
               "mctp_modules": model.config.mctp_modules, **held_out_nll(model, args.data, args.items, args.batch_size)}
        row["plain"] = decode_speed(model, texts, [0], sampling)
        if model.config.mctp_modules:
            row["mctp"] = decode_speed(model, texts, None, sampling)
        rows.append(row)
        print(json.dumps(row))
    result = {"command": "python benchmarks/output_heads.py " + " ".join(sys.argv[1:]),
              "threads": args.threads, "sentences": len(texts), "models": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
