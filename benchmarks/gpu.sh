#!/bin/bash
# The GPU figures of docs/benchmarks.md, in one run on a lent GPU machine (an H100/H200 with
# PyTorch and transformers but none of our other packages and no network).
#
#   bash benchmarks/gpu.sh OUT_DIR            # on the GPU machine, from the repository root
#
# Before it: wheels of the missing packages in .whl/ (downloaded where pip works):
#   vector-quantize-pytorch torch-einops-utils einx loguru frozendict websockets soxr soundfile cffi pycparser
# Writes OUT_DIR/server_gpu_duplex.json (the shipped duplex model, float32),
# OUT_DIR/server_gpu_qwen05b.json (an untrained duplex LM on Qwen2-0.5B's backbone shape, bfloat16),
# OUT_DIR/mctp_gpu.json (first audio and decode speed of the shipped speech LM's architecture).
# DEVICE=cpu and small LOADS/BATCHES rehearse it on a CPU.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${NO_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

# 1. the shipped duplex model: the most sessions held in real time, step time per batch, memory per session
timeout "${T1:-240}" python3 benchmarks/server.py --model duplex --lm duplex-default --device "$device" --threads 4 \
  --batches "${BATCHES:-1,16,64,256,512}" --sessions "${LOADS:-64,128,256,384}" --seconds 5 --clients-per-process 32 \
  --out "$out/server_gpu_duplex.json"
# 2. a ~0.5B backbone (random weights: speed does not depend on them), bfloat16
timeout "${T2:-200}" python3 benchmarks/server.py --model duplex --lm random:qwen2-0.5b --dtype bfloat16 --device "$device" --threads 4 \
  --batches "${BATCHES:-1,16,64,256,512}" --sessions "${LOADS2:-${LOADS:-64,128,256}}" --seconds 5 --clients-per-process 32 \
  --out "$out/server_gpu_qwen05b.json"
# 3. TTS first audio and decode throughput, MCTP vs plain, the shipped speech LM's architecture
timeout "${T3:-90}" python3 benchmarks/mctp.py --head parallel_delay --delays 0,1,1,1,1,1,1,1 --frames "${FRAMES:-200}" --repeats 5 \
  --device "$device" --out "$out/mctp_gpu.json"
echo "gpu.sh done"
