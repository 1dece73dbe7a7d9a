#!/bin/bash
# Fine-tune the shipped speech LM on a lent GPU for a fixed time, in one command, and pack the
# result (bfloat16 weights + the run's config, step and log) for the trip back.
#
#   MODEL=.xfer/speechlm-default DATA=.xfer/lmdata.tar.xz bash training/gpu_sft.sh OUT_DIR
#   (MODEL_TAR=.xfer/model.tar.xz: unpack MODEL's folder from this tar.xz first)
#
# On the GPU machine (PyTorch and transformers there, our other packages as wheels in .whl/, as
# for benchmarks/gpu.sh), from the repository root. DATA: a tar.xz of tokenized corpora
# (data/tok-*, `speechlm data tokenize`). A short calibration run (CALIB_STEPS steps) times a step;
# the real run gets the steps that fill SECONDS_BUDGET, so its learning-rate schedule ends on time.
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
budget=${SECONDS_BUDGET:-360}
batch=${BATCH:-128}
lr=${LR:-6e-4}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
calib_steps=${CALIB_STEPS:-40}
work=${WORK:-/tmp/lm-gpu-work}
mkdir -p "$out"
source benchmarks/gpu_setup.sh
rm -rf "$work" && mkdir -p "$work/data" && tar xJf "$data" -C "$work/data" || exit 1
if [ -n "${MODEL_TAR:-}" ]; then  # the model packed as tar.xz (bf16 weights shrink ~30 %) to fit the trip
  mkdir -p "$(dirname "$model")" && tar xJf "$MODEL_TAR" -C "$(dirname "$model")" || exit 1
fi
corpora=$(find "$work/data" -name index.jsonl -printf '%h\n' | sort | tr '\n' ' ')
echo "corpora: $corpora"
common=(--stage sft --data $corpora --init-from "$model" --batch-size "$batch" --lr "$lr" --warmup-steps 100
  --weights tts=2,asr=1,interleave=0.3,spoken_qa=1.5,text=1.5 --pack-text --text-count 3000 --max-length 256
  --assistant-voices espeak:en-us --dtype "$dtype" --device "$device" --loader-workers "${WORKERS:-8}" --threads 4 --quiet)

# 1. calibration: seconds per step after the first 10 (allocator, autotuning)
python3 -m speechlm train lm "${common[@]}" --out "$work/calib" --steps 100000 --stop-at "$calib_steps" --log-every 10 \
  --checkpoint-every 1000000 || exit 1
steps=$(python3 - "$work/calib/log.jsonl" "$budget" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0], rows[-1]
per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
print(max(20, int(float(sys.argv[2]) / per_step)), file=sys.stdout)
print(f"calibration: {per_step * 1000:.0f} ms a step at this batch", file=sys.stderr)
EOF
) || exit 1
echo "steps: $steps"

# 2. the run, on a fresh schedule of that many steps (a timeout as a net: the 2-minute checkpoints remain)
timeout $((budget + 50)) python3 -m speechlm train lm "${common[@]}" --out "$work/run" --steps "$steps" --log-every 20 \
  --checkpoint-minutes 2 --checkpoint-every 1000000
echo "train exit: $?"
cp "$work/run/log.jsonl" "$out/log.jsonl"

# 3. pack: bfloat16 weights (from the export, or the last checkpoint if the net was hit), step + config
python3 - "$work/run" "$work/back/lm-gpu" "${INIT_NAME:-$(basename "$model")}" "$work/data/" <<'EOF' || exit 1
import json, shutil, sys
from pathlib import Path
import torch
from speechlm.lm.model import SpeechLM
run, back = Path(sys.argv[1]), Path(sys.argv[2])
back.mkdir(parents=True)
ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
config = json.loads((run / "train_config.json").read_text())
model = SpeechLM.from_pretrained(config["init_from"])
model.load_state_dict(ckpt["model"])  # the last checkpoint is the exported step when the run ended
model.to(torch.bfloat16).save_pretrained(back / "model")
for name in ("train_stage.json",):
    if (run / "model" / name).exists():
        shutil.copy(run / "model" / name, back / "model" / name)
# the provenance as it reads here: the shipped model it started from by name, the corpora as data/tok-*
config.update(init_from=sys.argv[3], data=[d.removeprefix(sys.argv[4]) for d in config["data"]])
torch.save({"step": ckpt["step"], "train_config": config}, back / "checkpoint.pt")
(back / "train_config.json").write_text(json.dumps(config, indent=2))
shutil.copy(run / "log.jsonl", back / "log.jsonl")
print(f"packed step {ckpt['step']}")
EOF
tar cf - -C "$work/back" lm-gpu | split -b 15M - "$out/lm-gpu.tar.part-"
ls -la "$out"
echo "gpu_sft.sh done"
