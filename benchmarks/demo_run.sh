#!/usr/bin/env bash
# The main job's figures as README's "Two commands" quotes them: runs scripts/demo.sh
# (its set-up check included: seconds where .venv exists, minutes where it does not) and
# records the machine, the wall time and everything the demo printed in
# benchmarks/results/<name>.txt (default name: demo).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/machine.sh
out="benchmarks/results/${1:-demo}.txt"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export TQDM_MININTERVAL=30  # as .ci/run: progress bars would fill the record
# The commit the demo ran at: HEAD may move while it goes on.
commit=$(git rev-parse --short HEAD)
start=$(date +%s)
bash scripts/demo.sh >"$log" 2>&1
seconds=$(($(date +%s) - start))
{
    echo "Produced by \`bash benchmarks/demo_run.sh\` at commit ${commit}."
    cpu_line
    echo "scripts/demo.sh took ${seconds} s ($(awk "BEGIN {printf \"%.1f\", $seconds / 60}") min)."
    echo
    cat "$log"
} >"$out"
echo "wrote $out"
