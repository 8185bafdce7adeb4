"""kubetune under the real Kueue (v0.17, built from its Go module; tests/cluster/kueue.py) on the
simulated GPU cluster: quotas, queueing, priority preemption and all-or-nothing gangs.

Everything is real but the nodes and the containers: apiserver, Job controller, scheduler,
Kueue's manager and webhooks, the chart's CRDs and RBAC, and `kubetune operator` under the
chart's ServiceAccount token (tests/cluster_operator.py). kwok runs the pods on fake 8-GPU
nodes: Running at once, Succeeded after the delay in the pods' annotation
`pod-complete.stage.kwok.x-k8s.io/delay`, which a FineTuneJob's own annotation puts there (the
operator copies the resource's labels and annotations to its Jobs and pods, as it copies
Kueue's queue-name and priority-class). No trainer runs, so the SIGTERM -> checkpoint part of
a preemption is not shown here (tests/test_train.py: SIGTERM mid-run saves a checkpoint and the
rerun resumes from it); what is shown is the operator's side: the same attempt, the same Job and
the same checkpoint location resume.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.operator_scale import RELEASE_NS, chart_values, moto_s3
from kubetune.operator.common import child_names
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import Kubectl, build_binaries
from tests.cluster.kueue import (
    KUEUE_NS_LABEL,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    Kueue,
    user_namespaces_work,
)
from tests.cluster.sim import COMPLETE_DELAY, GPU, NodePool, SimCluster
from tests.cluster_operator import (
    ChartOperator,
    Client,
    apply_chart,
    audited_calls,
    chart_objects,
    eventually,
    granted_calls,
    one,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first session builds the binaries

GROUP_VERSION = "kubetune.io/v1alpha1"
PODS_READY_TIMEOUT_S = 10
REPO = Path(__file__).resolve().parents[1]
QUEUES = REPO / "examples" / "kueue" / "queues.yaml"
EXAMPLE_FTJ = REPO / "examples" / "finetunejob-kueue.yaml"


@pytest.fixture(scope="module")
def kueue(real_cluster: ControlPlane, sim_cluster: SimCluster, kubectl: Kubectl,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    if not user_namespaces_work():
        pytest.skip("Kueue reads /etc/kueue/metrics/certs: it runs in a private mount namespace, "
                    "and this machine allows no unprivileged user namespaces (unshare --user)")
    bin_dir = build_binaries(("kueue",))
    with Kueue(real_cluster, kubectl, bin_dir, tmp_path_factory.mktemp("kueue"),
               pods_ready_timeout_s=PODS_READY_TIMEOUT_S) as running:
        yield running


@pytest.fixture(scope="module")
def operator(real_cluster: ControlPlane, sim_cluster: SimCluster, kubectl: Kubectl, kueue: Kueue,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartOperator]:
    with moto_s3() as endpoint:
        chart = chart_objects(chart_values(endpoint), tmp_path_factory.mktemp("helm"))
        apply_chart(kubectl, chart, (RELEASE_NS,))
        with ChartOperator(real_cluster, chart, tmp_path_factory.mktemp("operator"), RELEASE_NS,
                           flags={"--reconcile-interval": "1"}) as running:
            yield running
            forbidden = running.process.forbidden_lines()
            assert not forbidden, "the operator was refused calls (RBAC):\n" + "\n".join(forbidden[:20])


@pytest.fixture(scope="module")
def admin(real_cluster: ControlPlane) -> Client:
    return Client(real_cluster.admin_kubeconfig)


@pytest.fixture
def namespace(sim_cluster: SimCluster, admin: Client) -> Iterator[str]:
    """A namespace whose Jobs go through Kueue's webhook (KUEUE_NS_LABEL). Its FineTuneJobs are
    deleted first: while one exists, the operator would recreate a Job that the namespace's
    deletion removed, and be refused (NamespaceTerminating)."""
    name = sim_cluster.create_namespace(sim_cluster.unique("kueue"))
    key, value = KUEUE_NS_LABEL
    sim_cluster.patch(f"/api/v1/namespaces/{name}", {"metadata": {"labels": {key: value}}})
    yield name
    for cr in admin.list("FineTuneJob", name):
        admin.delete("FineTuneJob", name, cr["metadata"]["name"])
    eventually(lambda: admin.list("FineTuneJob", name) == [], timeout=60, what="the FineTuneJobs deleted")
    sim_cluster.clear_namespace(name)


def queue_for(kueue: Kueue, cq: str, namespace: str, gpus: int) -> str:
    """examples/kueue/queues.yaml applied as ClusterQueue `cq` (its flavor renamed with it) of
    `gpus` GPUs and LocalQueue `team-a` in `namespace`; applying it again with other `gpus`
    changes the quota. Returns the LocalQueue's name."""
    objects = [o for o in yaml.safe_load_all(QUEUES.read_text()) if o]
    by_kind = {o["kind"]: o for o in objects}
    flavor, queue, local = by_kind["ResourceFlavor"], by_kind["ClusterQueue"], by_kind["LocalQueue"]
    flavor["metadata"]["name"] = f"{cq}-{flavor['metadata']['name']}"
    queue["metadata"]["name"] = cq
    (group,) = queue["spec"]["resourceGroups"]
    (quota,) = group["flavors"]
    quota["name"] = flavor["metadata"]["name"]
    for resource in quota["resources"]:
        if resource["name"] == GPU:
            resource["nominalQuota"] = gpus
    local["metadata"]["namespace"] = namespace
    local["spec"]["clusterQueue"] = cq
    kueue.apply(*objects)
    return local["metadata"]["name"]


