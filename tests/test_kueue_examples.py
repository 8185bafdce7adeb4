"""The Kueue manifests shown in docs/pages/cluster/kueue.md are the example files that
tests/test_kueue_real.py applies to a real Kueue (so the page shows what is tested)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "pages" / "cluster" / "kueue.md"


def _yaml_blocks(text: str) -> list[list[object]]:
    return [[d for d in yaml.safe_load_all(block) if d] for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_the_kueue_page_shows_the_tested_example_manifests() -> None:
    blocks = _yaml_blocks(PAGE.read_text())
    queues = [d for d in yaml.safe_load_all((ROOT / "examples" / "kueue" / "queues.yaml").read_text()) if d]
    job = yaml.safe_load((ROOT / "examples" / "finetunejob-kueue.yaml").read_text())
    assert queues in blocks
    assert [job] in blocks
    assert {d["kind"] for d in queues} == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == next(
        d["metadata"]["name"] for d in queues if d["kind"] == "LocalQueue")
