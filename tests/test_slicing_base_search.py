"""``slicing_base: auto``: trials leave the model alone and predict the sliced model's loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import logged
from tiny import VOCAB, calib_batches, tiny_model

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.adapters import get_adapter
from dynslice_modifier.calibration import LayerInputs, capture_layer_inputs
from dynslice_modifier.conversion import convert_to_sliced
from dynslice_modifier.errors import AllocationError, CalibrationError
from dynslice_modifier.redundancy import redundancy_scores
from dynslice_modifier.slicer import RotateAndSlice
from dynslice_modifier.slicing_base_search import (
    heldout_batches,
    heldout_nll,
    search_slicing_base,
)

CPU = torch.device("cpu")


def sliced_loss(model, batches) -> float:
    """Next-token loss of ``batches`` through the model itself (padding excluded)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            labels = ids[:, 1:].masked_fill(~(mask[:, 1:] & mask[:, :-1]), -100)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((labels != -100).sum())
    return total / count


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("basis", ["sublayer", "layer"])
@pytest.mark.parametrize("tied", [True, False])
def test_trial_leaves_the_model_and_predicts_the_sliced_loss(tied, basis, slice_head):
    check_trial_prediction(tiny_model("llama", tied), tied, basis, slice_head)


@pytest.mark.parametrize("basis", ["sublayer", "layer"])
def test_trial_predicts_the_loss_of_a_model_with_sliding_window_layers(basis):
    # transformers gives sliding-window layers a mask of their own: calibration that
    # replayed the first (full-attention) layer's mask would predict another loss.
    model = tiny_model(
        "qwen2", True, use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    assert model.config.layer_types[0] != model.config.layer_types[1]
    check_trial_prediction(model, True, basis, slice_head=True)


def check_trial_prediction(model, tied: bool, basis: str, slice_head: bool) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    batches = calib_batches(n=6)
    dims = [48, 40, 56]

    inputs = capture_layer_inputs(model, layers[0], batches)
    heldout = heldout_batches(inputs.keys, 1 / 3)
    trial = RotateAndSlice(
        model, adapter, dims, CPU, basis, keep_tied=tied, in_place=False, slice_head=slice_head
    )
    trial.run(inputs, heldout)
    predicted = heldout_nll(model, adapter, inputs, heldout, CPU)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name

    # Slice for real with the same PCA data; the held-out batches through the sliced model
    # must give the loss the trial predicted.
    order = [b["input_ids"] for b in batches]
    inputs = capture_layer_inputs(model, layers[0], batches)
    held = [
        next(b for b, ids in zip(batches, order, strict=True) if torch.equal(ids, inputs.ids[i]))
        for i in sorted(heldout)
    ]
    real = RotateAndSlice(model, adapter, dims, CPU, basis, keep_tied=tied, slice_head=slice_head)
    result = real.run(inputs, heldout)
    assert result.final_dim == (dims[-1] if slice_head else None)
    convert_to_sliced(model, adapter, result, {"sparsity": 0.2, "slicing_base": 0.1})
    assert sliced_loss(model, held) == pytest.approx(predicted, rel=1e-5)


def test_auto_picks_the_lowest_heldout_loss_and_records_the_search():
    # The scores and spectra of auto come from the tokens the search does not hold out, so
    # the run given its SB outright below reads auto's scores, and both round by mean.
    options = {"sparsity": 0.25, "round_to": 4, "rounding": "mean"}
    model = tiny_model("qwen2", True)
    modifier = DynamicSliceModifier(slicing_base="auto", **options)
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches(n=8)))
    assert modifier.on_initialize(state)
    search = model.config.slicing["slicing_base_search"]
    assert [t["slicing_base"] for t in search] == pytest.approx([0.0, 0.0625, 0.125, 0.1875])
    chosen = [t for t in search if t["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["heldout_nll"] == min(t["heldout_nll"] for t in search)
    assert all(math.isfinite(t["heldout_nll"]) for t in search)
    assert model.config.slicing["slicing_base"] == chosen[0]["slicing_base"]
    assert model.config.slicing["lr_scores"] == modifier.lr_scores
    # The search leaves no trace in the real pass: the model is the one the chosen SB
    # builds when given outright (which test_slicing's reference pins to all the data).
    explicit = tiny_model("qwen2", True)
    given = DynamicSliceModifier(
        slicing_base=chosen[0]["slicing_base"], layer_scores=modifier.lr_scores, **options
    )
    given.on_initialize(SimpleNamespace(model=explicit, data=state.data))
    assert explicit.config.slicing["attn_dims"] == model.config.slicing["attn_dims"]
    for (name, tensor), (_, same) in zip(
        model.state_dict().items(), explicit.state_dict().items(), strict=True
    ):
        assert torch.equal(tensor, same), name


def test_a_tie_goes_to_the_larger_slicing_base_and_the_log_says_so():
    dims = {0.0: [48, 32], 0.25: [40, 40], 0.5: [40, 40]}

    def plan(fraction: float) -> SimpleNamespace:
        return SimpleNamespace(
            sparsity=0.25, slicing_base=0.25 * fraction, dims=dims[fraction], whole=[False] * 2
        )

    trials_run = []

    def trial(layout: SimpleNamespace) -> float:
        trials_run.append(layout.dims)
        return {(48, 32): 3.0, (40, 40): 2.5}[tuple(layout.dims)]

    with logged("INFO") as records:
        best, trials = search_slicing_base(dims, plan, trial, 64)
    assert best.fraction == 0.5 and len(trials) == 3 and len(trials_run) == 2
    picked = [m for _, m in records if "auto picked" in m]
    assert picked == [
        "slicing_base: auto picked SB 0.1250 (0.50 x SP), the largest of 2 with the same widths"
    ]


def test_a_candidate_that_leaves_every_layer_whole_is_no_candidate():
    # The dense model has the lowest loss of all, and slices nothing.
    whole = {0.0: [False, True], 0.5: [True, True]}

    def plan(fraction: float) -> SimpleNamespace:
        dims = [48 if not w else 64 for w in whole[fraction]]
        return SimpleNamespace(
            sparsity=0.25, slicing_base=0.25 * fraction, dims=dims, whole=whole[fraction]
        )

    def trial(layout: SimpleNamespace) -> float:
        return 1.0 if all(layout.whole) else 2.0

    best, trials = search_slicing_base(whole, plan, trial, 64)
    assert best.fraction == 0.0 and [t.fraction for t in trials] == [0.0]
    with pytest.raises(AllocationError, match="auto found no candidate that slices a layer"):
        search_slicing_base([0.5], plan, trial, 64)


def test_a_candidate_that_rounds_every_width_back_to_full_is_no_candidate():
    # At a small SP, SB = SP rounds every width back to 64 (profitable_only off): a rotated
    # dense model, whose loss would win, and which the run would then refuse.
    dims = {0.0: [56, 64, 64], 1.0: [64, 64, 64]}

    def plan(fraction: float) -> SimpleNamespace:
        return SimpleNamespace(
            sparsity=0.03, slicing_base=0.03 * fraction, dims=dims[fraction], whole=[False] * 3
        )

    best, trials = search_slicing_base(dims, plan, lambda layout: sum(layout.dims) / 100, 64)
    assert best.fraction == 0.0 and [t.fraction for t in trials] == [0.0]


def test_auto_with_given_scores_holds_one_set_of_activations_at_a_time(monkeypatch):
    # Given layer_scores, no Layer Redundancy pass spends the first capture; held through
    # the search, it would sit beside every trial's own and double host memory.
    import dynslice_modifier.modifier

    capture, captured = dynslice_modifier.modifier.capture_layer_inputs, []

    def recorded(*args, **kwargs):
        assert all(len(earlier.hidden) == 0 for earlier in captured[:1])
        captured.append(capture(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(dynslice_modifier.modifier, "capture_layer_inputs", recorded)
    model = tiny_model("llama", True)
    modifier = DynamicSliceModifier(
        sparsity=0.25, slicing_base="auto", round_to=4, layer_scores=[0.9, 0.5, 0.7]
    )
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches(n=8)))
    assert modifier.on_initialize(state)
    assert len(captured) > 2  # the first, one per trial, and the real pass
    assert model.config.slicing["lr_scores"] == [0.9, 0.5, 0.7]


def test_a_trial_fits_its_bases_without_the_heldout_batches():
    model = tiny_model("llama", True)
    adapter = get_adapter(model)
    batches = calib_batches(n=6)
    keys = capture_layer_inputs(model, adapter.layers(model)[0], batches).keys
    heldout = heldout_batches(keys, 1 / 3)

    def trial_shortcuts(noise: bool) -> list[torch.Tensor]:
        inputs = capture_layer_inputs(model, adapter.layers(model)[0], batches)
        if noise:
            for b in heldout:
                inputs.hidden[b] = 10 * torch.randn_like(inputs.hidden[b])
        trial = RotateAndSlice(model, adapter, [48, 40, 56], CPU, "sublayer", in_place=False)
        result = trial.run(inputs, heldout)
        return [s.matrix for s in result.attn_shortcuts + result.mlp_shortcuts if s is not None]

    # The shortcuts are products of consecutive bases, so they change with any basis.
    for clean, noisy in zip(trial_shortcuts(False), trial_shortcuts(True), strict=True):
        torch.testing.assert_close(noisy, clean, atol=0, rtol=0)


def test_auto_scores_layer_redundancy_without_the_heldout_batches():
    # The held-out batches judge the widths, so they must not have shaped them: scores
    # that ignore noise in place of the held-out activations are the ones auto used.
    model = tiny_model("llama", True)
    batches = calib_batches(n=8)
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], batches)
    heldout = heldout_batches(inputs.keys, 0.25)
    for b in heldout:
        inputs.hidden[b] = 10 * torch.randn_like(inputs.hidden[b])
    expected = redundancy_scores(adapter.layers(model), inputs, CPU, skip=heldout)
    modifier = DynamicSliceModifier(sparsity=0.25, slicing_base="auto", round_to=4)
    assert modifier.on_initialize(SimpleNamespace(model=model, data=SimpleNamespace(calib=batches)))
    assert modifier.lr_scores == pytest.approx(expected, rel=1e-12)


