"""kmock's Kubernetes emulator over HTTP, for the one operator test that still uses it:
test_operator_webhook.py, where the operator process serves its webhook against the emulator and
the test itself plays the API server (it POSTs AdmissionReviews). Everything else runs against the
real control plane (tests/cluster, tests/cluster_operator.py). Importing this module also sets the
operator's settings for tests (below) before `kubetune.operator.handlers` is imported.

kmock stores bodies as sent; the `Cluster` emulator below adds what kopf and the operator rely
on: uid, resourceVersion (bumped on every write, so kopf's JSON-patch `test` works),
creationTimestamp, namespace from the URL, generation (bumped on spec changes), and a garbage
collector for ownerReferences (foreground-free: children of a deleted owner go at once).
It does not run controllers: tests play the Job controller by patching a Job's /status.
"""

from __future__ import annotations

import datetime
import itertools
import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kmock

# Read by kubetune.operator.handlers when kopf imports it: observe jobs often in tests.
os.environ["KUBETUNE_RECONCILE_INTERVAL"] = "0.4"
os.environ["KUBETUNE_KOPF_EVENTS"] = "0"  # kmock has no generateName; our own events are named
os.environ["KUBETUNE_KOPF_SCANNING"] = "0"

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

