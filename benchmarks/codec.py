"""Codec quality and speed, side by side with Codec2 and Opus (same run, same files).

Quality, per test set (real held-out LibriSpeech speakers >= 7000, and held-out synthetic
voices): STOI, PESQ-WB, SI-SDR, log-mel distance (after removing each codec's constant
delay), bitrate, and the Whisper tiny.en WER of the decoded audio against the judge's own
transcript of the original (needs the [eval] extra).

Speed, 1 CPU thread: x real time of offline encode+decode and of frame-by-frame
(streaming) encode+decode, batch 1, with the eager steps and with the AOTInductor-compiled ones
(``speechlm.codec.compiled``; compiled once, cached).

Ours (the first system) is also compared with every other system file by file: the mean
difference of STOI, PESQ-WB and WER with a 95 % bootstrap interval (``paired`` in the JSON; the
per-file figures under ``files``). The JSON is written after every test set.

    python benchmarks/codec.py --model codec-16k --librispeech ../shared/data/librispeech-251 \\
        --synthetic data/synth-test --limit 48 --out docs/results/codec.json
    # lower bitrates of the same codes (the first residual levels of each group) beside the low-rate anchors
    python benchmarks/codec.py --bandwidths 1.5,1,0.5 --anchors codec2-1600,codec2-1200,codec2-700C --no-speed \\
        --out docs/results/codec_bandwidths.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speechlm.codec.audio import load_audio, resample
from speechlm.codec.compiled import CompiledSteps
from speechlm.codec.compress import decode_codes, encode_audio
from speechlm.codec.errors import SpeechLMError
from speechlm.codec.metrics import all_metrics
from speechlm.codec.model import Codec
from speechlm.judge import WhisperJudge, word_error_rate
from speechlm.training.audio_data import list_source_files

SR = 16000


# --- anchors -----------------------------------------------------------------------------

def codec2(audio: np.ndarray, mode: str) -> np.ndarray:
    """Codec2 at 8 kHz (it is a narrow-band codec), back up to 16 kHz."""
    with tempfile.TemporaryDirectory() as d:
        raw, bits, out = Path(d) / "in.raw", Path(d) / "b.c2", Path(d) / "out.raw"
        pcm = (np.clip(resample(audio, SR, 8000), -1, 1) * 32767).astype("<i2")
        raw.write_bytes(pcm.tobytes())
        subprocess.run(["c2enc", mode, str(raw), str(bits)], check=True, capture_output=True)
        subprocess.run(["c2dec", mode, str(bits), str(out)], check=True, capture_output=True)
        y = np.frombuffer(out.read_bytes(), dtype="<i2").astype(np.float32) / 32768
    return resample(y, 8000, SR)


def opus(audio: np.ndarray, kbps: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        wav, enc, out = Path(d) / "in.wav", Path(d) / "x.opus", Path(d) / "out.wav"
        import soundfile as sf

        sf.write(wav, audio, SR, subtype="PCM_16")
        subprocess.run(["opusenc", "--quiet", "--bitrate", str(kbps), "--hard-cbr", str(wav), str(enc)], check=True, capture_output=True)
        subprocess.run(["opusdec", "--quiet", "--rate", str(SR), str(enc), str(out)], check=True, capture_output=True)
        y, _ = sf.read(out, dtype="float32")
    return y if y.ndim == 1 else y.mean(axis=1)


def roundtrip(codec: Codec, levels: int | None = None):
    """Audio -> our codec's codes (``levels``: the first residual levels of each group only) -> audio."""
    return lambda audio: decode_codes(codec, encode_audio(codec, audio, levels))


# --- quality -----------------------------------------------------------------------------

def quality(systems: dict, files: list[Path], judge: WhisperJudge | None) -> tuple[dict, dict]:
    """Score every system on every file -> (summary per system, per-file rows per system)."""
    results = {name: [] for name in systems}
    for f in files:
        audio = load_audio(f)
        original_text = judge(audio) if judge else None
        for name, fn in systems.items():
            decoded = fn(audio)
            m = all_metrics(audio, decoded)
            if judge:
                m["wer"] = word_error_rate(original_text, judge(decoded[: len(audio)]))
            results[name].append(m)
    summary = {}
    for name, rows in results.items():
        summary[name] = {k: round(float(np.mean([r[k] for r in rows if r.get(k) is not None])), 4) for k in rows[0] if any(r.get(k) is not None for r in rows)}
        if "wer" in rows[0]:  # one file on which the judge loops can dominate the mean
            summary[name]["wer_median"] = round(float(np.median([r["wer"] for r in rows])), 4)
    return summary, results


def paired(ours: list[dict], other: list[dict], key: str, resamples: int = 2000) -> dict | None:
    """Ours minus another system on the same files: the mean difference of ``key``, its 95 %
    bootstrap interval (files resampled), and on how many files ours is better (higher, or
    lower for WER). A difference whose interval excludes 0 is one the files resolve."""
    pairs = [(a[key], b[key]) for a, b in zip(ours, other) if a.get(key) is not None and b.get(key) is not None]
    if len(pairs) < 2:
        return None
    d = np.array([a - b for a, b in pairs])
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    better = (d < 0) if key == "wer" else (d > 0)
    return {"diff": round(float(d.mean()), 4), "ci95": [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)],
            "files_better": int(better.sum()), "files_worse": int(((d > 0) if key == "wer" else (d < 0)).sum()), "files": len(d)}


# --- speed -------------------------------------------------------------------------------

