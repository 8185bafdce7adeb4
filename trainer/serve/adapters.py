"""`python -m kubetune.trainer.serve.adapters`: loads LoRA adapters into a running server, without a restart.

The sidecar of InferenceService pods, for both engines: vLLM's OpenAI server and `kubetune serve`
(the transformers engine) speak the same runtime LoRA API (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`, adapters listed in `/v1/models` with a `parent`), so "vLLM" below
stands for either. The operator keeps the service's
current adapter set (job references resolved) in the ConfigMap `<name>-isvc-adapters`, mounted
as a file; the kubelet refreshes that file in running pods (within about a minute) and every
new pod starts with the current one. This agent polls the file and vLLM's `/v1/models`, and makes
vLLM serve exactly the file's set:

- a new adapter is localized with the storage layer into the same cache the init container uses
  (keyed by ETag; the init container already fetched the set the pod started with, so that is a
  cache hit) and loaded with `POST /v1/load_lora_adapter` (vLLM started with `--enable-lora` and
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`);
- an adapter whose location changed is reloaded in place (`load_inplace`: no moment without it);
- a removed adapter is unloaded (`POST /v1/unload_lora_adapter`);
- after a restart of vLLM (the container alone) the whole set is loaded again.

Why a sidecar and not the operator calling the pods: the operator needs no network path to the
pods and no access to pods, downloads happen inside the pod (with the pod's own credentials and
cache), and a pod started later converges from the same file with no help.

`/ready` answers 200 once vLLM is up and every adapter of the file is loaded (a new pod joins
the Service only when it serves the whole set). An adapter added later that fails to load (a
wrong URI, a rank above `--max-lora-rank`) does not make a serving pod unready: the error is
logged, shown on `/status`, and retried with a growing delay. `/health` is the agent's liveness.

vLLM's runtime LoRA endpoints answer whoever reaches the server (vLLM warns about that), so
every service has an API key by default: the operator generates one into the Secret
`<name>-isvc-api-key` and passes it to the server and to this agent as `KUBETUNE_API_KEY`
(secretKeyRef; spec.env can bring another). The server then requires it on /v1, those endpoints
included, and the agent sends it as `Authorization: Bearer` on every call (`api_key_from_env`).
The agent also reverts what others did there, within one pass (an adapter unloaded, replaced
from another path, or loaded under a name the file does not have).

`--keep NAME` protects a name vLLM loaded itself at start (the model's own adapter when the model
is a LoRA output is served under the service's name): it is never unloaded.

Only the standard library and kubetune's storage layer are used: the agent runs in the server
image beside vLLM, and it never logs credentials (it has none but the environment's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("kubetune.adapters")

RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0
LOAD_TIMEOUT_S = 600.0
"""Loading reads the adapter's weights; a big one on a slow disk takes a while."""


class AdapterFileError(ValueError):
    """The adapters file is not what the operator writes."""


