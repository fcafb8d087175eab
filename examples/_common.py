"""Calibration data for the examples: the packaged SmolLM2 and the shared WikiText-2 text.

``DYNSLICE_EXAMPLE_SAMPLES`` / ``DYNSLICE_EXAMPLE_SEQ_LEN`` shrink the budget (CI uses 8 x 256).
"""

from __future__ import annotations

import os

from datasets import Dataset
from transformers import AutoTokenizer

from dynslice_modifier.evaluation import split_protocol, wikitext_tokens
from dynslice_modifier.smollm2 import smollm2_path

SAMPLES = int(os.environ.get("DYNSLICE_EXAMPLE_SAMPLES", 64))
SEQ_LEN = int(os.environ.get("DYNSLICE_EXAMPLE_SEQ_LEN", 512))
EVAL_WINDOWS = int(os.environ.get("DYNSLICE_EXAMPLE_EVAL_WINDOWS", 8))


def smollm2_and_data():
    """(model dir, tokenizer, calibration dataset, evaluation windows)."""
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib, evaluation = split_protocol(wikitext_tokens(tokenizer), SAMPLES, SEQ_LEN, EVAL_WINDOWS)
    return path, tokenizer, Dataset.from_dict({"input_ids": calib.tolist()}), evaluation
