"""`kubetune serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events in OpenAI's chunk format), `GET /health` (liveness: the
process answers), `GET /ready` (readiness: the model is loaded and the server is not draining),
`GET /metrics` (Prometheus), `GET /openapi.json` (the request bodies as FastAPI declares them), and
vLLM's runtime LoRA endpoints `POST /v1/load_lora_adapter` (`{"lora_name", "lora_path",
"load_inplace"}`; a directory under the model cache or an `--adapter-root`, or an `s3://` URI under
an `--adapter-root` prefix, see `adapter_access.py`) and `POST /v1/unload_lora_adapter`
(`{"lora_name"}`), which the InferenceService pods' `adapters` sidecar drives. The model changes on
the engine thread between two decode steps; requests admitted before an unload (or an in-place
reload) finish with the adapter they started with.

The model loads in the background after the socket opens, so liveness holds while a big model
loads and readiness turns on when it can serve. Requests become `Sequence`s in the scheduler's
queue and join the running batch on the engine thread at the next token step (continuous
batching, see `scheduler.py`); streamed text, and logprobs when asked for, flow back to each
handler through an asyncio queue. `best_of` generates extra samples and returns the `n` with the
highest mean token logprob. A client that disconnects cancels its sequences, which leave the
batch at the next step. With `KUBETUNE_API_KEY` (or `--api-key-env NAME`) set, the `/v1`
endpoints require `Authorization: Bearer <key>`, and `/ready` lists the served models only to
callers that send it; probes and metrics stay open. One request cannot stall the others: bodies
are capped (`--max-request-bytes`, see `guards.py`), parsed and tokenized off the event loop, and
a prompt too long for the context is refused before it is tokenized. On SIGTERM readiness turns
off at once (`DrainingServer`), the server keeps serving for `--drain-delay`, then uvicorn stops
accepting connections and waits (`--drain-timeout`) for in-flight requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune.trainer.api.errors import KubetuneError
from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.serve.adapter_access import AdapterAccess, adapter_limit, localize_adapter
from kubetune.trainer.serve.engine import Engine, UnknownModel
from kubetune.trainer.serve.guards import (
    ApiError,
    BodyLimitMiddleware,
    GuardedRoute,
    check_prompt_chars,
    validation_error,
)
from kubetune.trainer.serve.logprobs import LogprobFormatter, mean_logprob
from kubetune.trainer.serve.media import MAX_IMAGES
from kubetune.trainer.serve.metrics import ServerMetrics
from kubetune.trainer.serve.params import Event, InvalidRequest, SamplingParams, Sequence, TokenLogprob
from kubetune.trainer.serve.protocol import (
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_REQUEST_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    error_body,
)
from kubetune.trainer.serve.scheduler import Overloaded, Scheduler

log = logging.getLogger(__name__)

API_KEY_ENV = "KUBETUNE_API_KEY"
GENERATION_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}

__all__ = ["API_KEY_ENV", "ApiError", "ServerConfig", "create_app", "make_server", "serve"]


@dataclass
class ServerConfig:
    max_batch_size: int = 16
    batch_wait_s: float = 0.01
    max_queue: int = 1024
    api_key: str | None = None
    drain_timeout_s: float = 30.0
    """After the listener closes, how long in-flight requests get to finish."""
    drain_delay_s: float = 0.0
    """After SIGTERM, how long to keep accepting requests while /ready says 503, so that load
    balancers that follow readiness stop routing here first (0: stop accepting at once, as with a
    Kubernetes preStop sleep that already covers it)."""
    storage: StorageSpec | None = None
    """How `s3://` adapters given to `/v1/load_lora_adapter` are reached."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Larger request bodies get a 413 before they are read."""
    max_images: int = MAX_IMAGES
    """Images one chat request may carry (`--max-images`)."""
    adapter_roots: list[str] = field(default_factory=list)
    """Besides the model cache, the directories and `s3://` prefixes `/v1/load_lora_adapter` may
    load from (`--adapter-root`)."""
    max_adapters: int = DEFAULT_MAX_ADAPTERS
    """Adapters served at once; loading one more is a 409."""


