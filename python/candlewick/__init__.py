"""candlewick: fast Transformer inference on Candle (Rust), with an exact NumPy reference beside it."""
from . import _native
from . import ops
from .errors import CandlewickError, DeviceError, InvalidArgument, ModelLoadError, TokenizerError
from .tokenizer import Tokenizer
from .model import Choice, Completion, Model, TextStream, TokenLogprob, Usage, load

__version__ = _native.__version__

__all__ = [
    "load",
    "Model",
    "Completion",
    "TextStream",
    "Choice",
    "TokenLogprob",
    "Usage",
    "Tokenizer",
    "CandlewickError",
    "ModelLoadError",
    "TokenizerError",
    "InvalidArgument",
    "DeviceError",
]
