#!/bin/bash
# The GPU figures of docs/benchmarks.md, in one run on a lent GPU machine (an H100/H200 with
# PyTorch and transformers but none of our other packages and no network).
#
#   bash benchmarks/gpu.sh OUT_DIR            # on the GPU machine, from the repository root
#
# Before it: wheels of the missing packages in .whl/ (downloaded where pip works):
#   vector-quantize-pytorch torch-einops-utils einx loguru frozendict websockets soxr soundfile cffi pycparser
# Writes OUT_DIR/server_gpu_{duplex,qwen05b}{,_graphs}.json (and server_gpu_assist.json with PARTS=...,assist: the
# duplex model with the answer assist, as `speechlm serve` runs by default): the shipped duplex model (float32) and an
# untrained duplex LM on Qwen2-0.5B's backbone shape (bfloat16), each eager and with the LM backbone
# replayed from CUDA graphs (--cuda-graphs); OUT_DIR/mctp_gpu.json (first audio and decode speed of
# the shipped speech LM's architecture, with PARTS=...,mctp); OUT_DIR/speech_streams_gpu.json (many replies spoken at once,
# rows of one running batch vs one stream per reply in turn, the shipped speech LM, with PARTS=...,streams);
# OUT_DIR/hearing_batch_gpu.json (spoken questions heard and answered as one batch vs one by one, PARTS=...,hearing).
# PARTS picks what runs (default: all four server runs); DEVICE=cpu and small LOADS/BATCHES rehearse it on a CPU.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
device=${DEVICE:-cuda}
parts=${PARTS:-duplex,duplex_graphs,qwen05b,qwen05b_graphs}
mkdir -p "$out"
source benchmarks/gpu_setup.sh
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

server() {  # name, seconds allowed, then benchmarks/server.py arguments
  local name=$1 limit=$2
  shift 2
  case ",$parts," in *",$name,"*) ;; *) return ;; esac
  echo "== $name"
  timeout "$limit" python3 benchmarks/server.py --model duplex --device "$device" --threads 4 --seconds 5 --clients-per-process 32 \
    --out "$out/server_gpu_$name.json" "$@"
}
# the shipped duplex model: the most sessions held in real time, step time per batch, memory per session
server duplex 90 --lm duplex-default --batches "${BATCHES:-1,64,256,512}" --sessions "${LOADS_EAGER:-64,128}"
server duplex_graphs 150 --lm duplex-default --cuda-graphs --batches "${BATCHES:-1,64,256,512}" --sessions "${LOADS:-128,256,384}"
# the shipped server as `speechlm serve` runs it: the duplex model with the answer assist, clients asking a spoken question
# (espeak-ng's, from a file: the lent machines have no espeak-ng) every 4.5 s; reply onset and late ticks (PARTS=...,assist)
server assist 240 --lm duplex-default --assist speechlm-default --speech --speech-wav benchmarks/data/two_plus_three.wav \
  --pause 3.0 --seconds 20 --batches "${BATCHES_ASSIST:-1,64}" --sessions "${LOADS_ASSIST:-16,64}"
# a ~0.5B backbone (random weights: speed does not depend on them), bfloat16
server qwen05b 80 --lm random:qwen2-0.5b --dtype bfloat16 --batches "${BATCHES:-1,64,256}" --sessions "${LOADS_EAGER2:-32}"
server qwen05b_graphs 150 --lm random:qwen2-0.5b --dtype bfloat16 --cuda-graphs --batches "${BATCHES:-1,64,256,512}" --sessions "${LOADS2:-64,128,256}"
# TTS first audio and decode throughput, MCTP vs plain, the shipped speech LM's architecture
case ",$parts," in *",mctp,"*)
  timeout 90 python3 benchmarks/mctp.py --head parallel_delay --delays 0,1,1,1,1,1,1,1 --frames "${FRAMES:-200}" --repeats 5 \
    --device "$device" --out "$out/mctp_gpu.json" ;;
esac
# many replies at once (the answer assist's speech): continuous batching vs one stream per reply, the shipped speech LM
case ",$parts," in *",streams,"*)
  timeout 300 python3 benchmarks/speech_streams.py --device "$device" --sizes "${STREAMS:-1,8,32}" --repeats 1 \
    --out "$out/speech_streams_gpu.json" ;;
esac
# several spoken questions heard and answered as one batch vs one by one (the assist's hearing; questions from a file)
case ",$parts," in *",hearing,"*)
  timeout 240 python3 benchmarks/hearing_batch.py --device "$device" --questions benchmarks/data/questions8.npz \
    --sizes "${HEARING:-1,8,32,64}" --repeats 1 --out "$out/hearing_batch_gpu.json" ;;
esac
echo "gpu.sh done"
