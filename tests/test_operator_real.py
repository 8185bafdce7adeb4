"""The operator against a real control plane: the chart's RBAC, the real controllers, the
admission webhook and the CRDs' own validation, all as a cluster runs them.

What runs for real:
- etcd, kube-apiserver, kube-controller-manager and kube-scheduler (tests/cluster; the session's
  `real_cluster`, or one of this module's own under KUBETUNE_CLUSTER_CONTROLLERS=0). The Job,
  ReplicaSet, Deployment, garbage-collector and HPA controllers act on what the operator creates;
- the Helm chart, rendered by the real Helm engine with default values plus the webhook (no
  cert-manager) and an S3 endpoint: its CRDs, ServiceAccount, ClusterRole and ClusterRoleBinding
  are applied as rendered; its Deployment is not (no image runs here), so the operator runs as a
  local process with exactly the Deployment's arguments and environment, except for the
  addresses and file paths of this machine and `--reconcile-interval=1` (the chart's 10 s would
  make the timer-driven steps, a reference that has Succeeded, slow to test);
- the operator's identity: a real ServiceAccount token (TokenRequest) of the chart's
  ServiceAccount, so every call is checked by RBAC. Any 403 in the operator's log fails the test
  that was running;
- the validating admission webhook: kopf serves it on 127.0.0.1 with a certificate from a test
  CA, and the chart's ValidatingWebhookConfiguration is registered with `clientConfig.url`
  (there is no kube-proxy to reach a Service) and that CA. It is scoped to the operator's
  namespace, so the CRDs' CEL rules are checked without it in another namespace;
- S3 is moto's server; the trainer's status.json is written there, as the trainer writes it.

What is played by the test (there is no container runtime): a fake kubelet for one Node
(tests/cluster_operator.py): pods the scheduler binds to it become Running and Ready, deletions
complete, and the test ends a pod's containers with an exit code, as the process inside would.
The Job, Deployment and ReplicaSet statuses are computed by the real controllers from that.
Not kwok's nodes (tests/cluster/sim.py): kwok completes a Job's pod at once unless the pod
carries its delay annotation, which the operator's pod templates cannot be given, and these
tests need a training pod to keep running until they end it. The node is tainted and the
test's pods select and tolerate it, so no other pod lands there, nor these anywhere else.

Where the webhook does not run (CEL_NS), the operator's own checks are exercised: a spec the CRDs
accept but the operator refuses, and spec.training changed after the start. What only a process
restart or many jobs show is in tests/test_operator_upgrades.py (kwok's nodes).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.operator.serving.render import ADAPTERS_KEY
from tests.cluster.certs import TinyCA
from tests.cluster.controlplane import ControlPlane, free_port
from tests.cluster.fixtures import CONTROLLERS, CORE, Kubectl, build_binaries
from tests.cluster_operator import (
    ChartOperator,
    Client,
    FakeKubelet,
    GarbageCollectorProbe,
    apply_chart,
    audited_calls,
    chart_objects,
    eventually,
    granted_calls,
    one,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first session builds the binaries

REPO = Path(__file__).resolve().parents[1]
RELEASE_NS = "kubetune"  # the chart's release namespace (its ServiceAccount)
NS = "kt-op"  # the operator's resources; the webhook is registered for this namespace
CEL_NS = "kt-cel"  # no webhook here: only the CRDs' own validation
WEBHOOK_DENIED = 'admission webhook "validate-spec.kubetune.io" denied the request'
GROUP_VERSION = "kubetune.io/v1alpha1"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane when it runs the controllers, else one of this module's own."""
    shared = request.getfixturevalue("real_cluster")
    if getattr(shared, "controllers", False):
        yield shared
        return
    bin_dir = build_binaries(CORE + CONTROLLERS)
    with ControlPlane(bin_dir, tmp_path_factory.mktemp("control-plane-controllers"), controllers=True) as own:
        yield own


@pytest.fixture(scope="module")
def kctl(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """The real kubectl, as admin unless given another kubeconfig."""
    return Kubectl(cluster, tmp_path_factory.mktemp("kubectl-cache"))


@pytest.fixture(scope="module")
def admin(cluster: ControlPlane) -> Client:
    return Client(cluster.admin_kubeconfig)


@dataclass
class S3:
    endpoint: str
    client: Any

    def put_status(self, job: str, status: dict[str, Any]) -> None:
        """status.json as the trainer writes it into the job's output location."""
        self.client.put_object(Bucket="outputs", Key=f"{job}/status.json", Body=json.dumps(status).encode())


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="outputs")
    yield S3(endpoint, client)
    server.stop()


@pytest.fixture(scope="module")
def webhook_ca() -> TinyCA:
    """The CA of the webhook's serving certificate (the chart's webhook.caBundle)."""
    return TinyCA("kubetune-webhook-ca")


@pytest.fixture(scope="module")
def chart(s3: S3, webhook_ca: TinyCA, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The chart as the real Helm engine installs it: default values, plus the webhook with an
    existing certificate (no cert-manager here), the S3 endpoint the operator reads from, and kopf
    peering (as with replicaCount > 1; so the audited calls cover the peering rules too)."""
    values = {
        "s3": {"endpoint": s3.endpoint, "region": "us-east-1"},
        "peering": {"enabled": True},
        "webhook": {"enabled": True, "certManager": {"enabled": False}, "existingSecret": "kubetune-webhook-tls",
                    "caBundle": base64.b64encode(webhook_ca.cert_pem).decode()},
    }
    return chart_objects(values, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def installed(cluster: ControlPlane, kctl: Kubectl, chart: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chart's CRDs and RBAC applied as rendered, and the test namespaces."""
    apply_chart(kctl, chart, (RELEASE_NS, NS, CEL_NS))
    return chart


@pytest.fixture(scope="module")
def collector(admin: Client, installed: list[dict[str, Any]]) -> GarbageCollectorProbe:
    """Started before the operator: by the first deletion a test checks, the garbage collector
    has usually rediscovered the new kinds (`.wait()` makes sure)."""
    return GarbageCollectorProbe(admin, CEL_NS)


@pytest.fixture(scope="module")
def operator(cluster: ControlPlane, kctl: Kubectl, installed: list[dict[str, Any]], s3: S3, webhook_ca: TinyCA,
             collector: GarbageCollectorProbe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartOperator]:
    """`kubetune operator` with the chart Deployment's arguments and environment, as the chart's
    ServiceAccount, serving the webhook that the apiserver calls."""
    workdir = tmp_path_factory.mktemp("operator")
    serving = webhook_ca.serving("127.0.0.1")
    (workdir / "tls.crt").write_bytes(serving.cert_pem)
    (workdir / "tls.key").write_bytes(serving.key_pem)
    webhook_port = free_port()
    # KUBETUNE_WEBHOOK_ADDR (no flag; the pod listens on 0.0.0.0): loopback only on this machine.
    operator = ChartOperator(cluster, installed, workdir, RELEASE_NS, flags={
        "--webhook-port": str(webhook_port),
        "--webhook-host": "127.0.0.1",
        "--webhook-cert": str(workdir / "tls.crt"),
        "--webhook-key": str(workdir / "tls.key"),
        "--reconcile-interval": "1",
    }, env={"KUBETUNE_WEBHOOK_ADDR": "127.0.0.1"})
    env = operator.process.env
    assert env.get("KUBETUNE_KOPF_SCANNING") == "0" and env.get("AWS_ENDPOINT_URL_S3") == s3.endpoint
    hook = copy.deepcopy(one(installed, "ValidatingWebhookConfiguration"))
    hook["metadata"]["name"] = "kubetune-test-webhook"
    for webhook in hook["webhooks"]:
        path = webhook["clientConfig"]["service"]["path"]
        assert path == "/validate-spec"  # kopf serves the handler `validate-spec` there
        url = f"https://127.0.0.1:{webhook_port}{path}"
        webhook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(webhook_ca.cert_pem).decode()}
        webhook["namespaceSelector"] = {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [NS]}]}
    assert any(a.startswith("--peering=") for a in operator.process.command), operator.process.command
    operator.webhook_url = f"https://127.0.0.1:{webhook_port}/validate-spec"
    with operator:
        kctl("apply", "-f", "-", stdin=json.dumps(hook))
        try:
            # The apiserver reaches the webhook once a bad spec comes back with its message.
            bad = finetunejob("webhook-probe", {}, datasets=[{"path": "data/train.jsonl"}])
            eventually(lambda: WEBHOOK_DENIED in kctl("-n", NS, "apply", "--dry-run=server", "-f", "-",
                                                    stdin=json.dumps(bad), check=False).stderr,
                       timeout=60, what="the webhook behind the apiserver")
            yield operator
        finally:
            kctl("delete", "validatingwebhookconfiguration", hook["metadata"]["name"], "--ignore-not-found")
    forbidden = operator.process.forbidden_lines()
    assert not forbidden, "the operator was refused calls (RBAC):\n" + "\n".join(forbidden[:20])