def test_a_trial_moves_only_its_copies_to_the_compute_device(monkeypatch):
    # A layer kept in host memory is copied there and the copy sent to the accelerator;
    # onloading the original as well would hold two copies of every layer there.
    import dynslice_modifier.slicer

    model = tiny_model("llama", True)
    adapter = get_adapter(model)
    originals = {id(m) for layer in adapter.layers(model) for m in layer.modules()}
    onloaded, moved = dynslice_modifier.slicer.onloaded, []

    def record(module, device):
        moved.append(id(module))
        return onloaded(module, device)

    # Moving an original with .to() would be the same mistake; on a CPU-only machine the
    # move is a no-op, so the call itself is what is watched.
    to, copies = torch.nn.Module.to, []

    def record_to(module, *args, **kwargs):
        moved.append(id(module))
        return to(module, *args, **kwargs)

    plain_copy = dynslice_modifier.slicer.plain_copy

    def record_copy(module):
        copies.append(id(module))
        return plain_copy(module)

    monkeypatch.setattr(dynslice_modifier.slicer, "onloaded", record)
    monkeypatch.setattr(dynslice_modifier.slicer, "plain_copy", record_copy)
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], calib_batches())
    monkeypatch.setattr(torch.nn.Module, "to", record_to)
    RotateAndSlice(model, adapter, [48, 40, 56], CPU, "sublayer", in_place=False).run(inputs)
    assert moved and not originals & set(moved)
    # Every layer was copied from its original, and each copy is what went to the device.
    assert copies and set(copies) <= originals


