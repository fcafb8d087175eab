"""DynamicSliceModifier inside llm-compressor: recipes, oneshot, checkpoints, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from compressed_tensors.offload import set_onload_device
from conftest import calib_dataset, logged, save_tiny
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.recipe import Recipe
from tiny import calib_batches, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.adapters import adapter_for
from dynslice_modifier.errors import AllocationError, CalibrationError, UnsupportedModelError
from dynslice_modifier.modeling import DynSliceForCausalLM, SlicingConfigError
from dynslice_modifier.slicer import count_parameters, embeddings_tied

RECIPE = """
slice_stage:
  slice_modifiers:
    DynamicSliceModifier:
      sparsity: 0.25
      slicing_base: 0.10
      round_to: 8
"""
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
DISK_TABLES = {
    "model.embed_tokens": "disk",
    "model.layers": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def run_oneshot(model_dir: Path, recipe, out: Path | None = None, **kwargs):
    kwargs.setdefault("dataset", calib_dataset())
    kwargs.setdefault("num_calibration_samples", 16)
    kwargs.setdefault("max_seq_length", 32)
    return oneshot(model=str(model_dir), recipe=recipe, output_dir=out and str(out), **kwargs)


def test_yaml_string_file_and_objects_agree(tiny_dir, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(RECIPE)
    logits = []
    for recipe in (
        RECIPE,
        str(recipe_file),
        [DynamicSliceModifier(sparsity=0.25, slicing_base=0.10, round_to=8)],
    ):
        model = run_oneshot(tiny_dir, recipe)
        assert isinstance(model, DynSliceForCausalLM)
        with torch.no_grad():
            logits.append(model(IDS).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    torch.testing.assert_close(logits[2], logits[0], atol=0, rtol=0)


def test_recipe_parses_to_the_modifier():
    recipe = Recipe.create_instance(RECIPE)
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, DynamicSliceModifier)
    assert (modifier.sparsity, modifier.slicing_base, modifier.round_to) == (0.25, 0.10, 8)


def test_oneshot_writes_a_reloadable_checkpoint_and_leaves_input_alone(tiny_dir, tmp_path):
    before = digest(tiny_dir)
    out = tmp_path / "out"
    model = run_oneshot(tiny_dir, RECIPE, out)
    assert digest(tiny_dir) == before
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dynslice"
    assert config["base_model_type"] == "llama"
    assert config["slicing"]["sparsity"] == 0.25
    assert config["slicing"]["slicing_base"] == 0.10
    assert len(config["slicing"]["lr_scores"]) == 3
    assert "DynamicSliceModifier" in (out / "recipe.yaml").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "scores", "load"),
    [
        ({"untie_embeddings": True}, [0.0, 1.0, 1.0], {}),
        ({"slice_head": True}, [0.0, 1.0, 0.0], {}),
        ({}, [0.0, 1.0, 1.0], {"tie_word_embeddings": False}),
    ],
    ids=["untie_embeddings", "slice_head-last-whole", "loaded-untied"],
)
def test_a_whole_layer_0_leaves_table_and_head_one_saved_table(
    tiny_dir, tmp_path, options, scores, load
):
    # Layer 0 whole (slice 0 at slicing_base 0) reads the table unrotated, and an unsliced
    # head is left as it was: the two stay equal, and llm-compressor's save ties equal
    # tables. The config must say so, or the checkpoint cannot be loaded.
    out = tmp_path / "out"
    recipe = DynamicSliceModifier(sparsity=0.25, slicing_base=0.0, layer_scores=scores, **options)
    model = run_oneshot(tiny_dir, [recipe], out, **load)
    assert model.config.slicing["whole_layers"][0] == 0
    assert model.config.slicing["embedding_sliced"] is False
    if not load:
        # Untying would only have added a second copy of the table.
        assert embeddings_tied(model)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert count_parameters(reloaded) == count_parameters(model)

    # What earlier builds wrote here: a sliced table that was never rotated.
    config["slicing"]["embedding_sliced"] = True
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlicingConfigError, match=r"set slicing\.embedding_sliced to false"):
        AutoModelForCausalLM.from_pretrained(out)


def test_slice_head_with_the_last_layer_whole_says_so_and_keeps_the_table_tied(tiny_dir, tmp_path):
    # Layer 0 takes the whole slice and the others stay whole: the head has no sliced
    # basis to read. Untied for nothing, the table would be a second copy of the head's.
    out = tmp_path / "out"
    recipe = DynamicSliceModifier(
        sparsity=0.25, slicing_base=0.0, layer_scores=[1.0, 0.0, 0.0], slice_head=True
    )
    with logged() as records:
        model = run_oneshot(tiny_dir, [recipe], out)
    slicing = model.config.slicing
    assert slicing["whole_layers"] == [1, 2]
    assert "final_dim" not in slicing
    assert embeddings_tied(model)
    assert any("slice_head: the last layer is left whole" in m for _, m in records)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert count_parameters(reloaded) == slicing["parameters"]["sliced"]


@pytest.mark.parametrize("sparsity", [0.0, 0.25])
def test_an_offloaded_tied_model_is_sliced_like_a_loaded_one(tiny_dir, tmp_path, sparsity):
    # A device_map model reaches the modifier under compressed-tensors offloading, where
    # every read of a weight returns a fresh copy: the shared table must still be seen as
    # one (or, at sparsity 0, rotating the embedding rotated the head with it).
    offload = {"device_map": DISK_TABLES, "offload_folder": str(tmp_path / "offload")}
    results = []
    for kwargs in ({}, offload):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, **kwargs)
        recipe = DynamicSliceModifier(sparsity=sparsity, round_to=8, profitable_only=False)
        sliced = oneshot(
            model=model, recipe=[recipe], dataset=calib_dataset(), num_calibration_samples=16
        )
        with torch.no_grad():
            results.append((sliced(IDS).logits, sliced.config.slicing["parameters"]))
    (plain, plain_params), (offloaded, offloaded_params) = results
    assert offloaded_params == plain_params
    torch.testing.assert_close(offloaded, plain)
    if sparsity == 0:
        dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
        with torch.no_grad():
            torch.testing.assert_close(offloaded, dense(IDS).logits, atol=1e-4, rtol=1e-4)


def test_tied_tables_stay_one_table_once_an_onload_device_is_set():
    # llm-compressor's pipelines set the accelerator as onload device before the later
    # modifiers run; "meta" stands in for it (each read is then a new tensor too).
    model = tiny_model("llama", tied=True)
    dense = count_parameters(model)
    set_onload_device(model, torch.device("meta"))
    assert embeddings_tied(model)
    assert count_parameters(model) == dense


def test_checkpoint_loads_with_trust_remote_code_without_the_package(tiny_dir, tmp_path):
    out = tmp_path / "out"
    model = run_oneshot(tiny_dir, RECIPE, out)
    with torch.no_grad():
        expected = model(IDS).logits
    torch.save(IDS, tmp_path / "ids.pt")
    script = f"""
