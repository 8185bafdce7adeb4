"""`kubetune console` against a real kube-apiserver (tests/cluster) with the CRDs installed, in
headless Chromium: Apply from the Launch form (the operator's admission check first, its message
next to the field), the created FineTuneJob's page, and the Jobs table showing the status the
operator writes (written here through the status subresource, as the operator does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.cluster.controlplane import ControlPlane
from tests.cluster.fixtures import Kubectl
from tests.test_console import _free_port, _shot, _start, browser, page  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "kt-console"


@pytest.fixture(scope="module")
def cluster_console(real_cluster: ControlPlane, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory):
    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(REPO / "crds"))
    kubectl("create", "namespace", NAMESPACE)
    root = tmp_path_factory.mktemp("console-cluster")
    port = _free_port()
    argv = [sys.executable, "-m", "kubetune.trainer.cli.main", "console", "--port", str(port),
            "--runs-dir", str(root / "runs"), "--kubeconfig", str(real_cluster.admin_kubeconfig),
            "--namespace", NAMESPACE]
    process = _start(argv, f"http://127.0.0.1:{port}/jobs", root / "console.log")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(30)
    kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_apply_from_the_form_then_list_and_status(cluster_console, kubectl: Kubectl, page) -> None:  # noqa: F811
    url = cluster_console
    page.goto(f"{url}/launch")
    page.fill("#f-name", "console-job")
    page.click("#apply-button")
    # the quickstart's data is a file on this machine: the operator's admission refuses it, on the field
    error = page.locator("#err-data-datasets-0-path")
    error.wait_for(state="visible", timeout=15000)
    assert "local path" in error.inner_text()
    page.fill("#f-data-datasets-0-path", "s3://demo/demo_alpaca.json")
    page.fill("#f-output-path", "s3://demo/outputs/console-job")
    page.locator("#f-output-path").blur()
    page.wait_for_function("document.getElementById('err-data-datasets-0-path').textContent.trim() === ''", timeout=15000)
    page.click("#apply-button")
    page.wait_for_url(f"{url}/cluster/{NAMESPACE}/FineTuneJob/console-job", timeout=30000)
    assert page.locator("#phase").inner_text() == "Pending"

    stored = json.loads(kubectl("-n", NAMESPACE, "get", "finetunejob", "console-job", "-o", "json").stdout)
    training = stored["spec"]["training"]
    assert training["data"]["datasets"][0]["path"] == "s3://demo/demo_alpaca.json"
    assert training["train"]["learningRate"] == 0.003 and training["method"] == "full"

    status = {"status": {"phase": "Running", "attempts": 1,
                         "progress": {"step": 3, "totalSteps": 10, "percent": 30, "loss": 1.5, "etaSeconds": 70},
                         "conditions": [{"type": "Ready", "status": "False", "reason": "Training",
                                         "message": "step 3 of 10", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    kubectl("-n", NAMESPACE, "patch", "finetunejob", "console-job", "--subresource=status", "--type=merge",
            "-p", json.dumps(status))
    page.goto(f"{url}/jobs?namespace={NAMESPACE}")
    row = page.locator('tr[data-name="console-job"]')
    assert row.get_attribute("data-phase") == "Running"
    assert "1.5000" in row.inner_text() and "3/10" in row.inner_text()
    _shot(page, "jobs-cluster")
    page.goto(f"{url}/cluster/{NAMESPACE}/FineTuneJob/console-job")
    assert page.locator("#phase").inner_text() == "Running"
    assert "step 3 of 10" in page.inner_text("main")
    _shot(page, "resource")


def test_apply_an_inferenceservice_and_the_chinese_pages(cluster_console, kubectl: Kubectl, page) -> None:  # noqa: F811
    """The InferenceService tab: the form from its schema, the operator's message on its field,
    Apply, the resource's page; then the Jobs page in Chinese (a CJK font installed by .ci/run)."""
    url = cluster_console
    page.goto(f"{url}/launch?kind=InferenceService")
    page.fill("#f-resource-name", "chat")
    page.fill("#f-model-uri", "s3://demo/outputs/console-job")
    page.fill("#f-gpus", "-1")
    page.locator("#f-gpus").blur()
    error = page.locator("#err-gpus")
    error.wait_for(state="visible", timeout=15000)
    assert "greater than or equal to 0" in error.inner_text()
    page.fill("#f-gpus", "0")
    page.select_option("#f-engine", "transformers")
    page.click("#add-adapters")
    page.locator("#f-adapters-1-name").wait_for(timeout=15000)
    page.fill("#f-adapters-0-name", "sft")
    page.fill("#f-adapters-0-uri", "s3://demo/outputs/console-job")
    page.locator("#f-adapters-0-uri").blur()
    page.wait_for_function("document.getElementById('yaml-view').value.includes('name: sft')", timeout=15000)
    _shot(page, "launch-inferenceservice")
    page.click("#apply-button")
    page.wait_for_url(f"{url}/cluster/{NAMESPACE}/InferenceService/chat", timeout=30000)
    stored = json.loads(kubectl("-n", NAMESPACE, "get", "inferenceservice", "chat", "-o", "json").stdout)["spec"]
    assert stored["model"]["uri"] == "s3://demo/outputs/console-job" and stored["gpus"] == 0
    assert [a["name"] for a in stored["adapters"]] == ["sft"]  # the empty second item is left out
    page.goto(f"{url}/lang/zh?next=/jobs")
    page.wait_for_url(f"{url}/jobs", timeout=15000)
    assert "任务" in page.inner_text("h1")
    assert page.locator('tr[data-name="chat"]').count() == 1
    _shot(page, "jobs-zh")


