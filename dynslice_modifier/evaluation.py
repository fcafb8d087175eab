"""The project's WikiText-2 protocol and perplexity.

Protocol (shared/data/wikitext-2-raw/README.md): tokenise the whole test file once without
special tokens; the first half is the calibration pool (first N windows of L tokens), the
second half the evaluation text (first M windows of 1024 tokens); perplexity is
exp(mean NLL over every predicted token), no BOS.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

# lm-eval task configs shipped with the package: pass this directory as --include_path.
LM_EVAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"

DEFAULT_WIKITEXT = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "wikitext-2-raw"
    / "wiki.test.raw"
)


def wikitext_path(path: str | Path | None = None) -> Path:
    """``path``, else ``$DYNSLICE_WIKITEXT``, else the shared data beside the repository."""
    given = path or os.environ.get("DYNSLICE_WIKITEXT")
    candidate = Path(given or DEFAULT_WIKITEXT)
    if candidate.exists():
        return candidate
    if given:
        raise FileNotFoundError(
            f"text file {candidate} not found (from dynslice's --data or DYNSLICE_WIKITEXT): "
            "give the path of a raw UTF-8 text file, such as WikiText-2's wiki.test.raw"
        )
    raise FileNotFoundError(
        f"WikiText-2 test file not found at {candidate}; give the path to "
        "shared/data/wikitext-2-raw/wiki.test.raw with dynslice's --data, lm-eval's "
        "--metadata '{\"wikitext_path\": ...}', or the DYNSLICE_WIKITEXT environment "
        "variable (which the examples and benchmarks read too)"
    )


def wikitext_tokens(
    tokenizer: PreTrainedTokenizerBase, path: str | Path | None = None
) -> list[int]:
    source = wikitext_path(path)
    if source.is_dir():
        raise ValueError(f"{source} is a directory; point to a text file (e.g. wiki.test.raw)")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{source} is not UTF-8 text ({err.reason} at byte {err.start}): give a raw text "
            "file, such as WikiText-2's wiki.test.raw"
        ) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def windows(tokens: list[int], count: int, length: int, part: str = "the text") -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``length`` tokens of ``part``."""
    available = len(tokens) // length
    if count > available:
        raise ValueError(
            f"asked for {count} windows of {length} tokens; only {available} fit in the "
            f"{len(tokens)} tokens of {part}: give a longer text, or fewer or shorter windows"
        )
    return torch.tensor(tokens[: count * length], dtype=torch.long).view(count, length)


def evaluation_windows(tokens: list[int], count: int, length: int = 1024) -> torch.Tensor:
    """The protocol's evaluation windows: from the second half of the text."""
    return windows(tokens[len(tokens) // 2 :], count, length, "the text's second half (evaluation)")


def split_protocol(
    tokens: list[int], n_calib: int, calib_len: int, n_eval: int, eval_len: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint calibration and evaluation windows: first and second half of the text."""
    calibration = windows(
        tokens[: len(tokens) // 2], n_calib, calib_len, "the text's first half (calibration)"
    )
    return calibration, evaluation_windows(tokens, n_eval, eval_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, eval_windows: torch.Tensor) -> float:
    """exp(mean token NLL) over every predicted token of every window, one window at a time."""
    model.eval()
    device = model.get_input_embeddings().weight.device
    nll, count = 0.0, 0
    for window in tqdm(eval_windows, desc="Perplexity", leave=False):
        ids = window[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
