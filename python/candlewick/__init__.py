"""candlewick: fast Transformer inference on Candle (Rust), with an exact NumPy reference beside it."""
from . import _native
from .errors import CandlewickError, DeviceError, InvalidArgument, ModelLoadError, TokenizerError
from .tokenizer import Tokenizer
from .model import Model, load

__version__ = _native.__version__

__all__ = [
    "load",
    "Model",
    "Tokenizer",
    "CandlewickError",
    "ModelLoadError",
    "TokenizerError",
    "InvalidArgument",
    "DeviceError",
]