import sys, torch
sys.modules["dynslice_modifier"] = None  # make any import of the package fail
from transformers import AutoModel, AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(m).__name__ == "DynSliceForCausalLM", type(m)
ids = torch.load({str(tmp_path / "ids.pt")!r})
torch.save(m(ids).logits.detach(), {str(tmp_path / "logits.pt")!r})
body = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
hidden = body(ids).last_hidden_state
torch.save(m.lm_head(hidden).detach(), {str(tmp_path / "body_logits.pt")!r})
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=0, rtol=0)
    torch.testing.assert_close(torch.load(tmp_path / "body_logits.pt"), expected, atol=0, rtol=0)


def test_automodel_gives_the_decoder_stack_of_a_sliced_checkpoint(tiny_dir, tmp_path):
    # As for a dense checkpoint: the base model, whose last hidden state the head reads.
    out = tmp_path / "out"
    model = run_oneshot(tiny_dir, RECIPE, out)
    body, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(body) is type(model.model) and not info["missing_keys"]
    with torch.no_grad():
        torch.testing.assert_close(
            model.lm_head(body(IDS).last_hidden_state), model(IDS).logits, atol=0, rtol=0
        )
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(out))
    widths = [layer.self_attn.q_proj.in_features for layer in model.model.layers]
    assert [layer.self_attn.q_proj.in_features for layer in fresh.layers] == widths
    # Saved on its own, the stack stores its names without the causal LM's prefix.
    body.save_pretrained(tmp_path / "body")
    again = AutoModel.from_pretrained(tmp_path / "body")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).last_hidden_state, body(IDS).last_hidden_state)


