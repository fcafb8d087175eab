"""The rotate-and-slice transform on tiny random models of every supported architecture."""

from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tiny import ARCHS, calib_batches, tiny_model
from transformers import AutoModelForCausalLM, GenerationConfig

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.allocation import mean_slice
from dynslice_modifier.modeling import DynSliceForCausalLM
from dynslice_modifier.slicer import count_parameters

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))


def slice_in_memory(model, **options) -> DynamicSliceModifier:
    modifier = DynamicSliceModifier(**options)
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches()))
    assert modifier.on_initialize(state)
    return modifier


def test_the_checkpoint_records_the_calibration_it_was_sliced_on():
    model = tiny_model("llama", True)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    # 4 batches of 2 x 32 tokens, two of them with 16 padded tokens, which the PCA skips.
    assert model.config.slicing["calibration"] == {"batches": 4, "tokens": 4 * 64 - 2 * 16}


# Aligned bases at SP 0 all become one basis, so the model is one global rotation with no
# shortcut inside; unaligned, every residual connection crosses a shortcut.
@pytest.mark.parametrize("align_bases", [True, False])
@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("basis", ["sublayer", "layer"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rotation_only_is_exact(arch, tied, basis, hadamard, align_bases):
    model = tiny_model(arch, tied)
    with torch.no_grad():
        reference = model(IDS).logits
    slice_in_memory(model, sparsity=0.0, basis=basis, hadamard=hadamard, align_bases=align_bases)
    assert isinstance(model, DynSliceForCausalLM)
    if not align_bases:
        assert any(model.config.slicing["mlp_shortcuts"])
    with torch.no_grad():
        rotated = model(IDS).logits
    torch.testing.assert_close(rotated, reference, atol=2e-5, rtol=1e-5)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.config.tie_word_embeddings


@pytest.mark.parametrize("arch", ["granite", "phi3", "qwen3"])
def test_rotation_only_with_shared_bases_is_exact(arch):
    model = tiny_model(arch, tied=False)
    with torch.no_grad():
        reference = model(IDS).logits
    slice_in_memory(model, sparsity=0.0, basis="layer", layers_per_basis=2, align_bases=False)
    # Unaligned, every layer's basis would need a shortcut into the next; layers 0 and 1
    # share one.
    assert model.config.slicing["mlp_shortcuts"] == [False, True, True]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=2e-5, rtol=1e-5)


# Config fields each architecture's attention or MLP reads: the sliced model, in memory and
# reloaded, must keep every one (the default tiny models set none of them). o_proj's bias is
# added to the residual, so it is rotated with o_proj's output.
VARIANTS = {
    "llama-biases-head_dim-llama3-rope": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            head_dim=24,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    # tests/tiny.py gives Granite its four scalars; the saved config must keep the two that
    # are not folded into the weights.
    "granite-biases": ("granite", dict(attention_bias=True, mlp_bias=True)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=8, head_dim=8)),
    "qwen2-sliding-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    # Phi-4-mini's partial rotary embedding and long-context RoPE, Phi-3-mini-4k's window.
    "phi3-partial-rotary-longrope-sliding-window": (
        "phi3",
        dict(
            sliding_window=8,
            # Shorter than the test's 40 tokens: the long factors apply.
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
            },
        ),
    ),
    "qwen3-biases-sliding-layers-yarn": (
        "qwen3",
        dict(
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            head_dim=32,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rotation_only_is_exact_for_each_architectures_config_fields(variant, tmp_path):
    arch, fields = VARIANTS[variant]
    model = tiny_model(arch, False, **fields)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids).logits
    slice_in_memory(model, sparsity=0.0)
    with torch.no_grad():
        rotated = model(ids).logits
    torch.testing.assert_close(rotated, reference, atol=2e-5, rtol=1e-5)
    # Older vLLM plugins do not serve Phi-3 or Granite: they must be asked to upgrade.
    assert (model.config.slicing["format_version"] == 6) is (arch in ("phi3", "granite"))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
    torch.testing.assert_close(reloaded, rotated, atol=0, rtol=0)


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_a_model_sliced_in_memory_trains_as_it_did(tied, trainable):
    # SliceGPT's recovery fine-tuning continues from the sliced model; frozen rotated weights
    # would silently not train.
    model = tiny_model("llama", tied).requires_grad_(trainable)
    slice_in_memory(model, sparsity=0.25, round_to=8, profitable_only=False)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad is not trainable]
    assert not frozen
    assert model.model.layers[1].attn_shortcut is not None
    if trainable:
        # Every weight, the shortcuts included, is in the graph the loss goes back through.
        model(IDS, labels=IDS).loss.backward()
        no_grad = [
            n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()
        ]
        assert not no_grad


def test_phi3_residual_dropout_survives_slicing():
    # Phi-3 drops out each sublayer's output before the residual add; a sliced Phi-3
    # fine-tuned without it would train with less regularisation than its config says.
    model = tiny_model("phi3", False, resid_pdrop=0.5)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    with torch.no_grad():
        evaluated = model(IDS).logits
        model.train()
        trained = [model(IDS).logits for _ in range(2)]
        model.eval()
        torch.testing.assert_close(model(IDS).logits, evaluated, atol=0, rtol=0)
    assert not torch.equal(trained[0], trained[1])
    assert not torch.equal(trained[0], evaluated)


