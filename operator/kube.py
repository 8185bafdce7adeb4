"""A small dict-in, dict-out Kubernetes client for the handlers (the only I/O of the operator
besides reading status.json). Built on the official client's ApiClient for authentication, but
bodies stay plain JSON: the same dicts the renderers produce and the tests assert on."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
from typing import Any

from kubetune.operator.resources import GROUP, KINDS, VERSION

log = logging.getLogger("kubetune.operator")

_CORE = {"ConfigMap": "configmaps", "Service": "services", "Secret": "secrets", "Event": "events", "Pod": "pods"}
_BATCH = {"Job": "jobs"}
_APPS = {"Deployment": "deployments"}
_AUTOSCALING = {"HorizontalPodAutoscaler": "horizontalpodautoscalers"}
_POLICY = {"PodDisruptionBudget": "poddisruptionbudgets"}
_KEDA = {"ScaledObject": "scaledobjects"}
KEDA_GROUP_VERSION = "keda.sh/v1alpha1"
_BY_API_VERSION = {("scheduling.x-k8s.io/v1alpha1", "PodGroup"): "podgroups",
                   ("scheduling.volcano.sh/v1beta1", "PodGroup"): "podgroups"}
"""Kinds whose name alone does not say their API (the gang schedulers' PodGroups)."""
MERGE_PATCH = "application/merge-patch+json"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


_VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


class KubeError(Exception):
    """An API call that failed: `status` (HTTP), and `verb`/`resource`/`namespace` of the call
    (e.g. patch, configmaps) so that a 403 can say which permission is missing."""

    def __init__(self, status: int, message: str, *, verb: str = "", resource: str = "", namespace: str = ""):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.verb = verb
        self.resource = resource
        self.namespace = namespace

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    def permission(self) -> str:
        """`patch configmaps in namespace ml`: the missing grant of a 403, in RBAC words."""
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.verb or 'call'} {self.resource or 'this resource'}{where}"


def _describe(method: str, path: str) -> tuple[str, str, str]:
    """(verb, resource[/subresource], namespace) of a request path, for error messages."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts[:-1] else ""
    after = parts[parts.index("namespaces") + 2:] if namespace else parts[2 if parts[:1] == ["api"] else 3:]
    resource = "/".join([after[0], *after[2:3]]) if after else ""
    verb = _VERBS.get(method, method.lower())
    if method == "GET" and len(after) == 1:
        verb = "list"
    return verb, resource, namespace


def collection_path(kind: str, namespace: str, api_version: str | None = None) -> str:
    if (api_version, kind) in _BY_API_VERSION:
        return f"/apis/{api_version}/namespaces/{namespace}/{_BY_API_VERSION[api_version, kind]}"
    if kind in _CORE:
        return f"/api/v1/namespaces/{namespace}/{_CORE[kind]}"
    if kind in _BATCH:
        return f"/apis/batch/v1/namespaces/{namespace}/{_BATCH[kind]}"
    if kind in _APPS:
        return f"/apis/apps/v1/namespaces/{namespace}/{_APPS[kind]}"
    if kind in _AUTOSCALING:
        return f"/apis/autoscaling/v2/namespaces/{namespace}/{_AUTOSCALING[kind]}"
    if kind in _POLICY:
        return f"/apis/policy/v1/namespaces/{namespace}/{_POLICY[kind]}"
    if kind in _KEDA:
        return f"/apis/{KEDA_GROUP_VERSION}/namespaces/{namespace}/{_KEDA[kind]}"
    if kind in KINDS:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{KINDS[kind].plural}"
    raise KeyError(f"unknown kind {kind}")


def object_path(kind: str, namespace: str, name: str, subresource: str | None = None) -> str:
    path = f"{collection_path(kind, namespace)}/{name}"
    return f"{path}/{subresource}" if subresource else path


def load_api_client() -> Any:
    """An ApiClient from the in-cluster service account, else $KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        pass
    configuration = client.Configuration()
    config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration)
    return client.ApiClient(configuration)


