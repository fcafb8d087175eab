"""What the quantizers elsewhere in the recipe require of the sliced widths.

Group-wise weight schemes (W4A16: groups of 128 along the input dimension) need every
linear that reads the residual stream to have an input width that is a multiple of the
group size; int8 W8A8 needs multiples of 16 to run on vLLM's CUDA kernels. Checking this
here, before any calibration, turns a crash deep inside GPTQ (or at the first forward in
vLLM) into an early, precise error, or into automatic rounding.

With ``quantize_shortcuts``, shortcut matrices are quantized exactly when a quantizer's
targets and ignore list take a linear of their name (``targets: Linear`` does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.utils import is_match, match_named_modules, match_targets
from llmcompressor.modifiers import Modifier
from torch import nn

from dynslice_modifier.allocation import DEFAULT_ROUND_TO
from dynslice_modifier.errors import AllocationError
from dynslice_modifier.modeling.modeling_dynslice import ResidualShortcutLinear, first_names

_GROUPED = ("group", "tensor_group")
GEMM_8BIT_ALIGNMENT = 16


def is_quantizer(modifier: Modifier) -> bool:
    return hasattr(modifier, "resolved_config")


def recipe_modifiers() -> list[Modifier]:
    """Modifiers of the active llm-compressor session (empty outside ``oneshot``)."""
    from llmcompressor.core import active_session

    recipe = getattr(active_session().lifecycle, "recipe", None)
    return list(getattr(recipe, "modifiers", None) or [])


# Modifiers that rotate the whole residual stream with one matrix of the original width;
# the sliced stream has a width per layer and shortcuts between bases, which they do not
# know. hadamard: true is the slicer's own way to spread outliers.
_WHOLE_STREAM_ROTATIONS = ("SpinQuantModifier",)


def check_order(modifiers: Sequence[Modifier], slicer: Modifier) -> None:
    """The slicer comes first and alone, with nothing after it that assumes one residual
    width.

    Every modifier's ``on_initialize`` runs before any calibration, in recipe order, and
    most resolve the model's modules there: before the slicer, a quantizer would calibrate
    weights the slicer then rewrites, and SmoothQuant or AWQ would hook norms the slicer
    replaces and silently smooth nothing. The slicer is therefore always first.
    """
    slicers = [m for m in modifiers if type(m) is type(slicer)]
    if len(slicers) > 1:
        raise AllocationError(
            f"the recipe holds {len(slicers)} DynamicSliceModifiers; the model is sliced "
            "once, so keep one (its sparsity or target_params sets the whole reduction)"
        )
    if not any(m is slicer for m in modifiers):
        return  # not this run's recipe (the modifier was initialised outside oneshot)
    for modifier in modifiers:
        name = type(modifier).__name__
        if name in _WHOLE_STREAM_ROTATIONS:
            raise AllocationError(
                f"{name} rotates the residual stream as one hidden_size-wide vector, which a "
                "sliced model no longer has (each layer has its own width); drop it and set "
                "hadamard: true on DynamicSliceModifier, which folds a Hadamard rotation "
                "into every kept basis"
            )
    if modifiers[0] is not slicer:
        raise AllocationError(
            f"{type(modifiers[0]).__name__} comes before DynamicSliceModifier in the recipe; "
            "slicing replaces every norm and rewrites every weight, which that modifier has "
            "already resolved, so put the slicer first (its own stage before the others)"
        )


def check_sequential_targets(
    targets: str | Sequence[str] | None, layer_class: str, followed: bool
) -> None:
    """An explicit ``sequential_targets`` may not name the decoder-layer class that slicing
    replaces (by ``SlicedDecoderLayer``): matching nothing once sliced, it would have
    llm-compressor's sequential pipeline calibrate the quantizers that follow the slicer
    (``followed``) on the whole model in one piece, all of it onloaded at once."""
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if followed and layer_class in names:
        raise AllocationError(
            f"sequential_targets names {layer_class}, which slicing replaces by "
            "SlicedDecoderLayer, so it would match nothing and the quantizers would calibrate "
            "the whole model in one piece; pass sequential_targets=['SlicedDecoderLayer'], or "
            "leave it unset (the sliced model's decoder layers are the default)"
        )


def _8bit_gemm(weights: QuantizationArgs | None, inputs: QuantizationArgs | None) -> str | None:
    """``int8`` or ``fp8`` when weights and activations are both of that 8-bit type."""
    if weights is None or inputs is None or weights.num_bits != 8 or inputs.num_bits != 8:
        return None
    kind = {"int": "int8", "float": "fp8"}.get(str(weights.type))
    return kind if weights.type == inputs.type else None


def _group_size(args: QuantizationArgs | None) -> int:
    """The group size of a group-wise scheme; 0 for any other (or none)."""
    if args is None or args.strategy not in _GROUPED or not args.group_size:
        return 0
    return int(args.group_size)


def _whole_groups(modifier: Modifier) -> str:
    """Why a group size binds even when the modifier bypasses divisibility checks."""
    if not getattr(modifier, "bypass_divisibility_checks", False):
        return ""
    return (
        "; bypass_divisibility_checks cannot lift this, since llm-compressor's observers "
        "split weights into whole groups and fail on a partial one"
    )


def required_multiple(
    modifiers: Sequence[Modifier],
    reads: Mapping[str, nn.Module],
    writes: Mapping[str, nn.Module],
) -> tuple[int, str] | None:
    """Least common multiple of what the recipe's schemes need of a width, and who asks.

    ``reads`` are the linears (by name) whose input width slicing sets, ``writes`` those
    whose output width it sets; a config group that takes none of them asks nothing (e.g.
    groups of 128 on ``down_proj`` alone, whose input is the MLP width). Group-wise schemes
    need the inputs they read to be multiples of their group. 8-bit weight+activation GEMMs
    (int8 W8A8, FP8) need both operand widths to be multiples of 16 on GPUs: vLLM's CUTLASS
    kernels take 16-aligned operands only; for other widths int8 falls back to a slower
    Triton kernel and FP8 is zero-padded on every forward, or fails where plain
    ``torch._scaled_mm`` serves it.
    """
    multiple, names = 1, []
    for modifier in modifiers:
        if not is_quantizer(modifier):
            continue
        name = type(modifier).__name__
        reading = _groups_taking(reads, modifier)
        writing = _groups_taking(writes, modifier)
        for group in modifier.resolved_config.config_groups.values():
            for args in (group.weights, group.input_activations):
                size = _group_size(args)
                if size and id(group) in reading:
                    multiple = math.lcm(multiple, size)
                    names.append(f"{name} (group_size {size}{_whole_groups(modifier)})")
            kind = _8bit_gemm(group.weights, group.input_activations)
            if kind is not None and id(group) in reading | writing:
                multiple = math.lcm(multiple, GEMM_8BIT_ALIGNMENT)
                names.append(f"{name} ({kind} GEMM: vLLM's CUDA kernels take multiples of 16)")
    return (multiple, ", ".join(dict.fromkeys(names))) if multiple > 1 else None


def fit_round_to(round_to: int | None, requirement: tuple[int, str] | None, hidden: int) -> int:
    """The rounding step that satisfies both the user (``None``: unset) and the quantizers."""
    if requirement is None:
        return round_to or DEFAULT_ROUND_TO
    multiple, who = requirement
    if round_to is not None and round_to % multiple:
        raise AllocationError(
            f"round_to={round_to} conflicts with {who}: every sliced width must be a multiple "
            f"of {multiple}; set round_to to a multiple of {multiple} or leave it unset"
        )
    step = math.lcm(round_to or DEFAULT_ROUND_TO, multiple)
    if step > hidden:
        raise AllocationError(
            f"{who} needs widths that are multiples of {multiple}, but hidden_size is "
            f"{hidden}: choose a scheme whose group size divides {hidden} (group_size in a "
            "recipe's config_groups) or one without groups, such as W8A8"
        )
    return step


def check_dims_fit(dims: Sequence[int], requirement: tuple[int, str] | None) -> None:
    if requirement is None:
        return
    multiple, who = requirement
    bad = [f"layer {i}: {d}" for i, d in enumerate(dims) if d % multiple]
    if bad:
        raise AllocationError(
            f"layer_dims must be multiples of {multiple} for {who}; not: {', '.join(bad)}"
        )


def check_unsliced_inputs(
    model: nn.Module, readers: set[str], modifiers: Sequence[Modifier]
) -> None:
    """Linears whose input slicing does not change must already fit the group size.

    ``o_proj`` reads heads x head_dim and ``down_proj`` the MLP width; if a group-wise
    scheme targets them and their width is not a multiple of its group, GPTQ would stop
    hours into calibration. ``readers`` are the residual readers, whose widths are rounded.
    """
    for modifier in modifiers:
        if not is_quantizer(modifier):
            continue
        ignore = list(getattr(modifier, "ignore", None) or [])
        for group in modifier.resolved_config.config_groups.values():
            size = _group_size(group.weights)
            if not size:
                continue
            bad = {
                name: module.in_features
                for name, module in match_named_modules(model, group.targets, ignore)
                if isinstance(module, nn.Linear)
                and name not in readers
                and module.in_features % size
            }
            if bad:
                kinds = sorted({f"'re:.*{name.rpartition('.')[2]}$'" for name in bad})
                raise AllocationError(
                    f"{type(modifier).__name__} uses groups of {size}, but these layers read a "
                    f"width that is not a multiple of {size} and that slicing does not change: "
                    f"{first_names([f'{name} ({width})' for name, width in bad.items()])}. Add "
                    f"them to the quantizer's ignore list ({', '.join(kinds)}) or choose a "
                    f"group size that divides their width{_whole_groups(modifier)}"
                )


def _group_of(name: str, module: nn.Module, modifier: Modifier) -> QuantizationScheme | None:
    """The config group of ``modifier`` that takes ``module`` (called ``name``), if any.

    As compressed-tensors applies it: an exact name beats a regex, which beats a class name
    such as ``Linear``, so a group that targets shortcuts by regex overrides one that takes
    every linear.
    """
    ignore = list(getattr(modifier, "ignore", None) or [])
    if ignore and is_match(name, module, ignore):
        return None
    by_target = {
        target: group
        for group in modifier.resolved_config.config_groups.values()
        for target in group.targets
    }
    matched = match_targets(name, module, by_target)
    return by_target[matched[0]] if matched else None


def _groups_taking(modules: Mapping[str, nn.Module], modifier: Modifier) -> set[int]:
    """The ids of ``modifier``'s config groups that take any of ``modules``."""
    groups = (_group_of(name, module, modifier) for name, module in modules.items())
    return {id(group) for group in groups if group is not None}


