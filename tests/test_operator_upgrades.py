"""The operator restarted mid-reconcile, and many jobs at once, on the simulated GPU cluster.

Everything runs as in tests/test_operator_real.py (the chart's CRDs and RBAC as the real Helm
engine renders them, `kubetune operator` with the chart Deployment's arguments under a real
token of the chart's ServiceAccount; tests/cluster_operator.py), but the nodes are kwok's fake
GPU nodes (tests/cluster/sim.py): pods the scheduler binds there become Running at once, and a
Job's pod then completes unless it selects a `keep_running` pool (then it runs until deleted).

- An operator killed with SIGKILL ten times, at seeded random moments while FineTuneJobs (a gang,
  one with a prepare Job, one whose status is lost while the operator is down) and an
  InferenceService are being reconciled, leaves exactly one of each child, owned by its
  resource, and every resource reaches its phase.
- 20 FineTuneJobs created at once all reach Running, through `bench/operator_scale.py`'s
  `scale_run` (the benchmark runs 200), with a bound on the operator's API requests per job.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.operator_scale import RELEASE_NS, chart_values, moto_s3, scale_run
from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import Kubectl
from tests.cluster.sim import NodePool, SimCluster
from tests.cluster_operator import ChartOperator, Client, apply_chart, chart_objects, eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # the first session builds the binaries

GROUP_VERSION = "kubetune.io/v1alpha1"
KILLS = 10
SEED = 16


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def chart(sim_cluster: SimCluster, kubectl: Kubectl, s3_endpoint: str,
          tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The chart rendered by the real Helm engine (no webhook), its CRDs and RBAC applied."""
    objects = chart_objects(chart_values(s3_endpoint), tmp_path_factory.mktemp("helm"))
    apply_chart(kubectl, objects, (RELEASE_NS,))
    return objects


@pytest.fixture(scope="module")
def admin(real_cluster: ControlPlane) -> Client:
    return Client(real_cluster.admin_kubeconfig)


def _no_forbidden(operator: ChartOperator) -> None:
    forbidden = operator.process.forbidden_lines()
    assert not forbidden, "the operator was refused calls (RBAC):\n" + "\n".join(forbidden[:20])


# --------------------------------------------------------------------------------------------
# restarts


def _ftj(name: str, pool: NodePool, *, nodes: int = 1, cache: str = "off") -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"nodes": nodes, "gpusPerNode": 1, **pool.placement,
                     "training": {"model": {"path": "s3://models/llama-3-8b"},
                                  "data": {"datasets": [{"path": "s3://data/chat.jsonl"}], "cache": cache},
                                  "output": {"path": f"s3://outputs/{name}"}}}}


def _isvc(name: str, pool: NodePool, model_job: str) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"model": {"fromJob": {"fineTuneJob": model_job}}, "engine": "vllm", "gpus": 1,
                     **pool.placement, "adapters": [{"name": "faq", "uri": "s3://outputs/faq-lora"}],
                     "minReplicas": 1, "maxReplicas": 2}}


CHILD_KINDS = ("Job", "ConfigMap", "Service", "Secret", "Deployment", "HorizontalPodAutoscaler")


def _owned(admin: Client, ns: str) -> dict[str, Counter[tuple[str, str]]]:
    """uid of each owner -> Counter of (kind, name) of the objects it controls."""
    out: dict[str, Counter[tuple[str, str]]] = {}
    for kind in CHILD_KINDS:
        for obj in admin.list(kind, ns):
            for ref in obj["metadata"].get("ownerReferences") or []:
                if ref.get("controller"):
                    out.setdefault(ref["uid"], Counter())[(kind, obj["metadata"]["name"])] += 1
    return out


def _phase(admin: Client, kind: str, ns: str, name: str) -> str | None:
    return ((admin.get(kind, ns, name) or {}).get("status") or {}).get("phase")


