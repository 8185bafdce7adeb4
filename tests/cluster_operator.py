"""Helpers for running the kubetune operator against the real control plane (tests/cluster):
a small JSON client for any kubeconfig, a fake kubelet for one Node, the operator as a process
started the way the Helm chart's Deployment starts it, and polling with a deadline.

Used by tests/test_operator_real.py, tests/test_operator_upgrades.py and bench/operator_scale.py.
Nothing here starts a control plane: that is
tests/cluster/fixtures.py (`real_cluster`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import free_port
from tests.cluster.sim import wait_for

MERGE_PATCH = "application/merge-patch+json"

COLLECTIONS = {
    "FineTuneJob": "/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs",
    "AlignmentJob": "/apis/kubetune.io/v1alpha1/namespaces/{ns}/alignmentjobs",
    "InferenceService": "/apis/kubetune.io/v1alpha1/namespaces/{ns}/inferenceservices",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "ReplicaSet": "/apis/apps/v1/namespaces/{ns}/replicasets",
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "ScaledObject": "/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects",
    "PodGroup": "/apis/scheduling.x-k8s.io/v1alpha1/namespaces/{ns}/podgroups",
    "VolcanoPodGroup": "/apis/scheduling.volcano.sh/v1beta1/namespaces/{ns}/podgroups",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "Event": "/api/v1/namespaces/{ns}/events",
    "Pod": "/api/v1/namespaces/{ns}/pods",
}


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "", interval: float = 0.2) -> Any:
    """`wait_for` that fails the test (AssertionError) rather than erroring it at the deadline."""
    try:
        return wait_for(check, what or str(check), timeout=timeout, interval=interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# A JSON client for one kubeconfig (admin: client certificate; a ServiceAccount: token)


class Client:
    """Plain JSON requests to the apiserver as the kubeconfig's user. Bodies stay dicts, so
    tests read exactly what the server stored."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(Path(kubeconfig).read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        self.server = cluster["server"].rstrip("/")
        self._token = user.get("token")
        self._ssl = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        if "client-certificate-data" in user:
            with tempfile.TemporaryDirectory() as tmp:  # ssl loads key pairs from files only
                cert, key = Path(tmp, "c.crt"), Path(tmp, "c.key")
                cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
                key.write_bytes(base64.b64decode(user["client-key-data"]))
                self._ssl.load_cert_chain(cert, key)

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                params: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        url = self.server + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self._ssl, timeout=15) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:
                return err.code, {"raw": raw.decode(errors="replace")}

    def _ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        status, out = self.request(method, path, body, **kwargs)
        assert status < 300, f"{method} {path}: {status} {out}"
        return out

    # -- by kind ----------------------------------------------------------------------------
    @staticmethod
    def path(kind: str, ns: str, name: str | None = None, subresource: str | None = None) -> str:
        path = COLLECTIONS[kind].format(ns=ns)
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        status, out = self.request("GET", self.path(kind, ns, name))
        if status == 404:
            return None
        assert status < 300, f"GET {kind} {ns}/{name}: {status} {out}"
        return out

    def list(self, kind: str, ns: str, selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": selector} if selector else None
        return self._ok("GET", self.path(kind, ns), params=params).get("items") or []

    def create(self, body: dict[str, Any], ns: str) -> dict[str, Any]:
        return self._ok("POST", self.path(body["kind"], ns), body)

    def patch(self, kind: str, ns: str, name: str, patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        return self._ok("PATCH", self.path(kind, ns, name, subresource), patch, content_type=MERGE_PATCH)

    def delete(self, kind: str, ns: str, name: str) -> None:
        status, out = self.request("DELETE", self.path(kind, ns, name), {"propagationPolicy": "Background"})
        assert status < 300 or status == 404, f"DELETE {kind} {ns}/{name}: {status} {out}"


# --------------------------------------------------------------------------------------------
# A fake kubelet: one Node whose pods "run" (the part of a kubelet the controllers observe)


class FakeKubelet:
    """A Node object and the kubelet's side of its pods, played through the API like kwok does:
    the scheduler binds pods to the node; this marks each new pod Running and Ready (what the
    Job, ReplicaSet and Deployment controllers count), confirms deletions (a pod with a
    deletionTimestamp goes at once, as if its containers had stopped), and renews the node's
    Lease so the node-lifecycle controller keeps it Ready. Pods end only when a test says so
    (`finish`): the test plays the process inside the container."""

    LABEL = "kubetune.io/test-node"

    def __init__(self, client: Client, name: str = "kubetune-fake-node", gpus: int = 16) -> None:
        self.client = client
        self.name = name
        self.gpus = gpus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fake-kubelet-{name}", daemon=True)
        self._ips = iter(range(2, 250))
        self.errors: list[str] = []

    @property
    def placement(self) -> dict[str, Any]:
        """What a pod spec (and the kubetune kinds' spec) needs to land here and on no other
        node; the node's taint keeps every other pod off it."""
        return {"nodeSelector": {self.LABEL: self.name},
                "tolerations": [{"key": self.LABEL, "operator": "Equal", "value": self.name, "effect": "NoSchedule"}]}

    def __enter__(self) -> FakeKubelet:
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti", "nvidia.com/gpu": str(self.gpus)}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name, self.LABEL: self.name}},
                "spec": {"taints": [{"key": self.LABEL, "value": self.name, "effect": "NoSchedule"}]}}
        status, out = self.client.request("POST", "/api/v1/nodes", node)
        assert status in (201, 409), out
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake kubelet (tests)",
                 "lastHeartbeatTime": now(), "lastTransitionTime": now()}
        self.client._ok("PATCH", f"/api/v1/nodes/{self.name}/status", {"status": {
            "capacity": capacity, "allocatable": capacity, "conditions": [ready],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": self.name}],
        }}, content_type=MERGE_PATCH)
        self._renew_lease()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop, and delete the node (the pod garbage collector then removes its pods), so no
        later test in the session finds a Ready node whose pods nothing runs."""
        self._stop.set()
        self._thread.join(10)
        self.client.request("DELETE", f"/api/v1/nodes/{self.name}")

    def _renew_lease(self) -> None:
        renew = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": renew}}
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        status, _ = self.client.request("POST", path, lease)
        if status == 409:
            self.client.request("PATCH", f"{path}/{self.name}", {"spec": {"renewTime": renew}}, content_type=MERGE_PATCH)

    def pods(self) -> list[dict[str, Any]]:
        params = {"fieldSelector": f"spec.nodeName={self.name}"}
        status, out = self.client.request("GET", "/api/v1/pods", params=params)
        return out.get("items") or [] if status == 200 else []

    def _run(self) -> None:
        renewed = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() - renewed > 5:
                    self._renew_lease()
                    renewed = time.monotonic()
                for pod in self.pods():
                    self._sync(pod)
            except Exception as exc:  # keep going; a test that waits on it reports the effect
                self.errors.append(repr(exc))
            self._stop.wait(0.2)

    def _sync(self, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        if meta.get("deletionTimestamp"):
            self.client.request("DELETE", path, {"gracePeriodSeconds": 0})
            return
        if status.get("phase", "Pending") != "Pending":
            return
        ts = now()
        conditions = [{"type": t, "status": "True", "lastTransitionTime": ts}
                      for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        containers = [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True, "started": True,
                       "restartCount": 0, "state": {"running": {"startedAt": ts}}} for c in pod["spec"]["containers"]]
        ip = f"10.244.0.{next(self._ips, 250)}"
        self.client.request("PATCH", f"{path}/status", {"status": {
            "phase": "Running", "hostIP": "10.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": ts,
            "conditions": conditions, "containerStatuses": containers}}, content_type=MERGE_PATCH)

    def finish(self, pod: dict[str, Any], exit_code: int) -> None:
        """End a running pod's containers with `exit_code` (0: Succeeded, else Failed), as the
        kubelet reports a process that exited."""
        meta, ts = pod["metadata"], now()
        containers = [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "started": False,
                       "restartCount": 0, "state": {"terminated": {
                           "exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                           "startedAt": (pod.get("status") or {}).get("startTime") or ts, "finishedAt": ts}}}
                      for c in pod["spec"]["containers"]]
        conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": ts},
                      {"type": "Initialized", "status": "True", "lastTransitionTime": ts},
                      {"type": "ContainersReady", "status": "False", "reason": "PodCompleted", "lastTransitionTime": ts},
                      {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": ts}]
        self.client._ok("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed", "conditions": conditions,
            "containerStatuses": containers}}, content_type=MERGE_PATCH)


# --------------------------------------------------------------------------------------------
# The operator as the chart runs it, but as a local process


def chart_objects(values: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """The chart installed by the real Helm engine (tests/test_chart.py's `installed`: a
    `helm install` into kmock's emulator), as clean manifests: what Helm applied, without
    the emulator's bookkeeping."""
    from tests.test_chart import installed

    objects = installed(values, workdir)["objects"]
    keep = ("name", "namespace", "labels", "annotations")
    return [{**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k in keep}} for obj in objects]


