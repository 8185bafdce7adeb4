"""CRDs: generated from the pydantic models, structural, valid apiextensions.k8s.io/v1, fresh."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.operator.crdgen import crd, crd_files
from kubetune.operator.resources import KINDS, TrainingJobStatus

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = kubernetes_validate.latest_version()

EXAMPLE_FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "llama-sft", "namespace": "ml"},
    "spec": {
        "nodes": 2,
        "gpusPerNode": 8,
        "image": "ghcr.io/kubetune/kubetune-trainer:0.1.0",
        "resources": {"requests": {"cpu": 32, "memory": "400Gi"}, "limits": {"memory": "400Gi"}},
        "shmSize": "64Gi",
        "nodeSelector": {"nvidia.com/gpu.product": "H100-SXM"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "storage": {"secretRef": {"name": "s3-creds"}, "endpoint": "http://minio.minio:9000"},
        "env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "backoffLimit": 2,
        "activeDeadlineSeconds": 86400,
        "training": {
            "model": {"path": "s3://models/llama-3-8b"},
            "data": {"datasets": [{"path": "s3://data/chat.jsonl", "format": "sharegpt"}], "maxLength": 4096},
            "method": "lora",
            "lora": {"rank": 16},
            "train": {"epochs": 2, "learningRate": 0.0001, "precision": "bf16"},
            "output": {"path": "s3://outputs/llama-sft"},
        },
    },
}


def _to_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as a Draft 4 JSON Schema (nullable, int-or-string,
    preserve-unknown-fields), to validate example objects the way the API server would."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = out.get("additionalProperties", False)
    if "properties" in out:
        out["properties"] = {k: _to_jsonschema(v) for k, v in node["properties"].items()}
    if "items" in out:
        out["items"] = _to_jsonschema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _to_jsonschema(node["additionalProperties"])
    return out


def _validator(kind: str) -> jsonschema.Draft4Validator:
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(_to_jsonschema(schema))


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key in ("properties",):
            for name, sub in (node.get(key) or {}).items():
                yield from _walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_is_valid_apiextensions_v1(kind: str) -> None:
    assert kubernetes_validate.validate(crd(kind), K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_schema_is_structural(kind: str) -> None:
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "$defs" not in text and "title:" not in text
    for path, node in _walk(schema):
        special = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert node.get("type") or special, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        for key in ("anyOf", "oneOf", "allOf"):
            for branch in node.get(key) or []:  # only value validations inside (structural rule)
                assert "type" not in branch and "properties" not in branch, f"{path}.{key}"
        if node.get("nullable"):
            assert node.get("type") or special, path
        if "default" in node:
            jsonschema.Draft4Validator(_to_jsonschema(node)).validate(node["default"])
        if node.get("type") == "integer" and "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_crd_metadata_columns_and_names() -> None:
    ftj = crd("FineTuneJob")
    names = ftj["spec"]["names"]
    assert ftj["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert ftj["spec"]["group"] == "kubetune.io" and ftj["spec"]["scope"] == "Namespaced"
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["kubetune"]
    assert crd("AlignmentJob")["spec"]["names"]["categories"] == ["kubetune"]
    version = ftj["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.percent"
    assert columns["Loss"] == ".status.progress.loss"
    assert columns["ETA"] == ".status.progress.etaSeconds"  # set by the trainer; shown by kubectl get
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c] == [
        "Phase", "Progress", "Loss", "ETA", "Age"]


def _descriptions(node: Any, path: str = "") -> list[tuple[str, str]]:
    out = [(path, node["description"])] if isinstance(node, dict) and node.get("description") else []
    for key, sub in (node.items() if isinstance(node, dict) else []):
        if isinstance(sub, dict | list):
            out.extend(_descriptions(sub, f"{path}.{key}"))
    if isinstance(node, list):
        for i, sub in enumerate(node):
            out.extend(_descriptions(sub, f"{path}[{i}]"))
    return out


def test_inference_service_fields_describe_the_service_not_a_training_job() -> None:
    """The InferenceService CRD reused the training kinds' descriptions ("resources of each
    training pod ... gpusPerNode", "the trainer container"): `kubectl explain` misled."""
    spec = crd("InferenceService")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    wrong = [(path, text) for path, text in _descriptions(spec)
             if any(w in text for w in ("training pod", "gpusPerNode", "trainer container", "job's namespace"))]
    assert wrong == []
    fields = spec["properties"]
    for name in ("resources", "gpuResource", "nodeSelector", "tolerations", "affinity", "serviceAccountName",
                 "storage", "env", "engineArgs", "autoscaling", "model"):
        assert fields[name].get("description"), f"spec.{name} has no description"
    assert "gpus" in fields["resources"]["description"]