def shortcut_probe() -> nn.Module:
    """A module of a shortcut's type, for matching shortcut names before they exist."""
    return ResidualShortcutLinear(1, 1, device="meta")


def quantized_shortcuts(names: Sequence[str], modifiers: Sequence[Modifier]) -> dict[str, str]:
    """The shortcut matrices (by module name) the recipe's quantizers take, and which one."""
    taken: dict[str, str] = {}
    probe = shortcut_probe()
    for modifier in modifiers:
        if is_quantizer(modifier):
            for name in names:
                if name not in taken and _group_of(name, probe, modifier) is not None:
                    taken[name] = type(modifier).__name__
    return taken


def unmatched_warnings(names: Sequence[str], modifiers: Sequence[Modifier]) -> list[str]:
    """The regex targets of the shortcuts that compressed-tensors will say it "Could not
    match": its check credits each module to the first target, in config-group order, that
    matches it, so a regex listed after ``Linear`` is never credited, though its group is the
    one that takes the shortcuts (``_group_of``)."""
    probe = shortcut_probe()
    patterns: set[str] = set()
    for modifier in modifiers:
        if not is_quantizer(modifier):
            continue
        groups = modifier.resolved_config.config_groups.values()
        order = list(dict.fromkeys(t for group in groups for t in group.targets))
        for i, target in enumerate(order):
            matched = [n for n in names if is_match(n, probe, target)]
            # Credited with nothing: an earlier target takes every module it matches.
            shadowed = all(is_match(n, probe, order[:i]) for n in matched)
            if target.startswith("re:") and matched and shadowed:
                patterns.add(target)
    return sorted(patterns)


