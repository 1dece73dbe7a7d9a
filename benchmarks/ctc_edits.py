"""The transcript check's acoustic scores: spliced CTC (``speechlm.ctc_edits.edit_nlls``) vs one
batched ``ctc_loss`` over every whole candidate (what the check did before), side by side.

For held-out voices speaking held-out sentences (the ASR benchmark's inputs), the shipped checker's
log-probabilities of the audio and the check's first-round candidates of the true transcript (every
one-word edit over the shipped lexicon: ~4000-9000 phoneme sequences an utterance), scored both ways,
alternating, one thread. Reports each way's seconds per utterance, the ratio, and the largest
difference between the two scores (nats; they are the same likelihoods up to float rounding); and the
spliced pass with every middle padded to the longest (``ungrouped``: before the middles ran in groups of
similar length, ``speechlm.ctc_edits.GROUP_LENGTHS``), the same scores.

    python benchmarks/ctc_edits.py --count 20 --out docs/results/ctc_edits.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from speech_lm import TTS_SOURCES, held_out_texts

from speechlm import ctc_edits
from speechlm.checker import PronunciationChecker
from speechlm.speech import resolve_model
from speechlm.training import textgen
from speechlm.training.teachers import get_teacher
from speechlm.transcript_check import Lexicon, _edits, _tokens, _WordPhonemes, edit_splices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checker", default="checker-en")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    checker = PronunciationChecker.from_pretrained(args.checker)
    lexicon = Lexicon.load(resolve_model(args.checker) / "lexicon.json")
    voices = textgen.voice_catalog("test", ("espeak",))
    rng = random.Random(1)
    rows = []
    for i, item in enumerate(held_out_texts(TTS_SOURCES, args.count)):
        tokens = _tokens(item["text"])
        if tokens is None or any(t.word.lower() not in lexicon.written for t in tokens):
            continue  # the benchmark needs every word's phonemes from the lexicon (no espeak calls in the timing)
        audio = get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio
        log_probs = checker.log_probs(audio)
        phonemes = _WordPhonemes(lexicon, lambda word: [])  # every word is in the lexicon (above)
        ref = phonemes.of(tokens)
        candidates = _edits(tokens, lexicon)
        splices = [e for e in edit_splices(tokens, candidates, phonemes) if e[0] + len(e[1]) + e[2]]
        cands = [ref[:a] + list(m) + ref[len(ref) - b :] for a, m, b in splices]
        times = {"ctc_loss": [], "spliced": [], "ungrouped": []}
        for _ in range(2):  # alternate
            t = time.perf_counter()
            whole = checker.sequence_nll(log_probs, cands)
            times["ctc_loss"].append(time.perf_counter() - t)
            t = time.perf_counter()
            spliced = checker.edit_nlls(log_probs, ref, splices)
            times["spliced"].append(time.perf_counter() - t)
            grouped, ctc_edits.GROUP_LENGTHS = ctc_edits.GROUP_LENGTHS, ()
            try:
                t = time.perf_counter()
                ungrouped = checker.edit_nlls(log_probs, ref, splices)
                times["ungrouped"].append(time.perf_counter() - t)
            finally:
                ctc_edits.GROUP_LENGTHS = grouped
        assert ungrouped == spliced, "the length groups changed a score"
        diff = max(abs(a - b) for a, b in zip(whole, spliced, strict=True) if a != float("inf"))
        rows.append({"text": item["text"], "frames": int(log_probs.shape[0]), "candidates": len(cands),
                     "ctc_loss_s": min(times["ctc_loss"]), "spliced_s": min(times["spliced"]),
                     "ungrouped_s": min(times["ungrouped"]), "max_abs_diff": diff})
        print(f"{len(cands):5d} candidates, {rows[-1]['frames']} frames: ctc_loss {rows[-1]['ctc_loss_s']:.3f} s, "
              f"spliced {rows[-1]['spliced_s']:.3f} s (ungrouped {rows[-1]['ungrouped_s']:.3f} s), max |diff| {diff:.2e}", flush=True)
    result = {
        "utterances": len(rows),
        "candidates_mean": statistics.mean(r["candidates"] for r in rows),
        "ctc_loss_s_mean": statistics.mean(r["ctc_loss_s"] for r in rows),
        "spliced_s_mean": statistics.mean(r["spliced_s"] for r in rows),
        "ungrouped_s_mean": statistics.mean(r["ungrouped_s"] for r in rows),
        "grouping_speedup_median": statistics.median(r["ungrouped_s"] / r["spliced_s"] for r in rows),
        "speedup_median": statistics.median(r["ctc_loss_s"] / r["spliced_s"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
