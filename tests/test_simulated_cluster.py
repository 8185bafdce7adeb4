"""A whole simulated GPU cluster (tests/cluster/sim.py): the real control plane (apiserver,
Job/Deployment/garbage-collector controllers, scheduler) with fake GPU nodes run by kwok.

What it shows that no fake client can: the real scheduler places 8-GPU pods by the nodes'
`nvidia.com/gpu` capacity (and refuses what fits nowhere), the real Job controller counts
completions, failures, podFailurePolicy and disruptions, the Deployment controller rolls out
and scales, and the garbage collector removes a FineTuneJob's children. No container runs:
kwok moves the pods through their phases (tests/cluster/kwok/).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator.training.decide import Observed, reconcile
from tests.cluster.fixtures import Kubectl
from tests.cluster.sim import (
    COMPLETE_DELAY,
    DISRUPT_LABEL,
    FAIL_EXIT_CODE,
    FAIL_LABEL,
    GPU,
    GPU_PRODUCT_LABEL,
    NodePool,
    SimCluster,
    condition,
    gpu_job,
    has_condition,
    wait_for,
)
from tests.test_operator_crds import EXAMPLE_FTJ

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first session builds the binaries

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"


@pytest.fixture(scope="module", autouse=True)
def crds_installed(sim_cluster: SimCluster, kubectl: Kubectl) -> None:
    """kubetune's CRDs, installed first: the garbage collector notices a new resource type
    only on its discovery resync (every 30 s; see `wait_garbage_collector_watches`), which
    then has likely happened by the time the FineTuneJob test runs."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(CRDS))


@pytest.fixture
def namespace(sim_cluster: SimCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards once its pods are gone (so the next test
    finds every GPU free)."""
    name = sim_cluster.create_namespace(sim_cluster.unique("sim"))
    yield name
    sim_cluster.clear_namespace(name)


def _nodes_of(pods: list[dict[str, Any]]) -> list[str]:
    return sorted(p["spec"].get("nodeName") or "" for p in pods)


def _single_running_pod(sim: SimCluster, namespace: str, job: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        pods = [p for p in sim.job_pods(namespace, job) if p["status"].get("phase") == "Running"]
        return pods[0] if len(pods) == 1 else None

    return wait_for(running, f"one Running pod of Job {job}")


def test_namespaces_get_what_the_controllers_add(sim_cluster: SimCluster, namespace: str) -> None:
    """The ServiceAccount controller made `default` (the fixture waited for it), the root-CA
    publisher the `kube-root-ca.crt` ConfigMap, and the token controller fills a legacy
    ServiceAccount token Secret."""
    root_ca = wait_for(lambda: sim_cluster.get(f"/api/v1/namespaces/{namespace}/configmaps/kube-root-ca.crt"),
                       "kube-root-ca.crt")
    assert "BEGIN CERTIFICATE" in root_ca["data"]["ca.crt"]
    sim_cluster.create({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                        "metadata": {"name": "default-token", "namespace": namespace,
                                     "annotations": {"kubernetes.io/service-account.name": "default"}}})
    path = f"/api/v1/namespaces/{namespace}/secrets/default-token"

    def filled() -> dict[str, Any] | None:
        secret = sim_cluster.get(path) or {}
        return secret if (secret.get("data") or {}).get("token") else None

    assert wait_for(filled, "the token controller to fill the Secret")["data"]["ca.crt"]


def test_indexed_gang_of_8_gpu_pods_runs_on_two_nodes(sim_cluster: SimCluster, gpu_nodes: NodePool,
                                                      namespace: str) -> None:
    """Two pods of 8 GPUs each fit only one per node: the scheduler puts them on both GPU
    nodes, kwok runs them, and the Job controller counts both indexes complete."""
    sim_cluster.create(gpu_job("gang", namespace, completions=2, parallelism=2, indexed=True, run_for="3s",
                              node_selector=gpu_nodes.selector))
    job = sim_cluster.wait_job_finished(namespace, "gang")
    assert has_condition(job, "Complete"), job["status"]
    assert job["status"]["succeeded"] == 2 and job["status"].get("failed", 0) == 0
    assert job["status"]["completedIndexes"] == "0,1"

    pods = sim_cluster.job_pods(namespace, "gang")
    assert {p["status"]["phase"] for p in pods} == {"Succeeded"}
    assert _nodes_of(pods) == sorted(gpu_nodes.nodes)  # one pod per node: 8 + 8 > 8 on one
    indexes = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods}
    assert indexes == {"0", "1"}
    for pod in pods:
        (container,) = pod["status"]["containerStatuses"]
        assert container["state"]["terminated"]["exitCode"] == 0


def test_pod_asking_more_gpus_than_any_node_stays_pending(sim_cluster: SimCluster, gpu_nodes: NodePool,
                                                          namespace: str) -> None:
    """16 GPUs fit on no 8-GPU node: the scheduler marks the pod Unschedulable and records
    FailedScheduling with the resource it lacked; it stays Pending."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "too-big", "namespace": namespace},
           "spec": {"nodeSelector": gpu_nodes.selector,
                    "containers": [{"name": "trainer", "image": "registry.invalid/kubetune/trainer:sim",
                                    "resources": {"limits": {GPU: "16"}}}]}}
    sim_cluster.create(pod)
    path = f"/api/v1/namespaces/{namespace}/pods/too-big"

    def unschedulable() -> dict[str, Any] | None:
        current = sim_cluster.get(path) or {}
        cond = condition(current, "PodScheduled")
        return current if cond and cond["status"] == "False" and cond.get("reason") == "Unschedulable" else None

    current = wait_for(unschedulable, "PodScheduled=False/Unschedulable")
    assert current["status"]["phase"] == "Pending" and not current["spec"].get("nodeName")
    assert f"Insufficient {GPU}" in condition(current, "PodScheduled")["message"]

    events = wait_for(lambda: [e for e in sim_cluster.events(namespace, "too-big") if e["reason"] == "FailedScheduling"],
                      "a FailedScheduling event")
    assert f"Insufficient {GPU}" in events[0]["message"]


