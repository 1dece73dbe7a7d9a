#!/usr/bin/env bash
# The ASR adapter vs the same model without it (--no-adapter), side by side, one thread each:
# docs/results/adapter_*.json and adapter_base_*.json (docs/benchmarks.md, "The ASR adapter").
#   bash benchmarks/asr_adapter.sh        (M=DIR for another model, P=PREFIX for other file names; needs the [eval] extra)
cd "$(dirname "$0")/.."
set -u
M=${M:-speechlm-default}   # a model with an asr adapter (the run: M=runs/lm-asr-adapter/model)
R=docs/results
P=${P:-adapter}
pair() {  # name, args...
  local name=$1; shift
  python benchmarks/speech_lm.py --model $M --codec codec-16k "$@" --out $R/${P}_${name}.json > /tmp/ad_${name}.log 2>&1 &
  python benchmarks/speech_lm.py --model $M --codec codec-16k "$@" --no-adapter --out $R/${P}_base_${name}.json > /tmp/ad_base_${name}.log 2>&1 &
  wait
  echo "$name: $(grep -h 'WER\|spoken QA' /tmp/ad_${name}.log | tr '\n' ' ') || base: $(grep -h 'WER\|spoken QA' /tmp/ad_base_${name}.log | tr '\n' ' ')"
}
pair headline --tasks asr --count 40 --asr-decoders lm:4,lm:1
pair held80 --tasks asr --count 80 --asr-decoders lm:4 --no-librispeech
pair lead --tasks asr --count 80 --asr-decoders lm:4,lm:4:asis --asr-lead 0.5 --no-librispeech
pair noisy --tasks asr --count 80 --asr-decoders lm:4,lm:4:asis --asr-lead 0.5 --asr-noise-rms 0.005 --no-librispeech
pair quietroom --tasks asr --count 80 --asr-decoders lm:4 --asr-lead 0.5 --asr-noise-rms 0.001 --no-librispeech
pair train80 --tasks asr --count 80 --asr-voice-split train --asr-decoders lm:4 --no-librispeech
pair qa --tasks qa --count 40
