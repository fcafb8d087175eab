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


# What each shipped recipe writes, on a tiny model wide enough for groups of 128: the
# compressed-tensors formats of its config groups, and whether the head is quantized.
RECIPE_RUNS = {
    "dynamic_slice.yaml": (set(), False),
    "slice_fp8.yaml": ({"float-quantized"}, False),
    "slice_w4a16.yaml": ({"pack-quantized", "int-quantized"}, False),
    "slice_w8a8.yaml": ({"int-quantized"}, True),
}


@pytest.mark.parametrize("name", sorted(RECIPE_RUNS))
def test_shipped_recipes_run_and_reload(name, tmp_path):
    import json

    import torch
    from conftest import calib_dataset, save_tiny
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny(tmp_path / "in", "llama", True, hidden=256, layers=2, head_dim=64)
    model = oneshot(
        model=str(model_dir),
        recipe=str(ROOT / "recipes" / name),
        dataset=calib_dataset(n=16, seq=64),
        num_calibration_samples=16,
        max_seq_length=64,
        output_dir=str(tmp_path / "out"),
    )
    ids = torch.arange(4, 20)[None]
    with torch.no_grad():
        expected = model(ids).logits
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "dynslice"
    formats, head_quantized = RECIPE_RUNS[name]
    groups = config.get("quantization_config", {}).get("config_groups", {})
    assert {group["format"] for group in groups.values()} == formats
    if formats:
        assert ("lm_head" in config["quantization_config"]["ignore"]) is not head_quantized
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-4, rtol=1e-4)


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
        # DISABLE_MULTIPROC: lm-eval bootstraps its standard errors in this process instead
        # of a forked pool (a forked pool worker once hung tests/test_lm_eval.py).
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "evaluate_lm_eval.py")],
            cwd=tmp_path,
            env=dict(env, DYNSLICE_EXAMPLE_LIMIT="1", DISABLE_MULTIPROC="1"),
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "wikitext2_local: word perplexity" in result.stdout
