"""Slice and quantize in one oneshot pass; quantizer-driven widths fail early and clearly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from conftest import calib_dataset, save_tiny
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from llmcompressor.recipe import Recipe
from safetensors.torch import load_file, save_file
from tiny import calib_batches, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.errors import AllocationError
from dynslice_modifier.modeling import DynSliceForCausalLM
from dynslice_modifier.modeling.modeling_dynslice import ResidualShortcut, ResidualShortcutLinear
from dynslice_modifier.quantization import (
    compress_shortcuts_as_linears,
    fit_round_to,
    required_multiple,
    shortcut_probe,
    unmatched_warnings,
)

IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Hidden 256: wide enough for W4A16's groups of 128 after slicing."""
    return save_tiny(tmp_path_factory.mktemp("wide") / "in", "qwen3", True, hidden=256, layers=2)


def one_pass(model_dir, recipe, out=None, **options):
    return oneshot(
        model=str(model_dir),
        recipe=recipe,
        dataset=calib_dataset(n=16, seq=64),
        num_calibration_samples=16,
        max_seq_length=64,
        output_dir=None if out is None else str(out),
        **options,
    )


@pytest.mark.parametrize(
    "quantizers",
    [
        pytest.param(
            [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])], id="gptq-w4a16"
        ),
        pytest.param(
            [
                SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
            ],
            id="smoothquant-gptq-w8a8",
        ),
        pytest.param(
            [GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])], id="gptq-w8a8"
        ),
        pytest.param(
            [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])],
            id="fp8-dynamic",
        ),
    ],
)
def test_one_pass_writes_a_quantized_sliced_checkpoint(wide_dir, tmp_path, quantizers):
    slicer = DynamicSliceModifier(sparsity=0.25, slicing_base=0.1)
    model = one_pass(wide_dir, [slicer, *quantizers], tmp_path / "out")
    with torch.no_grad():
        expected = model(IDS).logits
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "dynslice"
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    spec = config["slicing"]
    if "W4A16" in repr(quantizers):
        assert spec["round_to"] == 128 and all(d % 128 == 0 for d in spec["mlp_dims"])
    else:
        assert spec["round_to"] == 16
    # The sliced linears are stored quantized, not only declared so.
    stored = saved_tensors(tmp_path / "out")
    q_proj = "model.layers.1.self_attn.q_proj"
    if "W4A16" in repr(quantizers):
        assert stored[f"{q_proj}.weight_packed"].dtype == torch.int32
    else:
        kind = torch.float8_e4m3fn if "FP8" in repr(quantizers) else torch.int8
        assert stored[f"{q_proj}.weight"].dtype == kind
    assert f"{q_proj}.weight_scale" in stored
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded, DynSliceForCausalLM)
    # The checkpoint computes what the calibrated model did (a saving bug would not).
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-4, rtol=1e-4)
    # By default `targets: Linear` leaves the shortcut matrices in model dtype.
    assert spec["quantizable_shortcuts"] is False and spec["delta_shortcuts"]
    # SmoothQuant folds its scales into the sliced norms; the config must say so, since
    # vLLM fuses shortcuts into the next projection only while the norms are ones.
    smoothed = any(isinstance(q, SmoothQuantModifier) for q in quantizers)
    assert spec["unit_norms"] is not smoothed
    assert reloaded.has_unit_norms() is not smoothed
    shortcuts = [m for m in reloaded.modules() if isinstance(m, ResidualShortcut)]
    assert shortcuts
    for shortcut in shortcuts:
        assert [n for n, _ in shortcut.named_parameters()] == ["weight"]
        assert shortcut.weight.dtype == torch.float32


