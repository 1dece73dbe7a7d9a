"""Word timestamps by forced alignment (``speechlm.align``, what ``speechlm data import`` writes): how close to the truth.

* **Synthetic speech**, where the truth is known: held-out test-split texts (``everyday`` and ``numbers``) spoken by
  held-out espeak-ng voices and by Piper's joe; each word's aligned start and end against the teacher's own timestamps
  (which are themselves within ~10-20 ms of the audio: ``benchmarks/word_timestamps.py``). Reported per voice: median
  and p90 of the absolute error, the share within 40 ms (one codec frame), and the mean signed error; with the
  ``[eval]`` extra, Whisper tiny.en's word timestamps against the same truth (to read the real-speech comparison by).
* **Real speech** (LibriSpeech, held-out speakers >= 7000, their Whisper-base pseudo-transcripts): there is no truth,
  so (a) the alignment score with the recording's own transcript against another recording's (what ``--max-score``
  tells apart), and (b) agreement with Whisper tiny.en's word timestamps (the ``[eval]`` judge; its DTW word times are
  approximate themselves), over the words both give in the same order.

    python benchmarks/align.py --count 20 --real 24 --out docs/results/align.json
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import random
from pathlib import Path

import numpy as np

from speechlm.align import AlignError, align_words
from speechlm.checker import PronunciationChecker
from speechlm.codec.audio import load_audio
from speechlm.training import textgen
from speechlm.training.teachers import get_teacher
from speechlm.training.textnorm import normalize_text, spoken_words

VOICES = ("espeak:en-us+m7", "espeak:en-gb+f4", "espeak:en-gb-scotland+klatt3", "piper:joe")  # held-out espeak voices, and joe


def errors_ms(values: list[float]) -> dict:
    v = np.asarray(values) * 1000
    return {"words": len(v), "median_abs_ms": round(float(np.median(np.abs(v))), 1), "p90_abs_ms": round(float(np.percentile(np.abs(v), 90)), 1),
            "within_40ms": round(float(np.mean(np.abs(v) <= 40)), 3), "mean_ms": round(float(v.mean()), 1)}


def whisper_judge():
    try:
        from speechlm.judge import WhisperJudge

        return WhisperJudge()
    except Exception:  # noqa: BLE001 - no [eval] extra
        return None


def whisper_words(judge, audio: np.ndarray) -> list[tuple[str, float, float]]:
    """Whisper tiny.en's words (normalized, lower case) with its word timestamps."""
    segments, _ = judge.model.transcribe(audio, word_timestamps=True, language="en", beam_size=1, condition_on_previous_text=False)
    return [(tok.lower(), w.start, w.end) for s in segments for w in s.words for tok in spoken_words(normalize_text(w.word.strip()))]


def matched_differences(ours: list[tuple[str, float, float]], theirs: list[tuple[str, float, float]]) -> tuple[list[float], list[float]]:
    """Start and end differences (ours - theirs) over the words both give, matched in order."""
    starts, ends = [], []
    blocks = difflib.SequenceMatcher(a=[o[0] for o in ours], b=[t[0] for t in theirs], autojunk=False).get_matching_blocks()
    for block in blocks:
        for k in range(block.size):
            o, t = ours[block.a + k], theirs[block.b + k]
            starts.append(o[1] - t[1])
            ends.append(o[2] - t[2])
    return starts, ends


def synthetic(checker, voices: list[str], count: int, judge) -> dict:
    items = textgen.generate("everyday", count, split="test", seed=11) + textgen.generate("numbers", count // 2, split="test", seed=11)
    out = {}
    for voice in voices:
        teacher = get_teacher(voice)
        starts, ends, scores, w_starts, w_ends = [], [], [], [], []
        for item in items:
            syn = teacher.synthesize(item["text"], random.Random(item["id"]))
            alignment = align_words(syn.audio, item["text"], checker)
            assert [w.word for w in alignment.words] == [w.word for w in syn.words]
            starts += [a.start - b.start for a, b in zip(alignment.words, syn.words)]
            ends += [a.end - b.end for a, b in zip(alignment.words, syn.words)]
            scores.append(alignment.score)
            if judge is not None:
                s, e = matched_differences(whisper_words(judge, syn.audio), [(w.word.lower(), w.start, w.end) for w in syn.words])
                w_starts += s
                w_ends += e
        out[voice] = {"utterances": len(items), "start": errors_ms(starts), "end": errors_ms(ends), "score_median": round(float(np.median(scores)), 2)}
        if w_starts:
            out[voice]["whisper"] = {"start": errors_ms(w_starts), "end": errors_ms(w_ends)}
        print(voice, json.dumps(out[voice]), flush=True)
    return out


def real(checker, data: Path, count: int, judge) -> dict:
    rows = [r for r in csv.DictReader((data / "pseudo_transcripts.tsv").open(), delimiter="\t") if int(r["speaker"]) >= 7000][:count]
    right, wrong, starts, ends, total = [], [], [], [], 0
    for i, row in enumerate(rows):
        audio = load_audio(data / row["file"])
        alignment = align_words(audio, row["whisper_base_hypothesis"], checker)
        right.append(alignment.score)
        try:
            wrong.append(align_words(audio, rows[(i + 1) % len(rows)]["whisper_base_hypothesis"], checker).score)
        except AlignError:
            wrong.append(float("inf"))
        if judge is None:
            continue
        ours = [(w.word.lower(), w.start, w.end) for w in alignment.words]
        total += len(ours)
        s, e = matched_differences(ours, whisper_words(judge, audio))
        starts += s
        ends += e
    out = {"recordings": len(rows), "score_own_transcript": [round(x, 2) for x in sorted(right)],
           "score_another_transcript": [round(x, 2) for x in sorted(wrong)]}
    if judge is not None:
        out["vs_whisper"] = {"words_matched": len(starts), "words": total, "start": errors_ms(starts), "end": errors_ms(ends)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checker", default="checker-en")
    ap.add_argument("--voices", default=",".join(VOICES))
    ap.add_argument("--count", type=int, default=20, help="everyday sentences per voice (and half as many numbers)")
    ap.add_argument("--real", type=int, default=24, help="held-out LibriSpeech recordings (0: none)")
    ap.add_argument("--librispeech", default="../shared/data/librispeech-251")
    ap.add_argument("--out")
    args = ap.parse_args()
    checker = PronunciationChecker.from_pretrained(args.checker).eval()
    judge = whisper_judge()
    result = {"checker": args.checker, "synthetic": synthetic(checker, args.voices.split(","), args.count, judge)}
    if args.real:
        result["real"] = real(checker, Path(args.librispeech), args.real, judge)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