# ---------------------------------------------------------------- the chart's console (console.enabled)

RELEASE_NS = "kubetune"
RESTRICTED_NS = "kt-console-restricted"


def _token_get(url: str, token: str | None = None, headers: dict[str, str] | None = None,
               body: dict[str, str] | None = None) -> tuple[int, str]:
    """One request to the console, as a browser's htmx would send it."""
    import urllib.error
    import urllib.parse
    import urllib.request

    data = urllib.parse.urlencode(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={
        **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {}),
        **({"Content-Type": "application/x-www-form-urlencoded"} if data else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _chart_console(values: dict, tmp: Path, suffix: str = "") -> list[dict]:
    """The console's objects as the real Helm engine renders them (tests/test_chart.py), renamed
    with `suffix` so two variants' RBAC can live side by side."""
    from tests.cluster_operator import chart_objects
    from tests.test_chart import console_objects

    objects = console_objects(chart_objects({"console": {"enabled": True, "namespace": NAMESPACE, **values}}, tmp))
    for obj in objects:
        obj["metadata"]["name"] += suffix
        if obj["kind"] == "ClusterRoleBinding":
            obj["roleRef"]["name"] += suffix
            obj["subjects"][0]["name"] += suffix
        if obj["kind"] == "Deployment":
            obj["spec"]["template"]["spec"]["serviceAccountName"] += suffix
    return objects


def _one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _start_chart_console(objects: list[dict], real_cluster: ControlPlane, tmp: Path, env: dict[str, str]):
    """`kubetune console` with the chart Deployment's arguments, as the chart's ServiceAccount
    (a real token), on a loopback port of this machine instead of the pod's."""
    import os

    from tests.cluster_operator import local_operator_command

    account = _one(objects, "ServiceAccount")["metadata"]["name"]
    kubeconfig = real_cluster.service_account_kubeconfig(RELEASE_NS, account)
    container = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    port = _free_port()
    argv = local_operator_command(container["args"], {"--in-cluster": None, "--kubeconfig": str(kubeconfig),
                                                      "--host": "127.0.0.1", "--port": str(port)})
    os.environ.update(env)  # read by the child only (KUBETUNE_CONSOLE_TOKEN)
    try:
        process = _start(argv, f"http://127.0.0.1:{port}/healthz", tmp / "console.log")
    finally:
        for key in env:
            os.environ.pop(key, None)
    return process, f"http://127.0.0.1:{port}", f"system:serviceaccount:{RELEASE_NS}:{account}"


def _apply_rbac(kubectl: Kubectl, objects: list[dict]) -> None:
    import yaml

    kubectl("create", "namespace", RELEASE_NS, check=False)
    rbac = [o for o in objects if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))


def _form(name: str) -> dict[str, str]:
    import yaml

    from kubetune.operator.console import form

    document = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    values = form.document_to_form(document)
    values.update({"name": name, "data.datasets[0].path": "s3://demo/a.json", "output.path": f"s3://demo/{name}",
                   "_namespace": NAMESPACE, "_nodes": "1", "_gpusPerNode": "1"})
    return values


def _inference_form(name: str) -> dict[str, str]:
    return {"_kind": "InferenceService", "_name": name, "_namespace": NAMESPACE, "model.uri": "s3://demo/model",
            "model.name": "demo", "engine": "transformers", "gpus": "0"}


def _calls(real_cluster: ControlPlane, user: str, since: int) -> list[dict]:
    return [e for e in real_cluster.audit_events(user, since=since)
            if e.get("stage") == "ResponseComplete" and e.get("objectRef")]


def test_the_charts_console_pods_pass_restricted_pod_security(cluster_console, kubectl: Kubectl,
                                                               tmp_path: Path) -> None:
    """The API server's own PodSecurity admission at `restricted` admits the console's pod, with
    and without the auth proxy sidecar (and refuses a root pod, so the check is live)."""
    import yaml

    from tests.test_chart import AUTH_PROXY

    kubectl("create", "namespace", RESTRICTED_NS, check=False)
    kubectl("label", "--overwrite", "namespace", RESTRICTED_NS, "pod-security.kubernetes.io/enforce=restricted")
    kubectl("-n", RESTRICTED_NS, "create", "serviceaccount", "kubetune-console", check=False)
    variants = {"token": {}, "proxy": {"impersonation": {"enabled": True, "proxy": AUTH_PROXY}}}
    for variant, values in variants.items():
        (tmp_path / variant).mkdir()
        template = _one(_chart_console(values, tmp_path / variant), "Deployment")["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"console-{variant}", "namespace": RESTRICTED_NS},
               "spec": template["spec"]}
        result = kubectl("create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(pod), check=False)
        assert result.returncode == 0, f"{variant}: {result.stderr}"
        root = {**pod, "spec": {**pod["spec"], "securityContext": {"runAsUser": 0}}}
        refused = kubectl("create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(root), check=False)
        assert refused.returncode != 0 and "restricted" in refused.stderr


def test_the_charts_console_rbac_is_exactly_what_it_calls(cluster_console, real_cluster: ControlPlane,
                                                          kubectl: Kubectl, tmp_path: Path) -> None:
    """The chart's console as its own ServiceAccount through every page that reaches the API
    server: Jobs (all namespaces and one), Apply, a resource's page with its events and its pod's
    log. Every call the real API server audited is granted, without a 403, and every grant is used."""
    from kubetune.operator.common import selector_labels
    from tests.test_chart import _granted

    objects = _chart_console({}, tmp_path)
    _apply_rbac(kubectl, objects)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rbac-job-pod", "namespace": NAMESPACE,
           "labels": selector_labels("FineTuneJob", "rbac-job")},
           "spec": {"containers": [{"name": "trainer", "image": "trainer:x"}]}}
    kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    since = real_cluster.audit_offset()
    process, url, user = _start_chart_console(objects, real_cluster, tmp_path, {"KUBETUNE_CONSOLE_TOKEN": "t0ken"})
    try:
        assert _token_get(f"{url}/jobs")[0] == 401
        assert _token_get(f"{url}/jobs", "t0ken")[0] == 200
        assert _token_get(f"{url}/jobs?namespace={NAMESPACE}", "t0ken")[0] == 200
        status, body = _token_get(f"{url}/launch/apply", "t0ken", body=_form("rbac-job"))
        assert status == 204, body
        status, page = _token_get(f"{url}/cluster/{NAMESPACE}/FineTuneJob/rbac-job", "t0ken")
        assert status == 200 and "rbac-job-pod" in page
        dpo = {**_form("rbac-dpo"), "stage": "dpo", "data.datasets[0].format": "preference"}
        assert _token_get(f"{url}/launch/apply", "t0ken", body=dpo)[0] == 204
        assert _token_get(f"{url}/cluster/{NAMESPACE}/AlignmentJob/rbac-dpo", "t0ken")[0] == 200
        status, body = _token_get(f"{url}/launch/apply", "t0ken", body=_inference_form("rbac-serve"))
        assert status == 204, body
        assert _token_get(f"{url}/cluster/{NAMESPACE}/InferenceService/rbac-serve", "t0ken")[0] == 200
        assert 'id="run-button"' not in _token_get(f"{url}/launch", "t0ken")[1]  # --no-local-runs
    finally:
        process.terminate()
        process.wait(30)
    calls = _calls(real_cluster, user, since)
    assert not [e for e in calls if e["responseStatus"]["code"] == 403], "the console was refused a call"
    made = {(e["objectRef"].get("apiGroup", ""), e["objectRef"]["resource"]
             + (f"/{e['objectRef']['subresource']}" if e["objectRef"].get("subresource") else ""), e["verb"]) for e in calls}
    assert made == _granted(_one(objects, "ClusterRole")["rules"]), sorted(made)


def test_the_charts_console_acts_as_the_proxys_user(cluster_console, real_cluster: ControlPlane, kubectl: Kubectl,
                                                    tmp_path: Path) -> None:
    """With impersonation the console's ServiceAccount may only impersonate: alice, bound to a
    Role in one namespace, applies there and sees its jobs; bob may not; no user header, no answer.
    The API server's audit log shows each call made as the user, in the groups the proxy named."""
    from tests.test_chart import AUTH_PROXY

    objects = _chart_console({"impersonation": {"enabled": True, "proxy": AUTH_PROXY}}, tmp_path, "-imp")
    _apply_rbac(kubectl, objects)
    kubectl("-n", NAMESPACE, "create", "role", "ml-engineer", "--verb=get,list,create",
            "--resource=finetunejobs.kubetune.io,alignmentjobs.kubetune.io,inferenceservices.kubetune.io")
    kubectl("-n", NAMESPACE, "create", "rolebinding", "ml-engineers", "--role=ml-engineer", "--group=ml-team")
    since = real_cluster.audit_offset()
    process, url, user = _start_chart_console(objects, real_cluster, tmp_path, {})
    alice = {"X-Forwarded-User": "alice", "X-Forwarded-Groups": "ml-team, other"}
    try:
        assert _token_get(f"{url}/jobs")[0] == 401  # the proxy named nobody
        status, body = _token_get(f"{url}/launch/apply", headers=alice, body=_form("alice-job"))
        assert status == 204, body
        status, page = _token_get(f"{url}/jobs?namespace={NAMESPACE}", headers=alice)
        assert status == 200 and 'data-name="alice-job"' in page and '">alice</span>' in page
        status, page = _token_get(f"{url}/jobs", headers=alice)  # all namespaces: not alice's to list
        assert status == 200 and "forbidden" in page.lower()
        status, body = _token_get(f"{url}/launch/apply", headers={"X-Forwarded-User": "bob"}, body=_form("bob-job"))
        assert status == 200 and "bob" in body and "cannot create" in body
    finally:
        process.terminate()
        process.wait(30)
    created = json.loads(kubectl("-n", NAMESPACE, "get", "finetunejob", "alice-job", "-o", "json").stdout)
    assert created["spec"]["training"]["output"]["path"] == "s3://demo/alice-job"
    assert kubectl("-n", NAMESPACE, "get", "finetunejob", "bob-job", check=False).returncode != 0
    calls = _calls(real_cluster, user, since)
    assert calls and all("impersonatedUser" in e for e in calls), calls
    creates = [e for e in calls if e["verb"] == "create" and e["objectRef"]["resource"] == "finetunejobs"]
    by_user = {e["impersonatedUser"]["username"]: e for e in creates}
    assert set(by_user) == {"alice", "bob"}
    assert by_user["alice"]["responseStatus"]["code"] == 201 and by_user["bob"]["responseStatus"]["code"] == 403
    assert {"ml-team", "other"} <= set(by_user["alice"]["impersonatedUser"]["groups"])