class Kube:
    def __init__(self, api_client: Any | None = None):
        self.api = api_client or load_api_client()
        self.instance = socket.gethostname()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        accept: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": accept},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
            )
        except ApiException as exc:
            verb, resource, namespace = _describe(method, path)
            raise KubeError(exc.status or 0, (exc.body or exc.reason or "").strip()[:500], verb=verb,
                            resource=resource, namespace=namespace) from None
        data = response.data
        return json.loads(data) if data else {}

    # -- generic verbs -----------------------------------------------------------------
    def get(self, kind: str, namespace: str, name: str, *, metadata_only: bool = False) -> dict[str, Any] | None:
        """The object, or None when it does not exist. `metadata_only` on a Secret never reads it
        (see `secret_exists`): the answer is `{"metadata": {"name": ...}}` or None."""
        if kind == "Secret" and metadata_only:
            return {"metadata": {"name": name, "namespace": namespace}} if self.secret_exists(namespace, name) else None
        try:
            return self._call("GET", object_path(kind, namespace, name), accept=PARTIAL_METADATA if metadata_only else "application/json")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def serves(self, group_version: str, resource: str) -> bool:
        """Whether the API server serves `resource` in `group_version` (its CRD is installed):
        one discovery request, which every authenticated client may make (no RBAC grant)."""
        try:
            found = self._call("GET", f"/apis/{group_version}")
        except KubeError as exc:
            if exc.status in (404, 503):
                return False
            raise
        return any(r.get("name") == resource for r in found.get("resources") or [])

    def list(self, kind: str, namespace: str, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        query = []
        if labels:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))))
        items = self._call("GET", collection_path(kind, namespace), query=query).get("items") or []
        if labels:  # do not rely on the server's filtering
            items = [i for i in items if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())]
        return items

    def list_custom(self, group_version: str, plural: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Objects of another project's API (e.g. Kueue's Workloads) matching a label
        `selector`; a KubeError with status 404 when the API is not served."""
        path = f"/apis/{group_version}/namespaces/{namespace}/{plural}"
        return self._call("GET", path, query=[("labelSelector", selector)]).get("items") or []

    def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create; when it already exists, return the existing object (created=False)."""
        meta = body["metadata"]
        try:
            return self._call("POST", collection_path(body["kind"], meta["namespace"]), body), True
        except KubeError as exc:
            if exc.status != 409:
                raise
        existing = self.get(body["kind"], meta["namespace"], meta["name"])
        return existing or {}, False

    def create_if_absent(self, body: dict[str, Any]) -> bool:
        """Create; False when an object of that name already exists. Unlike `create` it never
        reads the existing object back: for Secrets, which the operator may create but not read."""
        meta = body["metadata"]
        try:
            self._call("POST", collection_path(body["kind"], meta["namespace"], body.get("apiVersion")), body)
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    def secret_exists(self, namespace: str, name: str) -> bool:
        """Whether a Secret exists, without permission to read Secrets.

        Why not a GET: even a metadata-only GET (PartialObjectMetadata) needs `get` on secrets,
        which RBAC cannot narrow to a set of names the operator does not know in advance — it
        would let the operator read every Secret of the cluster. The operator needs `create` on
        secrets anyway (the generated API keys of InferenceServices), so the check is a
        server-side dry-run create of an empty Secret of that name: 409 AlreadyExists means it
        exists, success means it does not, and nothing is stored or read. Any other answer (a
        quota, a webhook without dry-run support, 403) counts as "exists": the pods then report
        a missing Secret themselves (CreateContainerConfigError) instead of the job waiting."""
        probe = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}}
        try:
            self._call("POST", collection_path("Secret", namespace), probe, query=[("dryRun", "All")])
            return False
        except KubeError as exc:
            if exc.status != 409:
                log.warning("could not check whether Secret %s/%s exists (%s); assuming it does", namespace, name, exc)
            return True

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        return self._call("PATCH", object_path(kind, namespace, name, subresource), patch, content_type=MERGE_PATCH)

    def delete(self, kind: str, namespace: str, name: str, *, propagation: str = "Background") -> bool:
        try:
            self._call("DELETE", object_path(kind, namespace, name), {"propagationPolicy": propagation})
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    # -- events ------------------------------------------------------------------------
    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `obj` (explicit unique name: no reliance on generateName).
        Best effort: a failure is logged, never raised."""
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1000],
            "source": {"component": "kubetune-operator"},
            "reportingComponent": "kubetune.io/operator",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._call("POST", collection_path("Event", namespace), event)
        except Exception as exc:  # events must never break reconciling
            log.warning("could not post event %s on %s/%s: %s", reason, namespace, meta.get("name"), exc)
