"""Hearing and answering several spoken questions at once, as the server's answer assist does when
questions wait together: ``SpeechPipeline.asr_many`` + ``reply_texts`` (rows of one batch) vs ``asr`` +
``reply_text`` one question after another.

N held-out spoken questions (arithmetic and facts, held-out espeak-ng voices), heard with the assist's
settings (2 views, the ASR adapter, no transcript check) and answered; both ways alternating, each
``--repeats`` times. Reports wall seconds per question each way, the speed-up, and how many transcripts
and replies the two ways agree on (batched arithmetic rounds differently). No judge needed.

    python benchmarks/hearing_batch.py --sizes 1,2,4,8 --out docs/results/hearing_batch.json
    python benchmarks/hearing_batch.py --device cuda --questions benchmarks/data/questions8.npz --sizes 1,8,32,64   # no espeak-ng there

``--questions FILE.npz`` reads the spoken questions (``audio_0``, ``audio_1``, ... PCM16 at 16 kHz; written by
``--save-questions FILE.npz``) instead of synthesizing them, cycled when more are asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

import numpy as np
from speech_streams import add_pipeline_arguments, load_pipeline, write_report

from speechlm.streaming.assist import ASSIST_GENERATION, AssistConfig
from speechlm.training import textgen


def spoken_questions(count: int, path: str | None = None) -> list:
    """``count`` held-out questions (test split) spoken by held-out espeak-ng voices (or read from ``path``, cycled)."""
    if path:
        with np.load(path) as saved:
            audio = [saved[f"audio_{i}"].astype(np.float32) / 32767 for i in range(len(saved.files))]
        return [audio[i % len(audio)] for i in range(count)]
    from speechlm.training.teachers import get_teacher  # espeak-ng

    items = [item for source in ("arithmetic", "facts") for item in textgen.generate(source, -(-count // 2), split="test", seed=1)]
    random.Random(0).shuffle(items)
    voices = textgen.voice_catalog("test", ("espeak",))
    rng = random.Random(2)
    return [get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio for i, item in enumerate(items[:count])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pipeline_arguments(ap)
    ap.add_argument("--sizes", default="1,2,4,8", help="questions at once")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--questions", default=None, help="read the spoken questions from this .npz (see the module doc)")
    ap.add_argument("--save-questions", default=None, help="write the spoken questions to this .npz and stop")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    questions = spoken_questions(max(sizes), args.questions)
    if args.save_questions:
        np.savez_compressed(args.save_questions, **{f"audio_{i}": np.round(np.clip(q, -1, 1) * 32767).astype(np.int16) for i, q in enumerate(questions)})
        print(f"wrote {args.save_questions}")
        return
    sp, dtype = load_pipeline(args)
    config = AssistConfig()
    g = dataclasses.replace(ASSIST_GENERATION, asr_views=config.asr_views, asr_adapter=config.asr_adapter, asr_check_rounds=config.asr_check_rounds)
    sp.reply_texts(sp.asr_many(questions[:1], generation=g), g)  # warm-up

    def one_by_one(qs):
        heard = [sp.asr(q, generation=g) for q in qs]
        return heard, [sp.reply_text(t, g) for t in heard]

    def batched(qs):
        heard = sp.asr_many(qs, generation=g)
        return heard, sp.reply_texts(heard, g)

    rows = []
    for n in sizes:
        qs = questions[:n]
        wall = {"one_by_one": [], "batched": []}
        out = {}
        for _ in range(args.repeats):
            for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
                start = time.perf_counter()
                out[name] = fn(qs)
                wall[name].append(time.perf_counter() - start)
        (heard_a, replies_a), (heard_b, replies_b) = out["one_by_one"], out["batched"]
        row = {"questions": n, **{f"{name}_s_per_question": statistics.median(w) / n for name, w in wall.items()},
               "speed_up": statistics.median(a / b for a, b in zip(wall["one_by_one"], wall["batched"])),
               "same_transcripts": sum(a == b for a, b in zip(heard_a, heard_b)), "same_replies": sum(a == b for a, b in zip(replies_a, replies_b)),
               "transcripts": heard_b, "replies": replies_b}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("transcripts", "replies")}), flush=True)
    result = {"model": args.model, "device": args.device, "dtype": str(dtype).removeprefix("torch."), "threads": args.threads,
              "repeats": args.repeats, "sizes": rows}  # fmt: skip
    write_report(result, args.out, show=False)


if __name__ == "__main__":
    main()