@dataclass
class ServerState:
    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: Engine | None = None
    scheduler: Scheduler | None = None
    load_error: BaseException | None = None
    loaded: threading.Event = field(default_factory=threading.Event)
    on_load_error: Callable[[BaseException], None] | None = None
    draining: threading.Event = field(default_factory=threading.Event)
    """Set on SIGTERM: readiness turns off while in-flight requests finish."""
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kubetune-tokenize"))
    """Prompts are rendered and tokenized here, off the event loop (probes keep answering), one at
    a time as before (a fast tokenizer must not be reconfigured by two threads at once)."""

    def begin_drain(self) -> None:
        """Stop reporting ready (the Service stops routing here); requests are still served."""
        self.draining.set()
        self.metrics.ready.set(0)

    def attach(self, engine: Engine) -> None:
        self.scheduler = Scheduler(engine, max_batch_size=self.config.max_batch_size, batch_wait_s=self.config.batch_wait_s,
                                   max_queue=self.config.max_queue, metrics=self.metrics).start()
        self.engine = engine
        if not self.draining.is_set():
            self.metrics.ready.set(1)
        self.loaded.set()

    def load_in_background(self, loader: Callable[[], Engine]) -> None:
        try:
            self.attach(loader())
        except BaseException as exc:
            self.load_error = exc
            self.loaded.set()
            log.error("model loading failed: %s", exc)
            if self.on_load_error is not None:
                self.on_load_error(exc)

    @property
    def adapter_access(self) -> AdapterAccess:
        from kubetune.trainer.artifacts.cache import cache_root

        return AdapterAccess.build(self.config.adapter_roots, cache_root(self.config.storage), self.config.max_adapters)


