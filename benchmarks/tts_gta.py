"""The speech LM's speech frame by frame given the true past (ground-truth-aligned, "GTA"): how often its greedy
choice of each codebook is the teacher's code, and how intelligible the teacher's speech stays with the LM's choices
in place of the codes.

For the usual held-out TTS sentences of ``benchmarks/speech_lm.py``: the teacher's speech (espeak-ng en-us, the voice
the model learned) -> the codec's codes -> the LM's TTS training forward on them (word-aligned, as it was trained;
no guidance) -> at every audio position the argmax of each codebook, from the backbone's head and from each MCTP
module -> frames -> the codec's decoder -> Whisper tiny.en. A free-running TTS differs twice: its past is its own,
and most of its frames come from MCTP modules (about 3.6 frames per backbone forward). Reports the agreement per
codebook and predictor, and the judge's corpus WER of: the teacher, the teacher through the codec, the backbone's
choices (every codebook, codebook 0 only, every codebook but 0) and each MCTP module's (every codebook).

    python benchmarks/tts_gta.py --count 40 --out docs/results/tts_gta.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from speech_lm import TTS_SOURCES, corpus_wer, held_out_texts

from speechlm.judge import WhisperJudge, word_error_rate
from speechlm.lm.layout import audio_targets
from speechlm.speech import SpeechPipeline, resolve_dtype
from speechlm.training.lm_data import collate, render, tts_task
from speechlm.training.teachers import get_teacher
from speechlm.training.tokenize import _frames_for_words

IGNORE = -100
FORWARD_KEYS = ("input_ids", "audio_codes", "audio_mask", "attention_mask", "labels", "audio_loss_mask")


def tts_batch(lm, text: str, codes: np.ndarray, words: list[dict]) -> dict:
    """The TTS training example of ``text`` spoken as ``codes`` (F, Q), collated as a batch of one."""
    task = tts_task(text, codes, words=words, tokenizer=lm.tokenizer)
    return collate([render(task.segments, lm, trained=task.trained, task=task.task)], lm.vocab.text_pad, lm.config.empty_code)


def gta_frames(lm, text: str, codes: np.ndarray, words: list[dict]) -> dict[str, tuple[np.ndarray, list[float]]]:
    """predictor ("backbone", "mctp1", ...) -> (the frames (F, Q) with its greedy choices in place of the codes it
    predicts, its agreement with the codes per codebook). Which frame each target belongs to comes from the same
    example built on frame numbers instead of codes (the layout moves numbers as it moves codes)."""
    cfg = lm.config
    F, Q = codes.shape
    if F >= cfg.empty_code:
        raise SystemExit(f"an utterance of {F} frames: frame numbers must stay below the empty code {cfg.empty_code}")
    batch = tts_batch(lm, text, codes, words)
    numbers = tts_batch(lm, text, np.repeat(np.arange(F)[:, None], Q, 1), words)
    with torch.inference_mode():
        out = lm(**{k: batch[k] for k in FORWARD_KEYS}, all_losses=True)
    predictors = {"backbone": (out.audio_logits, 1), **{f"mctp{i}": (lg, i + 1) for i, lg in enumerate(out.mctp_logits, start=1)}}
    result = {}
    for name, (logits, offset) in predictors.items():
        targets, frame_of = (audio_targets(b["audio_codes"], b["audio_mask"], offset=offset, delays=cfg.audio_delays, empty=cfg.empty_code,
                                           loss_mask=b["audio_loss_mask"]) for b in (batch, numbers))  # fmt: skip
        rows = (targets != IGNORE).any(-1)  # the positions the forward returned logits for
        targets, frame_of, choice = targets[rows], frame_of[rows], logits.float().argmax(-1).cpu()
        real = (targets != IGNORE) & (targets != cfg.empty_code)  # a frame's code (not a segment's end)
        frames = torch.from_numpy(codes.astype(np.int64))
        agreement = []
        for q in range(Q):
            at = real[:, q]
            f, chosen = frame_of[at, q], choice[at, q]
            chosen = torch.where(chosen >= cfg.empty_code, frames[f, q], chosen)  # "ended" chosen mid-speech: the code kept
            agreement.append(float((chosen == targets[at, q]).float().mean()))
            frames[f, q] = chosen
        result[name] = (frames.numpy(), agreement)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="speechlm-default")
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--teacher-voice", default="espeak:en-us")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sp = SpeechPipeline.from_pretrained(args.model, dtype=resolve_dtype(args.dtype))
    lm, codec = sp.lm.eval(), sp.codec
    teacher, rng, judge = get_teacher(args.teacher_voice), random.Random(0), WhisperJudge()

    def decode(codes: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return codec.decode(torch.from_numpy(codes.astype(np.int64))[None])[0].numpy()

    heard: dict[str, list[tuple[str, str]]] = {}
    agreement: dict[str, list[list[float]]] = {}
    start = time.time()
    for item in held_out_texts(TTS_SOURCES, args.count):
        text = item["text"]
        spoken = teacher.synthesize(text, rng)
        with torch.inference_mode():
            codes = codec.encode(torch.from_numpy(spoken.audio)[None])[0].numpy()
        words = _frames_for_words([w.to_json() for w in spoken.words], lm.config.frame_rate, len(codes))
        gta = gta_frames(lm, text, codes, words)
        audios = {"teacher": spoken.audio, "teacher_codec": decode(codes)}
        for name, (frames, agree) in gta.items():
            agreement.setdefault(name, []).append(agree)
            audios[f"{name}_all"] = decode(frames)
        first, rest = codes.copy(), gta["backbone"][0].copy()
        first[:, 0], rest[:, 0] = gta["backbone"][0][:, 0], codes[:, 0]
        audios |= {"backbone_codebook0": decode(first), "backbone_but_codebook0": decode(rest)}
        for name, audio in audios.items():
            heard.setdefault(name, []).append((text, judge(audio)))
    result = {
        "model": args.model, "sentences": args.count, "teacher_voice": args.teacher_voice, "dtype": args.dtype,
        "seconds": round(time.time() - start, 1),
        "judge_wer": {name: round(100 * corpus_wer(pairs), 1) for name, pairs in heard.items()},
        # a judge that loops on one sentence moves the corpus WER by many points: the median sentence's too
        "median_sentence_wer": {name: round(100 * statistics.median(word_error_rate(t, h) for t, h in pairs), 1) for name, pairs in heard.items()},
        "agreement_per_codebook": {name: [round(float(x), 3) for x in np.mean(v, axis=0)] for name, v in agreement.items()},
        "heard": [{"text": heard["teacher"][k][0], **{name: heard[name][k][1] for name in heard}} for k in range(len(heard["teacher"]))],
    }
    print(json.dumps({k: result[k] for k in ("judge_wer", "median_sentence_wer", "agreement_per_codebook")}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