def local_operator_command(args: list[str], replace: dict[str, str | None]) -> list[str]:
    """The Deployment's `kubetune ARGS` as a local command: each `--flag=value` named in
    `replace` gets the new value (None drops the flag); every other argument is kept as the
    chart rendered it."""
    out = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in replace:
            if replace[flag] is not None:
                out.append(f"{flag}={replace[flag]}")
            continue
        out.append(arg)
    missing = [f for f, v in replace.items() if v is not None and not any(a.startswith(f + "=") for a in args)]
    out.extend(f"{f}={replace[f]}" for f in missing)
    kubetune = Path(sys.executable).with_name("kubetune")
    prefix = [str(kubetune)] if kubetune.exists() else [sys.executable, "-c", "import sys; from kubetune.trainer.cli.main "
                                                        "import main; sys.exit(main(sys.argv[1:]))"]
    return [*prefix, *out]


FORBIDDEN = re.compile(r"forbidden|HTTP 403|\(403\)|\" 403 |status\W{1,3}403\b", re.IGNORECASE)
"""A refused call as the operator (`HTTP 403: ...`, the Forbidden condition), kopf and the
kubernetes client (`APIForbiddenError`, `(403) Reason: Forbidden`) or aiohttp's access log
(`"POST ..." 403 ...`) report it; not a timestamp's milliseconds or a response size."""


