"""candlewick.reference: the models in pure NumPy and Python (float64), the readable oracle for the engine.

    from candlewick.reference import load, functional
    model = load("tests/data/llama-tiny")
    model.logits(model.tokenizer.encode("Hello"))   # float64 [T, V]

It imports neither torch nor the native extension; only numpy, safetensors and jinja2.
"""
from . import functional, generate
from .models import CausalLM, Encoder, load
from .tokenizer import Tokenizer

__all__ = ["load", "functional", "generate", "Tokenizer", "CausalLM", "Encoder"]
