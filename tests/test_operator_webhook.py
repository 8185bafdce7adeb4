"""The validating admission webhook, served for real: `kubetune operator --webhook-port ...
--webhook-cert ... --webhook-key ...` (the flags the Helm chart passes) runs as a process against
kmock's Kubernetes emulator, and the test plays the API server: it POSTs AdmissionReviews over
HTTPS, verifying the server's certificate, to `/validate-spec` (the path the chart's
ValidatingWebhookConfiguration names). A bad FineTuneJob is denied with the problems
`kubetune validate` prints for the same manifest; a good one is allowed.

The certificate is a self-signed one made here with `cryptography` (as cert-manager's
self-signed Issuer does for the chart): kopf's own generator needs `certbuilder`, which is not
a dependency."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import io
import ipaddress
import os
import ssl
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import pytest
import pytest_asyncio
import yaml

from tests.operator_support import (
    SERVING_RESOURCES,
    Cluster,
    kmock_info,
    register_resources,
    write_kubeconfig,
)
from tests.test_inference_pod import _free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((REPO / "examples" / "finetunejob-lora-sft.yaml").read_text())


@pytest.fixture()
def kmock_options() -> dict[str, Any]:
    return {"cls": Cluster}


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed serving certificate for 127.0.0.1 / localhost (its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-webhook.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _review(obj: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a FineTuneJob (or `obj`'s kind)."""
    kind = obj.get("kind", "FineTuneJob")
    plural = {"FineTuneJob": "finetunejobs", "AlignmentJob": "alignmentjobs", "InferenceService": "inferenceservices"}[kind]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "kubetune.io", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "kubetune.io", "version": "v1alpha1", "resource": plural},
            "requestKind": {"group": "kubetune.io", "version": "v1alpha1", "kind": kind},
            "requestResource": {"group": "kubetune.io", "version": "v1alpha1", "resource": plural},
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _validate_cli(manifest: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    """What `kubetune validate job.yaml` prints (in-process: same code as the command)."""
    from kubetune.trainer.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path)])
    return code, err.getvalue()


def _problems(message: str) -> str:
    """The problem list of a multi-problem SpecErrors message, without its "Invalid spec in
    <where> (N problems):" head (a file for the CLI, the resource for the webhook)."""
    head, sep, problems = message.partition(" problems):\n")
    assert sep and head.split("(")[-1].isdigit(), message
    return problems.strip()


