"""candlewick.reference: the models in pure NumPy and Python (float64), the readable oracle for the engine.

    from candlewick.reference import load, functional
    model = load("tests/data/llama-tiny")
    model.logits(model.tokenizer.encode("Hello"))   # float64 [T, V]

It imports neither torch nor the native extension (nor the engine's modules); only numpy, safetensors, regex and
jinja2, plus two pure-Python modules it shares with the engine because they are specifications rather than
computations under test: candlewick.chat_template (transformers' template environment) and candlewick.windows
(the perplexity windows). tests/test_reference_standalone.py runs it with candlewick._native made unimportable.
"""
from . import functional, generate
from .models import CausalLM, Encoder, load
from .tokenizer import Tokenizer

__all__ = ["load", "functional", "generate", "Tokenizer", "CausalLM", "Encoder"]
