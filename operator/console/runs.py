"""Local runs: `kubetune train` processes on this machine and their output directories under one
runs root. The console reads what the trainer writes (status.json, metrics.jsonl, samples.jsonl,
the resolved spec) and the process's own log; it never imports the trainer. Every run name from
a URL goes through the one checked join (`safe_join`), so no request reaches outside the root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.trainer.api.errors import SpecError
from kubetune.trainer.api.uri import safe_join
from kubetune.trainer.artifacts.output import RESOLVED_SPEC_FILE, STATUS_NAME

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
LOG = "kubetune-console.log"
LAUNCHED_SPEC = "kubetune-console-spec.yaml"
NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
TAIL_BYTES = 64 * 1024
MAX_RECORDS = 5000


@dataclass(frozen=True)
class RunRow:
    """One line of the Jobs table (the same columns for local runs and cluster resources)."""

    name: str
    kind: str
    namespace: str
    phase: str
    step: int | None
    total: int | None
    loss: float | None
    eta: float | None
    attempts: int | None
    age: float | None
    link: str

    @property
    def progress(self) -> str:
        return f"{self.step}/{self.total}" if self.step is not None and self.total else ""


def run_name(text: str) -> str:
    """A run name from user text: lower-case letters, digits, `-`; never a path."""
    name = re.sub(r"[^a-z0-9.-]+", "-", (text or "run").lower()).strip("-.")[:50] or "run"
    return name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_records(path: Path, limit: int = MAX_RECORDS) -> list[dict[str, Any]]:
    """The JSON lines of a run log (the last `limit`); a half-written last line is skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return parse_records(text, limit)


def parse_records(text: str, limit: int = MAX_RECORDS) -> list[dict[str, Any]]:
    """The JSON objects of a run log's text (the last `limit`); lines that are not one are skipped."""
    out = []
    for line in text.splitlines()[-limit:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def tail(path: Path, size: int = TAIL_BYTES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


class LocalRuns:
    """The runs under `root`, and the `kubetune train` processes this console started."""

    def __init__(self, root: Path, workdir: Path | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir or Path.cwd()
        self.processes: dict[str, subprocess.Popen] = {}

    def path(self, name: str) -> Path:
        """The run directory of `name`, refused unless it is one plain name inside the root."""
        if not NAME.match(name or ""):
            raise SpecError("run", f"{name!r} is not a run name.", "use letters, digits, '.', '-' only.")
        return safe_join(self.root, name, location=f"run {name}", field="run")

    def names(self) -> list[str]:
        found = [p for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name)]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def status(self, name: str) -> dict[str, Any]:
        """status.json, with the phase this console knows better while the trainer has not
        written one yet (starting) or died before it could (crashed)."""
        status = _read_json(self.path(name) / STATUS_NAME) or {}
        process = self.processes.get(name)
        if process is not None:
            code = process.poll()
            if code is None and status.get("phase") in (None, "Pending"):
                status["phase"] = "Starting"
            elif code not in (None, 0) and status.get("phase") not in ("Failed", "Succeeded"):
                status = {**status, "phase": "Failed", "message": f"kubetune train exited with code {code}"}
        status.setdefault("phase", "Unknown")
        return status

    def row(self, name: str) -> RunRow:
        status = self.status(name)
        directory = self.path(name)
        age = time.time() - directory.stat().st_mtime if directory.exists() else None
        return RunRow(name, "Local run", "", str(status.get("phase")), status.get("step"), status.get("totalSteps"),
                      status.get("loss"), status.get("etaSeconds"), status.get("attempt"), age, f"/runs/{name}")

    def rows(self) -> list[RunRow]:
        return [self.row(name) for name in self.names()]

    def metrics(self, name: str) -> list[dict[str, Any]]:
        return read_records(self.path(name) / METRICS)

    def samples(self, name: str) -> list[dict[str, Any]]:
        return read_records(self.path(name) / SAMPLES, 200)

    def spec_text(self, name: str) -> str:
        directory = self.path(name)
        for candidate in (RESOLVED_SPEC_FILE, LAUNCHED_SPEC):
            if (directory / candidate).is_file():
                return (directory / candidate).read_text(errors="replace")
        return ""

    def log(self, name: str) -> str:
        return tail(self.path(name) / LOG)

    def free_name(self, wanted: str) -> str:
        base = run_name(wanted)
        name, n = base, 1
        while self.path(name).exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def launch(self, document: dict[str, Any]) -> str:
        """Start `kubetune train` on `document` in a new run directory; return the run's name.
        The output path is the run directory, so the console finds what the run writes; the
        spec file there is exactly what runs (argv list, no shell)."""
        name = self.free_name(str(document.get("name") or "run"))
        directory = self.path(name)
        directory.mkdir(parents=True)
        document = {**document, "output": {**(document.get("output") or {}), "path": str(directory)}}
        spec_file = directory / LAUNCHED_SPEC
        spec_file.write_text(yaml.safe_dump(document, sort_keys=False))
        argv = [sys.executable, "-m", "kubetune.trainer.cli.main", "train", str(spec_file)]
        with (directory / LOG).open("ab") as log:
            self.processes[name] = subprocess.Popen(argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                                    env={**os.environ, "PYTHONSAFEPATH": "1"})
        return name

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()


class NoLocalRuns:
    """The runs of a console started with --no-local-runs (cluster only, e.g. in a pod): none
    listed, none found, none started."""

    def rows(self) -> list[RunRow]:
        return []

    def names(self) -> list[str]:
        return []

    def path(self, name: str) -> Path:
        raise SpecError("run", f"{name!r}: this console has no local runs.", "use the Jobs page's cluster resources.")

    def stop_all(self) -> None:
        pass
