"""The operator at scale: N FineTuneJobs created at once on a simulated GPU cluster, until Running.

    python bench/operator_scale.py              # 200 jobs (about 3 minutes on 2 cores)
    python bench/operator_scale.py --jobs 50 --steady 0

Everything is real except the nodes: etcd, kube-apiserver, kube-controller-manager (Job
controller) and kube-scheduler built by tests/cluster/build.sh, kwok playing the kubelet of
ceil(N/8) fake nodes with 8 `nvidia.com/gpu` each, the chart's CRDs and RBAC as the real Helm
engine renders them, and `kubetune operator` with the chart Deployment's arguments (its default
`--reconcile-interval=10`), calling the API server with a real token of the chart's
ServiceAccount (tests/cluster_operator.py). S3 (the trainer's status.json, which the operator
reads for every job in flight) is moto's server; nothing writes one, so every read is a miss.

Each job is a 1-node, 1-GPU FineTuneJob whose pods select the fake nodes: the operator renders
its ConfigMap, Service and Indexed Job, the Job controller makes the pod, the scheduler binds it,
kwok marks it Running and Ready (the nodes carry `sim.kubetune.io/keep-running`, so kwok never
completes it), the Job's status changes, and the operator (woken by the Job's watch event)
writes phase Running. Measured:
- time to Running per job (from its create call returning to the first poll, every 0.5 s, that
  sees phase Running): p50, p95, max; and for all N (from the first create to the last Running);
- API requests per job: every request the operator's ServiceAccount made while the jobs were
  created and started, from the apiserver's audit log (`apiserver_request_total` has no user
  label; the audit log names the user of each request), by verb and resource; and, with
  `--steady S`, the requests per second for S seconds afterwards, when the timers alone run;
- the operator process's CPU seconds (user + system, /proc/PID/stat) in those windows, and its
  peak RSS (VmHWM).

Prints a table; writes bench/results/operator_scale.{json,md} (unless --no-write).
`tests/test_operator_upgrades.py` runs the same `scale_run` with 20 jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (PYTHONSAFEPATH=1 adds nothing)
    sys.path.insert(0, str(REPO))

from tests.cluster.controlplane import ControlPlane  # noqa: E402
from tests.cluster.sim import NodePool, SimCluster, wait_for  # noqa: E402
from tests.cluster_operator import ChartOperator, Client, apply_chart, chart_objects  # noqa: E402

RESULTS = REPO / "bench" / "results"
RELEASE_NS = "kubetune"
GPUS_PER_NODE = 8
POLL_S = 0.5


@dataclass
class ScaleResult:
    jobs: int
    nodes: int
    create_s: float
    """Seconds to create all N (16 clients in parallel)."""
    to_running: list[float]
    """Per job: seconds from its create call returning to phase Running."""
    all_running_s: float
    """From the first create call to the last job Running."""
    requests: dict[str, int]
    """The operator's requests from the first create to the last Running, by `verb resource`."""
    cpu_s: float
    """The operator's CPU seconds in that window."""
    peak_rss_mb: float
    startup_requests: int = 0
    """The operator's requests before the first create (its lists and watches)."""
    steady_s: float = 0.0
    steady_requests: dict[str, int] = field(default_factory=dict)
    steady_cpu_s: float = 0.0

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())

    def percentile(self, q: float) -> float:
        ordered = sorted(self.to_running)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def finetunejob(name: str, pool: NodePool) -> dict[str, Any]:
    """A 1-node, 1-GPU FineTuneJob on the pool's nodes (nodeSelector, so its pods keep running)."""
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"nodes": 1, "gpusPerNode": 1, **pool.placement,
                     "training": {"model": {"path": "s3://models/llama-3-8b"},
                                  "data": {"datasets": [{"path": "s3://data/chat.jsonl"}], "cache": "off"},
                                  "output": {"path": f"s3://outputs/{name}"}}}}


