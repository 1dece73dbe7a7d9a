"""Which views of the audio help the speech LM's ASR? Side by side on the same utterances.

Every family decodes one transcript from K views with the same machinery
(``SpeechPipeline.transcribe_views``: each view's greedy transcript and the views' joint one,
chosen by their total likelihood over the views); ``one`` is plain greedy decoding of the audio.

* ``level``: the shipped views (``speechlm.speech.listening_views``: the same audio at other levels)
* ``shift``: the codec's frame grid moved: the first ``k * frame / K`` samples dropped
* ``speed``: resampled by 0.9 and 1.1 (pitch and tempo change together, as in speed perturbation)

Held-out voices (espeak variants never trained on) speaking test-split text, as
``benchmarks/speech_lm.py --tasks asr``; one thread.

    python benchmarks/asr_views.py --count 80 --views 4 --out docs/results/asr_view_families.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from speech_lm import TTS_SOURCES, corpus_wer, held_out_texts

from speechlm.codec.audio import SAMPLE_RATE, resample
from speechlm.speech import Generation, SpeechPipeline, listening_views
from speechlm.training import textgen
from speechlm.training.teachers import get_teacher


def families(frame_length: int, count: int):
    def shift(audio):
        return [audio[k * frame_length // count :] for k in range(count)]

    def speed(audio):
        factors = [1.0, 0.9, 1.1, 0.95, 1.05, 0.85, 1.15, 1.0][:count]
        # a factor f plays the audio f times as fast: resample from SAMPLE_RATE * f to SAMPLE_RATE
        return [audio if f == 1.0 else resample(audio, int(SAMPLE_RATE * f), SAMPLE_RATE) for f in factors]

    return {"one": lambda audio: listening_views(audio, 1), "level": lambda audio: listening_views(audio, count), "shift": shift, "speed": speed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--count", type=int, default=80)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--families", default="one,level,shift,speed")
    ap.add_argument("--voice-split", default="test", choices=("test", "train"))
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sp = SpeechPipeline.from_pretrained(args.model)
    items = held_out_texts(TTS_SOURCES, args.count)
    voices = textgen.voice_catalog(args.voice_split, ("espeak",))
    rng = random.Random(1)
    utterances = [(item["text"], get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio) for i, item in enumerate(items)]
    make = families(sp.codec.config.frame_length, args.views)
    runs = [(name, name, Generation()) for name in args.families.split(",")]
    result = {"model": args.model, "count": len(utterances), "views": args.views, "voice_split": args.voice_split, "families": {}}
    for name, family, g in runs:
        pairs, seconds = [], 0.0
        for ref, audio in utterances:
            t = time.perf_counter()
            pairs.append((ref, sp.transcribe_views(make[family](audio), g)))
            seconds += time.perf_counter() - t
        result["families"][name] = {"wer": corpus_wer(pairs), "seconds_per_utterance": seconds / len(pairs),
                                    "examples": [{"ref": r, "hyp": h} for r, h in pairs[:8]]}
        print(name, round(result["families"][name]["wer"], 4), round(seconds / len(pairs), 3), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
