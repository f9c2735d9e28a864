"""The server's side of the engine's scheduler (candlewick._native.Engine): one loop thread runs its steps,
requests from the event loop join the running batch at the next step, and each request's pieces come back on an
asyncio queue of its own.

A request is admitted while fewer than `max_active + max_queue` are in flight; past that, `submit` raises a
429 with Retry-After (OpenAI's error shape). A client that leaves aborts its request: its sequence and KV blocks
are freed at the next step.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _native
from ..model import Completion, Model, _native_params
from .errors import APIError
from .metrics import Metrics


@dataclass
class Piece:
    """What one step gave one choice: text safe to show, token ids, logprobs, and the finish reason at the end."""
    choice: int
    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Submitted:
    id: int
    prompt_ids: list[int]
    n: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    want_logprobs: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    last_at: list[float] = field(default_factory=list)  # per choice: when its last piece came
    left: int = 0


class Scheduler:
    def __init__(self, model: Model, *, max_active: int = 64, max_queue: int = 256,
                 kv_cache_tokens: int | None = None, max_batch_tokens: int = 512, metrics: Metrics | None = None):
        self.native = _native.Engine(model._native, kv_cache_tokens=kv_cache_tokens,
                                     max_batch_tokens=max_batch_tokens, max_seqs=max_active)
        self.max_in_flight = max_active + max_queue
        self.metrics = metrics
        self._requests: dict[int, Submitted] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="candlewick-scheduler", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def submit(self, prompt_ids: list[int], params: dict[str, Any], what: str = "prompt") -> Submitted:
        """Queue a request (parameters as Model.generate takes them); bad parameters raise InvalidArgument."""
        with self._lock:
            if len(self._requests) >= self.max_in_flight:
                raise APIError(429, f"The server is busy: {len(self._requests)} requests are in flight, at most "
                                    f"{self.max_in_flight}. Retry shortly.", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
            rid, ids = self.native.add(prompt_ids, _native_params(params), what)
            n = int(params.get("n") or 1)
            sub = Submitted(rid, ids, n, asyncio.Queue(), asyncio.get_running_loop(),
                            want_logprobs=params.get("logprobs") is not None, left=n)
            sub.last_at = [sub.submitted_at] * n
            self._requests[rid] = sub
        if self.metrics:
            self.metrics.requests_submitted.inc()
        self._wake.set()
        return sub

    def abort(self, sub: Submitted) -> None:
        with self._lock:
            if self._requests.pop(sub.id, None) is None:
                return
        self.native.abort(sub.id)
        if self.metrics:
            self.metrics.requests_aborted.inc()
        self._wake.set()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def stats(self) -> dict:
        return self.native.stats()

    def _run(self) -> None:
        while not self._stopped:
            if not self.native.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.native.step()
            except BaseException as e:  # a failed step fails the requests in flight, not the server
                with self._lock:
                    subs, self._requests = list(self._requests.values()), {}
                for s in subs:
                    self.native.abort(s.id)
                    s.loop.call_soon_threadsafe(s.queue.put_nowait, e)
                continue
            now = time.perf_counter()
            with self._lock:
                for rid, choice, text, ids, lps, finish, prompt_tokens, cached, error in deltas:
                    sub = self._requests.get(rid)
                    if sub is None:
                        continue  # aborted meanwhile
                    if error is not None:   # this request failed alone (its grammar): the others go on
                        del self._requests[rid]
                        self.native.abort(rid)
                        failure = RuntimeError(f"generation failed: {error}")
                        sub.loop.call_soon_threadsafe(sub.queue.put_nowait, failure)
                        continue
                    if self.metrics and ids:
                        first = sub.last_at[choice] == sub.submitted_at
                        (self.metrics.ttft if first else self.metrics.itl).observe(now - sub.last_at[choice])
                        self.metrics.generation_tokens.inc(len(ids))
                        if first and choice == 0:
                            self.metrics.prompt_tokens.inc(prompt_tokens)
                            self.metrics.cached_prompt_tokens.inc(cached)
                    sub.last_at[choice] = now
                    piece = Piece(choice, text, ids, lps, finish, prompt_tokens, cached)
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, piece)
                    if finish is not None:
                        sub.left -= 1
                        if self.metrics:
                            self.metrics.finished.labels(finish_reason=finish).inc()
                        if sub.left == 0:
                            del self._requests[rid]


async def pieces(sub: Submitted):
    """The pieces of a request as they come, until every choice has finished."""
    left = sub.n
    while left:
        p = await sub.queue.get()
        if isinstance(p, BaseException):
            raise p
        if p.finish_reason is not None:
            left -= 1
        yield p


async def completion(sub: Submitted) -> Completion:
    """A request's whole result, as Model.generate returns it."""
    choices = [{"text": "", "token_ids": [], "finish_reason": None, "logprobs": [] if sub.want_logprobs else None}
               for _ in range(sub.n)]
    async for p in pieces(sub):
        c = choices[p.choice]
        c["text"] += p.text
        c["token_ids"] += p.token_ids
        if c["logprobs"] is not None:
            c["logprobs"] += p.logprobs
        c["finish_reason"] = p.finish_reason
    return Completion._from_native({"prompt_token_ids": sub.prompt_ids, "choices": choices})
