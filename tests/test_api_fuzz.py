"""Schemathesis against the server's own OpenAPI document: every operation, with bodies and parameters drawn from
its schemas (valid and not): never a 5xx, every status and content type the document declares, error bodies
as the document says (OpenAI's error object), and the server healthy afterwards. A short run (scripts/fuzz_api.py
runs longer ones against a live server)."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

import candlewick as cw
from candlewick.server import create_app

from conftest import DATA
from test_server import Server

MODEL = cw.load(DATA / "llama-tiny")
# small limits, so that drawn requests are quick: 8 sequences at once, a 1 MiB body at most
SERVER = Server(create_app(MODEL, "llama-tiny", max_active=8, max_queue=64, kv_cache_tokens=8192,
                           max_body_bytes=1 << 20))
schema = schemathesis.openapi.from_url(SERVER.url + "/openapi.json")

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation(case):
    case.call_and_validate(checks=CHECKS)


def test_healthy_afterwards():
    import httpx

    with httpx.Client(base_url=SERVER.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": "llama-tiny", "prompt": "Hello", "max_tokens": 4,
                                            "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == MODEL.generate("Hello", max_new_tokens=4, temperature=0).text
    SERVER.stop()
