"""The Kueue manifests shown in docs/pages/cluster/kueue.md are the example files that
tests/test_kueue_real.py applies to a real Kueue (so the page shows what is tested), and the
README's "Running on a shared GPU cluster" shows the example files that the tests render and
apply (tests/test_examples.py, tests/test_gang.py, tests/test_operator_real.py)."""

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


def test_the_readme_shared_cluster_section_shows_the_tested_examples_and_links_the_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on a shared GPU cluster", 1)[1].split("\n## ", 1)[0]
    blocks = _yaml_blocks(section)
    examples = ("platform-defaults/values.yaml", "finetunejob-shared-cluster.yaml", "finetunejob-gang.yaml")
    shown = [[d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d] for name in examples]
    assert blocks == shown
    for name in examples:
        assert f"(examples/{name})" in section
    for link in ("docs/pages/cluster/kueue.md", "docs/pages/cluster/kueue.md#gang-scheduling-with-a-podgroup",
                 "docs/pages/cluster/operator.md#pod-overrides-specpodtemplate",
                 "docs/pages/cluster/operator.md#platform-defaults-the-charts-platformdefaults"):
        assert f"]({link})" in section, link
        page, _, anchor = link.partition("#")
        headings = re.findall(r"(?m)^#+ (.+)$", (ROOT / page).read_text())
        slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
        assert not anchor or anchor in slugs, (anchor, sorted(slugs))
