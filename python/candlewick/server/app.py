"""The OpenAI-compatible HTTP API over one loaded model: /v1/completions, /v1/chat/completions, /v1/embeddings,
/v1/models, /tokenize, /detokenize, /metrics and /health.

Generation runs on the engine's scheduler (server/scheduler.py): every request joins one running batch at the
next step, so many clients share each forward pass. Past `max_active` running and `max_queue` waiting requests,
new ones get a 429. A client that leaves mid-stream aborts its request, which frees its sequence at the next step.
Tokenization, chat templates and embeddings run in a small thread pool so the event loop stays free.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from sse_starlette import EventSourceResponse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from ..errors import InvalidArgument
from ..model import Completion, Model
from ..tools import CallParser, ToolPlan, parse_reply, tool_plan
from .errors import APIError, BodyLimit, as_api_error, install
from .metrics import Metrics
from .scheduler import Scheduler, Submitted, completion, pieces
from .schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, ErrorResponse,
                      TokenizeRequest)


class Engine:
    """The model, its scheduler (decoders), the thread pool for the rest of the work, and the count of
    embedding requests being served."""

    def __init__(self, model: Model, workers: int = 4, max_active: int = 64, max_queue: int = 256,
                 kv_cache_tokens: int | None = None, max_batch_tokens: int = 512):
        self.model = model
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="candlewick-worker")
        self.slots = asyncio.Semaphore(max_active)
        self.active = 0  # embedding requests holding a slot
        self.context_length: int = model.config["context_length"]
        self.is_encoder = model.config.get("model_type") == "bert"
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        if not self.is_encoder:
            self.scheduler = Scheduler(model, max_active=max_active, max_queue=max_queue,
                                       kv_cache_tokens=kv_cache_tokens, max_batch_tokens=max_batch_tokens,
                                       metrics=self.metrics)
            self.metrics.watch(self.scheduler.stats)

    @property
    def in_flight(self) -> int:
        return self.active + (self.scheduler.in_flight if self.scheduler else 0)

    def submit(self, prompts: list[list[int]], params: dict) -> list[Submitted]:
        """Queue one request per prompt; all or none (a 429 or a bad parameter aborts those queued already)."""
        subs: list[Submitted] = []
        try:
            for i, p in enumerate(prompts):
                subs.append(self.scheduler.submit(p, params, "prompt" if len(prompts) == 1 else f"prompt {i}"))
        except BaseException as e:
            for s in subs:
                self.scheduler.abort(s)
            if isinstance(e, APIError) and e.status == 429:
                self.metrics.requests_rejected.inc()
            raise
        return subs

    async def results(self, subs: list[Submitted]) -> list[Completion]:
        """Every request's whole result; if the caller goes away (cancelled), they are aborted."""
        try:
            return list(await asyncio.gather(*(completion(s) for s in subs)))
        except BaseException:
            for s in subs:
                self.scheduler.abort(s)
            raise

    async def run(self, fn: Callable, *args: Any) -> Any:
        """Run fn(*args) in the pool and wait for it without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot; returns the function that gives it back (idempotent)."""
        await self.slots.acquire()
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1
                self.slots.release()

        return release

    # -- work done in the pool ---------------------------------------------------------------------------------

    def encode_prompts(self, prompt: Any, param: str = "prompt") -> tuple[list[list[int]], list[str]]:
        """A completions `prompt` (text, texts, ids or lists of ids) as token id lists, checked against the
        context, and as texts."""
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param=param)
        tok = self.model.tokenizer
        ids, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                if tok is None:
                    raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param=param)
                texts.append(p)
                p = tok.encode(p)
            else:
                texts.append(tok.decode(p) if tok is not None else "")
            ids.append(self.check_length(list(p), param))
        return ids, texts

    def check_length(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param} is empty: at least one token is needed", param=param)
        if len(ids) >= self.context_length:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens, but the "
                                f"{param} has {len(ids)} tokens, which leaves no room for the completion.",
                           param=param, code="context_length_exceeded")
        return ids

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if self.model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it has no chat template", param="messages")
        ids = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       **({"tools": tools} if tools else {}))
        return self.check_length(ids, "messages")

    def tool_plan(self, messages: list[dict], body: ChatCompletionRequest) -> ToolPlan | None:
        """How the request's tools and tool_choice run (candlewick.tools); None for a request without tools."""
        if not body.tools and body.tool_choice in (None, "none"):
            return None
        tok = self.model.tokenizer
        if tok is None or tok.chat_template is None:
            raise APIError(400, "this model has no chat template, so it cannot take tools", param="tools")
        try:
            plan = tool_plan(messages, body.tools, body.tool_choice, body.parallel_tool_calls, tok.chat_template)
        except InvalidArgument as e:
            raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
        rf = body.response_format or {}
        if plan.parse and rf.get("type", "text") != "text":
            raise APIError(400, "response_format and tools cannot be used together (set tool_choice \"none\" to "
                                "answer in the format)", param="response_format")
        return plan

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its bytes (a byte-level BPE token may hold part of a UTF-8 character)."""
        tok = self.model.tokenizer
        return tok.decode([token_id], skip_special_tokens=False), list(tok.token_bytes(token_id))


# What every route may answer besides 200, in the OpenAPI document (OpenAI's error object; a request that fails
# validation is a 400 here, as OpenAI answers it, not FastAPI's 422).
ERRORS: dict = {code: {"model": ErrorResponse, "description": what} for code, what in [
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "no such model"),
    (413, "request body too large"), (429, "too many requests in flight"), (500, "internal error")]}
# ... and the generation routes answer a JSON object, or server-sent events with "stream": true
STREAMED: dict = {**ERRORS, 200: {"description": "the completion, or its chunks as server-sent events",
                                  "content": {"application/json": {}, "text/event-stream": {}}}}


def _now() -> int:
    return int(time.time())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _pieces(engine: Engine, token_ids: list[int], text: str) -> list[str]:
    """The text of each token as a stream would send it, joining to `text` (which a stop string may have cut)."""
    dec = engine.model.tokenizer.decoder()
    out, pos = [], 0
    for t in token_ids:
        piece = dec.step(t)
        take = piece if text.startswith(piece, pos) else text[pos:]
        out.append(take)
        pos += len(take)
    if out and pos < len(text):
        out[-1] += text[pos:]
    return out


# -- logprobs in OpenAI's two shapes ------------------------------------------------------------------------------

def completion_logprobs(engine: Engine, logprobs, pieces: list[str], offset: int = 0) -> dict:
    """Legacy completions: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}, where
    text_offset[i] is where token i's text starts in the returned text (`pieces` are those texts)."""
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": [engine.token_text(lp.token_id)[0] for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{engine.token_text(t)[0]: v for t, v in lp.top_logprobs} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(engine: Engine, logprobs) -> dict:
    """Chat: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = []
    for lp in logprobs:
        text, raw = engine.token_text(lp.token_id)
        top = []
        for t, v in lp.top_logprobs:
            ttext, traw = engine.token_text(t)
            top.append({"token": ttext, "logprob": v, "bytes": traw})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


class _Reader:
    """A streamed reply as chat deltas: {"content": ...} pieces, and with tools, {"tool_calls": [...]} for each
    call once it is complete (candlewick.tools.CallParser holds back text that may begin a call)."""

    def __init__(self, plan: ToolPlan | None):
        self.parser = CallParser(plan.names) if plan is not None and plan.parse else None
        self.calls = 0

    def _deltas(self, events) -> list[dict]:
        out = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
            else:
                out.append({"tool_calls": [{"index": self.calls, **value}]})
                self.calls += 1
        return out

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        return self._deltas(self.parser.finish()) if self.parser is not None else []

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason


# -- streaming ------------------------------------------------------------------------------------------------------

class _Stream(EventSourceResponse):
    """Server-sent events that run `on_close` however the response ends: finished, failed or client gone."""

    def __init__(self, content: AsyncIterator[dict], on_close: Callable[[], None]):
        super().__init__(content)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _event(obj: Any) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}


def create_app(model: Model, model_id: str, api_key: str | None = None, *, workers: int = 4,
               max_active: int = 64, max_queue: int = 256, kv_cache_tokens: int | None = None,
               max_batch_tokens: int = 512, max_body_bytes: int = 32 << 20,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI application serving `model` under the name `model_id`. With `api_key`, every /v1 request
    must carry `Authorization: Bearer <api_key>`. At most `max_active` sequences run in the batch and
    `max_queue` more requests wait; past that a request gets a 429. `kv_cache_tokens` sizes the KV cache (default:
    a quarter of the free memory); `max_batch_tokens` is the per-step token budget; `workers` threads tokenize,
    render chat templates and embed. A request body over `max_body_bytes` gets a 413. Browsers on other origins
    are refused (no CORS headers) unless `allowed_origins` lists them ("*" for any), as vLLM's --allowed-origins."""
    engine = Engine(model, workers=workers, max_active=max_active, max_queue=max_queue,
                    kv_cache_tokens=kv_cache_tokens, max_batch_tokens=max_batch_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if engine.scheduler is not None:
            engine.scheduler.close()
        engine.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="candlewick", version=_version(), lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id
    install(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    created = _now()

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")

    def check_generative() -> None:
        if engine.is_encoder:
            raise APIError(400, f"'{model_id}' is an encoder model: it serves /v1/embeddings only", param="model")

    def sampling(body) -> dict:
        try:
            return body.sampling_params()
        except ValueError as e:
            raise APIError(400, str(e), param="logit_bias") from None

    @app.get("/health", responses=ERRORS)
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "active_requests": engine.in_flight}

    @app.get("/metrics", responses={**ERRORS, 200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                                                       "description": "Prometheus text format"}})
    async def metrics() -> Response:
        # off the event loop: the scheduler's gauges wait for the step in flight
        body = await engine.run(generate_latest, engine.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def need_tokenizer() -> Any:
        if model.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="content")
        return model.tokenizer

    @app.post("/tokenize", dependencies=[Depends(authorize)], responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict:
        tok = need_tokenizer()
        ids = await engine.run(functools.partial(tok.encode, body.content, add_special_tokens=body.add_special))
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": i, "piece": engine.token_text(i)[0]} for i in ids]}

    @app.post("/detokenize", dependencies=[Depends(authorize)], responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict:
        tok = need_tokenizer()
        vocab = model.config["vocab_size"]
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="tokens")
        return {"content": await engine.run(functools.partial(tok.decode, body.tokens, skip_special_tokens=False))}

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=ERRORS)
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)], responses=ERRORS)
    async def get_model(name: str) -> dict:
        check_model(name)
        return _model_card(model_id, created)

    # -- /v1/completions -----------------------------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=[Depends(authorize)], responses=STREAMED)
    async def completions(body: CompletionRequest):
        check_model(body.model)
        check_generative()
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        params = sampling(body)
        params.update(max_new_tokens=body.max_tokens or 16, logprobs=body.logprobs,
                      response_format=body.response_format)
        rid, now = f"cmpl-{uuid.uuid4().hex}", _now()

        def chunk(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        prompts, texts = await engine.run(engine.encode_prompts, body.prompt)
        echo = texts if body.echo else [""] * len(prompts)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        subs = engine.submit(prompts, params)

        if body.stream and len(prompts) == 1 and body.n == 1 and body.logprobs is None and not body.echo:
            sub = subs[0]

            async def events():
                try:
                    generated = 0
                    async for p in pieces(sub):
                        generated += len(p.token_ids)
                        if p.text:
                            yield _event(chunk(0, p.text, None))
                        if p.finish_reason is not None:
                            yield _event(chunk(0, "", p.finish_reason))
                    if include_usage:
                        yield _event(_usage_chunk(rid, "text_completion", now, model_id,
                                                  _Usage(len(sub.prompt_ids), generated)))
                except Exception as e:  # the status is sent already: report the error as an event
                    yield _event(as_api_error(e).body())
                yield {"data": "[DONE]"}

            return _Stream(events(), lambda: engine.scheduler.abort(sub))

        results = await engine.results(subs)

        if body.stream:  # n > 1, logprobs or several prompts: generated whole, sent token by token
            async def replay():
                for p, c in enumerate(results):
                    for ch in c.choices:
                        index = p * body.n + ch.index
                        pieces = _pieces(engine, ch.token_ids, ch.text)
                        if echo[p]:
                            yield _event(chunk(index, echo[p], None))
                        offset = 0
                        for k, piece in enumerate(pieces):
                            lp = None
                            if ch.logprobs is not None:
                                lp = completion_logprobs(engine, ch.logprobs[k:k + 1], [piece], offset)
                            offset += len(piece)
                            yield _event(chunk(index, piece, None, lp))
                        yield _event(chunk(index, "", ch.finish_reason))
                if include_usage:
                    yield _event(_usage_chunk(rid, "text_completion", now, model_id, _sum_usage(results)))
                yield {"data": "[DONE]"}

            return EventSourceResponse(replay())

        choices = []
        for p, c in enumerate(results):
            for ch in c.choices:
                lp = None
                if ch.logprobs is not None:
                    lp = completion_logprobs(engine, ch.logprobs, _pieces(engine, ch.token_ids, ch.text))
                choices.append({"index": p * body.n + ch.index, "text": echo[p] + ch.text, "logprobs": lp,
                                "finish_reason": ch.finish_reason})
        return {"id": rid, "object": "text_completion", "created": now, "model": model_id, "choices": choices,
                "usage": _sum_usage(results), "system_fingerprint": None}

    # -- /v1/chat/completions ------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], responses=STREAMED)
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        check_generative()
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = sampling(body)
        # no max_tokens: until the end of the turn or the end of the context
        params.update(max_new_tokens=body.max_completion_tokens or body.max_tokens or engine.context_length,
                      logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                      response_format=body.response_format)
        messages = [m.for_template() for m in body.messages]
        plan = engine.tool_plan(messages, body)
        if plan is not None:
            messages = plan.messages
            if plan.grammar is not None:
                params["grammar"] = plan.grammar
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", _now()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "system_fingerprint": None,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        ids = await engine.run(engine.chat_ids, messages, plan.template_tools if plan else None)
        subs = engine.submit([ids], params)
        if body.stream and body.n == 1 and not body.logprobs:
            sub = subs[0]

            async def events():
                try:
                    yield _event(chunk(0, {"role": "assistant", "content": ""}, None))
                    generated = 0
                    reader = _Reader(plan)
                    async for p in pieces(sub):
                        generated += len(p.token_ids)
                        for delta in reader.feed(p.text):
                            yield _event(chunk(0, delta, None))
                        if p.finish_reason is not None:
                            for delta in reader.finish():
                                yield _event(chunk(0, delta, None))
                            yield _event(chunk(0, {}, reader.finish_reason(p.finish_reason)))
                    if include_usage:
                        yield _event(_usage_chunk(rid, "chat.completion.chunk", now, model_id,
                                                  _Usage(len(sub.prompt_ids), generated)))
                except Exception as e:
                    yield _event(as_api_error(e).body())
                yield {"data": "[DONE]"}

            return _Stream(events(), lambda: engine.scheduler.abort(sub))

        result = (await engine.results(subs))[0]

        if body.stream:  # n > 1 or logprobs: generated whole, sent token by token
            async def replay():
                for ch in result.choices:
                    yield _event(chunk(ch.index, {"role": "assistant", "content": ""}, None))
                    reader = _Reader(plan)
                    for k, piece in enumerate(_pieces(engine, ch.token_ids, ch.text)):
                        lp = chat_logprobs(engine, ch.logprobs[k:k + 1]) if ch.logprobs is not None else None
                        deltas = reader.feed(piece)
                        if lp is not None and not deltas:
                            deltas = [{"content": ""}]   # a token held back still reports its logprob
                        for j, delta in enumerate(deltas):
                            yield _event(chunk(ch.index, delta, None, lp if j == 0 else None))
                    for delta in reader.finish():
                        yield _event(chunk(ch.index, delta, None))
                    yield _event(chunk(ch.index, {}, reader.finish_reason(ch.finish_reason)))
                if include_usage:
                    yield _event(_usage_chunk(rid, "chat.completion.chunk", now, model_id, result.usage))
                yield {"data": "[DONE]"}

            return EventSourceResponse(replay())

        choices = []
        for ch in result.choices:
            message: dict[str, Any] = {"role": "assistant", "content": ch.text}
            finish = ch.finish_reason
            if plan is not None and plan.parse:
                content, calls = parse_reply(ch.text, plan.names)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({"index": ch.index, "message": message,
                            "logprobs": chat_logprobs(engine, ch.logprobs) if ch.logprobs is not None else None,
                            "finish_reason": finish})
        u = result.usage
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id, "choices": choices,
                "usage": _usage(u.prompt_tokens, u.completion_tokens), "system_fingerprint": None}

    # -- /v1/embeddings ------------------------------------------------------------------------------------------

    @app.post("/v1/embeddings", dependencies=[Depends(authorize)], responses=ERRORS)
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        if not engine.is_encoder:
            raise APIError(400, f"'{model_id}' is a causal language model: embeddings need an encoder model "
                                "(e.g. sentence-transformers/all-MiniLM-L6-v2)", param="model")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input must be text (a string or a list of strings); token ids are not supported",
                           param="input")
        release = await engine.acquire()
        try:
            vectors, counts = await engine.run(_embed, model, texts)
        finally:
            release()
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise APIError(400, f"this model's embeddings have {vectors.shape[1]} dimensions, not {body.dimensions}",
                           param="dimensions")
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
                        if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": model_id,
                "usage": {"prompt_tokens": counts, "total_tokens": counts}}

    return app


def _embed(model: Model, texts: list[str]) -> tuple[np.ndarray, int]:
    limit = model.config["context_length"]
    counts = sum(min(len(ids), limit) for ids in model.tokenizer.encode_batch(texts))
    return model.embed(texts), counts


class _Usage:
    def __init__(self, prompt_tokens: int, completion_tokens: int):
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens


def _usage_chunk(rid: str, obj: str, created: int, model_id: str, usage) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [],
            "usage": _usage(usage.prompt_tokens, usage.completion_tokens)}


def _sum_usage(results: list[Completion]) -> dict:
    return _usage(sum(c.usage.prompt_tokens for c in results), sum(c.usage.completion_tokens for c in results))


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "candlewick"}


def _version() -> str:
    from .. import __version__

    return __version__