@pytest.fixture(autouse=True)
def _no_forbidden_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every 403 the operator logs while a test runs fails that test (the chart's RBAC must
    grant each call the operator makes)."""
    if "operator" not in request.fixturenames:
        yield
        return
    process = request.getfixturevalue("operator").process
    start = len(process.text())
    yield
    forbidden = process.forbidden_lines(start)
    if forbidden:
        pytest.fail("the operator logged refused calls (HTTP 403):\n" + "\n".join(forbidden[:20]))


@pytest.fixture(scope="module")
def kubelet(admin: Client, installed: list[dict[str, Any]]) -> Iterator[FakeKubelet]:
    with FakeKubelet(admin, gpus=64) as node:
        yield node
    assert not node.errors, node.errors[:5]


# --------------------------------------------------------------------------------------------
# manifests and small readers


def finetunejob(name: str, placement: dict[str, Any], *, nodes: int | None = 2,
                datasets: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "gpusPerNode": 1,
        **placement,
        "terminationGracePeriodSeconds": 5,
        "training": {
            "model": {"path": "s3://models/llama-3-8b"},
            "data": {"datasets": datasets or [{"path": "s3://data/chat.jsonl", "format": "sharegpt"}], "cache": "off"},
            "train": {"maxSteps": 100},
            "output": {"path": f"s3://outputs/{name}"},
        },
        **spec,
    }
    if nodes is not None:
        body["nodes"] = nodes
    body = {k: v for k, v in body.items() if v is not None}
    return {"apiVersion": GROUP_VERSION, "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def inferenceservice(name: str, placement: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body = {"model": {"uri": "s3://models/base"}, "engine": "vllm", "gpus": 1, **placement,
            "terminationGracePeriodSeconds": 10, **spec}
    return {"apiVersion": GROUP_VERSION, "kind": "InferenceService", "metadata": {"name": name}, "spec": body}


def apply(kctl: Kubectl, body: dict[str, Any], ns: str = NS, *args: str) -> None:
    kctl("-n", ns, "apply", *args, "-f", "-", stdin=json.dumps(body))


def merge(kctl: Kubectl, kind: str, name: str, patch: dict[str, Any], ns: str = NS, check: bool = True) -> Any:
    return kctl("-n", ns, "patch", kind.lower(), name, "--type=merge", "-p", json.dumps(patch), check=check)


def status_of(admin: Client, kind: str, name: str, ns: str = NS) -> dict[str, Any]:
    return (admin.get(kind, ns, name) or {}).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def phase_is(admin: Client, kind: str, name: str, phase: str, ns: str = NS, **fields: Any) -> dict[str, Any] | None:
    obj = admin.get(kind, ns, name)
    status = (obj or {}).get("status") or {}
    if status.get("phase") == phase and all(status.get(k) == v for k, v in fields.items()):
        return obj
    return None


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(ref["uid"] == owner["metadata"]["uid"] and ref["kind"] == owner["kind"] and ref.get("controller")
               for ref in obj["metadata"].get("ownerReferences") or [])


def job_pods(admin: Client, job: str, ns: str = NS, phase: str | None = None) -> list[dict[str, Any]]:
    pods = admin.list("Pod", ns, f"batch.kubernetes.io/job-name={job}")
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")
            and (phase is None or (p.get("status") or {}).get("phase") == phase)]


def run_to_end(admin: Client, kubelet: FakeKubelet, job: str, pods: int, exit_code: int = 0, ns: str = NS) -> None:
    """Wait for the Job's pods to run on the fake node, then end them with `exit_code` (the
    trainer exiting); the real Job controller decides what that means for the Job."""
    running = eventually(lambda: len(job_pods(admin, job, ns, "Running")) == pods and job_pods(admin, job, ns, "Running"),
                         what=f"{pods} running pods of Job {job}")
    for pod in running if exit_code == 0 else running[:1]:
        kubelet.finish(pod, exit_code)


def job_condition(admin: Client, job: str, type_: str, ns: str = NS) -> dict[str, Any] | None:
    obj = admin.get("Job", ns, job)
    found = condition((obj or {}).get("status") or {}, type_)
    return found if found.get("status") == "True" else None


def adapter_names(admin: Client, config_map: str, ns: str = NS) -> list[str]:
    """The adapters the serving pods load (the operator's ConfigMap, as the sidecar reads it)."""
    data = (admin.get("ConfigMap", ns, config_map) or {}).get("data") or {}
    return [a["name"] for a in json.loads(data.get(ADAPTERS_KEY) or "{}").get("adapters", [])]


def events(admin: Client, name: str, ns: str = NS) -> list[dict[str, Any]]:
    return [e for e in admin.list("Event", ns) if e["involvedObject"].get("name") == name]


def table(kctl: Kubectl, kind: str, name: str, ns: str = NS) -> dict[str, str]:
    """`kubectl get KIND NAME -o wide` as {COLUMN: value}: the server-side table."""
    header, row = kctl("-n", ns, "get", kind, name, "-o", "wide").stdout.splitlines()[:2]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = [*starts[1:], None]
    return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, bounds, strict=True)}


def delete_and_collect(kctl: Kubectl, admin: Client, collector: GarbageCollectorProbe, kind: str, name: str,
                       items: list[tuple[str, str]], pod_selector: str, ns: str = NS) -> None:
    """Delete a resource: kopf's finalizer goes, then the garbage collector removes every
    (kind, name) of `items` and the pods (grandchildren). Only once the collector watches the
    kind (`collector.wait()`): before that, it finds out about the deletion up to a minute late."""
    collector.wait()
    kctl("-n", ns, "delete", kind, name, "--wait=false")
    eventually(lambda: admin.get(kind, ns, name) is None, what=f"{kind} {name} deleted")
    left: list[Any] = []

    def collected() -> bool:
        left[:] = [(kind, name) for kind, name in items if admin.get(kind, ns, name) is not None]
        left.extend(p["metadata"]["name"] for p in admin.list("Pod", ns, pod_selector))
        return not left

    try:
        eventually(collected, what="children garbage-collected")
    except AssertionError:
        raise AssertionError(f"not garbage-collected: {left}") from None
    # Nothing comes back: a reconcile racing the deletion, or the next timer tick (every second
    # here), would recreate a child within 2.5 s (a window with no event to wait on: checked throughout).
    window = time.monotonic() + 2.5
    while time.monotonic() < window:
        assert collected(), f"recreated after the deletion: {left}"
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# the operator's identity


def test_operator_runs_as_the_charts_service_account(operator: ChartOperator, kctl: Kubectl) -> None:
    """The token is the chart's ServiceAccount; RBAC grants it the chart's rules and no more
    (it may create Secrets, an API key, but never read one)."""
    who = json.loads(kctl("auth", "whoami", "-o", "json", kubeconfig=operator.kubeconfig).stdout)
    assert who["status"]["userInfo"]["username"] == operator.service_account

    def can(*args: str) -> str:
        return kctl("-n", NS, "auth", "can-i", *args, kubeconfig=operator.kubeconfig, check=False).stdout.strip()

    assert can("patch", "configmaps") == "yes"
    assert can("patch", "finetunejobs.kubetune.io", "--subresource=status") == "yes"
    assert can("create", "secrets") == "yes"
    assert can("get", "secrets") == "no" and can("list", "secrets") == "no"
    assert can("delete", "jobs.batch") == "no"


# --------------------------------------------------------------------------------------------
# admission: the webhook behind the real apiserver, and the CRDs' CEL rules without it


def _alignment(**training: Any) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "AlignmentJob", "metadata": {"name": "cel"}, "spec": {
        "baseModelFrom": {"fineTuneJob": "base"},
        "training": {"stage": "dpo", "data": {"datasets": [{"path": "s3://data/prefs.jsonl"}]}, **training}}}


def _training(name: str = "cel", gpuMemoryGiB: float | None = None, modelParameters: str | None = None,
              **training: Any) -> dict[str, Any]:
    body = finetunejob(name, {}, gpuMemoryGiB=gpuMemoryGiB, modelParameters=modelParameters)
    body["spec"]["training"].update(training)
    return body