def input_projection_conflict(name: str, width: int, modifiers: Sequence[Modifier]) -> str | None:
    """Why a quantizer cannot take layer 0's input projection, which reads the full tied
    table (``width`` wide, the only shortcut input that is not a rounded, sliced width);
    None where it fits every quantizer's groups. Asked, with ``quantize_shortcuts``, only
    of models that keep their table tied."""
    for modifier in modifiers:
        if not is_quantizer(modifier):
            continue
        group = _group_of(name, shortcut_probe(), modifier)
        size = _group_size(group.weights if group is not None else None)
        if size and width % size:
            return (
                f"{type(modifier).__name__} uses groups of {size} and would "
                f"quantize {name}, which maps the tied embedding table ({width} wide, "
                f"not a multiple of {size}) into layer 0's basis; add "
                "'re:.*input_projection$' to the quantizer's ignore list"
            )
    return None


def check_input_projection(name: str, width: int, modifiers: Sequence[Modifier]) -> None:
    """Refuse, before calibration, a tied model whose input projection no group fits."""
    if (conflict := input_projection_conflict(name, width, modifiers)) is not None:
        raise AllocationError(conflict)


def compress_shortcuts_as_linears(model: nn.Module) -> int:
    """Give every quantized shortcut the checkpoint format an ``nn.Linear`` would get.

    compressed-tensors picks a module's format by its exact type and knows no subclass of
    ``nn.Linear``, so a shortcut in a config group of its own (e.g. int8 shortcuts beside
    4-bit linears) would be written ``dense``: unpacked, and refused by vLLM. A format the
    recipe set is kept. Returns how many formats were set.
    """
    from compressed_tensors.compressors.format import infer_module_format

    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        shortcut = isinstance(module, ResidualShortcutLinear) and scheme is not None
        if shortcut and scheme.format is None and scheme.weights is not None:
            scheme.format = infer_module_format(nn.Linear, scheme)
            count += 1
    return count
