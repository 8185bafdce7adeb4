"""The console's web application: server-rendered pages (FastAPI + Jinja2), htmx for partial
updates, server-sent events for live curves. `create_app` takes everything it needs in a
`ConsoleConfig`; nothing is read from flags or the environment here."""

from __future__ import annotations

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from kubetune.operator.console import charts, form, i18n, playground
from kubetune.operator.console.runs import LocalRuns, NoLocalRuns, RunRow
from kubetune.trainer.api.errors import KubetuneError, SpecError, SpecErrors

HERE = Path(__file__).parent
HEALTH = "/healthz"
MAX_BODY = 1024 * 1024
TERMINAL = ("Succeeded", "Failed")
TOKEN_COOKIE = "kubetune_console_token"
LOG_EVENT_BYTES = 16 * 1024


@dataclass
class ConsoleConfig:
    runs_dir: Path
    token: str | None = None
    cluster: Any = None  # a cluster.Cluster, or None for local mode only
    namespace: str = "default"
    endpoint: str = "http://127.0.0.1:8000"
    poll_s: float = 1.0
    workdir: Path | None = None
    local_runs: bool = True  # False: cluster resources only (the chart's in-cluster console)
    user_header: str | None = None  # impersonation: the trusted auth proxy's header naming the user
    groups_header: str = "X-Forwarded-Groups"
    extra: dict[str, Any] = field(default_factory=dict)


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["jinja", "html"]))
    env.filters["fmt_loss"] = lambda v: f"{v:.4f}" if isinstance(v, int | float) else ""
    env.filters["duration"] = _duration
    env.globals["slug"] = form.slug
    return env


def _duration(seconds: float | None) -> str:
    if not isinstance(seconds, int | float):  # status.json is written by user code: anything may be there
        return ""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Console:
    """The state behind the routes: local runs, the optional cluster, the templates."""

    def __init__(self, config: ConsoleConfig):
        self.config = config
        self.runs = LocalRuns(config.runs_dir, config.workdir) if config.local_runs else NoLocalRuns()
        self.env = _templates()
        from kubetune.operator.resources import InferenceServiceSpec
        from kubetune.trainer.api.spec import TrainingSpec

        schemas = {TRAINING: TrainingSpec.model_json_schema(), SERVING: InferenceServiceSpec.model_json_schema()}
        self.forms = {kind: form.sections(schema) for kind, schema in schemas.items()}
        self.orders = {kind: list(schema["properties"]) for kind, schema in schemas.items()}
        self.starts = {TRAINING: form.from_yaml((HERE / "quickstart.yaml").read_text()),
                       SERVING: form.from_yaml((HERE / "inferenceservice.yaml").read_text(), None)}

    def page(self, request: Request, template: str, **context: Any) -> HTMLResponse:
        lang = request.cookies.get("lang", "en")
        html = self.env.get_template(template).render(t=i18n.strings(lang), lang=lang, request=request,
                                                      cluster=self.config.cluster is not None,
                                                      local=self.config.local_runs,
                                                      user=request.scope.get("kubetune.user"), **context)
        return HTMLResponse(html)

    def cluster(self, request: Request) -> Any:
        """The cluster as this request's user: the console's own identity, or (impersonation)
        the user and groups the auth proxy named, checked present by the middleware."""
        cluster, user = self.config.cluster, request.scope.get("kubetune.user")
        if cluster is None or user is None:
            return cluster
        return cluster.as_user(user, request.scope.get("kubetune.groups", ()))

    def rows(self, request: Request, namespace: str | None, phase: str | None) -> tuple[list[RunRow], str | None]:
        rows, error = list(self.runs.rows()), None
        if self.config.cluster is not None:
            try:
                rows += self.cluster(request).rows(namespace or None)
            except Exception as exc:  # the API server's refusal is shown, local runs still listed
                error = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
        if namespace:
            rows = [r for r in rows if r.namespace in ("", namespace)]
        if phase:
            rows = [r for r in rows if r.phase == phase]
        return rows, error

    def values_of(self, kind: str, document: dict[str, Any]) -> dict[str, str]:
        """The form's values for a spec, with as many items of each list as it has."""
        sections = form.expand(self.forms[kind], form.counts_of_document(document, self.forms[kind]))
        return {**form.document_to_form(document, sections), "_kind": kind}

    def check(self, values: dict[str, str], add: str | None = None) -> dict[str, Any]:
        """Everything the Launch page shows for a form's values: field errors, YAML, estimate.
        The kind's own check: the training validator (`kubetune validate`), or the operator's
        check of an InferenceService's spec. `add`: one more item of that list."""
        kind = kind_of(values)
        sections = form.expand(self.forms[kind], form.counts_of_values(values, self.forms[kind], add))
        document = form.form_to_document(values, sections, self.orders[kind])
        replica = None
        if kind == SERVING:
            spec, errors = form.check_resource(SERVING, document, _resource_name(values))
            replica = _replica_estimate(spec) if spec else None
            estimate = _serving_table(spec, replica) if replica is not None else None
        else:
            spec, errors = form.check(document)
            nodes, gpus = _int(values.get("_nodes"), 1), _int(values.get("_gpusPerNode"), 1)
            estimate = _estimate(spec, nodes, gpus) if spec else None
        by_field, general = form.errors_by_field(errors, sections)
        refusal = _serving_refusal(spec, replica) if kind == SERVING and spec is not None else None
        return {"document": document, "yaml": form.to_yaml(document), "errors": by_field,
                "general": general + ([refusal] if refusal else []), "estimate": estimate,
                "valid": spec is not None and not refusal, "sections": sections, "kind": kind}


