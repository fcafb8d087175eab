"""Dynamic, layer-specific SliceGPT for llm-compressor.

``import dynslice_modifier`` registers the sliced architecture with transformers' Auto
classes and, where llm-compressor is installed, ``DynamicSliceModifier`` with its recipe
factory and sliced models' layer mappings with SmoothQuant and AWQ. Serving environments
(vLLM) have no llm-compressor; they get the architecture only.
"""

import warnings
from importlib.util import find_spec
from typing import Any

from dynslice_modifier import modeling
from dynslice_modifier.version import __version__

__all__ = ["__version__", "modeling"]

# Why llm-compressor, though installed, could not be imported.
_compression_error: Exception | None = None

if find_spec("llmcompressor") is not None:
    try:
        from llmcompressor.modifiers.factory import ModifierFactory

        from dynslice_modifier.modifier import DynamicSliceModifier
        from dynslice_modifier.smoothing import register_mappings

        ModifierFactory.register("DynamicSliceModifier", DynamicSliceModifier)
        register_mappings()
    except Exception as err:
        # vLLM imports this package for its plugin, where an llm-compressor built against
        # another compressed-tensors (the two pin different ones) can fail anywhere in these
        # imports: the sliced architecture must still serve.
        _compression_error = err
        warnings.warn(
            f"llm-compressor is installed but the modifier could not be set up with it "
            f"({err!r}), so DynamicSliceModifier is not registered; the sliced architecture "
            "(transformers, vLLM) still works. To compress, use an environment where it "
            "imports (pip install 'dynslice-modifier[compress]' into a fresh one); serving "
            "needs nothing more",
            stacklevel=2,
        )
    else:
        __all__ += ["DynamicSliceModifier"]


def __getattr__(name: str) -> Any:
    if name == "DynamicSliceModifier":
        if _compression_error is not None:
            raise ImportError(
                "DynamicSliceModifier needs llm-compressor, which is installed but failed to "
                f"import with it: {_compression_error!r}"
            ) from _compression_error
        raise ImportError(
            "DynamicSliceModifier needs the compression stack: "
            "pip install 'dynslice-modifier[compress]'"
        )
    raise AttributeError(name)
