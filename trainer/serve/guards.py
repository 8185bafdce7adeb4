"""What keeps one request from taking `kubetune serve` down: body-size limits, a bounded JSON
parse, OpenAI-shaped errors for malformed bodies, and a cheap prompt-length bound.

The server used to read any body whole, parse it on the event loop and tokenize the prompt there
before checking its length: one 50 MB request grew the process by gigabytes and a 1 MB prompt
kept `/health` from answering for seconds. Now a body over `--max-request-bytes` is refused with
a 413 before it is read (by its Content-Length, or as soon as a chunked body passes the limit), the
JSON parse runs in a worker thread and refuses nesting deeper than `MAX_JSON_DEPTH`, and a prompt
with more characters than any context-length text could have is refused before tokenizing.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune.trainer.serve.params import InvalidRequest
from kubetune.trainer.serve.protocol import error_body

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a request body may have (OpenAI's bodies need about 8;
tool schemas a few more). Deeper bodies are refused before anything recurses through them."""
MAX_CHARS_PER_TOKEN = 64
"""No tokenizer in use packs more characters than this into one token on average (long runs of
spaces or dashes come closest), so a prompt longer than context_length * 64 characters cannot
fit the context: it is refused without tokenizing it."""


class ApiError(HTTPException):
    """An error answered in OpenAI's shape. An HTTPException, so that FastAPI passes it through
    unchanged when it is raised while the body is read or parsed."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(status, message)
        self.status = status
        self.body = error_body(message, type=type, param=param, code=code)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server's limit of {limit} bytes. Send a shorter "
                    "prompt, or raise the limit with `kubetune serve --max-request-bytes`.", code="request_too_large")


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with a 413 in OpenAI's shape, without reading them:
    a declared Content-Length over the limit is answered before the app runs, and a chunked body is
    counted as it arrives and refused once it passes the limit (uvicorn stops reading the socket
    while the app does not ask for more, so nothing past the limit is buffered). Starlette's own
    body-limit middleware answers in plain text, which OpenAI's clients cannot parse."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(body_too_large(self.limit), send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise body_too_large(self.limit)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except ApiError as exc:  # raised by counted_receive outside a handler that renders it
            if started or exc.status != 413:
                raise
            await _send_error(exc, send)


async def _send_error(exc: ApiError, send: Send) -> None:
    body = json.dumps(exc.body).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body; an ApiError (400, `invalid_json`) for anything that is not
    JSON or nests deeper than `MAX_JSON_DEPTH` (the standard parser recurses per level)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise too_deep() from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}). Send a JSON object.",
                       code="invalid_json") from None
    if (raw.count(b"[") + raw.count(b"{")) > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep()
    return value


def too_deep() -> ApiError:
    return ApiError(400, f"The JSON body of your request nests arrays/objects more than {MAX_JSON_DEPTH} levels deep. "
                    "Send a flatter body.", code="invalid_json")


def json_depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value, without recursion (0 for a scalar)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


class GuardedRequest(Request):
    """A request whose JSON body is parsed in a worker thread with `parse_json`: a big body does not
    stall the event loop, and a malformed or too deeply nested one is a 400 in OpenAI's shape."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await run_in_threadpool(parse_json, await self.body())
        return self._json


class GuardedRoute(APIRoute):
    """FastAPI's route with `GuardedRequest` (FastAPI's documented way to customise body parsing)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            return await handler(GuardedRequest(request.scope, request.receive))

        return guarded


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that does not match the request model, as OpenAI's 400 naming the
    first offending field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return JSONResponse(error_body("We could not parse the JSON body of your request. Send a JSON object.",
                                       code="invalid_json"), status_code=400)
    if not loc and isinstance(err.get("input"), bytes | str):
        message = "The request body must be a JSON object sent with `Content-Type: application/json`."
        return JSONResponse(error_body(message, code="invalid_json"), status_code=400)
    if not loc:
        return JSONResponse(error_body(f"The request body must be a JSON object ({err['msg']}).", code="invalid_json"),
                            status_code=400)
    param = ".".join(loc)
    return JSONResponse(error_body(f"Invalid value for '{param}': {err['msg']}.", param=param, code="invalid_value"),
                        status_code=400)


def check_prompt_chars(chars: int, context_length: int, param: str) -> None:
    """Refuse a prompt that cannot fit the context whatever the tokenizer, before tokenizing it
    (tokenizing megabytes of text is what made one request stall the server)."""
    limit = context_length * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise InvalidRequest(
            param,
            f"This model's maximum context length is {context_length} tokens. However, the {param} has {chars} "
            f"characters, more than {context_length} tokens can hold (at most {limit} characters).",
            "reduce the length of the prompt.",
            code="context_length_exceeded",
        )
