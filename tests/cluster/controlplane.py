"""A real, local Kubernetes control plane for the tests (etcd + kube-apiserver, optionally
kube-controller-manager, kube-scheduler and kwok), started the way controller-runtime's envtest does.

Why: fakes accept whatever the operator sends. The real apiserver applies CRD defaults and
schemas, serves printer columns and `kubectl explain`, and enforces RBAC, so the operator and
the chart can be checked against the behaviour they meet in a cluster.

With `controllers`, the real Job, Deployment/ReplicaSet, garbage-collector, namespace,
ServiceAccount and node-lifecycle controllers run and the real scheduler binds pods. With `kwok`
as well, kwok (sigs.k8s.io/kwok) plays the kubelet for every Node annotated
`kwok.x-k8s.io/node: fake`: it marks such nodes Ready, renews their leases and moves the pods
bound to them through their lifecycle (stages in tests/cluster/kwok/: Running at once, Job pods
Succeeded, failures and disruptions on request). No container ever runs.

The apiserver writes an audit log (`audit.log`, `AUDIT_POLICY`): one line per request made with a
ServiceAccount token, i.e. by the operator under test, with its user, verb, resource and response
code; the tests compare it with the chart's RBAC and the scale benchmark counts requests from it.

Everything binds to 127.0.0.1 on free ports and lives in one work directory (certificates,
kubeconfigs, `<component>.log`), so several test sessions can run side by side.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.certs import KeyPair, TinyCA, key_pem, new_key, public_pem

HOST = "127.0.0.1"
ADMIN_USER = "kubetune-admin"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
KWOK_STAGES = Path(__file__).with_name("kwok")
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
"""Nodes with this annotation are kwok's; any other node is left alone."""
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # One line per request (ResponseComplete; ResponseStarted too for watches), metadata only.
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}
"""What the apiserver's audit log records: every request made with a ServiceAccount token (the
operator's identity in the tests; the controllers, the scheduler, kwok and the tests' admin use
client certificates, so their traffic, the bulk of it, is not written)."""


def free_port() -> int:
    """An unused loopback port (envtest's approach; the tiny race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL the child when the test process dies, so a killed pytest
    (timeout, Ctrl-C twice, OOM) leaves no etcd or apiserver behind. SIGKILL, not SIGTERM:
    a terminated apiserver whose etcd is gone as well keeps waiting on it instead of exiting."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


@dataclass
class Component:
    """One running binary, its log file and how to stop it."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        """The end of the component's log, for error messages."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


