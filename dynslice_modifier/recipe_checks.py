"""Checks on a recipe file before llm-compressor reads it.

llm-compressor's reader skips in silence a modifier outside a ``*_stage`` /
``*_modifiers`` pair and keeps the last of two equal keys; these checks refuse both, and
name the nearest modifier for a misspelt one.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

_RECIPE_LAYOUT = (
    "a recipe maps each <name>_stage to <group>_modifiers, and those to modifier names and "
    "their settings, as recipes/slice_w8a8.yaml does"
)


def modifier_hint(err: ValueError) -> str:
    """The nearest modifier name llm-compressor knows, for its "No modifier of type"."""
    import difflib

    from llmcompressor.modifiers.factory import ModifierFactory

    unknown = re.fullmatch(r"No modifier of type '(.+)' found\.", str(err))
    if unknown is None:
        return ""
    known = [
        name
        for registry in ("_registered_registry", "_main_registry", "_experimental_registry")
        for name in getattr(ModifierFactory, registry, {})
    ]
    near = difflib.get_close_matches(unknown[1], known, n=1)
    return f" (did you mean {near[0]}?)" if near else " (a misspelt modifier name?)"


def _unique_keys_loader() -> type:
    """A ``SafeLoader`` that refuses a key given twice in one mapping, which YAML readers
    otherwise settle in silence by keeping the last (a second ``slice_modifiers``, say)."""
    import yaml

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            # A merge key (<<) brings in keys that this mapping's own may override.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node)
            if not isinstance(key, Hashable):
                break  # construct_mapping refuses it ("found unhashable key")
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return loader.construct_mapping(node)

    class UniqueKeys(yaml.SafeLoader):
        pass

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeys


def check_recipe_layout(path: str) -> None:
    """Refuse what llm-compressor's recipe reader would skip in silence (a modifier outside
    a ``*_stage`` / ``*_modifiers`` pair) or fail on with a bare AttributeError (a file
    that is no mapping, or a modifier without settings)."""
    import yaml

    if path.lower().endswith(".md"):
        return  # Markdown recipes: llm-compressor extracts their YAML itself.
    with open(path, encoding="utf-8") as f:
        recipe = yaml.load(f, Loader=_unique_keys_loader())
    recipe = {str(key): value for key, value in recipe.items()} if isinstance(recipe, dict) else {}
    for stage, groups in recipe.items():
        # Anything else beside the stages (``args``, a version) is not read as modifiers.
        if not stage.endswith("_stage"):
            if isinstance(groups, dict) and stage != "args":
                # llm-compressor's merge of a later oneshot's recipe numbers the stages
                # (default_stage_0), which its own reader then skips.
                numbered = re.fullmatch(r"(.+)_stage_(\d+)", stage)
                hint = (
                    f"rename it {numbered[1]}_{numbered[2]}_stage: stage names end in _stage "
                    "(llm-compressor numbers the stages of a recipe.yaml that a later oneshot "
                    "appended to, and its reader then skips them)"
                    if numbered
                    else _RECIPE_LAYOUT
                )
                raise ValueError(
                    f"--recipe {path}: {stage!r} is not inside a stage and would be skipped; {hint}"
                )
            continue
        if not isinstance(groups, dict):
            raise ValueError(f"--recipe {path}: {stage} holds no modifiers; {_RECIPE_LAYOUT}")
        for group, modifiers in groups.items():
            is_group = str(group).endswith("_modifiers")
            if not is_group and not isinstance(modifiers, dict):
                continue  # an old recipe's stage setting (run_type: oneshot)
            if not (is_group and isinstance(modifiers, dict)):
                raise ValueError(
                    f"--recipe {path}: {stage}.{group} is not a <group>_modifiers mapping and "
                    f"would be skipped; {_RECIPE_LAYOUT}"
                )
            for name, settings in modifiers.items():
                if not isinstance(settings, dict):
                    raise ValueError(
                        f"--recipe {path}: {stage}.{group}.{name} needs a mapping of its "
                        f"settings, got {settings!r} (write {name}: {{}} for its defaults)"
                    )
    if not any(key.endswith("_stage") for key in recipe):
        raise ValueError(f"--recipe {path} has no stage: {_RECIPE_LAYOUT}")
