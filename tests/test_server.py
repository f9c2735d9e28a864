"""The OpenAI-compatible server, driven by the official `openai` client against uvicorn on a free loopback port.

Every answer is compared with what the same model gives through the Python API."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import uvicorn

import candlewick as cw
from candlewick.server import create_app
from conftest import DATA, minilm_path

KEY = "test-key"
PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


class Server:
    """uvicorn serving `app` from a background thread, on a socket bound to a free loopback port."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.01)
        assert get(self.url + "/health")[0] == 200

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", KEY), max_retries=0,
                             timeout=30, **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def llama():
    return cw.load(DATA / "llama-tiny")


def serving(model, model_id: str):
    """A module fixture's body: `model` served as `model_id` (with KEY) until the module is done."""
    s = Server(create_app(model, model_id, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(llama):
    yield from serving(llama, "llama-tiny")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# -- models, health, auth ---------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["llama-tiny"]
    assert client.models.retrieve("llama-tiny").id == "llama-tiny"
    status, body = get(server.url + "/health")
    assert status == 200 and body["status"] == "ok"


def test_wrong_api_key_is_401(server):
    bad = server.client(api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    assert get(server.url + "/v1/models")[0] == 401


# -- completions ------------------------------------------------------------------------------------------------

def test_completion_with_seed_equals_generate(client, llama):
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=7,
                                  top_p=0.95, presence_penalty=0.5, frequency_penalty=0.3)
    want = llama.generate(PROMPT, max_new_tokens=12, temperature=0.9, seed=7, top_p=0.95, presence_penalty=0.5,
                          frequency_penalty=0.3)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.choices[0].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                  want.usage.completion_tokens)
    assert r.usage.total_tokens == want.usage.total_tokens
    again = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=7,
                                      top_p=0.95, presence_penalty=0.5, frequency_penalty=0.3)
    assert again.choices[0].text == r.choices[0].text
    other = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=8)
    assert other.choices[0].text != r.choices[0].text


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completion_streamed_equals_not_streamed(client):
    kw = dict(model="llama-tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=3)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_n2_and_batch_of_prompts(client, llama):
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=8, n=2, seed=11)
    want = llama.generate(PROMPT, max_new_tokens=8, n=2, seed=11)
    assert [c.text for c in r.choices] == [c.text for c in want.choices]
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    streamed = list(client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=8, n=2, seed=11,
                                              stream=True))
    texts = ["", ""]
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [c.text for c in want.choices]
    # a list of prompts: n choices each, numbered prompt by prompt
    ids = llama.tokenizer.encode("The cat")
    r = client.completions.create(model="llama-tiny", prompt=[PROMPT, "The cat"], max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [llama.generate(PROMPT, max_new_tokens=5, temperature=0).text,
                                           llama.generate(ids, max_new_tokens=5, temperature=0).text]
    r = client.completions.create(model="llama-tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == llama.generate(ids, max_new_tokens=5, temperature=0).text


def test_completion_stop_string(client, llama):
    full = llama.generate(PROMPT, max_new_tokens=16, temperature=0, ignore_eos=True).text
    stop = full[6:9]
    assert full.find(stop) >= 3
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_completion_logprobs_are_the_raw_distribution(client, llama):
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = llama.tokenizer.encode(PROMPT)
    want = llama.generate(ids, max_new_tokens=4, temperature=0)
    logits = llama.logits(ids + want.choices[0].token_ids).astype(np.float64)    # [T, V]
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for k, t in enumerate(want.choices[0].token_ids):
        assert lp.token_logprobs[k] == pytest.approx(logsm[len(ids) - 1 + k, t], abs=1e-5)
        assert len(lp.top_logprobs[k]) <= 3
        assert max(lp.top_logprobs[k].values()) == pytest.approx(logsm[len(ids) - 1 + k].max(), abs=1e-5)
    assert lp.tokens == [llama.tokenizer.decode([t], skip_special_tokens=False) for t in want.choices[0].token_ids]
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)


def test_logit_bias_forces_a_token(client, llama):
    token = llama.tokenizer.encode(" the", add_special_tokens=False)[0]
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=4, seed=1,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == llama.tokenizer.decode([token] * 4)


# -- chat -------------------------------------------------------------------------------------------------------

def test_chat_equals_model_chat(client, llama):
    r = client.chat.completions.create(model="llama-tiny", messages=MESSAGES, max_tokens=10, temperature=0.8,
                                       seed=5)
    want = llama.chat(MESSAGES, max_new_tokens=10, temperature=0.8, seed=5)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(llama.tokenizer.apply_chat_template(MESSAGES, tokenize=True))
    assert r.usage.completion_tokens == want.usage.completion_tokens


def test_chat_streamed_equals_not_streamed(client):
    kw = dict(model="llama-tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=9)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_without_max_tokens_runs_to_eos_or_context(client, llama):
    r = client.chat.completions.create(model="llama-tiny", messages=MESSAGES, temperature=0,
                                       extra_body={"ignore_eos": True})
    prompt = len(llama.tokenizer.apply_chat_template(MESSAGES, tokenize=True))
    assert r.usage.completion_tokens == llama.config["context_length"] - prompt
    assert r.choices[0].finish_reason == "length"


def test_chat_n2_logprobs_streamed_and_not(client, llama):
    kw = dict(model="llama-tiny", messages=MESSAGES, max_tokens=6, n=2, seed=4, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kw)
    want = llama.chat(MESSAGES, max_new_tokens=6, n=2, seed=4, logprobs=2)
    assert [c.message.content for c in r.choices] == [c.text for c in want.choices]
    for got, ch in zip(r.choices, want.choices):
        # the same tokens and, bit for bit, the same logprobs: the server's prompt may come partly from its
        # prefix cache (computed by an earlier request in other chunks), and every kernel is batch-invariant
        assert [t.token for t in got.logprobs.content] == [llama.tokenizer.decode([lp.token_id], skip_special_tokens=False) for lp in ch.logprobs]
        assert [t.logprob for t in got.logprobs.content] == [lp.logprob for lp in ch.logprobs]
        assert [[a.logprob for a in t.top_logprobs] for t in got.logprobs.content] == \
            [[v for _, v in lp.top_logprobs] for lp in ch.logprobs]
        for t in got.logprobs.content:
            assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
    streamed = list(client.chat.completions.create(stream=True, **kw))
    texts = ["", ""]
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == [c.text for c in want.choices]


# -- concurrency ------------------------------------------------------------------------------------------------

def test_16_concurrent_streams_match_running_alone(server, llama):
    prompts = [f"Story {i}: once upon a time" for i in range(16)]
    alone = [llama.generate(p, max_new_tokens=24, temperature=1.0, seed=i).text for i, p in enumerate(prompts)]

    def stream(i: int) -> str:
        client = server.client()
        chunks = client.completions.create(model="llama-tiny", prompt=prompts[i], max_tokens=24, seed=i,
                                           temperature=1.0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, range(16)))
    assert together == alone


def test_open_stream_does_not_block_others_and_disconnect_frees_it(server, client, llama):
    long = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=240, temperature=1.0,
                                     stream=True, extra_body={"ignore_eos": True})
    first = next(iter(long))
    assert first.choices[0].text
    assert get(server.url + "/health")[1]["active_requests"] >= 1
    # while that stream is open and unread, other requests are answered
    r = client.completions.create(model="llama-tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == llama.generate(PROMPT, max_new_tokens=4, temperature=0).text
    long.close()  # the client goes away mid-stream
    deadline = time.time() + 10
    while get(server.url + "/health")[1]["active_requests"] != 0:
        assert time.time() < deadline, "the disconnected stream kept its slot"
        time.sleep(0.05)


# -- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, status, param", [
    (dict(model="no-such-model"), openai.NotFoundError, 404, "model"),
    (dict(max_tokens=0), openai.BadRequestError, 400, "max_tokens"),
    (dict(temperature="hot"), openai.BadRequestError, 400, "temperature"),
    (dict(n=0), openai.BadRequestError, 400, "n"),
    (dict(prompt="word " * 400), openai.BadRequestError, 400, "prompt"),
    (dict(prompt=[]), openai.BadRequestError, 400, "prompt"),
    (dict(prompt=[[]]), openai.BadRequestError, 400, "prompt"),
    (dict(prompt=[5000]), openai.BadRequestError, 400, None),
    (dict(logit_bias={"x": 1}), openai.BadRequestError, 400, "logit_bias"),
    (dict(stop=5), openai.BadRequestError, 400, "stop"),
])
def test_bad_completion_requests_get_openai_errors(client, kwargs, error, status, param):
    args = dict(model="llama-tiny", prompt=PROMPT, max_tokens=4) | kwargs
    with pytest.raises(error) as e:
        client.completions.create(**args)
    assert e.value.status_code == status
    assert set(e.value.body) == {"message", "type", "param", "code"}
    assert e.value.body["type"] == "invalid_request_error"
    if param:
        assert e.value.body["param"] == param
    if "word " in str(kwargs.get("prompt", "")):
        assert e.value.body["code"] == "context_length_exceeded"


