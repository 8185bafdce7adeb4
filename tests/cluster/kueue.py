"""Kueue (sigs.k8s.io/kueue) in the simulated cluster: its CRDs, its admission webhooks and its
manager binary, built from the Go module by tests/cluster/build.sh.

Why the real Kueue: the operator's side of Kueue's contract (a Job with the
`kueue.x-k8s.io/queue-name` label is created suspended and left alone until admitted) is only
proven when Kueue itself holds, admits, preempts and re-admits kubetune's Jobs.

How it runs here (no container, no Service, no cert-manager):
- the CRDs are applied from the module's `config/components/crd/bases` (module cache);
- the webhooks are the module's `config/components/webhook/manifests.yaml`, only those for
  batch/v1 Jobs and Kueue's own kinds (the pod/deployment/statefulset ones would refuse every
  pod: those integrations are off), with `clientConfig.url` on 127.0.0.1 and the test CA (no
  kube-proxy, as envtest does), the Job ones limited to namespaces labelled `KUEUE_NS_LABEL` so
  other tests' Jobs never depend on Kueue;
- the manager runs with internal certificate management off, serving the webhooks with a
  certificate from the cluster's test CA. With it off, Kueue also reads its metrics certificate
  from a fixed path, /etc/kueue/metrics/certs (cmd/kueue/main.go); the process gets that path
  in a private mount namespace (`unshare --user --mount`, an overlay on /etc), so nothing on
  the machine changes. Where unprivileged user namespaces are not allowed the tests skip.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import HOST, Component, ControlPlane, _die_with_parent, free_port

NAMESPACE = "kueue-system"
KUEUE_NS_LABEL = ("kubetune.io/test-kueue", "true")
"""Namespaces with this label get Kueue's Job webhook; Jobs elsewhere never call Kueue."""
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_API = "/apis/kueue.x-k8s.io/v1beta2"
START_TIMEOUT_S = 90.0

_OVERLAY = (
    'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc && '
    'mkdir -p /etc/kueue/metrics && ln -s "$3" /etc/kueue/metrics/certs && shift 3 && exec "$@"'
)
"""Inside the private mount namespace: /etc gains kueue/metrics/certs -> the test certificates."""


def module_dir(version: str) -> Path:
    """The Kueue module's source in the Go module cache (downloaded by build.sh)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOSUMDB": os.environ.get("KUBETUNE_GOSUMDB", "off"),
           "GOFLAGS": "-mod=mod"}
    out = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{version}"], capture_output=True,
                         text=True, check=True, env=env, timeout=300)
    return Path(json.loads(out.stdout)["Dir"])


def user_namespaces_work() -> bool:
    """Whether this machine lets an unprivileged process mount an overlay in its own namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                           check=False, timeout=30)
    return probe.returncode == 0


def webhooks(manifests: list[dict[str, Any]], url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations for Jobs and its own kinds, called by URL on loopback."""
    out = []
    key, value = KUEUE_NS_LABEL
    for config in manifests:
        config = copy.deepcopy(config)
        config["metadata"]["name"] = f"kubetune-test-kueue-{config['kind'].lower()}"
        kept = []
        for hook in config["webhooks"]:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups or not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{url}{path}", "caBundle": base64.b64encode(ca_pem).decode()}
            if "batch" in groups:
                hook["namespaceSelector"] = {"matchLabels": {key: value}}
            kept.append(hook)
        config["webhooks"] = kept
        out.append(config)
    return out


def configuration(*, health: int, metrics: int, webhook: int, cert_dir: Path,
                  pods_ready_timeout_s: int) -> dict[str, Any]:
    """Kueue's Configuration: batch/v1 Jobs only, webhooks on loopback with our certificates,
    and waitForPodsReady: an admitted Job whose pods are not all Ready in time is evicted (its
    pods deleted) and requeued, so a gang the nodes cannot fully place holds GPUs no longer."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"{HOST}:{health}"},
        "metrics": {"bindAddress": f"{HOST}:{metrics}"},
        "webhook": {"host": HOST, "port": webhook, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
        "waitForPodsReady": {
            "timeout": f"{pods_ready_timeout_s}s",
            "blockAdmission": False,
            "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 30, "backoffMaxSeconds": 60},
        },
    }


class Kueue:
    """Kueue's CRDs, webhooks and manager on `cluster` (use as a context manager). `stop()`
    removes the webhook configurations first, so the cluster works on without Kueue."""

    def __init__(self, cluster: ControlPlane, kubectl: Any, bin_dir: Path, workdir: Path,
                 pods_ready_timeout_s: int = 15) -> None:
        self.cluster = cluster
        self.kubectl = kubectl
        self.binary = bin_dir / "kueue"
        self.version = (bin_dir / ".kueue.version").read_text().strip()
        self.workdir = workdir
        self.pods_ready_timeout_s = pods_ready_timeout_s
        self.component: Component | None = None
        self.webhook_configs: list[dict[str, Any]] = []

    def __enter__(self) -> Kueue:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        source = module_dir(self.version)
        self.kubectl("create", "namespace", NAMESPACE, check=False)
        crds = source / "config" / "components" / "crd" / "bases"
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))
        certs = self.workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        serving = self.cluster.authority.serving(HOST)
        (certs / "tls.crt").write_bytes(serving.cert_pem)
        (certs / "tls.key").write_bytes(serving.key_pem)
        health, webhook = free_port(), free_port()
        config = self.workdir / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(configuration(
            health=health, metrics=free_port(), webhook=webhook, cert_dir=certs,
            pods_ready_timeout_s=self.pods_ready_timeout_s)))
        self.component = self._spawn(certs, config)
        ControlPlane._wait(self.component, lambda: ControlPlane._http_ok(f"http://{HOST}:{health}/readyz"),
                           START_TIMEOUT_S)
        manifests = list(yaml.safe_load_all((source / "config/components/webhook/manifests.yaml").read_text()))
        self.webhook_configs = webhooks([m for m in manifests if m], f"https://{HOST}:{webhook}",
                                        self.cluster.authority.cert_pem)
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(self.webhook_configs))

    def _spawn(self, certs: Path, config: Path) -> Component:
        """The manager in its own user and mount namespace (see the module docstring)."""
        upper, work = self.workdir / "etc-upper", self.workdir / "etc-work"
        upper.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        log = self.workdir / "kueue.log"
        command = ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", _OVERLAY, "sh",
                   str(upper), str(work), str(certs), str(self.binary), f"--config={config}",
                   f"--kubeconfig={self.cluster.admin_kubeconfig}", "--feature-gates=VisibilityOnDemand=false",
                   "--zap-log-level=2"]
        with log.open("ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.workdir, preexec_fn=_die_with_parent)
        return Component("kueue", proc, log)

    def stop(self) -> None:
        for config in self.webhook_configs:
            plural = "mutatingwebhookconfigurations" if config["kind"].startswith("Mutating") else \
                "validatingwebhookconfigurations"
            with contextlib.suppress(Exception):
                self.cluster.request("DELETE", f"/apis/admissionregistration.k8s.io/v1/{plural}/"
                                               f"{config['metadata']['name']}")
        self.webhook_configs = []
        if self.component is not None:
            self.component.stop()
            self.component = None

    # ---- Kueue's objects ------------------------------------------------------------------
    def apply(self, *objects: dict[str, Any]) -> None:
        """Create or update Kueue objects (ResourceFlavor, ClusterQueue, LocalQueue, ...)."""
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        status, body = self.cluster.request("GET", f"{KUEUE_API}/namespaces/{namespace}/workloads")
        assert status == 200, body
        return body.get("items") or []
