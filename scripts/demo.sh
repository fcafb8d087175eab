#!/usr/bin/env bash
# The main job: slice SmolLM2-135M (SP 0.25, dynamic) and quantize it to int8 W8A8 in one
# oneshot pass, then print parameters, size on disk and perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dynslice compress smollm2 out/smollm2-sliced-w8a8 \
    --sparsity 0.25 --quantize w8a8 --eval-windows 8 "$@"
