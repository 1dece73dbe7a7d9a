#!/bin/bash
# The loud-room measurements of 2026-12-07 (docs/benchmarks.md, "A room louder than the gate"); about 50 minutes on one
# thread. Then: python benchmarks/duplex_summary.py docs/results/loud_room/*.json --out docs/results/loud_room/summary.json
cd "$(dirname "$0")/.."
O=docs/results/loud_room
B="python benchmarks/duplex.py --assist speechlm-default --barge-after 0.6 --backchannel-after 0.3 --no-judge"
for det in vad-en none; do
  $B --count 20 --noise-rms 0.02 --gate-detector $det --out $O/assist_white34_$det.json
  $B --count 20 --gate-detector $det --out $O/assist_clean_$det.json
done
for det in vad-en none; do
  $B --count 20 --noise-rms 0.005 --gate-detector $det --out $O/assist_white46_$det.json
done
for kind in pink hum music rain engine; do
  for det in vad-en none; do
    $B --count 10 --noise-rms 0.02 --noise-kind $kind --gate-detector $det --out $O/assist_${kind}34_$det.json
  done
done
A="python benchmarks/duplex.py --barge-after 0.6 --backchannel-after 0.3 --no-judge --count 20"
for det in vad-en none; do
  $A --noise-rms 0.02 --gate-detector $det --out $O/alone_white34_$det.json
  $A --gate-detector $det --out $O/alone_clean_$det.json
done

