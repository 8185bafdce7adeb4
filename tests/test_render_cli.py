"""`kubetune render MANIFEST` (#20 item 7): the objects the operator would create, printed without
a cluster, through the operator's own admission check and first reconcile."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from kubetune.trainer.cli.main import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def render(capsys: Any, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["render", *args])
    out = capsys.readouterr()
    return code, [o for o in yaml.safe_load_all(out.out) if o] if code == 0 else [], out.err


def test_a_finetunejob_renders_its_configmap_service_and_job(capsys: Any) -> None:
    code, objects, err = render(capsys, str(EXAMPLES / "finetunejob-quickstart.yaml"), "--set", "train.maxSteps=7",
                                "-n", "team-a", "--trainer-image", "registry.example.com/kubetune/trainer:1")
    assert code == 0, err
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    assert all(o["metadata"]["namespace"] == "team-a" for o in objects)
    job = objects[2]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/kubetune/trainer:1"
    resolved = yaml.safe_load(objects[0]["data"]["job.yaml"])
    assert resolved["spec"]["training"]["train"]["maxSteps"] == 7  # --set applied to spec.training
    for obj in objects:  # what would be applied is valid Kubernetes (the chart's oldest version)
        assert kubernetes_validate.validate(obj, "1.30", strict=True)


def test_an_inferenceservice_renders_its_secret_deployment_and_service_with_references_shown(capsys: Any) -> None:
    code, objects, err = render(capsys, str(EXAMPLES / "inferenceservice.yaml"))
    assert code == 0, err
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Secret" and {"Deployment", "Service"} <= set(kinds)
    secret = objects[0]
    assert "data" not in secret and "stringData" not in secret  # the key is generated on the cluster only
    text = yaml.safe_dump_all(objects)
    assert "kubetune-ref://AlignmentJob/llama3-8b-dpo" in text  # a job's output is only known there
    assert "kubetune-ref://FineTuneJob/llama3-8b-lora-sft" in text


def test_a_multi_node_job_starts_with_the_prepare_job(capsys: Any, tmp_path: Path) -> None:
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    manifest["spec"]["nodes"] = 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code, objects, err = render(capsys, str(path))
    assert code == 0, err
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    assert objects[2]["metadata"]["name"].endswith("-prepare")  # tokenize once before the gang exists


def test_what_admission_refuses_is_refused_with_its_message(capsys: Any, tmp_path: Path) -> None:
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-quickstart.yaml").read_text())
    bad = copy.deepcopy(manifest)
    bad["spec"]["nodes"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    code, _, err = render(capsys, str(path))
    assert code == 2 and "spec.nodes" in err and "Traceback" not in err
    big = copy.deepcopy(manifest)
    big["spec"].update(gpusPerNode=1, modelParameters="70B")
    path.write_text(yaml.safe_dump(big))
    code, _, err = render(capsys, str(path), "--gpu-memory-gib", "24")
    assert code == 2 and "does not fit in GPU memory" in err