def test_bad_chat_requests_and_streams_get_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama-tiny", messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llama-tiny", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:  # a stream that cannot start is refused, not started
        client.chat.completions.create(model="llama-tiny", stream=True, max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 400}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="llama-tiny", input="hello")
    assert "encoder" in e.value.message


def test_malformed_json_and_unknown_routes(server):
    status, body = post_raw(server.url + "/v1/completions", b'{"model": "llama-tiny", "prompt": ')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post_raw(server.url + "/v1/completions", b'["not", "an", "object"]')
    assert status == 400 and "error" in body
    status, body = post_raw(server.url + "/v1/nothing-here", b"{}")
    assert status == 404 and body["error"]["message"]
    assert get(server.url + "/health")[0] == 200  # still serving


# -- embeddings -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return cw.load(minilm_path())


def test_embeddings(minilm):
    s = Server(create_app(minilm, "all-MiniLM-L6-v2"))
    try:
        client = s.client()
        texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
        r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)   # base64 on the wire
        want = minilm.embed(texts)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        np.testing.assert_array_equal(got, want)
        assert [d.index for d in r.data] == [0, 1]
        assert r.usage.prompt_tokens == sum(len(minilm.tokenizer.encode(t)) for t in texts)
        one = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
        np.testing.assert_array_equal(np.array(one.data[0].embedding, dtype=np.float32), want[0])
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="all-MiniLM-L6-v2", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], dimensions=8)
        assert e.value.body["param"] == "dimensions"
    finally:
        s.stop()


