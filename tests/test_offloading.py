"""Big models: a layer offloaded by compressed-tensors (a ``device_map`` load,
llm-compressor's sequential onloading) is fetched once per pass, onto the compute device; what
the slicer adds is offloaded like the rest; shortcuts wait in host memory in the model's
dtype."""

from __future__ import annotations

import collections

import pytest
import torch
from compressed_tensors.offload import disable_onloading, get_offloaded_device, set_onload_device
from compressed_tensors.offload.cache import OffloadCache
from compressed_tensors.offload.cache.cpu import CPUCache
from tiny import calib_batches, tiny_model
from torch.overrides import TorchFunctionMode

from dynslice_modifier import rotate
from dynslice_modifier.adapters import get_adapter
from dynslice_modifier.calibration import capture_layer_inputs
from dynslice_modifier.conversion import convert_to_sliced
from dynslice_modifier.redundancy import redundancy_scores
from dynslice_modifier.slicer import RotateAndSlice

CPU, META = torch.device("cpu"), torch.device("meta")
DIMS = [48, 40, 56]


@pytest.fixture
def onloads(monkeypatch) -> collections.Counter:
    """Every tensor fetched from an offload cache, counted by the cache's onload."""
    counts: collections.Counter = collections.Counter()
    fetch = CPUCache.onload

    def counted(self, tensor):
        counts["tensors"] += 1
        return fetch(self, tensor)

    monkeypatch.setattr(CPUCache, "onload", counted)
    return counts


def passes(batches: int, onloads: collections.Counter, **options) -> tuple[int, int]:
    """Tensors fetched by the Layer Redundancy pass and by the slicing pass."""
    model = tiny_model("llama", tied=False)
    adapter = get_adapter(model)
    data = calib_batches(n=batches)
    dims = options.pop("dims", DIMS)
    set_onload_device(model, CPU)
    counts = []
    for run in (
        lambda inputs: redundancy_scores(adapter.layers(model), inputs, CPU),
        lambda inputs: RotateAndSlice(model, adapter, dims, CPU, **options).run(inputs),
    ):
        inputs = capture_layer_inputs(model, adapter.layers(model)[0], data)
        onloads.clear()
        run(inputs)
        counts.append(onloads["tensors"])
    return counts[0], counts[1]


def test_an_offloaded_layer_is_fetched_once_per_pass_not_once_per_batch(onloads):
    # Fetched at every access, an offloaded layer would cross from host (or disk) to the
    # accelerator once per calibration batch: the model as many times as there are batches.
    few, many = passes(2, onloads), passes(8, onloads)
    assert few[0] > 0 and few[1] > 0
    assert many == few


def test_a_shared_basis_fetches_its_block_once_more_per_pass_not_per_batch(onloads):
    # Layers 0 and 1 share a basis (one width, layers_per_basis 2). Its PCA reads layer 1's
    # MLP input, unsliced, before layer 0 is sliced: layer 1's norm and attention, which
    # compute it, are fetched once more in the slicing pass, and still not once per batch.
    shared = {"dims": [48, 48, 56], "basis": "layer"}
    alone = passes(2, onloads, **shared)
    few, many = (passes(n, onloads, **shared, layers_per_basis=2) for n in (2, 8))
    assert many == few
    layer = tiny_model("llama", tied=False).model.layers[1]
    attention_half = [*layer.input_layernorm.parameters(), *layer.self_attn.parameters()]
    assert few[1] == alone[1] + len(attention_half)


def test_layers_onloaded_elsewhere_compute_on_the_compute_device():
    # A multi-GPU device map onloads each layer to its own GPU, while the slicer computes on
    # one; "meta" stands in for the other GPU: any weight read there would have no values.
    model = tiny_model("llama", tied=False)
    adapter = get_adapter(model)
    data = calib_batches()
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], data)
    expected = redundancy_scores(adapter.layers(model), inputs, CPU)
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], data)
    set_onload_device(model, META)
    assert redundancy_scores(adapter.layers(model), inputs, CPU) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("slice_head", [False, True])
def test_the_sliced_model_keeps_its_new_weights_where_the_layers_store_theirs(slice_head):
    # Built where an offloaded layer fetches its weights (the accelerator), the shortcuts of
    # every layer (and a sliced head's new final norm) would stay there through the rest of
    # the recipe; "meta" stands in for it.
    data = calib_batches()
    logits = []
    for offloaded in (False, True):
        model = tiny_model("llama", tied=False)
        adapter = get_adapter(model)
        inputs = capture_layer_inputs(model, adapter.layers(model)[0], data)
        if offloaded:
            set_onload_device(model, CPU)
        result = RotateAndSlice(model, adapter, DIMS, CPU, slice_head=slice_head).run(inputs)
        assert (result.final_dim is not None) == slice_head
        if offloaded:
            for module in model.modules():
                if isinstance(module._parameters, OffloadCache):
                    module._parameters.onload_device = module._buffers.onload_device = META
        convert_to_sliced(model, adapter, result, {})
        if offloaded:
            for name, module in model.named_modules():
                if next(module.parameters(recurse=False), None) is not None:
                    assert isinstance(module._parameters, OffloadCache), name
                    assert get_offloaded_device(module) == CPU, name
            # Trainable as stored: a fetched copy never requires grad.
            with disable_onloading():
                assert all(p.requires_grad for p in model.parameters())
            set_onload_device(model, CPU)
        with torch.no_grad():
            logits.append(model(data[0]["input_ids"]).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_shortcuts_wait_for_the_conversion_in_host_memory_in_the_models_dtype():
    # Every layer's shortcuts are held until the model is converted; in float64 they would
    # take four times what a 16-bit model stores of them.
    model = tiny_model("llama", tied=False).to(torch.bfloat16)
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], calib_batches())
    result = RotateAndSlice(model, adapter, DIMS, CPU, align=True).run(inputs)
    kept = [s for idx in range(len(DIMS)) for _, s in result.changes_of_basis(idx)]
    assert kept
    assert all(s.matrix.dtype == torch.bfloat16 and s.matrix.device == CPU for s in kept)


def test_a_table_in_host_memory_goes_to_the_compute_device_a_block_at_a_time(monkeypatch):
    # Moved whole, the accelerator would hold the table and its rotated copy beside a layer.
    import dynslice_modifier.slicer

    model = tiny_model("llama", tied=False)
    adapter = get_adapter(model)
    fetch, moved = dynslice_modifier.slicer.onloaded, []

    def record(module, device):
        moved.append(module)
        return fetch(module, device)

    # Each block is converted to float64 on its way to the compute device: watched there,
    # with blocks of 32 rows, the 128-row table must go as four of them and never whole.
    converted: list[tuple[int, ...]] = []

    class Conversions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to and torch.float64 in (*args[1:], *kwargs.values()):
                converted.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    rotate_embedding = dynslice_modifier.slicer.rotate_embedding

    def watched(embedding, basis):
        with Conversions():
            rotate_embedding(embedding, basis)

    monkeypatch.setattr(dynslice_modifier.slicer, "onloaded", record)
    monkeypatch.setattr(dynslice_modifier.slicer, "rotate_embedding", watched)
    monkeypatch.setattr(rotate, "_BLOCK", 32)
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], calib_batches())
    before = adapter.embedding(model).weight.clone()
    RotateAndSlice(model, adapter, DIMS, CPU).run(inputs)
    assert not any(module is adapter.embedding(model) for module in moved)
    table = tuple(before.shape)
    assert converted.count((32, table[1])) == table[0] // 32 and table not in converted
    assert adapter.embedding(model).weight.shape[1] == DIMS[0] < before.shape[1]