def test_auto_with_a_parameter_target_solves_sparsity_per_candidate():
    model = tiny_model("llama", False)
    # Nearest rounding makes each candidate's widths, and so its solved SP, differ; mean
    # rounding would land both on the same sum of widths.
    modifier = DynamicSliceModifier(
        target_params=0.1,
        slicing_base="auto",
        auto_fractions=[0.0, 0.5],
        round_to=4,
        rounding="nearest",
    )
    state = SimpleNamespace(model=model, data=SimpleNamespace(calib=calib_batches(n=8)))
    modifier.on_initialize(state)
    search = model.config.slicing["slicing_base_search"]
    assert len(search) == 2
    assert search[0]["slicing_base"] == 0.0
    assert search[1]["slicing_base"] == pytest.approx(0.5 * search[1]["sparsity"])
    assert search[0]["sparsity"] != search[1]["sparsity"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 0.0, "slicing_base": "auto"}, "needs sparsity > 0"),
        (
            {"sparsity": 0.2, "slicing_base": "auto", "auto_holdout": 1.0},
            r"auto_holdout must be in \(0, 1\), got 1.0",
        ),
        (
            {"sparsity": 0.2, "slicing_base": "auto", "auto_fractions": [1.5]},
            r"auto_fractions are fractions of SP in \[0, 1\], got \[1.5\]",
        ),
        # pydantic's own check of the field's type: a number, "auto" or nothing.
        ({"sparsity": 0.2, "slicing_base": "often"}, r"slicing_base[\s\S]*Input should be 'auto'"),
    ],
)
def test_bad_auto_options(options, message):
    with pytest.raises(ValueError, match=message):
        DynamicSliceModifier(**options)


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        (calib_batches(n=1, seq=64, pad=False), "at least 2 batches"),
        (calib_batches(n=4, seq=10, pad=False), "fits the PCA on 60 tokens"),
    ],
)
def test_auto_needs_enough_calibration(batches, message):
    state = SimpleNamespace(model=tiny_model(), data=SimpleNamespace(calib=batches))
    with pytest.raises(CalibrationError, match=message):
        DynamicSliceModifier(sparsity=0.25, slicing_base="auto").on_initialize(state)


