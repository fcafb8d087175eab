"""Edge cases of the held-out split, the summary, calibration order, quantizer widths, the
save and output checks and the command line that the other files leave unchecked."""

from __future__ import annotations

import pytest
import torch
from llmcompressor.modifiers.quantization import QuantizationModifier
from test_quantization import READS, WRITES
from test_slicing import slice_in_memory
from tiny import VOCAB, tiny_model

from dynslice_modifier.adapters import get_adapter
from dynslice_modifier.allocation import mean_slice
from dynslice_modifier.calibration import LayerInputs, capture_layer_inputs
from dynslice_modifier.errors import AllocationError
from dynslice_modifier.quantization import fit_round_to, required_multiple
from dynslice_modifier.slicing_base_search import heldout_batches, heldout_nll

CPU = torch.device("cpu")


def test_heldout_loss_skips_tokens_predicted_from_left_padding():
    model = tiny_model("llama", True)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 12), generator=g)
    hidden = torch.randn(1, 12, 64, generator=g)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :4] = False  # left padding

    def nll(h, i, m):
        inputs = LayerInputs(hidden=[h], kwargs=[{}], masks=[m], ids=[i], keys=[b""])
        return heldout_nll(model, adapter, inputs, [0], CPU)

    assert nll(hidden, ids, mask) == pytest.approx(nll(hidden[:, 4:], ids[:, 4:], None))


def test_the_held_out_batches_are_the_last_in_content_order():
    assert heldout_batches(8, 0.25) == {6, 7}
    assert heldout_batches(3, 0.1) == {2}


def test_the_summary_reports_the_mean_slice_realised():
    model = tiny_model("llama", True, layers=4)
    modifier = slice_in_memory(model, sparsity=0.2, slicing_base=0.0, basis="layer")
    realised = mean_slice(model.config.slicing["attn_dims"], 64)
    assert model.config.slicing["whole_layers"] and realised < 0.2
    assert modifier.summary["mean_slice"] == pytest.approx(realised)


def test_batches_differing_only_in_padding_have_an_order_of_their_own():
    model = tiny_model("llama", True)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_mask = torch.ones_like(ids)
    padded_mask[0, 8:] = 0
    padded = {"input_ids": ids, "attention_mask": padded_mask}
    layer = model.model.layers[0]
    one = capture_layer_inputs(model, layer, [full, padded])
    other = capture_layer_inputs(model, layer, [padded, full])
    assert len(set(one.keys)) == 2 and one.keys == other.keys
    for a, b in zip(one.masks, other.masks, strict=True):
        assert torch.equal(a, b)


def test_nvfp4_tensor_groups_bind_the_widths():
    need = required_multiple(
        [QuantizationModifier(targets="Linear", scheme="NVFP4")], READS, WRITES
    )
    assert need is not None and need[0] == 16
    with pytest.raises(AllocationError, match="conflicts"):
        fit_round_to(8, need, 64)


def test_a_directory_named_like_a_save_file_is_foreign(tmp_path):
    from dynslice_modifier.output import check_replaceable

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "dynslice"}')
    (target / "tokenizer_experiments").mkdir()
    with pytest.raises(ValueError, match=r"also \['tokenizer_experiments/'\]"):
        check_replaceable(target)


def test_an_output_that_holds_the_input_overlaps_it(tmp_path):
    from dynslice_modifier.output import check_target

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    with pytest.raises(ValueError, match="overlaps the input model"):
        check_target(tmp_path / "models", [tmp_path / "models" / "tiny"])


def test_a_live_runs_scratch_is_left_alone(tmp_path):
    import os
    import socket

    from dynslice_modifier.output import atomic_directory

    live = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-zzz"
    live.mkdir()
    with atomic_directory(tmp_path / "out") as scratch:
        (scratch / "config.json").write_text("{}")
    assert live.exists()


def test_off_switches_reach_the_modifier():
    from dynslice_modifier.cli import _compress_recipe, build_parser

    args = build_parser().parse_args(
        ["compress", "m", "o", "--no-align-bases", "--no-profitable-only", "--no-hadamard"]
    )
    (slicer,) = _compress_recipe(args, None)
    assert (slicer.align_bases, slicer.profitable_only, slicer.hadamard) == (False, False, False)


def test_gains_are_printed_as_sliced_over_dense(tmp_path, capsys, monkeypatch):
    from dynslice_modifier import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(bytes(3 * 2**20))
    monkeypatch.setattr(cli, "_perplexity", lambda path, _: 12.0 if path == out else 10.0)
    cli._print_gains(tmp_path / "dense", out, 4 * 2**20, 5.0, None, 1, "r")
    text = capsys.readouterr().out
    assert "weights on disk: 4.0 MiB -> 3.0 MiB (75.0%)" in text
    assert "dense 10.00 -> compressed 12.00 (1.20x)" in text


def test_every_quantize_choice_keeps_the_head_unless_asked():
    from dynslice_modifier.cli import quant_modifiers

    config = tiny_model().config
    for scheme in ("w4a16", "w8a8", "fp8"):
        (quantizer,) = quant_modifiers(scheme, config)
        assert "lm_head" in quantizer.ignore, scheme
    (quantizer,) = quant_modifiers("w8a8", config, quantize_head=True)
    assert "lm_head" not in quantizer.ignore


def test_saving_over_the_source_through_a_link_is_refused(tmp_path):
    from types import SimpleNamespace

    from dynslice_modifier.modeling.modeling_dynslice import refuse_saving_over_source

    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text('{"model_type": "llama"}')
    link = tmp_path / "link"
    link.symlink_to(dense)
    config = SimpleNamespace(slicing={"source_model": str(dense)})
    with pytest.raises(ValueError, match="dense model it was sliced from"):
        refuse_saving_over_source(link, config)


def test_a_scaled_post_attention_norm_is_no_unit_norm():
    model = tiny_model("llama", True)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    assert model.has_unit_norms() is True
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(2.0)
    assert model.has_unit_norms() is False
    assert model.record_unit_norms() is False and model.config.slicing["unit_norms"] is False


def test_a_shortcut_format_the_recipe_set_is_kept():
    from compressed_tensors.quantization import preset_name_to_scheme
    from torch import nn

    from dynslice_modifier.modeling.modeling_dynslice import ResidualShortcutLinear
    from dynslice_modifier.quantization import compress_shortcuts_as_linears

    model = nn.Sequential(ResidualShortcutLinear(16, 16), ResidualShortcutLinear(16, 16))
    for module in model:
        module.quantization_scheme = preset_name_to_scheme("W8A8", ["Linear"])
    model[0].quantization_scheme.format = "naive-quantized"
    assert compress_shortcuts_as_linears(model) == 1
    assert model[0].quantization_scheme.format == "naive-quantized"
    assert model[1].quantization_scheme.format == "int-quantized"


def test_the_default_step_stays_a_multiple_of_sixteen():
    assert fit_round_to(None, (24, "groups of 24"), 192) == 48
