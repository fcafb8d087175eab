"""Parameter counting and the parameter-budget solver."""

from __future__ import annotations

import pytest
from test_slicing import slice_in_memory
from tiny import tiny_model

from dynslice_modifier.adapters import get_adapter
from dynslice_modifier.budget import sliced_parameter_count
from dynslice_modifier.slicer import count_parameters


@pytest.mark.parametrize("basis", ["sublayer", "layer"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_predicted_count_matches_the_sliced_model(tmp_path, arch, tied, basis):
    model = tiny_model(arch, tied, layers=4)
    dims = [56, 40, 48, 32]
    predicted = sliced_parameter_count(model, get_adapter(model), dims, basis, tied)
    slice_in_memory(model, layer_dims=dims, basis=basis)
    assert count_parameters(model) == predicted
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in reloaded.parameters()) == predicted
    assert reloaded.config.tie_word_embeddings is tied
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tied
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # noqa: SIM118  (one table when tied)


@pytest.mark.parametrize("target", [0.05, 0.15])
def test_target_params_is_met_within_one_rounding_step(target):
    model = tiny_model("llama", True, layers=4, hidden=128)
    dense = count_parameters(model)
    modifier = slice_in_memory(model, target_params=target, slicing_base=0.02, round_to=8)
    realised = 1 - count_parameters(model) / dense
    assert realised >= target
    # One rounding step of one layer costs at most round_to x (its reading + writing widths
    # + shortcut rows) parameters.
    layer = model.model.layers[0]
    per_width = (
        sum(
            lin.weight.shape[0]
            for lin in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
            )
        )
        + layer.self_attn.o_proj.weight.shape[1]
        + layer.mlp.down_proj.weight.shape[1]
        + 4 * 128
    )
    assert realised - target <= 8 * per_width / dense
    assert modifier.summary["dense_parameters"] == dense
    assert model.config.slicing["target_params"] == target


def test_target_params_and_sparsity_are_exclusive():
    from dynslice_modifier import DynamicSliceModifier

    with pytest.raises(ValueError, match="either sparsity or target_params"):
        DynamicSliceModifier(sparsity=0.2, target_params=0.1)
    with pytest.raises(ValueError, match="target_params must be in"):
        DynamicSliceModifier(target_params=1.5)