def test_saving_into_an_earlier_output_drops_its_report(tiny_dir, tmp_path):
    # The report of the model saved there before would describe widths this one lacks.
    out = tmp_path / "out"
    run_oneshot(tiny_dir, RECIPE, out)
    (out / "slicing_report.md").write_text("| 0 | 0.870 | 40 | 40 |")
    (out / "notes.md").write_text("mine")
    run_oneshot(tiny_dir, RECIPE.replace("sparsity: 0.25", "sparsity: 0.5"), out)
    assert not (out / "slicing_report.md").exists() and (out / "notes.md").exists()


def test_a_remote_code_model_keeps_its_config_through_a_later_oneshot(tiny_dir, tmp_path):
    # SmoothQuant scales the sliced norms; the save must say so (unit_norms: false) also
    # when the model came in as the checkpoint's own code, the package not imported:
    # llm-compressor's save re-wrote config.json from the loaded file, which said true.
    sliced = tmp_path / "sliced"
    run_oneshot(tiny_dir, RECIPE, sliced)
    calib_dataset().save_to_disk(tmp_path / "calib")
    script = f"""
import sys, json
sys.modules["dynslice_modifier"] = None  # make any import of the package fail
from datasets import load_from_disk
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(sliced)!r}, trust_remote_code=True)
recipe = [
    SmoothQuantModifier(smoothing_strength=0.8),
    GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
]
out = {str(tmp_path / "out")!r}
model = oneshot(model=model, recipe=recipe, dataset=load_from_disk({str(tmp_path / "calib")!r}),
                num_calibration_samples=16, max_seq_length=32, output_dir=out,
                trust_remote_code_model=True)
assert model.has_unit_norms() is False
print(json.dumps(json.load(open(out + "/config.json"))["slicing"]["unit_norms"]))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "false"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"sparsity": -0.1}, "sparsity must be in"),
        ({"sparsity": 0.2, "slicing_base": 0.3}, "slicing_base must be in"),
        ({"sparsity": 0.2, "slicing_base": -0.01}, "slicing_base must be in"),
        ({"sparsity": 0.2, "round_to": 0}, "round_to must be a positive integer"),
        ({"sparsity": 0.2, "rounding": "up"}, r"rounding[\s\S]*'mean', 'nearest' or 'spectrum'"),
        ({"sparsity": 0.2, "typo_option": 1}, "typo_option"),
        ({"target_params": 0.2, "slicing_base": -0.1}, "slicing_base must be in"),
        (
            {"sparsity": 0.2, "slicing_base": "auto", "auto_fractions": []},
            "auto_fractions is empty",
        ),
        ({"layer_dims": [32, 32], "slicing_base": "auto"}, "would be ignored"),
        ({"layer_dims": [32, 32], "sparsity": 0.25}, r"sparsity would be ignored"),
        ({"layer_dims": [32, 32], "target_params": 0.1}, "target_params would be ignored"),
        ({"layer_dims": [32, 32], "rounding": "spectrum"}, r"rounding would be ignored"),
        ({"layer_dims": [32, 32], "normalization": "rank"}, r"normalization would be ignored"),
        ({"layer_dims": [32, 28], "round_to": 8}, r"layer_dims \[28\] are not multiples"),
        ({"sparsity": 0.2, "auto_holdout": 0.5}, "tune slicing_base: auto"),
        ({"sparsity": 0.2, "slicing_base": 0.1, "auto_fractions": [0.5]}, "tune slicing_base"),
        ({"sparsity": 0.2, "layer_scores": []}, "one finite number per decoder layer"),
        ({"sparsity": 0.2, "layer_scores": [0.5, float("nan")]}, "one finite number"),
        ({"sparsity": 0.2, "layers_per_basis": 0}, "layers_per_basis must be a positive"),
        ({"sparsity": 0.2, "layers_per_basis": 2}, "layers_per_basis: 2 .* set basis: layer"),
        # Booleans and floats are not widths (lax validation would read True as 1).
        ({"layer_dims": [True, 32]}, "layer_dims must be whole numbers, got True"),
        ({"sparsity": 0.2, "round_to": True}, "round_to must be a whole number, got True"),
        ({"sparsity": 0.2, "round_to": 16.0}, "round_to must be a whole number, got 16.0"),
    ],
)
def test_bad_options_rejected_when_the_recipe_is_built(options, match):
    with pytest.raises(ValueError, match=match):
        DynamicSliceModifier(**options)


def test_numpy_integers_are_widths():
    slicer = DynamicSliceModifier(layer_dims=np.full(3, 48), round_to=np.int64(16))
    assert slicer.layer_dims == [48, 48, 48] and type(slicer.round_to) is int


def test_padded_batches_from_the_padding_collator_slice_like_single_samples(tiny_dir):
    # llm-compressor's padding collator yields BatchEncoding (a Mapping, not a dict), with
    # the padding masked out of every statistic.
    from datasets import Dataset

    g = torch.Generator().manual_seed(5)
    lengths = [32, 20, 27, 16, 31, 24, 18, 29]
    dataset = Dataset.from_dict(
        {"input_ids": [torch.randint(4, 128, (n,), generator=g).tolist() for n in lengths]}
    )
    slicings, logits = [], []
    for batching in ({}, {"batch_size": 4, "data_collator": "padding"}):
        model = run_oneshot(
            tiny_dir, RECIPE, dataset=dataset, num_calibration_samples=8, **batching
        )
        slicings.append(model.config.slicing)
        with torch.no_grad():
            logits.append(model(IDS).logits)
    assert slicings[1]["mlp_dims"] == slicings[0]["mlp_dims"]
    assert slicings[1]["lr_scores"] == pytest.approx(slicings[0]["lr_scores"], abs=1e-6)
    # The PCA too: padded tokens counted in a covariance would move the bases.
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)


def test_a_sliced_model_or_a_second_slicer_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "sliced"
    run_oneshot(tiny_dir, RECIPE, out)
    with pytest.raises(UnsupportedModelError, match=r"already sliced.*quantization modifiers"):
        run_oneshot(out, RECIPE)
    two = [
        DynamicSliceModifier(sparsity=0.2, round_to=8),
        DynamicSliceModifier(sparsity=0.1, round_to=8),
    ]
    with pytest.raises(AllocationError, match="holds 2 DynamicSliceModifiers"):
        run_oneshot(tiny_dir, two)


def test_a_quantized_checkpoint_is_refused_before_calibration(tiny_dir, tmp_path, no_calibration):
    # Rotated weights would be read with scales computed for the unrotated ones.
    quantized = tmp_path / "w8a8"
    scheme = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    run_oneshot(tiny_dir, [scheme], quantized)
    reset_session()
    # oneshot loads it decompressed, each linear keeping its scheme and scales.
    with pytest.raises(UnsupportedModelError, match=r"q_proj carries a quantization scheme"):
        run_oneshot(quantized, RECIPE)
    # The command line asks the config before loading.
    with pytest.raises(UnsupportedModelError, match=r"quant_method 'compressed-tensors'.*full-"):
        adapter_for(AutoConfig.from_pretrained(quantized))


def test_saving_over_the_dense_source_is_refused_and_leaves_it_as_it_was(
    tiny_dir, tmp_path, monkeypatch
):
    # A relative path, as a user types it: the checkpoint records where it really is.
    monkeypatch.chdir(tiny_dir.parent)
    model = run_oneshot(Path(tiny_dir.name), RECIPE, tmp_path / "out")
    assert model.config.slicing["source_model"] == str(tiny_dir)
    before = digest(tiny_dir)
    with pytest.raises(ValueError, match=r"dense model it was sliced from.*another output_dir"):
        run_oneshot(Path(tiny_dir.name), RECIPE, Path(tiny_dir.name))
    assert digest(tiny_dir) == before
    # Outside oneshot too, and for a reloaded sliced checkpoint.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="dense model it was sliced from"):
        reloaded.save_pretrained(tiny_dir)
    assert digest(tiny_dir) == before


def test_a_sliced_model_offloaded_to_disk_saves_with_its_recorded_flags(tiny_dir, tmp_path):
    run_oneshot(tiny_dir, RECIPE, tmp_path / "out")
    # Its layers (norms included) on disk: accelerate leaves those weights on meta, so the
    # save keeps the recorded unit_norms rather than reading them.
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out",
        device_map={**DISK_TABLES, "model.layers": "disk"},
        offload_folder=str(tmp_path / "offload"),
    )
    assert offloaded.model.layers[0].input_layernorm.weight.is_meta
    offloaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["slicing"]
    assert saved["unit_norms"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    torch.testing.assert_close(
        reloaded(IDS).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "out")(IDS).logits
    )


def test_slicing_on_a_mac_runs_on_the_cpu(monkeypatch):
    # llm-compressor picks MPS where it exists; MPS has no float64. Here any use of the
    # "mps" device would fail, so the run only passes if the slicer stays on the CPU.
    from dynslice_modifier import modifier as modifier_module

    monkeypatch.setattr(modifier_module, "get_main_device", lambda: torch.device("mps"))
    model = tiny_model("llama", tied=True)
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches()))
    assert DynamicSliceModifier(sparsity=0.25, round_to=8).on_initialize(state)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_no_calibration_data(tiny_dir):
    with pytest.raises(CalibrationError, match="needs calibration data"):
        oneshot(model=str(tiny_dir), recipe=RECIPE)


def test_too_few_calibration_tokens(tiny_dir):
    with pytest.raises(CalibrationError, match="at least as many tokens as dimensions"):
        run_oneshot(tiny_dir, RECIPE, dataset=calib_dataset(n=2, seq=16), num_calibration_samples=2)


def test_a_refused_run_leaves_a_tied_model_tied():
    # slice_head unties the head to rotate it apart; a run refused before any layer is
    # sliced must hand the caller's model back as it came.
    model = tiny_model("llama", tied=True)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    modifier = DynamicSliceModifier(sparsity=0.25, slice_head=True)
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches(n=1, seq=16)))
    with pytest.raises(CalibrationError, match="at least as many tokens as dimensions"):
        modifier.on_initialize(state)
    assert embeddings_tied(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("profitable_only", [True, False])
def test_a_sparsity_that_nearest_rounding_takes_back_whole_is_refused(tiny_dir, profitable_only):
    # Dynamic widths under nearest rounding: whether one reaches half a step (8 of 64 dims)
    # depends on the scores, so it is found once they are, before the model changes; the
    # reason is the rounding, not profitable_only.
    options = {"sparsity": 0.04, "slicing_base": 0.02, "round_to": 16, "rounding": "nearest"}
    recipe = [DynamicSliceModifier(**options, profitable_only=profitable_only)]
    with pytest.raises(AllocationError, match="nearest rounding to multiples of 16 takes every"):
        run_oneshot(tiny_dir, recipe)


def test_width_rounding_to_zero(tiny_dir):
    recipe = [DynamicSliceModifier(sparsity=0.9, slicing_base=0.9, round_to=32)]
    with pytest.raises(AllocationError, match="lower sparsity or round_to"):
        run_oneshot(tiny_dir, recipe)


class _Untouchable:
    """Calibration data that fails the test if anything reads it."""

    def __iter__(self):
        raise AssertionError("calibration data was read before the options were checked")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sparsity": 0.9, "slicing_base": 0.1, "round_to": 16}, "less than one rounding step"),
        ({"sparsity": 0.9, "slicing_base": "auto", "round_to": 16}, "less than one rounding"),
        ({"target_params": 0.9, "round_to": 16}, "needs more than the largest possible SP, 0.750"),
        # Under half a step of 16 in all: every width would round back to 64.
        ({"sparsity": 0.02, "round_to": 16}, r"would slice nothing: it removes \d\.\d+ of the"),
        ({"sparsity": 0.02, "rounding": "spectrum"}, "would slice nothing"),
        # Constant slicing rounds its equal widths together: half a step in each layer.
        (
            {"sparsity": 0.1, "slicing_base": 0.1, "round_to": 16},
            r"each layer would lose 6\.4 of its 64 dims.*at least 0\.25 \(one step\)",
        ),
    ],
)
def test_sizes_no_scores_can_reach_fail_before_calibration(options, match):
    model = tiny_model("llama", tied=True)
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=_Untouchable()))
    with pytest.raises(AllocationError, match=match):
        DynamicSliceModifier(**options).on_initialize(state)


@pytest.mark.parametrize(
    ("rounding", "dims"), [("mean", [56, 48, 48, 40]), ("nearest", [64, 48, 48, 40])]
)
def test_rounding_keeps_the_mean_slice_at_sparsity(tmp_path, rounding, dims):
    # Nearest rounding of these scores keeps 200 of 4 x 48 dims: a realised slice of 0.219.
    model_dir = save_tiny(tmp_path / "in", layers=4)
    recipe = RECIPE.replace("slicing_base: 0.10", "slicing_base: 0.05") + (
        f"      rounding: {rounding}\n"
        "      profitable_only: false\n"
        "      layer_scores: [0.1, 0.6, 0.65, 0.9]\n"
    )
    model = run_oneshot(model_dir, recipe)
    spec = model.config.slicing
    assert spec["rounding"] == rounding
    assert spec["mlp_dims"] == dims
    if rounding == "mean":
        assert sum(dims) == 4 * 48


def test_explicit_dims_and_scores_are_validated(tiny_dir):
    with pytest.raises(AllocationError, match="3 decoder layers"):
        run_oneshot(tiny_dir, [DynamicSliceModifier(layer_dims=[32, 32])])
    with pytest.raises(AllocationError, match="layer_scores has 1 entries"):
        run_oneshot(tiny_dir, [DynamicSliceModifier(sparsity=0.2, layer_scores=[0.5])])


def test_non_finite_activation_names_the_layer(tmp_path):
    model_dir = save_tiny(tmp_path / "bad")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(model_dir)
    with pytest.raises(CalibrationError, match="decoder layer 1"):
        run_oneshot(model_dir, RECIPE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    GemmaForCausalLM(config).save_pretrained(tmp_path / "gemma")
    from conftest import word_tokenizer

    word_tokenizer().save_pretrained(tmp_path / "gemma")
    with pytest.raises(UnsupportedModelError) as err:
        run_oneshot(tmp_path / "gemma", RECIPE)
    message = str(err.value)
    assert "GemmaForCausalLM" in message and "(1 + weight)" in message
    assert "adapters/" in message
    for supported in ("granite", "llama", "mistral", "phi3", "qwen2", "qwen3"):
        assert supported in message


def test_rank_deficient_calibration_is_reported(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "m"))
    # One 24-token sequence repeated: enough tokens, but at most 24 distinct directions.
    batch = {"input_ids": torch.arange(24).unsqueeze(0) + 4}
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=[batch] * 8))
    with logged() as records:
        DynamicSliceModifier(sparsity=0.25, slicing_base=0.25, round_to=8).on_initialize(state)
    messages = [message for _, message in records]
    assert any("layer 0 attention input: the calibration signal spans only" in m for m in messages)
    assert any("more varied, calibration samples" in m for m in messages)


def test_saving_over_the_source_through_a_link_is_refused(tmp_path):
    from dynslice_modifier.modeling.modeling_dynslice import refuse_saving_over_source

    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text('{"model_type": "llama"}')
    link = tmp_path / "link"
    link.symlink_to(dense)
    config = SimpleNamespace(slicing={"source_model": str(dense)})
    with pytest.raises(ValueError, match="dense model it was sliced from"):
        refuse_saving_over_source(link, config)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w8a8"])
def test_a_copy_of_the_returned_model_saves_itself(tiny_dir, tmp_path, quantized):
    # oneshot's save wrapper holds the model it was made for: a deepcopy fine-tuned and
    # saved must not write the original's weights (nor its config).
    import copy

    recipe = [DynamicSliceModifier(sparsity=0.3, slicing_base=0.10, round_to=16)]
    if quantized:
        recipe.append(QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
    model = run_oneshot(tiny_dir, recipe)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
        expected = clone(IDS).logits
        original = model(IDS).logits
    clone.save_pretrained(tmp_path / "clone")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "clone")
    saved = json.loads((tmp_path / "clone" / "config.json").read_text())
    assert saved["slicing"]["unit_norms"] is False
    assert ("quantization_config" in saved) is quantized
    with torch.no_grad():
        got = reloaded(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, original, atol=1e-3)
    assert model.has_unit_norms() is True