@pytest.mark.parametrize(("body", "fragments"), [
    pytest.param(finetunejob("local-data", {}, datasets=[{"path": "data/train.jsonl"}]),
                 ["spec.training.data.datasets[0].path", "is a local path, which a training pod cannot read"],
                 id="local-dataset"),
    pytest.param(_training(name="too-big", method="full", gpuMemoryGiB=16, modelParameters="70B"),
                 ["does not fit in GPU memory"], id="gpu-memory"),
    pytest.param(inferenceservice("node-path", {}, cache={"type": "hostPath", "path": "/etc"}),
                 ["cache.path '/etc' is not accepted", "--host-cache-root"], id="hostpath-outside-root"),
    pytest.param(_training(name="bad-cache", data={"datasets": [{"path": "s3://data/a.jsonl"}], "cache": "s3://"}),
                 ["spec.training.data", "cache"], id="bad-s3-cache"),
])
def test_webhook_refuses_bad_specs_with_field_messages(operator: ChartOperator, kctl: Kubectl, body: dict[str, Any],
                                                       fragments: list[str]) -> None:
    """`kubectl apply` of a spec the schema accepts but the operator would refuse: the apiserver
    calls the webhook, which answers with `kubetune validate`'s field-level message."""
    refused = kctl("-n", NS, "apply", "-f", "-", stdin=json.dumps(body), check=False)
    assert refused.returncode != 0 and WEBHOOK_DENIED in refused.stderr, refused.stderr
    for fragment in fragments:
        assert fragment in refused.stderr, refused.stderr
    assert kctl("-n", NS, "get", body["kind"].lower(), body["metadata"]["name"], check=False).returncode != 0


CEL_CASES = [
    pytest.param(inferenceservice("cel", {}, minReplicas=3, maxReplicas=2),
                 "spec.maxReplicas", "maxReplicas is below minReplicas", id="max-below-min"),
    pytest.param(inferenceservice("cel", {}, adapters=[{"name": "a", "uri": "s3://x/a"}, {"name": "a", "uri": "s3://x/b"}]),
                 "spec.adapters", "adapter names must be unique", id="duplicate-adapters"),
    pytest.param(inferenceservice("cel", {}, model={"uri": "s3://m", "name": "a"}, adapters=[{"name": "a", "uri": "s3://x"}]),
                 "spec.adapters", "an adapter has the base model's name", id="adapter-named-like-model"),
    pytest.param(inferenceservice("cel", {}, gpus=2, tensorParallelSize=4),
                 "spec.tensorParallelSize", "tensorParallelSize exceeds gpus", id="tp-exceeds-gpus"),
    pytest.param(inferenceservice("cel", {}, maxReplicas=3, autoscaling={"metric": "cpu"}),
                 "spec.autoscaling.metric", "autoscaling on cpu needs resources.requests.cpu", id="cpu-without-request"),
    pytest.param(inferenceservice("cel", {}, model={"uri": "s3://m", "fromJob": {"fineTuneJob": "a"}}),
                 "spec.model", "set exactly one of uri or fromJob", id="two-model-sources"),
    pytest.param(inferenceservice("cel", {}, model={"fromJob": {"fineTuneJob": "a", "alignmentJob": "b"}}),
                 "spec.model.fromJob", "set exactly one of fineTuneJob or alignmentJob", id="two-references"),
    pytest.param(inferenceservice("cel", {}, cache={"type": "pvc"}), "spec.cache", "cache type pvc needs claimName",
                 id="pvc-without-claim"),
    pytest.param(inferenceservice("cel", {}, cache={"subPath": "x"}), "spec.cache.subPath",
                 "subPath is only for cache type hostPath", id="subpath-without-hostpath"),
    pytest.param(_alignment(stage="sft"), "spec.training.stage", "an AlignmentJob runs an alignment stage", id="alj-stage"),
    pytest.param(_alignment(model={"path": "s3://m"}), "spec.baseModelFrom",
                 "set either training.model.path or baseModelFrom, not both", id="alj-two-base-models"),
    pytest.param(_training(distributed={"deepspeed": {"offloadParams": True}}),
                 "spec.training.distributed.deepspeed.offloadParams", "offloadParams needs stage 3", id="offload-stage"),
    pytest.param(_training(reward={"model": "s3://r", "function": "m:f"}), "spec.training.reward",
                 "set reward.model or reward.function, not both", id="two-rewards"),
    pytest.param(_training(method="freeze", freeze={"trainableLayers": 0}), "spec.training.freeze",
                 "freeze leaves nothing trainable", id="freeze-nothing"),
]


@pytest.mark.parametrize(("body", "field", "message"), CEL_CASES)
def test_crd_cel_rules_refuse_cross_field_errors_without_the_webhook(installed: list[dict[str, Any]], kctl: Kubectl,
                                                                     body: dict[str, Any], field: str, message: str) -> None:
    """The cross-field rules of the spec models, as the CRDs' `x-kubernetes-validations`: the
    apiserver itself refuses the object, naming the field, in a namespace no webhook covers."""
    refused = kctl("-n", CEL_NS, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(body), check=False)
    assert refused.returncode != 0 and "is invalid" in refused.stderr, refused.stderr
    assert f"{field}: Invalid value" in refused.stderr and message in refused.stderr, refused.stderr
    assert "admission webhook" not in refused.stderr


def test_crds_accept_every_example_and_leave_the_rest_to_the_webhook(installed: list[dict[str, Any]],
                                                                      kctl: Kubectl) -> None:
    """The rules refuse none of the documented manifests; and what only the webhook checks
    (a local dataset path) passes the CRD where no webhook is registered."""
    docs = [d for path in sorted(REPO.joinpath("examples").rglob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)
            and str(d.get("apiVersion", "")).startswith("kubetune.io/")]
    assert {d["kind"] for d in docs} == {"FineTuneJob", "AlignmentJob", "InferenceService"}
    for doc in docs:
        kctl("-n", CEL_NS, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(doc))
    local = finetunejob("local-data", {}, datasets=[{"path": "data/train.jsonl"}])
    kctl("-n", CEL_NS, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(local))


# --------------------------------------------------------------------------------------------
# what `kubectl` shows and does


def test_printer_columns_category_and_server_side_apply(operator: ChartOperator, admin: Client, kctl: Kubectl) -> None:
    """Columns come from the server's table after its defaulting (NODES of a job that sets no
    nodes is 1, not <none>); `kubectl get kubetune` lists every kind; a GitOps tool's
    server-side apply creates and updates a resource the operator also writes (status,
    kopf's annotations) without conflicts."""
    nowhere = {"nodeSelector": {FakeKubelet.LABEL: "no-such-node"}}
    apply(kctl, finetunejob("defaults", nowhere, nodes=None, gpusPerNode=None))
    row = table(kctl, "ftj", "defaults")
    assert (row["NODES"], row["GPUS/NODE"]) == ("1", "1"), row
    eventually(lambda: table(kctl, "ftj", "defaults")["PHASE"] in ("Pending", "Running"), what="a phase column")

    service = inferenceservice("gitops", nowhere, gpus=0)
    kctl("-n", NS, "apply", "--server-side", "--field-manager=gitops", "-f", "-", stdin=json.dumps(service))
    eventually(lambda: status_of(admin, "InferenceService", "gitops").get("phase"), what="reconciled")
    eventually(lambda: admin.get("Deployment", NS, "gitops-isvc"), what="its Deployment")
    service["spec"]["adapters"] = [{"name": "faq", "uri": "s3://outputs/faq-lora"}]
    kctl("-n", NS, "apply", "--server-side", "--field-manager=gitops", "-f", "-", stdin=json.dumps(service))
    eventually(lambda: adapter_names(admin, "gitops-isvc-adapters") == ["faq"], what="the applied change reconciled")
    managers = {m["manager"]: m["operation"] for m in admin.get("InferenceService", NS, "gitops")["metadata"]["managedFields"]
                if m.get("subresource") is None}
    assert managers.get("gitops") == "Apply"
    assert all(op != "Apply" for manager, op in managers.items() if manager != "gitops")

    listed = kctl("-n", NS, "get", "kubetune", "-o", "name").stdout.split()
    assert {"finetunejob.kubetune.io/defaults", "inferenceservice.kubetune.io/gitops"} <= set(listed), listed
    resources = set(kctl("api-resources", "--categories=kubetune", "-o", "name").stdout.split())
    assert {"finetunejobs.kubetune.io", "alignmentjobs.kubetune.io", "inferenceservices.kubetune.io"} <= resources
    for kind, name in (("ftj", "defaults"), ("kisvc", "gitops")):
        kctl("-n", NS, "delete", kind, name, "--wait=false")


# --------------------------------------------------------------------------------------------
# training kinds