def test_crd_schema_comes_from_the_training_spec() -> None:
    spec = crd("FineTuneJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    training = spec["properties"]["training"]
    assert spec["required"] == ["training"]
    assert set(training["properties"]["method"]["enum"]) >= {"full", "freeze", "lora"}
    assert training["properties"]["method"]["default"] == "lora"
    assert training["properties"]["lora"]["default"] == {}
    assert training["properties"]["lora"]["properties"]["rank"]["default"] == 8
    assert "description" in training["properties"]["data"]["properties"]["maxLength"]
    assert training["properties"]["name"]["nullable"] is True
    assert spec["properties"]["nodes"] == {**spec["properties"]["nodes"], "minimum": 1, "default": 1, "type": "integer"}
    assert spec["properties"]["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    quantity = spec["properties"]["resources"]["properties"]["requests"]["additionalProperties"]
    assert quantity == {"x-kubernetes-int-or-string": True}
    # An AlignmentJob may leave training.model.path to baseModelFrom.
    alj = crd("AlignmentJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "path" not in alj["properties"]["training"]["properties"]["model"].get("required", [])
    assert set(alj["properties"]["baseModelFrom"]["properties"]) == {"fineTuneJob", "alignmentJob"}


def test_example_finetunejob_validates_against_the_generated_schema() -> None:
    _validator("FineTuneJob").validate(EXAMPLE_FTJ)


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("spec", "nodes"), 0, "minimum"),
        (("spec", "training", "method"), "magic", "is not one of"),
        (("spec", "gpusPerNode"), "eight", "is not of type"),
        (("spec", "training", "lora", "rank"), 0, "minimum"),
        (("spec", "resources", "requests", "cpu"), 1.5, "is not of type"),
        (("spec", "training", "data", "bogus"), 1, "Additional properties"),
    ],
)
def test_schema_refuses_type_errors(path: tuple[str, ...], value: Any, fragment: str) -> None:
    body = copy.deepcopy(EXAMPLE_FTJ)
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = [e.message for e in _validator("FineTuneJob").iter_errors(body)]
    assert errors and any(fragment in e for e in errors), errors


def test_status_schema_accepts_what_the_operator_writes() -> None:
    status = {
        "phase": "Running", "reason": "Training", "message": "attempt 1: 2/2 pods active",
        "observedGeneration": 3, "attempts": 1, "startTime": "2025-01-01T00:00:00Z",
        "jobName": "llama-sft-ftj-a1", "outputUri": "s3://outputs/llama-sft", "trainingHash": "abc",
        "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 3}],
        "progress": {"step": 10, "totalSteps": 100, "percent": 10.0, "loss": 1.5},
    }
    TrainingJobStatus.model_validate(status)
    _validator("FineTuneJob").validate({**EXAMPLE_FTJ, "status": status})


def test_committed_crds_are_fresh() -> None:
    """Fails when crds/ is stale: run `kubetune crds --out crds/` and commit the result."""
    for name, text in crd_files().items():
        path = REPO / "crds" / name
        assert path.is_file(), f"missing {path}: run `kubetune crds --out crds/`"
        assert path.read_text() == text, f"{path} is stale: run `kubetune crds --out crds/`"
        assert kubernetes_validate.validate(yaml.safe_load(text), K8S_VERSION, strict=True)


def test_cli_crds_writes_and_checks(tmp_path: Path) -> None:
    from kubetune.trainer.cli.main import main

    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alignmentjobs.yaml", "finetunejobs.yaml", "inferenceservices.yaml"]
    assert main(["crds", "--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "finetunejobs.yaml").write_text("stale")
    assert main(["crds", "--out", str(tmp_path), "--check"]) == 1


def test_cli_crds_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.trainer.cli.main import main

    assert main(["crds"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == ["alignmentjobs.kubetune.io", "finetunejobs.kubetune.io",
                                                                      "inferenceservices.kubetune.io"]


@pytest.mark.slow  # a fresh interpreter
def test_cli_registers_operator_without_importing_kopf() -> None:
    code = (
        "import sys\n"
        "from kubetune.trainer.cli.main import build_parser\n"
        "parser = build_parser()\n"
        "args = parser.parse_args(['operator', '-n', 'a', '-n', 'b', '--standalone', '--reconcile-interval', '5'])\n"
        "assert args.namespace == ['a', 'b'] and args.standalone\n"
        "from kubetune.operator.config import config_from_args\n"
        "assert config_from_args(args, {}).reconcile_interval == 5.0\n"
        "assert 'kopf' not in sys.modules, 'kopf imported by the CLI'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
