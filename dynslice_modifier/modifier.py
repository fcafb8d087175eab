"""``DynamicSliceModifier``: dynamic, layer-specific SliceGPT inside llm-compressor."""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from llmcompressor.utils.dev import get_main_device
from loguru import logger
from pydantic import PrivateAttr, ValidationInfo, field_validator, model_validator

from dynslice_modifier.adapters import changing_in_place, check_unquantized, get_adapter
from dynslice_modifier.adapters.base import ModelAdapter
from dynslice_modifier.allocation import (
    DEFAULT_ROUND_TO,
    Normalization,
    Rounding,
    check_explicit_dims,
    check_fractions,
    check_sparsity_fits,
    check_sparsity_slices,
    mean_slice,
)
from dynslice_modifier.budget import Basis, ParameterCounter, check_target_reachable
from dynslice_modifier.calibration import LayerInputs, capture_layer_inputs
from dynslice_modifier.conversion import convert_to_sliced
from dynslice_modifier.distributed import is_distributed, shared_across_ranks, sum_over_ranks
from dynslice_modifier.errors import AllocationError, CalibrationError
from dynslice_modifier.layout import Layout, LayoutPlanner
from dynslice_modifier.modeling.configuration_dynslice import INPUT_PROJECTION, SHORTCUTS
from dynslice_modifier.quantization import (
    check_dims_fit,
    check_input_projection,
    check_order,
    check_sequential_targets,
    check_unsliced_inputs,
    compress_shortcuts_as_linears,
    fit_round_to,
    input_projection_conflict,
    is_quantizer,
    quantized_shortcuts,
    recipe_modifiers,
    required_multiple,
    shortcut_probe,
    unmatched_warnings,
)
from dynslice_modifier.redundancy import dense_pass
from dynslice_modifier.rotate import fold_multipliers
from dynslice_modifier.slicer import (
    RotateAndSlice,
    SlicingResult,
    count_parameters,
    embeddings_tied,
    untie_head,
)
from dynslice_modifier.slicing_base_search import (
    DEFAULT_FRACTIONS,
    heldout_batches,
    heldout_nll,
    search_slicing_base,
)

__all__ = ["DynamicSliceModifier"]

AUTO_HOLDOUT = 0.25


@dataclass
class _Run:
    """What ``on_initialize`` settles from the model and the recipe before calibrating."""

    adapter: ModelAdapter
    layers: torch.nn.ModuleList
    layer_names: list[str]
    others: list[Modifier]  # the recipe's modifiers, the slicer among them
    device: torch.device  # where each layer is rotated and sliced
    dense_params: int
    tied: bool  # the model shares its embedding table with the head
    keep_tied: bool  # and slicing keeps it shared (``_settle_tie`` may still keep it so)
    explicit: list[int] | None  # layer_dims, checked
    planner: LayoutPlanner
    # The dataloader's batches, read once: llm-compressor's default sampler
    # (shuffle_calibration_samples) draws another random subset on every read, and the
    # scores, the auto trials and the PCA must all see the same text.
    calib: list[Any]


def _input_projection(layer_names: list[str]) -> str:
    """Name of the shortcut through which a tied model's layer 0 reads the table."""
    return f"{layer_names[0]}.{INPUT_PROJECTION}"


def _compute_device() -> torch.device:
    device = get_main_device()
    if device.type == "mps":
        logger.warning(
            "MPS has no float64, which the PCA and the rotations need: slicing runs on "
            "the CPU (quantizers later in the recipe still use MPS)"
        )
        return torch.device("cpu")
    return device


