"""kmock's Kubernetes emulator over HTTP, for what still runs the operator's code against an
emulator: test_chart.py's RBAC recording (the operator in-process, kopf's KopfRunner, every call
recorded) and test_operator_webhook.py (the test POSTs AdmissionReviews itself). Everything else
runs against the real control plane (tests/cluster, tests/cluster_operator.py).

kmock stores bodies as sent; the `Cluster` emulator below adds what kopf and the operator rely
on: uid, resourceVersion (bumped on every write, so kopf's JSON-patch `test` works),
creationTimestamp, namespace from the URL, generation (bumped on spec changes), and a garbage
collector for ownerReferences (foreground-free: children of a deleted owner go at once).
It does not run controllers: tests play the Job controller by patching a Job's /status.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock

# Read by kubetune.operator.handlers when kopf imports it: observe jobs often in tests.
os.environ["KUBETUNE_RECONCILE_INTERVAL"] = "0.4"
os.environ["KUBETUNE_KOPF_EVENTS"] = "0"  # kmock has no generateName; our own events are named
os.environ["KUBETUNE_KOPF_SCANNING"] = "0"

NAMESPACE = "ml"
GROUP_VERSION = "kubetune.io/v1alpha1"
_versions = itertools.count(1000)

RESOURCES = {
    "kubetune.io/v1alpha1/finetunejobs": ("FineTuneJob", True, {"status"}),
    "kubetune.io/v1alpha1/alignmentjobs": ("AlignmentJob", True, {"status"}),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/events": ("Event", True, set()),
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
PATHS = {
    "FineTuneJob": "/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs",
    "AlignmentJob": "/apis/kubetune.io/v1alpha1/namespaces/{ns}/alignmentjobs",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "Event": "/api/v1/namespaces/{ns}/events",
}


class Cluster(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata bookkeeping and garbage collection of a real server."""

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action == kmock.action.CREATE and (request.params or {}).get("dryRun"):
            return self._dry_run_create(request)
        if request.resource is not None:
            self._stamp(request)
        try:
            response = await super()._handle(request)
        except jsonpatch.JsonPatchException as exc:
            # A real API server answers a failed `test` op (optimistic concurrency) with 422,
            # which kopf understands as "retry with a fresh body"; kmock would answer 500.
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        if request.resource is not None and request.action in (kmock.action.DELETE, kmock.action.UPDATE):
            await self._collect_garbage()
        return response

    def _dry_run_create(self, request: kmock.Request) -> Any:
        """`?dryRun=All` as a real API server answers it: 409 when the name is taken, else the
        object as it would be created, and nothing stored (the operator's Secret existence check)."""
        meta = (request.data or {}).get("metadata") or {}
        namespace = request.namespace or meta.get("namespace")
        for (resource, ns, name), obj in list(self.objects.items()):
            if resource == request.resource and ns == namespace and name == meta.get("name") and not obj.deleted:
                raise kmock.KubernetesError(status=409, reason="AlreadyExists", message=f"{name} already exists")
        return aiohttp.web.json_response(request.data, status=201)

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        for (resource, namespace, name), obj in list(self.objects.items()):
            if resource == request.resource and namespace == request.namespace and name == request.name:
                return None if obj.deleted else obj.raw
        return None

    def _stamp(self, request: kmock.Request) -> None:
        version = str(next(_versions))
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_iso())
            meta["resourceVersion"] = version
            meta.setdefault("generation", 1)
        elif request.action == kmock.action.UPDATE and request.name:
            if isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                stored = self._stored(request)
                if stored is not None and request.subresource is None and request.data.get("spec"):
                    meta["generation"] = int((stored.get("metadata") or {}).get("generation") or 1) + 1
            elif isinstance(request.data, list):
                request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": version})

    async def _collect_garbage(self) -> None:
        """Delete objects whose owner (by uid) no longer exists, until nothing changes."""
        while True:
            alive = set()
            for _key, obj in list(self.objects.items()):
                if not obj.deleted:
                    uid = (obj.raw.get("metadata") or {}).get("uid")
                    if uid:
                        alive.add(uid)
            orphans = []
            for (resource, namespace, name), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
                if refs and all(ref.get("uid") not in alive for ref in refs):
                    orphans.append((resource, namespace, name, obj))
            if not orphans:
                return
            for resource, _namespace, _name, obj in orphans:
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def register_resources(emulator: kmock.KubernetesEmulator) -> None:
    for key, (kind, namespaced, subresources) in RESOURCES.items():
        emulator.resources[key] = kmock.ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources=subresources,
        )


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{server}'}}}}]\n"
        "contexts: [{name: kmock, context: {cluster: kmock, user: kmock, namespace: default}}]\n"
        "current-context: kmock\n"
        "users: [{name: kmock, user: {token: kmock-token}}]\n"
    )
    return path


class Api:
    """The test's own async client (it shares the event loop with kmock)."""

    def __init__(self, url: str, session: aiohttp.ClientSession):
        self.url = str(url).rstrip("/")
        self.session = session

    def _path(self, kind: str, name: str | None = None, subresource: str | None = None, ns: str = NAMESPACE) -> str:
        path = self.url + PATHS[kind].format(ns=ns)
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "metadata": {"namespace": NAMESPACE, **body["metadata"]}}
        async with self.session.post(self._path(body["kind"]), json=body) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        async with self.session.get(self._path(kind, name)) as resp:
            if resp.status == 404:
                return None
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def list(self, kind: str) -> list[dict[str, Any]]:
        async with self.session.get(self._path(kind)) as resp:
            assert resp.status < 300, await resp.text()
            return (await resp.json()).get("items") or []

    async def patch(self, kind: str, name: str, patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self._path(kind, name, subresource), json=patch, headers=headers) as resp:
            assert resp.status < 300, await resp.text()
            return await resp.json()

    async def delete(self, kind: str, name: str) -> None:
        async with self.session.delete(self._path(kind, name)) as resp:
            assert resp.status < 300, await resp.text()

    async def job_status(self, name: str, status: dict[str, Any]) -> None:
        """Play the Job controller."""
        await self.patch("Job", name, {"status": status}, subresource="status")

    async def events(self, involved: str) -> list[dict[str, Any]]:
        return [e for e in await self.list("Event") if (e.get("involvedObject") or {}).get("name") == involved]


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "") -> Any:
    """Await `check()` until it returns something truthy (or raise with its last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}: last value {last!r}")


def finetunejob(name: str = "llama-sft", **cluster: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodes": 2,
        "gpusPerNode": 8,
        "training": {
            "model": {"path": "s3://models/llama-3-8b"},
            # No prepare step (a multi-node S3 job gets one by default): the gang's own flow is
            # tested; the prepare step's test sets data.cache itself.
            "data": {"datasets": [{"path": "s3://data/chat.jsonl", "format": "sharegpt"}], "cache": "off"},
            "train": {"maxSteps": 100},
            "output": {"path": f"s3://outputs/{name}"},
        },
    }
    spec.update(cluster)
    return {"apiVersion": GROUP_VERSION, "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


SERVING_RESOURCES = {
    "kubetune.io/v1alpha1/inferenceservices": ("InferenceService", {"status", "scale"}),
    "apps/v1/deployments": ("Deployment", {"status"}),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", {"status"}),
}
"""What an InferenceService's operator needs registered in the emulator beyond RESOURCES."""


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
    return {"apiVersion": GROUP_VERSION, "kind": "InferenceService", "metadata": {"name": name}, "spec": body}