def test_failed_pods_restart_the_gang_or_fail_on_a_config_error(
        operator: ChartOperator, admin: Client, kctl: Kubectl, kubelet: FakeKubelet) -> None:
    """The Jobs the operator renders, failed by the real Job controller: a pod exiting 1 fails
    the attempt (backoffLimit 0) and the operator starts the next one; exit code 2 matches the
    podFailurePolicy (the trainer refused its configuration) and fails the resource at once."""
    apply(kctl, finetunejob("gang", kubelet.placement, backoffLimit=1))
    apply(kctl, finetunejob("cfg", kubelet.placement, nodes=1))

    eventually(lambda: admin.get("Job", NS, "gang-ftj-a1"), what="gang attempt 1")
    run_to_end(admin, kubelet, "gang-ftj-a1", pods=2, exit_code=1)
    failed = eventually(lambda: job_condition(admin, "gang-ftj-a1", "Failed"), what="attempt 1 Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    second = eventually(lambda: admin.get("Job", NS, "gang-ftj-a2"), what="gang attempt 2")
    env = {e["name"]: e.get("value") for e in second["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_ATTEMPT"] == "2"
    restarted = eventually(lambda: phase_is(admin, "FineTuneJob", "gang", "Running", attempts=2), what="attempt 2 running")
    assert restarted["status"]["jobName"] == "gang-ftj-a2"
    run_to_end(admin, kubelet, "gang-ftj-a2", pods=2, exit_code=1)
    gave_up = eventually(lambda: phase_is(admin, "FineTuneJob", "gang", "Failed"), what="backoffLimit reached")
    assert gave_up["status"]["reason"] == "BackoffLimitExceeded"

    eventually(lambda: admin.get("Job", NS, "cfg-ftj-a1"), what="cfg Job")
    run_to_end(admin, kubelet, "cfg-ftj-a1", pods=1, exit_code=2)
    assert eventually(lambda: job_condition(admin, "cfg-ftj-a1", "Failed"), what="cfg Job Failed")["reason"] == "PodFailurePolicy"
    config_error = eventually(lambda: phase_is(admin, "FineTuneJob", "cfg", "Failed"), what="ConfigError")
    assert config_error["status"]["reason"] == "ConfigError" and "exit code 2" in config_error["status"]["message"]
    assert admin.get("Job", NS, "cfg-ftj-a2") is None


def test_alignmentjob_waits_for_its_finetunejob(operator: ChartOperator, admin: Client, kctl: Kubectl,
                                                 kubelet: FakeKubelet) -> None:
    apply(kctl, {"apiVersion": GROUP_VERSION, "kind": "AlignmentJob", "metadata": {"name": "dpo"}, "spec": {
        "nodes": 1, "gpusPerNode": 1, **kubelet.placement, "baseModelFrom": {"fineTuneJob": "base"},
        "training": {"stage": "dpo", "data": {"datasets": [{"path": "s3://data/prefs.jsonl"}]},
                     "output": {"path": "s3://outputs/dpo"}}}})
    eventually(lambda: status_of(admin, "AlignmentJob", "dpo").get("reason") == "ReferenceNotFound", what="ReferenceNotFound")
    assert condition(status_of(admin, "AlignmentJob", "dpo"), "DependenciesReady")["status"] == "False"

    apply(kctl, finetunejob("base", kubelet.placement, nodes=1))
    eventually(lambda: status_of(admin, "AlignmentJob", "dpo").get("reason") == "WaitingForReference", what="waiting")
    eventually(lambda: phase_is(admin, "FineTuneJob", "base", "Running"), what="base Running")
    assert admin.get("Job", NS, "dpo-alj-a1") is None

    run_to_end(admin, kubelet, "base-ftj-a1", pods=1)
    eventually(lambda: phase_is(admin, "FineTuneJob", "base", "Succeeded"), what="base Succeeded")
    job = eventually(lambda: admin.get("Job", NS, "dpo-alj-a1"), what="the AlignmentJob's Job")
    assert job["spec"]["completions"] == 1
    assert "path: s3://outputs/base\n" in admin.get("ConfigMap", NS, "dpo-alj-config")["data"]["job.yaml"]
    status = eventually(lambda: phase_is(admin, "AlignmentJob", "dpo", "Running"), what="dpo Running")["status"]
    assert status["baseModelUri"] == "s3://outputs/base"
    assert condition(status, "DependenciesReady")["status"] == "True"


def test_prepare_job_tokenizes_before_the_training_job(operator: ChartOperator, admin: Client, kctl: Kubectl,
                                                       kubelet: FakeKubelet) -> None:
    """With an s3:// data.cache the datasets are tokenized once, in a one-pod CPU Job, first: while
    its pod runs the resource waits (Preparing), and the gang's Job exists only once it succeeded."""
    body = finetunejob("prep", kubelet.placement, nodes=1)
    body["spec"]["training"]["data"]["cache"] = "s3://cache/kubetune/"
    apply(kctl, body)
    prepare = eventually(lambda: admin.get("Job", NS, "prep-ftj-prepare"), what="the prepare Job")
    assert prepare["spec"]["template"]["spec"]["containers"][0]["args"] == ["prepare", "/etc/kubetune/job.yaml"]
    eventually(lambda: status_of(admin, "FineTuneJob", "prep").get("message", "").startswith(
        "tokenizing the datasets in Job"), what="a reconcile that saw the prepare pod running")
    preparing = status_of(admin, "FineTuneJob", "prep")
    assert (preparing["phase"], preparing["reason"]) == ("Pending", "Preparing")
    assert condition(preparing, "DataPrepared")["status"] == "False"
    assert admin.get("Job", NS, "prep-ftj-a1") is None

    run_to_end(admin, kubelet, "prep-ftj-prepare", pods=1)
    eventually(lambda: admin.get("Job", NS, "prep-ftj-a1"), what="the training Job after the prepare Job")
    started = eventually(lambda: condition(status_of(admin, "FineTuneJob", "prep"), "DataPrepared").get("status") == "True"
                         and status_of(admin, "FineTuneJob", "prep"), what="DataPrepared")
    assert started["attempts"] == 1
    # In the order they were written (timestamps have one-second resolution; etcd's revisions do not).
    reasons = [e["reason"] for e in sorted(events(admin, "prep"), key=lambda e: int(e["metadata"]["resourceVersion"]))]
    assert reasons.index("Preparing") < reasons.index("Prepared") < reasons.index("JobCreated"), reasons


def test_missing_s3_secret_waits_with_a_condition(operator: ChartOperator, admin: Client, kctl: Kubectl,
                                                  kubelet: FakeKubelet) -> None:
    """A job naming an S3 Secret that does not exist waits (Pending, SecretNotFound) instead of
    starting pods that cannot start; the operator, which may create Secrets but never read one,
    finds out with a dry-run create. Once the Secret exists the Job starts, and its pods take the
    credentials by reference only."""
    apply(kctl, finetunejob("sec", kubelet.placement, nodes=1, storage={"secretRef": {"name": "s3-creds"}}))
    waiting = eventually(lambda: status_of(admin, "FineTuneJob", "sec").get("reason") == "SecretNotFound"
                         and status_of(admin, "FineTuneJob", "sec"), what="SecretNotFound")
    assert waiting["phase"] == "Pending" and "'s3-creds'" in waiting["message"]
    assert admin.get("Job", NS, "sec-ftj-a1") is None
    admin.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                  "stringData": {"AWS_ACCESS_KEY_ID": "AKIA-TEST", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}}, NS)
    job = eventually(lambda: admin.get("Job", NS, "sec-ftj-a1"), what="the Job once the Secret exists")
    assert "s3cr3t-value" not in json.dumps(job) and "AKIA-TEST" not in json.dumps(job)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}


KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def finalizers(admin: Client, kind: str, name: str, ns: str = NS) -> list[str]:
    return ((admin.get(kind, ns, name) or {}).get("metadata") or {}).get("finalizers") or []