def _audit_requests(cluster: ControlPlane, user: str, namespace: str) -> dict[str, str]:
    """auditID -> `verb resource[/subresource]` of every request `user` has made so far in
    `namespace`, or not in any namespace (kopf's cluster-wide lists and watches): not those for
    resources in other namespaces (another test's, in a shared test cluster)."""
    out = {}
    for event in cluster.audit_events(user):
        ref = event.get("objectRef") or {}
        if ref.get("namespace") not in (None, namespace):
            continue
        resource = ref.get("resource", event.get("requestURI", "?"))
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        out[event["auditID"]] = f"{event.get('verb')} {resource}"
    return out


def scale_run(cluster: ControlPlane, operator: ChartOperator, sim: SimCluster, jobs: int, namespace: str,
              timeout: float = 600.0, steady_s: float = 0.0) -> ScaleResult:
    """Create `jobs` FineTuneJobs at once in a new `namespace` on fresh fake nodes, wait until
    every one is Running, measure (see the module docstring), then delete the namespace and nodes."""
    admin = Client(cluster.admin_kubeconfig)
    sim.create_namespace(namespace)
    pool = sim.add_gpu_nodes(math.ceil(jobs / GPUS_PER_NODE), prefix="scale", keep_running=True, exclusive=True,
                             gpus=GPUS_PER_NODE)
    try:
        time.sleep(1.0)  # let the operator's watches settle before counting
        before = _audit_requests(cluster, operator.service_account, namespace)
        cpu0, _ = operator.usage()
        names = [f"ftj-{i:04d}" for i in range(jobs)]
        created: dict[str, float] = {}
        start = time.monotonic()

        def create(name: str) -> None:
            admin.create(finetunejob(name, pool), namespace)
            created[name] = time.monotonic()

        with ThreadPoolExecutor(16) as pool_exec:
            list(pool_exec.map(create, names))
        create_s = time.monotonic() - start
        running: dict[str, float] = {}
        deadline = start + timeout
        while len(running) < jobs:
            now = time.monotonic()
            for item in admin.list("FineTuneJob", namespace):
                name = item["metadata"]["name"]
                if name not in running and (item.get("status") or {}).get("phase") == "Running":
                    running[name] = now
            if len(running) < jobs and now > deadline:
                missing = sorted(set(names) - set(running))
                raise TimeoutError(f"{len(missing)} of {jobs} FineTuneJobs not Running after {timeout:.0f}s: "
                                   f"{missing[:10]}")
            time.sleep(POLL_S)
        all_running = max(running.values()) - start
        operator.sample()
        cpu1, _ = operator.usage()
        during = _audit_requests(cluster, operator.service_account, namespace)
        window = Counter(v for k, v in during.items() if k not in before)
        result = ScaleResult(jobs=jobs, nodes=len(pool.nodes), create_s=create_s,
                             to_running=[running[n] - created[n] for n in names], all_running_s=all_running,
                             requests=dict(window.most_common()), cpu_s=cpu1 - cpu0, peak_rss_mb=0.0,
                             startup_requests=len(before))
        if steady_s > 0:
            time.sleep(steady_s)
            cpu2, _ = operator.usage()
            after = _audit_requests(cluster, operator.service_account, namespace)
            result.steady_s = steady_s
            result.steady_requests = dict(Counter(v for k, v in after.items() if k not in during).most_common())
            result.steady_cpu_s = cpu2 - cpu1
        result.peak_rss_mb = operator.usage()[1] / 2**20
        return result
    finally:
        # The FineTuneJobs first (the operator lets them go; the garbage collector takes their
        # Jobs), so nothing recreates a Job while the namespace is cleared.
        sim.delete(f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs")
        if operator.process.alive():
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not admin.list("FineTuneJob", namespace), "the FineTuneJobs deleted", timeout=120)
        sim.clear_namespace(namespace, timeout=max(120.0, jobs * 1.0))
        sim.delete_nodes(pool.nodes)


