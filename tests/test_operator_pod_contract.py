"""The pod contract: the operator's rendered pods, run as local processes, train together.

A 2-node FineTuneJob is rendered with the operator's own renderer; each pod of its Indexed Job is
then started the way the kubelet would start it: the container's `command` + `args` with
Kubernetes' `$(VAR)` expansion, its `env` (fieldRef to the completion-index annotation,
secretKeyRef to a Secret holding the S3 credentials), its `workingDir`, and its volume mounts
mapped to local directories (the ConfigMap's job.yaml at the mount path's stand-in, every emptyDir
a fresh directory per pod, so nothing is shared but the network and S3). Only two things are
translated: pod 0's DNS name (through the headless Service) becomes 127.0.0.1, and the
rendezvous port a free local one. S3 is moto's server.

The prepare Job's pod runs first (a multi-node job writing to S3 tokenizes once by default) and
leaves the tokenized dataset in S3; the two `torchrun --nnodes 2` processes must read it instead
of tokenizing, form one world (DeepSpeed ZeRO-2 on CPU, gloo) and
train to completion with the outputs in S3. SIGTERM to both pods (what a node drain, preemption or
`suspend` does) must leave a complete checkpoint in S3, holding both nodes' ZeRO optimizer-state
shards although each pod only ever had its own on its disk, and the same pods started again, on
fresh disks, must resume from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune.operator.resources import validate_spec
from kubetune.operator.training.render import (
    COMPLETION_INDEX_ANNOTATION,
    render_prepare_job,
    render_training,
    shutdown_timeout,
)
from kubetune.trainer.artifacts.datacache import cluster_default_cache, prepare_skip_reason
from kubetune.trainer.artifacts.output import MANIFEST_NAME
from kubetune.trainer.artifacts.s3output import shards_marker_name
from tests.storage_fixtures import *  # noqa: F403
from tests.storage_fixtures import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3Env

from .conftest import EXAMPLES

pytestmark = pytest.mark.slow

SECRET_NAME = "s3-creds"
MAX_STEPS = 60
"""Long enough that SIGTERM, sent as soon as the first checkpoint is in S3, lands mid-run."""
VENV_BIN = Path(sys.executable).parent


def prebuilt_torch_extensions() -> str:
    """Where this machine keeps DeepSpeed's JIT-built ops (its CPU communication op). A real
    trainer image would ship them prebuilt; pointing the pods there (through the job's `env`, as
    a user could) spares each fresh pod a minute of compiling."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def finetunejob(s3: S3Env, endpoint: str, run: str, **training: Any) -> dict[str, Any]:
    spec = {
        "model": {"path": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": s3.uri("data/demo_alpaca.json"), "format": "alpaca"}], "maxLength": 48},
        "method": "full",
        "distributed": {"deepspeed": {"stage": 2}},
        "train": {"maxSteps": MAX_STEPS, "batchSize": 4, "learningRate": 1e-3},
        "checkpoint": {"everySteps": 5, "keepLast": 2},
        "logging": {"everySteps": 1, "samples": 0},
        "output": {"path": s3.uri(run)},
        "storage": {"pathStyle": True},
    }
    for key, value in training.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) else value
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "contract", "namespace": "ml", "uid": "0000-contract"},
        "spec": {
            "nodes": 2,
            "gpusPerNode": 0,
            "storage": {"secretRef": {"name": SECRET_NAME}, "endpoint": endpoint},
            "terminationGracePeriodSeconds": 120,
            "env": [{"name": "TORCH_EXTENSIONS_DIR", "value": prebuilt_torch_extensions()}],
            "training": spec,
        },
    }


