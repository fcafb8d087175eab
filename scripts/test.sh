#!/usr/bin/env bash
# Set up both environments, then run the whole test suite (vLLM tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --serve
.venv/bin/ruff check dynslice_modifier tests benchmarks examples
.venv/bin/python -m pytest -q "$@"