def test_reconcile_checks_what_the_webhook_checks_and_finished_jobs_keep_no_finalizer(
        operator: ChartOperator, admin: Client, kctl: Kubectl, kubelet: FakeKubelet) -> None:
    """Where no webhook runs (CEL_NS: it was not installed, or failed open), the operator checks the
    spec itself: a spec the CRD accepts but the operator refuses fails (InvalidSpec, a Warning
    event, no children) until fixed, and spec.training cannot change once the job has started
    (TrainingSpecImmutable; the running Job and its ConfigMap are left alone). A job in flight has
    kopf's timer and so its finalizer; a finished one (Succeeded, or Failed) has neither, so it
    costs no reconciles and can be deleted with the operator gone."""
    apply(kctl, finetunejob("broken", kubelet.placement, nodes=1, datasets=[{"path": "data/train.jsonl"}]), CEL_NS)
    failed = eventually(lambda: phase_is(admin, "FineTuneJob", "broken", "Failed", ns=CEL_NS), what="InvalidSpec")
    assert failed["status"]["reason"] == "InvalidSpec"
    assert "spec.training.data.datasets[0].path" in condition(failed["status"], "SpecValid")["message"]
    assert [e["type"] for e in events(admin, "broken", CEL_NS) if e["reason"] == "InvalidSpec"] == ["Warning"]
    assert admin.get("ConfigMap", CEL_NS, "broken-ftj-config") is None and admin.get("Job", CEL_NS, "broken-ftj-a1") is None
    eventually(lambda: KOPF_FINALIZER not in finalizers(admin, "FineTuneJob", "broken", CEL_NS), what="no finalizer")

    apply(kctl, finetunejob("imm", kubelet.placement, nodes=1), CEL_NS)
    eventually(lambda: phase_is(admin, "FineTuneJob", "imm", "Running", ns=CEL_NS), what="imm Running")
    assert KOPF_FINALIZER in finalizers(admin, "FineTuneJob", "imm", CEL_NS)
    merge(kctl, "FineTuneJob", "imm", {"spec": {"training": {"train": {"maxSteps": 5000}}}}, ns=CEL_NS)
    immutable = eventually(lambda: condition(status_of(admin, "FineTuneJob", "imm", CEL_NS), "SpecValid")
                           .get("status") == "False" and status_of(admin, "FineTuneJob", "imm", CEL_NS),
                           what="TrainingSpecImmutable")
    assert condition(immutable, "SpecValid")["reason"] == "TrainingSpecImmutable"
    assert "TrainingSpecImmutable" in {e["reason"] for e in events(admin, "imm", CEL_NS)}
    assert "maxSteps: 100\n" in admin.get("ConfigMap", CEL_NS, "imm-ftj-config")["data"]["job.yaml"]
    run_to_end(admin, kubelet, "imm-ftj-a1", pods=1, ns=CEL_NS)
    eventually(lambda: phase_is(admin, "FineTuneJob", "imm", "Succeeded", ns=CEL_NS), what="imm Succeeded")
    eventually(lambda: KOPF_FINALIZER not in finalizers(admin, "FineTuneJob", "imm", CEL_NS), what="finalizer removed")
    assert admin.get("Job", CEL_NS, "imm-ftj-a2") is None

    # Fixing the spec brings the failed job back: the update handler, not a timer.
    merge(kctl, "FineTuneJob", "broken", {"spec": {"training": {"data": {"datasets": [{"path": "s3://data/a.jsonl"}]}}}},
          ns=CEL_NS)
    eventually(lambda: admin.get("Job", CEL_NS, "broken-ftj-a1"), what="the fixed job's Job")

    # The same for an InferenceService: a node directory as its cache fails it before anything exists.
    apply(kctl, inferenceservice("root", kubelet.placement, cache={"type": "hostPath", "path": "/etc"}), CEL_NS)
    refused = eventually(lambda: phase_is(admin, "InferenceService", "root", "Failed", ns=CEL_NS), what="InvalidSpec")
    assert "cache.path '/etc' is not accepted" in refused["status"]["message"]
    assert admin.get("Deployment", CEL_NS, "root-isvc") is None and admin.get("Secret", CEL_NS, "root-isvc-api-key") is None
    for kind, name in (("ftj", "broken"), ("ftj", "imm"), ("kisvc", "root")):
        kctl("-n", CEL_NS, "delete", kind, name, "--wait=false")