# --------------------------------------------------------------------------------------------
# The kubelet, locally

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent-variable expansion: `$(VAR)` from `env`, `$$` an escaped `$`, an
    undefined `$(VAR)` left as is."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(sub, text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Pod:
    index: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Kubelet:
    """Starts the pods of a rendered Indexed Job as local process trees."""

    def __init__(self, objects: list[dict[str, Any]], secret: dict[str, str], root: Path):
        by_kind = {o["kind"]: o for o in objects if o["kind"] != "Job"}
        jobs = {o["metadata"]["name"].endswith("-prepare"): o for o in objects if o["kind"] == "Job"}
        self.config_map, self.service, self.job = by_kind["ConfigMap"], by_kind["Service"], jobs[False]
        self.prepare = jobs.get(True)
        self.secret = secret
        self.root = root
        self.port = free_port()
        self.pods: list[Pod] = []

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.job["spec"]["template"]["spec"]

    def master_dns(self) -> str:
        """Pod 0's stable name: `<hostname>.<subdomain>.<namespace>.svc`, hostname `<job>-0`."""
        job = self.job["metadata"]
        assert self.pod_spec["subdomain"] == self.service["metadata"]["name"]
        return f"{job['name']}-0.{self.pod_spec['subdomain']}.{job['namespace']}.svc"

    def pod(self, index: int, attempt_dir: str, job: dict[str, Any] | None = None) -> Pod:
        pod_spec = (job or self.job)["spec"]["template"]["spec"]
        (container,) = pod_spec["containers"]
        base = self.root / attempt_dir / f"pod-{index}"
        # Volumes: the ConfigMap's files, and a fresh directory for every emptyDir.
        mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        for mount in sorted(container["volumeMounts"], key=lambda m: len(m["mountPath"])):
            volume = volumes[mount["name"]]
            local = base / "volumes" / mount["name"]
            if "persistentVolumeClaim" in volume:  # a shared file system: one directory for every pod
                local = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
                local.mkdir(parents=True, exist_ok=True)
            else:
                local.mkdir(parents=True)
            if "configMap" in volume:
                assert volume["configMap"]["name"] == self.config_map["metadata"]["name"]
                for name, text in self.config_map["data"].items():
                    (local / name).write_text(text)
            else:
                assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
            # A mount below another one shows inside it (e.g. /workspace/shared in /workspace).
            parent = next((p for p in sorted(mounts, key=len, reverse=True) if mount["mountPath"].startswith(p + "/")), None)
            if parent is not None:
                link = mounts[parent] / mount["mountPath"][len(parent) + 1:]
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(local)
            mounts[mount["mountPath"]] = local

        def local_path(value: str) -> str:
            for mount_path in sorted(mounts, key=len, reverse=True):
                if value == mount_path or value.startswith(mount_path + "/"):
                    return str(mounts[mount_path]) + value[len(mount_path):]
            return value

        # The image's environment (PATH to the installed trainer), then the container's.
        env: dict[str, str] = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": str(index),
                               "TMPDIR": str(mounts["/tmp"]), "HF_HUB_OFFLINE": "1"}
        annotations = {COMPLETION_INDEX_ANNOTATION: str(index)}
        for item in container["env"]:
            if "value" in item:
                value = expand(item["value"], env)
            else:
                source = item["valueFrom"]
                if "fieldRef" in source:
                    match = re.fullmatch(r"metadata\.annotations\['(.+)'\]", source["fieldRef"]["fieldPath"])
                    assert match, source
                    value = annotations[match.group(1)]
                elif "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["name"] == SECRET_NAME
                    if ref["key"] not in self.secret:
                        assert ref.get("optional"), ref
                        continue
                    value = self.secret[ref["key"]]
                else:
                    raise AssertionError(f"unexpected env source {source}")
            env[item["name"]] = value
        # The two translations (gang pods only): pod 0's DNS name and a free rendezvous port.
        if job is None and self.job["spec"]["completions"] > 1:
            assert env["KUBETUNE_MASTER_ADDR"] == self.master_dns()
            env["KUBETUNE_MASTER_ADDR"] = "127.0.0.1"
        rendered_port = str(self.service["spec"]["ports"][0]["targetPort"])
        argv = []
        for arg in [*container["command"], *container["args"]]:
            arg = expand(arg, env)
            assert "$(" not in arg, f"unexpanded variable in {arg!r}"
            if arg == f"--master-port={rendered_port}":
                arg = f"--master-port={self.port}"
            argv.append(local_path(arg))
        for name, value in list(env.items()):
            env[name] = local_path(value)
        executable = shutil.which(argv[0], path=env["PATH"])
        assert executable, f"{argv[0]} is not installed"
        argv[0] = executable
        return Pod(index, argv, env, Path(local_path(container["workingDir"])), base / "log.txt")

    def run_prepare(self, timeout: float) -> Pod:
        """The prepare Job's one pod, run to completion before the gang (as the operator orders it)."""
        assert self.prepare is not None, "no prepare Job was rendered"
        pod = self.pod(0, "prepare", job=self.prepare)
        pod.start()
        assert pod.proc is not None
        try:
            code = pod.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pod.kill()
            raise AssertionError("the prepare pod did not finish:\n" + pod.output()) from None
        assert code == 0, pod.output()
        return pod

    def start(self, attempt_dir: str) -> list[Pod]:
        self.port = free_port()
        self.pods = [self.pod(i, attempt_dir) for i in range(self.job["spec"]["completions"])]
        for pod in self.pods:
            pod.start()
        return self.pods

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for pod in self.pods:
            assert pod.proc is not None
            try:
                codes.append(pod.proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError("pods did not finish:\n" + "\n".join(p.output() for p in self.pods)) from None
        return codes

    def signal(self, sig: int) -> None:
        """What the kubelet does on drain/preemption: the signal to each container's PID 1."""
        for pod in self.pods:
            assert pod.proc is not None
            pod.proc.send_signal(sig)

    def stop(self) -> None:
        for pod in self.pods:
            pod.kill()


@pytest.fixture
def kubelet_factory(s3: S3Env, moto_endpoint: str, tmp_path: Path):
    s3.upload_tree(EXAMPLES / "data" / "demo_alpaca.json", "data")
    made: list[Kubelet] = []

    def make(cr: dict[str, Any]) -> Kubelet:
        objects = render_training(cr)
        spec = validate_spec(cr["kind"], cr["spec"])
        if has_prepare_step(spec):
            objects.append(render_prepare_job(cr, spec))
        kubelet = Kubelet(objects, {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY}, tmp_path)
        made.append(kubelet)
        return kubelet

    yield make
    for kubelet in made:
        kubelet.stop()


def has_prepare_step(spec: Any) -> bool:
    """What the operator decides (reconcile's `has_prepare_step`)."""
    return prepare_skip_reason(cluster_default_cache(spec.training, spec.nodes)) is None


def metrics(s3: S3Env, run: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in s3.get(f"{run}/metrics.jsonl").decode().splitlines() if line.strip()]


def complete_checkpoints(s3: S3Env, run: str) -> list[int]:
    return sorted(int(key.split("/")[-2].split("-")[1]) for key in s3.keys(f"{run}/checkpoint-")
                  if key.endswith("/" + MANIFEST_NAME))


# --------------------------------------------------------------------------------------------


def test_a_pod_override_mounts_a_volume_the_trainer_writes_to(s3: S3Env, moto_endpoint: str, kubelet_factory: Any,
                                                              tmp_path: Path):
    """spec.podTemplate adds a shared volume (a PersistentVolumeClaim: here one local directory
    for every pod) below the working directory; the trainer of the rendered pod writes its
    checkpoints and final model there, and they outlive the pod."""
    cr = finetunejob(s3, moto_endpoint, "unused", distributed={"deepspeed": None}, train={"maxSteps": 4},
                     checkpoint={"everySteps": 2, "keepLast": 2}, output={"path": "shared/runs/override"})
    cr["spec"]["nodes"] = 1
    cr["spec"]["podTemplate"] = {
        "spec": {"volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "team-fs"}}]},
        "container": {"volumeMounts": [{"name": "shared", "mountPath": "/workspace/shared"}]},
    }
    kubelet = kubelet_factory(cr)
    (trainer,) = kubelet.pod_spec["containers"]
    assert {"name": "shared", "mountPath": "/workspace/shared"} in trainer["volumeMounts"]
    assert kubelet.prepare is None
    kubelet.start("a1")
    assert kubelet.wait(timeout=600) == [0], kubelet.pods[0].output()
    run = tmp_path / "claims" / "team-fs" / "runs" / "override"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"], list(run.iterdir())
    assert (run / "metrics.jsonl").is_file() and list(run.glob("*.safetensors")), list(run.iterdir())


def test_rendered_pod_command_is_an_argument_list_runnable_as_is(s3: S3Env, moto_endpoint: str):
    cr = finetunejob(s3, moto_endpoint, "runs/x")
    job = {o["kind"]: o for o in render_training(cr)}["Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    assert "--nnodes=2" in args and "--nproc-per-node=1" in args and "--node-rank=$(KUBETUNE_NODE_RANK)" in args
    assert args[-4:] == ["--no-python", "kubetune", "train", "/etc/kubetune/job.yaml"]
    env = {e["name"]: e for e in container["env"]}
    # torchrun SIGKILLs its trainers 30 s after forwarding SIGTERM unless told otherwise: the
    # checkpoint upload gets the pod's grace period instead.
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == str(shutdown_timeout(120)) == "110"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "AWS_SECRET_ACCESS_KEY"}
    # Every path the trainer writes is on a writable volume (the root filesystem is read-only).
    mounts = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for name in ("HOME", "XDG_CACHE_HOME", "KUBETUNE_CACHE", "HF_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert any(env[name]["value"].startswith(m + "/") or env[name]["value"] == m for m in mounts), name
    assert any(container["workingDir"] == m for m in mounts)


def local_checkpoint_files(pod: Pod, step: int) -> set[str]:
    """What this pod's own disk holds of checkpoint-<step> (its emptyDirs, under the trainer's cache)."""
    found = list(pod.log.parent.glob(f"volumes/**/checkpoint-{step}"))
    return {f.relative_to(d).as_posix() for d in found for f in d.rglob("*") if f.is_file()}


def zero_shard(step: int, rank: int) -> str:
    """DeepSpeed's ZeRO-1/2 optimizer-state file of one rank, inside checkpoint-<step>."""
    return f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def test_two_pods_train_together_with_zero2_survive_sigterm_and_the_rerun_resumes_to_completion(
    s3: S3Env, moto_endpoint: str, kubelet_factory, tmp_path: Path
):
    run = "runs/contract"
    kubelet = kubelet_factory(finetunejob(s3, moto_endpoint, run))

    # First the prepare pod (a 2-node job writing to S3 gets one by default): it tokenizes the
    # dataset once into the cache beside the output, so no rank tokenizes.
    kubelet.run_prepare(timeout=180)
    assert [k for k in s3.keys("kubetune-cache/") if k.endswith("/kubetune-dataset.json")], s3.keys("kubetune-cache/")

    # Attempt 1: both pods train as one world; SIGTERM to both once a checkpoint is in S3.
    kubelet.start("attempt-1")
    deadline = time.monotonic() + 240
    while not complete_checkpoints(s3, run):
        for pod in kubelet.pods:
            assert pod.proc is not None and pod.proc.poll() is None, pod.output()
        assert time.monotonic() < deadline, "no checkpoint reached S3:\n" + "\n".join(p.output() for p in kubelet.pods)
        time.sleep(0.1)
    kubelet.signal(signal.SIGTERM)
    codes = kubelet.wait(timeout=120)
    logs = "\n".join(p.output() for p in kubelet.pods)
    status = json.loads(s3.get(f"{run}/status.json"))
    assert status["phase"] == "Interrupted", (status, logs)  # not Succeeded: the signal landed mid-run
    assert all(code != 0 for code in codes), (codes, logs)  # the attempt failed: the operator starts the next
    stopped_at = status["step"]
    assert 5 <= stopped_at < MAX_STEPS
    assert "cache hit" in kubelet.pods[0].log.read_text(errors="replace"), kubelet.pods[0].output()
    assert not any("Tokenizing train" in p.log.read_text(errors="replace") for p in kubelet.pods), logs
    # The graceful stop saved and uploaded a checkpoint at the step it stopped; S3 holds only
    # complete checkpoints (manifest written last, after every file).
    assert stopped_at in complete_checkpoints(s3, run), (stopped_at, complete_checkpoints(s3, run), logs)
    assert status["lastCheckpoint"] == s3.uri(f"{run}/checkpoint-{stopped_at}")
    first = metrics(s3, run)
    start = next(r for r in first if r.get("event") == "start")
    assert start["worldSize"] == 2, start  # one world, not two runs
    # Two ranks share each epoch: 281 training rows in batches of 4 on each of 2 ranks.
    steps_per_epoch = -(-start["data"]["train"]["examples"] // (4 * 2))
    logged = next(r for r in first if r.get("step") == 5 and "loss" in r)
    assert logged["epoch"] == pytest.approx(5 / steps_per_epoch, abs=1e-3), (logged, steps_per_epoch)

    # ZeRO-2 without a shared disk: each pod wrote only its own rank's optimizer-state shard...
    pod0, pod1 = kubelet.pods
    own0, own1 = local_checkpoint_files(pod0, stopped_at), local_checkpoint_files(pod1, stopped_at)
    assert zero_shard(stopped_at, 0) in own0 and zero_shard(stopped_at, 1) not in own0, own0
    assert own1 == {zero_shard(stopped_at, 1), "rng_state_1.pth"}, own1
    # ...and the checkpoint in S3 is complete only with both: pod 1 uploaded its files (and said
    # so in its shards marker), then pod 0 listed them in the manifest.
    manifest = json.loads(s3.get(f"{run}/checkpoint-{stopped_at}/{MANIFEST_NAME}"))
    marker = json.loads(s3.get(f"{run}/checkpoint-{stopped_at}/{shards_marker_name(1)}"))
    assert set(marker["files"]) == own1 and marker["step"] == stopped_at
    assert set(manifest["files"]) == own0 | own1, (sorted(manifest["files"]), own0, own1)
    for rel, meta in manifest["files"].items():
        assert len(s3.get(f"{run}/checkpoint-{stopped_at}/{rel}")) == meta["size"], rel

    # Attempt 2: the same pods again, on fresh disks: both download the whole checkpoint (every
    # rank loads every ZeRO shard), resume, and train to the end.
    kubelet.start("attempt-2")
    codes = kubelet.wait(timeout=240)
    logs = "\n".join(p.output() for p in kubelet.pods)
    assert codes == [0, 0], logs
    status = json.loads(s3.get(f"{run}/status.json"))
    assert status["phase"] == "Succeeded" and status["step"] == MAX_STEPS, (status, logs)
    keys = s3.keys(run + "/")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "kubetune-spec.yaml", "metrics.jsonl", "status.json"):
        assert f"{run}/{name}" in keys, (name, keys)
    records = metrics(s3, run)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    assert records[last_start]["resumedFrom"].endswith(f"checkpoint-{stopped_at}"), records[last_start]
    assert records[last_start]["worldSize"] == 2
    resumed = [r["step"] for r in records[last_start:] if "loss" in r]
    assert resumed and min(resumed) == stopped_at + 1 and max(resumed) == MAX_STEPS, resumed  # continued
    assert complete_checkpoints(s3, run)[-1] == MAX_STEPS
    final = json.loads(s3.get(f"{run}/checkpoint-{MAX_STEPS}/{MANIFEST_NAME}"))
    assert {zero_shard(MAX_STEPS, 0), zero_shard(MAX_STEPS, 1)} <= set(final["files"])

    # The trained model in S3 loads and runs.
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("model.safetensors", "config.json"):
        (model_dir / name).write_bytes(s3.get(f"{run}/{name}"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