def saved_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize(
    ("ignore", "kept"),
    [
        pytest.param([], "none", id="all-quantized"),
        pytest.param(["re:.*input_projection$"], "projection", id="projection-kept"),
        pytest.param(["re:.*_shortcut$", "re:.*input_projection$"], "all", id="all-ignored"),
    ],
)
def test_quantize_shortcuts_follows_the_quantizer(wide_dir, tmp_path, ignore, kept):
    # Every layer sliced, so the tied table needs layer 0's input projection.
    slicer = DynamicSliceModifier(
        sparsity=0.25, slicing_base=0.1, profitable_only=False, quantize_shortcuts=True
    )
    gptq = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head", *ignore])
    model = one_pass(wide_dir, [slicer, gptq], tmp_path / "out")
    with torch.no_grad():
        expected = model(IDS).logits
    spec = json.loads((tmp_path / "out" / "config.json").read_text())["slicing"]
    saved = saved_tensors(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    modules = dict(reloaded.named_modules())
    names = [n for n in modules if n.endswith(("_shortcut", "input_projection"))]
    projection = "model.layers.0.input_projection"
    assert projection in names and len(names) > 2
    kept_names = {"none": [], "projection": [projection], "all": names}[kept]
    if kept == "all":
        # Nothing took them: the plain class.
        assert spec["quantizable_shortcuts"] is False
    else:
        # The saved ignore list names the kept ones, so reloading keeps them unquantized.
        assert spec["quantizable_shortcuts"] is True
        assert all(isinstance(modules[n], ResidualShortcutLinear) for n in names)
    for name in names:
        if name in kept_names:
            assert saved[f"{name}.weight"].dtype == torch.float32
            assert f"{name}.weight_scale" not in saved
        else:
            assert saved[f"{name}.weight"].dtype == torch.int8
            assert saved[f"{name}.weight_scale"].numel() == modules[name].out_features
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-4, rtol=1e-4)
    if kept == "none":
        # An int8 shortcut without its weight: refused by name, not left to transformers'
        # initialisation (which cannot fill integers with random numbers).
        del saved[f"{names[-1]}.weight"]
        save_file(saved, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"no tensors for {names[-1]} "):
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_quantized_head_unties_the_table_and_is_counted(wide_dir, tmp_path):
    # `targets: Linear` without `ignore: [lm_head]` takes the head too: llm-compressor
    # unties the shared table, so the checkpoint holds a second one, which the recorded
    # parameter count must include.
    slicer = DynamicSliceModifier(sparsity=0.25, slicing_base=0.1, quantize_shortcuts=True)
    model = one_pass(wide_dir, [slicer, GPTQModifier(targets="Linear", scheme="W8A8")], tmp_path)
    with torch.no_grad():
        expected = model(IDS).logits
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    saved = saved_tensors(tmp_path)
    assert saved["lm_head.weight"].dtype == torch.int8
    assert saved["model.embed_tokens.weight"].dtype == torch.float32
    # Every stored weight (both tables included), scales and zero points aside.
    weights = sum(t.numel() for n, t in saved.items() if n.endswith(".weight"))
    assert config["slicing"]["parameters"]["sliced"] == weights
    assert slicer.summary["sliced_parameters"] == weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_group_wise_input_projection_fails_before_calibration(tmp_path):
    # Tied, hidden 320: the projection of the full table reads 320, not groups of 128.
    model_dir = save_tiny(tmp_path / "in", "llama", True, hidden=320, layers=2, head_dim=32)
    gptq = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    fix = r"input_projection.*320.*'re:\.\*input_projection\$'"
    with pytest.raises(AllocationError, match=fix):
        one_pass(model_dir, [DynamicSliceModifier(sparsity=0.25, quantize_shortcuts=True), gptq])
    # Kept in model dtype (the default), the projection needs no groups.
    model = one_pass(model_dir, [DynamicSliceModifier(sparsity=0.25), gptq])
    assert isinstance(model, DynSliceForCausalLM)
    # Taken by a group of its own (a regex beats `Linear`, as in compressed-tensors), per
    # channel at 8 bits: no groups to fit, and written int-quantized, not dense.
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    mixed = GPTQModifier(
        ignore=["lm_head"],
        config_groups={
            "linears": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
            },
            "shortcuts": {
                "targets": ["re:.*_shortcut$", "re:.*input_projection$"],
                "weights": {**int8, "strategy": "channel"},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
            },
        },
    )
    slicer = DynamicSliceModifier(sparsity=0.25, quantize_shortcuts=True)
    model = one_pass(model_dir, [slicer, mixed], tmp_path / "mixed")
    assert isinstance(model.model.layers[0].input_projection, ResidualShortcutLinear)
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert {g["format"] for g in groups.values()} == {"pack-quantized", "int-quantized"}


