"""Data for the local lm-eval tasks: WikiText-2 read from a file, never from a hub.

The text is the raw WikiText-2 test file of the shared protocol. Documents are its
articles (split at top-level `` = Title = `` headings, as lm-eval's document-level
WikiText is). ``split: eval`` (the default) keeps the articles that start in the second half
of the file, which is where the project's protocol evaluates; the first half is the
calibration pool, so evaluating on it would score text the slicer has seen. The file is
halved by characters, since a task has no tokenizer; the protocol halves the token stream,
whose middle lies 0.8% of the text earlier with SmolLM2's tokenizer, and calibration reads
only the start of its half (64 x 512 of 150,974 tokens by default), so no article scored here
was calibrated on.

Options come from lm-eval's ``--metadata`` (JSON): ``wikitext_path`` (default: the
environment variable ``DYNSLICE_WIKITEXT``, else ``../shared/data`` beside the repository) and
``split`` (``eval`` or ``all``).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

_HEADING = re.compile(r"^ = [^=].* = $")


def _read_pages(wikitext_path: str | None, split: str) -> list[str]:
    # Imported here so the task files stay loadable by lm-eval from any working directory.
    from dynslice_modifier.evaluation import wikitext_path as resolve

    path = resolve(wikitext_path)
    if split not in ("eval", "all"):
        raise ValueError(f"split must be 'eval' or 'all', got {split!r}")
    text = path.read_text(encoding="utf-8")
    starts = [0]
    offset = 0
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) and offset > 0:
            starts.append(offset)
        offset += len(line)
    starts.append(len(text))
    middle = len(text) // 2
    return [
        text[a:b]
        for a, b in itertools.pairwise(starts)
        if text[a:b].strip() and (split == "all" or a >= middle)
    ]


def load_wikitext(
    wikitext_path: str | None = None, split: str = "eval", **_: Any
) -> datasets.DatasetDict:
    """Whole articles, for rolling perplexity."""
    pages = _read_pages(wikitext_path, split)
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})


def load_last_word(
    wikitext_path: str | None = None, split: str = "eval", **_: Any
) -> datasets.DatasetDict:
    """LAMBADA-style cloze over paragraphs: predict a paragraph's last word from the rest.

    Paragraphs of at least 50 words whose last word is alphanumeric (not a symbol the
    detokenised text would glue on), with the trailing full stop dropped.
    """
    contexts, targets = [], []
    for page in _read_pages(wikitext_path, split):
        for line in page.splitlines():
            paragraph = wikitext_detokenizer({"page": line.strip()}).rstrip(" .")
            words = paragraph.split(" ")
            # Headings and short lines are under 50 words.
            if len(words) < 50 or not words[-1].isalnum():
                continue
            contexts.append(" ".join(words[:-1]))
            targets.append(" " + words[-1])
    data = {"context": contexts, "target": targets}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(data)})


def page_target(doc: dict) -> str:
    return wikitext_detokenizer(doc)


def process_page(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    # Counts are over the text before detokenisation, as lm-eval's own WikiText task does,
    # so the numbers are comparable to `--tasks wikitext`.
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
