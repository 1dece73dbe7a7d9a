#!/bin/bash
# Fine-tune a shipped model on a lent GPU for a fixed time, in one command, and pack the result
# (bfloat16 weights + the run's config, step and log) for the trip back.
#
#   MODEL=.xfer/speechlm-default DATA=.xfer/lmdata.tar.xz bash training/gpu_sft.sh OUT_DIR
#   (MODEL_TAR=.xfer/model.tar.xz: unpack MODEL's folder from this tar.xz first)
#
# On the GPU machine (PyTorch and transformers there, our other packages as wheels in .whl/, as
# for benchmarks/gpu.sh), from the repository root. DATA: a tar.xz of tokenized corpora (data/tok-*,
# `speechlm data tokenize`). STAGE=sft (default: the speech LM's mixture) or duplex (two-channel
# dialogues; MODEL a speech LM or a duplex LM); TEXT_DROPOUT (sft, default 0.1): the share of TTS examples
# trained without their text, for guidance's unconditional twin (0 = as the fifth version). The run times its warm-up steps and fits its
# learning-rate schedule to SECONDS_BUDGET (`--time-budget-minutes`), so it ends on time.
# OUT_DIR receives lm-gpu.tar.part-* (at most 15 MiB each) and log.jsonl; here:
#   cat OUT/lm-gpu.tar.part-* | tar x -C runs/    # -> runs/lm-gpu/{model,checkpoint.pt,train_config.json,log.jsonl}
#   python -m speechlm.training.ship runs/lm-gpu NAME --codec codec-16k --dtype bfloat16
# (checkpoint.pt there holds the step and the training config only: the provenance for `ship`, naming the
# model it started from INIT_NAME, default MODEL's folder name, and the corpora as data/tok-*.)
# DEVICE=cpu with a small SECONDS_BUDGET and BATCH rehearses it on a CPU.
set -u
out=${1:?usage: training/gpu_sft.sh OUT_DIR}
model=${MODEL:-.xfer/speechlm-default}
data=${DATA:-.xfer/lmdata.tar.xz}
stage=${STAGE:-sft}
budget=${SECONDS_BUDGET:-360}
batch=${BATCH:-128}
lr=${LR:-6e-4}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
work=${WORK:-/tmp/lm-gpu-work}
mkdir -p "$out"
source benchmarks/gpu_setup.sh
rm -rf "$work" && mkdir -p "$work/data" && tar xJf "$data" -C "$work/data" || exit 1
if [ -n "${MODEL_TAR:-}" ]; then  # the model packed as tar.xz (bf16 weights shrink ~30 %) to fit the trip
  mkdir -p "$(dirname "$model")" && tar xJf "$MODEL_TAR" -C "$(dirname "$model")" || exit 1
fi
corpora=$(find "$work/data" -name index.jsonl -printf '%h\n' | sort | tr '\n' ' ')
echo "corpora: $corpora"
default_duplex_config='{"stop_weight": 3.0, "stop_frames": 5}'
case $stage in
  sft) stage_args=(--stage sft --weights tts=2,asr=1,interleave=0.3,spoken_qa=1.5,text=1.5 --pack-text --text-count 3000
         --max-length 256 --assistant-voices espeak:en-us --warmup-steps "${WARMUP:-100}" --text-dropout "${TEXT_DROPOUT:-0.1}") ;;
  duplex) stage_args=(--stage duplex --max-length 250 --p-from-start 0.5 --warmup-steps "${WARMUP:-50}"
         --duplex-config "${DUPLEX_CONFIG:-$default_duplex_config}") ;;
  *) echo "STAGE: sft or duplex, not $stage"; exit 1 ;;
esac

# the run: --steps is an upper bound, the schedule fitted to the budget during warm-up (a timeout as a
# net: the 2-minute checkpoints, each with its export, remain)
timeout $((budget + 60)) python3 -m speechlm train lm "${stage_args[@]}" --data $corpora --init-from "$model" \
  --batch-size "$batch" --lr "$lr" --dtype "$dtype" --device "$device" --loader-workers "${WORKERS:-8}" --threads 4 --quiet \
  --out "$work/run" --steps "${STEPS:-1000000}" --time-budget-minutes "$(python3 -c "print($budget / 60)")" \
  --log-every 20 --checkpoint-minutes 2 --checkpoint-every 1000000
echo "train exit: $?"
cp "$work/run/log.jsonl" "$out/log.jsonl"

# pack: the last export in bfloat16, its step and the config
python3 - "$work/run" "$work/back/lm-gpu" "${INIT_NAME:-$(basename "$model")}" "$work/data/" <<'EOF' || exit 1
import json, shutil, sys
from pathlib import Path
import torch
from speechlm.lm.duplex import DuplexLM, is_duplex_dir
from speechlm.lm.model import SpeechLM
run, back = Path(sys.argv[1]), Path(sys.argv[2])
back.mkdir(parents=True)
ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
model = (DuplexLM if is_duplex_dir(run / "model") else SpeechLM).from_pretrained(run / "model")  # exported with each checkpoint
model.to(torch.bfloat16).save_pretrained(back / "model")
if (run / "model" / "train_stage.json").exists():
    shutil.copy(run / "model" / "train_stage.json", back / "model" / "train_stage.json")
# the provenance as it reads here: the shipped model it started from by name, the corpora as data/tok-*
config = ckpt["train_config"]
config.update(init_from=sys.argv[3], data=[d.removeprefix(sys.argv[4]) for d in config["data"]])
torch.save({"step": ckpt["step"], "train_config": config}, back / "checkpoint.pt")
(back / "train_config.json").write_text(json.dumps(config, indent=2))
shutil.copy(run / "log.jsonl", back / "log.jsonl")
print(f"packed step {ckpt['step']}")
EOF
tar cf - -C "$work/back" lm-gpu | split -b 15M - "$out/lm-gpu.tar.part-"
ls -la "$out"
echo "gpu_sft.sh done"