class OperatorProcess:
    """`kubetune operator ...` in a subprocess, its output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.command = command
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OperatorProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # kopf stops its handlers and exits
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, url: str) -> bool:
        assert self.alive(), f"the operator exited ({self.proc and self.proc.returncode}):\n{self.text()[-4000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
        return False

    def forbidden_lines(self, since: int = 0) -> list[str]:
        """Lines of the log after byte `since` that report a 403 (any call RBAC refused)."""
        return [line for line in self.text()[since:].splitlines() if FORBIDDEN.search(line)]



class GarbageCollectorProbe:
    """Waits, in the background, until kube-controller-manager's garbage collector knows the
    kubetune.io kinds. It rediscovers resources every 30 s: until then the dependents of a
    custom resource are not collected when it goes (they are, up to a minute later, after its
    retries back off). Each probe is a ConfigMap owned by a FineTuneJob that does not exist; the
    first one collected means the collector maps the kind, so owned children of a deleted
    resource go at once from then on. A fresh probe every second: an earlier one may already
    be in the collector's backoff."""

    def __init__(self, client: Client, namespace: str, timeout: float = 90.0) -> None:
        self.client = client
        self.namespace = namespace
        self.timeout = timeout
        self.ready = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="gc-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        probes: list[str] = []
        try:
            while time.monotonic() < deadline:
                name = f"gc-probe-{len(probes)}"
                owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "gc-probe",
                         "uid": str(uuid.uuid4())}
                self.client.create({"apiVersion": "v1", "kind": "ConfigMap",
                                    "metadata": {"name": name, "ownerReferences": [owner]}}, self.namespace)
                probes.append(name)
                for _ in range(5):
                    time.sleep(0.2)
                    if any(self.client.get("ConfigMap", self.namespace, p) is None for p in probes):
                        self.ready.set()
                        return
            self.error = f"no probe collected in {self.timeout:.0f}s"
        except Exception as exc:  # reported by wait()
            self.error = repr(exc)

    def wait(self) -> None:
        """Block until the collector handles kubetune.io owners (fails after the timeout)."""
        self._thread.join(self.timeout + 10)
        assert self.ready.is_set(), f"the garbage collector never collected an orphan of a FineTuneJob: {self.error}"


# --------------------------------------------------------------------------------------------
# The chart on a real control plane, and the operator started as its Deployment starts it

APPLIED_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
PEERING_KINDS = ("ClusterKopfPeering", "KopfPeering")
"""With `peering.enabled` (or replicaCount > 1): kopf's peering objects, applied after the CRDs."""
NOT_APPLIED = {
    "Deployment": "the operator runs as a local process with the Deployment's arguments",
    "Service": "the webhook's Service: no kube-proxy here, the webhook is registered by URL",
    "ValidatingWebhookConfiguration": "registered by the caller, with a URL instead of the Service",
}


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects rendered"
    return found[0]