def test_failures_count_against_the_backoff_limit(sim_cluster: SimCluster, gpu_nodes: NodePool,
                                                  namespace: str) -> None:
    """Pods that kwok fails with exit code 1: the Job controller retries once (backoffLimit 1)
    and then fails the Job with BackoffLimitExceeded and two failed pods."""
    sim_cluster.create(gpu_job("flaky", namespace, backoff_limit=1, node_selector=gpu_nodes.selector,
                               pod_labels={FAIL_LABEL: "true"}, pod_annotations={FAIL_EXIT_CODE: "1"}))
    job = sim_cluster.wait_job_finished(namespace, "flaky", timeout=90)  # 10 s retry backoff
    failed = condition(job, "Failed")
    assert failed and failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded", job["status"]
    assert job["status"]["failed"] == 2 and not job["status"].get("succeeded")
    pods = sim_cluster.job_pods(namespace, "flaky")
    codes = [p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods]
    assert codes == [1, 1]


def test_pod_failure_policy_fails_the_job_on_an_exit_code(sim_cluster: SimCluster, gpu_nodes: NodePool,
                                                          namespace: str) -> None:
    """A podFailurePolicy FailJob rule for exit code 42 ends the Job on the first such
    failure, whatever backoffLimit says."""
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                              "values": [42]}}]}
    sim_cluster.create(gpu_job("bad-config", namespace, backoff_limit=6, pod_failure_policy=policy,
                               node_selector=gpu_nodes.selector,
                               pod_labels={FAIL_LABEL: "true"}, pod_annotations={FAIL_EXIT_CODE: "42"}))
    job = sim_cluster.wait_job_finished(namespace, "bad-config")
    failed = condition(job, "Failed")
    assert failed and failed["reason"] == "PodFailurePolicy", job["status"]
    assert "exit code 42" in failed["message"]
    assert job["status"]["failed"] == 1


