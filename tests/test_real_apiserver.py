"""The CRDs against a real kube-apiserver (tests/cluster): what only a real server does.

A fake client accepts any object; the real apiserver applies the schema's defaults, serves
the printer columns as a server-side table, answers `kubectl explain` from the published
OpenAPI, groups the kinds under the `kubetune` category, merges server-side apply by field
manager, and enforces RBAC. These are checked with the real kubectl.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import Kubectl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first session builds the binaries

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
NAMESPACE = "kt-real"
EXAMPLE = REPO / "examples" / "finetunejob-lora-sft.yaml"
JOB = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]


@pytest.fixture(scope="module")
def crds(real_cluster: ControlPlane, kubectl: Kubectl) -> None:
    """The generated CRDs installed and Established, a namespace, and the example job."""
    kubectl("apply", "-f", str(CRDS))
    kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(CRDS))
    kubectl("create", "namespace", NAMESPACE)
    kubectl("-n", NAMESPACE, "apply", "-f", str(EXAMPLE))


def get_job(kubectl: Kubectl, name: str = JOB) -> dict:
    """The stored object as the server returns it (managedFields included)."""
    out = kubectl("-n", NAMESPACE, "get", "finetunejob", name, "-o", "json", "--show-managed-fields")
    return json.loads(out.stdout)


def test_server_applies_crd_defaults(crds: None, kubectl: Kubectl) -> None:
    """Fields the example leaves out come back with the schema's defaults (structural
    defaulting happens in the apiserver, not in kubectl or the operator)."""
    spec = get_job(kubectl)["spec"]
    assert spec["nodes"] == 2 and spec["gpusPerNode"] == 8  # set by the example, kept
    assert spec["gpuResource"] == "nvidia.com/gpu"
    assert spec["readOnlyRootFilesystem"] is True
    assert spec["suspend"] is False
    assert spec["training"]["model"]["dtype"] == "auto"
    assert spec["training"]["model"]["trustRemoteCode"] is False


def test_printer_columns_are_a_server_side_table(crds: None, real_cluster: ControlPlane,
                                                 kubectl: Kubectl) -> None:
    """`kubectl get` prints the CRD's additionalPrinterColumns, which the server renders."""
    header = kubectl("-n", NAMESPACE, "get", "finetunejobs").stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "AGE"]
    wide = kubectl("-n", NAMESPACE, "get", "ftj", "-o", "wide").stdout.splitlines()
    assert {"NODES", "GPUS/NODE", "ATTEMPTS", "REASON"} <= set(wide[0].split())
    assert wide[1].split()[0] == JOB
    table = real_cluster.get_table(f"/apis/kubetune.io/v1alpha1/namespaces/{NAMESPACE}/finetunejobs")
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]][:3] == ["Name", "Phase", "Progress"]
    assert table["rows"][0]["cells"][0] == JOB


def test_explain_reads_the_published_schema(crds: None, kubectl: Kubectl) -> None:
    """`kubectl explain` answers from the OpenAPI the apiserver builds from the CRD."""
    out = kubectl("explain", "finetunejob.spec.training").stdout
    assert "KIND:" in out and "FineTuneJob" in out
    assert "FIELDS:" in out and "stage" in out and "model" in out


def test_category_lists_all_kubetune_kinds(crds: None, kubectl: Kubectl) -> None:
    """`kubectl get kubetune` expands the category to every kind that declares it."""
    out = kubectl("-n", NAMESPACE, "get", "kubetune", "-o", "name").stdout.split()
    assert f"finetunejob.kubetune.io/{JOB}" in out
    resources = kubectl("api-resources", "--categories=kubetune", "-o", "name").stdout.split()
    assert "finetunejobs.kubetune.io" in resources


