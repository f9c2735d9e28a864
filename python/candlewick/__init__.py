"""candlewick: fast Transformer inference on Candle (Rust), with an exact NumPy reference beside it.

The native extension (candlewick._native) is imported on first use of an engine name (`load`, `Model`,
`Tokenizer`, `ops`, `__version__`, ...), not by `import candlewick`: so `candlewick.reference`, the pure-NumPy
oracle, imports and runs where the extension is not built. The error classes are plain Python
(candlewick/errors.py) and are the very classes the extension raises.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CandlewickError, DeviceError, InvalidArgument, ModelLoadError, TokenizerError

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from . import ops as ops
    from .model import Choice, Completion, Model, SamplingParams, TextStream, TokenLogprob, Usage, load
    from .tokenizer import Tokenizer

    __version__: str

# name -> (module, attribute); attribute None means the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "load": (".model", "load"),
    "Model": (".model", "Model"),
    "Completion": (".model", "Completion"),
    "TextStream": (".model", "TextStream"),
    "Choice": (".model", "Choice"),
    "TokenLogprob": (".model", "TokenLogprob"),
    "Usage": (".model", "Usage"),
    "SamplingParams": (".model", "SamplingParams"),
    "Tokenizer": (".tokenizer", "Tokenizer"),
    "ops": (".ops", None),
    "__version__": ("._native", "__version__"),
}


def __getattr__(name: str) -> Any:
    """Import the engine (and with it the native extension) the first time one of its names is used."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "load",
    "Model",
    "Completion",
    "TextStream",
    "Choice",
    "TokenLogprob",
    "Usage",
    "SamplingParams",
    "Tokenizer",
    "CandlewickError",
    "ModelLoadError",
    "TokenizerError",
    "InvalidArgument",
    "DeviceError",
]
