"""Shipped recipes parse; the examples run end to end on a small budget (vLLM serving: in
tests/test_vllm_serving.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llmcompressor.recipe import Recipe

from dynslice_modifier import DynamicSliceModifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    modifiers = Recipe.create_instance(str(recipe)).modifiers
    assert isinstance(modifiers[0], DynamicSliceModifier)
    assert modifiers[0].sparsity == 0.25


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("script", "expect"),
    [("slice_only.py", "perplexity: dense"), ("slice_w4a16.py", "sliced W4A16 model")],
)
def test_example_runs(script, expect, tmp_path):
    env = dict(
        os.environ,
        DYNSLICE_EXAMPLE_SAMPLES="8",
        DYNSLICE_EXAMPLE_SEQ_LEN="256",
        DYNSLICE_EXAMPLE_EVAL_WINDOWS="1",
        TQDM_DISABLE="1",
        PYTHONPATH=str(ROOT / "examples"),
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout
    widths = ast.literal_eval(result.stdout.split("kept widths:")[1].splitlines()[0])
    # A layer may stay whole (576) when its slice would not pay for its shortcuts.
    assert len(widths) == 30 and sum(widths) < 0.8 * 30 * 576
    if script == "slice_w4a16.py":
        # 576 is not a multiple of the group size 128, so no layer may stay whole here.
        assert all(w % 128 == 0 for w in widths)
    if script == "slice_only.py":
        # The lm-eval example reads what slice_only.py wrote, one document per task.
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "evaluate_lm_eval.py")],
            cwd=tmp_path,
            env=dict(env, DYNSLICE_EXAMPLE_LIMIT="1"),
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "wikitext2_local: word perplexity" in result.stdout
