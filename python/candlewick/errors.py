"""The exceptions candlewick raises. The Rust core maps each of its errors onto one of these classes."""


class CandlewickError(Exception):
    """Base class of every error candlewick raises on purpose."""


class ModelLoadError(CandlewickError, OSError):
    """A checkpoint, config or weight file that cannot be used: missing, truncated, malformed or mismatched."""


class TokenizerError(CandlewickError, ValueError):
    """A missing or malformed tokenizer file, an unknown special token, or a token id outside the vocabulary."""


class InvalidArgument(CandlewickError, ValueError):
    """A value passed by the caller that is out of range, of the wrong type or of the wrong shape."""


class DeviceError(CandlewickError, RuntimeError):
    """A device this build or this machine cannot provide (e.g. "cuda" in a CPU-only build)."""


__all__ = ["CandlewickError", "ModelLoadError", "TokenizerError", "InvalidArgument", "DeviceError"]