def kubeconfig(server: str, ca_pem: bytes, user: str, credentials: dict[str, str]) -> dict[str, Any]:
    """A self-contained kubeconfig (data embedded, so the file can be handed to any process)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubetune-test", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": user}}],
        "current-context": "kubetune-test",
    }


def cert_credentials(pair: KeyPair) -> dict[str, str]:
    """kubeconfig user entry for a client certificate."""
    return {
        "client-certificate-data": base64.b64encode(pair.cert_pem).decode(),
        "client-key-data": base64.b64encode(pair.key_pem).decode(),
    }


@dataclass
class ControlPlane:
    """etcd and kube-apiserver (plus controller-manager and scheduler when `controllers`, and
    kwok when `kwok`).

    `service_account_admission` (default: on exactly when the controllers run, as in a real
    cluster, because then the ServiceAccount controller creates each namespace's `default`)
    turns on the ServiceAccount admission plugin: pods get their ServiceAccount (and token
    volume) and are refused while the ServiceAccount they name does not exist. Without the
    controllers it stays off, as in envtest.

    Use as a context manager, or call `start()` and `stop()`.
    """

    bin_dir: Path
    workdir: Path
    controllers: bool = False
    kwok: bool = False
    service_account_admission: bool | None = None
    authority: TinyCA = field(default_factory=TinyCA)
    components: list[Component] = field(default_factory=list)
    port: int = 0
    _admin_pair: KeyPair | None = field(default=None, init=False, repr=False)

    # ---- paths and URLs -------------------------------------------------------------------
    @property
    def server(self) -> str:
        """The apiserver URL for clients."""
        return f"https://{HOST}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate that signed the serving and client certificates."""
        return self.workdir / "pki" / "ca.crt"

    @property
    def ca(self) -> Path:
        """Alias of `ca_file` (what kubeconfigs and TLS clients trust)."""
        return self.ca_file

    @property
    def audit_log(self) -> Path:
        """The apiserver's audit log (JSON lines, `AUDIT_POLICY`: ServiceAccount users only)."""
        return self.workdir / "audit.log"

    def audit_offset(self) -> int:
        """Where the audit log ends now (for `audit_events(since=...)`)."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def audit_events(self, username: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """The audit events so far (of `username` only, if given; from byte offset `since`, an
        earlier `audit_offset()`), one per request and stage."""
        events = []
        if self.audit_log.exists():
            with self.audit_log.open("rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if username is None or event.get("user", {}).get("username") == username:
                        events.append(event)
        return events

    @property
    def admin_kubeconfig(self) -> Path:
        """Kubeconfig of a `system:masters` user (cluster-admin; RBAC never denies it)."""
        return self.workdir / "admin.kubeconfig"

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, then the apiserver, then (optionally) the controllers; stop all on failure."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_pki()
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._write_kubeconfig(self.admin_kubeconfig, ADMIN_USER, ("system:masters",))
            if self.controllers:
                self._start_controllers()
            if self.kwok:
                self._start_kwok()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the components in reverse start order and drop etcd's data (the logs stay)."""
        while self.components:
            self.components.pop().stop()
        data = self.workdir / "etcd-data"
        if data.exists():
            subprocess.run(["rm", "-rf", str(data)], check=False)

    # ---- identities -----------------------------------------------------------------------
    def kubeconfig_for(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> Path:
        """A kubeconfig authenticating as `user` in `groups` (client certificate, CN/O)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        path = self.workdir / "users" / f"{safe}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        self._write_kubeconfig(path, user, tuple(groups))
        return path

    def service_account_kubeconfig(self, namespace: str, name: str, expiration_s: int = 3600) -> Path:
        """A kubeconfig with a real ServiceAccount token (TokenRequest API), creating the
        namespace and ServiceAccount when missing: the identity the operator has in a cluster
        (`system:serviceaccount:<ns>:<name>` in `system:serviceaccounts[:<ns>]`)."""
        self.ensure({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                    "/api/v1/namespaces")
        self.ensure({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
                    f"/api/v1/namespaces/{namespace}/serviceaccounts")
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": expiration_s}}
        status, body = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", request)
        if status != 201:
            raise RuntimeError(f"TokenRequest for {namespace}/{name} failed: {status} {body}")
        path = self.workdir / "users" / f"sa-{namespace}-{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        config = kubeconfig(self.server, self.authority.cert_pem, f"{namespace}:{name}",
                            {"token": body["status"]["token"]})
        path.write_text(json.dumps(config, indent=1))
        return path

    def wait_garbage_collector_watches(self, resource: str, group: str, timeout: float = 75.0) -> None:
        """Wait until kube-controller-manager's garbage collector watches `resource` (plural)
        of API `group`, e.g. ("finetunejobs", "kubetune.io").

        The garbage collector looks for new resource types (a CRD installed after it started)
        only every 30 s (hard-coded). Until it watches a kind, it learns that an owner of
        that kind was deleted only by re-reading the owner with an exponential back-off, so a
        custom resource created and deleted soon after its CRD was installed can leave its
        children around for a minute or more. Call this after installing CRDs and before
        creating owners whose deletion a test expects to cascade."""
        kcm = next((c for c in self.components if c.name == "kube-controller-manager"), None)
        if kcm is None:
            raise RuntimeError("the controllers are not running (ControlPlane(controllers=True))")
        # The line lists the resources added since the last sync as `G/V, Resource=R` (`/v1, ...`
        # for the core group).
        gvr = re.compile(rf"(^|[\[ ]){re.escape(group)}/[^,\s]+, Resource={re.escape(resource)}([ \]]|$)")

        def watching() -> bool:
            text = kcm.log.read_text(errors="replace") if kcm.log.exists() else ""
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if "syncing garbage collector" in line and gvr.search(line.split("removed:")[0]):
                    return any('"synced garbage collector"' in later for later in lines[i + 1:])
            return False

        self._wait(kcm, watching, timeout)

    # ---- a minimal admin client (no client library needed) --------------------------------
    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                pair: KeyPair | None = None, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        """One JSON request as admin (or as `pair`); returns (status, decoded body). For PATCH,
        pass `content_type` (application/merge-patch+json, ...)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, context=self._ssl(pair), timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            raw = err.read()
            with contextlib.suppress(ValueError):
                return err.code, json.loads(raw)
            return err.code, {"raw": raw.decode(errors="replace")}

    def get_table(self, path: str) -> dict[str, Any]:
        """GET `path` as a server-side Table (what kubectl renders printer columns from)."""
        req = urllib.request.Request(self.server + path, headers={
            "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
        with urllib.request.urlopen(req, context=self._ssl(), timeout=10) as resp:
            return json.loads(resp.read())

    def ensure(self, obj: dict[str, Any], collection: str) -> None:
        """Create `obj` in `collection` unless it exists (409 is fine)."""
        status, body = self.request("POST", collection, obj)
        if status not in (201, 409):
            raise RuntimeError(f"creating {obj['kind']} failed: {status} {body}")

    # ---- internals ------------------------------------------------------------------------
    def _ssl(self, pair: KeyPair | None = None) -> ssl.SSLContext:
        """TLS context trusting the test CA and presenting a client certificate (admin's
        unless `pair`); ssl only loads certificates from files, hence the files."""
        pki = self.workdir / "pki"
        cert, key = pki / "admin.crt", pki / "admin.key"
        if pair is not None:
            cert, key = pki / "request-client.crt", pki / "request-client.key"
            cert.write_bytes(pair.cert_pem)
            key.write_bytes(pair.key_pem)
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(cert, key)
        return ctx

    def _write_pki(self) -> None:
        """CA, apiserver serving certificate and the ServiceAccount signing key."""
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        self.ca_file.write_bytes(self.authority.cert_pem)
        serving = self.authority.serving(HOST)
        (pki / "apiserver.crt").write_bytes(serving.cert_pem)
        (pki / "apiserver.key").write_bytes(serving.key_pem)
        sa_key = new_key()
        (pki / "sa.key").write_bytes(key_pem(sa_key))
        (pki / "sa.pub").write_bytes(public_pem(sa_key))
        self._admin_pair = self.authority.client(ADMIN_USER, ("system:masters",))
        (pki / "admin.crt").write_bytes(self._admin_pair.cert_pem)
        (pki / "admin.key").write_bytes(self._admin_pair.key_pem)

    def _write_kubeconfig(self, path: Path, user: str, groups: tuple[str, ...]) -> None:
        is_admin = path == self.admin_kubeconfig and self._admin_pair is not None
        pair = self._admin_pair if is_admin else self.authority.client(user, groups)
        path.write_text(json.dumps(kubeconfig(self.server, self.authority.cert_pem, user, cert_credentials(pair)),
                                   indent=1))

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Component:
        """Start a binary from bin_dir, output to <workdir>/<name>.log (`env` added to ours)."""
        binary = self.bin_dir / name
        if not binary.is_file():
            raise FileNotFoundError(f"{binary} is not built (tests/cluster/build.sh {name})")
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([str(binary), *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.workdir,
                                    env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        component = Component(name, proc, log)
        self.components.append(component)
        return component

    def _start_etcd(self) -> str:
        """A single-member etcd on loopback; fsync off because the data is thrown away."""
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://{HOST}:{client}", f"http://{HOST}:{peer}"
        etcd = self._spawn("etcd", [
            "--name=n0", f"--data-dir={self.workdir / 'etcd-data'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=n0={peer_url}", "--unsafe-no-fsync=true", "--log-level=warn",
        ])
        self._wait(etcd, lambda: self._http_ok(f"{client_url}/health"))
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        """envtest's flag set: RBAC, client-certificate users, ServiceAccount tokens."""
        self.port = free_port()
        pki = self.workdir / "pki"
        policy = self.workdir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        sa_admission = self.controllers if self.service_account_admission is None else self.service_account_admission
        admission = "--enable-admission-plugins=ServiceAccount" if sa_admission else \
            "--disable-admission-plugins=ServiceAccount"
        apiserver = self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", f"--cert-dir={pki}",
            f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={self.port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}", "--authorization-mode=RBAC",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true", admission,
            f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
        ])
        self._wait(apiserver, lambda: self._http_ok(f"{self.server}/readyz", self._ssl()))

    def _start_controllers(self) -> None:
        """kube-controller-manager and kube-scheduler (binding).

        `--controllers=*` is every controller on by default: job, cronjob, deployment,
        replicaset, statefulset, daemonset, disruption, horizontalpodautoscaling,
        garbagecollector, namespace, serviceaccount (each namespace's `default`),
        serviceaccount-token, root-ca-certificate-publisher (`kube-root-ca.crt`),
        nodelifecycle, podgc, ttl-after-finished, endpoints/endpointslice, resourcequota, ...
        Those that need a cloud provider log that they are skipped."""
        kcfg = str(self.admin_kubeconfig)
        common = [f"--kubeconfig={kcfg}", f"--authentication-kubeconfig={kcfg}",
                  f"--authorization-kubeconfig={kcfg}", "--leader-elect=false", f"--bind-address={HOST}"]
        pki = self.workdir / "pki"
        kcm_port, sched_port = free_port(), free_port()
        kcm = self._spawn("kube-controller-manager", [
            *common, f"--secure-port={kcm_port}", f"--cert-dir={pki / 'kcm'}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={self.ca_file}",
            "--use-service-account-credentials=false", "--controllers=*",
            # The garbage collector's "syncing ... resources from discovery" lines (V(2), that
            # file only), which `wait_garbage_collector_watches` reads.
            "--vmodule=garbagecollector=2",
        ])
        sched = self._spawn("kube-scheduler", [*common, f"--secure-port={sched_port}",
                                               f"--cert-dir={pki / 'scheduler'}"])
        self._wait(kcm, lambda: self._http_ok(f"https://{HOST}:{kcm_port}/healthz", _insecure()))
        self._wait(sched, lambda: self._http_ok(f"https://{HOST}:{sched_port}/readyz", _insecure()))

    def _start_kwok(self) -> None:
        """kwok for the nodes annotated `kwok.x-k8s.io/node: fake`, with the stages in
        tests/cluster/kwok/ (one config file, so nothing else is needed in the cluster). Its own
        HOME, so a `~/.kwok/kwok.yaml` on the machine is not merged in."""
        home = self.workdir / "kwok"
        home.mkdir(exist_ok=True)
        config = home / "kwok.yaml"
        config.write_text(kwok_config())
        port = free_port()
        kwok = self._spawn("kwok", [
            f"--kubeconfig={self.admin_kubeconfig}", f"--config={config}",
            f"--server-address={HOST}:{port}",
        ], env={"HOME": str(home)})
        self._wait(kwok, lambda: self._http_ok(f"http://{HOST}:{port}/healthz"))

    @staticmethod
    def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as resp:
                return resp.status == 200
        except (OSError, ssl.SSLError):
            return False

    @staticmethod
    def _wait(component: Component, ready: Any, timeout: float = START_TIMEOUT_S) -> None:
        """Poll `ready()`; fail fast with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if component.proc.poll() is not None:
                raise RuntimeError(f"{component.name} exited ({component.proc.returncode}):\n"
                                   f"{component.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{component.name} not ready after {timeout:.0f}s:\n{component.log_tail()}")


def kwok_config() -> str:
    """kwok's configuration: which nodes it manages, then every Stage in tests/cluster/kwok/."""
    key, value = KWOK_NODE_ANNOTATION
    options = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {
            "manageNodesWithAnnotationSelector": f"{key}={value}",
            # Pod IPs are made up from this range (nothing routes to them), apart from the
            # Services' 10.0.0.0/24; leases keep the node-lifecycle controller from evicting.
            "cidr": "10.244.0.0/16",
            "nodeIP": "10.243.0.1",
            "nodeLeaseDurationSeconds": 40,
            # kwok applies no defaults to a configuration file: these are its defaults
            # (kustomize/kwok/kwok.yaml); without them it refuses to start.
            "nodeLeaseParallelism": 4,
            "nodePlayStageParallelism": 4,
            "podPlayStageParallelism": 4,
            "podsOnNodeSyncParallelism": 1,
            "enablePodsOnNodeSyncStreamWatch": True,
            "enableProfilingHandler": False,
        },
    }
    docs = [json.dumps(options)]
    docs += [path.read_text() for path in sorted(KWOK_STAGES.glob("*.yaml"))]
    return "\n---\n".join(docs) + "\n"


def _insecure() -> ssl.SSLContext:
    """The controllers serve health on self-signed certificates; only liveness is checked."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
