#!/bin/bash
# The loud-room measurements of 2026-12-07 (docs/benchmarks.md, "A room louder than the gate"); about 50 minutes on one
# thread. Then: python benchmarks/duplex_summary.py docs/results/loud_room/*.json --out docs/results/loud_room/summary.json
# DETS="vad-en" reruns only the rows with the gate's detector (those "none" do not depend on it).
cd "$(dirname "$0")/.."
DETS=${DETS:-"vad-en none"}
O=docs/results/loud_room
B="python benchmarks/duplex.py --assist speechlm-default --barge-after 0.6 --backchannel-after 0.3 --no-judge"
for det in $DETS; do
  $B --count 20 --noise-rms 0.02 --gate-detector $det --out $O/assist_white34_$det.json
  $B --count 20 --gate-detector $det --out $O/assist_clean_$det.json
done
for det in $DETS; do
  $B --count 20 --noise-rms 0.005 --gate-detector $det --out $O/assist_white46_$det.json
done
for kind in pink hum music rain engine; do
  for det in $DETS; do
    $B --count 10 --noise-rms 0.02 --noise-kind $kind --gate-detector $det --out $O/assist_${kind}34_$det.json
  done
done
A="python benchmarks/duplex.py --barge-after 0.6 --backchannel-after 0.3 --no-judge --count 20"
for det in $DETS; do
  $A --noise-rms 0.02 --gate-detector $det --out $O/alone_white34_$det.json
  $A --gate-detector $det --out $O/alone_clean_$det.json
done

# typing: key clicks at -34 dBFS (RMS), no backchannels
for det in $DETS; do
  python benchmarks/duplex.py --assist speechlm-default --barge-after 0.6 --no-judge --count 10 --noise-rms 0.02 \
    --noise-kind clicks --gate-detector $det --out $O/assist_clicks34_nobc_$det.json
done