# Residual readers and writers of one decoder layer, as the slicer names them.
READS = {f"model.layers.0.{n}": nn.Linear(8, 8) for n in ("self_attn.q_proj", "mlp.up_proj")}
WRITES = {f"model.layers.0.{n}": nn.Linear(8, 8) for n in ("self_attn.o_proj", "mlp.down_proj")}
SHORTCUT = "re:.*_shortcut$"


@pytest.mark.parametrize(
    ("scheme", "multiple"),
    [("W4A16", 128), ("W8A8", 16), ("W8A16", 128), ("FP8_DYNAMIC", 16), ("FP8", 16)],
)
def test_what_each_scheme_needs_of_a_width(scheme, multiple):
    # 8-bit activations and weights (int8, FP8) go through vLLM's CUDA CUTLASS GEMMs, which
    # take 16-aligned operands; group-wise schemes (W8A16's preset too) need whole groups.
    need = required_multiple([QuantizationModifier(targets="Linear", scheme=scheme)], READS, WRITES)
    assert (need and need[0]) == multiple


@pytest.mark.parametrize(
    ("targets", "ignore", "multiple"),
    [
        # Groups run along a linear's input: down_proj reads the MLP width, not the residual.
        (["re:.*down_proj$"], [], {"W4A16": None, "W8A8": 16}),
        (["Linear"], ["re:.*q_proj$", "re:.*up_proj$", SHORTCUT], {"W4A16": None, "W8A8": 16}),
        (["Linear"], ["re:.*proj$", SHORTCUT], {"W4A16": None, "W8A8": None}),
        # targets: Linear takes the shortcuts (a Linear subclass) too.
        (["Linear"], ["re:.*proj$"], {"W4A16": 128, "W8A8": 16}),
        (["re:.*q_proj$"], [], {"W4A16": 128, "W8A8": 16}),
        # Quantized shortcuts read a sliced width (here stood for by their probe).
        ([SHORTCUT], [], {"W4A16": 128, "W8A8": 16}),
    ],
)
def test_only_groups_that_touch_a_sliced_width_bind(targets, ignore, multiple):
    reads = {**READS, "model.layers.0.attn_shortcut": shortcut_probe()}
    for scheme in ("W4A16", "W8A8"):
        quantizer = QuantizationModifier(targets=targets, scheme=scheme, ignore=ignore)
        need = required_multiple([quantizer], reads, WRITES)
        assert (need and need[0]) == multiple[scheme], scheme


def test_a_group_wise_scheme_off_the_residual_leaves_fine_widths(wide_dir, tmp_path):
    # Groups of 128 on down_proj alone (its input, the MLP width, is 512) must not round
    # the residual widths to 128: at SP 0.25 of 256 that would give 128 or 256, not 192.
    recipe = [
        DynamicSliceModifier(sparsity=0.25, slicing_base=0.25, profitable_only=False),
        GPTQModifier(targets=["re:.*down_proj$"], scheme="W4A16"),
    ]
    model = one_pass(wide_dir, recipe, tmp_path / "out")
    assert model.config.slicing["attn_dims"] == [192, 192]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded, DynSliceForCausalLM)


@pytest.mark.parametrize(
    ("round_to", "scheme", "message"),
    [
        (16, "W4A16", r"round_to=16 conflicts with GPTQModifier \(group_size 128\)"),
        (8, "W8A8", r"round_to=8 conflicts with GPTQModifier \(int8 GEMM"),
    ],
)
def test_round_to_conflicting_with_the_scheme_fails_before_calibration(
    wide_dir, round_to, scheme, message
):
    recipe = [
        DynamicSliceModifier(sparsity=0.25, round_to=round_to),
        GPTQModifier(targets="Linear", scheme=scheme),
    ]
    with pytest.raises(AllocationError, match=message):
        one_pass(wide_dir, recipe)


def test_explicit_dims_must_fit_the_group_size(wide_dir):
    recipe = [
        DynamicSliceModifier(layer_dims=[192, 128]),
        GPTQModifier(targets="Linear", scheme="W4A16"),
    ]
    with pytest.raises(AllocationError, match=r"multiples of 128.*layer 0: 192"):
        one_pass(wide_dir, recipe)


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(lambda: GPTQModifier(targets="Linear", scheme="W8A8"), id="quantizer"),
        # It would hook the norms the slicer replaces and smooth nothing, silently.
        pytest.param(lambda: SmoothQuantModifier(smoothing_strength=0.8), id="smoothquant"),
    ],
)
def test_a_modifier_before_the_slicer_is_an_error(wide_dir, before):
    recipe = [before(), DynamicSliceModifier(sparsity=0.25)]
    with pytest.raises(AllocationError, match="comes before DynamicSliceModifier"):
        one_pass(wide_dir, recipe)