@pytest_asyncio.fixture()
async def webhook(kmock: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`kubetune operator` with the webhook on HTTPS; yields (url, ssl context)."""
    register_resources(kmock)
    for key, (kind, subresources) in SERVING_RESOURCES.items():  # InferenceService (and its children)
        kmock.resources[key] = kmock_info(kind, subresources)
    config = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(config))
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    env = {**os.environ, "KUBECONFIG": str(config), "PYTHONSAFEPATH": "1", "KUBETUNE_KOPF_EVENTS": "0",
           "KUBETUNE_KOPF_SCANNING": "0", "KUBETUNE_WEBHOOK_ADDR": "127.0.0.1"}
    log_path = tmp_path / "operator.log"
    log = open(log_path, "wb")  # noqa: SIM115  (the process writes to it until the fixture ends)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetune.trainer.cli", "operator", "--standalone", "-A",
        "--webhook-port", str(port), "--webhook-host", "localhost",
        "--webhook-cert", str(cert), "--webhook-key", str(key),
        stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    context = ssl.create_default_context(cafile=str(cert))  # verifies the chain and 127.0.0.1
    url = f"https://127.0.0.1:{port}/validate-spec"
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                if proc.returncode is not None:
                    pytest.fail(f"the operator exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(url.replace("/validate-spec", "/"), ssl=context) as resp:
                        await resp.read()
                        break  # the TLS handshake succeeded and the server answers
                if time.monotonic() > deadline:
                    pytest.fail(f"the webhook never listened on {port}:\n{log_path.read_text()[-3000:]}")
                await asyncio.sleep(0.2)
        yield url, context
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def _post(url: str, context: ssl.SSLContext, review: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=review, ssl=context) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["kind"] == "AdmissionReview" and body["response"]["uid"] == review["request"]["uid"]
    return body["response"]


async def test_webhook_over_https_denies_like_validate_and_allows_a_good_job(webhook: tuple[str, ssl.SSLContext],
                                                                           tmp_path: Path) -> None:
    url, context = webhook
    good = copy.deepcopy(GOOD)
    good["metadata"].setdefault("namespace", "ml")
    allowed = await _post(url, context, _review(good))
    assert allowed["allowed"] is True, allowed
    assert "status" not in allowed

    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "bad-job"
    bad["spec"]["training"]["method"] = "magic"
    bad["spec"]["training"].setdefault("lora", {})["rnak"] = 4
    denied = await _post(url, context, _review(bad))
    assert denied["allowed"] is False
    assert denied["status"]["code"] == 422
    message = denied["status"]["message"]
    code, printed = await asyncio.to_thread(_validate_cli, bad, tmp_path)
    assert code == 2 and printed.startswith("kubetune: Invalid spec in ")
    assert message.startswith("Invalid spec in FineTuneJob ml/bad-job")
    assert _problems(message) == _problems(printed), (message, printed)
    assert "spec.training.method" in message and "did you mean `rank`?" in message

    # Plain HTTP, or a client that does not trust the certificate, gets nowhere.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.post(url, json=_review(good), ssl=ssl.create_default_context()):
                pass


async def test_webhook_bounds_echoes_warns_about_literal_secrets_and_judges_every_kind(
        webhook: tuple[str, ssl.SSLContext], tmp_path: Path) -> None:
    url, context = webhook
    good = copy.deepcopy(GOOD)
    good["metadata"].setdefault("namespace", "ml")

    # A 100 KB value in an enum field: a short denial, not a 100 KB one.
    huge = copy.deepcopy(good)
    huge["spec"]["training"]["method"] = "m" * 100_000
    denied = await _post(url, context, _review(huge))
    assert denied["allowed"] is False and "spec.training.method" in denied["status"]["message"]
    assert len(denied["status"]["message"]) <= 2000

    # Local data (a pod starts with an empty /workspace) and over-deep free-form objects.
    local = copy.deepcopy(good)
    local["spec"]["training"]["data"]["datasets"][0]["path"] = "examples/data/demo_alpaca.json"
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(300):
        deep = {"n": deep}
    message = (await _post(url, context, _review(local)))["status"]["message"]
    assert "spec.training.data.datasets[0].path" in message and "upload the file to S3" in message
    local["spec"]["affinity"] = deep
    message = (await _post(url, context, _review(local)))["status"]["message"]
    assert "spec.affinity: is nested more than 20 levels deep" in message

    # A literal secret in spec.env is allowed, with a warning `kubectl apply` prints.
    secret = copy.deepcopy(good)
    secret["spec"]["env"] = [{"name": "HF_TOKEN", "value": "hf_x"}]
    allowed = await _post(url, context, _review(secret))
    assert allowed["allowed"] is True
    assert any("spec.env[0] (HF_TOKEN)" in w and "valueFrom" in w for w in allowed.get("warnings") or [])

    # An InferenceService: the same words as `kubetune validate`.
    isvc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml"}, "spec": {"model": {"uri": "s3://m/x"}, "engine": "tgi"}}
    denied = await _post(url, context, _review(isvc))
    code, printed = await asyncio.to_thread(_validate_cli, isvc, tmp_path)
    assert denied["allowed"] is False and code == 2
    assert "spec.engine" in denied["status"]["message"]
    assert denied["status"]["message"].split(": ", 1)[1] == printed.strip().split(": ", 2)[2]
