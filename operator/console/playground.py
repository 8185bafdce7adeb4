"""The chat playground: the browser posts a prompt here and the console relays it to an
OpenAI-compatible endpoint (`kubetune serve` locally, an InferenceService's URL on a cluster),
streaming the answer back as plain text as the tokens arrive. The relay keeps the endpoint's API
key (if any) on the server and lets the page talk to a server on another origin."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from kubetune.operator.console.form import read_form

if TYPE_CHECKING:
    from fastapi import FastAPI

TIMEOUT_S = 120
MAX_TOKENS = 4096


def _base(endpoint: str) -> str:
    """The endpoint's base URL; only http(s), so a request cannot make the console open files."""
    endpoint = endpoint.strip().rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError("the endpoint must be an http:// or https:// URL")
    return endpoint.removesuffix("/v1")


def models(endpoint: str, api_key: str | None = None) -> list[str]:
    """The model and adapter names the endpoint serves (`GET /v1/models`)."""
    request = urllib.request.Request(f"{_base(endpoint)}/v1/models", headers=_headers(api_key))
    with urllib.request.urlopen(request, timeout=10) as response:  # the scheme is checked in _base
        return [m.get("id", "") for m in json.load(response).get("data", [])]


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def chat_body(params: dict[str, Any]) -> dict[str, Any]:
    """The chat completion request for the playground's fields (streamed)."""
    messages = []
    if str(params.get("system") or "").strip():
        messages.append({"role": "system", "content": str(params["system"])})
    messages.append({"role": "user", "content": str(params.get("message") or "")})
    body: dict[str, Any] = {"model": str(params.get("model") or ""), "messages": messages, "stream": True}
    try:
        body["temperature"] = float(params.get("temperature") or 0)
        body["max_tokens"] = max(1, min(MAX_TOKENS, int(params.get("max_tokens") or 64)))
    except ValueError:
        body["max_tokens"] = 64
    return body


def stream_chat(endpoint: str, body: dict[str, Any], api_key: str | None = None) -> Iterator[str]:
    """The answer's text pieces as the endpoint streams them (OpenAI `data:` chunks)."""
    request = urllib.request.Request(f"{_base(endpoint)}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers=_headers(api_key), method="POST")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # the scheme is checked in _base
    except urllib.error.HTTPError as exc:
        yield f"[error {exc.code}: {exc.read(2000).decode(errors='replace')}]"
        return
    except OSError as exc:
        yield f"[error: cannot reach {endpoint}: {exc}]"
        return
    with response:
        for raw in response:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                choice = (json.loads(data).get("choices") or [{}])[0]
            except ValueError:
                continue
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def routes(app: FastAPI, console: Any) -> None:
    @app.get("/playground")
    def page(request: Request) -> Response:
        return console.page(request, "playground.jinja", endpoint=console.config.endpoint)

    @app.get("/playground/models")
    def list_models(endpoint: str) -> Response:
        try:
            names = models(endpoint, console.config.extra.get("api_key"))
        except (OSError, ValueError) as exc:
            return HTMLResponse(f'<option value="">({type(exc).__name__})</option>')
        from html import escape

        return HTMLResponse("".join(f'<option value="{escape(n)}">{escape(n)}</option>' for n in names))

    @app.post("/playground/chat")
    async def chat(request: Request) -> Response:
        params = await read_form(request)
        try:
            _base(str(params.get("endpoint") or ""))
        except ValueError as exc:
            return HTMLResponse(str(exc), status_code=400)
        pieces = stream_chat(str(params["endpoint"]), chat_body(params), console.config.extra.get("api_key"))
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
