"""The model's voices (``speechlm tts --voice NAME``) against the teachers they learned from (needs the [eval] extra).

For each voice NAME=TEACHER (``default`` = the model's own voice), on held-out sentences (test split: text never
trained on), our speech and the teacher's:

* intelligibility: Whisper tiny.en's corpus WER of each, side by side (the TTS target: ours <= teacher + 5 points),
  and of the teacher's speech through the codec (the floor for speech in these codes: a voice the codec cannot
  carry cannot be learned);
* whose voice it is: the median pitch of the voiced frames (Hz), and the distance between long-term average
  spectra (mean log10 mel energy of the sounding frames, 40 bands; mean absolute difference) of each of our voices
  to each teacher -- a voice should be nearest its own teacher;
* speed: our real-time factor per voice (one process, side by side: a voice adapter is merged into the weights,
  so it should cost nothing).

    python benchmarks/voices.py --voices default=espeak:en-us,joe=piper:joe --count 40 --dtype bfloat16 \
        --out docs/results/voices.json

``--screen V1,V2,...``: only the teachers and the codec floor, for choosing which voice to train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from speech_lm import TTS_SOURCES, corpus_wer, held_out_texts

from speechlm.codec.audio import SAMPLE_RATE
from speechlm.codec.losses import mel_filterbank
from speechlm.judge import WhisperJudge
from speechlm.speech import Generation, SpeechPipeline, resolve_dtype
from speechlm.training.teachers import get_teacher

FRAME, HOP = 640, 160  # 40 ms frames every 10 ms


def _frames(audio: np.ndarray) -> np.ndarray:
    """(T,) -> (F, FRAME) overlapping frames, mean removed."""
    if len(audio) < FRAME:
        return np.zeros((0, FRAME), np.float32)
    index = np.arange(0, len(audio) - FRAME + 1, HOP)[:, None] + np.arange(FRAME)[None]
    frames = audio[index]
    return frames - frames.mean(axis=1, keepdims=True)


def _sounding(frames: np.ndarray) -> np.ndarray:
    """Frames within 30 dB of the loudest frame."""
    energy = (frames**2).mean(axis=1)
    return energy > energy.max(initial=0.0) * 1e-3


def pitches(audio: np.ndarray, fmin: float = 60.0, fmax: float = 400.0, threshold: float = 0.5) -> np.ndarray:
    """Pitch (Hz) of the voiced frames of ``audio`` (T,) at 16 kHz: the lag of the highest normalized autocorrelation
    within [fmin, fmax], for sounding frames whose peak is above ``threshold``."""
    frames = _frames(audio.astype(np.float64))
    frames = frames[_sounding(frames)] * np.hanning(FRAME)
    if not len(frames):
        return np.zeros(0)
    spectrum = np.fft.rfft(frames, 2 * FRAME, axis=1)
    ac = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :FRAME]
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    ac = ac / np.maximum(1.0 - np.arange(FRAME) / FRAME, 1e-3)  # undo the bias of the shrinking overlap
    lo, hi = int(SAMPLE_RATE / fmax), int(SAMPLE_RATE / fmin)
    lag = lo + np.argmax(ac[:, lo : hi + 1], axis=1)
    voiced = ac[np.arange(len(ac)), lag] > threshold
    return SAMPLE_RATE / lag[voiced]


def average_spectrum(audios: list[np.ndarray], bands: int = 40) -> np.ndarray:
    """Long-term average spectrum: mean log10 mel energy (bands,) over the sounding frames of all ``audios``."""
    fb = mel_filterbank(SAMPLE_RATE, FRAME, bands).numpy()
    rows = []
    for audio in audios:
        frames = _frames(audio.astype(np.float64))
        frames = frames[_sounding(frames)] * np.hanning(FRAME)
        if len(frames):
            rows.append(np.log10(np.abs(np.fft.rfft(frames, axis=1)) ** 2 @ fb.T + 1e-10))
    return np.concatenate(rows).mean(axis=0) if rows else np.zeros(bands)


def through_codec(sp: SpeechPipeline, audio: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return sp.codec.decode(sp.codec.encode(torch.from_numpy(audio)[None]))[0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--codec", help="codec directory or name (default: the one saved with the model)")
    ap.add_argument("--voices", default="default=espeak:en-us", help="NAME=TEACHER,... (default = the model's own voice)")
    ap.add_argument("--screen", help="V1,V2,...: only these teachers and their speech through the codec (no model voices)")
    ap.add_argument("--count", type=int, default=40, help="held-out sentences")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the results here (.json)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    voices = {} if args.screen else dict(part.split("=", 1) for part in args.voices.split(","))
    teachers_only = args.screen.split(",") if args.screen else []
    sp = SpeechPipeline.from_pretrained(args.model, codec=args.codec, dtype=resolve_dtype(args.dtype))
    unknown = sorted(set(voices) - set(sp.voices()))
    if unknown:
        raise SystemExit(f"{args.model} has no voice {', '.join(unknown)}; it speaks: {', '.join(sp.voices())}")
    judge = WhisperJudge()
    texts = [item["text"] for item in held_out_texts(TTS_SOURCES, args.count)]
    heard: dict[str, list[tuple[str, str]]] = {}
    audio: dict[str, list[np.ndarray]] = {}
    wall: dict[str, float] = {}
    for name, teacher_voice in [*voices.items(), *((None, v) for v in teachers_only)]:
        teacher, rng = get_teacher(teacher_voice), random.Random(0)
        g = dataclasses.replace(Generation(), voice=name or "default")
        systems = [f"teacher {teacher_voice}", f"teacher {teacher_voice} through codec", *([f"ours {name}"] if name else [])]
        for who in systems:
            heard[who], audio[who], wall[who] = [], [], 0.0
        for text in texts:
            spoken = teacher.synthesize(text, rng).audio
            outputs = [spoken, through_codec(sp, spoken)]
            if name:
                start = time.perf_counter()
                outputs.append(sp.tts(text, generation=g))
                wall[f"ours {name}"] += time.perf_counter() - start
            for who, a in zip(systems, outputs):
                audio[who].append(a)
                heard[who].append((text, judge(a) if len(a) >= SAMPLE_RATE // 10 else ""))
    spectra = {who: average_spectrum(a) for who, a in audio.items()}
    teachers = [who for who in audio if who.startswith("teacher ") and not who.endswith(" through codec")]
    result = {"model": args.model, "sentences": len(texts), "dtype": args.dtype, "voices": voices, "systems": {}}
    for who, a in audio.items():
        f0 = np.concatenate([pitches(x) for x in a])
        seconds = sum(len(x) for x in a) / SAMPLE_RATE
        result["systems"][who] = {
            "wer": corpus_wer(heard[who]),
            "median_pitch_hz": float(np.median(f0)) if len(f0) else None,
            "spectrum_distance": {t: float(np.abs(spectra[who] - spectra[t]).mean()) for t in teachers},
            **({"rtf": wall[who] / max(seconds, 1e-9)} if who in wall and who.startswith("ours ") else {}),
            "mean_seconds": seconds / len(a),
            "examples": [{"text": t, "heard": h} for t, h in heard[who][:4]],
        }
    print(f"{len(texts)} held-out sentences, {args.model} ({args.dtype}, {args.threads} thread)")
    print(f"{'system':44} {'WER':>6} {'pitch':>6} " + " ".join(f"{'d(' + t[8:] + ')':>18}" for t in teachers) + f" {'RTF':>5}")
    for who, s in result["systems"].items():
        dist = " ".join(f"{s['spectrum_distance'][t]:18.3f}" for t in teachers)
        rtf = f"{s['rtf']:5.2f}" if "rtf" in s else "    -"
        print(f"{who:44} {100 * s['wer']:5.1f}% {s['median_pitch_hz'] or 0:6.0f} {dist} {rtf}")
    result["median_sentence_seconds"] = statistics.median(len(x) / SAMPLE_RATE for x in audio[teachers[0]])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
