"""The speech LM's quality and speed, judged by Whisper tiny.en (needs the [eval] extra).

* TTS: judge WER of our speech on held-out sentences (test split: text never trained on),
  next to the WER of the teacher (espeak-ng en-us, the assistant voice) on the same sentences
  in the same run, and of the teacher's speech through our codec (the floor for speech in
  these codes); with MCTP decoding (the default) and without (plain decoding), so the WER
  cost and the speed-up of MCTP come from the same model and sentences.
* ASR: WER on held-out voices (espeak variants never trained on) speaking test-split text,
  and on the real held-out LibriSpeech speakers (>= 7000) against their pseudo-transcripts.
  ``asrlong``: recordings of several such sentences in a row (one voice, its own pauses), heard
  cut at the pauses (the default) and, with the decoder flag ``:whole``, in one piece.
  ``ttslong``: texts of several such sentences spoken sentence by sentence (the default) and in one go;
  ``ttsjoined``: such sentences joined into one long sentence ("A, and b, and c."), spoken clause by clause
  (the default) and whole.
* Spoken QA: held-out arithmetic and fact questions spoken by held-out voices; a reply is
  right when the judge hears the expected answer in our spoken reply (and, separately, when
  the reply's text holds it). ``textqa``: the same questions typed, greedy text reply.
* Speed (this machine, 1 thread unless --threads): real-time factor of TTS, audio frames per
  backbone forward, backbone forwards before the first audio frame, text-in -> first PCM;
  frames per second end to end (LM + streaming codec) and of the LM alone (codec time taken out).

    python benchmarks/speech_lm.py --model speechlm-default --count 40 --out docs/results/speech_lm_tts.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from speechlm.codec.audio import SAMPLE_RATE, load_audio
from speechlm.judge import WhisperJudge, answer_heard, word_error_rate
from speechlm.lm.generate import GREEDY, parse_codebook_temperatures, text_generate
from speechlm.lm.prompts import chat_prompt
from speechlm.speech import Generation, SpeechPipeline, choose_candidate
from speechlm.training import textgen
from speechlm.training.audio_data import list_source_files
from speechlm.training.noises import HELD_OUT_NOISES, TRAIN_NOISES
from speechlm.training.noises import noise as room_noise
from speechlm.training.teachers import get_teacher
from speechlm.training.textnorm import words_for_scoring

TTS_SOURCES = ("everyday", "commands", "numbers", "dates_times")
QA_SOURCES = ("arithmetic", "facts")


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Word errors over all references / reference words (not a mean of per-sentence WERs)."""
    words = [len(words_for_scoring(ref)) for ref, _ in pairs]
    errors = [word_error_rate(ref, hyp) * n for (ref, hyp), n in zip(pairs, words)]
    return float(sum(errors) / max(1, sum(words)))


# The texts the tasks are drawn from: "test" (the reported figures), or "valid" to choose a setting on (--text-split)
TEXT_SPLIT = "test"