def read_adapters_file(path: str | Path) -> dict[str, str]:
    """{name: location} from the adapters file (`{"adapters": [{"name", "uri"}]}`), in order."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"cannot read the adapters file {path}: {exc}") from None
    items = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise AdapterFileError(f"{path}: expected {{\"adapters\": [{{\"name\": ..., \"uri\": ...}}]}}")
    out: dict[str, str] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("uri"), str):
            raise AdapterFileError(f"{path}: every adapter needs a string name and uri, got {item!r}")
        out[item["name"]] = item["uri"]
    return out


class VLLMError(RuntimeError):
    """vLLM refused or did not answer a request (the message is vLLM's own)."""


class VLLMClient:
    """The few endpoints of vLLM's OpenAI server the agent uses."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float | None = None) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")
        except (OSError, urllib.error.URLError) as exc:
            raise VLLMError(f"{method} {path}: {exc}") from None

    def healthy(self) -> bool:
        try:
            return self._request("GET", "/health", timeout=5)[0] == 200
        except VLLMError:
            return False

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: {name: path} (the models that have a parent)."""
        status, text = self._request("GET", "/v1/models")
        if status != 200:
            raise VLLMError(f"GET /v1/models answered {status}: {_message(text)}")
        return {m["id"]: m.get("root") or "" for m in json.loads(text).get("data") or [] if m.get("parent")}

    def load(self, name: str, path: str, *, inplace: bool = False) -> None:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        status, text = self._request("POST", "/v1/load_lora_adapter", body, timeout=LOAD_TIMEOUT_S)
        if status == 404:
            raise VLLMError("vLLM has no /v1/load_lora_adapter: it must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        if status != 200:
            raise VLLMError(_message(text) or f"HTTP {status}")

    def unload(self, name: str) -> None:
        status, text = self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):  # 404: already gone
            raise VLLMError(_message(text) or f"HTTP {status}")


def _message(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(text)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            return str(error.get("message") or "")
        return str(data.get("message") or data.get("detail") or text)
    return text.strip()[:500]


def localize(name: str, location: str, storage: Any = None) -> str:
    """The adapter's local directory: downloaded into $KUBETUNE_CACHE (or found there)."""
    from kubetune.trainer.api.spec import StorageSpec
    from kubetune.trainer.artifacts.adapters import is_adapter_dir
    from kubetune.trainer.serve.loading import resolve_path

    path = resolve_path(location, storage or StorageSpec(), f"adapter {name}")
    if not isinstance(path, Path) or not is_adapter_dir(path):
        raise ValueError(f"adapter {name}: {location!r} holds no LoRA adapter (adapter_config.json); "
                         "point it at the output of a LoRA/QLoRA training run.")
    return str(path)


@dataclass
class SyncReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """Wanted but not loaded after this round (failed, or waiting for a retry)."""


class AdapterSync:
    """Makes vLLM's loaded adapters equal to a wanted {name: location} set. One instance per
    agent: it remembers which location it loaded under each name and which loads failed."""

    def __init__(self, client: VLLMClient, *, keep: tuple[str, ...] = (), storage: Any = None,
                 clock: Any = time.monotonic):
        self.client = client
        self.keep = set(keep)
        self.storage = storage
        self.clock = clock
        self.locations: dict[str, str] = {}
        """name -> the location this agent loaded (or found loaded from the same path)."""
        self.paths: dict[str, str] = {}
        """name -> the local path it was loaded from (to notice a load this agent did not make)."""
        self.failures: dict[tuple[str, str], tuple[float, float, str]] = {}
        """(name, location) -> (retry at, delay, message)."""
        self.ever_loaded: set[str] = set()

    def sync(self, wanted: dict[str, str]) -> SyncReport:
        report = SyncReport()
        loaded = self.client.adapters()
        for name in list(self.locations):
            if loaded.get(name) != self.paths.get(name):
                # vLLM restarted, or a client of the server's runtime LoRA API unloaded or replaced
                # it: load the ConfigMap's version again.
                del self.locations[name]
        for name, location in wanted.items():
            if name in self.keep:
                continue
            if name in loaded and self.locations.get(name) == location:
                continue
            key = (name, location)
            failure = self.failures.get(key)
            if failure is not None and self.clock() < failure[0]:
                report.missing.append(name)
                continue
            try:
                path = localize(name, location, self.storage)
                if loaded.get(name) == path:
                    self.locations[name] = location  # already there (an agent restart): adopt it
                else:
                    self.client.load(name, path, inplace=name in loaded)
                    self.locations[name] = location
                    report.loaded.append(name)
                    log.info("loaded adapter %s from %s", name, location)
                self.paths[name] = path
                self.failures.pop(key, None)
                self.ever_loaded.add(name)
            except Exception as exc:  # a bad adapter must not stop the others
                delay = min(RETRY_MAX_S, failure[1] * 2) if failure else RETRY_FIRST_S
                message = str(exc) or type(exc).__name__
                self.failures[key] = (self.clock() + delay, delay, message)
                report.failed[name] = message
                report.missing.append(name)
                log.error("adapter %s (%s) could not be loaded, retrying in %.0f s: %s", name, location, delay, message)
        for name in loaded:
            if name not in wanted and name not in self.keep:
                try:
                    self.client.unload(name)
                except VLLMError as exc:
                    log.error("adapter %s could not be unloaded (retrying next round): %s", name, exc)
                    continue
                self.locations.pop(name, None)
                self.paths.pop(name, None)
                self.ever_loaded.discard(name)
                report.unloaded.append(name)
                log.info("unloaded adapter %s", name)
        self.failures = {k: v for k, v in self.failures.items() if wanted.get(k[0]) == k[1]}
        return report

    def errors(self) -> dict[str, str]:
        return {name: message for (name, _), (_, _, message) in self.failures.items()}


class Agent:
    """The polling loop and the state its HTTP endpoints report."""

    def __init__(self, config: str | Path, client: VLLMClient, *, keep: tuple[str, ...] = (), interval: float = 2.0):
        self.config = Path(config)
        self.client = client
        self.syncer = AdapterSync(client, keep=keep)
        self.interval = interval
        self.ready = False
        self.became_ready = False
        self.last_error: str | None = None
        self.wanted: dict[str, str] = {}
        self.stop = threading.Event()
        self.heartbeat = time.monotonic()
        self.passes = 0
        """Completed passes (`/status`; lets a test wait for the next one instead of sleeping)."""

    def round(self) -> None:
        """One pass: read the file, compare with vLLM, load/unload."""
        self.heartbeat = time.monotonic()
        file_error = None
        try:
            self.wanted = read_adapters_file(self.config)
        except AdapterFileError as exc:
            file_error = self.last_error = str(exc)  # keep the last good set (the kubelet swaps files atomically)
            log.error("%s", exc)
        if not self.client.healthy():
            self.ready = False
            return
        try:
            report = self.syncer.sync(self.wanted)
        except Exception as exc:  # vLLM briefly unreachable: try again next round
            self.ready = False
            self.last_error = str(exc)
            log.warning("the server is not reachable or not ready: %s", exc)
            return
        # A new pod is ready when it serves the whole set; a serving pod stays ready when a newly
        # added adapter fails (it still serves everything else), not when a loaded one is lost.
        required = [n for n in report.missing if not self.became_ready or n in self.syncer.ever_loaded]
        self.ready = not required
        self.became_ready = self.became_ready or self.ready
        errors = [file_error] if file_error else []
        errors += [f"{n}: {m}" for n, m in self.syncer.errors().items()]
        self.last_error = "; ".join(errors) or None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.round()
            except Exception:  # never let the loop die: liveness would restart the agent
                log.exception("adapter agent round failed")
            self.passes += 1
            self.stop.wait(self.interval)

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "wanted": sorted(self.wanted), "loaded": sorted(self.syncer.locations),
                "errors": self.syncer.errors(), "lastError": self.last_error, "passes": self.passes}


def serve_http(agent: Agent, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    stale_after = max(60.0, agent.interval * 10 + LOAD_TIMEOUT_S)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ready":
                code, body = (200, "ready\n") if agent.ready else (503, "not ready\n")
            elif self.path == "/health":
                alive = time.monotonic() - agent.heartbeat < stale_after
                code, body = (200, "ok\n") if alive else (503, "stuck\n")
            elif self.path == "/status":
                code, body = 200, json.dumps(agent.status()) + "\n"
            else:
                code, body = 404, "not found\n"
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if self.path == "/status" else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: quiet
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="adapters-http", daemon=True).start()
    return server


def api_key_from_env(environ: Any = None) -> str | None:
    """The server's API key as the pod passes it: KUBETUNE_API_KEY (what the operator sets, from
    the service's Secret), else VLLM_API_KEY (a user's own spec.env). Never logged."""
    environ = os.environ if environ is None else environ
    return environ.get("KUBETUNE_API_KEY") or environ.get("VLLM_API_KEY") or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.serve.adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the adapters file (the mounted ConfigMap)")
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the server's base URL (vLLM or kubetune serve)")
    parser.add_argument("--port", type=int, default=8001, help="port of /ready, /health and /status")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--keep", action="append", default=[], metavar="NAME",
                        help="a name vLLM loaded itself at start: never unloaded (repeatable)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between passes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(args.config, VLLMClient(args.server, api_key_from_env()), keep=tuple(args.keep), interval=args.interval)
    server = serve_http(agent, args.port, args.host)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    log.info("adapter agent: %s -> %s (probes on :%d)", args.config, args.server, args.port)
    try:
        agent.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