def test_disruption_is_ignored_by_the_pod_failure_policy(sim_cluster: SimCluster, gpu_nodes: NodePool,
                                                         namespace: str) -> None:
    """A running pod killed with DisruptionTarget (node drain, preemption) does not use up
    backoffLimit 0 when the policy says Ignore: the Job controller replaces it and the
    replacement completes."""
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    sim_cluster.create(gpu_job("preempted", namespace, backoff_limit=0, pod_failure_policy=policy, run_for="8s",
                               node_selector=gpu_nodes.selector))
    first = _single_running_pod(sim_cluster, namespace, "preempted")
    sim_cluster.label_pod(namespace, first["metadata"]["name"], {DISRUPT_LABEL: "true"})

    job = sim_cluster.wait_job_finished(namespace, "preempted", timeout=90)
    assert has_condition(job, "Complete"), job["status"]
    assert job["status"]["succeeded"] == 1 and job["status"].get("failed", 0) == 0
    pods = {p["metadata"]["name"]: p for p in sim_cluster.job_pods(namespace, "preempted")}
    disrupted = pods[first["metadata"]["name"]]
    assert disrupted["status"]["phase"] == "Failed"
    assert has_condition(disrupted, "DisruptionTarget")
    assert sorted(p["status"]["phase"] for p in pods.values()) == ["Failed", "Succeeded"]


def test_deployment_rolls_out_and_scales_with_kubectl(sim_cluster: SimCluster, gpu_nodes: NodePool,
                                                      namespace: str, kubectl: Kubectl) -> None:
    """The Deployment and ReplicaSet controllers roll out 2 replicas on the fake nodes (kwok
    makes them Ready); `kubectl scale` and `kubectl rollout status` work against it."""
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "serve", "namespace": namespace},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "serve"}},
                 "template": {"metadata": {"labels": {"app": "serve"}},
                              "spec": {"nodeSelector": gpu_nodes.selector,
                                       "containers": [{"name": "server", "image": "registry.invalid/kubetune/serve:sim",
                                                       "resources": {"limits": {GPU: "1", "cpu": "2", "memory": "8Gi"}}}]}}},
    }
    kubectl("-n", namespace, "apply", "-f", "-", stdin=json.dumps(deployment))
    kubectl("-n", namespace, "rollout", "status", "deployment/serve", "--timeout=60s")
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments/serve"
    assert (sim_cluster.get(path) or {})["status"]["availableReplicas"] == 2

    kubectl("-n", namespace, "scale", "deployment/serve", "--replicas=3")
    wait_for(lambda: (sim_cluster.get(path) or {}).get("status", {}).get("availableReplicas") == 3,
             "3 available replicas")
    pods = sim_cluster.pods(namespace, "app=serve")
    assert len(pods) == 3 and {p["status"]["phase"] for p in pods} == {"Running"}
    assert set(_nodes_of(pods)) <= set(gpu_nodes.nodes)
    out = kubectl("-n", namespace, "get", "deployment", "serve", "-o", "jsonpath={.status.readyReplicas}").stdout
    assert out == "3"