def test_server_imports_nothing_from_the_reference():
    """The server runs on the engine alone: candlewick.reference is the oracle, not a library for the engine."""
    import subprocess
    import sys

    code = ("import sys, candlewick.server; "
            "print(sorted(m for m in sys.modules if m.startswith('candlewick.reference')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- request limits ---------------------------------------------------------------------------------------------

def test_too_many_messages_or_stop_strings_are_400_naming_them(server):
    body = {"model": "llama-tiny", "messages": [{"role": "user", "content": "hi"}] * 4097, "max_tokens": 1}
    status, err = post_raw(server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and err["error"]["param"] == "messages", err
    body = {"model": "llama-tiny", "prompt": "Hello", "max_tokens": 1, "stop": [f"s{i}" for i in range(65)]}
    status, err = post_raw(server.url + "/v1/completions", json.dumps(body).encode())
    assert status == 400 and "stop: 65 strings, at most 64" in err["error"]["message"], err


def test_request_body_over_the_limit_is_413(llama):
    s = Server(create_app(llama, "llama-tiny", api_key=KEY, max_body_bytes=2000))
    try:
        small = {"model": "llama-tiny", "prompt": "Hello", "max_tokens": 1}
        assert post_raw(s.url + "/v1/completions", json.dumps(small).encode())[0] == 200
        big = json.dumps(small | {"prompt": "Hello " * 500}).encode()
        status, err = post_raw(s.url + "/v1/completions", big)
        assert status == 413 and err["error"]["code"] == "request_too_large", err
        # the same body without a Content-Length (chunked) is cut off once it passes the limit
        import http.client
        conn = http.client.HTTPConnection(s.url.removeprefix("http://"), timeout=10)
        conn.putrequest("POST", "/v1/completions")
        for k, v in {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
                     "Transfer-Encoding": "chunked"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        for i in range(0, len(big), 500):
            piece = big[i:i + 500]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
        assert get(s.url + "/health")[0] == 200
    finally:
        s.stop()


def _preflight(url: str, origin: str) -> tuple[int, str | None]:
    req = urllib.request.Request(url + "/v1/completions", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("access-control-allow-origin")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("access-control-allow-origin")


def test_no_cors_unless_origins_are_allowed(server, llama):
    # by default a browser page on another origin gets no CORS grant, so it cannot read the replies
    status, allow = _preflight(server.url, "http://localhost:3000")
    assert allow is None and status >= 400
    s = Server(create_app(llama, "llama-tiny", api_key=KEY, allowed_origins=["http://localhost:3000"]))
    try:
        assert _preflight(s.url, "http://localhost:3000") == (200, "http://localhost:3000")
        assert _preflight(s.url, "http://evil.example")[1] is None
        req = urllib.request.Request(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}",
                                                                    "Origin": "http://localhost:3000"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        s.stop()