@pytest.mark.parametrize("basis", ["sublayer", "layer"])
@pytest.mark.parametrize("tied", [True, False])
def test_sliced_shapes(tied, basis):
    model = tiny_model("qwen2", tied, layers=4)
    hidden = model.config.hidden_size
    dims = [64, 48, 32, 48]
    slice_in_memory(model, layer_dims=dims, basis=basis)
    spec = model.config.slicing
    attn_dims = dims
    assert spec["attn_dims"] == attn_dims
    assert spec["mlp_dims"] == dims
    assert spec["embedding_sliced"] is (not tied)
    assert model.model.embed_tokens.weight.shape[1] == (hidden if tied else dims[0])
    assert model.lm_head.weight.shape == (128, hidden)
    first = model.model.layers[0].input_projection
    assert (first is not None) is tied
    if tied:
        assert first.weight.shape == (dims[0], hidden)
    for i, layer in enumerate(model.model.layers):
        out = attn_dims[i + 1] if i + 1 < len(dims) else hidden
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.weight.shape[1] == attn_dims[i]
        assert attn.q_proj.bias is not None  # Qwen2 biases survive
        assert attn.o_proj.weight.shape[0] == dims[i]
        assert mlp.gate_proj.weight.shape[1] == mlp.up_proj.weight.shape[1] == dims[i]
        assert mlp.down_proj.weight.shape[0] == out
        assert layer.mlp_shortcut.weight.shape == (out, dims[i])
        # Aligned full-width bases coincide, so an unsliced layer needs no attention shortcut.
        has_attn_shortcut = basis == "sublayer" and dims[i] < hidden
        assert (layer.attn_shortcut is not None) is has_attn_shortcut
        if has_attn_shortcut:
            assert layer.attn_shortcut.weight.shape == (dims[i], attn_dims[i])
        # Scales folded into the linears; the norm keeps ones at the kept width.
        assert torch.equal(layer.input_layernorm.weight, torch.ones(attn_dims[i]))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(dims[i]))
    assert model.model.norm.weight.shape == (hidden,)


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_rotation_only_with_a_sliced_head_is_exact(tied, hadamard):
    model = tiny_model("llama", tied)
    with torch.no_grad():
        reference = model(IDS).logits
    slice_in_memory(model, sparsity=0.0, slice_head=True, hadamard=hadamard)
    with torch.no_grad():
        rotated = model(IDS).logits
    torch.testing.assert_close(rotated, reference, atol=2e-5, rtol=1e-5)
    hidden = model.config.hidden_size
    assert model.config.slicing["final_dim"] == hidden
    # The head reads a rotated basis, so it can no longer share the original-basis table.
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.norm.weight, torch.ones(hidden))


@pytest.mark.parametrize("tied", [True, False])
def test_sliced_head_shapes_and_reload(tmp_path, tied):
    model = tiny_model("qwen3", tied, layers=4)
    dims = [56, 48, 32, 40]
    slice_in_memory(model, layer_dims=dims, slice_head=True)
    spec = model.config.slicing
    assert spec["final_dim"] == 40
    assert spec["format_version"] == 4
    assert model.lm_head.weight.shape == (128, 40)
    assert model.model.norm.weight.shape == (40,)
    last = model.model.layers[-1]
    assert last.mlp.down_proj.weight.shape[0] == 40
    assert last.mlp_shortcut.weight.shape == (40, 40)
    # A head of its own frees the table: it is sliced to layer 0's width, so layer 0 needs
    # no input projection.
    assert model.model.embed_tokens.weight.shape[1] == 56
    assert model.model.layers[0].input_projection is None
    assert not spec["input_projection"]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert count_parameters(reloaded) == spec["parameters"]["sliced"]


def test_a_sliced_head_is_not_much_worse_than_a_whole_one():
    """Same widths, same data: slicing the head's input too costs little (its PCA keeps the
    leading directions of the final residual), not a collapse."""
    losses = {}
    for slice_head in (False, True):
        model = tiny_model("llama", True)
        with torch.no_grad():
            reference = torch.log_softmax(model(IDS).logits, -1)
        slice_in_memory(model, layer_dims=[48, 48, 48], slice_head=slice_head)
        with torch.no_grad():
            sliced = torch.log_softmax(model(IDS).logits, -1)
        losses[slice_head] = float(
            torch.nn.functional.kl_div(sliced, reference, log_target=True, reduction="batchmean")
        )
    assert losses[False] > 0
    assert 0 < losses[True] < 1.5 * losses[False]


def test_slicing_changes_function_but_stays_close():
    model = tiny_model("llama", True)
    with torch.no_grad():
        reference = torch.log_softmax(model(IDS).logits, -1)
    # Slices this small do not pay for their shortcuts; slice anyway to test the mechanism.
    slice_in_memory(model, sparsity=0.1, slicing_base=0.05, round_to=4, profitable_only=False)
    with torch.no_grad():
        sliced = torch.log_softmax(model(IDS).logits, -1)
    assert not torch.allclose(sliced, reference, atol=1e-4)
    kl = torch.nn.functional.kl_div(sliced, reference, log_target=True, reduction="batchmean")
    assert 0 < kl < 0.2  # measured 0.05; a uniform output scores 0.45


