#!/bin/bash
# Decoding speed of two checkouts of this repository, side by side on this machine (one torch thread
# per process): TTS and ASR of the shipped speech LM (the two checkouts at once, one per core, so their
# ratios share the machine's load), then the assisted server's reply onset and the duplex model's tick
# (one after the other, alternating, twice: these time a real-time pipeline and need the cores).
#
#   git worktree add /tmp/before <commit>
#   bash benchmarks/ab_decoding.sh /tmp/before . docs/results/cpu_decoding
#
# Each checkout runs its own speechlm/ (PYTHONPATH); codec/, training/ and streaming/ come from the installed
# (editable) package for both, so compare checkouts that differ in speechlm/ only.
set -euo pipefail
BEFORE=$(cd "$1" && pwd)
AFTER=$(cd "$2" && pwd)
mkdir -p "$3"
OUT=$(cd "$3" && pwd)

run() {  # run CHECKOUT NAME ARGS...: benchmarks/ARGS in CHECKOUT, its log beside the JSON
  local checkout=$1 name=$2
  shift 2
  (cd "$checkout" && PYTHONPATH="$checkout" python "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1)
}

TTS="benchmarks/speech_lm.py --tasks tts --count 40 --dtype bfloat16 --threads 1 --no-teacher"
ASR="benchmarks/speech_lm.py --tasks asr --count 40 --dtype bfloat16 --threads 1 --no-teacher --no-librispeech --asr-decoders lm,lm:2 --asr-check-rounds 0"
run "$BEFORE" tts_before $TTS & run "$AFTER" tts_after $TTS & wait
run "$BEFORE" asr_before $ASR & run "$AFTER" asr_after $ASR & wait

SERVER="benchmarks/server.py --model duplex --lm duplex-default --assist speechlm-default --speech --sessions 1,4 --seconds 30 --batches 1"
for r in 1 2; do
  run "$BEFORE" "onset_before_$r" $SERVER
  run "$AFTER" "onset_after_$r" $SERVER
done
for r in 1 2; do
  run "$BEFORE" "tick_before_$r" benchmarks/duplex_tick.py --batch 8 --frames 300
  run "$AFTER" "tick_after_$r" benchmarks/duplex_tick.py --batch 8 --frames 300
done
