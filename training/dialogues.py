"""Two-voice, two-channel dialogue synthesis for full-duplex training.

Each dialogue item has ``turns`` (``[["A", text], ["B", text], ...]``); speaker A is the
user (channel 0), B the assistant (channel 1).  Turns are synthesized one by one by the
speakers' teachers and laid on a timeline with, drawn per turn from the seed:

* a gap (silence between turns) or an overlap (the next speaker starts early). The
  assistant's gap after a user turn has its own, short range (``response_gap_range``:
  a voice agent answers within a few hundred ms, as people do, ~200 ms typical), and by
  default only the user overlaps: the assistant never starts before the user has finished;
* an interruption: A cuts into B's turn at a word boundary inside ``interrupt_window`` (a
  share of the turn's words: (0.5, 1.0) = its second half, the default; (0.0, 1.0) = from
  its first word on, as real users cut in early — "no, wait"; with ``interrupt_anywhere`` a
  share of them at any moment, mid-word too, from 0.1 s into the turn); B stops a reaction time later
  (audio faded out, words after the cut dropped, turn marked ``interrupted``);
* backchannels ("mm-hm", "yeah") from the listener in a word gap of a long turn, and (with
  ``p_user_backchannel``) from the user early in an assistant turn, at any moment of
  ``user_backchannel_window`` (s into its speech): the assistant talks on through it, and the
  user does not interrupt that turn before the backchannel has ended.

The manifest row holds per-channel word timestamps and the turn boundaries, so that a
duplex model can be trained on when to speak, when to stop and when to stay quiet.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..codec.audio import SAMPLE_RATE, save_audio
from ..codec.errors import SpeechLMError
from .synth import Job, SynthSummary, run_shards, voice_slug
from .textgen import BACKCHANNELS


@dataclass
class DialogueConfig:
    user_voices: list[str]
    assistant_voices: list[str]
    seed: int = 0
    shard_size: int = 20
    gap_range: tuple[float, float] = (0.15, 0.9)  # s of silence before a user turn
    response_gap_range: tuple[float, float] = (0.08, 0.35)  # s of silence before an assistant turn that follows the user
    p_overlap: float = 0.15
    overlap_range: tuple[float, float] = (0.1, 0.5)  # s the next turn starts early
    assistant_overlaps: bool = False  # may the assistant start before the user's turn ends?
    p_interrupt: float = 0.35  # chance that A interrupts a B turn of >= 4 words
    reaction_time: float = 0.12  # s B keeps talking after A starts
    interrupt_window: tuple[float, float] = (0.5, 1.0)  # where in B's turn (share of its words) A may cut in
    interrupt_anywhere: float = 0.0  # share of interruptions cutting in at any moment (mid-word too), not after a word
    p_backchannel: float = 0.3  # chance of a backchannel in a turn of >= 6 words
    p_user_backchannel: float = 0.0  # chance of a user backchannel early in an assistant turn (the assistant talks on)
    user_backchannel_window: tuple[float, float] = (0.2, 1.0)  # s into the assistant's speech where it may start
    lead_in: float = 0.3  # s of silence at the start

    def __post_init__(self) -> None:
        lo, hi = self.interrupt_window
        if not 0.0 <= lo < hi <= 1.0:
            raise SpeechLMError(f"interrupt_window must be 0 <= MIN < MAX <= 1 (shares of a turn's words), got {lo},{hi}")
        if not 0.0 <= self.interrupt_anywhere <= 1.0:
            raise SpeechLMError(f"interrupt_anywhere must be a share in [0, 1], got {self.interrupt_anywhere}")
        if not 0.0 <= self.p_user_backchannel <= 1.0:
            raise SpeechLMError(f"p_user_backchannel must be a share in [0, 1], got {self.p_user_backchannel}")
        lo, hi = self.user_backchannel_window
        if not 0.0 <= lo < hi:
            raise SpeechLMError(f"user_backchannel_window must be 0 <= MIN < MAX seconds, got {lo},{hi}")

    def to_json(self) -> dict:
        return asdict(self)


def plan_dialogue_jobs(items: list[dict], config: DialogueConfig) -> list[Job]:
    jobs = []
    for item in items:
        turns = item.get("turns")
        if not turns or not all(isinstance(t, (list, tuple)) and len(t) == 2 and t[0] in ("A", "B") for t in turns):
            raise SpeechLMError(f"item {item.get('id')!r} has no 'turns' like [[\"A\", text], [\"B\", text]]; use --builtin dialogues or such a .jsonl")
        rng = random.Random(f"{config.seed}:dialogue-voices:{item['id']}")
        voices = [rng.choice(config.user_voices), rng.choice(config.assistant_voices)]
        extra = {k: v for k, v in item.items() if k not in ("id", "text", "turns")}
        extra["turns_script"] = [list(t) for t in turns]
        jobs.append(Job(len(jobs), f"{item['id']}-{voice_slug(voices[0])}-{voice_slug(voices[1])}", item["text"], "|".join(voices), extra))
    return jobs


def _fade_out(audio: np.ndarray, n: int) -> np.ndarray:
    n = min(n, len(audio))
    if n > 0:
        audio = audio.copy()
        audio[-n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32)
    return audio


def dialogue_row(job: Job, shard: str, out: Path, seed: int) -> dict:
    """Lay one dialogue on two channels; write the stereo FLAC; return the manifest row."""
    from .teachers import get_teacher

    config = DialogueConfig(**job.extra.pop("_config"))
    rng = random.Random(f"{seed}:dialogue:{job.id}")
    voices = job.voice.split("|")
    script = job.extra["turns_script"]
    placed: list[dict] = []  # each: speaker, start (s), audio, words (absolute), text, kind, interrupted
    t = config.lead_in
    free_at = [0.0, 0.0]  # when each channel's last sound ends: a voice never overlaps itself
    for i, (speaker, text) in enumerate(script):
        ch = 0 if speaker == "A" else 1
        syn = get_teacher(voices[ch]).synthesize(text, random.Random(f"{seed}:turn:{job.id}:{i}"))
        start = t
        prev = placed[-1] if placed else None
        if prev is not None:
            prev_end = prev["start"] + len(prev["audio"]) / SAMPLE_RATE
            interrupt = speaker == "A" and prev["speaker"] == "B" and len(prev["words"]) >= 4 and rng.random() < config.p_interrupt
            if interrupt:
                # A starts right after a word of B inside the window (never its last) or, for a share
                # interrupt_anywhere, at any moment of the window's span of B's speech (from 0.1 s after
                # B starts to its last word's start); B stops a reaction time later.
                n = len(prev["words"])
                lo, hi = config.interrupt_window
                if rng.random() < config.interrupt_anywhere:
                    begin = prev["words"][0]["start"] + 0.1
                    span = max(0.0, prev["words"][-1]["start"] - begin)
                    start = begin + span * rng.uniform(lo, hi)
                else:
                    first = min(int(lo * n), n - 2)
                    k = rng.randrange(first, max(min(int(hi * n), n - 1), first + 1))
                    start = prev["words"][k]["end"] + rng.uniform(0.0, 0.1)
                start = max(start, prev.get("no_cut_before", 0.0))  # never over the user's own backchannel
                cut = start + config.reaction_time
                keep = max(0, int(round((cut - prev["start"]) * SAMPLE_RATE)))
                prev["audio"] = _fade_out(prev["audio"][:keep], int(0.02 * SAMPLE_RATE))
                prev["words"] = [w for w in prev["words"] if w["end"] <= cut]
                prev["interrupted"] = True
                free_at[prev["channel"]] = prev["start"] + len(prev["audio"]) / SAMPLE_RATE
            elif prev["speaker"] != speaker and (speaker == "A" or config.assistant_overlaps) and rng.random() < config.p_overlap:
                start = max(prev["start"] + 0.3, prev_end - rng.uniform(*config.overlap_range))
            else:
                response = speaker == "B" and prev["speaker"] == "A"
                start = prev_end + rng.uniform(*(config.response_gap_range if response else config.gap_range))
        start = max(start, free_at[ch] + 0.1)
        words = [{"word": w.word, "start": round(start + w.start, 4), "end": round(start + w.end, 4)} for w in syn.words]
        turn = {"speaker": speaker, "channel": ch, "start": start, "audio": syn.audio, "words": words, "text": text, "kind": "turn", "interrupted": False}
        placed.append(turn)
        free_at[ch] = start + len(syn.audio) / SAMPLE_RATE
        # A user backchannel early in an assistant turn, at any moment (the assistant talks on through it).
        lo, hi = config.user_backchannel_window
        span = min(hi, words[-1]["start"] - words[0]["start"]) - lo if speaker == "B" and words else -1.0
        if span > 0 and rng.random() < config.p_user_backchannel:
            bc_text = rng.choice(BACKCHANNELS)
            bc = get_teacher(voices[0]).synthesize(bc_text, random.Random(f"{seed}:ubc:{job.id}:{i}"))
            bc_start = max(words[0]["start"] + lo + rng.uniform(0.0, span), free_at[0] + 0.1)
            bc_end = bc_start + len(bc.audio) / SAMPLE_RATE
            if bc_end < words[-1]["end"]:
                free_at[0] = max(free_at[0], bc_end)
                turn["no_cut_before"] = bc_end + 0.2
                placed.insert(len(placed) - 1, {
                    "speaker": "A", "channel": 0, "start": bc_start, "audio": bc.audio, "text": bc_text, "kind": "backchannel", "interrupted": False,
                    "words": [{"word": w.word, "start": round(bc_start + w.start, 4), "end": round(bc_start + w.end, 4)} for w in bc.words],
                })
        # A backchannel from the listener inside a long turn, at a word gap.
        if len(words) >= 6 and rng.random() < config.p_backchannel:
            listener = "B" if speaker == "A" else "A"
            lch = 1 - ch
            k = rng.randrange(2, len(words) - 2)
            bc_text = rng.choice(BACKCHANNELS)
            bc = get_teacher(voices[lch]).synthesize(bc_text, random.Random(f"{seed}:bc:{job.id}:{i}"))
            bc_start = words[k]["end"]
            free_at[lch] = max(free_at[lch], bc_start + len(bc.audio) / SAMPLE_RATE)
            placed.append({
                "speaker": listener, "channel": lch, "start": bc_start, "audio": bc.audio, "text": bc_text, "kind": "backchannel", "interrupted": False,
                "words": [{"word": w.word, "start": round(bc_start + w.start, 4), "end": round(bc_start + w.end, 4)} for w in bc.words],
            })
            placed.sort(key=lambda p: p["start"])
            # keep the main flow anchored on the last real turn
            placed.remove(turn)
            placed.append(turn)
    total = max(p["start"] + len(p["audio"]) / SAMPLE_RATE for p in placed) + config.lead_in
    stereo = np.zeros((int(np.ceil(total * SAMPLE_RATE)), 2), dtype=np.float32)
    for p in placed:
        s0 = int(round(p["start"] * SAMPLE_RATE))
        stereo[s0 : s0 + len(p["audio"]), p["channel"]] += p["audio"]
    rel = Path("audio") / shard / f"{job.id}.flac"
    save_audio(out / rel, stereo, SAMPLE_RATE)
    turns = sorted(
        (
            {"speaker": p["speaker"], "channel": p["channel"], "start": round(p["start"], 4), "end": round(p["start"] + len(p["audio"]) / SAMPLE_RATE, 4),
             "text": p["text"], "kind": p["kind"], "interrupted": p["interrupted"], "spoken_words": len(p["words"])}
            for p in placed
        ),
        key=lambda x: x["start"],
    )
    channels = []
    for ch, (speaker, role) in enumerate((("A", "user"), ("B", "assistant"))):
        words = sorted((w for p in placed if p["channel"] == ch for w in p["words"]), key=lambda w: w["start"])
        channels.append({"speaker": speaker, "role": role, "voice": voices[ch], "words": words})
    return {
        "id": job.id,
        "text": job.text,
        "audio": rel.as_posix(),
        "sample_rate": SAMPLE_RATE,
        "num_channels": 2,
        "duration": round(len(stereo) / SAMPLE_RATE, 4),
        "voices": voices,
        "channels": channels,
        "turns": turns,
        **{k: v for k, v in job.extra.items() if k != "turns_script"},
    }


def synthesize_dialogues(items: list[dict], out_dir: str | Path, config: DialogueConfig, workers: int = 1, progress: bool = True) -> SynthSummary:
    jobs = plan_dialogue_jobs(items, config)
    for job in jobs:
        job.extra["_config"] = config.to_json()
    voices = sorted(set(config.user_voices) | set(config.assistant_voices))
    return run_shards(out_dir, {"kind": "dialogues", **config.to_json()}, jobs, config.shard_size, config.seed, dialogue_row, voices, workers, progress, desc="dialogues")