@pytest.mark.parametrize(
    ("basis", "layers_per_basis", "dims"),
    [
        ("sublayer", 1, [48, 32, 48]),
        ("layer", 1, [48, 32, 48]),
        ("layer", 2, [48, 48, 32]),
        ("layer", 3, [40, 40, 40]),
    ],
)
def test_sliced_model_is_the_dense_one_with_every_residual_read_projected(
    basis, layers_per_basis, dims
):
    """An independent reference for the whole algorithm, PCA included.

    The sliced model computes the dense model with the residual stream, wherever a sublayer
    reads it, projected onto the leading eigenvectors of the uncentred, padding-masked
    covariance of the stream there, as the already-projected upstream computes it. Built
    here with hooks on the dense model and a PCA of its own; a slicer that kept other
    directions, counted padding or read the unsliced upstream would not match it.
    """
    dense = tiny_model("llama", True)
    model = tiny_model("llama", True)
    slice_in_memory(
        model,
        layer_dims=dims,
        basis=basis,
        layers_per_basis=layers_per_basis,
        align_bases=False,
        profitable_only=False,
    )
    spec = model.config.slicing
    layers = dense.model.layers
    # Reading points: layer i's attention input is 2i, its MLP input 2i + 1. One PCA per
    # point, or with basis "layer" one per layer from both points' signals, the MLP's taken
    # as the layer's unsliced attention computes it; with layers_per_basis, one per block
    # of layers of one width, from all their points, as the unsliced block computes them.
    widths = [w for i in range(len(layers)) for w in (spec["attn_dims"][i], spec["mlp_dims"][i])]
    blocks = [[0]]
    for i in range(1, len(layers)):
        if i % layers_per_basis and dims[i] == dims[i - 1]:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    groups = [[p for i in block for p in (2 * i, 2 * i + 1)] for block in blocks]
    if basis == "sublayer":
        groups = [[point] for group in groups for point in group]
    # Every shortcut but those inside a block.
    assert sum(spec["mlp_shortcuts"]) == len(blocks)
    projections: dict[int, torch.Tensor] = {}
    capturing: set[int] = set()
    captured: list[torch.Tensor] = []
    layer_input: dict[int, torch.Tensor] = {}

    def at(point: int, stream: torch.Tensor) -> torch.Tensor:
        if point in projections:
            return stream @ projections[point]
        if point in capturing:
            captured.append(stream)
        return stream

    def before_layer(i):
        def hook(module, args, kwargs):
            stream = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            layer_input[i] = at(2 * i, stream)
            return (layer_input[i], *args[1:]), kwargs

        return hook

    def after_attention(i):
        def hook(module, args, output):
            read = at(2 * i + 1, layer_input[i] + output[0])
            return (read - layer_input[i], *output[1:])

        return hook

    handles = [
        h
        for i, layer in enumerate(layers)
        for h in (
            layer.register_forward_pre_hook(before_layer(i), with_kwargs=True),
            layer.self_attn.register_forward_hook(after_attention(i)),
        )
    ]
    try:
        with torch.no_grad():
            for group in groups:
                capturing.clear()
                capturing.update(group)
                covariance = torch.zeros(64, 64, dtype=torch.float64)
                for batch in calib_batches():
                    captured.clear()
                    dense(**batch)
                    for stream in captured:
                        kept = stream[batch["attention_mask"].bool()].double()
                        covariance += kept.T @ kept
                leading = torch.linalg.eigh(covariance).eigenvectors[:, 64 - widths[group[0]] :]
                projections.update(dict.fromkeys(group, (leading @ leading.T).float()))
            reference = dense(IDS).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        sliced = model(IDS).logits
    assert (sliced - dense(IDS).logits).abs().max() > 0.01  # slicing changed the function
    torch.testing.assert_close(sliced, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_save_reload_equal_logits_and_generate(tmp_path, tied):
    model = tiny_model("qwen3", tied)
    slice_in_memory(model, sparsity=0.25, slicing_base=0.1, round_to=8)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, DynSliceForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert count_parameters(reloaded) == sum(p.numel() for p in reloaded.parameters())
    assert count_parameters(reloaded) == model.config.slicing["parameters"]["sliced"]
    generated = reloaded.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False)
    expected = model.generate(IDS[:1, :6], max_new_tokens=6, do_sample=False)
    assert generated.tolist() == expected.tolist()
    assert reloaded.config.tie_word_embeddings is tied


