"""Every failure as OpenAI's error object, {"error": {"message", "type", "param", "code"}}, with a 4xx/5xx status."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CandlewickError, DeviceError

log = logging.getLogger("candlewick.server")

# as OpenAI's API answers: a request it cannot serve is an invalid_request_error, whatever the status
_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


class APIError(Exception):
    """An error to answer with: status, message, and the request field (`param`) and `code` it concerns."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def as_api_error(e: BaseException) -> APIError:
    """Map anything raised while serving a request onto the error a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, DeviceError):
        return APIError(500, str(e), type="server_error")
    if isinstance(e, (CandlewickError, ValueError, TypeError)):  # a bad value in the request
        return APIError(400, str(e))
    log.exception("internal error", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {first['msg']}")
    # loc is the field, then list indices and sub-fields and, for unions, the alternative that failed ("str")
    path = loc[0]
    for x in loc[1:]:
        if x.isdigit():
            path += f"[{x}]"
        elif x.isidentifier() and x not in _TYPE_NAMES:
            path += f".{x}"
    return APIError(400, f"invalid value for '{path}': {first['msg']}", param=loc[0],
                    code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return APIError(exc.status_code, message).response()

    @app.exception_handler(CandlewickError)
    async def _candlewick(request: Request, exc: CandlewickError):
        return as_api_error(exc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return as_api_error(exc).response()


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 in OpenAI's error shape, told by its
    Content-Length before any of it is read; a chunked upload is read here and refused as soon as the bytes read
    pass the limit (the server behind reads the Content-Length it is given, within the limit, as uvicorn
    delivers it)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than this server takes ({self.max_bytes} bytes; "
                             "see `candlewick serve --max-body`)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._error().response()(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        # no Content-Length (a chunked upload): read it here, up to the limit, and hand it on whole
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._error().response()(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
