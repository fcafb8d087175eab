"""Which build of a checkpoint a benchmark row measured.

Checkpoints under ``out/bench`` are rebuilt in place (``quantized.py --redo``), and GPTQ does
not give the same weights on every run, so a row's path alone does not say which build it
measured. Rows record the sha256 of the weights and config; ``speed_pooled.py`` pools only
runs of one build. Imports nothing beyond the standard library, so both environments use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_with_checkpoint(digest: hashlib._Hash, model_dir: Path) -> None:
    """Feed ``digest`` the checkpoint's safetensors (in name order), then its config.json
    (the benchmarks write safetensors only; other weight files are not read)."""
    for file in [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json"]:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)


def checkpoint_digest(model_dir: Path) -> str:
    """sha256 of the checkpoint's safetensors weights and config."""
    digest = hashlib.sha256()
    update_with_checkpoint(digest, model_dir)
    return digest.hexdigest()
