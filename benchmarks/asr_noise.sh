#!/usr/bin/env bash
# ASR of held-out voices (unseen text) in rooms louder than the speech LM's training rooms, one model.
# M=model directory or shipped name (default speechlm-default), P=prefix of the result files, O=their directory.
# The speech LM hears through 2 views, as the duplex server's answer assist does (AssistConfig.asr_views).
set -euo pipefail
M=${M:-speechlm-default}; P=${P:-shipped}; O=${O:-docs/results/asr_noise}
B="python benchmarks/speech_lm.py --model $M --tasks asr --count 40 --asr-decoders lm:2 --no-librispeech"
mkdir -p "$O"
$B --out "$O/${P}_clean.json"
for kind in white pink music clicks rain engine; do   # rain and engine: never in any training room
  $B --asr-noise-rms 0.02 --asr-noise-kind $kind --out "$O/${P}_${kind}34.json"
done
$B --asr-noise-rms 0.005 --out "$O/${P}_white46.json"