def ftj(name: str, pool: NodePool, queue: str, *, runs_for: str, priority: str = "experiments") -> dict[str, Any]:
    """examples/finetunejob-kueue.yaml (2 x 8 GPUs) as `name`, submitted to `queue` at `priority`,
    placed on `pool`; its pods "train" for `runs_for` on kwok."""
    cr = yaml.safe_load(EXAMPLE_FTJ.read_text())
    cr["metadata"] = {"name": name, "labels": {**cr["metadata"]["labels"], QUEUE_LABEL: queue, PRIORITY_LABEL: priority},
                      "annotations": {COMPLETE_DELAY: runs_for}}
    assert (cr["spec"]["nodes"], cr["spec"]["gpusPerNode"]) == (2, 8)
    cr["spec"].update(copy.deepcopy(pool.placement))
    cr["spec"]["training"]["output"]["path"] = f"s3://outputs/{name}"
    # No prepare Job (a CPU-only Job that Kueue would queue first, the same way): the gang only.
    cr["spec"]["training"]["data"]["cache"] = "off"
    return cr


def status(admin: Client, ns: str, name: str) -> dict[str, Any]:
    return (admin.get("FineTuneJob", ns, name) or {}).get("status") or {}


def job_name(name: str, attempt: int = 1) -> str:
    return child_names("FineTuneJob", name).job(attempt)


def job_of(admin: Client, ns: str, name: str, attempt: int = 1) -> dict[str, Any] | None:
    return admin.get("Job", ns, job_name(name, attempt))


def gpu_pods(admin: Client, ns: str, name: str) -> list[dict[str, Any]]:
    """The FineTuneJob's pods that hold GPUs: bound to a node and not finished."""
    return [p for p in admin.list("Pod", ns, f"batch.kubernetes.io/job-name={job_name(name)}")
            if p["spec"].get("nodeName") and p["status"].get("phase") in ("Pending", "Running")
            and not p["metadata"].get("deletionTimestamp")]