def test_operator_killed_ten_times_mid_reconcile_creates_no_duplicates(
        real_cluster: ControlPlane, sim_cluster: SimCluster, chart: list[dict[str, Any]], admin: Client,
        tmp_path: Path) -> None:
    """Each round creates resources and then, after a seeded random delay (0-1.5 s: before,
    during or after their first reconcile), SIGKILLs the operator and starts a new one, whose
    resume handlers pick everything up. Midway, with the operator down, one Running job loses
    its status (as if the operator had died before writing it): it must adopt its Job, not
    start a second attempt."""
    ns = sim_cluster.create_namespace(sim_cluster.unique("restart"))
    # Training pods keep running on `keep` and complete at once on `done`; both pools are tainted
    # so that no pod left Pending by another module takes their GPUs.
    keep = sim_cluster.add_gpu_nodes(2, prefix="keep", keep_running=True, exclusive=True)
    done = sim_cluster.add_gpu_nodes(1, prefix="done", exclusive=True)
    rng = random.Random(SEED)
    # (kind, name, body, phase it must reach)
    plan: list[tuple[str, str, dict[str, Any], str]] = [
        ("FineTuneJob", "base", _ftj("base", done), "Succeeded"),
        ("InferenceService", "chat", _isvc("chat", keep, "base"), "Ready"),
        ("FineTuneJob", "gang", _ftj("gang", keep, nodes=2), "Running"),
        ("FineTuneJob", "prep", _ftj("prep", done, cache="s3://cache/kubetune/"), "Succeeded"),
    ]
    plan += [("FineTuneJob", f"r{i}", _ftj(f"r{i}", keep if i % 2 else done), "Running" if i % 2 else "Succeeded")
             for i in range(KILLS - 3)]
    rounds = [plan[:2], *([p] for p in plan[2:])]
    assert len(rounds) == KILLS
    operator = ChartOperator(real_cluster, chart, tmp_path / "operator", RELEASE_NS,
                             flags={"--reconcile-interval": "1"})
    started = time.monotonic()
    try:
        operator.start()
        for i, batch in enumerate(rounds):
            for _kind, _name, body, _phase_wanted in batch:
                admin.create(body, ns)
            time.sleep(rng.uniform(0.0, 1.5))
            if i == KILLS // 2:
                # Only a live operator writes the phase: on a loaded machine the short lives before
                # this round may not have reached the gang's pods (seen in CI), so wait with it up.
                eventually(lambda: _phase(admin, "FineTuneJob", ns, "gang") == "Running", timeout=90,
                           what="gang Running")
            operator.kill()
            if i == KILLS // 2:
                admin.patch("FineTuneJob", ns, "gang", {"status": None}, subresource="status")
            operator.restart()

        for kind, name, _body, wanted in plan:
            eventually(lambda kind=kind, name=name, wanted=wanted: _phase(admin, kind, ns, name) == wanted,
                       timeout=60, what=f"{kind} {name} {wanted}")
        elapsed = time.monotonic() - started

        owned = _owned(admin, ns)
        for kind, name, _body, _wanted in plan:
            cr = admin.get(kind, ns, name)
            children = owned.get(cr["metadata"]["uid"], Counter())
            if kind == "FineTuneJob":
                base = f"{name}-ftj"
                expected = {("ConfigMap", f"{base}-config"), ("Service", base), ("Job", f"{base}-a1")}
                if name == "prep":
                    expected.add(("Job", f"{base}-prepare"))
                assert cr["status"]["attempts"] == 1 and cr["status"]["jobName"] == f"{base}-a1", cr["status"]
            else:
                base = f"{name}-isvc"
                expected = {("Deployment", base), ("Service", base), ("ConfigMap", f"{base}-adapters"),
                            ("Secret", f"{base}-api-key"), ("HorizontalPodAutoscaler", base)}
            assert set(children) == expected, f"{kind} {name}: {sorted(children.items())}"
            assert all(count == 1 for count in children.values()), f"{kind} {name}: {children}"
            for child_kind, child_name in expected:
                (ref,) = admin.get(child_kind, ns, child_name)["metadata"]["ownerReferences"]
                assert ref == {"apiVersion": GROUP_VERSION, "kind": kind, "name": name, "uid": cr["metadata"]["uid"],
                               "controller": True, "blockOwnerDeletion": True}, (child_kind, child_name, ref)
        # Nothing else in the namespace is ours and owned by no one (a child created for a
        # resource and then orphaned), and the gang runs exactly its two pods.
        uids = {admin.get(k, ns, n)["metadata"]["uid"] for k, n, _b, _w in plan}
        assert set(owned) <= uids, set(owned) - uids
        gang_pods = [p for p in admin.list("Pod", ns, "batch.kubernetes.io/job-name=gang-ftj-a1")
                     if (p.get("status") or {}).get("phase") == "Running"]
        assert len(gang_pods) == 2
        assert admin.get("Job", ns, "gang-ftj-a2") is None
        assert elapsed < 90, f"{elapsed:.0f}s"
    finally:
        if operator.process.proc is not None:  # started: let it release its resources (kopf's finalizers)
            if not operator.process.alive():
                operator.restart()
            admin.request("DELETE", f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs")
            admin.request("DELETE", f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/inferenceservices")
            eventually(lambda: not admin.list("FineTuneJob", ns) and not admin.list("InferenceService", ns),
                       timeout=60, what="the resources deleted")
        operator.process.stop()
        sim_cluster.clear_namespace(ns)
        sim_cluster.delete_nodes(keep.nodes + done.nodes)
    _no_forbidden(operator)


# --------------------------------------------------------------------------------------------
# scale


def test_twenty_finetunejobs_created_at_once_all_reach_running(
        real_cluster: ControlPlane, sim_cluster: SimCluster, chart: list[dict[str, Any]], tmp_path: Path) -> None:
    """bench/operator_scale.py's measurement with 20 jobs (the benchmark's 200 take minutes):
    each one's pod scheduled onto a fake GPU node and made Running by kwok, the phase written by
    the operator (chart defaults: a 10 s timer), and the operator's API requests per job, from
    the apiserver's audit log, within a bound (about 24 measured: get, list its Jobs, create
    ConfigMap, Service and Job, status patches and events)."""
    with ChartOperator(real_cluster, chart, tmp_path / "operator", RELEASE_NS) as operator:
        result = scale_run(real_cluster, operator, sim_cluster, 20, sim_cluster.unique("scale"), timeout=120)
    assert len(result.to_running) == 20 and max(result.to_running) < 60, result.to_running
    per_job = result.requests_total / result.jobs
    assert per_job < 40, result.requests
    for verb in ("create jobs", "create configmaps", "create services"):
        assert result.requests.get(verb) == 20, result.requests  # one each, no retries or duplicates
    assert result.cpu_s > 0 and result.peak_rss_mb > 0
    _no_forbidden(operator)
