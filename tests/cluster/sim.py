"""A simulated GPU cluster on the real control plane: fake nodes that kwok runs.

The control plane (tests/cluster/controlplane.py, with `controllers` and `kwok`) is real:
apiserver, Job/Deployment/garbage-collector controllers, scheduler. Only the nodes are fake:
a Node object annotated `kwok.x-k8s.io/node: fake` with whatever capacity a test wants
(`nvidia.com/gpu: 8`), which kwok marks Ready and whose pods it "runs" (images are never
pulled). kwok's behaviour for pods comes from the stages in tests/cluster/kwok/:

- every pod bound to a fake node becomes Running and Ready at once;
- a pod owned by a Job then Succeeds (exit code 0), after the delay in its annotation
  `pod-complete.stage.kwok.x-k8s.io/delay` (a Go duration) if it has one;
- a pod labelled `pod-container-running-failed.stage.kwok.x-k8s.io: "true"` Fails about a
  second after it starts, with the exit code in its annotation
  `pod-container-running-failed.stage.kwok.x-k8s.io/exit-code` (default 1);
- a pod labelled `pod-disrupted.stage.kwok.x-k8s.io: "true"` Fails with the DisruptionTarget
  condition and exit code 137, as when the kubelet or a preemption kills it;
- a deleted pod goes away at once (no grace period on a fake node);
- a Job's pod whose nodeSelector names the label `sim.kubetune.io/keep-running` never
  completes: it stays Running until deleted. The operator's pods can carry no kwok annotation,
  but they carry the resource's `spec.nodeSelector`: select a pool made with
  `add_gpu_nodes(..., keep_running=True)` through `NodePool.selector` and they run until the
  test ends them.

Labels put on one running pod (`SimCluster.label_pod`) hit that pod only; in a pod template
they hit every pod, retries included.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

from tests.cluster.controlplane import KWOK_NODE_ANNOTATION, ControlPlane

T = TypeVar("T")

GPU = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
COMPLETE_DELAY = "pod-complete.stage.kwok.x-k8s.io/delay"
FAIL_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"
FAIL_EXIT_CODE = "pod-container-running-failed.stage.kwok.x-k8s.io/exit-code"
DISRUPT_LABEL = "pod-disrupted.stage.kwok.x-k8s.io"
KEEP_RUNNING = "sim.kubetune.io/keep-running"
"""A node label: Job pods that select it (nodeSelector) stay Running (tests/cluster/kwok/pod-complete.yaml)."""
POOL_LABEL = "sim.kubetune.io/pool"
"""Every fake node made here carries its pool's name: a test's pods select their own pool, so
they never land on a node another module left behind (a fake kubelet's node, say)."""
DEFAULT_TIMEOUT_S = 60.0

_CLUSTER_SCOPED = {"Node", "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}


def wait_for(probe: Callable[[], T], what: str, timeout: float = DEFAULT_TIMEOUT_S,
             interval: float = 0.2) -> T:
    """Poll `probe()` until it returns something truthy and return that; on timeout, raise
    with `what` and the last value seen (so a failure says what the cluster looked like)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}"[:4000])
        time.sleep(interval)


def collection_path(obj: dict[str, Any]) -> str:
    """The REST collection an object is created in (regular plurals: kind + "s")."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    plural = kind.lower() + "s"
    namespace = obj.get("metadata", {}).get("namespace")
    if kind in _CLUSTER_SCOPED or not namespace:
        return f"{base}/{plural}"
    return f"{base}/namespaces/{namespace}/{plural}"


@dataclass(frozen=True)
class NodePool:
    """Fake nodes made together: their names and the node selector that picks them alone."""

    name: str
    nodes: list[str]
    keep_running: bool = False
    exclusive: bool = False

    @property
    def selector(self) -> dict[str, str]:
        """The nodeSelector of the pool's pods (with `KEEP_RUNNING` for a keep-running pool)."""
        return {POOL_LABEL: self.name, **({KEEP_RUNNING: "true"} if self.keep_running else {})}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        """What a pod needs to run on an `exclusive` pool (whose taint keeps every other pod off)."""
        if not self.exclusive:
            return []
        return [{"key": POOL_LABEL, "operator": "Equal", "value": self.name, "effect": "NoSchedule"}]

    @property
    def placement(self) -> dict[str, Any]:
        """nodeSelector and tolerations, as a pod spec (or a kubetune resource's spec) takes them."""
        return {"nodeSelector": self.selector, **({"tolerations": self.tolerations} if self.exclusive else {})}


def fake_node(name: str, *, gpus: int = 8, cpu: str = "128", memory: str = "1Ti", pods: int = 110,
              labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None,
              gpu_product: str = "H100-SXM") -> dict[str, Any]:
    """A Node kwok manages, shaped like a GPU node from the NVIDIA device plugin's point of
    view: `nvidia.com/gpu` in capacity and allocatable, the GPU product label. Its status is
    set at creation (nodes allow that); kwok adds conditions, addresses and node info."""
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": "1Ti"}
    if gpus:
        resources[GPU] = str(gpus)
    node_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                   "kubernetes.io/arch": "amd64", "type": "kwok"}
    if gpus:
        node_labels[GPU_PRODUCT_LABEL] = gpu_product
    node_labels.update(labels or {})
    key, value = KWOK_NODE_ANNOTATION
    spec: dict[str, Any] = {"taints": taints} if taints else {}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": node_labels, "annotations": {key: value}},
        "spec": spec,
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The status condition of that type, if any."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def has_condition(obj: dict[str, Any], type_: str, status: str = "True") -> bool:
    cond = condition(obj, type_)
    return cond is not None and cond.get("status") == status


class SimCluster:
    """A small client for the simulated cluster (admin, JSON over the control plane's own
    HTTPS client: no client library); `wait_*` helpers poll with deadlines."""

    _names = itertools.count()

    def __init__(self, cluster: ControlPlane) -> None:
        self.cluster = cluster

    # ---- generic API -------------------------------------------------------------------------
    def get(self, path: str) -> dict[str, Any] | None:
        """GET `path`; None on 404."""
        status, body = self.cluster.request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def list(self, path: str, **params: str) -> list[dict[str, Any]]:
        """The items of a collection (`labelSelector=...`, `fieldSelector=...`)."""
        body = self.get(f"{path}?{urlencode(params)}" if params else path)
        return (body or {}).get("items") or []

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """POST the object to its collection; returns what the server stored."""
        path = collection_path(obj)
        status, body = self.cluster.request("POST", path, obj)
        if status != 201:
            raise RuntimeError(f"creating {obj['kind']} {obj['metadata'].get('name')}: {status} {body}")
        return body

    def delete(self, path: str, propagation: str = "Background") -> None:
        """DELETE (404 is fine)."""
        status, body = self.cluster.request("DELETE", path, {"propagationPolicy": propagation})
        if status not in (200, 202, 404):
            raise RuntimeError(f"DELETE {path}: {status} {body}")

    def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch."""
        status, body = self.cluster.request("PATCH", path, patch, content_type="application/merge-patch+json")
        if status != 200:
            raise RuntimeError(f"PATCH {path}: {status} {body}")
        return body

    # ---- namespaces and nodes ----------------------------------------------------------------
    def unique(self, prefix: str) -> str:
        """A name no other caller in this session gets (`<prefix>-<n>`)."""
        return f"{prefix}-{next(self._names)}"

    def create_namespace(self, name: str) -> str:
        """Create a namespace and wait for its `default` ServiceAccount (the ServiceAccount
        admission plugin refuses pods until the controller has made it)."""
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_for(lambda: self.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
                 f"the default ServiceAccount in {name}")
        return name

    def clear_namespace(self, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Delete everything that makes pods in the namespace, then its pods (grace period 0:
        kwok's nodes let them go at once), wait until they are gone, then delete the namespace
        itself. Faster than leaving it to the namespace controller, which waits 5 s before it
        starts; the pods are gone on return, so their GPUs are free for the next test."""
        for path in (f"/apis/apps/v1/namespaces/{name}/deployments", f"/apis/apps/v1/namespaces/{name}/replicasets",
                     f"/apis/batch/v1/namespaces/{name}/jobs"):
            self.delete(path)
        status, body = self.cluster.request("DELETE", f"/api/v1/namespaces/{name}/pods",
                                            {"gracePeriodSeconds": 0, "propagationPolicy": "Background"})
        if status not in (200, 404):
            raise RuntimeError(f"deleting the pods in {name}: {status} {body}")
        wait_for(lambda: not self.pods(name), f"the pods in {name} to be deleted", timeout)
        self.delete(f"/api/v1/namespaces/{name}")

    def add_nodes(self, nodes: list[dict[str, Any]], timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
        """Create the nodes and wait until kwok has made each Ready and the node-lifecycle
        controller has lifted its not-ready taints (until then the scheduler skips it)."""
        for node in nodes:
            self.create(node)
        names = [n["metadata"]["name"] for n in nodes]
        for node in nodes:
            wanted = node.get("spec", {}).get("taints") or []
            wait_for(lambda n=node["metadata"]["name"], w=wanted: self._node_ready(n, w),
                     f"node {node['metadata']['name']} Ready", timeout)
        return names

    def add_gpu_nodes(self, count: int, prefix: str = "gpu", keep_running: bool = False, exclusive: bool = False,
                      **shape: Any) -> NodePool:
        """A pool of `count` fake GPU nodes (8 GPUs each unless `gpus=`; see `fake_node`),
        labelled with the pool's name (`NodePool.selector`), Ready. With `keep_running`, the
        Job pods that select the pool stay Running (`KEEP_RUNNING`). With `exclusive`, the nodes
        are tainted so that only pods tolerating it (`NodePool.placement`) land there: pods left
        Pending by an earlier test (that asked for GPUs anywhere) cannot take the pool's GPUs."""
        pool = self.unique(prefix)
        labels = {**shape.pop("labels", {}), POOL_LABEL: pool, **({KEEP_RUNNING: "true"} if keep_running else {})}
        if exclusive:
            shape["taints"] = [*shape.get("taints", []), {"key": POOL_LABEL, "value": pool, "effect": "NoSchedule"}]
        nodes = [fake_node(f"{pool}-{i}", labels=labels, **shape) for i in range(count)]
        return NodePool(pool, self.add_nodes(nodes), keep_running, exclusive)

    def delete_nodes(self, names: list[str]) -> None:
        for name in names:
            self.delete(f"/api/v1/nodes/{name}")

    def _node_ready(self, name: str, wanted_taints: list[dict[str, Any]]) -> bool:
        node = self.get(f"/api/v1/nodes/{name}")
        if node is None or not has_condition(node, "Ready"):
            return False
        taints = node.get("spec", {}).get("taints") or []
        return all(t.get("key") in {w.get("key") for w in wanted_taints} for t in taints)

    # ---- workloads ---------------------------------------------------------------------------
    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else {}
        return self.list(f"/api/v1/namespaces/{namespace}/pods", **params)

    def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return self.pods(namespace, f"batch.kubernetes.io/job-name={job}")

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")

    def wait_job_finished(self, namespace: str, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the Job controller's terminal condition (Complete or Failed); returns the Job."""
        def finished() -> dict[str, Any] | None:
            job = self.job(namespace, name)
            if job and (has_condition(job, "Complete") or has_condition(job, "Failed")):
                return job
            return None

        try:
            return wait_for(finished, f"Job {namespace}/{name} to finish", timeout)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\nJob: {self.job(namespace, name)}\n"
                               f"pods: {[_pod_summary(p) for p in self.job_pods(namespace, name)]}") from None

    def events(self, namespace: str, involved: str) -> list[dict[str, Any]]:
        """core/v1 Events about an object (the scheduler writes events.k8s.io; same storage)."""
        return self.list(f"/api/v1/namespaces/{namespace}/events", fieldSelector=f"involvedObject.name={involved}")

    def label_pod(self, namespace: str, name: str, labels: dict[str, str],
                  annotations: dict[str, str] | None = None) -> None:
        """Label one pod (e.g. `{DISRUPT_LABEL: "true"}` to have kwok disrupt just that pod)."""
        meta: dict[str, Any] = {"labels": labels}
        if annotations:
            meta["annotations"] = annotations
        self.patch(f"/api/v1/namespaces/{namespace}/pods/{name}", {"metadata": meta})


def _pod_summary(pod: dict[str, Any]) -> dict[str, Any]:
    status = pod.get("status") or {}
    return {"name": pod["metadata"]["name"], "node": pod["spec"].get("nodeName"), "phase": status.get("phase"),
            "conditions": [(c["type"], c["status"], c.get("reason")) for c in status.get("conditions") or []]}


def gpu_job(name: str, namespace: str, *, gpus: int = 8, completions: int = 1, parallelism: int = 1,
            indexed: bool = False, backoff_limit: int = 0, run_for: str | None = None,
            node_selector: dict[str, str] | None = None,
            pod_labels: dict[str, str] | None = None, pod_annotations: dict[str, str] | None = None,
            pod_failure_policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """A batch/v1 Job whose pods each ask for `gpus` GPUs (limits; requests follow), with a
    made-up image (kwok never pulls). `run_for` (a Go duration) keeps each pod Running that
    long before kwok completes it; `node_selector` is usually a `NodePool.selector`."""
    annotations = dict(pod_annotations or {})
    if run_for:
        annotations[COMPLETE_DELAY] = run_for
    container = {"name": "trainer", "image": "registry.invalid/kubetune/trainer:sim",
                 "resources": {"limits": {GPU: str(gpus), "cpu": "1", "memory": "1Gi"}}}
    spec: dict[str, Any] = {
        "completions": completions, "parallelism": parallelism, "backoffLimit": backoff_limit,
        "template": {"metadata": {"labels": dict(pod_labels or {}), "annotations": annotations},
                     "spec": {"restartPolicy": "Never", "containers": [container],
                              "nodeSelector": dict(node_selector or {}),
                              "terminationGracePeriodSeconds": 0}},
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    if pod_failure_policy:
        spec["podFailurePolicy"] = copy.deepcopy(pod_failure_policy)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}