def test_finetunejob_runs_reports_progress_suspends_resumes_succeeds_and_is_collected(
        operator: ChartOperator, admin: Client, kctl: Kubectl, kubelet: FakeKubelet, s3: S3,
        collector: GarbageCollectorProbe) -> None:
    name, job = "sft", "sft-ftj-a1"
    apply(kctl, finetunejob(name, kubelet.placement))
    cr = admin.get("FineTuneJob", NS, name)
    assert cr is not None

    # Children, created by the operator under RBAC and owned by the resource.
    children = eventually(lambda: all(admin.get(k, NS, n) for k, n in (("ConfigMap", "sft-ftj-config"), (
        "Service", "sft-ftj"), ("Job", job))), what="ConfigMap, Service and Job")
    assert children
    for kind, child in (("ConfigMap", "sft-ftj-config"), ("Service", "sft-ftj"), ("Job", job)):
        assert owned_by(admin.get(kind, NS, child), cr), f"{kind} {child} is not owned by the FineTuneJob"
    spec = admin.get("Job", NS, job)["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"

    # The real Job controller starts two pods; the fake node runs them: Running, 2 ready.
    running = eventually(lambda: phase_is(admin, "FineTuneJob", name, "Running"), what="Running")
    eventually(lambda: "2 ready" in status_of(admin, "FineTuneJob", name).get("message", ""), what="2 pods ready")
    assert running["status"]["attempts"] == 1 and running["status"]["jobName"] == job

    # Progress from the trainer's status.json in S3, as the server renders the columns.
    trainer_status = {"phase": "Running", "step": 40, "totalSteps": 100, "loss": 1.25, "etaSeconds": 90.0,
                      "tokensPerSecond": 5120.5, "lastCheckpoint": "s3://outputs/sft/checkpoint-40",
                      "updatedAt": time.time()}
    s3.put_status(name, trainer_status)
    progress = eventually(lambda: (status_of(admin, "FineTuneJob", name).get("progress") or {}).get("step") == 40
                          and status_of(admin, "FineTuneJob", name)["progress"], what="progress from status.json")
    assert progress["percent"] == 40.0 and progress["loss"] == 1.25 and progress["tokensPerSecond"] == 5120.5
    assert progress["lastCheckpoint"] == "s3://outputs/sft/checkpoint-40"
    row = table(kctl, "ftj", name)
    assert (row["PHASE"], row["PROGRESS"], row["LOSS"], row["NODES"], row["ATTEMPTS"]) == ("Running", "40", "1.25", "2", "1")

    # spec.training is immutable once started: the webhook refuses the update (old object seen).
    refused = merge(kctl, "FineTuneJob", name, {"spec": {"training": {"train": {"maxSteps": 5000}}}}, check=False)
    assert refused.returncode != 0 and WEBHOOK_DENIED in refused.stderr
    assert "spec.training cannot change after the job has started" in refused.stderr

    # Suspend: the operator suspends the Job, the Job controller deletes the pods.
    merge(kctl, "FineTuneJob", name, {"spec": {"suspend": True}})
    eventually(lambda: phase_is(admin, "FineTuneJob", name, "Suspended"), what="Suspended")
    eventually(lambda: job_condition(admin, job, "Suspended"), what="the Job controller's Suspended condition")
    eventually(lambda: not admin.list("Pod", NS, f"batch.kubernetes.io/job-name={job}"), what="pods stopped")
    # Resume: new pods, Running again, still attempt 1.
    merge(kctl, "FineTuneJob", name, {"spec": {"suspend": False}})
    eventually(lambda: "2 ready" in status_of(admin, "FineTuneJob", name).get("message", "")
               and phase_is(admin, "FineTuneJob", name, "Running"), what="Running after resume")
    assert condition(status_of(admin, "FineTuneJob", name), "Suspended")["status"] == "False"

    # status.json is written by user code: out-of-range numbers (an OverflowError in every
    # reconcile once) must not keep the job from succeeding.
    s3.put_status(name, {**trainer_status, "step": 10**400, "updatedAt": 1e20, "outputUri": "-x", "state": "s" * 10_000})
    # The trainer exits 0 on both nodes: the Job controller completes the Job, the resource succeeds.
    run_to_end(admin, kubelet, job, pods=2)
    eventually(lambda: job_condition(admin, job, "Complete"), what="Job Complete (Job controller)")
    done = eventually(lambda: phase_is(admin, "FineTuneJob", name, "Succeeded"), what="Succeeded")
    assert done["status"]["outputUri"] == "s3://outputs/sft" and done["status"]["completionTime"]
    assert condition(done["status"], "Succeeded")["status"] == "True"
    assert {"JobCreated", "Training", "Suspended", "Resumed", "Completed"} <= {e["reason"] for e in events(admin, name)}
    assert table(kctl, "ftj", name)["PHASE"] == "Succeeded"

    # Deleted: kopf's finalizer goes, the garbage collector removes every child.
    delete_and_collect(kctl, admin, collector, "FineTuneJob", name,
                       [("Job", job), ("ConfigMap", "sft-ftj-config"), ("Service", "sft-ftj")],
                       f"batch.kubernetes.io/job-name={job}")


# --------------------------------------------------------------------------------------------
# InferenceService


def test_inference_service_through_every_update_path(operator: ChartOperator, admin: Client, kctl: Kubectl,
                                                      kubelet: FakeKubelet, collector: GarbageCollectorProbe) -> None:
    name, child, adapters_cm = "chat", "chat-isvc", "chat-isvc-adapters"
    apply(kctl, inferenceservice(name, kubelet.placement, model={"fromJob": {"fineTuneJob": "chat-base"}},
                                 adapters=[{"name": "support", "uri": "s3://outputs/support-lora"}],
                                 minReplicas=1, maxReplicas=2))
    # Waits for the model's FineTuneJob: nothing deployed yet.
    eventually(lambda: condition(status_of(admin, "InferenceService", name), "DependenciesReady").get("status") == "False",
               what="waiting for chat-base")
    assert admin.get("Deployment", NS, child) is None
    apply(kctl, finetunejob("chat-base", kubelet.placement, nodes=1))
    eventually(lambda: admin.get("Job", NS, "chat-base-ftj-a1"), what="chat-base Job")
    run_to_end(admin, kubelet, "chat-base-ftj-a1", pods=1)

    # Deployed: every child owned by the service; the pod runs on the fake node; Ready.
    cr = admin.get("InferenceService", NS, name)
    ready = eventually(lambda: phase_is(admin, "InferenceService", name, "Ready"), timeout=60, what="Ready")
    for kind, obj_name in (("Deployment", child), ("Service", child), ("HorizontalPodAutoscaler", child),
                           ("ConfigMap", adapters_cm), ("Secret", "chat-isvc-api-key")):
        obj = admin.get(kind, NS, obj_name)
        assert obj is not None and owned_by(obj, cr), f"{kind} {obj_name} missing or not owned"
    status = ready["status"]
    assert status["modelUri"] == "s3://outputs/chat-base" and status["readyReplicas"] == 1
    assert status["apiKeySecret"] == "chat-isvc-api-key" and status["servedModels"] == ["chat", "support"]
    assert status["url"] == f"http://{child}.{NS}.svc/v1"
    hpa = admin.get("HorizontalPodAutoscaler", NS, child)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"], hpa["scaleTargetRef"]["name"]) == (1, 2, child)
    pod_spec = admin.get("Deployment", NS, child)["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod_spec["containers"]}
    assert list(containers) == ["server", "adapters"]
    assert containers["server"]["args"][:2] == ["serve", "s3://outputs/chat-base"]
    assert "--vllm-arg=--enable-lora" in containers["server"]["args"]
    assert admin.get("Deployment", NS, child)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The API key: generated into a Secret the operator may create but never read, referenced by
    # both containers, and never in the status or an event.
    secret = admin.get("Secret", NS, "chat-isvc-api-key")
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    assert secret["type"] == "Opaque" and len(key) >= 43
    for container in containers.values():
        env = {e["name"]: e for e in container["env"]}
        assert env["KUBETUNE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "chat-isvc-api-key", "key": "api-key"}
    assert key not in json.dumps(status) and key not in json.dumps(events(admin, name))
    assert (row := table(kctl, "kisvc", name))["PHASE"] == "Ready" and row["READY"] == "1", row

    def observed(generation: int) -> dict[str, Any] | None:
        obj = admin.get("InferenceService", NS, name)
        s = obj["status"]
        ok = s.get("observedGeneration") == obj["metadata"]["generation"] == generation
        return s if ok and s.get("phase") == "Ready" else None

    def no_forbidden(s: dict[str, Any]) -> None:
        assert not [c for c in s.get("conditions") or [] if c.get("reason") == "Forbidden"], s["conditions"]
        assert "Forbidden" not in {e["reason"] for e in events(admin, name)}

    # Adapters added and removed: only the ConfigMap changes (the pods load them at runtime).
    deployment_generation = admin.get("Deployment", NS, child)["metadata"]["generation"]
    merge(kctl, "InferenceService", name, {"spec": {"adapters": [
        {"name": "support", "uri": "s3://outputs/support-lora"}, {"name": "sales", "uri": "s3://outputs/sales-lora"}]}})
    no_forbidden(eventually(lambda: observed(2), what="adapter added"))
    assert status_of(admin, "InferenceService", name)["servedModels"] == ["chat", "support", "sales"]
    assert adapter_names(admin, adapters_cm) == ["support", "sales"]
    merge(kctl, "InferenceService", name, {"spec": {"adapters": [{"name": "sales", "uri": "s3://outputs/sales-lora"}]}})
    no_forbidden(eventually(lambda: observed(3), what="adapter removed"))
    assert adapter_names(admin, adapters_cm) == ["sales"]
    assert admin.get("Deployment", NS, child)["metadata"]["generation"] == deployment_generation
    assert "AdaptersUpdated" in {e["reason"] for e in events(admin, name)}

    # The autoscaler retuned (HPA patched), the Service's type changed (Service patched: the real
    # server keeps its clusterIP and allocates a node port).
    hpa_version = admin.get("HorizontalPodAutoscaler", NS, child)["metadata"]["resourceVersion"]
    merge(kctl, "InferenceService", name, {"spec": {"autoscaling": {"target": 3}}})
    eventually(lambda: observed(4), what="autoscaler retuned")
    assert admin.get("HorizontalPodAutoscaler", NS, child)["metadata"]["resourceVersion"] != hpa_version
    cluster_ip = admin.get("Service", NS, child)["spec"]["clusterIP"]
    merge(kctl, "InferenceService", name, {"spec": {"serviceType": "NodePort"}})
    no_forbidden(eventually(lambda: observed(5), what="Service type changed"))
    service = admin.get("Service", NS, child)["spec"]
    assert service["type"] == "NodePort" and service["clusterIP"] == cluster_ip and service["ports"][0]["nodePort"]

    # Autoscaling off: the HPA goes.
    merge(kctl, "InferenceService", name, {"spec": {"maxReplicas": 1}})
    eventually(lambda: observed(6), what="autoscaling off")
    eventually(lambda: admin.get("HorizontalPodAutoscaler", NS, child) is None, what="HPA deleted")

    # A spec change rolls the pods (maxUnavailable 0): a new ReplicaSet replaces the replica once
    # its successor has been ready for the Deployment's minReadySeconds.
    old = admin.get("Deployment", NS, child)
    merge(kctl, "InferenceService", name, {"spec": {"engineArgs": {"maxModelLen": 4096}}})
    rolled = eventually(lambda: observed(7) and condition(status_of(admin, "InferenceService", name), "Progressing")
                        .get("reason") == "RolloutComplete" and status_of(admin, "InferenceService", name), timeout=60,
                        what="rollout complete")
    assert rolled["updatedReplicas"] == rolled["readyReplicas"] == 1
    new = admin.get("Deployment", NS, child)
    assert new["metadata"]["generation"] > old["metadata"]["generation"]
    assert "4096" in json.dumps(new["spec"]["template"]["spec"]["containers"][0])
    assert "4096" not in json.dumps(old["spec"]["template"]["spec"]["containers"][0])
    # the Deployment controller scales the old ReplicaSet down in its own step, just after
    eventually(lambda: sorted(r["spec"]["replicas"] for r in admin.list("ReplicaSet", NS) if owned_by(r, new)) == [0, 1],
               what="the old ReplicaSet scaled down")
    no_forbidden(rolled)

    # `kubectl scale` through the InferenceService's scale subresource sets spec.replicas.
    kctl("-n", NS, "scale", f"kisvc/{name}", "--replicas=3")
    eventually(lambda: observed(8) and status_of(admin, "InferenceService", name).get("readyReplicas") == 3,
               what="3 replicas ready")
    assert admin.get("InferenceService", NS, name)["spec"]["replicas"] == 3
    assert admin.get("Deployment", NS, child)["spec"]["replicas"] == 3
    scale = json.loads(kctl("-n", NS, "get", "kisvc", name, "--subresource=scale", "-o", "json").stdout)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    selected = admin.list("Pod", NS, scale["status"]["selector"])
    assert len([p for p in selected if not p["metadata"].get("deletionTimestamp")]) == 3
    no_forbidden(status_of(admin, "InferenceService", name))

    # Deleted: the garbage collector removes the children (and the pods through the ReplicaSets).
    delete_and_collect(kctl, admin, collector, "InferenceService", name,
                       [("Deployment", child), ("Service", child), ("ConfigMap", adapters_cm),
                        ("Secret", "chat-isvc-api-key")], scale["status"]["selector"])


def test_inference_service_autoscaling_turned_on_later(operator: ChartOperator, admin: Client, kctl: Kubectl,
                                                       kubelet: FakeKubelet) -> None:
    """A transformers service without autoscaling runs the replicas it asks for, and no HPA;
    turning autoscaling on (queue depth) makes an HPA with the pods metric that the real
    autoscaling/v2 API accepts; a new adapter (transformers loads them at runtime too) changes
    the adapters ConfigMap and leaves the pod template alone."""
    name, child = "tf", "tf-isvc"
    apply(kctl, inferenceservice(name, kubelet.placement, engine="transformers", gpus=0, minReplicas=2))
    deployment = eventually(lambda: admin.get("Deployment", NS, child), what="Deployment")
    assert deployment["spec"]["replicas"] == 2 and admin.get("HorizontalPodAutoscaler", NS, child) is None
    # two replicas: a disruption budget, accepted by the real policy/v1 API (#20 item 6)
    pdb = eventually(lambda: admin.get("PodDisruptionBudget", NS, child), what="PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    ready = eventually(lambda: phase_is(admin, "InferenceService", name, "Ready"), timeout=60, what="Ready")
    assert ready["status"]["readyReplicas"] == 2 and ready["status"]["engine"] == "transformers"
    assert ready["status"]["selector"]

    merge(kctl, "InferenceService", name, {"spec": {"maxReplicas": 6, "autoscaling": {"metric": "queueDepth"}}})
    hpa = eventually(lambda: admin.get("HorizontalPodAutoscaler", NS, child), what="HPA")["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "kubetune_queue_depth"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)

    template = admin.get("Deployment", NS, child)["spec"]["template"]
    merge(kctl, "InferenceService", name, {"spec": {"adapters": [{"name": "sales", "uri": "s3://outputs/sales-lora"}]}})
    eventually(lambda: status_of(admin, "InferenceService", name).get("servedModels") == [name, "sales"],
               what="the served list with the adapter")
    assert adapter_names(admin, "tf-isvc-adapters") == ["sales"]
    assert admin.get("Deployment", NS, child)["spec"]["template"] == template
    assert any("sales" in e["message"] for e in events(admin, name) if e["reason"] == "AdaptersUpdated")
    merge(kctl, "InferenceService", name, {"spec": {"minReplicas": 1}})  # below two: the budget goes
    eventually(lambda: admin.get("PodDisruptionBudget", NS, child) is None, what="PodDisruptionBudget deleted")
    kctl("-n", NS, "delete", "kisvc", name, "--wait=false")


def test_pod_template_reaches_the_real_job_and_a_conflict_is_refused_at_admission(
        operator: ChartOperator, admin: Client, kctl: Kubectl) -> None:
    """spec.podTemplate (#20 item 4): a mount at a path kubetune uses is refused by the webhook
    with the field named; a good override (labels, annotations, pull secret, a claim mounted into
    the trainer, env, an init container and a sidecar) is in the Job the operator creates, which
    the real batch/v1 API validated as a pod template."""
    bad = finetunejob("override-bad", {}, podTemplate={
        "spec": {"volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "team-fs"}}]},
        "container": {"volumeMounts": [{"name": "shared", "mountPath": "/etc/kubetune"}]}})
    out = kctl("-n", NS, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(bad), check=False)
    assert out.returncode != 0 and WEBHOOK_DENIED in out.stderr, out.stderr
    assert "spec.podTemplate.container.volumeMounts[0].mountPath" in out.stderr and "/etc/kubetune" in out.stderr
    # The CRD embeds Kubernetes' own Volume schema: a volume source's fields are checked by the API server.
    typo = finetunejob("override-typo", {}, podTemplate={
        "spec": {"volumes": [{"name": "shared", "persistentVolumeClaim": {"claimNam": "team-fs"}}]}})
    out = kctl("-n", NS, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(typo), check=False)
    assert out.returncode != 0 and "unknown field" in out.stderr and "claimNam" in out.stderr, out.stderr
    assert WEBHOOK_DENIED not in out.stderr  # the schema refused it before the webhook
    name = "override"
    apply(kctl, finetunejob(name, {}, nodes=1, podTemplate={
        "metadata": {"labels": {"team": "nlp"}, "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {"imagePullSecrets": [{"name": "registry"}],
                 "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "team-fs"}}],
                 "initContainers": [{"name": "warm", "image": "busybox:1.37", "command": ["true"]}],
                 "containers": [{"name": "log-shipper", "image": "fluent/fluent-bit:3",
                                 "volumeMounts": [{"name": "shared", "mountPath": "/logs", "readOnly": True}]}]},
        "container": {"env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
                      "volumeMounts": [{"name": "shared", "mountPath": "/mnt/shared"}]}}))
    job = eventually(lambda: admin.get("Job", NS, f"{name}-ftj-a1"), what="the Job with the override")
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "nlp"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["warm"]
    trainer, shipper = pod["spec"]["containers"]
    assert shipper["name"] == "log-shipper" and shipper["securityContext"]["runAsNonRoot"] is True
    assert {"name": "shared", "mountPath": "/mnt/shared"} in [
        {k: m[k] for k in ("name", "mountPath")} for m in trainer["volumeMounts"]]
    assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in trainer["env"]
    kctl("-n", NS, "delete", "ftj", name, "--wait=false")


GANG_CRDS = {"coscheduling": REPO / "tests" / "cluster" / "gang" / "scheduling.x-k8s.io_podgroups.yaml",
             "volcano": REPO / "tests" / "cluster" / "gang" / "scheduling.volcano.sh_podgroups.yaml"}


def test_gang_scheduling_creates_the_pod_group_before_the_job(operator: ChartOperator, admin: Client,
                                                              kctl: Kubectl) -> None:
    """spec.gang (#20 item 2) for both gang schedulers. Without the scheduler's PodGroup CRD the
    job waits (Pending, PodGroupNotInstalled) and creates nothing; with the CRD (coscheduling's,
    from scheduler-plugins; Volcano's, generated from volcano.sh/apis) the operator creates a
    PodGroup the real API server validates against that schema (minMember = nodes, the gang's
    GPUs as minResources, owned by the resource), before the Job, whose pods join it (label or
    annotation) and go to that scheduler. No gang scheduler runs here: the pods stay Pending."""
    for scheduler, kind, pods_scheduler, joins in (
            ("coscheduling", "PodGroup", "scheduler-plugins-scheduler", ("labels", "scheduling.x-k8s.io/pod-group")),
            ("volcano", "VolcanoPodGroup", "volcano", ("annotations", "scheduling.k8s.io/group-name"))):
        name = f"gang-{scheduler[:4]}"
        apply(kctl, finetunejob(name, {}, gang={"scheduler": scheduler}))
        waiting = eventually(lambda name=name: phase_is(admin, "FineTuneJob", name, "Pending",
                                                        reason="PodGroupNotInstalled"),
                             what=f"{name} waiting for the {scheduler} CRD")
        assert "serves no PodGroup" in waiting["status"]["message"] and admin.get("Job", NS, f"{name}-ftj-a1") is None
        kctl("apply", "--server-side", "-f", str(GANG_CRDS[scheduler]))
        kctl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(GANG_CRDS[scheduler]))
        job = eventually(lambda name=name: admin.get("Job", NS, f"{name}-ftj-a1"), timeout=60, what=f"{name}'s Job")
        group = admin.get(kind, NS, f"{name}-ftj")
        assert group is not None, f"no {kind} {name}-ftj"
        cr = admin.get("FineTuneJob", NS, name)
        assert owned_by(group, cr) and group["spec"]["minMember"] == 2, group
        assert group["spec"]["minResources"] == {"nvidia.com/gpu": "2"}, group
        assert group["metadata"]["creationTimestamp"] <= job["metadata"]["creationTimestamp"]
        pod = job["spec"]["template"]
        assert pod["spec"]["schedulerName"] == pods_scheduler
        assert pod["metadata"][joins[0]][joins[1]] == f"{name}-ftj"
        kctl("-n", NS, "delete", "ftj", name, "--wait=false")


KEDA_CRD = REPO / "tests" / "cluster" / "keda" / "keda.sh_scaledobjects.yaml"


def test_scale_to_zero_waits_for_keda_then_runs_on_a_scaled_object(operator: ChartOperator, admin: Client,
                                                                   kctl: Kubectl) -> None:
    """minReplicas 0 (#20 item 6) without KEDA: Failed, KedaNotInstalled, nothing created. With
    KEDA's own ScaledObject CRD installed (v2.20.2, schema and CEL rules), the operator notices
    (discovery) and creates a ScaledObject the real API server accepts, the Deployment at zero
    replicas, no HPA; a changed maxReplicas patches it; minReplicas 1 deletes it for an HPA."""
    name, child = "idle", "idle-isvc"
    apply(kctl, inferenceservice(name, {}, engine="transformers", gpus=0, minReplicas=0, maxReplicas=2))
    failed = eventually(lambda: phase_is(admin, "InferenceService", name, "Failed"), what="Failed without KEDA")
    assert failed["status"]["reason"] == "KedaNotInstalled", failed["status"]
    assert admin.get("Deployment", NS, child) is None
    kctl("apply", "-f", str(KEDA_CRD))
    try:
        kctl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(KEDA_CRD))
        scaled = eventually(lambda: admin.get("ScaledObject", NS, child), timeout=60, what="the ScaledObject")
        assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 2)
        assert scaled["spec"]["triggers"][0]["type"] == "prometheus"
        assert scaled["spec"]["triggers"][0]["metadata"]["query"].startswith("sum(kubetune_requests_in_flight{")
        assert admin.get("Deployment", NS, child)["spec"]["replicas"] == 0
        assert admin.get("HorizontalPodAutoscaler", NS, child) is None
        eventually(lambda: phase_is(admin, "InferenceService", name, "Ready", reason="ScaledToZero"),
                   what="Ready at zero replicas")
        merge(kctl, "InferenceService", name, {"spec": {"maxReplicas": 3}})
        eventually(lambda: admin.get("ScaledObject", NS, child)["spec"]["maxReplicaCount"] == 3, what="patched")
        merge(kctl, "InferenceService", name, {"spec": {"minReplicas": 1}})
        eventually(lambda: admin.get("ScaledObject", NS, child) is None, what="the ScaledObject deleted")
        eventually(lambda: admin.get("HorizontalPodAutoscaler", NS, child), what="an HPA instead")
    finally:
        kctl("-n", NS, "delete", "kisvc", name, "--wait=false")


# --------------------------------------------------------------------------------------------
# the webhook served directly (the test plays the API server)

GOOD = yaml.safe_load((REPO / "examples" / "finetunejob-lora-sft.yaml").read_text())


def webhook_client(ca: TinyCA) -> ssl.SSLContext:
    """A TLS client that trusts the webhook's CA (as the API server does, from caBundle)."""
    return ssl.create_default_context(cadata=ca.cert_pem.decode())


def post_review(url: str, context: ssl.SSLContext, review: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(review).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=context, timeout=15) as resp:
        assert resp.status == 200
        body = json.loads(resp.read())
    assert body["kind"] == "AdmissionReview" and body["response"]["uid"] == review["request"]["uid"]
    return body["response"]


def _review(obj: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a FineTuneJob (or `obj`'s kind)."""
    kind = obj.get("kind", "FineTuneJob")
    plural = {"FineTuneJob": "finetunejobs", "AlignmentJob": "alignmentjobs", "InferenceService": "inferenceservices"}[kind]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "kubetune.io", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "kubetune.io", "version": "v1alpha1", "resource": plural},
            "requestKind": {"group": "kubetune.io", "version": "v1alpha1", "kind": kind},
            "requestResource": {"group": "kubetune.io", "version": "v1alpha1", "resource": plural},
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _validate_cli(manifest: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    """What `kubetune validate job.yaml` prints (in-process: same code as the command)."""
    from kubetune.trainer.cli.main import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path)])
    return code, err.getvalue()


def _problems(message: str) -> str:
    """The problem list of a multi-problem SpecErrors message, without its "Invalid spec in
    <where> (N problems):" head (a file for the CLI, the resource for the webhook)."""
    head, sep, problems = message.partition(" problems):\n")
    assert sep and head.split("(")[-1].isdigit(), message
    return problems.strip()


def test_webhook_served_over_https_denies_like_validate_and_allows_a_good_job(operator: ChartOperator, webhook_ca: TinyCA,
                                                                            tmp_path: Path) -> None:
    """AdmissionReviews posted to the operator's webhook directly (the test plays the API server):
    a bad spec gets `kubetune validate`'s problem list, a good one is allowed, and a client that
    does not trust the webhook's CA gets nowhere. Posted directly because the real API server
    refuses these specs on the CRD schema before it would call the webhook."""
    url, context = operator.webhook_url, webhook_client(webhook_ca)
    good = copy.deepcopy(GOOD)
    good["metadata"].setdefault("namespace", "ml")
    allowed = post_review(url, context, _review(good))
    assert allowed["allowed"] is True, allowed
    assert "status" not in allowed

    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "bad-job"
    bad["spec"]["training"]["method"] = "magic"
    bad["spec"]["training"].setdefault("lora", {})["rnak"] = 4
    denied = post_review(url, context, _review(bad))
    assert denied["allowed"] is False
    assert denied["status"]["code"] == 422
    message = denied["status"]["message"]
    code, printed = _validate_cli(bad, tmp_path)
    assert code == 2 and printed.startswith("kubetune: Invalid spec in ")
    assert message.startswith("Invalid spec in FineTuneJob ml/bad-job")
    assert _problems(message) == _problems(printed), (message, printed)
    assert "spec.training.method" in message and "did you mean `rank`?" in message

    # A client that does not trust the certificate gets nowhere.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        post_review(url, ssl.create_default_context(), _review(good))


def test_webhook_bounds_echoes_warns_about_literal_secrets_and_judges_every_kind(
        operator: ChartOperator, webhook_ca: TinyCA, tmp_path: Path) -> None:
    """What the webhook checks on its own (posted directly, as above): a 100 KB enum value gets a
    short denial, local data and over-deep objects are refused, a literal secret in spec.env is
    allowed with a warning, and an InferenceService gets `kubetune validate`'s words."""
    url, context = operator.webhook_url, webhook_client(webhook_ca)
    good = copy.deepcopy(GOOD)
    good["metadata"].setdefault("namespace", "ml")

    # A 100 KB value in an enum field: a short denial, not a 100 KB one.
    huge = copy.deepcopy(good)
    huge["spec"]["training"]["method"] = "m" * 100_000
    denied = post_review(url, context, _review(huge))
    assert denied["allowed"] is False and "spec.training.method" in denied["status"]["message"]
    assert len(denied["status"]["message"]) <= 2000

    # Local data (a pod starts with an empty /workspace) and over-deep free-form objects.
    local = copy.deepcopy(good)
    local["spec"]["training"]["data"]["datasets"][0]["path"] = "examples/data/demo_alpaca.json"
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(300):
        deep = {"n": deep}
    message = post_review(url, context, _review(local))["status"]["message"]
    assert "spec.training.data.datasets[0].path" in message and "upload the file to S3" in message
    local["spec"]["affinity"] = deep
    message = post_review(url, context, _review(local))["status"]["message"]
    assert "spec.affinity: is nested more than 20 levels deep" in message

    # A literal secret in spec.env is allowed, with a warning `kubectl apply` prints.
    secret = copy.deepcopy(good)
    secret["spec"]["env"] = [{"name": "HF_TOKEN", "value": "hf_x"}]
    allowed = post_review(url, context, _review(secret))
    assert allowed["allowed"] is True
    assert any("spec.env[0] (HF_TOKEN)" in w and "valueFrom" in w for w in allowed.get("warnings") or [])

    # An InferenceService: the same words as `kubetune validate`.
    isvc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml"}, "spec": {"model": {"uri": "s3://m/x"}, "engine": "tgi"}}
    denied = post_review(url, context, _review(isvc))
    code, printed = _validate_cli(isvc, tmp_path)
    assert denied["allowed"] is False and code == 2
    assert "spec.engine" in denied["status"]["message"]
    assert denied["status"]["message"].split(": ", 1)[1] == printed.strip().split(": ", 2)[2]


# --------------------------------------------------------------------------------------------
# RBAC: exactly what the operator called, from the apiserver's audit log

STATIC_ONLY = {
    ("batch", "jobs", "get"): "Kube.create() reads the existing Job back after a 409 conflict "
    "(an operator restart mid-reconcile, which tests/test_operator_upgrades.py exercises), operator/kube.py",
    ("kueue.x-k8s.io", "workloads", "list"): "a queued job's Workload, read only where Kueue runs: "
    "tests/test_kueue_real.py audits it (test_the_operator_calls_only_what_the_chart_grants_kueue_included)",
}
"""Granted for a path this module's run may not take."""


def test_rbac_is_exactly_what_the_operator_called(request: pytest.FixtureRequest, cluster: ControlPlane,
                                                  operator: ChartOperator, installed: list[dict[str, Any]]) -> None:
    """The chart's ClusterRole against every call the real API server audited from the operator's
    ServiceAccount while this module ran all three kinds through every path (with kopf peering):
    a call the chart does not grant fails (so does its 403, in every test), and so does a grant
    the operator never used. Runs last, and only when the whole module ran."""
    module_tests = {name for name in globals() if name.startswith("test_")}
    ran = {item.originalname for item in request.session.items if getattr(item, "module", None) is not None
           and item.module.__name__ == __name__}
    if ran != module_tests:
        pytest.skip(f"compares the calls of the whole module's run; not run here: {sorted(module_tests - ran)}")
    granted = granted_calls(one(installed, "ClusterRole")["rules"])
    calls = audited_calls(cluster, operator)
    missing = calls - granted
    assert not missing, f"the operator calls these but the chart does not grant them: {sorted(missing)}"
    unused = granted - calls - set(STATIC_ONLY)
    assert not unused, f"granted but never used by the operator: {sorted(unused)}"
    assert {("", "secrets", "create"), ("", "events", "create"), ("batch", "jobs", "patch"),
            ("kubetune.io", "finetunejobs/status", "patch"), ("kubetune.io", "alignmentjobs/status", "patch"),
            ("kubetune.io", "inferenceservices/status", "patch"), ("", "configmaps", "patch"),
            ("apps", "deployments", "patch"), ("", "services", "patch"),
            ("autoscaling", "horizontalpodautoscalers", "create"), ("autoscaling", "horizontalpodautoscalers", "patch"),
            ("autoscaling", "horizontalpodautoscalers", "delete"),
            ("policy", "poddisruptionbudgets", "create"), ("policy", "poddisruptionbudgets", "delete"),
            ("keda.sh", "scaledobjects", "create"), ("keda.sh", "scaledobjects", "patch"),
            ("keda.sh", "scaledobjects", "delete"),
            ("scheduling.x-k8s.io", "podgroups", "create"), ("scheduling.volcano.sh", "podgroups", "create"),
            ("kopf.dev", "clusterkopfpeerings", "patch")} <= calls, sorted(calls)
    # The operator never reads a Secret: not even metadata (see kubetune.rules in _helpers.tpl).
    assert not {v for g, r, v in granted if (g, r) == ("", "secrets")} - {"create"}
