"""Does the answer assist answer noise? Frame by frame through the assisted duplex model (the server's model, on the
model's own clock, no network), one session: the user sends nothing but a burst of noise, then silence.

Each trial: 0.5 s of silence, ``--noise-seconds`` of one noise kind (speechlm.training.vad_train's kinds, at
``--level-db`` dBFS RMS), then ``--listen-seconds`` of silence. Counted per trial: whether the model said anything
(any output frame above -60 dBFS), the user transcript the assist sent (it heard a question), and the model's text.
Run with the assist's speech detector (``AssistConfig.speech_detector``, default vad-en) and without it (None), the
same trials one after the other; a held-out spoken question is run first both ways as a check that speech is still
answered. The duplex model's noise gate asks ``--gate-detector`` (the server's ``--gate-detector``, default vad-en)
frame by frame whether a sound is speech; ``none`` = the level alone (how the figures before 2026-12-07's loud-room
work were made).

    python benchmarks/assist_noise.py --out docs/results/assist_noise.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parent))
from duplex import frames_of, run  # noqa: E402

from speechlm.streaming.assist import AssistConfig, build_assisted_model  # noqa: E402
from speechlm.streaming.duplex_model import DuplexSpeechModel  # noqa: E402
from speechlm.streaming.settings import none_or  # noqa: E402
from speechlm.training import textgen  # noqa: E402
from speechlm.training.teachers import get_teacher  # noqa: E402
from speechlm.training.vad_train import HELD_OUT_NOISES, TRAIN_NOISES, noise  # noqa: E402

SPOKE_RMS = 1e-3  # -60 dBFS


def trial(model, user: np.ndarray) -> dict:
    heard: list[str] = []
    pcm, texts = run(model, user, heard)
    return {"spoke": bool((np.sqrt((pcm**2).mean(axis=1)) > SPOKE_RMS).any()), "heard": " ".join(h for h in heard if h),
            "said": "".join(t for t in texts if t and t != "<pad>")}


def over_reply(duplex, args, question_trial: np.ndarray, rng, silence) -> dict:
    """The question, then ``--over-reply`` seconds into the reply a burst of noise (each kind) as long as
    ``--noise-seconds``: does the reply go on (the rest of it is said: at least 80 % of the undisturbed reply's
    sounding frames after the burst's start, and no other question was heard: the noise taken for one is answered
    instead)? Also whether the model speaks within 1 s of the burst's end (a reply held while the noise lasts; one
    that goes on through the noise may be over by then). Without the assist's detector and with it; the undisturbed
    reply first (it must still be going then)."""
    n = duplex.frame_length
    fps = duplex.sample_rate / n
    model = build_assisted_model(duplex, args.assist, config=AssistConfig())
    pcm, _ = run(model, question_trial)
    spoke = np.sqrt((pcm**2).mean(axis=1)) > SPOKE_RMS
    onset = int(np.argmax(spoke[int(0.5 * fps) + 1:])) + int(0.5 * fps) + 1
    cut, burst_frames = onset + int(args.over_reply * fps), int(args.noise_seconds * fps)
    end = cut + burst_frames
    rest = int(spoke[cut:].sum())  # the undisturbed reply's sounding frames from the burst's start on
    out = {"reply_onset_s": onset / fps, "undisturbed_speaks_after": bool(spoke[end: end + int(fps)].any()),
           "undisturbed_rest_frames": rest, "kinds": {}}
    for kind in args.kinds.split(","):
        burst = frames_of(noise(kind, burst_frames * n, rng) * 10 ** (args.level_db / 20), n)
        user = np.concatenate([question_trial[:cut], burst, silence(4.0)])
        row = {}
        for name, detector in (("with vad-en", "vad-en"), ("without a detector", None)):
            m = build_assisted_model(duplex, args.assist, config=AssistConfig(speech_detector=detector))
            heard: list[str] = []
            pcm, _ = run(m, user, heard)
            questions = [h for h in heard if h]
            sounding = np.sqrt((pcm**2).mean(axis=1)) > SPOKE_RMS
            row[name] = {"spoke_after": bool(sounding[end: end + int(fps)].any()), "rest_said": round(int(sounding[cut:].sum()) / max(rest, 1), 2),
                         "questions_heard": questions, "invented_question": len(questions) > 1}
        out["kinds"][kind] = row
        print("over the reply", kind, json.dumps(row), flush=True)
    names = ("with vad-en", "without a detector")
    out["went_on"] = {name: sum(r[name]["rest_said"] >= 0.8 and not r[name]["invented_question"] for r in out["kinds"].values()) for name in names}
    out["spoke_after_the_burst"] = {name: sum(r[name]["spoke_after"] for r in out["kinds"].values()) for name in names}
    out["invented_questions"] = {name: sum(r[name]["invented_question"] for r in out["kinds"].values()) for name in names}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="duplex-default")
    ap.add_argument("--assist", default="speechlm-default")
    ap.add_argument("--kinds", default=",".join(TRAIN_NOISES + HELD_OUT_NOISES))
    ap.add_argument("--level-db", type=float, default=-30.0)
    ap.add_argument("--noise-seconds", type=float, default=2.0)
    ap.add_argument("--listen-seconds", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--over-reply", type=float, help="instead: the noise starts this many seconds into the reply to a question")
    ap.add_argument("--gate-detector", default="vad-en", help="the duplex model's noise gate's speech detector ('none': the level alone)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gate_detector = none_or(args.gate_detector)
    duplex = DuplexSpeechModel.from_pretrained(args.lm, "codec-16k", seed=0, speech_detector=gate_detector)
    n = duplex.frame_length
    fps = duplex.sample_rate / n
    rng = np.random.default_rng(args.seed)

    def silence(seconds: float) -> np.ndarray:
        return np.zeros((int(seconds * fps), n), np.float32)

    item = textgen.generate("arithmetic", 1, split="test", seed=1)[0]
    question = frames_of(get_teacher(textgen.voice_catalog("test", ("espeak",))[0]).synthesize(item["text"], random.Random(0)).audio, n)
    trials = {"question: " + item["text"]: np.concatenate([silence(0.5), question, silence(args.listen_seconds)])}
    for kind in args.kinds.split(","):
        burst = noise(kind, int(args.noise_seconds * fps) * n, rng) * 10 ** (args.level_db / 20)
        trials[kind] = np.concatenate([silence(0.5), frames_of(burst, n), silence(args.listen_seconds)])
    result = {"command": "python benchmarks/assist_noise.py " + " ".join(sys.argv[1:]), "runs": {}}
    if args.over_reply:
        result["over_reply"] = over_reply(duplex, args, trials.pop("question: " + item["text"]), rng, silence)
    for name, detector in () if args.over_reply else (("with vad-en", "vad-en"), ("without a detector", None)):
        model = build_assisted_model(duplex, args.assist, config=AssistConfig(speech_detector=detector))
        rows = {k: trial(model, user) for k, user in trials.items()}
        noise_rows = [r for k, r in rows.items() if not k.startswith("question")]
        result["runs"][name] = {"noise_trials": len(noise_rows), "spoke": sum(r["spoke"] for r in noise_rows),
                                "heard_a_question": sum(bool(r["heard"]) for r in noise_rows), "trials": rows}
        print(name, json.dumps({k: v for k, v in result["runs"][name].items() if k != "trials"}), json.dumps(next(iter(rows.values()))), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