def workload_of(kueue: Kueue, ns: str, job: str) -> dict[str, Any] | None:
    found = [w for w in kueue.workloads(ns)
             if any(o["kind"] == "Job" and o["name"] == job for o in w["metadata"].get("ownerReferences") or [])]
    return found[0] if found else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def test_a_16_gpu_cluster_queue_admits_one_2x8_job_and_queues_the_second(
        kueue: Kueue, operator: ChartOperator, admin: Client, sim_cluster: SimCluster, namespace: str) -> None:
    """Nodes for 32 GPUs, a quota of 16: Kueue admits `first` (unsuspends its Job), holds
    `second` suspended with no pod at all and says why on its Workload (quota), the operator
    shows Queued; when `first` completes, Kueue admits `second` and it runs."""
    pool = sim_cluster.add_gpu_nodes(4, prefix="kq", exclusive=True)
    try:
        queue = queue_for(kueue, sim_cluster.unique("cq"), namespace, gpus=16)
        admin.create(ftj("first", pool, queue, runs_for="25s"), namespace)
        eventually(lambda: status(admin, namespace, "first").get("phase") == "Running", timeout=60,
                   what="first Running (admitted by Kueue)")
        admin.create(ftj("second", pool, queue, runs_for="1s"), namespace)

        second = eventually(lambda: (s := status(admin, namespace, "second")).get("phase") == "Queued" and s,
                            timeout=60, what="second Queued")
        assert "waits for Kueue to admit it (queue team-a)" in second["message"], second
        assert job_of(admin, namespace, "second")["spec"]["suspend"] is True
        workload = eventually(lambda: (w := workload_of(kueue, namespace, job_name("second"))) and
                              condition(w, "QuotaReserved").get("status") == "False" and w,
                              timeout=30, what="second's Workload without quota")
        message = condition(workload, "QuotaReserved")["message"]
        assert "insufficient unused quota for nvidia.com/gpu" in message and "16 more needed" in message, message
        # ... and the FineTuneJob says it too, in Kueue's words (kubectl describe / get -o yaml).
        second = eventually(lambda: (s := status(admin, namespace, "second")) and
                            "insufficient unused quota for nvidia.com/gpu" in s.get("message", "") and s,
                            timeout=30, what="Kueue's reason in second's status")
        assert f"Kueue: {message}" in second["message"], second
        assert message in condition({"status": second}, "Running")["message"]
        assert second["reason"] == "WaitingForAdmission" and not second.get("preemptions"), second
        assert admin.list("Pod", namespace, f"batch.kubernetes.io/job-name={job_name('second')}") == []
        assert len(gpu_pods(admin, namespace, "first")) == 2
        assert condition(workload_of(kueue, namespace, job_name("first")), "Admitted").get("status") == "True"

        eventually(lambda: status(admin, namespace, "first").get("phase") == "Succeeded", timeout=90,
                   what="first Succeeded (its pods complete after 25 s)")
        eventually(lambda: status(admin, namespace, "second").get("phase") in ("Running", "Succeeded"), timeout=90,
                   what="second admitted once first finished")
        assert job_of(admin, namespace, "second")["spec"]["suspend"] is False
        assert condition(workload_of(kueue, namespace, job_name("second")), "Admitted").get("status") == "True"
        assert status(admin, namespace, "second")["attempts"] == 1
    finally:
        sim_cluster.delete_nodes(pool.nodes)


def test_a_higher_priority_job_preempts_a_lower_one_which_resumes_the_same_attempt(
        kueue: Kueue, operator: ChartOperator, admin: Client, sim_cluster: SimCluster, namespace: str) -> None:
    """`low` (experiments) holds the whole 16-GPU quota; `high` (release) arrives: Kueue evicts
    `low` (suspends its Job: the pods get SIGTERM and are deleted), `low` shows Queued,
    preempted, `preemptions` 1 and `attempts` unchanged (no failure, no new attempt); `high`
    runs and completes; Kueue re-admits `low`, whose same Job (attempt 1, same job.yaml, so the
    same checkpoint location) runs again, still counted once."""
    pool = sim_cluster.add_gpu_nodes(2, prefix="kp", exclusive=True)
    try:
        queue = queue_for(kueue, sim_cluster.unique("cq"), namespace, gpus=16)
        admin.create(ftj("low", pool, queue, runs_for="1h", priority="experiments"), namespace)
        eventually(lambda: len(gpu_pods(admin, namespace, "low")) == 2 and
                   status(admin, namespace, "low").get("phase") == "Running", timeout=60, what="low Running")
        first_pods = {p["metadata"]["uid"] for p in gpu_pods(admin, namespace, "low")}
        config = admin.get("ConfigMap", namespace, child_names("FineTuneJob", "low").config_map)
        assert config is not None

        admin.create(ftj("high", pool, queue, runs_for="20s", priority="release"), namespace)
        low = eventually(lambda: (s := status(admin, namespace, "low")).get("phase") == "Queued" and s,
                         timeout=60, what="low preempted (Queued)")
        assert "preempted by Kueue" in low["message"] and low["reason"] == "PreemptedByKueue", low
        assert low["attempts"] == 1 and low["preemptions"] == 1 and low["failures"] == 0, low
        evicted = condition(workload_of(kueue, namespace, job_name("low")), "Evicted")
        assert evicted.get("status") == "True" and evicted.get("reason") == "Preempted", evicted
        assert job_of(admin, namespace, "low")["spec"]["suspend"] is True
        eventually(lambda: gpu_pods(admin, namespace, "low") == [], timeout=30, what="low's pods gone")
        eventually(lambda: status(admin, namespace, "high").get("phase") == "Running", timeout=60, what="high Running")

        eventually(lambda: status(admin, namespace, "high").get("phase") == "Succeeded", timeout=90,
                   what="high Succeeded")
        eventually(lambda: len(gpu_pods(admin, namespace, "low")) == 2 and
                   status(admin, namespace, "low").get("phase") == "Running", timeout=90, what="low re-admitted")
        low = status(admin, namespace, "low")
        assert low["attempts"] == 1 and low["preemptions"] == 1 and low["failures"] == 0, low
        assert job_of(admin, namespace, "low", 2) is None  # no new attempt: the same Job resumed
        resumed = gpu_pods(admin, namespace, "low")
        assert not {p["metadata"]["uid"] for p in resumed} & first_pods  # new pods, same Job
        for pod in resumed:
            env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            assert env["KUBETUNE_ATTEMPT"] == "1"
        # The job.yaml the trainer reads (its output path is where it resumes from) is unchanged.
        assert admin.get("ConfigMap", namespace, config["metadata"]["name"])["data"] == config["data"]
    finally:
        sim_cluster.delete_nodes(pool.nodes)


