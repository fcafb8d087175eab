"""Shared set-up of the benchmarks: the packaged SmolLM2 and the WikiText-2 protocol."""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path

from datasets import Dataset
from digests import update_with_checkpoint
from transformers import AutoTokenizer

from dynslice_modifier.evaluation import split_protocol, wikitext_tokens
from dynslice_modifier.smollm2 import smollm2_path

RESULTS = Path(__file__).resolve().parent / "results"
LR_SCORES = RESULTS / "smollm2_lr_scores.json"


def protocol(n_calib: int = 64, calib_len: int = 512, n_eval: int = 32):
    """(model dir, tokenizer, calibration Dataset, evaluation windows) per the shared protocol."""
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib, evaluation = split_protocol(wikitext_tokens(tokenizer), n_calib, calib_len, n_eval)
    dataset = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": [[1] * calib_len] * n_calib}
    )
    return path, tokenizer, dataset, evaluation


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), file=sys.stderr)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calibration_fingerprint(model_dir: Path, dataset: Dataset) -> str:
    """What the Layer Redundancy scores depend on: the model's weights and configuration and
    the calibration token ids (sha256)."""
    digest = hashlib.sha256()
    update_with_checkpoint(digest, model_dir)
    digest.update(json.dumps(dataset[:]["input_ids"]).encode())
    return digest.hexdigest()


def cached_lr_scores(fingerprint: str) -> tuple[list[float], float] | None:
    """SmolLM2's Layer Redundancy scores and the seconds they took, if a run with this
    model and calibration set (``calibration_fingerprint``) saved them."""
    cached = json.loads(LR_SCORES.read_text()) if LR_SCORES.exists() else {}
    if cached.get("fingerprint") != fingerprint:
        return None
    return cached["scores"], cached["seconds"]


def save_lr_scores(scores: list[float], seconds: float, fingerprint: str) -> None:
    LR_SCORES.write_text(
        json.dumps({"scores": scores, "seconds": seconds, "fingerprint": fingerprint})
    )
