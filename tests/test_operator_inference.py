"""InferenceService with the real operator process (kopf's KopfRunner) against kmock's emulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kubernetes
import pytest
import pytest_asyncio

from tests.operator_support import (
    NAMESPACE,
    PATHS,
    Api,
    Cluster,
    eventually,
    finetunejob,
    register_resources,
    running_operator,
    write_kubeconfig,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

EXTRA_RESOURCES = {
    "kubetune.io/v1alpha1/inferenceservices": ("InferenceService", {"status", "scale"}),
    "apps/v1/deployments": ("Deployment", {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", {"status"}),
}
EXTRA_PATHS = {
    "InferenceService": "/apis/kubetune.io/v1alpha1/namespaces/{ns}/inferenceservices",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
}
CHILD = "chat-isvc"


class ServingApi(Api):
    def _path(self, kind: str, name: str | None = None, subresource: str | None = None, ns: str = NAMESPACE) -> str:
        path = self.url + {**PATHS, **EXTRA_PATHS}[kind].format(ns=ns)
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


class ServingCluster(Cluster):
    """Also collects garbage after a create: like the real garbage collector, an object created
    with an owner that is already gone (a reconcile racing the deletion) is deleted."""

    async def _handle(self, request: kmock.Request) -> Any:
        response = await super()._handle(request)
        if request.resource is not None and request.action == kmock.action.CREATE:
            await self._collect_garbage()
        return response


@pytest.fixture()
def kmock_options() -> dict[str, Any]:
    return {"cls": ServingCluster}


@pytest_asyncio.fixture()
async def api(kmock: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    register_resources(kmock)
    for key, (kind, subresources) in EXTRA_RESOURCES.items():
        kmock.resources[key] = kmock_info(kind, subresources)
    config = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    async with aiohttp.ClientSession() as session:
        yield ServingApi(str(kmock.url), session)


def kmock_info(kind: str, subresources: set[str]) -> Any:
    return kmock.ResourceInfo(kind=kind, namespaced=True,
                              verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                              subresources=subresources)


def isvc(name: str = "chat", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"fromJob": {"fineTuneJob": "base"}},
        "adapters": [{"name": "support", "uri": "s3://outputs/support-lora"}],
        "engine": "vllm",
        "gpus": 1,
        "minReplicas": 1,
        "maxReplicas": 3,
    }
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": name}, "spec": body}


async def _status(api: Api, key: str, value: Any, name: str = "chat") -> dict[str, Any] | None:
    obj = await api.get("InferenceService", name)
    return obj if obj and (obj.get("status") or {}).get(key) == value else None


def _server(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


ADAPTERS_CM = f"{CHILD}-adapters"


async def _adapters(api: Api) -> list[dict[str, str]] | None:
    """The adapter set in the adapters ConfigMap (what the pods mount and load at runtime)."""
    cm = await api.get("ConfigMap", ADAPTERS_CM)
    return json.loads(cm["data"]["adapters.json"])["adapters"] if cm else None


async def _deployment_where(api: Api, check) -> dict[str, Any] | None:
    dep = await api.get("Deployment", CHILD)
    return dep if dep and check(dep) else None


async def _children(api: Api) -> dict[str, bool]:
    return {kind: await api.get(kind, CHILD) is not None for kind in ("Deployment", "Service", "HorizontalPodAutoscaler")}


async def test_waits_for_its_finetunejob_then_deploys_rolls_and_cleans_up(api: Api) -> None:
    async with running_operator():
        await api.create(finetunejob("base"))
        cr = await api.create(isvc())
        # The referenced job has not succeeded: Pending, with a clear condition, and no children.
        pending = await eventually(lambda: _status(api, "reason", "WaitingForReference"), what="WaitingForReference")
        assert pending["status"]["phase"] == "Pending"
        cond = next(c for c in pending["status"]["conditions"] if c["type"] == "DependenciesReady")
        assert cond["status"] == "False" and "FineTuneJob 'base'" in cond["message"]
        assert await _children(api) == {"Deployment": False, "Service": False, "HorizontalPodAutoscaler": False}

        # The training succeeds: Deployment, Service and HPA appear, serving the job's output.
        await eventually(lambda: api.get("Job", "base-ftj-a1"), what="training Job")
        await api.job_status("base-ftj-a1", {"conditions": [{"type": "Complete", "status": "True"}]})
        await eventually(lambda: _children_all(api), what="Deployment, Service, HPA")
        dep = await api.get("Deployment", CHILD)
        args = _server(dep)["args"]
        assert args[:2] == ["serve", "s3://outputs/base"] and "--vllm-arg=--enable-lora" in args
        assert await _adapters(api) == [{"name": "support", "uri": "s3://outputs/support-lora"}]
        assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == ["server", "adapters"]
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        hpa = await api.get("HorizontalPodAutoscaler", CHILD)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": CHILD}
        service = await api.get("Service", CHILD)
        for obj in (dep, hpa, service, await api.get("ConfigMap", ADAPTERS_CM)):
            (ref,) = obj["metadata"]["ownerReferences"]
            assert ref["uid"] == cr["metadata"]["uid"] and ref["controller"] is True
        deploying = await eventually(lambda: _status(api, "phase", "Deploying"), what="Deploying")
        assert deploying["status"]["modelUri"] == "s3://outputs/base"

        # The Deployment controller reports a ready replica: Ready, with URL and served names.
        await api.patch("Deployment", CHILD, {"status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1,
                                                          "availableReplicas": 1, "updatedReplicas": 1}},
                        subresource="status")
        ready = await eventually(lambda: _status(api, "phase", "Ready"), what="Ready")
        assert ready["status"]["url"] == f"http://{CHILD}.{NAMESPACE}.svc/v1"
        assert ready["status"]["readyReplicas"] == 1 and ready["status"]["desiredReplicas"] == 1
        assert ready["status"]["servedModels"] == ["chat", "support"]
        assert ready["status"]["observedGeneration"] == 1

        # A spec change rolls the Deployment (new pod template, same object).
        await api.patch("InferenceService", "chat", {"spec": {"engineArgs": {"maxModelLen": 4096}}})
        rolled = await eventually(lambda: _deployment_where(api, lambda d: "--max-model-len" in _server(d)["args"]),
                                  what="rolled Deployment")
        assert rolled["metadata"]["uid"] == dep["metadata"]["uid"]
        assert rolled["metadata"]["generation"] > dep["metadata"]["generation"]

        # Adding an adapter (vLLM) updates the served list and the adapters ConfigMap the pods'
        # sidecar loads from, and leaves the Deployment alone: no rollout, no restart.
        before = await api.get("Deployment", CHILD)
        await api.patch("InferenceService", "chat", {"spec": {"adapters": [
            {"name": "support", "uri": "s3://outputs/support-lora"},
            {"name": "sales", "uri": "s3://outputs/sales-lora"},
        ]}})
        updated = await eventually(lambda: _status(api, "servedModels", ["chat", "support", "sales"]), what="served list")
        assert updated["status"]["observedGeneration"] == 3
        assert (await _adapters(api))[-1] == {"name": "sales", "uri": "s3://outputs/sales-lora"}
        events = await eventually(lambda: _events_with(api, "AdaptersUpdated"), what="AdaptersUpdated event")
        assert any("adapters added: sales" in e["message"] for e in events)
        after = await api.get("Deployment", CHILD)
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"]["template"] == before["spec"]["template"]
        assert not any(e["reason"] == "RollingUpdate" and "sales" in e["message"] for e in await api.events("chat"))

        # Deleting the service removes its children.
        await api.delete("InferenceService", "chat")
        await eventually(lambda: _none_left(api), what="children garbage-collected")


async def _events_with(api: Api, reason: str) -> list[dict[str, Any]]:
    return [e for e in await api.events("chat") if e["reason"] == reason]


async def _children_all(api: Api) -> bool:
    return all((await _children(api)).values())


async def _none_left(api: Api) -> bool:
    return await api.get("InferenceService", "chat") is None and not any((await _children(api)).values())


async def test_scale_without_autoscaler_then_turn_autoscaling_on(api: Api) -> None:
    async with running_operator():
        await api.create(isvc(model={"uri": "s3://models/base"}, maxReplicas=None, minReplicas=2, engine="transformers"))
        dep = await eventually(lambda: api.get("Deployment", CHILD), what="Deployment")
        assert dep["spec"]["replicas"] == 2
        assert await api.get("HorizontalPodAutoscaler", CHILD) is None
        # `kubectl scale kisvc/chat --replicas=4` writes spec.replicas through the scale subresource.
        await api.patch("InferenceService", "chat", {"spec": {"replicas": 4}})
        await eventually(lambda: _deployment_where(api, lambda d: d["spec"]["replicas"] == 4), what="scaled")
        deploying = await eventually(lambda: _status(api, "phase", "Deploying"), what="Deploying")
        assert deploying["status"]["selector"] and deploying["status"]["engine"] == "transformers"
        # Autoscaling on: the HPA appears and owns the replicas.
        await api.patch("InferenceService", "chat", {"spec": {"maxReplicas": 6, "autoscaling": {"metric": "queueDepth"}}})
        hpa = await eventually(lambda: api.get("HorizontalPodAutoscaler", CHILD), what="HPA")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "kubetune_queue_depth"
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
        # The transformers engine loads adapters at runtime too: a new adapter updates the
        # adapters ConfigMap and leaves the pod template alone.
        before = await api.get("Deployment", CHILD)
        await api.patch("InferenceService", "chat", {"spec": {"adapters": [
            {"name": "support", "uri": "s3://outputs/support-lora"}, {"name": "sales", "uri": "s3://outputs/sales-lora"}]}})
        await eventually(lambda: _status(api, "servedModels", ["chat", "support", "sales"]), what="served list")
        assert (await _adapters(api))[-1] == {"name": "sales", "uri": "s3://outputs/sales-lora"}
        events = await eventually(lambda: _events_with(api, "AdaptersUpdated"), what="AdaptersUpdated event")
        assert any("sales" in e["message"] for e in events)
        after = await api.get("Deployment", CHILD)
        assert after["spec"]["template"] == before["spec"]["template"]
        assert [c["name"] for c in after["spec"]["template"]["spec"]["containers"]] == ["server", "adapters"]


async def test_generated_api_key_secret_and_node_paths_refused(api: Api) -> None:
    """The real operator: every service gets its own API key Secret (owned by it, created before
    the pods that reference it; the status names it, never the key), and a service naming a node
    directory for its cache is refused (Failed/InvalidSpec) before anything is created."""
    async with running_operator():
        cr = await api.create(isvc(model={"uri": "s3://models/base"}, maxReplicas=None, engine="transformers"))
        dep = await eventually(lambda: api.get("Deployment", CHILD), what="Deployment")
        secret = await api.get("Secret", f"{CHILD}-api-key")
        assert secret is not None and secret["type"] == "Opaque"
        (ref,) = secret["metadata"]["ownerReferences"]
        assert ref["uid"] == cr["metadata"]["uid"] and ref["kind"] == "InferenceService"
        key = secret["stringData"]["api-key"]  # kmock keeps the body as sent
        assert len(key) >= 43
        containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
        for name in ("server", "adapters"):
            env = {e["name"]: e for e in containers[name]["env"]}
            assert env["KUBETUNE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{CHILD}-api-key", "key": "api-key"}
        status = (await eventually(lambda: _status(api, "apiKeySecret", f"{CHILD}-api-key"), what="apiKeySecret"))["status"]
        assert key not in json.dumps(status) and key not in json.dumps(await api.events("chat"))

        await api.create(isvc("root", model={"uri": "s3://models/base"}, cache={"type": "hostPath", "path": "/etc"}))
        failed = await eventually(lambda: _status(api, "reason", "InvalidSpec", name="root"), what="InvalidSpec")
        assert "cache.path '/etc' is not accepted" in failed["status"]["message"]
        assert await api.get("Deployment", "root-isvc") is None and await api.get("Secret", "root-isvc-api-key") is None
