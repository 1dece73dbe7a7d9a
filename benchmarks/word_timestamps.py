"""How accurate are the teachers' word timestamps?  Measured against silences at word gaps.

Where a teacher says there is a pause between two words (a gap of >= 60 ms, mostly at
punctuation), the audio should be silent there, and the silence should begin where the
first word ends and end where the next begins.  For each such gap we find the actual
silent run in the audio (5 ms frames more than 35 dB below the utterance's loudest frame)
and report the boundary error |labelled - measured| in ms, plus how much of the labelled
words is voiced.  Independent of the synthesizer's own bookkeeping: only the audio is used.

    python benchmarks/word_timestamps.py --count 100 --out docs/results/word_timestamps.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from speechlm.training.teachers import get_teacher
from speechlm.training.textgen import generate

SR = 16000
HOP = 80  # 5 ms


def frame_db(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // HOP
    frames = audio[: n * HOP].reshape(n, HOP)
    rms = np.sqrt(np.mean(frames**2, axis=1) + 1e-12)
    return 20 * np.log10(rms / rms.max())


def measure(voice: str, texts: list[str], threshold_db: float = -35.0) -> dict:
    teacher = get_teacher(voice)
    errors, voiced_fraction, gaps = [], [], 0
    for i, text in enumerate(texts):
        syn = teacher.synthesize(text, random.Random(i))
        db = frame_db(syn.audio)
        silent = db < threshold_db
        for w in syn.words:
            a, b = int(w.start * SR / HOP), max(int(w.start * SR / HOP) + 1, int(w.end * SR / HOP))
            if a < len(silent):
                voiced_fraction.append(float(np.mean(~silent[a:b])))
        for left, right in zip(syn.words, syn.words[1:]):
            if right.start - left.end < 0.06:
                continue
            gaps += 1
            mid = int((left.end + right.start) / 2 * SR / HOP)
            if mid >= len(silent) or not silent[mid]:
                errors.append(float("nan"))  # labelled pause that is not silent in its middle
                continue
            lo = mid
            while lo > 0 and silent[lo - 1]:
                lo -= 1
            hi = mid
            while hi + 1 < len(silent) and silent[hi + 1]:
                hi += 1
            errors.append(abs(lo * HOP / SR - left.end) * 1000)
            errors.append(abs((hi + 1) * HOP / SR - right.start) * 1000)
    e = np.array(errors)
    ok = e[~np.isnan(e)]
    return {
        "voice": voice,
        "utterances": len(texts),
        "labelled_pauses": gaps,
        "pauses_not_silent": int(np.isnan(e).sum()),
        "boundary_error_ms_median": round(float(np.median(ok)), 1),
        "boundary_error_ms_p90": round(float(np.percentile(ok, 90)), 1),
        "boundaries_within_20ms": round(float(np.mean(ok <= 20)), 3),
        "word_voiced_fraction_mean": round(float(np.mean(voiced_fraction)), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--voices", default="espeak:en-us,espeak:en-gb+f3,piper:joe")
    ap.add_argument("--out")
    args = ap.parse_args()
    texts = [x["text"] for x in generate("everyday", args.count, seed=5)] + [x["text"] for x in generate("dialogues", args.count // 4, seed=5)]
    results = []
    for voice in args.voices.split(","):
        r = measure(voice, texts)
        print(json.dumps(r))
        results.append(r)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
