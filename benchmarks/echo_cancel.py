"""What the microphone client's echo canceller (speechlm.streaming.echo, WebRTC's AEC3) takes out, and what it costs.

Held-out sentences (espeak-ng, held-out voices) play on the "speakers" and come back into the "microphone" through
benchmarks/duplex.py's EchoPath (a small room, ``--gain`` of their level, ``--delay-ms`` later); after half of them the
user (another held-out voice) talks while nothing plays. Block by block as the client runs (40 ms: the block played,
then the block heard, cleaned): the echo return loss enhancement (ERLE, dB: the echo's energy over what is left of it)
after the first ``--settle`` seconds, the share of 20 ms frames the speech detector vad-en hears as speech in the echo
before and after, the user's level kept, and the canceller's time per second of audio (one thread, both sides).

    python benchmarks/echo_cancel.py --out docs/results/echo/echo_cancel.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from duplex import EchoPath

from speechlm.codec.audio import SAMPLE_RATE
from speechlm.streaming.echo import EchoCanceller
from speechlm.training import textgen
from speechlm.training.teachers import get_teacher
from speechlm.vad import SpeechDetector

BLOCK = 640


def speech(texts: list[dict], voices: list[str], rng: random.Random) -> np.ndarray:
    parts = []
    for i, item in enumerate(texts):
        audio = get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio
        parts += [audio * (0.5 / np.abs(audio).max()), np.zeros(SAMPLE_RATE // 4, np.float32)]
    audio = np.concatenate(parts).astype(np.float32)
    return np.pad(audio, (0, (-len(audio)) % BLOCK))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10, help="sentences the model says (and as many the user says)")
    ap.add_argument("--gain", type=float, default=0.3)
    ap.add_argument("--delay-ms", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds the canceller learns the room before ERLE counts")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(5)
    voices = textgen.voice_catalog("test", ("espeak",))
    model = speech(textgen.generate("everyday", args.count, split="test", seed=3), voices, rng)
    user = speech(textgen.generate("arithmetic", args.count, split="test", seed=4), voices[::-1], rng)
    played = np.concatenate([model, np.zeros_like(user)])
    near = np.concatenate([np.zeros_like(model), user])
    path, canceller = EchoPath(BLOCK, args.gain, args.delay_ms), EchoCanceller(delay_ms=args.delay_ms)
    echo, cleaned, spent = [], [], 0.0
    for start in range(0, len(played), BLOCK):
        echo.append(path.hear(played[start : start + BLOCK]))
        t = time.perf_counter()
        canceller.played(played[start : start + BLOCK])
        cleaned.append(canceller.clean(echo[-1] + near[start : start + BLOCK]))
        spent += time.perf_counter() - t
    echo, cleaned = np.concatenate(echo), np.concatenate(cleaned)
    settled, talking = slice(int(args.settle * SAMPLE_RATE), len(model)), slice(len(model), len(played))
    detector = SpeechDetector.from_pretrained("vad-en")

    def speech_share(audio: np.ndarray) -> float:
        return round(float((detector.probabilities([audio])[0] > 0.5).mean()), 3)

    result = {
        "seconds": round(len(played) / SAMPLE_RATE, 1),
        "erle_db": round(float(10 * np.log10((echo[settled] ** 2).mean() / (cleaned[settled] ** 2).mean())), 1),
        "echo_heard_as_speech": speech_share(echo[settled]),
        "cleaned_heard_as_speech": speech_share(cleaned[settled]),
        "user_level_kept_db": round(float(10 * np.log10((cleaned[talking] ** 2).mean() / (user**2).mean())), 1),
        "user_heard_as_speech": [speech_share(user), speech_share(cleaned[talking])],
        "ms_per_second_of_audio": round(1000 * spent / (len(played) / SAMPLE_RATE), 2),
        "command": "python benchmarks/echo_cancel.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