def test_a_gang_that_cannot_be_fully_placed_holds_no_gpus(
        kueue: Kueue, operator: ChartOperator, admin: Client, sim_cluster: SimCluster, namespace: str) -> None:
    """One 8-GPU node for a 2 x 8 gang. (1) A quota that matches the nodes (8): Kueue admits the
    whole gang or nothing, so no pod is ever created. (2) A quota larger than what can be placed
    (16: a node is down, say): Kueue admits, one pod binds and one stays Pending; after
    waitForPodsReady's timeout Kueue evicts the gang (the bound pod is deleted, its GPUs freed)
    and requeues it. Either way no partial gang keeps GPUs."""
    pool = sim_cluster.add_gpu_nodes(1, prefix="kg", exclusive=True)
    try:
        cq = sim_cluster.unique("cq")
        queue = queue_for(kueue, cq, namespace, gpus=8)
        admin.create(ftj("gang", pool, queue, runs_for="1h"), namespace)
        eventually(lambda: status(admin, namespace, "gang").get("phase") == "Queued", timeout=60, what="gang Queued")
        eventually(lambda: re.search(r"insufficient .*quota for nvidia\.com/gpu", condition(
                   workload_of(kueue, namespace, job_name("gang")), "QuotaReserved").get("message", "")),
                   timeout=30, what="Kueue: the gang's 16 GPUs exceed the quota of 8")
        for _ in range(5):  # and it stays so: not one pod
            assert admin.list("Pod", namespace, f"batch.kubernetes.io/job-name={job_name('gang')}") == []
            assert job_of(admin, namespace, "gang")["spec"]["suspend"] is True
            time.sleep(1)

        # (2) A quota of 16 on the same single node: admitted, but only one pod can be placed.
        queue_for(kueue, cq, namespace, gpus=16)
        eventually(lambda: len(gpu_pods(admin, namespace, "gang")) == 1, timeout=60,
                   what="the admitted gang: one pod bound, one Pending")
        evicted = eventually(lambda: condition(workload_of(kueue, namespace, job_name("gang")), "Evicted")
                             .get("reason") == "PodsReadyTimeout", timeout=PODS_READY_TIMEOUT_S + 60,
                             what="Kueue evicting the partial gang (waitForPodsReady)")
        assert evicted
        eventually(lambda: gpu_pods(admin, namespace, "gang") == [], timeout=30, what="the bound pod deleted")
        gang = eventually(lambda: (s := status(admin, namespace, "gang")).get("reason") == "EvictedByKueue" and s,
                          timeout=30, what="gang Queued again, evicted by Kueue")
        assert gang["phase"] == "Queued" and "PodsReadyTimeout" in gang["message"], gang
        assert gang["attempts"] == 1 and not gang.get("preemptions"), gang  # not a preemption
    finally:
        sim_cluster.delete_nodes(pool.nodes)


def test_the_operator_calls_only_what_the_chart_grants_kueue_included(
        request: pytest.FixtureRequest, real_cluster: ControlPlane, operator: ChartOperator) -> None:
    """The API server's audit log of the operator's ServiceAccount while this module ran: every
    call is granted by the chart's ClusterRole, and the one grant for Kueue, `list` on
    kueue.x-k8s.io workloads, is used (tests/test_operator_real.py checks the rest of the grants
    are all used). Runs last, and only when the whole module ran."""
    module_tests = {name for name in globals() if name.startswith("test_")}
    ran = {item.originalname for item in request.session.items if getattr(item, "module", None) is not None
           and item.module.__name__ == __name__}
    if ran != module_tests:
        pytest.skip(f"checks the calls of the whole module's run; not run here: {sorted(module_tests - ran)}")
    granted = granted_calls(one(operator.chart, "ClusterRole")["rules"])
    calls = audited_calls(real_cluster, operator)
    assert calls <= granted, f"called but not granted: {sorted(calls - granted)}"
    kueue = {c for c in calls if c[0] == "kueue.x-k8s.io"}
    assert kueue == {("kueue.x-k8s.io", "workloads", "list")}, kueue
    assert {g for g in granted if g[0] == "kueue.x-k8s.io"} == kueue
