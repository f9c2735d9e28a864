"""candlewick's OpenAI-compatible HTTP server (FastAPI + uvicorn; streaming by server-sent events).

    from candlewick.server import create_app
    app = create_app(candlewick.load("tests/data/llama-tiny"), "llama-tiny")   # serve with uvicorn
"""
from .app import create_app

__all__ = ["create_app"]