def test_spinquant_after_the_slicer_is_refused_before_calibration(wide_dir, no_calibration):
    from llmcompressor.modifiers.transform import SpinQuantModifier

    recipe = [DynamicSliceModifier(sparsity=0.25), SpinQuantModifier(rotations=["R1", "R2"])]
    with pytest.raises(AllocationError, match=r"SpinQuantModifier rotates .* hadamard: true"):
        one_pass(wide_dir, recipe)


def test_sequential_targets_naming_the_replaced_layer_class_fail_before_calibration(
    wide_dir, no_calibration
):
    # Matching nothing once sliced, they would have GPTQ calibrate the whole model at once.
    recipe = [DynamicSliceModifier(sparsity=0.25), GPTQModifier(targets="Linear", scheme="W8A8")]
    with pytest.raises(AllocationError, match=r"Qwen3DecoderLayer, which slicing replaces"):
        one_pass(wide_dir, recipe, sequential_targets=["Qwen3DecoderLayer"])


def test_sequential_targets_may_name_the_sliced_layer_class(wide_dir):
    recipe = [DynamicSliceModifier(sparsity=0.25), GPTQModifier(targets="Linear", scheme="W8A8")]
    model = one_pass(wide_dir, recipe, sequential_targets=["SlicedDecoderLayer"])
    assert isinstance(model, DynSliceForCausalLM)
    assert model.model.layers[0].self_attn.q_proj.weight_scale is not None


@pytest.mark.parametrize("arch", ["llama", "phi3", "granite", "qwen3"])
def test_the_quantizer_after_the_slicer_calibrates_one_layer_at_a_time(arch, tmp_path, monkeypatch):
    # The sequential pipeline splits the model by its _no_split_modules, read when the
    # quantizer's stage starts: after slicing, which replaced every decoder layer.
    from llmcompressor.pipelines.sequential import pipeline

    traced = []

    def recording(model, sample, targets, *args, **kwargs):
        subgraphs = trace(model, sample, targets, *args, **kwargs)
        traced.append((set(targets), len(subgraphs)))
        return subgraphs

    trace = pipeline.trace_subgraphs
    monkeypatch.setattr(pipeline, "trace_subgraphs", recording)
    model_dir = save_tiny(tmp_path / "in", arch, True, layers=3)
    quantizer = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    one_pass(model_dir, [DynamicSliceModifier(sparsity=0.25), quantizer])
    # One piece per decoder layer and one for the final norm and head.
    assert traced == [({"SlicedDecoderLayer"}, 4)]


def test_yaml_two_stage_recipe(wide_dir, tmp_path):
    recipe = """
slice_stage:
  slice_modifiers:
    DynamicSliceModifier: {sparsity: 0.25, slicing_base: 0.05}
quant_stage:
  quant_modifiers:
    GPTQModifier: {targets: Linear, scheme: W4A16, ignore: [lm_head]}
"""
    one_pass(wide_dir, recipe, tmp_path / "out")
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "DynamicSliceModifier" in saved and "GPTQModifier" in saved
    # The saved recipe runs again (it lists every field, defaults included) to the same
    # architecture.
    one_pass(wide_dir, saved, tmp_path / "again")
    first, again = (
        json.loads((tmp_path / name / "config.json").read_text()) for name in ("out", "again")
    )
    assert again["slicing"] == first["slicing"]


# Qwen3's attention input, named as a user would write it.
EXPLICIT_MAPPINGS = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]]
# Factories: a modifier instance runs once.
SMOOTHING = {
    "gptq": list,
    "smoothquant+gptq": lambda: [SmoothQuantModifier()],
    "explicit smoothquant+gptq": lambda: [SmoothQuantModifier(mappings=EXPLICIT_MAPPINGS)],
}