def test_finetunejob_children_run_the_gang_and_are_garbage_collected(
        sim_cluster: SimCluster, gpu_nodes: NodePool, namespace: str, kubectl: Kubectl,
        crds_installed: None) -> None:
    """The operator's renderer on a stored FineTuneJob (2 nodes x 8 GPUs): its ConfigMap,
    headless Service and Indexed Job, applied as they are, run to completion on the simulated
    cluster (nodeSelector on the GPU product, one pod per node); deleting the FineTuneJob
    lets the garbage collector remove them, as ownerReferences promise."""
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"] = {"name": "llama-sft", "namespace": namespace}
    cr["spec"].pop("affinity")  # an empty nodeSelectorTerms list, which pod validation refuses
    cr["spec"]["training"]["data"]["cache"] = "off"  # no prepare step: the gang alone
    cr["spec"]["nodeSelector"] = {**cr["spec"]["nodeSelector"], **gpu_nodes.selector}
    sim_cluster.cluster.wait_garbage_collector_watches("finetunejobs", "kubetune.io")
    stored = json.loads(kubectl("-n", namespace, "create", "-o", "json", "-f", "-", stdin=json.dumps(cr)).stdout)

    plan = reconcile(stored, Observed(secret_found=True))
    assert [o["kind"] for o in plan.create] == ["ConfigMap", "Service", "Job"]
    (job,) = [o for o in plan.create if o["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {GPU_PRODUCT_LABEL: "H100-SXM", **gpu_nodes.selector}
    # kwok's simulated run time, so both pods are running (and placed) at once.
    job["spec"]["template"]["metadata"].setdefault("annotations", {})[COMPLETE_DELAY] = "3s"
    for child in plan.create:
        assert child["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]
        sim_cluster.create(child)

    name = job["metadata"]["name"]
    finished = sim_cluster.wait_job_finished(namespace, name)
    assert has_condition(finished, "Complete"), finished["status"]
    assert finished["status"]["succeeded"] == 2
    pods = sim_cluster.job_pods(namespace, name)
    assert _nodes_of(pods) == sorted(gpu_nodes.nodes)
    for pod in pods:
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits[GPU] == "8"

    kubectl("-n", namespace, "delete", "finetunejob", "llama-sft", "--wait=true", "--timeout=30s")
    children = [f"/api/v1/namespaces/{namespace}/configmaps/{plan.create[0]['metadata']['name']}",
                f"/api/v1/namespaces/{namespace}/services/{plan.create[1]['metadata']['name']}",
                f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"]
    wait_for(lambda: all(sim_cluster.get(path) is None for path in children),
             "the garbage collector to delete the FineTuneJob's children")
    wait_for(lambda: not sim_cluster.job_pods(namespace, name), "the Job's pods to be deleted")


def test_a_preempted_gang_restarts_without_using_up_its_backoff_limit(
        sim_cluster: SimCluster, gpu_nodes: NodePool, namespace: str, kubectl: Kubectl,
        crds_installed: None) -> None:
    """#20 item 3 on the real Job controller: the operator's Job for a 2-node gang, one pod of it
    disrupted (kwok sets `DisruptionTarget`, as preemption and eviction do) -> the Job fails
    through the podFailurePolicy's disruption rule, and the operator's decision on what the API
    server then holds restarts the gang as attempt 2 with `preemptions: 1`, backoffLimit 0 intact."""
    cr = copy.deepcopy(EXAMPLE_FTJ)
    cr["metadata"] = {"name": "preemptible", "namespace": namespace}
    cr["spec"].pop("affinity")
    cr["spec"]["backoffLimit"] = 0
    cr["spec"]["training"]["data"]["cache"] = "off"
    cr["spec"]["nodeSelector"] = {**cr["spec"]["nodeSelector"], **gpu_nodes.selector}
    stored = json.loads(kubectl("-n", namespace, "create", "-o", "json", "-f", "-", stdin=json.dumps(cr)).stdout)
    first = reconcile(stored, Observed(secret_found=True))
    (job,) = [o for o in first.create if o["kind"] == "Job"]
    job["spec"]["template"]["metadata"].setdefault("annotations", {})[COMPLETE_DELAY] = "60s"
    for child in first.create:
        sim_cluster.create(child)
    name = job["metadata"]["name"]
    wait_for(lambda: len([p for p in sim_cluster.job_pods(namespace, name) if p["status"].get("phase") == "Running"]) == 2,
             "both pods of the gang to run")
    victim = sim_cluster.job_pods(namespace, name)[0]["metadata"]["name"]
    sim_cluster.label_pod(namespace, victim, {DISRUPT_LABEL: "true"})
    finished = sim_cluster.wait_job_finished(namespace, name, timeout=90)
    failed = condition(finished, "Failed")
    assert failed and failed["reason"] == "PodFailurePolicy" and "DisruptionTarget" in failed["message"], finished["status"]

    status = {**stored, "status": first.status}
    plan = reconcile(status, Observed(jobs=[finished], config_map=first.create[0], service=first.create[1],
                                      secret_found=True))
    assert [o["metadata"]["name"] for o in plan.create] == [name.replace("-a1", "-a2")]
    assert plan.status["reason"] == "Preempted" and plan.status["preemptions"] == 1 and plan.status["attempts"] == 2