TRAINING, SERVING = "training", "InferenceService"
"""The Launch form's kinds: a training spec (a FineTuneJob, or an AlignmentJob for preference and
RL stages) and an InferenceService's spec."""


def kind_of(values: dict[str, str]) -> str:
    return SERVING if values.get("_kind") == SERVING else TRAINING


def _resource_name(values: dict[str, str]) -> str:
    return form.slug(str(values.get("_name") or "inference")).lower()


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text or default))
    except ValueError:
        return default


def _estimate(spec: Any, nodes: int, gpus: int) -> dict[str, Any] | None:
    from kubetune.trainer.api.estimate import GIB, estimate
    from kubetune.trainer.artifacts.model_shape import resolve_shape

    try:
        shape = resolve_shape(spec.model.path)
        if shape is None:
            return None
        est = estimate(spec, nodes=nodes, gpus_per_node=gpus, shape=shape)
    except (KubetuneError, ValueError):
        return None
    return {"model": shape.name, "precision": est.precision, "total": round(est.total_gib, 3),
            "components": {k: round(v / GIB, 3) for k, v in est.components.items()}}


def _serving_refusal(spec: Any, replica: Any) -> str | None:
    """What admission would say of a model that cannot start in spec.gpuMemoryGiB (shown live)."""
    from kubetune.operator.validation import serving_memory_refusal

    return serving_memory_refusal(spec, est=replica)


def _replica_estimate(spec: Any) -> Any:
    """One replica's serving estimate in spec.gpuMemoryGiB (the operator's admission check), or
    None when the form does not say enough to make it."""
    from kubetune.operator.validation import serving_memory_estimate, serving_shape

    shape = serving_shape(spec) if spec.gpuMemoryGiB and spec.gpus > 0 else None
    return serving_memory_estimate(spec, shape, spec.gpuMemoryGiB) if shape is not None else None


def _serving_table(spec: Any, est: Any) -> dict[str, Any]:
    """The Launch page's memory table of one replica per GPU: the rows add up to what the engine
    may use; a KV cache row of 0 tokens means it cannot start."""
    from kubetune.trainer.api.estimate import GIB

    components = {name: round(value / GIB, 3) for name, value in est.components.items()}
    components[f"KV cache ({est.kv_tokens:,} tokens)"] = round(max(0.0, est.kv_space) / GIB, 3)
    length = f"maxModelLen {est.max_model_len:,}" if est.max_model_len else "weights only"
    return {"model": est.shape.name, "precision": f"{spec.engine}, tensorParallelSize {est.tensor_parallel}, {length}",
            "total": round(sum(components.values()), 3), "components": components, "fits": est.fits}


