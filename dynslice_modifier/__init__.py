"""Dynamic, layer-specific SliceGPT for llm-compressor.

``import dynslice_modifier`` registers the sliced architecture with transformers' Auto
classes and, where llm-compressor is installed, ``DynamicSliceModifier`` with its recipe
factory and sliced models' layer mappings with SmoothQuant and AWQ. Serving environments
(vLLM) have no llm-compressor; they get the architecture only.
"""

from importlib.util import find_spec
from typing import Any

from dynslice_modifier import modeling
from dynslice_modifier.version import __version__

__all__ = ["__version__", "modeling"]

if find_spec("llmcompressor") is not None:
    from llmcompressor.modifiers.factory import ModifierFactory

    from dynslice_modifier.modifier import DynamicSliceModifier
    from dynslice_modifier.smoothing import register_mappings

    ModifierFactory.register("DynamicSliceModifier", DynamicSliceModifier)
    register_mappings()
    __all__ += ["DynamicSliceModifier"]


def __getattr__(name: str) -> Any:
    if name == "DynamicSliceModifier":
        raise ImportError(
            "DynamicSliceModifier needs the compression stack: "
            "pip install 'dynslice-modifier[compress]'"
        )
    raise AttributeError(name)