def test_a_model_built_from_its_config_starts_from_identity_shortcuts_and_returns_tuples():
    # from_config: no weights to load, so each shortcut must pass the residual through
    # (the stored matrix: the identity, or zeros where it is stored as a delta), not
    # whatever memory it was given.
    from dynslice_modifier.modeling.configuration_dynslice import delta_shortcuts

    model = tiny_model("llama", True, layers=4)
    slice_in_memory(model, layer_dims=[48, 40, 40, 48])
    fresh = AutoModelForCausalLM.from_config(model.config)
    deltas = delta_shortcuts(fresh.config.slicing)
    assert deltas and len(deltas) < 8  # both kinds: the boundaries are stored whole
    for idx, layer in enumerate(fresh.model.layers):
        for name in ("input_projection", "attn_shortcut", "mlp_shortcut"):
            shortcut = getattr(layer, name)
            if shortcut is None:
                continue
            identity = torch.eye(*shortcut.weight.shape)
            expected = 0 * identity if f"{idx}.{name}" in deltas else identity
            torch.testing.assert_close(shortcut.weight, expected, atol=0, rtol=0)
    with torch.no_grad():
        outputs = fresh(IDS, labels=IDS, return_dict=False)
        assert isinstance(outputs, tuple)
        torch.testing.assert_close(outputs[1], fresh(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("quantizable", [False, True])
def test_a_model_built_on_meta_and_given_memory_initialises_its_shortcuts_as_identity(
    tmp_path, quantizable
):
    # to_empty + init_weights (meta-device initialisation): transformers dispatches the
    # base model's _init_weights to the layers, which would leave a plain shortcut as the
    # memory it was given and draw a quantizable (Linear) one at random.
    from dynslice_modifier.modeling.configuration_dynslice import declared_shortcuts

    model = tiny_model("llama", True, layers=4)
    slice_in_memory(model, layer_dims=[48, 40, 40, 48], quantize_shortcuts=quantizable)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    meta.to_empty(device="cpu")
    for layer in meta.model.layers:
        for name in ("input_projection", "attn_shortcut", "mlp_shortcut"):
            if (shortcut := getattr(layer, name)) is not None:
                shortcut.weight.data.fill_(float("nan"))
    meta.init_weights()
    fresh = AutoModelForCausalLM.from_config(model.config)
    shortcuts = 0
    for built, reference in zip(meta.model.layers, fresh.model.layers, strict=True):
        for name in ("input_projection", "attn_shortcut", "mlp_shortcut"):
            if (shortcut := getattr(built, name)) is not None:
                shortcuts += 1
                expected = getattr(reference, name).weight
                torch.testing.assert_close(shortcut.weight, expected, atol=0, rtol=0)
    assert shortcuts == len(declared_shortcuts(model.config.slicing)) > 0
    # A loaded model keeps its shortcuts through init_weights.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.init_weights()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def test_the_sliced_model_in_memory_switches_attention_kernels_as_a_loaded_one_does():
    # Slicing replaces the config; a module left holding the dense one would keep its kernel
    # when set_attn_implementation changes the model's, under the new kernel's masks.
    model = tiny_model("llama", True)
    model.set_attn_implementation("eager")
    slice_in_memory(model, sparsity=0.25, round_to=8)
    assert all(getattr(m, "config", model.config) is model.config for m in model.modules())
    with torch.no_grad():
        eager = model(IDS, output_attentions=True)
        model.set_attn_implementation("sdpa")
        sdpa = model(IDS).logits
    assert len(eager.attentions) == 3
    torch.testing.assert_close(sdpa, eager.logits, atol=1e-5, rtol=0)


def test_loading_fewer_layers_or_drafting_from_an_early_exit_is_refused_by_name(tmp_path):
    # Both read an intermediate layer's output as the head's input, which a sliced model's
    # widths and bases do not allow; dense models take both.
    from dynslice_modifier.modeling import SlicingConfigError

    model = tiny_model("llama", True)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    model.save_pretrained(tmp_path)
    fewer = r"num_hidden_layers is 2, but slicing describes 3"
    with pytest.raises(SlicingConfigError, match=fewer):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=2)
    early = r"assistant_early_exit .* own\s+width and basis"
    with pytest.raises(ValueError, match=early):
        model.generate(IDS[:1, :6], max_new_tokens=3, do_sample=False, assistant_early_exit=1)
    drafting = GenerationConfig(assistant_early_exit=1, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match=early):
        model.generate(IDS[:1, :6], drafting)  # positionally, as generate's signature has it
    model.generation_config.assistant_early_exit = 1  # as a saved generation_config.json sets it
    with pytest.raises(ValueError, match=early):
        model.generate(IDS[:1, :6], max_new_tokens=3, do_sample=False)
    model.generation_config.assistant_early_exit = None
    assert model.config.num_hidden_layers == 3
    assert model.generate(IDS[:1, :6], max_new_tokens=3, do_sample=False).shape == (1, 9)


def test_a_config_without_base_settings_names_the_fix():
    from transformers import AutoConfig

    from dynslice_modifier.modeling import SlicingConfigError

    with pytest.raises(SlicingConfigError, match=r"no hidden_size.*load one with from_pretrained"):
        AutoModelForCausalLM.from_config(AutoConfig.for_model("dynslice"))


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_states_and_cache_after_reload(tmp_path, tied):
    model = tiny_model("llama", tied)
    # Every layer sliced (profitable_only would leave the last two of this tiny model whole,
    # and a whole last layer hands the head nothing narrower).
    options = {"slicing_base": 0.05, "round_to": 8, "profitable_only": False}
    slice_in_memory(model, sparsity=0.25, slice_head=True, **options)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.use_cache is True
    spec = reloaded.config.slicing
    with torch.no_grad():
        out = reloaded(IDS, output_hidden_states=True)
    # The embedding output, then each layer's residual in its own width; the last is the
    # final norm's output, as in the base models.
    widths = [reloaded.model.embed_tokens.embedding_dim, *spec["attn_dims"][1:]]
    widths.append(spec["final_dim"])
    assert [h.shape[-1] for h in out.hidden_states] == widths
    torch.testing.assert_close(reloaded.lm_head(out.hidden_states[-1]), out.logits, atol=0, rtol=0)
    # Decoding token by token from the cache computes what the full forward does.
    prefix = IDS.shape[1] // 2
    with torch.no_grad():
        step = reloaded(IDS[:, :prefix], use_cache=True)
        cache, logits = step.past_key_values, [step.logits]
        for k in range(prefix, IDS.shape[1]):
            step = reloaded(IDS[:, k : k + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), out.logits, atol=1e-5, rtol=1e-5)


def test_reload_refuses_a_checkpoint_without_its_shortcuts(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama", False)
    slice_in_memory(model, sparsity=0.25, slicing_base=0.05, round_to=8)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    shortcut = next(name for name in tensors if "_shortcut." in name)
    del tensors[shortcut]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"no tensors for {shortcut.removesuffix('.weight')}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_reload_refuses_a_shortcut_its_config_does_not_declare(tmp_path):
    # Equal widths everywhere, so the edited config below is consistent on its own; before,
    # transformers dropped the stored matrix with a warning and the logits changed.
    model = tiny_model("llama", False, layers=3)
    slice_in_memory(model, layer_dims=[48, 48, 48], align_bases=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["slicing"]["attn_shortcuts"][1]
    config["slicing"]["attn_shortcuts"][1] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    match = r"holds model\.layers\.1\.attn_shortcut \(1 in all\).*does not declare"
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # Without the local pre-load check (a remote checkpoint has none), the load's own
    # report of unexpected tensors is refused the same way.
    with (
        mock.patch("dynslice_modifier.modeling.modeling_dynslice.stored_tensor_names") as names,
        pytest.raises(ValueError, match=match),
    ):
        names.return_value = None
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_reload_from_a_subfolder_and_a_variant(tmp_path):
    from safetensors.torch import save_file

    # A dense model at the top of the repository: the checks must read the sliced
    # checkpoint's files where from_pretrained does, not the root's.
    tiny_model("llama", False).save_pretrained(tmp_path)
    model = tiny_model("llama", False)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    model.save_pretrained(tmp_path / "sliced")
    model.save_pretrained(tmp_path / "variant", variant="v1")
    with torch.no_grad():
        expected = model(IDS).logits
    # Beside the variant, a plain file without shortcuts, which the variant's load never reads.
    save_file(
        {k: v for k, v in model.state_dict().items() if "_shortcut" not in k},
        tmp_path / "variant" / "model.safetensors",
        metadata={"format": "pt"},
    )
    for directory, kwargs in (
        (tmp_path, {"subfolder": "sliced"}),
        (tmp_path / "variant", {"variant": "v1"}),
    ):
        reloaded = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(IDS).logits, expected, atol=0, rtol=0)


def test_rotations_in_blocks_equal_one_product(monkeypatch):
    # Products are taken a block of rows (or columns) at a time so that no vocabulary-sized
    # float64 copy is made; blocks of 3 here stand in for blocks of 4096 on real models.
    from torch import nn

    from dynslice_modifier import rotate

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0][:, :5]
    scale = torch.rand(8, generator=g) + 0.5
    reader, writer = nn.Linear(8, 10, bias=False), nn.Linear(10, 8)
    table = nn.Embedding(10, 8)
    w_in, w_out, b_out, w_table = (
        t.detach().double() for t in (reader.weight, writer.weight, writer.bias, table.weight)
    )
    monkeypatch.setattr(rotate, "_BLOCK", 3)
    rotate.rotate_inputs([reader], basis, scale)
    rotate.rotate_output(writer, basis)
    rotate.rotate_embedding(table, basis)
    expected_in = ((w_in * scale.double()) @ basis).float()
    torch.testing.assert_close(reader.weight, expected_in, atol=0, rtol=0)
    torch.testing.assert_close(writer.weight, (basis.T @ w_out).float(), atol=0, rtol=0)
    torch.testing.assert_close(writer.bias, (b_out @ basis).float(), atol=0, rtol=0)
    torch.testing.assert_close(table.weight, (w_table @ basis).float(), atol=0, rtol=0)
    assert reader.in_features == writer.out_features == table.embedding_dim == 5


def test_rotation_products_run_where_the_basis_is():
    # A model kept in host memory is sliced with bases on the accelerator; the previous
    # layer's output projection and the embedding table are rotated after their layer has
    # gone back to the host, and must still be multiplied on the accelerator ("meta" stands
    # in for it: the product runs, and only the copy of its result back to the host fails).
    from torch import nn
    from torch.overrides import TorchFunctionMode

    from dynslice_modifier import rotate

    class Products(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.devices: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__"):
                self.devices += [a.device.type for a in args]
            return func(*args, **(kwargs or {}))

    basis = torch.eye(8, 5, dtype=torch.float64, device="meta")
    rotations = [
        lambda: rotate.rotate_inputs([nn.Linear(8, 10)], basis, torch.ones(8)),
        lambda: rotate.rotate_output(nn.Linear(10, 8), basis),
        lambda: rotate.rotate_embedding(nn.Embedding(10, 8), basis),
    ]
    for rotation in rotations:
        with Products() as products, pytest.raises(NotImplementedError, match="meta"):
            rotation()
        assert products.devices and set(products.devices) == {"meta"}


def test_redundancy_scores_are_recorded():
    # The paper's score, computed here by hand: the mean over real tokens of the cosine
    # between each decoder layer's own input and output.
    dense = tiny_model("mistral", True, layers=4)
    sums, tokens, real = torch.zeros(4, dtype=torch.float64), 0, None

    def record(i):
        def hook(_module, args, kwargs, output):
            a = (args[0] if args else kwargs["hidden_states"])[real].double()
            b = (output[0] if isinstance(output, tuple) else output)[real].double()
            sums[i] += ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum()

        return hook

    handles = [
        layer.register_forward_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(dense.model.layers)
    ]
    with torch.no_grad():
        for batch in calib_batches():
            real = batch["attention_mask"].bool()
            tokens += int(real.sum())
            dense(**batch)
    for handle in handles:
        handle.remove()
    model = tiny_model("mistral", True, layers=4)
    modifier = slice_in_memory(model, sparsity=0.25, slicing_base=0.05, round_to=8)
    scores = modifier.lr_scores
    assert scores == pytest.approx((sums / tokens).tolist(), abs=1e-6)
    assert model.config.slicing["lr_scores"] == scores
    dims = model.config.slicing["mlp_dims"]
    # The most redundant layer keeps the fewest dims.
    assert dims[scores.index(max(scores))] == min(dims)


def test_redundancy_scores_match_the_models_own_forward_with_sliding_window_layers():
    from dynslice_modifier.adapters import get_adapter
    from dynslice_modifier.calibration import capture_layer_inputs
    from dynslice_modifier.redundancy import RedundancyAccumulator, redundancy_scores

    # Layer 0 full attention, the rest sliding: each type has its own mask.
    model = tiny_model(
        "qwen2", True, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    batches = calib_batches()
    expected = [RedundancyAccumulator() for _ in layers]
    mask = None

    def record(idx):
        def hook(_module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            expected[idx].add(hidden, output[0] if isinstance(output, tuple) else output, mask)

        return hook

    handles = [
        layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()

    inputs = capture_layer_inputs(model, layers[0], batches)
    scores = redundancy_scores(layers, inputs, torch.device("cpu"))
    assert scores == pytest.approx([acc.score for acc in expected], abs=1e-6)


def test_hadamard_keeps_the_sliced_function_and_spreads_channels():
    plain, spread = tiny_model("llama", True), tiny_model("llama", True)
    # Unaligned bases are in PCA order, the first channels holding the most energy, which
    # Hadamard blocks average out (exactly, on the calibration data).
    options = {
        "sparsity": 0.25,
        "slicing_base": 0.1,
        "round_to": 8,
        "profitable_only": False,
        "align_bases": False,
    }
    slice_in_memory(plain, **options, hadamard=False)
    slice_in_memory(spread, **options, hadamard=True)

    def logits_and_peak_to_mean(model) -> tuple[torch.Tensor, float]:
        """Summed over layers: the largest channel energy of the residual stream a layer
        reads, over the mean channel's."""
        energies = []
        hooks = [
            layer.input_layernorm.register_forward_pre_hook(
                lambda _, args: energies.append(args[0].pow(2).flatten(0, -2).mean(0))
            )
            for layer in model.model.layers
        ]
        with torch.no_grad():
            logits = model(IDS).logits
        for hook in hooks:
            hook.remove()
        return logits, sum(float(e.max() / e.mean()) for e in energies)

    spread_logits, spread_peak = logits_and_peak_to_mean(spread)
    plain_logits, plain_peak = logits_and_peak_to_mean(plain)
    torch.testing.assert_close(spread_logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert spread_peak < 0.95 * plain_peak
    assert spread.config.slicing["hadamard"] is True


@pytest.mark.parametrize("hadamard", [False, True])
def test_aligned_bases_keep_the_function_and_make_shortcuts_small(hadamard):
    plain, aligned = tiny_model("llama", True, layers=4), tiny_model("llama", True, layers=4)
    options = {"layer_dims": [48, 40, 40, 48], "hadamard": hadamard}
    slice_in_memory(plain, **options, align_bases=False)
    slice_in_memory(aligned, **options, align_bases=True)
    with torch.no_grad():
        torch.testing.assert_close(aligned(IDS).logits, plain(IDS).logits, atol=1e-4, rtol=1e-4)
    assert plain.config.slicing["delta_shortcuts"] is False
    assert plain.config.slicing["format_version"] == 1  # readable by plugins before 3
    # The input projection and the last shortcut join the original basis, which no
    # alignment reaches: general rotations, stored whole (a delta would be larger).
    interior = [f"{i}.attn_shortcut" for i in range(4)] + [f"{i}.mlp_shortcut" for i in range(3)]
    assert sorted(aligned.config.slicing["delta_shortcuts"]) == sorted(interior)
    assert aligned.config.slicing["format_version"] == 5
    layers = aligned.model.layers
    for whole in (layers[0].input_projection.weight, layers[3].mlp_shortcut.weight):
        # A rotation cut to 48 dims: norm sqrt(48) as stored, about sqrt(96) as a delta.
        assert float(whole.norm()) == pytest.approx(48**0.5, rel=1e-4)

    def stored(model):
        # Shortcuts between sliced bases (not the input projection or the last one, which
        # map to and from the original basis).
        layers = model.model.layers
        return [layers[i].attn_shortcut.weight for i in range(4)] + [
            layers[i].mlp_shortcut.weight for i in range(3)
        ]

    for before, after in zip(stored(plain), stored(aligned), strict=True):
        # The aligned shortcut is E + delta; its delta is small next to the matrix itself.
        assert after.norm() < 0.5 * before.norm()
        e = torch.eye(*before.shape)
        restored = after + e
        # Aligning rotates each basis within its span, which leaves a shortcut's singular
        # values as they were (a norm alone would let many wrong deltas through).
        torch.testing.assert_close(
            torch.linalg.svdvals(restored), torch.linalg.svdvals(before), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize(("width", "previous"), [(24, 32), (32, 32), (40, 32)])
def test_align_basis_is_a_stable_rotation_within_the_span(width, previous):
    from dynslice_modifier.rotate import align_basis

    gen = torch.Generator().manual_seed(width)

    def orthonormal(cols):
        return torch.linalg.qr(torch.randn(64, cols, generator=gen, dtype=torch.float64))[0]

    basis, prev = orthonormal(width), orthonormal(previous)
    aligned = align_basis(basis, prev)
    torch.testing.assert_close(aligned.T @ aligned, torch.eye(width, dtype=torch.float64))
    # Same span: projecting onto the original basis changes nothing.
    torch.testing.assert_close(basis @ (basis.T @ aligned), aligned)
    # Closer to the rectangular identity than the unaligned change of basis.
    e = torch.eye(previous, width, dtype=torch.float64)
    assert (prev.T @ aligned - e).norm() < (prev.T @ basis - e).norm()
    # Unique, so rounding-level input differences (ranks summing in another order) stay
    # rounding-level, including the coordinates a wider basis adds.
    nudged = torch.linalg.qr(basis + 1e-12 * torch.randn(basis.shape, generator=gen).double())[0]
    nudged = nudged * torch.sign(torch.diagonal(nudged.T @ basis))
    torch.testing.assert_close(align_basis(nudged, prev), aligned, atol=1e-9, rtol=0)


def test_align_basis_stays_a_rotation_where_followed_and_trailing_coordinates_meet():
    from dynslice_modifier.rotate import align_basis

    # The previous basis keeps the new basis's first and last direction, so the coordinate
    # that follows it is also one of the trailing coordinates the completion starts from.
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=gen, dtype=torch.float64))[0]
    aligned = align_basis(basis, basis[:, [0, 3]])
    torch.testing.assert_close(aligned.T @ aligned, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(basis @ (basis.T @ aligned), aligned)
    torch.testing.assert_close(aligned[:, :2], basis[:, [0, 3]])


@pytest.mark.parametrize("normalization", ["minmax", "rank"])
def test_widths_follow_the_allocation_of_the_recorded_scores(normalization):
    from dynslice_modifier.allocation import allocate_dims

    model = tiny_model("llama", True, layers=6)
    modifier = slice_in_memory(
        model,
        sparsity=0.3,
        slicing_base=0.05,
        round_to=4,
        normalization=normalization,
        profitable_only=False,
        rounding="mean",
    )
    expected = allocate_dims(modifier.lr_scores, 64, 0.3, 0.05, 4, normalization)
    assert model.config.slicing["attn_dims"] == expected
    assert model.config.slicing["normalization"] == normalization


def _input_spectra(model) -> list[list[float]]:
    """Eigenvalues, descending, of each decoder layer input's second moment over the real
    calibration tokens, by hooks on the unmodified model's own forward."""
    sums = [torch.zeros(64, 64, dtype=torch.float64) for _ in model.model.layers]
    real = None

    def record(i):
        def hook(_module, args):
            x = args[0][real].double()
            sums[i] += x.T @ x

        return hook

    handles = [
        layer.input_layernorm.register_forward_pre_hook(record(i))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for batch in calib_batches():
            real = batch["attention_mask"].bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    return [torch.linalg.eigvalsh(m).flip(0).tolist() for m in sums]


# Unset, dynamic widths are rounded by spectrum too.
@pytest.mark.parametrize("rounding", [{"rounding": "spectrum"}, {}], ids=["spectrum", "unset"])
def test_spectrum_rounding_reads_the_spectra_of_the_unsliced_layer_inputs(rounding):
    from dynslice_modifier.allocation import allocate_dims

    spectra = _input_spectra(tiny_model("llama", True, layers=6))
    model = tiny_model("llama", True, layers=6)
    options = {"sparsity": 0.3, "slicing_base": 0.05, "round_to": 16, "profitable_only": False}
    modifier = slice_in_memory(model, **rounding, **options)
    scores = modifier.lr_scores
    expected = allocate_dims(scores, 64, 0.3, 0.05, 16, rounding="spectrum", spectra=spectra)
    assert model.config.slicing["attn_dims"] == expected
    assert model.config.slicing["rounding"] == "spectrum"
    # Otherwise the test could not tell the two roundings apart.
    assert expected != allocate_dims(scores, 64, 0.3, 0.05, 16)


def test_a_layer_left_whole_below_full_width_gives_its_rounding_step_to_another():
    from dynslice_modifier.allocation import allocate_dims

    spectra = _input_spectra(tiny_model("llama", True, layers=6))
    model = tiny_model("llama", True, layers=6)
    modifier = slice_in_memory(model, sparsity=0.25, slicing_base=0.05, round_to=16)
    args = (modifier.lr_scores, 64, 0.25, 0.05, 16, "minmax", "spectrum", spectra)
    once = allocate_dims(*args)
    whole = model.config.slicing["whole_layers"]
    pinned = [layer in whole and width < 64 for layer, width in enumerate(once)]
    assert any(pinned)  # otherwise the test could not tell
    dims = model.config.slicing["attn_dims"]
    assert dims == allocate_dims(*args, whole=pinned)
    assert sum(dims) == sum(64 if layer in whole else w for layer, w in enumerate(once)) + 16


def test_spectrum_rounding_runs_the_dense_pass_for_given_scores_and_constant_slicing():
    from dynslice_modifier.allocation import allocate_dims

    spectra = _input_spectra(tiny_model("llama", True))
    # Every layer's target is 48: steps of 32 round two layers one way and one the other.
    constant = tiny_model("llama", True)
    slice_in_memory(constant, sparsity=0.25, slicing_base=0.25, round_to=32, rounding="spectrum")
    widths = allocate_dims([1.0] * 3, 64, 0.25, 0.25, 32, rounding="spectrum", spectra=spectra)
    assert constant.config.slicing["attn_dims"] == widths
    assert sorted(widths) == [32, 64, 64]
    given = tiny_model("llama", True)
    scores = [0.2, 0.5, 0.9]
    slice_in_memory(
        given,
        sparsity=0.25,
        slicing_base=0.05,
        round_to=32,
        rounding="spectrum",
        layer_scores=scores,
        profitable_only=False,
    )
    widths = allocate_dims(scores, 64, 0.25, 0.05, 32, rounding="spectrum", spectra=spectra)
    assert given.config.slicing["attn_dims"] == widths


def test_unset_rounding_is_mean_where_spectrum_would_cost_a_pass_or_break_one_width():
    from dynslice_modifier.allocation import allocate_dims

    # A target of 44.8 at steps of 32: spectrum would round two layers one way, one the
    # other. (At SP 0.25, a target of 48, every width would round back to 64: refused.)
    options = {"sparsity": 0.25, "round_to": 32, "profitable_only": False}
    constant = tiny_model("llama", True)
    slice_in_memory(constant, **options | {"sparsity": 0.3, "slicing_base": 0.3})
    assert constant.config.slicing["attn_dims"] == [32, 32, 32]
    assert constant.config.slicing["rounding"] == "mean"

    scores = [0.2, 0.5, 0.9]
    given = tiny_model("llama", True)
    modifier = slice_in_memory(given, slicing_base=0.05, layer_scores=scores, **options)
    assert modifier.summary["lr_seconds"] == 0.0  # no pass over the unsliced model
    assert given.config.slicing["attn_dims"] == allocate_dims(scores, 64, 0.25, 0.05, 32)
    assert given.config.slicing["rounding"] == "mean"

    # slicing_base 1 is capped at the solved SP: constant slicing, with no pass for scores.
    sized = tiny_model("llama", True)
    modifier = slice_in_memory(
        sized, target_params=0.1, slicing_base=1.0, round_to=32, profitable_only=False
    )
    assert modifier.summary["lr_seconds"] == 0.0 and modifier.lr_scores is None
    assert len(set(sized.config.slicing["attn_dims"])) == 1
    assert sized.config.slicing["rounding"] == "mean"

    explicit = tiny_model("llama", True)
    slice_in_memory(explicit, layer_dims=[40, 64, 24])
    # The user's widths, rounded to nothing: no step is claimed for them.
    assert explicit.config.slicing["rounding"] is None
    assert explicit.config.slicing["round_to"] is None
    assert explicit.config.slicing["attn_dims"] == [40, 64, 24]


def test_constant_slicing_skips_the_redundancy_pass():
    model = tiny_model("llama", True)
    modifier = slice_in_memory(model, sparsity=0.25, slicing_base=0.25, profitable_only=False)
    assert modifier.lr_scores is None
    assert model.config.slicing["attn_dims"] == [48] * 3


def test_untie_embeddings_slices_the_table_into_layer_0s_basis(tmp_path):
    model = tiny_model("llama", True)
    with torch.no_grad():
        reference = model(IDS).logits
    slice_in_memory(model, sparsity=0.0, untie_embeddings=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=2e-5, rtol=1e-5)

    model = tiny_model("llama", True)
    slice_in_memory(model, layer_dims=[48, 32, 48], untie_embeddings=True, profitable_only=False)
    spec = model.config.slicing
    assert not model.config.tie_word_embeddings
    assert model.model.embed_tokens.weight.shape == (128, 48)
    assert model.lm_head.weight.shape == (128, 64)
    assert model.model.layers[0].input_projection is None
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    assert count_parameters(reloaded) == spec["parameters"]["sliced"]


def test_a_sliced_model_pickles_and_deep_copies():
    import copy
    import pickle

    model = tiny_model("llama", True)
    slice_in_memory(model, layer_dims=[48, 32, 48])
    clone = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for other in (clone, twin):
            torch.testing.assert_close(other(IDS).logits, model(IDS).logits, atol=0, rtol=0)
            # Each copy reports its own layers' states (the hook is not pickled, but put
            # back), once per layer.
            states = other(IDS, output_hidden_states=True).hidden_states
            assert [s.shape[-1] for s in states] == [64, 32, 48, 64]


def test_the_summary_reports_the_mean_slice_realised():
    model = tiny_model("llama", True, layers=4)
    modifier = slice_in_memory(model, sparsity=0.2, slicing_base=0.0, basis="layer")
    realised = mean_slice(model.config.slicing["attn_dims"], 64)
    assert model.config.slicing["whole_layers"] and realised < 0.2
    assert modifier.summary["mean_slice"] == pytest.approx(realised)


def test_a_scaled_post_attention_norm_is_no_unit_norm():
    model = tiny_model("llama", True)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    assert model.has_unit_norms() is True
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(2.0)
    assert model.has_unit_norms() is False
    assert model.record_unit_norms() is False and model.config.slicing["unit_norms"] is False


def test_unit_norms_are_read_from_the_tensors_a_save_writes(tmp_path):
    # Trainer saves a fine-tuned model through state_dict (DeepSpeed ZeRO-3's gathered
    # weights, the parameters being empty outside a gather): the flag that vLLM's fused
    # shortcuts trust must describe those tensors, not the live parameters.
    model = tiny_model("llama", True)
    slice_in_memory(model, sparsity=0.25, round_to=8)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["model.layers.2.input_layernorm.weight"].mul_(1.5)
    model.save_pretrained(tmp_path, state_dict=state)
    assert model.has_unit_norms() is True
    assert json.loads((tmp_path / "config.json").read_text())["slicing"]["unit_norms"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.has_unit_norms() is False
    # A weight that cannot be read here leaves the recorded flag as it is.
    model.model.layers[0].input_layernorm.weight = torch.nn.Parameter(torch.empty(0))
    assert model.has_unit_norms() is None
