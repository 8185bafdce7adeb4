"""The documentation stays true: README.md and the docs site (docs/mkdocs.yml, pages in docs/pages/).

- the generated spec reference (docs/pages/reference/spec.md) matches the code;
- the site builds with `mkdocs build --strict` (no broken link or anchor, every page in the nav);
- every ```yaml block loads, and a kubetune training spec or custom resource in one passes the
  project's own validation (the trainer's for a spec, the admission webhook's for a manifest);
- every `kubetune ...` command in a ```bash block names a real subcommand and real flags.

A block that is deliberately partial (alternatives side by side, a fragment of something larger)
is marked in the Markdown with `<!-- fragment -->` on the line before its fence, and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kubetune.trainer.api.specdoc import BEGIN, END, render

from .conftest import REPO

DOCS = REPO / "docs"
PAGES = DOCS / "pages"
SPEC_PAGE = PAGES / "reference" / "spec.md"
FRAGMENT = "<!-- fragment -->"
API_GROUP = "kubetune.io"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(PAGES.rglob("*.md"))]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (fences at the start of a line, as all ours are)."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^( *)```([\w+-]*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        indent, start, body = len(match.group(1)), i, []  # indented: a block inside a list item
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(path, start + 1, match.group(2).lower(), "\n".join(body) + "\n", previous == FRAGMENT))
        i += 1  # the closing fence
    return blocks


def blocks_of(*langs: str) -> list[Block]:
    return [b for path in doc_files() for b in code_blocks(path) if b.lang in langs]


def params(blocks: list[Block]):
    return [pytest.param(b, id=b.where) for b in blocks]


# -- the generated spec reference ------------------------------------------------------------


def test_spec_reference_page_is_current():
    text = SPEC_PAGE.read_text()
    generated = text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()
    assert generated == render().strip(), (
        "the spec reference is stale: run `kubetune schema --reference docs/pages/reference/spec.md`")


def test_readme_is_short_and_points_at_the_docs():
    """The README is an entry point (what kubetune is, set-up, a tour, links); the reference lives
    in the site. Every relative link in it names a file of the repository."""
    text = (REPO / "README.md").read_text()
    assert 150 <= len(text.splitlines()) <= 250, len(text.splitlines())
    assert BEGIN not in text, "the generated spec reference belongs in docs/pages/reference/spec.md"
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", text)
    relative = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert any(link.startswith("docs/pages/") for link in relative)
    missing = [link for link in relative if not (REPO / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_has_the_setup_and_quickstart_commands():
    """The two set-up commands (.ci/run installs the same way) and the command
    tests/test_train.py::test_quickstart_learns_the_task runs as-is."""
    commands = "".join(b.text for b in code_blocks(REPO / "README.md") if b.lang == "bash")
    assert 'pip install -e ".[dev]"' in commands
    assert "kubetune train examples/quickstart.yaml" in commands


# -- the site builds, strictly ---------------------------------------------------------------


@pytest.mark.slow
def test_site_builds_with_mkdocs_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(DOCS / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "WARNING" not in output, output[-5000:]
    assert (tmp_path / "site" / "reference" / "spec" / "index.html").is_file()
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    """mkdocs only reports pages missing from the nav at INFO level; a page nobody can reach is a bug."""

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use tags such as !!python/name:...; none is needed to read the nav.
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load((DOCS / "mkdocs.yml").read_text(), Loader=Loader)
    assert config["docs_dir"] == "pages"

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return []

    in_nav = pages(config["nav"])
    on_disk = sorted(str(p.relative_to(PAGES)) for p in PAGES.rglob("*.md"))
    assert sorted(in_nav) == on_disk
    assert "architecture.md" in in_nav


# -- YAML blocks -----------------------------------------------------------------------------


def _training_fields() -> set[str]:
    from kubetune.trainer.api.spec import TrainingSpec

    return {field.alias or name for name, field in TrainingSpec.model_fields.items()}


MINIMAL_SPEC = {"model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": "s3://docs/data.jsonl"}]}}
"""What a partial training-spec block (say `method: qlora` and its options) is checked inside."""


def check_document(document, where: str) -> str:
    """Validate one YAML document the way kubetune would read it; returns what it was taken for."""
    from kubetune.trainer.api.specfile import JOB_KINDS, RESOURCE_KINDS, extract_training, validate_training

    if not isinstance(document, dict):
        return "not a mapping"
    kind = document.get("kind")
    if str(document.get("apiVersion", "")).split("/")[0] == API_GROUP or kind in RESOURCE_KINDS:
        # `kubetune validate` on a manifest: the admission webhook's own decision...
        from kubetune.operator.validation import admit

        admit("CREATE", None, document, source=where)
        if kind in JOB_KINDS:  # ...and, for the training kinds, what `kubetune train` reads
            training, _, prefix = extract_training(document, where)
            validate_training(training, where, prefix)
        return f"a {kind}"
    if "stage" in document or "model" in document:
        validate_training(document, where)
        return "a training spec"
    if set(document) <= _training_fields():
        validate_training({**MINIMAL_SPEC, **document}, where)
        return "part of a training spec"
    return "other YAML"


@pytest.mark.parametrize("block", params([b for b in blocks_of("yaml", "yml") if not b.fragment]))
def test_yaml_block_is_valid(block: Block):
    documents = list(yaml.safe_load_all(block.text))
    assert documents, f"{block.where}: an empty YAML block"
    for document in documents:
        check_document(document, block.where)


def test_yaml_blocks_are_checked():
    """The parametrized test above sees the blocks: kubetune manifests and specs are among them,
    and fragments stay few."""
    blocks = blocks_of("yaml", "yml")
    kinds = {check_document(d, b.where) for b in blocks if not b.fragment for d in yaml.safe_load_all(b.text)}
    assert {"a FineTuneJob", "a AlignmentJob", "a InferenceService", "a training spec"} <= kinds, kinds
    assert len(blocks) >= 20
    readme = [b for b in blocks if b.path.name == "README.md"]
    assert {check_document(d, b.where) for b in readme for d in yaml.safe_load_all(b.text)} >= {
        "a training spec", "a FineTuneJob"}, "README.md: its spec and manifest (in a list) are checked too"
    assert sum(b.fragment for b in blocks) <= 5, [b.where for b in blocks if b.fragment]


def test_a_broken_block_would_be_caught():
    """The checks are not vacuous: a typo in a spec or a manifest fails them."""
    from kubetune.trainer.api.errors import KubetuneError

    with pytest.raises(KubetuneError):
        check_document({"model": {"path": "builtin:tiny-llama"}, "data": {"datasets": [{"path": "x.json"}]},
                        "train": {"learning_rate": 1e-4}}, "typo")
    with pytest.raises(KubetuneError):
        check_document({"method": "qlora", "quantization": {"bitz": 4}}, "typo")
    manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
                "spec": {"training": {"model": {"path": "builtin:tiny-llama"},
                                      "data": {"datasets": [{"path": "examples/data/demo_alpaca.json"}]}}}}
    with pytest.raises(Exception, match="datasets"):  # a local path: a pod cannot read it
        check_document(manifest, "local data")


@pytest.mark.parametrize("block", params(blocks_of("json")))
def test_json_block_parses(block: Block):
    """A ```json block is one JSON document or JSON Lines."""
    if block.fragment:
        pytest.skip("marked <!-- fragment -->")
    try:
        json.loads(block.text)
    except json.JSONDecodeError:
        for line in block.text.splitlines():
            if line.strip():
                json.loads(line)


# -- `kubetune ...` commands in bash blocks --------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;"}
PREFIXES = {"do", "then", "else", "time", "exec", "sudo", "!", "{"}


def kubetune_commands(text: str) -> list[list[str]]:
    """Every `kubetune ...` invocation in a shell snippet, as its argument list (after `kubetune`):
    at the start of a command (after VAR=value assignments), also as `.venv/bin/kubetune`, or as
    the program `torchrun --no-python` starts."""
    commands = []
    for line in logical_lines(text):
        if "kubetune" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote (a JSON body spanning lines): no command here
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            words = segment
            while words and (words[0] in PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
                words = words[1:]  # `do`, `time`, ... and VAR=value assignments before the command
            for i, word in enumerate(words):
                if Path(word).name != "kubetune":
                    continue
                if i == 0 or words[i - 1] == "--no-python":
                    commands.append([w for w in words[i + 1:] if w not in {">", ">>", "<", "2>", "2>&1"}])
            segment = []
    return commands


def test_kubetune_commands_are_found():
    """The parser of shell snippets finds what it should (and not `helm install kubetune ...`)."""
    found = kubetune_commands(
        "kubetune train job.yaml --set a=1   # comment --not-a-flag\n"
        "torchrun --nproc-per-node 2 --no-python kubetune train q.yaml\n"
        "kubetune crds | kubectl apply -f -\n"
        "kubetune estimate s.yaml --set method=qlora\n"
        "helm install kubetune charts/kubetune -n kubetune\n"
        "PYTHONSAFEPATH=1 .venv/bin/kubetune serve m \\\n  --port 8000\n"
        "for f in *.yaml; do kubetune validate \"$f\" || exit; done\n")
    assert found == [["train", "job.yaml", "--set", "a=1"], ["train", "q.yaml"], ["crds"],
                     ["estimate", "s.yaml", "--set", "method=qlora"],
                     ["serve", "m", "--port", "8000"], ["validate", "$f"]]


def test_kubetune_help_lists_the_subcommands_the_docs_use():
    """`kubetune --help`, the installed command, lists every subcommand the docs run."""
    used = {c[0] for b in blocks_of("bash", "sh") for c in kubetune_commands(b.text) if c}
    assert {"train", "validate", "serve", "storage", "estimate", "crds", "operator", "prepare"} <= used, used
    from kubetune.trainer.cli.main import build_parser

    listed = set(build_parser()._subparsers._group_actions[0].choices)  # what `kubetune --help` lists
    assert used <= listed, f"not in `kubetune --help`: {used - listed}"


@pytest.mark.parametrize("block", params([b for b in blocks_of("bash", "sh") if kubetune_commands(b.text)]))
def test_bash_block_kubetune_commands_exist(block: Block):
    from kubetune.trainer.cli.main import build_parser

    commands = _subparsers(build_parser())
    for args in kubetune_commands(block.text):
        assert args, f"{block.where}: `kubetune` without a subcommand"
        name = args[0]
        assert name in commands, f"{block.where}: `kubetune {name}` is not a subcommand (have {sorted(commands)})"
        parser, options, rest = commands[name], _options(commands[name]), args[1:]
        nested = _subparsers(parser)
        if nested:  # `kubetune storage cp ...`: the first positional names the sub-subcommand
            first = next((a for a in rest if not a.startswith("-")), None)
            assert first in nested, f"{block.where}: `kubetune {name} {first}` is not a subcommand"
            options |= _options(nested[first])
        for arg in rest:
            flag = arg.split("=", 1)[0]
            if re.match(r"^--[A-Za-z]", flag) or re.match(r"^-[A-Za-z]$", flag):
                assert flag in options, f"{block.where}: `kubetune {name}` has no option {flag} (has {sorted(options)})"


def test_fragment_blocks_still_parse():
    """A block marked `<!-- fragment -->` (a few deliberately partial spec pieces) is not validated
    as a spec, but it is still YAML (a skip here would fail CI's no-skip rule)."""
    fragments = [b for b in blocks_of("yaml", "yml") if b.fragment]
    for block in fragments:
        assert list(yaml.safe_load_all(block.text)), block.where