def _guard(config: ConsoleConfig):
    """Bearer token (header, or a cookie set from `?token=` once), a request size bound, and with
    impersonation the user the auth proxy names (no user, no answer: never the console's own
    identity). /healthz, the pod's probe, needs neither."""

    async def middleware(request: Request, call_next):
        if request.url.path == HEALTH:
            return await call_next(request)
        if int(request.headers.get("content-length") or 0) > MAX_BODY or (
                request.method == "POST" and "chunked" in request.headers.get("transfer-encoding", "")):
            return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        if config.user_header and not request.url.path.startswith("/static/"):
            user = request.headers.get(config.user_header, "").strip()
            if not user:
                return JSONResponse({"detail": f"no {config.user_header} header from the auth proxy"}, status_code=401)
            request.scope["kubetune.user"] = user
            groups = request.headers.get(config.groups_header, "")
            request.scope["kubetune.groups"] = tuple(g.strip() for g in groups.split(",") if g.strip())
        if config.token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.cookies.get(TOKEN_COOKIE, "") or request.query_params.get("token", "")
            if not secrets.compare_digest(given.encode(), config.token.encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        if config.token and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, config.token, httponly=True, samesite="strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return middleware


def create_app(config: ConsoleConfig) -> FastAPI:
    console = Console(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        console.runs.stop_all()  # runs started here end with the console, not orphaned

    app = FastAPI(title="kubetune console", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.console = console
    app.middleware("http")(_guard(config))

    @app.exception_handler(KubetuneError)
    async def user_error(request: Request, exc: KubetuneError) -> Response:
        return HTMLResponse(str(exc), status_code=400)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _jobs_routes(app, console)
    _launch_routes(app, console)
    _apply_routes(app, console)
    _watch_routes(app, console)
    playground.routes(app, console)
    return app


def _jobs_routes(app: FastAPI, console: Console) -> None:
    @app.get("/")
    def index() -> Response:
        return RedirectResponse("/jobs")

    @app.get(HEALTH)
    def health() -> Response:
        return Response("ok", media_type="text/plain")

    @app.get("/lang/{code}")
    def language(code: str, next: str = "/jobs") -> Response:
        response = RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/jobs")
        response.set_cookie("lang", code if code in i18n.TABLES else "en", samesite="lax")
        return response

    @app.get("/jobs")
    def jobs(request: Request, namespace: str = "", phase: str = "") -> Response:
        rows, error = console.rows(request, namespace, phase)
        template = "_table.jinja" if request.headers.get("hx-request") else "jobs.jinja"
        return console.page(request, template, rows=rows, error=error, namespace=namespace, phase=phase)

    @app.get("/cluster/{namespace}/{kind}/{name}")
    def cluster_detail(request: Request, namespace: str, kind: str, name: str) -> Response:
        cluster = console.cluster(request)
        if cluster is None or kind not in ("FineTuneJob", "AlignmentJob", "InferenceService"):
            return HTMLResponse("not found", status_code=404)
        obj = cluster.get(namespace, kind, name)
        return console.page(request, "resource.jinja", obj=obj, kind=kind, events=cluster.events(namespace, name),
                            logs=cluster.pod_logs(namespace, kind, name), spec_yaml=form.to_yaml(obj.get("spec") or {}),
                            **_job_curves(request, kind, obj))

    @app.get("/cluster/{namespace}/{kind}/{name}/charts")
    def cluster_charts(request: Request, namespace: str, kind: str, name: str) -> Response:
        """The job's curves alone (the page polls this while the job runs)."""
        cluster = console.cluster(request)
        if cluster is None or kind not in JOB_KINDS:
            return HTMLResponse("not found", status_code=404)
        curves = _job_curves(request, kind, cluster.get(namespace, kind, name))
        return console.page(request, "_curves.jinja", **curves)


JOB_KINDS = ("FineTuneJob", "AlignmentJob")


def _job_curves(request: Request, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A job's curves from its S3 output's metrics.jsonl (`remote.py`), or why there are none."""
    from kubetune.operator.console.remote import job_metrics

    if kind not in JOB_KINDS:
        return {"curves": None}
    records, why = job_metrics(obj)
    panels = charts.run_charts(records, i18n.strings(request.cookies.get("lang"))) if records else []
    return {"curves": {"panels": panels, "why": why, "live": (obj.get("status") or {}).get("phase") not in TERMINAL}}


def _launch_routes(app: FastAPI, console: Console) -> None:
    @app.get("/launch")
    def launch(request: Request, kind: str = TRAINING) -> Response:
        kind = kind_of({"_kind": kind})
        values = console.values_of(kind, console.starts[kind])
        return console.page(request, "launch.jinja", values=values, default_namespace=console.config.namespace,
                            **console.check(values))

    @app.post("/launch/add")
    async def add_item(request: Request) -> Response:
        values = await form.read_form(request)
        return console.page(request, "_yaml_result.jinja", values=values, **console.check(values, values.get("_add")))

    @app.post("/launch/check")
    async def check(request: Request) -> Response:
        values = await form.read_form(request)
        return console.page(request, "_check.jinja", **console.check(values), oob=True)

    @app.post("/launch/yaml")
    async def from_yaml(request: Request) -> Response:
        data = await form.read_form(request)
        kind = kind_of(data)
        try:
            document = form.from_yaml(str(data.get("_yaml", "")), "training" if kind == TRAINING else None)
        except KubetuneError as exc:
            return console.page(request, "_check.jinja", **console.check(data), oob=True, general_extra=[str(exc)])
        values = console.values_of(kind, document)
        values.update({k: v for k, v in data.items() if k in ("_nodes", "_gpusPerNode", "_name", "_namespace")})
        return console.page(request, "_yaml_result.jinja", values=values, **console.check(values))

    @app.post("/launch/run")
    async def run(request: Request) -> Response:
        values = await form.read_form(request)
        if not console.config.local_runs or kind_of(values) != TRAINING:
            return HTMLResponse("this console starts no local runs of that", status_code=404)
        result = console.check(values)
        if not result["valid"]:
            return console.page(request, "_check.jinja", **result, oob=True)
        name = console.runs.launch(result["document"])
        return Response(status_code=204, headers={"HX-Redirect": f"/runs/{name}"})


def _apply_routes(app: FastAPI, console: Console) -> None:
    @app.post("/launch/apply")
    async def apply(request: Request) -> Response:
        values = await form.read_form(request)
        result = console.check(values)
        if not result["valid"] or console.config.cluster is None:
            return console.page(request, "_check.jinja", **result, oob=True)
        namespace = str(values.get("_namespace") or console.config.namespace)
        try:
            kind, name = _apply(console.cluster(request), result["document"], values, namespace)
        except (SpecErrors, SpecError) as exc:  # the admission check: messages on the fields they are about
            found = exc.errors if isinstance(exc, SpecErrors) else [exc]
            prefix = TRAINING_PREFIX if result["kind"] == TRAINING else "spec."
            errors = [SpecError(e.field.removeprefix(prefix), e.problem, e.fix) for e in found]
            by_field, general = form.errors_by_field(errors, result["sections"])
            return console.page(request, "_check.jinja", **{**result, "errors": by_field, "general": general,
                                                            "valid": False}, oob=True)
        except Exception as exc:  # the API server's answer (RBAC, a name taken), next to the buttons
            message = str(exc) if isinstance(exc, KubetuneError) else f"{getattr(exc, 'reason', '')} {getattr(exc, 'body', exc)}"
            return console.page(request, "_check.jinja", **{**result, "valid": False}, oob=True, general_extra=[message])
        return Response(status_code=204, headers={"HX-Redirect": f"/cluster/{namespace}/{kind}/{name}"})


TRAINING_PREFIX = "spec.training."


def _apply(cluster: Any, document: dict[str, Any], values: dict[str, str], namespace: str) -> tuple[str, str]:
    """The resource a user would write around the form's spec (a job around a training spec, an
    InferenceService around its spec), admitted as the operator admits it, created."""
    from kubetune.operator.console.cluster import admit, job_manifest, resource_manifest
    from kubetune.operator.resources import ALIGNMENT_STAGES

    if kind_of(values) == SERVING:
        kind, name = SERVING, _resource_name(values)
        manifest = resource_manifest(document, kind, name, namespace)
    else:
        kind = "AlignmentJob" if document.get("stage", "sft") in ALIGNMENT_STAGES else "FineTuneJob"
        name = form.slug(str(document.get("name") or "job")).lower()
        layout = {"nodes": _int(values.get("_nodes"), 1), "gpusPerNode": _int(values.get("_gpusPerNode"), 1)}
        manifest = job_manifest(document, kind, name, namespace, layout)
    admit(manifest)
    cluster.create(manifest, namespace)
    return kind, name


def _watch_routes(app: FastAPI, console: Console) -> None:
    @app.get("/runs/{name}")
    def run_detail(request: Request, name: str) -> Response:
        runs = console.runs
        if not runs.path(name).is_dir():
            return HTMLResponse("no such run", status_code=404)
        return console.page(request, "run.jinja", name=name, status=runs.status(name), spec_yaml=runs.spec_text(name),
                            log=runs.log(name), samples=runs.samples(name), **_panels(console, request, name))

    @app.get("/runs/{name}/events")
    async def run_events(request: Request, name: str) -> Response:
        console.runs.path(name)  # refuses a name outside the runs root before streaming starts
        return StreamingResponse(_events(console, request, name), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/compare")
    def compare(request: Request) -> Response:
        chosen = [n for n in request.query_params.getlist("run") if n in console.runs.names()]
        t = i18n.strings(request.cookies.get("lang"))
        records = {n: console.runs.metrics(n) for n in chosen}
        panels = [charts.compare_chart(records, key, t[title]) for key, title in
                  (("loss", "loss"), ("eval_loss", "loss"), ("lr", "learningRate"), ("tokens_per_second", "tokensPerSecond"))]
        panels[1] = panels[1].replace(f'aria-label="{t["loss"]}"', f'aria-label="eval {t["loss"]}"', 1)
        return console.page(request, "compare.jinja", names=console.runs.names(), chosen=chosen, panels=panels)


def _panels(console: Console, request: Request, name: str) -> dict[str, Any]:
    t = i18n.strings(request.cookies.get("lang"))
    return {"panels": charts.run_charts(console.runs.metrics(name), t)}


async def _events(console: Console, request: Request, name: str):
    """Server-sent events: the status line and the charts, re-sent whenever metrics.jsonl or
    status.json change; `done` once the run has ended."""
    runs, last = console.runs, None
    directory = runs.path(name)
    while not await request.is_disconnected():
        stamp = tuple(_mtime(directory / f) for f in ("metrics.jsonl", "status.json"))
        status = runs.status(name)
        if stamp != last or status.get("phase") in TERMINAL:
            last = stamp
            status_html = console.env.get_template("_status.jinja").render(
                status=status, t=i18n.strings(request.cookies.get("lang")))
            yield _sse("status", status_html)
            yield _sse("charts", "".join(_panels(console, request, name)["panels"]))
            yield _sse("log", escape(runs.log(name)[-LOG_EVENT_BYTES:]))
            if status.get("phase") in TERMINAL:
                yield _sse("done", json.dumps({"phase": status.get("phase")}))
                return
        await asyncio.sleep(console.config.poll_s)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _sse(event: str, data: str) -> str:
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in data.splitlines() or [""]) + "\n"