def apply_chart(kctl: Any, chart: list[dict[str, Any]], namespaces: tuple[str, ...]) -> None:
    """The chart's CRDs (server-side, as Helm's field manager, then Established) and RBAC applied
    as rendered with the real `kubectl` (`kctl`: tests.cluster.fixtures.Kubectl), and the
    namespaces created."""
    kinds = {o["kind"] for o in chart}
    assert kinds <= {"CustomResourceDefinition", *APPLIED_KINDS, *PEERING_KINDS, *NOT_APPLIED}, kinds
    crds = [o for o in chart if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} >= {"finetunejobs.kubetune.io", "alignmentjobs.kubetune.io",
                                                      "inferenceservices.kubetune.io"}
    stream = yaml.safe_dump_all(crds)
    kctl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-", stdin=stream)
    kctl("wait", "--for=condition=Established", "--timeout=60s", "-f", "-", stdin=stream)
    for namespace in namespaces:
        kctl("create", "namespace", namespace, check=False)
    rbac = [o for o in chart if o["kind"] in APPLIED_KINDS]
    assert {o["kind"] for o in rbac} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    kctl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    peering = [o for o in chart if o["kind"] in PEERING_KINDS]
    if peering:
        kctl("apply", "-f", "-", stdin=yaml.safe_dump_all(peering))


class ChartOperator:
    """`kubetune operator` with the chart Deployment's arguments and environment, as a local
    process calling the apiserver with a real token of the chart's ServiceAccount.

    `flags` replaces the Deployment's `--flag=value` arguments (local addresses and paths);
    the liveness endpoint is always on a free loopback port. `start()` waits for it; `kill()`
    is SIGKILL (no shutdown of any kind), `restart()` starts a new process with the same
    command, log appended. `usage()` reads /proc: CPU seconds and peak RSS of the process."""

    def __init__(self, cluster: Any, chart: list[dict[str, Any]], workdir: Path, release_namespace: str,
                 flags: dict[str, str | None] | None = None, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.chart = chart
        """The chart's objects it runs under (its ClusterRole: what it may call)."""
        account = one(chart, "ServiceAccount")["metadata"]["name"]
        self.service_account = f"system:serviceaccount:{release_namespace}:{account}"
        self.kubeconfig = cluster.service_account_kubeconfig(release_namespace, account)
        self.health_url = f"http://127.0.0.1:{free_port()}/healthz"
        container = one(chart, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        self.container = container
        command = local_operator_command(container["args"], {"--liveness": self.health_url, **(flags or {})})
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("KUBETUNE_", "AWS_", "KUBERNETES_")) and k != "KUBECONFIG"}
        for var in container.get("env") or []:
            if "value" in var:
                environ[var["name"]] = var["value"]
            elif var["name"] == "POD_NAME":  # the downward API
                environ["POD_NAME"] = "kubetune-operator-test"
            else:
                raise AssertionError(f"the chart sets {var} in the operator's environment: supply it here")
        environ.update(KUBECONFIG=str(self.kubeconfig), PYTHONSAFEPATH="1", AWS_ACCESS_KEY_ID="testing",
                       AWS_SECRET_ACCESS_KEY="testing", KUBETUNE_CACHE=str(workdir / "cache"), **(env or {}))
        self.process = OperatorProcess(command, environ, workdir / "operator.log")
        self.audit_offset = cluster.audit_offset()
        """Where the apiserver's audit log ended before this operator started (`audit_events(since=)`)."""
        self.webhook_url: str | None = None
        """Where it serves the admission webhook, when the caller turned it on."""
        self._peak_rss = 0

    def __enter__(self) -> ChartOperator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()

    def start(self, timeout: float = 60.0) -> None:
        self.process.__enter__()
        eventually(lambda: self.process.healthy(self.health_url), timeout=timeout, what="the operator's liveness endpoint")

    def kill(self) -> None:
        """SIGKILL, as when the node dies or the OOM killer strikes: nothing is flushed or undone."""
        proc = self.process.proc
        assert proc is not None and proc.poll() is None, "the operator is not running"
        self.sample()
        proc.kill()
        proc.wait(10)

    def restart(self, timeout: float = 60.0) -> None:
        self.start(timeout)

    def sample(self) -> None:
        """Read the running process's peak RSS (kept across restarts: the largest seen)."""
        proc = self.process.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self._peak_rss = max(self._peak_rss, int(line.split()[1]) * 1024)

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, user + system, of the running process; peak RSS in bytes)."""
        proc = self.process.proc
        assert proc is not None and proc.poll() is None, "the operator is not running"
        self.sample()
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / os.sysconf("SC_CLK_TCK"), self._peak_rss


def granted_calls(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every grant in RBAC `rules`."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def audited_calls(cluster: Any, operator: ChartOperator) -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of every request the operator process made since it
    started, from the API server's audit log (kubectl run with its token by a test, `auth can-i`
    and `whoami`, is left out)."""
    calls = set()
    for event in cluster.audit_events(operator.service_account, since=operator.audit_offset):
        ref = event.get("objectRef")
        if not ref or event.get("userAgent", "").startswith("kubectl"):
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        calls.add((ref.get("apiGroup", ""), resource, event["verb"]))
    return calls