@pytest.mark.parametrize("smoothing", SMOOTHING)
@pytest.mark.parametrize(
    "via", ["model object", "saved directory", "object sliced outside oneshot"]
)
def test_a_sliced_model_takes_a_second_oneshot(wide_dir, tmp_path, via, smoothing):
    # llm-compressor's habit of chaining oneshot calls on the model object: the second call
    # reads the processor and config from the model's source path, while the save must
    # still write the sliced config. Or the sliced checkpoint is quantized in a later run.
    # SmoothQuant scales the norms, which the saved config has to say (vLLM fuses shortcuts
    # only beside unit norms), not copy from the checkpoint loaded.
    from llmcompressor.core import reset_session

    sliced_dir = tmp_path / "sliced"
    modifier = DynamicSliceModifier(sparsity=0.25, round_to=128)
    if via == "object sliced outside oneshot":
        sliced = AutoModelForCausalLM.from_pretrained(wide_dir)
        modifier.on_initialize(
            SimpleNamespace(model=sliced, data=SimpleNamespace(calib=calib_batches(n=8, seq=64)))
        )
    else:
        sliced = one_pass(wide_dir, [modifier], sliced_dir)
        assert json.loads((sliced_dir / "config.json").read_text())["slicing"]["unit_norms"]
    expected = sliced(IDS).logits
    reset_session()
    quantized = oneshot(
        model=str(sliced_dir) if via == "saved directory" else sliced,
        recipe=[*SMOOTHING[smoothing](), GPTQModifier(targets="Linear", scheme="W8A8")],
        dataset=calib_dataset(n=16, seq=64),
        num_calibration_samples=16,
        max_seq_length=64,
        output_dir=str(tmp_path / "out"),
    )
    smoothed = smoothing != "gptq"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "dynslice"
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["slicing"]["unit_norms"] is not smoothed
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.has_unit_norms() is not smoothed
    assert reloaded.config.slicing["attn_dims"] == sliced.config.slicing["attn_dims"]
    with torch.no_grad():
        # The checkpoint computes what the quantized model did, and that stays near the
        # sliced model (W8A8's error here is about 0.03).
        logits = reloaded(IDS).logits
        torch.testing.assert_close(logits, quantized(IDS).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, expected, atol=0.1, rtol=0)
    if via == "saved directory":
        # llm-compressor appends the run's stage to the directory's recipe (README).
        saved = (tmp_path / "out" / "recipe.yaml").read_text()
        assert "DynamicSliceModifier" in saved and "GPTQModifier" in saved


def test_saved_target_params_recipe_rebuilds():
    # The saved recipe writes the default sparsity 0.0 beside target_params.
    saved = Recipe.create_instance([DynamicSliceModifier(target_params=0.2)]).yaml()
    assert Recipe.create_instance(saved).modifiers[0].target_params == 0.2


def test_unsliced_input_width_that_breaks_groups_fails_early(tmp_path):
    # o_proj reads 4 heads x 48 = 192 inputs: not a multiple of 128, and slicing cannot help.
    model_dir = save_tiny(tmp_path / "in", "llama", True, hidden=256, layers=2, head_dim=48)
    recipe = [
        DynamicSliceModifier(sparsity=0.25),
        GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
    ]
    with pytest.raises(AllocationError, match=r"o_proj \(192\).*ignore list \('re:\.\*o_proj\$'\)"):
        one_pass(model_dir, recipe)
    # llm-compressor's own switch does not help: its observers take whole groups only.
    recipe[1] = GPTQModifier(
        targets="Linear", scheme="W4A16", ignore=["lm_head"], bypass_divisibility_checks=True
    )
    with pytest.raises(AllocationError, match=r"o_proj \(192\).*observers .* whole groups"):
        one_pass(model_dir, recipe)
    recipe = [
        DynamicSliceModifier(sparsity=0.25),
        GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*o_proj$"]),
    ]
    assert isinstance(one_pass(model_dir, recipe), DynSliceForCausalLM)


def test_a_sliced_head_may_take_groups_that_do_not_divide_hidden_size(tmp_path):
    # Hidden 320 is not a multiple of 128, but a sliced head reads the last layer's width,
    # which is rounded to the group like every sliced width.
    model_dir = save_tiny(tmp_path / "in", "llama", True, hidden=320, layers=2, head_dim=64)
    recipe = [
        DynamicSliceModifier(sparsity=0.25, slice_head=True),
        GPTQModifier(targets="Linear", scheme="W4A16"),
    ]
    model = one_pass(model_dir, recipe)
    assert model.lm_head.in_features in (128, 256)
    recipe = [DynamicSliceModifier(sparsity=0.25), GPTQModifier(targets="Linear", scheme="W4A16")]
    with pytest.raises(AllocationError, match=r"lm_head \(320\)"):
        one_pass(model_dir, recipe)


