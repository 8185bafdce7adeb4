"""Request limits of `kubetune serve`: a huge request is refused fast and probes keep answering.

    python bench/serve_limits.py                    # the builtin tiny model, CPU, ~30 seconds
    python bench/serve_limits.py --model outputs/quickstart --body-mb 50

Starts `kubetune serve` in a subprocess (its own GIL, as in production) and, while a poller
measures `/health` latency every 10 ms, sends:

- a 50 MB completion request with a Content-Length (refused with a 413 before it is read),
- the same as a chunked body (no Content-Length: refused once the count passes the limit),
- a prompt of 1 MB of text, under the body limit but far over the context (a 400 without
  tokenizing it),

and prints, per case, the status, the time until the answer, the MB the client got to send, and
the /health latency (median, max) meanwhile. Targets: the 413 within a second, /health < 100 ms.
Not a timed test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "KUBETUNE_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.trainer.cli.main", "serve", model, "--engine", "transformers",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kubetune serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("kubetune serve did not become ready within 300 s")


class HealthPoller:
    """GET /health every `interval` s on its own thread; records each latency."""

    def __init__(self, port: int, interval: float = 0.01):
        self.url, self.interval = f"http://127.0.0.1:{port}/health", interval
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    r.read()
                self.latencies.append(time.perf_counter() - started)
            except OSError:
                self.latencies.append(float("inf"))
            self._stop.wait(self.interval)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send(port: int, head: bytes, chunks: Iterator[bytes]) -> tuple[int, float, int]:
    """Send a request piece by piece until the server answers; (status, seconds, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    started, sent = time.perf_counter(), 0
    sock.sendall(head)
    for chunk in chunks:
        sock.setblocking(False)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                break
        except BlockingIOError:
            pass
        sock.setblocking(True)
        try:
            sock.sendall(chunk)
            sent += len(chunk)
        except OSError:
            break
    sock.setblocking(True)
    data = b""
    while b"\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            break
        data += piece
    elapsed = time.perf_counter() - started
    sock.close()
    return int(data.split()[1]), elapsed, sent


def served_model(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def cases(body_mb: int, model: str) -> list[tuple[str, bytes, Iterator[bytes]]]:
    size, piece = body_mb * 1024 * 1024, b"a" * 65536
    post = b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    prefix = b'{"model": %s, "prompt": "' % json.dumps(model).encode()
    declared = post + b"Content-Length: %d\r\n\r\n" % size
    chunked = post + b"Transfer-Encoding: chunked\r\n\r\n"
    big = json.dumps({"model": model, "prompt": "a" * (1024 * 1024)}).encode()
    return [
        (f"{body_mb} MB, Content-Length", declared, iter([prefix, *(piece for _ in range(size // len(piece)))])),
        (f"{body_mb} MB, chunked", chunked, (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(size // len(piece)))),
        ("1 MB prompt (over the context)", post + b"Content-Length: %d\r\n\r\n" % len(big), iter([big])),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--body-mb", type=int, default=50)
    args = parser.parse_args(argv)
    port = free_port()
    proc = start_server(args.model, port)
    rows = []
    try:
        for name, head, chunks in cases(args.body_mb, served_model(port)):
            with HealthPoller(port) as poller:
                status, elapsed, sent = send(port, head, chunks)
                time.sleep(0.1)  # a few more probes after the answer
            lat = poller.latencies or [float("nan")]
            rows.append((name, status, elapsed, sent / 1e6, statistics.median(lat) * 1e3, max(lat) * 1e3))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{'request':34} {'status':>6} {'answer s':>9} {'sent MB':>8} {'/health p50 ms':>15} {'/health max ms':>15}")
    for name, status, elapsed, sent, p50, worst in rows:
        print(f"{name:34} {status:>6} {elapsed:>9.3f} {sent:>8.2f} {p50:>15.1f} {worst:>15.1f}")
    ok = all(r[1] in (400, 413) and r[2] < 1.0 and r[5] < 100 for r in rows)
    print("targets (refused within 1 s, /health < 100 ms):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
