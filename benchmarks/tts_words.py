"""``speechlm tts --words`` against the truth the speech LM has: where it spoke each word.

The shipped model speaks word by word (the word-aligned layout): each word's text chunk, then that word's audio
frames, so every frame it makes belongs to one word (``AudioStep.words``). This speaks held-out sentences (the TTS
benchmark's test split) one at a time as one segment (``SpeechPipeline.tts_steps``), then aligns the text to the speech
with the pronunciation checker (``SpeechPipeline.tts_words``, what ``--words`` prints) and compares each word's start and
end with its chunk's first frame and the next chunk's first frame (40 ms frames). A chunk holds the punctuation
before its word, so the pause after a comma is the next word's in the LM's account and not in the alignment's: starts
after punctuation and ends before it are reported apart. Medians / p90 of the absolute error, the share within one
frame (40 ms), the mean signed error (alignment minus the LM's).

    python benchmarks/tts_words.py --count 40 --out docs/results/tts_words.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from speech_lm import TTS_SOURCES, held_out_texts

from speechlm.lm.prompts import word_chunks
from speechlm.speech import Generation, SpeechPipeline
from speechlm.training.textnorm import normalize_text

FRAME_SECONDS = 0.04
PUNCTUATION = re.compile(r"^[^\w']*[,;:.!?]")


def errors_ms(values: list[float]) -> dict:
    v = np.asarray(values) * 1000
    if not len(v):
        return {"words": 0}
    return {"words": len(v), "median_abs_ms": round(float(np.median(np.abs(v))), 1), "p90_abs_ms": round(float(np.percentile(np.abs(v), 90)), 1),
            "within_40ms": round(float(np.mean(np.abs(v) <= 40)), 3), "mean_ms": round(float(v.mean()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipeline = SpeechPipeline.from_pretrained(args.model)
    g = Generation()
    kinds: dict[str, list[float]] = {"start": [], "start_after_punctuation": [], "end": [], "end_before_punctuation": []}
    for item in held_out_texts(TTS_SOURCES, args.count):
        text = normalize_text(item["text"])
        pcm, words = [], []
        for step, frame in pipeline.tts_steps(text, g):
            pcm.append(frame)
            words.append(step.words[0])
        audio = np.concatenate(pcm)
        chunks = word_chunks(text)
        firsts = [words.index(k) if k in words else None for k in range(len(chunks))]
        aligned = pipeline.tts_words(audio, text, g)
        if len(aligned) != len(chunks) or None in firsts:
            continue  # (a word the model never reached: the utterance cut at its length limit)
        bounds = [*firsts, len(words)]
        # chunk k is what comes between word k-1 and word k, then word k: punctuation there is a pause before word k
        pause_before = [k > 0 and bool(PUNCTUATION.match(chunk)) for k, chunk in enumerate(chunks)]
        for k, w in enumerate(aligned):
            kinds["start_after_punctuation" if pause_before[k] else "start"].append(w.start - bounds[k] * FRAME_SECONDS)
            if k + 1 < len(chunks):
                kinds["end_before_punctuation" if pause_before[k + 1] else "end"].append(w.end - bounds[k + 1] * FRAME_SECONDS)
    result = {"model": args.model, "count": args.count, **{k: errors_ms(v) for k, v in kinds.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