def test_smoothquant_scales_the_norms_of_a_sliced_phi3(tmp_path):
    # SmoothQuant looks its mappings up by class name; the default ones name q/k/v and
    # gate/up apart and match nothing in Phi-3, so resolving them would fail.
    dense = save_tiny(tmp_path / "in", "phi3", True, hidden=256, layers=2)
    slicer = DynamicSliceModifier(sparsity=0.25, slicing_base=0.1, profitable_only=False)
    smooth = SmoothQuantModifier(smoothing_strength=0.8)
    gptq = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    model = one_pass(dense, [slicer, smooth, gptq], tmp_path / "out")
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert not torch.all(norm.weight == 1), "a norm SmoothQuant should have scaled"
    spec = json.loads((tmp_path / "out" / "config.json").read_text())["slicing"]
    assert spec["unit_norms"] is False
    with torch.no_grad():
        expected = model(IDS).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(IDS).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_smoothing_mappings_of_a_sliced_model_name_its_modules(arch):
    # AWQ cannot run here (it pins memory for an accelerator), so its mappings are checked
    # as it resolves them: every name in every mapping must match a module of the sliced
    # model, as the base architecture's do in the dense one.
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import (
        get_layer_mappings_from_model as awq_mappings,
    )
    from llmcompressor.modifiers.transform.smoothquant.dynamic_mappings import (
        get_layer_mappings_from_model as smoothquant_mappings,
    )

    model = tiny_model(arch, True)
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches()))
    assert DynamicSliceModifier(sparsity=0.25, round_to=8).on_initialize(state)
    assert isinstance(model, DynSliceForCausalLM)
    names = [[m.smooth_layer, *m.balance_layers] for m in awq_mappings(model)] + [
        [m.smooth_layers, *m.balance_layers] for m in smoothquant_mappings(model)
    ]
    for targets in names:
        for target in targets:
            assert list(match_named_modules(model, [target])), f"{target} matches nothing"


def test_nvfp4_tensor_groups_bind_the_widths():
    need = required_multiple(
        [QuantizationModifier(targets="Linear", scheme="NVFP4")], READS, WRITES
    )
    assert need is not None and need[0] == 16
    with pytest.raises(AllocationError, match="conflicts"):
        fit_round_to(8, need, 64)


def test_the_default_step_stays_a_multiple_of_sixteen():
    assert fit_round_to(None, (24, "groups of 24"), 192) == 48


def test_a_shortcut_format_the_recipe_set_is_kept():
    model = nn.Sequential(ResidualShortcutLinear(16, 16), ResidualShortcutLinear(16, 16))
    for module in model:
        module.quantization_scheme = preset_name_to_scheme("W8A8", ["Linear"])
    model[0].quantization_scheme.format = "naive-quantized"
    assert compress_shortcuts_as_linears(model) == 1
    assert model[0].quantization_scheme.format == "naive-quantized"
    assert model[1].quantization_scheme.format == "int-quantized"


def test_the_could_not_match_warning_on_quantized_shortcuts_is_foretold():
    # slice_w4a16.yaml's int8 group takes the shortcuts by regex beside a Linear group, and
    # compressed-tensors may count them under Linear: a warning saying the regex matched
    # nothing, which would read as the shortcuts being left unquantized.
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "slice_w4a16.yaml"
    gptq = Recipe.create_instance(str(recipe)).modifiers[1]
    names = ["model.layers.0.attn_shortcut", "model.layers.0.input_projection"]
    assert unmatched_warnings(names, [gptq]) == ["re:.*_shortcut$", "re:.*input_projection$"]
    # Listed before Linear, the regex is credited with the shortcuts: no warning.
    regex_first = QuantizationModifier(
        config_groups={
            "shortcuts": {"targets": ["re:.*_shortcut$"], "weights": {"num_bits": 8}},
            "linears": {"targets": ["Linear"], "weights": {"num_bits": 8}},
        }
    )
    assert unmatched_warnings(names, [regex_first]) == []
