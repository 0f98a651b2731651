#!/usr/bin/env bash
# The whole pipeline offline, on the tiny random CLIP of the golden fixtures (no download needed):
# convert an official-format checkpoint, then score images and write heat-map overlays.
# The tiny CLIP has random weights: the numbers demonstrate the pipeline, not detection quality.
# With network access, use the real model instead:  anomalyclip predict YOUR_IMAGES --out results
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-demo-out}"
golden="$here/tests/fixtures/golden"
anomalyclip convert "$golden/official_prompt_learner.pth" "$out/model" --clip "local-dir:$golden/tiny-clip"
anomalyclip predict "$golden/image_a.png" "$golden/image_b.png" --model "$out/model" --out "$out/predictions" --threshold 0.5
cat "$out/predictions/scores.csv"
echo "Overlays written to $out/predictions/"