def test_a_non_finite_heldout_loss_is_an_error_not_a_winner():
    # min() over (loss, -fraction) would pick a NaN loss whatever the other candidates
    # scored; a head that overflows (float16) gives one.
    model = tiny_model("llama", True)
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter.layers(model)[0], calib_batches())
    inputs.hidden[1] = torch.full_like(inputs.hidden[1], float("inf"))
    with pytest.raises(CalibrationError, match=r"held-out loss .* is not finite"):
        heldout_nll(model, adapter, inputs, [1], CPU)


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
    assert heldout_batches([bytes([i]) for i in range(8)], 0.25) == {6, 7}
    # Indices into the batches as given, whatever their order.
    assert heldout_batches([b"c", b"a", b"b"], 0.1) == {0}


class _RandomDraws:
    """Calibration batches drawn afresh on every read, as llm-compressor's default sampler
    (``RandomSampler(dataset, num_samples=...)``) draws another subset each time."""

    def __init__(self, batches: list[dict], draw: int) -> None:
        self.batches, self.draw, self.reads = batches, draw, 0

    def __iter__(self):
        self.reads += 1
        order = torch.randperm(
            len(self.batches), generator=torch.Generator().manual_seed(self.reads)
        )
        return iter([self.batches[i] for i in order[: self.draw]])


def test_every_pass_of_a_run_reads_the_same_calibration_batches():
    # Scores, spectra, the auto trials and the PCA: one subset, the one the config records.
    batches = calib_batches(n=12)
    calib = _RandomDraws(batches, draw=8)
    model = tiny_model("llama", True)
    modifier = DynamicSliceModifier(sparsity=0.25, slicing_base="auto", round_to=4)
    assert modifier.on_initialize(SimpleNamespace(model=model, data=SimpleNamespace(calib=calib)))
    assert calib.reads == 1
    assert model.config.slicing["calibration"]["batches"] == 8
