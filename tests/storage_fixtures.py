"""S3 test fixtures: moto's real S3 server on 127.0.0.1 and a fault-injecting HTTP proxy in front.

The proxy forwards every request to moto and records it (method, path, query, body bytes), so
tests can count GETs or check the order of PUTs; it can also answer chosen requests with 500/503,
403 AccessDenied, drop the connection before answering, or cut a response body short. Everything
is real HTTP and real boto3, which is also what the end-to-end tests of the runner need: point
`storage.endpointUrl` (or `AWS_ENDPOINT_URL_S3` in a subprocess) at `proxy.url`.

Use from a test module:  `from tests.storage_fixtures import *  # noqa: F403`
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

FAKE_ACCESS_KEY = "AKIAKUBETUNETESTKEY01"
FAKE_SECRET_KEY = "kubetuneTestSecret/DoNotPrint+9f3c2e1a7b"
FAKE_SESSION_TOKEN = "kubetuneTestSessionToken/AlsoSecret+55aa"
SECRETS = (FAKE_SECRET_KEY, FAKE_SESSION_TOKEN)

DELAY_S = 1.5
_ERROR_XML = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'


@dataclass
class Fault:
    """Answer matching requests with `mode` ("500", "503", "403", "drop", "truncate", or "delay":
    forward after `DELAY_S`), `times` times (None: forever)."""

    mode: str
    times: int | None = 1
    method: str | None = None
    path_contains: str | None = None
    query_contains: str | None = None

    def matches(self, method: str, path: str, query: str) -> bool:
        return (
            (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
            and (self.query_contains is None or self.query_contains in query)
        )


@dataclass
class Request:
    method: str
    path: str
    query: str
    status: int = 0
    response_bytes: int = 0


@dataclass
class FaultProxy:
    """A tiny HTTP/1.1 forwarding proxy with fault injection (see the module docstring)."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    injected: list[tuple[str, Request]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def start(self) -> None:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.requests.clear()
            self.injected.clear()

    def add_fault(self, mode: str, times: int | None = 1, **match: Any) -> Fault:
        fault = Fault(mode, times, **match)
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, request: Request) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault.times != 0 and fault.matches(request.method, request.path, request.query):
                    if fault.times is not None:
                        fault.times -= 1
                    self.injected.append((fault.mode, request))
                    return fault.mode
        return None

    def count(self, method: str, path_contains: str = "", *, objects_only: bool = False) -> int:
        """Requests forwarded to moto. `objects_only`: GETs of object data, not listings."""
        with self.lock:
            return sum(
                1
                for r in self.requests
                if r.method == method
                and path_contains in r.path
                and not (objects_only and ("list-type" in r.query or r.path.count("/") < 2))
            )

    def bytes_served(self, path_contains: str = "") -> int:
        with self.lock:
            return sum(r.response_bytes for r in self.requests if r.method == "GET" and path_contains in r.path)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _error(self, status: int, code: str) -> None:
        body = b"" if self.command == "HEAD" else _ERROR_XML.format(code=code, message="injected by test").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()
        parts = urlsplit(self.path)
        request = Request(self.command, parts.path, parts.query)
        mode = self.owner.take_fault(request)
        if mode == "delay":
            time.sleep(DELAY_S)
        if mode == "drop":
            self.close_connection = True
            return
        if mode in ("500", "503", "403"):
            self._error(int(mode), {"500": "InternalError", "503": "SlowDown", "403": "AccessDenied"}[mode])
            return
        upstream = urlsplit(self.owner.upstream)
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        skip = {"transfer-encoding", "expect", "connection", "content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        headers["Content-Length"] = str(len(body))
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        request.status, request.response_bytes = response.status, len(data)
        with self.owner.lock:
            self.owner.requests.append(request)
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in {"transfer-encoding", "connection", "content-length", "server", "date"}:
                self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if mode == "truncate" and self.command != "HEAD":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


S3_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
    "AWS_SESSION_TOKEN": FAKE_SESSION_TOKEN,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "KUBETUNE_PROGRESS": "0",
}
S3_UNSET_ENVIRONMENT = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (one for the session); its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_endpoint(moto_server: str) -> Iterator[str]:
    """moto's URL, with fake credentials in the environment for this test only.

    Per test, not per session: the environment is restored after each test, so a test that runs
    later in the same session (an in-process operator, a subprocess) sees the ambient AWS
    environment rather than these credentials. A MonkeyPatch of its own, so that a test calling
    `monkeypatch.undo()` keeps its credentials."""
    patch = pytest.MonkeyPatch()
    for name, value in S3_TEST_ENVIRONMENT.items():
        patch.setenv(name, value)
    for name in S3_UNSET_ENVIRONMENT:
        patch.delenv(name, raising=False)
    yield moto_server
    patch.undo()


@pytest.fixture(scope="session")
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_server)
    proxy.start()
    yield proxy
    proxy.stop()


@dataclass
class S3Env:
    """Per test: a fresh bucket, settings that go through the proxy, and a direct client."""

    bucket: str
    proxy: FaultProxy
    client: Any
    cache: Path

    def settings(self, **overrides: Any) -> Any:
        from kubetune.trainer.api.spec import StorageSpec

        values = {"endpointUrl": self.proxy.url, "pathStyle": True, "cacheDir": str(self.cache), "maxAttempts": 5}
        values.update(overrides)
        return StorageSpec(**values)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes | str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data.encode() if isinstance(data, str) else data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def upload_tree(self, local: Path, prefix: str) -> list[str]:
        """Upload a file, or every file under a directory, below `prefix` (directly, not through
        the proxy). Returns the keys."""
        local = Path(local)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        keys = []
        for file in files:
            key = prefix.rstrip("/") + "/" + (file.name if file == local else file.relative_to(local).as_posix())
            self.client.upload_file(str(file), self.bucket, key)
            keys.append(key)
        return keys


@pytest.fixture
def s3(moto_endpoint: str, fault_proxy: FaultProxy, tmp_path: Path) -> Iterator[S3Env]:
    client = boto3.client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"})
    )
    bucket = f"kt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    fault_proxy.reset()
    yield S3Env(bucket, fault_proxy, client, tmp_path / "cache")
    fault_proxy.reset()


__all__ = ["SECRETS", "FaultProxy", "S3Env", "fault_proxy", "moto_endpoint", "moto_server", "s3"]