def held_out_texts(sources, count: int) -> list[dict]:
    per = max(1, -(-count // len(sources)))
    items = [item for s in sources for item in textgen.generate(s, per, split=TEXT_SPLIT, seed=1)]
    random.Random(0).shuffle(items)
    return items[:count]


class _Timed:
    """Wraps a function and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def speak(sp: SpeechPipeline, text: str, g: Generation) -> dict:
    """One streamed TTS call; ``lm_s`` = its wall time less the codec's frame decoding (the LM's own decoding)."""
    codec_decode = sp.codec.decode_step = _Timed(sp.codec.decode_step)  # instance attribute, removed below
    try:
        t0 = time.perf_counter()
        first_pcm = first_forward = None
        pcm, forwards = [], 0
        for step, chunk in sp.tts_steps(text, g):
            if first_pcm is None:
                first_pcm, first_forward = time.perf_counter() - t0, step.backbone_forwards
            pcm.append(chunk)
            forwards = step.backbone_forwards
        wall = time.perf_counter() - t0
    finally:
        del sp.codec.decode_step
    audio = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
    frames = len(pcm)
    return {
        "audio": audio,
        "wall_s": wall,
        "lm_s": wall - codec_decode.seconds,
        "seconds": len(audio) / SAMPLE_RATE,
        "frames": frames,
        "backbone_forwards": forwards,
        "first_pcm_s": first_pcm,
        "first_audio_forward": first_forward,
    }


def fresh_texts(sources, count: int, exclude_first: int, pool: int = 200) -> list[dict]:
    """``count`` held-out sentences of a pool of ``pool`` that are not among the first ``exclude_first``
    (``held_out_texts(sources, exclude_first)``, e.g. the sentences a setting was chosen on)."""
    seen = {item["text"] for item in held_out_texts(sources, exclude_first)}
    return [item for item in held_out_texts(sources, pool) if item["text"] not in seen][:count]


def bench_tts(sp: SpeechPipeline, judge: WhisperJudge, count: int, teacher_voice: str, g: Generation,
              decodings: Sequence[str] = ("mctp", "plain"), references: bool = True, exclude_first: int = 0,
              save_candidates: str | None = None) -> dict:
    items = fresh_texts(TTS_SOURCES, count, exclude_first) if exclude_first else held_out_texts(TTS_SOURCES, count)
    teacher = get_teacher(teacher_voice)
    rng = random.Random(0)
    first = dataclasses.replace(g, candidates=1)
    runs = {name: run for name, run in {"mctp": first, "plain": dataclasses.replace(first, mctp_schedule=[0])}.items() if name in decodings}
    if not runs and g.candidates == 1:
        raise SystemExit(f"--decodings {','.join(decodings)}: choose from mctp, plain")
    choices, choice_wall, kept = [], 0.0, {}
    rows = {name: [] for name in (["teacher", "teacher_codec"] if references else []) + list(runs)}
    stats = {k: [] for k in runs}
    for item in items:
        text = item["text"]
        if references:
            spoken = teacher.synthesize(text, rng).audio
            rows["teacher"].append((text, judge(spoken)))
            # The teacher through our codec: the floor the LM's speech (in these codes) can reach.
            with torch.inference_mode():
                coded = sp.codec.decode(sp.codec.encode(torch.from_numpy(spoken)[None]))[0].numpy()
            rows["teacher_codec"].append((text, judge(coded)))
        for name, g in runs.items():
            out = speak(sp, text, g)
            heard = judge(out["audio"]) if len(out["audio"]) >= SAMPLE_RATE // 10 else ""
            rows[name].append((text, heard))
            stats[name].append({k: v for k, v in out.items() if k != "audio"} | {"heard": heard})
        if g.candidates > 1:  # every candidate judged, so the checker's choice is compared with the others in one run
            t = time.perf_counter()
            candidates = sp.speech_candidates(text, lambda gs, text=text: sp.tts_batch([text] * len(gs), gs), g)  # rows of one batch
            choice_wall += time.perf_counter() - t
            heard = [judge(a) if len(a) >= SAMPLE_RATE // 10 else "" for a, _ in candidates]
            scores = [score for _, score in candidates]
            choices.append({"text": text, "heard": heard, "scores": scores, "chosen": choose_candidate(scores, g.candidate_margin),
                            "seconds": [len(a) / SAMPLE_RATE for a, _ in candidates]})
            kept.update({f"s{len(choices) - 1:04d}_c{k}": _pcm16(a) for k, (a, _) in enumerate(candidates)})
    if save_candidates and choices:  # every rendering, to study other choosers on the same candidates
        np.savez_compressed(save_candidates, texts=np.array([c["text"] for c in choices]), **kept)
    result = {"sentences": len(items), "teacher_voice": teacher_voice, "excluded_first": exclude_first}
    for name in ("teacher", "teacher_codec") if references else ():
        result[f"{name}_wer"] = corpus_wer(rows[name])
        result[f"{name}_median_sentence_wer"] = statistics.median(word_error_rate(t, h) for t, h in rows[name])
        result[f"{name}_sentences_wer_le_25pct"] = sum(word_error_rate(t, h) <= 0.25 for t, h in rows[name]) / len(rows[name])
    for name, s in stats.items():
        seconds = sum(x["seconds"] for x in s)
        wall = sum(x["wall_s"] for x in s)
        result[name] = {
            "wer": corpus_wer(rows[name]),
            # The judge loops on unclear speech ("I'm sorry, I'm sorry, ..."), so one sentence can add
            # dozens of insertions: the median and the share of nearly right sentences are steadier.
            "median_sentence_wer": statistics.median(word_error_rate(t, h) for t, h in rows[name]),
            "sentences_wer_le_25pct": sum(word_error_rate(t, h) <= 0.25 for t, h in rows[name]) / len(rows[name]),
            "rtf": wall / max(seconds, 1e-9),
            "frames_per_backbone_forward": sum(x["frames"] for x in s) / max(1, sum(x["backbone_forwards"] for x in s)),
            "first_audio_forward_max": max((x["first_audio_forward"] or 0) for x in s),
            "first_pcm_ms_median": 1000 * statistics.median(x["first_pcm_s"] for x in s if x["first_pcm_s"] is not None),
            "decode_frames_per_s": sum(x["frames"] for x in s) / max(wall, 1e-9),
            # the LM alone (the codec's frame decoding taken out): what MCTP changes
            "lm_frames_per_s": sum(x["frames"] for x in s) / max(sum(x["lm_s"] for x in s), 1e-9),
            "mean_seconds": seconds / len(s),
        }
    if len(runs) == 2:
        result["mctp_speedup"] = result["mctp"]["decode_frames_per_s"] / max(result["plain"]["decode_frames_per_s"], 1e-9)
        result["mctp_lm_speedup"] = result["mctp"]["lm_frames_per_s"] / max(result["plain"]["lm_frames_per_s"], 1e-9)
        result["mctp_wer_cost"] = result["mctp"]["wer"] - result["plain"]["wer"]
    if choices:
        result["candidates"] = _candidate_summary(choices, choice_wall, g)
    ours = rows[next(iter(runs))] if runs else [(c["text"], c["heard"][c["chosen"]]) for c in choices]
    result["examples"] = [
        {"text": t, "teacher": (rows["teacher"][i][1] if references else None), "ours": h} for i, (t, h) in enumerate(ours[:8])
    ]
    result["heard"] = {name: [h for _, h in r] for name, r in rows.items()}
    return result


def joined_sentence(sentences: Sequence[str]) -> str:
    """Sentences as one long sentence: "A, and b, and c." (their own end marks dropped; "I" kept)."""
    parts = [s.strip().rstrip(".?!") for s in sentences]
    return ", and ".join([parts[0], *(p if re.match(r"I\b", p) else p[:1].lower() + p[1:] for p in parts[1:])]) + "."


def bench_tts_long(sp: SpeechPipeline, judge: WhisperJudge, count: int, per_text: int, teacher_voice: str, g: Generation,
                   joined: bool = False) -> dict:
    """Texts of ``per_text`` held-out sentences: spoken sentence by sentence (``Generation.tts_by_sentence``,
    the default) and in one go, and by the teacher; the judge's corpus WER of each on the same texts, and
    the real-time factor of each way. ``joined``: each text one long sentence (:func:`joined_sentence`),
    spoken in clauses (the default, ``Generation.tts_max_words``) and whole."""
    items = held_out_texts(TTS_SOURCES, count * per_text)
    teacher, rng = get_teacher(teacher_voice), random.Random(0)
    ways = {"by_sentence": dataclasses.replace(g, candidates=1), "one_go": dataclasses.replace(g, candidates=1, tts_by_sentence=False)}
    if joined:
        ways = {"by_clause": ways["by_sentence"], "whole_sentence": dataclasses.replace(g, candidates=1, tts_max_words=0)}
    rows: dict[str, list] = {name: [] for name in ["teacher", *ways]}
    wall, spoken = dict.fromkeys(ways, 0.0), dict.fromkeys(ways, 0.0)
    for r in range(len(items) // per_text):
        sentences = [item["text"] for item in items[r * per_text : (r + 1) * per_text]]
        text = joined_sentence(sentences) if joined else " ".join(sentences)
        rows["teacher"].append((text, judge(teacher.synthesize(text, rng).audio)))
        for name, gw in ways.items():
            t = time.perf_counter()
            audio = sp.tts(text, generation=gw)
            wall[name] += time.perf_counter() - t
            spoken[name] += len(audio) / SAMPLE_RATE
            rows[name].append((text, judge(audio)))
    return {"texts": len(rows["teacher"]), "sentences_per_text": per_text, "joined": joined, "teacher_voice": teacher_voice,
            **{f"{name}_wer": corpus_wer(pairs) for name, pairs in rows.items()},
            "real_time_factor": {name: wall[name] / max(spoken[name], 1e-9) for name in ways},
            "examples": [{"text": rows["teacher"][k][0], **{name: rows[name][k][1] for name in rows}} for k in range(min(4, len(rows["teacher"])))]}


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767).round().astype(np.int16)


def _wilcoxon_less(a: list[float], b: list[float]) -> float | None:
    """One-sided Wilcoxon signed-rank p that ``a`` is lower than ``b`` (paired); None without scipy or differences."""
    try:
        from scipy.stats import wilcoxon
    except ImportError:
        return None
    if not any(x != y for x, y in zip(a, b)):
        return None
    return float(wilcoxon(a, b, alternative="less").pvalue)


def _candidate_summary(choices: list[dict], wall: float, g: Generation) -> dict:
    """Judge WER of the checker's choice among ``g.candidates`` renderings per sentence, beside each
    candidate index's (0 = the configured decoding), a random pick's expectation and the judge's oracle."""
    n = g.candidates

    def summary(pairs: list[tuple[str, str]]) -> dict:
        return {"wer": corpus_wer(pairs), "median_sentence_wer": statistics.median(word_error_rate(t, h) for t, h in pairs),
                "sentences_wer_le_25pct": sum(word_error_rate(t, h) <= 0.25 for t, h in pairs) / len(pairs)}

    chosen = [(c["text"], c["heard"][c["chosen"]]) for c in choices]
    oracle = [(c["text"], min(c["heard"], key=lambda h, t=c["text"]: word_error_rate(t, h))) for c in choices]
    each = [summary([(c["text"], c["heard"][k]) for c in choices]) for k in range(n)]
    per_sentence = [[word_error_rate(c["text"], h) for h in c["heard"]] for c in choices]
    seconds = sum(c["seconds"][c["chosen"]] for c in choices)
    return {
        "count": n, "temperature": g.candidate_temperature, "margin": g.candidate_margin, "checker": g.checker,
        "chosen": summary(chosen), "first": each[0], "each": each, "oracle": summary(oracle),
        "random_pick_mean_sentence_wer": statistics.mean(statistics.mean(w) for w in per_sentence),
        "chosen_mean_sentence_wer": statistics.mean(w[c["chosen"]] for w, c in zip(per_sentence, choices)),
        "first_mean_sentence_wer": statistics.mean(w[0] for w in per_sentence),
        "chosen_better_worse_than_first": [sum(w[c["chosen"]] < w[0] for w, c in zip(per_sentence, choices)),
                                           sum(w[c["chosen"]] > w[0] for w, c in zip(per_sentence, choices))],
        "chosen_vs_first_wilcoxon_p": _wilcoxon_less([w[c["chosen"]] for w, c in zip(per_sentence, choices)], [w[0] for w in per_sentence]),
        "chosen_index_counts": [sum(c["chosen"] == k for c in choices) for k in range(n)],
        # generating every candidate and checking them, over the chosen speech's length
        "rtf": wall / max(seconds, 1e-9),
        "rows": choices,
    }


def _asr_decoders(sp: SpeechPipeline, utterances: list[tuple[str, np.ndarray]], decoders: Sequence[str], g: Generation) -> dict:
    """Each decoder on the same utterances ((reference, audio) pairs): corpus WER, seconds per utterance, examples.
    A decoder is ``lm``, ``ctc`` or ``auto``, with ``:K`` the LM decoder's number of views (``lm:1`` = plain greedy)
    and flags after it: ``:raw`` for the audio at its own level (not peak-normalized first), ``:asis`` for its
    quiet edges and room as they are (``Generation.asr_edges`` off), ``:whole`` for the audio heard in one
    piece (not cut at its pauses, ``Generation.asr_pause_seconds`` 0), ``:longpause`` for cuts at its long pauses
    only (``asr_short_pause_seconds`` 0), ``:lead`` for views told apart by silence before them instead of by level
    (``Generation.asr_view_kind``): ``lm:1:raw``, ``lm:4:asis``, ``lm:2:whole``, ``lm::longpause``, ``lm:4:lead``."""
    out = {}
    known = {"raw", "asis", "whole", "longpause", "lead"}
    for decoder in decoders:
        name, *rest = decoder.split(":")
        views, flags = (rest[0] if rest else ""), set(rest[1:])
        if flags - known:
            raise SystemExit(f"--asr-decoders {decoder}: unknown flags {sorted(flags - known)} ({', '.join(sorted(known))})")
        gd = dataclasses.replace(g, asr_decoder=name, asr_views=int(views) if views else g.asr_views,
                                 asr_level=None if "raw" in flags else g.asr_level, asr_edges="asis" not in flags and g.asr_edges,
                                 asr_pause_seconds=0.0 if "whole" in flags else g.asr_pause_seconds,
                                 asr_short_pause_seconds=0.0 if "longpause" in flags else g.asr_short_pause_seconds,
                                 asr_view_kind="lead" if "lead" in flags else g.asr_view_kind)
        pairs, seconds = [], 0.0
        for ref, audio in utterances:
            t = time.perf_counter()
            pairs.append((ref, sp.asr(audio, generation=gd)))
            seconds += time.perf_counter() - t
        out[decoder] = {"utterances": len(pairs), "wer": corpus_wer(pairs), "seconds_per_utterance": seconds / max(1, len(pairs)),
                        "examples": [{"ref": r, "hyp": h} for r, h in pairs[:8]]}
    return out


def bench_asr_synthetic(sp: SpeechPipeline, count: int, decoders: Sequence[str] = ("lm",), g: Generation | None = None,
                        voice_split: str = "test", gain: float = 1.0, lead_s: float = 0.0, noise_rms: float = 0.0,
                        noise_kind: str = "white") -> dict:
    """Held-out voices (or, with ``voice_split="train"``, training voices) speaking unseen (test-split)
    text, synthesized here (peak-normalized, as the training corpus; times ``gain``: e.g. 0.1 for a quiet
    microphone), with ``lead_s`` seconds of quiet before and after (a recording that starts before the
    speaker) and noise of RMS ``noise_rms`` under all of it (a room: ``noise_kind``, one of speechlm.training.noises';
    white noise as before when "white"); every decoder on the same audio."""
    items = held_out_texts(TTS_SOURCES, count)
    voices = textgen.voice_catalog(voice_split, ("espeak",))
    rng, noise = random.Random(1), np.random.default_rng(5)
    utterances = []
    for i, item in enumerate(items):
        audio = get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio * gain
        pad = np.zeros(int(lead_s * SAMPLE_RATE), np.float32)
        audio = np.concatenate([pad, audio, pad])
        room = noise.standard_normal(len(audio)) if noise_kind == "white" else room_noise(noise_kind, len(audio), noise)
        utterances.append((item["text"], (audio + noise_rms * room).astype(np.float32)))
    by_decoder = _asr_decoders(sp, utterances, decoders, g or Generation())
    return {**by_decoder[decoders[0]], "decoder": decoders[0], "gain": gain, "lead_s": lead_s, "noise_rms": noise_rms, "noise_kind": noise_kind,
            "voices": len({voices[i % len(voices)] for i in range(len(items))}), "by_decoder": by_decoder}


def bench_asr_long(sp: SpeechPipeline, count: int, per_recording: int, decoders: Sequence[str] = ("lm",), g: Generation | None = None) -> dict:
    """Recordings of ``per_recording`` unseen (test-split) sentences in a row, each recording one held-out
    voice speaking them in one go (espeak's own pauses between sentences); every decoder on the same audio."""
    items = held_out_texts(TTS_SOURCES, count * per_recording)
    voices = textgen.voice_catalog("test", ("espeak",))
    rng = random.Random(2)
    recordings = []
    for r in range(len(items) // per_recording):
        text = " ".join(item["text"] for item in items[r * per_recording : (r + 1) * per_recording])
        recordings.append((text, get_teacher(voices[r % len(voices)]).synthesize(text, rng).audio))
    by_decoder = _asr_decoders(sp, recordings, decoders, g or Generation())
    return {**by_decoder[decoders[0]], "decoder": decoders[0], "sentences_per_recording": per_recording,
            "seconds_per_recording": statistics.mean(len(a) / SAMPLE_RATE for _, a in recordings), "by_decoder": by_decoder}


def bench_asr_librispeech(sp: SpeechPipeline, folder: str, count: int, max_seconds: float, decoders: Sequence[str] = ("lm",),
                          g: Generation | None = None) -> dict:
    files, _ = list_source_files(f"librispeech:{folder}:test")
    table = {}
    for line in (Path(folder) / "pseudo_transcripts.tsv").read_text().splitlines()[1:]:
        name, _, duration, text = line.split("\t", 3)
        table[name] = (float(duration), text)
    chosen = [f for f in files if f.name in table and table[f.name][0] <= max_seconds][:count]
    by_decoder = _asr_decoders(sp, [(table[f.name][1], load_audio(f)) for f in chosen], decoders, g or Generation())
    return {**by_decoder[decoders[0]], "decoder": decoders[0], "max_seconds": max_seconds, "by_decoder": by_decoder}



def bench_qa(sp: SpeechPipeline, judge: WhisperJudge, count: int, g: Generation, teacher_voice: str | None = None) -> dict:
    """Spoken questions by held-out voices -> the model's reply (text and speech), the answer judged in both.
    ``teacher_voice``: also the judge on that teacher speaking the model's reply text (the ceiling the model's
    own speech of the same words could reach with the teacher's clarity)."""
    items = held_out_texts(QA_SOURCES, count)
    voices = textgen.voice_catalog("test", ("espeak",))
    rng, teacher_rng = random.Random(2), random.Random(3)
    teacher = get_teacher(teacher_voice) if teacher_voice else None
    rows = []
    for i, item in enumerate(items):
        audio = get_teacher(voices[i % len(voices)]).synthesize(item["text"], rng).audio
        text, reply = sp.chat(audio, generation=g)
        heard = judge(reply) if len(reply) >= SAMPLE_RATE // 10 else ""
        row = {"question": item["text"], "expected": item["answer_value"], "reply_text": text, "heard": heard,
               "text_right": answer_heard(item["answer_value"], text), "speech_right": answer_heard(item["answer_value"], heard)}
        if teacher is not None:
            spoken = teacher.synthesize(text, teacher_rng).audio if words_for_scoring(text) else np.zeros(0, np.float32)
            row["teacher_heard"] = judge(spoken) if len(spoken) >= SAMPLE_RATE // 10 else ""
            row["teacher_speech_right"] = answer_heard(item["answer_value"], row["teacher_heard"])
        rows.append(row)
    by_source = {}
    for item, row in zip(items, rows):
        by_source.setdefault(item["source"], []).append(row["speech_right"])
    return {
        "questions": len(rows),
        "spoken_answer_accuracy": sum(r["speech_right"] for r in rows) / len(rows),
        "text_answer_accuracy": sum(r["text_right"] for r in rows) / len(rows),
        **({"teacher_spoken_answer_accuracy": sum(r["teacher_speech_right"] for r in rows) / len(rows)} if teacher_voice else {}),
        "spoken_accuracy_by_source": {k: sum(v) / len(v) for k, v in by_source.items()},
        "examples": rows[:8],
        "rows": rows,
    }


def bench_text_qa(sp: SpeechPipeline, count: int) -> dict:
    """Typed held-out questions (the same sources as spoken QA, no audio in or out): does the reply's
    text hold the answer? What the LM knows, apart from hearing the question."""
    lm, v = sp.lm, sp.lm.vocab
    rows = []
    for item in held_out_texts(QA_SOURCES, count):
        ids, codes = chat_prompt(lm, item["text"])
        reply = text_generate(lm, ids, audio_codes=[codes], max_new_tokens=32, sampling=GREEDY, stop_tokens=[v.speech_start, v.end_of_turn, v.eos])[0]
        text = lm.tokenizer.decode(reply, skip_special_tokens=True).strip()
        rows.append({"question": item["text"], "expected": item["answer_value"], "reply_text": text, "right": answer_heard(item["answer_value"], text), "source": item["source"]})
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row["right"])
    return {"questions": len(rows), "accuracy": sum(r["right"] for r in rows) / len(rows),
            "accuracy_by_source": {k: sum(x) / len(x) for k, x in by_source.items()}, "examples": rows[:8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--codec", help="codec name or directory (default: the one the model names)")
    ap.add_argument("--count", type=int, default=40, help="sentences / utterances / questions per test")
    ap.add_argument("--tasks", default="tts,asr,qa", help="comma-separated: tts, asr, qa (spoken), textqa (typed), asrlong / ttslong (several sentences a recording / text), "
                         "ttsjoined (several sentences joined into one long one)")
    ap.add_argument("--long-sentences", type=int, default=5, help="asrlong, ttslong, ttsjoined: sentences a recording or text (--count of them)")
    ap.add_argument("--teacher-voice", default="espeak:en-us", help="the voice the model was taught to speak with")
    ap.add_argument("--librispeech", default="../shared/data/librispeech-251")
    ap.add_argument("--text-split", choices=("test", "valid"), default="test",
                    help="draw the texts from this split (valid: to choose a setting on, the test split kept for the figures)")
    ap.add_argument("--librispeech-max-seconds", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the LM's compute dtype (SpeechPipeline.from_pretrained)")
    ap.add_argument("--int8", type=int, metavar="ROWS", help="backbone products of at most ROWS rows read int8 weights (SpeechLM.use_int8; bfloat16)")
    ap.add_argument("--temperature", type=float, help="speech sampling temperature (default: Generation's)")
    ap.add_argument("--guidance", type=float, help="speech: classifier-free guidance on the text (default: Generation's; 0 = off)")
    ap.add_argument("--top-k", type=int, help="speech sampling top-k (default: Generation's)")
    ap.add_argument("--codebook-temperatures", help="speech: one temperature per codebook, comma-separated (overrides --temperature)")
    ap.add_argument("--decodings", default="mctp,plain", help="TTS decodings to run: mctp, plain (none: only the candidates)")
    ap.add_argument("--candidates", type=int, help="TTS: also speak each sentence N times and judge every rendering and the checker's choice")
    ap.add_argument("--checker", help="pronunciation checker for --candidates (default: Generation's)")
    ap.add_argument("--candidate-temperature", type=float, help="--candidates: sampling temperature of the others' group-first codebooks")
    ap.add_argument("--candidate-margin", type=float, help="--candidates: keep the first unless another scores lower by more (default: Generation's)")
    ap.add_argument("--clause-pause", type=float, help="seconds of silence between the clauses of a long sentence (default: Generation's)")
    ap.add_argument("--save-candidates", metavar="NPZ", help="--candidates: also save every rendering (int16, keys sNNNN_cK) and the texts")
    ap.add_argument("--exclude-first", type=int, default=0,
                    help="TTS: fresh sentences: from a pool of 200 held-out ones, leave out the first K of the usual list (those --count K gives)")
    ap.add_argument("--no-teacher", action="store_true",
                    help="TTS: skip the teacher and teacher-through-codec references; spoken QA: skip the teacher speaking the replies")
    ap.add_argument("--direct", action="store_true", help="spoken QA: answer the speech directly (default: transcribe it first)")
    ap.add_argument("--reply-speech", choices=("chat", "tts"), help="spoken QA: speak the reply in the chat turn or by the TTS task (default: Generation's)")
    ap.add_argument("--asr-decoders", default="lm",
                    help="ASR: decoders to run side by side on the same audio (lm, ctc, auto; lm:K = the LM with K views, lm:1 plain greedy); the first is the headline")
    ap.add_argument("--asr-views", type=int, help="views of the audio the LM decoder listens to (default: Generation's; also for spoken QA)")
    ap.add_argument("--asr-view-kind", choices=("level", "lead"), help="what tells the views apart (default: Generation's; also for spoken QA)")
    ap.add_argument("--asr-gain", type=float, default=1.0, help="ASR on held-out voices: scale the (peak-normalized) audio, e.g. 0.1 = a quiet microphone")
    ap.add_argument("--asr-lead", type=float, default=0.0, help="ASR on held-out voices: seconds of quiet before and after each utterance")
    ap.add_argument("--asr-noise-kind", default="white", choices=("white", *TRAIN_NOISES[1:], *HELD_OUT_NOISES),
                    help="ASR on held-out voices with --asr-noise-rms: the room's kind of noise (speechlm.training.noises)")
    ap.add_argument("--asr-noise-rms", type=float, default=0.0, help="ASR on held-out voices: white noise of this RMS under the audio (0.001 = -60 dBFS)")
    ap.add_argument("--no-librispeech", action="store_true", help="ASR: skip the LibriSpeech set")
    ap.add_argument("--asr-check-rounds", type=int, help="ASR and spoken QA: the transcript check's rounds (default: Generation's; 0 = off)")
    ap.add_argument("--asr-check-shortlist", type=int, help="the transcript check's edits scored by the LM each round (default: Generation's)")
    ap.add_argument("--asr-decoder", help="spoken QA: how the question is transcribed first (default: Generation's)")
    ap.add_argument("--asr-voice-split", default="test", choices=("test", "train"),
                    help="ASR: espeak voices of this split (train: voices trained on, to separate voice from text generalization)")
    ap.add_argument("--no-adapter", action="store_true", help="the base model alone: no asr or tts task adapter (ASR, TTS, spoken QA)")
    ap.add_argument("--voice", help="TTS and spoken replies in this voice of the model (default: its own; give --teacher-voice its teacher)")
    ap.add_argument("--no-tts-adapter", action="store_true", help="TTS and spoken replies: speak with the base model, not its tts task adapter")
    ap.add_argument("--out")
    args = ap.parse_args()
    global TEXT_SPLIT
    TEXT_SPLIT = args.text_split
    torch.set_num_threads(args.threads)
    sp = SpeechPipeline.from_pretrained(args.model, codec=args.codec, dtype=getattr(torch, args.dtype))
    sp.lm.use_int8(args.int8)
    judge = WhisperJudge(threads=args.threads)
    tasks = args.tasks.split(",")
    cb_temps = parse_codebook_temperatures(args.codebook_temperatures)
    g = Generation(**{k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("codebook_temperatures", cb_temps),
                                                     ("guidance", args.guidance),
                                                     ("transcribe_first", False if args.direct else None),
                                                     ("asr_decoder", args.asr_decoder), ("asr_views", args.asr_views), ("asr_view_kind", args.asr_view_kind),
                                                     ("reply_speech", args.reply_speech),
                                                     ("candidates", args.candidates), ("checker", args.checker),
                                                     ("candidate_temperature", args.candidate_temperature),
                                                     ("candidate_margin", args.candidate_margin), ("asr_check_rounds", args.asr_check_rounds),
                                                     ("asr_check_shortlist", args.asr_check_shortlist),
                                                     ("clause_pause_seconds", args.clause_pause), ("voice", args.voice))
                      if v is not None}, **({"asr_adapter": None} if args.no_adapter else {}),
                   **({"tts_adapter": None} if args.no_adapter or args.no_tts_adapter else {}))
    result = {"model": args.model, "threads": args.threads, "command": "python benchmarks/speech_lm.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v is not None and v is not False),
        "generation": dataclasses.asdict(g), "asr_adapter": sp.asr_adapter(g), "tts_adapter": sp.tts_adapter(g)}
    if "tts" in tasks:
        result["tts"] = bench_tts(sp, judge, args.count, args.teacher_voice, g, args.decodings.split(","), not args.no_teacher, args.exclude_first,
                                  args.save_candidates)
        print(json.dumps({k: v for k, v in result["tts"].items() if k != "examples"}, indent=1), flush=True)
    if "asr" in tasks:
        decoders = args.asr_decoders.split(",")
        result["asr_held_out_voices"] = bench_asr_synthetic(sp, args.count, decoders, g, args.asr_voice_split, args.asr_gain, args.asr_lead, args.asr_noise_rms,
                                                             args.asr_noise_kind)
        result["asr_held_out_voices"]["voice_split"] = args.asr_voice_split
        print("asr held-out voices WER", {d: r["wer"] for d, r in result["asr_held_out_voices"]["by_decoder"].items()}, flush=True)
        if Path(args.librispeech).is_dir() and not args.no_librispeech:
            result["asr_librispeech"] = bench_asr_librispeech(sp, args.librispeech, args.count, args.librispeech_max_seconds, decoders, g)
            print("asr librispeech WER", {d: r["wer"] for d, r in result["asr_librispeech"]["by_decoder"].items()}, flush=True)
    if "ttslong" in tasks:
        result["tts_long"] = bench_tts_long(sp, judge, args.count, args.long_sentences, args.teacher_voice, g)
        print("tts long texts", {k: v for k, v in result["tts_long"].items() if k != "examples"}, flush=True)
    if "ttsjoined" in tasks:
        result["tts_joined"] = bench_tts_long(sp, judge, args.count, args.long_sentences, args.teacher_voice, g, joined=True)
        print("tts long sentences", {k: v for k, v in result["tts_joined"].items() if k != "examples"}, flush=True)
    if "asrlong" in tasks:
        decoders = args.asr_decoders.split(",")
        result["asr_long"] = bench_asr_long(sp, args.count, args.long_sentences, decoders, g)
        print("asr long recordings WER", {d: r["wer"] for d, r in result["asr_long"]["by_decoder"].items()}, flush=True)
    if "textqa" in tasks:
        result["text_qa"] = bench_text_qa(sp, args.count)
        print("text QA", {k: v for k, v in result["text_qa"].items() if k != "examples"}, flush=True)
    if "qa" in tasks:
        result["spoken_qa"] = bench_qa(sp, judge, args.count, g, None if args.no_teacher else args.teacher_voice)
        print("spoken QA", {k: v for k, v in result["spoken_qa"].items() if k != "examples"}, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