def speed(codec: Codec, seconds: float = 10.0, rounds: int = 5) -> dict:
    """x real time on one thread, batch 1: offline, frame by frame with the eager steps and with the
    compiled ones (``speechlm.codec.compiled``). The runs alternate, ``rounds`` times each over
    ``seconds`` of audio; medians, and the median of the per-round compiled/eager ratio (the
    figure that survives a noisy machine)."""
    torch.set_num_threads(1)
    audio = torch.randn(1, int(seconds * SR)) * 0.1
    frames = audio.shape[1] // codec.frame_length
    audio = audio[:, : frames * codec.frame_length]

    def offline():
        codec.decode(codec.encode(audio))

    def streaming(steps):
        state = steps.init_state(1)
        for t in range(frames):
            codes, state = steps.encode_step(audio[:, t * codec.frame_length : (t + 1) * codec.frame_length], state)
            _, state = steps.decode_step(codes, state)

    runs = {"offline": offline, "frame_by_frame": lambda: streaming(codec)}
    out = {}
    try:
        t = time.perf_counter()
        compiled = CompiledSteps.load_or_build(codec)
        out["compile_or_load_s"] = round(time.perf_counter() - t, 1)
        runs["frame_by_frame_compiled"] = lambda: streaming(compiled)
    except SpeechLMError as e:
        out["frame_by_frame_compiled"] = f"unavailable: {e}"
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    for name, ts in times.items():
        out[f"{name}_x_realtime"] = round(seconds / float(np.median(ts)), 1)
    if "frame_by_frame_compiled" in times:
        ratios = [e / c for e, c in zip(times["frame_by_frame"], times["frame_by_frame_compiled"])]
        out["compiled_speedup"] = round(float(np.median(ratios)), 2)
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="codec-16k")
    ap.add_argument("--also", nargs="*", default=[], help="more of our codecs (names or directories) scored in the same run")
    ap.add_argument("--librispeech", default="../shared/data/librispeech-251")
    ap.add_argument("--synthetic", help="a synth corpus of held-out voices (speechlm data synth ... test voices)")
    ap.add_argument("--limit", type=int, default=48, help="files per test set")
    ap.add_argument("--bandwidths", default="", help="our codec at lower bitrates too (kbit/s, comma-separated, e.g. 1.5,1,0.5: "
                    "the first residual levels of each group)")
    ap.add_argument("--anchors", default="all", help="comma-separated, of codec2-3200,codec2-2400,codec2-1600,opus-6,opus-8 (all: these five) "
                    "and codec2-1200, codec2-700C (the low-rate modes)")
    ap.add_argument("--no-judge", action="store_true", help="skip the Whisper WER")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed rounds (quality only)")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = Codec.from_pretrained(args.model).eval()
    anchors = {
        "codec2-3200": ("codec2 3.2 kbps", lambda a: codec2(a, "3200")),
        "codec2-2400": ("codec2 2.4 kbps", lambda a: codec2(a, "2400")),
        "codec2-1600": ("codec2 1.6 kbps", lambda a: codec2(a, "1600")),
        "opus-6": ("opus 6 kbps", lambda a: opus(a, 6)),
        "opus-8": ("opus 8 kbps", lambda a: opus(a, 8)),
        "codec2-1200": ("codec2 1.2 kbps", lambda a: codec2(a, "1200")),
        "codec2-700C": ("codec2 0.7 kbps", lambda a: codec2(a, "700C")),
    }
    five = ["codec2-3200", "codec2-2400", "codec2-1600", "opus-6", "opus-8"]
    chosen = five if args.anchors == "all" else [a.strip() for a in args.anchors.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(anchors))
    if unknown:
        raise SystemExit(f"unknown anchors {unknown}; choose from {', '.join(anchors)}")
    systems = {
        f"speechlm {codec.config.bitrate / 1000:.1f} kbps": roundtrip(codec),
        **{f"speechlm {float(kbps):.1f} kbps": roundtrip(codec, codec.config.levels_for(float(kbps))) for kbps in args.bandwidths.split(",") if kbps.strip()},
        **{f"speechlm {path}": roundtrip(Codec.from_pretrained(path).eval()) for path in args.also},
        **dict(anchors[a] for a in chosen),
    }
    judge = None if args.no_judge else WhisperJudge()
    report = {"model": args.model, "codec_id": codec.codec_id, "bitrate": codec.config.bitrate, "sets": {}}
    sets = {"librispeech held-out speakers (>= 7000)": list_source_files(f"librispeech:{args.librispeech}:test")[0][: args.limit]}
    if args.synthetic:
        sets["synthetic held-out voices"] = list_source_files(f"manifest:{args.synthetic}")[0][: args.limit]
    ours = next(iter(systems))
    for name, files in sets.items():
        print(f"== {name}: {len(files)} files", flush=True)
        summary, rows = quality(systems, files, judge)
        report["sets"][name] = summary
        # ours vs each other system, file by file (a paired difference resolves far smaller gaps than two means)
        report.setdefault("paired", {})[name] = {
            other: {key: paired(rows[ours], rows[other], key) for key in ("stoi", "pesq_wb", "wer") if key in rows[ours][0]}
            for other in systems if other != ours
        }
        report.setdefault("files", {})[name] = {system: r for system, r in rows.items()}
        for system, m in summary.items():
            print(f"{system:>20}: {json.dumps(m)}", flush=True)
        for other, p in report["paired"][name].items():
            print(f"{ours} - {other}: {json.dumps(p)}", flush=True)
        write(report, args.out)  # after every set: a killed run keeps what it measured
    if not args.no_speed:
        report["speed_1_thread"] = speed(codec)
        print("speed:", report["speed_1_thread"])
    write(report, args.out)


def write(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
