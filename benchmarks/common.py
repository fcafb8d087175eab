"""Shared set-up of the benchmarks: the packaged SmolLM2 and the WikiText-2 protocol."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from datasets import Dataset
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


def cached_lr_scores(n_calib: int) -> tuple[list[float], float] | None:
    """SmolLM2's Layer Redundancy scores and the seconds they took, if a run on this many
    calibration windows saved them (the scores depend on the calibration set)."""
    cached = json.loads(LR_SCORES.read_text()) if LR_SCORES.exists() else {}
    if cached.get("n_calib") != n_calib:
        return None
    return cached["scores"], cached["seconds"]


def save_lr_scores(scores: list[float], seconds: float, n_calib: int) -> None:
    LR_SCORES.write_text(json.dumps({"scores": scores, "seconds": seconds, "n_calib": n_calib}))