class DynamicSliceModifier(Modifier):
    """
    Rotates a decoder-only model into the principal components of its residual stream
    and deletes the least important directions, layer by layer (SliceGPT), slicing layers
    that change their input the least the hardest (dynamic slicing, Dumitru et al. 2024).

    The whole transformation happens in ``on_initialize`` so that any modifier after it in
    the recipe (quantization, e.g. ``GPTQModifier``) initialises and calibrates on the
    sliced model. The model is converted in place to ``DynSliceForCausalLM``; saving it
    writes a checkpoint that ``AutoModelForCausalLM.from_pretrained`` reloads (with
    ``import dynslice_modifier`` or ``trust_remote_code=True``).

    Sample yaml:

    ```yaml
    slice_stage:
      slice_modifiers:
        DynamicSliceModifier:
          sparsity: 0.25
          slicing_base: 0.05   # or "auto": chosen on held-out calibration text
    ```

    Lifecycle:
        - on_initialize
            - check the model, the recipe and the options against each other, so that
              what cannot run is refused before any calibration is spent; fold scalar
              multipliers (Granite's) into the weights
            - capture calibration inputs of the first decoder layer
            - Layer Redundancy pass over the unmodified model (one layer on the device
              at a time) unless ``layer_scores`` or ``layer_dims`` are given, or
              slicing is constant (SB == SP; with ``target_params``, an SB that no
              solved SP can exceed), where scores change nothing; it also takes the
              spectrum of each layer's input for ``rounding: spectrum`` (which runs it
              whenever widths are allocated) and, with ``rounding`` unset, for dynamic
              widths
            - with ``slicing_base: auto``, slice copies of the layers once per candidate SB
              and keep the one with the lowest held-out calibration loss
            - allocate per-layer widths (``layout.LayoutPlanner``: rounded, unprofitable
              layers left whole, SP solved for ``target_params``)
            - rotate-and-slice pass, then conversion to ``DynSliceForCausalLM``
        - on_start, on_event, on_end: nothing (llm-compressor's defaults); the model is
          sliced before any later modifier calibrates, so there is no per-batch work
        - on_finalize (every modifier has calibrated by then; the first to finalize, before
          the save)
            - record in ``config.slicing`` whether the sliced norms are still ones (a
              smoothing modifier may have folded scales into them), have quantized
              shortcuts saved in their group's format, and count a head that a quantizer
              untied from the embedding table

    :param sparsity: SP, the mean fraction of residual-stream dimensions removed over
        layers, in [0, 1). 0 (the default) rotates without slicing (the model's function is
        unchanged).
    :param slicing_base: SB, the fraction every layer loses at least, in [0, sparsity]
        (with ``target_params``: in [0, 1], capped at the SP solved for).
        The rest of the budget is shared in proportion to each layer's normalised
        redundancy. ``slicing_base == sparsity`` is plain (constant) SliceGPT. Defaults
        to ``0.2 * sparsity``. ``auto`` holds out the last ``auto_holdout`` of the
        calibration batches and tries each SB in ``auto_fractions`` (times SP), reusing one
        redundancy pass; each try costs one slicing pass over the rest of the data.
    :param auto_fractions: candidate SBs for ``auto``, as fractions of SP in [0, 1].
        Default ``[0, 0.25, 0.5, 0.75]``.
    :param auto_holdout: fraction of calibration batches held out for ``auto``. Default 0.25.
    :param round_to: every kept width is a multiple of this (fast kernels want 16 or more;
        group-wise quantization wants its group size, int8 W8A8 16). Unset (default): 16,
        raised to what the recipe's quantizers need; a value that conflicts with them is
        an error. Explicit ``layer_dims`` are checked against it, never rounded.
    :param rounding: how widths become multiples of ``round_to``. ``mean`` rounds some
        layers down and some up, largest remainder first, so the realised mean slice is SP
        to within half a step *over all layers* and dynamic slicing is compared with
        SliceGPT at the size asked for; layers of equal width stay equal, so constant
        slicing keeps one width. ``spectrum`` keeps the mean slice too, but rounds up first
        the layers whose next step holds the largest share of their input's signal (the
        eigenvalues of each layer input's second moment, gathered in the Layer Redundancy
        pass, which then also runs for constant slicing and given ``layer_scores``, whose
        widths it no longer keeps equal); it pays most with coarse steps (SmolLM2 at SP
        0.25, SB 0.05, steps of 64: perplexity 51.4 against 59.6 with ``mean``,
        ``benchmarks/quantized.py``), and at steps of 16 it was 2.8-4.0% lower at every
        fixed SB of ``benchmarks/perplexity.py`` with every layer sliced, 1.7% with
        ``profitable_only`` (SB 0.05), and 1.2% with ``auto``. ``nearest`` rounds
        each layer on its own, which can miss SP by up to half a step (SmolLM2 at SP 0.25,
        SB 0.05: a realised slice of 0.241 with ``round_to: 16``, 0.215 with 64). Unset
        (default): ``spectrum`` where the Layer Redundancy pass scores the layers for
        dynamic widths (it takes the spectra too, for the cost of one covariance per
        layer), ``mean`` otherwise: constant slicing keeps one width, and given
        ``layer_scores`` no pass over the unsliced model runs. ``config.slicing.rounding``
        records the one used.
    :param layer_dims: explicit kept width per decoder layer; skips the redundancy pass
        and the allocation, so it is given without ``sparsity``, ``target_params``,
        ``slicing_base``, ``layer_scores``, ``rounding`` other than ``mean`` (which recipes
        saved by earlier versions write), and ``normalization`` other than its default.
    :param layer_scores: explicit redundancy score per decoder layer (e.g. from an earlier
        run); skips the redundancy pass.
    :param normalization: how scores become shares: ``minmax`` (the paper's, default) or
        ``rank`` (robust to one outlier layer).
    :param basis: ``sublayer`` (default; SliceGPT: one PCA basis for the attention input and one
        for the MLP input of every layer, two shortcut matrices per layer) or ``layer``
        (one basis per layer from both signals: one shortcut per layer).
    :param layers_per_basis: with ``basis: layer``, the layers of each block of this many,
        counted from layer 0 (0-1, 2-3, ... for 2), share one basis, from the PCA of all
        their signals, wherever they are sliced to the same width: the shortcuts between
        them go, with their weights and their GEMMs. A layer sliced to another width than
        its neighbour, or left whole, starts a basis of its own. Default 1 (a basis per
        layer). On SmolLM2 with the W8A8 recipe's settings, 2 removes 12 of its 30
        shortcuts for +2.5% perplexity at the same SP (+2.4% under W8A8); at equal size
        (``target_params: 0.1``) the weights saved widen the layers, and it scores 39.45
        against 42.10 (benchmarks/README.md, "Shared bases").
    :param hadamard: fold a block Hadamard rotation into every kept basis (free at inference:
        the function is unchanged) so quantizers after the slicer see spread-out channels, in
        the spirit of QuaRot/SpinQuant. Default false, chosen by measurement: with aligned
        bases (the default) on SmolLM2 at SP 0.25 it makes FP8 worse (58.8 against 57.0) and
        moves GPTQ little either way at the recipes' spectrum rounding
        (``recipes/slice_w4a16.yaml``'s settings 54.74 against 54.64,
        ``recipes/slice_w8a8.yaml``'s 54.72 against 54.79; at mean rounding from 1.5% better
        to 0.8% worse: benchmarks/README.md, "Slice + quantize"). Without aligned bases every PCA
        basis packs its layer's energy into its first channels, and there it matters (W4A16
        57.5 with it against 106.9). With aligned bases every layer takes the same blocks,
        the largest power of two (up to 256) dividing every sliced width; below 16 the
        modifier warns.
    :param align_bases: rotate each kept basis within its span to line up with the basis
        before it (orthogonal Procrustes; free at inference), so every shortcut matrix is
        nearly the identity, and store shortcuts as their difference from the identity
        (the layer adds the identity part back). Exact in float; what it buys is that a
        quantizer taking the shortcuts sees small numbers (see ``quantize_shortcuts``).
        The shortcuts into and out of the original basis (a layer left whole, a head read
        at full width) are general rotations, stored whole. Older plugins refuse such
        checkpoints with an upgrade message (slicing format 3, or 5 where some are stored
        whole). Default true.
    :param target_params: instead of ``sparsity``, the fraction of the model's parameters to
        remove (embedding, head and shortcut matrices included); the SP that meets it is
        solved for after scoring, with ``slicing_base`` (or its default) capped at that SP:
        ``slicing_base: 1.0`` is constant slicing, for which no scores are taken.
    :param profitable_only: leave a layer whole (full width, in the original basis, so no
        shortcut inside it) when slicing it would add more shortcut weights than it removes,
        judged on the exact parameter count of the result; a full-width layer that is only
        rotated is left whole too when that is no larger. A layer left whole where rounding
        had kept it narrower takes no rounding step: the widths are rounded again with it
        at its floor, so the step goes to another layer. Explicit ``layer_dims`` are never
        changed, ``sparsity: 0`` (the rotation alone) leaves every layer rotated, and no layer
        is left whole when ``hidden_size`` is not a multiple of the (effective)
        ``round_to``. Layers left whole lower the mean slice below ``sparsity`` (logged as a
        warning); a ``sparsity`` that would leave every layer whole is refused. Default
        true.
    :param quantize_shortcuts: let quantizers later in the recipe take the shortcut matrices
        (and layer 0's input projection): they are then built as linears, which their
        ``targets``/``ignore`` match like any other (``targets: Linear`` takes them all).
        Default false: they stay in model dtype, the most accurate choice, since they carry
        the residual stream. With ``align_bases`` the quantizer sees only their small
        difference from the identity, so taking them is cheap (SmolLM2 at SP 0.25, ``rounding:
        mean``: GPTQ W8A8 perplexity 55.71 against 55.65 kept, 14% smaller; under W4A16 at
        groups of 64, int8 shortcuts 64.61 against 63.70 kept, 17% smaller, 4-bit ones 63.22,
        19.5% smaller; benchmarks/results/quantized.md).
    :param untie_embeddings: for models with tied embeddings, untie them and slice the
        input table (SliceGPT's way). By default the table stays shared, in the original
        basis, and the model stays tied. A layer 0 left whole (``profitable_only``) reads
        the table unrotated, so then it stays shared unless the head is sliced.
    :param slice_head: slice the head too (SliceGPT's way): the last layer writes into one
        more PCA basis, of its own width, and the head reads only those columns, with the
        final norm's scale folded in. Default false: the last layer writes back at full
        width in the original basis, so a tied table stays tied. A tied model's head is
        untied to be sliced (a second table, ``vocab x width``), and its embedding table,
        no longer shared, is sliced as with ``untie_embeddings``. This pays off when the
        recipe quantizes the head anyway (llm-compressor unties it for that) or the model
        is untied to begin with; the head is then the largest single GEMM of a decode step
        that gets narrower (SmolLM2, W8A8 with an int8 head: benchmarks/README.md, "Decode
        speed in vLLM").
    """

    sparsity: float = 0.0
    slicing_base: float | Literal["auto"] | None = None
    auto_fractions: list[float] | None = None
    auto_holdout: float = AUTO_HOLDOUT
    round_to: int | None = None
    rounding: Rounding | None = None
    layer_dims: list[int] | None = None
    layer_scores: list[float] | None = None
    normalization: Normalization = "minmax"
    basis: Basis = "sublayer"
    layers_per_basis: int = 1
    untie_embeddings: bool = False
    target_params: float | None = None
    hadamard: bool = False
    align_bases: bool = True
    profitable_only: bool = True
    quantize_shortcuts: bool = False
    slice_head: bool = False

    _lr_scores: list[float] | None = PrivateAttr(default=None)
    # The fraction of SP that `slicing_base: auto` chose (set once its search ends).
    _auto_fraction: float | None = PrivateAttr(default=None)
    _summary: dict[str, Any] = PrivateAttr(default_factory=dict)
    _calibration: dict[str, int] = PrivateAttr(default_factory=dict)

    @field_validator("round_to", "layer_dims", "layers_per_basis", mode="before")
    @classmethod
    def _check_integers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax validation would read True as a width of 1 and 16.0 as 16; numpy's integers
        # and arrays, which a Python caller may pass, hold integers.
        if value is None:
            return None
        value = value.tolist() if hasattr(value, "tolist") else value
        many = isinstance(value, (list, tuple))
        values = list(value) if many else [value]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            kind = "whole numbers" if many else "a whole number"
            raise ValueError(f"{info.field_name} must be {kind}, got {bad[0]!r}")
        return [int(v) for v in values] if many else int(value)

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value}")
        return value

    @field_validator("layer_scores")
    @classmethod
    def _check_layer_scores(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or not all(math.isfinite(v) for v in value)):
            raise ValueError(
                f"layer_scores must hold one finite number per decoder layer, got {value}"
            )
        return value

    @field_validator("layers_per_basis")
    @classmethod
    def _check_layers_per_basis(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"layers_per_basis must be a positive integer, got {value}")
        return value

    @field_validator("round_to")
    @classmethod
    def _check_round_to(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"round_to must be a positive integer, got {value}")
        return value

    @model_validator(mode="after")
    def _check_options(self) -> DynamicSliceModifier:
        """The fields against each other; each field's own range is checked above."""
        if self.layer_dims is not None:
            self._check_layer_dims()
        if self.slicing_base == "auto":
            self._check_auto()
        elif self.auto_fractions is not None or self.auto_holdout != AUTO_HOLDOUT:
            raise ValueError(
                "auto_fractions and auto_holdout tune slicing_base: auto; set slicing_base "
                "to auto or drop them"
            )
        if self.layers_per_basis > 1 and self.basis != "layer":
            raise ValueError(
                f"layers_per_basis: {self.layers_per_basis} shares one basis between whole "
                "layers, which basis: sublayer gives two each; set basis: layer, or drop "
                "layers_per_basis"
            )
        if self.target_params is not None:
            self._check_target_params()
        elif self.slicing_base == "auto":
            if self.sparsity == 0.0:
                raise ValueError("slicing_base: auto needs sparsity > 0 (or target_params)")
        else:
            try:
                check_fractions(self.sparsity, self.effective_slicing_base)
            except AllocationError as err:
                raise ValueError(str(err)) from None
        return self

    def _check_layer_dims(self) -> None:
        ignored = [
            name
            for name, given in (
                ("sparsity", self.sparsity > 0.0),
                ("target_params", self.target_params is not None),
                ("slicing_base", self.slicing_base is not None),
                ("layer_scores", self.layer_scores is not None),
                # Only a value other than the default is sure to be the user's: a saved
                # recipe writes every field (and recipes saved before the default was
                # unset wrote mean).
                ("rounding", self.rounding not in (None, "mean")),
                ("normalization", self.normalization != "minmax"),
            )
            if given
        ]
        if ignored:
            raise ValueError(
                f"layer_dims fixes every layer's width, so {', '.join(ignored)} would be "
                "ignored; drop them, or drop layer_dims to have the widths allocated"
            )
        if self.round_to is not None:
            off = [d for d in self.layer_dims or [] if d % self.round_to]
            if off:
                raise ValueError(
                    f"layer_dims {off} are not multiples of round_to {self.round_to}; fix "
                    "them or drop round_to"
                )

    def _check_target_params(self) -> None:
        if not 0.0 < self.target_params < 1.0:
            raise ValueError(f"target_params must be in (0, 1), got {self.target_params}")
        # A saved recipe writes the default sparsity 0.0 beside target_params.
        if self.sparsity > 0.0:
            raise ValueError("give either sparsity or target_params, not both")
        if isinstance(self.slicing_base, float) and not 0.0 <= self.slicing_base <= 1.0:
            raise ValueError(
                f"slicing_base must be in [0, 1] with target_params (it is capped at the "
                f"solved SP, so 1.0 is constant slicing), got {self.slicing_base}"
            )

    def _check_auto(self) -> None:
        if self.auto_fractions == []:
            raise ValueError(
                "auto_fractions is empty: give at least one candidate, or leave it unset"
            )
        fractions = self.auto_fractions or DEFAULT_FRACTIONS
        if not all(0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"auto_fractions are fractions of SP in [0, 1], got {fractions}")
        if not 0.0 < self.auto_holdout < 1.0:
            raise ValueError(f"auto_holdout must be in (0, 1), got {self.auto_holdout}")

    @property
    def effective_slicing_base(self) -> float:
        return self._slicing_base_for(self.sparsity)

    def _slicing_base_for(self, sparsity: float, auto_fraction: float | None = None) -> float:
        """SB at ``sparsity``; with ``auto``, ``auto_fraction`` of it (a candidate of the
        search), else the fraction the search chose."""
        if self.slicing_base == "auto":
            fraction = self._auto_fraction if auto_fraction is None else auto_fraction
            if fraction is None:
                raise AttributeError("slicing_base is 'auto' and has not been searched yet")
            return fraction * sparsity
        if self.slicing_base is None:
            return 0.2 * sparsity
        return min(self.slicing_base, sparsity) if self.target_params else self.slicing_base

    @property
    def lr_scores(self) -> list[float] | None:
        """Layer Redundancy per decoder layer, once ``on_initialize`` has run."""
        return self._lr_scores

    @property
    def summary(self) -> dict[str, Any]:
        """Dims, parameter counts and timings of the last run."""
        return self._summary

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        start = time.perf_counter()
        model = state.model
        run = self._prepare(model, state.data.calib, kwargs.get("sequential_targets"))
        # Folding keeps the function, so a run refused after it leaves a model that computes
        # what it did; one that fails midway leaves some layers scaled.
        with changing_in_place(model, "scaled"):
            folded = fold_multipliers(model, run.adapter, run.device)
        if folded:
            logger.info(f"Folded {', '.join(folded)} into the weights (recorded as 1.0)")
        hidden = run.planner.hidden_size
        inputs = self._capture(model, run.layers[0], run.calib, hidden, run.device)
        auto = self.slicing_base == "auto"
        heldout = self._heldout(inputs, hidden) if auto else frozenset()
        lr_seconds = self._measure(run, inputs, heldout)
        search: list[dict[str, Any]] | None = None
        if auto:
            # Every trial captures activations of its own; given layer_scores, the first
            # capture is still held and would sit beside them, doubling host memory.
            inputs.release()
            search = self._search_slicing_base(model, run, heldout)
        layout = self._layout(run)
        keep_tied = self._settle_tie(model, run, layout)

        # Untied only now, when the model is about to change: every check above may still
        # refuse the run and leave the caller's model computing what it did.
        with changing_in_place(model, "rotated and sliced"):
            if not keep_tied:
                untie_head(model)
            slicer = self._slicer(model, run, layout, keep_tied)
            if self.hadamard:
                self._warn_hadamard(slicer.smallest_hadamard_block, layout.whole)
            if not len(inputs):  # released: a pass before this one spent them
                inputs = capture_layer_inputs(model, run.layers[0], run.calib)
            result = slicer.run(inputs)
            convert_to_sliced(
                model,
                run.adapter,
                result,
                self._provenance(run, layout, search),
                quantizable_shortcuts=self._shortcuts_quantized(result, run),
            )
        self._summarize(model, layout, run.dense_params, start, lr_seconds)
        return True

    def _prepare(self, model: torch.nn.Module, calib: Any, sequential_targets: Any) -> _Run:
        """Every check that needs only the model and the recipe, so that what cannot run
        fails before a calibration pass is spent; the model is left as it was."""
        adapter = get_adapter(model)
        config = model.config
        hidden, num_layers = config.hidden_size, config.num_hidden_layers
        layers = adapter.layers(model)
        others = recipe_modifiers()
        module_names = {id(module): name for name, module in model.named_modules()}
        layer_names = [module_names[id(layer)] for layer in layers]
        requirement = self._check_recipe(model, adapter, others, module_names, sequential_targets)
        # After the recipe's order is checked: a quantizer placed before the slicer has
        # already attached its schemes, and the order is what to fix then.
        check_unquantized(model)
        round_to = self._round_to(requirement, hidden)
        if self.layer_scores is not None and len(self.layer_scores) != num_layers:
            raise AllocationError(
                f"layer_scores has {len(self.layer_scores)} entries but the model has "
                f"{num_layers} decoder layers: give one per decoder layer, as `dynslice "
                "scores MODEL --json FILE` writes them for this model"
            )
        explicit = (
            check_explicit_dims(self.layer_dims, hidden, num_layers)
            if self.layer_dims is not None
            else None
        )
        if explicit:
            check_dims_fit(explicit, requirement)
        if calib is None:
            raise CalibrationError(
                "DynamicSliceModifier needs calibration data: pass dataset=... (and "
                "num_calibration_samples, max_seq_length) to oneshot"
            )
        tied = embeddings_tied(model)
        # A sliced head reads a basis of its own, so it cannot share the table; the table,
        # left alone, is then rotated into layer 0's basis like an untied one (narrower, and
        # no input projection to run).
        keep_tied = tied and not (self.untie_embeddings or self.slice_head)
        if self.quantize_shortcuts and keep_tied:
            check_input_projection(_input_projection(layer_names), hidden, others)
        planner = LayoutPlanner(
            self._counter(model, adapter, keep_tied),
            round_to,
            self.normalization,
            self.rounding,
            self.profitable_only,
        )
        dense_params = count_parameters(model)
        if explicit is None:
            set_by = requirement[1] if requirement and round_to == requirement[0] else None
            self._check_fits(planner, dense_params, set_by)
        if tied and self.slice_head and not self.untie_embeddings:
            logger.info(
                "slice_head: the head reads a rotated basis, so it is untied from the shared "
                "embedding table (a second, narrower table; free only if a quantizer in the "
                "recipe takes lm_head, which unties it anyway), and the table is sliced too"
            )
        return _Run(
            adapter=adapter,
            layers=layers,
            layer_names=layer_names,
            others=others,
            device=_compute_device(),
            dense_params=dense_params,
            tied=tied,
            keep_tied=keep_tied,
            explicit=explicit,
            planner=planner,
            calib=list(calib),
        )

    def _check_recipe(
        self,
        model: torch.nn.Module,
        adapter: ModelAdapter,
        others: list[Modifier],
        module_names: dict[int, str],
        sequential_targets: Any,
    ) -> tuple[int, str] | None:
        """The recipe's other modifiers against the slicer: their order, the layers they
        onload, the inputs they need unsliced; returns the multiple their schemes need of
        every sliced width and who asks (None: any width)."""
        check_order(others, self)
        check_sequential_targets(
            sequential_targets,
            type(adapter.layers(model)[0]).__name__,
            followed=any(m is not self for m in others),
        )
        reads, writes = self._sliced_linears(model, adapter, module_names)
        check_unsliced_inputs(model, set(reads), others)
        return required_multiple(others, reads, writes)

    def _check_fits(self, planner: LayoutPlanner, dense_params: int, set_by: str | None) -> None:
        """What cannot fit at any scores is refused before a calibration pass is spent;
        ``set_by``: the quantizers that fixed round_to, if they did."""
        if self.target_params is not None:
            check_target_reachable(
                self.target_params, dense_params, planner.smallest(), planner.max_sparsity
            )
        else:
            check_sparsity_fits(self.sparsity, planner.max_sparsity, set_by)
            # Equal widths round together under mean rounding (constant slicing's default)
            # and alike under nearest; spectrum rounding spreads the steps over the layers.
            # Nearest rounding of dynamic widths depends on the scores: refused once planned.
            constant = (
                self.slicing_base != "auto"
                and self._slicing_base_for(self.sparsity) == self.sparsity
            )
            per_layer = constant and self.rounding in (None, "mean", "nearest")
            if per_layer or self.rounding != "nearest":
                check_sparsity_slices(
                    self.sparsity,
                    planner.hidden_size,
                    planner.num_layers,
                    planner.round_to,
                    per_layer=per_layer,
                    set_by=set_by,
                )

    def _measure(self, run: _Run, inputs: LayerInputs, heldout: frozenset[int]) -> float:
        """Score the layers (Layer Redundancy) and take each layer input's spectrum, where
        the layout needs them, in one pass over the unsliced model that spends ``inputs``;
        hands both to the planner and returns the pass's seconds (0 when none ran)."""
        planner = run.planner
        # With target_params, SB is capped at the SP solved for, so an SB capped even at the
        # largest SP gives constant slicing whatever SP is found.
        largest = self.sparsity if self.target_params is None else planner.max_sparsity
        constant = (
            run.explicit is None
            and self.slicing_base != "auto"
            and self._slicing_base_for(largest) == largest
        )
        scores = self.layer_scores
        wants_scores = run.explicit is None and scores is None and not constant
        # Unset, spectrum rounding costs only the covariances in a pass that runs anyway.
        wants_spectra = run.explicit is None and (
            self.rounding == "spectrum" or (self.rounding is None and wants_scores)
        )
        if wants_spectra:
            logger.info(
                "The pass over the unsliced model also takes the spectrum of each layer's "
                "input, for rounding: spectrum"
            )
        seconds = 0.0
        if wants_scores or wants_spectra:
            start = time.perf_counter()
            measured = dense_pass(
                run.layers, inputs, run.device, skip=heldout, spectra=wants_spectra
            )
            seconds = time.perf_counter() - start
            inputs.release()
            planner.spectra = measured.spectra
            if wants_scores:
                scores = measured.scores
        if constant and scores is None:
            logger.info("slicing_base >= sparsity: constant slicing, Layer Redundancy unused")
        if scores is not None:
            self._lr_scores = [float(s) for s in scores]
            planner.scores = self._lr_scores
            logger.info("Layer Redundancy: " + ", ".join(f"{s:.3f}" for s in scores))
        return seconds

    def _plan(self, run: _Run, auto_fraction: float | None = None) -> Layout:
        """The planned layout; ``auto_fraction``: the search's candidate SB, as a fraction
        of SP (unset: the SB given, or the one the search chose)."""

        def base_at(sparsity: float) -> float:
            return self._slicing_base_for(sparsity, auto_fraction)

        if self.target_params is None:
            return run.planner.at(self.sparsity, base_at(self.sparsity))
        return run.planner.for_target(self.target_params, run.dense_params, base_at)

    def _layout(self, run: _Run) -> Layout:
        """The widths this run keeps: ``layer_dims`` as given, or planned."""
        if run.explicit is not None:
            return Layout.given(run.explicit, run.planner.hidden_size)
        layout = self._plan(run)
        logger.info(
            f"Widths rounded to multiples of {run.planner.round_to} by {layout.rounding} rounding"
        )
        if self.target_params is not None:
            logger.info(
                f"target_params {self.target_params}: solved sparsity {layout.sparsity:.4f}"
            )
        elif layout.sparsity > 0 and run.planner.rounds_to_full(
            layout.sparsity, layout.slicing_base, layout.rounding
        ):
            # What the check before calibration could not tell without the scores.
            raise AllocationError(
                f"sparsity {layout.sparsity:g} would slice nothing: {layout.rounding} rounding "
                f"to multiples of {run.planner.round_to} takes every layer back to its full "
                f"width, {run.planner.hidden_size}; raise sparsity or lower round_to"
            )
        whole = [i for i, w in enumerate(layout.whole) if w]
        if not whole:
            return layout
        reason = "slicing them would add more shortcut weights than it removes (profitable_only)"
        if self.target_params is not None:
            # The solved sparsity already counts them whole: nothing to fix.
            logger.info(f"Leaving layers {whole} whole: {reason}; the others meet target_params")
            return layout
        fixes = ["a larger sparsity", "target_params"]
        fixes += [] if self.basis == "layer" else ["basis: layer"]
        remedies = f"use {', '.join(fixes[:-1])} or {fixes[-1]}"
        if len(whole) == len(layout.whole) and layout.sparsity > 0:
            raise AllocationError(
                f"sparsity {layout.sparsity:g} would slice no layer: at its widths each layer "
                "would gain more shortcut weights than slicing removes (profitable_only); "
                f"{remedies}, or profitable_only: false to slice them anyway."
            )
        realised = mean_slice(layout.dims, run.planner.hidden_size)
        logger.warning(
            f"Leaving {len(whole)} of {len(layout.whole)} layers whole (full width, unrotated; "
            f"layers {whole}): {reason}. The mean slice is {realised:.3f} against the sparsity "
            f"{layout.sparsity:g} asked for; to reach it, {remedies}."
        )
        return layout

    def _settle_tie(self, model: torch.nn.Module, run: _Run, layout: Layout) -> bool:
        """Whether the embedding table stays shared with the head, now that the layout is
        known; logs the parameters the layout is predicted to leave."""
        keep_tied, counter = run.keep_tied, run.planner.counter
        head_sliced = counter.head_sliced(layout.whole[-1])
        if self.slice_head and not head_sliced:
            fixes = "profitable_only: false" + ("" if self.basis == "layer" else " or basis: layer")
            logger.warning(
                "slice_head: the last layer is left whole (profitable_only), so it hands the "
                f"head no sliced basis and the head stays at full width; {fixes} slices it"
            )
        if run.tied and not keep_tied and not head_sliced and self._may_retie(run, layout):
            # The head would read the table's own basis, so an untied copy would be a second
            # table for nothing (llm-compressor's save would tie them again anyway).
            logger.info("The embedding table stays tied to the head, which is not sliced")
            keep_tied = True
            counter = self._counter(model, run.adapter, keep_tied)
        logger.info(
            f"Predicted parameters: {counter(layout.dims, layout.whole) / 1e6:.2f}M of "
            f"{run.dense_params / 1e6:.2f}M"
        )
        logger.info(f"Kept residual widths: {layout.dims}")
        return keep_tied

    def _may_retie(self, run: _Run, layout: Layout) -> bool:
        """Whether a table untied only for a head that ends up unsliced may stay tied: always
        when layer 0 is whole (neither copy would change); else only if the user did not ask
        to untie it, and the input projection that layer 0 then needs fits the quantizers'
        groups where it is to be quantized."""
        if layout.whole[0]:
            return True
        if self.untie_embeddings:
            return False
        name, hidden = _input_projection(run.layer_names), run.planner.hidden_size
        return not self.quantize_shortcuts or (
            input_projection_conflict(name, hidden, run.others) is None
        )

    def _counter(
        self, model: torch.nn.Module, adapter: ModelAdapter, keep_tied: bool
    ) -> ParameterCounter:
        """Counts the model as this slicer builds it, the table kept tied or not."""
        return ParameterCounter(
            model,
            adapter,
            self.basis,
            keep_tied,
            self.align_bases,
            self.slice_head,
            self.layers_per_basis,
        )

    def _provenance(
        self, run: _Run, layout: Layout, search: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        """How the widths were chosen, for ``config.slicing``."""
        return {
            "lr_scores": self._lr_scores,
            "sparsity": layout.sparsity,
            "slicing_base": layout.slicing_base,
            "target_params": self.target_params,
            # Explicit layer_dims are the user's widths, rounded to nothing.
            "round_to": run.planner.round_to if run.explicit is None else self.round_to,
            "rounding": layout.rounding,
            "normalization": self.normalization,
            "basis": self.basis,
            "layers_per_basis": self.layers_per_basis,
            "hadamard": self.hadamard,
            "align_bases": self.align_bases,
            "slicing_base_search": search,
            "profitable_only": self.profitable_only,
            "whole_layers": [i for i, w in enumerate(layout.whole) if w],
            "calibration": self._calibration,
        }

    def _summarize(
        self,
        model: torch.nn.Module,
        layout: Layout,
        dense_params: int,
        start: float,
        lr_seconds: float,
    ) -> None:
        """Record the run's sizes and timings (``summary``, ``config.slicing``) and log them."""
        sliced_params = count_parameters(model)
        model.config.slicing["parameters"] = {"dense": dense_params, "sliced": sliced_params}
        realised = mean_slice(layout.dims, model.config.hidden_size)
        self._summary = {
            "dims": layout.dims,
            "mean_slice": realised,
            "dense_parameters": dense_params,
            "sliced_parameters": sliced_params,
            "embeddings_tied": embeddings_tied(model),
            "seconds": time.perf_counter() - start,
            "lr_seconds": lr_seconds,
        }
        logger.info(
            f"Sliced {type(model).__name__}: mean slice {realised:.3f} (target "
            f"{layout.sparsity:.4f}), parameters {dense_params / 1e6:.2f}M -> "
            f"{sliced_params / 1e6:.2f}M ({sliced_params / dense_params:.1%} of dense), "
            f"{self._summary['seconds']:.1f}s"
        )
        if sliced_params <= dense_params:
            return
        sizes = f"{sliced_params:,} against {dense_params:,} parameters"
        if realised == 0.0:
            # Rotation alone (sparsity 0, e.g. for hadamard, or layer_dims at full width) is
            # asked to keep every width, so the input projection and the shortcuts are pure
            # additions; a sparsity that would slice nothing was refused.
            logger.info(
                f"Rotated without slicing: the model is larger than the dense one ({sizes}) "
                "by its input projection and shortcut matrices"
            )
            return
        remedies = "raise sparsity or use basis: layer (one shortcut per layer)"
        if not self.profitable_only:
            remedies += ", or turn profitable_only on (layers that would not gain stay whole)"
        logger.warning(
            f"The sliced model is larger than the dense one ({sizes}): its shortcut matrices "
            f"outweigh what slicing removes; {remedies}"
        )

    def _round_to(self, requirement: tuple[int, str] | None, hidden: int) -> int:
        """The step every width is a multiple of: ``round_to``, or raised to what the
        recipe's quantizers need; refused where no slicing could honour it."""
        round_to = fit_round_to(self.round_to, requirement, hidden)
        if round_to > hidden:
            raise AllocationError(
                f"round_to={round_to} exceeds hidden_size={hidden}: every width is a multiple "
                f"of round_to; set round_to to at most {hidden} (a divisor of it keeps whole "
                "layers possible)"
            )
        if requirement is not None and round_to != (self.round_to or DEFAULT_ROUND_TO):
            logger.info(f"Rounding widths to multiples of {round_to} for {requirement[1]}")
        elif requirement is None and self.round_to is None and self.layer_dims is None:
            logger.info(
                f"No quantizer follows in this run: widths are multiples of {round_to}. To "
                "quantize in a later stage or oneshot, set round_to to its group size (128 "
                "for W4A16) here"
            )
        least_slice = (hidden % round_to) / hidden
        by_sparsity = self.layer_dims is None and self.target_params is None
        if by_sparsity and self.sparsity < least_slice:
            # Whole layers would be hidden_size wide, not a multiple of round_to either.
            kept = hidden - hidden % round_to
            if self.sparsity == 0.0:
                raise AllocationError(
                    f"sparsity 0 asks for the rotation alone, but hidden_size {hidden} is not "
                    f"a multiple of round_to {round_to}, so every layer would keep at most "
                    f"{kept} dims ({least_slice:.1%} sliced); use a round_to that divides "
                    f"{hidden} (a smaller quantization group size), or sparsity >= "
                    f"{least_slice:.4f} to slice"
                )
            logger.warning(
                f"hidden_size {hidden} is not a multiple of round_to {round_to}: every layer "
                f"keeps at most {kept} dims ({least_slice:.1%} sliced, more than sparsity "
                f"{self.sparsity})"
            )
        return round_to

    def _capture(
        self,
        model: torch.nn.Module,
        first_layer: torch.nn.Module,
        calib: Any,
        hidden: int,
        device: torch.device,
    ) -> LayerInputs:
        """What the first decoder layer receives for every calibration batch; refused where
        the PCA would have fewer tokens than dimensions."""
        num_layers = model.config.num_hidden_layers
        inputs = capture_layer_inputs(model, first_layer, calib)
        duplicated = shared_across_ranks(inputs.keys)
        if duplicated:
            logger.warning(
                f"{duplicated} of this rank's {len(inputs)} calibration batches are also on "
                "another rank, so part of the data is counted twice and part is never seen. "
                "llm-compressor 0.14 splits an identical dataset across ranks with sampler "
                "indices into the unsplit dataset; give each rank its own shard instead: "
                "dataset.shard(world_size, rank, contiguous=True)"
            )
        # The PCA sees every rank's tokens (see distributed.py).
        tokens, batches = sum_over_ranks(inputs.tokens(), len(inputs))
        # Recorded with the slicing: the same recipe slices alike only on the same data.
        self._calibration = {"batches": int(batches), "tokens": int(tokens)}
        if tokens < hidden:
            raise CalibrationError(
                f"{int(tokens)} calibration tokens (padding excluded) but hidden_size is "
                f"{hidden}: PCA needs at least as many tokens as dimensions; raise "
                "num_calibration_samples or max_seq_length"
                + ("" if tokens else ", and check that the attention masks are not all zero")
            )
        logger.info(
            f"DynamicSliceModifier: {len(inputs)} calibration batches, {inputs.tokens()} tokens"
            f"{f' ({int(tokens)} on all ranks)' if is_distributed() else ''}, {num_layers} "
            f"layers, compute device {device}"
        )
        return inputs

    def _warn_hadamard(self, block: int, whole: list[bool]) -> None:
        """Where the Hadamard rotation spreads outliers over few channels, or none."""
        if block < 16:
            how = (
                "with aligned bases every basis takes the same Hadamard blocks, the "
                "largest power of two dividing every sliced width"
                if self.align_bases
                else "each basis takes Hadamard blocks of the largest power of two "
                "dividing its width"
            )
            logger.warning(
                f"hadamard: {how}; the smallest here is {block}, so outliers are spread "
                f"over {block} channels at most there (1: not at all). Use widths in "
                "multiples of 16 or more (round_to)"
                + (", or align_bases: false" if self.align_bases else "")
            )
        if any(whole):
            logger.warning(
                f"hadamard: layers {[i for i, w in enumerate(whole) if w]} are left whole "
                "in the original basis (profitable_only), so no Hadamard rotation spreads "
                "their outliers; set profitable_only: false to rotate them too"
            )

    def _sliced_linears(
        self, model: torch.nn.Module, adapter: ModelAdapter, names: dict[int, str]
    ) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
        """The linears (by name) whose input width slicing sets, and those whose output
        width it sets: what the recipe's quantizers may ask to be rounded.

        With ``quantize_shortcuts`` the shortcuts, built only after calibration, are stood
        for by a probe of their type under their future names. Layer 0's input projection
        reads the full table, so it only writes a sliced width.
        """
        reads: dict[str, torch.nn.Module] = {}
        writes: dict[str, torch.nn.Module] = {}
        probe = shortcut_probe()
        for layer in adapter.layers(model):
            for linear in adapter.attn_inputs(layer) + adapter.mlp_inputs(layer):
                reads[names[id(linear)]] = linear
            for linear in (adapter.attn_output(layer), adapter.mlp_output(layer)):
                writes[names[id(linear)]] = linear
            if self.quantize_shortcuts:
                for shortcut in SHORTCUTS:
                    reads[f"{names[id(layer)]}.{shortcut}"] = probe
                    writes[f"{names[id(layer)]}.{shortcut}"] = probe
        if self.quantize_shortcuts:
            writes[f"{names[id(adapter.layers(model)[0])]}.{INPUT_PROJECTION}"] = probe
        if self.slice_head:
            # A sliced head reads the last layer's width, which is rounded with the others.
            head = model.get_output_embeddings()
            reads[names[id(head)]] = head
        return reads, writes

    def _slicer(
        self,
        model: torch.nn.Module,
        run: _Run,
        layout: Layout,
        keep_tied: bool,
        in_place: bool = True,
    ) -> RotateAndSlice:
        return RotateAndSlice(
            model,
            run.adapter,
            layout.dims,
            run.device,
            self.basis,
            keep_tied=keep_tied,
            hadamard=self.hadamard,
            align=self.align_bases,
            in_place=in_place,
            whole=layout.whole,
            slice_head=self.slice_head,
            layers_per_basis=self.layers_per_basis,
        )

    def _shortcuts_quantized(self, result: SlicingResult, run: _Run) -> bool:
        """Whether the quantizers later in the recipe take the shortcut matrices."""
        names = [
            f"{prefix}.{name}"
            for idx, prefix in enumerate(run.layer_names)
            for name, _ in result.changes_of_basis(idx)
        ]
        quantizers = [m for m in run.others if is_quantizer(m)]
        if not self.quantize_shortcuts:
            if names and quantizers:
                logger.info(
                    f"The {len(names)} shortcut matrices stay in model dtype "
                    "(quantize_shortcuts: false)"
                )
            return False
        taken = quantized_shortcuts(names, quantizers)
        if taken:
            who = ", ".join(sorted(set(taken.values())))
            logger.info(
                f"{len(taken)} of {len(names)} shortcut matrices will be quantized by {who} "
                "(its targets match them); to keep them in model dtype add "
                "'re:.*_shortcut$' and 're:.*input_projection$' to its ignore list"
            )
            if patterns := unmatched_warnings(names, quantizers):
                logger.info(
                    f"compressed-tensors will warn that it 'Could not match' {patterns}: it "
                    "credits each module to the first target listed that matches it, here a "
                    "class name before them; the shortcuts are still quantized as those "
                    "targets' group says"
                )
        elif names:
            # Shortcuts are built as linears only here, so a quantizer in a later oneshot
            # finds plain matrices: it has to come after the slicer in this recipe.
            cause = (
                "their targets / ignore leave them out"
                if quantizers
                else "there is no quantizer after the slicer in this recipe (a later oneshot "
                "cannot take them: put the quantizer in the same recipe)"
            )
            logger.warning(
                f"quantize_shortcuts is set but no quantizer takes any of the {len(names)} "
                f"shortcut matrices ({cause}): they stay in model dtype"
            )
        return bool(taken)

    def _heldout(self, inputs: LayerInputs, hidden: int) -> frozenset[int]:
        """The batches ``auto`` holds out; checked before any pass is spent."""
        heldout = heldout_batches(inputs.keys, self.auto_holdout)
        (fitted,) = sum_over_ranks(inputs.tokens(skip=heldout))
        fitted = int(fitted)
        if fitted < hidden:
            raise CalibrationError(
                f"slicing_base: auto fits the PCA on {fitted} tokens (after holding out "
                f"{self.auto_holdout:.0%}), fewer than hidden_size={hidden}; add calibration "
                "samples or lower auto_holdout"
            )
        return heldout

    def _search_slicing_base(
        self, model: torch.nn.Module, run: _Run, heldout: frozenset[int]
    ) -> list[dict[str, Any]]:
        def trial(layout: Layout) -> float:
            inputs = capture_layer_inputs(model, run.layers[0], run.calib)
            slicer = self._slicer(model, run, layout, run.keep_tied, in_place=False)
            slicer.run(inputs, heldout)
            return heldout_nll(model, run.adapter, inputs, heldout, run.device)

        best, trials = search_slicing_base(
            self.auto_fractions or DEFAULT_FRACTIONS,
            partial(self._plan, run),
            trial,
            run.planner.hidden_size,
        )
        self._auto_fraction = best.fraction
        return [
            {
                "slicing_base": t.slicing_base,
                "sparsity": t.sparsity,
                "heldout_nll": t.heldout_nll,
                "chosen": t is best,
            }
            for t in trials
        ]

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        # Smoothing modifiers later in the recipe (SmoothQuant, AWQ) fold their scales into
        # the sliced norms; they have all run by now, and the config goes out with the save.
        model = state.model
        formats = compress_shortcuts_as_linears(model)
        if formats:
            logger.debug(f"{formats} quantized shortcuts will be saved in their group's format")
        if not model.record_unit_norms():
            logger.info(
                "A later modifier changed the sliced norms' weights: vLLM will run the "
                "residual shortcuts as GEMMs of their own (slicing.unit_norms: false)"
            )
        if self._summary.get("embeddings_tied") and not embeddings_tied(model):
            # A quantizer that takes the head unties the shared table first (llm-compressor's
            # untie_word_embeddings), so the checkpoint stores a second one.
            head = model.get_output_embeddings().weight.numel()
            self._summary["embeddings_tied"] = False
            self._summary["sliced_parameters"] += head
            model.config.slicing["parameters"]["sliced"] += head
            logger.info(
                f"A later modifier untied the embedding table to quantize the head: "
                f"+{head / 1e6:.2f}M parameters, "
                f"{self._summary['sliced_parameters'] / 1e6:.2f}M in all"
            )
        return True