def create_app(engine: Engine | None = None, *, loader: Callable[[], Engine] | None = None,
               config: ServerConfig | None = None, on_load_error: Callable[[BaseException], None] | None = None):
    """The ASGI app. Pass a loaded `engine`, or a `loader` that builds one in the background."""
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine and loader")
    state = ServerState(config=config or ServerConfig(), on_load_error=on_load_error)
    state.adapter_access  # noqa: B018 - a malformed --adapter-root fails here, not at the first load

    @asynccontextmanager
    async def lifespan(app):
        if engine is not None:
            state.attach(engine)
        else:
            threading.Thread(target=state.load_in_background, args=(loader,), name="kubetune-loader", daemon=True).start()
        yield
        # uvicorn has stopped accepting and waited for open requests; finish what is queued.
        state.metrics.ready.set(0)
        state.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.stop, state.config.drain_timeout_s)
        if state.engine is not None:
            state.engine.close()

    # strict_content_type=False: a JSON body without a Content-Type header is read as JSON, as before.
    app = FastAPI(title="kubetune", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", strict_content_type=False)
    app.state.kubetune = state
    app.add_middleware(BodyLimitMiddleware, limit=state.config.max_request_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.include_router(probes)
    app.include_router(v1)
    return app


# -- errors, auth, engine access -----------------------------------------------------------------
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    response = await validation_error(request, exc)
    _count_refused(request, response.status_code)
    return response


def _count_refused(request: Request, status: int) -> None:
    """Count a generation request refused before its handler ran (bad body, no key), as the
    handler counts the ones it refuses."""
    endpoint = GENERATION_PATHS.get(request.url.path)
    if endpoint is not None:
        request.app.state.kubetune.metrics.requests.labels("unknown", endpoint, str(status)).inc()


def state_of(request: Request) -> ServerState:
    return request.app.state.kubetune


bearer = HTTPBearer(auto_error=False, description=f"The server's API key (${API_KEY_ENV}, or the variable --api-key-env names).")


def authorized(state: ServerState, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether the request may use `/v1` (always, when no API key is configured)."""
    key = state.config.api_key
    if not key:
        return True
    token = credentials.credentials.strip() if credentials is not None else ""
    return hmac.compare_digest(token.encode(), key.encode())


async def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    if not authorized(state_of(request), credentials):
        _count_refused(request, 401)
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def ready_engine(state: ServerState) -> Engine:
    if state.load_error is not None:
        raise ApiError(503, f"the model failed to load: {state.load_error}", type="server_error", code="model_load_failed")
    if state.engine is None or state.scheduler is None:
        raise ApiError(503, "the model is still loading; retry shortly.", type="server_error", code="model_loading")
    return state.engine


def translate(exc: Exception) -> ApiError:
    if isinstance(exc, UnknownModel):
        return ApiError(404, f"The model `{exc.name}` does not exist. Available models: {', '.join(exc.known)}.", param="model", code="model_not_found")
    if isinstance(exc, InvalidRequest):
        message = exc.problem + (f" Please {exc.fix}" if exc.fix and exc.code else (f" Fix: {exc.fix}" if exc.fix else ""))
        return ApiError(400, message, param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, Overloaded):
        return ApiError(503, f"The server is overloaded: {exc}. Retry later.", type="server_error", code="overloaded")
    if isinstance(exc, KubetuneError):
        return ApiError(400, str(exc))
    raise exc


# -- probes, metrics --------------------------------------------------------------------------------
probes = APIRouter(route_class=GuardedRoute)


@probes.get("/health")
async def health():
    return {"status": "ok"}


@probes.get("/ready")
async def ready(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
    """Readiness. The served model names are listed only to callers allowed to use `/v1`: with an
    API key configured they would tell anyone which adapters (customers) this server serves."""
    state = state_of(request)
    if state.draining.is_set():
        return JSONResponse({"status": "draining", "error": None}, status_code=503)
    if state.engine is not None and state.scheduler is not None and state.load_error is None:
        if authorized(state, credentials):
            return {"status": "ready", "models": state.engine.model_names}
        return {"status": "ready"}
    status = "failed" if state.load_error is not None else "loading"
    return JSONResponse({"status": status, "error": str(state.load_error) if state.load_error else None}, status_code=503)


@probes.get("/metrics")
async def metrics(request: Request):
    body, content_type = state_of(request).metrics.render()
    return Response(body, media_type=content_type)


@probes.get("/")
async def root():
    return PlainTextResponse("kubetune OpenAI-compatible server: see /v1/models\n")


# -- /v1: models, runtime LoRA adapters (vLLM's API), generation ----------------------------------------
v1 = APIRouter(prefix="/v1", route_class=GuardedRoute, dependencies=[Depends(require_key)])


@v1.get("/models")
async def models(request: Request):
    eng = ready_engine(state_of(request))
    created = int(time.time())
    data = [{"id": eng.base_name, "object": "model", "created": created, "owned_by": "kubetune",
             "root": eng.base_name, "parent": None}]
    roots = getattr(eng, "roots", {})
    data += [{"id": name, "object": "model", "created": created, "owned_by": "kubetune", "root": roots.get(name, path),
              "parent": eng.base_name} for name, path in list(eng.adapters.items())]
    return {"object": "list", "data": data}


@v1.get("/models/{name}")
async def model(name: str, request: Request):
    eng = ready_engine(state_of(request))
    try:
        eng.adapter_for(name)
    except UnknownModel as exc:
        raise translate(exc) from None
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "kubetune"}


def runtime_engine(state: ServerState) -> Any:
    eng = ready_engine(state)
    if not hasattr(eng, "load_adapter"):
        raise ApiError(400, f"the {eng.name} engine cannot load adapters at runtime.", code="not_supported")
    return eng


async def on_engine_thread(state: ServerState, fn: Callable[[], Any]) -> Any:
    try:
        return await asyncio.wrap_future(state.scheduler.call(fn))  # type: ignore[union-attr]
    except Overloaded as exc:
        raise translate(exc) from None


@v1.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoraAdapterRequest, request: Request):
    state = state_of(request)
    eng = runtime_engine(state)
    name = req.lora_name
    if name == eng.base_name:
        raise ApiError(400, f"The lora adapter name '{name}' is the base model's name.", param="lora_name",
                       code="invalid_value")
    if name in eng.adapters and not req.load_inplace:
        raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                       "in place, set 'load_inplace' to True.", param="lora_name", code="invalid_value")
    access = state.adapter_access
    path = await localize_adapter(access, state.config.storage or StorageSpec(), name, req.lora_path)

    def load() -> None:  # on the engine thread: two loads cannot both pass the limit
        if name not in eng.adapters and len(eng.adapters) >= access.max_adapters:
            raise adapter_limit(access, len(eng.adapters))
        eng.load_adapter(name, path, root=req.lora_path, replace=req.load_inplace)

    try:
        await on_engine_thread(state, load)
    except KubetuneError as exc:
        raise ApiError(400, f"Loading lora {name} failed: {exc}", param="lora_path", code="invalid_value") from None
    log.info("loaded LoRA adapter %s from %s", name, req.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@v1.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(req: UnloadLoraAdapterRequest, request: Request):
    state = state_of(request)
    eng = runtime_engine(state)
    name = req.lora_name
    if name == eng.base_name:
        raise ApiError(400, f"The base model '{name}' cannot be unloaded.", param="lora_name", code="invalid_value")
    try:
        await on_engine_thread(state, lambda: eng.unload_adapter(name))
    except UnknownModel:
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", type="NotFoundError", param="lora_name",
                       code="model_not_found") from None
    log.info("unloaded LoRA adapter %s", name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


@v1.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    return await generate(request, "chat", req)


@v1.post("/completions")
async def completions(req: CompletionRequest, request: Request):
    return await generate(request, "completions", req)


async def generate(request: Request, endpoint: str, req: ChatCompletionRequest | CompletionRequest):
    state = state_of(request)
    started = time.monotonic()
    model_label = "unknown"
    try:
        eng = ready_engine(state)
        try:
            adapter = eng.adapter_for(req.model)
            model_label = req.model
            params = req.sampling()
            if (params.logprobs is not None or params.prompt_logprobs is not None) and not eng.supports_logprobs:
                param = "logprobs" if req.logprobs not in (None, False) else "best_of"
                raise InvalidRequest(param, f"{param} needs token logprobs, which are not computed with "
                                     "speculative decoding.", "serve without --draft-model/--prompt-lookup.")
            prompts, media = await prompt_ids(state, eng, req, params)
            run = Run(state, endpoint, req, prompts, params, adapter, lstrip=endpoint == "chat", media=media)
            run.submit()
        except (KubetuneError, Overloaded) as exc:
            raise translate(exc) from None
    except ApiError as exc:
        state.metrics.requests.labels(model_label, endpoint, str(exc.status)).inc()
        state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        raise
    if req.stream:
        return StreamingResponse(run.stream(request, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await run.collect(request, started))


async def prompt_ids(state: ServerState, eng: Engine, req: ChatCompletionRequest | CompletionRequest,
                     params: SamplingParams) -> tuple[list[list[int]], list[dict | None]]:
    """The request's prompts as token ids, each checked against the context, and each prompt's
    pictures (`Sequence.media`; None for text). A prompt with more characters than the context
    could hold is refused before tokenizing; fetching images, rendering and tokenizing run on
    `state.tokenize_pool`, so a long prompt does not hold up the event loop (probes, streams)."""
    from kubetune.trainer.serve.media import fetch_images, image_urls

    media: list[dict | None] = [None]
    if isinstance(req, ChatCompletionRequest):
        param = "messages"
        messages = [m.as_template_message(eng.image_token) for m in req.messages]
        urls = [url for m in req.messages for url in image_urls(m.content)]
        tools = req.offered_tools()
        if tools and not eng.template_supports_tools(req.model):
            raise InvalidRequest("tools", f"the chat template of {req.model!r} does not render tools, so the "
                                 "model would never see them.", "send the request without tools, or serve "
                                 "the model with a template that uses `tools` (--template).")
        check_prompt_chars(sum(len(m["content"]) for m in messages), eng.context_length, param)

        def encode() -> list[list[int]]:
            if not urls:
                return [eng.encode_chat(messages, req.model, tools=tools)]
            images = fetch_images(urls, state.config.storage, max_images=state.config.max_images)
            ids, media[0] = eng.encode_chat_images(messages, images, req.model, tools=tools)
            return [ids]
    else:
        param = "prompt"
        texts = req.prompts()
        for text in texts:
            if isinstance(text, str):
                check_prompt_chars(len(text), eng.context_length, param)

        def encode() -> list[list[int]]:
            return [p if isinstance(p, list) else eng.encode_text(p) for p in texts]

    prompts = await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, encode)
    vocab = len(eng.tokenizer)
    for ids in prompts:
        if not ids:
            raise InvalidRequest(param, "the prompt is empty once tokenized.", "send a longer prompt.")
        eng.check_length(len(ids), params, param)
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequest("prompt", "the prompt holds token ids outside the vocabulary.")
    return prompts, media if len(media) == len(prompts) else [None] * len(prompts)


class Run:
    """One request's sequences (`n`, or `best_of`, per prompt) and the events flowing back from the engine."""

    def __init__(self, state: ServerState, endpoint: str, req: Any, prompts: list[list[int]], params: SamplingParams,
                 adapter: str | None, *, lstrip: bool, media: list[dict | None] | None = None):
        self.state = state
        self.endpoint = endpoint
        self.req = req
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.per_prompt = req.samples_per_prompt
        self.returned = req.n
        """Choices returned per prompt: `n` (the best of `per_prompt` when `best_of` > n)."""
        self.report_logprobs = bool(req.logprobs) if endpoint == "chat" else req.logprobs is not None
        self.sequences: list[Sequence] = []
        for p_index, ids in enumerate(prompts):
            for j in range(self.per_prompt):
                index = p_index * self.per_prompt + j
                seq = Sequence(prompt_ids=ids, params=params.for_choice(j), adapter=adapter, lstrip=lstrip,
                               emit=self._emitter(index), tag=index, media=(media or [None] * len(prompts))[p_index])
                self.sequences.append(seq)
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.completion_tokens = 0
        self.status = "200"

    def _emitter(self, index: int):
        def emit(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        return emit

    def submit(self) -> None:
        self.state.scheduler.submit(self.sequences)  # type: ignore[union-attr]
        self.state.metrics.in_flight.inc()

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancelled.set()

    def _finish_metrics(self, started: float) -> None:
        m = self.state.metrics
        m.in_flight.dec()
        m.requests.labels(self.req.model, self.endpoint, self.status).inc()
        m.latency.labels(self.endpoint).observe(time.monotonic() - started)
        m.prompt_tokens.labels(self.req.model).inc(self.prompt_tokens)
        m.generation_tokens.labels(self.req.model).inc(self.completion_tokens)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def echo_logprobs(self) -> bool:
        """Completions with `echo` and `logprobs`: the prompt's tokens are scored and listed first."""
        return self.endpoint == "completions" and self.report_logprobs and bool(self.req.echo)

    def _formatter(self, seq: Sequence) -> LogprobFormatter | None:
        if not self.report_logprobs:
            return None
        # With echo the listed tokens start at the prompt's first one (offset 0 of the echoed text).
        return LogprobFormatter(self.state.engine.tokenizer, [] if self.echo_logprobs else seq.prompt_ids)  # type: ignore[union-attr]

    def _logprobs(self, formatter: LogprobFormatter | None, entries: list[TokenLogprob] | None, *,
                  prompt_of: Sequence | None = None) -> dict[str, Any] | None:
        """A choice's (or chunk's) `logprobs` object, or None when the request did not ask for them.
        `prompt_of`: list that sequence's prompt tokens first (echo)."""
        if formatter is None:
            return None
        if self.endpoint == "chat":
            return {"content": formatter.chat(entries or []), "refusal": None}
        if prompt_of is not None:
            return formatter.completion(entries or [], prompt=prompt_of.prompt_ids, prompt_entries=prompt_of.prompt_logprobs)
        return formatter.completion(entries or [])

    async def _next(self, request: Any, poll_s: float = 0.5) -> tuple[int, Event] | None:
        """The next event; None when the client has gone away."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), poll_s)
            except TimeoutError:
                if await request.is_disconnected():
                    return None

    def _chosen(self) -> list[Sequence]:
        """The sequences to return: all of them, or per prompt the `n` of `best_of` with the
        highest mean token logprob (OpenAI's "best" for `best_of`), in generation order."""
        if self.per_prompt == self.returned:
            return self.sequences
        chosen: list[Sequence] = []
        for start in range(0, len(self.sequences), self.per_prompt):
            group = self.sequences[start:start + self.per_prompt]
            best = sorted(group, key=lambda seq: mean_logprob(seq.logprobs), reverse=True)[: self.returned]
            chosen += sorted(best, key=lambda seq: seq.tag)
        return chosen

    async def collect(self, request: Any, started: float) -> dict[str, Any]:
        texts = {seq.tag: "" for seq in self.sequences}
        reasons: dict[int, str] = {}
        error: str | None = None
        try:
            while len(reasons) < len(self.sequences):
                item = await self._next(request)
                if item is None:
                    self.status = "499"
                    self.cancel()
                    break
                index, event = item
                texts[index] += event.text
                self.completion_tokens += event.tokens
                if event.finish_reason is not None:
                    reasons[index] = event.finish_reason
                    error = error or event.error
        finally:
            self.cancel()
            if error:
                self.status = "500"
            self._finish_metrics(started)
        if error:
            raise ApiError(500, f"generation failed: {error}", type="server_error")
        model = self.req.model
        choices = []
        for i, seq in enumerate(self._chosen()):
            logprobs = self._logprobs(self._formatter(seq), (seq.logprobs or [])[: len(seq.token_ids)],
                                      prompt_of=seq if self.echo_logprobs else None)
            reason = reasons.get(seq.tag, "stop")
            if self.endpoint == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[seq.tag]},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": self._echo(seq.tag) + texts[seq.tag], "logprobs": logprobs,
                                "finish_reason": reason})
        obj = "chat.completion" if self.endpoint == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": model, "choices": choices,
                "usage": self.usage(), "system_fingerprint": None}

    def _echo(self, index: int) -> str:
        if self.endpoint != "completions" or not self.req.echo:
            return ""
        seq = self.sequences[index]
        return self.state.engine.tokenizer.decode(seq.prompt_ids, skip_special_tokens=True)  # type: ignore[union-attr]

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        payload: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                                   "choices": choices, "system_fingerprint": None}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(self, request: Any, started: float) -> AsyncIterator[str]:
        chat = self.endpoint == "chat"
        finished: set[int] = set()
        first_token = True
        formatters = {seq.tag: self._formatter(seq) for seq in self.sequences}
        echo_pending = {seq.tag for seq in self.sequences} if self.echo_logprobs else set()
        try:
            for seq in self.sequences:
                if chat:
                    yield self._chunk([{"index": seq.tag, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
                elif self.req.echo and not echo_pending:
                    yield self._chunk([{"index": seq.tag, "text": self._echo(seq.tag), "logprobs": None, "finish_reason": None}])
            while len(finished) < len(self.sequences):
                item = await self._next(request)
                if item is None:
                    self.status = "499"
                    return
                index, event = item
                self.completion_tokens += event.tokens
                if index in echo_pending and not event.error:
                    # The prompt's logprobs exist once the sequence is prefilled, i.e. by its first event.
                    echo_pending.discard(index)
                    seq = self.sequences[index]
                    yield self._chunk([{"index": index, "text": self._echo(index), "finish_reason": None,
                                        "logprobs": self._logprobs(formatters[index], [], prompt_of=seq)}])
                if event.error:
                    self.status = "500"
                    yield f"data: {json.dumps(error_body(f'generation failed: {event.error}', type='server_error'))}\n\n"
                    return
                logprobs = self._logprobs(formatters[index], event.logprobs) if event.logprobs else None
                if event.text or logprobs:
                    if first_token:
                        first_token = False
                        self.state.metrics.ttft.labels(self.endpoint).observe(time.monotonic() - started)
                    piece = {"delta": {"content": event.text}} if chat else {"text": event.text}
                    yield self._chunk([{"index": index, **piece, "logprobs": logprobs, "finish_reason": None}])
                if event.finish_reason is not None:
                    finished.add(index)
                    piece = {"delta": {}} if chat else {"text": ""}
                    yield self._chunk([{"index": index, **piece, "logprobs": None, "finish_reason": event.finish_reason}])
            if self.req.include_usage:
                yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            # Normal end, an error, or the client went away (the generator is cancelled or closed):
            # either way the sequences must leave the batch now.
            if len(finished) < len(self.sequences) and self.status == "200":
                self.status = "499"  # client closed the request
            self.cancel()
            self._finish_metrics(started)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with readiness off from the first SIGTERM/SIGINT on.

    The first signal marks the server draining at once (`/ready` 503, `kubetune_model_ready` 0)
    and, after `drain_delay_s` of still accepting requests, does what uvicorn does: stop
    listening, give in-flight requests `drain_timeout_s`, then run the app's shutdown (the
    scheduler finishes what is queued). A second signal skips the rest of the delay; a SIGINT after
    that quits at once, as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._delayed: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining.is_set():  # a second signal: stop accepting now
            if self._delayed is not None:
                self._delayed.cancel()
            super().handle_exit(sig, frame)
            return
        self.state.begin_drain()
        delay = self.state.config.drain_delay_s
        if delay <= 0:
            log.info("draining: not ready any more, closing the listener")
            super().handle_exit(sig, frame)
            return
        log.info("draining: not ready any more, closing the listener in %gs", delay)
        self._delayed = threading.Timer(delay, super().handle_exit, args=(sig, None))
        self._delayed.daemon = True
        self._delayed.start()


def make_server(app: Any, **uvicorn_kwargs: Any) -> DrainingServer:
    """A uvicorn server for an app from `create_app` that drains the Kubernetes way."""
    state: ServerState = app.state.kubetune
    uvicorn_kwargs.setdefault("timeout_graceful_shutdown", int(state.config.drain_timeout_s) or None)
    return DrainingServer(uvicorn.Config(app, **uvicorn_kwargs), state)


def serve(model: str, *, host: str = "0.0.0.0", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info", template: str | None = None, **engine_kwargs: Any) -> int:
    """Run the server until SIGINT/SIGTERM (blocking). Returns the exit code."""
    from kubetune.trainer.serve.engines import create_engine

    failure: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_error(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    if not model.startswith(("s3://", "builtin:")):
        # Fail fast (exit 2, before listening) on a local path that is not there.
        from kubetune.trainer.serve.loading import resolve_path

        resolve_path(model, engine_kwargs.get("storage") or StorageSpec(), "model")

    def load() -> Engine:
        engine = create_engine(model, **engine_kwargs)
        if template:
            engine.set_template(template)
        return engine

    config = config or ServerConfig()
    if config.storage is None:
        config.storage = engine_kwargs.get("storage")
    app = create_app(loader=load, config=config, on_load_error=on_load_error)
    server = make_server(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
    server.run()
    if failure:
        exc = failure[0]
        if isinstance(exc, KubetuneError):
            raise exc
        raise KubetuneError(f"the model failed to load: {type(exc).__name__}: {exc}")
    return 0
