"""What an entropy-coded codes file (.slc) spends, against the nominal bitrate and the .npz file, on held-out speech.

For each test set (real held-out LibriSpeech speakers >= 7000; held-out synthetic voices) and each bitrate of the
shipped codec (all four residual levels of each group, or the first 3, 2, 1): the codes of every file are written
as .npz and as .slc (arithmetic-coded with the codec's code prior, ``codec/entropy.py``), read back (the .slc's
codes must equal the .npz's exactly), and their sizes summed over the set's seconds of audio. Also the prior's
own estimate (bits a code on its training counts), and how fast the coder runs against the codec's encode on
one thread (× real time, side by side in one run).

    python benchmarks/codec_entropy.py --librispeech ../shared/data/librispeech-251 --synthetic data/synth-test \
        --limit 48 --out docs/results/codec_entropy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from speechlm.codec.audio import load_audio
from speechlm.codec.codes_file import CodesFile
from speechlm.codec.compress import encode_audio
from speechlm.codec.model import Codec
from speechlm.training.audio_data import list_source_files


def measure(codec: Codec, files: list[Path], levels: int, folder: Path) -> dict:
    seconds = npz_bytes = slc_bytes = 0.0
    encode_s = compress_s = decompress_s = 0.0
    for i, f in enumerate(files):
        audio = load_audio(f, sample_rate=codec.sample_rate)
        t0 = time.perf_counter()
        codes = encode_audio(codec, audio, levels=levels)
        t1 = time.perf_counter()
        slc = codes.to_slc(codec.code_prior)
        t2 = time.perf_counter()
        back = CodesFile.from_slc(slc, codec.code_prior)
        t3 = time.perf_counter()
        if not np.array_equal(back.codes, codes.codes) or back.num_samples != codes.num_samples:
            raise SystemExit(f"{f}: the .slc codes differ from the encoder's")
        npz = codes.save(folder / f"{i}.npz")
        seconds += len(audio) / codec.sample_rate
        npz_bytes += npz.stat().st_size
        slc_bytes += len(slc)
        encode_s, compress_s, decompress_s = encode_s + t1 - t0, compress_s + t2 - t1, decompress_s + t3 - t2
    c = codec.config
    return {
        "levels": levels, "files": len(files), "seconds": round(seconds, 1),
        "nominal_bps": c.bitrate_at(levels), "npz_bps": round(8 * npz_bytes / seconds), "slc_bps": round(8 * slc_bytes / seconds),
        "slc_vs_nominal": round(8 * slc_bytes / seconds / c.bitrate_at(levels), 3),
        "x_realtime": {"codec_encode": round(seconds / encode_s, 1), "compress": round(seconds / compress_s, 1),
                       "decompress": round(seconds / decompress_s, 1)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="codec-16k")
    ap.add_argument("--librispeech", default="../shared/data/librispeech-251")
    ap.add_argument("--synthetic", help="a synth corpus of held-out voices")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--levels", default="4,3,2,1")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = Codec.from_pretrained(args.model)
    if codec.code_prior is None:
        raise SystemExit(f"{args.model} has no code prior: speechlm codec fit-prior")
    sets = {"LibriSpeech held-out speakers": list_source_files(f"librispeech:{args.librispeech}:test")[0][: args.limit]}
    if args.synthetic:
        sets["synthetic held-out voices"] = list_source_files(f"manifest:{args.synthetic}")[0][: args.limit]
    prior_bits = codec.code_prior.bits_per_code()
    result = {"command": " ".join(sys.argv), "codec_id": codec.codec_id, "prior": codec.code_prior.fingerprint,
              "prior_bits_per_code": [round(float(b), 3) for b in prior_bits],
              "prior_frames": int(codec.code_prior.counts[0].sum()), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in sets.items():
            rows = []
            for levels in (int(k) for k in args.levels.split(",")):
                rows.append(measure(codec, files, levels, Path(tmp)))
                print(name, json.dumps(rows[-1]), flush=True)
            result["sets"][name] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
