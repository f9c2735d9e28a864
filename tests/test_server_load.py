"""The server under many clients: every answer equals its solo run, clients that leave free their sequences,
a full queue answers 429, /metrics counts what was sent, /tokenize and /detokenize as llama-server has them."""
from __future__ import annotations

import json
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import candlewick as cw
from candlewick.server import create_app
from conftest import DATA
from test_server import KEY, Server, get, post_raw

SYSTEM = {"role": "system", "content": "You are a storyteller who answers every question with a long story."}


@pytest.fixture(scope="module")
def llama():
    return cw.load(DATA / "llama-tiny")


def messages(i: int) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": f"Tell me about the number {i} and its friends."}]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M):
        total += float(m.group(1))
    return total


def test_64_clients_a_quarter_leave(llama):
    """64 concurrent streamed chats (a shared system prompt, greedy and seeded); 16 clients hang up after their
    first piece. Every finished answer equals the Python API's; afterwards nothing is running and every KV block
    is back (metrics and /health idle); the token counters match what the clients received."""
    server = Server(create_app(llama, "llama-tiny", api_key=KEY, max_active=16, max_batch_tokens=64,
                               kv_cache_tokens=2048))
    try:
        def one(i: int):
            leaves = i % 4 == 3  # asks for a long answer and hangs up after its first piece
            params = dict(max_tokens=180 if leaves else 12 + i % 5, seed=i, temperature=0.0 if i % 2 else 0.8,
                          extra_body={"ignore_eos": True})
            with httpx.Client(timeout=60) as h:
                body = {"model": "llama-tiny", "messages": messages(i), "stream": True,
                        "max_tokens": params["max_tokens"], "seed": i, "temperature": params["temperature"],
                        "ignore_eos": True}
                text, finish = "", None
                with h.stream("POST", server.url + "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ch = json.loads(line[6:])["choices"][0]
                        text += ch["delta"].get("content") or ""
                        finish = ch["finish_reason"] or finish
                        if leaves and text:
                            return i, None, None  # hang up mid-stream
                return i, text, finish

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        for i, text, finish in results:
            if text is None:
                continue
            want = llama.chat(messages(i), max_new_tokens=12 + i % 5, seed=i,
                              temperature=0.0 if i % 2 else 0.8, ignore_eos=True)
            assert (text, finish) == (want.text, want.choices[0].finish_reason), f"client {i}"
        deadline = __import__("time").time() + 10
        while get(server.url + "/health")[1]["active_requests"] and __import__("time").time() < deadline:
            __import__("time").sleep(0.05)
        assert get(server.url + "/health")[1]["active_requests"] == 0
        assert metric(server.url, "candlewick:num_requests_running") == 0
        assert metric(server.url, "candlewick:kv_cache_usage_perc") == 0
        assert metric(server.url, "candlewick:requests_submitted_total") == 64
        assert metric(server.url, "candlewick:requests_aborted_total") == 16
        finished = sum(12 + i % 5 for i, t, _ in results if t is not None)
        assert metric(server.url, "candlewick:request_success_total") == 48
        # tokens out: at least every finished answer's, plus what the 16 that left got before leaving
        assert finished < metric(server.url, "candlewick:generation_tokens_total") < finished + 16 * 180
        assert metric(server.url, "candlewick:prefix_cache_hits_total") > 0
        assert metric(server.url, "candlewick:time_to_first_token_seconds_count") >= 48
    finally:
        server.stop()


def test_full_queue_is_429():
    """With one request allowed in flight, a second one while the first streams gets a 429 with Retry-After in
    OpenAI's error shape (the openai client raises RateLimitError), and the rejection is counted. The first
    request asks for 4000 tokens from SmolLM2 (an 8k context): it is still generating when the others come (a
    model with a short context would finish before them), and the client's hang-up aborts it."""
    from candlewick.default_model import smollm2_path

    server = Server(create_app(cw.load(smollm2_path()), "llama-tiny", api_key=KEY, max_active=1, max_queue=0))
    try:
        def while_busy(check):
            """Run `check` while a long streamed completion is in flight (its first piece seen, not its end)."""
            started, done = threading.Event(), threading.Event()

            def hold():
                with httpx.Client(timeout=60) as h:
                    body = {"model": "llama-tiny", "prompt": "Once", "stream": True, "max_tokens": 4000,
                            "ignore_eos": True}
                    with h.stream("POST", server.url + "/v1/completions", json=body,
                                  headers={"Authorization": f"Bearer {KEY}"}) as r:
                        for line in r.iter_lines():
                            started.set()
                            done.wait(20)  # stop reading; leaving the block hangs up
                            return

            t = threading.Thread(target=hold)
            t.start()
            assert started.wait(20)
            try:
                check()
            finally:
                done.set()
                t.join(20)

        def raw():
            r = httpx.post(server.url + "/v1/completions", json={"model": "llama-tiny", "prompt": "Hi",
                                                                "max_tokens": 2},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=20)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"

        def client():
            with pytest.raises(openai.RateLimitError):
                server.client().completions.create(model="llama-tiny", prompt="Hi", max_tokens=2)

        while_busy(raw)
        while_busy(client)
        assert metric(server.url, "candlewick:requests_rejected_total") == 2
    finally:
        server.stop()


def test_tokenize_detokenize(llama):
    server = Server(create_app(llama, "llama-tiny", api_key=KEY))
    try:
        status, body = post_raw(server.url + "/tokenize", json.dumps({"content": "Hello world"}).encode())
        assert status == 200 and body["tokens"] == llama.tokenizer.encode("Hello world", add_special_tokens=False)
        status, pieces = post_raw(server.url + "/tokenize",
                                  json.dumps({"content": "Hello world", "with_pieces": True}).encode())
        assert [p["id"] for p in pieces["tokens"]] == body["tokens"]
        assert "".join(p["piece"] for p in pieces["tokens"]) == llama.tokenizer.decode(body["tokens"])
        status, text = post_raw(server.url + "/detokenize", json.dumps({"tokens": body["tokens"]}).encode())
        assert status == 200 and text["content"] == llama.tokenizer.decode(body["tokens"], skip_special_tokens=False)
        status, err = post_raw(server.url + "/detokenize", json.dumps({"tokens": [10**7]}).encode())
        assert status == 400 and err["error"]["param"] == "tokens"
    finally:
        server.stop()
