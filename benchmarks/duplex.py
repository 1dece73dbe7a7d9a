"""The full-duplex model's turn-taking, measured frame by frame (no network: the model's own clock).

For each held-out spoken question (arithmetic and facts, test split, held-out espeak voices):

* **response onset**: the user's question, then silence; the time from the end of the user's
  speech (its last voiced frame) to the start of the model's first voiced run at or after it
  (a sound the model was already making then, e.g. a backchannel, is not the reply: such
  trials are counted in ``speaking_at_user_end_share``);
* **answer**: what Whisper tiny.en hears in the model's reply (needs the [eval] extra), and
  whether it holds the expected answer;
* **barge-in**: once the model has spoken for ``--barge-after`` seconds, the user talks over it
  (another held-out utterance); the time from the user's speech onset to the model's silence
  (its first silent frame that stays silent for ``--quiet-frames``); only trials in which the
  model is still talking when the user starts count (``barge_in_trials``). ``--barge-after``
  takes several times (``0.4,0.6,0.8``): one trial per question and time, pooled — at 20
  questions one time gives 10–20 trials, whose median moves by a frame or two between runs;
* **quiet while the user talks**: the share of frames during the question where the model speaks;
* **backchannels** (``--backchannel-after``, several times pool): once the model has spoken that long, the user says
  "mm-hm" (or "yeah", "right", ...) over it; the model should talk on, as the training dialogues
  do. A trial counts when the undisturbed reply (the first run) goes on through the window from
  the backchannel's onset to 0.3 s after its end; the model *yielded* if a silence of
  ``--quiet-frames`` starts inside that window (``yielded_to_backchannel_share``; a pause the
  reply would have made anyway can count too, so compare versions, not against 0), and whether it
  *talked on* (spoke again within 1 s of the backchannel's end: no pause, or a pause and a resume;
  ``talked_on_after_backchannel_share``).

Frames are 40 ms: every time here is a multiple of one frame.

    python benchmarks/duplex.py --lm duplex-default --count 20 --out docs/results/duplex.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
from pathlib import Path

import numpy as np
import torch

from speechlm.codec.audio import SAMPLE_RATE
from speechlm.judge import answer_heard
from speechlm.lm.generate import GREEDY, parse_codebook_temperatures
from speechlm.streaming.duplex_model import AUDIO_SAMPLING, TEXT_SAMPLING, DuplexSpeechModel
from speechlm.streaming.settings import none_or
from speechlm.training import textgen
from speechlm.training.teachers import get_teacher
from speechlm.training.vad_train import HELD_OUT_NOISES, TRAIN_NOISES, noise


def frames_of(audio: np.ndarray, n: int) -> np.ndarray:
    """(T,) -> (F, n), zero-padded to whole frames."""
    pad = (-len(audio)) % n
    return np.pad(audio, (0, pad)).reshape(-1, n)


def voiced(frames: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    return np.sqrt((frames**2).mean(axis=1)) > threshold


ROOM_NOISE = 0.0  # --noise-rms
ROOM_KIND = "white"  # --noise-kind


def room(shape: tuple[int, int]) -> np.ndarray:
    """(F, n) of the room's noise: ``ROOM_KIND`` at RMS ``ROOM_NOISE``, seeded by the length (repeatable)."""
    rng = np.random.default_rng(shape[0])
    if ROOM_KIND == "white":  # as before --noise-kind existed
        return ROOM_NOISE * rng.standard_normal(shape)
    return ROOM_NOISE * noise(ROOM_KIND, shape[0] * shape[1], rng).reshape(shape)


ECHO_GAIN = 0.0  # --echo-gain
ECHO_DELAY_MS = 10.0  # --echo-delay-ms
ECHO_CANCEL = False  # --echo-cancel


