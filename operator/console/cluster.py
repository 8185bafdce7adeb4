"""Cluster mode: FineTuneJobs, AlignmentJobs and InferenceServices read and created through the
`kubernetes` client with the user's own kubeconfig (or the pod's service account), so the console
can do nothing the user could not do with kubectl. A manifest passes the operator's admission
check (`validation.admit`, what `kubetune validate` and the webhook run) before it is sent."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from kubetune.operator.common import selector_labels
from kubetune.operator.console.runs import RunRow
from kubetune.operator.resources import GROUP, VERSION

KINDS = {"FineTuneJob": "finetunejobs", "AlignmentJob": "alignmentjobs", "InferenceService": "inferenceservices"}
LOG_LINES = 400
USERS_KEPT = 64


def impersonating_client(configuration: Any, user: str, groups: tuple[str, ...]) -> Any:
    """An ApiClient whose every request impersonates `user` and `groups`. The kubernetes client
    keeps headers in a plain dict (one value per name), while the API server wants one
    Impersonate-Group header per group: the groups are added to the request's urllib3 header
    dict, which sends each value as its own header line."""
    from kubernetes import client
    from urllib3 import HTTPHeaderDict

    api = client.ApiClient(configuration=configuration)
    api.set_default_header("Impersonate-User", user)
    pool = api.rest_client.pool_manager
    send = pool.request

    def request(method: str, url: str, *args: Any, headers: Any = None, **kwargs: Any) -> Any:
        merged = HTTPHeaderDict(headers or {})
        merged.discard("Impersonate-Group")
        for group in groups:
            merged.add("Impersonate-Group", group)
        return send(method, url, *args, headers=merged, **kwargs)

    pool.request = request
    return api


def _age(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    try:
        return time.time() - datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def row_of(obj: dict[str, Any]) -> RunRow:
    """A Jobs-table row from a resource as the API server returns it."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    progress = status.get("progress") or {}
    kind, ns, name = obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")
    return RunRow(name, kind, ns, status.get("phase") or "Pending", progress.get("step"), progress.get("totalSteps"),
                  progress.get("loss"), progress.get("etaSeconds"), status.get("attempts"),
                  _age(meta.get("creationTimestamp")), f"/cluster/{ns}/{kind}/{name}")


class Cluster:
    """The API calls the console makes: list, get, create (custom objects), events, pod logs.
    The chart's RBAC for the console (charts/kubetune/templates/_helpers.tpl, `kubetune.consoleRules`)
    grants exactly these; tests/test_console_cluster.py compares it with the API server's audit log."""

    def __init__(self, kubeconfig: str | None = None, in_cluster: bool = False, context: str | None = None,
                 api: Any = None):
        from kubernetes import client, config

        if api is None and in_cluster:
            config.load_incluster_config()
            api = client.ApiClient()
        elif api is None:
            api = config.new_client_from_config(config_file=kubeconfig, context=context)
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self._users: dict[tuple[str, tuple[str, ...]], Cluster] = {}

    def as_user(self, user: str, groups: tuple[str, ...] = ()) -> Cluster:
        """This cluster as `user` in `groups`, through Kubernetes impersonation: every call carries
        Impersonate-User and one Impersonate-Group header per group, so the API server authorizes
        it as that user (the console's own identity needs only the `impersonate` verb). Clients
        are kept per user, up to USERS_KEPT."""
        key = (user, tuple(groups))
        if key not in self._users:
            if len(self._users) >= USERS_KEPT:  # the oldest user's client goes
                self._users.pop(next(iter(self._users))).api.close()
            self._users[key] = Cluster(api=impersonating_client(self.api.configuration, user, key[1]))
        return self._users[key]

    def rows(self, namespace: str | None = None) -> list[RunRow]:
        out = []
        for kind, plural in KINDS.items():
            if namespace:
                listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
            else:
                listed = self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
            for item in listed.get("items", []):
                item.setdefault("kind", kind)
                out.append(row_of(item))
        return out

    def get(self, namespace: str, kind: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, KINDS[kind], name)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        listed = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        return [{"type": e.type, "reason": e.reason, "message": e.message, "count": e.count,
                 "last": str(e.last_timestamp or e.event_time or "")} for e in listed.items]

    def pod_logs(self, namespace: str, kind: str, name: str) -> dict[str, str]:
        """The last lines of each pod of the resource (its selector labels)."""
        selector = ",".join(f"{k}={v}" for k, v in selector_labels(kind, name).items())
        logs = {}
        for pod in self.core.list_namespaced_pod(namespace, label_selector=selector).items:
            try:
                logs[pod.metadata.name] = self.core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=LOG_LINES)
            except Exception as exc:  # a pod not started yet has no log: say so, keep the others
                logs[pod.metadata.name] = f"(no log: {getattr(exc, 'reason', exc)})"
        return logs

    def create(self, manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, KINDS[manifest["kind"]], manifest)


def resource_manifest(spec: dict[str, Any], kind: str, name: str, namespace: str) -> dict[str, Any]:
    """A resource of `kind` with this spec, as a user would write it (an InferenceService)."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def job_manifest(training: dict[str, Any], kind: str, name: str, namespace: str, cluster: dict[str, Any]) -> dict[str, Any]:
    """The FineTuneJob/AlignmentJob a user would write around a training spec."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": {**cluster, "training": training}}


def admit(manifest: dict[str, Any]) -> list[str]:
    """The operator's admission check of a new resource; its warnings. Raises SpecErrors (with
    the fields, for the form) when the resource is invalid, AdmissionRefused for the rest."""
    from kubetune.operator.validation import admit as operator_admit
    from kubetune.operator.validation import validate_resource

    source = f"{manifest['kind']}/{manifest['metadata']['name']}"
    validate_resource(manifest, source)  # the same first step as admit, keeping the field of each error
    return operator_admit("CREATE", None, manifest, source=source)
