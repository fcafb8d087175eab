"""The shipped lm-eval tasks run on a sliced checkpoint and agree with our perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import calib_dataset, save_tiny, wikitext_like
from llmcompressor import oneshot
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.evaluation import LM_EVAL_TASKS, perplexity

# No bootstrapped standard errors: lm-eval computes them in a multiprocessing pool forked
# from this (multi-threaded) pytest process, and a forked worker once hung CI for good.
NO_BOOTSTRAP = {"bootstrap_iters": 0}


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny(root / "tiny")
    oneshot(
        model=str(root / "tiny"),
        dataset=calib_dataset(),
        recipe=[DynamicSliceModifier(sparsity=0.25, slicing_base=0.1, round_to=8)],
        num_calibration_samples=16,
        max_seq_length=32,
        output_dir=str(root / "sliced"),
    )
    return root


def test_rolling_perplexity_agrees_with_ours(sliced):
    text = wikitext_like(sliced / "wiki.test.raw")
    lm = HFLM(pretrained=str(sliced / "sliced"), batch_size=1, max_length=256, device="cpu")
    manager = TaskManager(
        include_path=str(LM_EVAL_TASKS),
        include_defaults=False,
        metadata={"wikitext_path": str(text), "split": "all"},
    )
    out = simple_evaluate(
        model=lm, tasks=["wikitext2_local"], task_manager=manager, log_samples=True, **NO_BOOTSTRAP
    )
    samples = out["samples"]["wikitext2_local"]
    assert len(samples) == 4
    assert math.isfinite(out["results"]["wikitext2_local"]["word_perplexity,none"])

    # lm-eval scores each page as one window after its prefix token (every page is shorter
    # than max_length); our perplexity scores every token after the first of a window.
    total_ll, tokens, ours_nll = 0.0, 0, 0.0
    for sample in samples:
        ids = lm.tok_encode(sample["target"])
        window = torch.tensor([[lm.prefix_token_id, *ids]])
        ours_nll += math.log(perplexity(lm.model, window)) * len(ids)
        total_ll += float(sample["resps"][0][0])
        tokens += len(ids)
    assert math.exp(-total_ll / tokens) == pytest.approx(math.exp(ours_nll / tokens), rel=1e-5)


def test_last_word_task_runs(sliced):
    text = wikitext_like(sliced / "wiki.test.raw", pages=6, seed=1)
    manager = TaskManager(
        include_path=str(LM_EVAL_TASKS),
        include_defaults=False,
        metadata={"wikitext_path": str(text), "split": "all"},
    )
    lm = HFLM(pretrained=str(sliced / "sliced"), batch_size=4, device="cpu")
    out = simple_evaluate(
        model=lm,
        tasks=["wikitext2_lastword"],
        task_manager=manager,
        log_samples=True,
        **NO_BOOTSTRAP,
    )
    long_lines = [line for line in text.read_text().splitlines() if len(line.split()) >= 50]
    samples = out["samples"]["wikitext2_lastword"]
    assert len(samples) == len(long_lines) > 0
    assert [s["target"] for s in samples] == [" " + line.split()[-1] for line in long_lines]
    # Each last word's log-likelihood and greedy match, recomputed from the sliced model on
    # lm-eval's own tokenization of the (context, continuation) pair.
    greedy = []
    for sample in samples:
        ((context, continuation),) = sample["arguments"]
        ctx, cont = lm._encode_pair(context, continuation)
        with torch.no_grad():
            logits = lm.model(torch.tensor([ctx + cont])).logits[0, -len(cont) - 1 : -1]
        logprobs, target = torch.log_softmax(logits.double(), -1), torch.tensor(cont)
        (ll, is_greedy), *_ = sample["resps"][0]
        assert float(logprobs.gather(1, target[:, None]).sum()) == pytest.approx(ll, abs=1e-4)
        greedy.append(bool((logprobs.argmax(-1) == target).all()))
        assert greedy[-1] is bool(is_greedy)
    result = out["results"]["wikitext2_lastword"]
    assert result["acc,none"] == pytest.approx(sum(greedy) / len(greedy))
    assert math.isfinite(result["perplexity,none"])


def test_missing_text_names_the_fix(tmp_path, sliced):
    manager = TaskManager(
        include_path=str(LM_EVAL_TASKS),
        include_defaults=False,
        metadata={"wikitext_path": str(tmp_path / "nope.raw")},
    )
    lm = HFLM(pretrained=str(sliced / "sliced"), batch_size=1, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"nope\.raw"):
        simple_evaluate(model=lm, tasks=["wikitext2_local"], task_manager=manager, **NO_BOOTSTRAP)


def _article(title: str, *paragraphs: str) -> str:
    return "".join(["\n", f" = {title} = \n", "\n", *(f" {p} \n" for p in paragraphs)])


def test_tasks_score_only_articles_that_start_in_the_second_half(tmp_path):
    from dynslice_modifier.lm_eval_tasks.utils import load_last_word, load_wikitext

    words = " ".join(f"w{i}" for i in range(60))
    text = tmp_path / "wiki.test.raw"
    # Long first articles put the middle of the file inside the second one, so only the third
    # and fourth start past it.
    text.write_text(
        _article("First", words, words, words)
        + _article("Second", words + " seen", words, words)
        + _article("Third", words + " last .", words + " @-@", "too short")
        + _article("Fourth", words + " end"),
        encoding="utf-8",
    )
    pages = load_wikitext(str(text))["test"]["page"]
    assert [page.splitlines()[0] for page in pages] == [" = Third = ", " = Fourth = "]
    assert len(load_wikitext(str(text), split="all")["test"]) == 4
    cloze = load_last_word(str(text))["test"]
    # The full stop is dropped, a symbol as last word and a short paragraph leave theirs out.
    assert cloze["target"] == [" last", " end"]
    assert cloze["context"][0] == words
    with pytest.raises(ValueError, match="split must be 'eval' or 'all', got 'test'"):
        load_wikitext(str(text), split="test")