def test_server_side_apply_tracks_field_managers(crds: None, kubectl: Kubectl) -> None:
    """Server-side apply creates, records the manager, and refuses to take over a field
    another manager owns unless forced: the merge happens in the apiserver."""
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["name"] = "ssa-job"
    kubectl("-n", NAMESPACE, "apply", "--server-side", "--field-manager=team-a", "-f", "-",
            stdin=yaml.safe_dump(obj))
    managers = {m["manager"]: m["operation"] for m in get_job(kubectl, "ssa-job")["metadata"]["managedFields"]}
    assert managers == {"team-a": "Apply"}
    obj["spec"]["nodes"] = 4
    conflict = kubectl("-n", NAMESPACE, "apply", "--server-side", "--field-manager=team-b", "-f", "-",
                       stdin=yaml.safe_dump(obj), check=False)
    assert conflict.returncode != 0 and "conflict" in conflict.stderr.lower()
    kubectl("-n", NAMESPACE, "apply", "--server-side", "--field-manager=team-b", "--force-conflicts",
            "-f", "-", stdin=yaml.safe_dump(obj))
    assert get_job(kubectl, "ssa-job")["spec"]["nodes"] == 4


def test_rbac_forbids_unbound_user_until_bound(crds: None, real_cluster: ControlPlane,
                                              kubectl: Kubectl) -> None:
    """A user with no binding gets 403; a Role + RoleBinding grants exactly that verb."""
    user = real_cluster.kubeconfig_for("mallory", ["kubetune-testers"])
    denied = kubectl("-n", NAMESPACE, "get", "finetunejobs", kubeconfig=user, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and '"mallory"' in denied.stderr
    kubectl("-n", NAMESPACE, "create", "role", "ftj-reader", "--verb=list",
            "--resource=finetunejobs.kubetune.io")
    kubectl("-n", NAMESPACE, "create", "rolebinding", "ftj-reader", "--role=ftj-reader",
            "--group=kubetune-testers")
    listed = kubectl("-n", NAMESPACE, "get", "finetunejobs", "-o", "name", kubeconfig=user)
    assert f"finetunejob.kubetune.io/{JOB}" in listed.stdout.split()
    delete = kubectl("-n", NAMESPACE, "delete", "finetunejob", JOB, "--dry-run=server", kubeconfig=user,
                     check=False)
    assert delete.returncode != 0 and "Forbidden" in delete.stderr


def test_service_account_token_identity(crds: None, real_cluster: ControlPlane, kubectl: Kubectl) -> None:
    """A TokenRequest token authenticates as the ServiceAccount (the operator's identity in
    a cluster), and RBAC applies to it like to any subject."""
    sa = real_cluster.service_account_kubeconfig(NAMESPACE, "kubetune-operator")
    who = json.loads(kubectl("auth", "whoami", "-o", "json", kubeconfig=sa).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{NAMESPACE}:kubetune-operator"
    can = kubectl("-n", NAMESPACE, "auth", "can-i", "watch", "finetunejobs.kubetune.io", kubeconfig=sa,
                  check=False)
    assert can.stdout.strip() == "no"


def test_fractional_exclusive_bound_is_enforced_by_cel(crds: None, kubectl: Kubectl) -> None:
    """`dpo.labelSmoothing < 0.5`: an integer 0 (how YAML's `0` and the default reach the server)
    is accepted, 0.5 is refused by the schema's CEL rule with the field named. The server
    truncates fractional `maximum`s for integer values, so a plain exclusiveMaximum would refuse
    the default and with it the whole CRD."""
    job = yaml.safe_load(EXAMPLE.read_text())
    job["metadata"]["name"] = "smoothing-ok"
    job["spec"]["training"]["dpo"] = {"labelSmoothing": 0}
    kubectl("-n", NAMESPACE, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(job))
    job["spec"]["training"]["dpo"] = {"labelSmoothing": 0.5}
    refused = kubectl("-n", NAMESPACE, "apply", "--dry-run=server", "-f", "-",
                      stdin=json.dumps(job), check=False)
    assert refused.returncode != 0
    assert "labelSmoothing" in refused.stderr and "must be < 0.5" in refused.stderr