def table(result: ScaleResult) -> str:
    per_job = result.requests_total / result.jobs
    lines = [
        "| jobs | nodes (8 GPUs) | create all s | to Running p50 s | p95 s | max s | all Running s "
        "| API requests/job | operator CPU s | CPU ms/job | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {result.jobs} | {result.nodes} | {result.create_s:.1f} | {result.percentile(0.5):.1f} "
        f"| {result.percentile(0.95):.1f} | {max(result.to_running):.1f} | {result.all_running_s:.1f} "
        f"| {per_job:.1f} | {result.cpu_s:.1f} | {1000 * result.cpu_s / result.jobs:.0f} | {result.peak_rss_mb:.0f} |",
        "",
        f"The operator's requests until all were Running ({result.requests_total}; "
        f"{result.startup_requests} at startup, before the first job, not counted):",
        "",
        "| verb resource | requests | per job |",
        "|---|---|---|",
        *(f"| {key} | {count} | {count / result.jobs:.2f} |" for key, count in result.requests.items()),
    ]
    if result.steady_s:
        total = sum(result.steady_requests.values())
        lines += ["", f"Then {result.steady_s:.0f} s with all {result.jobs} Running (the timers alone): "
                  f"{total} requests ({total / result.steady_s:.1f}/s, "
                  f"{total / result.steady_s / result.jobs * 60:.1f} per job per minute), "
                  f"operator CPU {result.steady_cpu_s:.1f} s "
                  f"({100 * result.steady_cpu_s / result.steady_s:.0f}% of a core):", "",
                  "| verb resource | requests |", "|---|---|",
                  *(f"| {k} | {c} |" for k, c in result.steady_requests.items())]
    return "\n".join(lines)


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on loopback with the `outputs` bucket; yields its endpoint."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="outputs")
    try:
        yield endpoint
    finally:
        server.stop()


def chart_values(s3_endpoint: str) -> dict[str, Any]:
    return {"s3": {"endpoint": s3_endpoint, "region": "us-east-1"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs created at once (default 200)")
    parser.add_argument("--steady", type=float, default=30.0,
                        help="seconds to measure afterwards, all jobs Running (default 30; 0: skip)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed until all Running")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()

    from tests.cluster.fixtures import ALL_COMPONENTS, Kubectl, build_binaries

    bin_dir = build_binaries(ALL_COMPONENTS)
    with tempfile.TemporaryDirectory(prefix="kubetune-scale-") as tmp, moto_s3() as endpoint:
        work = Path(tmp)
        (work / "helm").mkdir()
        chart = chart_objects(chart_values(endpoint), work / "helm")
        with ControlPlane(bin_dir, work / "control-plane", controllers=True, kwok=True) as cluster:
            apply_chart(Kubectl(cluster, work / "kubectl-cache"), chart, (RELEASE_NS,))
            with ChartOperator(cluster, chart, work / "operator", RELEASE_NS) as operator:
                started = time.monotonic()
                result = scale_run(cluster, operator, SimCluster(cluster), args.jobs, "scale",
                                   timeout=args.timeout, steady_s=args.steady)
                print(f"(measured in {time.monotonic() - started:.0f} s)", file=sys.stderr)
    text = table(result)
    print(text)
    if not args.no_write:
        machine = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                   "gpu": "none (kwok's fake nodes)", "reconcile_interval_s": 10}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "operator_scale.json").write_text(json.dumps({"machine": machine, **asdict(result)}, indent=1) + "\n")
        (RESULTS / "operator_scale.md").write_text(
            f"# {args.jobs} FineTuneJobs created at once until Running (simulated GPU cluster)\n\n"
            f"{json.dumps(machine)}\n\n{text}\n\n"
            "Produced by `python bench/operator_scale.py` (see its docstring for what runs and how each "
            "number is measured).\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