class EchoPath:
    """Speakers to microphone: what is played comes back ``delay_ms`` later through a small room's decaying
    reflections (100 ms), at ``gain`` of its RMS."""

    def __init__(self, frame_length: int, gain: float, delay_ms: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.room = rng.standard_normal(1600) * np.exp(-np.arange(1600) / 250.0)
        self.room *= gain / np.sqrt((self.room**2).sum())
        self.n, self.delay = frame_length, int(delay_ms * SAMPLE_RATE / 1000)
        self.played = np.zeros(len(self.room) + self.delay + frame_length, np.float32)

    def hear(self, played: np.ndarray) -> np.ndarray:
        """(n,) played during this frame -> (n,) of the speakers' sound in the microphone during it."""
        self.played = np.concatenate([self.played[self.n :], played])
        end = len(self.played) - self.delay
        return np.convolve(self.played, self.room)[end - self.n : end].astype(np.float32)


def run(model: DuplexSpeechModel, user: np.ndarray, heard: list[str] | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Feed ``user`` (F, n) frame by frame to one session -> (model pcm (F, n), text pieces).
    ``heard`` collects the user transcripts the model sends (answer assist). With ``ROOM_NOISE``,
    the room's noise (:func:`room`) is added to every frame. With ``ECHO_GAIN``, the microphone also hears the
    model's audio of the frame before (played during this one) through :class:`EchoPath`, and with ``ECHO_CANCEL``
    the client's echo canceller (speechlm.streaming.echo) cleans it out first."""
    if ROOM_NOISE:
        user = (user + room(user.shape)).astype(np.float32)
    echo = EchoPath(user.shape[1], ECHO_GAIN, ECHO_DELAY_MS) if ECHO_GAIN else None
    canceller = None
    if ECHO_CANCEL:
        from speechlm.streaming.echo import EchoCanceller

        canceller = EchoCanceller(delay_ms=ECHO_DELAY_MS)
    state = model.init_state(1)
    out, texts = [], []
    playing = np.zeros(user.shape[1], np.float32)  # the model's frame before: on the speakers now
    for frame in user:
        if echo is not None:
            frame = frame + echo.hear(playing)
        if canceller is not None:
            canceller.played(playing)
            frame = canceller.clean(frame)
        pcm, pieces, state = model.step(torch.from_numpy(frame)[None], state)
        playing = pcm[0].cpu().numpy()
        out.append(playing)
        piece = pieces[0]["model"] if isinstance(pieces[0], dict) else pieces[0]
        if isinstance(pieces[0], dict) and heard is not None and "user" in pieces[0]:  # (a piece may carry events alone)
            heard.append(pieces[0]["user"])
        texts.append(piece or None)
    return np.stack(out), texts


def first(mask: np.ndarray, start: int, quiet: int = 1) -> int | None:
    """First index >= start where ``mask`` holds for ``quiet`` frames in a row."""
    for i in range(start, len(mask) - quiet + 1):
        if mask[i : i + quiet].all():
            return i
    return None


def backchannel_trial(model, user, onset, undisturbed, voice, word, after, rng, quiet_frames, fps, gain=1.0) -> dict:
    """The user says ``word`` ``after`` s into the reply (at ``gain``); did the model yield?"""
    n = model.frame_length
    cut = onset + int(after * fps)
    bc = frames_of(voice.synthesize(word, rng).audio * gain, n)
    heard = np.nonzero(voiced(bc, 0.01 * gain))[0]
    w0, w1 = cut + int(heard[0]), cut + int(heard[-1]) + 1 + int(0.3 * fps)
    pcm, _ = run(model, np.concatenate([user[:cut], bc, np.zeros((int(3 * fps), n), np.float32)]))
    alone, disturbed = voiced(undisturbed, 1e-4), voiced(pcm, 1e-4)
    stop_alone, stop = first(~alone, w0, quiet_frames), first(~disturbed, w0, quiet_frames)
    # Counts when the undisturbed reply talks on through [w0, w1] and the model talks as the backchannel starts.
    counts = bool(alone[w0 - 1]) and bool(disturbed[w0 - 1]) and (stop_alone is None or stop_alone > w1) and w1 < len(alone)
    # Talked on: within 1 s after the backchannel ends the model speaks again (a pause and a resume, or no pause).
    end = cut + int(heard[-1]) + 1
    talked_on = bool(disturbed[end : end + int(fps)].any())
    return {"word": word, "after_s": after, "counts": counts, "yielded": stop is not None and stop <= w1, "talked_on": talked_on}


class ListHandler(logging.Handler):
    """Log records -> a list of messages (the answer assist's events of one run)."""

    def __init__(self, out: list[str]):
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="duplex-default", help="duplex LM directory or shipped name")
    ap.add_argument("--codec", default="codec-16k")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--listen-seconds", type=float, default=6.0, help="silence after the question")
    ap.add_argument("--user-gain", type=float, default=1.0, help="scale the user's speech (peak-normalized to 0.9), e.g. 0.25 = a quiet microphone")
    ap.add_argument("--lead-seconds", type=float, default=0.0, help="the user is quiet this long before the question (the room's noise only)")
    ap.add_argument("--noise-rms", type=float, default=0.0, help="white noise of this RMS added to everything the user sends (a room; 0.001 is about -60 dBFS)")
    ap.add_argument("--noise-kind", default="white", choices=("white", *TRAIN_NOISES[1:], *HELD_OUT_NOISES),
                    help="with --noise-rms: the room's noise (speechlm.training.vad_train's kinds; rain, engine and siren never trained on)")
    ap.add_argument("--gate-detector", default="vad-en", help="the noise gate's speech detector (speechlm serve --gate-detector; 'none' = the level alone)")
    ap.add_argument("--assist-options", type=json.loads, default=None, help='with --assist: more AssistConfig fields as JSON, e.g. \'{"min_voiced_rms": 0.01}\'')
    ap.add_argument("--barge-after", default="0.6", help="seconds of model speech before the user barges in; several, comma-separated, pool their trials")
    ap.add_argument("--quiet-frames", type=int, default=5, help="frames the model must stay silent to count as stopped")
    ap.add_argument("--backchannel-after", help="also: a user backchannel this many seconds into the reply (the model should talk on); several, comma-separated, pool")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of the server's sampling")
    ap.add_argument("--audio-codebook-temperatures", help="audio: one temperature per codebook, comma-separated (the server's top-k)")
    ap.add_argument("--text-temperature", type=float, help="text sampling temperature (default: the server's; 0 = greedy)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the LM's compute dtype (speechlm serve --dtype)")
    ap.add_argument("--assist", help="answer assist: this speech LM (directory or shipped name) writes the duplex model's words (speechlm serve --assist)")
    ap.add_argument("--assist-voice", default="speech_lm", choices=["speech_lm", "duplex"], help="with --assist: who says the reply")
    ap.add_argument("--assist-barge-frames", type=int, default=5, help="with --assist: user frames in a row that pause the reply (0 = only the duplex model's yield)")
    ap.add_argument("--assist-views", type=int, help="with --assist: views of each question's audio its ASR hears (default: AssistConfig's; 1 = plain greedy)")
    ap.add_argument("--assist-keep-edges", action="store_true", help="with --assist: its ASR hears the question's quiet start as it is (as before the evening of 2026-12-05)")
    ap.add_argument("--assist-raw-level", action="store_true", help="with --assist: its ASR hears the question at its own level (not peak-normalized: as before 2026-12-05)")
    ap.add_argument("--assist-plan-quiet-frames", type=int, help="with --assist: plan once the user has been quiet this many frames (default: AssistConfig's)")
    ap.add_argument("--assist-backchannel-frames", type=int, default=15, help="with --assist: a sound over the reply this short resumes it (0 = every pause drops the rest)")
    ap.add_argument("--no-noise-gate", action="store_true", help="the duplex model hears the user's pauses as they are (speechlm serve --no-noise-gate)")
    ap.add_argument("--echo-gain", type=float, default=0.0,
                    help="the model's own audio comes back into the user's microphone at this gain (speakers, no headphones; 0 = none)")
    ap.add_argument("--echo-delay-ms", type=float, default=10.0, help="with --echo-gain: its delay after the frame it is played in")
    ap.add_argument("--echo-cancel", action="store_true", help="with --echo-gain: the client's echo canceller cleans the microphone first")
    ap.add_argument("--no-judge", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    global ROOM_NOISE, ROOM_KIND, ECHO_GAIN, ECHO_DELAY_MS, ECHO_CANCEL
    ROOM_NOISE, ROOM_KIND = args.noise_rms, args.noise_kind
    ECHO_GAIN, ECHO_DELAY_MS, ECHO_CANCEL = args.echo_gain, args.echo_delay_ms, args.echo_cancel
    torch.set_num_threads(args.threads)
    barge_after = [float(x) for x in str(args.barge_after).split(",") if x.strip()]
    backchannel_after = [float(x) for x in str(args.backchannel_after or "").split(",") if x.strip()]
    sampling = dict(text_sampling=GREEDY, audio_sampling=GREEDY) if args.greedy else dict(text_sampling=TEXT_SAMPLING, audio_sampling=AUDIO_SAMPLING)
    if args.audio_codebook_temperatures:
        temps = parse_codebook_temperatures(args.audio_codebook_temperatures)
        sampling["audio_sampling"] = dataclasses.replace(AUDIO_SAMPLING, codebook_temperatures=temps)
    if args.text_temperature is not None:
        sampling["text_sampling"] = dataclasses.replace(TEXT_SAMPLING, temperature=args.text_temperature)
    events: list[str] = []
    gate = {"noise_gate": None} if args.no_noise_gate else {}
    detector = none_or(args.gate_detector)
    model = DuplexSpeechModel.from_pretrained(args.lm, args.codec, seed=0, dtype=getattr(torch, args.dtype), speech_detector=detector, **sampling, **gate)
    if args.assist:
        from speechlm.streaming.assist import ASSIST_GENERATION, AssistConfig, build_assisted_model

        assist_log = logging.getLogger("speechlm.streaming.assist")
        assist_log.setLevel(logging.DEBUG)
        assist_log.addHandler(ListHandler(events))
        generation = dataclasses.replace(ASSIST_GENERATION, **({"asr_level": None} if args.assist_raw_level else {}),
                                         **({"asr_edges": False} if args.assist_keep_edges else {}))
        model = build_assisted_model(model, args.assist, generation=generation, config=AssistConfig(
            voice=args.assist_voice, barge_frames=args.assist_barge_frames, backchannel_frames=args.assist_backchannel_frames,
            **{k: v for k, v in (("asr_views", args.assist_views), ("plan_quiet_frames", args.assist_plan_quiet_frames)) if v is not None},
            **(args.assist_options or {})))
    n, fps = model.frame_length, model.sample_rate / model.frame_length
    judge = None
    if not args.no_judge:
        from speechlm.judge import WhisperJudge

        judge = WhisperJudge(threads=args.threads)
    per = -(-args.count // 2)
    items = [q for s in ("arithmetic", "facts") for q in textgen.generate(s, per, split="test", seed=1)][: args.count]
    random.Random(0).shuffle(items)
    voices = textgen.voice_catalog("test", ("espeak",))
    interruptions = textgen.generate("commands", args.count, split="test", seed=2)
    backchannels = list(textgen.BACKCHANNELS)
    rng = random.Random(3)
    rows = []
    for i, item in enumerate(items):
        voice = get_teacher(voices[i % len(voices)])
        question = frames_of(voice.synthesize(item["text"], rng).audio * args.user_gain, n)
        question = np.concatenate([np.zeros((int(args.lead_seconds * fps), n), np.float32), question])
        user = np.concatenate([question, np.zeros((int(args.listen_seconds * fps), n), np.float32)])
        transcripts: list[str] = []
        events.clear()
        pcm, texts = run(model, user, transcripts)
        user_end = int(np.nonzero(voiced(question, 0.01 * args.user_gain))[0][-1]) + 1
        speaking = voiced(pcm, 1e-4)
        # The reply starts where a voiced run starts at or after the user's end; a sound the model
        # was already making then (a backchannel, an early start) is not the reply's onset.
        starts = speaking & ~np.concatenate(([False], speaking[:-1]))
        onset = first(starts, user_end)
        reply = pcm[onset:].reshape(-1) if onset is not None else np.zeros(0, np.float32)
        heard = judge(reply) if judge is not None and len(reply) >= SAMPLE_RATE // 5 else ""
        row = {
            "question": item["text"],
            "expected": item["answer_value"],
            "onset_ms": None if onset is None else (onset - user_end) * 1000 / fps,
            "spoke_during_question_share": float(speaking[:user_end].mean()),
            "reply_s": None if onset is None else float(speaking[onset:].sum() / fps),  # sounding frames from the onset on
            "speaking_at_user_end": bool(speaking[user_end - 1]),
            "model_text": "".join(t for t in texts if t),
            **({"user_transcripts": transcripts, "assist_log": list(events)} if args.assist else {}),
            "heard": heard,
            "right": answer_heard(item["answer_value"], heard),
        }
        # barge-in: replay the same question; once the model has spoken barge_after seconds, talk over it
        row["barge"] = []
        for after in barge_after if onset is not None else ():
            cut = onset + int(after * fps)
            barge = frames_of(voice.synthesize(interruptions[i % len(interruptions)]["text"], rng).audio * args.user_gain, n)
            user2 = np.concatenate([user[:cut], barge, np.zeros((int(2 * fps), n), np.float32)])
            pcm2, _ = run(model, user2)
            barge_start = cut + int(np.nonzero(voiced(barge, 0.01 * args.user_gain))[0][0])
            speaking2 = voiced(pcm2, 1e-4)
            # A trial counts only if the model is still talking when the user starts: a reply that
            # had already ended has nothing to stop (it would read as a 0 ms barge-in).
            talking = bool(speaking2[barge_start - 1])
            stop = first(~speaking2, barge_start, args.quiet_frames)
            row["barge"].append({"after_s": after, "speaking_at_barge": talking,
                                 "barge_in_ms": None if stop is None or not talking else (stop - barge_start) * 1000 / fps})
        row["backchannel"] = [
            backchannel_trial(model, user, onset, pcm, voice, backchannels[(i + k) % len(backchannels)], after, rng, args.quiet_frames, fps, args.user_gain)
            for k, after in enumerate(backchannel_after if onset is not None else ())
        ]
        rows.append(row)
        print(json.dumps(row), flush=True)
    onsets = [r["onset_ms"] for r in rows if r["onset_ms"] is not None]
    bc_trials = [b for r in rows for b in r["backchannel"] if b["counts"]]
    trials = [b for r in rows for b in r["barge"]]
    barges = [b["barge_in_ms"] for b in trials if b["barge_in_ms"] is not None]
    barge_trials = [b for b in trials if b["speaking_at_barge"]]
    summary = {
        "lm": args.lm,
        "questions": len(rows),
        "sampling": {k: dataclasses.asdict(v) for k, v in sampling.items()},
        "noise_gate": not args.no_noise_gate,
        "gate_detector": detector,
        "replied": len(onsets) / len(rows),
        "onset_ms_median": statistics.median(onsets) if onsets else None,
        "onset_ms_p90": float(np.percentile(onsets, 90)) if onsets else None,
        "barge_in_ms_median": statistics.median(barges) if barges else None,
        "barge_in_trials": len(barge_trials),  # the model was talking when the user barged in
        "barge_in_ms_p90": float(np.percentile(barges, 90)) if barges else None,
        "barge_in_stopped": len(barges) / max(1, len(barge_trials)),
        "spoke_during_question_share": statistics.mean(r["spoke_during_question_share"] for r in rows),
        "reply_s_mean": statistics.mean(r["reply_s"] for r in rows if r["reply_s"] is not None) if onsets else None,
        "speaking_at_user_end_share": statistics.mean(r["speaking_at_user_end"] for r in rows),
        "spoken_answer_accuracy": None if judge is None else sum(r["right"] for r in rows) / len(rows),
        "backchannel_trials": len(bc_trials),
        "yielded_to_backchannel_share": statistics.mean(b["yielded"] for b in bc_trials) if bc_trials else None,
        "talked_on_after_backchannel_share": statistics.mean(b["talked_on"] for b in bc_trials) if bc_trials else None,
        "frame_ms": 1000 / fps,
        "command": "python benchmarks/duplex.py " + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v not in (None, False)),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
