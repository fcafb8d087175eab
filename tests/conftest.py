from __future__ import annotations

import os

# The suite checks the CPU reference: its tolerances are CPU's, and oneshot leaves a model on
# the first accelerator it finds, where tensors built on the CPU cannot meet it. A machine
# with NVIDIA GPUs runs the same suite on its CPU (set before torch first asks for one).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from loguru import logger
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))

from tiny import VOCAB, tiny_model

import dynslice_modifier  # noqa: F401  registers the modifier and the architecture

# The same examples on every run: a CI failure reproduces, and a green run stays green.
settings.register_profile("dynslice", derandomize=True)
settings.load_profile("dynslice")


@contextlib.contextmanager
def logged(level: str = "WARNING") -> Iterator[list[tuple[str, str]]]:
    """The loguru records at ``level`` and above, as (level name, message), while the block
    runs."""
    records: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: records.append((m.record["level"].name, m.record["message"])), level=level
    )
    try:
        yield records
    finally:
        logger.remove(sink)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer over the tiny vocabulary ("t0" .. "t127"), saved beside tiny models."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2", bos_token="t3"
    )


def save_tiny(path: Path, arch: str = "llama", tied: bool = True, **kwargs) -> Path:
    model = tiny_model(arch, tied, **kwargs)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def calib_dataset(n: int = 16, seq: int = 32, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {"input_ids": [torch.randint(0, VOCAB, (seq,), generator=g).tolist() for _ in range(n)]}
    )


def wikitext_like(path: Path, pages: int = 4, seed: int = 0) -> Path:
    """Articles in the raw WikiText layout over the tiny vocabulary (words t4 .. t127)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for page in range(pages):
        lines += ["", f" = Title t{10 + page} = ", ""]
        for _ in range(2):
            length = int(torch.randint(30, 60, (1,), generator=g))
            words = torch.randint(4, 128, (length,), generator=g)
            lines.append(" " + " ".join(f"t{w}" for w in words.tolist()) + " ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if the slicer starts calibrating: for errors promised before it."""
    import dynslice_modifier.modifier

    def forbidden(*_args, **_kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(dynslice_modifier.modifier, "capture_layer_inputs", forbidden)


@pytest.fixture(autouse=True)
def _fresh_session():
    """llm-compressor keeps a global session; each test starts from a clean one."""
    from llmcompressor.core import reset_session

    reset_session()
    yield
    reset_session()
