#!/usr/bin/env bash
# The test suite's figures as README's "Two commands" quotes them: clones the current commit
# into an empty directory (no .venv, no .venv-serve), runs .ci/run there, which runs the
# README's `bash scripts/test.sh` and so builds both environments, and records the machine,
# the wall time, the exit status and the run's summary in benchmarks/results/<name>.txt
# (default name: tests). Uncommitted changes are not part of the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/machine.sh
out="benchmarks/results/${1:-tests}.txt"
work=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$work" "$log"' EXIT
# The commit cloned: HEAD may move while the run goes on.
commit=$(git rev-parse --short HEAD)
git clone -q "$PWD" "$work/repo"
# As on CI, the calibration text is read from ../shared beside the clone.
if [ -d ../shared ]; then
    ln -s "$(cd ../shared && pwd)" "$work/shared"
fi
start=$(date +%s)
rc=0
(cd "$work/repo" && bash .ci/run) >"$log" 2>&1 || rc=$?
seconds=$(($(date +%s) - start))
{
    echo "Produced by \`bash benchmarks/test_run.sh\` at commit ${commit}."
    cpu_line
    echo "From a fresh clone, .ci/run (bash scripts/test.sh) exited ${rc} after ${seconds} s" \
        "($(awk "BEGIN {printf \"%.1f\", $seconds / 60}") min), setting up both environments included."
    echo
    echo "Its last lines:"
    echo
    tail -n 15 "$log"
} >"$out"
echo "wrote $out (exit ${rc})"
exit "$rc"
