"""The speech detector (``speechlm.vad``): does it keep noise from being transcribed, and let every speech through?

The detector hears each clip as ``SpeechPipeline.heard_speech`` gives it to it: peak-normalized to the ASR's level
(``--as-given``: at the level it has).

1. Noise alone: ``--crops`` crops of ``--seconds`` of every noise kind (those it was trained on, and the held-out
   ones it never met: music-like notes, frequency sweeps), each at -50, -30 and -10 dBFS: the share of crops in
   which the detector hears speech (the ASR would transcribe them).
2. Speech: short words ("Yes.", "Two.", ...) by held-out espeak voices, held-out synthetic voices (a synth corpus of
   test-split voices and texts) and real read speech
   (LibriSpeech speakers >= 7000, never trained on), clean at its own level, quiet (-50 dBFS active level), and
   under noise (every kind, train and held out) at 20, 10, 5 and 0 dB SNR: the share of clips in which the
   detector hears no speech (the ASR would give an empty transcript).
3. What the ASR makes of noise: the shipped speech LM's transcripts of ``--asr-crops`` crops of each noise kind
   at -30 dBFS, without the detector (``speech_detector=None``) and with it: how many are not empty.
4. Cost: the detector's milliseconds per second of audio on one thread, beside the ASR's on the same clips.

    python benchmarks/vad.py --speech data/synth-vad-test --librispeech ../shared/data/librispeech-251 --out docs/results/vad.json

``data/synth-vad-test`` = ``speechlm data synth --builtin everyday,commands,facts --split test --count 60 --seed 5
--voices $(speechlm data voices --split test --comma) --out data/synth-vad-test``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from speechlm.codec.audio import PEAK_LEVEL, SAMPLE_RATE, load_audio
from speechlm.speech import Generation, SpeechPipeline
from speechlm.training.rooms import active_rms
from speechlm.training.vad_train import HELD_OUT_NOISES, TRAIN_NOISES, noise
from speechlm.vad import SpeechDetector

NOISE_LEVELS_DB = (-50.0, -30.0, -10.0)
SNRS_DB = (20.0, 10.0, 5.0, 0.0)
QUIET_DB = -50.0


SHORT_WORDS = ("Yes.", "No.", "Hi.", "Stop.", "Okay.", "Two.", "Eight.", "What?")
SHORT_WORD_VOICES = ("en-us+m7", "en-gb+f4", "en-us+klatt3", "en-029", "en-us+Annie")  # held-out espeak voices


def speech_sets(args) -> dict[str, list[np.ndarray]]:
    from speechlm.training.espeak import Espeak

    sets = {"short words, held-out voices": [Espeak.instance().synthesize(w, v).audio for w in SHORT_WORDS for v in SHORT_WORD_VOICES]}
    if args.speech:
        rows = [json.loads(line) for line in (Path(args.speech) / "manifest.jsonl").read_text().splitlines() if line.strip()]
        sets["held-out voices (sentences)"] = [load_audio(Path(args.speech) / r["audio"]) for r in rows[: args.clips]]
    if args.librispeech:
        files = sorted(p for p in Path(args.librispeech).glob("*.flac") if int(p.name.split("-")[0]) >= 7000)
        sets["LibriSpeech >= 7000"] = [load_audio(p) for p in files[: args.clips]]
    return sets


class Detector:
    """The speech detector as the ASR asks it (peak-normalized audio), or with the audio as given."""

    def __init__(self, name: str, as_given: bool):
        self.model, self.as_given = SpeechDetector.from_pretrained(name), as_given

    def has_speech(self, audios: list[np.ndarray]) -> list[bool]:
        return self.model.has_speech(audios, level=None if self.as_given else PEAK_LEVEL)


def level(audio: np.ndarray, db: float) -> np.ndarray:
    return (audio * 10 ** (db / 20) / max(active_rms(audio), 1e-9)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="vad-en")
    ap.add_argument("--model", default="speechlm-default", help="the speech LM whose ASR hears the noise (part 3)")
    ap.add_argument("--speech", help="a synth corpus of held-out voices")
    ap.add_argument("--librispeech", help="the LibriSpeech folder (speakers >= 7000 are used)")
    ap.add_argument("--clips", type=int, default=48, help="clips of each speech set")
    ap.add_argument("--crops", type=int, default=20, help="noise crops per kind and level")
    ap.add_argument("--asr-crops", type=int, default=4, help="noise crops per kind the ASR hears (part 3; 0 = skip)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--as-given", action="store_true", help="the detector hears each clip at its own level, not normalized")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    detector = Detector(args.detector, args.as_given)
    rng = np.random.default_rng(args.seed)
    n = int(args.seconds * SAMPLE_RATE)
    result: dict = {"detector": args.detector, "as_given": args.as_given, "command": "python benchmarks/vad.py " + " ".join(sys.argv[1:])}

    # 1. noise alone
    noise_only = {}
    for kind in TRAIN_NOISES + HELD_OUT_NOISES:
        for db in NOISE_LEVELS_DB:
            crops = [noise(kind, n, rng) * 10 ** (db / 20) for _ in range(args.crops)]
            noise_only[f"{kind} {db:.0f}"] = float(np.mean(detector.has_speech(crops)))
    result["noise_heard_as_speech"] = noise_only
    result["noise_heard_as_speech_mean"] = {
        "trained kinds": float(np.mean([v for k, v in noise_only.items() if k.split()[0] in TRAIN_NOISES])),
        "held-out kinds": float(np.mean([v for k, v in noise_only.items() if k.split()[0] in HELD_OUT_NOISES]))}
    print(json.dumps(result["noise_heard_as_speech_mean"]), flush=True)

    # 2. speech
    missed = {}
    for name, clips in speech_sets(args).items():
        row = {"clips": len(clips), "clean": float(1 - np.mean(detector.has_speech(clips))),
               f"quiet ({QUIET_DB:.0f} dBFS)": float(1 - np.mean(detector.has_speech([level(c, QUIET_DB) for c in clips])))}
        for snr in SNRS_DB:
            for group, kinds in (("trained", TRAIN_NOISES), ("held-out", HELD_OUT_NOISES)):
                noisy = []
                for c in clips:
                    kind = kinds[int(rng.integers(len(kinds)))]
                    noisy.append(c + noise(kind, len(c), rng) * active_rms(c) * 10 ** (-snr / 20))
                row[f"{group} noise {snr:.0f} dB"] = float(1 - np.mean(detector.has_speech(noisy)))
        missed[name] = row
        print(name, json.dumps(row), flush=True)
    result["speech_missed"] = missed

    # 3. the ASR on noise, without and with the detector; 4. cost
    if args.asr_crops:
        pipeline = SpeechPipeline.from_pretrained(args.model)
        crops = {kind: [noise(kind, n, rng) * 10 ** (-30 / 20) for _ in range(args.asr_crops)] for kind in TRAIN_NOISES + HELD_OUT_NOISES}
        asr = {}
        seconds = {"asr": 0.0, "detector": 0.0}
        for kind, audios in crops.items():
            t0 = time.perf_counter()
            without = pipeline.asr_many(audios, generation=Generation(speech_detector=None))
            t1 = time.perf_counter()
            detector.model.has_speech(audios)
            seconds["detector"] += time.perf_counter() - t1
            seconds["asr"] += t1 - t0
            with_detector = pipeline.asr_many(audios, generation=Generation(speech_detector=args.detector))
            asr[kind] = {"transcribed_without": sum(bool(t) for t in without), "transcribed_with": sum(bool(t) for t in with_detector),
                         "examples": without[:2]}
        total = args.asr_crops * len(crops)
        result["asr_on_noise"] = {"crops": total, "level_dbfs": -30,
                                  "transcribed_without": sum(v["transcribed_without"] for v in asr.values()),
                                  "transcribed_with": sum(v["transcribed_with"] for v in asr.values()), "by_kind": asr}
        audio_seconds = total * args.seconds
        result["ms_per_audio_second"] = {k: 1000 * v / audio_seconds for k, v in seconds.items()}
        print(json.dumps({k: v for k, v in result["asr_on_noise"].items() if k != "by_kind"}), json.dumps(result["ms_per_audio_second"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
